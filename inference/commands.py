"""`fedcare serve` and its token management (issue 6; filled in by the serving work)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `fedcare` parser."""
