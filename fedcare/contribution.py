"""What one site puts in its SecAgg+ vector, and how the coordinator reads the sum.

Nothing about a single site leaves it in plaintext: every number a site sends is inside the
vector SecAgg+ masks, and the plaintext `num_examples` is the same constant for every site
(`max_weight`, so that Flower's own weighting is the identity) with empty metrics.

The vector of one site is

    [ w·Δ_1, …, w·Δ_k,   [w],   E / eval_scale ]

with w = n_train / max_weight (0 in an evaluation-only round, where Δ = 0 too), Δ the site's
model delta, and E = [negatives per score bin, positives per score bin, Σ log-loss / LOSS_CAP]
for the global model the round started from, on the site's test split. eval_scale =
max_weight / clipping_range keeps every value inside SecAgg+'s clipping range as long as a
site has at most max_weight test rows (checked by the site).

SecAgg+ gives the coordinator the mean of the m sites' vectors. From it:

    mean delta weighted by n = Σ w·Δ / Σ w     (example-weighted FedAvg)
    summed histograms, loss  = m · eval_scale · mean   (histogram counts rounded to integers)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.common import NDArrays

from fedcare.metrics import AUC_BINS, auc_from_histogram

LOSS_CAP = 16.2  # the largest per-row log-loss (probabilities are clipped to [1e-7, 1 - 1e-7])


@dataclass(frozen=True)
class Evaluation:
    """The federated evaluation of one global model: aggregates over the sites that reported."""

    auc: float
    loss: float
    test_rows: int
    sites: int


@dataclass(frozen=True)
class Aggregate:
    """What the coordinator learns from one round's SecAgg+ sum."""

    mean_delta: NDArrays | None  # None when no site trained (evaluation-only round)
    train_rows: int
    evaluation: Evaluation


@dataclass(frozen=True)
class ContributionFormat:
    max_weight: float
    clipping_range: float
    bins: int = AUC_BINS

    @property
    def plaintext_weight(self) -> int:
        """The constant every site reports as its number of examples."""
        return int(self.max_weight)

    @property
    def eval_scale(self) -> float:
        return self.max_weight / self.clipping_range

    def encode(self, delta: NDArrays, n_train: int, histogram: np.ndarray, loss_sum: float) -> NDArrays:
        """One site's vector (see the module docstring). `n_train` is 0 for an evaluation-only round."""
        w = n_train / self.max_weight
        block = np.concatenate([histogram.reshape(-1).astype(np.float64), [loss_sum / LOSS_CAP]]) / self.eval_scale
        return [np.asarray(d, dtype=np.float64) * w for d in delta] + [np.array([w]), block]

    def decode(self, mean_vector: NDArrays, sites: int) -> Aggregate:
        """The coordinator's reading of SecAgg+'s mean over `sites` vectors."""
        *weighted, w_mean, block = mean_vector
        total = np.asarray(block, dtype=np.float64) * sites * self.eval_scale
        histogram = np.rint(total[: 2 * self.bins]).clip(min=0).astype(np.int64).reshape(2, self.bins)
        test_rows = int(histogram.sum())
        loss = float(total[2 * self.bins]) * LOSS_CAP / max(test_rows, 1)
        evaluation = Evaluation(auc=auc_from_histogram(histogram), loss=loss, test_rows=test_rows, sites=sites)
        train_rows = int(round(float(w_mean[0]) * sites * self.max_weight))
        if train_rows == 0:
            return Aggregate(mean_delta=None, train_rows=0, evaluation=evaluation)
        mean_delta = [(np.asarray(a, dtype=np.float64) / float(w_mean[0])).astype(np.float32) for a in weighted]
        return Aggregate(mean_delta=mean_delta, train_rows=train_rows, evaluation=evaluation)

    def largest_value(self, vector: NDArrays) -> float:
        """The largest |value| SecAgg+ will see (it clips silently beyond clipping_range)."""
        return max(float(np.abs(a).max()) for a in vector if np.size(a))
