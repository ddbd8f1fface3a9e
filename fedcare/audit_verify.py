"""Verification of a hash-chained log (`fedcare.audit_chain`): every file oldest to newest, every line.

`verify_chain` takes a snapshot under the writers' lock (opens every file and notes its size, reads
the head), releases the lock at once (a service keeps writing meanwhile) and then checks, reading
only what was there at the snapshot:

- every chained line's MAC (else: "edited", or "inserted" when the lines around it link to each other);
- that `seq` goes up by one and `prev` is the MAC of the line before, across files (else "removed",
  "reordered", or "does not link");
- that no unchained line follows a chained one (unchained lines before the first chained one are the
  log as it was written before chaining, and are counted, not trusted);
- that the first chained line is seq 1, or links to a deletion by the cap that a later chained line
  or the head records ("pruned by the cap at T"); any other missing start is "removed";
- the head: present once chained lines exist, its MAC, and that the log reaches its `seq` and the
  line there has its MAC ("truncated" when the log ends earlier). The head may lag by a few lines
  (a crash between a line and its head); more than MAX_HEAD_LAG lines is an older head put back.

The first problem raises `AuditChainError` with one line: `<file>:<line>: <what is wrong>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from fedcare.audit_chain import DOMAIN_LINE, GENESIS, AuditChainError, Head, Mac, parse_chained, read_head

MAX_HEAD_LAG = 8


@dataclass
class ChainReport:
    """What a verified log holds."""

    name: str
    files: int = 0
    lines: int = 0
    chained: int = 0
    unchained: int = 0  # lines before the chain started
    chain_start: str | None = None  # file:line of the first chained line
    first_time: str | None = None
    last_time: str | None = None
    last_seq: int = 0
    pruned: dict | None = None  # the deletion by the cap the oldest line links to
    pruned_where: str | None = None
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"{self.name}: OK: {self.files} file{'s' * (self.files != 1)}, {self.lines} lines"
        text += f" ({self.chained} chained, seq {self.last_seq - self.chained + 1}..{self.last_seq})" if self.chained \
            else " (none chained)"
        if self.lines:
            text += f", {self.first_time} to {self.last_time}"
        if self.unchained:
            text += (f"; {self.unchained} unchained line{'s' * (self.unchained != 1)} before the chain started at {self.chain_start}"
                     if self.chain_start else f"; {self.unchained} unchained line{'s' * (self.unchained != 1)}: the chain has not started")
        if self.pruned:
            p = self.pruned
            seqs = f", seq {p['first']}..{p['last']}" if p.get("first") else f" up to seq {p['last']}"
            files = f"{p['count']} file{'s' * (p['count'] != 1)}"
            text += f"; older lines pruned by the cap at {p['at']} ({files}{seqs}; recorded at {self.pruned_where})"
        return text + "".join(f"; {n}" for n in self.notes)


def _time(line: bytes) -> str | None:
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        value = orjson.loads(line).get("time")
        return str(value) if value is not None else None
    return None


class _Snapshot:
    """The files as they were under the lock: open descriptors and sizes (renames and deletions by a
    running service after the snapshot do not change what is read)."""

    def __init__(self, files: Callable[[], list[Path]], head_path: Path) -> None:
        self.files: list[tuple[Path, int, int]] = []
        self.head: bytes | None = None
        lock = -1
        with contextlib.suppress(OSError):
            lock = os.open(head_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if lock >= 0:
                with contextlib.suppress(OSError):
                    fcntl.flock(lock, fcntl.LOCK_SH)
                self.head = os.pread(lock, 1 << 16, 0)
            for path in files():
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    self.files.append((path, fd, os.fstat(fd).st_size))
        finally:
            if lock >= 0:
                os.close(lock)

    def read(self, index: int) -> list[bytes]:
        path, fd, size = self.files[index]
        data = os.pread(fd, size, 0) if size else b""
        while len(data) < size:
            more = os.pread(fd, size - len(data), len(data))
            if not more:
                break
            data += more
        if data and not data.endswith(b"\n"):
            lines = data.split(b"\n")
            raise AuditChainError(f"{path}:{len(lines)}: truncated: the last line is cut off")
        return data.split(b"\n")[:-1] if data else []

    def lines(self, start: int = 0) -> Iterator[tuple[Path, int, bytes]]:
        for index in range(start, len(self.files)):
            path = self.files[index][0]
            for number, line in enumerate(self.read(index), start=1):
                yield path, number, line

    def find_seq(self, seq: int, after: tuple[int, int]) -> str | None:
        """Where a line that says it is `seq` sits after position (file index, line number)."""
        needle = b'"chain":{"seq":%d,' % seq
        for index in range(after[0], len(self.files)):
            for number, line in enumerate(self.read(index), start=1):
                if (index, number) > after and needle in line:
                    return f"{self.files[index][0]}:{number}"
        return None

    def close(self) -> None:
        for _, fd, _ in self.files:
            with contextlib.suppress(OSError):
                os.close(fd)


def verify_chain(name: str, files: Callable[[], list[Path]], head_path: Path, key: bytes | None,
                 key_path: Path) -> ChainReport:
    """Verify one log: `files()` lists it oldest first (called under the lock). Raises AuditChainError."""
    snap = _Snapshot(files, head_path)
    try:
        return _verify(name, snap, head_path, key, key_path)
    finally:
        snap.close()


def _verify(name: str, snap: _Snapshot, head_path: Path, secret: bytes | None, key_path: Path) -> ChainReport:
    report = ChainReport(name, files=len(snap.files))
    key = Mac(secret) if secret is not None else None
    if not snap.files:
        what = "its head remains" if snap.head and snap.head.strip() else "nothing remains"
        raise AuditChainError(f"{name}: no audit log ({what}): never written, or deleted")
    index_of = {p: i for i, (p, _, _) in enumerate(snap.files)}
    expect, last_mac, start = 0, GENESIS, None  # start: (where, seq, prev) of the first chained line
    records: list[tuple[dict, str]] = []  # pruned records stated by chained lines
    recent: dict[int, tuple[str, str]] = {}  # seq -> (mac, where) of the last lines
    last_where, last_line = "", b""
    stream = snap.lines()
    pending = next(stream, None)
    while pending is not None:
        path, number, line = pending
        pending = next(stream, None)
        where = f"{path}:{number}"
        report.lines += 1
        if report.first_time is None:
            report.first_time = _time(line)
        last_where, last_line = where, line
        try:
            parsed = parse_chained(line)
        except ValueError as err:
            raise AuditChainError(f"{where}: edited: {err}") from None
        if parsed is None:
            if start is not None:
                raise AuditChainError(f"{where}: inserted or edited: a line without a chain field after the chain "
                                      f"started at {start[0]}")
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                raise AuditChainError(f"{where}: edited: not a JSON line") from None
            report.unchained += 1
            continue
        if key is None:
            raise AuditChainError(f"{key_path}: key missing: the chain of {name} cannot be verified without it")
        signed, chain = parsed
        seq, prev, mac = chain["seq"], chain["prev"], chain["mac"]
        if not hmac.compare_digest(mac, key.hex(DOMAIN_LINE, signed)):
            if start is not None and pending is not None and _links(key, pending[2], expect, last_mac):
                raise AuditChainError(f"{where}: inserted: this line is not in the chain (its MAC does not match) "
                                      f"and the lines before and after it link to each other")
            raise AuditChainError(f"{where}: edited: the line does not match its MAC (seq {seq})")
        if start is None:
            start = (where, seq, prev)
            report.chain_start = where
        elif seq > expect:
            found = snap.find_seq(expect, (index_of[path], number))
            if found:
                raise AuditChainError(f"{where}: reordered: holds seq {seq} where seq {expect} was expected; "
                                      f"seq {expect} is at {found}")
            gap = f"1 line (seq {expect})" if seq - expect == 1 else f"{seq - expect} lines (seq {expect}..{seq - 1})"
            hint = " at the start of this file: a whole file, or the end of the one before, was deleted" \
                if number == 1 else ""
            raise AuditChainError(f"{where}: removed: {gap} missing before this line{hint}")
        elif seq < expect:
            raise AuditChainError(f"{where}: reordered: seq {seq} comes after seq {expect - 1} "
                                  f"(moved, or a copy of an earlier line)")
        elif prev != last_mac:
            raise AuditChainError(f"{where}: does not link to the line before it (seq {seq}): that line was replaced")
        if "pruned" in chain:
            records.append((chain["pruned"], where))
        if "resumed" in chain:
            raise AuditChainError(f"{where}: the chain was resumed here with its {chain['resumed']}: lines at the "
                                  f"tail before it (after seq {seq - 1}) may have been removed")
        expect, last_mac = seq + 1, mac
        recent[seq] = (mac, where)
        recent.pop(seq - MAX_HEAD_LAG - 1, None)
        report.chained += 1
        report.last_seq = seq
    report.last_time = _time(last_line) if report.lines else None
    head = read_head(secret, snap.head or b"") if secret is not None else None
    if isinstance(head, Head) and head.pruned:
        records.append((head.pruned, f"{head_path}"))
    if start is not None:
        _check_start(report, start, records)
    _check_head(report, head, head_path, recent, last_where)
    return report


def _links(key: Mac, line: bytes, seq: int, prev: str) -> bool:
    """Is `line` the genuine line `seq` after the line whose MAC is `prev`?"""
    try:
        parsed = parse_chained(line)
    except ValueError:
        return False
    if parsed is None:
        return False
    signed, chain = parsed
    return chain["seq"] == seq and chain["prev"] == prev and hmac.compare_digest(chain["mac"],
                                                                                key.hex(DOMAIN_LINE, signed))


def _check_start(report: ChainReport, start: tuple[str, int, str], records: list[tuple[dict, str]]) -> None:
    where, seq, prev = start
    if seq == 1 and prev == GENESIS:
        return
    for record, stated in reversed(records):
        if record.get("last") == seq - 1 and record.get("mac") == prev:
            report.pruned, report.pruned_where = record, stated
            return
    raise AuditChainError(f"{where}: removed: the chain starts at seq {seq}; seq 1..{seq - 1} are missing and no "
                          f"deletion by the cap records them")


def _check_head(report: ChainReport, head: Head | str | None, head_path: Path,
                recent: dict[int, tuple[str, str]], last_where: str) -> None:
    if head is None:
        if report.chained:
            raise AuditChainError(f"{head_path}: head missing: the log holds {report.chained} chained lines but no "
                                  f"head (deleted?), so a truncated tail cannot be ruled out")
        return
    if isinstance(head, str):
        raise AuditChainError(f"{head_path}: head {head}: " + ("its MAC does not match" if head == "altered"
                                                               else "not a head record"))
    if head.seq == 0:  # files pruned before any line was chained
        return
    if head.seq > report.last_seq:
        if not report.chained:
            raise AuditChainError(f"{head_path}: removed: the head records seq {head.seq} but the log holds no "
                                  f"chained line")
        missing = head.seq - report.last_seq
        raise AuditChainError(f"{last_where}: truncated: the log ends at seq {report.last_seq} but its head records "
                              f"seq {head.seq}: {missing} line{'s' * (missing != 1)} removed at the tail")
    if report.last_seq - head.seq > MAX_HEAD_LAG or head.seq not in recent:
        raise AuditChainError(f"{head_path}: head replaced: it records seq {head.seq} but the log goes on to seq "
                              f"{report.last_seq} (an older head put back?)")
    mac, where = recent[head.seq]
    if mac != head.mac:
        raise AuditChainError(f"{head_path}: head replaced: its last MAC is not that of {where} (seq {head.seq})")
    if head.seq < report.last_seq:
        report.notes.append(f"the head is {report.last_seq - head.seq} line(s) behind (a write was interrupted)")
