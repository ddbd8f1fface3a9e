"""The study's `[omop]` table: how each feature and the label derive from an OMOP CDM v5.4 database
(docs/OMOP.md). The FHIR counterpart is `fedcare/mapping.py`; the two share the aggregates, the
windows and the unit conversions, so one study reads the same from either.

`parse_omop(raw, feature_names, path, default_index_date=...)` validates the table into a frozen
`OmopMapping`. Every mistake raises `fedcare.study.StudyConfigError` with one line naming the file
and the field, e.g.

    s.toml: omop.features.phq9_latest.table: expected one of person, measurement, observation, …, got 'measurements'

Concepts are named in the study either by `concept_id` (an integer, as in Athena) or by
`"<vocabulary_id>|<concept_code>"` (a trailing `*` for a code prefix, compared without dots and in
upper case like ICD-10 in FHIR), resolved at the site through its vocabulary schema; with
`descendants` (the default) every descendant in `concept_ancestor` counts too. A record matches a
rule when its standard concept (`<table>_concept_id`) or its source concept
(`<table>_source_concept_id`) is in the rule's set.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fedcare.fields import Fields
from fedcare.mapping import CONVERSIONS, label_entries


class CdmTable(str, Enum):
    """The CDM tables a rule reads."""

    PERSON = "person"
    MEASUREMENT = "measurement"
    OBSERVATION = "observation"
    CONDITION = "condition_occurrence"
    DRUG = "drug_exposure"
    VISIT = "visit_occurrence"


# Aggregates each table's rules can compute (person takes none: it has `value`).
ALLOWED_AGGREGATES: dict[CdmTable, tuple[str, ...]] = {
    CdmTable.MEASUREMENT: ("latest", "mean", "count", "any", "slope_per_30d", "bmi"),
    CdmTable.OBSERVATION: ("latest", "mean", "count", "any", "slope_per_30d"),
    CdmTable.CONDITION: ("count", "any"),  # count: distinct start dates (an episode coded twice a day is one)
    CdmTable.VISIT: ("count", "any"),
    CdmTable.DRUG: ("pdc", "any"),  # pdc: the share of the window's days covered by a supply
}
VALUE_AGGREGATES = ("latest", "mean", "slope_per_30d")
MAX_WINDOW_DAYS = 73_000  # 200 years: "ever" is 36500; a window beyond the calendar is a mistake  # need value_as_number (and `unit`)
PERSON_VALUES = ("age", "female")
# Keys besides `table` a feature rule may have, per table: (required, optional).
FEATURE_KEYS: dict[CdmTable, tuple[tuple[str, ...], tuple[str, ...]]] = {
    CdmTable.PERSON: (("value",), ()),
    CdmTable.MEASUREMENT: (("window_days", "aggregate"), ("concepts", "descendants", "unit", "weight_concepts",
                                                           "height_concepts")),
    CdmTable.OBSERVATION: (("concepts", "window_days", "aggregate"), ("descendants", "unit")),
    CdmTable.CONDITION: (("concepts", "window_days", "aggregate"), ("descendants",)),
    CdmTable.VISIT: (("concepts", "window_days", "aggregate"), ("descendants", "reason_concepts")),
    CdmTable.DRUG: (("concepts", "window_days", "aggregate"), ("descendants",)),
}
LABEL_TABLES = (CdmTable.MEASUREMENT, CdmTable.OBSERVATION, CdmTable.CONDITION, CdmTable.VISIT, CdmTable.DRUG)
LABEL_KEYS = (("concepts", "window_days_after"), ("descendants", "aggregate", "reason_concepts"))

_CODE = re.compile(r"(?P<vocabulary>[^|\s*]+)\|(?P<code>[^|\s*]+)(?P<star>\*?)")


@dataclass(frozen=True)
class ConceptRef:
    """One concept a rule names: `concept_id`, or `vocabulary|code` (`is_prefix`: written with `*`)."""

    concept_id: int | None = None
    vocabulary: str = ""
    code: str = ""
    is_prefix: bool = False

    def describe(self) -> str:
        if self.concept_id is not None:
            return str(self.concept_id)
        return f"{self.vocabulary}|{self.code}{'*' if self.is_prefix else ''}"


@dataclass(frozen=True)
class ConceptSet:
    """The concepts of one rule key, and whether their `concept_ancestor` descendants count."""

    refs: tuple[ConceptRef, ...]
    descendants: bool = True


@dataclass(frozen=True)
class OmopRule:
    """How one feature (or one label condition) derives from the CDM.

    Only the fields its table uses are set. A feature rule looks back `window_days` from the index
    date, (index - window_days, index]; a label rule looks forward, (index, index + window_days_after],
    and always has aggregate "any". `aggregate = "bmi"` (measurement) is the latest weight (kg) over
    the latest height (m) squared, from `weight_concepts` and `height_concepts`.
    """

    table: CdmTable
    concepts: ConceptSet | None = None
    window_days: int | None = None
    window_days_after: int | None = None
    aggregate: str | None = None
    unit: str | None = None  # values converted to this unit (a key of fedcare.mapping.CONVERSIONS)
    value: str | None = None  # person: "age" (whole years at the index date) or "female"
    reasons: ConceptSet | None = None  # visit: a condition or observation of the visit must match
    weight_concepts: ConceptSet | None = None
    height_concepts: ConceptSet | None = None

    def concept_sets(self) -> tuple[ConceptSet, ...]:
        return tuple(s for s in (self.concepts, self.reasons, self.weight_concepts, self.height_concepts) if s)


@dataclass(frozen=True)
class OmopLabel:
    """The label is 1 when any rule of `any_of` matches in its window after the index date."""

    any_of: tuple[OmopRule, ...]
    window_days_after: int


@dataclass(frozen=True)
class OmopMapping:
    """The whole `[omop]`: index date, one rule per study feature (study order), the label."""

    index_date: datetime.date
    features: dict[str, OmopRule]
    label: OmopLabel

    def rules(self) -> list[OmopRule]:
        return [*self.features.values(), *self.label.any_of]


def parse_omop(raw: Any, feature_names: list[str], path: str, *,
               default_index_date: datetime.date | None = None) -> OmopMapping:
    """Validate the `[omop]` table. `feature_names` are the study's features, in order: each needs
    exactly one rule. `index_date` may be left out when the study's `[mapping]` gives one
    (`default_index_date`); when both are written they must agree."""
    p = Fields(path)
    if not isinstance(raw, dict):
        raise p.fail("omop", "expected an [omop] table")
    p.no_unknown_keys(raw, "omop", ("index_date", "features", "label"))
    if "index_date" in raw:
        index_date = p.iso_date(raw, "omop.index_date")
        if default_index_date is not None and index_date != default_index_date:
            raise p.fail("omop.index_date", f"{index_date} differs from mapping.index_date ({default_index_date}): "
                                             "a study has one index date")
    elif default_index_date is not None:
        index_date = default_index_date
    else:
        raise p.fail("omop.index_date", "missing field (the study has no [mapping] whose index_date it could take)")
    features_raw = p.table(raw, "omop.features")
    for name in features_raw:
        if name not in feature_names:
            raise p.fail(f"omop.features.{name}", f"no study feature is named '{name}'")
    features = {}
    for name in feature_names:
        if name not in features_raw:
            raise p.fail(f"omop.features.{name}", f"missing rule for study feature '{name}'")
        features[name] = _feature_rule(p, features_raw[name], f"omop.features.{name}")
    return OmopMapping(index_date=index_date, features=features, label=_label(p, p.table(raw, "omop.label")))


def _table(p: Fields, raw: dict[str, Any], at: str, options: tuple[CdmTable, ...]) -> CdmTable:
    return CdmTable(p.choice(raw, f"{at}.table", tuple(t.value for t in options)))


def _feature_rule(p: Fields, raw: Any, at: str) -> OmopRule:
    if not isinstance(raw, dict):
        raise p.fail(at, "expected a table")
    table = _table(p, raw, at, tuple(CdmTable))
    required, optional = FEATURE_KEYS[table]
    p.no_unknown_keys(raw, at, ("table", *required, *optional), context=f"for table '{table.value}'")
    for key in required:
        if key not in raw:
            raise p.fail(f"{at}.{key}", "missing field")
    if table is CdmTable.PERSON:
        return OmopRule(table=table, value=p.choice(raw, f"{at}.value", PERSON_VALUES))
    values = _rule_values(p, raw, at, table)
    aggregate = values["aggregate"]
    if aggregate == "bmi":
        for key in ("weight_concepts", "height_concepts"):
            if values.get(key) is None:
                raise p.fail(f"{at}.{key}", "missing field (aggregate 'bmi' needs weight and height concepts)")
        for key in ("concepts", "unit"):
            if key in raw:
                raise p.fail(f"{at}.{key}", "not used by aggregate 'bmi' (weight_concepts and height_concepts are)")
    else:
        for key in ("weight_concepts", "height_concepts"):
            if key in raw:
                raise p.fail(f"{at}.{key}", "only aggregate 'bmi' uses it")
        if values.get("concepts") is None:
            raise p.fail(f"{at}.concepts", "missing field")
        if aggregate in VALUE_AGGREGATES and values.get("unit") is None:
            raise p.fail(f"{at}.unit", f"missing field (aggregate '{aggregate}' reads value_as_number)")
    return OmopRule(table=table, **values)


def _label(p: Fields, raw: dict[str, Any]) -> OmopLabel:
    rules = []
    for where, entry in label_entries(p, raw, "omop.label"):
        table = _table(p, entry, where, LABEL_TABLES)
        required, optional = LABEL_KEYS
        p.no_unknown_keys(entry, where, ("table", *required, *optional), context=f"for table '{table.value}'")
        for key in required:
            if key not in entry:
                raise p.fail(f"{where}.{key}", "missing field")
        if "reason_concepts" in entry and table is not CdmTable.VISIT:
            raise p.fail(f"{where}.reason_concepts", "only a visit_occurrence rule has reasons")
        if entry.get("aggregate", "any") != "any":
            raise p.fail(f"{where}.aggregate", f"a label rule's aggregate is 'any', got {entry['aggregate']!r}")
        values = _rule_values(p, {**entry, "aggregate": "any"}, where, table)
        rules.append(OmopRule(table=table, **values))
    return OmopLabel(any_of=tuple(rules), window_days_after=max(r.window_days_after or 0 for r in rules))


def _rule_values(p: Fields, raw: dict[str, Any], at: str, table: CdmTable) -> dict[str, Any]:
    """The typed values of one rule's keys, in a fixed order so the first mistake is reported."""
    values: dict[str, Any] = {}
    descendants = p.boolean(raw, f"{at}.descendants", default=True)
    for key in ("window_days", "window_days_after"):
        if key in raw:
            values[key] = p.integer(raw, f"{at}.{key}", minimum=1)
            if values[key] > MAX_WINDOW_DAYS:
                raise p.fail(f"{at}.{key}", f"must be <= {MAX_WINDOW_DAYS} (200 years), got {values[key]}")
    if "aggregate" in raw:
        aggregate = values["aggregate"] = p.choice(raw, f"{at}.aggregate", tuple(
            dict.fromkeys(a for options in ALLOWED_AGGREGATES.values() for a in options)))
        allowed = ALLOWED_AGGREGATES[table]
        if aggregate not in allowed:
            raise p.fail(f"{at}.aggregate", f"'{aggregate}' is not allowed for table '{table.value}' "
                                            f"(allowed: {', '.join(allowed)})")
    if "unit" in raw:
        unit = values["unit"] = p.string(raw, f"{at}.unit", non_empty=True)
        if unit not in CONVERSIONS:
            raise p.fail(f"{at}.unit", f"no known conversion to '{unit}' (known units: {', '.join(CONVERSIONS)})")
    for key, name in (("concepts", "concepts"), ("reason_concepts", "reasons"),
                      ("weight_concepts", "weight_concepts"), ("height_concepts", "height_concepts")):
        if key in raw:
            values[name] = ConceptSet(refs=_concept_refs(p, raw[key], f"{at}.{key}"), descendants=descendants)
    return values


def parse_concept(value: Any) -> ConceptRef | None:
    """A positive integer concept_id, or `"VOCABULARY|code"` / `"VOCABULARY|prefix*"`; None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return ConceptRef(concept_id=value) if value > 0 else None
    if isinstance(value, str):
        match = _CODE.fullmatch(value)
        if match is not None:
            return ConceptRef(vocabulary=match["vocabulary"], code=match["code"], is_prefix=bool(match["star"]))
    return None


def _concept_refs(p: Fields, value: Any, field: str) -> tuple[ConceptRef, ...]:
    if not isinstance(value, list) or not value:
        raise p.fail(field, f"expected a non-empty list of concept ids or \"<vocabulary_id>|<code>\" strings, got {value!r}")
    refs = []
    for i, item in enumerate(value):
        ref = parse_concept(item)
        if ref is None:
            raise p.fail(f"{field}[{i}]", "expected a positive concept_id or \"<vocabulary_id>|<code>\" "
                                          f"(a trailing * for a prefix), got {item!r}")
        refs.append(ref)
    return tuple(refs)


def normalize_code(code: str) -> str:
    """How vocabulary codes compare: without dots, in upper case (ICD-10 `F32.1` = `F321` = `f32.1`)."""
    return code.replace(".", "").upper()
