"""The service's audit log: JSON lines in `<state>/serve-audit.jsonl` (0600), rotated and capped.

Each request line holds the time, the token's name (never the token), the endpoint, method, status,
model, latency, the client address, a short reason for a refusal (and which study feature it
concerns), and the patient id pseudonymized as HMAC-SHA256 under a per-kit secret
(`<state>/audit.key`, 32 random bytes, 0600). The raw patient id, the feature values and the
request body are never written. With the key, the site can still answer "which requests
concerned patient X" (compute the HMAC of X); without it, the log links requests to each other,
not to people.

Bounded storage (`AuditSettings`, `fedcare serve --audit-*` or `FEDCARE_SERVE_AUDIT_*`):
the file is rotated when the next line would take it past `max_bytes` or when its first line is
older than `max_age` (serve-audit.jsonl -> .1 -> ... -> .keep; older ones are deleted), and the
oldest rotated files are deleted while the current file's room plus the rotated files would pass
`max_total_bytes`. Every file is created 0600. Several services on one kit serialize rotation
with flock on the current file and follow each other's renames.

Unauthenticated requests (401) write no line of their own: `unauthenticated` only counts them
(O(1), bounded memory) and at most one aggregated line per `summary_interval` seconds says how
many arrived since when, for which reasons, endpoints and (up to 16) client addresses.

Every line is hash-chained (`fedcare.audit_chain`): it ends with `"chain":{"seq","prev","mac"}`,
an HMAC over its bytes and the previous line's MAC, across rotations, restarts and services; the
head `<state>/serve-audit.head` (0600) holds the last seq and MAC and is the writers' flock. Each
write takes the lock, follows another service's rotation, continues the chain from the file (not
from a per-process cache unless the file is as this process left it), then writes the line and the
head. Files deleted by `keep` or the cap are stated in the chain before they go (`pruned`), so
`fedcare audit verify` (`inference.audit_verify`) tells pruning from removal. The chain key is
derived from `audit.key` (`chain_key`), so there is no second secret to keep.

When a line cannot be written (disk full, file-size limit, I/O error), `write` raises
`AuditUnavailable`; `failure` then holds the reason until a later write succeeds (each request
and each /healthz retries; the first line after the gap is an `audit_resumed` event saying since
when and how many requests were refused). A short write is truncated back, so the file stays
valid JSON lines.
"""

from __future__ import annotations

import calendar
import contextlib
import contextvars
import hashlib
import hmac
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fedcare.audit_chain import ChainWriter, derive_key, prune_record
from fedcare.errors import FedcareError, KeyMaterialError
from fedcare.files import check_private_permissions, write_secret

AUDIT_FILE = "serve-audit.jsonl"
AUDIT_KEY = "audit.key"
AUDIT_HEAD = "serve-audit.head"  # the chain's head, and the lock every writer of the log takes
# HKDF label of the chain key. It starts with 0xFF, which no UTF-8 text contains: no patient id, whose
# pseudonym HMAC(audit.key, id) is written in the log, can make that pseudonym equal the chain key.
CHAIN_LABEL = b"\xfffedcare serve-audit chain key v1"
MAX_CLIENTS_PER_SUMMARY = 16

KIB, MIB, GIB = 1024, 1024**2, 1024**3
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KIB, "m": MIB, "g": GIB}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# Settings given on the command line for the service being built (`fedcare serve --audit-*`); unset: environment.
COMMAND_SETTINGS: contextvars.ContextVar[AuditSettings | None] = contextvars.ContextVar("audit_settings", default=None)


class AuditConfigError(FedcareError, ValueError):
    """An audit-log setting (flag or environment variable) is unusable; the message names it."""


class AuditUnavailable(OSError):
    """The audit line could not be written; `reason` is the operating system's words (e.g. 'No space left on device')."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_size(text: str, name: str) -> int:
    """'65536', '64K', '64M', '2G' (KiB units) -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise AuditConfigError(f"{name}: {text!r} is not a size (bytes, or a number with K, M or G)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]


def parse_age(text: str, name: str) -> float:
    """'3600', '90s', '30m', '24h', '7d' -> seconds."""
    m = _AGE.match(str(text))
    if not m:
        raise AuditConfigError(f"{name}: {text!r} is not a duration (seconds, or a number with s, m, h or d)")
    return float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]


