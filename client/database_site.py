"""A site read from its database (`client/database.py`): both splits at once, by the source's kind.

`read_database_site(study, path)` reads the `[database]` table of `path` and returns the train and
test `SiteTable`s: from an OMOP CDM by the study's `[omop]` rules (`client/omop.py`), or from the
site's own query (kind "sql"), one row per patient with `patient_id`, the study's feature columns
and its label column, checked cell by cell like a CSV (`client.rows.RowCollector`). Either way the
split of a patient is a hash of its id (`client.database.assign_split`) and the rows of a split are
in the order the database returns them (person_id order for OMOP).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from client.database import DatabaseSource, DatabaseSourceError, SourceKind, Split, assign_split, connect, \
    connection_lost, first_line, load_database_source
from client.rows import RowCollector, cell_text, check_columns
from client.tables import LoadReport, SiteTable
from fedcare.study import Study

PATIENT_ID = "patient_id"


def read_database_site(study: Study, path: str | Path, *, today: datetime.date | None = None,
                       source: DatabaseSource | None = None) -> dict[Split, SiteTable]:
    """Both splits of the database site declared at `path` (a database.toml or its folder)."""
    source = source or load_database_source(path)
    if source.kind is SourceKind.OMOP:
        from client.omop import read_omop_site

        return read_omop_site(study, source, today=today)
    return read_sql_site(study, source)


def read_sql_site(study: Study, source: DatabaseSource, *, fetch_rows: int = 10_000) -> dict[Split, SiteTable]:
    """The site's query, streamed through a server-side cursor in a read-only transaction."""
    import psycopg

    assert source.query is not None
    collectors = {split: RowCollector(study, LoadReport(path=f"{split.value} split of the site's query"))
                  for split in Split}
    if collectors[Split.TRAIN].derived:
        raise DatabaseSourceError(f"{source.origin}: study '{study.name}' derives features from notes and readings, "
                                  "which a database site does not provide yet: use a file export (docs/NOTES.md)")
    wanted = [f.name for f in study.features] + [study.label.name]
    conn = connect(source)
    rows = {split: 0 for split in Split}
    try:
        with conn.transaction(), conn.cursor(name="fedcare_site_query") as cur:
            cur.itersize = fetch_rows
            cur.execute(source.query)
            header = [column.name for column in cur.description or ()]
            if PATIENT_ID not in header:
                raise DatabaseSourceError(f"{source.origin}: query: no {PATIENT_ID} column (one row per patient: "
                                          f"{PATIENT_ID}, the study's features and {study.label.name})")
            ignored = check_columns(wanted, Path(source.origin), header, "query")
            positions = [header.index(f.name) for f in collectors[Split.TRAIN].table_features]
            label_pos, pid_pos = header.index(study.label.name), header.index(PATIENT_ID)
            for collector in collectors.values():
                collector.report.ignored_columns = [c for c in ignored if c != PATIENT_ID]
            while batch := cur.fetchmany(fetch_rows):
                for record in batch:
                    pid = cell_text(record[pid_pos])
                    split = assign_split(pid, source.test_fraction)
                    rows[split] += 1
                    collector = collectors[split]
                    if not pid.strip():
                        collector.report.rows_read += 1
                        collector.report.quarantine(rows[split], f"{PATIENT_ID}: empty")
                        continue
                    if pid in collector.seen:
                        collector.report.rows_read += 1
                        collector.report.quarantine(rows[split], f"{PATIENT_ID}: duplicate patient")
                        continue
                    collector.seen.add(pid)
                    collector.add(rows[split], cell_text(record[label_pos]),
                                  [cell_text(record[p]) for p in positions])
    except psycopg.Error as err:
        if connection_lost(conn, err):
            raise DatabaseSourceError(f"{source.origin}: the connection to {source.describe()} was lost while "
                                      f"running the site's query: {first_line(err)}. Nothing read from it is used") from None
        raise DatabaseSourceError(f"{source.origin}: the site's query failed: {type(err).__name__}: {first_line(err)}") from None
    finally:
        conn.close()
    return {split: collectors[split].table(Path(f"{source.origin} ({split.value} split)")) for split in Split}

