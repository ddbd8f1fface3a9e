"""The `fedcare` command line: a table of commands, each registered by the package that owns it.

`fedcare --help` lists the table without importing any package; `fedcare CMD ...` imports only
the module that registers CMD (its heavy dependencies load inside the command, when it runs).
Every user-facing failure is a `fedcare.errors.FedcareError`; `main` catches it here, in one
place: one line on stderr (`fedcare: error: ...`) and the error's exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """One top-level command: the module whose `register(commands)` adds it, and its one-line help."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "simulate": Command("simulations.commands", "run a whole study on this machine: synthetic hospitals, or your own site folders"),
    "example": Command("simulations.commands", "write an example federation of real data (breast-cancer: 4 hospitals) to simulate"),
    "study": Command("cli.study", "study file tools"),
    "data": Command("client.commands", "site data tools"),
    "privacy": Command("privacy.commands", "the site's privacy ledger"),
    "provision": Command("deploy.commands", "create the study CA and one kit per party"),
    "kit": Command("deploy.commands", "protect a kit's private keys with a passphrase (or remove it)"),
    "node": Command("deploy.commands", "hospital node commands"),
    "coordinator": Command("deploy.commands", "coordinator commands"),
    "run": Command("deploy.commands", "run the study on the federation (from the coordinator)"),
    "status": Command("deploy.commands", "connected hospital nodes and runs"),
    "export": Command("export.commands", "build the signed model package of a finished run (coordinator)"),
    "verify": Command("export.commands", "check a model package's signature and files"),
    "quantize": Command("export.commands", "on site: calibrate the package's int8 model from local training data"),
    "serve": Command("inference.commands", "serve a signed model package over HTTPS (FastAPI + ONNX Runtime); token management"),
    "audit": Command("inference.commands", "verify the hash chain of the service's or the coordinator's audit log"),
    "report": Command("inference.commands", "at a hospital: its own report of a study (local model scores, its ε); sent nowhere"),
}


def add_command(commands: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """Add top-level command `name` with its help from the table (called by each package's `register`)."""
    return commands.add_parser(name, help=COMMANDS[name].help, **kwargs)


def print_study_result(folder: Path, report: dict) -> int:
    """What `simulate` and `run` print at the end: the summary and where the report is; exit 4 if it stopped early."""
    from fedcare.report import check_completed

    print()
    print((folder / "summary.txt").read_text(encoding="utf-8"), end="")
    print(f"\nreport: {folder / 'report.json'}")
    check_completed(report)
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: the chosen command's module registers it for real; the others are listed only."""
    parser = argparse.ArgumentParser(prog="fedcare", description="Federated mental-health risk models across hospitals.")
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    if chosen in COMMANDS:
        importlib.import_module(COMMANDS[chosen].module).register(commands)
    for name, command in COMMANDS.items():
        if name not in commands.choices:
            commands.add_parser(name, help=command.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `fedcare` with `argv` (default: the process arguments); returns the exit code."""
    from deploy.flower import quiet_flower_environment
    from fedcare.errors import FedcareError

    quiet_flower_environment()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except FedcareError as err:
        print(f"fedcare: error: {err.line}", file=sys.stderr, flush=True)
        return err.exit_code
    except OSError as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"fedcare: error: {where}{err.strerror or err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("fedcare: interrupted", file=sys.stderr, flush=True)
        return 130
