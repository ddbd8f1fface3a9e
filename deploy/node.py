"""`fedcare node start`: check the site, then run this hospital's Flower SuperNode.

Before anything connects: the site's data is validated against the study spec (a fatal
problem stops here with the report), and a TLS handshake with the coordinator, verified
against the study CA from the kit, tells apart "unreachable" from "not the study's
coordinator". The SuperNode then runs with bounded retries; its output is watched so a
rejected key or a failed TLS check becomes one plain sentence within seconds, not a
silent retry loop.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.check import check_site_export
from deploy.flower import flower_command, flower_env, free_port, warn_insecure
from deploy.kits import HospitalKit, read_site_settings
from fedcare.errors import FedcareError
from fedcare.study import load_study
from privacy.ledger import LedgerTampered, PrivacyLedger
from privacy.policy import load_site_policy

CONNECT_TIMEOUT = 10.0
MAX_RETRIES = 5
MAX_WAIT_SECONDS = 30


class NodeStartError(FedcareError, RuntimeError):
    """The node cannot join; the message says why and what to do."""


@dataclass(frozen=True)
class NodeSettings:
    kit: HospitalKit
    data: Path
    state_dir: Path
    insecure_dev: bool = False


def resolve_settings(kit: HospitalKit, data: Path | None, insecure_dev: bool) -> NodeSettings:
    site = read_site_settings(kit)
    chosen = data or (Path(site["data"]) if "data" in site else None)
    if chosen is None:
        raise NodeStartError(f"no data directory: pass --data or set [site] data in {kit.site_file}")
    return NodeSettings(kit, Path(chosen).resolve(), Path(site["state_dir"]), insecure_dev)


def check_site_data(settings: NodeSettings) -> str:
    """Validate the site's files against the study (`fedcare data check`); raises on fatal problems."""
    study = load_study(settings.kit.study_file)
    check = check_site_export(study, settings.data)
    if check.fatal:
        print(check.text, file=sys.stderr, flush=True)  # the whole report (counts, reasons, lines), then the error
        raise NodeStartError(f"site data does not fit the study '{study.name}' (report above)")
    return check.text


def check_coordinator(kit: HospitalKit, insecure_dev: bool, timeout: float = CONNECT_TIMEOUT) -> None:
    """TCP + TLS handshake with the coordinator, verified against the study CA."""
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


def supernode_command(settings: NodeSettings, local_port: int) -> list[str]:
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
        flower_command("flower-supernode"),
        "--superlink", kit.coordinator,
        "--port", str(local_port),
        "--max-retries", str(MAX_RETRIES),
        "--max-wait-time", str(MAX_WAIT_SECONDS),
        "--node-config", node_config,
    ]
    if settings.insecure_dev:
        return cmd + ["--insecure"]
    return cmd + ["--root-certificates", str(kit.ca_cert), "--auth-supernode-private-key", str(kit.node_key)]


# What the SuperNode prints, and what we tell hospital IT.
DIAGNOSES = (
    ("Failed to activate SuperNode", "the coordinator rejected this node: its public key is not registered there. "
     "Ask the coordinator to run `fedcare coordinator add-node --name NAME --public-key node.pub`."),
    ("CERTIFICATE_VERIFY_FAILED", "TLS verification failed: the coordinator's certificate is not signed by this kit's study CA."),
    ("Giving up reconnection", "the coordinator stopped answering and the node gave up after bounded retries."),
    ("Unable to parse the private key", "node.key is not an OpenSSH private key; recreate it with `fedcare node keygen`."),
)


def run_node(settings: NodeSettings) -> int:
    """Start the SuperNode in the foreground; returns its exit status (0 after a clean stop)."""
    if settings.insecure_dev:
        warn_insecure(f"node '{settings.kit.name}' started with --insecure-dev")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.state_dir / "supernode.log"
    home = settings.state_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    cmd = supernode_command(settings, free_port())
    with log_path.open("a", encoding="utf-8") as log:
        # Same process group as this command: a signal to the group (Ctrl-C, a service manager)
        # reaches the SuperNode and its SuperExec / ClientApp children directly.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env(home))

        def stop_group(signum: int = signal.SIGTERM, _frame: object = None) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        signal.signal(signal.SIGTERM, stop_group)
        signal.signal(signal.SIGINT, stop_group)
        diagnosis = None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if "SuperNode ID" in line:
                    print(f"node '{settings.kit.name}' connected to {settings.kit.coordinator} ({line.strip().split()[-1]})", flush=True)
                diagnosis = next((message for needle, message in DIAGNOSES if needle in line), None)
                if diagnosis is not None:
                    print(f"fedcare: error: {diagnosis}", file=sys.stderr, flush=True)
                    break
        finally:
            stop_group()
            status = proc.wait()
    if diagnosis is not None:
        return 3
    if status != 0:
        print(f"fedcare: error: the SuperNode exited with status {status}; see {log_path}", file=sys.stderr, flush=True)
    return status


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
    check_coordinator(settings.kit, settings.insecure_dev)
    print(f"coordinator {settings.kit.coordinator} reachable ({time.monotonic() - started:.1f} s); starting the node", flush=True)
    return run_node(settings)
