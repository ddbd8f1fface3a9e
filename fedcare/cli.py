"""The `fedcare` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcare.runtime import quiet_flower_environment


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
        )
    )
    out = Path(args.out).resolve()
    print()
    print((out / "summary.txt").read_text(encoding="utf-8"), end="")
    print(f"\nreport: {out / 'report.json'}")
    return 0


def _study_check(args: argparse.Namespace) -> int:
    from fedcare.study import load_study

    study = load_study(args.study)
    print(f"{args.study}: valid study '{study.name}', {len(study.features)} features, hash {study.hash}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from simulations.simulate import DEFAULT_STUDY

    parser = argparse.ArgumentParser(prog="fedcare", description="Federated mental-health risk models across hospitals.")
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a whole study with synthetic hospitals on this machine")
    sim.add_argument("--hospitals", type=int, default=5, help="number of synthetic hospitals (default 5)")
    sim.add_argument("--rounds", type=int, default=None, help="override the study's number of rounds")
    sim.add_argument("--epsilon", type=float, default=None, help="override each site's ε target for the study")
    sim.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study TOML file")
    sim.add_argument("--seed", type=int, default=42, help="seed of the synthetic cohorts (default 42)")
    sim.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory (must be new)")
    sim.add_argument("--size-scale", type=float, default=1.0, help="multiply every hospital's size (default 1.0)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=_simulate)

    study = commands.add_parser("study", help="study file tools")
    study_cmds = study.add_subparsers(dest="study_command", required=True)
    check = study_cmds.add_parser("check", help="validate a study file and print its hash")
    check.add_argument("study", type=Path)
    check.set_defaults(func=_study_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_flower_environment()
    from client.data import SiteDataError
    from fedcare.study import StudyConfigError
    from simulations.simulate import SimulationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StudyConfigError, SiteDataError, SimulationError) as err:
        print(f"fedcare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedcare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
