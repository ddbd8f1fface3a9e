"""The service's audit log: one JSON line per API request in `<state>/serve-audit.jsonl` (0600).

Each line holds the time, the token's name (never the token), the endpoint, method, status,
model, latency, the client address, a short reason for a refusal (and which study feature it
concerns), and the patient id pseudonymized as HMAC-SHA256 under a per-kit secret
(`<state>/audit.key`, 32 random bytes, 0600). The raw patient id, the feature values and the
request body are never written. With the key, the site can still answer "which requests
concerned patient X" (compute the HMAC of X); without it, the log links requests to each other,
not to people.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any

import orjson

from fedcare.errors import KeyMaterialError
from fedcare.files import check_private_permissions, write_secret

AUDIT_FILE = "serve-audit.jsonl"
AUDIT_KEY = "audit.key"


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


class AuditLog:
    """Append-only JSON lines; each record is one `write` on an O_APPEND descriptor."""

    def __init__(self, state_dir: Path, key: bytes) -> None:
        self.path = Path(state_dir) / AUDIT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.chmod(self.path, 0o600)
        self._key = key

    def pseudonym(self, patient_id: str) -> str:
        return pseudonym(self._key, patient_id)

    def write(self, record: dict[str, Any]) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        os.write(self._fd, orjson.dumps({"time": stamp, **record}, option=orjson.OPT_APPEND_NEWLINE))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
