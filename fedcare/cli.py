"""The `fedcare` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcare.runtime import quiet_flower_environment


def _simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import SimulationOptions, simulate

    report = simulate(
        SimulationOptions(
            hospitals=args.hospitals,
            rounds=args.rounds,
            epsilon=args.epsilon,
            study=args.study,
            seed=args.seed,
            out=args.out,
            size_scale=args.size_scale,
            verbose=args.verbose,
            data_format=args.format,
        )
    )
    out = Path(args.out).resolve()
    print()
    print((out / "summary.txt").read_text(encoding="utf-8"), end="")
    print(f"\nreport: {out / 'report.json'}")
    return 0


def _study_check(args: argparse.Namespace) -> int:
    from fedcare.study import load_study

    study = load_study(args.study)
    print(f"{args.study}: valid study '{study.name}', {len(study.features)} features, hash {study.hash}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from client.check import check_site_export
    from fedcare.study import load_study

    check = check_site_export(load_study(args.study), args.data)
    print(check.text, file=sys.stderr if check.fatal else sys.stdout)
    return 2 if check.fatal else 0


def _provision(args: argparse.Namespace) -> int:
    from fedcare.kits import provision

    hosts = [h.strip() for h in args.coordinator_host.split(",")]
    hospitals = [h.strip() for h in args.hospitals.split(",") if h.strip()]
    kits = provision(args.study, hosts, hospitals, args.out, port=args.port)
    print(f"study CA: {kits.pop('ca')}  (keep ca.key offline; it is not part of any kit)")
    for party, path in kits.items():
        print(f"kit for {party}: {path}")
    print("send each hospital its own folder; private keys are mode 0600")
    return 0


def _node_keygen(args: argparse.Namespace) -> int:
    from fedcare.kits import node_keygen
    from fedcare.pki import fingerprint

    private, public = node_keygen(args.out)
    print(f"private key: {private} (0600, stays at this hospital)")
    print(f"public key:  {public} (send to the coordinator; fingerprint {fingerprint(public.read_bytes())})")
    return 0


def _coordinator_add_node(args: argparse.Namespace) -> int:
    from fedcare.kits import add_node
    from fedcare.pki import fingerprint

    target = add_node(args.kit, args.name, args.public_key, args.hospital_kit_out)
    print(f"registered node '{args.name}' ({fingerprint(target.read_bytes())}) in {target}")
    if args.hospital_kit_out:
        print(f"hospital kit files (no private key) for '{args.name}': {args.hospital_kit_out}")
    return 0


def _coordinator_start(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    from fedcare.kits import KitError, load_coordinator_kit
    from fedcare.pki import KeyMaterialError
    from server.federation import FederationError, register_nodes, start_superlink

    kit = load_coordinator_kit(args.kit)
    port = args.port or kit.port
    proc = start_superlink(kit, bind=args.bind, port=port, insecure_dev=args.insecure_dev)
    names = [] if args.insecure_dev else sorted(kit.node_keys())
    print(f"coordinator listening on {args.bind}:{port} (TLS {'OFF' if args.insecure_dev else 'on'}, "
          f"node authentication {'OFF' if args.insecure_dev else 'on'}); pid {proc.pid}", flush=True)
    print(f"registered hospitals: {', '.join(names) or 'none'}; log: {kit.state_dir / 'superlink.log'}", flush=True)
    stop = lambda signum, _frame: proc.send_signal(signal.SIGTERM)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while proc.poll() is None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # still running: pick up keys added with `coordinator add-node`
            if not args.insecure_dev:
                try:
                    register_nodes(kit)
                except (FederationError, KitError, KeyMaterialError) as err:
                    print(f"fedcare: warning: could not register a new node key: {err}", file=sys.stderr, flush=True)
    print(f"coordinator stopped (exit status {proc.returncode})", flush=True)
    return 0 if proc.returncode in (0, -15) else 1


def _node_start(args: argparse.Namespace) -> int:
    from client.node import resolve_settings, start_node
    from fedcare.kits import load_hospital_kit

    kit = load_hospital_kit(args.kit, need_keys=not args.insecure_dev)
    return start_node(resolve_settings(kit, args.data, args.insecure_dev))


def _run(args: argparse.Namespace) -> int:
    from fedcare.kits import load_coordinator_kit
    from server.launch import run_study

    run_dir, _ = run_study(load_coordinator_kit(args.kit), args.rounds, args.epsilon)
    print()
    print((run_dir / "summary.txt").read_text(encoding="utf-8"), end="")
    print(f"\nreport: {run_dir / 'report.json'}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedcare.kits import load_coordinator_kit
    from server.launch import status_lines

    print("\n".join(status_lines(load_coordinator_kit(args.kit))))
    return 0


def _privacy_site(args: argparse.Namespace):
    """(state directory, policy file or None) of a hospital kit or of a bare state directory."""
    if args.kit is not None:
        from fedcare.kits import load_hospital_kit, read_site_settings

        kit = load_hospital_kit(args.kit, need_keys=False)
        return Path(read_site_settings(kit)["state_dir"]), kit.site_file if kit.site_file.exists() else None
    return args.state_dir, args.policy


def _privacy_report(args: argparse.Namespace) -> int:
    from privacy.ledger import LedgerTampered, PrivacyLedger
    from privacy.policy import policy_for_site
    from privacy.statement import statement_text

    state_dir, policy_file = _privacy_site(args)
    ledger = PrivacyLedger(state_dir)
    policy = policy_for_site(policy_file)
    try:
        entries = ledger.entries()
    except LedgerTampered as err:
        print(f"fedcare: LEDGER FAILED VERIFICATION: {err}", file=sys.stderr)
        print("training is blocked at this site until an administrator restores the ledger from a backup, "
              "or accepts it as it stands with `fedcare privacy reseal --reason TEXT`", file=sys.stderr)
        return 3
    print(statement_text(entries, policy, str(ledger.path)))
    return 0


def _privacy_reseal(args: argparse.Namespace) -> int:
    from privacy.ledger import PrivacyLedger

    state_dir, _ = _privacy_site(args)
    problem = PrivacyLedger(state_dir).reseal(args.reason)
    if not problem:
        print("the ledger verifies; nothing to reseal")
    else:
        print(f"ledger resealed; recorded as an administrator entry with the problem found: {problem}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedcare.runtime import APP_DIR

    DEFAULT_STUDY = APP_DIR / "studies" / "depression-risk.toml"  # simulations.simulate's (imported lazily: torch)

    parser = argparse.ArgumentParser(prog="fedcare", description="Federated mental-health risk models across hospitals.")
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a whole study with synthetic hospitals on this machine")
    sim.add_argument("--hospitals", type=int, default=5, help="number of synthetic hospitals (default 5)")
    sim.add_argument("--rounds", type=int, default=None, help="override the study's number of rounds")
    sim.add_argument("--epsilon", type=float, default=None, help="override each site's ε target for the study")
    sim.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study TOML file")
    sim.add_argument("--seed", type=int, default=42, help="seed of the synthetic cohorts (default 42)")
    sim.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory (must be new)")
    sim.add_argument("--size-scale", type=float, default=1.0, help="multiply every hospital's size (default 1.0)")
    sim.add_argument("--format", choices=("csv", "parquet", "fhir"), default="csv",
                     help="how the synthetic hospitals export their data (fhir: R4 bulk NDJSON through the study's [mapping])")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=_simulate)

    prov = commands.add_parser("provision", help="create the study CA and one kit per party")
    prov.add_argument("--study", type=Path, required=True, help="study TOML file")
    prov.add_argument("--coordinator-host", required=True, help="host names / IPs of the coordinator, comma-separated")
    prov.add_argument("--hospitals", required=True, help="hospital names, comma-separated (e.g. a,b,c)")
    prov.add_argument("--out", type=Path, required=True, help="new folder for the kits")
    prov.add_argument("--port", type=int, default=9092, help="coordinator port (default 9092)")
    prov.set_defaults(func=_provision)

    node = commands.add_parser("node", help="hospital node commands")
    node_cmds = node.add_subparsers(dest="node_command", required=True)
    keygen = node_cmds.add_parser("keygen", help="create this hospital's node key pair (private key stays here)")
    keygen.add_argument("--out", type=Path, required=True, help="folder for node.key and node.pub")
    keygen.set_defaults(func=_node_keygen)
    nstart = node_cmds.add_parser("start", help="validate the site's data and join the federation")
    nstart.add_argument("--kit", type=Path, required=True, help="this hospital's kit folder")
    nstart.add_argument("--data", type=Path, default=None, help="the site's export directory (default: site.toml)")
    nstart.add_argument("--insecure-dev", action="store_true", help="no TLS, no node authentication (local trials only)")
    nstart.set_defaults(func=_node_start)

    coord = commands.add_parser("coordinator", help="coordinator commands")
    coord_cmds = coord.add_subparsers(dest="coordinator_command", required=True)
    add = coord_cmds.add_parser("add-node", help="accept a hospital's node public key")
    add.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    add.add_argument("--name", required=True, help="the hospital's name")
    add.add_argument("--public-key", type=Path, required=True, help="the hospital's node.pub")
    add.add_argument("--hospital-kit-out", type=Path, default=None, help="also write that hospital's kit files here")
    add.set_defaults(func=_coordinator_add_node)
    cstart = coord_cmds.add_parser("start", help="start the SuperLink (TLS + node authentication) and register the kit's nodes")
    cstart.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    cstart.add_argument("--port", type=int, default=None, help="port (default: the kit's)")
    cstart.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    cstart.add_argument("--insecure-dev", action="store_true", help="no TLS, no node authentication (local trials only)")
    cstart.set_defaults(func=_coordinator_start)

    run = commands.add_parser("run", help="run the study on the federation (from the coordinator)")
    run.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    run.add_argument("--rounds", type=int, default=None, help="override the study's rounds (sites check the hash)")
    run.add_argument("--epsilon", type=float, default=None, help="override each site's ε target")
    run.set_defaults(func=_run)

    status = commands.add_parser("status", help="connected hospital nodes and runs")
    status.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    status.set_defaults(func=_status)

    data = commands.add_parser("data", help="site data tools")
    data_cmds = data.add_subparsers(dest="data_command", required=True)
    dcheck = data_cmds.add_parser("check", help="validate a site's export (CSV, Parquet or FHIR R4) against a study; counts only")
    dcheck.add_argument("--study", type=Path, required=True, help="the study file")
    dcheck.add_argument("--data", type=Path, required=True,
                        help="a site directory (train and test splits), one split file, or one FHIR directory")
    dcheck.set_defaults(func=_data_check)

    privacy = commands.add_parser("privacy", help="the site's privacy ledger")
    privacy_cmds = privacy.add_subparsers(dest="privacy_command", required=True)
    for name, func, text in (
        ("report", _privacy_report, "print the ledger as a table and verify its chain (exit 3 if tampered)"),
        ("reseal", _privacy_reseal, "administrator: accept a ledger that failed verification, recording why"),
    ):
        sub = privacy_cmds.add_parser(name, help=text)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--kit", type=Path, help="the hospital kit folder")
        where.add_argument("--state-dir", type=Path, help="a site state directory (e.g. a simulated site's .fedcare)")
        sub.add_argument("--policy", type=Path, default=None, help="with --state-dir: the site.toml holding [policy]")
        if name == "reseal":
            sub.add_argument("--reason", required=True, help="why the administrator accepts the ledger (recorded)")
        sub.set_defaults(func=func)

    from export.commands import register as register_export_commands
    from inference.commands import register as register_serve_commands

    register_export_commands(commands)  # export, verify, quantize
    register_serve_commands(commands)  # serve, serve token add/revoke/list

    study = commands.add_parser("study", help="study file tools")
    study_cmds = study.add_subparsers(dest="study_command", required=True)
    check = study_cmds.add_parser("check", help="validate a study file and print its hash")
    check.add_argument("study", type=Path)
    check.set_defaults(func=_study_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_flower_environment()
    from client.data import SiteDataError
    from client.node import NodeStartError
    from privacy.ledger import LedgerTampered
    from privacy.policy import PolicyError
    from fedcare.kits import KitError
    from server.federation import FederationError
    from fedcare.pki import KeyMaterialError
    from fedcare.study import StudyConfigError
    from simulations.simulate import SimulationError

    user_errors = (StudyConfigError, SiteDataError, SimulationError, KitError, KeyMaterialError, NodeStartError,
                   FederationError, PolicyError, LedgerTampered)
    return run_command(build_parser().parse_args(argv), user_errors)


def run_command(args: argparse.Namespace, user_errors: tuple[type[Exception], ...]) -> int:
    """Run a parsed command: a user error is one line on stderr and exit 2, Ctrl-C exit 130."""
    try:
        return args.func(args)
    except user_errors as err:
        print(f"fedcare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedcare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
