"""`fedcare node start`: check the site, then run this hospital's Flower SuperNode.

Before anything connects: the site's data is validated against the study spec (a fatal
problem stops here with the report), the Apps the site runs are fixed (`deploy/approval.py`),
and a TLS handshake with the coordinator, verified against the study CA from the kit and
presenting the node's client certificate, tells apart "unreachable" from "not the study's
coordinator". The SuperNode (`deploy/supernode.py`: Flower's, with the site's controls) then
runs in its own process group and reconnects with back-off for as long as it is not stopped,
saying so once a minute; its output is watched so a rejected key, a failed TLS check or a
refused App becomes one plain sentence. A signal stops the whole group within seconds.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from client.check import check_site_export
from deploy.approval import AppApproval, site_approval
from deploy.flower import flower_env, free_port, warn_insecure
from deploy.kits import HospitalKit, read_site_settings
from deploy.pki import node_tls_key
from deploy.supernode import NodeProcessSettings
from fedcare.errors import FedcareError
from fedcare.files import write_secret
from fedcare.study import load_study
from privacy.ledger import LedgerTampered, PrivacyLedger
from privacy.policy import load_site_policy

CONNECT_TIMEOUT = 10.0
STOP_TIMEOUT = 4.0  # SIGTERM to the SuperNode's group, then SIGKILL: a node stops within 5 s
RECONNECT_NOTICE_SECONDS = 60.0
POLL_SECONDS = 0.5


class NodeStartError(FedcareError, RuntimeError):
    """The node cannot join; the message says why and what to do."""


@dataclass(frozen=True)
class NodeSettings:
    kit: HospitalKit
    data: Path
    state_dir: Path
    insecure_dev: bool = False


def resolve_settings(kit: HospitalKit, data: str | Path | None, insecure_dev: bool) -> NodeSettings:
    """Where the site's data is (`--data`, else `[site] data`): a directory, a database.toml, or a
    `postgresql://` URL (kept as `<state_dir>/database.toml`: the SuperNode's config names a file)."""
    from client.database import data_argument

    site = read_site_settings(kit)
    chosen = data or site.get("data")
    if chosen is None:
        raise NodeStartError(f"no data directory: pass --data or set [site] data in {kit.site_file}")
    state_dir = Path(site["state_dir"])
    return NodeSettings(kit, data_argument(str(chosen), state_dir=state_dir).resolve(), state_dir, insecure_dev)


def check_site_data(settings: NodeSettings) -> str:
    """Validate the site's files against the study (`fedcare data check`); raises on fatal problems."""
    study = load_study(settings.kit.study_file)
    check = check_site_export(study, settings.data)
    if check.fatal:
        print(check.text, file=sys.stderr, flush=True)  # the whole report (counts, reasons, lines), then the error
        raise NodeStartError(f"site data does not fit the study '{study.name}' (report above)")
    return check.text


def check_coordinator(kit: HospitalKit, insecure_dev: bool, timeout: float = CONNECT_TIMEOUT,
                      client_key: Path | None = None) -> None:
    """TCP + TLS handshake with the coordinator, verified against the study CA, presenting the
    node's client certificate (`client_key`: its key as PEM)."""
    host, _, port_text = kit.coordinator.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise NodeStartError(f"{kit.path / 'kit.toml'}: coordinator address '{kit.coordinator}' is not HOST:PORT") from None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise NodeStartError(
            f"cannot reach the coordinator at {kit.coordinator}: {err.strerror or err}. "
            "Is `fedcare coordinator start` running there, and is the port open from this hospital?"
        ) from None
    with sock:
        if insecure_dev:
            return
        context = ssl.create_default_context(cafile=str(kit.ca_cert))
        if client_key is not None:
            context.load_cert_chain(certfile=str(kit.node_cert), keyfile=str(client_key))
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                tls.do_handshake()
        except ssl.SSLCertVerificationError as err:
            raise NodeStartError(
                f"the server at {kit.coordinator} is not this study's coordinator: its TLS certificate does not "
                f"verify against the study CA in {kit.ca_cert} ({err.verify_message})"
            ) from None
        except (ssl.SSLError, OSError) as err:
            raise NodeStartError(f"TLS handshake with the coordinator at {kit.coordinator} failed: {err}") from None


def supernode_command(settings: NodeSettings, local_port: int, process_settings: Path) -> list[str]:
    kit = settings.kit
    node_config = " ".join(
        f'{key}="{value}"'
        for key, value in (
            ("data", settings.data),
            ("study", kit.study_file),
            ("state-dir", settings.state_dir),
            ("site", kit.name),
        )
    )
    if kit.site_file.is_file():
        node_config += f' policy="{kit.site_file}"'
    cmd = [
        sys.executable, "-m", "deploy.supernode", "--fedcare-settings", str(process_settings), "--",
        "--superlink", kit.coordinator,
        "--port", str(local_port),
        "--node-config", node_config,
    ]  # no --max-retries / --max-wait-time: the node rides out a coordinator restart until it is stopped
    if settings.insecure_dev:
        return cmd + ["--insecure"]
    return cmd + ["--root-certificates", str(kit.ca_cert), "--auth-supernode-private-key", str(kit.node_key)]


def prepare_process(settings: NodeSettings, approval: AppApproval) -> Path:
    """Write what the SuperNode process needs (approved Apps, the client certificate and its key as PEM)."""
    state = settings.state_dir
    tls_key = state / "node-tls.key"
    certificate = ""
    if not settings.insecure_dev:
        if not settings.kit.node_cert.is_file():
            raise NodeStartError(f"{settings.kit.node_cert}: missing. The coordinator's edge admits only nodes with a TLS "
                                 "client certificate: ask the coordinator for nodes/<name>.crt (`fedcare coordinator "
                                 "add-node` issues it) and save it as node.crt in this kit")
        tls_key.unlink(missing_ok=True)
        write_secret(tls_key, node_tls_key(settings.kit.node_key.read_bytes()))
        certificate = str(settings.kit.node_cert)
    path = state / "supernode-settings.json"
    path.unlink(missing_ok=True)
    NodeProcessSettings(approved_apps=approval.hashes, client_certificate=certificate,
                        client_key=str(tls_key) if certificate else "", poll_seconds=POLL_SECONDS).write(path)
    return path


# What the SuperNode prints, and what we tell hospital IT (True: the node cannot go on).
DIAGNOSES = (
    ("Failed to activate SuperNode", True, "the coordinator rejected this node: its public key is not registered there. "
     "Ask the coordinator to run `fedcare coordinator add-node --name NAME --public-key node.pub`."),
    ("CERTIFICATE_VERIFY_FAILED", True, "TLS verification failed: the coordinator's certificate is not signed by this kit's study CA."),
    ("SSL/TLS handshake error", True, "the TLS handshake with the coordinator failed: is node.crt this node's current "
     "certificate from the coordinator?"),
    ("421 Misdirected", True, "the coordinator's edge refused this node's TLS client certificate: it is not the certificate of a "
     "node the coordinator accepts. Ask the coordinator to run `fedcare coordinator add-node` and use the node.crt it issues."),
    ("Unable to parse the private key", True, "node.key is not an OpenSSH private key; recreate it with `fedcare node keygen`."),
    ("fedcare: refused run", False, None),
)


class _Watcher:
    """Turns the SuperNode's output into the few lines hospital IT needs."""

    def __init__(self, name: str, coordinator: str) -> None:
        self.name, self.coordinator = name, coordinator
        self.fatal: str | None = None
        self._lost_since: float | None = None
        self._last_notice = 0.0

    def line(self, line: str) -> None:
        if "SuperNode ID" in line:
            print(f"node '{self.name}' connected to {self.coordinator} ({line.strip().split()[-1]})", flush=True)
        elif "Connection attempt failed" in line:
            now = time.monotonic()
            if self._lost_since is None:
                self._lost_since = now
            if now - self._last_notice >= RECONNECT_NOTICE_SECONDS or self._last_notice == 0.0:
                self._last_notice = now
                print(f"node '{self.name}': coordinator {self.coordinator} unreachable for {now - self._lost_since:.0f} s; "
                      "retrying with back-off until it answers or this node is stopped", flush=True)
        elif "Connection successful after" in line and self._lost_since is not None:
            print(f"node '{self.name}': reconnected to {self.coordinator} after {time.monotonic() - self._lost_since:.0f} s",
                  flush=True)
            self._lost_since, self._last_notice = None, 0.0
        for needle, fatal, message in DIAGNOSES:
            if needle in line:
                if fatal:
                    self.fatal = message
                    print(f"fedcare: error: {message}", file=sys.stderr, flush=True)
                else:
                    print(f"fedcare: warning: {line.strip()[line.find('fedcare:') + 9:]}", file=sys.stderr, flush=True)


def run_node(settings: NodeSettings, process_settings: Path) -> int:
    """Start the SuperNode in the foreground; returns its exit status (0 after a clean stop)."""
    if settings.insecure_dev:
        warn_insecure(f"node '{settings.kit.name}' started with --insecure-dev")
    log_path = settings.state_dir / "supernode.log"
    home = settings.state_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    cmd = supernode_command(settings, free_port(), process_settings)
    stopping: list[int] = []
    with log_path.open("a", encoding="utf-8") as log:
        # In this command's process group: whoever stops the group (a terminal, a service manager, a
        # test) stops the SuperNode and its SuperExec / ClientApp children with it.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env(home))

        def stop(signum: int = signal.SIGTERM, _frame: object = None) -> None:
            stopping.append(signum)  # the loop below ends within 0.5 s and stops the group

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        watcher = _Watcher(settings.kit.name, settings.kit.coordinator)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_forward_lines, args=(proc, lines), daemon=True).start()
        try:
            # Until a stop, a fatal diagnosis, or the SuperNode's exit (its children may keep the pipe open).
            while watcher.fatal is None and not stopping:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    if proc.poll() is not None:
                        break
                    continue
                if line is None:
                    break
                log.write(line)
                log.flush()
                watcher.line(line)
        finally:
            status = _stop_group(proc)
    if stopping:
        print(f"node '{settings.kit.name}' stopped", flush=True)
        return 0
    if watcher.fatal is not None:
        return 3
    if status != 0:
        print(f"fedcare: error: the SuperNode exited with status {status}; see {log_path}", file=sys.stderr, flush=True)
    return status


