"""Build the signed model package of a finished run, at the coordinator (docs/PACKAGE.md).

Everything comes from the run record (`fedcare.run_record.RunRecord`): the study exactly as run
(its overrides and federated scaling applied), the final checkpoint, the round log, the report's
per-site privacy rows and the run's overrides, which the manifest states explicitly so that a site
applies exactly those to its own study file (`export.package.site_study`).

Calibration without central patient data: the coordinator holds no patient rows, so the
package's int8 and A16W8 models are calibrated on inputs drawn from the study spec alone
(`export.calibration.spec_calibration_inputs`, with the run's scaling). A site may calibrate
its own int8 model from its local training rows (`export.site_quantization`).

The models carry the run's study hash in their `fedcare.study_hash` metadata and the scaling
method in `fedcare.scaling_method`; exporter annotations are stripped and every model's outputs
are checked bit-identical before and after (`export.onnx_export.finish_model`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from export.package import FORMAT, PackageError, sha256_file, write_signed_manifest
from export.pipeline import KINDS, ExportedModels, export_models
from fedcare.errors import FedcareError
from fedcare.features import CLIP
from fedcare.run_record import REPORT_FILE, RunRecord, utc_now
from fedcare.study import Study

SPEC_CALIBRATION = "spec-derived inputs (coordinator)"
SITES_NOTE = "per-site ε stays at each site"
BATCH = {"fp32": "dynamic", "int8": "dynamic", "a16w8": 1}


def _model_entries(exported: ExportedModels) -> dict[str, dict[str, Any]]:
    entries = {}
    for kind, model in exported.models.items():
        entry: dict[str, Any] = {"file": model.path.name, "sha256": sha256_file(model.path), "bytes": model.bytes,
                                 "batch": BATCH[kind]}
        if kind != "fp32":
            entry["calibration"] = SPEC_CALIBRATION
        entries[kind] = entry
    return entries


def package_manifest(record: RunRecord, study: Study, report: dict, exported: ExportedModels) -> dict:
    """The manifest (unsigned) of the package of `record`'s run; `study` is `record.study()`."""
    overrides = record.overrides()
    rounds = record.rounds()
    last = record.final_evaluation()
    sites = [{"name": s.get("name"), "epsilon": s.get("epsilon")} for s in report.get("sites") or []]
    note = SITES_NOTE
    if any(s["epsilon"] is not None for s in sites):
        note += "; the values here are the run report's (simulation: read from each site's ledger by the evaluator)"
    return {
        "format": FORMAT,
        "created": utc_now(),
        "study": {"name": study.name, "hash": study.hash,
                  "overrides": {"rounds": overrides.rounds, "epsilon": overrides.epsilon}},
        "label": {"name": study.label.name, "description": study.label.description},
        "inputs": {
            "features": [f.name for f in study.features],
            "model_inputs": study.input_names,
            "scaling": {
                f.name: {"center": f.center, "scale": f.scale, "low": f.low, "high": f.high, "missing": f.missing}
                for f in study.features
            },
            "clip": CLIP,
            "scaling_method": exported.scaling_method,
        },
        "models": _model_entries(exported),
        "metrics": {"federated_auc": last.get("auc"), "federated_loss": last.get("loss"), "rounds": len(rounds)},
        "privacy": {
            "target_epsilon": study.privacy.epsilon,
            "delta": study.privacy.delta,
            "accountant": study.privacy.accountant,
            "sites": sites,
            "note": note,
        },
    }


def _final_weights(record: RunRecord, study: Study) -> list:
    try:
        return record.final_weights(study.hash)[0]
    except FedcareError:
        raise
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise PackageError(f"{record.latest_checkpoint()}: cannot load the checkpoint ({str(err).splitlines()[0]})") from None


def build_package(record: RunRecord, out_dir: str | Path, signing_key: Ed25519PrivateKey) -> Path:
    """Export the run's final checkpoint as a signed package in `out_dir` (new or empty).

    The package is assembled in a temporary sibling directory and moved into place when complete.
    Raises `PackageError` / `RunRecordError` (one line) for a folder that is not a finished run."""
    out_dir = Path(out_dir)
    report = record.report()  # first: a folder without a finished run says so
    study = record.study()
    if report["study_hash"] != study.hash:
        raise PackageError(f"{record.path / REPORT_FILE}: is for study {report['study_hash'][:12]}…, not the run's "
                           f"recorded study {study.hash[:12]}…")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PackageError(f"--out: {out_dir} exists and is not an empty directory; refusing to overwrite")
    weights = _final_weights(record, study)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        exported = export_models(study, weights, work, kinds=KINDS, package=True)
        write_signed_manifest(work, package_manifest(record, study, report, exported), signing_key)
        os.chmod(work, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir
