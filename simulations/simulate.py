"""`fedcare simulate`: one whole study on one machine, from site data to quantized ONNX.

1. The sites: N synthetic hospitals written under `<out>/sites/` (`--hospitals`), or the evaluator's
   own folders (`--sites DIR`: every sub-folder is one site, CSV, Parquet or FHIR, with its optional
   `site.toml` policy), each checked as `fedcare data check` does before anything starts.
2. Run the fedcare ServerApp/ClientApp in Flower's simulation engine (SecAgg+ + DP-SGD), with the
   study file and the overrides exactly as `fedcare run` passes them: the ServerApp writes the run
   folder (`fedcare.run_record`) into `<out>/` itself, the same folder a deployed run writes. With
   `--sites`, the sites' ledgers are kept under `<out>/state/<site>`: the data folders are only read.
3. As the evaluator (who, in simulation only, may read every site's files): `simulations.evaluation`.
4. Write `report.json` and `summary.txt` (`fedcare.report`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from client.check import check_site_export
from deploy.progress_display import DisplayedLines, RunDisplay
from client.data import read_site_csv
from fedcare import DEFAULT_STUDY
from fedcare.errors import FedcareError
from fedcare.report import write_report
from fedcare.run_record import RunRecord
from fedcare.site import simulated_site_folders
from fedcare.study import Overrides, Study, StudyConfigError, load_study
from simulations.cohorts import write_cohorts
from simulations.engine import run_flower_simulation
from simulations.evaluation import evaluate_study


@dataclass(frozen=True)
class SimulationOptions:
    """What `fedcare simulate` runs. `sites` (the evaluator's own site folders) or `hospitals`
    (synthetic ones, with `seed`, `size_scale` and `data_format`)."""

    hospitals: int = 5
    rounds: int | None = None
    epsilon: float | None = None
    study: Path = DEFAULT_STUDY
    seed: int = 42
    out: Path = Path("runs/latest")
    size_scale: float = 1.0
    verbose: bool = False
    data_format: str = "csv"  # how each synthetic site exports its data: csv | parquet | fhir
    sites: Path | None = None
    cpus_per_site: float = 1.0  # Ray CPU share of one virtual site (simulations.engine)


class SimulationError(FedcareError, RuntimeError):
    """The simulated study could not complete; the message says why."""


def prepare_study(opts: SimulationOptions) -> Study:
    study = load_study(opts.study).with_overrides(Overrides(rounds=opts.rounds, epsilon=opts.epsilon))
    if opts.sites is None and opts.hospitals < study.strategy.min_sites:
        raise StudyConfigError(
            f"--hospitals: {opts.hospitals} is fewer than the study's strategy.min_sites ({study.strategy.min_sites})"
        )
    return study


def check_site_folders(study: Study, sites_dir: Path) -> list[Path]:
    """The evaluator's site folders, each read as `fedcare data check` reads it; one line naming the
    folder, file and reason for the first that cannot take part."""
    if not sites_dir.is_dir():
        raise SimulationError(f"--sites: {sites_dir} is not a directory of site folders")
    folders = simulated_site_folders(sites_dir)
    if len(folders) < study.strategy.min_sites:
        raise SimulationError(f"--sites: {sites_dir} has {len(folders)} site folder(s), fewer than the study's "
                              f"strategy.min_sites ({study.strategy.min_sites})")
    for folder in folders:
        check = check_site_export(study, folder)
        if check.fatal:
            raise SimulationError(f"--sites: site {folder.name}: " + "; ".join(check.problems))
        for warning in check.warnings:
            print(f"site {folder.name}: WARNING: {warning}", flush=True)
    return folders


def simulate(opts: SimulationOptions) -> dict:
    """Run the study and return the report (also written to `<out>/report.json`)."""
    started = time.monotonic()
    overrides = Overrides(rounds=opts.rounds, epsilon=opts.epsilon)
    study = prepare_study(opts)
    cores = os.cpu_count() or 1
    if not 0 < opts.cpus_per_site <= cores:
        raise SimulationError(f"--cpus-per-site: {opts.cpus_per_site:g} must be more than 0 and at most {cores} "
                              "(this machine's cores)")
    out = Path(opts.out).resolve()
    if (out / "study.toml").exists() or (out / "sites").exists():
        raise SimulationError(f"--out: {out} already holds a study run; choose an empty directory")
    ground_truth = None
    if opts.sites is not None:
        sites_dir = Path(opts.sites).resolve()
        if sites_dir == out or out in sites_dir.parents or sites_dir in out.parents:
            raise SimulationError(f"--out: {out} must not be inside --sites {sites_dir} (or hold it)")
        folders = check_site_folders(study, sites_dir)
        state_root: Path | None = out / "state"
        print(f"{len(folders)} sites from {sites_dir}: {', '.join(f.name for f in folders)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        sites_dir, state_root = out / "sites", None
        print(f"writing {opts.hospitals} synthetic hospitals (seed {opts.seed}) to {sites_dir}", flush=True)
        cohorts = write_cohorts(study, sites_dir, opts.hospitals, opts.seed, opts.size_scale)
        render_sites(study, sites_dir, opts.data_format)
        folders, ground_truth = simulated_site_folders(sites_dir), cohorts["ground_truth_auc"]
    # The ServerApp runs in this process: its output goes through the same display as `fedcare run`'s
    # (a live status line of round, SecAgg+ stage and sites answered on a terminal).
    display = RunDisplay(verbose=opts.verbose)
    try:
        with contextlib.redirect_stdout(DisplayedLines(display)):
            run_flower_simulation(
                len(folders),
                {"study": str(Path(opts.study).resolve()), "out-dir": str(out), "sim-sites-dir": str(sites_dir),
                 "sim-state-dir": str(state_root or ""), "progress": 1, **overrides.run_config()},
                verbose=opts.verbose,
                cpus_per_site=opts.cpus_per_site,
            )
    finally:
        display.close()
    record = RunRecord(out)
    record.save_simulation([f.name for f in folders], sites_dir)  # `fedcare export --run OUT` signs for these sites
    if record.latest_checkpoint() is None:
        outcome = record.outcome()
        why = f": {outcome.stopped}" if outcome is not None and outcome.stopped else "; see the log above for the SecAgg+ failure"
        raise SimulationError(f"no round was securely aggregated{why}")
    report = evaluate_study(record, sites_dir, state_root=state_root, wall_started=started,
                            ground_truth_auc=ground_truth)
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

    for split in ("train", "test"):
        table = read_site_csv(study, site / f"{split}.csv")
        columns = {f.name: pa.array(table.features[:, i]) for i, f in enumerate(study.features)}
        columns[study.label.name] = pa.array(table.labels.astype("int64"))
        pq.write_table(pa.table(columns), site / f"{split}.parquet")
