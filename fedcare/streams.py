"""Sensor streams (heart rate, HRV, steps, sleep…) as per-patient windowed features.

A study feature over a sensor is a `SensorRule`: the codes of its readings, the unit its
values are aggregated in, a look-back window and an aggregate. The same code runs at the
training site (`client/readings.py`, a table of readings) and in the inference service (one
patient's readings), so a served feature is bit for bit the value training saw for the same
readings in the same order. Only stdlib, numpy and `fedcare.*` are imported here.

A reading dated on day `d` (a date ordinal) counts for a rule when `index_day - window_days <
d <= index_day`. The aggregates, over the readings that count:

* `mean`: their arithmetic mean; NaN (missing) when there are none;
* `sd`: their sample standard deviation (ddof = 1); NaN when fewer than 2;
* `slope_per_30d`: the ordinary least-squares slope of value against day, × 30 (a change per 30
  days); NaN when they fall on fewer than 2 distinct days;
* `days_covered`: the fraction of the window's `window_days` days with at least one reading;
  0.0 when there are none (never missing).

`StreamAggregator` keeps per (patient, rule) cell a count, integer sums of the day offset `t =
day - index_day` and its square (exact, in any order), and float64 sums of `v - k`, `(v - k)²`
and `t·(v - k)`, where `k` is the cell's first reading (shifting by it keeps the sums of squares
from cancelling); `days_covered` rules keep one bit per window day. Memory follows patients ×
rules (× window days for `days_covered`), never readings. Float sums are accumulated reading by
reading in the order given (`numpy.add.at`), so splitting the same readings into any chunks gives
identical bits; a different order may change the last bits only.

`RuleIndex` maps a reading's (system, code) to the rules it feeds (exact codes and prefixes,
compared with `normalize_code`) and its unit to each rule's conversion (`CONVERSIONS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcare.mapping import CONVERSIONS, UNIT_ALIASES, Code, normalize_code

AGGREGATES = ("mean", "sd", "slope_per_30d", "days_covered")
UCUM_UNITS = frozenset(unit for table in CONVERSIONS.values() for unit in table)
Conversion = Callable[[Any], Any]  # a float or an ndarray in the reading's unit -> the rule's unit
_MAX_CACHE = 1 << 16  # memoized lookups are bounded: codes and units come from the data
_EXACT_INT_BOUND = 3_000_000_000  # n · window below this: n·Σt² - (Σt)² fits in int64


@dataclass(frozen=True)
class SensorRule:
    """One study feature over a sensor: which readings, in which unit, which window, which aggregate."""

    feature: str
    codes: tuple[Code, ...]
    unit: str
    window_days: int
    aggregate: str

    def __post_init__(self) -> None:
        if not self.feature:
            raise ValueError("SensorRule.feature: expected a feature name")
        if not self.codes or not all(isinstance(c, Code) for c in self.codes):
            raise ValueError(f"SensorRule {self.feature}: codes: expected a non-empty tuple of Code")
        if self.unit not in CONVERSIONS:
            raise ValueError(f"SensorRule {self.feature}: no known conversion to unit '{self.unit}' "
                             f"(known units: {', '.join(CONVERSIONS)})")
        if isinstance(self.window_days, bool) or not isinstance(self.window_days, int) or self.window_days < 1:
            raise ValueError(f"SensorRule {self.feature}: window_days: expected an integer >= 1")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"SensorRule {self.feature}: aggregate: expected one of {', '.join(AGGREGATES)}")


class RuleIndex:
    """Which rules a reading feeds, and how its unit converts to each rule's unit.

    `unit_aliases` maps lower-case non-UCUM spellings ("bpm", "hours") to UCUM codes (default:
    `fedcare.mapping.UNIT_ALIASES`, the FHIR reader's; `{}` for none); a unit that is a UCUM code
    of `CONVERSIONS` is taken as is.
    """

    def __init__(self, rules: Sequence[SensorRule], *, unit_aliases: Mapping[str, str] | None = None) -> None:
        self.rules = tuple(rules)
        self.aliases = dict(UNIT_ALIASES if unit_aliases is None else unit_aliases)
        self._exact: dict[tuple[str, str], list[int]] = {}
        self._prefixes: dict[str, dict[int, dict[str, list[int]]]] = {}
        self._cache: dict[tuple[str, str], tuple[int, ...]] = {}
        for i, rule in enumerate(self.rules):
            for code in rule.codes:
                text = normalize_code(code.system, code.code)
                if code.is_prefix:
                    table = self._prefixes.setdefault(code.system, {}).setdefault(len(text), {})
                    table.setdefault(text, []).append(i)
                else:
                    self._exact.setdefault((code.system, text), []).append(i)

    def match(self, system: str, code: str) -> tuple[int, ...]:
        """The indices of the rules a reading coded (system, code) feeds, ascending, each once."""
        key = (system, code)
        found = self._cache.get(key)
        if found is None:
            text = normalize_code(system, code)
            hits = list(self._exact.get((system, text), ()))
            for length, table in self._prefixes.get(system, {}).items():
                hits += table.get(text[:length], ())
            found = tuple(sorted(set(hits)))
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[key] = found
        return found

    def pairs(self, systems: Sequence[str], codes: Sequence[str], system_of: np.ndarray,
              code_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Readings coded (systems[system_of[i]], codes[code_of[i]]) as (reading, rule) index pairs,
        one per rule a reading feeds, in reading order then rule order (vectorized `match`)."""
        key = np.asarray(system_of, np.int64) * len(codes) + np.asarray(code_of, np.int64)
        keys, inverse = dense_unique(key, len(systems) * len(codes))
        found = [self.match(systems[k // len(codes)], codes[k % len(codes)]) for k in keys.tolist()]
        offsets = np.cumsum([0] + [len(f) for f in found], dtype=np.int64)
        flat = np.array([r for f in found for r in f], np.int64)
        count = np.diff(offsets)[inverse]
        reading = np.repeat(np.arange(len(key)), count)
        within = np.arange(len(reading)) - np.repeat(np.cumsum(count) - count, count)
        return reading, flat[np.repeat(offsets[inverse], count) + within]

    def convert(self, rule: np.ndarray, value: np.ndarray, units: Sequence[str],
                unit_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values in each rule's unit, refused): pair i is `value[i]` written in units[unit_of[i]] for
        rule `rule[i]`; refused where that unit has no conversion (its value is then NaN)."""
        key = np.asarray(unit_of, np.int64) * len(self.rules) + np.asarray(rule, np.int64)
        groups, group_of = dense_unique(key, (int(np.max(unit_of, initial=0)) + 1) * len(self.rules))
        converted = np.full(len(key), np.nan)
        refused = np.zeros(len(key), bool)
        for g, k in enumerate(groups.tolist()):
            members = np.flatnonzero(group_of == g)
            convert = self.conversion(k % len(self.rules), units[k // len(self.rules)])
            if convert is None:
                refused[members] = True
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    converted[members] = convert(np.asarray(value, np.float64)[members])
        return converted, refused

    def source_unit(self, unit: str) -> str:
        """The UCUM code a written unit stands for (aliases looked up in lower case)."""
        unit = unit.strip()
        return unit if unit in UCUM_UNITS else self.aliases.get(unit.lower(), unit)

    def conversion(self, rule: int, unit: str) -> Conversion | None:
        """The conversion of values written in `unit` to rule `rule`'s unit, or None if there is none."""
        return CONVERSIONS[self.rules[rule].unit].get(self.source_unit(unit))


class StreamAggregator:
    """Per-patient accumulators for a study's SensorRules; memory follows patients × rules, never readings."""

    def __init__(self, rules: Sequence[SensorRule], *, index_day: int, patients: int) -> None:
        self.rules = tuple(rules)
        if patients < 0:
            raise ValueError("patients: expected a count >= 0")
        self.index_day, self.patients = int(index_day), int(patients)
        size = self.patients * len(self.rules)
        self._windows = np.array([r.window_days for r in self.rules], dtype=np.int64)
        self._n = np.zeros(size, np.int64)
        self._st = np.zeros(size, np.int64)
        self._stt = np.zeros(size, np.int64)
        self._sv = np.zeros(size, np.float64)
        self._svv = np.zeros(size, np.float64)
        self._stv = np.zeros(size, np.float64)
        self._shift = np.zeros(size, np.float64)
        self._shifted = np.zeros(size, bool)
        self._days = {i: np.zeros((self.patients, r.window_days), bool)
                      for i, r in enumerate(self.rules) if r.aggregate == "days_covered"}
        self.used = np.zeros(len(self.rules), np.int64)  # readings counted, per rule
        self.outside = np.zeros(len(self.rules), np.int64)  # readings outside the rule's window, per rule

    def grow(self, patients: int) -> None:
        """Room for `patients` rows (a FHIR export meets its patients as it goes); cells are patient-major,
        so existing sums keep their place."""
        extra = (int(patients) - self.patients) * len(self.rules)
        if extra <= 0:
            return
        for name in ("_n", "_st", "_stt", "_sv", "_svv", "_stv", "_shift", "_shifted"):
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.zeros(extra, old.dtype)]))
        for i, seen in self._days.items():
            self._days[i] = np.vstack([seen, np.zeros((int(patients) - self.patients, seen.shape[1]), bool)])
        self.patients = int(patients)

    def summary_lines(self) -> list[str]:
        """Counts only: readings used and outside the window, per rule's feature."""
        return [f"readings for {rule.feature}: {int(self.used[i])} used, {int(self.outside[i])} outside its window"
                for i, rule in enumerate(self.rules)]

    def in_window(self, rule: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Which (rule, day) pairs fall in their rule's window (index_day - window_days, index_day]."""
        t = np.asarray(day, np.int64) - self.index_day
        return (t <= 0) & (t > -self._windows[np.asarray(rule, np.int64)])

    def add(self, *, patient: np.ndarray, rule: np.ndarray, day: np.ndarray, value: np.ndarray) -> None:
        """Count readings: row indices (0..patients-1), rule indices, date ordinals, values in the rule's unit.

        Readings outside their rule's window are ignored (counted in `outside`); a non-finite
        value or an index out of range is a ValueError (readers quarantine such readings first).
        """
        patient, rule = np.asarray(patient, np.int64).ravel(), np.asarray(rule, np.int64).ravel()
        day, value = np.asarray(day, np.int64).ravel(), np.asarray(value, np.float64).ravel()
        if not len(patient) == len(rule) == len(day) == len(value):
            raise ValueError("patient, rule, day and value must have the same length")
        if not len(patient):
            return
        if patient.min() < 0 or patient.max() >= self.patients or rule.min() < 0 or rule.max() >= len(self.rules):
            raise ValueError("patient or rule index out of range")
        if not np.isfinite(value).all():
            raise ValueError("values must be finite")
        inside = self.in_window(rule, day)
        self.outside += np.bincount(rule[~inside], minlength=len(self.rules))
        if not inside.all():
            patient, rule, day, value = patient[inside], rule[inside], day[inside], value[inside]
        self.used += np.bincount(rule, minlength=len(self.rules))
        cell = patient * len(self.rules) + rule
        fresh = ~self._shifted[cell]
        if fresh.any():  # a cell's shift is its first reading, whichever chunk brings it
            cells, first = np.unique(cell[fresh], return_index=True)
            self._shift[cells] = value[fresh][first]
            self._shifted[cells] = True
        t = day - self.index_day
        with np.errstate(over="ignore", invalid="ignore"):  # absurd finite values may overflow to inf, as numpy's sums
            v = value - self._shift[cell]
            np.add.at(self._n, cell, 1)
            np.add.at(self._st, cell, t)
            np.add.at(self._stt, cell, t * t)
            np.add.at(self._sv, cell, v)
            np.add.at(self._svv, cell, v * v)
            np.add.at(self._stv, cell, t * v)
        for i, seen in self._days.items():
            mine = rule == i
            seen[patient[mine], t[mine] + self._windows[i] - 1] = True

    def results(self) -> np.ndarray:
        """The features so far: float64 (patients × rules), NaN where an aggregate is missing."""
        shape = (self.patients, len(self.rules))
        n, st, stt = (a.reshape(shape) for a in (self._n, self._st, self._stt))
        sv, svv, stv, shift = (a.reshape(shape) for a in (self._sv, self._svv, self._stv, self._shift))
        out = np.full(shape, np.nan)
        nf = n.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i, rule in enumerate(self.rules):
                c = (slice(None), i)
                if rule.aggregate == "mean":
                    out[c] = np.where(n[c] > 0, shift[c] + sv[c] / nf[c], np.nan)
                elif rule.aggregate == "sd":
                    var = np.maximum(svv[c] - sv[c] * sv[c] / nf[c], 0.0) / (nf[c] - 1)
                    out[c] = np.where(n[c] > 1, np.sqrt(var), np.nan)
                elif rule.aggregate == "slope_per_30d":
                    spread = _spread(n[c], st[c], stt[c], rule.window_days)  # 0 iff < 2 distinct days
                    slope = 30.0 * (nf[c] * stv[c] - st[c].astype(np.float64) * sv[c]) / spread
                    out[c] = np.where(spread > 0, slope, np.nan)
                else:
                    out[c] = self._days[i].sum(axis=1) / rule.window_days
        return out


def dense_unique(key: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(key, return_inverse=True)` for keys in 0..size-1: without a sort when size is small."""
    key = np.asarray(key, np.int64)
    if size > 4 * len(key) + 4096:
        keys, inverse = np.unique(key, return_inverse=True)
        return keys, inverse.ravel()
    present = np.zeros(size, bool)
    present[key] = True
    keys = np.flatnonzero(present)
    remap = np.zeros(size, np.int64)
    remap[keys] = np.arange(len(keys))
    return keys, remap[key]


def _spread(n: np.ndarray, st: np.ndarray, stt: np.ndarray, window: int) -> np.ndarray:
    """n·Σt² - (Σt)² as float64, computed exactly in integers (Python ints where int64 could overflow)."""
    if not len(n) or int(n.max()) * window < _EXACT_INT_BOUND:
        return (n * stt - st * st).astype(np.float64)
    exact = [int(a) * int(b) - int(c) * int(c) for a, b, c in zip(n.tolist(), stt.tolist(), st.tolist())]
    return np.array(exact, dtype=np.float64)


@dataclass(frozen=True)
class Reading:
    """One sensor reading as the inference service receives it (day = date ordinal)."""

    system: str
    code: str
    day: int
    value: float
    unit: str


def aggregate_patient(rules: Sequence[SensorRule], readings: Iterable[Reading], *, index_day: int,
                      index: RuleIndex | None = None) -> np.ndarray:
    """One patient's features (float64, one per rule) through the same `StreamAggregator` as training.

    Readings matching no rule are skipped. A reading whose unit does not convert to a rule's
    unit, or whose converted value is not finite, is a ValueError naming its position (never
    its value). Same readings in the same order as the site's table → the same bits.
    """
    index = index or RuleIndex(rules)
    if index.rules != tuple(rules):
        raise ValueError("index: built from other rules")
    rule_ids: list[int] = []
    days: list[int] = []
    values: list[float] = []
    for position, reading in enumerate(readings):
        for r in index.match(reading.system, reading.code):
            convert = index.conversion(r, reading.unit)
            if convert is None:
                raise ValueError(f"reading {position}: unit not convertible to {index.rules[r].unit}")
            value = float(convert(float(reading.value)))
            if not math.isfinite(value):
                raise ValueError(f"reading {position}: value not finite (NaN/Inf)")
            rule_ids.append(r)
            days.append(reading.day)
            values.append(value)
    aggregator = StreamAggregator(index.rules, index_day=index_day, patients=1)
    aggregator.add(patient=np.zeros(len(rule_ids), np.int64), rule=np.array(rule_ids, np.int64),
                   day=np.array(days, np.int64), value=np.array(values, np.float64))
    return aggregator.results()[0]
