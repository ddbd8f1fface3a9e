"""Read a site's tabular export (CSV, one row per patient) against the study's feature spec.

Good rows load; a bad row is quarantined with a reason (line number, column, why) and
never crashes the reader. Only counts and line numbers are reported, never values.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcare.study import Feature, Study

MISSING_TOKENS = frozenset({"", "na", "nan", "null", "none"})
MAX_EXAMPLES_PER_REASON = 5
csv.field_size_limit(1 << 20)


class SiteDataError(ValueError):
    """The site's data cannot be used at all (missing file, missing columns, no usable row)."""


@dataclass
class LoadReport:
    """What happened to each row; counts only."""

    path: str
    rows_read: int = 0
    rows_loaded: int = 0
    quarantined: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    missing_by_feature: Counter = field(default_factory=Counter)
    ignored_columns: list[str] = field(default_factory=list)

    def quarantine(self, line: int, reason: str) -> None:
        self.quarantined[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(line)

    def summary(self) -> str:
        lines = [f"{self.path}: {self.rows_loaded}/{self.rows_read} rows loaded"]
        for reason, count in sorted(self.quarantined.items()):
            where = ", ".join(str(n) for n in self.examples[reason])
            lines.append(f"  quarantined {count}: {reason} (lines {where}{', ...' if count > len(self.examples[reason]) else ''})")
        if self.ignored_columns:
            lines.append(f"  ignored columns not in the study: {', '.join(self.ignored_columns)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SiteTable:
    """Raw features (NaN = missing, spec order) and 0/1 labels of one split."""

    features: np.ndarray
    labels: np.ndarray
    report: LoadReport


def _parse_value(feature: Feature, text: str) -> tuple[float, str | None]:
    """(value, None) or (nan, reason). Missing is (nan, None)."""
    if text.strip().lower() in MISSING_TOKENS:
        if feature.missing == "reject":
            return math.nan, f"{feature.name}: missing but the study's policy is 'reject'"
        return math.nan, None
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"{feature.name}: not a number"
    if not math.isfinite(value):
        return math.nan, f"{feature.name}: not finite (NaN/Inf)"
    if not feature.low <= value <= feature.high:
        return math.nan, f"{feature.name}: outside valid range [{feature.low:g}, {feature.high:g}] {feature.unit}"
    if feature.type in ("count", "binary") and value != int(value):
        return math.nan, f"{feature.name}: a {feature.type} must be a whole number"
    return value, None


def read_site_csv(study: Study, path: str | Path) -> SiteTable:
    """Load one CSV split; raises `SiteDataError` only when nothing usable can be loaded."""
    path = Path(path)
    report = LoadReport(path=str(path))
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    rows: list[list[float]] = []
    labels: list[int] = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise SiteDataError(f"{path}: empty file (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise SiteDataError(f"{path}: line 1: unreadable header: {err}") from None
        header = [h.strip() for h in header]
        wanted = [f.name for f in study.features] + [study.label.name]
        absent = [name for name in wanted if name not in header]
        if absent:
            raise SiteDataError(f"{path}: line 1: missing columns required by the study: {', '.join(absent)}")
        duplicated = sorted({h for h in header if header.count(h) > 1 and h in wanted})
        if duplicated:
            raise SiteDataError(f"{path}: line 1: duplicated columns: {', '.join(duplicated)}")
        report.ignored_columns = [h for h in header if h not in wanted]
        positions = [header.index(f.name) for f in study.features]
        label_pos = header.index(study.label.name)
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
            line = reader.line_num
            if not cells:
                continue
            report.rows_read += 1
            if len(cells) != len(header):
                report.quarantine(line, f"expected {len(header)} columns, got {len(cells)}")
                continue
            label_text = cells[label_pos].strip()
            if label_text not in ("0", "1"):
                report.quarantine(line, f"{study.label.name}: label must be 0 or 1")
                continue
            values, reason = [], None
            for feature, pos in zip(study.features, positions):
                value, reason = _parse_value(feature, cells[pos])
                if reason:
                    break
                values.append(value)
            if reason:
                report.quarantine(line, reason)
                continue
            for feature, value in zip(study.features, values):
                if math.isnan(value):
                    report.missing_by_feature[feature.name] += 1
            rows.append(values)
            labels.append(int(label_text))
    report.rows_loaded = len(rows)
    if not rows:
        raise SiteDataError(f"{path}: no usable rows\n{report.summary()}")
    return SiteTable(
        features=np.asarray(rows, dtype=np.float64),
        labels=np.asarray(labels, dtype=np.float32),
        report=report,
    )


@dataclass(frozen=True)
class SiteData:
    """A site's training and test splits, as read from `<site_dir>/{train,test}.csv`."""

    train: SiteTable
    test: SiteTable


def load_site(study: Study, site_dir: str | Path) -> SiteData:
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: site data directory not found")
    return SiteData(train=read_site_csv(study, site_dir / "train.csv"), test=read_site_csv(study, site_dir / "test.csv"))
