"""Per-round simulation time: the full fedcare round (DP-SGD + SecAgg+) vs stock Flower FedAvg
without privacy, on the same synthetic sites and model, in the same run.

    .venv/bin/python bench/round_time.py [--hospitals 5] [--rounds 6]

Round 1 includes Ray and actor start-up, so per-round time is the median over rounds 2..R,
taken from the coordinator's own timestamps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.flower import quiet_flower_environment  # noqa: E402

quiet_flower_environment()

from fedcare.study import load_study  # noqa: E402
from fedcare.run_record import RunRecord  # noqa: E402
from simulations.cohorts import write_cohorts  # noqa: E402
from simulations.engine import run_flower_simulation  # noqa: E402
from fedcare import DEFAULT_STUDY  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    study = load_study(DEFAULT_STUDY).with_overrides(rounds=args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "study.toml").write_text(study.to_toml())
        write_cohorts(study, root / "sites", args.hospitals, seed=42)
        config = {"study": str(root / "study.toml"), "sim-sites-dir": str(root / "sites")}

        t0 = time.monotonic()
        run_flower_simulation(
            args.hospitals,
            {**config, "out-dir": str(root / "stock")},
            components={"serverapp": "bench.stock_app:server_app", "clientapp": "bench.stock_app:client_app"},
        )
        stock_wall = time.monotonic() - t0
        stamps = [float(line.split()[1]) for line in (root / "stock" / "stock_rounds.txt").read_text().splitlines()]
        stock = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))

        t0 = time.monotonic()
        run_flower_simulation(args.hospitals, {**config, "out-dir": str(root / "fedcare")})
        fedcare_wall = time.monotonic() - t0
        fedcare = statistics.median(r["seconds"] for r in RunRecord(root / "fedcare").rounds()[1:])

    print(f"\nhospitals={args.hospitals} rounds={args.rounds} model={study.model.hidden} local_epochs={study.training.local_epochs}")
    print(f"stock Flower FedAvg, no privacy : {stock:6.2f} s/round (median rounds 2..{args.rounds}), whole run {stock_wall:5.1f} s")
    print(f"fedcare DP-SGD + SecAgg+        : {fedcare:6.2f} s/round (median rounds 2..{args.rounds}), whole run {fedcare_wall:5.1f} s")
    print(f"ratio fedcare / stock           : {fedcare / stock:6.2f}x")


if __name__ == "__main__":
    main()
