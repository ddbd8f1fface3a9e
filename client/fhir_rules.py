"""The study's `[mapping]` rules compiled for matching FHIR records (`Program`), and how a
derived value is checked.

A `Program` indexes every feature and label rule by resource type and code (`CodeIndex`:
exact codes and prefixes, ICD-10 normalized), each as a `Target`: the accumulator slot it
fills, its window of days and the unit its values need. `patient_value` reads a Patient
resource's age, sex or extension; `checked` applies the CSV cell checks to a derived value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from client.fhir_aggregates import Exists, Latest, accumulator
from client.fhir_datatypes import partial_date, whole_years
from client.tables import parse_value
from fedcare.mapping import Code, FeatureRule, Mapping, normalize_code
from fedcare.study import Feature, Study, StudyConfigError

LABEL = "label"  # accumulator key shared by every label rule


@dataclass(frozen=True, eq=False)
class Target:
    """One rule as the reader applies it: where its facts go and which window they need."""

    key: Hashable  # accumulator slot in a patient's facts
    lo: int  # window (lo, hi] as date ordinals
    hi: int
    make: Callable[[], Any]  # new accumulator
    unit: str | None = None  # observations: convert values to this unit (None: no value needed)
    reasons: CodeIndex | None = None  # encounters: one reasonCode must match


class CodeIndex:
    """Targets by exact (system, code) and by (system, prefix), ICD-10 codes normalized."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, str], list[Any]] = {}
        self.prefixes: dict[str, dict[int, dict[str, list[Any]]]] = {}
        self.cache: dict[tuple[str, str], tuple[Any, ...]] = {}  # (system, code as written) -> targets

    @classmethod
    def of(cls, codes: Iterable[Code], target: Any = True) -> CodeIndex:
        index = cls()
        for code in codes:
            index.add(code, target)
        return index

    def add(self, code: Code, target: Any) -> None:
        text = normalize_code(code.system, code.code)
        if code.is_prefix:
            by_length = self.prefixes.setdefault(code.system, {}).setdefault(len(text), {})
            by_length.setdefault(text, []).append(target)
        else:
            self.exact.setdefault((code.system, text), []).append(target)
        self.cache.clear()

    def lookup(self, system: str, code: str) -> tuple[Any, ...]:
        """Targets one coding matches, each once (memoized: exports repeat a few codes)."""
        key = (system, code)
        found = self.cache.get(key)
        if found is None:
            text = normalize_code(system, code)
            hits = list(self.exact.get((system, text), ()))
            for length, table in self.prefixes.get(system, {}).items():
                hits += table.get(text[:length], ())
            found = tuple(dict.fromkeys(hits))
            if len(self.cache) >= 1 << 16:  # bounded: codes come from the data
                self.cache.clear()
            self.cache[key] = found
        return found

    def match(self, codings: Iterable[tuple[str, str]]) -> list[Any]:
        """Targets any coding matches, each once, in a stable order."""
        found: list[Any] = []
        for system, code in codings:
            found += self.lookup(system, code)
        return list(dict.fromkeys(found)) if len(found) > 1 else found

    def match_concept(self, concept: Any) -> tuple[Any, ...] | list[Any]:
        """`match(concept_codings(concept))` without the generator: the hot path of every record."""
        if not isinstance(concept, dict):
            return ()
        codings = concept.get("coding")
        if not isinstance(codings, list):
            return ()
        found: tuple[Any, ...] | list[Any] = ()
        several = False
        for coding in codings:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    hits = self.cache.get((system, code))
                    if hits is None:
                        hits = self.lookup(system, code)
                    if hits:
                        if found:
                            found, several = found + hits, True
                        else:
                            found = hits
        return list(dict.fromkeys(found)) if several else found


