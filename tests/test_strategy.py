"""The coordinator's strategy: applies only the SecAgg+ aggregate, learns sizes and metrics only as sums."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedcare.contribution import ContributionFormat, scaling_from_bytes
from fedcare.study import load_study
from fedcare.metrics import auc_from_histogram, score_histogram
from fedcare.protocol import Phase
from strategies.fedavg import DeltaFedAvg, PlaintextUpdateError

from .conftest import DEFAULT_STUDY

FORMAT = ContributionFormat.for_study(load_study(DEFAULT_STUDY))
TARGET, MODULUS = 1 << 22, 1 << 32
SHAPES = [(30, 32), (32,), (1, 32), (1,)]


def _res(parameters):
    return FitRes(status=Status(Code.OK, ""), parameters=parameters, num_examples=FORMAT.plaintext_weight, metrics={})


def _strategy(lr=1.0, seen=None, evaluated=None, weights=None, federated=False, standardized=None):
    return DeltaFedAvg(
        federated_standardization=federated,
        on_standardized=(lambda result: standardized.append(result)) if standardized is not None else None,
        initial_weights=weights or [np.zeros(s, np.float32) for s in SHAPES],
        server_learning_rate=lr,
        min_sites=3,
        training_rounds=2,
        contribution=FORMAT,
        study_hash="h",
        on_aggregated=(lambda r, w, sites: seen.append((r, w))) if seen is not None else None,
        on_evaluated=(lambda r, e: evaluated.append((r, e))) if evaluated is not None else None,
    )


def _site(rng, n_train, n_test):
    delta = [rng.normal(0, 0.05, size=s) for s in SHAPES]
    labels = rng.random(n_test) < 0.2
    probs = np.clip(rng.beta(2, 5, n_test) + 0.2 * labels, 0, 1)
    return delta, n_train, score_histogram(labels, probs), float(n_test * 0.45)


def _secaggplus_mean(vectors: list[list[np.ndarray]], plaintext_weight: int) -> list[np.ndarray]:
    """What Flower 1.42's SecAgg+ computes from these site vectors (client `_collect_masked_vectors`,
    server `unmask_stage`), with pairwise masks that cancel in the sum."""
    rng = np.random.default_rng(7)
    masked = []
    for vector in vectors:
        ratio = plaintext_weight / FORMAT.max_weight
        q_ratio = round(ratio * TARGET)
        quantized = quantize(parameters_multiply(vector, q_ratio / TARGET), FORMAT.clipping_range, TARGET)
        masked.append(factor_combine(q_ratio, quantized))
    shapes = [a.shape for a in masked[0]]
    for i in range(len(masked)):  # pairwise masks: i adds, j subtracts
        for j in range(i + 1, len(masked)):
            mask = [rng.integers(0, MODULUS, size=s, dtype=np.int64) for s in shapes]
            masked[i] = parameters_mod(parameters_addition(masked[i], mask), MODULUS)
            masked[j] = parameters_mod(parameters_subtraction(masked[j], mask), MODULUS)
    total = masked[0]
    for m in masked[1:]:
        total = parameters_addition(total, m)
    q_total, summed = factor_extract(parameters_mod(total, MODULUS))
    mean = dequantize(summed, FORMAT.clipping_range, TARGET)
    return [(v - (len(vectors) - 1) * FORMAT.clipping_range) * (TARGET / q_total) for v in mean]


def test_hidden_size_weighting_equals_plaintext_fedavg_within_quantization_error():
    rng = np.random.default_rng(0)
    sites = [_site(rng, n, t) for n, t in ((400, 130), (2500, 900), (6000, 2100))]
    vectors = [FORMAT.encode(*site) for site in sites]
    seen, evaluated = [], []
    strategy = _strategy(seen=seen, evaluated=evaluated)
    aggregate = ndarrays_to_parameters(_secaggplus_mean(vectors, FORMAT.plaintext_weight))
    params, _ = strategy.aggregate_fit(1, [(None, _res(aggregate))] * 3, [])

    weights = np.array([n for _, n, _, _ in sites], dtype=np.float64)
    plaintext_fedavg = [np.average([d[i] for d, *_ in sites], axis=0, weights=weights) for i in range(len(SHAPES))]
    step = 2 * FORMAT.clipping_range / TARGET  # one quantization step per site, divided by Σw below
    for got, want in zip(parameters_to_ndarrays(params), plaintext_fedavg):
        assert np.abs(got - want).max() <= 3 * step / (weights.sum() / FORMAT.max_weight)
    # The coordinator learned the sums only: the union's histogram exactly, the union's AUC and loss.
    [(model_round, evaluation)] = evaluated
    union = sum(h for _, _, h, _ in sites)
    assert model_round == 0 and evaluation.sites == 3
    assert evaluation.test_rows == int(union.sum())
    assert evaluation.auc == pytest.approx(auc_from_histogram(union), abs=1e-12)
    assert evaluation.loss == pytest.approx(sum(l for *_, l in sites) / union.sum(), rel=1e-3)
    assert seen and seen[0][0] == 1


def test_evaluation_only_round_changes_nothing_and_reports_the_final_model():
    rng = np.random.default_rng(1)
    sites = [_site(rng, 0, 500) for _ in range(3)]
    vectors = [FORMAT.encode([np.zeros(s) for s in SHAPES], 0, h, loss) for _, _, h, loss in sites]
    seen, evaluated = [], []
    strategy = _strategy(seen=seen, evaluated=evaluated)
    strategy.last_aggregated = 2  # both training rounds were aggregated
    aggregate = ndarrays_to_parameters(_secaggplus_mean(vectors, FORMAT.plaintext_weight))
    params, _ = strategy.aggregate_fit(3, [(None, _res(aggregate))] * 3, [])
    assert params is None and seen == []
    assert evaluated[0][0] == 2 and evaluated[0][1].test_rows == 1500
    # training stopped after round 1: the final model evaluated is the round-1 model, and says so
    strategy.last_aggregated = 1
    strategy.aggregate_fit(3, [(None, _res(aggregate))] * 3, [])
    assert evaluated[1][0] == 1


def test_federated_standardization_from_secure_sums_equals_pooled_statistics(study, cohorts_dir):
    from client.data import load_site

    tables = [load_site(study, cohorts_dir / f"hospital-0{i}").train.features for i in (1, 2, 3)]
    zeros = [np.zeros(s) for s in SHAPES]
    vectors = [FORMAT.encode(zeros, 0, np.zeros((2, FORMAT.bins)), 0.0, FORMAT.statistics(t)) for t in tables]
    standardized = []
    strategy = _strategy(federated=True, standardized=standardized)
    assert strategy.phase(1) == (Phase.STATISTICS, 0) and strategy.phase(2) == (Phase.TRAIN, 1) and strategy.phase(4) == (Phase.EVALUATE, 2)
    aggregate = ndarrays_to_parameters(_secaggplus_mean(vectors, FORMAT.plaintext_weight))
    params, _ = strategy.aggregate_fit(1, [(None, _res(aggregate))] * 3, [])
    assert params is None
    [result] = standardized
    pooled = np.concatenate(tables)
    lows, highs = np.array(FORMAT.lows), np.array(FORMAT.highs)
    clipped = np.where(np.isnan(pooled), np.nan, np.clip(pooled, lows, highs))
    np.testing.assert_array_equal(result.counts, (~np.isnan(pooled)).sum(axis=0))
    # Within SecAgg+'s quantization: one step (2·clipping_range / 2^22) per site on each scaled sum.
    step = 2 * FORMAT.clipping_range / TARGET * FORMAT.eval_scale * len(tables)
    bound = np.maximum(np.abs(lows - FORMAT.centers), np.abs(highs - FORMAT.centers)) / FORMAT.scales
    n = result.counts
    mean_error = step * bound / n * np.array(FORMAT.scales)
    assert np.all(np.abs(result.center - np.nanmean(clipped, axis=0)) <= mean_error)
    std = np.nanstd(clipped, axis=0)
    var_error = step * bound**2 / n * np.array(FORMAT.scales) ** 2 + 2 * np.abs(np.nanmean(clipped, axis=0) - FORMAT.centers) * mean_error
    assert np.all(np.abs(result.scale**2 - std**2) <= var_error + 1e-12)
    assert np.all(mean_error < 0.01 * std)  # and that error is small next to the spread
    # every later round sends that scaling to the sites
    config = strategy.round_config(2)
    center, scale = scaling_from_bytes(config["scaling"], len(FORMAT.centers))
    np.testing.assert_allclose(center, result.center) and np.testing.assert_allclose(scale, result.scale)
    assert config["phase"] == "train" and config["round"] == 1


def test_training_never_starts_without_the_federated_scaling():
    strategy = _strategy(federated=True)
    with pytest.raises(RuntimeError, match="federated standardization has no result"):
        strategy.round_config(2)


def test_refuses_individual_plaintext_updates():
    strategy = _strategy()
    updates = [ndarrays_to_parameters(FORMAT.encode([np.zeros(s) for s in SHAPES], 10, np.zeros((2, 1000)), 0.0)) for _ in range(3)]
    with pytest.raises(PlaintextUpdateError, match="fedcare aggregates only SecAgg\\+ sums"):
        strategy.aggregate_fit(1, [(None, _res(p)) for p in updates], [])


def test_round_config_and_no_plaintext_evaluation():
    strategy = _strategy()
    assert strategy.on_fit_config_fn(2) == {"study_hash": "h", "phase": "train", "round": 2}
    assert strategy.on_fit_config_fn(3) == {"study_hash": "h", "phase": "evaluate", "round": 2}
    assert strategy.configure_evaluate(1, None, None) == []


def test_roc_and_calibration_from_summed_histograms_equal_the_pooled_ones():
    """What the coordinator derives from the sites' summed histograms is what the pooled rows give."""
    from fedcare.metrics import calibration_from_histogram, calibration_table, roc_auc, roc_curve, roc_from_histogram

    rng = np.random.default_rng(3)
    sites = []
    for n in (300, 500, 200):
        labels = rng.random(n) < 0.25
        sites.append((labels, np.clip(rng.beta(2, 5, n) + 0.25 * labels, 0, 1)))
    summed = sum(score_histogram(y, p) for y, p in sites)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    assert roc_from_histogram(summed) == roc_curve(y_all, p_all)
    curve = roc_from_histogram(summed)
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(roc_auc(y_all, p_all), abs=2e-3)
    pooled, federated = calibration_table(y_all, p_all), calibration_from_histogram(summed)
    assert [b["rows"] for b in pooled] == [b["rows"] for b in federated]
    assert [b["observed"] for b in pooled] == [b["observed"] for b in federated]
    assert all(abs(a["predicted"] - b["predicted"]) <= 1e-3 for a, b in zip(pooled, federated))


def test_balanced_accuracy_and_brier_score_by_hand():
    from fedcare.metrics import balanced_accuracy, brier_score

    y = np.array([1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.1, 0.6, 0.3, 0.0])
    assert balanced_accuracy(y, p) == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert brier_score(y, p) == pytest.approx((0.01 + 0.64 + 0.01 + 0.36 + 0.09 + 0) / 6)
    assert np.isnan(balanced_accuracy(np.zeros(3), p[:3]))
