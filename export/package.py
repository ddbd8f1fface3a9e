"""The signed model package (docs/PACKAGE.md): build it at the coordinator, verify it anywhere,
calibrate its int8 model on site.

    PKG/manifest.json      the signed statement (study, inputs and scaling, models, metrics, privacy)
    PKG/manifest.sig       Ed25519 over the exact bytes of manifest.json (64 raw bytes)
    PKG/model.onnx         fp32, dynamic batch
    PKG/model.int8.onnx    static QDQ: u8 activations, s8 per-channel weights
    PKG/model.a16w8.onnx   fixed batch 1, QDQ: u16 activations, s8 per-channel weights (QNN-class NPUs)
    PKG/site/              optional, unsigned, never leaves the site: `fedcare quantize` writes
                           model.int8.site.onnx and quantization.json here

Calibration without central patient data: the coordinator holds no patient rows, so the
package's int8 and A16W8 models are calibrated on inputs drawn from the study spec alone
(`export.calibration.spec_calibration_inputs`, with the run's scaling). A site may calibrate
its own int8 model from its local training rows (`quantize_on_site`); the result stays in
`PKG/site/` with the |ΔAUC| against fp32 on the site's test split.

The models in a package carry the run's study hash (the one in the manifest and every
checkpoint) in their `fedcare.study_hash` metadata and the scaling method in
`fedcare.scaling_method`; the build strips exporter annotations (per-node stack traces with the
build machine's paths, FX node dumps, unused opset imports) and checks that every model's
outputs are bit-identical before and after.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcare.features import CLIP
from fedcare.kits import signing_fingerprint
from fedcare.study import Study, StudyConfigError, load_study

FORMAT = "fedcare-model-package/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SITE_DIR = "site"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "a16w8": "model.a16w8.onnx"}
SPEC_CALIBRATION = "spec-derived inputs (coordinator)"
SITE_CALIBRATION = "site data (fedcare quantize)"
SITE_MODEL = "model.int8.site.onnx"
SITE_REPORT = "quantization.json"
SITE_CALIBRATION_ROWS = 2048
SITES_NOTE = "per-site ε stays at each site"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(ValueError):
    """A package cannot be built, verified or used; the message says why in one line (naming the file)."""


@dataclass(frozen=True)
class VerifiedPackage:
    """A package whose signature, file sizes and hashes checked out, and that holds no unlisted file."""

    manifest: dict
    path: Path

    @property
    def fingerprint(self) -> str:
        return self.manifest["signer"]["key_fingerprint"]

    def model_path(self, kind: str) -> Path:
        return self.path / self.manifest["models"][kind]["file"]


# -- helpers --------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def logits(path: str | Path | bytes, x: np.ndarray) -> np.ndarray:
    """Logits of an ONNX model (file or bytes) on the CPU; row by row when its batch axis is fixed to 1."""
    import onnxruntime as ort

    from export.onnx_export import INPUT_NAME, OUTPUT_NAME

    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if session.get_inputs()[0].shape[0] == 1:
        return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def finish_model(path: Path, study_hash: str, scaling_method: str, check_inputs: np.ndarray) -> None:
    """Package form of an exported model: the run's study hash and scaling method in its metadata,
    exporter annotations and unused opset imports removed. Refuses if outputs change at all."""
    import onnx

    before = logits(path, check_inputs)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({"fedcare.study_hash": study_hash, "fedcare.scaling_method": scaling_method})
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        del value.metadata_props[:]
        value.doc_string = ""
    for tensor in graph.initializer:
        del tensor.metadata_props[:]
        tensor.doc_string = ""
    del graph.metadata_props[:]
    graph.doc_string = model.doc_string = ""
    used = {("" if n.domain in ("", "ai.onnx") else n.domain) for n in graph.node}
    keep = [o for o in model.opset_import if (o.domain if o.domain != "ai.onnx" else "") in used | {""}]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    if not np.array_equal(before, logits(data, check_inputs)):
        raise PackageError(f"{path.name}: internal error: compacting the model changed its outputs")
    path.write_bytes(data)


# -- the study as run -----------------------------------------------------------------------


def _run_report(run_dir: Path) -> tuple[dict, Path]:
    """The run's report.json: in the run directory (`fedcare run`) or, for `fedcare simulate`, next to it."""
    candidates = [run_dir / "report.json"]
    if run_dir.name == "coordinator":
        candidates.append(run_dir.parent / "report.json")
    for path in candidates:
        if path.is_file():
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise PackageError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(report, dict) or not isinstance(report.get("study_hash"), str):
                raise PackageError(f"{path}: has no study_hash; is this a fedcare run report?")
            return report, path
    raise PackageError(f"{run_dir}: no report.json; the run has not finished, or this is not a coordinator run directory")


