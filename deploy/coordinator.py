"""The coordinator's running federation: the Flower SuperLink process, its supervision, and Flower's own CLI.

`start_superlink` launches `flower-superlink` for a coordinator kit — TLS with the kit's
certificate, SuperNode authentication, a SQLite database in the kit, runtime dependency
installation off, telemetry and update checks off — waits until it answers, and registers
every node public key of the kit. `FlowerCLI` wraps `flwr` commands against it (register,
run, log, ls, supernode ls), always with `--format json` where Flower offers it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.flower import flower_command, flower_env, warn_insecure
from deploy.kits import CoordinatorKit
from fedcare.errors import FedcareError

CONNECTION = "fedcare"
READY_TIMEOUT = 60.0


class FederationError(FedcareError, RuntimeError):
    """The SuperLink or a Flower command failed; the message says what the user can do."""


def flwr_home(kit: CoordinatorKit) -> Path:
    return kit.state_dir / "flwr-home"


def write_connection(kit: CoordinatorKit, port: int, insecure: bool) -> None:
    """`$FLWR_HOME/config.toml` with one connection, `fedcare`, to this kit's SuperLink."""
    home = flwr_home(kit)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{kit.hosts[0]}:{port}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{kit.ca_cert}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class FlowerCLI:
    """`flwr` commands against the kit's SuperLink."""

    kit: CoordinatorKit

    def _run(self, *args: str, timeout: float = 60.0) -> dict:
        cmd = [flower_command("flwr"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=flower_env(flwr_home(self.kit)))
        out = proc.stdout.strip()
        try:
            data = json.loads(out[out.index("{") :]) if "{" in out else {}
        except json.JSONDecodeError:
            data = {}
        if proc.returncode != 0 or data.get("success") is False:
            reason = data.get("error-message") or (proc.stderr.strip() or out)[-600:]
            raise FederationError(f"`flwr {' '.join(args[:2])}` failed: {reason}")
        return data

    def register(self, public_key: Path) -> str | None:
        """Register a node key; returns its node id, or None if it was already registered."""
        try:
            return str(self._run("supernode", "register", str(public_key), CONNECTION, "--format", "json")["node-id"])
        except FederationError as err:
            if "already in use" in str(err):
                return None
            raise

    def nodes(self) -> list[dict]:
        return list(self._run("supernode", "ls", CONNECTION, "--format", "json").get("nodes", []))

    def runs(self, run_id: int | None = None) -> list[dict]:
        args = ["ls", CONNECTION, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
        return list(self._run(*args).get("runs", []))

    def start_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in run_config.items())
        data = self._run("run", str(app_dir), CONNECTION, "--format", "json", "--run-config", pairs, timeout=180)
        return int(data["run-id"])

    def stream_log(self, run_id: int, sink) -> None:
        """Follow the run's ServerApp output until the run ends, writing each line to `sink`."""
        cmd = [flower_command("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env(flwr_home(self.kit))
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink(line.rstrip("\n"))


def superlink_command(kit: CoordinatorKit, bind: str, port: int, insecure: bool) -> list[str]:
    cmd = [
        flower_command("flower-superlink"),
        "--database", str(kit.state_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--host", bind,
        "--port", str(port),
    ]
    if insecure:
        return cmd + ["--insecure"]
    return cmd + [
        "--ssl-ca-certfile", str(kit.ca_cert),
        "--ssl-certfile", str(kit.server_cert),
        "--ssl-keyfile", str(kit.server_key),
        "--enable-supernode-auth",
    ]


def _wait_until_listening(proc: subprocess.Popen, port: int, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise FederationError(f"flower-superlink exited with code {proc.returncode} during start-up:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise FederationError(f"flower-superlink did not listen on port {port} within {timeout:.0f} s (log: {log_path})")


def start_superlink(kit: CoordinatorKit, *, bind: str, port: int, insecure_dev: bool) -> subprocess.Popen:
    """Start the SuperLink, wait until it listens, register the kit's node keys; return the process."""
    if insecure_dev:
        warn_insecure("coordinator started with --insecure-dev")
    else:
        missing = [p for p in (kit.server_cert, kit.server_key) if not p.is_file()]
        if missing:
            raise FederationError(
                f"refusing to start without TLS: {', '.join(str(p) for p in missing)} not found in the coordinator kit "
                "(provision the kit with `fedcare provision`, or pass --insecure-dev for a local trial without patient data)"
            )
    kit.state_dir.mkdir(parents=True, exist_ok=True)
    if not (kit.state_dir / "superlink.db").exists():
        (kit.state_dir / "nodes.json").unlink(missing_ok=True)  # a new database knows no node yet
    write_connection(kit, port, insecure_dev)
    log_path = kit.state_dir / "superlink.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        superlink_command(kit, bind, port, insecure_dev),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=flower_env(flwr_home(kit)),
    )
    try:
        _wait_until_listening(proc, port, log_path, READY_TIMEOUT)
        if not insecure_dev:
            register_nodes(kit)
    except BaseException:
        proc.terminate()
        proc.wait(timeout=15)
        raise
    return proc


def register_nodes(kit: CoordinatorKit) -> dict[str, str]:
    """Register each `nodes/<name>.pub` not registered yet; remember name -> node id in `state/nodes.json`.

    Cheap when nothing changed (no `flwr` process is started), so a running coordinator can
    call it every few seconds to pick up keys added with `fedcare coordinator add-node`.
    """
    known_path = kit.state_dir / "nodes.json"
    known: dict[str, str] = json.loads(known_path.read_text()) if known_path.exists() else {}
    new = {name: key for name, key in kit.node_keys().items() if name not in known}
    if new:
        cli = FlowerCLI(kit)
        for name, public_key in new.items():
            known[name] = cli.register(public_key) or "registered earlier"
        known_path.write_text(json.dumps(known, indent=2) + "\n", encoding="utf-8")
    return known


def node_names(kit: CoordinatorKit) -> dict[str, str]:
    """node id -> hospital name, for the nodes this coordinator registered."""
    known_path = kit.state_dir / "nodes.json"
    known: dict[str, str] = json.loads(known_path.read_text()) if known_path.exists() else {}
    return {node_id: name for name, node_id in known.items()}


def supervise(kit: CoordinatorKit, *, bind: str, port: int | None, insecure_dev: bool) -> int:
    """`fedcare coordinator start`: run the SuperLink in the foreground until it stops or is signalled,
    registering node keys added with `coordinator add-node` while it runs. Returns the exit code."""
    port = port or kit.port
    proc = start_superlink(kit, bind=bind, port=port, insecure_dev=insecure_dev)
    names = [] if insecure_dev else sorted(kit.node_keys())
    print(f"coordinator listening on {bind}:{port} (TLS {'OFF' if insecure_dev else 'on'}, "
          f"node authentication {'OFF' if insecure_dev else 'on'}); pid {proc.pid}", flush=True)
    print(f"registered hospitals: {', '.join(names) or 'none'}; log: {kit.state_dir / 'superlink.log'}", flush=True)

    def stop(_signum: int, _frame: object) -> None:
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while proc.poll() is None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # still running: pick up keys added with `coordinator add-node`
            if not insecure_dev:
                try:
                    register_nodes(kit)
                except FedcareError as err:
                    print(f"fedcare: warning: could not register a new node key: {err.line}", file=sys.stderr, flush=True)
    print(f"coordinator stopped (exit status {proc.returncode})", flush=True)
    return 0 if proc.returncode in (0, -15) else 1