class Program:
    """The study's features and label as targets indexed by resource type and code."""

    def __init__(self, study: Study, mapping: Mapping) -> None:
        self.features = study.features
        self.index_date = mapping.index_date
        self.rules: list[FeatureRule | None] = []
        self.observations, self.conditions, self.medications = CodeIndex(), CodeIndex(), CodeIndex()
        self.encounters: dict[str, list[Target]] = {}
        self.encounters_with_reasons: frozenset[str] = frozenset()
        self.patient_rules: list[tuple[int, Feature, FeatureRule]] = []
        index = mapping.index_date.toordinal()
        from fedcare.derived import Derivation

        self.derivation = Derivation(study)
        derived = self.derivation.columns  # notes, readings and the hashed block: `client/fhir_derived.py`
        for i, feature in enumerate(study.features):
            rule = mapping.features.get(feature.name)
            if i in derived:
                self.rules.append(rule)
                continue
            if rule is None:
                raise StudyConfigError(f"mapping: no rule for study feature '{feature.name}'")
            self.rules.append(rule)
            if rule.source.startswith("patient_"):
                self.patient_rules.append((i, feature, rule))
                continue
            lo, hi = index - (rule.window_days or 0), index
            if rule.source == "bmi":
                for role, codes, unit in (("weight", rule.weight_codes, "kg"), ("height", rule.height_codes, "m")):
                    target = Target((i, role), lo, hi, Latest, unit=unit)
                    for code in codes:
                        self.observations.add(code, target)
            else:
                self._add(rule, Target(i, lo, hi, accumulator(rule, lo, hi), unit=rule.unit))
        for rule in mapping.label.any_of:
            self._add(rule, Target(LABEL, index, index + (rule.window_days_after or 0), Exists))
        self.encounters_with_reasons = frozenset(
            cls for cls, targets in self.encounters.items() if any(t.reasons for t in targets))
        # How each row cell derives: (index, feature, "acc" | "direct" | "bmi", the checked result
        # for a missing value, the checked result when no record matched: 0 for count/any/pdc).
        self.row_plan: list[tuple[int, Feature, str, tuple[float, str | None], tuple[float, str | None]]] = []
        for i, (feature, rule) in enumerate(zip(self.features, self.rules)):
            if i in derived:
                self.row_plan.append((i, feature, "derived", checked(feature, None), checked(feature, None)))
                continue
            source = "direct" if rule.source.startswith("patient_") else "bmi" if rule.source == "bmi" else "acc"
            empty = 0.0 if source == "acc" and rule.aggregate in ("count", "any", "pdc") else None
            self.row_plan.append((i, feature, source, checked(feature, None), checked(feature, empty)))

    def _add(self, rule: FeatureRule, target: Target) -> None:
        """Index one observation/condition/encounter/medication rule by its codes (or classes)."""
        if rule.source == "encounter":
            if rule.reason_codes:
                target = dataclasses.replace(target, reasons=CodeIndex.of(rule.reason_codes))
            for cls in rule.classes:
                self.encounters.setdefault(cls, []).append(target)
            return
        index = {"observation": self.observations, "condition": self.conditions, "medication": self.medications}
        for code in rule.codes:
            index[rule.source].add(code, target)


# --- derived values ---------------------------------------------------------------------------


class Invalid:
    """A patient-level value that is present but unusable (the reason quarantines the patient)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def checked(feature: Feature, value: float | None | Invalid) -> tuple[float, str | None]:
    """The CSV cell checks (`client.tables.parse_value`) on a derived value; None is missing."""
    if isinstance(value, Invalid):
        return math.nan, value.reason
    if value is None:
        return parse_value(feature, "")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        finite = False
    # repr round-trips a float exactly; "nan" would read as a missing token, so non-finite is "inf".
    return parse_value(feature, repr(value) if finite else "inf")


def bmi(weight: Any, height: Any, name: str) -> float | None | Invalid:
    """The latest weight (kg) over the latest height (m) squared, from their accumulators (None: one is missing)."""
    if weight is None or height is None:
        return None
    if height.value <= 0:
        return Invalid(f"{name}: height must be positive")
    return weight.value / (height.value * height.value)  # float products overflow to inf, not raise


def patient_value(feature: Feature, rule: FeatureRule, obj: dict, program: Program) -> float | None | Invalid:
    """Age, sex or an extension value from a Patient resource (None = missing)."""
    if rule.source == "patient_female":
        return {"female": 1.0, "male": 0.0}.get(obj.get("gender")) if isinstance(obj.get("gender"), str) else None
    if rule.source == "patient_age":
        birth = obj.get("birthDate")
        if birth is None:
            return None
        born = partial_date(birth) if isinstance(birth, str) and len(birth) in (4, 7, 10) else None
        if born is None:
            return Invalid(f"{feature.name}: unparseable birthDate")
        return float(whole_years(born, program.index_date))
    extensions = obj.get("extension")
    for ext in extensions if isinstance(extensions, list) else []:
        if isinstance(ext, dict) and ext.get("url") == rule.url:
            for key in ("valueDecimal", "valueInteger"):
                if key in ext:
                    value = ext[key]
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        return Invalid(f"{feature.name}: not a number")
                    return value
            if any(key.startswith("value") for key in ext):
                return Invalid(f"{feature.name}: not a number")
            return None
    return None
