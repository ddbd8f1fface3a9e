"""FedAvg over model deltas, fed only by SecAgg+.

Each site's masked vector holds its size-weighted delta, its size and its evaluation of the
model the round started from (`fedcare.contribution`). Flower's SecAgg+ workflow unmasks
only the mean of those vectors and hands that single aggregate to the strategy, attached to
every result. `DeltaFedAvg` reads it and applies

    global <- global + server_learning_rate * (example-weighted mean delta)

It refuses results that are not the SecAgg+ aggregate (distinct per-site parameter
objects), so no code path can average plaintext updates. There is no plaintext evaluation
phase: after the last training round, one evaluation-only SecAgg+ round (no training, no ε)
reports the final model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedcare.contribution import ContributionFormat, Evaluation


class PlaintextUpdateError(RuntimeError):
    """The strategy was handed individual site updates instead of the SecAgg+ aggregate."""


RoundCallback = Callable[[int, NDArrays], None]
EvaluationCallback = Callable[[int, Evaluation], None]


class DeltaFedAvg(FedAvg):
    """FedAvg on SecAgg+-aggregated deltas with a server learning rate.

    Parameters
    ----------
    initial_weights : NDArrays
        The study model's initial global weights.
    server_learning_rate : float
        Step applied to the aggregated delta (1.0 is plain FedAvg).
    min_sites : int
        Minimum number of sites sampled in a round.
    training_rounds : int
        Rounds of training; round `training_rounds + 1` is the evaluation-only round.
    contribution : ContributionFormat
        How the sites' masked vectors are laid out (from the study's SecAgg+ parameters).
    fit_config : dict
        Sent to every site with each round (the study hash); the round number and
        `evaluate_only` are added.
    on_aggregated : callable(round, weights), optional
        Called with each new global model (checkpointing).
    on_evaluated : callable(model_round, evaluation), optional
        Called with the federated evaluation of the model after `model_round` (0 = initial).
    """

    def __init__(
        self,
        *,
        initial_weights: NDArrays,
        server_learning_rate: float,
        min_sites: int,
        training_rounds: int,
        contribution: ContributionFormat,
        fit_config: dict[str, Scalar],
        on_aggregated: RoundCallback | None = None,
        on_evaluated: EvaluationCallback | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_sites,
            min_available_clients=min_sites,
            initial_parameters=ndarrays_to_parameters(initial_weights),
            on_fit_config_fn=lambda rnd: {**fit_config, "round": rnd, "evaluate_only": rnd > training_rounds},
            accept_failures=True,
        )
        self.global_weights: NDArrays = [np.asarray(w, dtype=np.float32) for w in initial_weights]
        self.server_learning_rate = server_learning_rate
        self.training_rounds = training_rounds
        self.contribution = contribution
        self.on_aggregated = on_aggregated
        self.on_evaluated = on_evaluated

    def __repr__(self) -> str:
        return f"DeltaFedAvg(server_learning_rate={self.server_learning_rate})"

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation travels inside SecAgg+ with the training vector

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if server_round > self.training_rounds + 1:
            return []
        return super().configure_fit(server_round, parameters, client_manager)

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
        vector = parameters_to_ndarrays(aggregate)
        if len(vector) != len(self.global_weights) + 2:
            raise ValueError(f"aggregate has {len(vector)} arrays; the study expects {len(self.global_weights) + 2}")
        read = self.contribution.decode(vector, sites=len(results))
        if self.on_evaluated:
            self.on_evaluated(server_round - 1, read.evaluation)
        if read.mean_delta is None or server_round > self.training_rounds:
            return None, {}
        self.global_weights = [
            (w + self.server_learning_rate * d.astype(np.float64)).astype(np.float32)
            for w, d in zip(self.global_weights, read.mean_delta)
        ]
        if self.on_aggregated:
            self.on_aggregated(server_round, self.global_weights)
        return ndarrays_to_parameters(self.global_weights), {}
