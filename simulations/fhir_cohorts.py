"""Render synthetic cohorts as FHIR R4 bulk-data NDJSON that the study's `[mapping]` derives back exactly.

`write_fhir_split` turns one split (rows of raw feature values in spec order, NaN = missing,
plus 0/1 labels) into `Patient.ndjson`, `Observation.ndjson`, `Condition.ndjson`,
`MedicationRequest.ndjson` and `Encounter.ndjson` such that the derivation in docs/FHIR.md
yields the same values: same feature values (within float rounding), same missing cells,
same labels. It is driven by the parsed mapping (`fedcare.mapping`): codes, windows, units,
aggregates and the index date all come from it, so a study that changes a window or a code
still round-trips.

The records look like a real EHR export rather than the minimum the mapping needs:

* units vary where the mapping converts (weights in kg, [lb_av] or g; heights in cm, [in_i]
  or m; sleep in h or min; HRV in ms or s; scores as {score}, 1 or {#}; …);
* every aggregate is exercised the way it would be in practice: several PHQ-9 assessments
  with the latest and a 90-day trend, nightly wearable readings whose mean is the feature,
  refills whose union of supply days is the PDC (with gaps, early refills and a fill that
  started before the window), repeated diagnoses on the same date;
* distractors that must not change anything: unrelated Observation codes (PHQ-2, heart
  rate, blood pressure, a recorded BMI), records just outside a window, entered-in-error
  observations, refuted conditions, conditions whose onset is before the window but whose
  recordedDate is inside it, unrelated diagnoses (F43.10 is not F41*, G89.18 is not G89.2*),
  ambulatory encounters, non-psychiatric admissions, non-antidepressant prescriptions, and
  after the index date events that do not define the label.

Exactness has a price in two places: the earlier PHQ-9 scores that carry a 90-day slope are
decimals (latest - slope * days / 30; the slope is continuous), and the latest weight is
bmi * height² at full float precision (the height is a realistic 0.1 cm / 0.1 in / 0.01 m).
Dates stay away from window edges by at least a day, times keep the local date equal to the
UTC date, and nothing is dated after the label window closes (index date + the label's
`window_days_after`, the earliest day such an export can be made), so a reader that refuses
future dates accepts everything when `today` is at least that day.

Patient ids are `p` + 7 digits (`first_patient + row`), so sorting ids gives row order.
Lines of the non-Patient files are shuffled (a bulk export is not ordered by patient).
Everything is a pure function of (rows, labels, seed, first_patient).

`write_fhir_site` does this for one already written synthetic site (`<site>/train.csv`,
`<site>/test.csv` from `simulations/cohorts.py`), writing `<site>/train/` and `<site>/test/`
next to the CSVs from the values the CSVs hold; `write_fhir_cohorts` for every site of a tree.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.study import Study

LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
RESOURCE_TYPES = ("Patient", "Observation", "Condition", "MedicationRequest", "Encounter")
ID_DIGITS = 7

# Displays of the codes we render (a code not listed renders without a display).
DISPLAYS = {
    (LOINC, "44261-6"): "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]",
    (LOINC, "70274-6"): "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]",
    (LOINC, "93832-4"): "Sleep duration",
    (LOINC, "41950-7"): "Number of steps in 24 hour Measured",
    (LOINC, "40443-4"): "Heart rate --resting",
    (LOINC, "80404-7"): "R-R interval.standard deviation (Heart rate variability)",
    (LOINC, "29463-7"): "Body weight",
    (LOINC, "8302-2"): "Body height",
    (LOINC, "39156-5"): "Body mass index (BMI) [Ratio]",
    (LOINC, "55758-7"): "Patient Health Questionnaire 2 item (PHQ-2) total score [Reported]",
    (LOINC, "8867-4"): "Heart rate",
    (LOINC, "8480-6"): "Systolic blood pressure",
    (LOINC, "8310-5"): "Body temperature",
    (ICD10, "F32.0"): "Major depressive disorder, single episode, mild",
    (ICD10, "F32.1"): "Major depressive disorder, single episode, moderate",
    (ICD10, "F32.2"): "Major depressive disorder, single episode, severe without psychotic features",
    (ICD10, "F32.9"): "Major depressive disorder, single episode, unspecified",
    (ICD10, "F32.A"): "Depression, unspecified",
    (ICD10, "F33.0"): "Major depressive disorder, recurrent, mild",
    (ICD10, "F33.1"): "Major depressive disorder, recurrent, moderate",
    (ICD10, "F33.2"): "Major depressive disorder, recurrent severe without psychotic features",
    (ICD10, "F33.9"): "Major depressive disorder, recurrent, unspecified",
    (ICD10, "F41.0"): "Panic disorder [episodic paroxysmal anxiety]",
    (ICD10, "F41.1"): "Generalized anxiety disorder",
    (ICD10, "F41.9"): "Anxiety disorder, unspecified",
    (ICD10, "F10.10"): "Alcohol abuse, uncomplicated",
    (ICD10, "F10.20"): "Alcohol dependence, uncomplicated",
    (ICD10, "F11.20"): "Opioid dependence, uncomplicated",
    (ICD10, "F12.90"): "Cannabis use, unspecified, uncomplicated",
    (ICD10, "F13.20"): "Sedative, hypnotic or anxiolytic dependence, uncomplicated",
    (ICD10, "F14.20"): "Cocaine dependence, uncomplicated",
    (ICD10, "F15.20"): "Other stimulant dependence, uncomplicated",
    (ICD10, "F16.20"): "Hallucinogen dependence, uncomplicated",
    (ICD10, "F17.210"): "Nicotine dependence, cigarettes, uncomplicated",
    (ICD10, "F18.20"): "Inhalant dependence, uncomplicated",
    (ICD10, "F19.20"): "Other psychoactive substance dependence, uncomplicated",
    (ICD10, "F20.9"): "Schizophrenia, unspecified",
    (ICD10, "F31.9"): "Bipolar disorder, unspecified",
    (ICD10, "F40.10"): "Social phobia, unspecified",
    (ICD10, "F43.0"): "Acute stress reaction",
    (ICD10, "F43.10"): "Post-traumatic stress disorder, unspecified",
    (ICD10, "G89.21"): "Chronic pain due to trauma",
    (ICD10, "G89.29"): "Other chronic pain",
    (ICD10, "G89.4"): "Chronic pain syndrome",
    (ICD10, "G89.18"): "Other acute postprocedural pain",
    (ICD10, "I10"): "Essential (primary) hypertension",
    (ICD10, "E11.9"): "Type 2 diabetes mellitus without complications",
    (ICD10, "J45.909"): "Unspecified asthma, uncomplicated",
    (ICD10, "M54.50"): "Low back pain, unspecified",
    (ICD10, "J18.9"): "Pneumonia, unspecified organism",
    (ICD10, "K35.80"): "Unspecified acute appendicitis",
    (ICD10, "I21.4"): "Non-ST elevation (NSTEMI) myocardial infarction",
    (ICD10, "S93.401A"): "Sprain of unspecified ligament of right ankle, initial encounter",
    (ICD10, "R07.9"): "Chest pain, unspecified",
    (ICD10, "Z00.00"): "Encounter for general adult medical examination without abnormal findings",
    (ICD10, "R45.851"): "Suicidal ideations",
}
CHAPTER_CHOICES = ("F32.2", "F33.2", "F41.0", "F43.0", "F20.9", "F31.9", "F10.20")
# Concrete codes offered for a prefix pattern (`F41*`): realistic completions.
ICD10_CODES = sorted(code for system, code in DISPLAYS if system == ICD10)
ACT_DISPLAYS = {"IMP": "inpatient encounter", "EMER": "emergency", "AMB": "ambulatory", "VR": "virtual", "HH": "home health"}

# (name, RxNorm ingredient, ATC) — antidepressants and a few unrelated drugs.
DRUGS = (
    ("sertraline", "36437", "N06AB06", "50 mg orally once daily"),
    ("fluoxetine", "4493", "N06AB03", "20 mg orally once daily"),
    ("escitalopram", "321988", "N06AB10", "10 mg orally once daily"),
    ("citalopram", "2556", "N06AB04", "20 mg orally once daily"),
    ("bupropion", "42347", "N06AX12", "150 mg orally once daily (extended release)"),
    ("venlafaxine", "39786", "N06AX16", "75 mg orally once daily (extended release)"),
    ("mirtazapine", "15996", "N06AX11", "15 mg orally at bedtime"),
    ("duloxetine", "72625", "N06AX21", "60 mg orally once daily"),
    ("metformin", "6809", "A10BA02", "500 mg orally twice daily"),
    ("atorvastatin", "83367", "C10AA05", "20 mg orally once daily"),
    ("lisinopril", "29046", "C09AA03", "10 mg orally once daily"),
    ("quetiapine", "51272", "N05AH04", "25 mg orally at bedtime"),
    ("lorazepam", "6470", "N05BA06", "0.5 mg orally as needed"),
)

# Units a site may report, per target unit of the mapping: (UCUM code, display, target -> reported).
UNIT_VARIANTS: dict[str, list[tuple[str, str, Any]]] = {
    "kg": [("kg", "kg", lambda v: v), ("[lb_av]", "lb", lambda v: v / 0.45359237), ("g", "g", lambda v: v * 1000)],
    "cm": [("cm", "cm", lambda v: v), ("[in_i]", "in", lambda v: v / 2.54), ("m", "m", lambda v: v / 100)],
    "m": [("m", "m", lambda v: v), ("cm", "cm", lambda v: v * 100), ("[in_i]", "in", lambda v: v / 0.0254)],
    "h": [("h", "h", lambda v: v), ("min", "min", lambda v: v * 60), ("s", "s", lambda v: v * 3600)],
    "/min": [("/min", "beats/minute", lambda v: v), ("{beats}/min", "beats/min", lambda v: v)],
    "ms": [("ms", "ms", lambda v: v), ("s", "s", lambda v: v / 1000)],
    "{score}": [("{score}", "{score}", lambda v: v), ("1", "score", lambda v: v), ("{#}", "{#}", lambda v: v)],
    "/d": [("/d", "/d", lambda v: v), ("{steps}/d", "steps/day", lambda v: v)],
    "Cel": [("Cel", "°C", lambda v: v), ("[degF]", "°F", lambda v: v * 9 / 5 + 32)],
}
UNIT_WEIGHTS = (0.6, 0.3, 0.1)  # primary unit, first alternative, second alternative
CATEGORIES = {  # observation category by target unit (display only)
    "{score}": "survey",
    "h": "activity",
    "/d": "activity",
    "/min": "vital-signs",
    "ms": "vital-signs",
    "Cel": "vital-signs",
}


class NotRepresentable(ValueError):
    """A row's values cannot all be produced by FHIR records under the mapping."""


