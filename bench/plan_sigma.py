"""Planning σ: fedcare's `plan_sigma` vs Opacus' stock `get_noise_multiplier`, same shapes, same run.

    .venv/bin/python bench/plan_sigma.py [--stock-timeout 120] [--epsilons 0.5,1,3,10,20] [--quick]

For each site shape (rows, batch size, local epochs, rounds + reserve: the sample rate and steps
`plan_schedule` derives) and each target ε up to `fedcare.study.EPSILON_MAX`, each side plans σ in a
forked child of one warmed-up process (Opacus, SciPy loaded once): wall seconds and the child's
peak RSS above what it started with. Stock is Opacus 1.6's `get_noise_multiplier(..., accountant,
epsilon_tolerance=0.005)`, what `plan_schedule` called before; it is skipped ("skip") where it
would take minutes (a PRV grid growing with √steps: more than 20,000 steps) and stopped after
--stock-timeout seconds. Also printed: the ε of fedcare's σ recomputed by Opacus' own accountant
(`create_accountant(...).get_epsilon`, skipped where stock is), which must not exceed the target.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from fedcare.study import EPSILON_MAX  # noqa: E402
from privacy.accounting import batches_per_epoch, epsilon_of, plan_sigma  # noqa: E402

DELTA = 1e-5
STOCK_MAX_STEPS = 20_000
# (name, training rows, batch size, local epochs, rounds + reserve rounds)
SHAPES = [
    ("study default (2,400 rows)", 2_400, 128, 2, 6),
    ("20,000 rows", 20_000, 128, 2, 6),
    ("full batch (100 rows), 51 rounds", 100, 128, 2, 51),
    ("2,400 rows, 201 rounds", 2_400, 128, 2, 201),
    ("1M rows, batch 128", 1_000_000, 128, 2, 6),
    ("1M rows, batch 1", 1_000_000, 1, 2, 6),
]


def _schedule(rows: int, batch: int, epochs: int, rounds: int) -> tuple[float, int]:
    batches = batches_per_epoch(rows, batch)
    return 1.0 / batches, epochs * batches * rounds


def _stock(accountant: str, epsilon: float, q: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with np.errstate(divide="ignore"):
        return get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=q, steps=steps,
                                    accountant=accountant, epsilon_tolerance=0.005)


def _ours(accountant: str, epsilon: float, q: float, steps: int) -> float:
    return plan_sigma(accountant=accountant, target_epsilon=epsilon, delta=DELTA, sample_rate=q, steps=steps)


def _child(side: str, args: tuple, out) -> None:
    warnings.filterwarnings("ignore")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    sigma = (_stock if side == "stock" else _ours)(*args)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024  # KiB → MiB
    out.send({"sigma": sigma, "seconds": seconds, "mib": peak})


def _measure(side: str, args: tuple, timeout: float) -> dict | None:
    """Run one side in a forked child (its own peak RSS); None when stopped after `timeout` s."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(side, args, send))
    child.start()
    if receive.poll(timeout):
        result = receive.recv()
        child.join()
        return result
    child.terminate()
    child.join()
    return None


