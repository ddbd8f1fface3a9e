"""The hospital's own study report (`fedcare report`): computed at the site, written to a local
folder, never sent anywhere.

What it holds: the verified package's fp32 model (the federated global model) scored on the site's
own test split with ONNX Runtime, inputs scaled exactly as the service scales them
(`inference.model.InputSpec`, the package's scaling); the served int8 model's AUC beside it; the
site's row counts; and the site's privacy ledger (verified) for this study against its own policy.
`report.json` has the schema of `fedcare.report` with `"view": "site"`, so `fedcare.report_html`
renders it with the same charts. The command (`inference.commands`) loads the site's tables and
ledger and passes them in; this module reads no site file itself and never reaches Flower.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from export.package import VerifiedPackage
from export.site_quantization import SiteSplits
from fedcare.errors import FedcareError
from fedcare.metrics import (accuracy, balanced_accuracy, brier_score, calibration_table, log_loss, roc_auc,
                             roc_curve)
from fedcare.report import privacy_targets
from fedcare.report_html import render_report
from fedcare.run_record import utc_now
from inference.model import CPU, INPUT_NAME, OUTPUT_NAME, InputSpec, open_session
from privacy.budget import lifetime_epsilon, study_epsilon
from privacy.ledger import LedgerEntry, rounds_of
from privacy.policy import SitePolicy

REPORT_JSON, REPORT_HTML = "report.json", "report.html"


class SiteReportError(FedcareError, ValueError):
    """The site report cannot be computed; the message names the flag or file."""


def score(package: VerifiedPackage, kind: str, raw: np.ndarray) -> np.ndarray:
    """Risk (probability) of the package's `kind` model for raw rows, as the service computes it."""
    spec = InputSpec.from_manifest(package.manifest)
    session, _, _ = open_session(package.model_path(kind).read_bytes(), CPU)
    x = np.ascontiguousarray(spec.scale_rows(np.asarray(raw, dtype=np.float64)))
    if session.get_inputs()[0].shape[0] == 1:  # a fixed-batch model: row by row
        logits = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
    else:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64).reshape(-1)))


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    return {
        "auc": round(roc_auc(y, p), 4),
        "accuracy": round(accuracy(y, p), 4),
        "balanced_accuracy": round(balanced_accuracy(y, p), 4),
        "brier": round(brier_score(y, p), 4),
        "loss": round(log_loss(y, p), 4),
        "test_rows": int(len(y)),
        "prevalence": round(float(np.mean(y)), 4),
        "roc": roc_curve(y, p),
        "calibration": calibration_table(y, p),
    }


def site_report(package: VerifiedPackage, data: SiteSplits, *, site: str, data_source: str | Path,
                entries: list[LedgerEntry], ledger_path: str | Path, policy: SitePolicy) -> dict[str, Any]:
    """The site's report (see the module docstring). `package` must be verified for the site's study
    (`verify_package(..., study=...)`); `entries` are the site's verified ledger entries."""
    study = package.study
    if study is None:
        raise ValueError("site_report: the package must be verified for the site's study")
    y = np.asarray(data.test.labels).astype(np.int64)
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise SiteReportError(f"--data: {data_source}: the test split needs rows of both outcomes to score the model")
    final = {**_metrics(y, score(package, "fp32", data.test.features)),
             "source": "the package's fp32 model (the federated global model) on this site's test split, "
                       "computed here"}
    manifest = package.manifest
    if "int8" in manifest["models"]:
        final["auc_int8_served"] = round(roc_auc(y, score(package, "int8", data.test.features)), 4)
    key = study.budget_key
    mine = rounds_of(entries, key)
    spent = study_epsilon(entries, key) if mine else 0.0
    row = {"name": site, "epsilon": round(spent, 4), "epsilon_target": study.privacy.epsilon,
           "delta": study.privacy.delta, "rounds_trained": len(mine), "train_rows": int(len(data.train.labels)),
           **{k: final[k] for k in ("test_rows", "auc", "accuracy", "balanced_accuracy", "brier")}}
    federated = manifest.get("metrics") or {}
    scaling = manifest["inputs"]
    return {
        "view": "site",
        "site": site,
        "study": study.name,
        "study_hash": study.hash,
        "created": utc_now(),
        "secure_aggregation": True,
        "secure_aggregation_parameters": asdict(study.secure_aggregation),
        "model": asdict(study.model),
        "strategy": asdict(study.strategy),
        "final": final,
        "federated": {k: federated.get(k) for k in ("federated_auc", "federated_loss", "rounds")},
        "sites": [row],
        "data": {"source": str(data_source), "train_rows": row["train_rows"], "test_rows": row["test_rows"]},
        "ledger": {
            "path": str(ledger_path), "entries": len(entries), "verified": True, "study_key": key,
            "epsilon_spent": round(spent, 4), "epsilon_lifetime": round(lifetime_epsilon(entries), 4),
            "rounds": [{"seq": e.seq, "time": e.time, "run_id": e.run_id, "round": e.round,
                        "noise_multiplier": round(e.noise_multiplier, 4), "epsilon_study": round(e.epsilon_study, 4),
                        "epsilon_lifetime": round(e.epsilon_lifetime, 4)} for e in mine],
        },
        "policy": {**asdict(policy), "accepted_studies": list(policy.accepted_studies)},
        "package": {"path": str(package.path), "signer": package.fingerprint, "created": manifest.get("created"),
                    "scored": manifest["models"]["fp32"]["file"], "fp32_sha256": manifest["models"]["fp32"]["sha256"]},
        "privacy": privacy_targets(study),
        "scaling": {"method": scaling["scaling_method"],
                    "features": {f.name: {"center": round(f.center, 6), "scale": round(f.scale, 6)}
                                 for f in study.features}},
    }


def write_site_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """`report.json` and `report.html` in `out_dir` (created; an existing report there is replaced)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SiteReportError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_HTML).write_text(render_report(report), encoding="utf-8")
    return out / REPORT_JSON, out / REPORT_HTML
