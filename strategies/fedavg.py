"""FedAvg over model deltas, fed only by SecAgg+.

Each site's masked vector holds its size-weighted delta, its size and its evaluation of the
model the round started from (`fedcare.contribution`). Flower's SecAgg+ workflow unmasks
only the mean of those vectors and hands that single aggregate to the strategy, attached to
every result. `DeltaFedAvg` reads the example-weighted mean delta Δ_t from it and hands it to its
server optimizer (`strategies.server_optimizers`), which alone decides the next global model:

    FedAvg / FedProx   global <- global + server_learning_rate * Δ_t
    FedAvgM            server momentum on Δ_t;   FedAdagrad / FedAdam / FedYogi: adaptive steps on Δ_t

(`strategies.catalog` builds the study's). Nothing else of the sites reaches the optimizer.

It refuses results that are not the SecAgg+ aggregate (distinct per-site parameter
objects), so no code path can average plaintext updates.

A study's SecAgg+ rounds, in order (`fedcare.protocol.Phase`; every phase is a SecAgg+ round):
  statistics  only with `standardization = "federated"`: sites send per-feature count, Σz, Σz²;
              the pooled mean and std become every site's scaling (no training, no ε)
  train 1..R  DP-SGD rounds; each also carries the evaluation of the model it started from
  evaluate    after round R: evaluation only (no training, no ε) of the final model
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

from fedcare.contribution import ContributionFormat, Evaluation, Standardization, scaling_bytes
from fedcare.protocol import Phase, RoundConfig
from strategies.server_optimizers import ServerOptimizer, ServerSGD


class PlaintextUpdateError(RuntimeError):
    """The strategy was handed individual site updates instead of the SecAgg+ aggregate."""


RoundCallback = Callable[[int, NDArrays, int], None]  # (training round, new global weights, sites aggregated)
StateCallback = Callable[[int, dict[str, np.ndarray]], None]  # (training round, server optimizer state after it)
EvaluationCallback = Callable[[int, Evaluation], None]
StandardizationCallback = Callable[[Standardization], None]


class DeltaFedAvg(FedAvg):
    """FedAvg aggregation (the SecAgg+ example-weighted mean delta) followed by a server optimizer.

    Parameters
    ----------
    initial_weights : NDArrays
        The study model's initial global weights.
    server_optimizer : ServerOptimizer, optional
        Turns each round's aggregate delta into the next global weights (`strategies.server_optimizers`;
        `strategies.catalog.server_optimizer_for` gives the study's). Defaults to
        `ServerSGD(learning_rate=server_learning_rate)`. A resumed run passes one whose state was
        restored from its last checkpoint.
    server_learning_rate : float, optional
        Only without `server_optimizer`: the step applied to the aggregated delta (default 1.0, plain FedAvg).
    min_sites : int
        Minimum number of sites sampled in a round.
    training_rounds : int
        Rounds of training (the phases above give the server round of each).
    federated_standardization : bool
        Open with a statistics round whose pooled mean and std scale every site's features.
    contribution : ContributionFormat
        How the sites' masked vectors are laid out (from the study's SecAgg+ parameters).
    study_hash : str
        The study as run; every round's `RoundConfig` carries it (with the phase, the training
        round and, once known, the federated scaling).
    on_aggregated : callable(round, weights, sites), optional
        Called with each new global model (checkpointing) and how many sites' vectors made it.
    on_optimizer_state : callable(round, state), optional
        Called with the server optimizer's state after each aggregated round, before `on_aggregated`
        (so a checkpoint never exists without it); not called while the state is empty (FedAvg).
    on_evaluated : callable(model_round, evaluation), optional
        Called with the federated evaluation of the model after `model_round` (0 = initial).
    on_standardized : callable(standardization), optional
        Called with the pooled statistics and the scaling they give.
    first_round : int
        The training round this run starts at (1; more when it resumes an interrupted study from the
        checkpoint of round `first_round - 1`, whose weights are then `initial_weights`).
    scaling : bytes, optional
        The federated scaling an interrupted run already computed: no statistics round is run again.
    """

    def __init__(
        self,
        *,
        initial_weights: NDArrays,
        min_sites: int,
        training_rounds: int,
        contribution: ContributionFormat,
        study_hash: str,
        federated_standardization: bool = False,
        on_aggregated: RoundCallback | None = None,
        on_optimizer_state: StateCallback | None = None,
        on_evaluated: EvaluationCallback | None = None,
        on_standardized: StandardizationCallback | None = None,
        first_round: int = 1,
        scaling: bytes | None = None,
        server_optimizer: ServerOptimizer | None = None,
        server_learning_rate: float | None = None,
    ) -> None:
        if not 1 <= first_round <= training_rounds:
            raise ValueError(f"first_round must be in 1..{training_rounds}, got {first_round}")
        if server_optimizer is not None and server_learning_rate is not None:
            raise ValueError("give server_optimizer or server_learning_rate, not both")
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_sites,
            min_available_clients=min_sites,
            initial_parameters=ndarrays_to_parameters(initial_weights),
            on_fit_config_fn=self.round_config,
            accept_failures=True,
        )
        self.study_hash = study_hash
        self.first_round = first_round
        self.last_aggregated = first_round - 1  # the training round of the current global model (0: the initial one)
        self.offset = 1 if federated_standardization and scaling is None else 0
        self.scaling: bytes | None = scaling
        self.global_weights: NDArrays = [np.asarray(w, dtype=np.float32) for w in initial_weights]
        if server_optimizer is None:
            server_optimizer = ServerSGD(learning_rate=1.0 if server_learning_rate is None else server_learning_rate)
        self.server_optimizer: ServerOptimizer = server_optimizer
        self.training_rounds = training_rounds
        self.contribution = contribution
        self.on_aggregated = on_aggregated
        self.on_optimizer_state = on_optimizer_state
        self.on_evaluated = on_evaluated
        self.on_standardized = on_standardized

    @property
    def rounds_to_train(self) -> int:
        """Training rounds in this run (all of them, or those left when it resumes)."""
        return self.training_rounds - self.first_round + 1

    @property
    def total_rounds(self) -> int:
        return self.offset + self.rounds_to_train + 1

    @property
    def training_server_rounds(self) -> range:
        """The server rounds that train."""
        return range(self.offset + 1, self.offset + self.rounds_to_train + 1)

    def phase(self, server_round: int) -> tuple[Phase, int]:
        """(phase, training round) of a server round."""
        if server_round <= self.offset:
            return Phase.STATISTICS, 0
        if server_round <= self.offset + self.rounds_to_train:
            return Phase.TRAIN, server_round - self.offset + self.first_round - 1
        return Phase.EVALUATE, self.training_rounds

    def round_config(self, server_round: int) -> dict[str, Scalar]:
        phase, training_round = self.phase(server_round)
        if phase is not Phase.STATISTICS and self.offset and self.scaling is None:
            raise RuntimeError("federated standardization has no result (its SecAgg+ round failed): the study stops")
        return RoundConfig(study_hash=self.study_hash, phase=phase, round=training_round, scaling=self.scaling).to_config()

    def __repr__(self) -> str:
        return f"DeltaFedAvg(server_optimizer={self.server_optimizer!r})"

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation travels inside SecAgg+ with the training vector

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if server_round > self.total_rounds:
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
        read = self.contribution.decode(vector, sites=len(results), model_arrays=len(self.global_weights))
        phase, training_round = self.phase(server_round)
        if phase is Phase.STATISTICS:
            if read.standardization is None:
                return None, {}
            self.scaling = scaling_bytes(read.standardization.center, read.standardization.scale)
            if self.on_standardized:
                self.on_standardized(read.standardization)
            return None, {}
        if self.on_evaluated:
            # a training round evaluates the model it started from; the evaluation round the final model,
            # which is the model after the last aggregated round (earlier than R when training stopped early)
            self.on_evaluated(training_round - 1 if phase is Phase.TRAIN else self.last_aggregated, read.evaluation)
        if phase is not Phase.TRAIN or read.mean_delta is None:
            return None, {}
        stepped = self.server_optimizer.step(self.global_weights, read.mean_delta)
        self.global_weights = [np.asarray(w, dtype=np.float32) for w in stepped]
        self.last_aggregated = training_round
        state = self.server_optimizer.state()
        if state and self.on_optimizer_state:
            self.on_optimizer_state(training_round, state)
        if self.on_aggregated:
            self.on_aggregated(training_round, self.global_weights, len(results))
        return ndarrays_to_parameters(self.global_weights), {}
