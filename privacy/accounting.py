"""A site's DP-SGD schedule and its accountant state across rounds.

The noise multiplier sigma is chosen once per site for the whole planned study
(`plan_schedule`) so that, after every planned round, the site's (epsilon, delta) stays
within the study's target. Each round may run in a fresh process, so the accountant's
history is persisted on disk (`AccountantStore`) and restored before the next round.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcare.files import atomic_write_bytes
from fedcare.study import Study


@dataclass(frozen=True)
class DPSchedule:
    """The planned DP-SGD steps of one site for the whole study."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds


def batches_per_epoch(n_train: int, batch_size: int) -> int:
    """Opacus' sample rate is 1 / len(loader); len(loader) = ceil(n / batch_size)."""
    return max(1, math.ceil(n_train / batch_size))


def plan_schedule(study: Study, n_train: int) -> DPSchedule:
    """Choose sigma once so the whole study's planned steps spend at most the target epsilon."""
    from opacus.accountants.utils import get_noise_multiplier  # heavy import: only where needed

    if n_train < 1:
        raise ValueError("a site needs at least one training row")
    sample_rate = 1.0 / batches_per_epoch(n_train, study.training.batch_size)
    steps_per_round = study.training.local_epochs * batches_per_epoch(n_train, study.training.batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        sigma = get_noise_multiplier(
            target_epsilon=study.privacy.epsilon,
            target_delta=study.privacy.delta,
            sample_rate=sample_rate,
            steps=steps_per_round * study.training.rounds,
            accountant=study.privacy.accountant,
            epsilon_tolerance=0.005,
        )
    return DPSchedule(
        noise_multiplier=float(sigma),
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=study.training.rounds,
        target_epsilon=study.privacy.epsilon,
        delta=study.privacy.delta,
        accountant=study.privacy.accountant,
    )


def epsilon_of(accountant_name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a DP-SGD history [(sigma, sample_rate, steps), ...] under the named accountant."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(accountant_name)
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta=delta)) if history else 0.0


@dataclass
class SiteAccountantState:
    """What a site remembers between rounds of one study run."""

    study_hash: str
    schedule: DPSchedule
    accountant_state: dict[str, Any]
    rounds_trained: int = 0
    epsilon: float = 0.0

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.accountant_state.get("history", [])]

    def restore_into(self, accountant: Any) -> None:
        """Load the saved history into a fresh Opacus accountant (before make_private)."""
        accountant.load_state_dict(copy.deepcopy(_accountant_dict(self.accountant_state)))


def _accountant_dict(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "history": [tuple(h) for h in state.get("history", [])]}


class AccountantStore:
    """One JSON file per (study, run) in the site's state directory; written atomically."""

    def __init__(self, state_dir: str | Path, study_hash: str, run_id: int) -> None:
        self.path = Path(state_dir) / f"accountant-{study_hash[:16]}-run{run_id}.json"

    @classmethod
    def find(cls, state_dir: str | Path, study_hash: str) -> list[SiteAccountantState]:
        """Every saved run of this study in a site's state directory (oldest file first)."""
        paths = sorted(Path(state_dir).glob(f"accountant-{study_hash[:16]}-run*.json"), key=lambda p: p.stat().st_mtime)
        return [cls._read(p) for p in paths]

    def load(self) -> SiteAccountantState | None:
        return self._read(self.path) if self.path.exists() else None

    @staticmethod
    def _read(path: Path) -> SiteAccountantState:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return SiteAccountantState(
            study_hash=raw["study_hash"],
            schedule=DPSchedule(**raw["schedule"]),
            accountant_state=raw["accountant_state"],
            rounds_trained=raw["rounds_trained"],
            epsilon=raw["epsilon"],
        )

    def save(self, state: SiteAccountantState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "study_hash": state.study_hash,
            "schedule": asdict(state.schedule),
            "accountant_state": {**state.accountant_state, "history": [list(h) for h in state.history]},
            "rounds_trained": state.rounds_trained,
            "epsilon": state.epsilon,
        }
        atomic_write_bytes(self.path, json.dumps(payload, indent=2).encode())
