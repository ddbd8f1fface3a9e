"""Shamir secret sharing for SecAgg+, at the speed hundreds of sites need; share for share what Flower's is.

Flower's SecAgg+ splits each site's two secrets (its mask seed and its first private key) into one
share per neighbour (`secaggplus_mod`), and the coordinator reconstructs a secret per site each round
(`SecAggPlusWorkflow`), both through pycryptodome's `Shamir`, whose GF(2^128) multiplication turns
every bit into strings. At 100 sites that arithmetic is most of a round (BENCHMARKS.md, "Many
hospitals").

This module is the same scheme in the same field, GF(2^128) modulo x^128 + x^7 + x^2 + x + 1, bit i
of the integer the coefficient of x^i, an element written as 16 big-endian bytes; a share of a
16-byte chunk is the random polynomial of degree threshold - 1 whose constant term is the chunk,
evaluated at the share's index (1, 2, ...). The bytes Flower passes around are the same too: the
secret padded (PKCS#7) to 16-byte chunks, a share = 4-byte little-endian index + the chunk shares. So
shares made here combine with pycryptodome's and the other way round (tests/test_shamir.py), and a
site that runs this interoperates with a coordinator that does not.

Why it is faster, not weaker: multiplication is carry-less over 4-bit windows of one factor with
Python integers, then reduced by the field polynomial; the share indices are public, so a share is
evaluated by Horner with multiplications by a small public element, and the Lagrange coefficients of
a set of indices, all public, are computed once per set. Randomness is `os.urandom`, as the other
secrets of SecAgg+. Like pycryptodome's, the arithmetic runs on Python integers; neither is
constant-time in a strict sense.

`privacy.secagg` puts `create_shares` and `combine_shares` in place of Flower's, in the Flower module
that calls each (at the sites and at the coordinator).
"""

from __future__ import annotations

import functools
import os

FIELD_BITS = 128
IRREDUCIBLE = (1 << 128) | 0b10000111  # x^128 + x^7 + x^2 + x + 1
LOW = (1 << FIELD_BITS) - 1
CHUNK = 16  # bytes per field element
INDEX_BYTES = 4


def _reduce(value: int) -> int:
    """`value` (a carry-less product, < 2^255) modulo the field polynomial."""
    for _ in range(2):  # x^128 = x^7 + x^2 + x + 1; the second pass folds what the first pushed past bit 127
        high = value >> FIELD_BITS
        value = (value & LOW) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return value


def multiply(a: int, b: int) -> int:
    """a * b in the field."""
    table = [0] * 16
    table[1] = a
    for w in range(2, 16, 2):
        table[w] = table[w >> 1] << 1
        table[w + 1] = table[w] ^ a
    product, shift = 0, 0
    while b:
        product ^= table[b & 15] << shift
        b >>= 4
        shift += 4
    return _reduce(product)


def _multiply_small(a: int, small: int) -> int:
    """a * small, `small` a public share index (a few bits)."""
    product, shift = 0, 0
    while small:
        if small & 1:
            product ^= a << shift
        small >>= 1
        shift += 1
    return _reduce(product)


def inverse(a: int) -> int:
    """The field inverse of a != 0 (extended Euclid over GF(2)[x])."""
    if a == 0:
        raise ValueError("zero has no inverse")
    u, v, g1, g2 = a, IRREDUCIBLE, 1, 0
    while u != 1:
        j = u.bit_length() - v.bit_length()
        if j < 0:
            u, v, g1, g2 = v, u, g2, g1
            j = -j
        u ^= v << j
        g1 ^= g2 << j
    return _reduce(g1)


def _padded_chunks(secret: bytes) -> list[int]:
    pad = CHUNK - len(secret) % CHUNK
    padded = secret + bytes([pad]) * pad
    return [int.from_bytes(padded[i:i + CHUNK], "big") for i in range(0, len(padded), CHUNK)]


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """`num` shares of `secret`, any `threshold` of which reconstruct it (Flower's signature and bytes)."""
    if not 1 <= threshold <= num:
        raise ValueError(f"threshold {threshold} must be in [1, num] (num = {num})")
    if num >= 1 << (8 * INDEX_BYTES):
        raise ValueError(f"{num} shares do not fit a {INDEX_BYTES}-byte index")
    polynomials = []
    for chunk in _padded_chunks(secret):
        random = os.urandom(CHUNK * (threshold - 1))
        # highest degree first, the chunk last: the order Horner evaluates in
        polynomials.append([int.from_bytes(random[i:i + CHUNK], "big") for i in range(0, len(random), CHUNK)] + [chunk])
    shares = []
    for index in range(1, num + 1):
        out = bytearray(index.to_bytes(INDEX_BYTES, "little"))
        for coefficients in polynomials:
            value = 0
            for coefficient in coefficients:
                value = _multiply_small(value, index) ^ coefficient
            out += value.to_bytes(CHUNK, "big")
        shares.append(bytes(out))
    return shares


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """The coefficients l_j with f(0) = sum l_j f(x_j) for these (public) indices."""
    coefficients = []
    for j, x_j in enumerate(indices):
        numerator = denominator = 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = _multiply_small(numerator, x_m)
                denominator = multiply(denominator, x_j ^ x_m)
        coefficients.append(multiply(numerator, inverse(denominator)))
    return tuple(coefficients)


def combine_shares(share_list: list[bytes]) -> bytes:
    """The secret the shares were made from (Flower's signature and bytes; pass `threshold` shares).
    Shares that do not belong together (another secret's, too few) yield bytes whose padding fails:
    ValueError, as Flower's."""
    if not share_list:
        raise ValueError("no shares to combine")
    length = len(share_list[0])
    if length < INDEX_BYTES + CHUNK or (length - INDEX_BYTES) % CHUNK or any(len(s) != length for s in share_list):
        raise ValueError("shares of different or impossible lengths")
    indices = tuple(int.from_bytes(s[:INDEX_BYTES], "little") for s in share_list)
    if len(set(indices)) != len(indices) or 0 in indices:
        raise ValueError("duplicate or zero share index")
    weights = _lagrange_at_zero(indices)
    padded = bytearray()
    for offset in range(INDEX_BYTES, length, CHUNK):
        value = 0
        for weight, share in zip(weights, share_list):
            value ^= multiply(weight, int.from_bytes(share[offset:offset + CHUNK], "big"))
        padded += value.to_bytes(CHUNK, "big")
    pad = padded[-1]
    if not 1 <= pad <= CHUNK or padded[-pad:] != bytes([pad]) * pad:
        raise ValueError("Failed to combine shares")
    return bytes(padded[:-pad])
