"""The run record: the one folder a study run writes, and what export, the report and serving read.

`fedcare simulate` and `fedcare run` write the same folder (the ServerApp writes it in both):

    study.toml                 the study exactly as agreed for this run (the run's overrides applied);
                               its hash is the one every site checked before training
    run.json                   the run's overrides of the study file (rounds, epsilon), its start time, the
                               times it was resumed (`fedcare run --resume`) and, once it ended, its outcome:
                               completed or stopped early (why), rounds aggregated
    scaling.json               the federated standardization (pooled per-feature counts, center, scale),
                               when the study asks for one: `RunRecord.study()` applies it
    checkpoints/round-NNN.npz  the global weights after each aggregated training round (with the study hash)
    checkpoints/server-optimizer-NNN.npz
                               beside it, for a strategy with state (FedAvgM's momentum, FedAdam's m and v,
                               ...): the server optimizer's state after that round, so a resumed run goes on
                               exactly as an uninterrupted one would (written before the round's checkpoint)
    rounds.jsonl               one line per training round: UTC time, aggregated or not (by how many sites,
                               or why not), the federated evaluation of the model after it, seconds
    evaluation.json            the summed score histograms of the latest federated evaluation (an aggregate
                               over the sites) and the round of the model it scored: the report's ROC and calibration
    privacy.json               the study's privacy targets (and, in simulation only, each site's spent ε)
    report.json, summary.txt   the study report (`fedcare.report`)
    export/                    the final model as fp32 and int8 ONNX

Sealed at rest (a deployed coordinator's runs: `RunRecord(path, key=ArtifactKey)`, the kit's
`artifact.key`): the files that hold the model's weights (checkpoints/*.npz, the server
optimizer's state, export/*.onnx) are written sealed (`fedcare.sealing`, each under its own name
in this folder), and run.json records the key's fingerprint (`sealed`); reading them needs the key,
a sealed run's file found unsealed is refused (replaced). The rest holds no weights: the study,
aggregates (round log, summed histograms, pooled scaling) and the report stay readable for
`fedcare status` and the operator.

Nothing reconstructs a run afterwards: what the run used is what this folder says.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.errors import FedcareError
from fedcare.files import atomic_write_bytes
from fedcare.sealing import ARTIFACT_MAGIC, ArtifactKey, SealError, is_sealed
from fedcare.study import Overrides, Study, load_study

STUDY_FILE = "study.toml"
RUN_FILE = "run.json"
SCALING_FILE = "scaling.json"
ROUNDS_FILE = "rounds.jsonl"
PRIVACY_FILE = "privacy.json"
REPORT_FILE = "report.json"
EVALUATION_FILE = "evaluation.json"
SIMULATION_FILE = "simulation.json"  # `fedcare simulate` only: the sites that took part
CHECKPOINTS = "checkpoints"
OPTIMIZER_STATE = "server-optimizer"  # checkpoints/server-optimizer-NNN.npz (not matched by round-*.npz)
STATE_PREFIX = "state:"


class RunRecordError(FedcareError, ValueError):
    """A run folder is missing a part, or a part belongs to another study; the message names the file."""


@dataclass(frozen=True)
class RoundEntry:
    """One training round as the coordinator saw it (aggregates only)."""

    round: int
    aggregated: bool  # a secure aggregate was applied to the global model
    sites_aggregated: int  # how many sites' masked vectors made up the aggregate (0 if none)
    auc: float | None  # federated evaluation of the model after this round
    loss: float | None
    sites_evaluated: int
    seconds: float | None  # training round time, None if not aggregated
    time: str = ""  # UTC, ISO 8601, of the entry's last update
    note: str = ""  # why the round has no aggregate (halted, skipped), "" otherwise


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run goes on: after its last aggregated training round."""

    last_round: int  # the last aggregated training round (0: none; the run starts over from the initial model)
    weights: list[np.ndarray] | None  # that round's checkpoint (None with last_round 0)
    scaling: dict | None  # the federated scaling already computed, if any
    entries: list[RoundEntry]  # the round log so far
    optimizer_state: dict[str, np.ndarray] | None = None  # the server optimizer's state after last_round, if saved


