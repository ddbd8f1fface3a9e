"""What every site reader (CSV, Parquet, FHIR) shares: the loaded table, its load report, the
error for unusable data, and the checks one value goes through (`parse_value`).

A leaf of `client/`: it imports no other reader, so `client/data.py` and the FHIR modules
both build on it. Only counts and line numbers are reported, never values.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fedcare.errors import FedcareError
from fedcare.study import Feature

MISSING_TOKENS = frozenset({"", "na", "nan", "null", "none"})
MAX_EXAMPLES_PER_REASON = 5


class SiteDataError(FedcareError, ValueError):
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
    derived: list[str] = field(default_factory=list)  # counts-only lines about notes and readings read

    def quarantine(self, line: int, reason: str) -> None:
        self.quarantined[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(line)

    def reject(self, where: str, reason: str, count: int = 1) -> None:
        """Count `count` quarantined items for `reason`, keeping a few locations (`where`: text, e.g.
        `file:line` or `measurement_id 7`) as examples; readers whose locations are not line numbers."""
        self.quarantined[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(where)  # type: ignore[arg-type]

    def summary(self) -> str:
        lines = [f"{self.path}: {self.rows_loaded}/{self.rows_read} rows loaded"]
        for reason, count in sorted(self.quarantined.items()):
            where = ", ".join(str(n) for n in self.examples[reason])
            lines.append(f"  quarantined {count}: {reason} (lines {where}{', ...' if count > len(self.examples[reason]) else ''})")
        if self.ignored_columns:
            lines.append(f"  ignored columns not in the study: {', '.join(self.ignored_columns)}")
        lines += ["  " + line for line in self.derived]
        return "\n".join(lines)


@dataclass(frozen=True)
class SiteTable:
    """Raw features (NaN = missing, spec order) and 0/1 labels of one split."""

    features: np.ndarray
    labels: np.ndarray
    report: LoadReport


def parse_value(feature: Feature, text: str) -> tuple[float, str | None]:
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