def _compose_child(side: str, history: list, out) -> None:
    """ε of a ledger's history: fedcare's `epsilon_of`, or Opacus' PRVAccountant on the rounds as recorded."""
    warnings.filterwarnings("ignore")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if side == "stock":
        from opacus.accountants import create_accountant

        acc = create_accountant("prv")
        acc.history = list(history)
        with np.errstate(divide="ignore"):
            eps = float(acc.get_epsilon(delta=DELTA))
    else:
        eps = epsilon_of("prv", history, DELTA)
    out.send({"eps": eps, "seconds": time.perf_counter() - t0,
              "mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024})


def _composition(timeout: float) -> None:
    """The per-round charge's composition: a study's ledger after 2 runs (2 σ), 201 rounds."""
    q, per_round = 1 / 19, 38
    history = [(3.0, q, per_round)] * 100 + [(3.3, q, per_round)] * 101  # 2,400 rows, batch 128, 2 epochs
    ctx = multiprocessing.get_context("fork")
    row = {}
    for side in ("ours", "stock"):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_compose_child, args=(side, history, send))
        child.start()
        row[side] = receive.recv() if receive.poll(timeout) else None
        if row[side] is None:
            child.terminate()
        child.join()
    ours, stock = row["ours"], row["stock"]
    stock_text = (f"{stock['seconds']:.2f} s, {stock['mib']:.0f} MiB, ε {stock['eps']:.4f}; ratio "
                  f"{stock['seconds'] / ours['seconds']:.0f}× time") if stock else f"> {timeout:g} s (stopped)"
    print(f"ledger composition, 201 rounds in 2 runs (ε {ours['eps']:.4f}): fedcare {ours['seconds']:.2f} s, "
          f"{ours['mib']:.0f} MiB; Opacus PRVAccountant on the rounds as recorded: {stock_text}")


def _opacus_epsilon(accountant: str, sigma: float, q: float, steps: int) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    with np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=DELTA))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stock-timeout", type=float, default=120.0)
    parser.add_argument("--epsilons", default=f"0.5,1,3,10,{EPSILON_MAX:g}")
    parser.add_argument("--quick", action="store_true", help="fedcare only (no stock, no Opacus recomputation)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    _ours("prv", 1.0, 0.5, 4)  # load Opacus and SciPy once, before forking
    _ours("rdp", 1.0, 0.5, 4)
    print(f"δ = {DELTA:g}; EPSILON_MAX = {EPSILON_MAX:g}; times in s, memory = peak RSS above the child's start (MiB)")
    print(f"{'shape':<34} {'acc':<4} {'ε':>5} {'steps':>9}  {'fedcare s':>9} {'MiB':>5}  {'stock s':>9} {'MiB':>6}"
          f"  {'ratio s':>8} {'ratio MiB':>9}  {'ε ours':>7} {'ε Opacus':>8}")
    worst = {"seconds": 0.0, "mib": 0.0}
    for name, rows, batch, epochs, rounds in SHAPES:
        q, steps = _schedule(rows, batch, epochs, rounds)
        for accountant in ("prv", "rdp"):
            for epsilon in epsilons:
                cell = (accountant, epsilon, q, steps)
                ours = _measure("ours", cell, 600.0)
                worst = {k: max(worst[k], ours[k]) for k in worst}
                mine = epsilon_of(accountant, [(ours["sigma"], q, steps)], DELTA)
                assert mine <= epsilon, (cell, mine)
                skip = args.quick or steps > STOCK_MAX_STEPS or (accountant == "prv" and epsilon > EPSILON_MAX)
                stock = None if skip else _measure("stock", cell, args.stock_timeout)
                opacus = "skip" if skip else f"{_opacus_epsilon(accountant, ours['sigma'], q, steps):8.4f}"
                if skip:
                    stock_s = stock_m = ratio_s = ratio_m = "skip"
                elif stock is None:
                    stock_s, stock_m, ratio_s, ratio_m = f">{args.stock_timeout:g}", "?", f">{args.stock_timeout / ours['seconds']:.0f}×", "?"
                else:
                    stock_s, stock_m = f"{stock['seconds']:.2f}", f"{stock['mib']:.0f}"
                    ratio_s = f"{stock['seconds'] / ours['seconds']:.1f}×"
                    ratio_m = f"{stock['mib'] / max(ours['mib'], 1.0):.1f}×"
                print(f"{name:<34} {accountant:<4} {epsilon:>5g} {steps:>9}  {ours['seconds']:>9.2f} {ours['mib']:>5.0f}  "
                      f"{stock_s:>9} {stock_m:>6}  {ratio_s:>8} {ratio_m:>9}  {mine:>7.4f} {opacus:>8}", flush=True)
    if not args.quick:
        _composition(args.stock_timeout)
    print(f"worst fedcare planning: {worst['seconds']:.2f} s, {worst['mib']:.0f} MiB "
          f"(budget: 2 s, 200 MB; ratio = stock / fedcare, > 1 means fedcare is faster / smaller)")


if __name__ == "__main__":
    main()
