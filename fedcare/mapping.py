"""The study's `[mapping]`: how each feature and the label derive from FHIR R4 (docs/FHIR.md).

`parse_mapping(table, feature_names, path)` validates the `[mapping]` table of a study file
into a frozen `Mapping`. Every mistake raises `fedcare.study.StudyConfigError` with one line
naming the file and the field, e.g.

    s.toml: mapping.features.phq9_latest.aggregate: expected one of latest, mean, count, any, slope_per_30d, pdc, got 'median'

The unit conversions the FHIR reader applies live here too (`CONVERSIONS`), so a mapping
naming a unit nobody can convert to fails at load, not at the first site.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from fedcare.fields import Fields

SOURCES = (
    "patient_age",
    "patient_female",
    "patient_extension",
    "observation",
    "bmi",
    "condition",
    "encounter",
    "medication",
    "note",
    "sensor",
)
# Sources derived on site from clinician notes and device readings (`fedcare/derived.py`), for
# tabular sites too (from `<split>.notes.csv` / `<split>.readings.csv` beside the table).
DERIVED_SOURCES = ("note", "sensor")
AGGREGATES = ("latest", "mean", "count", "any", "slope_per_30d", "pdc", "days_since", "sd", "days_covered")
# Aggregates each record-based source can compute (patient_* and bmi take none).
ALLOWED_AGGREGATES: dict[str, tuple[str, ...]] = {
    "observation": ("latest", "mean", "count", "any", "slope_per_30d"),
    "condition": ("count", "any"),
    "encounter": ("count", "any"),
    "medication": ("pdc", "any"),
    # affirmed mentions of the rule's marker in notes dated in the window (days_since: from the latest one)
    "note": ("count", "any", "days_since"),
    # readings in the window (`fedcare/streams.py`: sd is the sample sd, days_covered a fraction of the window)
    "sensor": ("mean", "sd", "slope_per_30d", "days_covered"),
}
# (required keys, optional keys) besides `source`, per source, for a feature rule.
FEATURE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "patient_age": ((), ("unit",)),
    "patient_female": ((), ()),
    "patient_extension": (("url",), ()),
    "observation": (("codes", "window_days", "aggregate", "unit"), ()),
    "bmi": (("weight_codes", "height_codes", "window_days"), ("unit",)),
    "condition": (("codes", "window_days", "aggregate"), ()),
    "encounter": (("classes", "window_days", "aggregate"), ("reason_codes",)),
    "medication": (("codes", "window_days", "aggregate"), ()),
    "note": (("marker", "window_days", "aggregate"), ()),
    "sensor": (("codes", "window_days", "aggregate", "unit"), ()),
}
# The same for one `[mapping.label] any_of` entry: always aggregate "any", a window after the index.
LABEL_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "observation": (("codes", "window_days_after"), ("aggregate",)),
    "condition": (("codes", "window_days_after"), ("aggregate",)),
    "encounter": (("classes", "window_days_after"), ("aggregate", "reason_codes")),
    "medication": (("codes", "window_days_after"), ("aggregate",)),
}
AGE_UNITS = ("years", "a")
BMI_UNITS = ("kg/m2",)
ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"})


def _scale(factor: float) -> Callable[[float], float]:
    return lambda x: x * factor


# Target unit -> {source UCUM code -> conversion}. Identity entries included (docs/FHIR.md "Units").
CONVERSIONS: dict[str, dict[str, Callable[[float], float]]] = {
    "kg": {"kg": _scale(1.0), "g": _scale(1 / 1000), "[lb_av]": _scale(0.45359237)},
    "cm": {"cm": _scale(1.0), "m": _scale(100.0), "[in_i]": _scale(2.54)},
    "m": {"m": _scale(1.0), "cm": _scale(1 / 100), "[in_i]": _scale(0.0254)},
    "h": {"h": _scale(1.0), "min": _scale(1 / 60), "s": _scale(1 / 3600)},
    "/min": {"/min": _scale(1.0), "{beats}/min": _scale(1.0)},
    "ms": {"ms": _scale(1.0), "s": _scale(1000.0)},
    "{score}": {"{score}": _scale(1.0), "1": _scale(1.0), "{#}": _scale(1.0)},
    "/d": {"/d": _scale(1.0), "{steps}/d": _scale(1.0)},
    "Cel": {"Cel": _scale(1.0), "[degF]": lambda x: (x - 32) * 5 / 9},
}


# Unit spellings seen in exports that are not UCUM codes -> the UCUM code (looked up in lower case).
UNIT_ALIASES = {
    "lb": "[lb_av]", "lbs": "[lb_av]", "pound": "[lb_av]", "pounds": "[lb_av]",
    "in": "[in_i]", "inch": "[in_i]", "inches": "[in_i]",
    "kilogram": "kg", "kilograms": "kg", "gram": "g", "grams": "g",
    "centimeter": "cm", "centimeters": "cm", "meter": "m", "meters": "m", "metre": "m", "metres": "m",
    "hr": "h", "hrs": "h", "hour": "h", "hours": "h", "minute": "min", "minutes": "min",
    "sec": "s", "second": "s", "seconds": "s", "msec": "ms", "millisecond": "ms", "milliseconds": "ms",
    "bpm": "/min", "beats/min": "/min", "beats/minute": "/min", "{beat}/min": "/min", "1/min": "/min",
    "score": "{score}", "steps/day": "{steps}/d", "{steps}/day": "{steps}/d", "/day": "/d", "1/d": "/d",
    "degf": "[degF]", "°f": "[degF]", "degc": "Cel", "°c": "Cel",
}


class Code(NamedTuple):
    """One `"<system>|<code>"` of a rule; `is_prefix` when it was written with a trailing `*`."""

    system: str
    code: str
    is_prefix: bool


@dataclass(frozen=True)
class FeatureRule:
    """How one feature (or one label condition) derives from the FHIR resources.

    Only the fields its `source` uses are set. A feature rule looks back `window_days`
    from the index date; a label rule (`[mapping.label] any_of`) looks forward
    `window_days_after` days and always has aggregate "any".
    """

    source: str
    codes: tuple[Code, ...] = ()
    window_days: int | None = None
    aggregate: str | None = None
    unit: str | None = None
    url: str | None = None
    classes: tuple[str, ...] = ()
    reason_codes: tuple[Code, ...] = ()
    weight_codes: tuple[Code, ...] = ()
    height_codes: tuple[Code, ...] = ()
    window_days_after: int | None = None
    marker: str | None = None  # note: the `[notes.markers]` entry whose affirmed mentions count


@dataclass(frozen=True)
class LabelRule:
    """The label is 1 when any rule of `any_of` matches in its window after the index date.

    `window_days_after` is the label's horizon: the longest window of its rules.
    """

    any_of: tuple[FeatureRule, ...]
    window_days_after: int


@dataclass(frozen=True)
class Mapping:
    """The whole `[mapping]`: index date, one rule per study feature (study order), the label."""

    index_date: datetime.date
    features: dict[str, FeatureRule]
    label: LabelRule


def parse_mapping(raw: dict[str, Any], feature_names: list[str], path: str) -> Mapping:
    """Validate the `[mapping]` table (a whole study document holding one is accepted too).

    `feature_names` are the study's features, in order: each needs exactly one rule.
    """
    if isinstance(raw, dict) and isinstance(raw.get("mapping"), dict) and "index_date" not in raw:
        raw = raw["mapping"]
    p = Fields(path)
    if not isinstance(raw, dict):
        raise p.fail("mapping", "expected a [mapping] table")
    p.no_unknown_keys(raw, "mapping", ("index_date", "features", "label"))
    index_date = p.iso_date(raw, "mapping.index_date")
    features_raw = p.table(raw, "mapping.features")
    for name in features_raw:
        if name not in feature_names:
            raise p.fail(f"mapping.features.{name}", f"no study feature is named '{name}'")
    features = {}
    for name in feature_names:
        if name not in features_raw:
            raise p.fail(f"mapping.features.{name}", f"missing rule for study feature '{name}'")
        features[name] = _feature_rule(p, features_raw[name], f"mapping.features.{name}")
    label = _label_rule(p, p.table(raw, "mapping.label"))
    return Mapping(index_date=index_date, features=features, label=label)


def _feature_rule(p: Fields, raw: Any, at: str) -> FeatureRule:
    if not isinstance(raw, dict):
        raise p.fail(at, "expected a table")
    source = p.choice(raw, f"{at}.source", SOURCES)
    required, optional = FEATURE_KEYS[source]
    p.no_unknown_keys(raw, at, ("source", *required, *optional), context=f"for source '{source}'")
    values = _rule_values(p, raw, at, source, required, optional)
    if source == "patient_age" and values.get("unit", "years") not in AGE_UNITS:
        raise p.fail(f"{at}.unit", f"unknown value '{values['unit']}' (expected one of: {', '.join(AGE_UNITS)})")
    if source == "bmi" and values.get("unit", "kg/m2") not in BMI_UNITS:
        raise p.fail(f"{at}.unit", f"unknown value '{values['unit']}' (expected one of: {', '.join(BMI_UNITS)})")
    return FeatureRule(source=source, **values)


def label_entries(p: Fields, raw: dict[str, Any], at: str) -> list[tuple[str, dict[str, Any]]]:
    """The `any_of` tables of a label (`at`: "mapping.label" or "omop.label") as (field, table), each
    given the label's `window_days_after` when it has none of its own."""
    p.no_unknown_keys(raw, at, ("any_of", "window_days_after"))
    default_after = p.integer(raw, f"{at}.window_days_after", minimum=1) if "window_days_after" in raw else None
    entries = raw.get("any_of")
    if entries is None:
        raise p.fail(f"{at}.any_of", "missing field")
    if not isinstance(entries, list) or not entries:
        raise p.fail(f"{at}.any_of", "expected a non-empty array of tables")
    out = []
    for i, entry in enumerate(entries):
        where = f"{at}.any_of[{i}]"
        if not isinstance(entry, dict):
            raise p.fail(where, "expected a table")
        if default_after is not None and "window_days_after" not in entry:
            entry = {**entry, "window_days_after": default_after}
        out.append((where, entry))
    return out


