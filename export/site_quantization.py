"""On site: calibrate the package's int8 model from the site's own training rows (`fedcare quantize`).

The result stays in `PKG/site/` (never signed, never sent): `model.int8.site.onnx` and
`quantization.json` with the rows used and the |ΔAUC| and |Δrisk| against fp32 on the site's
test split (and the same for the package's spec-calibrated int8). The signed part of the package
is not touched. The command loads the site's tables (`client.data.load_site`) and passes them in.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from export.package import SITE_DIR, PackageError, VerifiedPackage, sha256_file
from export.pipeline import CHECK_ROWS, onnx_step
from fedcare.run_record import utc_now

SITE_CALIBRATION = "site data (fedcare quantize)"
SITE_MODEL = "model.int8.site.onnx"
SITE_REPORT = "quantization.json"
SITE_CALIBRATION_ROWS = 2048


class Split(Protocol):
    features: np.ndarray  # raw features, spec order, NaN = missing
    labels: np.ndarray


class SiteSplits(Protocol):
    """A site's training and test splits (`client.data.SiteData`)."""

    train: Split
    test: Split


def _risk_error(which: str, z32: np.ndarray, z8: np.ndarray) -> dict[str, float]:
    """How far the int8 risks are from fp32's (AUC only sees the ranking; the served risk is the value)."""
    error = np.abs(1 / (1 + np.exp(-z32.astype(np.float64))) - 1 / (1 + np.exp(-z8.astype(np.float64))))
    return {f"mean_abs_delta_risk_{which}": round(float(error.mean()), 6), f"max_abs_delta_risk_{which}": round(float(error.max()), 6)}


def quantize_on_site(package: VerifiedPackage, data: SiteSplits, site_name: str, *, source: str | Path,
                     rows: int = SITE_CALIBRATION_ROWS, seed: int = 0) -> dict:
    """Calibrate an int8 model from the site's training rows; write `PKG/site/model.int8.site.onnx` and
    `PKG/site/quantization.json`. `package` must come from `verify_package(..., study=the kit's study)`
    (its `study` scales the site's rows as the package does); `source` names the data in messages."""
    from export.onnx_export import finish_model, quantize_int8, run_onnx
    from fedcare.features import model_inputs
    from fedcare.metrics import roc_auc

    manifest, scaled = package.manifest, package.study
    if scaled is None:
        raise ValueError("quantize_on_site: the package must be verified for the site's study")
    if "fp32" not in manifest["models"]:
        raise PackageError("manifest.json: the package has no fp32 model to calibrate from")
    x_train = model_inputs(scaled, data.train.features)
    x_test, y_test = model_inputs(scaled, data.test.features), data.test.labels
    if len(np.unique(y_test)) < 2:
        raise PackageError(f"{source}: the test split has only one label value; |ΔAUC| cannot be measured")
    order = np.random.default_rng(seed).permutation(len(x_train))[:rows]
    calibration = x_train[order]
    fp32 = package.model_path("fp32")
    site_dir = package.path / SITE_DIR
    site_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=site_dir))
    try:
        with onnx_step(f"{fp32.name}: site calibration"):
            int8 = quantize_int8(fp32, calibration, work / SITE_MODEL, scaled)
            finish_model(int8, manifest["study"]["hash"], manifest["inputs"]["scaling_method"], calibration[:CHECK_ROWS])
            z32, z_site = run_onnx(fp32, x_test), run_onnx(int8, x_test)
            z_pkg = run_onnx(package.model_path("int8"), x_test) if "int8" in manifest["models"] else None
        auc32, auc_site = roc_auc(y_test, z32), roc_auc(y_test, z_site)
        result: dict[str, Any] = {
            "format": "fedcare-site-quantization/1",
            "created": utc_now(),
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
        if z_pkg is not None:
            auc_pkg = roc_auc(y_test, z_pkg)
            result.update({"auc_int8_package": round(auc_pkg, 6), "abs_delta_auc_package": round(abs(auc32 - auc_pkg), 6),
                           **_risk_error("package", z32, z_pkg),
                           "package_int8_calibration": manifest["models"]["int8"].get("calibration")})
        int8.replace(site_dir / SITE_MODEL)
        (site_dir / SITE_REPORT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
