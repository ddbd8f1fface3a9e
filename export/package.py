"""The signed model package (docs/PACKAGE.md): its format, its manifest, and verifying it.

    PKG/manifest.json      the signed statement (study and the run's overrides, inputs and scaling,
                           models, metrics, privacy)
    PKG/manifest.sig       Ed25519 over the exact bytes of manifest.json (64 raw bytes)
    PKG/model.onnx         fp32, dynamic batch
    PKG/model.int8.onnx    static QDQ: u8 activations, s8 per-channel weights
    PKG/model.a16w8.onnx   fixed batch 1, QDQ: u16 activations, s8 per-channel weights (QNN-class NPUs)
    PKG/site/              optional, unsigned, never leaves the site: `fedcare quantize` writes
                           model.int8.site.onnx and quantization.json here

Built at the coordinator by `export.build.build_package` (from the run record), verified anywhere
by `verify_package`, calibrated on site by `export.site_quantization`, optionally encrypted for
one site by `export.encryption`. The manifest is validated in one place, `check_manifest` (its
`inputs` by `read_inputs`, which the prediction service reads too); `site_study` is the study a
package was built for, from a site's own copy of the study file.

This module loads no ONNX tooling: `fedcare verify` and `fedcare serve` stay light.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from export.signing import signing_fingerprint
from fedcare.errors import FedcareError, StudyConfigError
from fedcare.study import MISSING_POLICIES, Overrides, Study

FORMAT = "fedcare-model-package/2"  # /2: the study's overrides are recorded
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SITE_DIR = "site"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "a16w8": "model.a16w8.onnx"}
SCALING_METHODS = ("federated", "spec")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(FedcareError, ValueError):
    """A package cannot be built, verified or used; the message says why in one line (naming the file)."""


@dataclass(frozen=True)
class PackageFiles:
    """A package's files held in memory, never written to disk: an encrypted package opened by
    `export.encryption.open_encrypted` (`origin` is the PKG.enc it came from, for messages)."""

    origin: Path
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class VerifiedPackage:
    """A package whose signature, file sizes and hashes checked out, and that holds no unlisted file.
    `study` is set when it was verified for a site's study (`verify_package(..., study=...)`):
    the study as the package was built for it, with the package's scaling (`site_study`).
    `files` holds the contents when the package was verified in memory (`PackageFiles`); `path` is
    then the encrypted file it came from."""

    manifest: dict
    path: Path
    study: Study | None = None
    files: Mapping[str, bytes] | None = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["signer"]["key_fingerprint"]

    @property
    def in_memory(self) -> bool:
        return self.files is not None

    def model_path(self, kind: str) -> Path:
        if self.files is not None:
            raise PackageError(f"{self.path}: an encrypted package held in memory has no model files on disk")
        return self.path / self.manifest["models"][kind]["file"]

    def read(self, name: str) -> bytes:
        """One file of the package (as verified: `name` is the manifest, the signature or a listed model)."""
        return self.files[name] if self.files is not None else (self.path / name).read_bytes()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_signed_manifest(pkg_dir: str | Path, manifest: dict, signing_key: Ed25519PrivateKey) -> bytes:
    """Write manifest.json (signer set to this key) and manifest.sig over its exact bytes."""
    pkg_dir = Path(pkg_dir)
    manifest = {**manifest, "signer": {"algorithm": "Ed25519", "key_fingerprint": signing_fingerprint(signing_key.public_key())}}
    data = manifest_bytes(manifest)
    (pkg_dir / MANIFEST).write_bytes(data)
    (pkg_dir / SIGNATURE).write_bytes(signing_key.sign(data))
    return data


# -- the manifest, validated in one place ---------------------------------------------------


def _malformed(why: str) -> PackageError:
    return PackageError(f"{MANIFEST}: malformed: {why}")


@dataclass(frozen=True)
class FeatureInput:
    """One raw feature as the package scales it (`inputs.scaling.<name>`)."""

    name: str
    center: float
    scale: float
    low: float
    high: float
    missing: str  # impute, indicator or reject


@dataclass(frozen=True)
class PackageInputs:
    """The manifest's `inputs`, checked: features in spec order, the model's input columns, clip, method."""

    features: tuple[FeatureInput, ...]
    model_inputs: tuple[str, ...]
    clip: float
    scaling_method: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_inputs(manifest: Any) -> PackageInputs:
    """The one validator of a manifest's `inputs` (verify, the site's study check and serving all use it).
    Raises `PackageError` ("manifest.json: malformed: ...") naming the field."""
    inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
    if not isinstance(inputs, dict):
        raise _malformed("inputs is missing")
    names, scaling = inputs.get("features"), inputs.get("scaling")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _malformed("inputs.features must be a non-empty list of feature names")
    if len(set(names)) != len(names):
        raise _malformed("inputs.features has duplicate names")
    if not isinstance(scaling, dict) or set(scaling) != set(names):
        raise _malformed("inputs.scaling needs one entry per feature in inputs.features")
    features = []
    for name in names:
        entry = scaling[name]
        values = [_number(entry.get(k)) if isinstance(entry, dict) else None for k in ("center", "scale", "low", "high")]
        if any(v is None for v in values):
            raise _malformed(f"inputs.scaling.{name} needs finite numbers center, scale, low, high")
        center, scale, low, high = values
        if scale <= 0 or low > high:
            raise _malformed(f"inputs.scaling.{name}: scale > 0 and low <= high required")
        if entry.get("missing") not in MISSING_POLICIES:
            raise _malformed(f"inputs.scaling.{name}.missing must be one of {', '.join(MISSING_POLICIES)}")
        features.append(FeatureInput(name, center, scale, low, high, entry["missing"]))
    expected = names + [f"{f.name}_missing" for f in features if f.missing == "indicator"]
    if inputs.get("model_inputs") != expected:
        raise _malformed("inputs.model_inputs is not the features followed by one '<name>_missing' per "
                         "indicator feature (fedcare.study.Study.input_names)")
    clip = _number(inputs.get("clip"))
    if clip is None or clip <= 0:
        raise _malformed("inputs.clip must be a finite number > 0")
    if inputs.get("scaling_method") not in SCALING_METHODS:
        raise _malformed(f"inputs.scaling_method must be one of {', '.join(SCALING_METHODS)}")
    return PackageInputs(tuple(features), tuple(expected), clip, inputs["scaling_method"])


def read_overrides(manifest: Any) -> Overrides:
    """The run's overrides of the study file as the manifest records them (`study.overrides`)."""
    study = manifest.get("study") if isinstance(manifest, dict) else None
    recorded = study.get("overrides") if isinstance(study, dict) else None
    if not isinstance(recorded, dict) or set(recorded) - {"rounds", "epsilon"}:
        raise _malformed("study.overrides must be an object with rounds and epsilon (null = the study file's)")
    rounds, epsilon = recorded.get("rounds"), recorded.get("epsilon")
    if (rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int))) or \
            (epsilon is not None and _number(epsilon) is None):
        raise _malformed("study.overrides: rounds must be an integer and epsilon a number, or null")
    try:
        return Overrides(rounds=rounds, epsilon=None if epsilon is None else float(epsilon))
    except StudyConfigError as err:
        raise _malformed(f"study.overrides: {err.line.removeprefix('--')}") from None


