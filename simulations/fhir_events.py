"""Inverting the other features and the label into FHIR events: Patient, Conditions, Encounters, MedicationRequests.

`render_patient_resource` turns the `patient_*` features into a birth date, a gender and
extensions; `render_conditions`, `render_encounters` and `render_pdc` turn a count / any /
proportion of days covered into dated records inside the feature's window; `render_label`
places (or, for label 0, avoids) a qualifying event in the label's window after the index
date. Each adds the distractors that must not change its value. Codes, classes and windows
come from the parsed `fedcare.mapping.FeatureRule` / `LabelRule`.
"""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any

import numpy as np

from fedcare.mapping import Code, FeatureRule, LabelRule
from simulations.fhir_resources import (
    FeatureColumn,
    NotRepresentable,
    PatientRecords,
    coding,
    condition,
    distinct_days,
    encounter,
    medication_request,
    pick,
)
from simulations.fhir_vocabulary import ATC, DRUGS, ICD10, REASONS, RXNORM, Drug, concrete_codes, matches


def render_patient_resource(p: PatientRecords, feats: list[FeatureColumn], row: np.ndarray, site: str) -> dict:
    """The Patient: a birth date giving the age in whole years, the gender, the extensions' values."""
    rng = p.rng
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": p.pid,
        "identifier": [{"system": f"https://fedcare.example/fhir/mrn/{site}", "value": f"{int(rng.integers(10**7, 10**8))}"}],
        "active": True,
    }
    extensions = []
    for f in feats:
        source = f.rule.source
        value = row[f.column]
        if source == "patient_female":
            if value == 1:
                patient["gender"] = "female"
            elif value == 0:
                patient["gender"] = "male"
            elif rng.random() < 0.6:
                patient["gender"] = "unknown"
        elif source == "patient_age":
            if math.isnan(value) or value != int(value):
                raise NotRepresentable(f"{f.name} = {value!r} is not whole years from a birth date")
            patient["birthDate"] = birth_date(rng, p.index, int(value)).isoformat()
        elif source == "patient_extension" and not math.isnan(value):
            if value == int(value) and rng.random() < 0.5:
                extensions.append({"url": f.rule.url, "valueInteger": int(value)})
            else:
                extensions.append({"url": f.rule.url, "valueDecimal": float(value)})
    if extensions:
        patient["extension"] = extensions
    p.resources["Patient"].append(patient)
    return patient


def birth_date(rng: np.random.Generator, index: date, age: int) -> date:
    """A birth date with exactly `age` whole years at the index date (never 29 February)."""
    while True:
        if rng.random() < 0.5:  # birthday already passed this year (or is today)
            year = index.year - age
            start, end = date(year, 1, 1), date(year, index.month, index.day)
        else:  # birthday still to come
            year = index.year - age - 1
            start, end = date(year, index.month, index.day) + timedelta(days=1), date(year, 12, 31)
        if end < start:
            continue
        born = start + timedelta(days=int(rng.integers(0, (end - start).days + 1)))
        if (born.month, born.day) != (2, 29):
            return born


def render_conditions(p: PatientRecords, f: FeatureColumn, row: np.ndarray) -> None:
    """Conditions whose count (or presence) in the window is the feature's value."""
    rng = p.rng
    concrete = concrete_codes(f.rule.codes)
    w = f.rule.window_days
    reach = min(w - 1, 15 * 365)  # how far back records go (a 100-year window is "ever")
    aggregate = f.rule.aggregate
    value = row[f.column]
    if math.isnan(value):
        raise NotRepresentable(f"{f.name} cannot be missing (a {aggregate} of conditions is 0 without records)")
    k = int(value)
    clinical = "resolved" if aggregate == "count" else "active"
    if aggregate == "any":
        k = 1 if value == 1 else 0
        dates = [int(rng.integers(30, reach))] * (int(rng.integers(1, 3)) if k else 0)
    else:
        dates = distinct_days(rng, k, 2, reach)
    for d in dates:
        if rng.random() < 0.15:  # no onset: the recorded date is the date
            condition(p, pick(rng, concrete), None, d, clinical=clinical)
        else:  # recorded a few days after the onset (never after the index date)
            recorded = max(1, d - int(rng.integers(0, 4))) if rng.random() < 0.6 else None
            condition(p, pick(rng, concrete), d, recorded, clinical=clinical)
        if aggregate == "count" and rng.random() < 0.15:  # the same episode recorded twice that day
            condition(p, pick(rng, concrete), d, None, verification="confirmed", clinical=clinical)
    if rng.random() < 0.08:  # ruled out in the window
        p.distractors += 1
        condition(p, pick(rng, concrete), int(rng.integers(2, reach)), None, verification=pick(rng, ["refuted", "entered-in-error"]))
    if aggregate == "count" and w < 20 * 365 and rng.random() < 0.1:
        p.distractors += 1
        old = w + int(rng.integers(30, 900))
        if rng.random() < 0.5:  # onset before the window, recorded inside it: the onset decides
            condition(p, pick(rng, concrete), old, int(rng.integers(1, w - 1)), clinical="resolved")
        else:
            condition(p, pick(rng, concrete), old, None, clinical="resolved")


