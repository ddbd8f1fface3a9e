"""The terminology the synthetic FHIR export speaks, and how it meets the study's parsed mapping.

Code systems, displays, drugs and visit reasons the writer renders; the units sites report a
value in, for each target unit of `fedcare.mapping.CONVERSIONS`; and the two questions the
renderers ask of a rule's parsed `fedcare.mapping.Code`s: which concrete codes realistically
satisfy them (`concrete_codes`) and whether a concrete coding matches them (`matches`, with
the kernel's `normalize_code`). Nothing here reads the `[mapping]` table itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

from fedcare.mapping import CONVERSIONS, Code, normalize_code

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
# The codes a crisis is coded with, offered for a whole ICD-10 chapter (`F*`).
CHAPTER_CHOICES = ("F32.2", "F33.2", "F41.0", "F43.0", "F20.9", "F31.9", "F10.20")
ACT_DISPLAYS = {"IMP": "inpatient encounter", "EMER": "emergency", "AMB": "ambulatory", "VR": "virtual", "HH": "home health"}
# Visit reasons encounters draw from (some qualify for a rule's reason codes, some do not).
REASONS = [(ICD10, c) for c in ("F41.0", "F32.9", "F43.0", "R07.9", "S93.401A", "J18.9", "R45.851", "K35.80")]


class Drug(NamedTuple):
    name: str
    rxnorm: str  # RxNorm ingredient
    atc: str
    sig: str  # the dosage instruction's text


# Antidepressants, then a few unrelated drugs: name | RxNorm ingredient | ATC | sig.
_DRUG_TABLE = """
sertraline   | 36437  | N06AB06 | 50 mg orally once daily
fluoxetine   | 4493   | N06AB03 | 20 mg orally once daily
escitalopram | 321988 | N06AB10 | 10 mg orally once daily
citalopram   | 2556   | N06AB04 | 20 mg orally once daily
bupropion    | 42347  | N06AX12 | 150 mg orally once daily (extended release)
venlafaxine  | 39786  | N06AX16 | 75 mg orally once daily (extended release)
mirtazapine  | 15996  | N06AX11 | 15 mg orally at bedtime
duloxetine   | 72625  | N06AX21 | 60 mg orally once daily
metformin    | 6809   | A10BA02 | 500 mg orally twice daily
atorvastatin | 83367  | C10AA05 | 20 mg orally once daily
lisinopril   | 29046  | C09AA03 | 10 mg orally once daily
quetiapine   | 51272  | N05AH04 | 25 mg orally at bedtime
lorazepam    | 6470   | N05BA06 | 0.5 mg orally as needed
"""
DRUGS = tuple(Drug(*(cell.strip() for cell in line.split("|"))) for line in _DRUG_TABLE.strip().splitlines())


# ---------------------------------------------------------------- units


class ReportedUnit(NamedTuple):
    """A UCUM unit a site may report a value in; `from_target` turns a target-unit value into it."""

    code: str
    display: str
    from_target: Callable[[float], float]


# Per target unit of `CONVERSIONS`: the units sites report, most common first, each with the
# inverse of the kernel's conversion from it (the kernel's conversions are one-way callables).
# `_check_units` below holds this table to the kernel's: same targets, same source units, and
# each inverse undone by the kernel's conversion.
UNIT_VARIANTS: dict[str, list[ReportedUnit]] = {
    "kg": [ReportedUnit("kg", "kg", lambda v: v), ReportedUnit("[lb_av]", "lb", lambda v: v / 0.45359237), ReportedUnit("g", "g", lambda v: v * 1000)],
    "cm": [ReportedUnit("cm", "cm", lambda v: v), ReportedUnit("[in_i]", "in", lambda v: v / 2.54), ReportedUnit("m", "m", lambda v: v / 100)],
    "m": [ReportedUnit("m", "m", lambda v: v), ReportedUnit("cm", "cm", lambda v: v * 100), ReportedUnit("[in_i]", "in", lambda v: v / 0.0254)],
    "h": [ReportedUnit("h", "h", lambda v: v), ReportedUnit("min", "min", lambda v: v * 60), ReportedUnit("s", "s", lambda v: v * 3600)],
    "/min": [ReportedUnit("/min", "beats/minute", lambda v: v), ReportedUnit("{beats}/min", "beats/min", lambda v: v)],
    "ms": [ReportedUnit("ms", "ms", lambda v: v), ReportedUnit("s", "s", lambda v: v / 1000)],
    "{score}": [ReportedUnit("{score}", "{score}", lambda v: v), ReportedUnit("1", "score", lambda v: v), ReportedUnit("{#}", "{#}", lambda v: v)],
    "/d": [ReportedUnit("/d", "/d", lambda v: v), ReportedUnit("{steps}/d", "steps/day", lambda v: v)],
    "Cel": [ReportedUnit("Cel", "°C", lambda v: v), ReportedUnit("[degF]", "°F", lambda v: v * 9 / 5 + 32)],
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
# A bmi rule derives from a weight in kg and a height in m (as client/fhir.py reads them;
# `fedcare.mapping` names only the bmi's own unit).
BMI_WEIGHT_UNIT, BMI_HEIGHT_UNIT = "kg", "m"


def _check_units() -> None:
    if set(UNIT_VARIANTS) != set(CONVERSIONS):
        raise RuntimeError(f"simulations/fhir_vocabulary.py: UNIT_VARIANTS targets {sorted(UNIT_VARIANTS)} != fedcare.mapping.CONVERSIONS {sorted(CONVERSIONS)}")
    for target, variants in UNIT_VARIANTS.items():
        if {v.code for v in variants} != set(CONVERSIONS[target]):
            raise RuntimeError(f"simulations/fhir_vocabulary.py: the units reported for {target!r} are not those fedcare.mapping.CONVERSIONS converts")
        for v in variants:
            for x in (0.5, 36.6, 1234.5):
                if not math.isclose(CONVERSIONS[target][v.code](v.from_target(x)), x, rel_tol=1e-12):
                    raise RuntimeError(f"simulations/fhir_vocabulary.py: {target!r} -> {v.code!r} is not the inverse of the kernel's conversion")


_check_units()


# ---------------------------------------------------------------- codes


def matches(system: str, code: str, patterns: Iterable[Code]) -> bool:
    """Whether a concrete coding matches one of a rule's codes, as the reader matches them.

    Codes compare after `fedcare.mapping.normalize_code`; a prefix `Code` matches every code
    that starts with it.
    """
    text = normalize_code(system, code)
    for pattern in patterns:
        if pattern.system != system:
            continue
        wanted = normalize_code(pattern.system, pattern.code)
        if text.startswith(wanted) if pattern.is_prefix else text == wanted:
            return True
    return False


def concrete_codes(patterns: Iterable[Code]) -> list[tuple[str, str]]:
    """Realistic concrete (system, code) pairs matching a rule's codes: exact codes as written, prefixes completed."""
    return list(_concrete_cached(tuple(patterns)))


@functools.lru_cache(maxsize=256)
def _concrete_cached(patterns: tuple[Code, ...]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for pattern in patterns:
        system, code = pattern.system, pattern.code
        if not pattern.is_prefix:
            out.append((system, code))
            continue
        known = [(s, c) for s, c in DISPLAYS if s == system and c.startswith(code)]
        if system == ICD10 and len(code) <= 1:  # a whole chapter ("F*"): the codes a crisis is coded with
            known = [pair for pair in known if pair[1] in CHAPTER_CHOICES] or known
        if system == ATC:
            known = [(ATC, drug.atc) for drug in DRUGS if drug.atc.startswith(code)]
        out.extend(known or [(system, code.rstrip("."))])
    seen, unique = set(), []
    for pair in out:
        if pair not in seen and pair[1]:
            seen.add(pair)
            unique.append(pair)
    return tuple(unique)
