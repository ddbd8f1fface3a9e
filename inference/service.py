"""Everything `fedcare serve` holds while it runs, loaded once at startup: the verified package,
its input scaling, ONNX Runtime sessions, the kit's token store and audit log.

Startup refuses (one-line `ServeError` / `PackageError` / `KitError`) a package whose signature
does not verify under the kit's coordinator signing key, whose files' sizes or hashes differ
from the signed manifest, that lists files it does not hold, or whose study is not the kit's.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.audit import AuditLog, load_audit_key
from inference.model import DEFAULT_MODEL, InputSpec, ModelSet, ServeError
from inference.tokens import TokenStore

if TYPE_CHECKING:
    from fedcare.study import Study


@dataclass(frozen=True)
class ServeKit:
    path: Path
    role: str
    study: Study
    state_dir: Path


def load_serve_kit(path: str | Path) -> ServeKit:
    """A hospital kit (the usual case) or the coordinator's kit: its study and state directory."""
    from fedcare.kits import load_coordinator_kit, load_hospital_kit, read_site_settings
    from fedcare.study import load_study

    path = Path(path).resolve()
    try:
        with open(path / "kit.toml", "rb") as handle:
            role = tomllib.load(handle).get("kit", {}).get("role")
    except (OSError, tomllib.TOMLDecodeError):
        role = None
    if role == "coordinator":
        kit = load_coordinator_kit(path)
        state_dir = kit.state_dir
    else:
        hospital = load_hospital_kit(path, need_keys=False)  # raises the kit's own one-line errors
        kit, state_dir = hospital, Path(read_site_settings(hospital)["state_dir"])
    return ServeKit(kit.path, role or "hospital", load_study(kit.study_file), state_dir)


def verify(pkg_dir: Path, kit: ServeKit) -> tuple[dict[str, Any], Path]:
    """(manifest, package path): `export.package.verify_package` under the kit's package signing key
    (signature, sizes, hashes, no unlisted file), then the package must be for the kit's study."""
    from export.package import _site_study, verify_package
    from fedcare.kits import package_verification_key

    public_key, _source = package_verification_key(kit.path)
    verified = verify_package(pkg_dir, public_key)
    _site_study(kit.study, verified.manifest)  # PackageError if the package is for another study
    return verified.manifest, Path(verified.path)


@dataclass
class Service:
    manifest: dict[str, Any]
    pkg_dir: Path
    inputs: InputSpec
    models: ModelSet
    model_version: str
    study_name: str
    study_hash: str
    label: str
    tokens: TokenStore
    audit: AuditLog
    kit: ServeKit | None = None

    @property
    def provider(self) -> str:
        return self.models.provider

    def startup_line(self) -> str:
        served = ", ".join(self.models.models)
        return (f"serving study '{self.study_name}' ({self.study_hash[:12]}), label '{self.label}', "
                f"package {self.model_version}; models: {served} (default {DEFAULT_MODEL}); "
                f"execution provider: {self.provider}; tokens: {self.tokens.count}")


def load_service(pkg_dir: str | Path, kit_dir: str | Path, provider: str | None = None) -> Service:
    kit = load_serve_kit(kit_dir)
    manifest, path = verify(Path(pkg_dir), kit)
    return build_service(manifest, path, kit.state_dir, provider=provider, kit=kit)


def build_service(manifest: dict[str, Any], pkg_dir: Path, state_dir: Path, *, provider: str | None = None,
                  kit: ServeKit | None = None) -> Service:
    """A service over an already verified package (tests and benchmarks call this directly)."""
    inputs = InputSpec.from_manifest(manifest)
    models = ModelSet.open(pkg_dir, manifest, inputs, provider)
    manifest_bytes = (pkg_dir / "manifest.json").read_bytes()
    study, label = manifest.get("study") or {}, manifest.get("label") or {}
    if not isinstance(study.get("hash"), str) or not isinstance(label.get("name"), str):
        raise ServeError("manifest.json: study.hash and label.name are required")
    state_dir = Path(state_dir)
    return Service(
        manifest=manifest,
        pkg_dir=pkg_dir,
        inputs=inputs,
        models=models,
        model_version=hashlib.sha256(manifest_bytes).hexdigest()[:12],
        study_name=str(study.get("name")),
        study_hash=study["hash"],
        label=label["name"],
        tokens=TokenStore(state_dir),
        audit=AuditLog(state_dir, load_audit_key(state_dir)),
        kit=kit,
    )