@dataclass(frozen=True)
class Outcome:
    """How a run ended: all planned training rounds ran, or training stopped early and why."""

    completed: bool
    rounds_planned: int
    rounds_aggregated: int
    stopped: str = ""  # why training stopped early ("" when completed)
    finished: str = ""  # UTC, ISO 8601


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


class RunRecord:
    """The folder of one study run (see the module docstring). With `key`, the files holding the
    model's weights are sealed under it when written, and opened with it when read."""

    def __init__(self, path: str | Path, *, key: ArtifactKey | None = None) -> None:
        self.path = Path(path)
        self.key = key

    # -- sealed artifacts ------------------------------------------------------------------

    def _name(self, path: Path) -> str:
        return path.resolve().relative_to(self.path.resolve()).as_posix()

    def write_artifact(self, path: Path, data: bytes) -> None:
        """Write a file that holds weights: sealed under the run's key if it has one."""
        atomic_write_bytes(path, self.key.seal(data, self._name(path)) if self.key is not None else data)

    def seal_in_place(self, path: Path) -> None:
        """Seal a weights file another writer produced in this folder (e.g. the exported ONNX)."""
        if self.key is not None:
            self.write_artifact(path, path.read_bytes())

    def read_artifact(self, path: Path) -> bytes:
        """A weights file's contents, opened with the run's key if it is sealed."""
        data = path.read_bytes()
        sealed_by = self.sealed_by()
        if not is_sealed(data, ARTIFACT_MAGIC):
            if sealed_by is not None:
                raise RunRecordError(f"{path}: not sealed, but this run seals its artifacts under {sealed_by}: "
                                     f"the file was replaced; refusing it")
            return data
        if self.key is None:
            raise RunRecordError(f"{path}: sealed under the coordinator's artifact.key ({sealed_by or 'unknown key'}); "
                                 f"give the coordinator kit that holds it (--kit)")
        try:
            return self.key.open(data, self._name(path), what=str(path))
        except SealError as err:
            raise RunRecordError(str(err)) from None

    def sealed_by(self) -> str | None:
        """The fingerprint of the key this run's artifacts are sealed under (run.json), or None."""
        try:
            return json.loads((self.path / RUN_FILE).read_text(encoding="utf-8")).get("sealed", {}).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    # -- the study as run ----------------------------------------------------------------

    @property
    def study_file(self) -> Path:
        return self.path / STUDY_FILE

    def start(self, study: Study, overrides: Overrides) -> None:
        """Record the study as agreed for this run (the file's study with `overrides`).
        A folder that already holds another study is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.study_file.exists():
            self._check_recorded_study(study)
        else:
            atomic_write_bytes(self.study_file, study.to_toml().encode("utf-8"))
            if load_study(self.study_file).hash != study.hash:
                raise RunRecordError(f"{self.study_file}: internal error: the written study does not reproduce its hash")
        run = {"study_hash": study.hash, "overrides": {"rounds": overrides.rounds, "epsilon": overrides.epsilon},
               "started": utc_now()}
        if self.key is not None:
            run["sealed"] = {"key": self.key.fingerprint, "files": "checkpoints/*.npz, export/*.onnx"}
        atomic_write_bytes(self.path / RUN_FILE, _json_bytes(run))

    def _check_recorded_study(self, study: Study) -> None:
        recorded = load_study(self.study_file)
        if recorded.hash != study.hash:
            raise RunRecordError(f"{self.study_file}: holds study {recorded.hash[:12]}…, not this run's {study.hash[:12]}…")

    def resume(self, study: Study) -> ResumePoint:
        """Take up this interrupted run again with `study` (which must be the study it ran): note the
        resumption in run.json (its outcome, if any, is cleared) and return where it goes on."""
        if not self.study_file.is_file():
            raise RunRecordError(f"{self.study_file}: not found; is {self.path} a fedcare run folder?")
        self._check_recorded_study(study)
        path = self.path / RUN_FILE
        run = json.loads(path.read_text(encoding="utf-8"))
        run.pop("outcome", None)
        run["resumed"] = [*run.get("resumed", []), utc_now()]
        atomic_write_bytes(path, _json_bytes(run))
        checkpoint = self.latest_checkpoint()
        last = int(checkpoint.stem.split("-")[1]) if checkpoint is not None else 0
        entries = [RoundEntry(**entry) for entry in self.rounds()]
        return ResumePoint(last_round=last, weights=self.load_checkpoint(checkpoint, study.hash) if checkpoint else None,
                           scaling=self.scaling(), entries=entries,
                           optimizer_state=self.optimizer_state(last, study.hash) if last else None)

    def overrides(self) -> Overrides:
        """The run's overrides of the study file (what a site applies to its own copy to get the run's hash)."""
        path = self.path / RUN_FILE
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))["overrides"]
            return Overrides(rounds=recorded.get("rounds"), epsilon=recorded.get("epsilon"))
        except FileNotFoundError:
            raise RunRecordError(f"{path}: not found; is {self.path} a fedcare run folder?") from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise RunRecordError(f"{path}: unreadable ({err})") from None

    def study(self) -> Study:
        """The study exactly as the run used it: the recorded file, with the run's federated scaling if any."""
        if not self.study_file.is_file():
            raise RunRecordError(f"{self.study_file}: not found; is {self.path} a fedcare run folder?")
        study = load_study(self.study_file)
        scaling = self.scaling()
        if scaling is None:
            return study
        return study.with_scaling(scaling["center"], scaling["scale"])

    def scaling(self) -> dict | None:
        path = self.path / SCALING_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def save_scaling(self, study: Study, *, center: np.ndarray, scale: np.ndarray, counts: np.ndarray) -> None:
        """The federated standardization of this run (it goes into the report and the exported model)."""
        payload = {
            "method": "federated",
            "features": [f.name for f in study.features],
            "center": [float(c) for c in center],
            "scale": [float(s) for s in scale],
            "rows_with_value": [int(n) for n in counts],
        }
        atomic_write_bytes(self.path / SCALING_FILE, _json_bytes(payload))

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint_path(self, training_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{training_round:03d}.npz"

    def save_checkpoint(self, training_round: int, weights: list[np.ndarray], study_hash: str) -> Path:
        path = self.checkpoint_path(training_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        arrays = {f"w{i:03d}": np.asarray(w) for i, w in enumerate(weights)}
        np.savez(buffer, study_hash=np.array(study_hash), **arrays)
        self.write_artifact(path, buffer.getvalue())
        return path

    def load_checkpoint(self, path: Path, expected_study_hash: str | None = None) -> list[np.ndarray]:
        """The weights in one checkpoint of this run (opened with the run's key if sealed)."""
        return load_checkpoint(io.BytesIO(self.read_artifact(path)), expected_study_hash, name=path)

    def optimizer_state_path(self, training_round: int) -> Path:
        return self.path / CHECKPOINTS / f"{OPTIMIZER_STATE}-{training_round:03d}.npz"

    def save_optimizer_state(self, training_round: int, state: dict[str, np.ndarray], study_hash: str) -> Path:
        """The server optimizer's state after `training_round` (`strategies.server_optimizers`), saved
        before that round's checkpoint: a checkpoint never exists without the state it needs."""
        path = self.optimizer_state_path(training_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **{f"{STATE_PREFIX}{k}": np.asarray(v) for k, v in state.items()}, study_hash=np.array(study_hash))
        self.write_artifact(path, buffer.getvalue())
        return path

    def optimizer_state(self, training_round: int, study_hash: str) -> dict[str, np.ndarray] | None:
        """The server optimizer's state saved with round `training_round`'s checkpoint, or None if none was
        (a stateless strategy); refused if it belongs to another study."""
        path = self.optimizer_state_path(training_round)
        if not path.exists():
            return None
        with np.load(io.BytesIO(self.read_artifact(path)), allow_pickle=False) as data:
            if str(data["study_hash"]) != study_hash:
                raise RunRecordError(f"{path}: optimizer state belongs to another study (hash {str(data['study_hash'])[:12]}…)")
            return {k[len(STATE_PREFIX):]: data[k] for k in data.files if k.startswith(STATE_PREFIX)}

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.path / CHECKPOINTS).glob("round-*.npz"))
        return found[-1] if found else None

    def final_weights(self, study_hash: str) -> tuple[list[np.ndarray], Path]:
        """(weights, file) of the latest checkpoint, which must belong to `study_hash`."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            raise RunRecordError(f"{self.path}: no checkpoint; no round was securely aggregated")
        return self.load_checkpoint(checkpoint, study_hash), checkpoint

    # -- the round log and the privacy summary -------------------------------------------

    def write_rounds(self, entries: list[RoundEntry]) -> None:
        """The round log as it stands (rewritten whole, atomically, in round order)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(asdict(e)) + "\n" for e in sorted(entries, key=lambda e: e.round))
        atomic_write_bytes(self.path / ROUNDS_FILE, lines.encode("utf-8"))

    def finish(self, outcome: Outcome) -> None:
        """Record how the run ended (in run.json, beside its overrides)."""
        path = self.path / RUN_FILE
        run = json.loads(path.read_text(encoding="utf-8"))
        atomic_write_bytes(path, _json_bytes({**run, "outcome": asdict(outcome)}))

    def outcome(self) -> Outcome | None:
        """How the run ended, or None while it runs (or if it was killed before it could say)."""
        path = self.path / RUN_FILE
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("outcome")
            return Outcome(**recorded) if recorded is not None else None
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, AttributeError) as err:
            raise RunRecordError(f"{path}: unreadable outcome ({err})") from None

    def rounds(self) -> list[dict]:
        path = self.path / ROUNDS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def final_evaluation(self) -> dict:
        """The round-log entry that holds the final model's federated evaluation: the last one evaluated
        (after an early stop, the last aggregated round's, not the skipped rounds'); {} if none."""
        evaluated = [entry for entry in self.rounds() if entry.get("auc") is not None]
        return evaluated[-1] if evaluated else {}

    def save_evaluation(self, model_round: int, histogram: np.ndarray) -> None:
        """The summed score histograms ([negatives, positives] per bin, all sites together) of the federated
        evaluation of the model after `model_round`."""
        counts = np.asarray(histogram, dtype=np.int64)
        payload = {"model_round": int(model_round), "negatives": [int(v) for v in counts[0]],
                   "positives": [int(v) for v in counts[1]]}
        atomic_write_bytes(self.path / EVALUATION_FILE, _json_bytes(payload))

    def evaluation_histogram(self) -> tuple[int, np.ndarray] | None:
        """(model round, int64 [2, bins] summed histograms) of the latest federated evaluation, or None."""
        path = self.path / EVALUATION_FILE
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            histogram = np.array([recorded["negatives"], recorded["positives"]], dtype=np.int64)
            return int(recorded["model_round"]), histogram
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:
            raise RunRecordError(f"{path}: unreadable ({err})") from None

    def save_simulation(self, sites: list[str], sites_dir: Path) -> None:
        """Record that this run is a simulation, and its sites (`fedcare export` signs it with kits for them)."""
        atomic_write_bytes(self.path / SIMULATION_FILE, _json_bytes({"sites": sites, "sites_dir": str(sites_dir)}))

    def simulation_sites(self) -> list[str] | None:
        """The sites of a simulated run, or None for a deployed run (or an unreadable record)."""
        try:
            sites = json.loads((self.path / SIMULATION_FILE).read_text(encoding="utf-8"))["sites"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [str(site) for site in sites] if isinstance(sites, list) else None

    def write_privacy(self, summary: dict) -> None:
        atomic_write_bytes(self.path / PRIVACY_FILE, _json_bytes(summary))

    def report(self) -> dict:
        """The run's report.json (written when the run finished)."""
        path = self.path / REPORT_FILE
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunRecordError(f"{self.path}: no {REPORT_FILE}; the run has not finished, or this is not a run folder") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise RunRecordError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(report, dict) or not isinstance(report.get("study_hash"), str):
            raise RunRecordError(f"{path}: has no study_hash; is this a fedcare run report?")
        return report


def load_checkpoint(path: str | Path | io.BytesIO, expected_study_hash: str | None = None, *,
                    name: str | Path | None = None) -> list[np.ndarray]:
    """The weights in one (unsealed) checkpoint file or buffer; refused if it belongs to another study.
    A run's own, possibly sealed, checkpoints: `RunRecord.load_checkpoint`."""
    name = name if name is not None else path
    with np.load(path, allow_pickle=False) as data:
        if expected_study_hash is not None and str(data["study_hash"]) != expected_study_hash:
            raise RunRecordError(f"{name}: checkpoint belongs to another study (hash {str(data['study_hash'])[:12]}…)")
        keys = sorted(k for k in data.files if k.startswith("w"))
        return [data[k] for k in keys]
