"""The keys of model packages (docs/PACKAGE.md): Ed25519 signing at the coordinator, and the
optional X25519 key a hospital holds to decrypt packages encrypted at rest for it.

Keys are files: private halves 0600 (`fedcare.files.write_secret`), never printed or logged;
what is printed is a fingerprint.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcare.errors import KeyMaterialError
from fedcare.files import check_private_permissions, write_public, write_secret
from fedcare.keys import load_private_key

PACKAGE_KEY = "package.key"  # optional, hospital: X25519, decrypts packages encrypted for this site
PACKAGE_PUB = "package.pub"


def _public_pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_key(path: Path, kind: type, wrong_kind: str):
    """A PKCS8 PEM private key of `kind` from `path` (0600; passphrase-protected or not: `fedcare.keys`)."""
    return load_private_key(path, kind, wrong_kind)


def signing_key_pair() -> tuple[bytes, bytes]:
    """(Ed25519 private key as PKCS8 PEM, public key as SubjectPublicKeyInfo PEM) for signing model packages."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def signing_fingerprint(public_key: Ed25519PublicKey) -> str:
    """`SHA256:<base64, unpadded>` of the raw 32-byte Ed25519 public key; safe to print and compare by eye."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def load_signing_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (`signing.pub` or `coordinator-signing.pub`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: signing public key not found") from None
    if b"PRIVATE" in data:
        raise KeyMaterialError(f"{path}: this is a private key; give the public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise KeyMaterialError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"{path}: package signing needs an Ed25519 key, got {type(key).__name__}")
    return key


def load_signing_key(key_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """The coordinator's package signing key (0600 enforced), checked against its public half if present."""
    check_private_permissions(key_path)
    key = _private_key(key_path, Ed25519PrivateKey, "package signing needs an Ed25519 key")
    if public_path.exists():
        public = load_signing_public_key(public_path)
        if signing_fingerprint(public) != signing_fingerprint(key.public_key()):
            raise KeyMaterialError(f"{public_path}: does not match {key_path}")
    return key


def ensure_signing_key(key_path: Path, public_path: Path) -> bool:
    """Create the coordinator's signing key (0600) and its public half if the kit predates them.
    Returns True when it created them (hospitals then need the public half as `coordinator-signing.pub`)."""
    if key_path.exists():
        if not public_path.exists():  # the public half is derived, never a new identity
            write_public(public_path, _public_pem(load_signing_key(key_path, public_path).public_key()))
        return False
    if public_path.exists():
        raise KeyMaterialError(f"{key_path}: missing, but {public_path} exists; restore the private key from "
                               f"a backup (a new key would not match what the hospitals hold)")
    private, public = signing_key_pair()
    write_secret(key_path, private)
    write_public(public_path, public)
    return True


def ensure_package_key(kit_dir: Path) -> bool:
    """Optional: a hospital's X25519 `package.key` (0600) and `package.pub` in its kit folder, for model
    packages encrypted at rest for this site (`encrypt_package`). Created at the hospital; True if created now."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private_path, public_path = Path(kit_dir) / PACKAGE_KEY, Path(kit_dir) / PACKAGE_PUB
    if private_path.exists():
        return False
    key = X25519PrivateKey.generate()
    write_secret(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    write_public(public_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return True


def load_package_key(kit_dir: Path):
    """A hospital's X25519 package decryption key from its kit folder (0600 enforced)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    path = Path(kit_dir) / PACKAGE_KEY
    check_private_permissions(path)
    return _private_key(path, X25519PrivateKey, "package decryption needs an X25519 key")


def load_package_public_key(path: str | Path):
    """A site's X25519 `package.pub` (PEM), to encrypt a package for that site."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: public key not found") from None
    except (ValueError, TypeError) as err:
        raise KeyMaterialError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(key, X25519PublicKey):
        raise KeyMaterialError(f"{path}: package encryption needs an X25519 key, got {type(key).__name__}")
    return key
