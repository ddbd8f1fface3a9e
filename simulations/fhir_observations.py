"""Inverting observation features into dated Observations: score series, wearable means, BMI.

`render_observations` writes one patient's Observations for the study's `observation` and
`bmi` features from the row's values, so that the mapping's aggregate over its window gives
the value back: `latest` / `count` / `slope_per_30d` on one code set become a series of
assessments, `mean` nightly or daily readings, `any` one reading, a bmi a height and a weight;
plus the distractors that must not change any of them. Windows, codes and units come from
each feature's parsed `fedcare.mapping.FeatureRule`.
"""

from __future__ import annotations

import math

import numpy as np

from fedcare.mapping import CONVERSIONS, Code
from simulations.fhir_resources import (
    FeatureColumn,
    NotRepresentable,
    PatientRecords,
    distinct_days,
    observation,
    pick,
    quantity,
    weighted,
)
from simulations.fhir_vocabulary import (
    BMI_HEIGHT_UNIT,
    BMI_WEIGHT_UNIT,
    CATEGORIES,
    LOINC,
    UCUM,
    UNIT_VARIANTS,
    concrete_codes,
    matches,
)

# Heights as sites record them: (UCUM code, decimals), drawn with HEIGHT_WEIGHTS; weights in
# UNIT_VARIANTS["kg"] order (kg, [lb_av], g), drawn with WEIGHT_WEIGHTS.
HEIGHT_UNITS = (("cm", 1), ("[in_i]", 1), ("m", 2))
HEIGHT_WEIGHTS = (0.6, 0.25, 0.15)
WEIGHT_WEIGHTS = (0.65, 0.3, 0.05)
# Observations no feature reads, rendered unless a feature's codes match them: (code, unit).
UNRELATED_OBSERVATIONS = (((LOINC, "55758-7"), "{score}"), ((LOINC, "8867-4"), "/min"), ((LOINC, "8480-6"), "mm[Hg]"), ((LOINC, "8310-5"), "Cel"))


def render_observations(p: PatientRecords, observed: list[FeatureColumn], bmis: list[FeatureColumn], row: np.ndarray, female: float) -> None:
    """All of one patient's Observations: `observed` features grouped by code set, then `bmis`, then distractors."""
    groups: dict[tuple[Code, ...], dict[str, FeatureColumn]] = {}
    for f in observed:
        key = tuple(sorted(f.rule.codes))
        if f.rule.aggregate in groups.setdefault(key, {}):
            raise NotImplementedError(f"two features aggregate {key} by {f.rule.aggregate}")
        groups[key][f.rule.aggregate] = f
    for key, members in groups.items():
        render_observation_group(p, list(key), members, row)
    for f in bmis:
        render_bmi(p, f, row, female)
    read = [c for key in groups for c in key] + [c for f in bmis for c in f.rule.weight_codes + f.rule.height_codes]
    for code, unit in UNRELATED_OBSERVATIONS:
        if matches(*code, read) or p.rng.random() < 0.6:
            continue
        p.distractors += 1
        reading = {"{score}": float(p.rng.integers(0, 7)), "/min": float(p.rng.integers(55, 110)), "mm[Hg]": float(p.rng.integers(100, 165)), "Cel": round(float(p.rng.normal(36.8, 0.3)), 1)}[unit]
        value = quantity(p.rng, reading, unit, integer=unit != "Cel") if unit in UNIT_VARIANTS else {"value": reading, "unit": "mmHg", "system": UCUM, "code": unit}
        observation(p, code, p.when(int(p.rng.integers(1, 400))), value, CATEGORIES.get(unit, "vital-signs"))


def score_like(rng: np.random.Generator, center: float, low: float, high: float, integer: bool) -> float:
    value = float(np.clip(center + rng.normal(0, max(1.0, 0.15 * (high - low))), low, high))
    return float(round(value)) if integer else round(value, 1)


