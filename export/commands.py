"""`fedcare export`, `fedcare verify`, `fedcare quantize` (issue 6; filled in by the package work)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `fedcare` parser."""