def _forward_lines(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal the SuperNode and, when this command leads its process group (a terminal job, a service,
    a test), the whole group: the SuperNode's SuperExec and ClientApp children too (this command's own
    handler only notes the stop)."""
    try:
        if os.getpgid(0) == os.getpid():
            previous = signal.signal(signum, signal.SIG_IGN)  # this command is in the group too
            os.killpg(0, signum)
            signal.signal(signum, previous)
        elif proc.poll() is None:
            proc.send_signal(signum)
    except ProcessLookupError:
        pass


def _stop_group(proc: subprocess.Popen) -> int:
    """SIGTERM the SuperNode (and its children), SIGKILL it after STOP_TIMEOUT; the SuperNode's status."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def start_node(settings: NodeSettings) -> int:
    started = time.monotonic()
    if settings.kit.site_file.is_file():
        policy = load_site_policy(settings.kit.site_file)  # a broken policy stops here, not mid-round
        print(f"site policy: {policy.describe()}", flush=True)
    try:
        entries = PrivacyLedger(settings.state_dir).entries()
    except LedgerTampered as err:
        raise NodeStartError(
            f"privacy ledger failed verification: {err}. Training is blocked: restore the ledger from a backup, "
            f"or accept it with `fedcare privacy reseal --kit {settings.kit.path} --reason TEXT`"
        ) from None
    print(f"privacy ledger: {len(entries)} entries verified ({settings.state_dir / 'ledger.jsonl'})", flush=True)
    print(check_site_data(settings), flush=True)
    approval = site_approval(settings.kit)
    print(f"approved Apps: {approval.describe()}", flush=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    process_settings = prepare_process(settings, approval)
    check_coordinator(settings.kit, settings.insecure_dev,
                      client_key=None if settings.insecure_dev else settings.state_dir / "node-tls.key")
    print(f"coordinator {settings.kit.coordinator} reachable ({time.monotonic() - started:.1f} s); starting the node", flush=True)
    return run_node(settings, process_settings)
