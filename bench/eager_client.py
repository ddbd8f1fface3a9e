"""Baseline ClientApp for bench/deploy_round_time.py: the same client, imported eagerly.

This is how a ClientApp usually looks: torch, Opacus and the training code are imported at
module level, so every message's fresh `flwr-clientapp` process pays for them, including the
three SecAgg+ stages per round that never reach the client.
"""

from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod

import client.training  # noqa: F401  (torch + Opacus at import time)
from client.site_client import site_client

app = ClientApp(client_fn=site_client, mods=[secaggplus_mod])
