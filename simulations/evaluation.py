"""The evaluator's view of a simulated study (simulation only: the evaluator may read every site's files).

`evaluate_study` scores the final global model on each site's test split and on their union, reads
each site's privacy spend from its own ledger, trains the non-private centralized baselines on the
union of the training splits, and exports and quantizes the model. Per site and pooled it reports
AUC, accuracy, balanced accuracy, Brier score, the ROC curve and the reliability table, and the
mean over sites (the cross-silo benchmarks' headline number) beside the pooled one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.data import SiteData, load_site
from client.training import train_plain
from export.onnx_export import run_onnx
from export.pipeline import export_models
from fedcare.errors import FedcareError
from fedcare.features import model_inputs
from fedcare.metrics import (
    accuracy,
    balanced_accuracy,
    brier_score,
    calibration_table,
    log_loss,
    roc_auc,
    roc_curve,
)
from fedcare.model import build_model, predict_proba, set_weights
from fedcare.report import build_report
from fedcare.run_record import RunRecord
from fedcare.site import simulated_site_folders
from fedcare.study import Study, load_study
from privacy.ledger import PrivacyLedger, rounds_of

CALIBRATION_ROWS = 2048
CONVERGED_MAX_EPOCHS = 200  # the converged baseline stops earlier once its validation loss stops improving
CONVERGED_PATIENCE = 8
SITE_MEAN_METRICS = ("auc", "accuracy", "balanced_accuracy", "brier")


class EvaluationError(FedcareError, RuntimeError):
    """The simulated study ran but cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class EvaluatedSite:
    """A site as the evaluator sees it: its folder, where its ledger is, and its data."""

    name: str
    state_dir: Path
    data: SiteData


