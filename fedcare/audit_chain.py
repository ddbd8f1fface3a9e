"""Hash-chained JSON-lines logs (the service's `serve-audit.jsonl*`, the coordinator's `audit.jsonl`).

Every line ends with a chain member, always the object's last:

    {...the record...,"chain":{"seq":N,"prev":"<MAC of line N-1>",["pruned":{...},]["resumed":"..."],"mac":"<MAC>"}}

`mac` = HMAC-SHA256(chain key, DOMAIN + every byte of the line before the MAC's hex digits),
truncated to 128 bits (32 hex digits; a forger's chance per try is 2^-128, and the line grows by
~107 bytes instead of ~170). The MAC covers the bytes as written, so nothing is re-serialized to
check it: the record, `seq`, `prev` and the optional members. `seq` counts chained lines from 1 over
the life of the log, across rotated files and restarts; the first line has `prev` = GENESIS. So an
edited line fails its MAC, a removed one leaves a gap in `seq`, a moved one comes out of order.

The head (`<log>.head`-like file, 0600) holds the last `seq` and MAC, itself MAC'ed: a log cut at
its tail no longer reaches the head's `seq`. It is one block (HEAD_BLOCK bytes, space-padded)
rewritten in place with a single `pwrite` after each write, under `flock` on the head file, which is
also the lock every writer of the log takes (several services on one kit, threads of one process).
In place rather than by rename: the file never changes inode, so it can be the lock; readers take the
lock, so they never see half of it; overwriting an allocated block needs no free space, so a full disk
fails the log line, not the head; and it is one syscall (see bench/audit_chain.py for the cost).

A writer does not trust a cached "last MAC" blindly: it keeps the log file's (inode, device, size)
as of its own last write and, under the lock, compares it with the file (`sync`); on any difference
(another writer, a rotation, a restart, a truncation) it takes the highest `seq` of its own last line,
the log's last line and the head — so a tail cut while the service was down still shows as a gap. A
head that is missing or fails its MAC while chained lines exist is not silently rebuilt: the next
line says so (`"resumed":"head missing"`), which verification reports.

Deleting old files is the owner's right (the disk cap): before deleting, the writer records in the
head the last `seq` and MAC of what it deletes (`pruned`), and the next line carries that record in
its chain member. Verification accepts a log whose oldest line links to such a record ("pruned by
the cap at T"), and nothing else, so deleting more than the cap did is still "removed".
`fedcare.audit_verify` checks a log; this module writes one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fedcare.errors import FedcareError

GENESIS = "0" * 32
DOMAIN_LINE = b"fedcare audit chain v1: line\n"
DOMAIN_HEAD = b"fedcare audit chain v1: head\n"
HEAD_BLOCK = 1024
MAX_PRUNED_NAMES = 16
_CHAIN = b'"chain":{'
_MAC_END = b'"}}'  # the line's last bytes after the MAC's hex digits
_TAIL = 32 + len(_MAC_END)  # the MAC's hex digits and what follows them


class AuditChainError(FedcareError, RuntimeError):
    """An audit log failed verification (or cannot be verified); the message names the file and line."""

    exit_code = 3  # like a tampered privacy ledger


@dataclass(frozen=True)
class Link:
    """A chained line's place in the chain."""

    seq: int
    mac: str
    prev: str = GENESIS
    chain: dict | None = None  # the whole chain member (with `pruned` / `resumed` when present)


UNCHAINED = "unchained"  # a line written before chaining (no chain member)


def read_chain_key(key_path: Path, what: str) -> bytes | None:
    """A chain key file's bytes (refused if group or others may read it), None if it is missing.
    `what` names the key in the error, e.g. "the audit key"."""
    from fedcare.errors import KeyMaterialError
    from fedcare.files import check_private_permissions

    if not key_path.exists():
        return None
    try:
        check_private_permissions(key_path)
    except KeyMaterialError as err:
        raise AuditChainError(f"{err.line} ({what})") from None
    return key_path.read_bytes()


def derive_key(secret: bytes, label: bytes) -> bytes:
    """HKDF-Expand (RFC 5869) of a uniformly random secret to one 32-byte key for `label`:
    HMAC-SHA256(secret, label || 0x01). Distinct labels give independent keys."""
    return hmac.new(secret, label + b"\x01", hashlib.sha256).digest()


def mac_hex(key: bytes, domain: bytes, data: bytes) -> str:
    return hmac.digest(key, domain + data, "sha256")[:16].hex()


class Mac:
    """`mac_hex` under one key with HMAC's inner and outer pads hashed once (RFC 2104 computed with
    precomputed key blocks: the same MAC, ~2x faster per line than `hmac.digest` with its key setup)."""

    def __init__(self, key: bytes) -> None:
        block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def hex(self, domain: bytes, data: bytes) -> str:
        inner = self._inner.copy()
        inner.update(domain)
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:16].hex()


