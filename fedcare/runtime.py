"""Process environment for anything that starts Flower: no telemetry, no update checks,
no runtime dependency installation, no Ray usage reporting. Call before importing flwr."""

from __future__ import annotations

import os

FLOWER_QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_flower_environment() -> None:
    """Set the no-phone-home variables in this process (inherited by children it starts)."""
    for key, value in FLOWER_QUIET_ENV.items():
        os.environ[key] = value
