"""`fedcare export`, `fedcare verify`, `fedcare quantize` (docs/PACKAGE.md).

    fedcare export --run RUN_DIR --kit COORDINATOR_KIT --out PKG [--encrypt-for SITE]
    fedcare verify PKG --kit KIT                      (a hospital kit or the coordinator kit)
    fedcare verify PKG.enc --kit HOSPITAL_KIT [--out DIR]   (verified in memory; decrypted into DIR if given)
    fedcare quantize --package PKG --kit HOSPITAL_KIT [--data SITE_DIR]

RUN_DIR is a run record (`fedcare.run_record`): a simulation's `--out` folder, or a deployed
coordinator's `state/runs/<time>/`. Every refusal is a `FedcareError`: `cli.main` prints it as one
line on stderr (`fedcare: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cli import add_command

if TYPE_CHECKING:
    from deploy.kits import CoordinatorKit, HospitalKit
    from export.package import VerifiedPackage


def verify_for_kit(pkg: Path, kit: CoordinatorKit | HospitalKit) -> tuple[VerifiedPackage, Path]:
    """(package, the key file it verified under): signature, files, and built for the kit's study.
    `pkg` is a package directory, or a `PKG.enc` encrypted for this kit's site: that one is decrypted
    with the kit's package.key in memory only and verified there (`VerifiedPackage.files`)."""
    from deploy.kits import package_verification_key
    from export.package import verify_package
    from fedcare.study import load_study

    key, source = package_verification_key(kit)
    opened = open_for_kit(pkg, kit) if Path(pkg).is_file() else Path(pkg)
    return verify_package(opened, key, study=load_study(kit.study_file)), source


def open_for_kit(enc_file: Path, kit: CoordinatorKit | HospitalKit):
    """The files of `PKG.enc`, decrypted in memory with the kit's package.key (not yet verified)."""
    from export.encryption import open_encrypted
    from export.signing import PACKAGE_KEY, load_package_key
    from fedcare.errors import KeyMaterialError

    if not (kit.path / PACKAGE_KEY).exists():
        raise KeyMaterialError(f"{kit.path / PACKAGE_KEY}: not found; this kit has no package decryption key "
                               f"(`fedcare node package-key --kit KIT` creates it; the coordinator encrypts for its package.pub)")
    return open_encrypted(enc_file, load_package_key(kit.path))


SIMULATION_KITS = "kits"


def simulation_kit(run: Path) -> Path:
    """The coordinator kit that signs a simulation's package: `<run>/kits/coordinator`, provisioned on
    first use for the simulation's sites (its hospital kits serve the package on this machine). A
    deployed run has no such kit: `--kit` names the coordinator's."""
    from deploy.provision import provision
    from export.package import PackageError
    from fedcare.run_record import SIMULATION_FILE, RunRecord

    kits = run / SIMULATION_KITS
    if not (kits / "coordinator").is_dir():
        sites = RunRecord(run).simulation_sites()
        if sites is None:
            raise PackageError(f"--kit: required for {run}: it is not a `fedcare simulate` run folder (no readable "
                               f"{SIMULATION_FILE}); give the coordinator kit that holds signing.key")
        provision(RunRecord(run).study_file, ["127.0.0.1"], sites, kits)
        print(f"created the simulation's kits in {kits} (a study CA, the coordinator's and one per site, loopback only)")
    return kits / "coordinator"


def site_package_key(kit: CoordinatorKit, site: str) -> Path:
    """`--encrypt-for`: a hospital of the kit (its `nodes/<site>.package.pub`, kept by provision and
    add-node) or the path of a site's package.pub."""
    from export.package import PackageError

    if "/" not in site and not site.endswith(".pub"):
        path = kit.site_package_key(site)
        if not path.is_file():
            known = sorted(p.name.removesuffix(".package.pub") for p in kit.nodes_dir.glob("*.package.pub"))
            raise PackageError(f"--encrypt-for: no package key for site '{site}' in {kit.nodes_dir} (sites with one: "
                               f"{', '.join(known) or 'none'}); `fedcare coordinator add-node --package-key` adds it")
        return path
    return Path(site)