@dataclass(frozen=True)
class AuditSettings:
    """Rotation and the disk cap of the audit log. Defaults: 64 MiB or 24 h per file, 30 rotated files,
    2 GiB in all (~250k requests per file at ~260 bytes a line)."""

    max_bytes: int = 64 * MIB
    max_age: float = 24 * 3600.0
    keep: int = 30
    max_total_bytes: int = 2 * GIB
    summary_interval: float = 1.0  # at most one aggregated line of unauthenticated requests per this many seconds

    ENV = {"max_bytes": "FEDCARE_SERVE_AUDIT_MAX_SIZE", "max_age": "FEDCARE_SERVE_AUDIT_MAX_AGE",
           "keep": "FEDCARE_SERVE_AUDIT_KEEP", "max_total_bytes": "FEDCARE_SERVE_AUDIT_MAX_TOTAL"}
    FLAGS = {"max_bytes": "--audit-max-size", "max_age": "--audit-max-age", "keep": "--audit-keep",
             "max_total_bytes": "--audit-max-total"}

    def __post_init__(self) -> None:
        flags = self.FLAGS
        if self.max_bytes < 4 * KIB:
            raise AuditConfigError(f"{flags['max_bytes']}: {self.max_bytes} bytes is too small (at least 4K)")
        if not 1 <= self.max_age <= 10 * 365 * 86400:
            raise AuditConfigError(f"{flags['max_age']}: {self.max_age:g} s is not between 1 s and 10 years")
        if not 1 <= self.keep <= 10_000:
            raise AuditConfigError(f"{flags['keep']}: {self.keep} is not between 1 and 10000")
        if self.max_total_bytes < 2 * self.max_bytes:
            raise AuditConfigError(f"{flags['max_total_bytes']}: {self.max_total_bytes} bytes is less than twice "
                                   f"{flags['max_bytes']} ({self.max_bytes}); it must hold the current file and one rotated file")

    @classmethod
    def from_values(cls, values: Mapping[str, str | None], names: Mapping[str, str]) -> AuditSettings:
        """Settings from text values (flags or environment; None = default); `names` says what to call each in errors."""
        parsed: dict[str, Any] = {}
        for field, text in values.items():
            if text is None or str(text).strip() == "":
                continue
            name = names[field]
            if field in ("max_bytes", "max_total_bytes"):
                parsed[field] = parse_size(text, name)
            elif field == "max_age":
                parsed[field] = parse_age(text, name)
            else:
                try:
                    parsed[field] = int(str(text).strip())
                except ValueError:
                    raise AuditConfigError(f"{name}: {text!r} is not a whole number") from None
        try:
            return cls(**parsed)
        except AuditConfigError as err:  # name the settings as they were given (flag or variable)
            message = str(err)
            for field, flag in cls.FLAGS.items():
                message = message.replace(flag, names.get(field, flag))
            raise AuditConfigError(message) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuditSettings:
        env = os.environ if env is None else env
        return cls.from_values({f: env.get(v) for f, v in cls.ENV.items()}, cls.ENV)

    @classmethod
    def resolve(cls, flags: Mapping[str, str | None], env: Mapping[str, str] | None = None) -> AuditSettings:
        """Flags over environment variables over defaults."""
        env = os.environ if env is None else env
        values: dict[str, str | None] = {}
        names: dict[str, str] = {}
        for field in cls.ENV:
            if flags.get(field) not in (None, ""):
                values[field], names[field] = flags[field], cls.FLAGS[field]
            else:
                values[field], names[field] = env.get(cls.ENV[field]), cls.ENV[field]
        return cls.from_values(values, names)


def current_settings() -> AuditSettings:
    """The command line's settings if `fedcare serve` set them, else `FEDCARE_SERVE_AUDIT_*`, else the defaults."""
    return COMMAND_SETTINGS.get() or AuditSettings.from_env()