def unrelated_conditions(p: PatientRecords, all_condition_patterns: list[Code]) -> None:
    """Diagnoses no rule's codes match."""
    rng = p.rng
    pool = [c for c in ((ICD10, c) for c in ("I10", "E11.9", "J45.909", "F43.10", "F40.10", "G89.18", "M54.50", "F31.9")) if not matches(*c, all_condition_patterns)]
    for _ in range(int(rng.poisson(0.8))):
        p.distractors += 1
        condition(p, pick(rng, pool), int(rng.integers(2, 3650)), None)


def encounter_hits(cls: str, reason: tuple[str, str] | None, rules: list[FeatureRule]) -> bool:
    """Whether a visit of class `cls` for `reason` would count for one of the encounter `rules`."""
    for rule in rules:
        if cls not in rule.classes:
            continue
        if not rule.reason_codes or (reason is not None and matches(*reason, rule.reason_codes)):
            return True
    return False


def render_encounters(p: PatientRecords, f: FeatureColumn, row: np.ndarray, others: list[FeatureRule]) -> None:
    """Encounters whose count (or presence) in the window is the feature's value, counting for no `others` rule."""
    rng = p.rng
    value = row[f.column]
    if math.isnan(value):
        raise NotRepresentable(f"{f.name} cannot be missing (an encounter {f.rule.aggregate} is 0 without records)")
    classes = list(f.rule.classes)
    reasons = f.rule.reason_codes
    w = f.rule.window_days
    k = 1 if f.rule.aggregate == "any" and value == 1 else int(value)
    for d in distinct_days(rng, k, 1, w - 1):
        cls = pick(rng, classes)
        if reasons:
            reason = pick(rng, concrete_codes(reasons))
        else:
            options = [r for r in REASONS if not encounter_hits(cls, r, others)] or [None]
            reason = pick(rng, options) if rng.random() < 0.85 else None
        if encounter_hits(cls, reason, others):
            raise NotRepresentable(f"an encounter for {f.name} would also count for another feature")
        encounter(p, cls, d, reason, stay_days=int(rng.integers(2, 21)) if cls == "IMP" else 0)
    if rng.random() < 0.15:  # same class, just outside the window
        p.distractors += 1
        cls = pick(rng, classes)
        reason = pick(rng, concrete_codes(reasons)) if reasons else None
        encounter(p, cls, w + int(rng.integers(3, 300)), reason, stay_days=3 if cls == "IMP" else 0)
    if reasons and rng.random() < 0.1:  # same class, a reason that does not qualify
        for cls in classes:
            pool = [r for r in REASONS if not matches(*r, reasons)]
            reason = pick(rng, pool)
            if pool and not encounter_hits(cls, reason, others):
                p.distractors += 1
                encounter(p, cls, int(rng.integers(1, w)), reason, stay_days=4 if cls == "IMP" else 0)
                break


def other_encounters(p: PatientRecords, all_rules: list[FeatureRule], label_rules: list[FeatureRule]) -> None:
    """Visits of classes no feature counts (ambulatory, virtual), before and after the index date."""
    rng = p.rng
    for _ in range(int(rng.poisson(1.5))):
        cls = pick(rng, ["AMB", "AMB", "VR", "HH"])
        reason = (ICD10, pick(rng, ["Z00.00", "I10", "F33.1", "F41.1", "M54.50"]))
        if encounter_hits(cls, reason, all_rules) or encounter_hits(cls, reason, label_rules):
            continue
        p.distractors += 1
        encounter(p, cls, int(rng.integers(-360, 720)) or 1, reason)


