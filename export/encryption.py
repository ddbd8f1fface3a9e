"""A model package encrypted at rest for one site (optional; docs/PACKAGE.md).

    fedcare export ... --encrypt-for SITE/package.pub     writes PKG.enc beside PKG/
    fedcare verify PKG.enc --kit HOSPITAL_KIT [--out DIR] verifies in memory (and decrypts into DIR)
    fedcare serve --package PKG.enc --kit HOSPITAL_KIT    decrypts in memory only and serves it

PKG.enc = MAGIC | ephemeral X25519 public key (32) | nonce (12) | AES-256-GCM(tar of the package),
sealed for the site's package.pub by `fedcare.sealing.seal` (HKDF-SHA256 over the X25519 secret;
the header is the GCM associated data). Only the signed files travel (never `site/`); the
decrypted directory must still pass `verify_package`: encryption hides, the signature vouches.
A site creates its key pair (`package.key` 0600, `package.pub`) with
`export.signing.ensure_package_key(kit_dir)` and sends `package.pub` to the coordinator.
"""

from __future__ import annotations

import io
from pathlib import Path

from export.package import SITE_DIR, PackageError, PackageFiles
from fedcare.sealing import SealError, is_sealed, seal, unseal

ENCRYPTED_SUFFIX = ".enc"
ENCRYPTED_MAGIC = b"FCPKG-ENC/1\n"
_INFO = b"fedcare-model-package/1 AES-256-GCM"


def encrypted_path(pkg_dir: str | Path) -> Path:
    """Where `fedcare export --encrypt-for` writes the encrypted package: `PKG.enc` beside `PKG/`."""
    pkg_dir = Path(pkg_dir)
    return pkg_dir.with_name(pkg_dir.name + ENCRYPTED_SUFFIX)


def encrypt_package(pkg_dir: str | Path, out_file: str | Path, site_public_key) -> Path:
    """Encrypt the package's signed files for the holder of `site_public_key` (X25519)."""
    import tarfile

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
    out_file.write_bytes(seal(buffer.getvalue(), site_public_key, magic=ENCRYPTED_MAGIC, info=_INFO))
    return out_file


def open_encrypted(enc_file: str | Path, site_private_key) -> PackageFiles:
    """Decrypt `PKG.enc` in memory: its files as bytes, never written anywhere (`fedcare serve` serves
    them so). Not trusted until `verify_package` has checked them. Raises `PackageError` in one line
    for a wrong key, a modified file, or something that is not an encrypted package."""
    import tarfile

    enc_file = Path(enc_file)
    try:
        data = enc_file.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{enc_file}: not found") from None
    except OSError as err:
        raise PackageError(f"{enc_file}: cannot read it ({err.strerror})") from None
    if not is_sealed(data, ENCRYPTED_MAGIC) or len(data) < len(ENCRYPTED_MAGIC) + 60:
        raise PackageError(f"{enc_file}: not an encrypted fedcare package")
    try:
        plain = unseal(data, site_private_key, magic=ENCRYPTED_MAGIC, info=_INFO, what=str(enc_file),
                       wrong_key="cannot decrypt: encrypted for another site's key, or modified")
    except SealError as err:
        raise PackageError(str(err)) from None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r") as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name != Path(member.name).name or member.name.startswith(".") \
                        or member.name in files:
                    raise PackageError(f"{enc_file}: unexpected entry {member.name!r} in the encrypted package")
                source = tar.extractfile(member)
                files[member.name] = source.read() if source else b""
    except tarfile.TarError as err:
        raise PackageError(f"{enc_file}: decrypted, but not a package archive ({err})") from None
    return PackageFiles(enc_file, files)


def decrypt_package(enc_file: str | Path, out_dir: str | Path, site_private_key) -> Path:
    """Decrypt `PKG.enc` into `out_dir` (new or empty). The result is not trusted until `verify_package`."""
    out_dir = Path(out_dir)
    opened = open_encrypted(enc_file, site_private_key)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PackageError(f"{out_dir}: exists and is not empty; refusing to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in opened.files.items():
        (out_dir / name).write_bytes(content)
    return out_dir
