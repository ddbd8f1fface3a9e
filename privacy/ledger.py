"""The site's privacy ledger: every DP-SGD round this site trains, in every study, tamper-evident.

Files in the site's state directory (the node's `state-dir`):

    ledger.jsonl  one entry per line. Each entry holds the previous entry's MAC in `prev` and its
                  own `mac` = HMAC-SHA256(site key, canonical JSON of every other field): editing,
                  removing or reordering any entry breaks the chain.
    ledger.head   the entry count and last MAC, itself MAC'ed: detects a truncated tail.
    ledger.key    32 random bytes (mode 0600), created with the first entry.

Every write replaces the file atomically (temporary file, fsync, rename), so a crash leaves
the old or the new ledger, never half of one. A round is recorded *before* it is trained
(`privacy/budget.py`), so a crash anywhere after the write can only over-count.

What it protects against: edits, partial restores, lost tails and bugs by anyone or anything
without the key. An administrator who can read the key can rewrite history; the key is the
hospital's, kept with its kit, never sent anywhere. A ledger that fails verification blocks
training until an administrator restores it or accepts it with `fedcare privacy reseal`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedcare.errors import FedcareError
from fedcare.files import atomic_write_bytes, write_secret

GENESIS = "0" * 64


class LedgerTampered(FedcareError, RuntimeError):
    """The ledger failed verification; the message says where."""

    exit_code = 3  # training is blocked until an administrator acts


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded event: a DP-SGD round (`event = "round"`) or an administrator's reseal."""

    seq: int
    time: str
    event: str
    study_hash: str
    run_id: int
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon_study: float  # this study's ε after this round (all its runs at this site)
    epsilon_lifetime: float  # the site's ε over all studies after this round
    note: str
    prev: str
    mac: str = ""

    @property
    def dp_step(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


ENTRY_FIELDS = [f.name for f in fields(LedgerEntry)]


def _canonical(values: dict) -> bytes:
    return json.dumps({k: v for k, v in values.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


class PrivacyLedger:
    """The ledger in one site's state directory."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "ledger.jsonl"
        self.head_path = self.dir / "ledger.head"
        self.key_path = self.dir / "ledger.key"

    # -- reading -----------------------------------------------------------------------------
    def _key(self) -> bytes | None:
        return self.key_path.read_bytes() if self.key_path.exists() else None

    def entries(self) -> list[LedgerEntry]:
        """Every entry, verified; raises LedgerTampered naming the first problem."""
        key = self._key()
        if key is None:
            if self.path.exists() or self.head_path.exists():
                raise LedgerTampered(f"{self.key_path}: the ledger's key is missing; the ledger cannot be verified")
            return []  # a site that has never trained
        if not self.path.exists() or not self.head_path.exists():
            missing = self.path if not self.path.exists() else self.head_path
            raise LedgerTampered(f"{missing}: missing although the ledger's key exists (deleted or not restored)")
        entries = self._read_chain(key)
        self._check_head(key, entries)
        return entries

    def _read_chain(self, key: bytes) -> list[LedgerEntry]:
        entries: list[LedgerEntry] = []
        prev = GENESIS
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{self.path}:{lineno}"
            try:
                raw = json.loads(line)
                entry = LedgerEntry(**{name: raw[name] for name in ENTRY_FIELDS})
                if set(raw) != set(ENTRY_FIELDS):
                    raise KeyError(sorted(set(raw) ^ set(ENTRY_FIELDS))[0])
            except (ValueError, KeyError, TypeError) as err:
                raise LedgerTampered(f"{where}: not a ledger entry ({err})") from None
            if not hmac.compare_digest(str(entry.mac), _mac(key, _canonical(raw))):
                raise LedgerTampered(f"{where}: entry was altered (its MAC does not match)")
            if entry.prev != prev or entry.seq != len(entries) + 1:
                raise LedgerTampered(f"{where}: the chain is broken before entry {entry.seq} (removed or reordered)")
            entries.append(entry)
            prev = entry.mac
        return entries

    def _check_head(self, key: bytes, entries: list[LedgerEntry]) -> None:
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            count, last, head_mac = int(head["entries"]), str(head["mac"]), str(head["head_mac"])
        except (ValueError, KeyError, TypeError):
            raise LedgerTampered(f"{self.head_path}: unreadable") from None
        if not hmac.compare_digest(head_mac, _mac(key, f"head|{count}|{last}".encode())):
            raise LedgerTampered(f"{self.head_path}: altered (its MAC does not match)")
        # A crash between the ledger write and the head write leaves the head one entry behind: fine.
        if count > len(entries):
            raise LedgerTampered(
                f"{self.path}: holds {len(entries)} entries but the head records {count}: entries were removed"
            )
        if count and entries[count - 1].mac != last:
            raise LedgerTampered(f"{self.path}: entry {count} differs from the one the head records")

    # -- writing -----------------------------------------------------------------------------
    def append(self, **values: object) -> LedgerEntry:
        """Verify, then durably add one entry (ledger first, then head)."""
        existing = self.entries()
        key = self._key()
        if key is None:
            write_secret(self.key_path, os.urandom(32))
            key = self.key_path.read_bytes()
        draft = {
            **{name: values[name] for name in ENTRY_FIELDS if name in values},
            "seq": len(existing) + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prev": existing[-1].mac if existing else GENESIS,
        }
        missing = [name for name in ENTRY_FIELDS if name not in draft and name != "mac"]
        if missing:
            raise ValueError(f"ledger entry lacks {missing}")
        entry = LedgerEntry(**draft, mac=_mac(key, _canonical(draft)))
        self._write(key, [*existing, entry])
        return entry

    def _write(self, key: bytes, entries: Iterable[LedgerEntry]) -> None:
        entries = list(entries)
        self.dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in entries)
        atomic_write_bytes(self.path, text.encode())
        last = entries[-1].mac if entries else GENESIS
        head = {"entries": len(entries), "mac": last, "head_mac": _mac(key, f"head|{len(entries)}|{last}".encode())}
        atomic_write_bytes(self.head_path, json.dumps(head).encode())

    def reseal(self, reason: str) -> str:
        """Administrator's acceptance of a ledger that failed verification: re-chain every entry as it
        stands now and record the reseal (with the problem found) as a new entry. Returns the problem."""
        try:
            self.entries()
            return ""
        except LedgerTampered as err:
            problem = str(err)
        key = self._key()
        if key is None:
            raise LedgerTampered(f"{self.key_path}: no key; move the ledger files aside to start a new ledger")
        rows = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else [], 1):
            try:
                raw = json.loads(line)
                rows.append({name: raw[name] for name in ENTRY_FIELDS if name != "mac"})
            except (ValueError, KeyError, TypeError):
                raise LedgerTampered(f"{self.path}:{lineno}: not a ledger entry; repair or remove the line first") from None
        entries: list[LedgerEntry] = []
        for row in rows + [_reseal_row(reason, problem, rows)]:
            row = {**row, "seq": len(entries) + 1, "prev": entries[-1].mac if entries else GENESIS}
            entries.append(LedgerEntry(**row, mac=_mac(key, _canonical(row))))
        self._write(key, entries)
        return problem


def _reseal_row(reason: str, problem: str, rows: list[dict]) -> dict:
    last = rows[-1] if rows else {}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": "reseal", "study_hash": "", "run_id": 0,
        "round": 0, "noise_multiplier": 0.0, "sample_rate": 0.0, "steps": 0, "accountant": "", "delta": 0.0,
        "epsilon_study": 0.0, "epsilon_lifetime": float(last.get("epsilon_lifetime", 0.0)),
        "note": f"{reason} (found: {problem})"[:1000],
    }


def rounds_of(entries: list[LedgerEntry], study_hash: str, run_id: int | None = None) -> list[LedgerEntry]:
    """The DP-SGD rounds recorded for one study (optionally one run of it)."""
    return [
        e for e in entries
        if e.event == "round" and e.study_hash == study_hash and (run_id is None or e.run_id == run_id)
    ]


def studies_of(entries: list[LedgerEntry]) -> list[str]:
    """Study hashes in the order they first appear."""
    return list(dict.fromkeys(e.study_hash for e in entries if e.event == "round"))
