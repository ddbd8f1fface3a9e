"""FedAvg over model deltas, fed only by SecAgg+.

Sites send `new_weights - global_weights`. Flower's SecAgg+ workflow unmasks only the
example-weighted mean of those deltas and hands that single aggregate to the strategy,
attached to every result. `DeltaFedAvg` applies it:

    global <- global + server_learning_rate * mean_delta

It refuses results that are not the SecAgg+ aggregate (distinct per-site parameter
objects), so no code path can average plaintext updates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedcare.metrics import AUC_BINS, auc_from_histogram


class PlaintextUpdateError(RuntimeError):
    """The strategy was handed individual site updates instead of the SecAgg+ aggregate."""


RoundCallback = Callable[[int, NDArrays], None]
EvaluationCallback = Callable[[int, float, float, int], None]


class DeltaFedAvg(FedAvg):
    """FedAvg on SecAgg+-aggregated deltas with a server learning rate.

    Parameters
    ----------
    initial_weights : NDArrays
        The study model's initial global weights.
    server_learning_rate : float
        Step applied to the aggregated delta (1.0 is plain FedAvg).
    min_sites : int
        Minimum number of sites sampled for training and evaluation.
    fit_config : dict
        Sent to every site with each training round (the study hash, the round).
    on_aggregated : callable(round, weights), optional
        Called with each new global model (checkpointing).
    on_evaluated : callable(round, auc, loss, n_sites), optional
        Called with each round's federated evaluation.
    """

    def __init__(
        self,
        *,
        initial_weights: NDArrays,
        server_learning_rate: float,
        min_sites: int,
        fit_config: dict[str, Scalar],
        on_aggregated: RoundCallback | None = None,
        on_evaluated: EvaluationCallback | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=min_sites,
            min_evaluate_clients=min_sites,
            min_available_clients=min_sites,
            initial_parameters=ndarrays_to_parameters(initial_weights),
            on_fit_config_fn=lambda rnd: {**fit_config, "round": rnd},
            on_evaluate_config_fn=lambda rnd: {**fit_config, "round": rnd},
            accept_failures=True,
        )
        self.global_weights: NDArrays = [np.asarray(w, dtype=np.float32) for w in initial_weights]
        self.server_learning_rate = server_learning_rate
        self.on_aggregated = on_aggregated
        self.on_evaluated = on_evaluated

    def __repr__(self) -> str:
        return f"DeltaFedAvg(server_learning_rate={self.server_learning_rate})"

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        aggregate = results[0][1].parameters
        if any(res.parameters is not aggregate for _, res in results[1:]):
            raise PlaintextUpdateError(
                "DeltaFedAvg received individual site updates; fedcare aggregates only SecAgg+ sums"
            )
        mean_delta = parameters_to_ndarrays(aggregate)
        if len(mean_delta) != len(self.global_weights):
            raise ValueError(f"aggregate has {len(mean_delta)} arrays, the model {len(self.global_weights)}")
        self.global_weights = [
            (w + self.server_learning_rate * d.astype(np.float64)).astype(np.float32)
            for w, d in zip(self.global_weights, mean_delta)
        ]
        if self.on_aggregated:
            self.on_aggregated(server_round, self.global_weights)
        return ndarrays_to_parameters(self.global_weights), {}

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        hist = np.zeros((2, AUC_BINS), dtype=np.int64)
        loss_sum, n = 0.0, 0
        for _, res in results:
            hist += np.frombuffer(res.metrics["score_histogram"], dtype=np.int64).reshape(2, AUC_BINS)
            loss_sum += res.loss * res.num_examples
            n += res.num_examples
        auc, loss = auc_from_histogram(hist), loss_sum / max(n, 1)
        if self.on_evaluated:
            self.on_evaluated(server_round, auc, loss, len(results))
        return loss, {"auc": auc}
