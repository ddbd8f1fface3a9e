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
    if args.name == "omop":
        return _example_omop(args, out)
    for flag in ("database", "reader"):
        if getattr(args, flag) is not None:
            raise FedcareError(f"--{flag}: only for the omop example")
    manifest = write_breast_cancer_sites(out, seed=args.seed)
    for site in manifest["sites"]:
        print(f"{out / site['name']}: {site['train_rows']} train, {site['test_rows']} test rows, "
              f"{100 * site['prevalence']:.0f} % malignant")
    print(f"\nrun it: fedcare simulate --sites {out} --study {STUDY_FILE} --out runs/breast-cancer")
    return 0


def _example_omop(args: argparse.Namespace, out: Path) -> int:
    from fedcare.study import load_study
    from simulations.omop_example import write_omop_network

    if args.database is None or args.reader is None:
        raise FedcareError("--database and --reader: the omop example writes into a PostgreSQL database "
                           "(docs/OMOP.md, \"A network in one database\")")
    study_file = Path(__file__).resolve().parents[1] / "studies" / "depression-risk-omop.toml"
    for site in write_omop_network(load_study(study_file), out, database=args.database, reader=args.reader,
                                   hospitals=args.hospitals, seed=args.seed, size_scale=args.size_scale):
        persons = site["persons"]
        print(f"{out / site['name']}: schema {site['schema']}, {persons['train']} train, {persons['test']} test patients")
    print(f"\nrun it: fedcare simulate --sites {out} --study {study_file} --out runs/omop")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    example = add_command(commands, "example")
    example.add_argument("name", choices=("breast-cancer", "omop"),
                         help="breast-cancer: scikit-learn's Wisconsin diagnostic data (569 patients, 30 features) "
                              "as 4 hospitals of different sizes and case mix; omop: synthetic hospitals as OMOP CDM "
                              "schemas of one PostgreSQL database (--database, --reader)")
    example.add_argument("--out", type=Path, required=True, help="new directory for the site folders")
    example.add_argument("--seed", type=int, default=0, help="seed of the split into sites, or of the synthetic "
                                                              "hospitals (default 0)")
    example.add_argument("--database", default=None, metavar="URL",
                         help="omop: postgresql://ADMIN@HOST:PORT/DB?password_file=… (a role that may create schemas)")
    example.add_argument("--reader", default=None, metavar="URL",
                         help="omop: postgresql://READER@HOST:PORT/DB?password_file=… (an existing login role; "
                              "granted SELECT on what is written)")
    example.add_argument("--hospitals", type=int, default=3, help="omop: number of synthetic hospitals (default 3)")
    example.add_argument("--size-scale", type=float, default=1.0, help="omop: multiply every hospital's size")
    example.set_defaults(func=_example)

    sim = add_command(commands, "simulate")
    where = sim.add_mutually_exclusive_group()
    where.add_argument("--hospitals", type=int, default=None, help="number of synthetic hospitals (default 5)")
    where.add_argument("--sites", type=Path, default=None, metavar="DIR",
                       help="run on your own site data: every sub-folder of DIR is one site (train/test as CSV, "
                            "Parquet or FHIR, or a database.toml; optional site.toml policy); the folders are only read")
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