def round4(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Every metric the report holds for one set of test rows."""
    return {
        "auc": round4(roc_auc(labels, probs)),
        "accuracy": round4(accuracy(labels, probs)),
        "balanced_accuracy": round4(balanced_accuracy(labels, probs)),
        "brier": round4(brier_score(labels, probs)),
        "roc": roc_curve(labels, probs),
        "calibration": calibration_table(labels, probs),
    }


def site_mean(sites: list[dict]) -> dict:
    """The unweighted mean over sites of each metric (sites where it is undefined are left out)."""
    mean = {}
    for key in SITE_MEAN_METRICS:
        values = [s[key] for s in sites if s.get(key) is not None]
        mean[key] = round(float(np.mean(values)), 4) if values else None
    mean["sites"] = len(sites)
    return mean


def load_sites(study: Study, sites_dir: Path, *, state_root: Path | None) -> list[EvaluatedSite]:
    """Every site folder under `sites_dir` (in the order the simulation assigned them to nodes)."""
    folders = simulated_site_folders(sites_dir)
    return [EvaluatedSite(name=f.name, state_dir=(state_root / f.name) if state_root else f / ".fedcare",
                          data=load_site(study, f)) for f in folders]


def train_converged(study: Study, x: np.ndarray, y: np.ndarray, *, seed: int):
    """The centralized non-private model trained to convergence: epochs of `train_plain` until the loss
    on a held-out 10 % of the training rows has not improved for CONVERGED_PATIENCE epochs; the best
    epoch's model is kept. Returns (model, epochs trained)."""
    import copy

    order = np.random.default_rng(seed).permutation(len(y))
    held = order[: max(1, len(y) // 10)]
    fit = order[len(held):]
    model = build_model(study)
    best, best_loss, best_epoch, epoch = copy.deepcopy(model.state_dict()), np.inf, 0, 0
    while epoch < CONVERGED_MAX_EPOCHS and epoch - best_epoch < CONVERGED_PATIENCE:
        epoch += 1
        train_plain(study, model, x[fit], y[fit], 1, seed=seed + epoch)
        loss = log_loss(y[held], predict_proba(model, x[held]))
        if loss < best_loss - 1e-5:
            best, best_loss, best_epoch = copy.deepcopy(model.state_dict()), loss, epoch
    model.load_state_dict(best)
    return model, best_epoch


def evaluate_study(record: RunRecord, sites_dir: Path, *, state_root: Path | None, wall_started: float,
                   ground_truth_auc: float | None = None) -> dict:
    """The report of the simulated run in `record` whose sites' folders are under `sites_dir` (their
    ledgers under `state_root/<site>`, or each site's `.fedcare`)."""
    scaled = record.study()  # the study as run, with the scaling the sites trained with
    study = load_study(record.study_file)  # as agreed (the spec's scaling: the sites' files are raw)
    weights, _ = record.final_weights(study.hash)
    model = build_model(study)
    set_weights(model, weights)
    sites, test_x, test_y, train_x, train_y = [], [], [], [], []
    for site in load_sites(study, sites_dir, state_root=state_root):
        x_test = model_inputs(scaled, site.data.test.features)
        labels = site.data.test.labels
        test_x.append(x_test)
        test_y.append(labels)
        train_x.append(model_inputs(scaled, site.data.train.features))
        train_y.append(site.data.train.labels)
        spent = rounds_of(PrivacyLedger(site.state_dir).entries(), study.budget_key)
        if not spent:
            raise EvaluationError(f"{site.name}: its privacy ledger records no round; the site never trained")
        sites.append({
            "name": site.name,
            "epsilon": round(spent[-1].epsilon_study, 4),
            "epsilon_target": study.privacy.epsilon,
            "delta": study.privacy.delta,
            "noise_multiplier": round(spent[-1].noise_multiplier, 4),
            "rounds_trained": len(spent),
            "train_rows": int(len(site.data.train.labels)),
            "test_rows": int(len(labels)),
            "prevalence": round(float(labels.mean()), 4) if len(labels) else None,
            **scores(labels, predict_proba(model, x_test)),
        })
    x_all, y_all = np.concatenate(test_x), np.concatenate(test_y)
    x_train, y_train = np.concatenate(train_x), np.concatenate(train_y)
    probs = predict_proba(model, x_all)

    baseline = build_model(study)
    baseline_epochs = study.training.rounds * study.training.local_epochs
    train_plain(study, baseline, x_train, y_train, baseline_epochs)
    converged, converged_epochs = train_converged(study, x_train, y_train, seed=study.model.seed)

    calibration = _calibration_sample(x_train, study.model.seed)
    exported = export_models(scaled, weights, record.path / "export", calibration=calibration)
    report = build_report(
        record,
        sites=sites,
        final={
            **scores(y_all, probs),
            "loss": round(log_loss(y_all, probs), 4),
            "test_rows": int(len(y_all)),
            "prevalence": round(float(y_all.mean()), 4),
        },
        baseline={
            "auc": round(roc_auc(y_all, predict_proba(baseline, x_all)), 4),
            "epochs": baseline_epochs,
            "private": False,
            "converged_auc": round(roc_auc(y_all, predict_proba(converged, x_all)), 4),
            "converged_epochs": converged_epochs,
        },
        ground_truth_auc=ground_truth_auc,
        export={
            "onnx": str(exported.fp32.path),
            "onnx_int8": str(exported.int8.path),
            "auc_fp32": round(roc_auc(y_all, run_onnx(exported.fp32.path, x_all)), 5),
            "auc_int8": round(roc_auc(y_all, run_onnx(exported.int8.path, x_all)), 5),
            "bytes_fp32": exported.fp32.bytes,
            "bytes_int8": exported.int8.bytes,
            "calibration": f"{len(calibration)} rows sampled from the sites' training splits (simulation only)",
        },
        wall_seconds=time.monotonic() - wall_started,
    )
    report["site_mean"] = site_mean(sites)  # the cross-silo benchmarks' headline metric, beside the pooled one
    return report


def _calibration_sample(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x[rng.permutation(len(x))[:CALIBRATION_ROWS]]
