"""The hospital's Flower ClientApp (`client.app:app` in pyproject.toml).

In deployment every message to a SuperNode runs in a fresh process that imports this
module. Three of the four SecAgg+ stages per round (setup, key sharing, unmasking) are
handled entirely by `secaggplus_mod` and never reach the client, so this module imports
only Flower; torch, Opacus and the site's data load only when a message needs the client
(`client.site_client`: training and evaluation). The masked-only guard (`privacy.guard`) runs
first: only SecAgg+ training stages that meet the site's policy, and evaluation, get through.
The mod's Shamir sharing and key agreement are fedcare's (`privacy.secagg`: the same scheme and bytes,
X25519 keys; fast enough for 100s of sites).
"""

from __future__ import annotations

from flwr.client import Client, ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

from privacy.guard import masked_only_guard
from privacy.secagg import install_for_sites

install_for_sites()  # SecAgg+ with privacy/shamir.py's sharing and privacy/key_agreement.py's X25519


def client_fn(context: Context) -> Client:
    from client.site_client import site_client

    return site_client(context)


app = ClientApp(client_fn=client_fn, mods=[masked_only_guard, secaggplus_mod])
