"""Planning σ (`privacy.accounting.plan_sigma`): never above the target by Opacus' own accountant, close to it,
for every accountant and ε the kernel accepts, and bounded for sites up to 1M rows (speed: bench/plan_sigma.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from opacus.accountants import create_accountant

from fedcare.study import EPSILON_MAX
from privacy.accounting import (
    PLAN_TOLERANCE, PlanningError, batches_per_epoch, epsilon_of, plan_schedule, plan_sigma,
)

DELTA = 1e-5


def _opacus(accountant: str, sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """ε by Opacus' stock accountant (default settings), not fedcare's evaluation."""
    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    with np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=delta))


def _shape(rows: int, batch: int, epochs: int = 2, rounds: int = 6) -> tuple[float, int]:
    batches = batches_per_epoch(rows, batch)
    return 1.0 / batches, epochs * batches * rounds


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("epsilon", [0.5, 3.0, EPSILON_MAX])
@pytest.mark.parametrize("rows, batch", [(2_400, 128), (100, 128), (9_000, 256)])
def test_planned_sigma_never_exceeds_the_target_by_opacus_accountant(accountant, epsilon, rows, batch):
    q, steps = _shape(rows, batch)
    sigma = plan_sigma(accountant=accountant, target_epsilon=epsilon, delta=DELTA, sample_rate=q, steps=steps)
    stock = _opacus(accountant, sigma, q, steps)
    assert stock <= epsilon, (sigma, stock)
    assert epsilon_of(accountant, [(sigma, q, steps)], DELTA) <= epsilon  # what the ledger will charge, exactly
    assert stock >= epsilon * (1 - PLAN_TOLERANCE) * 0.99  # and not much more noise than needed


def test_fedcare_prv_is_opacus_prv_on_a_finer_grid():
    for sigma, q, steps in [(0.79, 1 / 19, 228), (1.4, 1 / 19, 228), (1.0, 1 / 157, 1884), (3.0, 1.0, 12)]:
        ours, stock = epsilon_of("prv", [(sigma, q, steps)], DELTA), _opacus("prv", sigma, q, steps)
        assert ours == pytest.approx(stock, rel=1e-4) and ours < epsilon_of("rdp", [(sigma, q, steps)], DELTA)
    assert epsilon_of("rdp", [(0.8, 0.05, 300)], DELTA) == _opacus("rdp", 0.8, 0.05, 300)


def test_composition_cost_does_not_grow_with_rounds():
    """A ledger's history is composed per distinct (σ, q): 200 rounds cost what one entry costs."""
    rounds = [(0.9, 1 / 19, 38)] * 150 + [(1.1, 1 / 19, 38)] * 50
    merged = [(0.9, 1 / 19, 38 * 150), (1.1, 1 / 19, 38 * 50)]
    assert epsilon_of("prv", rounds, DELTA) == epsilon_of("prv", merged, DELTA)
    assert epsilon_of("prv", [], DELTA) == 0.0


def test_where_prv_grid_would_not_fit_the_rdp_bound_is_used():
    """1M rows, batch 1: Opacus' PRV grid would need tens of millions of points (minutes, GBs); RDP bounds it."""
    q, steps = _shape(1_000_000, 1)
    sigma = plan_sigma(accountant="prv", target_epsilon=3.0, delta=DELTA, sample_rate=q, steps=steps)
    eps = epsilon_of("prv", [(sigma, q, steps)], DELTA)
    assert eps == epsilon_of("rdp", [(sigma, q, steps)], DELTA) and 3.0 * (1 - PLAN_TOLERANCE) <= eps <= 3.0
    # δ so small that the grid's float rounding would dominate it (Opacus raises there): RDP too
    assert epsilon_of("prv", [(1.0, 1 / 19, 228)], 1e-15) == epsilon_of("rdp", [(1.0, 1 / 19, 228)], 1e-15)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_large_sites_plan_within_the_target(accountant):
    for rows, batch in [(1_000_000, 128), (1_000_000, 1)]:
        q, steps = _shape(rows, batch)
        for epsilon in (1.0, EPSILON_MAX):
            sigma = plan_sigma(accountant=accountant, target_epsilon=epsilon, delta=DELTA, sample_rate=q, steps=steps)
            assert epsilon * (1 - PLAN_TOLERANCE) * 0.97 <= epsilon_of(accountant, [(sigma, q, steps)], DELTA) <= epsilon


def test_a_target_no_noise_can_meet_is_a_planning_error():
    # RDP cannot certify ε below ~0.1 at δ = 1e-5, whatever σ (its largest order is 63)
    with pytest.raises(PlanningError, match="no noise multiplier up to 1e.06 meets ε = 0.05 at δ = 1e-05 under the rdp"):
        plan_sigma(accountant="rdp", target_epsilon=0.05, delta=DELTA, sample_rate=1 / 19, steps=228)
    # PRV can: σ grows instead
    sigma = plan_sigma(accountant="prv", target_epsilon=0.05, delta=DELTA, sample_rate=1 / 19, steps=228)
    assert epsilon_of("prv", [(sigma, 1 / 19, 228)], DELTA) <= 0.05


def test_the_reserve_is_planned_into_sigma(study):
    without = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, reserve_rounds=0))
    planned, bare = plan_schedule(study, 2400), plan_schedule(without, 2400)
    assert (planned.reserve_rounds, bare.reserve_rounds) == (1, 0)
    assert planned.noise_multiplier > bare.noise_multiplier  # more rounds within the same ε: more noise
    for s in (planned, bare):
        assert epsilon_of(s.accountant, [(s.noise_multiplier, s.sample_rate, s.total_steps)], s.delta) <= study.privacy.epsilon
