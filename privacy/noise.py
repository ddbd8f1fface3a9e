"""Cryptographically random, floating-point-hardened Gaussian noise and Poisson sampling for DP-SGD.

The same source also draws the Poisson-sampled batches: subsampling amplifies privacy only if
which rows were sampled stays secret, and Opacus' sampler uses torch's generator too.

Why: Opacus draws its noise from torch's default generator (a Mersenne Twister whose state an
observer of enough outputs, or of the seed, can recover, so the noise could be subtracted), and
its `secure_mode` needs `torchcsprng`, which does not install here. Soundness argument:
  - the uniform bits are ChaCha20 keystream under a fresh 256-bit key from `os.urandom`, so they
    are computationally indistinguishable from uniform and unpredictable; one cipher context per
    instance, only ever advanced, so no keystream is used twice (a forked child re-keys);
  - 53-bit uniforms in (0, 1] and Marsaglia's polar method give exact-in-the-reals N(0, 1) pairs
    (both used; a rejected pair is discarded, never reused). Normals are drawn ~25,700 at a time
    ahead of use and served in order, each once; a forked child drops them with the cipher state;
  - a single floating-point Gaussian takes a sparse, invertible set of values, which leaks the
    unnoised value (arXiv 2112.05307). As Opacus' `secure_mode` does (arXiv 2107.10138, sec. 5.1,
    n = 2), each noise value is the sum of 4 independent draws times std / 2: still N(0, std^2),
    but inverting it costs ~2^(53·3). Draws and sum are float64 (Opacus' own secure_mode draws
    float32); only the result is cast to the gradient's dtype.
"""

from __future__ import annotations

import math
import os
import threading
import types
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_KEY_BYTES = 32
_NONCE_BYTES = 16  # cryptography's ChaCha20 nonce: 4-byte little-endian block counter + 12-byte nonce
_HARDENING_DRAWS = 4  # 2n with n = 2, as in Opacus' secure_mode
_POOL_PAIRS = 1 << 14  # candidate pairs per refill of the normal pool: ~25,700 normals, ~200 KiB
_SHIFT, _ONE = np.uint64(11), np.uint64(1)
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def _chacha20_encryptor(key: bytes, nonce: bytes) -> Any:
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


def _uniform_53(words: np.ndarray) -> np.ndarray:
    """64-bit words to float64 uniforms in (0, 1]: the top 53 bits, plus one, times 2^-53 (exact)."""
    u = ((words >> _SHIFT) + _ONE).astype(np.float64)
    u *= 2.0**-53
    return u


def _polar(u: np.ndarray) -> np.ndarray:
    """Marsaglia's polar method on 2m uniforms in (0, 1], as m candidate pairs (u[:m], u[m:]): with
    v = 2u - 1 uniform in the square, keep the pairs inside the unit disk (0 < s = v1² + v2² < 1,
    about π/4 of them); each kept pair gives two independent N(0, 1), v·sqrt(-2 ln s / s). Same
    distribution as Box–Muller, without its sine and cosine (numpy's float64 trigonometry is
    scalar; log and sqrt are vectorized): ~4x cheaper here."""
    m = len(u) // 2
    v = u * 2.0
    v -= 1.0
    squares = v * v
    s = squares[:m] + squares[m:]
    kept = np.flatnonzero((s < 1.0) & (s > 0.0))
    s = s[kept]
    factor = np.log(s)
    factor *= -2.0
    factor /= s
    np.sqrt(factor, out=factor)
    out = np.empty(2 * len(kept))
    np.multiply(v[:m][kept], factor, out=out[: len(kept)])
    np.multiply(v[m:][kept], factor, out=out[len(kept) :])
    return out


