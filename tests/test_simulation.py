"""One whole study through the real CLI: Flower simulation engine, SecAgg+, DP-SGD, ONNX export."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

REPORT_KEYS = {"study_hash", "secure_aggregation", "rounds", "sites", "final", "baseline_centralized", "export", "wall_seconds"}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    cmd = [sys.executable, "-m", "cli", "simulate", "--hospitals", "3", "--rounds", "2", "--epsilon", "4",
           "--size-scale", "0.5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "report.json").read_text())


def test_study_completes_with_secure_aggregation_and_dp(simulated):
    out, stdout, report = simulated
    assert REPORT_KEYS <= report.keys()
    assert report["secure_aggregation"] is True
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["aggregated"] and r["sites_aggregated"] == 3 for r in report["rounds"])
    assert report["outcome"]["completed"] and report["outcome"]["rounds_aggregated"] == 2
    assert (out / "checkpoints" / "round-002.npz").exists()
    assert len(report["sites"]) == 3
    for site in report["sites"]:
        assert 0 < site["epsilon"] <= 4.0 * 1.001
        assert site["delta"] == 1e-5
        assert site["rounds_trained"] == 2
    assert report["final"]["auc"] > 0.6  # beats chance (0.5) clearly
    export = report["export"]
    assert abs(export["auc_fp32"] - export["auc_int8"]) <= 0.005
    assert abs(export["auc_fp32"] - report["final"]["auc"]) < 1e-3
    assert os.path.getsize(export["onnx"]) == export["bytes_fp32"]
    # the default study's graph is the full one (num_shares = 1.0): every site masks with every other
    assert "secure aggregation: 3 sites, each masking with 2 other sites (its neighbours); " \
           "2 of a site's shares reconstruct its secrets" in stdout
    assert "round 2/2 aggregated" in stdout and "model after round 2/2: test AUC" in stdout and "report:" in stdout
    assert (out / "summary.txt").read_text().startswith("fedcare study depression-risk")


def test_federated_scaling_is_used_reported_and_exported(simulated):
    import onnx

    out, stdout, report = simulated
    assert "federated standardization: scaling from SecAgg+ sums" in stdout
    assert report["scaling"]["method"] == "federated"
    scaling = json.loads((out / "scaling.json").read_text())
    age = report["scaling"]["features"]["age"]
    assert age["center"] == pytest.approx(scaling["center"][0], abs=1e-6) and age["center"] != 47.0  # not the spec's
    meta = {p.key: p.value for p in onnx.load(report["export"]["onnx"]).metadata_props}
    exported = json.loads(meta["fedcare.scaling"])["age"]
    assert exported == pytest.approx([scaling["center"][0], scaling["scale"][0]])
    # federated AUC (aggregates of the sites' histograms) equals the evaluator's AUC on the pooled test rows
    assert report["rounds"][-1]["auc"] == pytest.approx(report["final"]["auc"], abs=2e-3)


def test_the_whole_study_runs_through_fhir(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "simulate", "--hospitals", "3", "--rounds", "1", "--size-scale", "0.3",
           "--format", "fhir", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = out / "sites" / "hospital-01"
    assert (site / "train" / "Observation.ndjson").exists() and not (site / "train.csv").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["auc"] > 0.55 and all(s["rounds_trained"] == 1 for s in report["sites"])
    check = subprocess.run([sys.executable, "-m", "cli", "data", "check", "--study", str(out / "study.toml"),
                            "--data", str(site)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "[train] fhir" in check.stdout and "unit conversions:" in check.stdout


def test_a_logistic_regression_study_runs_through_dp_secagg_and_onnx(tmp_path):
    """`kind = "logistic"` (no hidden layer, the clinical baseline) goes the whole way: DP-SGD inside
    SecAgg+, the federated evaluation, fp32 and int8 ONNX."""
    import onnx

    text = (ROOT / "studies" / "depression-risk.toml").read_text()
    assert 'kind = "mlp"\nhidden = [32]' in text
    study = tmp_path / "logistic.toml"
    study.write_text(text.replace('kind = "mlp"\nhidden = [32]', 'kind = "logistic"'))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "simulate", "--study", str(study), "--hospitals", "3", "--rounds", "1",
           "--size-scale", "0.3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["secure_aggregation"] is True and report["final"]["auc"] > 0.55
    assert all(0 < s["epsilon"] <= 3.0 for s in report["sites"])
    assert abs(report["export"]["auc_int8"] - report["export"]["auc_fp32"]) < 0.01
    graph = onnx.load(report["export"]["onnx"]).graph
    assert not any(node.op_type == "Relu" for node in graph.node), "a logistic model has no hidden layer"
    hidden = study.read_text().replace('kind = "logistic"', 'kind = "logistic"\nhidden = [8]')
    study.write_text(hidden)
    proc = subprocess.run([sys.executable, "-m", "cli", "study", "check", str(study)], capture_output=True, text=True)
    assert proc.returncode == 2 and "model.hidden: a logistic model has no hidden layers" in proc.stderr


def test_study_file_written_for_every_party_matches_hash(simulated):
    from fedcare.study import load_study

    out, _, report = simulated
    assert load_study(out / "study.toml").hash == report["study_hash"]


def test_coordinator_log_holds_only_aggregates(simulated):
    out, _, report = simulated
    for line in (out / "rounds.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert set(entry) == {"round", "aggregated", "sites_aggregated", "auc", "loss", "sites_evaluated", "seconds", "time",
                              "note"}


def test_a_delta_secaggplus_would_clip_is_refused_loudly(tmp_path):
    """With a clipping range no real delta fits in, every site refuses and the coordinator says why."""
    from fedcare.study import load_study

    from .conftest import DEFAULT_STUDY

    study = load_study(DEFAULT_STUDY)
    text = study.to_toml().replace(
        f"clipping_range = {study.secure_aggregation.clipping_range!r}", "clipping_range = 1e-09"
    )
    assert "clipping_range = 1e-09" in text
    (tmp_path / "tight.toml").write_text(text)
    cmd = [sys.executable, "-m", "cli", "simulate", "--study", str(tmp_path / "tight.toml"), "--hospitals", "3",
           "--rounds", "1", "--size-scale", "0.3", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the three sites' identical refusals are one line naming them
    assert proc.stdout.count("exceeds secure_aggregation.clipping_range (1e-09); SecAgg+ would clip it silently") == 1
    assert "sites hospital-01, hospital-02, hospital-03 refused (clipping): model delta exceeds" in proc.stdout
    assert "secure aggregation halted at stage 'collect_masked_vectors'" in proc.stdout
    assert "no round was securely aggregated" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
