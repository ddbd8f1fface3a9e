"""API tokens of the prediction service.

`fedcare serve token add` prints a new random token once (`secrets.token_urlsafe(32)`, 256 bits);
`<state>/serve-tokens.json` (mode 0600) keeps only its SHA-256 with the token's name, scopes and
creation time. A 256-bit random token needs no slow hash: SHA-256 is preimage-resistant and the
hash alone authorizes nothing. The running service re-reads the file whenever it changes, so
`token revoke` takes effect on the next request. Comparison is constant-time against every
stored hash (no early exit on a match).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedcare.errors import FedcareError

TOKENS_FILE = "serve-tokens.json"
FORMAT = "fedcare-serve-tokens/1"
SCOPES = ("analyze", "models")
DEFAULT_SCOPES = ("analyze",)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class TokenError(FedcareError, ValueError):
    """The token file or a token command is invalid (one line)."""


@dataclass(frozen=True)
class TokenEntry:
    name: str
    digest: bytes
    scopes: frozenset[str]
    created: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _parse(path: Path, text: str) -> list[TokenEntry]:
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise TokenError(f"{path}: not a {FORMAT} file")
        entries = []
        for item in raw["tokens"]:
            algorithm, _, hexdigest = item["hash"].partition(":")
            if algorithm != "sha256" or len(hexdigest) != 64:
                raise TokenError(f"{path}: token '{item.get('name')}' has an unsupported hash")
            scopes = frozenset(item["scopes"])
            if not scopes <= set(SCOPES):
                raise TokenError(f"{path}: token '{item['name']}' has unknown scopes")
            entries.append(TokenEntry(str(item["name"]), bytes.fromhex(hexdigest), scopes, str(item.get("created", ""))))
        return entries
    except TokenError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TokenError(f"{path}: unreadable token file; restore it or remove it and add tokens again") from None


def read_tokens(state_dir: Path) -> list[TokenEntry]:
    path = Path(state_dir) / TOKENS_FILE
    try:
        return _parse(path, path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []


def _render(entries: list[TokenEntry]) -> bytes:
    doc = {
        "format": FORMAT,
        "note": "SHA-256 hashes of API tokens; the tokens themselves are shown once by `fedcare serve token add`",
        "tokens": [
            {"name": e.name, "hash": "sha256:" + e.digest.hex(), "scopes": sorted(e.scopes), "created": e.created}
            for e in entries
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _write(state_dir: Path, entries: list[TokenEntry]) -> None:
    """Replace the token file atomically; the new file is created 0600, never widened."""
    path = Path(state_dir) / TOKENS_FILE
    tmp = path.with_name(f".{TOKENS_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_render(entries))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(state_dir) / ".serve-tokens.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_token(state_dir: Path, name: str, scopes: list[str] | None) -> tuple[str, TokenEntry]:
    """(the new token, its stored entry). The token is returned once and never stored."""
    if not NAME.match(name):
        raise TokenError(f"--name '{name}': use letters, digits, '.', '_' and '-' (at most 63 characters)")
    chosen = sorted(set(scopes or DEFAULT_SCOPES))
    for scope in chosen:
        if scope not in SCOPES:
            raise TokenError(f"--scope '{scope}': choose from {', '.join(SCOPES)}")
    with _locked(state_dir):
        entries = read_tokens(state_dir)
        if any(e.name == name for e in entries):
            raise TokenError(f"--name: a token named '{name}' exists; revoke it first (`fedcare serve token revoke --name {name}`)")
        token = secrets.token_urlsafe(32)
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        entry = TokenEntry(name, _digest(token), frozenset(chosen), created)
        _write(state_dir, entries + [entry])
    return token, entry


def revoke_token(state_dir: Path, name: str) -> None:
    with _locked(state_dir):
        entries = read_tokens(state_dir)
        kept = [e for e in entries if e.name != name]
        if len(kept) == len(entries):
            raise TokenError(f"--name: no token named '{name}' (see `fedcare serve token list`)")
        _write(state_dir, kept)


class TokenStore:
    """The service's view of the token file, re-read whenever the file changes (revocation is immediate)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / TOKENS_FILE
        self._signature: tuple[int, int, int] | None = None
        self._entries: list[TokenEntry] = []
        self._broken = False
        self.reload()

    def reload(self) -> None:
        """Load the file; a file that became unreadable while serving denies every token (fails closed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._signature, self._entries, self._broken = None, [], False
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return
        try:
            self._entries = _parse(self.path, self.path.read_text(encoding="utf-8"))
            self._broken = False
        except (TokenError, OSError):
            self._entries, self._broken = [], True
        self._signature = signature

    @property
    def count(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> TokenEntry | None:
        self.reload()
        digest = _digest(token)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found
