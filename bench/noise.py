"""DP-SGD noise generation per step for the study model: Opacus' default vs fedcare's CryptoGaussian.

    .venv/bin/python bench/noise.py [--steps 2000] [--repeats 7]

One "step" draws the noise for every parameter tensor of the study model, as `add_noise` does once
per DP-SGD step. Baseline: Opacus' own `_generate_noise` (torch.normal on torch's default
generator, secure_mode off, what fedcare used so far). Also shown: Opacus' secure_mode hardening
(4 draws / 2) on the same torch generator, to separate the cost of the hardening from that of
ChaCha20. Reports µs per step (median of repeats, interleaved, 1 thread) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fedcare.model import build_model  # noqa: E402
from fedcare.study import load_study  # noqa: E402
from privacy.noise import CryptoGaussian  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIGMA = 1.0  # the value does not change the cost


def _per_step_us(step: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    from opacus.optimizers.optimizer import _generate_noise

    study = load_study(ROOT / "studies" / "depression-risk.toml")
    refs = [torch.zeros_like(p) for p in build_model(study).parameters()]  # stand-ins for p.summed_grad
    std = SIGMA * study.privacy.clipping_norm
    source = CryptoGaussian()

    def opacus_default() -> None:
        for ref in refs:
            _generate_noise(std=std, reference=ref, generator=None, secure_mode=False)

    def opacus_hardened_torch_rng() -> None:
        for ref in refs:
            _generate_noise(std=std, reference=ref, generator=None, secure_mode=True)

    def fedcare_crypto() -> None:
        for ref in refs:
            source.hardened(ref.shape, std, dtype=ref.dtype, device=ref.device)

    sides = {"opacus": opacus_default, "opacus_hardened": opacus_hardened_torch_rng, "fedcare": fedcare_crypto}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for step in sides.values():
        _per_step_us(step, 50)  # warm-up
    for _ in range(args.repeats):
        for name, step in sides.items():
            times[name].append(_per_step_us(step, args.steps))
    med = {name: statistics.median(t) for name, t in times.items()}
    n_params = sum(r.numel() for r in refs)
    print(f"model={study.model.hidden} params={n_params} tensors={len(refs)} steps={args.steps} repeats={args.repeats} threads=1")
    print(f"opacus default (torch.normal, torch RNG)       : {med['opacus']:8.1f} us/step")
    print(f"opacus secure_mode hardening on torch RNG      : {med['opacus_hardened']:8.1f} us/step")
    print(f"fedcare CryptoGaussian (ChaCha20, hardened)    : {med['fedcare']:8.1f} us/step")
    print(f"ratio fedcare / opacus default                 : {med['fedcare'] / med['opacus']:8.2f}x")
    print(f"ratio fedcare / opacus hardened (torch RNG)    : {med['fedcare'] / med['opacus_hardened']:8.2f}x")


if __name__ == "__main__":
    main()
