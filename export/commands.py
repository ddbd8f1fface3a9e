"""`fedcare export`, `fedcare verify`, `fedcare quantize` (issue 6; docs/PACKAGE.md).

    fedcare export --run RUN_DIR --kit COORDINATOR_KIT --out PKG [--study FILE]
    fedcare verify PKG --kit KIT                      (a hospital kit or the coordinator kit)
    fedcare quantize --package PKG --kit HOSPITAL_KIT [--data SITE_DIR]

Every refusal is one line on stderr (`fedcare: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known failures become one line and exit status 2, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        from client.data import SiteDataError
        from export.package import PackageError
        from fedcare.kits import KitError
        from fedcare.pki import KeyMaterialError
        from fedcare.study import StudyConfigError

        try:
            return func(args)
        except (PackageError, KitError, KeyMaterialError, StudyConfigError, SiteDataError) as err:
            print(f"fedcare: error: {_one_line(err)}", file=sys.stderr)
        except OSError as err:
            where = f"{err.filename}: " if getattr(err, "filename", None) else ""
            print(f"fedcare: error: {where}{err.strerror or _one_line(err)}", file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - e.g. ONNX Runtime refusing a model: still one line, no traceback
            print(f"fedcare: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 2

    return run


def _export(args: argparse.Namespace) -> int:
    from export.package import build_package, run_study, verify_package
    from fedcare.kits import ensure_signing_key, load_coordinator_kit, load_signing_key, signing_fingerprint

    kit = load_coordinator_kit(args.kit)
    study, how = run_study(args.study or kit.study_file, args.run)
    if ensure_signing_key(kit):
        print(f"created the coordinator's package signing key: {kit.signing_key} (0600) and {kit.signing_pub}; "
              f"send signing.pub to every hospital, saved in its kit as coordinator-signing.pub")
    key = load_signing_key(kit)
    pkg = build_package(study, args.run, args.out, key)
    package = verify_package(pkg, key.public_key())
    models = package.manifest["models"]
    print(f"package: {pkg}")
    print(f"study {study.name} ({study.hash[:12]}…, study file {how}), scaling {package.manifest['inputs']['scaling_method']}")
    for kind, entry in models.items():
        print(f"  {kind:<6} {entry['file']:<18} {entry['bytes']:>7} bytes")
    fp32, int8 = models["fp32"]["bytes"], models["int8"]["bytes"]
    print(f"fp32/int8 size ratio {fp32 / int8:.2f}; int8 and a16w8 calibrated on {models['int8']['calibration']}")
    print(f"signed with Ed25519 key {signing_fingerprint(key.public_key())}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from export.package import summary_lines, verify_package
    from fedcare.kits import package_verification_key, signing_fingerprint

    key, source = package_verification_key(args.kit)
    package = verify_package(args.package, key)
    print(f"OK: {args.package} is signed by {signing_fingerprint(key)} ({source}); every file matches the manifest")
    print("\n".join(summary_lines(package)))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from export.package import PackageError, quantize_on_site, verify_package
    from fedcare.kits import load_hospital_kit, package_verification_key, read_site_settings
    from fedcare.study import load_study

    kit = load_hospital_kit(args.kit, need_keys=False)
    key, _ = package_verification_key(kit.path)
    package = verify_package(args.package, key)
    data = args.data or read_site_settings(kit).get("data")
    if data is None:
        raise PackageError(f"--data: not given and {kit.site_file} names no [site] data directory")
    result = quantize_on_site(package, load_study(kit.study_file), data, kit.name)
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
    print(f"details: {site / 'quantization.json'} (stays at this site; the signed package is unchanged)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `fedcare` parser."""
    export = commands.add_parser("export", help="build the signed model package of a finished run (coordinator)")
    export.add_argument("--run", type=Path, required=True, help="the coordinator's run directory (checkpoints, report.json)")
    export.add_argument("--kit", type=Path, required=True, help="the coordinator kit (holds signing.key)")
    export.add_argument("--out", type=Path, required=True, help="new package directory")
    export.add_argument("--study", type=Path, default=None,
                        help="the study file the run used (default: the kit's study.toml; the run's overrides are recognized)")
    export.set_defaults(func=_guarded(_export))

    verify = commands.add_parser("verify", help="check a model package's signature and files")
    verify.add_argument("package", type=Path, help="the package directory")
    verify.add_argument("--kit", type=Path, required=True,
                        help="a hospital kit (coordinator-signing.pub) or the coordinator kit (signing.pub)")
    verify.set_defaults(func=_guarded(_verify))

    quantize = commands.add_parser("quantize", help="on site: calibrate the package's int8 model from local training data")
    quantize.add_argument("--package", type=Path, required=True, help="the verified package directory")
    quantize.add_argument("--kit", type=Path, required=True, help="this hospital's kit")
    quantize.add_argument("--data", type=Path, default=None, help="the site's export directory (default: site.toml)")
    quantize.set_defaults(func=_guarded(_quantize))
