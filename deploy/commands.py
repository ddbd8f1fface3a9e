"""Deployment commands: `provision`, `kit protect|unprotect`, `node keygen|app-hash|package-key|start`,
`coordinator add-node|remove-node|start`, `run`, `status`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import add_command, print_study_result


def _provision(args: argparse.Namespace) -> int:
    from deploy.provision import provision

    hosts = [h.strip() for h in args.coordinator_host.split(",")]
    hospitals = [h.strip() for h in args.hospitals.split(",") if h.strip()]
    kits = provision(args.study, hosts, hospitals, args.out, port=args.port)
    print(f"study CA: {kits.pop('ca')}  (keep ca.key offline; it is not part of any kit)")
    for party, path in kits.items():
        print(f"kit for {party}: {path}")
    print("send each hospital its own folder; private keys are mode 0600")
    return 0


def _node_keygen(args: argparse.Namespace) -> int:
    from deploy.provision import node_keygen
    from deploy.pki import fingerprint

    private, public = node_keygen(args.out)
    print(f"private key: {private} (0600, stays at this hospital)")
    print(f"public key:  {public} (send to the coordinator; fingerprint {fingerprint(public.read_bytes())})")
    print(f"package key: {args.out / 'package.key'} (0600, stays here; opens model packages encrypted for this "
          f"site), {args.out / 'package.pub'} (send it with node.pub)")
    return 0


def _node_app_hash(args: argparse.Namespace) -> int:
    from deploy.approval import app_hash
    from fedcare import APP_DIR

    folder = args.app or APP_DIR
    print(f"{app_hash(folder)}  the App (FAB) `flwr run` builds from {folder}; list it in site.toml [approval] apps")
    return 0


def _node_package_key(args: argparse.Namespace) -> int:
    from deploy.kits import load_hospital_kit
    from export.signing import PACKAGE_PUB, ensure_package_key

    kit = load_hospital_kit(args.kit, need_keys=False)
    created = ensure_package_key(kit.path)
    state = "created" if created else "already present (kept)"
    print(f"package decryption key {kit.path / 'package.key'} (0600) {state}")
    print(f"send {kit.path / PACKAGE_PUB} to the coordinator (kept as nodes/{kit.name}.package.pub: "
          f"`fedcare export ... --encrypt-for {kit.name}`)")
    return 0


def _coordinator_add_node(args: argparse.Namespace) -> int:
    from deploy.provision import add_node
    from deploy.pki import fingerprint

    from deploy.kits import load_coordinator_kit

    target = add_node(args.kit, args.name, args.public_key, args.hospital_kit_out, package_key=args.package_key)
    print(f"registered node '{args.name}' ({fingerprint(target.read_bytes())}) in {target}")
    package_pub = load_coordinator_kit(args.kit).site_package_key(args.name)
    if package_pub.is_file():
        print(f"its package key: {package_pub} (`fedcare export ... --encrypt-for {args.name}`)")
    print(f"its TLS client certificate: {target.with_suffix('.crt')} (the hospital saves it as node.crt in its kit)")
    if args.hospital_kit_out:
        print(f"hospital kit files (no private key) for '{args.name}': {args.hospital_kit_out}")
    return 0


def _kit_protect(args: argparse.Namespace) -> int:
    from fedcare.keys import protect_keys

    for name, what in protect_keys(args.kit, unprotect_them=args.kit_command == "unprotect"):
        print(f"{args.kit / name}: {what}")
    if args.kit_command == "protect":
        print("services read the passphrase from FEDCARE_KIT_PASSPHRASE_FILE (or FEDCARE_KIT_PASSPHRASE); "
              "commands on a terminal ask for it")
    return 0


def _coordinator_remove_node(args: argparse.Namespace) -> int:
    from deploy.provision import remove_node

    printed = remove_node(args.kit, args.name)
    print(f"removed node '{args.name}' ({printed}): the edge no longer admits its certificate and its key is "
          "unregistered from Flower (now, if the coordinator runs; else at its next start)")
    return 0


def _coordinator_start(args: argparse.Namespace) -> int:
    from deploy.coordinator import supervise
    from deploy.kits import load_coordinator_kit

    return supervise(load_coordinator_kit(args.kit), bind=args.bind, port=args.port, insecure_dev=args.insecure_dev)


def _node_start(args: argparse.Namespace) -> int:
    from deploy.kits import load_hospital_kit
    from deploy.node import resolve_settings, start_node

    kit = load_hospital_kit(args.kit, need_keys=not args.insecure_dev)
    return start_node(resolve_settings(kit, args.data, args.insecure_dev))


def _run(args: argparse.Namespace) -> int:
    from deploy.kits import load_coordinator_kit
    from deploy.launch import run_study
    from fedcare.study import Overrides

    overrides = Overrides(rounds=args.rounds, epsilon=args.epsilon)  # a bad flag is refused before anything else
    run_dir, report = run_study(load_coordinator_kit(args.kit), overrides, resume=args.resume, verbose=args.verbose)
    return print_study_result(run_dir, report)


def _status(args: argparse.Namespace) -> int:
    from deploy.kits import load_coordinator_kit
    from deploy.launch import status_lines

    print("\n".join(status_lines(load_coordinator_kit(args.kit))))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    prov = add_command(commands, "provision")
    prov.add_argument("--study", type=Path, required=True, help="study TOML file")
    prov.add_argument("--coordinator-host", required=True, help="host names / IPs of the coordinator, comma-separated")
    prov.add_argument("--hospitals", required=True, help="hospital names, comma-separated (e.g. a,b,c)")
    prov.add_argument("--out", type=Path, required=True, help="new folder for the kits")
    prov.add_argument("--port", type=int, default=9092, help="coordinator port (default 9092)")
    prov.set_defaults(func=_provision)

    node = add_command(commands, "node")
    node_cmds = node.add_subparsers(dest="node_command", required=True)
    keygen = node_cmds.add_parser("keygen", help="create this hospital's node key pair (private key stays here)")
    keygen.add_argument("--out", type=Path, required=True, help="folder for node.key and node.pub")
    keygen.set_defaults(func=_node_keygen)
    ahash = node_cmds.add_parser("app-hash", help="the hash of the App this installation runs (for [approval] apps)")
    ahash.add_argument("--app", type=Path, default=None, help="an App folder to hash instead (e.g. a release under review)")
    ahash.set_defaults(func=_node_app_hash)
    pkey = node_cmds.add_parser("package-key", help="create this hospital's key for model packages encrypted at rest for it")
    pkey.add_argument("--kit", type=Path, required=True, help="this hospital's kit folder (package.key, package.pub)")
    pkey.set_defaults(func=_node_package_key)
    nstart = node_cmds.add_parser("start", help="validate the site's data and join the federation")
    nstart.add_argument("--kit", type=Path, required=True, help="this hospital's kit folder")
    nstart.add_argument("--data", default=None, help="the site's export directory, a database.toml, or "
                        "postgresql://USER@HOST:PORT/DB?cdm_schema=…&password_file=… (default: site.toml)")
    nstart.add_argument("--insecure-dev", action="store_true", help="no TLS, no node authentication (local trials only)")
    nstart.set_defaults(func=_node_start)

    kit = add_command(commands, "kit")
    kit_cmds = kit.add_subparsers(dest="kit_command", required=True)
    for name, text in (("protect", "encrypt the kit's private keys that fedcare reads (signing, node CA, artifact, "
                                   "package keys) under a passphrase"),
                       ("unprotect", "decrypt them back to plain 0600 key files (e.g. to change the passphrase)")):
        sub = kit_cmds.add_parser(name, help=text)
        sub.add_argument("--kit", type=Path, required=True, help="a coordinator or hospital kit folder")
        sub.set_defaults(func=_kit_protect)

    coord = add_command(commands, "coordinator")
    coord_cmds = coord.add_subparsers(dest="coordinator_command", required=True)
    add = coord_cmds.add_parser("add-node", help="accept a hospital's node public key")
    add.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    add.add_argument("--name", required=True, help="the hospital's name")
    add.add_argument("--public-key", type=Path, required=True, help="the hospital's node.pub")
    add.add_argument("--hospital-kit-out", type=Path, default=None, help="also write that hospital's kit files here")
    add.add_argument("--package-key", type=Path, default=None,
                     help="the hospital's package.pub (X25519), for packages encrypted for it (default: a "
                          "package.pub beside --public-key, as `fedcare node keygen` writes it)")
    add.set_defaults(func=_coordinator_add_node)
    remove = coord_cmds.add_parser("remove-node", help="stop accepting a hospital's node (key and certificate)")
    remove.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    remove.add_argument("--name", required=True, help="the hospital's name")
    remove.set_defaults(func=_coordinator_remove_node)
    cstart = coord_cmds.add_parser("start", help="start the SuperLink (TLS + node authentication) and register the kit's nodes")
    cstart.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    cstart.add_argument("--port", type=int, default=None, help="port (default: the kit's)")
    cstart.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    cstart.add_argument("--insecure-dev", action="store_true", help="no TLS, no node authentication (local trials only)")
    cstart.set_defaults(func=_coordinator_start)

    run = add_command(commands, "run")
    run.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    run.add_argument("--rounds", type=int, default=None, help="override the study's rounds (sites check the hash)")
    run.add_argument("--epsilon", type=float, default=None, help="override each site's ε target")
    run.add_argument("--resume", action="store_true",
                     help="take up the latest interrupted run after its last checkpoint (e.g. after a coordinator restart)")
    run.add_argument("--verbose", action="store_true", help="also show Flower's own log lines")
    run.set_defaults(func=_run)

    status = add_command(commands, "status")
    status.add_argument("--kit", type=Path, required=True, help="the coordinator kit folder")
    status.set_defaults(func=_status)