def _is_hex(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def parse_chained(line: bytes) -> tuple[bytes, dict] | None:
    """A line (without its newline) -> (the bytes its MAC covers, its chain member), or None when it
    has no chain member. Raises ValueError for a chain member that is not well formed."""
    if not line.endswith(_MAC_END):
        return None
    at = line.rfind(_CHAIN)
    if at <= 0 or line[at - 1:at] not in (b",", b"{"):
        return None
    try:
        chain = orjson.loads(line[at + len(_CHAIN) - 1:-1])
    except orjson.JSONDecodeError:
        raise ValueError("its chain field is not valid JSON") from None
    if not isinstance(chain, dict) or not isinstance(chain.get("seq"), int) or chain["seq"] < 1 \
            or not _is_hex(chain.get("prev")) or not _is_hex(chain.get("mac")) or list(chain)[-1] != "mac":
        raise ValueError("its chain field is not a chain field (seq, prev, mac)")
    return line[:-_TAIL], chain


def link_of(line: bytes | None) -> Link | str | None:
    """The chain position a line states (not verified), UNCHAINED, or None (no line, or garbled)."""
    if not line:
        return None
    try:
        parsed = parse_chained(line)
    except ValueError:
        return None
    if parsed is None:
        return UNCHAINED
    chain = parsed[1]
    return Link(chain["seq"], chain["mac"], chain["prev"], chain)


def last_line(path: Path) -> bytes | None:
    """The last complete line of a file (without its newline), None if empty or missing."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            chunk = 8192
            while size:
                start = max(0, size - chunk)
                f.seek(start)
                data = f.read(size - start).rstrip(b"\n")
                cut = data.rfind(b"\n")
                if cut >= 0 or start == 0:
                    return data[cut + 1:] or None
                chunk *= 4
    except FileNotFoundError:
        pass
    return None


def first_line(path: Path) -> bytes | None:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        return f.readline().rstrip(b"\n") or None
    return None


def tail_link(newest_first: Callable[[], list[Path]]) -> Link | str | None:
    """The chain position of the log's last line: the last line of the newest non-empty file."""
    for path in newest_first():
        line = last_line(path)
        if line is not None:
            return link_of(line)
    return None


def prune_record(doomed_oldest_first: list[Path], at: str) -> dict:
    """What deleting these files (oldest first) removes from the chain, stated before they go."""
    first = next((lk for lk in (link_of(first_line(p)) for p in doomed_oldest_first) if isinstance(lk, Link)), None)
    last = next((lk for lk in (link_of(last_line(p)) for p in reversed(doomed_oldest_first)) if isinstance(lk, Link)),
                None)
    return {"at": at, "count": len(doomed_oldest_first), "files": [p.name for p in doomed_oldest_first][-MAX_PRUNED_NAMES:],
            "first": first.seq if first else None, "last": last.seq if last else None, "mac": last.mac if last else None}


def merge_pruned(old: dict | None, new: dict) -> dict:
    if not old:
        return new
    merged = {**new, "count": old["count"] + new["count"], "files": (old["files"] + new["files"])[-MAX_PRUNED_NAMES:],
              "first": old["first"] if old["first"] is not None else new["first"]}
    if new["last"] is None:
        merged["last"], merged["mac"] = old["last"], old["mac"]
    return merged


@dataclass(frozen=True)
class Head:
    seq: int
    mac: str
    pruned: dict | None


def read_head(key: bytes, data: bytes) -> Head | str | None:
    """The head's content -> Head, a problem ("altered", "unreadable"), or None (empty: never written)."""
    data = data.rstrip(b" \n\x00")
    if not data:
        return None
    if not data.endswith(b'"}') or len(data) < 34:
        return "unreadable"
    if not hmac.compare_digest(data[-34:-2].decode("ascii", "replace"), mac_hex(key, DOMAIN_HEAD, data[:-34])):
        return "altered"
    try:
        head = orjson.loads(data)
        return Head(int(head["seq"]), str(head["mac"]), head.get("pruned"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return "unreadable"


class ChainWriter:
    """Seals lines into one log's chain; every method but `locked` must run inside `locked()`.

    `newest_first()` lists the log's files newest first (for the last line after a restart or another
    writer's write). The caller's protocol per write: `with w.locked(): w.sync(fp); data = w.seal(lines);
    <write data>; w.commit(fp_after)` where `fp` is the log file's (inode, device, size) or None."""

    def __init__(self, key: bytes, head_path: Path, newest_first: Callable[[], list[Path]], *,
                 durable: bool = False) -> None:
        self._key = key
        self._mac = Mac(key)
        self.head_path = Path(head_path)
        self._newest_first = newest_first
        self._durable = durable  # fsync the head after each write (the coordinator's rare actions)
        self._fd = -1
        self._head_len = HEAD_BLOCK
        self._thread = threading.Lock()
        self.seq, self.mac = 0, GENESIS
        self.pending: dict | None = None  # pruned files not yet stated by a line (also in the head)
        self._resumed: str | None = None  # why the chain continues without a trustworthy head
        self._known: tuple | None = None  # the log file as of our last commit
        self._next: tuple[int, str] | None = None

    def acquire(self) -> None:
        """Take the lock (this process's threads, then flock on the head); `release` gives it back."""
        self._thread.acquire()
        try:
            if self._fd < 0:
                fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                    self._head_len = max(HEAD_BLOCK, os.fstat(fd).st_size)
                except OSError:
                    os.close(fd)
                    raise
                self._fd = fd
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            self._thread.release()

    @contextlib.contextmanager
    def locked(self) -> Iterator[ChainWriter]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def close(self) -> None:
        with self._thread:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1

    def sync(self, fingerprint: tuple | None = None) -> None:
        """Make (seq, mac) the chain's last link: trusted from our last commit if the log file is as we
        left it, else recovered from the log's last line, the head and our own last line (the highest)."""
        if fingerprint is not None and fingerprint == self._known:
            return
        head = read_head(self._key, os.pread(self._fd, max(self._head_len, HEAD_BLOCK), 0))
        tail = tail_link(self._newest_first)
        candidates = [(self.seq, self.mac)] if self._known is not None or self.seq else []
        if isinstance(tail, Link):
            candidates.append((tail.seq, tail.mac))
        if isinstance(head, Head):
            candidates.append((head.seq, head.mac))
            self.pending = head.pruned
        elif candidates and max(candidates)[0] > 0:  # chained lines exist, yet no head vouches for the end
            self._resumed = self._resumed or f"head {'missing' if head is None else head}"
        self.seq, self.mac = max(candidates, default=(0, GENESIS))
        self._known = None

    def sealed_size(self, data: bytes) -> int:
        """len(seal(data)) without the `pruned` / `resumed` members (for the rotation decision)."""
        n = data.count(b"\n")
        if n == 1:
            return len(data) + 100 + len(str(self.seq + 1))
        return len(data) + n * 100 + sum(len(str(self.seq + i + 1)) for i in range(n))

    def seal(self, data: bytes) -> bytes:
        """JSON-object lines (each ending with b'}\\n') -> the same lines with their chain members."""
        out, seq, prev = [], self.seq, self.mac
        for line in data.splitlines():
            if not (line.startswith(b"{") and line.endswith(b"}")):
                raise ValueError("an audit line must be one JSON object")
            seq += 1
            extra = b""
            if not out and self.pending:
                extra += b'"pruned":' + orjson.dumps(self.pending, option=orjson.OPT_SORT_KEYS) + b","
            if not out and self._resumed:
                extra += b'"resumed":' + orjson.dumps(self._resumed) + b","
            signed = b"%s%s\"chain\":{\"seq\":%d,\"prev\":\"%s\",%s\"mac\":\"" % (
                line[:-1], b"," if len(line) > 2 else b"", seq, prev.encode(), extra)
            prev = self._mac.hex(DOMAIN_LINE, signed)
            out.append(signed + prev.encode() + b'"}}\n')
        self._next = (seq, prev)
        return b"".join(out)

    def commit(self, fingerprint: tuple | None = None) -> None:
        """The sealed lines are in the log: advance, then rewrite the head."""
        if self._next is None:
            return
        (self.seq, self.mac), self._next = self._next, None
        self.pending, self._resumed, self._known = None, None, None
        self._write_head()
        self._known = fingerprint

    def rollback(self) -> None:
        self._next = None

    def pruned(self, record: dict) -> None:
        """Files are about to be deleted by the cap: state it in the head now, in the next line later."""
        self.pending = merge_pruned(self.pending, record)
        self._write_head()

    def _write_head(self) -> None:
        pruned = orjson.dumps(self.pending, option=orjson.OPT_SORT_KEYS) if self.pending else b"null"
        signed = b'{"v":1,"seq":%d,"mac":"%s","pruned":%s,"head_mac":"' % (self.seq, self.mac.encode(), pruned)
        data = signed + self._mac.hex(DOMAIN_HEAD, signed).encode() + b'"}'
        data = data.ljust(self._head_len - 1) + b"\n"
        os.pwrite(self._fd, data, 0)
        self._head_len = max(self._head_len, len(data))
        if self._durable:
            os.fsync(self._fd)


def file_fingerprint(st: os.stat_result, size: int | None = None) -> tuple[int, int, int]:
    return (st.st_ino, st.st_dev, st.st_size if size is None else size)
