"""What the coordinator keeps of a study run: per-round checkpoints and the round log.

Layout of the coordinator's output directory:

    checkpoints/round-001.npz   global weights after round 1 (arrays w000, w001, ...)
    scaling.json                federated standardization: pooled counts and the (center, scale) used
    rounds.jsonl                one JSON object per training round, with the federated evaluation
                                of the model after it
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from flwr.common import NDArrays

from fedcare.contribution import Evaluation, Standardization
from fedcare.files import atomic_write_bytes
from fedcare.study import Study


def checkpoint_path(out_dir: str | Path, server_round: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round-{server_round:03d}.npz"


def save_checkpoint(out_dir: str | Path, server_round: int, weights: NDArrays, study_hash: str) -> Path:
    path = checkpoint_path(out_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)

    buffer = io.BytesIO()
    arrays = {f"w{i:03d}": np.asarray(w) for i, w in enumerate(weights)}
    np.savez(buffer, study_hash=np.array(study_hash), **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, expected_study_hash: str | None = None) -> NDArrays:
    with np.load(path, allow_pickle=False) as data:
        if expected_study_hash is not None and str(data["study_hash"]) != expected_study_hash:
            raise ValueError(f"{path}: checkpoint belongs to another study (hash {str(data['study_hash'])[:12]}…)")
        keys = sorted(k for k in data.files if k.startswith("w"))
        return [data[k] for k in keys]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("round-*.npz"))
    return found[-1] if found else None


def save_scaling(out_dir: str | Path, study: Study, result: Standardization) -> None:
    """Record the federated scaling (it goes into the report and the exported model)."""
    payload = {
        "method": "federated",
        "features": [f.name for f in study.features],
        "center": [float(c) for c in result.center],
        "scale": [float(s) for s in result.scale],
        "rows_with_value": [int(n) for n in result.counts],
    }
    atomic_write_bytes(Path(out_dir) / "scaling.json", json.dumps(payload, indent=1).encode())
    print(f"federated standardization: scaling from SecAgg+ sums over {int(result.counts.max())} training rows "
          f"(per-feature counts, means and standard deviations of all sites together)", flush=True)


def scaled_study(study: Study, out_dir: str | Path) -> Study:
    """The study with the run's federated scaling applied, if the run computed one."""
    path = Path(out_dir) / "scaling.json"
    if not path.exists():
        return study
    scaling = json.loads(path.read_text(encoding="utf-8"))
    return study.with_scaling(scaling["center"], scaling["scale"])


class RoundLog:
    """Prints live progress and appends one line per training round once its model is evaluated."""

    def __init__(self, out_dir: str | Path, total_rounds: int) -> None:
        self.path = Path(out_dir) / "rounds.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_rounds = total_rounds
        self.last = time.monotonic()
        self.aggregated: dict[int, float] = {}

    def mark_aggregated(self, server_round: int) -> None:
        now = time.monotonic()
        self.aggregated[server_round] = round(now - self.last, 2)
        self.last = now
        print(f"round {server_round}/{self.total_rounds} aggregated  {self.aggregated[server_round]:.1f} s", flush=True)

    def record(self, model_round: int, evaluation: Evaluation) -> None:
        """The federated evaluation of the model after `model_round` (0: the initial model)."""
        what = "initial model" if model_round == 0 else f"model after round {model_round}/{self.total_rounds}"
        print(
            f"{what}: test AUC {evaluation.auc:.3f}  loss {evaluation.loss:.4f}  "
            f"({evaluation.sites} sites evaluated, aggregate only)",
            flush=True,
        )
        if model_round == 0:
            return
        entry = {
            "round": model_round,
            "aggregated": model_round in self.aggregated,
            "auc": round(evaluation.auc, 5),
            "loss": round(evaluation.loss, 5),
            "sites_evaluated": evaluation.sites,
            "seconds": self.aggregated.get(model_round),
        }
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        if not entry["aggregated"]:
            print(f"round {model_round}/{self.total_rounds}: no secure aggregate; the model is unchanged", flush=True)


def read_round_log(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
