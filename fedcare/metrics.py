"""Discrimination and calibration metrics that can be summed across sites.

`score_histogram` turns one site's predictions into counts of positives and negatives per
score bin; histograms add across sites, and `auc_from_histogram` gives the AUC of the
union without anyone seeing a patient-level score.
"""

from __future__ import annotations

import numpy as np

AUC_BINS = 1000


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with tie correction)."""
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks for ties
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = starts + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_histogram(y_true: np.ndarray, probs: np.ndarray, bins: int = AUC_BINS) -> np.ndarray:
    """[2, bins] int64 counts: row 0 negatives, row 1 positives, by probability bin."""
    idx = np.clip((np.asarray(probs) * bins).astype(np.int64), 0, bins - 1)
    y = np.asarray(y_true).astype(bool)
    return np.stack([np.bincount(idx[~y], minlength=bins), np.bincount(idx[y], minlength=bins)])


def auc_from_histogram(hist: np.ndarray) -> float:
    """AUC of binned scores (ties within a bin count one half)."""
    neg, pos = hist[0].astype(np.float64), hist[1].astype(np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y_true, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def accuracy(y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    return float(((np.asarray(probs) >= threshold) == np.asarray(y_true).astype(bool)).mean())


CALIBRATION_BINS = 10


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of sensitivity and specificity at `threshold` (NaN when one class is absent)."""
    y = np.asarray(y_true).astype(bool)
    predicted = np.asarray(probs) >= threshold
    if y.all() or not y.any():
        return float("nan")
    return float((predicted[y].mean() + (~predicted[~y]).mean()) / 2)


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of the predicted probability (0 is perfect; 0.25 is a constant 0.5)."""
    return float(((np.asarray(probs, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)) ** 2).mean())


def roc_curve(y_true: np.ndarray, probs: np.ndarray) -> dict[str, list[float]]:
    """ROC points from (0, 0) to (1, 1): one per distinct threshold, highest first."""
    return roc_from_histogram(score_histogram(y_true, probs))


def roc_from_histogram(hist: np.ndarray) -> dict[str, list[float]]:
    """ROC points of binned scores (thresholds at the bin edges, highest first); the curve of the
    union of sites from their summed histograms. Empty lists when one class is absent."""
    neg, pos = hist[0][::-1].astype(np.float64), hist[1][::-1].astype(np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return {"fpr": [], "tpr": []}
    keep = (neg + pos) > 0
    fpr = np.concatenate([[0.0], np.cumsum(neg)[keep] / neg.sum()])
    tpr = np.concatenate([[0.0], np.cumsum(pos)[keep] / pos.sum()])
    return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def calibration_table(y_true: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Reliability diagram: per probability bin that holds rows, the mean predicted risk, the observed
    rate and the row count."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    table = []
    for b in range(bins):
        rows = idx == b
        if rows.any():
            table.append({"predicted": round(float(p[rows].mean()), 5), "observed": round(float(y[rows].mean()), 5),
                          "rows": int(rows.sum())})
    return table


def calibration_from_histogram(hist: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """The reliability diagram of summed score histograms (`score_histogram`): the predicted risk of a
    row is taken as its fine bin's midpoint, so it is exact to 1 / AUC_BINS."""
    fine = hist.shape[1]
    if fine % bins:
        raise ValueError(f"{fine} histogram bins do not group into {bins} calibration bins")
    neg = hist[0].astype(np.float64).reshape(bins, -1)
    pos = hist[1].astype(np.float64).reshape(bins, -1)
    mids = ((np.arange(fine) + 0.5) / fine).reshape(bins, -1)
    table = []
    for b in range(bins):
        rows = neg[b].sum() + pos[b].sum()
        if rows:
            table.append({"predicted": round(float(((neg[b] + pos[b]) * mids[b]).sum() / rows), 5),
                          "observed": round(float(pos[b].sum() / rows), 5), "rows": int(rows)})
    return table
