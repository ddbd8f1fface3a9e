"""Many hospitals in simulation: one fedcare round (DP-SGD + SecAgg+) at 100 or 500 virtual sites vs
stock Flower FedAvg without privacy on the same sites, model and local epochs, in the same run.

    .venv/bin/python -m bench.many_sites [--hospitals 100] [--rounds 3] [--size-scale 0.25]
        [--num-shares 1.0] [--threshold 0.66] [--cpus-per-site 1] [--arms stock,fedcare]

Writes the synthetic sites once (`simulations.cohorts.write_cohorts`, site sizes 400–6000 patients
times --size-scale), then runs each arm in a child process of its own (a fresh Ray), while this
process samples the child's whole process tree (the driver with the ServerApp, Ray's GCS and
raylet, the virtual nodes' actors) once a second: peak PSS (shared pages counted once, the honest
total) and peak summed RSS. Per-round time is the median over rounds 2..R from each ServerApp's own
timestamps (round 1 holds Ray's and the actors' start-up); the ratio is fedcare / stock.

--num-shares / --threshold set the study's `[secure_aggregation]` (fractions of the cohort, or
absolute counts >= 3): SecAgg+'s point is that each site shares its secrets with k neighbours, not
with all N, so a large federation sets an absolute k (README "Many sites").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STOCK = {"serverapp": "bench.stock_app:server_app", "clientapp": "bench.stock_app:client_app"}


def _tree(pid: int) -> list[int]:
    found, todo = [pid], [pid]
    while todo:
        current = todo.pop()
        try:
            children = [int(c) for task in Path(f"/proc/{current}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def _memory(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) in bytes, summed over `pids` (smaps_rollup; processes that ended are skipped)."""
    pss = rss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


def child(arm: str, hospitals: int, config: dict, cpus_per_site: float) -> None:
    from simulations.engine import run_flower_simulation

    run_flower_simulation(hospitals, config, components=STOCK if arm == "stock" else None,
                          cpus_per_site=cpus_per_site)


def run_arm(arm: str, hospitals: int, config: dict, cpus_per_site: float) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "bench.many_sites", "--child", arm, "--hospitals", str(hospitals),
           "--cpus-per-site", str(cpus_per_site), "--config", json.dumps(config)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = _memory(_tree(proc.pid))
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(1.0)
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{arm} arm failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    return {"wall": time.monotonic() - started, "peak_pss": peak_pss, "peak_rss": peak_rss}


def share_count(text: str) -> float | int:
    """As the study file writes them: "1.0" / "0.66" are fractions of the cohort, "20" a count."""
    return float(text) if "." in text else int(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hospitals", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-scale", type=float, default=0.25)
    parser.add_argument("--num-shares", type=share_count, default=1.0, help="a fraction (1.0) or a count (20)")
    parser.add_argument("--threshold", type=share_count, default=0.66, help="a fraction (0.66) or a count (14)")
    parser.add_argument("--cpus-per-site", type=float, default=1.0)
    parser.add_argument("--arms", default="stock,fedcare")
    parser.add_argument("--child", choices=("stock", "fedcare"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.hospitals, json.loads(args.config), args.cpus_per_site)
        return

    from deploy.flower import quiet_flower_environment

    quiet_flower_environment()
    from fedcare import DEFAULT_STUDY
    from fedcare.run_record import RunRecord
    from fedcare.study import load_study
    from simulations.cohorts import write_cohorts

    base = load_study(DEFAULT_STUDY).with_overrides(rounds=args.rounds)
    secagg = dataclasses.replace(base.secure_aggregation, num_shares=args.num_shares,
                                 reconstruction_threshold=args.threshold)
    study = dataclasses.replace(base, secure_aggregation=secagg)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "study.toml").write_text(study.to_toml())
        load_study(root / "study.toml")  # the overrides are a valid study (named error otherwise)
        t0 = time.monotonic()
        cohorts = write_cohorts(study, root / "sites", args.hospitals, seed=42, size_scale=args.size_scale)
        rows = sum(site["train_rows"] + site["test_rows"] for site in cohorts["sites"])
        print(f"{args.hospitals} sites, {rows} patients written in {time.monotonic() - t0:.1f} s", flush=True)
        config = {"study": str(root / "study.toml"), "sim-sites-dir": str(root / "sites")}
        results = {}
        for arm in args.arms.split(","):
            out = root / arm
            results[arm] = run_arm(arm, args.hospitals, {**config, "out-dir": str(out)}, args.cpus_per_site)
            if arm == "stock":
                stamps = [float(line.split()[1]) for line in (out / "stock_rounds.txt").read_text().splitlines()]
                per_round = [b - a for a, b in zip(stamps, stamps[1:])]
            else:
                record = RunRecord(out)
                per_round = [r["seconds"] for r in record.rounds()[1:]]
                results[arm]["sites_aggregated"] = [r["sites_aggregated"] for r in record.rounds()]
            results[arm]["round"] = statistics.median(per_round)
            print(f"{arm}: {results[arm]}", flush=True)

    print(f"\nhospitals={args.hospitals} rounds={args.rounds} size_scale={args.size_scale} patients={rows} "
          f"num_shares={args.num_shares!r} threshold={args.threshold!r} cpus_per_site={args.cpus_per_site:g} "
          f"local_epochs={study.training.local_epochs}")
    labels = {"stock": "stock Flower FedAvg, no privacy", "fedcare": "fedcare DP-SGD + SecAgg+"}
    for arm, r in results.items():
        print(f"{labels[arm]:32}: {r['round']:7.2f} s/round (median rounds 2..{args.rounds}), whole run "
              f"{r['wall']:6.1f} s, peak PSS {r['peak_pss'] / 2**20:6.0f} MiB (summed RSS {r['peak_rss'] / 2**20:.0f} MiB)")
    if len(results) == 2:
        print(f"{'ratio fedcare / stock':32}: {results['fedcare']['round'] / results['stock']['round']:7.2f}x")


if __name__ == "__main__":
    main()
