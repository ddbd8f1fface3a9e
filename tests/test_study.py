import dataclasses
import tomllib

import pytest

from fedcare.study import StudyConfigError, load_study, parse_study

from .conftest import DEFAULT_STUDY


def _raw():
    return tomllib.loads(DEFAULT_STUDY.read_text())


def _error(raw) -> str:
    with pytest.raises(StudyConfigError) as err:
        parse_study(raw, source="s.toml")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_default_study_loads(study):
    assert study.name == "depression-risk"
    assert len(study.features) >= 19
    assert study.input_names[: len(study.features)] == [f.name for f in study.features]
    assert "phq9_latest_missing" in study.input_names
    assert len(study.hash) == 64


def test_hash_ignores_comments_and_key_order_but_not_values(tmp_path, study):
    text = DEFAULT_STUDY.read_text()
    reordered = "# another comment\n" + text.replace('name = "depression-risk"\n', 'name = "depression-risk"  # same\n')
    path = tmp_path / "s.toml"
    path.write_text(reordered)
    assert load_study(path).hash == study.hash
    path.write_text(text.replace("epsilon = 3.0", "epsilon = 3.5"))
    assert load_study(path).hash != study.hash


def test_to_toml_round_trips(tmp_path, study):
    path = tmp_path / "s.toml"
    path.write_text(study.to_toml())
    assert load_study(path) == study


def test_unknown_feature_type_names_the_field():
    raw = _raw()
    raw["features"][2]["type"] = "numerc"
    assert _error(raw) == (
        "s.toml: features[2] (phq9_latest).type: unknown value 'numerc' (expected one of: numeric, count, binary)"
    )


@pytest.mark.parametrize("epsilon", [0, -1.0, float("inf")])
def test_epsilon_must_be_positive_and_finite(epsilon):
    raw = _raw()
    raw["privacy"]["epsilon"] = epsilon
    assert _error(raw).startswith("s.toml: privacy.epsilon: must be")


def test_threshold_must_be_below_shares():
    raw = _raw()
    raw["secure_aggregation"]["num_shares"] = 5
    raw["secure_aggregation"]["reconstruction_threshold"] = 5
    assert _error(raw) == "s.toml: secure_aggregation.reconstruction_threshold: 5 must be less than num_shares (5)"


def test_missing_field_and_section():
    raw = _raw()
    del raw["training"]["rounds"]
    assert _error(raw) == "s.toml: training.rounds: missing field"
    raw = _raw()
    del raw["privacy"]
    assert _error(raw) == "s.toml: [privacy]: missing table"


def test_bad_ranges_and_duplicates():
    raw = _raw()
    raw["features"][0]["range"] = [100, 18]
    assert "features[0] (age).range: expected [low, high] with low < high" in _error(raw)
    raw = _raw()
    raw["features"][1]["name"] = "age"
    assert _error(raw) == "s.toml: features[1].name: duplicate feature 'age'"
    raw = _raw()
    raw["features"][0]["missing"] = "drop"
    assert "features[0] (age).missing: unknown value 'drop'" in _error(raw)


def test_wrong_value_types():
    raw = _raw()
    raw["training"]["batch_size"] = "128"
    assert _error(raw) == "s.toml: training.batch_size: expected an integer, got '128'"
    raw = _raw()
    raw["strategy"]["min_sites"] = 2
    assert _error(raw) == "s.toml: strategy.min_sites: must be >= 3, got 2"


def test_unreadable_files(tmp_path):
    with pytest.raises(StudyConfigError, match="study file not found"):
        load_study(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname=")
    with pytest.raises(StudyConfigError, match="bad.toml: not valid TOML"):
        load_study(bad)


def test_overrides_are_validated(study):
    assert study.with_overrides(rounds=7, epsilon=1.5).training.rounds == 7
    assert study.with_overrides(rounds=7).hash != study.hash
    with pytest.raises(StudyConfigError, match="--epsilon: must be a finite number > 0"):
        study.with_overrides(epsilon=0.0)
    with pytest.raises(StudyConfigError, match="--rounds: must be >= 1"):
        study.with_overrides(rounds=0)
    assert dataclasses.replace(study) == study


def test_run_overrides_are_part_of_the_hash_every_party_computes(study):
    from fedcare.study import study_for_run

    from .conftest import DEFAULT_STUDY

    assert study_for_run(DEFAULT_STUDY, {"rounds": 0, "epsilon": 0.0}).hash == study.hash
    changed = study_for_run(DEFAULT_STUDY, {"rounds": 2, "epsilon": 1.5})
    assert changed.training.rounds == 2 and changed.privacy.epsilon == 1.5
    assert changed.hash == study.with_overrides(rounds=2, epsilon=1.5).hash != study.hash


def test_epsilon_above_the_planned_range_is_refused_at_load_and_as_an_override(study):
    from fedcare.study import EPSILON_MAX, Overrides

    raw = _raw()
    raw["privacy"]["epsilon"] = EPSILON_MAX * 1.5
    assert _error(raw) == f"s.toml: privacy.epsilon: must be in the accepted range 0 < ε <= {EPSILON_MAX:g}, got {EPSILON_MAX * 1.5}"
    raw["privacy"]["epsilon"] = EPSILON_MAX
    assert parse_study(raw).privacy.epsilon == EPSILON_MAX
    with pytest.raises(StudyConfigError, match=f"^--epsilon: must be in the accepted range 0 < ε <= {EPSILON_MAX:g}, got 500"):
        Overrides(epsilon=500.0)
    with pytest.raises(StudyConfigError, match="^--epsilon: must be in the accepted range"):
        study.with_overrides(epsilon=EPSILON_MAX + 0.001)
    assert study.with_overrides(epsilon=EPSILON_MAX).privacy.epsilon == EPSILON_MAX


def test_reserve_rounds_is_validated_hashed_and_rendered(tmp_path, study):
    assert study.privacy.reserve_rounds == 1
    raw = _raw()
    del raw["privacy"]["reserve_rounds"]
    assert parse_study(raw).privacy.reserve_rounds == 1 and parse_study(raw).hash == study.hash  # the default
    for value, message in ((-1, "must be >= 0, got -1"), (1.5, "expected an integer, got 1.5"), (True, "expected an integer")):
        raw["privacy"]["reserve_rounds"] = value
        assert _error(raw).startswith(f"s.toml: privacy.reserve_rounds: {message}")
    raw["privacy"]["reserve_rounds"] = 0
    none = parse_study(raw)
    assert none.privacy.reserve_rounds == 0 and none.hash != study.hash and none.budget_key != study.budget_key
    path = tmp_path / "s.toml"
    path.write_text(none.to_toml())
    assert "reserve_rounds = 0" in path.read_text() and load_study(path) == none


def test_budget_key_is_the_study_whatever_its_overrides_and_scaling(study):
    variants = [study.with_overrides(rounds=9), study.with_overrides(epsilon=1.0), study.with_overrides(rounds=2, epsilon=7.5)]
    assert len({v.hash for v in [study, *variants]}) == 4  # the coordinator/site agreement still sees each run's values
    assert {v.budget_key for v in variants} == {study.budget_key} and study.budget_key != study.hash
    scaled = study.with_scaling([f.center + 1 for f in study.features], [f.scale * 2 for f in study.features])
    assert (scaled.hash, scaled.budget_key) == (study.hash, study.budget_key)
    other = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, delta=1e-6))
    assert other.budget_key != study.budget_key  # any other value is another study, with its own budget