def run_study(study_path: str | Path, run_dir: str | Path) -> tuple[Study, str]:
    """The study exactly as the run used it: the file, or the file with the run's rounds/ε overrides
    (read from report.json), whichever reproduces the report's study hash. Returns (study, how)."""
    run_dir = Path(run_dir)
    report, report_path = _run_report(run_dir)
    study = load_study(study_path)
    if study.hash == report["study_hash"]:
        return study, "as written"
    rounds = len(report.get("rounds") or []) or None
    epsilon = (report.get("privacy") or {}).get("target_epsilon")
    for r, e in ((rounds, None), (None, epsilon), (rounds, epsilon)):
        try:
            candidate = study.with_overrides(rounds=r, epsilon=e)
        except StudyConfigError:
            continue
        if candidate.hash == report["study_hash"]:
            parts = ([f"rounds={r}"] if r is not None else []) + ([f"epsilon={e:g}"] if e is not None else [])
            return candidate, f"with the run's overrides ({', '.join(parts)})"
    raise PackageError(
        f"{study_path}: study hash {study.hash[:12]}… does not match the run's {report['study_hash'][:12]}… "
        f"({report_path}), even with the run's rounds/epsilon overrides; give the study file the run used with --study"
    )


# -- build ----------------------------------------------------------------------------------


def _manifest(study: Study, scaled: Study, run_dir: Path, report: dict, models: dict, key: Ed25519PrivateKey) -> dict:
    from server.progress import read_round_log

    rounds = read_round_log(run_dir) or list(report.get("rounds") or [])
    last = rounds[-1] if rounds else {}
    sites = [{"name": s.get("name"), "epsilon": s.get("epsilon")} for s in report.get("sites") or []]
    note = SITES_NOTE
    if any(s["epsilon"] is not None for s in sites):
        note += "; the values here are the run report's (simulation: read from each site's ledger by the evaluator)"
    return {
        "format": FORMAT,
        "created": _now(),
        "study": {"name": study.name, "hash": study.hash},
        "label": {"name": study.label.name, "description": study.label.description},
        "inputs": {
            "features": [f.name for f in study.features],
            "model_inputs": study.input_names,
            "scaling": {
                f.name: {"center": f.center, "scale": f.scale, "low": f.low, "high": f.high, "missing": f.missing}
                for f in scaled.features
            },
            "clip": CLIP,
            "scaling_method": "federated" if scaled is not study else "spec",
        },
        "models": models,
        "metrics": {"federated_auc": last.get("auc"), "federated_loss": last.get("loss"), "rounds": len(rounds)},
        "privacy": {
            "target_epsilon": study.privacy.epsilon,
            "delta": study.privacy.delta,
            "accountant": study.privacy.accountant,
            "sites": sites,
            "note": note,
        },
        "signer": {"algorithm": "Ed25519", "key_fingerprint": signing_fingerprint(key.public_key())},
    }


def _model_entry(path: Path, batch: str | int, calibration: str | None = None) -> dict:
    entry: dict[str, Any] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "batch": batch}
    if calibration is not None:
        entry["calibration"] = calibration
    return entry


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