class CryptoGaussian:
    """Standard-normal samples from a ChaCha20 keystream.

    `key=None` (production) draws a fresh key and nonce from `os.urandom`. A given `key` (tests
    only) uses a zero nonce, so two instances with the same key produce the same stream.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != _KEY_BYTES:
            raise ValueError(f"ChaCha20 key must be {_KEY_BYTES} bytes, got {len(key)}")
        self._fixed_key = key is not None
        self._lock = threading.Lock()
        self._rekey(key)

    def _rekey(self, key: bytes | None) -> None:
        if key is None:
            key, nonce = os.urandom(_KEY_BYTES), os.urandom(_NONCE_BYTES)
        else:
            nonce = bytes(_NONCE_BYTES)
        self._encryptor = _chacha20_encryptor(key, nonce)
        self._pid = os.getpid()
        # normals drawn ahead of use, served in order: the sequence of normals a key gives does
        # not depend on how many each call asks for (one flat draw = many small ones, concatenated)
        self._pool, self._pool_used = np.empty(0), 0

    def _rekey_after_fork_locked(self) -> None:
        if self._pid != os.getpid() and not self._fixed_key:
            # A fork copied the cipher state and the pool: the child must not replay the parent's noise.
            self._rekey(None)

    def _keystream_locked(self, nbytes: int) -> bytes:
        self._rekey_after_fork_locked()
        return self._encryptor.update(bytes(nbytes))

    def _keystream(self, nbytes: int) -> bytes:
        with self._lock:
            return self._keystream_locked(nbytes)

    def _normals(self, n: int) -> np.ndarray:
        """The next `n` standard normals of the pool (a fresh array), refilling it as needed."""
        parts: list[np.ndarray] = []
        with self._lock:
            self._rekey_after_fork_locked()
            while n > 0:
                if self._pool_used == len(self._pool):
                    words = np.frombuffer(self._keystream_locked(16 * _POOL_PAIRS), dtype="<u8")
                    self._pool, self._pool_used = _polar(_uniform_53(words)), 0
                take = min(n, len(self._pool) - self._pool_used)
                parts.append(self._pool[self._pool_used : self._pool_used + take])
                self._pool_used += take
                n -= take
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0)

    def uniform(self, n: int) -> np.ndarray:
        """`n` independent uniforms in (0, 1] with 53-bit precision (float64)."""
        return _uniform_53(np.frombuffer(self._keystream(8 * n), dtype="<u8"))

    def poisson_batch(self, rows: int, sample_rate: float) -> np.ndarray:
        """One Poisson-sampled batch, as row indices (int64, ascending): each row independently with
        probability `sample_rate` (what Opacus' sampler does, from this source instead of torch's
        generator). Drawn as geometric gaps between chosen rows (floor(log u / log(1 - q)) rows
        skipped, u uniform in (0, 1]), which is the same distribution and costs ~q·rows uniforms
        per batch instead of `rows`: a million-row site draws ~130 numbers per step, not 10^6."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if sample_rate == 1.0:
            return np.arange(rows, dtype=np.int64)
        log_keep = math.log1p(-sample_rate)
        chosen: list[np.ndarray] = []
        position = -1  # the last chosen row
        expected = rows * sample_rate
        while True:
            n = int(expected + 4.0 * math.sqrt(expected + 1.0)) + 8
            gaps = np.floor(np.log(self.uniform(n)) / log_keep)  # rows skipped before the next chosen one
            steps = np.cumsum(np.minimum(gaps, rows) + 1.0)  # capped: no overflow for tiny rates
            picks = position + steps
            inside = picks[picks < rows]
            chosen.append(inside.astype(np.int64))
            if len(inside) < n:
                return np.concatenate(chosen)
            position = int(inside[-1])
            expected = max(rows - position - 1, 0) * sample_rate

    def standard_normal(self, n: int) -> np.ndarray:
        """`n` independent N(0, 1) samples (float64), the next ones of this source's sequence."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._normals(n)

    def hardened(
        self,
        shape: torch.Size | tuple[int, ...] | int,
        std: float,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """N(0, std^2) noise of `shape`: the sum of 4 independent standard-normal draws times std / 2."""
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be finite and >= 0, got {std}")
        size = torch.Size((shape,) if isinstance(shape, int) else shape)
        if std == 0:
            return torch.zeros(size, dtype=dtype, device=device)
        numel = size.numel()
        # value i sums the 4 consecutive draws 4i..4i+3, so a draw for n + m values is the draws for
        # n and then m values, concatenated: one flat draw for all parameters (the fast path) gives
        # what Opacus' one draw per parameter gives, from the same key
        draws = self._normals(_HARDENING_DRAWS * numel)
        noise = draws[0::_HARDENING_DRAWS] + draws[1::_HARDENING_DRAWS]
        for k in range(2, _HARDENING_DRAWS):
            noise += draws[k::_HARDENING_DRAWS]
        noise *= std / 2.0
        return _to_tensor(noise.reshape(size), dtype, device)


def _to_tensor(values: np.ndarray, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """float64 values as a tensor of `dtype` on `device` (numpy casts are cheaper for small arrays)."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    tensor = torch.from_numpy(values.astype(np_dtype, copy=False)) if np_dtype else torch.from_numpy(values).to(dtype)
    if device is not None and torch.device(device).type != "cpu":
        tensor = tensor.to(device)
    return tensor


def _effective_noise_multiplier(optimizer: Any, adaptive: bool) -> float:
    # DPOptimizerFastGradientClipping honours adaptive clipping's adjusted multiplier; DPOptimizer does not.
    if adaptive:
        return getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
    return optimizer.noise_multiplier


def _uses_adjusted_multiplier(optimizer: Any) -> bool:
    """True for DPOptimizerFastGradientClipping's `add_noise`, False for DPOptimizer's; any other refused."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    add_noise = getattr(type(optimizer), "add_noise", None)
    if add_noise is DPOptimizerFastGradientClipping.add_noise:
        return True
    if add_noise is DPOptimizer.add_noise:
        return False
    raise TypeError(
        "use_crypto_noise supports DPOptimizer and DPOptimizerFastGradientClipping; "
        f"{type(optimizer).__name__} overrides add_noise with its own semantics "
        "(distributed, FSDP or adaptive clipping), which this replacement would not keep"
    )


def use_crypto_noise(optimizer: Any, source: CryptoGaussian | None = None) -> None:
    """Make this Opacus DP optimizer draw its noise from `source` (a fresh CryptoGaussian by default),
    hardened as in Opacus' secure_mode. Only this instance's `add_noise` is replaced."""
    missing = [name for name in ("add_noise", "params", "noise_multiplier", "max_grad_norm") if not hasattr(optimizer, name)]
    if missing:
        raise TypeError(
            "use_crypto_noise needs an Opacus DP optimizer (as returned by PrivacyEngine.make_private); "
            f"{type(optimizer).__name__} has no {', '.join(missing)}"
        )
    adaptive = _uses_adjusted_multiplier(optimizer)
    noise_source = source if source is not None else CryptoGaussian()
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise(self: Any) -> None:
        """Opacus' add_noise, with the noise drawn from a CryptoGaussian (hardened)."""
        std = _effective_noise_multiplier(self, adaptive) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            noise = noise_source.hardened(ref.shape, std, dtype=ref.dtype, device=ref.device)
            p.grad = (ref + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)
