"""The site's budget: ledger ε against an independent accountant, and every policy refusal."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from dp_accounting import dp_event, pld, rdp

from privacy.accounting import epsilon_of, plan_schedule
from fedcare.protocol import RefusalKind
from privacy.budget import BudgetRefusal, charge_round, lifetime_epsilon
from privacy.ledger import PrivacyLedger
from privacy.policy import PolicyError, SitePolicy, load_site_policy


def _independent(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting (Google), not Opacus: PLD for Opacus' PRV accountant, RDP for RDP."""
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    acc = pld.PLDAccountant() if accountant == "prv" else rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


def _round(study, run_id: int, server_round: int) -> dict:
    """charge_round's keywords for a round of `study` (its hash and its budget key)."""
    return {"study_hash": study.hash, "budget_key": study.budget_key, "run_id": run_id, "server_round": server_round}


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_ledger_epsilon_equals_an_independent_accountant(study, tmp_path, accountant):
    study = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, accountant=accountant)).with_overrides(rounds=3)
    schedule = plan_schedule(study, n_train=2400)
    ledger = PrivacyLedger(tmp_path)
    for r in range(1, 4):
        entry = charge_round(ledger, SitePolicy(), schedule, **_round(study, 1, r))
        expected = _independent(accountant, schedule.noise_multiplier, schedule.sample_rate, schedule.steps_per_round * r,
                                study.privacy.delta)
        assert entry.epsilon_study == pytest.approx(expected, rel=0.02), (r, entry.epsilon_study, expected)
    assert entry.epsilon_study <= study.privacy.epsilon * 1.001  # the plan meets the study's target


def test_budget_refusals_spend_nothing(study, tmp_path):
    schedule = plan_schedule(study.with_overrides(rounds=4), n_train=2400)
    ledger = PrivacyLedger(tmp_path)
    step = (schedule.noise_multiplier, schedule.sample_rate, schedule.steps_per_round)
    two, three = (epsilon_of(schedule.accountant, [step] * k, schedule.delta) for k in (2, 3))

    # per study: room for exactly two rounds
    policy = SitePolicy(max_epsilon_per_study=(two + three) / 2, max_epsilon_lifetime=100.0)
    charge_round(ledger, policy, schedule, **_round(study, 1, 1))
    charge_round(ledger, policy, schedule, **_round(study, 1, 2))
    with pytest.raises(BudgetRefusal, match=r"privacy budget: this round would bring the study to ε = .* > this site's max_epsilon_per_study") as refused:
        charge_round(ledger, policy, schedule, **_round(study, 1, 3))
    # what reaches the coordinator: the kind and the policy field, never the site's spent or projected ε
    assert refused.value.kind is RefusalKind.BUDGET
    assert json.loads(refused.value.reason()) == {"refusal": "budget", "message": "privacy budget: this round would "
                                                  "exceed this site's max_epsilon_per_study; the site trains no more rounds of it"}
    assert len(ledger.entries()) == 2
    # a second run of the same study composes with the first
    with pytest.raises(BudgetRefusal, match="max_epsilon_per_study"):
        charge_round(ledger, policy, schedule, **_round(study, 2, 1))

    # lifetime: another study would push the site over its lifetime budget
    spent = lifetime_epsilon(ledger.entries())
    one = epsilon_of(schedule.accountant, [step], schedule.delta)
    lifetime = SitePolicy(max_epsilon_per_study=(two + three) / 2, max_epsilon_lifetime=spent + one * 0.5)
    other = "cd" * 32
    with pytest.raises(BudgetRefusal, match=r"lifetime ε to .* > its max_epsilon_lifetime"):
        charge_round(ledger, lifetime, schedule, study_hash=other, budget_key=other, run_id=3, server_round=1)
    assert len(ledger.entries()) == 2


def test_study_not_accepted_or_delta_too_large_is_refused(study, tmp_path):
    schedule = plan_schedule(study, n_train=2400)
    ledger = PrivacyLedger(tmp_path)
    with pytest.raises(BudgetRefusal, match="not in this site's policy accepted_studies"):
        charge_round(ledger, SitePolicy(accepted_studies=("0123456789ab",)), schedule, **_round(study, 1, 1))
    with pytest.raises(BudgetRefusal, match="δ = 1e-05 exceeds this site's policy max_delta = 1e-06"):
        charge_round(ledger, SitePolicy(max_delta=1e-6), schedule, **_round(study, 1, 1))
    assert ledger.entries() == []
    charge_round(ledger, SitePolicy(accepted_studies=(study.hash[:16],)), schedule, **_round(study, 1, 1))


@pytest.mark.parametrize(
    "body, message",
    [
        ("max_epsilon_per_study = 0", "policy.max_epsilon_per_study: must be > 0, got 0"),
        ("max_epsilon_lifetime = inf", "policy.max_epsilon_lifetime: must be finite, got inf"),
        ("max_delta = 1.5", "policy.max_delta: must be < 1.0, got 1.5"),
        ("max_epsilon_per_study = 5\nmax_epsilon_lifetime = 4", "policy.max_epsilon_per_study: 5 exceeds max_epsilon_lifetime 4"),
        ("min_threshold = 1", "policy.min_threshold: must be >= 2, got 1"),
        ('accepted_studies = "abc"', "policy.accepted_studies: expected a list of study hashes"),
        ('accepted_studies = ["XYZ"]', r"policy.accepted_studies\[0\]: expected a study hash"),
        ("max_epsilon = 3", "policy.max_epsilon: unknown key"),
    ],
)
def test_invalid_policy_names_the_field(tmp_path, body, message):
    path = tmp_path / "site.toml"
    path.write_text(f"[policy]\n{body}\n")
    with pytest.raises(PolicyError) as err:
        load_site_policy(path)
    assert str(err.value).startswith(f"{path}: ") and re.search(message, str(err.value).replace("(", "").replace(")", ""))
