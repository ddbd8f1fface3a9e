"""`fedcare report` at a hospital: the signed package scored on the site's own test split, its ledger
against its policy, written locally as report.json + report.html.

The package is exported (as `fedcare export` does) from the real simulation run that
tests/test_report_html.py renders (one simulation for both); the site is one of the simulation's
synthetic hospitals, whose ledger recorded the rounds it trained.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from .conftest import DEFAULT_STUDY, ROOT
from .test_report_html import assert_self_contained, parse, simulated_run

HOSPITALS = ["hospital-01", "hospital-02", "hospital-03"]
SITE = "hospital-02"


def fedcare(*args: str) -> tuple[int, str, str]:
    from cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from deploy.provision import provision

    run = simulated_run(tmp_path_factory.getbasetemp())
    base = tmp_path_factory.mktemp("site-report")
    kits = provision(DEFAULT_STUDY, ["127.0.0.1"], HOSPITALS, base / "kits")
    pkg = base / "pkg"
    status, _, err = fedcare("export", "--run", str(run), "--kit", str(kits["coordinator"]), "--out", str(pkg))
    assert status == 0, err
    policy = base / "policy.toml"
    policy.write_text("[policy]\nmax_epsilon_per_study = 5.0\nmax_epsilon_lifetime = 12.0\n")
    site = run / "sites" / SITE
    args = ["report", "--package", str(pkg), "--kit", str(kits[SITE]), "--data", str(site),
            "--state-dir", str(site / ".fedcare"), "--policy", str(policy)]
    return {"run": run, "kits": kits, "pkg": pkg, "site": site, "base": base, "args": args}


@pytest.fixture(scope="module")
def site_report(world):
    out = world["base"] / "my-report"
    status, stdout, err = fedcare(*world["args"], "--out", str(out))
    assert status == 0, err
    return out, stdout, json.loads((out / "report.json").read_text())


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC by direct pair counting (ties count a half)."""
    pos, neg = p[y == 1], p[y == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def test_the_site_report_equals_scoring_the_site_test_split_with_onnxruntime(world, site_report):
    from client.data import load_site
    from fedcare.features import model_inputs
    from fedcare.run_record import RunRecord

    out, stdout, report = site_report
    study = RunRecord(world["run"]).study()  # the study as run, with its federated scaling
    data = load_site(study, world["site"])
    session = ort.InferenceSession(str(world["pkg"] / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: model_inputs(study, data.test.features)})[0]
    p = 1 / (1 + np.exp(-logits.astype(np.float64).reshape(-1)))
    y = data.test.labels.astype(int)
    final = report["final"]
    assert final["test_rows"] == len(y) and report["data"]["train_rows"] == len(data.train.labels)
    assert final["auc"] == pytest.approx(_auc(y, p), abs=1e-4)
    assert final["accuracy"] == pytest.approx(((p >= 0.5) == y).mean(), abs=1e-4)
    sens, spec = (p[y == 1] >= 0.5).mean(), (p[y == 0] < 0.5).mean()
    assert final["balanced_accuracy"] == pytest.approx((sens + spec) / 2, abs=1e-4)
    assert final["brier"] == pytest.approx(((p - y) ** 2).mean(), abs=1e-4)
    assert sum(b["rows"] for b in final["calibration"]) == len(y)
    assert final["roc"]["fpr"][0] == 0 and final["roc"]["tpr"][-1] == 1
    # the simulation's evaluator scored the same model on the same rows
    sim = next(s for s in json.loads((world["run"] / "report.json").read_text())["sites"] if s["name"] == SITE)
    assert final["auc"] == pytest.approx(sim["auc"], abs=2e-3)
    assert f"AUC {final['auc']:.4f}" in stdout and "nothing was sent" in stdout


def test_the_site_report_holds_its_own_ledger_against_its_policy(world, site_report):
    from privacy.ledger import PrivacyLedger

    out, stdout, report = site_report
    entries = [e for e in PrivacyLedger(world["site"] / ".fedcare").entries() if e.event == "round"]
    row = report["sites"][0]
    assert report["view"] == "site" and report["site"] == SITE and row["name"] == SITE
    assert row["rounds_trained"] == len(entries) == 2
    assert row["epsilon"] == pytest.approx(entries[-1].epsilon_study, abs=1e-3)
    assert report["ledger"]["verified"] and len(report["ledger"]["rounds"]) == 2
    assert report["policy"]["max_epsilon_per_study"] == 5.0  # --policy
    html = (out / "report.html").read_text(encoding="utf-8")
    page = parse(html)
    assert {"roc", "calibration", "epsilon", "ledger"} <= set(page.charts)
    assert page.charts["roc"][0] >= 5 and page.charts["ledger"] == [2]
    assert "this site&#x27;s policy, per study: ε 5" in html and "stays here, never sent anywhere" in html
    assert_self_contained(html)


@pytest.mark.parametrize("change, message", [
    (lambda a, w: a.__setitem__(a.index("--package") + 1, str(w["base"] / "nope")), "--package: "),
    (lambda a, w: a.__setitem__(a.index("--state-dir") + 1, str(w["base"] / "no-state")), "--state-dir: "),
    (lambda a, w: a.__setitem__(a.index("--data") + 1, str(w["base"] / "no-data")), "no-data: site data directory not found"),
    (lambda a, w: a.__setitem__(a.index("--policy") + 1, str(w["base"] / "none.toml")), "none.toml"),
])
def test_bad_flags_give_one_line_errors(world, tmp_path, change, message):
    args = [*world["args"], "--out", str(tmp_path / "out")]
    change(args, world)
    status, _, err = fedcare(*args)
    assert status == 2 and err.startswith("fedcare: error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_package_changed_after_signing_is_refused_as_the_command_line_says(world, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(world["pkg"], pkg)
    (pkg / "extra.onnx").write_bytes(b"x")
    args = [*world["args"], "--out", str(tmp_path / "out")]
    args[args.index("--package") + 1] = str(pkg)
    proc = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("fedcare: error: unlisted file extra.onnx")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