def check_manifest(manifest: Any) -> dict:
    """Every field a reader of the package relies on: format, study (with the run's overrides), label,
    inputs, models and signer. Returns the manifest; raises `PackageError` naming the field."""
    if not isinstance(manifest, dict):
        raise _malformed("not a JSON object")
    if manifest.get("format") != FORMAT:
        raise _malformed(f"format is {manifest.get('format')!r}, this fedcare reads {FORMAT!r} "
                         f"(built by another fedcare version: export the run again)")
    study = manifest.get("study")
    if not isinstance(study, dict) or not isinstance(study.get("name"), str) or not _HEX64.match(str(study.get("hash", ""))):
        raise _malformed("study needs a name and a 64-hex hash")
    read_overrides(manifest)
    label = manifest.get("label")
    if not isinstance(label, dict) or not isinstance(label.get("name"), str):
        raise _malformed("label needs a name")
    read_inputs(manifest)
    models = manifest.get("models")
    if not isinstance(models, dict) or not models:
        raise _malformed("models is missing or empty")
    seen = set()
    for kind, entry in models.items():
        if not isinstance(entry, dict):
            raise _malformed(f"models.{kind} is not an object")
        file = entry.get("file")
        if (not isinstance(file, str) or not file or file != Path(file).name or "\\" in file or file.startswith(".")
                or file in (MANIFEST, SIGNATURE, SITE_DIR)):
            raise _malformed(f"models.{kind}.file must be a plain file name in the package, got {file!r}")
        if file in seen:
            raise _malformed(f"models.{kind}.file: {file} is listed twice")
        seen.add(file)
        if not _HEX64.match(str(entry.get("sha256", ""))):
            raise _malformed(f"models.{kind}.sha256 is not 64 lowercase hex digits")
        size = entry.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _malformed(f"models.{kind}.bytes is not a byte count")
    signer = manifest.get("signer")
    if not isinstance(signer, dict) or signer.get("algorithm") != "Ed25519" or not isinstance(signer.get("key_fingerprint"), str):
        raise _malformed("signer must name algorithm Ed25519 and a key_fingerprint")
    return manifest


