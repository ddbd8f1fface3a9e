"""DP noise from a ChaCha20 keystream, hardened against the floating-point attack, inside Opacus."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from privacy.noise import CryptoGaussian, _uniform_53, use_crypto_noise

KEY = bytes(range(32))

# Integration setup: all-zero inputs through bias-free linear layers give exactly zero
# gradients, so every parameter change is -lr * noise / expected_batch_size.
ROWS, BATCH, LR = 64, 16, 0.5  # sample rate 1/4, expected batch size 16, 4 steps per epoch
SIGMA, CLIP = 1.0, 1.0


def test_uniforms_are_53_bit_in_half_open_unit_interval():
    words = np.array([0, 2**11 - 1, 2**11, 2**64 - 1], dtype=np.uint64)
    u = _uniform_53(words)
    assert u.tolist() == [2.0**-53, 2.0**-53, 2.0**-52, 1.0]


def test_standard_normal_statistics():
    z = CryptoGaussian(KEY).standard_normal(200_000)  # fixed key: a deterministic, non-flaky check
    assert z.dtype == np.float64 and z.shape == (200_000,)
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert CryptoGaussian(KEY).standard_normal(7).shape == (7,)


def test_hardened_noise_has_the_requested_std_shape_and_dtype():
    source = CryptoGaussian(KEY)
    noise = source.hardened((400, 500), 2.5)
    assert noise.shape == (400, 500) and noise.dtype == torch.float32
    assert abs(noise.double().std().item() - 2.5) < 0.025
    assert abs(noise.double().mean().item()) < 0.025
    assert stats.kstest(noise.double().flatten().numpy() / 2.5, "norm").pvalue > 1e-3
    assert source.hardened(3, 1.0, torch.float64).dtype == torch.float64
    # The floating-point hardening: each value is the sum of 4 standard-normal draws times std / 2.
    draws = CryptoGaussian(KEY).standard_normal(6 * 4).reshape(6, 4)  # value i: draws 4i..4i+3
    expected = torch.from_numpy((draws[:, 0] + draws[:, 1] + draws[:, 2] + draws[:, 3]) * (2.5 / 2)).reshape(2, 3)
    assert torch.equal(CryptoGaussian(KEY).hardened((2, 3), 2.5, torch.float64), expected)
    assert torch.equal(source.hardened((2, 3), 0.0), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        source.hardened(3, -1.0)


def test_streams_differ_by_default_and_repeat_only_with_a_fixed_key():
    a, b = CryptoGaussian().standard_normal(10_000), CryptoGaussian().standard_normal(10_000)
    assert np.intersect1d(a, b).size == 0
    assert np.array_equal(CryptoGaussian(KEY).standard_normal(10_000), CryptoGaussian(KEY).standard_normal(10_000))
    assert not np.array_equal(CryptoGaussian(KEY).standard_normal(100), CryptoGaussian(bytes(32)).standard_normal(100))
    with pytest.raises(ValueError):
        CryptoGaussian(b"short")


@pytest.mark.parametrize("key", [None, KEY])
def test_consecutive_calls_never_repeat_values(key):
    source = CryptoGaussian(key)
    draws = np.concatenate([source.standard_normal(5_000) for _ in range(10)])
    assert np.unique(draws).size == draws.size


def test_the_normals_of_a_key_do_not_depend_on_how_many_each_call_asks_for():
    # one flat draw for all parameters (the fast path) = one draw per parameter (Opacus), concatenated;
    # the sizes cross the pool's refills (~25,700 normals each)
    whole = CryptoGaussian(KEY).standard_normal(90_000)
    source, sizes = CryptoGaussian(KEY), [1, 960, 32, 32, 1, 30_000, 7, 58_967]
    assert np.array_equal(np.concatenate([source.standard_normal(n) for n in sizes]), whole)
    flat = CryptoGaussian(KEY).hardened(1025, 2.0, torch.float64)
    source = CryptoGaussian(KEY)
    assert torch.equal(torch.cat([source.hardened(n, 2.0, torch.float64) for n in (960, 32, 32, 1)]), flat)
    assert source.standard_normal(0).shape == (0,)


def test_forked_child_rekeys_instead_of_replaying_the_parent_stream():
    source = CryptoGaussian()
    source.standard_normal(4)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next draws, exit without running pytest teardown
        os.close(read_end)
        os.write(write_end, source.standard_normal(8).tobytes())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = np.frombuffer(pipe.read(), dtype=np.float64)
    os.waitpid(pid, 0)
    assert child.size == 8
    assert np.intersect1d(child, source.standard_normal(8)).size == 0


# --- Opacus integration ------------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 32, bias=False), nn.Linear(32, 1, bias=False))


def _dp_updates(
    source: CryptoGaussian | None,
    *,
    torch_seed: int = 0,
    epochs: int = 2,
    crypto: bool = True,
    adjusted_noise_multiplier: float | None = None,
) -> list[list[torch.Tensor]]:
    """Per step, the change of every parameter, from Opacus ghost-clipping DP-SGD on zero data."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = _model()  # the same initial weights in every run
    torch.manual_seed(torch_seed)  # drives Opacus' Poisson sampler, and its default noise
    x, y = torch.zeros(ROWS, 5), torch.zeros(ROWS)
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        criterion=nn.BCEWithLogitsLoss(),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        poisson_sampling=True,
        grad_sample_mode="ghost",
    )
    assert optimizer.expected_batch_size == BATCH
    if crypto:
        use_crypto_noise(optimizer, source)
    if adjusted_noise_multiplier is not None:
        optimizer._adjusted_noise_multiplier = adjusted_noise_multiplier
    model.train()
    updates = []
    for _ in range(epochs):
        for indices in loader.batch_sampler:
            if not indices:
                continue
            before = [p.detach().clone() for p in optimizer.params]
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x[indices]).squeeze(-1), y[indices])
            loss.backward()
            optimizer.step()
            updates.append([p.detach() - b for p, b in zip(optimizer.params, before)])
    return updates


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_noise_of_a_dp_step_is_the_sources_hardened_noise():
    updates = _dp_updates(CryptoGaussian(KEY))
    replay = CryptoGaussian(KEY)  # same key: the same stream, drawn in add_noise's order
    assert len(updates) >= 6
    for step in updates:
        for delta in step:
            noise = replay.hardened(delta.shape, SIGMA * CLIP)
            torch.testing.assert_close(delta, -LR * noise / BATCH)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adjusted_noise_multiplier_is_honoured():
    updates = _dp_updates(CryptoGaussian(KEY), adjusted_noise_multiplier=2.0, epochs=1)
    replay = CryptoGaussian(KEY)
    for step in updates:
        for delta in step:
            torch.testing.assert_close(delta, -LR * replay.hardened(delta.shape, 2.0 * CLIP) / BATCH)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_default_source_noise_has_dp_sgd_scale_and_ignores_torch_seed():
    updates = _dp_updates(None)
    noise = torch.cat([d.flatten() for step in updates for d in step]).double() * (-BATCH / LR)
    assert noise.numel() >= 1000
    assert abs(noise.std().item() - SIGMA * CLIP) < 0.08
    # A fresh key each time: the same torch seed no longer reproduces the noise ...
    crypto_a, crypto_b = _dp_updates(None, epochs=1), _dp_updates(None, epochs=1)
    assert len(crypto_a) == len(crypto_b) and not any(torch.equal(a, b) for a, b in zip(crypto_a[0], crypto_b[0]))
    # ... whereas Opacus' default noise is a function of it.
    plain_a = _dp_updates(None, crypto=False, epochs=1)
    plain_b = _dp_updates(None, crypto=False, epochs=1)
    assert all(torch.equal(a, b) for sa, sb in zip(plain_a, plain_b) for a, b in zip(sa, sb))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fixed_key_gives_identical_updates_whatever_the_torch_seed():
    a = _dp_updates(CryptoGaussian(KEY), torch_seed=1, epochs=1)
    b = _dp_updates(CryptoGaussian(KEY), torch_seed=2, epochs=1)
    assert len(a) == len(b) and all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def test_only_this_instance_is_changed_and_non_dp_optimizers_are_refused():
    from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer, DPOptimizerFastGradientClipping

    class_add_noise = DPOptimizerFastGradientClipping.add_noise
    params = list(_model().parameters())
    one = DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=LR), noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=BATCH
    )
    other = DPOptimizer(torch.optim.SGD(params, lr=LR), noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=BATCH)
    use_crypto_noise(one)
    use_crypto_noise(other, CryptoGaussian(KEY))
    assert DPOptimizerFastGradientClipping.add_noise is class_add_noise
    assert one.add_noise.__func__ is not class_add_noise and one.add_noise.__self__ is one
    assert DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=LR), noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=BATCH
    ).add_noise.__func__ is class_add_noise

    with pytest.raises(TypeError, match="add_noise"):
        use_crypto_noise(torch.optim.SGD(params, lr=LR))
    adaclip = AdaClipDPOptimizer(
        torch.optim.SGD(params, lr=LR),
        noise_multiplier=SIGMA,
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        max_clipbound=2.0,
        min_clipbound=0.1,
        unclipped_num_std=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
    )
    with pytest.raises(TypeError, match="AdaClipDPOptimizer overrides add_noise"):
        use_crypto_noise(adaclip)
