"""Per-round wall time of a deployed study on loopback: 3 hospitals, TLS + node authentication
+ SecAgg+ + DP-SGD, real SuperLink/SuperNode processes started by `fedcare`, same run.

    .venv/bin/python bench/deploy_round_time.py [--rounds 3]

Three runs on the same federation and data, one after the other:
  fedcare         the fedcare App as deployed (`fedcare run`): lean ClientApp import path
  eager-import    the same App with a ClientApp that imports torch/Opacus at module level
                  (bench/eager_client.py), i.e. what the lean import path saves
  stock-fedavg    stock Flower FedAvg, no SecAgg+, no DP (bench/stock_app.py), same federation
Per-round time is the median over rounds 2..R (round 1 includes installing the FAB).
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
from deploy.coordinator import FlowerCLI  # noqa: E402
from fedcare.run_record import RunRecord  # noqa: E402
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
        eager = _variant_app(root, "server.app:app", "bench.eager_client:app")
        stock = _variant_app(root, "bench.stock_app:server_app", "bench.stock_app:client_app")
        # the sites approve the two benchmark variants besides their installed release (deploy/approval.py)
        approved = ", ".join(f'"{app_hash(app)}"' for app in (eager, stock))
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
        run_dir = sorted((kits["coordinator"] / "state" / "runs").iterdir())[-1]
        results["fedcare"] = statistics.median(r["seconds"] for r in RunRecord(run_dir).rounds()[1:])
        print(f"fedcare        : {results['fedcare']:6.1f} s/round  (whole run {time.monotonic() - t0:.0f} s)", flush=True)

        kit = load_coordinator_kit(kits["coordinator"])
        cli = FlowerCLI(kit)
        config = {"study": str(kit.study_file), "rounds": args.rounds, "epsilon": 0.0}
        t0 = time.monotonic()
        _flower_run(cli, eager, config, root / "eager")
        results["eager-import"] = statistics.median(r["seconds"] for r in RunRecord(root / "eager").rounds()[1:])
        print(f"eager-import   : {results['eager-import']:6.1f} s/round  (whole run {time.monotonic() - t0:.0f} s)", flush=True)

        t0 = time.monotonic()
        _flower_run(cli, stock, {**config, "sim-sites-dir": str(root / "sites")}, root / "stock")
        stamps = [float(line.split()[1]) for line in (root / "stock" / "stock_rounds.txt").read_text().splitlines()]
        results["stock-fedavg"] = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        print(f"stock-fedavg   : {results['stock-fedavg']:6.1f} s/round  (whole run {time.monotonic() - t0:.0f} s)", flush=True)

        print(f"\nratio eager-import / fedcare : {results['eager-import'] / results['fedcare']:.2f}x")
        print(f"ratio fedcare / stock-fedavg : {results['fedcare'] / results['stock-fedavg']:.2f}x")
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
