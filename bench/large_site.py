"""A site with a million training rows: read it, and train one round of 5 local epochs with DP-SGD,
against plain torch SGD over the same rows and epochs, each phase in its own process (peak RSS).

    .venv/bin/python -m bench.large_site [--rows 1000000] [--epochs 5] [--format csv|parquet]

Generates one synthetic hospital of that size (`simulations.cohorts.write_cohorts`, the default
study), then runs three child processes: `load` (read the site as `fedcare data check` and
training do), `dp` (load, plan σ, `client.training.train_round` on the fast path) and `plain`
(load, `train_plain`). Reports seconds and peak RSS of each; ratio = DP round / plain training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _study(epochs: int):
    from fedcare import DEFAULT_STUDY
    from fedcare.study import load_study

    base = load_study(DEFAULT_STUDY)
    return dataclasses.replace(base, training=dataclasses.replace(base.training, rounds=1, local_epochs=epochs))


def child(phase: str, site: Path, epochs: int) -> dict:
    import torch

    from client.data import load_site
    from fedcare.features import model_inputs
    from fedcare.model import build_model

    torch.set_num_threads(1)
    study = _study(epochs)
    start = time.perf_counter()
    data = load_site(study, site)
    x, y = model_inputs(study, data.train.features), data.train.labels
    loaded = time.perf_counter() - start
    result = {"phase": phase, "rows": int(len(y)), "load_seconds": loaded}
    if phase == "dp":
        from client.training import train_round
        from privacy.accounting import plan_schedule

        schedule = plan_schedule(study, len(y))
        t0 = time.perf_counter()
        steps = train_round(study, build_model(study), x, y, schedule)
        result.update(train_seconds=time.perf_counter() - t0, steps=steps, sigma=schedule.noise_multiplier)
    elif phase == "plain":
        from client.training import train_plain

        t0 = time.perf_counter()
        train_plain(study, build_model(study), x, y, epochs)
        result.update(train_seconds=time.perf_counter() - t0)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows of the site")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--phase", choices=("load", "dp", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--site", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(child(args.phase, args.site, args.epochs)))
        return 0

    from simulations.cohorts import SMALLEST_SITE, TEST_FRACTION, write_cohorts

    with tempfile.TemporaryDirectory(prefix="bench-large-site-") as tmp:
        t0 = time.perf_counter()
        write_cohorts(_study(args.epochs), tmp, hospitals=1, seed=5,
                      size_scale=args.rows / SMALLEST_SITE / (1 - TEST_FRACTION))
        site = Path(tmp) / "hospital-01"
        if args.format == "parquet":
            import pyarrow.csv as pacsv
            import pyarrow.parquet as pq

            for split in ("train", "test"):
                pq.write_table(pacsv.read_csv(site / f"{split}.csv"), site / f"{split}.parquet")
                (site / f"{split}.csv").unlink()
        size = sum(p.stat().st_size for p in site.iterdir())
        print(f"generated {site} in {time.perf_counter() - t0:.0f} s ({size / 2**20:.0f} MiB, {args.format})", flush=True)
        results = {}
        for phase in ("load", "plain", "dp"):
            out = subprocess.run([sys.executable, "-m", "bench.large_site", "--phase", phase, "--site", str(site),
                                  "--epochs", str(args.epochs)], cwd=ROOT, capture_output=True, text=True, check=True)
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(results[phase]), flush=True)
    load, plain, dp = results["load"], results["plain"], results["dp"]
    print(f"| {load['rows']:,} rows ({args.format}) | read {load['load_seconds']:.1f} s, peak RSS {load['peak_rss_mib']:.0f} MiB "
          f"| plain torch {args.epochs} epochs {plain['train_seconds']:.1f} s ({plain['peak_rss_mib']:.0f} MiB) "
          f"| DP-SGD round {dp['train_seconds']:.1f} s, {dp['steps']} steps ({dp['peak_rss_mib']:.0f} MiB) "
          f"| {dp['train_seconds'] / plain['train_seconds']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