def render_observation_group(p: PatientRecords, codes: list[Code], feats: dict[str, FeatureColumn], row: np.ndarray) -> None:
    """All observation features sharing one code set: `mean` alone, `any` alone, or latest / count / slope_per_30d."""
    rng = p.rng
    concrete = concrete_codes(codes)
    aggs = set(feats)
    unit = next(iter(feats.values())).rule.unit
    category = CATEGORIES.get(unit)
    windows = {agg: f.rule.window_days for agg, f in feats.items()}
    outer = max(windows.values())
    clinic = (int(rng.integers(9, 17)), pick(rng, [0, 15, 30, 45]), pick(rng, ["Z", "+01:00", "+02:00"]))

    def emit(days_before: int, value: float, integer: bool, status: str = "final", time_key: str = "effectiveDateTime", same_clock: bool = False) -> None:
        if time_key == "effectivePeriod":  # a night's sleep starts the evening before; local date = UTC date
            when = p.when(days_before, hour=int(rng.integers(21, 24)), offset=pick(rng, ["Z", "+01:00", "+02:00"]))
        else:
            when = p.when(days_before, *clinic) if same_clock else p.when(days_before)
        whole = integer and float(value) == round(float(value))
        hours = float(value) if unit == "h" and time_key == "effectivePeriod" else 0.0
        observation(p, pick(rng, concrete), when, quantity(rng, value, unit, whole), category, status, time_key, hours)

    if aggs == {"mean"}:
        f = feats["mean"]
        w = windows["mean"]
        value = float(row[f.column])
        if not math.isnan(value):
            k = int(rng.integers(3, min(10, w - 1) + 1)) if w > 4 else 1
            vals = np.full(k, value)
            sd = 0.08 * abs(value)
            for _ in range(30):  # nightly / daily readings scattered around the mean, mean exactly the value
                noise = rng.normal(0, sd, k) if k > 1 else np.zeros(1)
                trial = value + (noise - noise.mean())
                if trial.min() >= f.low and trial.max() <= f.high and (value <= 0 or trial.min() > 0):
                    vals = trial
                    break
                sd /= 2
            for d, v in zip(distinct_days(rng, k, 1, w - 1), vals):
                emit(d, float(v), f.integer, time_key="effectivePeriod" if unit == "h" and rng.random() < 0.5 else "effectiveDateTime")
            if rng.random() < 0.05:  # a reading entered in error inside the window
                p.distractors += 1
                emit(int(rng.integers(1, w)), abs(value) * 2.0 + 1.0, f.integer, status="entered-in-error")
        if rng.random() < 0.3:  # an older reading just outside the window
            p.distractors += 1
            ref = value if not math.isnan(value) else f.center
            emit(w + int(rng.integers(2, 40)), max(abs(ref) * float(rng.uniform(0.6, 1.4)), 0.5), f.integer)
        return

    if aggs == {"any"}:
        f = feats["any"]
        if row[f.column] == 1:
            emit(int(rng.integers(1, windows["any"])), float(rng.integers(1, 10)), True)
        return

    if aggs - {"latest", "count", "slope_per_30d"}:
        raise NotImplementedError(f"observation aggregates {sorted(aggs)} on one code set")
    latest_f, count_f, slope_f = feats.get("latest"), feats.get("count"), feats.get("slope_per_30d")
    if count_f is not None and latest_f is not None and windows["count"] != windows["latest"]:
        raise NotImplementedError("latest and count over different windows on one code set")
    if slope_f is not None and windows["slope_per_30d"] > outer - 3 and len(aggs) > 1:
        raise NotImplementedError("a slope window must be shorter than the latest / count window")
    latest = float(row[latest_f.column]) if latest_f else math.nan
    slope = float(row[slope_f.column]) if slope_f else math.nan
    w_slope = windows.get("slope_per_30d", 0)
    low, high = (latest_f.low, latest_f.high) if latest_f else (0.0, 10.0)
    integer = latest_f.integer if latest_f else True
    if latest_f is not None:  # scores are whole numbers unless the study says otherwise
        integer = latest_f.integer or (math.isnan(latest) or latest == round(latest))
    has_slope = slope_f is not None and not math.isnan(slope)
    if count_f is not None:
        if math.isnan(row[count_f.column]):
            raise NotRepresentable(f"{count_f.name} cannot be missing (a count is 0 without records)")
        n = int(row[count_f.column])
    elif latest_f is not None and math.isnan(latest):
        n = 0
    else:
        n = int(rng.integers(2 if has_slope else 1, 5))
    if latest_f is not None and math.isnan(latest) != (n == 0):
        raise NotRepresentable(f"{latest_f.name} is {'missing' if math.isnan(latest) else 'present'} with {n} records")
    if has_slope and n < 2:
        raise NotRepresentable(f"{slope_f.name} needs >= 2 records, have {n}")
    if math.isnan(latest) and n > 0:
        latest = score_like(rng, (low + high) / 3, low, high, integer)
    records: list[tuple[int, float]] = []  # (days before index, value), most recent first
    if has_slope:
        m = min(n, 3 if rng.random() < 0.3 else 2)  # assessments inside the slope window, on a straight line
        room = (latest - low) if slope > 0 else (high - latest)  # going back in time the score moves by -slope
        span_max = w_slope - 2 if slope == 0 else min(w_slope - 2, int(math.floor(30 * room / abs(slope))))
        span_max = max(span_max, m - 1)
        span = int(rng.integers(min(max(7, m - 1), span_max), span_max + 1))
        first = int(rng.integers(1, w_slope - span))
        offsets = [0, span] if m == 2 else [0, int(rng.integers(1, span)), span]
        records += [(first + off, latest - slope * off / 30) for off in offsets]
        older = sorted(int(x) for x in rng.integers(w_slope + 1, outer, size=n - m))
    elif n > 0:
        if slope_f is not None and n >= 2 and outer - w_slope >= 3:
            # no trend: at most one assessment inside the slope window, the rest before it
            first = int(rng.integers(1, w_slope)) if rng.random() < 0.5 else int(rng.integers(w_slope + 1, outer - 1))
            older = sorted(int(x) for x in rng.integers(max(first, w_slope) + 1, outer, size=n - 1))
        elif slope_f is not None and n >= 2:
            first = int(rng.integers(1, outer))
            older = [first] * (n - 1)  # all on one day: no slope
        else:
            first = int(rng.integers(1, outer - 1))
            older = sorted(int(x) for x in rng.integers(first + 1, outer, size=n - 1))
        records.append((first, latest))
    else:
        older = []
    records += [(d, score_like(rng, latest, low, high, integer)) for d in older]
    latest_only = aggs == {"latest"}
    for d, v in records:
        emit(d, v, integer, same_clock=True, time_key="issued" if latest_only and rng.random() < 0.1 else "effectiveDateTime")
    if rng.random() < 0.25:  # an assessment older than every window
        p.distractors += 1
        emit(outer + int(rng.integers(5, 300)), score_like(rng, (low + high) / 3, low, high, integer), integer, same_clock=True)
    if rng.random() < 0.05:  # entered in error, at least as recent as the real ones
        p.distractors += 1
        emit(max(1, records[0][0] - 1) if records else int(rng.integers(1, outer)), high, integer, status="entered-in-error", same_clock=True)