def build_package(study: Study, run_dir: str | Path, out_dir: str | Path, signing_key: Ed25519PrivateKey) -> Path:
    """Export the run's latest checkpoint as a signed package in `out_dir` (new or empty).

    `study` is the study as run (its hash must be the checkpoint's and report.json's, see
    `run_study`); the models use the run's scaling (`scaling.json`, else the spec's). The package
    is assembled in a temporary sibling directory and moved into place when complete.
    """
    from export.calibration import spec_calibration_inputs
    from export.onnx_export import export_fp32, quantize_a16w8, quantize_int8
    from fedcare.model import build_model, set_weights
    from server.progress import latest_checkpoint, load_checkpoint, scaled_study

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    report, report_path = _run_report(run_dir)
    if report["study_hash"] != study.hash:
        raise PackageError(f"study hash {study.hash[:12]}… is not the run's {report['study_hash'][:12]}… ({report_path})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PackageError(f"--out: {out_dir} exists and is not an empty directory; refusing to overwrite")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        if latest_checkpoint(run_dir / "coordinator") is not None:
            raise PackageError(f"{run_dir}: no checkpoint here; a simulation's run directory is {run_dir / 'coordinator'}")
        raise PackageError(f"{run_dir}: no checkpoint; no round was securely aggregated")
    try:
        weights = load_checkpoint(checkpoint, study.hash)
        model = build_model(study)
        set_weights(model, weights)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise PackageError(f"{checkpoint}: cannot load the checkpoint ({str(err).splitlines()[0]})") from None
    scaled = scaled_study(study, run_dir)
    method = "federated" if scaled is not study else "spec"
    calibration = spec_calibration_inputs(scaled)
    check = calibration[:64]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        fp32 = export_fp32(model, scaled, work / MODEL_FILES["fp32"])
        finish_model(fp32, study.hash, method, check)
        int8 = quantize_int8(fp32, calibration, work / MODEL_FILES["int8"], scaled)
        finish_model(int8, study.hash, method, check)
        a16w8 = quantize_a16w8(fp32, calibration, work / MODEL_FILES["a16w8"], scaled)
        finish_model(a16w8, study.hash, method, check)
        models = {
            "fp32": _model_entry(fp32, "dynamic"),
            "int8": _model_entry(int8, "dynamic", SPEC_CALIBRATION),
            "a16w8": _model_entry(a16w8, 1, SPEC_CALIBRATION),
        }
        write_signed_manifest(work, _manifest(study, scaled, run_dir, report, models, signing_key), signing_key)
        os.chmod(work, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir


# -- verify ---------------------------------------------------------------------------------


def _malformed(why: str) -> PackageError:
    return PackageError(f"{MANIFEST}: malformed: {why}")


def _check_manifest(manifest: Any) -> dict:
    if not isinstance(manifest, dict):
        raise _malformed("not a JSON object")
    if manifest.get("format") != FORMAT:
        raise _malformed(f"format is {manifest.get('format')!r}, this fedcare reads {FORMAT!r}")
    study = manifest.get("study")
    if not isinstance(study, dict) or not isinstance(study.get("name"), str) or not _HEX64.match(str(study.get("hash", ""))):
        raise _malformed("study needs a name and a 64-hex hash")
    inputs = manifest.get("inputs")
    if not isinstance(inputs, dict):
        raise _malformed("inputs is missing")
    features, scaling = inputs.get("features"), inputs.get("scaling")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise _malformed("inputs.features must be a list of feature names")
    if not isinstance(inputs.get("model_inputs"), list) or not isinstance(scaling, dict) or set(scaling) != set(features):
        raise _malformed("inputs.model_inputs and inputs.scaling (one entry per feature) are required")
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


def _claimed_signer(data: bytes) -> str | None:
    try:
        return json.loads(data.decode("utf-8"))["signer"]["key_fingerprint"]
    except Exception:  # noqa: BLE001 - only to explain a failed signature
        return None


def verify_package(pkg_dir: str | Path, public_key: Ed25519PublicKey) -> VerifiedPackage:
    """Check the signature first, then every listed file's size and sha256, then that nothing else is
    in the package but `manifest.sig` and an optional `site/` directory. Raises `PackageError`."""
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise PackageError(f"{pkg_dir}: not a package directory")
    expected = signing_fingerprint(public_key)
    for name in (MANIFEST, SIGNATURE):
        if not (pkg_dir / name).is_file():
            raise PackageError(f"missing file {name}{' (the package is unsigned)' if name == SIGNATURE else ''}")
    data, signature = (pkg_dir / MANIFEST).read_bytes(), (pkg_dir / SIGNATURE).read_bytes()
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
    _check_manifest(manifest)
    if manifest["signer"]["key_fingerprint"] != expected:
        raise _malformed(f"signer.key_fingerprint is {manifest['signer']['key_fingerprint']} but the signature is by {expected}")
    listed = {}
    for kind, entry in manifest["models"].items():
        path = pkg_dir / entry["file"]
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise PackageError(f"{entry['file']}: not a regular file")
        if not path.exists():
            raise PackageError(f"missing file {entry['file']} (models.{kind} in the signed manifest)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise PackageError(f"{entry['file']}: {size} bytes, the signed manifest says {entry['bytes']} (modified after signing)")
        if sha256_file(path) != entry["sha256"]:
            raise PackageError(f"{entry['file']}: sha256 does not match the signed manifest (modified after signing)")
        listed[entry["file"]] = kind
    for path in sorted(pkg_dir.iterdir()):
        if path.name in listed or path.name in (MANIFEST, SIGNATURE):
            continue
        if path.name == SITE_DIR and path.is_dir() and not path.is_symlink():
            continue
        raise PackageError(f"unlisted file {path.name}: not in the signed manifest; refusing the package "
                           f"(only {SITE_DIR}/ may hold site-side artifacts)")
    return VerifiedPackage(manifest, pkg_dir)


def summary_lines(package: VerifiedPackage) -> list[str]:
    m = package.manifest
    metrics, privacy, inputs = m.get("metrics", {}), m.get("privacy", {}), m["inputs"]
    auc = metrics.get("federated_auc")
    lines = [
        f"study {m['study']['name']} ({m['study']['hash'][:12]}…), label {m.get('label', {}).get('name')}, created {m.get('created')}",
        f"inputs: {len(inputs['features'])} features -> {len(inputs['model_inputs'])} model inputs, "
        f"scaling {inputs.get('scaling_method')}, clip ±{inputs.get('clip')}",
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


# -- on site --------------------------------------------------------------------------------


def site_study(kit_study: Study, manifest: dict) -> Study:
    """The site's study with the package's scaling, after checking the package is for this study
    (its hash, or its hash with the run's rounds/ε overrides as the manifest records them)."""
    target = manifest["study"]["hash"]
    rounds = (manifest.get("metrics") or {}).get("rounds")
    epsilon = (manifest.get("privacy") or {}).get("target_epsilon")
    candidates = [kit_study]
    for r, e in ((rounds, None), (None, epsilon), (rounds, epsilon)):
        try:
            candidates.append(kit_study.with_overrides(rounds=r or None, epsilon=e or None))
        except (StudyConfigError, TypeError):
            pass
    if not any(c.hash == target for c in candidates):
        raise PackageError(f"the package is for study {manifest['study']['name']} ({target[:12]}…); this kit's study is "
                           f"{kit_study.name} ({kit_study.hash[:12]}…)")
    names = [f.name for f in kit_study.features]
    inputs = manifest["inputs"]
    if inputs["features"] != names or inputs["model_inputs"] != kit_study.input_names:
        raise PackageError("manifest.json: inputs.features / inputs.model_inputs differ from this kit's study")
    try:
        return kit_study.with_scaling([float(inputs["scaling"][n]["center"]) for n in names],
                                      [float(inputs["scaling"][n]["scale"]) for n in names])
    except (KeyError, TypeError, ValueError, StudyConfigError) as err:
        raise PackageError(f"manifest.json: inputs.scaling is unusable ({err})") from None


_site_study = site_study  # the name inference/service.py imports


def _risk_error(which: str, z32: np.ndarray, z8: np.ndarray) -> dict[str, float]:
    """How far the int8 risks are from fp32's (AUC only sees the ranking; the served risk is the value)."""
    error = np.abs(1 / (1 + np.exp(-z32.astype(np.float64))) - 1 / (1 + np.exp(-z8.astype(np.float64))))
    return {f"mean_abs_delta_risk_{which}": round(float(error.mean()), 6), f"max_abs_delta_risk_{which}": round(float(error.max()), 6)}


def quantize_on_site(package: VerifiedPackage, kit_study: Study, data_dir: str | Path, site_name: str,
                     rows: int = SITE_CALIBRATION_ROWS, seed: int = 0) -> dict:
    """Calibrate an int8 model from the site's training rows; write `PKG/site/model.int8.site.onnx` and
    `PKG/site/quantization.json` (rows used, AUCs and |ΔAUC| vs fp32 on the site's test split).
    The signed part of the package is not touched. `package` must come from `verify_package`."""
    from client.data import load_site
    from export.onnx_export import quantize_int8
    from fedcare.features import model_inputs
    from fedcare.metrics import roc_auc

    manifest = package.manifest
    if "fp32" not in manifest["models"]:
        raise PackageError("manifest.json: the package has no fp32 model to calibrate from")
    scaled = site_study(kit_study, manifest)
    data = load_site(kit_study, data_dir)
    x_train = model_inputs(scaled, data.train.features)
    x_test, y_test = model_inputs(scaled, data.test.features), data.test.labels
    if len(np.unique(y_test)) < 2:
        raise PackageError(f"{data_dir}: the test split has only one label value; |ΔAUC| cannot be measured")
    order = np.random.default_rng(seed).permutation(len(x_train))[:rows]
    calibration = x_train[order]
    fp32 = package.model_path("fp32")
    site_dir = package.path / SITE_DIR
    site_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=site_dir))
    try:
        int8 = quantize_int8(fp32, calibration, work / SITE_MODEL, scaled)
        finish_model(int8, manifest["study"]["hash"], manifest["inputs"].get("scaling_method", "spec"), calibration[:64])
        z32, z_site = logits(fp32, x_test), logits(int8, x_test)
        auc32, auc_site = roc_auc(y_test, z32), roc_auc(y_test, z_site)
        result: dict[str, Any] = {
            "format": "fedcare-site-quantization/1",
            "created": _now(),
            "site": site_name,
            "package": {"study_hash": manifest["study"]["hash"], "signer": package.fingerprint,
                        "fp32_sha256": manifest["models"]["fp32"]["sha256"]},
            "file": SITE_MODEL,
            "sha256": sha256_file(int8),
            "bytes": int8.stat().st_size,
            "calibration": SITE_CALIBRATION,
            "rows_used": int(len(calibration)),
            "train_rows": int(len(x_train)),
            "test_rows": int(len(y_test)),
            "auc_fp32": round(auc32, 6),
            "auc_int8_site": round(auc_site, 6),
            "abs_delta_auc_site": round(abs(auc32 - auc_site), 6),
            **_risk_error("site", z32, z_site),
        }
        if "int8" in manifest["models"]:
            z_pkg = logits(package.model_path("int8"), x_test)
            auc_pkg = roc_auc(y_test, z_pkg)
            result.update({"auc_int8_package": round(auc_pkg, 6), "abs_delta_auc_package": round(abs(auc32 - auc_pkg), 6),
                           **_risk_error("package", z32, z_pkg),
                           "package_int8_calibration": manifest["models"]["int8"].get("calibration")})
        int8.replace(site_dir / SITE_MODEL)
        (site_dir / SITE_REPORT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


# -- optional: encrypted at rest for one site -----------------------------------------------
#
# PKG.enc = MAGIC | ephemeral X25519 public key (32) | nonce (12) | AES-256-GCM(tar of the package)
# The AES key is HKDF-SHA256(X25519(ephemeral, site), salt = ephemeral pub | site pub, info = INFO);
# the header is the GCM associated data. Only the signed files travel (never `site/`); the
# decrypted directory must still pass `verify_package`: encryption hides, the signature vouches.

ENCRYPTED_MAGIC = b"FCPKG-ENC/1\n"
_INFO = b"fedcare-model-package/1 AES-256-GCM"


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
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r") as tar:
        for member in tar.getmembers():
            if not member.isfile() or member.name != Path(member.name).name or member.name.startswith("."):
                raise PackageError(f"{enc_file}: unexpected entry {member.name!r} in the encrypted package")
            source = tar.extractfile(member)
            (out_dir / member.name).write_bytes(source.read() if source else b"")
    return out_dir
