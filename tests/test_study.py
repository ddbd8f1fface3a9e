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


def _strategy_raw(name, **fields):
    raw = _raw()
    raw["strategy"] = {"name": name, "min_sites": 3, **fields}
    return raw


def test_fedavg_studies_keep_their_hash_the_new_strategy_fields_are_left_out(study):
    from fedcare.study import _digest

    assert study.strategy.name == "fedavg" and study.strategy.beta1 is None and study.strategy.proximal_mu is None
    # the hash is over exactly the values a study had before the optional strategy fields existed
    values = dataclasses.asdict(study)
    del values["scaled_from"], values["scaled_key"], values["notes_source"], values["omop_source"]  # None: left out too
    values["strategy"] = {k: values["strategy"][k] for k in ("name", "server_learning_rate", "min_sites")}
    assert study.hash == _digest(values)
    assert "beta1" not in study.to_toml() and "proximal_mu" not in study.to_toml()
    # an absent server_learning_rate is fedavg's 1.0, the default study's value
    raw = _raw()
    del raw["strategy"]["server_learning_rate"]
    assert parse_study(raw).hash == study.hash


@pytest.mark.parametrize("name, expected", [
    ("fedavg", {"server_learning_rate": 1.0}),
    ("fedprox", {"server_learning_rate": 1.0, "proximal_mu": 0.01}),
    ("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.9}),
    ("fedadagrad", {"server_learning_rate": 0.1, "beta1": 0.0, "tau": 1e-9}),
    ("fedadam", {"server_learning_rate": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9}),
    ("fedyogi", {"server_learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
])
def test_each_strategy_takes_its_defaults_hashes_them_and_round_trips(tmp_path, study, name, expected):
    parsed = parse_study(_strategy_raw(name))
    options = {k: v for k, v in dataclasses.asdict(parsed.strategy).items() if v is not None}
    assert options == {"name": name, "min_sites": 3, **expected}
    path = tmp_path / "s.toml"
    path.write_text(parsed.to_toml())
    assert load_study(path) == parsed and load_study(path).hash == parsed.hash
    if name != "fedavg":
        assert parsed.hash != study.hash
        written = parse_study(_strategy_raw(name, **expected))  # the defaults written out: the same study
        assert written.hash == parsed.hash
    changed = parse_study(_strategy_raw(name, server_learning_rate=0.37))
    assert changed.hash != parsed.hash and changed.strategy.server_learning_rate == 0.37


@pytest.mark.parametrize("name, field, value, message", [
    ("fedadam", "beta1", 1.2, "must be in [0, 1), got 1.2"),
    ("fedyogi", "beta1", -0.1, "must be in [0, 1), got -0.1"),
    ("fedadam", "beta2", 1.0, "must be in [0, 1), got 1.0"),
    ("fedyogi", "beta2", "0.9", "expected a number, got '0.9'"),
    ("fedavgm", "server_momentum", 1, "must be in [0, 1), got 1"),
    ("fedavgm", "server_momentum", -0.5, "must be in [0, 1), got -0.5"),
    ("fedadagrad", "tau", 0.0, "must be > 0, got 0.0"),
    ("fedadam", "tau", float("inf"), "must be finite, got inf"),
    ("fedprox", "proximal_mu", 0, "must be > 0, got 0"),
    ("fedprox", "proximal_mu", -1.0, "must be > 0, got -1.0"),
    ("fedadam", "server_learning_rate", 0, "must be > 0, got 0"),
])
def test_strategy_fields_are_validated_naming_the_field(name, field, value, message):
    assert _error(_strategy_raw(name, **{field: value})) == f"s.toml: strategy.{field}: {message}"


@pytest.mark.parametrize("name, field, users", [
    ("fedavg", "proximal_mu", "only fedprox uses it"),
    ("fedadam", "proximal_mu", "only fedprox uses it"),
    ("fedavg", "server_momentum", "only fedavgm uses it"),
    ("fedadagrad", "beta2", "only fedadam, fedyogi use it"),
    ("fedprox", "beta1", "only fedadagrad, fedadam, fedyogi use it"),
    ("fedavgm", "tau", "only fedadagrad, fedadam, fedyogi use it"),
])
def test_a_field_the_strategy_does_not_use_is_an_error_naming_who_uses_it(name, field, users):
    assert _error(_strategy_raw(name, **{field: 0.5})) == (
        f"s.toml: strategy.{field}: {users} (this study's strategy is {name})")


def test_unknown_strategy_and_unknown_strategy_keys():
    assert _error(_strategy_raw("scaffold")) == (
        "s.toml: strategy.name: unknown value 'scaffold' (expected one of: fedavg, fedavgm, fedprox, fedadagrad, "
        "fedadam, fedyogi)")
    assert _error(_strategy_raw("fedadam", beta_1=0.9)).startswith(
        "s.toml: strategy.beta_1: unknown key (expected: name, min_sites, server_learning_rate, server_momentum,")
