"""SecAgg+ masks (privacy/masks.py): the whole 256-bit seed counts (Flower's folds it to 32 bits), the
values are uniform over the modulus, both ends regenerate the same masks, and the apps use it."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks
from scipy import stats

from privacy import masks

SHAPES = [(32, 30), (32,), (1, 32), (1,), ()]


def _folded_twin(seed: bytes) -> bytes:
    """Another seed with the same XOR of its 4-byte words: the seed Flower's generator really uses."""
    x = int.from_bytes(os.urandom(4), "little") | 1
    w0, w1 = (int.from_bytes(seed[i : i + 4], "little") ^ x for i in (0, 4))
    return w0.to_bytes(4, "little") + w1.to_bytes(4, "little") + seed[8:]


def test_the_whole_seed_counts_where_flowers_generator_keeps_32_bits_of_it():
    seed = os.urandom(32)
    twin = _folded_twin(seed)
    assert twin != seed
    # Flower's: two different seeds, one mask (2^32 masks in all, so a coordinator can search them)
    assert all(np.array_equal(a, b) for a, b in zip(flower_masks(seed, 2**32, SHAPES), flower_masks(twin, 2**32, SHAPES)))
    ours, ours_twin = masks.pseudo_rand_gen(seed, 2**32, SHAPES), masks.pseudo_rand_gen(twin, 2**32, SHAPES)
    assert not np.array_equal(ours[0], ours_twin[0])


def test_both_ends_regenerate_the_same_masks_so_a_pairwise_mask_cancels():
    seed = os.urandom(44)  # a pairwise seed: the Fernet key two sites agreed (base64 of 32 bytes)
    at_a, at_b = masks.pseudo_rand_gen(seed, 2**32, SHAPES), masks.pseudo_rand_gen(seed, 2**32, SHAPES)
    for mask_a, mask_b, shape in zip(at_a, at_b, SHAPES):
        assert mask_a.shape == shape and mask_a.dtype == np.int64
        assert not np.any((mask_a - mask_b) % 2**32)  # a adds it, b subtracts it: the sum carries none
    assert not np.array_equal(masks.pseudo_rand_gen(os.urandom(32), 2**32, SHAPES)[0], at_a[0])


@pytest.mark.parametrize("modulus", [2**32, 2**16, 2])
def test_masks_are_uniform_over_the_modulus(modulus):
    values = masks.pseudo_rand_gen(os.urandom(32), modulus, [(200_000,)])[0]
    assert values.min() >= 0 and values.max() < modulus
    counts = np.bincount((values * 16 // modulus).astype(np.int64), minlength=16) if modulus >= 16 else np.bincount(values)
    assert stats.chisquare(counts).pvalue > 1e-4
    if modulus == 2**32:
        assert values.max() > 2**32 - 2**20  # the top of the range is drawn too


def test_a_bad_modulus_or_seed_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="power of 2 in \\[2, 2\\^32\\], got 1000"):
        masks.pseudo_rand_gen(os.urandom(32), 1000, SHAPES)
    with pytest.raises(ValueError, match="power of 2 in \\[2, 2\\^32\\], got 8589934592"):
        masks.pseudo_rand_gen(os.urandom(32), 2**33, SHAPES)
    with pytest.raises(ValueError, match="at least 16 bytes, got 4"):
        masks.pseudo_rand_gen(b"1234", 2**32, SHAPES)


def test_the_apps_mask_with_it_at_both_ends():
    import client.app  # noqa: F401  (the ClientApp every site runs)
    import server.secure_aggregation  # noqa: F401  (the coordinator's workflow)

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert mod.pseudo_rand_gen is masks.pseudo_rand_gen
    assert workflow.pseudo_rand_gen is masks.pseudo_rand_gen
