"""`fedcare privacy report` and `fedcare privacy reseal`: the site's ledger, verified, and the administrator's way out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import add_command


def _site(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(state directory, policy file or None) of a hospital kit or of a bare state directory."""
    if args.kit is not None:
        from deploy.kits import load_hospital_kit, read_site_settings

        kit = load_hospital_kit(args.kit, need_keys=False)
        return Path(read_site_settings(kit)["state_dir"]), kit.site_file if kit.site_file.exists() else None
    return args.state_dir, args.policy


def _report(args: argparse.Namespace) -> int:
    from privacy.ledger import LedgerTampered, PrivacyLedger
    from privacy.policy import policy_for_site
    from privacy.statement import statement_text

    state_dir, policy_file = _site(args)
    ledger = PrivacyLedger(state_dir)
    policy = policy_for_site(policy_file)
    try:
        entries = ledger.entries()
    except LedgerTampered as err:
        print(f"fedcare: LEDGER FAILED VERIFICATION: {err}", file=sys.stderr)
        print("training is blocked at this site until an administrator restores the ledger from a backup, "
              "or accepts it as it stands with `fedcare privacy reseal --reason TEXT`", file=sys.stderr)
        return err.exit_code
    print(statement_text(entries, policy, str(ledger.path)))
    return 0


def _reseal(args: argparse.Namespace) -> int:
    from privacy.ledger import PrivacyLedger

    state_dir, _ = _site(args)
    problem = PrivacyLedger(state_dir).reseal(args.reason)
    if not problem:
        print("the ledger verifies; nothing to reseal")
    else:
        print(f"ledger resealed; recorded as an administrator entry with the problem found: {problem}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    privacy = add_command(commands, "privacy")
    privacy_cmds = privacy.add_subparsers(dest="privacy_command", required=True)
    for name, func, text in (
        ("report", _report, "print the ledger as a table and verify its chain (exit 3 if tampered)"),
        ("reseal", _reseal, "administrator: accept a ledger that failed verification, recording why"),
    ):
        sub = privacy_cmds.add_parser(name, help=text)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--kit", type=Path, help="the hospital kit folder")
        where.add_argument("--state-dir", type=Path, help="a site state directory (e.g. a simulated site's .fedcare)")
        sub.add_argument("--policy", type=Path, default=None, help="with --state-dir: the site.toml holding [policy]")
        if name == "reseal":
            sub.add_argument("--reason", required=True, help="why the administrator accepts the ledger (recorded)")
        sub.set_defaults(func=func)
