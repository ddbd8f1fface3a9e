"""`fedcare data check`: what a site's export yields against a study (counts only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import add_command


def _data_check(args: argparse.Namespace) -> int:
    from client.check import check_site_export
    from client.database import is_database_url, source_from_url
    from fedcare.study import load_study

    study = load_study(args.study)
    if is_database_url(args.data):  # errors then name --data, not a file
        check = check_site_export(study, Path("--data"), source=source_from_url(args.data))
    else:
        check = check_site_export(study, Path(args.data))
    print(check.text, file=sys.stderr if check.fatal else sys.stdout)
    return 2 if check.fatal else 0


def register(commands: argparse._SubParsersAction) -> None:
    data = add_command(commands, "data")
    data_cmds = data.add_subparsers(dest="data_command", required=True)
    dcheck = data_cmds.add_parser("check", help="validate a site's export (CSV, Parquet, FHIR R4 or a database) against a study; counts only")
    dcheck.add_argument("--study", type=Path, required=True, help="the study file")
    dcheck.add_argument("--data", required=True,
                        help="a site directory (train and test splits), one split file, one FHIR directory, a "
                             "database.toml, or postgresql://USER@HOST:PORT/DB?cdm_schema=…&password_file=…")
    dcheck.set_defaults(func=_data_check)
