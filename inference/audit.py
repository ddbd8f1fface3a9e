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
import fcntl
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

from fedcare.errors import FedcareError, KeyMaterialError
from fedcare.files import check_private_permissions, write_secret

AUDIT_FILE = "serve-audit.jsonl"
AUDIT_KEY = "audit.key"
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings or AuditSettings()
        self._key = key
        self._clock = clock
        self._fd = -1
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
        try:
            self._open()
            self._enforce_cap()
        except OSError as err:
            raise AuditConfigError(f"audit log {self.path}: cannot be opened for writing ({_strerror(err)})") from None

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
        try:
            if self._fd < 0 or self._size + len(data) > self.settings.max_bytes or now >= self._rotate_at:
                self._rotate_or_follow(now, len(data))
            self._write_all(data)
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
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._size = fd, size
        self._rotate_at = self._first_time(size) + self.settings.max_age

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

    def _rotate_or_follow(self, now: float, incoming: int) -> None:
        """Rotate the current file if it is full or old, under flock; follow another service's rotation."""
        if self._fd < 0:
            self._open()
        for _ in range(3):
            if not self._due(now, incoming):
                return
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                    followed = True  # another service on this kit rotated (or the file was moved away)
                else:
                    followed = False
                    self._size = mine.st_size
                    if self._size == 0:  # nothing to rotate: restart its age
                        self._rotate_at = now + self.settings.max_age
                        return
                    if not self._due(now, incoming):
                        return
                    self._shift()
                    self.rotations += 1
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            self._open()  # the new current file (ours or the other service's)
            if not followed:
                self._enforce_cap()
                return

    def rotated_files(self) -> list[Path]:
        """serve-audit.jsonl.1, .2, ... that exist, newest first."""
        found = []
        prefix = self.path.name + "."
        for entry in os.scandir(self.path.parent):
            suffix = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
            if suffix.isdigit() and not suffix.startswith("0"):
                found.append((int(suffix), Path(entry.path)))
        return [p for _, p in sorted(found)]

    def _shift(self) -> None:
        keep = self.settings.keep
        for path in self.rotated_files()[::-1]:
            n = int(path.name.rsplit(".", 1)[1])
            if n >= keep:
                path.unlink(missing_ok=True)
                self.deleted += 1
            else:
                os.replace(path, path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _enforce_cap(self) -> None:
        """Delete rotated files beyond `keep`, then the oldest ones while the current file's room
        (`max_bytes`) plus the rotated files would pass `max_total_bytes`."""
        budget = self.settings.max_total_bytes - self.settings.max_bytes
        total, over = 0, False
        for i, path in enumerate(self.rotated_files()):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            over = over or i >= self.settings.keep or total + size > budget
            if over:
                path.unlink(missing_ok=True)
                self.deleted += 1
            else:
                total += size

    def disk_bytes(self) -> int:
        """The current file and the rotated ones, in bytes (for /metrics)."""
        total = 0
        for path in (self.path, *self.rotated_files()):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total
