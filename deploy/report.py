"""The coordinator's study report: the schema of `fedcare.report`, holding only what the coordinator
may know (aggregates; no per-site ε, metric or size; no patient data).

Fields the coordinator cannot know are `null` with a `*_note` saying why.
"""

from __future__ import annotations

from export.calibration import spec_calibration_inputs
from export.onnx_export import export_fp32, quantize_int8
from fedcare.model import build_model, set_weights
from fedcare.report import build_report
from fedcare.run_record import RunRecord

NO_DATA = "the coordinator holds no patient data"


def export_global_model(record: RunRecord) -> dict:
    """Export the run's final checkpoint to fp32 and int8 ONNX (int8 calibrated from the spec alone),
    with the run's scaling."""
    study = record.study()
    weights, checkpoint = record.final_weights(study.hash)
    model = build_model(study)
    set_weights(model, weights)
    fp32 = export_fp32(model, study, record.path / "export" / "model.onnx")
    int8 = quantize_int8(fp32, spec_calibration_inputs(study), record.path / "export" / "model.int8.onnx", study)
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


def coordinator_report(record: RunRecord, site_names: list[str], wall_seconds: float) -> dict:
    study = record.study()
    rounds = record.rounds()
    last = rounds[-1] if rounds else None
    return build_report(
        record,
        sites=[
            {"name": name, "epsilon": None, "epsilon_target": study.privacy.epsilon, "delta": study.privacy.delta, "auc": None}
            for name in site_names
        ],
        sites_note="per-site ε and metrics stay at the sites (each site's accountant); the coordinator sees aggregates only",
        final={"auc": last["auc"] if last else None, "loss": last["loss"] if last else None, "accuracy": None,
               "source": "federated evaluation of the final global model (sum of the sites' score histograms)"},
        baseline={"auc": None, "note": NO_DATA},
        export=export_global_model(record),
        wall_seconds=wall_seconds,
    )
