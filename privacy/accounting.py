"""A site's DP-SGD schedule and its accountant state across rounds.

The noise multiplier sigma is chosen once per site for the whole planned study
(`plan_schedule`) so that, after every planned round, the site's (epsilon, delta) stays
within the study's target. What each round spent is kept in the site's privacy ledger
(`privacy/ledger.py`) and composed by `epsilon_of`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

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
    if not history:
        return 0.0
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf when a site's batch is all its rows
        return float(accountant.get_epsilon(delta=delta))
