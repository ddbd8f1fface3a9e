"""The coordinator's running federation: the Flower SuperLink process, its supervision, and Flower's own CLI.

`supervise` (`fedcare coordinator start`) runs two processes: `flower-superlink` on loopback
(TLS with a per-start loopback certificate, SuperNode authentication, a SQLite database in the
kit, runtime dependency installation off, telemetry and update checks off) and, on the port the
hospitals reach, the network edge (`deploy/edge.py`: nginx, client certificates, Fleet API only).
It registers every node public key of the kit, picks up keys added while it runs, records its
actions in the audit log (`deploy/audit.py`) and stops both process groups on a signal.
`FlowerCLI` wraps `flwr` commands against the loopback Control API (register, run, log, ls,
supernode ls), always with `--format json` where Flower offers it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.audit import audit
from deploy.flower import flower_command, flower_env, free_port, warn_insecure
from deploy.kits import CoordinatorKit
from deploy.pki import loopback_certificate
from fedcare.errors import FedcareError
from fedcare.files import atomic_write_bytes, check_private_permissions, write_secret
from fedcare.keys import PASSPHRASE_ENV, passphrase_from_environment, unlocked_passphrase
from fedcare.sealing import ARTIFACT_KEY_ENV, ArtifactKey, ensure_artifact_key

CONNECTION = "fedcare"
READY_TIMEOUT = 60.0


class FederationError(FedcareError, RuntimeError):
    """The SuperLink or a Flower command failed; the message says what the user can do."""


def flwr_home(kit: CoordinatorKit) -> Path:
    return kit.state_dir / "flwr-home"


def loopback_files(kit: CoordinatorKit) -> tuple[Path, Path]:
    """(certificate, key) the SuperLink serves on loopback, behind the edge; made anew at each start."""
    return kit.state_dir / "loopback.crt", kit.state_dir / "loopback.key"


def write_connection(kit: CoordinatorKit, port: int, insecure: bool, *, host: str = "127.0.0.1") -> None:
    """`$FLWR_HOME/config.toml` with one connection, `fedcare`, to this kit's SuperLink (on loopback
    behind the edge: the Control API is reachable from this machine only)."""
    home = flwr_home(kit)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{host}:{port}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{loopback_files(kit)[0]}"')
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

    def unregister(self, node_id: str) -> None:
        self._run("supernode", "unregister", node_id, CONNECTION, "--format", "json")

    def nodes(self) -> list[dict]:
        return list(self._run("supernode", "ls", CONNECTION, "--format", "json").get("nodes", []))

    def runs(self, run_id: int | None = None) -> list[dict]:
        args = ["ls", CONNECTION, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
        return list(self._run(*args).get("runs", []))

    def start_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in run_config.items())
        data = self._run("run", str(app_dir), CONNECTION, "--format", "json", "--run-config", pairs, timeout=180)
        return int(data["run-id"])

    def stop_run(self, run_id: int) -> None:
        self._run("stop", str(run_id), CONNECTION, "--format", "json")

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
    cert, key = loopback_files(kit)
    return cmd + ["--ssl-ca-certfile", str(cert), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                  "--enable-supernode-auth"]


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


def _check_tls_files(kit: CoordinatorKit) -> None:
    missing = [p for p in (kit.server_cert, kit.server_key) if not p.is_file()]
    if missing:
        raise FederationError(
            f"refusing to start without TLS: {', '.join(str(p) for p in missing)} not found in the coordinator kit "
            "(provision the kit with `fedcare provision`, or pass --insecure-dev for a local trial without patient data)"
        )
    check_private_permissions(kit.server_key)
    if not kit.node_ca_cert.is_file():
        raise FederationError(f"{kit.node_ca_cert}: missing; this kit predates node certificates. Re-issue each "
                              "hospital's certificate with `fedcare coordinator add-node` (it creates the node CA)")


def start_superlink(kit: CoordinatorKit, *, bind: str, port: int, insecure_dev: bool) -> subprocess.Popen:
    """Start the SuperLink on `bind:port`, wait until it listens, register the kit's node keys; return
    the process. With TLS, `bind` is loopback and the network edge (`deploy/edge.py`) faces the hospitals."""
    kit.state_dir.mkdir(parents=True, exist_ok=True)
    if not (kit.state_dir / "superlink.db").exists():
        (kit.state_dir / "nodes.json").unlink(missing_ok=True)  # a new database knows no node yet
    if not insecure_dev:
        cert, key = loopback_files(kit)
        cert_pem, key_pem = loopback_certificate()
        key.unlink(missing_ok=True)
        write_secret(key, key_pem)
        atomic_write_bytes(cert, cert_pem)
    write_connection(kit, port, insecure_dev, host="127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind)
    log_path = kit.state_dir / "superlink.log"
    log = log_path.open("ab")
    ensure_artifact_key(kit.artifact_key)  # a kit provisioned before sealing gets its key here
    ArtifactKey.load(kit.artifact_key)  # a protected key is unlocked (or refused) before anything starts
    env = {**flower_env(flwr_home(kit)), ARTIFACT_KEY_ENV: str(kit.artifact_key)}  # the ServerApp seals with it
    typed = unlocked_passphrase(kit.artifact_key)
    if typed is not None and passphrase_from_environment() is None:  # asked on this terminal: the ServerApp has none
        env[PASSPHRASE_ENV] = typed.decode("utf-8")
    proc = subprocess.Popen(
        superlink_command(kit, bind, port, insecure_dev),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )  # in this command's process group: stopping the group stops the SuperLink and its ServerApp too
    try:
        _wait_until_listening(proc, port, log_path, READY_TIMEOUT)
        if not insecure_dev:
            register_nodes(kit)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


def stop_process_group(proc: subprocess.Popen, timeout: float = 4.0) -> None:
    """Stop a Flower process and its children: SIGTERM to it (and, when this command leads its process
    group, to the group, which holds the SuperExec and ServerApp it started), SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        if os.getpgid(0) == os.getpid():
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this command is in the group too
            os.killpg(0, signal.SIGTERM)
            signal.signal(signal.SIGTERM, previous)
        else:
            proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def register_nodes(kit: CoordinatorKit) -> dict[str, str]:
    """Register each `nodes/<name>.pub` not registered yet; remember name -> node id in `state/nodes.json`.

    Cheap when nothing changed (no `flwr` process is started), so a running coordinator can
    call it every few seconds to pick up keys added with `fedcare coordinator add-node`.
    """
    known_path = kit.state_dir / "nodes.json"
    known: dict[str, str] = json.loads(known_path.read_text()) if known_path.exists() else {}
    keys = kit.node_keys()
    new = {name: key for name, key in keys.items() if name not in known}
    removed = [name for name in known if name not in keys]  # `coordinator remove-node` took its key away
    if new or removed:
        cli = FlowerCLI(kit)
        for name in removed:
            if known[name].isdigit():
                cli.unregister(known[name])
            audit(kit, "node unregistered", name=name, node_id=known.pop(name))
        for name, public_key in new.items():
            known[name] = cli.register(public_key) or "registered earlier"
            audit(kit, "node registered", name=name, node_id=known[name])
        known_path.write_text(json.dumps(known, indent=2) + "\n", encoding="utf-8")
    return known


