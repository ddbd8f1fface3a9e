"""Run the fedcare Flower App (server.app:app, client.app:app) in Flower's simulation engine.

This is what `flwr run . <simulation federation>` does inside Flower 1.42, called
in-process so the coordinator's progress prints live: the App's components are loaded by
their `pyproject.toml` names, and the run config is the App's defaults fused with our
overrides, exactly as in a deployment.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import replace

from deploy.flower import quiet_flower_environment
from fedcare import APP_DIR


def _quiet_site_tracebacks(record: logging.LogRecord) -> bool:
    """Drop the ERROR records in which Flower's simulation engine (its Ray transport and virtual Fleet)
    logs a virtual node's exception with Ray's traceback: the coordinator already prints each failure
    as one line naming the site and the reason. `--verbose` keeps them."""
    engine = "ray_transport" in record.pathname or f"{os.sep}vce{os.sep}" in record.pathname
    return not (record.levelno >= logging.ERROR and engine)


def run_flower_simulation(
    num_sites: int,
    run_config: dict[str, str | int | float],
    verbose: bool = False,
    components: dict[str, str] | None = None,
    cpus_per_site: float = 1.0,
) -> None:
    """Run the App with `num_sites` virtual SuperNodes; blocks until the ServerApp returns.

    `components` ({"serverapp": "module:attr", "clientapp": ...}) defaults to the App's own,
    from pyproject.toml; benchmarks pass a baseline App here. `cpus_per_site` is the Ray CPU share
    of one virtual site's task: the machine's cores divided by it is how many sites train at once
    (one Ray actor each, each with its own torch: ~0.3 GB). Sites are loaded when their node first
    trains (`client.site_client`), so memory follows the actors, not the number of sites.
    """
    if not 0 < cpus_per_site <= (os.cpu_count() or 2):
        raise ValueError(f"cpus_per_site: {cpus_per_site} must be in (0, {os.cpu_count() or 2}] (this machine's cores)")
    quiet_flower_environment()
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.logger import update_console_handler
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    if components is None:
        components = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    run_id = int.from_bytes(os.urandom(7), "big")
    run = replace(Run.create_empty(run_id=run_id), override_config=dict(run_config), federation_id=NOOP_FEDERATION_ID)
    run.primary_task_id = int.from_bytes(os.urandom(7), "big")
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(APP_DIR, run.override_config),
    )
    # Flower's own console handler shows its logs; other libraries' root handlers must not repeat them.
    logging.getLogger("flwr").propagate = False
    if not verbose:
        update_console_handler(level=logging.WARNING, timestamps=False, colored=True)
    flwr_logger = logging.getLogger("flwr")
    if verbose:
        flwr_logger.removeFilter(_quiet_site_tracebacks)
    else:
        flwr_logger.addFilter(_quiet_site_tracebacks)  # a no-op when already there (benchmarks run many)
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        client_app_attr=components["clientapp"],
        server_app_attr=components["serverapp"],
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 2,
                "include_dashboard": False,
                "log_to_driver": verbose,
            },
        },
        app_dir=str(APP_DIR),
        run=run,
        server_app_context=server_context,
        is_app=True,
        verbose_logging=verbose,
    )