def _label_rule(p: Fields, raw: dict[str, Any]) -> LabelRule:
    rules = []
    for where, entry in label_entries(p, raw, "mapping.label"):
        source = p.choice(entry, f"{where}.source", tuple(LABEL_KEYS))
        required, optional = LABEL_KEYS[source]
        p.no_unknown_keys(entry, where, ("source", *required, *optional), context=f"for source '{source}'")
        values = _rule_values(p, entry, where, source, required, optional)
        if values.setdefault("aggregate", "any") != "any":
            raise p.fail(f"{where}.aggregate", f"a label rule's aggregate is 'any', got {values['aggregate']!r}")
        rules.append(FeatureRule(source=source, **values))
    horizon = max(rule.window_days_after or 0 for rule in rules)
    return LabelRule(any_of=tuple(rules), window_days_after=horizon)


def _rule_values(
    p: Fields, raw: dict[str, Any], at: str, source: str, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    """The typed values of one rule's keys, in a fixed order so the first mistake is reported."""
    values: dict[str, Any] = {}
    for key in (*required, *optional):
        if key not in raw:
            if key in required:
                raise p.fail(f"{at}.{key}", "missing field")
            continue
        field = f"{at}.{key}"
        if key in ("codes", "reason_codes", "weight_codes", "height_codes"):
            values[key] = _codes(p, raw, field)
        elif key in ("window_days", "window_days_after"):
            values[key] = p.integer(raw, field, minimum=1)
        elif key == "aggregate":
            values[key] = p.choice(raw, field, AGGREGATES)
            allowed = ALLOWED_AGGREGATES[source]
            if values[key] not in allowed:
                raise p.fail(field, f"'{values[key]}' is not allowed for source '{source}' (allowed: {', '.join(allowed)})")
        elif key == "unit":
            values[key] = p.string(raw, field, non_empty=True)
            if source in ("observation", "sensor") and values[key] not in CONVERSIONS:
                raise p.fail(field, f"no known conversion to '{values[key]}' (known units: {', '.join(CONVERSIONS)})")
        elif key == "classes":
            values[key] = tuple(p.string_list(raw, field))
        elif key in ("url", "marker"):
            values[key] = p.string(raw, field, non_empty=True)
    return values


_CODE = re.compile(r"(?P<system>[^|\s*]+)\|(?P<code>[^|\s*]+)(?P<star>\*?)")


def parse_code(text: str) -> Code | None:
    """`"<system>|<code>"` or `"<system>|<prefix>*"` as a `Code`, or None when malformed."""
    match = _CODE.fullmatch(text)
    if match is None:
        return None
    return Code(match["system"], match["code"], bool(match["star"]))


def normalize_code(system: str, code: str) -> str:
    """How codes compare: ICD-10 codes without dots and in upper case (`F32.1` = `F321` = `f32.1`)."""
    if system in ICD10_SYSTEMS:
        return code.replace(".", "").upper()
    return code


def _codes(p: Fields, raw: dict[str, Any], field: str) -> tuple[Code, ...]:
    value = raw.get(field.rsplit(".", 1)[-1])
    if not isinstance(value, list) or not value:
        raise p.fail(field, f"expected a non-empty list of \"<system>|<code>\" strings, got {value!r}")
    codes = []
    for i, text in enumerate(value):
        code = parse_code(text) if isinstance(text, str) else None
        if code is None:
            raise p.fail(f"{field}[{i}]", f"expected \"<system>|<code>\" (a trailing * for a prefix), got {text!r}")
        codes.append(code)
    return tuple(codes)
