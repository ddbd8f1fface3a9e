"""File helpers every party shares: durable writes, key files with safe permissions, typed TOML.

`read_toml` is the one TOML reader for study, mapping, kit and policy files: every failure
becomes the caller's error class with the same wording, naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedcare.errors import FedcareError, KeyMaterialError


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old or the new file, never half.
    With `mode` (e.g. 0o600 for a key), the file has it from its first byte."""
    tmp = path.with_name(path.name + ".tmp")
    if mode is None:
        handle = tmp.open("wb")
    else:
        tmp.unlink(missing_ok=True)
        handle = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb")
    with handle as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def write_secret(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; refuse to replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyMaterialError(f"{path}: already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key) with mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def check_private_permissions(path: Path) -> None:
    """A private key readable by group or others is refused."""
    if not path.is_file():
        raise KeyMaterialError(f"{path}: private key not found")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyMaterialError(f"{path}: private key permissions are {mode:o}; run `chmod 600 {path}`")


def read_toml(path: Path, error: type[FedcareError], missing: str) -> dict:
    """Parse a TOML file; every failure becomes `error` naming the file (`missing` says what was expected)."""
    return parse_toml_text(read_toml_text(path, error, missing), f"{path}: ", error)


def read_toml_text(path: Path, error: type[FedcareError], missing: str) -> str:
    """A TOML file's text; a missing file, a directory or non-UTF-8 bytes become `error` naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None


def parse_toml_text(text: str, where: str, error: type[FedcareError]) -> dict:
    """TOML text parsed; invalid TOML becomes `error`, prefixed with `where` (e.g. "path: ")."""
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise error(f"{where}not valid TOML: {err}") from None