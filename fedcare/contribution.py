"""The arithmetic of a site's SecAgg+ vector, and how the coordinator reads the sum.

Which part sits where is `fedcare.protocol.VectorLayout`; this module fills and reads the parts.

Nothing about a single site leaves it in plaintext: every number a site sends is inside the
vector SecAgg+ masks, and the plaintext `num_examples` is the same constant for every site
(`max_weight`, so that Flower's own weighting is the identity) with empty metrics.

The vector of one site is

    [ w·Δ_1, …, w·Δ_k,   [w],   E / eval_scale,   S ]

with w = n_train / max_weight (0 in an evaluation-only round, where Δ = 0 too), Δ the site's
model delta, and E = [negatives per score bin, positives per score bin, Σ log-loss / LOSS_CAP]
for the global model the round started from, on the site's test split. eval_scale =
max_weight / clipping_range keeps every value inside SecAgg+'s clipping range as long as a
site has at most max_weight test rows (checked by the site). S is the standardization block,
non-zero only in the statistics round that opens a study with `standardization = "federated"`:
per feature, the count of present values, Σz and Σz² of z = (clip(x, range) − center) / scale
(spec center and scale), divided by eval_scale, eval_scale·B and eval_scale·B² with B the
largest |z| the range allows, so that every value stays within the clipping range.

SecAgg+ gives the coordinator the mean of the m sites' vectors. From it:

    mean delta weighted by n = Σ w·Δ / Σ w     (example-weighted FedAvg)
    summed histograms, loss  = m · eval_scale · mean   (histogram counts rounded to integers)
    pooled mean and std of z = from the summed count, Σz, Σz²  → the study's new center and scale
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcare.metrics import AUC_BINS, auc_from_histogram
from fedcare.protocol import VectorLayout
from fedcare.study import Study

NDArrays = list[np.ndarray]

LOSS_CAP = 16.2  # the largest per-row log-loss (probabilities are clipped to [1e-7, 1 - 1e-7])


@dataclass(frozen=True)
class Evaluation:
    """The federated evaluation of one global model: aggregates over the sites that reported."""

    auc: float
    loss: float
    test_rows: int
    sites: int
    # the summed score histograms [negatives, positives] per score bin (int64 [2, AUC_BINS]): an aggregate
    # over every site that reported, the same the AUC is computed from (the report's pooled ROC and calibration)
    histogram: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Standardization:
    """Pooled per-feature statistics of the sites' training rows, and the scaling they give."""

    counts: np.ndarray
    center: np.ndarray  # raw units
    scale: np.ndarray  # raw units


@dataclass(frozen=True)
class Aggregate:
    """What the coordinator learns from one round's SecAgg+ sum."""

    mean_delta: NDArrays | None  # None when no site trained (evaluation-only round)
    train_rows: int
    evaluation: Evaluation
    standardization: Standardization | None = None


