"""The hospital's Flower ClientApp (`client.app:app` in pyproject.toml).

In deployment every message to a SuperNode runs in a fresh process that imports this
module. Three of the four SecAgg+ stages per round (setup, key sharing, unmasking) are
handled entirely by `secaggplus_mod` and never reach the client, so this module imports
only Flower; torch, Opacus and the site's data load only when a message needs the client
(`client.hospital`: training and evaluation).
"""

from __future__ import annotations

from flwr.client import Client, ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Context


def client_fn(context: Context) -> Client:
    from client.hospital import hospital_client

    return hospital_client(context)


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
