"""`fedcare serve` and its token management (issue 6); `fedcare report`, the site's own study report.

    fedcare serve --package PKG --kit DIR [--host 127.0.0.1] [--port 8443] [--tls-cert F --tls-key F]
                  [--provider NAME] [--max-connections N] [--header-timeout S] [--body-timeout S]
                  [--keep-alive-timeout S]
    fedcare serve token add --kit DIR --name NAME [--scope analyze] [--scope models]
    fedcare serve token revoke --kit DIR --name NAME
    fedcare serve token list --kit DIR
    fedcare report --package PKG --kit DIR --out DIR [--data D] [--state-dir D] [--policy site.toml]
    fedcare audit verify (--kit DIR | --state-dir DIR) [--log serve|coordinator]

Kits are handled here (the commands layer): the service itself (`inference.service`) takes a
verified package and a state directory. Every refusal is a `FedcareError`: `cli.main` prints it as
one line on stderr (`fedcare: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli import add_command
from deploy.kits import load_kit
from export.commands import verify_for_kit

if TYPE_CHECKING:
    from deploy.kits import CoordinatorKit, HospitalKit
    from inference.service import Service

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8443


def _serve_error(message: str) -> Exception:
    from inference.model import ServeError

    return ServeError(message)


def state_dir(kit: CoordinatorKit | HospitalKit) -> Path:
    """Where the service keeps its tokens and audit log: the coordinator kit's state/, or site.toml's state_dir."""
    from deploy.kits import CoordinatorKit, read_site_settings

    return kit.state_dir if isinstance(kit, CoordinatorKit) else Path(read_site_settings(kit)["state_dir"])


def load_service(pkg_dir: str | Path, kit_dir: str | Path, provider: str | None = None,
                 default_model: str | None = None) -> Service:
    """The service over `pkg_dir`, verified under the kit's package signing key and for the kit's study."""
    from inference.service import build_service

    kit = load_kit(kit_dir)
    state = state_dir(kit)
    package, _ = verify_for_kit(Path(pkg_dir), kit)
    return build_service(package, state, provider=provider, default_model=default_model)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        import os

        reason = os.strerror(err.errno) if err.errno else str(err)
        raise _serve_error(f"--host/--port: cannot listen on {host}:{port} ({reason})") from None


def _check_tls(cert: Path | None, key: Path | None) -> None:
    import ssl

    from fedcare.files import check_private_permissions

    if (cert is None) != (key is None):
        raise _serve_error("--tls-cert and --tls-key go together")
    if cert is None:
        return
    if not cert.is_file():
        raise _serve_error(f"--tls-cert: {cert} not found")
    check_private_permissions(key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as err:
        raise _serve_error(f"--tls-cert/--tls-key: not a usable certificate and key ({err.__class__.__name__})") from None


def _serve(args: argparse.Namespace) -> int:
    if args.package is None or args.kit is None:
        raise _serve_error("serve: --package and --kit are required (or use `fedcare serve token ...`)")
    if not 1 <= args.port <= 65535:
        raise _serve_error(f"--port: {args.port} is not a TCP port")
    if args.tls_cert is None and args.tls_key is None:
        from deploy.serving_cert import kit_serving_certificate

        args.tls_cert, args.tls_key = kit_serving_certificate(args.kit) or (None, None)  # `fedcare serve cert`'s
    _check_tls(args.tls_cert, args.tls_key)
    if args.tls_cert is None and not _is_loopback(args.host):
        raise _serve_error(f"--host {args.host}: refusing to serve patient data over plain HTTP on a network interface; "
                           "give --tls-cert and --tls-key, or bind 127.0.0.1 behind a TLS proxy")

    from inference.server import serve_limits
    from inference.tokens import read_tokens

    limits = serve_limits(args.max_connections, args.header_timeout, args.body_timeout, args.keep_alive_timeout)
    sock = _bind(args.host, args.port)
    try:
        service = load_service(args.package, args.kit, provider=args.provider, default_model=args.model)
        read_tokens(service.state_dir)  # an unreadable token file is a startup error, not a silent 401
    except BaseException:
        sock.close()
        raise

    from inference.app import create_app
    from inference.server import run_server

    app = create_app(service)
    for note in service.models.notes:
        print(f"fedcare serve: note: {note}", flush=True)
    print(f"fedcare serve: {service.startup_line()}", flush=True)
    if service.tokens.count == 0:
        print("fedcare serve: note: no API tokens yet; add one with `fedcare serve token add --kit ... --name ...`",
              flush=True)
    scheme = "https" if args.tls_cert else "http"
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fedcare serve: limits: {limits.describe()}", flush=True)
    print(f"fedcare serve: listening on {scheme}://{shown_host}:{args.port} "
          f"(audit log {service.audit.path}); Ctrl-C or SIGTERM stops", flush=True)
    try:
        run_server(app, sock, limits, tls_cert=str(args.tls_cert) if args.tls_cert else None,
                   tls_key=str(args.tls_key) if args.tls_key else None)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    finally:
        service.audit.close()
    print("fedcare serve: stopped", flush=True)
    return 0


def _kit_state_dir(kit: Path) -> Path:
    return state_dir(load_kit(kit))


def _token_add(args: argparse.Namespace) -> int:
    from inference.tokens import TOKENS_FILE, add_token

    state = _kit_state_dir(args.kit)
    token, entry = add_token(state, args.name, args.scope)
    print(f"token '{entry.name}' (scopes: {', '.join(sorted(entry.scopes))}) — shown once; "
          f"{state / TOKENS_FILE} keeps only its SHA-256:", file=sys.stderr, flush=True)
    print(token, flush=True)
    return 0


def _cert(args: argparse.Namespace) -> int:
    from deploy.serving_cert import issue_serving_certificate

    issued = issue_serving_certificate(args.kit, args.host.split(","))
    if issued.created_ca:
        print(f"created this kit's serving CA: {issued.ca_cert} (its key serve-ca.key, 0600, stays in the kit)")
    print(f"serving certificate for {args.host}: {issued.cert} (key {issued.key}, 0600); `fedcare serve --kit "
          f"{args.kit}` uses it. Give the EHR gateway {issued.ca_cert} to trust.")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from inference.tokens import revoke_token

    revoke_token(_kit_state_dir(args.kit), args.name)
    print(f"token '{args.name}' revoked (a running service refuses it from its next request)")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from inference.tokens import read_tokens

    entries = read_tokens(_kit_state_dir(args.kit))
    if not entries:
        print("no tokens")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  scopes: {','.join(sorted(e.scopes)):<14}  created {e.created}")
    return 0


def _site_report(args: argparse.Namespace) -> int:
    """`fedcare report`: this hospital's own report of a study (computed here, written to --out only)."""
    from client.data import load_site
    from deploy.kits import load_hospital_kit, read_site_settings
    from inference.site_report import SiteReportError, site_report, write_site_report
    from privacy.ledger import PrivacyLedger
    from privacy.policy import policy_for_site

    if not args.package.is_dir():
        raise SiteReportError(f"--package: {args.package} is not a package directory")
    kit = load_hospital_kit(args.kit, need_keys=False)
    package, _ = verify_for_kit(args.package, kit)
    settings = read_site_settings(kit)
    data_dir = args.data or settings.get("data")
    if data_dir is None:
        raise SiteReportError(f"--data: not given and {kit.site_file} names no [site] data directory")
    state = args.state_dir or Path(settings["state_dir"])
    if args.state_dir is not None and not state.is_dir():
        raise SiteReportError(f"--state-dir: {state} is not a directory")
    policy_file = args.policy or (kit.site_file if kit.site_file.exists() else None)
    policy = policy_for_site(policy_file)
    ledger = PrivacyLedger(state)
    entries = ledger.entries()  # verified; a tampered ledger is LedgerTampered (exit 3)
    data = load_site(package.study, data_dir)
    report = site_report(package, data, site=kit.name, data_source=data_dir, entries=entries,
                         ledger_path=ledger.path, policy=policy)
    json_path, html_path = write_site_report(report, args.out)
    final, row = report["final"], report["sites"][0]
    print(f"{kit.name}: study {report['study']} ({report['study_hash'][:12]}…) on {final['test_rows']} local test rows: "
          f"AUC {final['auc']:.4f}, accuracy {final['accuracy']:.4f}, balanced accuracy "
          f"{final['balanced_accuracy']:.4f}, Brier {final['brier']:.4f}")
    print(f"privacy: ε {row['epsilon']:.4f} spent on this study in {row['rounds_trained']} rounds "
          f"(policy ≤ {policy.max_epsilon_per_study:g} per study; study target {row['epsilon_target']:g})")
    print(f"report: {html_path} and {json_path} (computed here; nothing was sent)")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    """`fedcare audit verify`: one OK line per log, or the first problem as a FedcareError (exit 3)."""
    from deploy.audit import HEAD, LOG, verify_coordinator_log
    from deploy.kits import CoordinatorKit
    from fedcare.audit_chain import AuditChainError
    from inference.audit_verify import serve_log_present, verify_serve_log

    if (args.kit is None) == (args.state_dir is None):
        raise AuditChainError("audit verify: give --kit or --state-dir (one of them)", exit_code=2)
    kit = load_kit(args.kit) if args.kit is not None else None
    state = Path(state_dir(kit) if kit is not None else args.state_dir)
    if not Path(state).is_dir():
        raise AuditChainError(f"{'--kit' if kit else '--state-dir'}: {state} is not a state directory", exit_code=2)
    coordinator = isinstance(kit, CoordinatorKit) or (kit is None and ((state / LOG).exists() or (state / HEAD).exists()))
    logs = [args.log] if args.log else [*(["coordinator"] if coordinator else []),
                                        *(["serve"] if serve_log_present(state) or not coordinator else [])]
    for log in logs:
        report = verify_coordinator_log(state) if log == "coordinator" else verify_serve_log(state)
        print(report.line(), flush=True)
    return 0