@dataclass(frozen=True)
class ContributionFormat:
    max_weight: float
    clipping_range: float
    centers: tuple[float, ...]  # the spec's, per feature
    scales: tuple[float, ...]
    lows: tuple[float, ...]
    highs: tuple[float, ...]
    bins: int = AUC_BINS

    @classmethod
    def for_study(cls, study: Study) -> ContributionFormat:
        sa = study.secure_aggregation
        return cls(
            max_weight=sa.max_weight,
            clipping_range=sa.clipping_range,
            centers=tuple(f.center for f in study.features),
            scales=tuple(f.scale for f in study.features),
            lows=tuple(f.low for f in study.features),
            highs=tuple(f.high for f in study.features),
        )

    @property
    def plaintext_weight(self) -> int:
        """The constant every site reports as its number of examples."""
        return int(self.max_weight)

    @property
    def eval_scale(self) -> float:
        return self.max_weight / self.clipping_range

    @property
    def _z_bound(self) -> np.ndarray:
        c, s = np.array(self.centers), np.array(self.scales)
        return np.maximum(np.abs(np.array(self.lows) - c), np.abs(np.array(self.highs) - c)) / s

    def _z(self, raw: np.ndarray) -> np.ndarray:
        clipped = np.clip(raw, np.array(self.lows), np.array(self.highs))
        return (clipped - np.array(self.centers)) / np.array(self.scales)

    def statistics(self, raw: np.ndarray) -> np.ndarray:
        """One site's standardization block from its raw training table (NaN = missing)."""
        present = ~np.isnan(raw)
        z = np.where(present, self._z(np.nan_to_num(raw)), 0.0)
        bound = self._z_bound
        return np.concatenate([present.sum(axis=0), z.sum(axis=0) / bound, (z**2).sum(axis=0) / bound**2]) / self.eval_scale

    def layout(self, model_arrays: int) -> VectorLayout:
        """Where each part of a vector is, for a model of `model_arrays` arrays."""
        return VectorLayout(model_arrays=model_arrays, bins=self.bins, features=len(self.centers))

    def empty_statistics(self) -> np.ndarray:
        return np.zeros(3 * len(self.centers))

    def encode(
        self, delta: NDArrays, n_train: int, histogram: np.ndarray, loss_sum: float, statistics: np.ndarray | None = None
    ) -> NDArrays:
        """One site's vector (see the module docstring). `n_train` is 0 when the site trains nothing."""
        w = n_train / self.max_weight
        block = np.concatenate([histogram.reshape(-1).astype(np.float64), [loss_sum / LOSS_CAP]]) / self.eval_scale
        stats = self.empty_statistics() if statistics is None else statistics
        vector = [np.asarray(d, dtype=np.float64) * w for d in delta] + [np.array([w]), block, stats]
        self.layout(len(delta)).split(vector)  # the layout is the one contract: check it on the way out too
        return vector

    def decode(self, mean_vector: NDArrays, sites: int, *, model_arrays: int) -> Aggregate:
        """The coordinator's reading of SecAgg+'s mean over `sites` vectors (a model of `model_arrays` arrays)."""
        weighted, w_mean, block, stats = self.layout(model_arrays).split(list(mean_vector))
        total = np.asarray(block, dtype=np.float64) * sites * self.eval_scale
        histogram = np.rint(total[: 2 * self.bins]).clip(min=0).astype(np.int64).reshape(2, self.bins)
        test_rows = int(histogram.sum())
        loss = float(total[2 * self.bins]) * LOSS_CAP / max(test_rows, 1)
        evaluation = Evaluation(auc=auc_from_histogram(histogram), loss=loss, test_rows=test_rows, sites=sites,
                                histogram=histogram)
        standardization = self._standardization(np.asarray(stats, dtype=np.float64) * sites * self.eval_scale)
        train_rows = int(round(float(w_mean[0]) * sites * self.max_weight))
        if train_rows == 0:
            return Aggregate(None, 0, evaluation, standardization)
        mean_delta = [(np.asarray(a, dtype=np.float64) / float(w_mean[0])).astype(np.float32) for a in weighted]
        return Aggregate(mean_delta, train_rows, evaluation, standardization)

    def _standardization(self, stats: np.ndarray) -> Standardization | None:
        f = len(self.centers)
        counts = np.rint(stats[:f])
        if not counts.any():
            return None
        bound = self._z_bound
        sums, squares = stats[f : 2 * f] * bound, stats[2 * f :] * bound**2
        n = np.maximum(counts, 1)
        mean = sums / n
        var = np.maximum(squares / n - mean**2, 0.0)
        c, s = np.array(self.centers), np.array(self.scales)
        usable = (counts >= 2) & (var > 1e-12)  # otherwise keep the spec's scaling for that feature
        center = np.where(usable, c + s * mean, c)
        scale = np.where(usable, s * np.sqrt(var), s)
        return Standardization(counts=counts.astype(np.int64), center=center, scale=scale)

    def largest_value(self, vector: NDArrays) -> float:
        """The largest |value| SecAgg+ will see (it clips silently beyond clipping_range)."""
        return max(float(np.abs(a).max()) for a in vector if np.size(a))


def scaling_bytes(center: np.ndarray, scale: np.ndarray) -> bytes:
    """The scaling as it travels in a round's config (float64 centers, then scales)."""
    return np.concatenate([center, scale]).astype("<f8").tobytes()


def scaling_from_bytes(blob: bytes, features: int) -> tuple[list[float], list[float]]:
    values = np.frombuffer(blob, dtype="<f8")
    if values.shape != (2 * features,):
        raise ValueError(f"scaling: expected {2 * features} values, got {values.size}")
    return values[:features].tolist(), values[features:].tolist()
