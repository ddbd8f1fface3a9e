"""The SuperNode process a fedcare site runs: Flower's own `flower-supernode`, with three site-owned
controls installed before it connects.

1. **App approval.** Flower would execute whatever App (FAB) a run ships. Here a run's FAB is
   hashed when it arrives and, unless `deploy/approval.py` approves that hash, every message of the
   run is answered with an error reply carrying a fedcare `Refusal` (kind APP): the FAB is neither
   stored nor started, so none of its code runs, nothing is trained and nothing is charged.
2. **TLS client certificate.** The coordinator's network edge admits only nodes that present a
   certificate from the coordinator's node CA; Flower 1.42's SuperNode has no option for one, so its
   Fleet connection's TLS context is built here with the node's certificate and key.
3. **Shorter waits.** The SuperNode sleeps a fixed 3 s between polls when idle and checks for the
   ClientApp's reply every 0.5 s; both are set from `NodeProcessSettings.poll_seconds` (each poll is one
   HTTPS request to the coordinator: 1 / poll_seconds requests per second per idle node). Its heartbeat
   interval (30 s: the coordinator marks a node offline only after 60 s) is `heartbeat_seconds`, so
   `fedcare status` shows a lost node within 2 × that (one more request every ~0.8 × (interval - 5) s).

4. **Warm ClientApps.** The SuperNode starts `flower-superexec` by name; here it starts
   `deploy/superexec.py` instead, Flower's SuperExec with torch and Opacus loaded once and each
   ClientApp task forked from it (`warm_clientapps`; the App itself still loads from the run's FAB).

Each change replaces one named attribute of Flower's modules in this process only (no installed file
is edited), and only for the Flower version it was written against: `check_flower_version` refuses any
other, and `tests/test_supernode_process.py` fails on an upgrade so the changes are re-verified.

Run as `python -m deploy.supernode --fedcare-settings FILE -- <flower-supernode arguments>` by
`deploy/node.py`; FILE is a `NodeProcessSettings` JSON document the node writes at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLOWER_VERSION = "1.42.0"
IDLE_WAIT = 3  # flwr/supernode/start_client_internal.py: `time.sleep(3)` when no message arrived
REPLY_WAIT = 0.5  # same file: `time.sleep(0.5)` while waiting for the ClientApp's reply / its objects


@dataclass(frozen=True)
class NodeProcessSettings:
    """What `deploy/node.py` hands to the SuperNode process."""

    approved_apps: dict[str, str]  # FAB SHA-256 -> why it is approved
    client_certificate: str = ""  # PEM; empty: no client certificate (insecure dev mode)
    client_key: str = ""  # PEM private key file (0600)
    poll_seconds: float = 0.5
    warm_clientapps: bool = True
    heartbeat_seconds: float = 10.0  # the SuperLink refuses less (HEARTBEAT_MIN_INTERVAL)

    def write(self, path: Path) -> None:
        from fedcare.files import write_secret

        write_secret(path, json.dumps(dataclasses.asdict(self), indent=2).encode())

    @classmethod
    def read(cls, path: Path) -> NodeProcessSettings:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the version these changes were written and tested against."""


def check_flower_version() -> None:
    import flwr

    if flwr.__version__ != FLOWER_VERSION:
        raise FlowerVersionError(
            f"fedcare's SuperNode controls are written for flwr {FLOWER_VERSION}, found {flwr.__version__}; "
            f"install the pinned version (requirements.lock)"
        )


class _AppNotApproved(Exception):
    def __init__(self, fab_hash: str, run_id: int) -> None:
        super().__init__(fab_hash)
        self.fab_hash = fab_hash
        self.run_id = run_id


def app_refusal(fab_hash: str):
    """The refusal a site sends for an App it did not approve (no per-site value in it)."""
    from fedcare.protocol import Refusal, RefusalKind

    return Refusal(RefusalKind.APP, f"this site runs only Apps it approved; the run's App {fab_hash[:16]}… is not "
                                    "one of them (its code was not run; nothing was trained or charged)")


