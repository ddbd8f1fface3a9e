"""Read a site's export against the study's feature spec: CSV or Parquet (one row per patient),
or FHIR R4 (`client/fhir.py`), one split (train, test) at a time; or a database (`client/database_site.py`).

Good rows load; a bad row is quarantined with a reason (line number, column, why) and
never crashes the reader. Only counts and line numbers are reported, never values. The table,
report, error and value checks live in `client/tables.py` and are re-exported here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from client.rows import PATIENT_ID, RowCollector, cell_text, check_columns
from client.tables import MAX_EXAMPLES_PER_REASON, MISSING_TOKENS, LoadReport, SiteDataError, SiteTable, parse_value
from fedcare.study import Study

__all__ = [
    "MAX_EXAMPLES_PER_REASON", "MISSING_TOKENS", "SPLIT_FORMATS", "LoadReport", "SiteData", "SiteDataError",
    "SiteTable", "load_site", "parse_value", "read_site_csv", "read_site_parquet", "read_split", "split_source",
]

csv.field_size_limit(1 << 20)


def read_site_csv(study: Study, path: str | Path) -> SiteTable:
    """Load one CSV split; raises `SiteDataError` only when nothing usable can be loaded."""
    path = Path(path)
    report = LoadReport(path=str(path))
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # a byte-order mark (spreadsheet exports) is not data
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SiteDataError(f"{path}: is a directory, expected a CSV file") from None
    collector = RowCollector(study, report)
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise SiteDataError(f"{path}: empty file (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise SiteDataError(f"{path}: line 1: unreadable header: {err}") from None
        header = [h.strip() for h in header]
        report.ignored_columns = check_columns(collector.columns, path, header, "line 1")
        positions = [header.index(f.name) for f in collector.table_features]
        label_pos = header.index(study.label.name)
        pid_pos = header.index(PATIENT_ID) if collector.derived else None
        line = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as err:
                line += 1
                report.rows_read += 1
                report.quarantine(line, f"unreadable row ({type(err).__name__})")
                continue
            first, line = line + 1, reader.line_num
            if not cells:
                continue
            if line > first and any("\n" in cell or "\r" in cell for cell in cells):
                report.rows_read += 1
                report.quarantine(first, f"a quoted field runs from line {first} to line {line}: a quote left open?")
                continue
            if len(cells) != len(header):
                report.rows_read += 1
                report.quarantine(line, f"expected {len(header)} columns, got {len(cells)}")
                continue
            collector.add(line, cells[label_pos], [cells[p] for p in positions],
                          cells[pid_pos] if pid_pos is not None else "")
    return collector.table(path, lines=max(0, reader.line_num - 1))


def read_site_parquet(study: Study, path: str | Path, batch_rows: int = 65536) -> SiteTable:
    """Load one Parquet split (one row per patient, columns named by the study), batch by batch.
    Rows are numbered from 1 in reasons; a column of the wrong type quarantines its rows."""
    import pyarrow.parquet as pq

    path = Path(path)
    report = LoadReport(path=str(path))
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise SiteDataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {str(err)[:200]})") from None
    header = list(parquet.schema_arrow.names)
    collector = RowCollector(study, report)
    report.ignored_columns = check_columns(collector.columns, path, header, "schema")
    names = [f.name for f in collector.table_features]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=collector.columns):
            columns = [batch.column(name).to_pylist() for name in names]
            labels = batch.column(study.label.name).to_pylist()
            ids = batch.column(PATIENT_ID).to_pylist() if collector.derived else None
            for i, label in enumerate(labels):
                row += 1
                collector.add(row, cell_text(label), [cell_text(col[i]) for col in columns],
                              cell_text(ids[i]) if ids is not None else "")
    except OSError as err:
        report.quarantine(row + 1, f"unreadable from here on ({type(err).__name__}: truncated or damaged file)")
    return collector.table(path)


@dataclass(frozen=True)
class SiteData:
    """A site's training and test splits."""

    train: SiteTable
    test: SiteTable


SPLIT_FORMATS = ("csv", "parquet", "fhir")


def split_source(site_dir: Path, split: str) -> tuple[str, Path]:
    """Where a split lives: `<split>.csv`, `<split>.parquet`, or a `<split>/` FHIR directory."""
    for fmt, path in (("csv", site_dir / f"{split}.csv"), ("parquet", site_dir / f"{split}.parquet"),
                      ("fhir", site_dir / split)):
        if path.exists():
            if (fmt == "fhir") != path.is_dir():
                raise SiteDataError(f"{path}: is a {'file' if fmt == 'fhir' else 'directory'}, expected "
                                    f"{'a directory of FHIR files' if fmt == 'fhir' else f'a {fmt.upper()} file'}")
            return fmt, path
    raise SiteDataError(f"{site_dir}: no {split} split: expected {split}.csv, {split}.parquet or a {split}/ FHIR directory")


def read_split(study: Study, fmt: str, path: Path) -> SiteTable:
    if fmt == "csv":
        return read_site_csv(study, path)
    if fmt == "parquet":
        return read_site_parquet(study, path)
    from client.fhir import read_site_fhir

    if study.mapping is None:
        raise SiteDataError(f"{path}: FHIR data, but the study has no [mapping] section saying how to derive features")
    return read_site_fhir(study, study.mapping, path)


def load_site(study: Study, site_dir: str | Path) -> SiteData:
    """A site's splits: files in `site_dir`, or its database when `site_dir` is (or holds) a database.toml."""
    from client.database import Split, is_database_path

    site_dir = Path(site_dir)
    if is_database_path(site_dir):
        from client.database_site import read_database_site

        tables = read_database_site(study, site_dir)
        return SiteData(tables[Split.TRAIN], tables[Split.TEST])
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: site data directory not found")
    return SiteData(*(read_split(study, *split_source(site_dir, split)) for split in ("train", "test")))
