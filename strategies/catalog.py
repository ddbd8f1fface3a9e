"""The study's strategy by name: which server optimizer turns the secure aggregate into the next model.

Every strategy aggregates the same way, the SecAgg+ example-weighted mean delta Δ_t (the only thing
the coordinator sees, `strategies.fedavg.DeltaFedAvg`), and differs in its server optimizer
(`strategies.server_optimizers`) and, for FedProx, in what the sites train (`client/training.py`):

| `strategy.name` | server optimizer | fields (`fedcare.study.STRATEGY_DEFAULTS` gives the defaults) |
|-----------------|------------------|---------------------------------------------------------------|
| fedavg          | ServerSGD        | server_learning_rate                                          |
| fedprox         | ServerSGD        | server_learning_rate, proximal_mu (applied at the sites)      |
| fedavgm         | ServerMomentum   | server_learning_rate, server_momentum                         |
| fedadagrad      | ServerAdagrad    | server_learning_rate, beta1, tau                              |
| fedadam         | ServerAdam       | server_learning_rate, beta1, beta2, tau                       |
| fedyogi         | ServerYogi       | server_learning_rate, beta1, beta2, tau                       |
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedcare.contribution import ContributionFormat
from fedcare.run_record import RunRecordError
from fedcare.study import Strategy, Study
from strategies.fedavg import DeltaFedAvg, EvaluationCallback, RoundCallback, StandardizationCallback, StateCallback
from strategies.server_optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
)

STATEFUL = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


def server_optimizer_for(strategy: Strategy) -> ServerOptimizer:
    """A fresh server optimizer for the study's `[strategy]` (no state yet)."""
    s = strategy
    lr = float(s.server_learning_rate)
    if s.name in ("fedavg", "fedprox"):
        return ServerSGD(learning_rate=lr)
    if s.name == "fedavgm":
        return ServerMomentum(learning_rate=lr, momentum=_given(s.server_momentum, "server_momentum"))
    beta1, tau = _given(s.beta1, "beta1"), _given(s.tau, "tau")
    if s.name == "fedadagrad":
        return ServerAdagrad(learning_rate=lr, beta1=beta1, tau=tau)
    if s.name == "fedadam":
        return ServerAdam(learning_rate=lr, beta1=beta1, beta2=_given(s.beta2, "beta2"), tau=tau)
    if s.name == "fedyogi":
        return ServerYogi(learning_rate=lr, beta1=beta1, beta2=_given(s.beta2, "beta2"), tau=tau)
    raise ValueError(f"unknown strategy {s.name!r}")


def _given(value: float | None, field: str) -> float:
    if value is None:
        raise ValueError(f"strategy.{field} is not set (a Strategy parsed by fedcare.study always has it)")
    return float(value)


def strategy_for_study(
    study: Study,
    *,
    initial_weights: list[np.ndarray],
    first_round: int = 1,
    scaling: bytes | None = None,
    optimizer_state: Mapping[str, np.ndarray] | None = None,
    on_aggregated: RoundCallback | None = None,
    on_optimizer_state: StateCallback | None = None,
    on_evaluated: EvaluationCallback | None = None,
    on_standardized: StandardizationCallback | None = None,
) -> DeltaFedAvg:
    """The study's strategy, ready for round `first_round`.

    Parameters
    ----------
    study : Study
        The study as run; its `[strategy]` chooses the server optimizer and its options.
    initial_weights : list of ndarray
        The global model to start from (the initial model, or a resumed run's last checkpoint).
    first_round : int
        The training round this run starts at (1, or the one after a resumed run's checkpoint).
    scaling : bytes, optional
        A resumed run's federated scaling (`fedcare.contribution.scaling_bytes`).
    optimizer_state : mapping of str to ndarray, optional
        The server optimizer's state saved with that checkpoint (`RunRecord.optimizer_state`). Required
        when a stateful strategy (FedAvgM, FedAdagrad, FedAdam, FedYogi) resumes after round 1 or
        later: without it the run could not go on as an uninterrupted one would.
    on_aggregated, on_optimizer_state, on_evaluated, on_standardized : callable, optional
        As `DeltaFedAvg`'s (`on_optimizer_state`: save the state beside the round's checkpoint).
    """
    optimizer = server_optimizer_for(study.strategy)
    if optimizer_state:
        optimizer.load_state(dict(optimizer_state))
    elif first_round > 1 and study.strategy.name in STATEFUL:
        raise RunRecordError(
            f"strategy {study.strategy.name} resumes after round {first_round - 1} without its server optimizer state "
            "(checkpoints/server-optimizer-NNN.npz): it would not continue as the uninterrupted run")
    return DeltaFedAvg(
        initial_weights=initial_weights,
        first_round=first_round,
        scaling=scaling,
        server_optimizer=optimizer,
        min_sites=study.strategy.min_sites,
        training_rounds=study.training.rounds,
        contribution=ContributionFormat.for_study(study),
        study_hash=study.hash,
        federated_standardization=study.standardization == "federated",
        on_aggregated=on_aggregated,
        on_optimizer_state=on_optimizer_state,
        on_evaluated=on_evaluated,
        on_standardized=on_standardized,
    )
