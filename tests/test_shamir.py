"""privacy/shamir.py against pycryptodome's Shamir, which Flower's SecAgg+ uses: the same field, the same
scheme, the same bytes, so shares cross between the two both ways; and it is what the apps install."""

import os
import random

import pytest
from Crypto.Protocol.SecretSharing import _Element
from flwr.common.secure_aggregation.crypto import shamir as flower

from privacy import key_agreement, shamir


def test_field_arithmetic_equals_pycryptodome():
    rng = random.Random(7)
    for _ in range(300):
        a, b = rng.getrandbits(128), rng.getrandbits(rng.choice((4, 16, 128)))
        assert shamir.multiply(a, b) == int(_Element(a) * _Element(b))
        if a:
            assert shamir.inverse(a) == int(_Element(a).inverse())
            assert shamir.multiply(a, shamir.inverse(a)) == 1
    with pytest.raises(ValueError):
        shamir.inverse(0)


@pytest.mark.parametrize("num, threshold", [(3, 2), (5, 3), (21, 14), (100, 66)])
@pytest.mark.parametrize("length", [0, 5, 16, 32, 241])  # 32: a mask seed; 241: about a private key's bytes
def test_shares_cross_between_flower_and_fedcare_both_ways(num, threshold, length):
    rng = random.Random(num * 1000 + length)
    secret = os.urandom(length)
    ours, theirs = shamir.create_shares(secret, threshold, num), flower.create_shares(secret, threshold, num)
    assert [len(s) for s in ours] == [len(s) for s in theirs]
    assert [s[:4] for s in ours] == [s[:4] for s in theirs]  # the same indices, 1..num little-endian
    for _ in range(3):
        subset = rng.sample(range(num), threshold)
        assert flower.combine_shares([ours[i] for i in subset]) == secret
        assert shamir.combine_shares([theirs[i] for i in subset]) == secret
        assert shamir.combine_shares([ours[i] for i in subset]) == secret


def test_fewer_shares_than_the_threshold_do_not_give_the_secret():
    secret = os.urandom(32)
    shares = shamir.create_shares(secret, 14, 21)
    for start in range(5):
        try:
            found = shamir.combine_shares(shares[start:start + 13])
        except ValueError:  # the padding does not check out: Flower's error too
            continue
        assert found != secret


def test_every_split_draws_new_polynomials():
    secret = os.urandom(32)
    first, second = shamir.create_shares(secret, 3, 5), shamir.create_shares(secret, 3, 5)
    assert all(a[4:] != b[4:] for a, b in zip(first, second))


def test_malformed_share_sets_are_refused():
    shares = shamir.create_shares(b"secret", 2, 3)
    with pytest.raises(ValueError, match="duplicate"):
        shamir.combine_shares([shares[0], shares[0]])
    with pytest.raises(ValueError, match="lengths"):
        shamir.combine_shares([shares[0], shares[1][:-1]])
    with pytest.raises(ValueError, match="no shares"):
        shamir.combine_shares([])
    with pytest.raises(ValueError, match="threshold"):
        shamir.create_shares(b"secret", 4, 3)


def test_the_apps_use_it_inside_flowers_secaggplus():
    import importlib

    import client.app  # noqa: F401  (the ClientApp every site runs)
    import server.secure_aggregation  # noqa: F401  (the coordinator's workflow)

    secaggplus_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    secaggplus_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert secaggplus_mod.create_shares is shamir.create_shares
    assert secaggplus_workflow.combine_shares is shamir.combine_shares
    for name in ("generate_key_pairs", "private_key_to_bytes", "public_key_to_bytes", "bytes_to_private_key",
                 "bytes_to_public_key", "generate_shared_key"):
        assert getattr(secaggplus_mod, name) is getattr(key_agreement, name), name
    for name in ("bytes_to_private_key", "bytes_to_public_key", "generate_shared_key"):
        assert getattr(secaggplus_workflow, name) is getattr(key_agreement, name), name
