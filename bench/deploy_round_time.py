"""Per-round wall time of a deployed study on loopback: 3 hospitals, TLS + node authentication
+ SecAgg+ + DP-SGD, real SuperLink/SuperNode processes started by `fedcare`, same run.

    .venv/bin/python bench/deploy_round_time.py [--rounds 3]

Two runs on the same federation and data, one after the other:
  fedcare         the fedcare App as deployed (`fedcare run`): SecAgg+ (four exchanges per round), DP-SGD,
                  the site's SuperNode process (0.5 s polls, warm forked ClientApps), PromptGrid
  stock-fedavg    stock Flower FedAvg, no SecAgg+, no DP (bench/stock_app.py), same federation and nodes
Per-round time is the median over rounds 2..R of the time from a training round's SecAgg+ setup to the
end of its unmasking, from the ServerApp's progress events (`fedcare.events`); the breakdown per
exchange is the median of each stage's duration. The statistics and evaluation rounds are shown too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.approval import app_hash  # noqa: E402
from deploy.kits import load_coordinator_kit  # noqa: E402
from deploy.provision import provision  # noqa: E402
from deploy.flower import free_port  # noqa: E402
from fedcare import APP_DIR  # noqa: E402
from fedcare.study import load_study  # noqa: E402
from deploy.coordinator import FlowerCLI, flwr_home  # noqa: E402
from deploy.flower import flower_command, flower_env  # noqa: E402
from fedcare.events import StageEvent  # noqa: E402
from fedcare.protocol import Phase  # noqa: E402
from simulations.cohorts import write_cohorts  # noqa: E402

PACKAGES = ("fedcare", "client", "server", "strategies", "privacy", "export", "inference", "bench", "studies")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=APP_DIR, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log: Path, needle: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log}: '{needle}' not seen")
        time.sleep(0.5)


def _variant_app(root: Path, serverapp: str, clientapp: str) -> Path:
    """A copy of this App whose pyproject names other components (a separate FAB)."""
    app = root / f"app-{clientapp.split(':')[0].replace('.', '-')}"
    for name in PACKAGES:
        shutil.copytree(APP_DIR / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (APP_DIR / "pyproject.toml").read_text()
    text = text.replace('serverapp = "server.app:app"', f'serverapp = "{serverapp}"')
    text = text.replace('clientapp = "client.app:app"', f'clientapp = "{clientapp}"')
    text = text.replace('"studies/*.toml",', '"studies/*.toml", "bench/**/*.py",')  # the variant's components
    (app / "pyproject.toml").write_text(text)
    (app / "README.md").write_text("benchmark variant\n")
    return app


def _flower_run(cli: FlowerCLI, app: Path, config: dict, out_dir: Path) -> None:
    run_id = cli.start_run(app, {**config, "out-dir": str(out_dir)})
    cli.stream_log(run_id, lambda line: None)
    status = cli.runs(run_id)[0].get("status")
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id}: {status}")


def _events(cli: FlowerCLI, run_id: int) -> list[StageEvent]:
    lines: list[str] = []
    cmd = [flower_command("flwr"), "log", str(run_id), "fedcare", "--show"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=flower_env(flwr_home(cli.kit))).stdout
    lines = out.splitlines()
    return [event for event in map(StageEvent.parse, lines) if event is not None]


def _round_seconds(events: list[StageEvent]) -> dict[tuple[Phase, int], float]:
    """(phase, round) -> seconds from its setup's start to its unmasking's end."""
    return {(e.phase, e.round): e.seconds for e in events if e.done and e.stage == "unmask"}


def _stage_seconds(events: list[StageEvent]) -> dict[str, float]:
    """Median duration of each SecAgg+ exchange over training rounds 2..R."""
    durations: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    for e in events:
        if e.phase is not Phase.TRAIN or e.round < 2:
            continue
        if not e.done:
            started[e.stage] = e.seconds
        elif e.stage in started:
            durations.setdefault(e.stage, []).append(e.seconds - started.pop(e.stage))
    return {stage: statistics.median(values) for stage, values in durations.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedcare-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        study_file = APP_DIR / "studies" / "depression-risk.toml"
        kits = provision(study_file, ["127.0.0.1"], ["a", "b", "c"], root / "kits", port=free_port())
        write_cohorts(load_study(study_file), root / "sites", 3, seed=42, size_scale=0.3)
        procs.append(_start(["coordinator", "start", "--kit", str(kits["coordinator"]), "--bind", "127.0.0.1"], root / "coord.log"))
        stock = _variant_app(root, "bench.stock_app:server_app", "bench.stock_app:client_app")
        # the sites approve the benchmark variant besides their installed release (deploy/approval.py)
        approved = f'"{app_hash(stock)}"'
        for name in ("a", "b", "c"):
            site = kits[name] / "site.toml"
            site.write_text(site.read_text() + f"\n[approval]\napps = [{approved}]\n")
        _wait_for(root / "coord.log", "accepted hospitals")
        for i, name in enumerate(["a", "b", "c"], start=1):
            procs.append(_start(["node", "start", "--kit", str(kits[name]), "--data", str(root / "sites" / f"hospital-{i:02d}")],
                                root / f"node-{name}.log"))
            _wait_for(root / f"node-{name}.log", "connected")

        results: dict[str, float] = {}
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "cli", "run", "--kit", str(kits["coordinator"]), "--rounds", str(args.rounds)],
                       cwd=APP_DIR, check=True, stdout=subprocess.DEVNULL)
        whole = time.monotonic() - t0
        kit = load_coordinator_kit(kits["coordinator"])
        cli = FlowerCLI(kit)
        events = _events(cli, cli.runs()[0]["run-id"])
        rounds = _round_seconds(events)
        stages = _stage_seconds(events)
        training = [seconds for (phase, number), seconds in rounds.items() if phase is Phase.TRAIN and number > 1]
        results["fedcare"] = statistics.median(training)
        print(f"fedcare        : {results['fedcare']:6.1f} s/training round  (whole {args.rounds}-round study {whole:.0f} s)")
        for (phase, number), seconds in rounds.items():
            print(f"    {phase.value:<10} {number}: {seconds:5.1f} s")
        print("    per exchange (median over training rounds 2..R): "
              + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stages.items()), flush=True)

        config = {"study": str(kit.study_file), "rounds": args.rounds, "epsilon": 0.0}
        t0 = time.monotonic()
        _flower_run(cli, stock, {**config, "sim-sites-dir": str(root / "sites")}, root / "stock")
        stamps = [float(line.split()[1]) for line in (root / "stock" / "stock_rounds.txt").read_text().splitlines()]
        results["stock-fedavg"] = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        print(f"stock-fedavg   : {results['stock-fedavg']:6.1f} s/round  (whole run {time.monotonic() - t0:.0f} s)", flush=True)
        print(f"\nratio fedcare / stock-fedavg : {results['fedcare'] / results['stock-fedavg']:.2f}x")
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
