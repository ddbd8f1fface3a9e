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
