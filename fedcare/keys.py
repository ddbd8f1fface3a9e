"""Private key files every party reads: 0600 PKCS8 PEM, optionally protected by the kit's passphrase.

A kit's private keys that fedcare itself reads (the coordinator's `signing.key`, `node-ca.key`,
`artifact.key`; a hospital's `package.key`) can be encrypted at rest with a passphrase
(`fedcare kit protect`): the key's PEM sealed with AES-256-GCM under a key derived from the
passphrase by scrypt (N = 2^15, r = 8, p = 1: ~32 MiB and ~0.1 s per key), armoured as

    -----BEGIN FEDCARE PROTECTED KEY-----
    base64(FCKEY/1 | salt (16) | nonce (12) | AES-256-GCM(PEM), header as associated data)
    -----END FEDCARE PROTECTED KEY-----

(Encrypted PKCS8 from the `cryptography` library would be OpenSSL-readable but uses PBKDF2 with
2,048 rounds, too cheap to guess against.) `load_private_key` reads either form; for a protected key the passphrase comes from, in this order:

    FEDCARE_KIT_PASSPHRASE_FILE   a file holding it (a mounted Secret for a service); one trailing newline is dropped
    FEDCARE_KIT_PASSPHRASE        the passphrase itself (for services whose manager injects it)
    a prompt on the terminal      `Passphrase for <kit folder> (unlocks signing.key): ` (never echoed)

With none of them (a service with no terminal), the key is refused in one line saying which
variable to set. A passphrase is read once per process and kit folder, and never logged.
Keys that Flower and nginx read themselves (`server.key`, `node.key`, the node's TLS key) are not
protected this way: those programs take only plain key files (docs in README, "Encryption at rest").
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from fedcare.errors import KeyMaterialError
from fedcare.files import atomic_write_bytes, check_private_permissions

PASSPHRASE_FILE_ENV = "FEDCARE_KIT_PASSPHRASE_FILE"
PASSPHRASE_ENV = "FEDCARE_KIT_PASSPHRASE"
PROTECTED_BEGIN = b"-----BEGIN FEDCARE PROTECTED KEY-----"
PROTECTED_END = b"-----END FEDCARE PROTECTED KEY-----"
_MAGIC = b"FCKEY/1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSPHRASE = 12

_passphrases: dict[Path, bytes] = {}  # kit folder -> the passphrase that opened a key there (this process only)


def is_protected(path: Path) -> bool:
    """True if the key file is passphrase-protected (encrypted PKCS8 PEM)."""
    with Path(path).open("rb") as handle:
        return handle.read(len(PROTECTED_BEGIN)) == PROTECTED_BEGIN


def passphrase_from_environment() -> bytes | None:
    """The passphrase a service was given (`FEDCARE_KIT_PASSPHRASE_FILE`, then `FEDCARE_KIT_PASSPHRASE`), or None."""
    file = os.environ.get(PASSPHRASE_FILE_ENV)
    if file:
        try:
            text = Path(file).read_bytes()
        except OSError as err:
            raise KeyMaterialError(f"{PASSPHRASE_FILE_ENV}: cannot read {file} ({err.strerror})") from None
        return text[:-1] if text.endswith(b"\n") else text
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def _passphrase(path: Path) -> bytes:
    folder = path.parent.resolve()
    if folder in _passphrases:
        return _passphrases[folder]
    given = passphrase_from_environment()
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise KeyMaterialError(f"{path}: protected by the kit's passphrase; set {PASSPHRASE_FILE_ENV} (a file "
                               f"holding it) or {PASSPHRASE_ENV}, or run the command on a terminal")
    return getpass.getpass(f"Passphrase for {folder} (unlocks {path.name}): ").encode("utf-8")


def _kdf(passphrase: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def protect(pem: bytes, passphrase: bytes) -> bytes:
    """A private key's PEM sealed under `passphrase` (the armoured format above)."""
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = os.urandom(16), os.urandom(12)
    header = _MAGIC + salt + nonce
    body = base64.encodebytes(header + AESGCM(_kdf(passphrase, salt)).encrypt(nonce, pem, header))
    return PROTECTED_BEGIN + b"\n" + body + PROTECTED_END + b"\n"


