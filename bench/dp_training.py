"""Local DP-SGD training throughput vs plain torch on the study model, same data, same run.

    .venv/bin/python bench/dp_training.py [--rows 20000] [--repeats 5]

All sides run the study's optimizer, batch size and epochs over the same synthetic rows:
plain torch SGD (`train_plain`), fedcare's `train_round` on its fast path (`client.fast_dp`) and
on the Opacus path (ghost clipping, make_private included, `fast=False`: the reference and the
path before issue 16); both DP paths with cryptographic Poisson sampling and noise. Reports
samples/s (median of repeats, interleaved) and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from client.data import load_site  # noqa: E402
from client.training import train_plain, train_round  # noqa: E402
from fedcare.features import model_inputs  # noqa: E402
from fedcare.model import build_model  # noqa: E402
from fedcare.study import load_study  # noqa: E402
from privacy.accounting import plan_schedule  # noqa: E402
from simulations.cohorts import SMALLEST_SITE, write_cohorts  # noqa: E402
from fedcare import DEFAULT_STUDY  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_study(DEFAULT_STUDY)
    study = dataclasses.replace(base, training=dataclasses.replace(base.training, rounds=1, local_epochs=2))
    with tempfile.TemporaryDirectory() as tmp:
        write_cohorts(study, tmp, hospitals=1, seed=3, size_scale=args.rows / SMALLEST_SITE / 0.8)
        data = load_site(study, Path(tmp) / "hospital-01")
    x, y = model_inputs(study, data.train.features), data.train.labels
    schedule = plan_schedule(study, len(y))
    samples = len(y) * study.training.local_epochs
    plain, fast, opacus = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        train_plain(study, build_model(study), x, y, study.training.local_epochs)
        plain.append(samples / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        train_round(study, build_model(study), x, y, schedule, fast=True)
        fast.append(samples / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        train_round(study, build_model(study), x, y, schedule, fast=False)
        opacus.append(samples / (time.perf_counter() - t0))
    p, f, o = statistics.median(plain), statistics.median(fast), statistics.median(opacus)
    print(f"rows={len(y)} batch={study.training.batch_size} model={study.model.hidden} epochs={study.training.local_epochs} threads=1")
    print(f"plain torch SGD        : {p:10.0f} samples/s")
    print(f"fedcare DP-SGD, fast   : {f:10.0f} samples/s  (sigma={schedule.noise_multiplier:.2f})")
    print(f"fedcare DP-SGD, Opacus : {o:10.0f} samples/s")
    print(f"ratio fast / plain     : {f / p:10.2f}x")
    print(f"ratio Opacus / plain   : {o / p:10.2f}x")
    print(f"ratio fast / Opacus    : {f / o:10.2f}x")


if __name__ == "__main__":
    main()