def _serve_audited(args: argparse.Namespace) -> int:
    """`fedcare serve` with its --audit-* settings (over FEDCARE_SERVE_AUDIT_*) in force while the service is built."""
    from inference.audit import COMMAND_SETTINGS, AuditSettings

    settings = AuditSettings.resolve({"max_bytes": args.audit_max_size, "max_age": args.audit_max_age,
                                      "keep": args.audit_keep, "max_total_bytes": args.audit_max_total})
    reset = COMMAND_SETTINGS.set(settings)
    try:
        return _serve(args)
    finally:
        COMMAND_SETTINGS.reset(reset)


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `fedcare` parser."""
    from inference.tokens import SCOPES

    audit = add_command(
        commands, "audit",
        description="Audit logs are hash-chained; `verify` walks every file oldest to newest and checks every line's "
                    "MAC, the links between lines and files, deletions by the disk cap and the head. One line: OK "
                    "with counts, or the file and line and what is wrong (exit 3).")
    audit_cmds = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_cmds.add_parser("verify", help="check an audit log's hash chain")
    verify.add_argument("--kit", type=Path, default=None,
                        help="a hospital kit (the service's log) or the coordinator's kit (its operator log, and the "
                             "service's if it runs one)")
    verify.add_argument("--state-dir", type=Path, default=None, help="or the state directory holding the logs")
    verify.add_argument("--log", choices=("serve", "coordinator"), default=None,
                        help="only this log (default: every log the kit or directory has)")
    verify.set_defaults(func=_audit_verify)

    report = add_command(
        commands, "report",
        description="At a hospital: score the verified model package on this site's own test split and set its "
                    "privacy ledger against its policy; writes report.json and report.html to --out, sends nothing.",
    )
    report.add_argument("--package", type=Path, required=True, help="the model package directory this site serves")
    report.add_argument("--kit", type=Path, required=True,
                        help="this hospital's kit (coordinator-signing.pub, study.toml, site.toml)")
    report.add_argument("--data", type=Path, default=None, help="the site's export directory (default: site.toml)")
    report.add_argument("--state-dir", type=Path, default=None,
                        help="the site state directory holding the ledger (default: site.toml's state_dir)")
    report.add_argument("--policy", type=Path, default=None,
                        help="the site.toml holding [policy] (default: the kit's site.toml)")
    report.add_argument("--out", type=Path, required=True, help="local folder for report.json and report.html")
    report.set_defaults(func=_site_report)

    serve = add_command(
        commands, "serve",
        description="Serve a verified model package: POST /v1/analyze, GET /v1/models, /healthz, /metrics, /openapi.json.",
    )
    serve.add_argument("--package", type=Path, default=None,
                       help="the model package directory, or PKG.enc encrypted for this site (decrypted in memory "
                            "only, with the kit's package.key)")
    serve.add_argument("--kit", type=Path, default=None, help="this hospital's kit (coordinator-signing.pub, state/)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM); required off loopback")
    serve.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM, mode 0600)")
    serve.add_argument("--model", default=None, metavar="NAME",
                       help="the model a request that names none is scored by (fp32, int8, a16w8); default: the "
                            "fastest on this machine within |Δ risk| <= 0.01 of fp32, measured at start")
    serve.add_argument("--provider", default=None,
                       help="ONNX Runtime execution provider (default: the best available of QNN, OpenVINO, "
                            "CoreML, DirectML, CPU)")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections at most (default 4096, and always below the open-file limit); past it "
                            "idle connections are closed first, then new ones get 503 with Retry-After")
    serve.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                       help="a request head must arrive within this (default 10); slower or silent connections close")
    serve.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                       help="a request body must arrive within this after its head (default 10)")
    serve.add_argument("--keep-alive-timeout", type=float, default=None, metavar="SECONDS",
                       help="an idle keep-alive connection closes after this (default 10)")
    serve.add_argument("--audit-max-size", default=None, metavar="SIZE",
                       help="rotate the audit log at this size (K, M, G; default 64M; env FEDCARE_SERVE_AUDIT_MAX_SIZE)")
    serve.add_argument("--audit-max-age", default=None, metavar="AGE",
                       help="... or when its first line is this old (s, m, h, d; default 24h; env FEDCARE_SERVE_AUDIT_MAX_AGE)")
    serve.add_argument("--audit-keep", default=None, metavar="N",
                       help="rotated audit files kept, .1 to .N (default 30; env FEDCARE_SERVE_AUDIT_KEEP)")
    serve.add_argument("--audit-max-total", default=None, metavar="SIZE",
                       help="cap on the audit log on disk, oldest rotated files deleted first (default 2G; "
                            "env FEDCARE_SERVE_AUDIT_MAX_TOTAL)")
    serve.set_defaults(func=_serve_audited)

    serve_cmds = serve.add_subparsers(dest="serve_command", required=False, metavar="{token,cert}")
    cert = serve_cmds.add_parser(
        "cert", help="issue this hospital's serving TLS certificate from a serving CA local to its kit",
        description="The API's TLS identity is the hospital's own: a serving CA kept in the kit (serve-ca.crt, made "
                    "once) issues serve.crt/serve.key for the names the EHR gateway calls; fedcare serve uses them "
                    "when no --tls-cert is given. With the hospital's own PKI instead, pass --tls-cert/--tls-key.")
    cert.add_argument("--kit", type=Path, required=True, help="the hospital kit folder")
    cert.add_argument("--host", required=True, help="host names or IP addresses, comma-separated")
    cert.set_defaults(func=_cert)
    token = serve_cmds.add_parser("token", help="API tokens of the service")
    token_cmds = token.add_subparsers(dest="token_command", required=True)

    add = token_cmds.add_parser("add", help="create a token and print it once (only its hash is stored)")
    add.add_argument("--kit", type=Path, required=True, help="the hospital kit folder")
    add.add_argument("--name", required=True, help="who or what uses the token (shown in the audit log)")
    add.add_argument("--scope", action="append", choices=SCOPES, default=None,
                     help="analyze (POST /v1/analyze) and/or models (GET /v1/models); repeatable; default analyze")
    add.set_defaults(func=_token_add)

    revoke = token_cmds.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("--kit", type=Path, required=True, help="the hospital kit folder")
    revoke.add_argument("--name", required=True, help="the token's name")
    revoke.set_defaults(func=_token_revoke)

    listing = token_cmds.add_parser("list", help="list token names and scopes (never the tokens)")
    listing.add_argument("--kit", type=Path, required=True, help="the hospital kit folder")
    listing.set_defaults(func=_token_list)