def _export(args: argparse.Namespace) -> int:
    from deploy.kits import coordinator_artifact_key, coordinator_signing_key, load_coordinator_kit
    from export.build import build_package
    from export.encryption import encrypt_package, encrypted_path
    from export.package import PackageError, overrides_text, read_overrides, verify_package
    from export.signing import ensure_signing_key, load_package_public_key, signing_fingerprint
    from fedcare.run_record import RunRecord
    from fedcare.study import load_study

    kit = load_coordinator_kit(args.kit if args.kit is not None else simulation_kit(args.run))
    site_key = None
    if args.encrypt_for is not None:  # checked before the build
        site_key = load_package_public_key(site_package_key(kit, args.encrypt_for))
        if encrypted_path(args.out).exists():
            raise PackageError(f"--encrypt-for: {encrypted_path(args.out)} exists; refusing to overwrite")
    if ensure_signing_key(kit.signing_key, kit.signing_pub):
        print(f"created the coordinator's package signing key: {kit.signing_key} (0600) and {kit.signing_pub}; "
              f"send signing.pub to every hospital, saved in its kit as coordinator-signing.pub")
    key = coordinator_signing_key(kit)
    record = RunRecord(args.run, key=coordinator_artifact_key(kit))  # a deployed run's checkpoints are sealed
    record.report()  # a finished run (or a one-line error saying it is not one)
    expected = load_study(kit.study_file).with_overrides(record.overrides())
    if load_study(record.study_file).hash != expected.hash:
        raise PackageError(f"{record.study_file}: the run is not of this kit's study (its file with the run's recorded "
                           f"overrides gives {expected.hash[:12]}…); the coordinator signs only runs of its own study")
    pkg = build_package(record, args.out, key)
    manifest = verify_package(pkg, key.public_key()).manifest
    models = manifest["models"]
    print(f"package: {pkg}")
    print(f"study {manifest['study']['name']} ({manifest['study']['hash'][:12]}…, "
          f"{overrides_text(read_overrides(manifest))}), scaling {manifest['inputs']['scaling_method']}")
    for kind, entry in models.items():
        print(f"  {kind:<6} {entry['file']:<18} {entry['bytes']:>7} bytes")
    fp32, int8 = models["fp32"]["bytes"], models["int8"]["bytes"]
    print(f"fp32/int8 size ratio {fp32 / int8:.2f}; int8 and a16w8 calibrated on {models['int8']['calibration']}")
    print(f"signed with Ed25519 key {signing_fingerprint(key.public_key())}")
    if args.kit is None:
        site = sorted(p.name for p in (args.run / SIMULATION_KITS).iterdir() if p.is_dir() and p.name not in ("ca", "coordinator"))[0]
        print(f"serve it on this machine: fedcare serve token add --kit {args.run / SIMULATION_KITS / site} --name me; "
              f"fedcare serve --package {pkg} --kit {args.run / SIMULATION_KITS / site}")
    if site_key is not None:
        enc = encrypt_package(pkg, encrypted_path(pkg), site_key)
        print(f"encrypted for {args.encrypt_for}: {enc} ({enc.stat().st_size} bytes); the site serves it as it is "
              f"(`fedcare serve --package {enc.name} --kit HOSPITAL_KIT`: decrypted in memory only) and checks it "
              f"with `fedcare verify {enc.name} --kit HOSPITAL_KIT`")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deploy.kits import load_kit
    from export.package import PackageError, summary_lines

    kit = load_kit(args.kit)
    pkg = args.package
    if args.out is not None and not pkg.is_file():
        raise PackageError("--out: only for an encrypted package (PKG.enc)")
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise PackageError(f"--out: {args.out} exists and is not an empty directory; refusing to overwrite")
    package, source = verify_for_kit(pkg, kit)  # an encrypted package: decrypted and verified in memory
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, content in package.files.items():
            (args.out / name).write_bytes(content)
        print(f"decrypted {args.package} into {args.out}")
    where = " (decrypted in memory)" if package.in_memory and args.out is None else ""
    print(f"OK: {pkg}{where} is signed by {package.fingerprint} ({source}); every file matches the manifest; "
          f"built for this kit's study")
    print("\n".join(summary_lines(package)))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from client.data import load_site
    from deploy.kits import load_hospital_kit, read_site_settings
    from export.package import PackageError
    from export.site_quantization import SITE_REPORT, quantize_on_site
    from fedcare.study import load_study

    kit = load_hospital_kit(args.kit, need_keys=False)
    package, _ = verify_for_kit(args.package, kit)
    data_dir = args.data or read_site_settings(kit).get("data")
    if data_dir is None:
        raise PackageError(f"--data: not given and {kit.site_file} names no [site] data directory")
    data = load_site(load_study(kit.study_file), data_dir)
    result = quantize_on_site(package, data, kit.name, source=data_dir)
    site = Path(args.package) / "site"
    print(f"site-calibrated int8: {site / result['file']} ({result['bytes']} bytes) from {result['rows_used']} of "
          f"{result['train_rows']} local training rows")
    line = f"test split ({result['test_rows']} rows): AUC fp32 {result['auc_fp32']:.4f}, int8 site-calibrated " \
           f"{result['auc_int8_site']:.4f} (|ΔAUC| {result['abs_delta_auc_site']:.4f})"
    if "auc_int8_package" in result:
        line += f", package int8 (spec-calibrated) {result['auc_int8_package']:.4f} (|ΔAUC| {result['abs_delta_auc_package']:.4f})"
    print(line)
    risk = f"mean |Δrisk| vs fp32: site-calibrated {result['mean_abs_delta_risk_site']:.4f}"
    if "mean_abs_delta_risk_package" in result:
        risk += f", package int8 {result['mean_abs_delta_risk_package']:.4f}"
    print(risk)
    print(f"details: {site / SITE_REPORT} (stays at this site; the signed package is unchanged)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `fedcare` parser."""
    export = add_command(commands, "export")
    export.add_argument("--run", type=Path, required=True,
                        help="the run folder (a simulation's --out, or the coordinator's state/runs/<time>)")
    export.add_argument("--kit", type=Path, default=None,
                        help="the coordinator kit (holds signing.key); for a `fedcare simulate` run folder, leave it "
                             "out: the run's own kits (RUN/kits/, made on first export) sign it")
    export.add_argument("--out", type=Path, required=True, help="new package directory")
    export.add_argument("--encrypt-for", default=None, metavar="SITE",
                        help="also write PKG.enc beside the package, encrypted for this hospital of the kit (its "
                             "package.pub, X25519), or for the package.pub file given by path")
    export.set_defaults(func=_export)

    verify = add_command(commands, "verify")
    verify.add_argument("package", type=Path, help="the package directory, or an encrypted PKG.enc (with --out)")
    verify.add_argument("--kit", type=Path, required=True,
                        help="a hospital kit (coordinator-signing.pub) or the coordinator kit (signing.pub)")
    verify.add_argument("--out", type=Path, default=None,
                        help="for PKG.enc: also write the verified, decrypted files into this new directory "
                             "(without it, PKG.enc is decrypted and verified in memory only)")
    verify.set_defaults(func=_verify)

    quantize = add_command(commands, "quantize")
    quantize.add_argument("--package", type=Path, required=True, help="the verified package directory")
    quantize.add_argument("--kit", type=Path, required=True, help="this hospital's kit")
    quantize.add_argument("--data", type=Path, default=None, help="the site's export directory (default: site.toml)")
    quantize.set_defaults(func=_quantize)
