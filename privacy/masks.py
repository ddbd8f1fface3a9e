"""SecAgg+ masks from a 256-bit seed (ChaCha20), in place of Flower's 32-bit-seeded Mersenne Twister.

Each site hides its quantized vector under a private mask (from a seed it draws) and one pairwise
mask per neighbour (from the key it agreed with that neighbour); the coordinator removes them with
the seeds it reconstructs. Flower 1.42's `pseudo_rand_gen` folds the seed, whatever its length, to
32 bits (XOR of 4-byte words) and seeds numpy's `RandomState` (MT19937) with it. So a mask has at
most 2^32 possible values: a coordinator that colludes with all but one of a site's neighbours
(fewer than the reconstruction threshold, which SecAgg+ must survive) is left with one unknown
pairwise mask, and can try all 2^32 seeds, keeping the one that leaves the site's vector in the
quantization range: hours of one core (a guess costs a seeding and a few draws). That is below what SecAgg+ promises.

Here the mask is the ChaCha20 keystream under SHA-256(domain | seed), the whole seed, so the same
search costs 2^256. Values are the keystream's little-endian 32-bit words reduced modulo the
modulus range (a power of 2 of at most 2^32, as Flower's workflow requires): exactly uniform over
[0, modulus), where Flower's draw stops at modulus - 2. The same seed gives the same masks at both
ends, so a pairwise mask cancels, and the coordinator regenerates a dropped site's masks; each
party uses a seed only for its own masks of one round (seeds are fresh every round).

Both ends must use this (`privacy.secagg` installs it at the sites and the coordinator).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_DOMAIN = b"fedcare/secagg+ mask/v1\x00"
_MAX_MODULUS = 1 << 32


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks of the given shapes (int64 arrays; a 0-d array for shape ()), uniform over
    [0, num_range), from the ChaCha20 stream keyed by the whole `seed` (Flower's signature)."""
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError(f"a SecAgg+ mask seed must be at least 16 bytes, got {len(seed) if isinstance(seed, bytes) else type(seed).__name__}")
    if not isinstance(num_range, int) or num_range < 2 or num_range > _MAX_MODULUS or num_range & (num_range - 1):
        raise ValueError(f"the SecAgg+ modulus range must be a power of 2 in [2, 2^32], got {num_range}")
    sizes = [math.prod(shape) for shape in dimensions_list]
    key = hashlib.sha256(_DOMAIN + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u4").astype(np.int64)
    if num_range < _MAX_MODULUS:
        words &= num_range - 1
    masks, start = [], 0
    for shape, size in zip(dimensions_list, sizes):
        masks.append(words[start : start + size].reshape(shape))
        start += size
    return masks
