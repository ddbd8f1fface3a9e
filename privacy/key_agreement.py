"""SecAgg+ key agreement on X25519, in place of Flower's ECDH on P-384, at every site and the coordinator.

In each SecAgg+ round a site makes two key pairs (`generate_key_pairs`) and agrees a key with each
of its k neighbours twice (`generate_shared_key`): once to encrypt the key shares it sends them,
once to seed the pairwise masks; the coordinator agrees keys again only for a site that dropped out,
from its reconstructed first private key. Flower 1.42 does this on P-384, and parses the site's own
PEM private key again for every neighbour. Measured here: an agreement costs ~0.55 ms and a parse
~0.3 ms, so at k = 20 a site spends ~35 ms a round on it, ~1.7 s of a 100-site round on 2 cores
(BENCHMARKS.md, "Many hospitals"). X25519 (RFC 7748) agrees a key in ~0.04 ms and its keys are raw
32-byte strings with nothing to parse; the first private key, which SecAgg+ splits into Shamir
shares, is 32 bytes instead of a ~185-byte PEM, so sharing and reconstructing it is ~4x cheaper.

Strength. X25519 gives 128-bit security; the agreed key is used only as the key of Fernet
(AES-128-CBC with HMAC-SHA256), which encrypts the shares, and as the seed of Flower's mask
generator, so the curve was never the weakest part; P-384's 192 bits bought nothing past AES-128.
The derivation after the agreement is Flower's: HKDF-SHA256 to 32 bytes, urlsafe base64 (a
Fernet key). Keys are fresh per round from `os.urandom` (through OpenSSL), as before.

Malformed keys. A public key that is not 32 bytes, or of small order (its agreement would be all
zeros, which `cryptography` refuses), raises ValueError in the stage that uses it: the site's
reply is an error and the coordinator counts it as a dropout, as it does for a malformed P-384 key.

Both ends must use this: a site and a coordinator of one fedcare release do (`privacy.secagg`
installs it in both); Flower's own P-384 sites could not join a fedcare coordinator's round.
"""

from __future__ import annotations

import base64
import functools

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


def generate_key_pairs() -> tuple[X25519PrivateKey, X25519PublicKey]:
    """A fresh X25519 key pair (private key from the operating system's CSPRNG)."""
    private_key = X25519PrivateKey.generate()
    return private_key, private_key.public_key()


def private_key_to_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (RFC 7748)."""
    return private_key.private_bytes_raw()


def public_key_to_bytes(public_key: X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (RFC 7748)."""
    return public_key.public_bytes_raw()


def bytes_to_private_key(private_key_bytes: bytes) -> X25519PrivateKey:
    """A private key from its 32 raw bytes; ValueError for any other length.

    The client mod parses the site's own key again for each neighbour (~40 µs each); the last two
    keys parsed are kept, so a stage parses its key once. They are this round's keys, which the
    site's SecAgg+ state holds anyway; a new round's keys push them out."""
    return _private_key(_exact(private_key_bytes, "private"))


@functools.lru_cache(maxsize=2)
def _private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def bytes_to_public_key(public_key_bytes: bytes) -> X25519PublicKey:
    """A public key from its 32 raw bytes; ValueError for any other length."""
    return X25519PublicKey.from_public_bytes(_exact(public_key_bytes, "public"))


def generate_shared_key(private_key: X25519PrivateKey, public_key: X25519PublicKey) -> bytes:
    """The Fernet key two parties agree: X25519, then HKDF-SHA256 to 32 bytes, urlsafe base64
    (Flower's derivation). ValueError for a public key of small order."""
    shared = private_key.exchange(public_key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=None).derive(shared)
    return base64.urlsafe_b64encode(derived)


def _exact(key: bytes, kind: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"a SecAgg+ {kind} key is {KEY_BYTES} raw X25519 bytes, got {size}")
    return key
