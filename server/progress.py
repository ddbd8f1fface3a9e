"""The coordinator's live progress: prints each round as it happens and records it in the run record.

What is kept of a run (checkpoints, the round log, the federated scaling) is `fedcare.run_record`;
this module is the ServerApp's side of it: one line per event on stdout, one `RoundEntry` per
training round once the model it produced has been evaluated.
"""

from __future__ import annotations

import time

import numpy as np

from fedcare.contribution import Evaluation, Standardization
from fedcare.run_record import RoundEntry, RunRecord, utc_now
from fedcare.study import Study


class RoundLog:
    """Prints live progress and records one entry per training round once its model is evaluated."""

    def __init__(self, record: RunRecord, study: Study) -> None:
        self.record = record
        self.study = study
        self.total_rounds = study.training.rounds
        self.last = time.monotonic()
        self.aggregated: dict[int, tuple[float, int]] = {}  # round -> (seconds, sites aggregated)

    def aggregated_round(self, training_round: int, weights: list[np.ndarray], sites: int) -> None:
        """A new global model: checkpoint it and say so."""
        self.record.save_checkpoint(training_round, weights, self.study.hash)
        now = time.monotonic()
        self.aggregated[training_round] = (round(now - self.last, 2), sites)
        self.last = now
        print(f"round {training_round}/{self.total_rounds} aggregated  {self.aggregated[training_round][0]:.1f} s", flush=True)

    def standardized(self, result: Standardization) -> None:
        self.record.save_scaling(self.study, center=result.center, scale=result.scale, counts=result.counts)
        print(f"federated standardization: scaling from SecAgg+ sums over {int(result.counts.max())} training rows "
              f"(per-feature counts, means and standard deviations of all sites together)", flush=True)

    def evaluated(self, model_round: int, evaluation: Evaluation) -> None:
        """The federated evaluation of the model after `model_round` (0: the initial model)."""
        what = "initial model" if model_round == 0 else f"model after round {model_round}/{self.total_rounds}"
        print(
            f"{what}: test AUC {evaluation.auc:.3f}  loss {evaluation.loss:.4f}  "
            f"({evaluation.sites} sites evaluated, aggregate only)",
            flush=True,
        )
        if model_round == 0:
            return
        seconds, sites = self.aggregated.get(model_round, (None, 0))
        self.record.append_round(RoundEntry(
            round=model_round,
            aggregated=model_round in self.aggregated,
            sites_aggregated=sites,
            auc=round(evaluation.auc, 5),
            loss=round(evaluation.loss, 5),
            sites_evaluated=evaluation.sites,
            seconds=seconds,
            time=utc_now(),
        ))
        if model_round not in self.aggregated:
            print(f"round {model_round}/{self.total_rounds}: no secure aggregate; the model is unchanged", flush=True)
