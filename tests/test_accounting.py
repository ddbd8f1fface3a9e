"""The DP-SGD schedule: σ chosen once per site so the whole study meets its ε, and one round trains its plan."""

import dataclasses

import numpy as np
import pytest

from client.data import load_site
from client.training import train_round
from fedcare.features import model_inputs
from fedcare.model import build_model, get_weights
from privacy.accounting import PLAN_TOLERANCE, epsilon_of, plan_schedule


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_planned_schedule_meets_the_study_target(study, accountant):
    study = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, accountant=accountant)).with_overrides(rounds=3)
    schedule = plan_schedule(study, 2400)
    assert (schedule.rounds, schedule.reserve_rounds, schedule.planned_rounds) == (3, 1, 4)
    whole = epsilon_of(accountant, [(schedule.noise_multiplier, schedule.sample_rate, schedule.total_steps)], study.privacy.delta)
    per_round = [(schedule.noise_multiplier, schedule.sample_rate, schedule.steps_per_round)] * 4
    assert whole == epsilon_of(accountant, per_round, study.privacy.delta)  # identical steps compose into one entry
    assert study.privacy.epsilon * (1 - PLAN_TOLERANCE) <= whole <= study.privacy.epsilon


def test_sigma_grows_when_epsilon_shrinks(study):
    loose = plan_schedule(study.with_overrides(epsilon=8.0), 2000)
    tight = plan_schedule(study.with_overrides(epsilon=1.0), 2000)
    assert tight.noise_multiplier > loose.noise_multiplier > 0
    assert tight.sample_rate == pytest.approx(1 / np.ceil(2000 / study.training.batch_size))


def test_a_round_takes_its_planned_noisy_steps(study, cohorts_dir):
    data = load_site(study, cohorts_dir / "hospital-02")
    x, y = model_inputs(study, data.train.features), data.train.labels
    schedule = plan_schedule(study, len(y))
    model = build_model(study)
    before = get_weights(model)
    steps = train_round(study, model, x, y, schedule)
    assert steps == schedule.steps_per_round  # an empty Poisson batch has probability ~e^-128
    assert max(float(np.abs(a - b).max()) for a, b in zip(get_weights(model), before)) > 0
