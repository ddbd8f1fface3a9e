"""`python -m inference serve ...`: exactly the `fedcare serve` commands, without the rest of the CLI.

`fedcare`'s parser imports the training stack (torch, Opacus) to build its other commands; a
serving host does not need them in memory. Same arguments, same one-line errors and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from fedcare.kits import KitError
    from fedcare.pki import KeyMaterialError
    from fedcare.study import StudyConfigError
    from fedcare.cli import run_command
    from inference.commands import register

    parser = argparse.ArgumentParser(prog="fedcare", description="The fedcare prediction service.")
    commands = parser.add_subparsers(dest="command", required=True)
    register(commands)
    return run_command(parser.parse_args(argv), (KitError, KeyMaterialError, StudyConfigError))


if __name__ == "__main__":
    sys.exit(main())
