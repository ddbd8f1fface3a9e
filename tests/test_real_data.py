"""`fedcare simulate --sites` on a real clinical data set: scikit-learn's Wisconsin breast-cancer data as
four hospitals (simulations/breast_cancer.py), through the very ServerApp/ClientApp a deployment runs.

The claim checked: DP-SGD at ε <= 1 per site inside SecAgg+ reaches the pooled non-private logistic
regression's test AUC within 0.02 (scikit-learn, standardized features, the same train/test splits).
"""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from simulations.breast_cancer import STUDY_FILE, write_breast_cancer_sites

from .conftest import ROOT

AUC_MARGIN = 0.02
EPSILON = 1.0


def _files(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _simulate(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "cli", "simulate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory):
    root = tmp_path_factory.mktemp("breast-cancer")
    sites = root / "sites"
    manifest = write_breast_cancer_sites(sites)
    before = _files(sites)
    proc = _simulate("--sites", sites, "--study", STUDY_FILE, "--epsilon", EPSILON, "--out", root / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sites, root / "run", manifest, before, proc


def _pooled_logistic_regression_auc(sites):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    def read(split):
        rows = [np.loadtxt(f / f"{split}.csv", delimiter=",", skiprows=1) for f in sorted(sites.iterdir()) if f.is_dir()]
        table = np.concatenate(rows)
        return table[:, :-1], table[:, -1]

    (x, y), (x_test, y_test) = read("train"), read("test")
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=10_000).fit(scaler.transform(x), y)
    return roc_auc_score(y_test, model.predict_proba(scaler.transform(x_test))[:, 1])


def test_dp_federated_logistic_regression_is_within_the_margin_of_the_pooled_one(breast_cancer):
    sites, run, manifest, _, _ = breast_cancer
    report = json.loads((run / "report.json").read_text())
    reference = _pooled_logistic_regression_auc(sites)
    assert reference > 0.97  # the data set is what it should be
    assert report["final"]["auc"] >= reference - AUC_MARGIN, (report["final"]["auc"], reference)
    assert report["outcome"]["completed"]
    assert all(r["aggregated"] and r["sites_aggregated"] == 4 for r in report["rounds"])
    for site in report["sites"]:
        assert 0 < site["epsilon"] <= EPSILON * 1.001 and site["epsilon_target"] == EPSILON
    assert report["export"]["auc_int8"] == pytest.approx(report["final"]["auc"], abs=0.005)


def test_every_site_is_reported_with_its_own_metrics_and_the_mean_over_sites(breast_cancer):
    sites, run, manifest, _, proc = breast_cancer
    report = json.loads((run / "report.json").read_text())
    by_name = {s["name"]: s for s in report["sites"]}
    assert sorted(by_name) == sorted(s["name"] for s in manifest["sites"])
    assert "4 sites from" in proc.stdout
    for planned in manifest["sites"]:
        site = by_name[planned["name"]]
        assert (site["train_rows"], site["test_rows"]) == (planned["train_rows"], planned["test_rows"])
        assert 0 <= site["brier"] <= 0.25 and 0.5 <= site["balanced_accuracy"] <= 1
        assert sum(b["rows"] for b in site["calibration"]) == site["test_rows"]
        assert site["roc"]["fpr"][0] == 0 and site["roc"]["tpr"][-1] == 1
    mean = report["site_mean"]
    assert mean["sites"] == 4
    assert mean["auc"] == pytest.approx(np.mean([s["auc"] for s in report["sites"]]), abs=1e-4)
    assert mean["brier"] == pytest.approx(np.mean([s["brier"] for s in report["sites"]]), abs=1e-4)
    assert report["baseline_centralized"]["converged_epochs"] >= 1


def test_the_sites_folders_are_only_read_and_their_ledgers_live_in_the_run(breast_cancer):
    sites, run, manifest, before, _ = breast_cancer
    assert _files(sites) == before  # nothing written into the evaluator's data
    for site in manifest["sites"]:
        assert (run / "state" / site["name"] / "ledger.jsonl").is_file()


def test_a_site_refusal_is_one_line_naming_the_sites_and_no_traceback(breast_cancer, tmp_path):
    """A study δ above the sites' default policy (1e-5): every site refuses; the operator reads one line
    saying who and why, the study stops at once, and no Ray traceback reaches the terminal."""
    sites = breast_cancer[0]
    study = tmp_path / "loose-delta.toml"
    study.write_text(STUDY_FILE.read_text().replace("delta = 1e-5", "delta = 1e-4"))
    proc = _simulate("--sites", sites, "--study", study, "--rounds", 3, "--out", tmp_path / "run")
    output = proc.stdout + proc.stderr
    line = ("sites community, referral-centre, rural, university refused (policy): "
            "the study's δ = 0.0001 exceeds this site's policy max_delta = 1e-05")
    assert proc.returncode != 0
    assert output.count(f"secure aggregation (collect_masked_vectors): {line}") == 1, output[-3000:]
    assert "study stopped early" in proc.stdout and "Traceback" not in output and "ray::" not in output
    assert f"fedcare: error: no round was securely aggregated: {line}" in proc.stderr


def test_sites_folder_problems_are_one_line_before_anything_runs(breast_cancer, tmp_path):
    import shutil

    sites = tmp_path / "sites"
    shutil.copytree(breast_cancer[0], sites)
    study = ["--study", STUDY_FILE]
    cases = [
        (["--sites", tmp_path / "nowhere"], "--sites: ", "is not a directory of site folders"),
        (["--sites", breast_cancer[0] / "rural"], "--sites: ", "has 0 site folder(s), fewer than the study's strategy.min_sites (3)"),
        (["--sites", sites, "--format", "fhir"], "--format: only for synthetic hospitals", ""),
        (["--sites", sites, "--out", sites / "run"], "--out: ", "must not be inside --sites"),
    ]
    for args, start, end in cases:
        proc = _simulate(*args, *study, *(["--out", tmp_path / "out"] if "--out" not in args else []), timeout=120)
        assert proc.returncode == 2 and start in proc.stderr and end in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (sites / "rural" / "test.csv").unlink()
    proc = _simulate("--sites", sites, *study, "--out", tmp_path / "out", timeout=120)
    assert proc.returncode == 2 and "--sites: site rural: " in proc.stderr and "no test split" in proc.stderr
    both = _simulate("--sites", sites, "--hospitals", 3, timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_the_logistic_model_is_packaged_and_served_by_v1_analyze(breast_cancer, tmp_path):
    """`kind = "logistic"` the rest of the way: the signed package of the run (`fedcare export --run` on
    the simulation's folder, no kit: the run's own kits sign it), `fedcare serve` over real HTTP, each
    model's risk equal to ONNX Runtime on the run's scaled inputs."""
    import httpx

    from client.data import load_site
    from export.onnx_export import run_onnx
    from fedcare.features import model_inputs
    from fedcare.run_record import RunRecord

    from .test_serve import ServerProcess, add_token, fedcare_main, sigmoid64

    sites, run, manifest, _, _ = breast_cancer
    status, out, err = fedcare_main("export", "--run", str(run), "--out", str(tmp_path / "pkg"))
    assert status == 0, err
    assert f"created the simulation's kits in {run / 'kits'}" in out
    assert sorted(p.name for p in (run / "kits").iterdir()) == sorted(["ca", "coordinator", *(s["name"] for s in manifest["sites"])])
    kits = {p.name: p for p in (run / "kits").iterdir()}
    status, out, err = fedcare_main("export", "--run", str(run), "--out", str(tmp_path / "pkg-again"))
    assert status == 0 and "created the simulation's kits" not in out  # made once, then reused
    status, _, err = fedcare_main("export", "--run", str(tmp_path), "--out", str(tmp_path / "pkg-x"))
    assert status == 2 and err.startswith(f"fedcare: error: --kit: required for {tmp_path}: it is not a `fedcare "
                                          "simulate` run folder") and err.count("\n") == 1
    token = add_token(kits["rural"], "clinic", "analyze", "models")
    study = RunRecord(run).study()
    test = load_site(study, sites / "rural").test
    server = ServerProcess(tmp_path / "pkg", kits["rural"], tmp_path / "logs")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
            models = json.loads((tmp_path / "pkg" / "manifest.json").read_text())["models"]
            for kind in ("fp32", "int8"):
                expected = sigmoid64(run_onnx(tmp_path / "pkg" / models[kind]["file"], model_inputs(study, test.features)))
                for i, row in enumerate(test.features[:8]):
                    r = c.post("/v1/analyze", json={"patient_id": f"p-{i}", "model": kind,
                                                    "feature_vector": [float(v) for v in row]})
                    assert r.status_code == 200, r.text
                    assert r.json()["risk"] == pytest.approx(expected[i], rel=1e-9)
                    assert r.json()["label"] == "malignant"
    finally:
        server.stop()