def render_bmi(p: PatientRecords, f: FeatureColumn, row: np.ndarray, female: float) -> None:
    """Heights and weights whose latest in the window give the bmi: weight / height²."""
    rng = p.rng
    w = f.rule.window_days
    weight_codes = concrete_codes(f.rule.weight_codes)
    height_codes = concrete_codes(f.rule.height_codes)
    bmi = row[f.column]
    height_m = float(np.clip(rng.normal(1.63 if female == 1 else 1.77 if female == 0 else 1.70, 0.07), 1.4, 2.05))

    def height_record(days_before: int, h: float) -> float:
        """Write a height observation; returns the height in m the weight is computed from."""
        code, decimals = HEIGHT_UNITS[weighted(rng, HEIGHT_WEIGHTS)]
        unit = next(u for u in UNIT_VARIANTS[BMI_HEIGHT_UNIT] if u.code == code)
        value = round(unit.from_target(h), decimals)
        observation(p, pick(rng, height_codes), p.when(days_before), {"value": value, "unit": unit.display, "system": UCUM, "code": code}, "vital-signs")
        return _height_in_m(code, value)

    def weight_record(days_before: int, kg: float) -> None:
        reported = quantity(rng, kg, BMI_WEIGHT_UNIT, weights=WEIGHT_WEIGHTS)
        observation(p, pick(rng, weight_codes), p.when(days_before), reported, "vital-signs")

    if not math.isnan(bmi):
        h_days = distinct_days(rng, int(rng.integers(1, 3)), 1, w - 1)
        w_days = distinct_days(rng, int(rng.integers(1, 4)), 1, w - 1)
        as_m = height_record(h_days[0], height_m)
        for d in h_days[1:]:
            height_record(d, height_m + rng.normal(0, 0.005))
        weight_record(w_days[0], bmi * as_m * as_m)
        for d in w_days[1:]:
            weight_record(d, round(bmi * height_m**2 + rng.normal(0, 2.5), 1))
        if rng.random() < 0.3:  # a BMI the EHR computed itself: not what the mapping reads
            observation(p, (LOINC, "39156-5"), p.when(w_days[0]), {"value": round(bmi, 1), "unit": "kg/m2", "system": UCUM, "code": "kg/m2"}, "vital-signs")
    else:
        if rng.random() < 0.3:  # height in the window but no weight
            height_record(int(rng.integers(1, w)), height_m)
    if rng.random() < 0.3:  # measurements from before the window
        d = w + int(rng.integers(5, 400))
        height_record(d, height_m)
        usual = bmi * height_m**2 if not math.isnan(bmi) else float(rng.normal(28, 5)) * height_m**2
        weight_record(d, round(float(np.clip(usual * rng.uniform(0.9, 1.1), 35, 250)), 1))


def _height_in_m(code: str, value: float) -> float:
    """A reported height in m, as the weight is computed from it: the kernel's conversion, but a
    height in cm is divided by 100 where `CONVERSIONS` multiplies by 1/100 (the last bit differs
    for about one value in seven; kept so renders stay byte-identical with earlier ones)."""
    if code == "cm":
        return value / 100
    return CONVERSIONS[BMI_HEIGHT_UNIT][code](value)