def load_audit_key(state_dir: Path) -> bytes:
    """The kit's pseudonymization key, created on first use (0600; refused if readable by others)."""
    path = Path(state_dir) / AUDIT_KEY
    if not path.exists():
        try:
            write_secret(path, secrets.token_bytes(32))
        except KeyMaterialError:  # another `fedcare serve` on this kit created it a moment ago
            pass
    check_private_permissions(path)
    key = path.read_bytes()
    if len(key) < 32:
        raise KeyMaterialError(f"{path}: too short to be an audit key (expected 32 random bytes)")
    return key


def chain_key(audit_key: bytes) -> bytes:
    """The key of the log's hash chain: HKDF-Expand(audit.key, CHAIN_LABEL). Derived rather than a second
    file: one secret to back up and restore with the log (the site holds audit.key anyway, and whoever
    reads it can read the log); a distinct key, so a MAC is never a pseudonym and knowing the chain key
    reveals nothing of the pseudonym key (HMAC is one-way)."""
    return derive_key(audit_key, CHAIN_LABEL)


def rotated_files(path: Path) -> list[Path]:
    """<log>.1, .2, ... that exist, newest first."""
    found = []
    prefix = path.name + "."
    for entry in os.scandir(path.parent):
        suffix = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if suffix.isdigit() and not suffix.startswith("0"):
            found.append((int(suffix), Path(entry.path)))
    return [p for _, p in sorted(found)]


