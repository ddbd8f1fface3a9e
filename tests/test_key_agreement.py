"""SecAgg+ key agreement on X25519 (privacy/key_agreement.py): both ends agree one Fernet key, the
coordinator re-derives a dropped site's pairwise key from its reconstructed private key, and a
malformed key is refused with the reason."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt

from privacy import key_agreement as ka
from privacy import shamir


def _pair() -> tuple[bytes, bytes]:
    sk, pk = ka.generate_key_pairs()
    return ka.private_key_to_bytes(sk), ka.public_key_to_bytes(pk)


def test_two_sites_agree_one_fernet_key_and_other_pairs_do_not_share_it():
    (sk_a, pk_a), (sk_b, pk_b), (sk_c, pk_c) = _pair(), _pair(), _pair()
    assert len(sk_a) == len(pk_a) == ka.KEY_BYTES
    a_b = ka.generate_shared_key(ka.bytes_to_private_key(sk_a), ka.bytes_to_public_key(pk_b))
    b_a = ka.generate_shared_key(ka.bytes_to_private_key(sk_b), ka.bytes_to_public_key(pk_a))
    a_c = ka.generate_shared_key(ka.bytes_to_private_key(sk_a), ka.bytes_to_public_key(pk_c))
    assert a_b == b_a and a_b != a_c
    Fernet(a_b)  # a valid Fernet key: 32 bytes, urlsafe base64
    # as the client mod uses it: the key shares a site sends its neighbour, encrypted under the pair's key
    assert decrypt(b_a, encrypt(a_b, b"share of a's secrets")) == b"share of a's secrets"


def test_the_coordinator_rederives_a_dropped_sites_mask_key_from_its_reconstructed_private_key():
    (sk_drop, pk_drop), (sk_alive, pk_alive) = _pair(), _pair()
    shares = shamir.create_shares(sk_drop, 14, 21)  # the site's first private key, one share per neighbour
    reconstructed = shamir.combine_shares(shares[3:17])  # any 14 of them, at the coordinator
    assert reconstructed == sk_drop
    at_coordinator = ka.generate_shared_key(ka.bytes_to_private_key(reconstructed), ka.bytes_to_public_key(pk_alive))
    at_neighbour = ka.generate_shared_key(ka.bytes_to_private_key(sk_alive), ka.bytes_to_public_key(pk_drop))
    assert at_coordinator == at_neighbour  # so the neighbour's pairwise mask with the dropped site is removed


def test_every_round_draws_new_keys():
    assert len({_pair()[0] for _ in range(50)}) == 50


@pytest.mark.parametrize("kind, parse", [("public", ka.bytes_to_public_key), ("private", ka.bytes_to_private_key)])
def test_a_key_that_is_not_32_raw_bytes_is_refused_with_the_reason(kind, parse):
    with pytest.raises(ValueError, match=f"a SecAgg\\+ {kind} key is 32 raw X25519 bytes, got 31"):
        parse(bytes(31))
    pem = b"-----BEGIN PUBLIC KEY-----\n" + bytes(64) + b"\n-----END PUBLIC KEY-----\n"  # a P-384-era key
    with pytest.raises(ValueError, match="got 117"):
        parse(pem)
    with pytest.raises(ValueError, match="got str"):
        parse("0" * 32)


def test_a_public_key_of_small_order_is_refused_not_agreed_to_zeros():
    sk, _ = ka.generate_key_pairs()
    for low_order in (bytes(32), bytes([1]) + bytes(31)):
        with pytest.raises(ValueError):
            ka.generate_shared_key(sk, ka.bytes_to_public_key(low_order))
