"""Per-patient accumulators of the FHIR reader (`client/fhir.py`): one small object per rule and
patient is the only state kept while a split is read. Each takes (day, value) facts in file
order and gives the aggregate of docs/FHIR.md: latest, mean, count (distinct onset days for
conditions), any, slope per 30 days, proportion of days covered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fedcare.mapping import FeatureRule


class Latest:
    """Value of the latest record (ties: the later one in file order)."""

    __slots__ = ("day", "value")

    def __init__(self) -> None:
        self.day = -1
        self.value = 0.0

    def add(self, day: int, value: Any) -> None:
        if day >= self.day:
            self.day, self.value = day, value

    def result(self) -> float | None:
        return self.value


class Mean:
    __slots__ = ("total", "n")

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def add(self, day: int, value: Any) -> None:
        self.total += value
        self.n += 1

    def result(self) -> float | None:
        return self.total / self.n


class Count:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def add(self, day: int, value: Any) -> None:
        self.n += 1

    def result(self) -> float | None:
        return float(self.n)


class DistinctDays:
    """Conditions are counted by distinct dates (one episode coded twice on a day is one)."""

    __slots__ = ("days",)

    def __init__(self) -> None:
        self.days: set[int] = set()

    def add(self, day: int, value: Any) -> None:
        self.days.add(day)

    def result(self) -> float | None:
        return float(len(self.days))


class Exists:
    __slots__ = ()

    def add(self, day: int, value: Any) -> None:
        pass

    def result(self) -> float | None:
        return 1.0


class Slope:
    """Least-squares slope of value vs day, × 30; needs >= 2 records on >= 2 distinct days."""

    __slots__ = ("origin", "n", "st", "stt", "sv", "stv", "first_day", "distinct")

    def __init__(self, origin: int) -> None:
        self.origin = origin  # days are taken relative to the index date, keeping the sums small
        self.n = self.st = self.stt = 0
        self.sv = self.stv = 0.0
        self.first_day: int | None = None
        self.distinct = False

    def add(self, day: int, value: Any) -> None:
        t = day - self.origin
        self.n += 1
        self.st += t
        self.stt += t * t
        self.sv += value
        self.stv += t * value
        if self.first_day is None:
            self.first_day = day
        elif day != self.first_day:
            self.distinct = True

    def result(self) -> float | None:
        if self.n < 2 or not self.distinct:
            return None
        denominator = self.n * self.stt - self.st * self.st
        return 30.0 * (self.n * self.stv - self.st * self.sv) / denominator


class Pdc:
    """Proportion of the window's days (lo, hi] covered by at least one supply [start, end)."""

    __slots__ = ("lo", "hi", "intervals")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.intervals: list[tuple[int, int]] = []

    def add(self, day: int, value: Any) -> None:
        start, end = max(day, self.lo + 1), min(value, self.hi + 1)
        if start < end:
            self.intervals.append((start, end))

    def result(self) -> float | None:
        covered, reach = 0, self.lo + 1
        for start, end in sorted(self.intervals):
            start = max(start, reach)
            if end > start:
                covered += end - start
                reach = end
        return covered / (self.hi - self.lo)


def accumulator(rule: FeatureRule, lo: int, hi: int) -> Callable[[], Any]:
    if rule.aggregate == "pdc":
        return functools.partial(Pdc, lo, hi)
    if rule.aggregate == "slope_per_30d":
        return functools.partial(Slope, hi)
    if rule.aggregate == "count" and rule.source == "condition":
        return DistinctDays
    return {"latest": Latest, "mean": Mean, "count": Count, "any": Exists}[rule.aggregate or "any"]
