"""What the coordinator keeps of a study run: per-round checkpoints and the round log.

Layout of the coordinator's output directory:

    checkpoints/round-001.npz   global weights after round 1 (arrays w000, w001, ...)
    rounds.jsonl                one JSON object per evaluated round
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from flwr.common import NDArrays

from fedcare.files import atomic_write_bytes


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


class RoundLog:
    """Appends one line per evaluated round and prints live progress."""

    def __init__(self, out_dir: str | Path, total_rounds: int) -> None:
        self.path = Path(out_dir) / "rounds.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_rounds = total_rounds
        self.started = time.monotonic()
        self.last = self.started
        self.aggregated: set[int] = set()

    def mark_aggregated(self, server_round: int) -> None:
        self.aggregated.add(server_round)

    def record(self, server_round: int, auc: float, loss: float, sites: int) -> None:
        now = time.monotonic()
        entry = {
            "round": server_round,
            "aggregated": server_round in self.aggregated,
            "auc": round(auc, 5),
            "loss": round(loss, 5),
            "sites_evaluated": sites,
            "seconds": round(now - self.last, 2),
        }
        self.last = now
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        note = "" if entry["aggregated"] else "  (no secure aggregate this round: model unchanged)"
        print(
            f"round {server_round}/{self.total_rounds}  test AUC {auc:.3f}  loss {loss:.4f}  "
            f"{sites} sites  {entry['seconds']:.1f} s{note}",
            flush=True,
        )


def read_round_log(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
