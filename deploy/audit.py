"""The coordinator's audit log: one JSON line per operator action, in `state/audit.jsonl`.

Recorded: the coordinator started and stopped (with where it listens), a node accepted or
removed (name, key fingerprint), a run started, finished or stopped (run id, study hash,
overrides, outcome). Each line has a UTC time, the operating-system user and the action; it holds
no key, certificate body or site data. Lines are appended and flushed to disk one by one.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

from deploy.kits import CoordinatorKit


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
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
        log.flush()
        os.fsync(log.fileno())


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
