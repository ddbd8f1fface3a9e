"""Strategies on the secure aggregate, side by side: the same study, cohorts, ε and seed with each
`[strategy]`, through the whole simulation (DP-SGD at the sites, SecAgg+, the server optimizer).

    .venv/bin/python bench/strategies.py [--hospitals 5] [--rounds R] [--epsilon E] [--seed 42]
                                         [--size-scale 1.0] [--only fedavg,fedadam] [--repeats 1] [--sites DIR]

Prints, per strategy: the final model's AUC on the union of the sites' test splits (the evaluator's
report), training rounds aggregated, wall seconds of the whole simulation, the largest ε a site spent,
and the AUC as a ratio of FedAvg's in the same run (FedAvg always runs first); with `--repeats N`, means
over N runs and the AUC's standard deviation (the DP noise differs in every run). Rounds and ε default to the study's.
`--sites DIR` runs on the evaluator's own site folders instead of synthetic hospitals (when this
checkout's `SimulationOptions` has `sites`).

The hyper-parameters below are the bench's, tuned a little on the synthetic cohorts (5 hospitals, the
study's 5 rounds and ε 3; η tried: FedAdagrad 0.05 / 0.1 / 0.2, FedAdam and FedYogi 0.03 / 0.05 / 0.1,
FedAvgM (η, β) (0.7, 0.3) / (0.5, 0.5); the larger η were worst, the rest within the DP noise's spread):
the adaptive optimizers step ≈ η per coordinate per round whatever the delta's size, so η is about
the size of FedAvg's per-round change of a weight, not Flower's defaults (0.1 / 0.01, tuned for
other models).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.flower import quiet_flower_environment  # noqa: E402

quiet_flower_environment()

from fedcare import DEFAULT_STUDY  # noqa: E402
from fedcare.study import parse_study  # noqa: E402
from simulations.simulate import SimulationOptions, simulate  # noqa: E402

# [strategy] of each run (besides name and the study's min_sites)
STRATEGIES: dict[str, dict[str, float]] = {
    "fedavg": {"server_learning_rate": 1.0},
    "fedavgm": {"server_learning_rate": 0.5, "server_momentum": 0.5},
    "fedprox": {"server_learning_rate": 1.0, "proximal_mu": 0.01},
    "fedadagrad": {"server_learning_rate": 0.1, "beta1": 0.0, "tau": 1e-3},
    "fedadam": {"server_learning_rate": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_learning_rate": 0.03, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}


def study_variant(base: Path, name: str, options: dict[str, float], out: Path) -> Path:
    """The base study file with its [strategy] replaced, validated and written to `out`."""
    raw = tomllib.loads(base.read_text(encoding="utf-8"))
    raw["strategy"] = {"name": name, "min_sites": raw["strategy"]["min_sites"], **options}
    out.write_text(parse_study(raw, source=f"{base} ({name})").to_toml(), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=None, help="the study's by default")
    parser.add_argument("--epsilon", type=float, default=None, help="the study's by default")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--size-scale", type=float, default=1.0)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--only", default="", help="comma-separated strategies (fedavg always runs, as the baseline)")
    parser.add_argument("--sites", type=Path, default=None, help="the evaluator's own site folders (SimulationOptions.sites)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each strategy (mean AUC, its sd, mean ratio)")
    parser.add_argument("--verbose", action="store_true", help="show each simulation's output")
    args = parser.parse_args()

    chosen = ["fedavg", *[n for n in args.only.split(",") if n and n != "fedavg"]] if args.only else list(STRATEGIES)
    unknown = [n for n in chosen if n not in STRATEGIES]
    if unknown:
        parser.error(f"--only: unknown strategies {', '.join(unknown)} (expected: {', '.join(STRATEGIES)})")
    if args.repeats < 1:
        parser.error("--repeats: must be >= 1")
    extra: dict[str, object] = {}
    if args.sites is not None:
        if "sites" not in {f.name for f in dataclasses.fields(SimulationOptions)}:
            parser.error("--sites: this checkout's SimulationOptions has no `sites` option yet")
        extra["sites"] = args.sites.resolve()

    results: dict[str, list[tuple[float, int, int, float, float, float]]] = {name: [] for name in chosen}
    baselines: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedcare-bench-strategies-") as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):
            for name in chosen:
                study = study_variant(args.study, name, STRATEGIES[name], root / f"{name}.toml")
                out = root / f"{name}-{repeat}"
                opts = SimulationOptions(hospitals=args.hospitals, rounds=args.rounds, epsilon=args.epsilon, study=study,
                                         seed=args.seed, out=out, size_scale=args.size_scale, verbose=args.verbose,
                                         **extra)
                print(f"{name} [{repeat + 1}/{args.repeats}]: simulating ({STRATEGIES[name]})", flush=True)
                started = time.monotonic()
                with open(root / f"{name}-{repeat}.log", "w", encoding="utf-8") as sink, (
                    contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(sink)
                ):
                    report = simulate(opts)
                wall = time.monotonic() - started
                epsilon = max(site["epsilon"] for site in report["sites"])
                results[name].append((report["final"]["auc"], report["outcome"]["rounds_aggregated"],
                                      report["outcome"]["rounds_planned"], wall, epsilon,
                                      report["site_mean"]["auc"]))
                baselines.append({**report["baseline_centralized"], "ceiling": report.get("ground_truth_auc")})
                print(f"{name}: AUC {report['final']['auc']:.4f}, {wall:.1f} s", flush=True)

    where = f"sites={args.sites}" if args.sites is not None else \
        f"hospitals={args.hospitals} seed={args.seed} size_scale={args.size_scale}"
    print(f"\n{where} rounds={args.rounds or 'study'} "
          f"epsilon={args.epsilon or 'study'} repeats={args.repeats} ({args.study.name}); DP noise is drawn fresh "
          "(os.urandom) in every run, so the seed fixes the cohorts, not the noise")
    converged = statistics.fmean(b["converged_auc"] for b in baselines)
    print(f"{'strategy':<11} {'final AUC':>9} {'± sd':>7} {'site mean':>9} {'Δ converged':>11} {'rounds':>7} {'wall s':>7} "
          f"{'max site ε':>10} {'AUC / fedavg':>13}")
    for name, runs in results.items():
        aucs = [r[0] for r in runs]
        # the ratio to FedAvg's AUC in the same repeat, averaged over repeats
        ratio = statistics.fmean(r[0] / base[0] for r, base in zip(runs, results["fedavg"]))
        sd = statistics.stdev(aucs) if len(aucs) > 1 else float("nan")
        rounds = f"{min(r[1] for r in runs)}/{runs[0][2]}"
        print(f"{name:<11} {statistics.fmean(aucs):>9.4f} {sd:>7.4f} {statistics.fmean(r[5] for r in runs):>9.4f} "
              f"{statistics.fmean(aucs) - converged:>+11.4f} {rounds:>7} {statistics.fmean(r[3] for r in runs):>7.1f} "
              f"{max(r[4] for r in runs):>10.3f} {ratio:>13.4f}")
    ceiling = [b["ceiling"] for b in baselines if b["ceiling"] is not None]
    print(f"\ncentralized non-private on the pooled training rows: {baselines[0]['epochs']} epochs (rounds × local "
          f"epochs) AUC {statistics.fmean(b['auc'] for b in baselines):.4f}; trained to convergence (early stopping on a "
          f"held-out 10 %) AUC {converged:.4f}" + (f"; ground-truth ceiling AUC {ceiling[0]:.4f}" if ceiling else ""))

if __name__ == "__main__":
    main()
