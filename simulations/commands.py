"""`fedcare simulate`: a whole study on this machine (registered by this package, imported only when run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import add_command, print_study_result
from fedcare import DEFAULT_STUDY


def _simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import SimulationOptions, simulate

    report = simulate(
        SimulationOptions(
            hospitals=args.hospitals,
            rounds=args.rounds,
            epsilon=args.epsilon,
            study=args.study,
            seed=args.seed,
            out=args.out,
            size_scale=args.size_scale,
            verbose=args.verbose,
            data_format=args.format,
        )
    )
    return print_study_result(Path(args.out).resolve(), report)


def register(commands: argparse._SubParsersAction) -> None:
    sim = add_command(commands, "simulate")
    sim.add_argument("--hospitals", type=int, default=5, help="number of synthetic hospitals (default 5)")
    sim.add_argument("--rounds", type=int, default=None, help="override the study's number of rounds")
    sim.add_argument("--epsilon", type=float, default=None, help="override each site's ε target for the study")
    sim.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study TOML file")
    sim.add_argument("--seed", type=int, default=42, help="seed of the synthetic cohorts (default 42)")
    sim.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory (must be new)")
    sim.add_argument("--size-scale", type=float, default=1.0, help="multiply every hospital's size (default 1.0)")
    sim.add_argument("--format", choices=("csv", "parquet", "fhir"), default="csv",
                     help="how the synthetic hospitals export their data (fhir: R4 bulk NDJSON through the study's [mapping])")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=_simulate)
