"""`fedcare simulate`: a whole study on this machine (registered by this package, imported only when run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import add_command, print_study_result
from fedcare import DEFAULT_STUDY
from fedcare.errors import FedcareError


SYNTHETIC_ONLY = ("seed", "size_scale", "format")  # flags that shape synthetic hospitals


def _simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import SimulationError, SimulationOptions, simulate

    if args.sites is not None:
        for name in SYNTHETIC_ONLY:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise SimulationError(f"{flag}: only for synthetic hospitals (--hospitals); "
                                      "with --sites, each site's own files are used as they are")
    report = simulate(
        SimulationOptions(
            hospitals=args.hospitals or 5,
            sites=args.sites,
            rounds=args.rounds,
            epsilon=args.epsilon,
            study=args.study,
            seed=42 if args.seed is None else args.seed,
            out=args.out,
            size_scale=1.0 if args.size_scale is None else args.size_scale,
            verbose=args.verbose,
            data_format=args.format or "csv",
            cpus_per_site=args.cpus_per_site,
        )
    )
    return print_study_result(Path(args.out).resolve(), report)


def _example(args: argparse.Namespace) -> int:
    from simulations.breast_cancer import STUDY_FILE, write_breast_cancer_sites

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FedcareError(f"--out: {out} is not empty; choose a new directory")
    manifest = write_breast_cancer_sites(out, seed=args.seed)
    for site in manifest["sites"]:
        print(f"{out / site['name']}: {site['train_rows']} train, {site['test_rows']} test rows, "
              f"{100 * site['prevalence']:.0f} % malignant")
    print(f"\nrun it: fedcare simulate --sites {out} --study {STUDY_FILE} --out runs/breast-cancer")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    example = add_command(commands, "example")
    example.add_argument("name", choices=("breast-cancer",),
                         help="breast-cancer: scikit-learn's Wisconsin diagnostic data (569 patients, 30 features) "
                              "as 4 hospitals of different sizes and case mix")
    example.add_argument("--out", type=Path, required=True, help="new directory for the site folders")
    example.add_argument("--seed", type=int, default=0, help="seed of the split into sites (default 0)")
    example.set_defaults(func=_example)

    sim = add_command(commands, "simulate")
    where = sim.add_mutually_exclusive_group()
    where.add_argument("--hospitals", type=int, default=None, help="number of synthetic hospitals (default 5)")
    where.add_argument("--sites", type=Path, default=None, metavar="DIR",
                       help="run on your own site data: every sub-folder of DIR is one site (train/test as CSV, "
                            "Parquet or FHIR; optional site.toml policy); the folders are only read")
    sim.add_argument("--rounds", type=int, default=None, help="override the study's number of rounds")
    sim.add_argument("--epsilon", type=float, default=None, help="override each site's ε target for the study")
    sim.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study TOML file")
    sim.add_argument("--seed", type=int, default=None, help="seed of the synthetic cohorts (default 42)")
    sim.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory (must be new)")
    sim.add_argument("--size-scale", type=float, default=None, help="multiply every hospital's size (default 1.0)")
    sim.add_argument("--format", choices=("csv", "parquet", "fhir"), default=None,
                     help="how the synthetic hospitals export their data (fhir: R4 bulk NDJSON through the study's [mapping])")
    sim.add_argument("--cpus-per-site", type=float, default=1.0, metavar="CPUS",
                     help="Ray CPU share of one virtual site (default 1: as many sites train at once as there are "
                          "cores; 0.5 runs twice as many, each a process with its own torch)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=_simulate)
