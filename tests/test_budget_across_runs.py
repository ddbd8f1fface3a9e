"""One budget per study across all its runs: overrides do not open a fresh budget, and the reserve
planned into σ lets a study resumed after a charged-but-lost round complete within its ε."""

from __future__ import annotations

import dataclasses
import json

import pytest

from client.site_client import SiteClient
from fedcare.contribution import scaling_bytes
from fedcare.features import scaling
from fedcare.model import build_model, get_weights
from fedcare.protocol import RefusalKind
from fedcare.site import SitePaths
from fedcare.study import Overrides
from privacy.accounting import epsilon_of, plan_schedule
from privacy.budget import BudgetRefusal, charge_round, study_epsilon
from privacy.ledger import PrivacyLedger, rounds_of
from privacy.policy import SitePolicy

N_TRAIN = 2400
POLICY = SitePolicy(max_epsilon_per_study=10.0, max_epsilon_lifetime=30.0)  # the study's own ε binds, not the site's


def _charge(ledger, study, run_id: int, server_round: int, schedule=None):
    schedule = schedule or plan_schedule(study, N_TRAIN)  # a new run plans σ afresh (deterministic)
    return charge_round(ledger, POLICY, schedule, study_hash=study.hash, budget_key=study.budget_key,
                        run_id=run_id, server_round=server_round)


def test_runs_with_different_overrides_share_one_budget(study, tmp_path):
    first, second = study.with_overrides(rounds=3), study.with_overrides(rounds=4, epsilon=3.5)
    assert first.hash != second.hash and first.budget_key == second.budget_key
    ledger = PrivacyLedger(tmp_path)
    for r in (1, 2, 3):
        _charge(ledger, first, 1, r)
    spent = study_epsilon(ledger.entries(), first.budget_key)
    assert 0 < spent <= first.privacy.epsilon

    schedule = plan_schedule(second, N_TRAIN)  # 4 rounds + 1 reserve within ε 3.5, had it the budget to itself
    charged = 0
    with pytest.raises(BudgetRefusal) as refused:
        for r in range(1, schedule.planned_rounds + 1):
            _charge(ledger, second, 2, r, schedule)
            charged += 1
    assert 0 < charged < second.training.rounds  # the first run's spend counts against the second's ε
    assert refused.value.kind is RefusalKind.BUDGET
    assert f"> its target ε = 3.5: the study already spent ε = {spent:.3f} in 3 rounds of earlier runs" in str(refused.value)
    assert json.loads(refused.value.reason())["message"] == (
        "privacy budget: this round would exceed the study's target ε: the study already spent ε in earlier runs at "
        "this site (every run of a study shares its ε); the site trains no more rounds of it")
    entries = ledger.entries()
    assert len(entries) == 3 + charged and {e.study_hash for e in entries} == {study.budget_key}
    assert [e.note for e in entries] == [f"study hash {first.hash}"] * 3 + [f"study hash {second.hash}"] * charged
    assert study_epsilon(entries, study.budget_key) <= 3.5

    # A third run that asks only for more rounds (the file's ε 3.0) gets nothing: the study's ε is spent.
    with pytest.raises(BudgetRefusal, match="the study already spent ε"):
        _charge(ledger, study.with_overrides(rounds=9), 3, 1)
    assert len(ledger.entries()) == 3 + charged


@pytest.mark.parametrize("reserve", [1, 0])
def test_a_resumed_run_completes_within_epsilon_thanks_to_the_reserve(study, tmp_path, reserve):
    study = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, reserve_rounds=reserve))
    ledger = PrivacyLedger(tmp_path)
    # Run 1 charges rounds 1-3; the coordinator crashes before aggregating round 3.
    for r in (1, 2, 3):
        _charge(ledger, study, 1, r)
    # The study is resumed in a new Flower run (a new run id) from the checkpoint of round 2.
    resumed = plan_schedule(study, N_TRAIN)
    assert resumed.noise_multiplier == rounds_of(ledger.entries(), study.budget_key)[0].noise_multiplier
    if reserve:
        for r in (3, 4, 5):
            _charge(ledger, study, 2, r, resumed)
        entries = ledger.entries()
        assert len(entries) == study.training.rounds + 1  # every planned round aggregated once, plus the lost one
        step = (resumed.noise_multiplier, resumed.sample_rate, resumed.steps_per_round)
        assert entries[-1].epsilon_study == epsilon_of(resumed.accountant, [step] * 6, resumed.delta) <= study.privacy.epsilon
    else:
        _charge(ledger, study, 2, 3, resumed)
        _charge(ledger, study, 2, 4, resumed)
        with pytest.raises(BudgetRefusal, match=r"> its target ε = 3: the study already spent ε = .* in 3 rounds of earlier runs"):
            _charge(ledger, study, 2, 5, resumed)  # without the reserve the last planned round no longer fits
        assert len(ledger.entries()) == 5


def test_a_run_may_charge_its_rounds_and_its_reserve_not_more(study, tmp_path):
    one = study.with_overrides(rounds=1)
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, one, 7, 1)
    _charge(ledger, one, 7, 1)  # round 1 again (charged, not aggregated, retried): the reserve
    with pytest.raises(BudgetRefusal, match="this run's planned 1 rounds and 1 reserve rounds are spent") as refused:
        _charge(ledger, one, 7, 2)
    assert refused.value.kind is RefusalKind.BUDGET and len(ledger.entries()) == 2


def test_the_site_client_charges_every_run_under_the_study_budget_key(study, cohorts_dir, tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(study.to_toml())
    paths = SitePaths(study=path, data=cohorts_dir / "hospital-03", state_dir=tmp_path / "state", policy=None)
    for run_id, overrides in ((11, Overrides(rounds=1)), (12, Overrides(rounds=2, epsilon=6.0))):
        client = SiteClient(paths, run_id=run_id, run_config=overrides.run_config())
        weights = get_weights(build_model(client.study))
        config = {"study_hash": client.study.hash, "phase": "train", "round": 1,
                  "scaling": scaling_bytes(*scaling(client.study))}
        client.fit(weights, config)
    entries = PrivacyLedger(paths.state_dir).entries()
    assert [e.run_id for e in entries] == [11, 12] and {e.study_hash for e in entries} == {study.budget_key}
    assert entries[1].epsilon_study > entries[0].epsilon_study  # the second run composes with the first