def pseudonym(key: bytes, patient_id: str) -> str:
    """HMAC-SHA256 of the patient id under the kit's audit key (hex)."""
    return hmac.new(key, patient_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _parse_stamp(text: Any) -> float | None:
    try:
        return calendar.timegm(time.strptime(str(text)[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return None


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else (str(err) or type(err).__name__)


def note(text: str) -> None:
    """A line on stderr that can never fail the caller (stderr may be a full disk too)."""
    with contextlib.suppress(Exception):
        print(f"fedcare serve: {text}", file=sys.stderr, flush=True)


class AuditLog:
    """Append-only JSON lines; each write is one `os.write` on an O_APPEND descriptor (records that
    are due, such as the unauthenticated summary, go in the same write)."""

    def __init__(self, state_dir: Path, key: bytes, settings: AuditSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / AUDIT_FILE
        self._path_str = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings or AuditSettings()
        self._key = key
        self._clock = clock
        self._fd = -1
        self._ino = (0, 0)  # the current file's (inode, device)
        self._size = 0  # bytes in the current file (as of our last look, plus what we wrote since)
        self._rotate_at = 0.0  # when the current file reaches max_age
        # the state /healthz and /metrics report
        self.failure: str | None = None  # why the log cannot be written now (None: it can)
        self.failed_since: float | None = None
        self.write_failures = 0  # failed write attempts, ever
        self.refused = 0  # requests not answered because their line could not be written, ever
        self._refused_in_gap = 0
        self.rotations = 0
        self.deleted = 0
        self.unauthenticated_total: dict[str, int] = {}
        # the pending summary of unauthenticated requests
        self._unauth_count = 0
        self._unauth_first = 0.0
        self._unauth_last = 0.0
        self._unauth_reasons: dict[str, int] = {}
        self._unauth_endpoints: dict[str, int] = {}
        self._unauth_clients: dict[str, int] = {}
        self._summary_written = -float("inf")
        self._last_attempt = -float("inf")
        self._chain = ChainWriter(chain_key(key), self.path.with_name(AUDIT_HEAD),
                                  lambda: [self.path, *self.rotated_files()])
        try:
            with self._chain.locked():
                self._open()
                self._chain.sync()
                self._enforce_cap(self._clock())
        except OSError as err:
            raise AuditConfigError(f"audit log {self.path}: cannot be opened for writing ({_strerror(err)})") from None
        if self._chain.pending:  # smaller limits deleted files: say so in the chain now
            now = self._clock()
            with contextlib.suppress(AuditUnavailable):
                self._append(orjson.dumps({"time": stamp(now), "event": "audit_pruned"},
                                          option=orjson.OPT_APPEND_NEWLINE), now)

    # -- the public API ------------------------------------------------------------------------

    def pseudonym(self, patient_id: str) -> str:
        return pseudonym(self._key, patient_id)

    def write(self, record: dict[str, Any]) -> None:
        """Append one request's line (and whatever else is due). Raises `AuditUnavailable` when it cannot."""
        now = self._clock()
        self._append(orjson.dumps({"time": stamp(now), **record}, option=orjson.OPT_APPEND_NEWLINE), now)

    def refused_request(self) -> None:
        """A request was answered 503 because its line could not be written."""
        self.refused += 1
        self._refused_in_gap += 1

    def unauthenticated(self, endpoint: str, reason: str | None, client: str | None) -> None:
        """Count a 401 (O(1), bounded memory); at most one summary line per `summary_interval` reaches the file."""
        now = self._clock()
        key = reason or "unauthenticated"
        self.unauthenticated_total[key] = self.unauthenticated_total.get(key, 0) + 1
        if self._unauth_count == 0:
            self._unauth_first = now
        self._unauth_count += 1
        self._unauth_last = now
        self._unauth_reasons[key] = self._unauth_reasons.get(key, 0) + 1
        self._unauth_endpoints[endpoint] = self._unauth_endpoints.get(endpoint, 0) + 1
        clients = self._unauth_clients
        name = client or "unknown"
        if name in clients or len(clients) < MAX_CLIENTS_PER_SUMMARY:
            clients[name] = clients.get(name, 0) + 1
        else:
            clients["others"] = clients.get("others", 0) + 1
        self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Write what is due besides request lines (the unauthenticated summary, the `audit_resumed`
        event); never raises. While the log fails, it retries at most once per `summary_interval`."""
        now = self._clock() if now is None else now
        if self.failure is not None:
            due = now - self._last_attempt >= self.settings.summary_interval
        else:
            due = self._unauth_count > 0 and now - self._summary_written >= self.settings.summary_interval
        if due:
            with contextlib.suppress(AuditUnavailable):
                self._append(b"", now)

    def check(self) -> str | None:
        """Why the log cannot be written (None: it can), after `tick` (which retries). For /healthz and /metrics."""
        self.tick()
        return self.failure

    def close(self) -> None:
        with contextlib.suppress(AuditUnavailable):
            self._append(b"", self._clock(), flush=True)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._chain.close()

    # -- lines that are due besides the request's ------------------------------------------------

    def _summary(self, now: float) -> bytes:
        line = orjson.dumps({
            "time": stamp(now), "event": "unauthenticated",
            "count": self._unauth_count, "since": stamp(self._unauth_first), "until": stamp(self._unauth_last),
            "reasons": self._unauth_reasons, "endpoints": self._unauth_endpoints, "clients": self._unauth_clients,
        }, option=orjson.OPT_APPEND_NEWLINE)
        return line

    def _resumed(self, now: float) -> bytes:
        return orjson.dumps({
            "time": stamp(now), "event": "audit_resumed", "failed_since": stamp(self.failed_since or now),
            "reason": self.failure, "refused": self._refused_in_gap,
        }, option=orjson.OPT_APPEND_NEWLINE)

    # -- writing, rotation, failure --------------------------------------------------------------

    def _append(self, line: bytes, now: float, *, flush: bool = False) -> None:
        summary = bool(self._unauth_count) and (flush or now - self._summary_written >= self.settings.summary_interval)
        data = line
        if summary:
            data = self._summary(now) + data
        if self.failure is not None:
            data = self._resumed(now) + data
        if not data:
            return
        self._last_attempt = now
        chain = self._chain
        try:
            chain.acquire()  # the chain continues from the file, under the lock every writer takes
            try:
                chain.sync(self._follow())
                if self._due(now, chain.sealed_size(data)):
                    self._rotate(now)
                sealed = chain.seal(data)
                try:
                    self._write_all(sealed)
                except OSError:
                    chain.rollback()
                    raise
                chain.commit((*self._ino, self._size))
            finally:
                chain.release()
        except OSError as err:
            reason = _strerror(err)
            self.write_failures += 1
            if self.failure is None:
                self.failed_since = now
                self._refused_in_gap = 0
                note(f"error: audit log {self.path} cannot be written ({reason}); answering 503 to every audited "
                     "request until it can (retried with each request and /healthz)")
            self.failure = reason
            raise AuditUnavailable(reason) from None
        if self.failure is not None:
            note(f"audit log {self.path} is writable again after {now - (self.failed_since or now):.1f} s "
                 f"({self._refused_in_gap} requests were refused meanwhile)")
            self.failure, self.failed_since = None, None
        if summary:
            self._summary_written = now
            self._unauth_count = 0
            self._unauth_reasons, self._unauth_endpoints, self._unauth_clients = {}, {}, {}

    def _write_all(self, data: bytes) -> None:
        """One write; a short write (the disk filled mid-line) is truncated back, so no partial line stays."""
        fd = self._fd
        done = os.write(fd, data)
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - done))
            raise
        self._size += done

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._size, self._ino = fd, st.st_size, (st.st_ino, st.st_dev)
        self._rotate_at = self._first_time(st.st_size) + self.settings.max_age

    def _first_time(self, size: int) -> float:
        """When the current file was started: its first line's time (now for an empty file)."""
        if size:
            with contextlib.suppress(OSError, ValueError), open(self.path, "rb") as f:
                first = f.readline(4096)
                with contextlib.suppress(orjson.JSONDecodeError):
                    started = _parse_stamp(orjson.loads(first).get("time"))
                    if started is not None:
                        return started
        return self._clock()

    def _due(self, now: float, incoming: int) -> bool:
        return self._size + incoming > self.settings.max_bytes or now >= self._rotate_at

    def _follow(self) -> tuple[int, int, int]:
        """Under the lock: write to the file at `path` (another service may have rotated ours away).
        Returns its (inode, device, size)."""
        if self._fd >= 0:
            try:
                st = os.stat(self._path_str)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino == self._ino[0] and st.st_dev == self._ino[1]:
                self._size = st.st_size
                return (st.st_ino, st.st_dev, st.st_size)
        self._open()
        return (*self._ino, self._size)

    def _rotate(self, now: float) -> None:
        """Under the lock: rotate the current file (full or old), then apply the cap."""
        if self._size == 0:  # nothing to rotate: restart its age
            self._rotate_at = now + self.settings.max_age
            return
        self._shift(now)
        self.rotations += 1
        self._open()
        self._enforce_cap(now)

    def rotated_files(self) -> list[Path]:
        """serve-audit.jsonl.1, .2, ... that exist, newest first."""
        return rotated_files(self.path)

    def _prune(self, doomed_newest_first: list[Path], now: float) -> None:
        """Delete rotated files, stating first in the chain what they held (allowed deletion, not a hole)."""
        if doomed_newest_first:
            self._chain.pruned(prune_record(doomed_newest_first[::-1], stamp(now)))
        for path in doomed_newest_first:
            path.unlink(missing_ok=True)
            self.deleted += 1

    def _shift(self, now: float) -> None:
        keep = self.settings.keep
        rotated = self.rotated_files()
        self._prune([p for p in rotated if int(p.name.rsplit(".", 1)[1]) >= keep], now)
        for path in rotated[::-1]:
            n = int(path.name.rsplit(".", 1)[1])
            if n < keep:
                os.replace(path, path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _enforce_cap(self, now: float) -> None:
        """Delete rotated files beyond `keep`, then the oldest ones while the current file's room
        (`max_bytes`) plus the rotated files would pass `max_total_bytes`."""
        budget = self.settings.max_total_bytes - self.settings.max_bytes
        total, over, doomed = 0, False, []
        for i, path in enumerate(self.rotated_files()):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            over = over or i >= self.settings.keep or total + size > budget
            if over:
                doomed.append(path)
            else:
                total += size
        self._prune(doomed, now)

    def disk_bytes(self) -> int:
        """The current file and the rotated ones, in bytes (for /metrics)."""
        total = 0
        for path in (self.path, *self.rotated_files()):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total
