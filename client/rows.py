"""One site record checked into the study's table (`RowCollector`), shared by every reader of
one-row-per-patient data: CSV and Parquet (`client/data.py`) and a site's own SQL query
(`client/database_site.py`).

The label, then each table feature in spec order, goes through the CSV cell checks
(`client.tables.parse_value`); a bad record is quarantined with its line (or row) and reason.
"""

from __future__ import annotations

import math
from decimal import Decimal
from array import array
from pathlib import Path

import numpy as np

from client.tables import LoadReport, SiteDataError, SiteTable, parse_value
from fedcare.study import Study

MIN_LINES_FOR_SHARE = 10  # below this many lines, only "no usable row" is fatal
PATIENT_ID = "patient_id"  # the table's column joining notes and readings to rows (studies that derive features)


class RowCollector:
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


def check_columns(wanted: list[str], path: Path, header: list[str], where: str) -> list[str]:
    """The columns the study needs (`_RowCollector.columns`), present once each; returns the ignored extra columns."""
    absent = [name for name in wanted if name not in header]
    if absent:
        raise SiteDataError(f"{path}: {where}: missing columns required by the study: {', '.join(absent)}")
    duplicated = sorted({h for h in header if header.count(h) > 1 and h in wanted})
    if duplicated:
        raise SiteDataError(f"{path}: {where}: duplicated columns: {', '.join(duplicated)}")
    return [h for h in header if h not in wanted]


def cell_text(value: object) -> str:
    """A Parquet or database cell as the CSV reader would see it (None is missing; 1.0 and Decimal("1.0")
    are "1")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)
