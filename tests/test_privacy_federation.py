"""Site-enforced privacy in whole simulated federations (Flower's engine, the real ClientApp):
an adversarial coordinator, a recorded 3-round study, and sites whose budget runs out."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from client.data import load_site
from fedcare import APP_DIR
from fedcare.report import StudyStoppedEarly, check_completed
from fedcare.run_record import RunRecord
from privacy.accounting import epsilon_of, plan_schedule
from privacy.ledger import PrivacyLedger, rounds_of
from simulations.cohorts import write_cohorts


def _federation(tmp_path: Path, study, sites: int = 3) -> dict:
    study_file = tmp_path / "study.toml"
    study_file.write_text(study.to_toml())
    write_cohorts(study, tmp_path / "sites", sites, seed=11, size_scale=0.3)
    return {"study": str(study_file), "out-dir": str(tmp_path / "coordinator"), "sim-sites-dir": str(tmp_path / "sites")}


def _simulate(run_config: dict, serverapp: str, sites: int = 3) -> str:
    script = textwrap.dedent(f"""
        from simulations.engine import run_flower_simulation
        run_flower_simulation({sites}, {run_config!r},
                              components={{"serverapp": {serverapp!r}, "clientapp": "client.app:app"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=APP_DIR)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _site_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "sites").iterdir() if p.is_dir())


def _allow_one_round(study, site_dir: Path) -> None:
    """A site policy whose per-study budget covers round 1 of this study and not round 2."""
    n = len(load_site(study, site_dir).train.labels)
    s = plan_schedule(study, n)
    step = (s.noise_multiplier, s.sample_rate, s.steps_per_round)
    one, two = (epsilon_of(s.accountant, [step] * k, s.delta) for k in (1, 2))
    (site_dir / "site.toml").write_text(f"[policy]\nmax_epsilon_per_study = {(one + two) / 2}\n")


def test_adversarial_coordinator_gets_only_refusals(study, tmp_path):
    run_config = _federation(tmp_path, study)
    _simulate(run_config, "tests.apps.adversary:app")
    seen = json.loads((tmp_path / "coordinator" / "adversary.json").read_text())
    assert seen["nodes"] == 3
    expected = {
        "get_parameters": "'get_parameters' request refused",
        "plain_fit": "training request outside SecAgg+ refused",
        "plain_evaluate": "'evaluate' request refused",
        "secagg_cohort_2": "SecAgg+ cohort of 2 sites is below this site's policy min_cohort = 3",
        "secagg_threshold_1": "SecAgg+ reconstruction threshold 1 is below this site's policy min_threshold = 2",
        "query": "'query' request refused",
    }
    for attempt, reason in expected.items():
        replies = seen["results"][attempt]
        assert len(replies) == 3, attempt
        for reply in replies:
            assert reply["error"] and reason in reply["error"], (attempt, reply["error"])
            assert reply["arrays"] == 0 and reply["masked_values"] == 0
    for site in _site_dirs(tmp_path):  # nothing was trained, nothing spent
        assert PrivacyLedger(site / ".fedcare").entries() == []


def test_recorded_study_reveals_no_update_or_size_and_a_spent_site_stops(study, tmp_path):
    study = study.with_overrides(rounds=3)
    run_config = _federation(tmp_path, study)
    sites = _site_dirs(tmp_path)
    _allow_one_round(study, sites[0])
    out = _simulate(run_config, "tests.apps.recording:app")

    # The spent site refused round 2 with its reason, visible to the coordinator; the others went on.
    assert "refused (budget): privacy budget: this round would exceed this site's max_epsilon_per_study" in out
    assert "would bring the study to ε" not in out  # the site's ε stays at the site (its own log has it)
    assert "model after round 3/3" in out and "study stopped" not in out
    outcome = RunRecord(tmp_path / "coordinator").outcome()
    assert outcome.completed and outcome.rounds_aggregated == 3
    check_completed({"outcome": dataclasses.asdict(outcome)})  # completed: no error
    assert (tmp_path / "coordinator" / "checkpoints" / "round-003.npz").exists()
    spent = [len(rounds_of(PrivacyLedger(s / ".fedcare").entries(), study.budget_key)) for s in sites]
    assert spent == [1, 3, 3]

    received = json.loads((tmp_path / "coordinator" / "received.json").read_text())
    sizes = set()
    for site in sites:
        data = load_site(study, site)
        sizes |= {float(len(data.train.labels)), float(len(data.test.labels))}
    masked_replies = [r for r in received if r["masked_values"]]
    # statistics round, training rounds 1-3 (one site refused twice), the evaluation round
    assert len(masked_replies) == 3 + 3 + 2 + 2 + 3
    for reply in received:
        assert reply["arrays"] == 0, "no reply carries a parameter array"
        assert reply["metrics_keys"] == [], "no plaintext metrics"
        assert not sizes & set(reply["numbers"]), "no reply carries a site's number of rows"
        assert set(reply["num_examples"]) <= {study.secure_aggregation.max_weight}
    for reply in masked_replies:
        # Masked values are uniform over [0, 2^32); an unmasked quantized vector lies below 2^22.
        assert reply["masked_small"] / reply["masked_values"] < 0.02


def test_study_stops_cleanly_when_spent_sites_leave_too_few(study, tmp_path):
    study = study.with_overrides(rounds=3)
    run_config = _federation(tmp_path, study)
    sites = _site_dirs(tmp_path)
    for site in sites[:2]:
        _allow_one_round(study, site)
    out = _simulate(run_config, "server.app:app")
    assert "study stopped: sites have spent their privacy budget and too few remain to aggregate" in out
    assert "round 1/3 aggregated" in out and "round 2/3 aggregated" not in out and "round 3/3 aggregated" not in out
    assert "model after round 1/3" in out  # the evaluation-only round reports the final model: the round-1 one
    record = RunRecord(tmp_path / "coordinator")
    rounds = record.rounds()
    assert [(r["round"], r["aggregated"]) for r in rounds] == [(1, True), (2, False), (3, False)]
    assert rounds[0]["sites_aggregated"] == 3 and rounds[0]["auc"] is not None  # the final model's evaluation
    assert record.final_evaluation() == rounds[0]  # what the report and the package call the final model's score
    assert rounds[1]["note"] == "secure aggregation halted at stage 'collect_masked_vectors'"
    assert rounds[2]["note"].startswith("skipped: sites have spent their privacy budget")
    outcome = record.outcome()
    assert not outcome.completed and outcome.rounds_aggregated == 1 and outcome.rounds_planned == 3
    assert "study stopped early: sites have spent their privacy budget" in out
    with pytest.raises(StudyStoppedEarly, match="1 of 3 training rounds aggregated") as stopped:
        check_completed({"outcome": dataclasses.asdict(outcome)})
    assert stopped.value.exit_code == 4  # `fedcare simulate` / `fedcare run` exit non-zero
    checkpoints = sorted(p.name for p in (tmp_path / "coordinator" / "checkpoints").iterdir())
    assert checkpoints == ["round-001.npz"]
    spent = [len(rounds_of(PrivacyLedger(s / ".fedcare").entries(), study.budget_key)) for s in sites]
    assert spent == [1, 1, 2]  # the third site recorded round 2 before the round halted: never under-counted
