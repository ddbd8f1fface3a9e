"""How each FHIR resource type becomes per-patient facts (`FactCollector`).

One handler per resource type (`HANDLERS`): Patient values, Observations (dates, values in
each rule's unit), Conditions, Encounters, and medication supply intervals. A record that does
not match a rule in its window is not read further; records with an excluded status are
counted and skipped; a bad part raises `Reject` (the reader quarantines the record).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from client.fhir_derived import DerivedFacts
from client.fhir_datatypes import (
    BIG_INT, DATE_PARTS, TIME_PARTS, UCUM_UNITS, UNIT_ALIASES, Reject, as_number, concept_list_codings,
    first_present, observation_quantity, parse_day, reference_pid, safe_unit, status_codes, subject_pid, unit_text,
)
from client.fhir_report import FhirLoadReport
from client.fhir_rules import Invalid, Program, Target, patient_value
from fedcare.mapping import CONVERSIONS

# Records that did not happen (or were recorded in error) are skipped and counted, not derived from.
EXCLUDED_STATUSES: dict[str, frozenset[str]] = {
    "Observation": frozenset({"entered-in-error", "cancelled"}),
    "Encounter": frozenset({"entered-in-error", "cancelled"}),
    "MedicationRequest": frozenset({"entered-in-error", "cancelled"}),
    "MedicationStatement": frozenset({"entered-in-error", "not-taken"}),
}
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})  # Condition.verificationStatus
SUPPLY_DAY_UNITS = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7}
OPEN_END = datetime.date.max.toordinal() + 1  # an ongoing MedicationStatement (no effectivePeriod.end)

Location = tuple[int, int | None]  # (file number, line or Bundle entry; None = the whole file)
_NO_VALUES: dict[str, float] = {}  # an Observation that only feeds rules without a unit (never written to)


class PatientState:
    """What is kept per patient id: accumulators, patient-level values, where it was seen."""

    __slots__ = ("where", "facts", "direct", "records", "first_record")

    def __init__(self) -> None:
        self.where: Location | None = None  # the Patient resource's location
        self.facts: dict[Hashable, Any] = {}
        self.direct: dict[int, float | None | Invalid] = {}
        self.records = 0  # accepted records referring to this id
        self.first_record: Location | None = None


class FactCollector:
    """A split's per-patient state: each accepted record's facts go to its patient's accumulators."""

    def __init__(self, program: Program, report: FhirLoadReport, today: int) -> None:
        self.program, self.report, self.today = program, report, today
        self.patients: dict[str, PatientState] = {}
        self.references: dict[str, str] = {}  # NDJSON reference text -> patient id (bounded cache)
        self.derived = DerivedFacts(program.derivation, self) if program.derivation.columns else None

    # resources

    def _patient(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        self.report.rows_read += 1
        pid = obj.get("id")
        if not isinstance(pid, str) or not pid.strip():
            raise Reject("missing id")
        state = self.patients.get(pid)
        if state is not None and state.where is not None:
            raise Reject("duplicate patient", bare=True)
        if state is None:
            state = self.patients[pid] = PatientState()
        state.where = where
        state.direct = {i: patient_value(feature, rule, obj, self.program) for i, feature, rule in self.program.patient_rules}
        return True

    def _observation(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        targets = self.program.observations.match_concept(obj.get("code"))
        readings = self.derived.matches(obj) if self.derived is not None else None
        if readings:  # device readings for `sensor` rules (client/fhir_derived.py), maybe other rules too
            if self._excluded(obj, "Observation"):
                return False
            self.derived.observation(obj, where, aliases, readings)
            return self._observation_rules(obj, where, aliases, targets) if targets else True
        if not targets or self._excluded(obj, "Observation"):
            return False
        return self._observation_rules(obj, where, aliases, targets)

    def _document(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        return self.derived is not None and self.derived.document(obj, where, aliases)

    def _binary(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        return self.derived is not None and self.derived.binary(obj, where, aliases)

    def _observation_rules(self, obj: dict, where: Location, aliases: dict[str, str], targets: Any) -> bool:
        pid = self._pid(obj, aliases, False)
        when = obj["effectiveDateTime"] if "effectiveDateTime" in obj else first_present(
            obj, "effectiveInstant", ("effectivePeriod", "start"), "issued")
        day = self._day(when)
        if len(targets) == 1:  # most codes feed one rule
            hits = targets
            if not hits[0].lo < day <= hits[0].hi:
                return False
            units: Iterable[str] = (hits[0].unit,) if hits[0].unit else ()
        else:
            hits = [t for t in targets if t.lo < day <= t.hi]
            if not hits:
                return False
            units = {t.unit for t in hits if t.unit}  # label rules need no value
        values = self._values(obj, units) if units else _NO_VALUES
        facts = self._record(pid, where).facts
        for t in hits:
            acc = facts.get(t.key)
            if acc is None:
                acc = facts[t.key] = t.make()
            acc.add(day, values.get(t.unit))
        return True

    def _condition(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        targets = self.program.conditions.match_concept(obj.get("code"))
        if not targets:
            return False
        verification = status_codes(obj.get("verificationStatus")) & EXCLUDED_VERIFICATION
        if verification:
            self.report.excluded[f"Condition: verificationStatus {sorted(verification)[0]}"] += 1
            return False
        pid = self._pid(obj, aliases, False)
        onset = obj.get("onsetDateTime")
        day = self._day(onset if onset is not None else obj.get("recordedDate"))
        return self._facts(pid, where, targets, day)

    def _encounter(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        cls = obj.get("class")
        code = cls.get("code") if isinstance(cls, dict) else None
        targets = self.program.encounters.get(code, ()) if isinstance(code, str) else ()
        if targets and code in self.program.encounters_with_reasons:
            reasons = list(concept_list_codings(obj.get("reasonCode")))
            targets = [t for t in targets if t.reasons is None or t.reasons.match(reasons)]
        if not targets or self._excluded(obj, "Encounter"):
            return False
        pid = self._pid(obj, aliases, False)
        day = self._day(first_present(obj, ("period", "start")))
        return self._facts(pid, where, targets, day)

    def _medication(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        rtype = obj["resourceType"]
        targets = self.program.medications.match_concept(obj.get("medicationCodeableConcept"))
        if not targets or self._excluded(obj, rtype):
            return False
        pid = self._pid(obj, aliases, True)
        start, end = self._supply(obj) if rtype == "MedicationRequest" else self._period(obj.get("effectivePeriod"), True)
        hits = [t for t in targets if start <= t.hi and end > t.lo + 1]
        if not hits:
            return False
        self._add_facts(pid, where, hits, start, end)
        return True

    # pieces of a resource

    def _facts(self, pid: str, where: Location, targets: list[Target], day: int) -> bool:
        hits = [t for t in targets if t.lo < day <= t.hi]
        if not hits:
            return False
        self._add_facts(pid, where, hits, day, None)
        return True

    def _add_facts(self, pid: str, where: Location, hits: list[Target], first: int, second: Any) -> None:
        """Give (first, second) to each hit target's accumulator for this patient, creating it on first use."""
        facts = self._record(pid, where).facts
        for t in hits:
            acc = facts.get(t.key)
            if acc is None:
                acc = facts[t.key] = t.make()
            acc.add(first, second)

    def _record(self, pid: str, where: Location) -> PatientState:
        state = self.patients.get(pid)
        if state is None:
            state = self.patients[pid] = PatientState()
        state.records += 1
        if state.first_record is None:
            state.first_record = where
        return state

    def _excluded(self, obj: dict, rtype: str) -> bool:
        status = obj.get("status")
        if isinstance(status, str) and status in EXCLUDED_STATUSES.get(rtype, ()):
            self.report.excluded[f"{rtype}: status {status}"] += 1
            return True
        return False

    def _pid(self, obj: dict, aliases: dict[str, str], allow_patient: bool) -> str:
        """`subject_pid`, memoized by reference text outside Bundles (where aliases decide)."""
        ref = obj.get("subject")
        if ref is None and allow_patient:
            ref = obj.get("patient")
        if not aliases and isinstance(ref, dict):
            text = ref.get("reference")
            if isinstance(text, str):
                pid = self.references.get(text)
                if pid is None:
                    pid = reference_pid(text, aliases)  # raises Reject for a bad one
                    if len(self.references) >= 1 << 17:
                        self.references.clear()
                    self.references[text] = pid
                return pid
        return subject_pid(obj, aliases, allow_patient)

    def _day(self, value: Any, future_ok: bool = False) -> int:
        """A FHIR date or dateTime as a day ordinal (the calendar date as written)."""
        if isinstance(value, str):  # the fast path of `parse_day`, inlined
            day = DATE_PARTS.get(value[:10])
            if day is not None and (len(value) == 10 or value[10:] in TIME_PARTS) and (day <= self.today or future_ok):
                return day
        if value is None:
            raise Reject("missing date")
        day = parse_day(value)
        if day is None:
            raise Reject("unparseable date")
        if day > self.today and not future_ok:
            raise Reject("date in the future")
        return day

    def _period(self, period: Any, open_end: bool) -> tuple[int, int]:
        """[start, end + 1) of a Period (end inclusive); no end is ongoing when `open_end`."""
        if not isinstance(period, dict):
            raise Reject("missing date")
        start = self._day(period.get("start"))
        if period.get("end") is None:
            if open_end:
                return start, OPEN_END
            raise Reject("period without an end")
        end = self._day(period.get("end"), future_ok=True) + 1
        if end <= start:
            raise Reject("period ends before it starts")
        return start, end

    def _supply(self, obj: dict) -> tuple[int, int]:
        """MedicationRequest: authoredOn + expectedSupplyDuration days, else the validityPeriod."""
        dispense = obj.get("dispenseRequest")
        dispense = dispense if isinstance(dispense, dict) else {}
        duration = dispense.get("expectedSupplyDuration")
        if duration is None:
            if dispense.get("validityPeriod") is None:
                raise Reject("no supply interval (expectedSupplyDuration or validityPeriod)")
            return self._period(dispense.get("validityPeriod"), False)
        start = self._day(obj.get("authoredOn"))
        if not isinstance(duration, dict):
            raise Reject("supply duration is not a number")
        value = as_number(duration.get("value"), "supply duration")
        unit = unit_text(duration, default="d")
        factor = SUPPLY_DAY_UNITS.get(unit) or SUPPLY_DAY_UNITS.get(unit.lower())
        if factor is None:
            self.report.unit_mismatches[f"{safe_unit(unit)}→d"] += 1
            raise Reject("unit mismatch")
        if value <= 0:
            raise Reject("supply duration is not positive")
        if factor != 1:
            self.report.conversions["wk→d"] += 1
        return start, start + math.ceil(min(value * factor, OPEN_END))

    def _values(self, obj: dict, targets: Iterable[str]) -> dict[str, float]:
        """An Observation's value in each target unit; conversions are counted once per record."""
        quantity = obj.get("valueQuantity")
        value = unit = None
        if quantity.__class__ is dict:  # fast path: a finite number with a UCUM code (`observation_quantity`)
            value, unit = quantity.get("value"), quantity.get("code")
            if value.__class__ is int and -BIG_INT < value < BIG_INT:
                value = float(value)
            if not (value.__class__ is float and value - value == 0.0 and unit.__class__ is str and (unit := unit.strip())):
                value = None
        if value is None:
            value, unit = observation_quantity(obj)
        source = unit if unit in UCUM_UNITS else UNIT_ALIASES.get(unit.lower(), unit)
        values = {}
        for target in sorted(targets) if len(targets) > 1 else targets:
            convert = CONVERSIONS[target].get(source)
            if convert is None:
                self.report.unit_mismatches[f"{safe_unit(unit)}→{target}"] += 1
                raise Reject("unit mismatch")
            converted = values[target] = convert(value)
            if not math.isfinite(converted):
                raise Reject("value not finite (NaN/Inf)")
        for target in targets:
            if target != source:
                self.report.conversions[f"{source}→{target}"] += 1
        return values


# Plain functions, not bound methods kept on the collector: a collector that referred to itself
# would be freed (with every patient's facts) only by a full garbage collection.
HANDLERS: dict[str, Callable[[FactCollector, dict, Location, dict[str, str]], bool]] = {
    "Patient": FactCollector._patient,
    "Observation": FactCollector._observation,
    "Condition": FactCollector._condition,
    "Encounter": FactCollector._encounter,
    "MedicationRequest": FactCollector._medication,
    "MedicationStatement": FactCollector._medication,
    "DocumentReference": FactCollector._document,
    "Binary": FactCollector._binary,
}
