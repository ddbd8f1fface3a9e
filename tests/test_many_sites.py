"""Many sites in simulation (issue 16, item 3): SecAgg+ with k neighbours instead of all N, and the Ray CPU
share of a virtual site. The 100- and 500-site runs themselves are a benchmark (bench/many_sites.py)."""

import json
import os
import re
import subprocess
import sys

from .conftest import ROOT


def _fedcare(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})


def _study_with_shares(tmp_path, num_shares: str, threshold: str):
    text = (ROOT / "studies" / "depression-risk.toml").read_text()
    text, shares = re.subn(r"(?m)^num_shares = .*$", f"num_shares = {num_shares}", text)
    text, thresholds = re.subn(r"(?m)^reconstruction_threshold = .*$", f"reconstruction_threshold = {threshold}", text)
    assert shares == thresholds == 1
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_k_neighbour_secure_aggregation_aggregates_every_site(tmp_path):
    """12 sites, each sharing its key with 4 neighbours (num_shares = 5, an absolute count, not all 12), two
    virtual sites per core: every round's aggregate holds all 12 sites, and the coordinator says which graph."""
    study = _study_with_shares(tmp_path, "5", "3")
    out = tmp_path / "run"
    proc = _fedcare("simulate", "--study", str(study), "--hospitals", "12", "--rounds", "1", "--size-scale", "0.1",
                    "--cpus-per-site", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "secure aggregation: 12 sites, each masking with 4 other sites (its neighbours); " \
           "3 of a site's shares reconstruct its secrets" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["aggregated"], r["sites_aggregated"]) for r in report["rounds"]] == [(1, True, 12)]
    assert len(report["sites"]) == 12 and all(s["rounds_trained"] == 1 for s in report["sites"])
    assert (out / "checkpoints" / "round-001.npz").exists()  # the aggregate became the global model


def test_a_cpu_share_outside_the_machine_is_refused_before_anything_runs(tmp_path):
    cores = os.cpu_count() or 1
    for value, shown in (("0", "0"), (str(cores + 1), str(cores + 1))):
        proc = _fedcare("simulate", "--cpus-per-site", value, "--out", str(tmp_path / "x"), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"--cpus-per-site: {shown} must be more than 0 and at most {cores} (this machine's cores)" in proc.stderr
        assert not (tmp_path / "x").exists()
