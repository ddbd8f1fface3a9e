"""The coordinator's live progress: prints each round as it happens and keeps the round log true.

What is kept of a run (checkpoints, the round log, the federated scaling, the outcome) is
`fedcare.run_record`; this module is the ServerApp's side of it. The round log holds one entry per
training round, updated as its facts arrive: aggregated (by how many sites), or why not (halted,
skipped after training stopped), and the federated evaluation of the model after it. When the
study ends, `finish` records whether it completed or stopped early, and why.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from fedcare.contribution import Evaluation, Standardization
from fedcare.run_record import Outcome, RoundEntry, RunRecord, utc_now
from fedcare.study import Study


class RoundLog:
    """Prints live progress and keeps one entry per training round in the run record."""

    def __init__(self, record: RunRecord, study: Study, entries: list[RoundEntry] = ()) -> None:
        self.record = record
        self.study = study
        self.total_rounds = study.training.rounds
        self.last = time.monotonic()
        self.entries: dict[int, RoundEntry] = {entry.round: entry for entry in entries}  # a resumed run's log so far

    def _update(self, training_round: int, **facts: object) -> None:
        entry = self.entries.get(training_round) or RoundEntry(
            round=training_round, aggregated=False, sites_aggregated=0, auc=None, loss=None, sites_evaluated=0,
            seconds=None)
        self.entries[training_round] = dataclasses.replace(entry, **facts, time=utc_now())
        self.record.write_rounds(list(self.entries.values()))

    def aggregated_round(self, training_round: int, weights: list[np.ndarray], sites: int) -> None:
        """A new global model: checkpoint it and say so."""
        self.record.save_checkpoint(training_round, weights, self.study.hash)
        now = time.monotonic()
        seconds = round(now - self.last, 2)
        self.last = now
        self._update(training_round, aggregated=True, sites_aggregated=sites, seconds=seconds, note="")
        print(f"round {training_round}/{self.total_rounds} aggregated ({sites} sites)  {seconds:.1f} s", flush=True)

    def lost(self, training_round: int, why: str) -> None:
        """A training round that produced no aggregate (the model is unchanged)."""
        self.last = time.monotonic()
        self._update(training_round, note=why)
        print(f"round {training_round}/{self.total_rounds}: no secure aggregate ({why}); the model is unchanged", flush=True)

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
        if model_round:
            self._update(model_round, auc=round(evaluation.auc, 5), loss=round(evaluation.loss, 5),
                         sites_evaluated=evaluation.sites)
            if evaluation.histogram is not None:  # the sum over the sites: the report's pooled ROC and calibration
                self.record.save_evaluation(model_round, evaluation.histogram)

    def finish(self, stopped: str) -> Outcome:
        """Record how the study ended: completed (every planned round ran) or stopped early, and why."""
        aggregated = sum(e.aggregated for e in self.entries.values())
        outcome = Outcome(completed=not stopped, rounds_planned=self.total_rounds, rounds_aggregated=aggregated,
                          stopped=stopped, finished=utc_now())
        self.record.finish(outcome)
        state = "completed" if outcome.completed else f"stopped early: {stopped}"
        print(f"study {state}; {aggregated} of {self.total_rounds} training rounds aggregated", flush=True)
        return outcome
