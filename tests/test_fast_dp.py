"""The fast DP-SGD path equals Opacus' ghost-clipping DP-SGD on the same batch and the same noise."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from client.fast_dp import FastDPSGD, supports
from client.training import make_loader
from fedcare.model import RiskMLP
from privacy.noise import CryptoGaussian, use_crypto_noise

ROWS, BATCH, FEATURES = 1000, 100, 12
KEY = bytes(range(32))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32) * rng.uniform(0.2, 3.0, size=(ROWS, 1)).astype(np.float32)
    y = (rng.uniform(size=ROWS) < 0.3).astype(np.float32)
    return x, y


def _opacus_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
                 *, sigma: float, clip: float) -> float:
    """One step of fedcare's Opacus path (ghost clipping, crypto noise); returns its expected batch size."""
    loader = make_loader(x, y, BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, dp_optimizer, criterion, _ = PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=nn.BCEWithLogitsLoss(),
            noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=True, grad_sample_mode="ghost")
        use_crypto_noise(dp_optimizer, CryptoGaussian(key=KEY))  # one draw per parameter, from the same key
        xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
        dp_optimizer.zero_grad(set_to_none=True)
        criterion(private(xb), yb).backward()
        dp_optimizer.step()
    return dp_optimizer.expected_batch_size


def _per_sample_norms(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    norms = []
    for i in range(len(xb)):
        model.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(xb[i : i + 1]), yb[i : i + 1]).backward()
        norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))
    return torch.stack(norms)


@pytest.mark.parametrize("hidden", [(), (32,), (16, 8)], ids=["logistic", "mlp-32", "mlp-16-8"])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_the_fast_update_equals_opacus_on_the_same_batch_and_noise(hidden, sigma, kind):
    torch.manual_seed(7)
    model = RiskMLP(FEATURES, hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # large enough gradients that clipping matters
    x, y = _data()
    idx = np.sort(np.random.default_rng(1).choice(ROWS, size=87, replace=False))  # a Poisson-sized batch
    xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
    norms = _per_sample_norms(copy.deepcopy(model), xb, yb)
    clip = float(norms.median())  # half the samples are clipped, half are not
    assert (norms > clip * 1.01).sum() > 20 and (norms < clip * 0.99).sum() > 20

    reference, fast = copy.deepcopy(model), copy.deepcopy(model)
    make = (lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.0)) if kind == "sgd" else \
        (lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
    expected = _opacus_step(reference, make(reference), x, y, idx, sigma=sigma, clip=clip)
    assert expected == ROWS * BATCH // ROWS  # q·n with q = 1 / batches per epoch
    FastDPSGD(fast, make(fast), noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected,
              noise=CryptoGaussian(key=KEY)).step(xb, yb)
    start = dict(model.named_parameters())
    for (name, p_ref), (_, p_fast) in zip(reference.named_parameters(), fast.named_parameters(), strict=True):
        assert not torch.equal(p_ref, start[name])  # the step moved the weights
        torch.testing.assert_close(p_fast, p_ref, rtol=0, atol=1e-6, msg=f"{name}: fast path differs from Opacus")


def test_the_clipped_sum_without_noise_is_the_explicit_per_sample_computation():
    torch.manual_seed(3)
    model = RiskMLP(FEATURES, (16, 8))
    x, y = _data(2)
    xb, yb = torch.from_numpy(x[:50]), torch.from_numpy(y[:50])
    clip = 0.5
    # the explicit computation in float64: the float32 fast path is within 1e-6 of the exact sum
    exact, x64, y64 = copy.deepcopy(model).double(), xb.double(), yb.double()
    explicit = [torch.zeros_like(p) for p in exact.parameters()]
    for i in range(len(xb)):
        exact.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(exact(x64[i : i + 1]), y64[i : i + 1]).backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in exact.parameters()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for acc, p in zip(explicit, exact.parameters()):
            acc += p.grad * factor
    fast = FastDPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                     expected_batch_size=1.0, noise=CryptoGaussian(key=KEY)).privatized_gradients(xb, yb)
    for got, want in zip(fast, explicit, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_models_outside_the_fast_path_are_recognised():
    assert supports(RiskMLP(4, ())) and supports(RiskMLP(4, (8, 8)))
    tanh = RiskMLP(4, (8,))
    tanh.net[1] = nn.Tanh()
    assert not supports(tanh)
    two_outputs = RiskMLP(4, ())
    two_outputs.net[0] = nn.Linear(4, 2)
    assert not supports(two_outputs)
    frozen = RiskMLP(4, (8,))
    frozen.net[0].weight.requires_grad_(False)
    assert not supports(frozen)
    with pytest.raises(TypeError, match="not a Linear/ReLU stack; train it with Opacus"):
        FastDPSGD(tanh, torch.optim.SGD(tanh.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                  expected_batch_size=10, noise=CryptoGaussian())


def test_poisson_batches_include_each_row_independently_with_the_sample_rate():
    """The geometric-gap sampler: batch sizes Binomial(n, q), every row included at rate q, rows distinct
    and ascending (4,000 batches of a fixed stream; bounds at about 4 standard errors)."""
    source = CryptoGaussian(key=KEY)
    rows, q, draws = 2000, 0.05, 4000
    counts, sizes = np.zeros(rows), []
    for _ in range(draws):
        batch = source.poisson_batch(rows, q)
        assert batch.dtype == np.int64 and np.all(np.diff(batch) > 0) and (len(batch) == 0 or 0 <= batch[0] <= batch[-1] < rows)
        counts[batch] += 1
        sizes.append(len(batch))
    mean, var = rows * q, rows * q * (1 - q)
    assert abs(np.mean(sizes) - mean) < 4 * np.sqrt(var / draws)
    assert abs(np.var(sizes) / var - 1) < 4 * np.sqrt(2 / draws)
    frequency = counts / draws
    assert abs(frequency.mean() - q) < 4 * np.sqrt(q * (1 - q) / (draws * rows))
    chi2 = (((counts - draws * q) ** 2) / (draws * q * (1 - q))).sum()  # ~ chi-square with `rows` dof
    assert abs(chi2 - rows) < 4 * np.sqrt(2 * rows)
    assert (frequency[:100].mean() - q) < 0.01 and (frequency[-100:].mean() - q) < 0.01  # no edge effect
    assert source.poisson_batch(7, 1.0).tolist() == list(range(7)) and len(source.poisson_batch(0, 0.5)) == 0
    big = source.poisson_batch(1_000_000, 128 / 1_000_000)
    assert 60 < len(big) < 200 and big[-1] < 1_000_000
