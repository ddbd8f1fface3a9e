import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from strategies.fedavg import DeltaFedAvg, PlaintextUpdateError


def _res(parameters, n=10):
    return FitRes(status=Status(Code.OK, ""), parameters=parameters, num_examples=n, metrics={})


def _strategy(lr=1.0, seen=None):
    return DeltaFedAvg(
        initial_weights=[np.ones((2, 2), np.float32), np.zeros(2, np.float32)],
        server_learning_rate=lr,
        min_sites=3,
        fit_config={"study_hash": "h"},
        on_aggregated=(lambda r, w: seen.append((r, w))) if seen is not None else None,
    )


def test_applies_the_secure_aggregate_as_a_delta():
    seen = []
    strategy = _strategy(lr=0.5, seen=seen)
    aggregate = ndarrays_to_parameters([np.full((2, 2), 2.0, np.float32), np.array([1.0, -1.0], np.float32)])
    params, _ = strategy.aggregate_fit(1, [(None, _res(aggregate))] * 3, [])
    new = parameters_to_ndarrays(params)
    np.testing.assert_allclose(new[0], np.full((2, 2), 2.0))
    np.testing.assert_allclose(new[1], [0.5, -0.5])
    assert seen[0][0] == 1


def test_refuses_individual_plaintext_updates():
    strategy = _strategy()
    updates = [ndarrays_to_parameters([np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]) for _ in range(3)]
    with pytest.raises(PlaintextUpdateError, match="fedcare aggregates only SecAgg\\+ sums"):
        strategy.aggregate_fit(1, [(None, _res(p)) for p in updates], [])


def test_sends_study_hash_and_round_to_sites():
    strategy = _strategy()
    assert strategy.on_fit_config_fn(4) == {"study_hash": "h", "round": 4}