# ---------------------------------------------------------------- mapping access


def _get(rule: Any, key: str, default: Any = None) -> Any:
    if isinstance(rule, dict):
        return rule.get(key, default)
    return getattr(rule, key, default)


def _codes(raw: Any) -> list[tuple[str, str]]:
    """The rule's codes as (system, code pattern) pairs; accepts "system|code" strings or pairs/objects."""
    out = []
    for item in raw or ():
        if isinstance(item, str):
            system, _, code = item.partition("|")
        elif isinstance(item, (tuple, list)):
            system, code = item[0], item[1]
            if len(item) > 2 and item[2] is True and not str(code).endswith("*"):
                code = f"{code}*"
        else:
            system, code = _get(item, "system"), _get(item, "code")
            if _get(item, "prefix", False) and not str(code).endswith("*"):
                code = f"{code}*"
        out.append((str(system), str(code)))
    return out


def _norm(system: str, code: str) -> str:
    """ICD-10 codes compare without dots, in upper case (as `fedcare.mapping.normalize_code`)."""
    if system in (ICD10, "http://hl7.org/fhir/sid/icd-10"):
        return code.replace(".", "").upper()
    return code


def _matches(system: str, code: str, patterns: list[tuple[str, str]]) -> bool:
    code = _norm(system, code)
    for psys, pcode in patterns:
        if psys != system:
            continue
        pcode = _norm(psys, pcode)
        if pcode.endswith("*") and code.startswith(pcode[:-1]):
            return True
        if code == pcode:
            return True
    return False


