"""A model package encrypted at rest for one site (optional; docs/PACKAGE.md).

    fedcare export ... --encrypt-for SITE/package.pub     writes PKG.enc beside PKG/
    fedcare verify PKG.enc --kit HOSPITAL_KIT --out DIR   decrypts with the kit's package.key, then verifies

PKG.enc = MAGIC | ephemeral X25519 public key (32) | nonce (12) | AES-256-GCM(tar of the package)
The AES key is HKDF-SHA256(X25519(ephemeral, site), salt = ephemeral pub | site pub, info = INFO);
the header is the GCM associated data. Only the signed files travel (never `site/`); the
decrypted directory must still pass `verify_package`: encryption hides, the signature vouches.
A site creates its key pair (`package.key` 0600, `package.pub`) with
`export.signing.ensure_package_key(kit_dir)` and sends `package.pub` to the coordinator.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from export.package import SITE_DIR, PackageError

ENCRYPTED_SUFFIX = ".enc"
ENCRYPTED_MAGIC = b"FCPKG-ENC/1\n"
_INFO = b"fedcare-model-package/1 AES-256-GCM"


def encrypted_path(pkg_dir: str | Path) -> Path:
    """Where `fedcare export --encrypt-for` writes the encrypted package: `PKG.enc` beside `PKG/`."""
    pkg_dir = Path(pkg_dir)
    return pkg_dir.with_name(pkg_dir.name + ENCRYPTED_SUFFIX)


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aes_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def encrypt_package(pkg_dir: str | Path, out_file: str | Path, site_public_key) -> Path:
    """Encrypt the package's signed files for the holder of `site_public_key` (X25519)."""
    import tarfile

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    pkg_dir, out_file = Path(pkg_dir), Path(out_file)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(pkg_dir.iterdir()):
            if path.name == SITE_DIR:
                continue  # site-side artifacts never travel
            if path.is_symlink() or not path.is_file():
                raise PackageError(f"{path.name}: only regular files can be encrypted")
            info = tarfile.TarInfo(path.name)
            info.size, info.mode = path.stat().st_size, 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    ephemeral = X25519PrivateKey.generate()
    eph_pub, recipient = _raw(ephemeral.public_key()), _raw(site_public_key)
    nonce = os.urandom(12)
    header = ENCRYPTED_MAGIC + eph_pub + nonce
    key = _aes_key(ephemeral.exchange(site_public_key), eph_pub, recipient)
    out_file.write_bytes(header + AESGCM(key).encrypt(nonce, buffer.getvalue(), header))
    return out_file


def decrypt_package(enc_file: str | Path, out_dir: str | Path, site_private_key) -> Path:
    """Decrypt `PKG.enc` into `out_dir` (new or empty). The result is not trusted until `verify_package`."""
    import tarfile

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    enc_file, out_dir = Path(enc_file), Path(out_dir)
    data = enc_file.read_bytes()
    head = len(ENCRYPTED_MAGIC) + 32 + 12
    if not data.startswith(ENCRYPTED_MAGIC) or len(data) < head + 16:
        raise PackageError(f"{enc_file}: not an encrypted fedcare package")
    header, eph_pub, nonce = data[:head], data[len(ENCRYPTED_MAGIC) : len(ENCRYPTED_MAGIC) + 32], data[head - 12 : head]
    shared = site_private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    key = _aes_key(shared, eph_pub, _raw(site_private_key.public_key()))
    try:
        plain = AESGCM(key).decrypt(nonce, data[head:], header)
    except InvalidTag:
        raise PackageError(f"{enc_file}: cannot decrypt: encrypted for another site's key, or modified") from None
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PackageError(f"{out_dir}: exists and is not empty; refusing to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r") as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name != Path(member.name).name or member.name.startswith("."):
                    raise PackageError(f"{enc_file}: unexpected entry {member.name!r} in the encrypted package")
                source = tar.extractfile(member)
                (out_dir / member.name).write_bytes(source.read() if source else b"")
    except tarfile.TarError as err:
        raise PackageError(f"{enc_file}: decrypted, but not a package archive ({err})") from None
    return out_dir
