"""The hospital client's refusals, what it records before an update can leave the site, and what it sends."""

import dataclasses

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from client.site_client import SiteClient, check_within_clipping_range
from fedcare.protocol import Refusal, RefusalKind
from fedcare.site import SitePaths
from fedcare.contribution import scaling_bytes
from fedcare.features import scaling
from fedcare.model import build_model, get_weights
from fedcare.study import load_study
from privacy.ledger import PrivacyLedger


@pytest.fixture()
def client(study, cohorts_dir, tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(study.with_overrides(rounds=1).to_toml())
    paths = SitePaths(study=path, data=cohorts_dir / "hospital-01", state_dir=tmp_path / "state", policy=None)
    return SiteClient(paths, run_id=9)


def _config(client, phase="train", round=1):
    """A round's config as the coordinator sends it (here with the spec's scaling as the federated one)."""
    return {"study_hash": client.study.hash, "phase": phase, "round": round, "scaling": scaling_bytes(*scaling(client.study))}


def test_never_returns_parameters_outside_secure_aggregation(client):
    with pytest.raises(Refusal, match="never returns model parameters outside secure aggregation"):
        client.get_parameters({})


def test_refuses_another_study(client):
    weights = get_weights(build_model(client.study))
    with pytest.raises(Refusal, match="study hash mismatch") as refused:
        client.fit(weights, {"study_hash": "0" * 64, "round": 1})
    assert refused.value.kind is RefusalKind.STUDY


def test_a_round_without_a_known_phase_is_refused_and_nothing_is_spent(client):
    weights = get_weights(build_model(client.study))
    for config in ({"study_hash": client.study.hash, "round": 1}, {**_config(client), "phase": "trian"}):
        with pytest.raises(Refusal, match="round config has no known phase") as refused:
            client.fit(weights, config)
        assert refused.value.kind is RefusalKind.PROTOCOL
    assert PrivacyLedger(client.paths.state_dir).entries() == []


def test_fit_records_spend_then_returns_one_masked_vector_and_refuses_beyond_plan(client):
    weights = get_weights(build_model(client.study))
    config = _config(client)
    vector, n, metrics = client.fit(weights, config)
    # Plaintext fields hold the same constant at every site; everything else is in the vector SecAgg+ masks.
    assert metrics == {} and n == int(client.study.secure_aggregation.max_weight)
    assert [v.shape for v in vector[: len(weights)]] == [w.shape for w in weights]
    assert max(np.abs(d).max() for d in vector[: len(weights)]) > 0
    fmt = client.format
    read = fmt.decode(vector, sites=1, model_arrays=len(weights))  # one site's vector read as if it were the sum of one
    assert read.train_rows == len(client.data.train.labels)
    assert read.evaluation.test_rows == len(client.data.test.labels)
    [entry] = PrivacyLedger(client.paths.state_dir).entries()
    assert entry.round == 1 and 0 < entry.epsilon_study <= client.study.privacy.epsilon * 1.001
    client.fit(weights, config)  # the round again (charged, never aggregated): the study's reserve round
    with pytest.raises(Refusal, match="planned 1 rounds and 1 reserve rounds are spent") as refused:
        client.fit(weights, config)
    assert refused.value.kind is RefusalKind.BUDGET  # the coordinator stops the study's training on it
    assert len(PrivacyLedger(client.paths.state_dir).entries()) == 2  # a refusal spends nothing


def test_evaluation_only_round_trains_nothing_and_spends_nothing(client):
    weights = get_weights(build_model(client.study))
    vector, _, _ = client.fit(weights, _config(client, "evaluate", 1))
    read = client.format.decode(vector, sites=1, model_arrays=len(weights))
    assert read.mean_delta is None and read.train_rows == 0
    assert read.evaluation.test_rows == len(client.data.test.labels) and 0 < read.evaluation.auc < 1
    assert PrivacyLedger(client.paths.state_dir).entries() == []


def test_statistics_round_sends_only_sums_and_spends_nothing(client):
    weights = get_weights(build_model(client.study))
    vector, n, metrics = client.fit(weights, {"study_hash": client.study.hash, "phase": "statistics", "round": 0})
    read = client.format.decode(vector, sites=1, model_arrays=len(weights))
    raw = client.data.train.features
    assert read.mean_delta is None and read.evaluation.test_rows == 0
    np.testing.assert_array_equal(read.standardization.counts, (~np.isnan(raw)).sum(axis=0))
    assert PrivacyLedger(client.paths.state_dir).entries() == []


def test_training_without_the_federated_scaling_is_refused(client):
    weights = get_weights(build_model(client.study))
    with pytest.raises(Refusal, match="federated standardization but the round carries no scaling"):
        client.fit(weights, {"study_hash": client.study.hash, "phase": "train", "round": 1})
    with pytest.raises(Refusal, match="the round's scaling is unusable"):
        client.fit(weights, {**_config(client), "scaling": b"\x00" * 16})
    assert PrivacyLedger(client.paths.state_dir).entries() == []


def test_plaintext_evaluation_is_refused(client):
    with pytest.raises(Refusal, match="evaluation only inside secure aggregation"):
        client.evaluate(get_weights(build_model(client.study)), {"study_hash": client.study.hash})


def test_clipping_check_matches_secaggplus_exactly(study):
    """What passes the check survives SecAgg+'s quantization unclipped; what would be clipped is refused."""
    sa = study.secure_aggregation
    n = 5000
    ratio = n / sa.max_weight
    limit = sa.clipping_range / ratio
    rng = np.random.default_rng(0)
    delta = [rng.uniform(-limit, limit, size=(40, 8)) * 0.999]
    check_within_clipping_range(float(np.abs(delta[0]).max()) * ratio, sa.clipping_range)
    sent = [d * ratio for d in delta]
    restored = dequantize(quantize(sent, sa.clipping_range, sa.quantization_range), sa.clipping_range, sa.quantization_range)
    step = 2 * sa.clipping_range / sa.quantization_range
    assert np.abs(restored[0] - sent[0]).max() <= step
    too_big = float(np.abs(delta[0]).max()) * 1.01 / 0.999 * ratio
    with pytest.raises(Refusal, match="exceeds secure_aggregation.clipping_range .* SecAgg\\+ would clip it silently") as refused:
        check_within_clipping_range(too_big, sa.clipping_range)
    assert refused.value.kind is RefusalKind.CLIPPING
    assert f"{too_big:.3g}" in str(refused.value) and f"{too_big:.3g}" not in refused.value.reason()  # stays at the site
    with pytest.raises(Refusal):
        check_within_clipping_range(float("nan"), sa.clipping_range)


def test_site_larger_than_max_weight_is_refused(study, cohorts_dir, tmp_path):
    small = dataclasses.replace(study, secure_aggregation=dataclasses.replace(study.secure_aggregation, max_weight=10.0))
    path = tmp_path / "study.toml"
    path.write_text(small.to_toml())
    client = SiteClient(SitePaths(study=path, data=cohorts_dir / "hospital-01", state_dir=tmp_path, policy=None), run_id=1)
    weights = get_weights(build_model(load_study(path)))
    with pytest.raises(Refusal, match="more than secure_aggregation.max_weight") as refused:
        client.fit(weights, _config(client))
    assert refused.value.kind is RefusalKind.DATA
    rows = str(len(client.data.train.labels))
    assert rows in str(refused.value) and rows not in refused.value.reason()  # the site's size stays at the site
    assert PrivacyLedger(tmp_path).entries() == []
