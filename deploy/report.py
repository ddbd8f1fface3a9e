"""The coordinator's study report: the schema of `fedcare.report`, holding only what the coordinator
may know (aggregates; no per-site ε, metric or size; no patient data).

Fields the coordinator cannot know are `null` with a `*_note` saying why.
"""

from __future__ import annotations

from export.pipeline import export_models
from fedcare.metrics import calibration_from_histogram, roc_from_histogram
from fedcare.report import build_report
from fedcare.run_record import RunRecord

NO_DATA = "the coordinator holds no patient data"


def export_global_model(record: RunRecord) -> dict:
    """Export the run's final checkpoint to fp32 and int8 ONNX (int8 calibrated from the spec alone),
    with the run's scaling."""
    study = record.study()
    weights, checkpoint = record.final_weights(study.hash)
    exported = export_models(study, weights, record.path / "export")
    for model in (exported.fp32, exported.int8):
        record.seal_in_place(model.path)  # the weights stay sealed at rest on a deployed coordinator
    return {
        "onnx": str(exported.fp32.path),
        "onnx_int8": str(exported.int8.path),
        "auc_fp32": None,
        "auc_int8": None,
        "auc_note": f"{NO_DATA}; measure on site",
        "bytes_fp32": exported.fp32.bytes,
        "bytes_int8": exported.int8.bytes,
        "calibration": "spec-derived inputs (no patient rows)",
        "checkpoint": str(checkpoint),
    }


def final_model_metrics(record: RunRecord) -> dict:
    """The final model's federated evaluation: AUC and loss from the round log; its pooled ROC and
    reliability table from the summed score histograms of that same evaluation (an aggregate over all
    sites, never one site's), when the run recorded them."""
    last = record.final_evaluation()
    final = {"auc": last.get("auc"), "loss": last.get("loss"), "accuracy": None,
             "source": "federated evaluation of the final global model (sum of the sites' score histograms)"}
    recorded = record.evaluation_histogram()
    if recorded is not None and last and recorded[0] == last.get("round"):
        histogram = recorded[1]
        final.update({"test_rows": int(histogram.sum()), "roc": roc_from_histogram(histogram),
                      "calibration": calibration_from_histogram(histogram)})
    return final


def coordinator_report(record: RunRecord, site_names: list[str], wall_seconds: float) -> dict:
    study = record.study()
    return build_report(
        record,
        sites=[
            {"name": name, "epsilon": None, "epsilon_target": study.privacy.epsilon, "delta": study.privacy.delta, "auc": None}
            for name in site_names
        ],
        sites_note="per-site ε and metrics stay at the sites (each site's accountant); the coordinator sees aggregates only",
        final=final_model_metrics(record),
        baseline={"auc": None, "note": NO_DATA},
        export=export_global_model(record) if record.latest_checkpoint() is not None
        else {"note": "no round was securely aggregated: there is no global model to export"},
        wall_seconds=wall_seconds,
    )
