"""The strategies on the secure aggregate (FedAvgM, FedProx, FedAdagrad, FedAdam, FedYogi): each update
equals its reference (Flower's own strategy, or the paper's formula where Flower's convention differs),
a resumed adaptive run goes on exactly as an uninterrupted one, FedProx costs no privacy, and every
strategy runs a whole simulated study."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedcare.study import STRATEGY_DEFAULTS, Strategy, load_study
from strategies.catalog import server_optimizer_for, strategy_for_study
from strategies.server_optimizers import ServerAdam, ServerSGD

from .conftest import DEFAULT_STUDY, ROOT
from .test_strategy import FORMAT, SHAPES, _res, _secaggplus_mean, _site

ROUNDS = 3
SITE_ROWS = ((400, 130), (2500, 900), (6000, 2100))


def _study(name: str, rounds: int = ROUNDS, **fields):
    """The default study with `[strategy]` = name (defaults, then `fields`), spec scaling (no statistics round)."""
    base = load_study(DEFAULT_STUDY)
    options = {f: d[name] for f, d in STRATEGY_DEFAULTS.items() if name in d}
    strategy = Strategy(name=name, min_sites=3, **{**options, **fields})
    study = dataclasses.replace(base, strategy=strategy, standardization="spec")
    return study.with_overrides(rounds=rounds)


def _initial():
    rng = np.random.default_rng(11)
    return [rng.normal(0, 0.3, size=s).astype(np.float32) for s in SHAPES]


def _aggregates(rounds: int = ROUNDS, seed: int = 5):
    """Per round: the SecAgg+ aggregate of three sites' vectors (Flower 1.42's masking arithmetic), and
    the mean delta Δ_t the coordinator decodes from it: the only input a strategy gets."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        vectors = [FORMAT.encode(*_site(rng, n, t)) for n, t in SITE_ROWS]
        mean = _secaggplus_mean(vectors, FORMAT.plaintext_weight)
        delta = FORMAT.decode(mean, sites=3, model_arrays=len(SHAPES)).mean_delta
        out.append((ndarrays_to_parameters(mean), [d.astype(np.float64) for d in delta]))
    return out


def _run_ours(study, aggregates, *, weights=None, first_round=1, state=None, seen=None):
    strategy = strategy_for_study(study, initial_weights=weights or _initial(), first_round=first_round,
                                  optimizer_state=state,
                                  on_optimizer_state=(lambda r, s: seen.append((r, s))) if seen is not None else None)
    trajectory = []
    for server_round, (aggregate, _) in enumerate(aggregates, start=1):
        params, _ = strategy.aggregate_fit(server_round, [(None, _res(aggregate))] * 3, [])
        trajectory.append(parameters_to_ndarrays(params))
    return strategy, trajectory


def _flower_results(current, delta):
    """Three FitRes whose example-weighted average is exactly current + delta (each site's own
    parameters differ; Flower's FedAvg aggregation averages them back)."""
    rng = np.random.default_rng(0)
    ns = [n for n, _ in SITE_ROWS]
    offsets = [[rng.normal(0, 0.01, size=c.shape) for c in current] for _ in ns[:2]]
    offsets.append([-(ns[0] * a + ns[1] * b) / ns[2] for a, b in zip(*offsets)])
    return [
        (None, FitRes(status=Status(Code.OK, ""), num_examples=n, metrics={},
                      parameters=ndarrays_to_parameters([c + d + e for c, d, e in zip(current, delta, off)])))
        for n, off in zip(ns, offsets)
    ]


def _run_flower(strategy, aggregates, current_of):
    trajectory = []
    for server_round, (_, delta) in enumerate(aggregates, start=1):
        params, _ = strategy.aggregate_fit(server_round, _flower_results(current_of(strategy), delta), [])
        trajectory.append(parameters_to_ndarrays(params))
    return trajectory


