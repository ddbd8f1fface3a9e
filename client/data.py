"""Read a site's export against the study's feature spec: CSV or Parquet (one row per patient),
or FHIR R4 (`client/fhir.py`), one split (train, test) at a time.

Good rows load; a bad row is quarantined with a reason (line number, column, why) and
never crashes the reader. Only counts and line numbers are reported, never values. The table,
report, error and value checks live in `client/tables.py` and are re-exported here.
"""

from __future__ import annotations

import csv
import math
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.tables import MAX_EXAMPLES_PER_REASON, MISSING_TOKENS, LoadReport, SiteDataError, SiteTable, parse_value
from fedcare.study import Study

__all__ = [
    "MAX_EXAMPLES_PER_REASON", "MISSING_TOKENS", "SPLIT_FORMATS", "LoadReport", "SiteData", "SiteDataError",
    "SiteTable", "load_site", "parse_value", "read_site_csv", "read_site_parquet", "read_split", "split_source",
]

csv.field_size_limit(1 << 20)
MIN_LINES_FOR_SHARE = 10  # below this many lines, only "no usable row" is fatal


PATIENT_ID = "patient_id"  # the table's column joining notes and readings to rows (studies that derive features)


class _RowCollector:
    """Checks one record at a time (label, then each table feature in spec order) and keeps the good ones.

    Features the study derives from notes and readings (`fedcare.derived.Derivation.columns`) are not
    table columns: they are NaN here and filled by `client.site_derived` once the table is read."""

    def __init__(self, study: Study, report: LoadReport) -> None:
        from fedcare.derived import Derivation

        self.study, self.report = study, report
        self.derivation = Derivation(study) if study.mapping is not None else None
        derived = self.derivation.columns if self.derivation is not None else frozenset()
        self.derived = derived
        self.table_features = [f for i, f in enumerate(study.features) if i not in derived]
        # flat C arrays, not a list per row: 8 bytes a value instead of ~40 (a million-row site: 0.25 GB, not 1 GB)
        self.values = array("d")
        self.row_count = 0
        self.labels = array("f")
        self.patient_ids: list[str] = []
        self.lines: list[int] = []
        self.seen: set[str] = set()

    @property
    def columns(self) -> list[str]:
        """The table columns this study needs (features, the label, and patient_id when it derives)."""
        extra = [PATIENT_ID] if self.derived else []
        return [f.name for f in self.table_features] + [self.study.label.name] + extra

    def add(self, line: int, label_text: str, feature_texts: list[str], patient_id: str = "") -> None:
        self.report.rows_read += 1
        label_text = label_text.strip()
        if label_text not in ("0", "1"):
            self.report.quarantine(line, f"{self.study.label.name}: label must be 0 or 1")
            return
        values = []
        for feature, text in zip(self.table_features, feature_texts):
            value, reason = parse_value(feature, text)
            if reason:
                self.report.quarantine(line, reason)
                return
            values.append(value)
        if self.derived:
            patient_id = patient_id.strip()
            if not patient_id:
                self.report.quarantine(line, f"{PATIENT_ID}: empty")
                return
            if patient_id in self.seen:
                self.report.quarantine(line, f"{PATIENT_ID}: duplicate patient")
                return
            self.seen.add(patient_id)
            self.patient_ids.append(patient_id)
            self.lines.append(line)
            it = iter(values)
            values = [math.nan if i in self.derived else next(it) for i in range(len(self.study.features))]
        self.values.extend(values)
        self.row_count += 1
        self.labels.append(int(label_text))

    def table(self, path: Path, *, lines: int | None = None) -> SiteTable:
        """The loaded split. Fatal: no usable row, or fewer than half of the file's data lines
        (`lines`, default the records read) loaded: a file that lost most of itself is not used."""
        features = np.frombuffer(self.values, dtype=np.float64).reshape(self.row_count, len(self.study.features))
        labels = np.frombuffer(self.labels, dtype=np.float32)
        if self.derived and self.row_count:
            from client.site_derived import derive_table_inputs

            reasons = derive_table_inputs(self.study, self.derivation, path, raw=features,
                                          patient_ids=self.patient_ids, report=self.report)
            keep = np.array([r is None for r in reasons], dtype=bool)
            for line, reason in zip(self.lines, reasons):
                if reason:
                    self.report.quarantine(line, reason)
            features, labels = features[keep], labels[keep]
        for j, feature in enumerate(self.study.features):
            missing = int(np.isnan(features[:, j]).sum()) if features.size else 0
            if missing:
                self.report.missing_by_feature[feature.name] += missing
        self.report.rows_loaded = len(features)
        if not len(features):
            raise SiteDataError(f"{path}: no usable rows\n{self.report.summary()}")
        total = max(lines or 0, self.report.rows_read)
        if total >= MIN_LINES_FOR_SHARE and 2 * len(features) < total:
            raise SiteDataError(f"{path}: only {len(features)} of {total} data lines loaded; the file is not used "
                                f"(fix it, or remove the bad lines)\n{self.report.summary()}")
        return SiteTable(features=features, labels=labels, report=self.report)


def _check_columns(wanted: list[str], path: Path, header: list[str], where: str) -> list[str]:
    """The columns the study needs (`_RowCollector.columns`), present once each; returns the ignored extra columns."""
    absent = [name for name in wanted if name not in header]
    if absent:
        raise SiteDataError(f"{path}: {where}: missing columns required by the study: {', '.join(absent)}")
    duplicated = sorted({h for h in header if header.count(h) > 1 and h in wanted})
    if duplicated:
        raise SiteDataError(f"{path}: {where}: duplicated columns: {', '.join(duplicated)}")
    return [h for h in header if h not in wanted]


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
    collector = _RowCollector(study, report)
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise SiteDataError(f"{path}: empty file (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise SiteDataError(f"{path}: line 1: unreadable header: {err}") from None
        header = [h.strip() for h in header]
        report.ignored_columns = _check_columns(collector.columns, path, header, "line 1")
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


def _cell_text(value: object) -> str:
    """A Parquet cell as the CSV reader would see it (None is missing; 1.0 is "1")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


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
    collector = _RowCollector(study, report)
    report.ignored_columns = _check_columns(collector.columns, path, header, "schema")
    names = [f.name for f in collector.table_features]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=collector.columns):
            columns = [batch.column(name).to_pylist() for name in names]
            labels = batch.column(study.label.name).to_pylist()
            ids = batch.column(PATIENT_ID).to_pylist() if collector.derived else None
            for i, label in enumerate(labels):
                row += 1
                collector.add(row, _cell_text(label), [_cell_text(col[i]) for col in columns],
                              _cell_text(ids[i]) if ids is not None else "")
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
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: site data directory not found")
    return SiteData(*(read_split(study, *split_source(site_dir, split)) for split in ("train", "test")))
