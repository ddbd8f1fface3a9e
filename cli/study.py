"""`fedcare study check FILE`: validate a study file and print its hash (the kernel only: no torch, no Flower)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import add_command


def _study_check(args: argparse.Namespace) -> int:
    from fedcare.study import load_study

    study = load_study(args.study)
    print(f"{args.study}: valid study '{study.name}', {len(study.features)} features, hash {study.hash}")
    print(f"privacy budget key {study.budget_key} (every run of this study, whatever --rounds/--epsilon, "
          f"spends from one budget at each site); ε {study.privacy.epsilon:g} over {study.training.rounds} rounds "
          f"+ {study.privacy.reserve_rounds} reserve")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    study = add_command(commands, "study")
    study_cmds = study.add_subparsers(dest="study_command", required=True)
    check = study_cmds.add_parser("check", help="validate a study file and print its hash")
    check.add_argument("study", type=Path)
    check.set_defaults(func=_study_check)