def _concrete_codes(patterns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Realistic concrete codes matching the patterns (exact codes as written, prefixes completed)."""
    return list(_concrete_cached(tuple(patterns)))


@functools.lru_cache(maxsize=256)
def _concrete_cached(patterns: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for system, code in patterns:
        if not code.endswith("*"):
            out.append((system, code))
            continue
        known = [(s, c) for s, c in DISPLAYS if s == system and c.startswith(code[:-1])]
        if system == ICD10 and len(code) <= 2:  # a whole chapter ("F*"): the codes a crisis is coded with
            known = [pair for pair in known if pair[1] in CHAPTER_CHOICES] or known
        if system == ATC:
            known = [(ATC, atc) for _, _, atc, _ in DRUGS if atc.startswith(code[:-1])]
        out.extend(known or [(system, code[:-1].rstrip("."))])
    seen, unique = set(), []
    for pair in out:
        if pair not in seen and pair[1]:
            seen.add(pair)
            unique.append(pair)
    return tuple(unique)


def _index_date(mapping: Any) -> date:
    raw = _get(mapping, "index_date")
    if isinstance(raw, datetime):
        return raw.date()
    if isinstance(raw, date):
        return raw
    return date.fromisoformat(str(raw)[:10])


def _label_rules(mapping: Any) -> list[Any]:
    label = _get(mapping, "label")
    if label is None:
        return []
    if isinstance(label, (list, tuple)):
        return list(label)
    rules = _get(label, "any_of")
    if rules is None:
        rules = _get(label, "rules", [])
    return list(rules)


def _window(rule: Any) -> int:
    return int(_get(rule, "window_days") or 0)


def _window_after(rule: Any) -> int:
    return int(_get(rule, "window_days_after") or _get(rule, "window_days") or 0)


# ---------------------------------------------------------------- resource building


@dataclass
class _Patient:
    """The resources of one patient being built."""

    pid: str
    rng: np.random.Generator
    index: date
    resources: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in RESOURCE_TYPES})
    distractors: int = 0
    serial: int = 0

    def next_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.pid}-{self.serial:03d}"

    @property
    def subject(self) -> dict:
        return {"reference": f"Patient/{self.pid}"}

    def when(self, days_before: int, hour: int | None = None, minute: int | None = None, offset: str | None = None) -> str:
        """ISO dateTime `days_before` days before the index date (negative = after), in daytime hours."""
        rng = self.rng
        day = self.index - timedelta(days=int(days_before))
        hour = int(rng.integers(9, 17)) if hour is None else hour
        minute = int(rng.integers(0, 60)) if minute is None else minute
        offset = _pick(rng, ["Z", "+01:00", "+02:00", "-05:00"]) if offset is None else offset
        return f"{day.isoformat()}T{hour:02d}:{minute:02d}:00{offset}"

    def day(self, days_before: int) -> str:
        return (self.index - timedelta(days=int(days_before))).isoformat()


def _coding(system: str, code: str) -> dict:
    out = {"system": system, "code": code}
    display = DISPLAYS.get((system, code)) or (ACT_DISPLAYS.get(code) if system == ACT_CODE else None)
    if display:
        out["display"] = display
    return out


def _quantity(rng: np.random.Generator, value: float, target_unit: str, integer: bool = False) -> dict:
    """valueQuantity of a target-unit value, in a unit a site might use (converted back exactly by the mapping)."""
    variants = UNIT_VARIANTS.get(target_unit)
    if not variants:
        return {"value": _number(value, integer), "unit": target_unit, "system": UCUM, "code": target_unit}
    weights = UNIT_WEIGHTS[: len(variants)]
    code, display, convert = variants[_weighted(rng, weights)]
    reported = convert(value)
    return {"value": _number(reported, integer and convert(1.0) == 1.0), "unit": display, "system": UCUM, "code": code}


def _number(value: float, integer: bool) -> float | int:
    value = float(value)
    if integer and value == int(value):
        return int(value)
    return value


def _observation(
    p: _Patient,
    code: tuple[str, str],
    when: str,
    quantity: dict,
    category: str | None,
    status: str = "final",
    time_key: str = "effectiveDateTime",
    period_hours: float = 0.0,
) -> dict:
    obs: dict[str, Any] = {"resourceType": "Observation", "id": p.next_id("obs"), "status": status}
    if category:
        obs["category"] = [{"coding": [{"system": OBS_CATEGORY, "code": category}]}]
    obs["code"] = {"coding": [_coding(*code)]}
    obs["subject"] = p.subject
    if time_key == "effectivePeriod":
        obs["effectivePeriod"] = {"start": when}
        if period_hours:  # e.g. a night's sleep: ends the next morning
            start = datetime.fromisoformat(when.replace("Z", "+00:00"))
            obs["effectivePeriod"]["end"] = (start + timedelta(hours=period_hours)).isoformat(timespec="seconds")
    elif time_key == "issued":
        obs["issued"] = when
    else:
        obs[time_key] = when
    obs["valueQuantity"] = quantity
    p.resources["Observation"].append(obs)
    return obs


def _condition(
    p: _Patient,
    code: tuple[str, str],
    days_before: int | None,
    recorded_before: int | None = None,
    verification: str = "confirmed",
    clinical: str = "active",
) -> dict:
    cond: dict[str, Any] = {
        "resourceType": "Condition",
        "id": p.next_id("cond"),
        "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": clinical}]},
        "verificationStatus": {"coding": [{"system": COND_VERIFICATION, "code": verification}]},
        "category": [
            {"coding": [{"system": COND_CATEGORY, "code": _pick(p.rng, ["problem-list-item", "encounter-diagnosis"])}]}
        ],
        "code": {"coding": [_coding(*code)], "text": DISPLAYS.get(code, code[1])},
        "subject": p.subject,
    }
    if days_before is not None:
        cond["onsetDateTime"] = p.day(days_before) if p.rng.random() < 0.5 else p.when(days_before)
    if recorded_before is not None:
        cond["recordedDate"] = p.when(recorded_before)
    p.resources["Condition"].append(cond)
    return cond


def _encounter(p: _Patient, cls: str, days_before: int, reason: tuple[str, str] | None, stay_days: int = 0) -> dict:
    start = p.index - timedelta(days=int(days_before))
    hour = int(p.rng.integers(0, 24)) if cls == "EMER" else int(p.rng.integers(8, 17))
    # Emergency visits at night: the offset keeps the UTC date equal to the local date.
    offset = "Z" if hour < 9 else _pick(p.rng, ["Z", "+01:00", "+02:00"])
    begin = datetime(start.year, start.month, start.day, hour, int(p.rng.integers(0, 60)))
    end = begin + timedelta(days=stay_days, hours=int(p.rng.integers(1, 8)) if cls != "IMP" else 0)
    enc: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": p.next_id("enc"),
        "status": "finished",
        "class": _coding(ACT_CODE, cls),
        "subject": p.subject,
        "period": {"start": begin.isoformat() + offset, "end": end.isoformat() + offset},
    }
    if reason is not None:
        enc["reasonCode"] = [{"coding": [_coding(*reason)]}]
    p.resources["Encounter"].append(enc)
    return enc


def _medication_request(p: _Patient, drug: tuple, codings: list[dict], start_before: int, days: int, status: str) -> dict:
    name, _, _, sig = drug
    req = {
        "resourceType": "MedicationRequest",
        "id": p.next_id("medrx"),
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"coding": codings, "text": name},
        "subject": p.subject,
        "authoredOn": p.when(start_before, offset=_pick(p.rng, ["Z", "+01:00", "+02:00"])),
        "dosageInstruction": [{"text": sig}],
        "dispenseRequest": {
            "quantity": {"value": days, "unit": "tablet", "system": UCUM, "code": "{tbl}"},
            "expectedSupplyDuration": {"value": days, "unit": "days", "system": UCUM, "code": "d"},
        },
    }
    p.resources["MedicationRequest"].append(req)
    return req


# ---------------------------------------------------------------- feature renderers


@dataclass(frozen=True)
class _Feature:
    name: str
    column: int
    rule: Any
    low: float
    high: float
    center: float
    integer: bool


def _pick(rng: np.random.Generator, items: list | tuple) -> Any:
    return items[int(rng.integers(0, len(items)))]


def _weighted(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    """Index drawn with probability proportional to `weights`."""
    x = rng.random() * sum(weights)
    for i, w in enumerate(weights):
        x -= w
        if x < 0:
            return i
    return len(weights) - 1


def _distinct_days(rng: np.random.Generator, k: int, low: int, high: int) -> list[int]:
    """k distinct whole days in [low, high], most recent (smallest) first."""
    if k <= 0:
        return []
    if high - low + 1 < k:
        raise NotRepresentable(f"cannot place {k} records on distinct days in [{low}, {high}]")
    days: set[int] = set()
    while len(days) < k:
        days.update(int(d) for d in rng.integers(low, high + 1, size=k - len(days)))
    return sorted(days)


def _score_like(rng: np.random.Generator, center: float, low: float, high: float, integer: bool) -> float:
    value = float(np.clip(center + rng.normal(0, max(1.0, 0.15 * (high - low))), low, high))
    return float(round(value)) if integer else round(value, 1)


def _render_observation_group(p: _Patient, codes: list[tuple[str, str]], feats: dict[str, _Feature], row: np.ndarray) -> None:
    """All observation features sharing one code set: `mean` alone, `any` alone, or latest / count / slope_per_30d."""
    rng = p.rng
    concrete = _concrete_codes(codes)
    aggs = set(feats)
    unit = next(str(_get(f.rule, "unit") or "") for f in feats.values())
    category = CATEGORIES.get(unit)
    windows = {agg: _window(f.rule) for agg, f in feats.items()}
    outer = max(windows.values())
    clinic = (int(rng.integers(9, 17)), _pick(rng, [0, 15, 30, 45]), _pick(rng, ["Z", "+01:00", "+02:00"]))

    def emit(days_before: int, value: float, integer: bool, status: str = "final", time_key: str = "effectiveDateTime", same_clock: bool = False) -> None:
        if time_key == "effectivePeriod":  # a night's sleep starts the evening before; local date = UTC date
            when = p.when(days_before, hour=int(rng.integers(21, 24)), offset=_pick(rng, ["Z", "+01:00", "+02:00"]))
        else:
            when = p.when(days_before, *clinic) if same_clock else p.when(days_before)
        whole = integer and float(value) == round(float(value))
        hours = float(value) if unit == "h" and time_key == "effectivePeriod" else 0.0
        _observation(p, _pick(rng, concrete), when, _quantity(rng, value, unit, whole), category, status, time_key, hours)

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
            for d, v in zip(_distinct_days(rng, k, 1, w - 1), vals):
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
        latest = _score_like(rng, (low + high) / 3, low, high, integer)
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
    records += [(d, _score_like(rng, latest, low, high, integer)) for d in older]
    latest_only = aggs == {"latest"}
    for d, v in records:
        emit(d, v, integer, same_clock=True, time_key="issued" if latest_only and rng.random() < 0.1 else "effectiveDateTime")
    if rng.random() < 0.25:  # an assessment older than every window
        p.distractors += 1
        emit(outer + int(rng.integers(5, 300)), _score_like(rng, (low + high) / 3, low, high, integer), integer, same_clock=True)
    if rng.random() < 0.05:  # entered in error, at least as recent as the real ones
        p.distractors += 1
        emit(max(1, records[0][0] - 1) if records else int(rng.integers(1, outer)), high, integer, status="entered-in-error", same_clock=True)


def _render_bmi(p: _Patient, f: _Feature, row: np.ndarray, female: float) -> None:
    rng = p.rng
    w = _window(f.rule)
    weight_codes = _concrete_codes(_codes(_get(f.rule, "weight_codes")))
    height_codes = _concrete_codes(_codes(_get(f.rule, "height_codes")))
    bmi = row[f.column]
    height_m = float(np.clip(rng.normal(1.63 if female == 1 else 1.77 if female == 0 else 1.70, 0.07), 1.4, 2.05))

    def height_record(days_before: int, h: float) -> float:
        """Write a height observation; returns the height in m exactly as the mapping converts it."""
        choice = _weighted(rng, (0.6, 0.25, 0.15))
        if choice == 0:
            value, code, unit = round(h * 100, 1), "cm", "cm"
            as_m = value / 100
        elif choice == 1:
            value, code, unit = round(h / 0.0254, 1), "[in_i]", "in"
            as_m = value * 0.0254
        else:
            value, code, unit = round(h, 2), "m", "m"
            as_m = value
        _observation(p, _pick(rng, height_codes), p.when(days_before), {"value": value, "unit": unit, "system": UCUM, "code": code}, "vital-signs")
        return as_m

    def weight_record(days_before: int, kg: float) -> None:
        choice = _weighted(rng, (0.65, 0.3, 0.05))
        quantity = (
            {"value": kg, "unit": "kg", "system": UCUM, "code": "kg"}
            if choice == 0
            else {"value": kg / 0.45359237, "unit": "lb", "system": UCUM, "code": "[lb_av]"}
            if choice == 1
            else {"value": kg * 1000, "unit": "g", "system": UCUM, "code": "g"}
        )
        _observation(p, _pick(rng, weight_codes), p.when(days_before), quantity, "vital-signs")

    if not math.isnan(bmi):
        h_days = _distinct_days(rng, int(rng.integers(1, 3)), 1, w - 1)
        w_days = _distinct_days(rng, int(rng.integers(1, 4)), 1, w - 1)
        as_m = height_record(h_days[0], height_m)
        for d in h_days[1:]:
            height_record(d, height_m + rng.normal(0, 0.005))
        weight_record(w_days[0], bmi * as_m * as_m)
        for d in w_days[1:]:
            weight_record(d, round(bmi * height_m**2 + rng.normal(0, 2.5), 1))
        if rng.random() < 0.3:  # a BMI the EHR computed itself: not what the mapping reads
            _observation(p, (LOINC, "39156-5"), p.when(w_days[0]), {"value": round(bmi, 1), "unit": "kg/m2", "system": UCUM, "code": "kg/m2"}, "vital-signs")
    else:
        if rng.random() < 0.3:  # height in the window but no weight
            height_record(int(rng.integers(1, w)), height_m)
    if rng.random() < 0.3:  # measurements from before the window
        d = w + int(rng.integers(5, 400))
        height_record(d, height_m)
        usual = bmi * height_m**2 if not math.isnan(bmi) else float(rng.normal(28, 5)) * height_m**2
        weight_record(d, round(float(np.clip(usual * rng.uniform(0.9, 1.1), 35, 250)), 1))


def _render_patient_resource(p: _Patient, feats: list[_Feature], row: np.ndarray, site: str) -> dict:
    rng = p.rng
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": p.pid,
        "identifier": [{"system": f"https://fedcare.example/fhir/mrn/{site}", "value": f"{int(rng.integers(10**7, 10**8))}"}],
        "active": True,
    }
    extensions = []
    for f in feats:
        source = _get(f.rule, "source")
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
            patient["birthDate"] = _birth_date(rng, p.index, int(value)).isoformat()
        elif source == "patient_extension" and not math.isnan(value):
            if value == int(value) and rng.random() < 0.5:
                extensions.append({"url": _get(f.rule, "url"), "valueInteger": int(value)})
            else:
                extensions.append({"url": _get(f.rule, "url"), "valueDecimal": float(value)})
    if extensions:
        patient["extension"] = extensions
    p.resources["Patient"].append(patient)
    return patient


def _birth_date(rng: np.random.Generator, index: date, age: int) -> date:
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


def _render_conditions(p: _Patient, f: _Feature, row: np.ndarray) -> None:
    rng = p.rng
    patterns = _codes(_get(f.rule, "codes"))
    concrete = _concrete_codes(patterns)
    w = _window(f.rule)
    reach = min(w - 1, 15 * 365)  # how far back records go (a 100-year window is "ever")
    aggregate = _get(f.rule, "aggregate")
    value = row[f.column]
    if math.isnan(value):
        raise NotRepresentable(f"{f.name} cannot be missing (a {aggregate} of conditions is 0 without records)")
    k = int(value)
    clinical = "resolved" if aggregate == "count" else "active"
    if aggregate == "any":
        k = 1 if value == 1 else 0
        dates = [int(rng.integers(30, reach))] * (int(rng.integers(1, 3)) if k else 0)
    else:
        dates = _distinct_days(rng, k, 2, reach)
    for d in dates:
        if rng.random() < 0.15:  # no onset: the recorded date is the date
            _condition(p, _pick(rng, concrete), None, d, clinical=clinical)
        else:  # recorded a few days after the onset (never after the index date)
            recorded = max(1, d - int(rng.integers(0, 4))) if rng.random() < 0.6 else None
            _condition(p, _pick(rng, concrete), d, recorded, clinical=clinical)
        if aggregate == "count" and rng.random() < 0.15:  # the same episode recorded twice that day
            _condition(p, _pick(rng, concrete), d, None, verification="confirmed", clinical=clinical)
    if rng.random() < 0.08:  # ruled out in the window
        p.distractors += 1
        _condition(p, _pick(rng, concrete), int(rng.integers(2, reach)), None, verification=_pick(rng, ["refuted", "entered-in-error"]))
    if aggregate == "count" and w < 20 * 365 and rng.random() < 0.1:
        p.distractors += 1
        old = w + int(rng.integers(30, 900))
        if rng.random() < 0.5:  # onset before the window, recorded inside it: the onset decides
            _condition(p, _pick(rng, concrete), old, int(rng.integers(1, w - 1)), clinical="resolved")
        else:
            _condition(p, _pick(rng, concrete), old, None, clinical="resolved")


def _unrelated_conditions(p: _Patient, all_condition_patterns: list) -> None:
    rng = p.rng
    pool = [c for c in ((ICD10, c) for c in ("I10", "E11.9", "J45.909", "F43.10", "F40.10", "G89.18", "M54.50", "F31.9")) if not _matches(*c, all_condition_patterns)]
    for _ in range(int(rng.poisson(0.8))):
        p.distractors += 1
        _condition(p, _pick(rng, pool), int(rng.integers(2, 3650)), None)


def _encounter_hits(cls: str, reason: tuple[str, str] | None, rules: list[Any]) -> bool:
    for rule in rules:
        if cls not in tuple(_get(rule, "classes") or ()):
            continue
        reasons = _codes(_get(rule, "reason_codes"))
        if not reasons or (reason is not None and _matches(*reason, reasons)):
            return True
    return False


REASONS = [(ICD10, c) for c in ("F41.0", "F32.9", "F43.0", "R07.9", "S93.401A", "J18.9", "R45.851", "K35.80")]


def _render_encounters(p: _Patient, f: _Feature, row: np.ndarray, others: list[Any]) -> None:
    rng = p.rng
    value = row[f.column]
    if math.isnan(value):
        raise NotRepresentable(f"{f.name} cannot be missing (an encounter {_get(f.rule, 'aggregate')} is 0 without records)")
    classes = list(_get(f.rule, "classes"))
    reasons = _codes(_get(f.rule, "reason_codes"))
    w = _window(f.rule)
    k = 1 if _get(f.rule, "aggregate") == "any" and value == 1 else int(value)
    for d in _distinct_days(rng, k, 1, w - 1):
        cls = _pick(rng, classes)
        if reasons:
            reason = _pick(rng, _concrete_codes(reasons))
        else:
            options = [r for r in REASONS if not _encounter_hits(cls, r, others)] or [None]
            reason = _pick(rng, options) if rng.random() < 0.85 else None
        if _encounter_hits(cls, reason, others):
            raise NotRepresentable(f"an encounter for {f.name} would also count for another feature")
        _encounter(p, cls, d, reason, stay_days=int(rng.integers(2, 21)) if cls == "IMP" else 0)
    if rng.random() < 0.15:  # same class, just outside the window
        p.distractors += 1
        cls = _pick(rng, classes)
        reason = _pick(rng, _concrete_codes(reasons)) if reasons else None
        _encounter(p, cls, w + int(rng.integers(3, 300)), reason, stay_days=3 if cls == "IMP" else 0)
    if reasons and rng.random() < 0.1:  # same class, a reason that does not qualify
        for cls in classes:
            pool = [r for r in REASONS if not _matches(*r, reasons)]
            reason = _pick(rng, pool)
            if pool and not _encounter_hits(cls, reason, others):
                p.distractors += 1
                _encounter(p, cls, int(rng.integers(1, w)), reason, stay_days=4 if cls == "IMP" else 0)
                break


def _other_encounters(p: _Patient, all_rules: list[Any], label_rules: list[Any]) -> None:
    """Visits of classes no feature counts (ambulatory, virtual), before and after the index date."""
    rng = p.rng
    for _ in range(int(rng.poisson(1.5))):
        cls = _pick(rng, ["AMB", "AMB", "VR", "HH"])
        reason = (ICD10, _pick(rng, ["Z00.00", "I10", "F33.1", "F41.1", "M54.50"]))
        if _encounter_hits(cls, reason, all_rules) or _encounter_hits(cls, reason, label_rules):
            continue
        p.distractors += 1
        _encounter(p, cls, int(rng.integers(-360, 720)) or 1, reason)


def _render_pdc(p: _Patient, f: _Feature, row: np.ndarray) -> None:
    rng = p.rng
    w = _window(f.rule)
    value = row[f.column]
    if math.isnan(value):
        raise NotRepresentable(f"{f.name} cannot be missing (PDC is 0 without supply)")
    covered = int(round(value * w))
    if abs(covered / w - value) > 1e-9:
        raise NotRepresentable(f"{f.name} = {value!r} is not a whole number of days / {w}")
    patterns = _codes(_get(f.rule, "codes"))
    drugs = [d for d in DRUGS if _matches(RXNORM, d[1], patterns) or _matches(ATC, d[2], patterns)]
    others = [d for d in DRUGS if not (_matches(RXNORM, d[1], patterns) or _matches(ATC, d[2], patterns))]
    if covered and not drugs:
        raise NotImplementedError(f"no known drug matches the codes of {f.name}")

    def codings(drug: tuple, matching: bool) -> list[dict]:
        rx, atc = _coding(RXNORM, drug[1]) | {"display": drug[0]}, _coding(ATC, drug[2]) | {"display": drug[0]}
        options = [[rx, atc], [rx], [atc]]
        if matching:
            options = [o for o in options if any(_matches(c["system"], c["code"], patterns) for c in o)]
        return _pick(rng, options)

    drug = _pick(rng, drugs) if drugs else None
    if covered:
        chunks = []
        remaining = covered
        while remaining > 0:
            size = min(remaining, _pick(rng, [30, 30, 30, 28, 90]))
            chunks.append(size)
            remaining -= size
        gaps = rng.multinomial(w - covered, np.ones(len(chunks) + 1) / (len(chunks) + 1))
        first_day = w - 1  # days before index of the window's first day
        cursor = first_day - int(gaps[0])
        for i, size in enumerate(chunks):
            if i and rng.random() < 0.1:
                drug = _pick(rng, drugs)  # switched drug
            start, days = cursor, size
            if i == 0 and gaps[0] == 0 and rng.random() < 0.3:  # started before the window
                extra = int(rng.integers(1, 40))
                start, days = cursor + extra, size + extra
            _medication_request(p, drug, codings(drug, True), start, days, "active" if i == len(chunks) - 1 else "completed")
            if rng.random() < 0.1:  # an early refill inside a covered stretch: coverage does not change
                p.distractors += 1
                back = int(rng.integers(0, size))
                _medication_request(p, drug, codings(drug, True), cursor - back, int(rng.integers(1, size - back + 1)), "completed")
            cursor -= size + int(gaps[i + 1])
    if drugs and rng.random() < (0.2 if covered else 0.05):  # a course that ended before the window
        p.distractors += 1
        size = _pick(rng, [30, 90])
        end_gap = int(rng.integers(3, 200))
        past = drug or _pick(rng, drugs)
        _medication_request(p, past, codings(past, True), w + end_gap + size, size, "completed")
    for _ in range(int(rng.poisson(0.6))):  # unrelated prescriptions, some overlapping the window
        other = _pick(rng, others)
        p.distractors += 1
        _medication_request(p, other, codings(other, False), int(rng.integers(1, 400)), _pick(rng, [30, 90]), "active")


def _render_label(p: _Patient, label: int, rules: list[Any]) -> None:
    rng = p.rng
    if label == 1:
        chosen = [r for r in rules if rng.random() < 0.6] or [_pick(rng, rules)]
        for rule in chosen:
            w = _window_after(rule)
            days_after = int(rng.integers(1, w))
            source = _get(rule, "source")
            if source == "condition":
                code = _pick(rng, _concrete_codes(_codes(_get(rule, "codes"))))
                _condition(p, code, -days_after, -days_after if rng.random() < 0.5 else None)
            elif source == "encounter":
                cls = _pick(rng, list(_get(rule, "classes")))
                reasons = _codes(_get(rule, "reason_codes"))
                reason = _pick(rng, _concrete_codes(reasons)) if reasons else None
                _encounter(p, cls, -days_after, reason, stay_days=int(rng.integers(2, 15)) if cls == "IMP" else 0)
            else:
                raise NotImplementedError(f"label rule source {source!r}")
        return
    # Label 0: after the index date only events that define no label.
    horizon = max((_window_after(r) for r in rules), default=365)
    if rng.random() < 0.25:
        classes = sorted({c for r in rules if _get(r, "source") == "encounter" for c in _get(r, "classes")}) or ["EMER"]
        cls = _pick(rng, classes)
        options = [r for r in REASONS if not _encounter_hits(cls, r, [r2 for r2 in rules if _get(r2, "source") == "encounter"])]
        if options:
            p.distractors += 1
            _encounter(p, cls, -int(rng.integers(1, horizon)), _pick(rng, options))
    condition_patterns = [c for r in rules if _get(r, "source") == "condition" for c in _codes(_get(r, "codes"))]
    if rng.random() < 0.2:
        pool = [(ICD10, c) for c in ("I10", "E11.9", "J45.909", "M54.50") if not _matches(ICD10, c, condition_patterns)]
        p.distractors += 1
        _condition(p, _pick(rng, pool), -int(rng.integers(1, horizon)), None)


# ---------------------------------------------------------------- public API


def _features(study: Study, mapping: Any) -> list[_Feature]:
    rules = _get(mapping, "features")
    out = []
    for j, f in enumerate(study.features):
        if f.name not in rules:
            raise ValueError(f"the mapping has no rule for feature {f.name}")
        out.append(_Feature(f.name, j, rules[f.name], f.low, f.high, f.center, f.type in ("count", "binary")))
    return out


def _render_patient(p: _Patient, feats: list[_Feature], row: np.ndarray, label: int, label_rules: list[Any], site: str) -> None:
    _render_patient_resource(p, feats, row, site)
    by_source: dict[str, list[_Feature]] = {}
    for f in feats:
        by_source.setdefault(str(_get(f.rule, "source")), []).append(f)
    female = next((row[f.column] for f in feats if _get(f.rule, "source") == "patient_female"), math.nan)

    groups: dict[tuple, dict[str, _Feature]] = {}
    for f in by_source.get("observation", []):
        key = tuple(sorted(_codes(_get(f.rule, "codes"))))
        aggregate = str(_get(f.rule, "aggregate"))
        if aggregate in groups.setdefault(key, {}):
            raise NotImplementedError(f"two features aggregate {key} by {aggregate}")
        groups[key][aggregate] = f
    all_obs = [c for key in groups for c in key]
    for key, members in groups.items():
        _render_observation_group(p, list(key), members, row)
    for f in by_source.get("bmi", []):
        _render_bmi(p, f, row, female)
    obs_patterns = all_obs + [c for f in by_source.get("bmi", []) for c in _codes(_get(f.rule, "weight_codes")) + _codes(_get(f.rule, "height_codes"))]
    for code, value, unit in (((LOINC, "55758-7"), None, "{score}"), ((LOINC, "8867-4"), None, "/min"), ((LOINC, "8480-6"), None, "mm[Hg]"), ((LOINC, "8310-5"), None, "Cel")):
        if _matches(*code, obs_patterns) or p.rng.random() < 0.6:
            continue
        p.distractors += 1
        reading = {"{score}": float(p.rng.integers(0, 7)), "/min": float(p.rng.integers(55, 110)), "mm[Hg]": float(p.rng.integers(100, 165)), "Cel": round(float(p.rng.normal(36.8, 0.3)), 1)}[unit]
        quantity = _quantity(p.rng, reading, unit, integer=unit != "Cel") if unit in UNIT_VARIANTS else {"value": reading, "unit": "mmHg", "system": UCUM, "code": unit}
        _observation(p, code, p.when(int(p.rng.integers(1, 400))), quantity, CATEGORIES.get(unit, "vital-signs"))

    condition_patterns = [c for f in by_source.get("condition", []) for c in _codes(_get(f.rule, "codes"))]
    condition_patterns += [c for r in label_rules if _get(r, "source") == "condition" for c in _codes(_get(r, "codes"))]
    for f in by_source.get("condition", []):
        _render_conditions(p, f, row)
    _unrelated_conditions(p, condition_patterns)

    encounter_rules = [f.rule for f in by_source.get("encounter", [])]
    for f in by_source.get("encounter", []):
        _render_encounters(p, f, row, [r for r in encounter_rules if r is not f.rule])
    _other_encounters(p, encounter_rules, [r for r in label_rules if _get(r, "source") == "encounter"])

    for f in by_source.get("medication", []):
        _render_pdc(p, f, row)
    _render_label(p, label, label_rules)
    unknown = set(by_source) - {"patient_age", "patient_female", "patient_extension", "observation", "bmi", "condition", "encounter", "medication"}
    if unknown:
        raise NotImplementedError(f"mapping sources {sorted(unknown)}")


def patient_id(number: int) -> str:
    """Ids sort in row order: `p0000000`, `p0000001`, …"""
    return f"p{number:0{ID_DIGITS}d}"


def write_fhir_split(
    study: Study,
    mapping: Any,
    rows: np.ndarray,
    labels: np.ndarray,
    out_dir: Path,
    seed: int | Sequence[int],
    first_patient: int = 0,
) -> dict:
    """Write one split as FHIR R4 NDJSON (one file per resource type) in `out_dir`.

    `rows`: raw feature values in the study's feature order (NaN = missing), one row per
    patient; `labels`: 0/1; `mapping`: the parsed `fedcare.mapping.Mapping`; `seed`: an int
    or a sequence of ints. Patient ids are `patient_id(first_patient + i)`. Raises
    `NotRepresentable` (naming the row) if a row cannot come out of FHIR under the mapping,
    e.g. a missing count. Returns {"patients", "resources": {type: count}, "distractors", "files"}.
    """
    rows = np.asarray(rows, dtype=np.float64)
    labels = np.asarray(labels)
    if rows.ndim != 2 or rows.shape[1] != len(study.features) or len(labels) != len(rows):
        raise ValueError(f"rows must be (n, {len(study.features)}) with n labels; got {rows.shape} and {labels.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = _index_date(mapping)
    feats = _features(study, mapping)
    label_rules = _label_rules(mapping)
    if not label_rules:
        raise ValueError("the mapping has no label rules")
    site = out_dir.parent.name or "site"
    seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(x) for x in seed]
    lines: dict[str, list[str]] = {t: [] for t in RESOURCE_TYPES}
    distractors = 0
    for i, (row, label) in enumerate(zip(rows, labels)):
        number = first_patient + i
        if number >= 10**ID_DIGITS:
            raise ValueError("too many patients for the id width")
        p = _Patient(patient_id(number), np.random.default_rng([*seeds, 17, number]), index)
        try:
            _render_patient(p, feats, row, int(label), label_rules, site)
        except NotRepresentable as err:
            raise NotRepresentable(f"row {i} (patient {p.pid}): {err}") from None
        distractors += p.distractors
        for kind, resources in p.resources.items():
            lines[kind].extend(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in resources)
    shuffle = np.random.default_rng([*seeds, 18, first_patient])
    files = {}
    for kind in RESOURCE_TYPES:
        body = lines[kind]
        if kind != "Patient":
            body = [body[k] for k in shuffle.permutation(len(body))]
        path = out_dir / f"{kind}.ndjson"
        path.write_text("".join(line + "\n" for line in body), encoding="utf-8")
        files[kind] = str(path)
    return {
        "patients": int(len(rows)),
        "resources": {kind: len(lines[kind]) for kind in RESOURCE_TYPES},
        "distractors": distractors,
        "files": files,
    }


def write_fhir_site(study: Study, mapping: Any, site_dir: str | Path, seed: int = 0) -> dict:
    """Write `<site_dir>/train/` and `<site_dir>/test/` from `<site_dir>/{train,test}.csv`.

    The values are the CSVs' (read with `client.data.read_site_csv`, which must load every
    row), so the FHIR and CSV forms of a site are the same data. Patient ids continue from
    train into test. Deterministic in (CSV contents, seed, site directory name). Returns
    {"train": summary, "test": summary} with `write_fhir_split`'s summaries.
    """
    from client.data import read_site_csv

    site_dir = Path(site_dir)
    site_seed = zlib.crc32(site_dir.name.encode())
    first = 0
    out: dict[str, dict] = {}
    for k, split in enumerate(("train", "test")):
        table = read_site_csv(study, site_dir / f"{split}.csv")
        if table.report.quarantined:
            raise ValueError(f"{site_dir / split}.csv: rows quarantined, cannot render them:\n{table.report.summary()}")
        out[split] = write_fhir_split(
            study,
            mapping,
            table.features,
            table.labels.astype(np.int64),
            site_dir / split,
            seed=[int(seed), site_seed, k],
            first_patient=first,
        )
        first += out[split]["patients"]
    return out


def write_fhir_cohorts(study: Study, mapping: Any, sites_dir: str | Path, seed: int = 0) -> dict:
    """`write_fhir_site` for every `<site>/` under `sites_dir` that holds train.csv and test.csv.

    Returns {site name: {"train": summary, "test": summary}}.
    """
    sites_dir = Path(sites_dir)
    sites = sorted(d for d in sites_dir.iterdir() if (d / "train.csv").is_file() and (d / "test.csv").is_file())
    if not sites:
        raise ValueError(f"{sites_dir}: no site directories with train.csv and test.csv")
    return {site.name: write_fhir_site(study, mapping, site, seed) for site in sites}


__all__ = ["NotRepresentable", "patient_id", "write_fhir_cohorts", "write_fhir_site", "write_fhir_split"]