def render_pdc(p: PatientRecords, f: FeatureColumn, row: np.ndarray) -> None:
    """Prescriptions whose union of supply days in the window, over its length, is the feature's value."""
    rng = p.rng
    w = f.rule.window_days
    value = row[f.column]
    if math.isnan(value):
        raise NotRepresentable(f"{f.name} cannot be missing (PDC is 0 without supply)")
    covered = int(round(value * w))
    if abs(covered / w - value) > 1e-9:
        raise NotRepresentable(f"{f.name} = {value!r} is not a whole number of days / {w}")
    patterns = f.rule.codes
    drugs = [d for d in DRUGS if matches(RXNORM, d.rxnorm, patterns) or matches(ATC, d.atc, patterns)]
    others = [d for d in DRUGS if not (matches(RXNORM, d.rxnorm, patterns) or matches(ATC, d.atc, patterns))]
    if covered and not drugs:
        raise NotImplementedError(f"no known drug matches the codes of {f.name}")

    def codings(drug: Drug, matching: bool) -> list[dict]:
        rx, atc = coding(RXNORM, drug.rxnorm) | {"display": drug.name}, coding(ATC, drug.atc) | {"display": drug.name}
        options = [[rx, atc], [rx], [atc]]
        if matching:
            options = [o for o in options if any(matches(c["system"], c["code"], patterns) for c in o)]
        return pick(rng, options)

    drug = pick(rng, drugs) if drugs else None
    if covered:
        chunks = []
        remaining = covered
        while remaining > 0:
            size = min(remaining, pick(rng, [30, 30, 30, 28, 90]))
            chunks.append(size)
            remaining -= size
        gaps = rng.multinomial(w - covered, np.ones(len(chunks) + 1) / (len(chunks) + 1))
        first_day = w - 1  # days before index of the window's first day
        cursor = first_day - int(gaps[0])
        for i, size in enumerate(chunks):
            if i and rng.random() < 0.1:
                drug = pick(rng, drugs)  # switched drug
            start, days = cursor, size
            if i == 0 and gaps[0] == 0 and rng.random() < 0.3:  # started before the window
                extra = int(rng.integers(1, 40))
                start, days = cursor + extra, size + extra
            medication_request(p, drug, codings(drug, True), start, days, "active" if i == len(chunks) - 1 else "completed")
            if rng.random() < 0.1:  # an early refill inside a covered stretch: coverage does not change
                p.distractors += 1
                back = int(rng.integers(0, size))
                medication_request(p, drug, codings(drug, True), cursor - back, int(rng.integers(1, size - back + 1)), "completed")
            cursor -= size + int(gaps[i + 1])
    if drugs and rng.random() < (0.2 if covered else 0.05):  # a course that ended before the window
        p.distractors += 1
        size = pick(rng, [30, 90])
        end_gap = int(rng.integers(3, 200))
        past = drug or pick(rng, drugs)
        medication_request(p, past, codings(past, True), w + end_gap + size, size, "completed")
    for _ in range(int(rng.poisson(0.6))):  # unrelated prescriptions, some overlapping the window
        other = pick(rng, others)
        p.distractors += 1
        medication_request(p, other, codings(other, False), int(rng.integers(1, 400)), pick(rng, [30, 90]), "active")


def render_label(p: PatientRecords, label: int, label_rule: LabelRule) -> None:
    """The label: 1 = a qualifying event in its window after the index date; 0 = only events that qualify for no rule."""
    rng = p.rng
    rules = label_rule.any_of
    if label == 1:
        chosen = [r for r in rules if rng.random() < 0.6] or [pick(rng, rules)]
        for event in chosen:
            days_after = int(rng.integers(1, event.window_days_after))
            source = event.source
            if source == "condition":
                code = pick(rng, concrete_codes(event.codes))
                condition(p, code, -days_after, -days_after if rng.random() < 0.5 else None)
            elif source == "encounter":
                cls = pick(rng, list(event.classes))
                reasons = event.reason_codes
                reason = pick(rng, concrete_codes(reasons)) if reasons else None
                encounter(p, cls, -days_after, reason, stay_days=int(rng.integers(2, 15)) if cls == "IMP" else 0)
            else:
                raise NotImplementedError(f"label rule source {source!r}")
        return
    # Label 0: after the index date only events that define no label.
    horizon = label_rule.window_days_after
    if rng.random() < 0.25:
        encounters = [r for r in rules if r.source == "encounter"]
        classes = sorted({c for r in encounters for c in r.classes}) or ["EMER"]
        cls = pick(rng, classes)
        options = [r for r in REASONS if not encounter_hits(cls, r, encounters)]
        if options:
            p.distractors += 1
            encounter(p, cls, -int(rng.integers(1, horizon)), pick(rng, options))
    condition_patterns = [c for r in rules if r.source == "condition" for c in r.codes]
    if rng.random() < 0.2:
        pool = [(ICD10, c) for c in ("I10", "E11.9", "J45.909", "M54.50") if not matches(ICD10, c, condition_patterns)]
        p.distractors += 1
        condition(p, pick(rng, pool), -int(rng.integers(1, horizon)), None)
