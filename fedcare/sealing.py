"""Encryption at rest for one key holder: X25519 + HKDF-SHA256 + AES-256-GCM.

    sealed = MAGIC | ephemeral X25519 public key (32) | nonce (12) | AES-256-GCM(plain)

The AES key is HKDF-SHA256(X25519(ephemeral, recipient), salt = ephemeral pub | recipient pub,
info = the format's label); the header, followed by the caller's `associated` bytes (e.g. the
file's name inside its run folder, so two sealed files cannot be swapped), is the GCM
associated data. Anyone with the public key can seal; only the private key opens, and any
change to the header, the ciphertext or the associated name is refused.

Two formats use it: the model package encrypted for one site (`export.encryption`) and the
coordinator's run artifacts sealed under its `artifact.key` (`ArtifactKey`: checkpoints and the
server optimizer's state, which hold the global model's weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedcare.errors import FedcareError

ARTIFACT_MAGIC = b"FCSEAL/1\n"
_ARTIFACT_INFO = b"fedcare-run-artifact/1 AES-256-GCM"
ARTIFACT_KEY_ENV = "FEDCARE_ARTIFACT_KEY"  # the coordinator's artifact.key, for the ServerApp it starts


class SealError(FedcareError, ValueError):
    """A sealed file cannot be opened: another key, modified, renamed, or not sealed; one line naming it."""


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aes_key(shared: bytes, ephemeral: bytes, recipient: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=info).derive(shared)


def seal(plain: bytes, recipient, *, magic: bytes, info: bytes, associated: bytes = b"") -> bytes:
    """`plain` encrypted for the holder of the X25519 private key whose public half is `recipient`."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ephemeral = X25519PrivateKey.generate()
    eph_pub = _raw(ephemeral.public_key())
    nonce = os.urandom(12)
    header = magic + eph_pub + nonce
    key = _aes_key(ephemeral.exchange(recipient), eph_pub, _raw(recipient), info)
    return header + AESGCM(key).encrypt(nonce, plain, header + associated)


def is_sealed(data: bytes, magic: bytes) -> bool:
    return data.startswith(magic)


def unseal(data: bytes, private_key, *, magic: bytes, info: bytes, associated: bytes = b"", what: str,
           wrong_key: str) -> bytes:
    """The plaintext of `seal`'s output. `what` names the file in errors; `wrong_key` is the sentence
    for a failed tag (another key, or a modified or renamed file)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    head = len(magic) + 32 + 12
    if not data.startswith(magic) or len(data) < head + 16:
        raise SealError(f"{what}: not sealed in this format")
    header, eph_pub, nonce = data[:head], data[len(magic) : len(magic) + 32], data[head - 12 : head]
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    key = _aes_key(shared, eph_pub, _raw(private_key.public_key()), info)
    try:
        return AESGCM(key).decrypt(nonce, data[head:], header + associated)
    except InvalidTag:
        raise SealError(f"{what}: {wrong_key}") from None


@dataclass(frozen=True)
class ArtifactKey:
    """The coordinator's key for its run artifacts (X25519, `artifact.key` in its kit, 0600)."""

    private_key: object

    @classmethod
    def load(cls, path: str | Path) -> ArtifactKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from fedcare.keys import load_private_key

        return cls(load_private_key(path, X25519PrivateKey, "run artifacts are sealed with an X25519 key"))

    @classmethod
    def from_environment(cls) -> ArtifactKey | None:
        """The key the coordinator handed its ServerApp (`FEDCARE_ARTIFACT_KEY`), or None (a simulation)."""
        path = os.environ.get(ARTIFACT_KEY_ENV)
        return cls.load(path) if path else None

    @property
    def fingerprint(self) -> str:
        import base64
        import hashlib

        digest = hashlib.sha256(_raw(self.private_key.public_key())).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def seal(self, plain: bytes, name: str) -> bytes:
        """`plain` sealed as the file `name` (its path inside the run folder)."""
        return seal(plain, self.private_key.public_key(), magic=ARTIFACT_MAGIC, info=_ARTIFACT_INFO,
                    associated=name.encode("utf-8"))

    def open(self, data: bytes, name: str, *, what: str) -> bytes:
        return unseal(data, self.private_key, magic=ARTIFACT_MAGIC, info=_ARTIFACT_INFO,
                      associated=name.encode("utf-8"), what=what,
                      wrong_key="cannot open: sealed under another coordinator's artifact.key, or modified or renamed")


def ensure_artifact_key(path: str | Path) -> bool:
    """Create the coordinator's `artifact.key` (X25519, PKCS8 PEM, 0600) if missing; True if created now."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from fedcare.files import write_secret
    from fedcare.keys import private_pem

    path = Path(path)
    if path.exists():
        return False
    write_secret(path, private_pem(X25519PrivateKey.generate()))
    return True
