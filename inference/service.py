"""Everything `fedcare serve` holds while it runs, loaded once at startup over a verified package:
its input scaling, ONNX Runtime sessions, the kit's token store and audit log.

The package is verified before it gets here (`inference.commands`: `export.package.verify_package`
under the kit's coordinator signing key, for the kit's study): its signature, its files' sizes and
hashes, no unlisted file, and the study it was built for. This module knows no kits: it takes the
verified package and the kit's state directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.package import MANIFEST, VerifiedPackage, check_manifest
from inference.audit import AuditLog, AuditSettings, current_settings, load_audit_key
from inference.default_model import DefaultChoice, choose_default
from inference.model import InputSpec, ModelSet
from inference.tokens import TokenStore
from fedcare.derived import Derivation


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
    state_dir: Path
    default_choice: DefaultChoice
    derivation: Derivation | None = None  # the study's features from notes and readings, if any

    @property
    def provider(self) -> str:
        return self.models.provider

    def startup_line(self) -> str:
        served = ", ".join(self.models.models)
        return (f"serving study '{self.study_name}' ({self.study_hash[:12]}), label '{self.label}', "
                f"package {self.model_version}; models: {served} ({self.default_choice.describe()}); "
                f"execution provider: {self.provider}; tokens: {self.tokens.count}")


def build_service(package: VerifiedPackage, state_dir: str | Path, *, provider: str | None = None,
                  audit_settings: AuditSettings | None = None, default_model: str | None = None) -> Service:
    """The service over a package `export.package.verify_package` returned; its tokens and audit log
    live in `state_dir` (the kit's state directory). The audit log's rotation and cap: `audit_settings`,
    else `fedcare serve --audit-*`, else `FEDCARE_SERVE_AUDIT_*`, else `AuditSettings()`'s defaults."""
    manifest = check_manifest(package.manifest)
    inputs = InputSpec.from_manifest(manifest)
    models = ModelSet.open(package, manifest, inputs, provider)
    # the model a request that names none gets: `default_model`, else the fastest here within the bound
    choice = choose_default({name: m.session for name, m in models.models.items()}, inputs, pinned=default_model)
    models.default = choice.model
    manifest_bytes = package.read(MANIFEST)
    state_dir = Path(state_dir)
    return Service(
        manifest=manifest,
        pkg_dir=package.path,
        inputs=inputs,
        models=models,
        model_version=hashlib.sha256(manifest_bytes).hexdigest()[:12],
        study_name=manifest["study"]["name"],
        study_hash=manifest["study"]["hash"],
        label=manifest["label"]["name"],
        tokens=TokenStore(state_dir),
        audit=AuditLog(state_dir, load_audit_key(state_dir), audit_settings or current_settings()),
        state_dir=state_dir,
        default_choice=choice,
        derivation=_derivation(package),
    )


def _derivation(package: VerifiedPackage) -> Derivation | None:
    """What the package's study derives from notes and readings (verified for the kit's study), or None."""
    study = package.study
    if study is None or study.mapping is None:
        return None
    derivation = Derivation(study)
    return derivation if derivation.columns else None