def _close(ours, reference, tol=1e-6):
    for step_ours, step_ref in zip(ours, reference, strict=True):
        for a, b in zip(step_ours, step_ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def _w0_64():
    return [w.astype(np.float64) for w in _initial()]


def test_fedavg_and_fedprox_apply_the_aggregate_delta_with_the_server_learning_rate():
    aggregates = _aggregates()
    for name in ("fedavg", "fedprox"):
        _, ours = _run_ours(_study(name, server_learning_rate=0.7), aggregates)
        x, reference = _w0_64(), []
        for _, delta in aggregates:
            x = [w + 0.7 * d for w, d in zip(x, delta)]
            reference.append(x)
        _close(ours, reference)
    assert isinstance(server_optimizer_for(_study("fedprox").strategy), ServerSGD)


def test_fedavgm_equals_flowers_fedavgm():
    aggregates = _aggregates()
    _, ours = _run_ours(_study("fedavgm", server_learning_rate=0.7, server_momentum=0.8), aggregates)
    flower = FedAvgM(initial_parameters=ndarrays_to_parameters(_w0_64()), server_learning_rate=0.7, server_momentum=0.8)
    reference = _run_flower(flower, aggregates, lambda s: parameters_to_ndarrays(s.initial_parameters))
    _close(ours, reference)
    assert max(np.abs(a - b).max() for a, b in zip(ours[-1], _initial())) > 1e-3  # it moved


def test_fedadagrad_equals_flowers_fedadagrad():
    # Flower's FedAdagrad has no first moment (β1 fixed at 0): fedcare's default beta1, compared here
    aggregates = _aggregates()
    study = _study("fedadagrad", server_learning_rate=0.05, tau=1e-3)
    assert study.strategy.beta1 == 0.0
    _, ours = _run_ours(study, aggregates)
    flower = FedAdagrad(initial_parameters=ndarrays_to_parameters(_w0_64()), eta=0.05, tau=1e-3)
    _close(ours, _run_flower(flower, aggregates, lambda s: s.current_weights))


def test_fedyogi_equals_flowers_fedyogi():
    aggregates = _aggregates()
    strategy, ours = _run_ours(_study("fedyogi", server_learning_rate=0.05, beta1=0.8, beta2=0.95, tau=1e-3), aggregates)
    flower = FedYogi(initial_parameters=ndarrays_to_parameters(_w0_64()), eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)
    _close(ours, _run_flower(flower, aggregates, lambda s: s.current_weights))
    for slot, theirs in (("m", flower.m_t), ("v", flower.v_t)):
        _close([strategy.server_optimizer.moments[slot]], [theirs], tol=1e-9)


def test_fedadam_follows_the_paper_and_keeps_flowers_moments():
    """Flower's FedAdam scales η by sqrt(1 - β2^(r+1)) / (1 - β1^(r+1)) (a bias correction keyed to the
    server round, which in fedcare also counts the statistics round); Reddi et al.'s Algorithm 2 has none,
    and neither do Flower's FedYogi and FedAdagrad. So the weights are compared with the paper's formula
    written out, and m_t, v_t (identical in both conventions) with Flower's."""
    aggregates = _aggregates()
    eta, b1, b2, tau = 0.05, 0.85, 0.97, 1e-4
    strategy, ours = _run_ours(_study("fedadam", server_learning_rate=eta, beta1=b1, beta2=b2, tau=tau), aggregates)
    x = _w0_64()
    m = [np.zeros_like(w) for w in x]
    v = [np.zeros_like(w) for w in x]  # v_0 = 0 as in Flower (the paper: v_{-1} >= τ², here 1e-8: see server_optimizers)
    reference = []
    for _, delta in aggregates:
        m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, delta)]
        v = [b2 * vi + (1 - b2) * d * d for vi, d in zip(v, delta)]
        x = [xi + eta * mi / (np.sqrt(vi) + tau) for xi, mi, vi in zip(x, m, v)]
        reference.append(x)
    _close(ours, reference)
    flower = FedAdam(initial_parameters=ndarrays_to_parameters(_w0_64()), eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    _run_flower(flower, aggregates, lambda s: s.current_weights)
    _close([strategy.server_optimizer.moments["m"], strategy.server_optimizer.moments["v"]], [flower.m_t, flower.v_t], tol=1e-9)


def test_server_optimizers_refuse_bad_options_and_foreign_state():
    with pytest.raises(ValueError, match=r"beta1 must be \[0, 1\), got 1.0"):
        ServerAdam(beta1=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        ServerAdam(tau=0.0)
    with pytest.raises(ValueError, match="no state"):
        ServerSGD().load_state({"steps": np.array(1)})
    adam = ServerAdam()
    adam.step([np.zeros(3)], [np.ones(3)])
    other = server_optimizer_for(_study("fedavgm").strategy)
    with pytest.raises(ValueError, match="not this optimizer's state"):
        other.load_state(adam.state())


def test_a_resumed_fedadam_run_continues_exactly_as_an_uninterrupted_one(tmp_path):
    """Through the ServerApp's own `build_strategy` and the run record: the state saved beside each
    checkpoint, then `RunRecord.resume` and `build_strategy(point)`."""
    from fedcare.run_record import ResumePoint, RunRecord, RunRecordError
    from fedcare.study import Overrides
    from server.app import build_strategy
    from server.progress import RoundLog

    study = _study("fedadam", rounds=4, server_learning_rate=0.05)
    aggregates = _aggregates(rounds=4, seed=9)
    weights = _initial()
    _, uninterrupted = _run_ours(study, aggregates, weights=weights)

    record = RunRecord(tmp_path / "run")
    record.start(study, Overrides())
    start = ResumePoint(last_round=0, weights=weights, scaling=None, entries=[])  # from these initial weights
    first = build_strategy(study, RoundLog(record, study), start)
    for server_round, (aggregate, _) in enumerate(aggregates[:2], start=1):
        first.aggregate_fit(server_round, [(None, _res(aggregate))] * 3, [])
    assert sorted(p.name for p in (record.path / "checkpoints").iterdir()) == [
        "round-001.npz", "round-002.npz", "server-optimizer-001.npz", "server-optimizer-002.npz"]
    del first  # the coordinator crashed after round 2

    point = record.resume(study)
    assert point.last_round == 2 and set(point.optimizer_state) == {"steps", *(f"{s}/{i:03d}" for s in "mv" for i in range(4))}
    resumed = build_strategy(study, RoundLog(record, study, point.entries), point)
    assert resumed.phase(1)[1] == 3
    after = []
    for server_round, (aggregate, _) in enumerate(aggregates[2:], start=1):
        params, _ = resumed.aggregate_fit(server_round, [(None, _res(aggregate))] * 3, [])
        after.append(parameters_to_ndarrays(params))
    for got, want in zip(after, uninterrupted[2:], strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)  # bit for bit

    # without its state, a stateful strategy refuses to resume (it would silently restart m and v)
    for name in ("round-004.npz", "round-003.npz", "server-optimizer-002.npz"):
        (record.path / "checkpoints" / name).unlink()
    with pytest.raises(RunRecordError, match="without its server optimizer state"):
        build_strategy(study, RoundLog(record, study), record.resume(study))


def test_fedavg_writes_no_optimizer_state_and_keeps_its_exact_update(tmp_path):
    seen, aggregates = [], _aggregates(rounds=1)  # (Flower's quantization rounds stochastically: one draw)
    strategy, ours = _run_ours(_study("fedavg"), aggregates, seen=seen)
    assert seen == [] and strategy.server_optimizer.state() == {}
    x = [w.astype(np.float64) + d.astype(np.float64) for w, d in zip(_initial(), aggregates[0][1])]
    for a, b in zip(ours[0], x):
        np.testing.assert_array_equal(a, b.astype(np.float32))


# -- FedProx at the site: the proximal term inside DP-SGD, at no privacy cost -------------------------

@pytest.fixture()
def keyed_training(monkeypatch):
    """train_round with the same noise and Poisson batches every call (a keyed ChaCha20 source), and
    the Opacus PrivacyEngine of each call kept for inspection."""
    import client.training as training
    from privacy.noise import CryptoGaussian

    engines = []

    class Recorded(training.PrivacyEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(training, "CryptoGaussian", lambda: CryptoGaussian(key=bytes(range(32))))
    monkeypatch.setattr(training, "PrivacyEngine", Recorded)
    return training, engines


def _train(training, study, cohorts_dir, start, fast=None):
    from client.data import load_site
    from fedcare.features import model_inputs
    from fedcare.model import build_model, get_weights, set_weights
    from privacy.accounting import plan_schedule

    data = load_site(study, cohorts_dir / "hospital-02")
    x, y = model_inputs(study, data.train.features), data.train.labels
    schedule = plan_schedule(study, len(y))
    model = build_model(study)
    set_weights(model, start)
    steps = training.train_round(study, model, x, y, schedule, fast=fast)
    return get_weights(model), steps, schedule


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "opacus"])
def test_fedprox_pulls_toward_the_global_model_at_no_privacy_cost(keyed_training, cohorts_dir, fast):
    from fedcare.model import build_model, get_weights

    training, engines = keyed_training
    start = get_weights(build_model(_study("fedavg")))
    plain, steps_plain, schedule = _train(training, _study("fedavg"), cohorts_dir, start, fast)
    again, _, _ = _train(training, _study("fedavg"), cohorts_dir, start, fast)
    for a, b in zip(plain, again):
        np.testing.assert_array_equal(a, b)  # the keyed source makes a round reproducible
    prox, steps_prox, schedule_prox = _train(training, _study("fedprox", proximal_mu=1.0), cohorts_dir, start, fast)

    def distance(weights):
        return float(np.sqrt(sum(((w - s) ** 2).sum() for w, s in zip(weights, start))))

    assert 0 < distance(prox) < 0.8 * distance(plain)  # same noise, same batches: pulled toward w_global
    # the same privacy: the same schedule, each step recorded once, the same ε
    assert schedule_prox == schedule and steps_prox == steps_plain == schedule.steps_per_round
    if fast:  # no Opacus engine: the ledger charges the schedule's steps, the same either way
        assert engines == []
        return
    plain_engine, _, prox_engine = engines
    assert prox_engine.accountant.history == plain_engine.accountant.history
    (sigma, rate, recorded), = prox_engine.accountant.history
    assert (sigma, rate, recorded) == (schedule.noise_multiplier, schedule.sample_rate, steps_prox)
    delta = _study("fedavg").privacy.delta
    assert prox_engine.accountant.get_epsilon(delta) == plain_engine.accountant.get_epsilon(delta)


def test_without_proximal_mu_training_never_takes_the_proximal_path(keyed_training, cohorts_dir, monkeypatch):
    from fedcare.model import build_model, get_weights

    training, _ = keyed_training
    start = get_weights(build_model(_study("fedavg")))
    tiny, _, _ = _train(training, _study("fedprox", proximal_mu=1e-3), cohorts_dir, start)

    def forbidden(*args):
        raise AssertionError("the proximal step ran without proximal_mu")

    monkeypatch.setattr(training, "_proximal_step", forbidden)
    for name in ("fedavg", "fedadam"):
        plain, _, _ = _train(training, _study(name), cohorts_dir, start)
    assert any(not np.array_equal(a, b) for a, b in zip(tiny, plain))  # even a small μ changes the round


# -- every strategy through a whole simulated study -------------------------------------------------

@pytest.mark.parametrize("name, options", [
    ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.5}),
    ("fedprox", {"proximal_mu": 0.1}),
    ("fedadagrad", {"server_learning_rate": 0.03}),
    ("fedadam", {"server_learning_rate": 0.03}),
    ("fedyogi", {"server_learning_rate": 0.03}),
])
def test_each_strategy_runs_a_whole_simulated_study(tmp_path, name, options):
    import tomllib

    raw = tomllib.loads(DEFAULT_STUDY.read_text())
    raw["strategy"] = {"name": name, "min_sites": 3, **options}
    from fedcare.study import parse_study

    variant = parse_study(raw)
    path = tmp_path / f"{name}.toml"
    path.write_text(variant.to_toml())
    assert load_study(path) == variant
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "simulate", "--study", str(path), "--hospitals", "3", "--rounds", "2",
           "--size-scale", "0.3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["outcome"]["completed"] and report["outcome"]["rounds_aggregated"] == 2
    assert all(r["aggregated"] and r["sites_aggregated"] == 3 for r in report["rounds"])
    initial = float(proc.stdout.split("initial model: test AUC ")[1].split()[0])
    assert report["rounds"][-1]["auc"] > initial
    stateful = name != "fedprox"
    assert (out / "checkpoints" / "server-optimizer-002.npz").exists() == stateful
