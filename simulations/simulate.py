"""`fedcare simulate`: one whole study on one machine, from synthetic hospitals to quantized ONNX.

1. Write N synthetic hospitals' files under `<out>/sites/`.
2. Run the fedcare ServerApp/ClientApp in Flower's simulation engine (SecAgg+ + DP-SGD), with the
   study file and the overrides exactly as `fedcare run` passes them: the ServerApp writes the run
   folder (`fedcare.run_record`) into `<out>/` itself, the same folder a deployed run writes.
3. As the evaluator (who, in simulation only, may read every site's files): score the final
   global model on the union of the sites' test splits, read each site's privacy spend,
   train the non-private centralized baseline, export and quantize the model.
4. Write `report.json` and `summary.txt` (`fedcare.report`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.data import load_site
from client.training import train_plain
from export.onnx_export import run_onnx
from export.pipeline import export_models
from fedcare import DEFAULT_STUDY
from fedcare.errors import FedcareError
from fedcare.features import model_inputs
from fedcare.metrics import accuracy, log_loss, roc_auc
from fedcare.model import build_model, predict_proba, set_weights
from fedcare.report import build_report, write_report
from fedcare.run_record import RunRecord
from fedcare.study import Overrides, Study, StudyConfigError, load_study
from privacy.ledger import PrivacyLedger, rounds_of
from simulations.cohorts import write_cohorts
from simulations.engine import run_flower_simulation

CALIBRATION_ROWS = 2048


@dataclass(frozen=True)
class SimulationOptions:
    hospitals: int = 5
    rounds: int | None = None
    epsilon: float | None = None
    study: Path = DEFAULT_STUDY
    seed: int = 42
    out: Path = Path("runs/latest")
    size_scale: float = 1.0
    verbose: bool = False
    data_format: str = "csv"  # how each synthetic site exports its data: csv | parquet | fhir


class SimulationError(FedcareError, RuntimeError):
    """The simulated study could not complete; the message says why."""


def prepare_study(opts: SimulationOptions) -> Study:
    study = load_study(opts.study).with_overrides(Overrides(rounds=opts.rounds, epsilon=opts.epsilon))
    if opts.hospitals < study.strategy.min_sites:
        raise StudyConfigError(
            f"--hospitals: {opts.hospitals} is fewer than the study's strategy.min_sites ({study.strategy.min_sites})"
        )
    return study


def simulate(opts: SimulationOptions) -> dict:
    """Run the study and return the report (also written to `<out>/report.json`)."""
    started = time.monotonic()
    overrides = Overrides(rounds=opts.rounds, epsilon=opts.epsilon)
    study = prepare_study(opts)
    out = Path(opts.out).resolve()
    if (out / "study.toml").exists() or (out / "sites").exists():
        raise SimulationError(f"--out: {out} already holds a study run; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)

    print(f"writing {opts.hospitals} synthetic hospitals (seed {opts.seed}) to {out / 'sites'}", flush=True)
    cohorts = write_cohorts(study, out / "sites", opts.hospitals, opts.seed, opts.size_scale)
    render_sites(study, out / "sites", opts.data_format)
    run_flower_simulation(
        opts.hospitals,
        {"study": str(Path(opts.study).resolve()), "out-dir": str(out), "sim-sites-dir": str(out / "sites"),
         **overrides.run_config()},
        verbose=opts.verbose,
    )
    record = RunRecord(out)
    if record.latest_checkpoint() is None:
        raise SimulationError("no round was securely aggregated; see the log above for the SecAgg+ failure")
    report = evaluate_study(record, cohorts, wall_started=started)
    write_report(record, report)
    return report


def render_sites(study: Study, sites_dir: Path, data_format: str) -> None:
    """Re-export every synthetic site's splits as Parquet or FHIR R4 NDJSON (replacing the CSVs),
    so the study runs through that reader end to end."""
    if data_format == "csv":
        return
    if data_format not in ("parquet", "fhir"):
        raise SimulationError(f"--format: expected csv, parquet or fhir, got {data_format!r}")
    if data_format == "fhir" and study.mapping is None:
        raise SimulationError("--format fhir: the study has no [mapping] section saying how features come from FHIR")
    for site in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
        if data_format == "parquet":
            write_parquet_splits(study, site)
        else:
            from simulations.fhir_cohorts import write_fhir_site

            write_fhir_site(study, study.mapping, site)
        for split in ("train", "test"):
            (site / f"{split}.csv").unlink()
    print(f"synthetic sites exported as {data_format}", flush=True)


def write_parquet_splits(study: Study, site: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from client.data import read_site_csv

    for split in ("train", "test"):
        table = read_site_csv(study, site / f"{split}.csv")
        columns = {f.name: pa.array(table.features[:, i]) for i, f in enumerate(study.features)}
        columns[study.label.name] = pa.array(table.labels.astype("int64"))
        pq.write_table(pa.table(columns), site / f"{split}.parquet")


def evaluate_study(record: RunRecord, cohorts: dict, *, wall_started: float) -> dict:
    """The evaluator's view: final metrics, per-site ε and AUC, baseline, export."""
    scaled = record.study()  # the study as run, with the scaling the sites trained with
    study = load_study(record.study_file)  # as agreed (the spec's scaling: the sites' files are raw)
    weights, _ = record.final_weights(study.hash)
    model = build_model(study)
    set_weights(model, weights)
    out = record.path
    site_dirs = [out / "sites" / s["name"] for s in cohorts["sites"]]
    sites, test_x, test_y, train_x, train_y = [], [], [], [], []
    for site_dir in site_dirs:
        data = load_site(study, site_dir)
        x_test = model_inputs(scaled, data.test.features)
        test_x.append(x_test)
        test_y.append(data.test.labels)
        train_x.append(model_inputs(scaled, data.train.features))
        train_y.append(data.train.labels)
        spent = rounds_of(PrivacyLedger(site_dir / ".fedcare").entries(), study.budget_key)
        if not spent:
            raise SimulationError(f"{site_dir.name}: its privacy ledger records no round; the site never trained")
        sites.append(
            {
                "name": site_dir.name,
                "epsilon": round(spent[-1].epsilon_study, 4),
                "delta": study.privacy.delta,
                "noise_multiplier": round(spent[-1].noise_multiplier, 4),
                "rounds_trained": len(spent),
                "train_rows": int(len(data.train.labels)),
                "test_rows": int(len(data.test.labels)),
                "auc": round(roc_auc(data.test.labels, predict_proba(model, x_test)), 4),
            }
        )
    x_all, y_all = np.concatenate(test_x), np.concatenate(test_y)
    probs = predict_proba(model, x_all)

    baseline = build_model(study)
    baseline_epochs = study.training.rounds * study.training.local_epochs
    train_plain(study, baseline, np.concatenate(train_x), np.concatenate(train_y), baseline_epochs)

    calibration = _calibration_sample(np.concatenate(train_x), study.model.seed)
    exported = export_models(scaled, weights, out / "export", calibration=calibration)
    auc_fp32 = roc_auc(y_all, run_onnx(exported.fp32.path, x_all))
    auc_int8 = roc_auc(y_all, run_onnx(exported.int8.path, x_all))
    return build_report(
        record,
        sites=sites,
        final={
            "auc": round(roc_auc(y_all, probs), 4),
            "accuracy": round(accuracy(y_all, probs), 4),
            "loss": round(log_loss(y_all, probs), 4),
            "test_rows": int(len(y_all)),
            "prevalence": round(float(y_all.mean()), 4),
        },
        baseline={
            "auc": round(roc_auc(y_all, predict_proba(baseline, x_all)), 4),
            "epochs": baseline_epochs,
            "private": False,
        },
        ground_truth_auc=cohorts["ground_truth_auc"],
        export={
            "onnx": str(exported.fp32.path),
            "onnx_int8": str(exported.int8.path),
            "auc_fp32": round(auc_fp32, 5),
            "auc_int8": round(auc_int8, 5),
            "bytes_fp32": exported.fp32.bytes,
            "bytes_int8": exported.int8.bytes,
            "calibration": f"{len(calibration)} rows sampled from the sites' training splits (simulation only)",
        },
        wall_seconds=time.monotonic() - wall_started,
    )


def _calibration_sample(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x[rng.permutation(len(x))[:CALIBRATION_ROWS]]
