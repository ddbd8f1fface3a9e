"""The coordinator's study report: the same schema as `fedcare simulate`, holding only what the
coordinator may know (aggregates; no per-site ε, metric or size; no patient data).

Fields the coordinator cannot know are `null` with a `*_note` saying why.
"""

from __future__ import annotations

from pathlib import Path

from export.calibration import spec_calibration_inputs
from export.onnx_export import export_fp32, quantize_int8
from fedcare.model import build_model, set_weights
from fedcare.study import Study
from server.progress import latest_checkpoint, load_checkpoint, read_round_log, scaled_study

NO_DATA = "the coordinator holds no patient data"


def export_global_model(study: Study, run_dir: Path) -> dict:
    """Export the latest checkpoint to fp32 and int8 ONNX (int8 calibrated from the spec alone),
    with the run's federated scaling when it has one."""
    scaled = scaled_study(study, run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint; no round was securely aggregated")
    model = build_model(study)
    set_weights(model, load_checkpoint(checkpoint, study.hash))
    fp32 = export_fp32(model, scaled, run_dir / "export" / "model.onnx")
    int8 = quantize_int8(fp32, spec_calibration_inputs(scaled), run_dir / "export" / "model.int8.onnx", scaled)
    return {
        "onnx": str(fp32),
        "onnx_int8": str(int8),
        "auc_fp32": None,
        "auc_int8": None,
        "auc_note": f"{NO_DATA}; measure on site",
        "bytes_fp32": fp32.stat().st_size,
        "bytes_int8": int8.stat().st_size,
        "calibration": "spec-derived inputs (no patient rows)",
        "checkpoint": str(checkpoint),
    }


def scaling_report(study: Study, run_dir: Path) -> dict:
    """The feature scaling the run used: federated (pooled statistics) or the spec's."""
    scaled = scaled_study(study, run_dir)
    return {
        "method": "federated" if scaled is not study else "spec",
        "features": {f.name: {"center": round(f.center, 6), "scale": round(f.scale, 6)} for f in scaled.features},
    }


def coordinator_report(study: Study, run_dir: Path, site_names: list[str], wall_seconds: float) -> dict:
    rounds = read_round_log(run_dir)
    last = rounds[-1] if rounds else None
    return {
        "study": study.name,
        "study_hash": study.hash,
        "secure_aggregation": True,
        "rounds": rounds,
        "sites": [
            {"name": name, "epsilon": None, "epsilon_target": study.privacy.epsilon, "delta": study.privacy.delta, "auc": None}
            for name in site_names
        ],
        "sites_note": "per-site ε and metrics stay at the sites (each site's accountant); the coordinator sees aggregates only",
        "final": {"auc": last["auc"] if last else None, "loss": last["loss"] if last else None, "accuracy": None,
                  "source": "federated evaluation of the final global model (sum of the sites' score histograms)"},
        "baseline_centralized": {"auc": None, "note": NO_DATA},
        "export": export_global_model(study, run_dir),
        "scaling": scaling_report(study, run_dir),
        "privacy": {
            "target_epsilon": study.privacy.epsilon,
            "delta": study.privacy.delta,
            "clipping_norm": study.privacy.clipping_norm,
            "accountant": study.privacy.accountant,
        },
        "wall_seconds": round(wall_seconds, 2),
    }
