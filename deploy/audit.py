"""The coordinator's audit log: one JSON line per operator action, in `state/audit.jsonl`.

Recorded: the coordinator started and stopped (with where it listens), a node accepted or
removed (name, key fingerprint), a run started, finished or stopped (run id, study hash,
overrides, outcome). Each line has a UTC time, the operating-system user and the action; it holds
no key, certificate body or site data. Lines are appended and flushed to disk one by one.

The log is hash-chained like the service's (`fedcare.audit_chain`, the same code): each line ends
with its `chain` member, `state/audit.head` (0600, fsynced after each action) holds the last seq and
MAC and is the lock writers take. The chain key is `state/audit-chain.key` (32 random bytes, 0600,
created with the first chained line): the coordinator kit has no `audit.key` to derive it from, and
a key of its own is one file in the state the operator already backs up. `fedcare audit verify --kit
COORDINATOR_KIT` checks it (`verify_coordinator_log`).
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

from deploy.kits import CoordinatorKit
from fedcare.audit_chain import ChainWriter, read_chain_key
from fedcare.audit_verify import ChainReport, verify_chain
from fedcare.errors import KeyMaterialError
from fedcare.files import write_secret

CHAIN_KEY = "audit-chain.key"
HEAD = "audit.head"
LOG = "audit.jsonl"  # CoordinatorKit.audit_log's name


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def audit(kit: CoordinatorKit, action: str, **details: Any) -> None:
    """Append one action to the kit's audit log."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": _user(), "action": action, **details}
    path = kit.audit_log
    path.parent.mkdir(parents=True, exist_ok=True)
    chain = ChainWriter(_chain_key(kit.state_dir, create=True), kit.state_dir / HEAD, lambda: [path], durable=True)
    try:
        with chain.locked(), path.open("ab") as log:
            chain.sync()
            sealed = chain.seal(json.dumps(entry, sort_keys=True, default=str).encode() + b"\n")
            log.write(sealed)
            log.flush()
            os.fsync(log.fileno())
            chain.commit()
    finally:
        chain.close()


def _chain_key(state_dir: Path, *, create: bool) -> bytes | None:
    path = state_dir / CHAIN_KEY
    if not path.exists():
        if not create:
            return None
        try:
            write_secret(path, os.urandom(32))
        except KeyMaterialError:  # another command created it a moment ago
            pass
    return read_chain_key(path, "the audit log's chain key")


def verify_coordinator_log(state_dir: Path) -> ChainReport:
    """Verify the coordinator's audit log in its state directory (the kit's `state_dir`); raises
    AuditChainError naming the file and line."""
    path = Path(state_dir) / LOG
    return verify_chain(str(path), lambda: [path] if path.exists() else [], path.with_name(HEAD),
                        _chain_key(path.parent, create=False), path.with_name(CHAIN_KEY))


def audit_entries(path: Path) -> list[dict[str, Any]]:
    """The audit log's entries, oldest first (an unreadable line is reported, not skipped)."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            entries.append({"action": "unreadable", "line": number})
    return entries
