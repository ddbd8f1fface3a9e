"""Starting Flower's processes: their environment (no telemetry, no update checks, no runtime
dependency installation, no Ray usage reporting), their commands, free ports, the insecure-mode
warning. Call `quiet_flower_environment` before importing flwr in this process."""

from __future__ import annotations

import os
from pathlib import Path

FLOWER_QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # SuperExec checks for a new task every 1 s by default; a local loopback request, so often is cheap.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}


def quiet_flower_environment() -> None:
    """Set the no-phone-home variables in this process (inherited by children it starts)."""
    for key, value in FLOWER_QUIET_ENV.items():
        os.environ[key] = value


def flower_env(flwr_home: str | os.PathLike[str]) -> dict[str, str]:
    """Environment for a Flower child process: quiet, with its own FLWR_HOME, and this
    interpreter's scripts first on PATH (Flower starts flower-superexec, flwr-clientapp by name)."""
    import sys

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_QUIET_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1", "PATH": path}


def flower_command(name: str) -> str:
    """Path of a Flower console script installed beside this interpreter (flwr, flower-superlink, ...)."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not found beside {sys.executable} or on PATH; is flwr installed?")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def warn_insecure(what: str) -> None:
    """The loud warning every insecure dev mode prints."""
    import sys

    bar = "!" * 78
    print(
        f"{bar}\n!! INSECURE DEV MODE: {what}\n!! No TLS, no node authentication: anyone on the network can read and"
        f" join.\n!! Never use this with real patient data.\n{bar}",
        file=sys.stderr,
        flush=True,
    )