def unprotect(data: bytes, passphrase: bytes, *, what: Path) -> bytes:
    """The PEM inside a protected key file; a wrong passphrase or a damaged file is one line."""
    import base64
    import binascii

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.decodebytes(data.strip().removeprefix(PROTECTED_BEGIN).removesuffix(PROTECTED_END))
    except (binascii.Error, ValueError):
        raw = b""
    head = len(_MAGIC) + 28
    if not raw.startswith(_MAGIC) or len(raw) < head + 16:
        raise KeyMaterialError(f"{what}: a damaged protected key file")
    salt, nonce = raw[len(_MAGIC) : len(_MAGIC) + 16], raw[len(_MAGIC) + 16 : head]
    try:
        return AESGCM(_kdf(passphrase, salt)).decrypt(nonce, raw[head:], raw[:head])
    except InvalidTag:
        raise KeyMaterialError(f"{what}: wrong passphrase (or the key file is damaged)") from None


def unlocked_passphrase(path: str | Path) -> bytes | None:
    """The passphrase that opened a protected key in `path`'s folder in this process, if any: a service
    this process starts (the coordinator's ServerApp) gets it so it can open the kit's keys too."""
    return _passphrases.get(Path(path).parent.resolve())


def load_private_key(path: str | Path, kind: type | tuple[type, ...], wrong_kind: str):
    """The PKCS8 PEM private key of `kind` in `path` (0600 enforced), opened with the kit's passphrase
    if it is protected. Every failure is a one-line `KeyMaterialError` naming the file."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    check_private_permissions(path)
    data = path.read_bytes()
    if data.startswith(PROTECTED_BEGIN):
        passphrase = _passphrase(path)
        data = unprotect(data, passphrase, what=path)
        _passphrases[path.parent.resolve()] = passphrase
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyMaterialError(f"{path}: not a PKCS8 PEM private key ({err})") from None
    if not isinstance(key, kind):
        raise KeyMaterialError(f"{path}: {wrong_kind}, got {type(key).__name__}")
    return key


def private_pem(key) -> bytes:
    """`key` as plain PKCS8 PEM (written 0600 by the caller; `protect` seals it under a passphrase)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


PROTECTABLE = ("signing.key", "node-ca.key", "artifact.key", "package.key")  # what fedcare itself reads


def new_passphrase(*, prompt_for: str) -> bytes:
    """The passphrase to protect keys with: from the environment (as `load_private_key` reads it), else
    asked twice on the terminal. At least MIN_PASSPHRASE characters."""
    given = passphrase_from_environment()
    if given is None:
        if not sys.stdin.isatty():
            raise KeyMaterialError(f"no passphrase: set {PASSPHRASE_FILE_ENV} (a file holding it) or {PASSPHRASE_ENV}, "
                                   f"or run the command on a terminal")
        given = getpass.getpass(f"New passphrase for {prompt_for}: ").encode("utf-8")
        if getpass.getpass("Repeat it: ").encode("utf-8") != given:
            raise KeyMaterialError("the two passphrases differ; nothing was changed")
    if len(given) < MIN_PASSPHRASE:
        raise KeyMaterialError(f"the passphrase is {len(given)} characters; use at least {MIN_PASSPHRASE}")
    return given


def protect_keys(kit_dir: Path, *, unprotect_them: bool = False) -> list[tuple[str, str]]:
    """Seal (or, with `unprotect_them`, open) the kit's PROTECTABLE keys in place under one passphrase.
    Returns (file, what happened) per key found. Every key is read and checked before any is
    rewritten, so a wrong passphrase or a damaged key changes nothing."""
    from cryptography.hazmat.primitives import serialization

    kit_dir = Path(kit_dir)
    found = [kit_dir / name for name in PROTECTABLE if (kit_dir / name).exists()]
    if not found:
        raise KeyMaterialError(f"{kit_dir}: holds none of {', '.join(PROTECTABLE)}; nothing to protect")
    pems = {}
    for path in (p for p in found if is_protected(p) == unprotect_them):
        check_private_permissions(path)
        data = path.read_bytes()
        if unprotect_them:
            passphrase = _passphrase(path)
            data = unprotect(data, passphrase, what=path)
            _passphrases[path.parent.resolve()] = passphrase
        try:
            serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise KeyMaterialError(f"{path}: not a PKCS8 PEM private key; nothing was changed") from None
        pems[path] = data
    passphrase = None if unprotect_them or not pems else new_passphrase(prompt_for=str(kit_dir.resolve()))
    for path, pem in pems.items():
        atomic_write_bytes(path, pem if passphrase is None else protect(pem, passphrase), mode=0o600)
    done = "unprotected (plain PKCS8, 0600)" if unprotect_them else "protected by the passphrase"
    kept = "already plain (kept)" if unprotect_them else "already protected (kept)"
    return [(p.name, done if p in pems else kept) for p in found]