def site_study(kit_study: Study, manifest: dict) -> Study:
    """The study the package was built for, from this site's own copy: the kit's study with exactly
    the run's overrides the manifest records (its hash must be the package's), with the package's
    scaling. Raises `PackageError` if the package is for another study."""
    target, name = manifest["study"]["hash"], manifest["study"]["name"]
    study = kit_study.with_overrides(read_overrides(manifest))
    if study.hash != target:
        raise PackageError(f"the package is for study {name} ({target[:12]}…); this kit's study is "
                           f"{kit_study.name} ({kit_study.hash[:12]}…)")
    inputs = read_inputs(manifest)
    if list(inputs.names) != [f.name for f in study.features] or list(inputs.model_inputs) != study.input_names:
        raise PackageError(f"{MANIFEST}: inputs.features / inputs.model_inputs differ from this kit's study")
    for mine, theirs in zip(study.features, inputs.features):
        if (mine.low, mine.high, mine.missing) != (theirs.low, theirs.high, theirs.missing):
            raise PackageError(f"{MANIFEST}: inputs.scaling.{mine.name}: low, high or missing differ from this kit's study")
    return study.with_scaling([f.center for f in inputs.features], [f.scale for f in inputs.features])


# -- verify ---------------------------------------------------------------------------------


def _claimed_signer(data: bytes) -> str | None:
    try:
        return json.loads(data.decode("utf-8"))["signer"]["key_fingerprint"]
    except Exception:  # noqa: BLE001 - only to explain a failed signature
        return None


class _Directory:
    """The files of a package directory, as `verify_package` looks at them."""

    def __init__(self, pkg_dir: Path) -> None:
        if not pkg_dir.is_dir():
            raise PackageError(f"{pkg_dir}: not a package directory")
        self.path = pkg_dir

    def regular(self, name: str) -> bool | None:
        """True: a regular file; False: something else (a symlink, a directory); None: absent."""
        path = self.path / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            return False
        return True if path.exists() else None

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size

    def sha256(self, name: str) -> str:
        return sha256_file(self.path / name)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def others(self) -> list[str]:
        """Names besides the listed ones that are allowed: the unsigned `site/` directory."""
        return sorted(p.name for p in self.path.iterdir() if not (p.name == SITE_DIR and p.is_dir() and not p.is_symlink()))


class _Memory:
    """The files of a package held in memory (`PackageFiles`), as `verify_package` looks at them."""

    def __init__(self, package: PackageFiles) -> None:
        self.path, self.files = package.origin, package.files

    def regular(self, name: str) -> bool | None:
        return True if name in self.files else None

    def size(self, name: str) -> int:
        return len(self.files[name])

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def read(self, name: str) -> bytes:
        return self.files[name]

    def others(self) -> list[str]:
        return sorted(self.files)


