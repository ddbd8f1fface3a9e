"""What fedcare puts inside Flower's SecAgg+, at the sites and at the coordinator.

Flower's SecAgg+ client mod (`secaggplus_mod`) and server workflow (`SecAggPlusWorkflow`) run the
protocol; fedcare replaces two of the primitives they call, in the Flower module that calls each:

- Shamir sharing (`privacy.shamir`): the same scheme and share bytes as Flower's pycryptodome-based
  one, without its bit-by-bit field arithmetic (8-30x faster);
- key agreement (`privacy.key_agreement`): X25519 in place of P-384 (about 14x cheaper per neighbour);
- masks (`privacy.masks`): ChaCha20 under the whole 256-bit seed, in place of numpy's Mersenne
  Twister under a 32-bit fold of it (which a coordinator could search).

`install_for_sites()` runs when the ClientApp is imported (client/app.py), `install_for_coordinator()`
when the coordinator's workflow is (server/secure_aggregation.py), so simulation and deployment run
the same protocol. Each refuses loudly if a Flower release has moved a name it replaces.
"""

from __future__ import annotations

import importlib

from privacy import key_agreement, masks, shamir

_CLIENT_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
_KEYS_AT_SITES = ("generate_key_pairs", "private_key_to_bytes", "public_key_to_bytes", "bytes_to_private_key",
                  "bytes_to_public_key", "generate_shared_key")
_KEYS_AT_COORDINATOR = ("bytes_to_private_key", "bytes_to_public_key", "generate_shared_key")


def install_for_sites() -> None:
    """Flower's SecAgg+ client mod shares secrets with `privacy.shamir`, agrees keys on X25519 and
    masks with `privacy.masks`."""
    _replace(_CLIENT_MOD, "create_shares", shamir.create_shares)
    _replace(_CLIENT_MOD, "pseudo_rand_gen", masks.pseudo_rand_gen)
    for name in _KEYS_AT_SITES:
        _replace(_CLIENT_MOD, name, getattr(key_agreement, name))


def install_for_coordinator() -> None:
    """Flower's SecAgg+ workflow reconstructs secrets with `privacy.shamir`, agrees keys on X25519 and
    regenerates masks with `privacy.masks`."""
    _replace(_WORKFLOW, "combine_shares", shamir.combine_shares)
    _replace(_WORKFLOW, "pseudo_rand_gen", masks.pseudo_rand_gen)
    for name in _KEYS_AT_COORDINATOR:
        _replace(_WORKFLOW, name, getattr(key_agreement, name))


def _replace(module_name: str, name: str, ours) -> None:
    # the module itself: `flwr.client.mod.secure_aggregation` re-exports a function under the module's name
    module = importlib.import_module(module_name)
    if not callable(getattr(module, name, None)):
        raise RuntimeError(f"{module_name}.{name} is not where Flower 1.42 has it: privacy/secagg.py "
                           "must be checked against this Flower release")
    setattr(module, name, ours)
