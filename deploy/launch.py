"""`fedcare run` and `fedcare status`: a study run on the running federation, from the coordinator.

The run goes through Flower's own `flwr run` (the App in this repository becomes the FAB
every node executes); the ServerApp's live progress is followed with `flwr log --stream`,
the outcome is read from `flwr ls`, and the report holds only what the coordinator knows.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from deploy.audit import audit
from deploy.coordinator import FederationError, FlowerCLI, node_names
from deploy.kits import CoordinatorKit, coordinator_artifact_key
from deploy.progress_display import RunDisplay
from deploy.report import coordinator_report
from fedcare import APP_DIR
from fedcare.report import write_report
from fedcare.run_record import RunRecord
from fedcare.study import Overrides, load_study


def interrupted_run(kit: CoordinatorKit) -> Path:
    """The latest run folder of this kit that did not record an outcome, or stopped early for a reason a
    restart can cure (it was interrupted); what `fedcare run --resume` takes up."""
    runs = sorted((kit.state_dir / "runs").glob("*/run.json"))
    if runs:
        outcome = RunRecord(runs[-1].parent).outcome()  # run.json: no key needed
        if outcome is None or not outcome.completed:
            return runs[-1].parent
    raise FederationError(f"no interrupted run to resume in {kit.state_dir / 'runs'}: the latest run completed "
                          f"(start a new one with `fedcare run --kit {kit.path}`)")


def run_study(kit: CoordinatorKit, overrides: Overrides, *, resume: bool = False,
              verbose: bool = False) -> tuple[Path, dict]:
    """Launch the study on the online nodes (or, with `resume`, take up the latest interrupted run after
    its last checkpoint, with the overrides it ran with), follow it (`RunDisplay`; Flower's own log lines
    with `verbose`), write the run folder's report. Ctrl-C stops the run on the federation."""
    started = time.monotonic()
    run_dir = interrupted_run(kit) if resume else None
    if run_dir is not None:
        recorded = RunRecord(run_dir, key=coordinator_artifact_key(kit)).overrides()
        if overrides != Overrides() and overrides != recorded:
            raise FederationError(f"--resume: the run in {run_dir} ran with --rounds {recorded.rounds or 'as the study'} "
                                  f"--epsilon {recorded.epsilon or 'as the study'}; a resumed run keeps them (drop the flags)")
        overrides = recorded
    study = load_study(kit.study_file).with_overrides(overrides)
    cli = FlowerCLI(kit)
    online = [n for n in cli.nodes() if n.get("status") == "online"]
    if len(online) < study.strategy.min_sites:
        raise FederationError(
            f"{len(online)} hospital node(s) online; the study needs at least strategy.min_sites = "
            f"{study.strategy.min_sites}. Check `fedcare status --kit {kit.path}`."
        )
    if run_dir is None:
        run_dir = kit.state_dir / "runs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_dir.mkdir(parents=True)
    run_id = cli.start_run(APP_DIR, {"study": str(kit.study_file), "out-dir": str(run_dir), **overrides.run_config(),
                                     "resume": int(resume), "progress": 1})
    audit(kit, "run resumed" if resume else "run started", run_id=run_id, study_hash=study.hash,
          overrides=overrides.run_config(), folder=str(run_dir))
    print(f"run {run_id}: study {study.name} ({study.hash[:12]}), {study.training.rounds} rounds, "
          f"{len(online)} nodes online; output in {run_dir}{' (resumed)' if resume else ''}", flush=True)
    display = RunDisplay(verbose=verbose)
    try:
        cli.stream_log(run_id, display.line)
        outcome = _wait_finished(cli, run_id)
    except FederationError as err:
        raise FederationError(f"lost the coordinator during run {run_id} ({err.line[:300]}); once `fedcare coordinator "
                              f"start` runs again, `fedcare run --kit {kit.path} --resume` takes the study up after its "
                              "last checkpoint") from None
    except KeyboardInterrupt:
        display.close()
        print(f"stopping run {run_id} on the federation …", flush=True)
        cli.stop_run(run_id)
        audit(kit, "run stopped", run_id=run_id, reason="interrupted by the operator")
        raise FederationError(f"run {run_id} stopped (interrupted); `fedcare run --kit {kit.path} --resume` takes it "
                              "up after its last checkpoint") from None
    finally:
        display.close()
    audit(kit, "run finished", run_id=run_id, status=outcome.get("status"))
    if outcome.get("status") != "finished:completed":
        raise FederationError(f"run {run_id} ended as {outcome.get('status')}: {outcome.get('status-details', '')}; "
                              f"`fedcare run --kit {kit.path} --resume` takes it up after its last checkpoint")
    names = node_names(kit)
    sites = sorted(names.get(str(n.get("node-id")), f"node {n.get('node-id')}") for n in online)
    record = RunRecord(run_dir, key=coordinator_artifact_key(kit))
    report = coordinator_report(record, sites, time.monotonic() - started)
    report["run_id"] = run_id
    write_report(record, report)
    return run_dir, report


def _wait_finished(cli: FlowerCLI, run_id: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        runs = cli.runs(run_id)
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return runs[0]
        if time.monotonic() > deadline:
            return runs[0] if runs else {"status": "unknown"}
        time.sleep(1.0)


def status_lines(kit: CoordinatorKit) -> list[str]:
    cli = FlowerCLI(kit)
    names = node_names(kit)
    lines = [f"coordinator {kit.hosts[0]}:{kit.port}  study {kit.study_hash[:12]}", "", f"{'hospital':<16} {'node id':<22} status"]
    for node in cli.nodes():
        node_id = str(node.get("node-id"))
        lines.append(f"{names.get(node_id, '?'):<16} {node_id:<22} {node.get('status')}")
    lines += ["", f"{'run':<22} {'status':<22} created"]
    for run in cli.runs():
        lines.append(f"{str(run.get('run-id')):<22} {str(run.get('status')):<22} {run.get('pending-at', '')}")
    return lines
