"""`fedcare example omop`: a network of synthetic hospitals whose sites are schemas of one PostgreSQL
database, ready for `fedcare simulate --sites`.

Each hospital (`simulations/cohorts.py`) is written as CSV and FHIR (kept under `<out>/.renderings/`,
which the simulation does not take for a site) and into its own CDM schema `site_NN`
(`simulations/omop_cdm.py`), all sharing one vocabulary schema; each site folder `<out>/<hospital>/`
then holds only a `database.toml` naming its schema for the read-only role the network reads with.
The writing role (`--database`) needs CREATE on the database; the reading role (`--reader`) must
exist, and is granted USAGE and SELECT on the schemas written, nothing else.
"""

from __future__ import annotations

from pathlib import Path

from client.database import DatabaseSource, first_line, read_password, source_from_url
from fedcare.errors import FedcareError
from fedcare.study import Study


VOCABULARY = "vocab"  # the schema of the shared synthetic vocabulary


class ExampleError(FedcareError):
    """The example network cannot be written (the message names the flag)."""


def write_omop_network(study: Study, out: Path, *, database: str, reader: str, hospitals: int, seed: int,
                       size_scale: float) -> list[dict]:
    """Write the network; returns per site its name, schema and persons per split."""
    import psycopg
    from psycopg import sql

    from simulations.cohorts import write_cohorts
    from simulations.omop_cdm import write_database_toml, write_omop_site

    if study.omop is None or study.mapping is None:
        raise ExampleError(f"--study: {study.name} needs a [mapping] and an [omop] table "
                           "(studies/depression-risk-omop.toml has both)")
    admin, site_reader = _url("--database", database), _url("--reader", reader)
    if site_reader.password_file is None:
        raise ExampleError("--reader: add ?password_file=PATH: the sites' database.toml name the file, never a password")
    renderings = out / ".renderings"
    write_cohorts(study, renderings, hospitals=hospitals, seed=seed, size_scale=size_scale)
    sites = sorted(p for p in renderings.iterdir() if p.is_dir())
    written = []
    try:
        conn = psycopg.connect(host=admin.host, port=admin.port, dbname=admin.dbname, user=admin.user,
                               password=read_password(admin), sslmode=admin.sslmode,
                               sslrootcert=str(admin.sslrootcert) if admin.sslrootcert else None)
    except psycopg.OperationalError as err:
        raise ExampleError(f"--database: cannot connect to {admin.describe()}: {first_line(err)}") from None
    with conn:
        for n, site in enumerate(sites, start=1):
            schema = f"site_{n:02d}"
            result = write_omop_site(study, site, conn, cdm_schema=schema, vocabulary_schema=VOCABULARY)
            conn.commit()
            folder = out / site.name
            folder.mkdir(parents=True, exist_ok=True)
            write_database_toml(folder, host=site_reader.host, port=site_reader.port, dbname=site_reader.dbname,
                                user=site_reader.user, password_file=site_reader.password_file, cdm_schema=schema,
                                vocabulary_schema=VOCABULARY)
            written.append({"name": site.name, "schema": schema, "persons": result["persons"]})
        schemas = [VOCABULARY, *(w["schema"] for w in written)]
        names = sql.SQL(", ").join(sql.Identifier(s) for s in schemas)
        role = sql.Identifier(site_reader.user)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(names, role))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(names, role))
        conn.commit()
    return written


def _url(flag: str, url: str) -> DatabaseSource:
    try:
        return source_from_url(url)
    except FedcareError as err:
        raise ExampleError(f"{flag}: {err}") from None
