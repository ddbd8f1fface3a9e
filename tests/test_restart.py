"""A study survives its coordinator: killed mid-study (SIGKILL to the whole coordinator, edge and
SuperLink with it), the hospital nodes stay up and say so, reconnect to the restarted coordinator,
and `fedcare run --resume` completes every planned round from the last checkpoint; no site's
ledger under-counts, and the interrupted round fits the study's retry reserve."""

from __future__ import annotations

import dataclasses
import json
import signal

from deploy.flower import free_port
from fedcare.study import load_study
from privacy.ledger import PrivacyLedger
from simulations.cohorts import write_cohorts

from .conftest import DEFAULT_STUDY
from .federation import Processes, fedcare, provision_federation, start_coordinator, start_nodes

HOSPITALS = ["a", "b", "c"]
ROUNDS = 3


def test_a_coordinator_killed_mid_study_resumes_and_completes_every_round(tmp_path):
    base = load_study(DEFAULT_STUDY)
    study = dataclasses.replace(
        base, secure_aggregation=dataclasses.replace(base.secure_aggregation, timeout_seconds=60.0))
    port = free_port()
    provision_federation(tmp_path, study.to_toml(), HOSPITALS, port)
    write_cohorts(study, tmp_path / "sites", len(HOSPITALS), seed=7, size_scale=0.3)
    coordinator_kit = tmp_path / "kits" / "coordinator"
    procs = Processes(tmp_path)
    try:
        coordinator = start_coordinator(procs, tmp_path, HOSPITALS)
        nodes = start_nodes(procs, tmp_path, HOSPITALS)
        run = procs.start("run", "run", "--kit", str(coordinator_kit), "--rounds", str(ROUNDS))
        assert run.wait_for(f"round 1/{ROUNDS} aggregated", 600), run.text()[-3000:]
        coordinator.stop(signal.SIGKILL)
        assert run.proc.wait(timeout=180) != 0
        assert "--resume" in run.text(), run.text()[-2000:]

        # the nodes ride it out, and say so
        for name, node in nodes.items():
            assert node.wait_for("unreachable", 90), node.text()[-2000:]
            assert node.proc.poll() is None, f"node {name} gave up"

        start_coordinator(procs, tmp_path, HOSPITALS, name="coordinator-2")
        for name, node in nodes.items():
            assert node.wait_for("reconnected", 120), node.text()[-2000:]
        resumed = fedcare("run", "--kit", str(coordinator_kit), "--resume", timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
        assert "(resumed)" in resumed.stdout and "resuming after round" in resumed.stdout

        run_dir = sorted((coordinator_kit / "state" / "runs").glob("*/report.json"))[-1].parent
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        assert all(r["aggregated"] for r in rounds), rounds
        record = json.loads((run_dir / "run.json").read_text())
        assert len(record["resumed"]) == 1 and record["outcome"]["completed"] is True
        assert len(list((coordinator_kit / "state" / "runs").iterdir())) == 1, "the resumed run kept its folder"
        actions = [json.loads(line)["action"] for line in (coordinator_kit / "state" / "audit.jsonl").read_text().splitlines()]
        assert actions.count("coordinator started") == 2 and "run started" in actions and "run resumed" in actions

        for name in HOSPITALS:
            entries = PrivacyLedger(tmp_path / "kits" / name / "state").entries()
            trained = [e.round for e in entries]
            # every round a site trained is charged; the interrupted round may be charged twice (never zero times)
            assert set(trained) == set(range(1, ROUNDS + 1)) and ROUNDS <= len(trained) <= ROUNDS + 1, trained
            assert entries[-1].epsilon_study <= study.privacy.epsilon * 1.001
    finally:
        procs.stop_all()