def node_names(kit: CoordinatorKit) -> dict[str, str]:
    """node id -> hospital name, for the nodes this coordinator registered."""
    known_path = kit.state_dir / "nodes.json"
    known: dict[str, str] = json.loads(known_path.read_text()) if known_path.exists() else {}
    return {node_id: name for name, node_id in known.items()}


def supervise(kit: CoordinatorKit, *, bind: str, port: int | None, insecure_dev: bool) -> int:
    """`fedcare coordinator start`: run the SuperLink and its network edge in the foreground until either
    stops or the command is signalled; picks up node keys added with `coordinator add-node` while it
    runs (registered with Flower and admitted by the edge). Returns the exit code."""
    port = port or kit.port
    if insecure_dev:
        warn_insecure("coordinator started with --insecure-dev: no network edge, Flower's Control API is open on the port")
        return _supervise_insecure(kit, bind=bind, port=port)
    _check_tls_files(kit)
    from deploy.edge import EdgeSettings, reload_edge, start_edge, stop_edge

    upstream = free_port()
    link = start_superlink(kit, bind="127.0.0.1", port=upstream, insecure_dev=False)
    settings = EdgeSettings(bind=bind, port=port, upstream_port=upstream, upstream_name="localhost",
                            upstream_ca=loopback_files(kit)[0])
    try:
        edge = start_edge(kit, settings)
    except BaseException:
        stop_process_group(link)
        raise
    names = sorted(kit.node_certificates())
    audit(kit, "coordinator started", listen=f"{bind}:{port}", nodes=names)
    print(f"coordinator listening on {bind}:{port} (TLS with client certificates, node authentication on; only the "
          f"Fleet API is exposed); Control API on 127.0.0.1:{upstream} for this machine's operator", flush=True)
    print(f"accepted hospitals: {', '.join(names) or 'none'}; logs: {kit.state_dir}", flush=True)
    stopping = []

    def stop(_signum: int, _frame: object) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and link.poll() is None and edge.poll() is None:
            time.sleep(0.5)
            current = sorted(kit.node_certificates())
            if current == names:
                continue
            try:
                register_nodes(kit)
                reload_edge(kit, settings, edge)
                for name in sorted(set(current) - set(names)):
                    audit(kit, "node admitted", name=name)
                print(f"accepted hospitals: {', '.join(current)}", flush=True)
            except FedcareError as err:
                print(f"fedcare: warning: could not update the accepted nodes: {err.line}", file=sys.stderr, flush=True)
            names = current
    finally:
        stop_edge(edge)
        stop_process_group(link)
    failed = [what for what, proc in (("SuperLink", link), ("edge", edge)) if proc.returncode not in (0, -15, -3) and not stopping]
    audit(kit, "coordinator stopped", reason="signal" if stopping else f"{', '.join(failed) or 'a process'} exited")
    print(f"coordinator stopped{'' if stopping else ' (' + ', '.join(failed) + ' exited; see ' + str(kit.state_dir) + ')'}",
          flush=True)
    return 0 if stopping else 1


def _supervise_insecure(kit: CoordinatorKit, *, bind: str, port: int) -> int:
    proc = start_superlink(kit, bind=bind, port=port, insecure_dev=True)
    print(f"coordinator listening on {bind}:{port} (TLS OFF, node authentication OFF); pid {proc.pid}", flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    try:
        while not stopping and proc.poll() is None:
            time.sleep(0.5)
    finally:
        stop_process_group(proc)
    print("coordinator stopped", flush=True)
    return 0 if stopping else 1