def install_app_approval(approved: dict[str, str]) -> None:
    """Wrap the SuperNode's pull step so a run's FAB is checked before it is stored or started."""
    from logging import ERROR

    from flwr.app import Error, Message
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as sci

    from deploy.approval import fab_hash
    from fedcare.protocol import REFUSAL_CODE

    original = sci._pull_and_store_message

    def pull_and_store_approved(**kwargs: Any) -> int | None:
        received: list[Any] = []
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def remembering_receive():
            got = receive()
            received[:] = [got[0]] if got is not None else []
            return got

        def approved_fab(announced_hash: str, run_id: int):
            fab = get_fab(announced_hash, run_id)
            content_hash = fab_hash(fab.content)  # never the coordinator's word for it
            if content_hash not in approved:
                raise _AppNotApproved(content_hash, run_id)
            return fab

        try:
            return original(**{**kwargs, "receive": remembering_receive, "get_fab": approved_fab})
        except _AppNotApproved as refused:
            log(ERROR, "fedcare: refused run %s: its App %s is not approved by this site (approved: %s); "
                        "none of its code was run", refused.run_id, refused.fab_hash,
                    ", ".join(f"{h[:12]}… ({why})" for h, why in approved.items()))
            reply = Message(Error(REFUSAL_CODE, app_refusal(refused.fab_hash).reason()), reply_to=received[0])
            sci._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return refused.run_id

    sci._pull_and_store_message = pull_and_store_approved


def install_client_certificate(certificate: str, key: str) -> None:
    """Make the SuperNode's Fleet connection present this TLS client certificate."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    def from_server_address(cls, server_address, insecure, root_certificates, interceptors, *, retry_invoker=None):
        if insecure:
            raise ssl.SSLError("a TLS client certificate needs TLS; the SuperNode was started with --insecure")
        if isinstance(root_certificates, bytes):
            context = ssl.create_default_context(cadata=root_certificates.decode("ascii"))
        else:
            context = ssl.create_default_context(cafile=root_certificates)
        context.load_cert_chain(certfile=certificate, keyfile=key)
        return cls(f"https://{server_address}", interceptors=interceptors, verify=context, retry_invoker=retry_invoker)

    FleetHttpClient.from_server_address = classmethod(from_server_address)


class _Waits:
    """The `time` module as `start_client_internal` sees it: its two fixed waits replaced."""

    def __init__(self, waits: dict[float, float]) -> None:
        self._waits = waits

    def sleep(self, seconds: float) -> None:
        time.sleep(self._waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install_waits(poll_seconds: float, heartbeat_seconds: float) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode import start_client_internal as sci

    sci.time = _Waits({IDLE_WAIT: poll_seconds, REPLY_WAIT: min(REPLY_WAIT, poll_seconds / 2)})
    # the interval the node announces (the coordinator's patience is 2 x it) and the one it keeps
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_seconds
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_seconds


def install_warm_superexec() -> None:
    """Start `deploy/superexec.py` where the SuperNode would start `flower-superexec`."""
    import subprocess

    from flwr.supernode import start_client_internal as sci

    class _Subprocess:
        @staticmethod
        def Popen(args: list[str], **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - subprocess' name
            if args and args[0] == "flower-superexec":
                args = [sys.executable, "-m", "deploy.superexec", *args[1:]]
            return subprocess.Popen(args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(subprocess, name)

    sci.subprocess = _Subprocess()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--fedcare-settings":
        sys.exit("usage: python -m deploy.supernode --fedcare-settings FILE -- FLOWER-SUPERNODE-ARGS")
    settings = NodeProcessSettings.read(Path(args[1]))
    flower_args = args[3:] if args[2:3] == ["--"] else args[2:]
    try:
        check_flower_version()
    except FlowerVersionError as err:
        sys.exit(f"fedcare: error: {err}")
    install_app_approval(settings.approved_apps)
    if settings.client_certificate:
        install_client_certificate(settings.client_certificate, settings.client_key)
    install_waits(settings.poll_seconds, settings.heartbeat_seconds)
    if settings.warm_clientapps:
        install_warm_superexec()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
