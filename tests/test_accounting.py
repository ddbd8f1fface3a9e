"""Privacy carried across rounds: each round restores the accountant from disk in a fresh object."""

import dataclasses

import numpy as np
import pytest

from client.data import load_site
from client.training import train_round
from fedcare.features import model_inputs
from fedcare.model import build_model
from privacy.accounting import AccountantStore, SiteAccountantState, epsilon_of, plan_schedule


@pytest.fixture(scope="module")
def site(study, cohorts_dir):
    data = load_site(study, cohorts_dir / "hospital-02")
    return model_inputs(study, data.train.features), data.train.labels


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_after_rounds_equals_whole_schedule(study, site, tmp_path, accountant):
    x, y = site
    rounds = 3
    study = dataclasses.replace(
        study,
        training=dataclasses.replace(study.training, rounds=rounds, local_epochs=1),
        privacy=dataclasses.replace(study.privacy, accountant=accountant),
    )
    schedule = plan_schedule(study, len(y))
    store = AccountantStore(tmp_path, study.hash, run_id=1)
    for r in range(rounds):
        carried = store.load()  # a fresh process would start from here
        result = train_round(study, build_model(study), x, y, schedule, carried)
        store.save(SiteAccountantState(study.hash, schedule, result.accountant_state, r + 1, result.epsilon))
    final = store.load()
    assert final.rounds_trained == rounds
    steps = sum(h[2] for h in final.history)
    assert steps == schedule.total_steps
    whole = epsilon_of(accountant, [(schedule.noise_multiplier, schedule.sample_rate, schedule.total_steps)], study.privacy.delta)
    assert final.epsilon == pytest.approx(whole, rel=0.02)
    assert 0 < final.epsilon <= study.privacy.epsilon * 1.001
    # one round alone spends less than the whole study
    one = epsilon_of(accountant, [(schedule.noise_multiplier, schedule.sample_rate, schedule.steps_per_round)], study.privacy.delta)
    assert one < final.epsilon * 0.8


def test_sigma_grows_when_epsilon_shrinks(study):
    loose = plan_schedule(study.with_overrides(epsilon=8.0), 2000)
    tight = plan_schedule(study.with_overrides(epsilon=1.0), 2000)
    assert tight.noise_multiplier > loose.noise_multiplier > 0
    assert tight.sample_rate == pytest.approx(1 / np.ceil(2000 / study.training.batch_size))