def verify_package(pkg: str | Path | PackageFiles, public_key: Ed25519PublicKey, *,
                   study: Study | None = None) -> VerifiedPackage:
    """Check the signature first, then the manifest (`check_manifest`), every listed file's size and
    sha256, then that nothing else is in the package but `manifest.sig` and an optional `site/`
    directory; with `study` (a site's study file), finally that the package was built for it
    (`site_study`). `pkg` is a package directory, or the files of an encrypted package opened in
    memory (`PackageFiles`: they are checked there and never written). Raises `PackageError`."""
    source = _Memory(pkg) if isinstance(pkg, PackageFiles) else _Directory(Path(pkg))
    expected = signing_fingerprint(public_key)
    for name in (MANIFEST, SIGNATURE):
        if source.regular(name) is not True:
            raise PackageError(f"missing file {name}{' (the package is unsigned)' if name == SIGNATURE else ''}")
    data, signature = source.read(MANIFEST), source.read(SIGNATURE)
    if len(signature) != 64:
        raise PackageError(f"{SIGNATURE}: not an Ed25519 signature ({len(signature)} bytes, expected 64)")
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        claimed = _claimed_signer(data)
        if claimed is not None and claimed != expected:
            raise PackageError(f"signed by another key ({claimed}); expected the coordinator key {expected}") from None
        raise PackageError(f"bad signature: {MANIFEST} or {SIGNATURE} was changed after signing "
                           f"(expected signer {expected})") from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _malformed(f"not UTF-8 JSON ({err})") from None
    check_manifest(manifest)
    if manifest["signer"]["key_fingerprint"] != expected:
        raise _malformed(f"signer.key_fingerprint is {manifest['signer']['key_fingerprint']} but the signature is by {expected}")
    listed = {}
    for kind, entry in manifest["models"].items():
        name = entry["file"]
        regular = source.regular(name)
        if regular is False:
            raise PackageError(f"{name}: not a regular file")
        if regular is None:
            raise PackageError(f"missing file {name} (models.{kind} in the signed manifest)")
        size = source.size(name)
        if size != entry["bytes"]:
            raise PackageError(f"{name}: {size} bytes, the signed manifest says {entry['bytes']} (modified after signing)")
        if source.sha256(name) != entry["sha256"]:
            raise PackageError(f"{name}: sha256 does not match the signed manifest (modified after signing)")
        listed[name] = kind
    for name in source.others():
        if name in listed or name in (MANIFEST, SIGNATURE):
            continue
        raise PackageError(f"unlisted file {name}: not in the signed manifest; refusing the package "
                           f"(only {SITE_DIR}/ may hold site-side artifacts)")
    files = pkg.files if isinstance(pkg, PackageFiles) else None
    return VerifiedPackage(manifest, source.path, None if study is None else site_study(study, manifest), files)


def overrides_text(overrides: Overrides) -> str:
    """The run's overrides for people: "the run's overrides rounds=1" or "as the study file defines it"."""
    parts = ([f"rounds={overrides.rounds}"] if overrides.rounds is not None else []) + \
            ([f"epsilon={overrides.epsilon:g}"] if overrides.epsilon is not None else [])
    return f"the run's overrides {', '.join(parts)}" if parts else "as the study file defines it"


def summary_lines(package: VerifiedPackage) -> list[str]:
    m = package.manifest
    metrics, privacy, inputs = m.get("metrics", {}), m.get("privacy", {}), m["inputs"]
    auc = metrics.get("federated_auc")
    lines = [
        f"study {m['study']['name']} ({m['study']['hash'][:12]}…, {overrides_text(read_overrides(m))}), "
        f"label {m['label']['name']}, created {m.get('created')}",
        f"inputs: {len(inputs['features'])} features -> {len(inputs['model_inputs'])} model inputs, "
        f"scaling {inputs['scaling_method']}, clip ±{inputs['clip']}",
        f"metrics: federated AUC {auc if auc is not None else 'n/a'}, loss {metrics.get('federated_loss')}, "
        f"{metrics.get('rounds')} rounds; privacy: target ε {privacy.get('target_epsilon')}, δ {privacy.get('delta')}",
    ]
    for kind, entry in m["models"].items():
        extra = f", calibration: {entry['calibration']}" if entry.get("calibration") else ""
        lines.append(f"  {kind:<6} {entry['file']:<18} {entry['bytes']:>7} bytes  batch {entry.get('batch')}{extra}")
    site = package.path / SITE_DIR
    if site.is_dir():
        lines.append(f"  {SITE_DIR}/ (site-side, not signed): {', '.join(sorted(p.name for p in site.iterdir())) or 'empty'}")
    return lines
