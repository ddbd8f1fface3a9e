"""FHIR R4 datatypes as the reader reads them: dates and dateTimes, quantities and units (UCUM
codes and the common non-UCUM spellings), codings, references to a patient, and numbers.

Pure functions of a resource's JSON; a present-but-unusable value raises `Reject` with the
reason its record is quarantined for. The reading rules are those of `client/fhir.py`'s
docstring (dates at least YYYY-MM-DD, as written; ICD-10 codes compared without dots…).
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from collections.abc import Iterator
from typing import Any

from fedcare.mapping import CONVERSIONS, UNIT_ALIASES

UCUM_UNITS = frozenset(unit for table in CONVERSIONS.values() for unit in table)
BIG_INT = 1 << 512  # smaller integers convert to float without overflow

_DATE_PART = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_TIME_PART = re.compile(r"T([01]\d|2[0-3]):[0-5]\d(?::(?:[0-5]\d|60)(?:\.\d+)?)?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?")
_DATE = re.compile(f"{_DATE_PART.pattern}(?:{_TIME_PART.pattern})?")
DATE_PARTS: dict[str, int] = {}  # 'YYYY-MM-DD' seen valid -> day ordinal (bounded cache)
TIME_PARTS: set[str] = set()  # 'Thh:mm…' suffixes seen valid (bounded cache)
_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(0[1-9]|1[0-2]))?")  # FHIR `date` with year or year-month precision
_SAFE_UNIT = re.compile(r"[\x21-\x7e]{1,24}")


class Reject(Exception):
    """A resource is quarantined; `bare` reasons are not prefixed with the resource type."""

    def __init__(self, reason: str, bare: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.bare = reason, bare


def first_present(obj: dict, *paths: str | tuple[str, str]) -> Any:
    """The first of these fields that is present (a present-but-bad one is not skipped)."""
    for path in paths:
        if isinstance(path, str):
            if path in obj:
                return obj[path]
        else:
            parent = obj.get(path[0])
            if isinstance(parent, dict) and path[1] in parent:
                return parent[path[1]]
    return None


# --- dates ------------------------------------------------------------------------------------


def whole_years(born: datetime.date, on: datetime.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def parse_day(value: Any) -> int | None:
    """The day ordinal of a FHIR date/dateTime, or None (a partial date: its middle, `partial_date`).

    Fast path: the date part (first 10 characters) and the time part (the rest) are looked
    up separately among the ones already seen valid, so a new timestamp on a known day costs
    two lookups; anything else takes `_day_ordinal`, the reference.
    """
    if not isinstance(value, str):
        return None
    day = DATE_PARTS.get(value[:10])
    if day is not None and (len(value) == 10 or value[10:] in TIME_PARTS):
        return day
    day = _day_ordinal(value)
    if day is None and len(value) <= 7:  # year or year-month precision: the period's middle day
        partial = partial_date(value)
        return partial.toordinal() if partial is not None else None
    if day is not None and _DATE_PART.fullmatch(value[:10]) and (len(value) == 10 or _TIME_PART.fullmatch(value[10:])):
        # value is exactly date part + time part, so either part with any valid other one gives this answer
        if len(DATE_PARTS) >= 1 << 16:
            DATE_PARTS.clear()
        DATE_PARTS[value[:10]] = day
        if len(value) > 10:
            if len(TIME_PARTS) >= 1 << 16:
                TIME_PARTS.clear()
            TIME_PARTS.add(value[10:])
    return day


def partial_date(value: Any) -> datetime.date | None:
    """A FHIR `date` of any precision (YYYY, YYYY-MM, YYYY-MM-DD) as one calendar day, or None.

    FHIR reads a partial date as the whole year or month; fedcare takes its middle: YYYY is
    YYYY-07-02 and YYYY-MM is YYYY-MM-15 (an age from a birth year is then off by at most half a
    year, and an event dated by month falls in a window by its mid-month day)."""
    if not isinstance(value, str):
        return None
    match = _PARTIAL_DATE.fullmatch(value)
    if match is None:
        day = _day_ordinal(value) if len(value) == 10 else None
        return datetime.date.fromordinal(day) if day is not None else None
    year, month = int(match[1]), match[2]
    if year < 1:
        return None
    return datetime.date(year, int(month), 15) if month else datetime.date(year, 7, 2)


@functools.lru_cache(maxsize=1 << 16)  # exports repeat the same timestamps many times
def _day_ordinal(value: str) -> int | None:
    match = _DATE.fullmatch(value.strip())
    if match is None:
        return None
    try:
        return datetime.date(int(match[1]), int(match[2]), int(match[3])).toordinal()
    except ValueError:
        return None


# --- codings and references -------------------------------------------------------------------


def concept_codings(concept: Any) -> Iterator[tuple[str, str]]:
    """(system, code) of a CodeableConcept's codings; malformed parts are skipped."""
    if isinstance(concept, dict):
        codings = concept.get("coding")
        for coding in codings if isinstance(codings, list) else []:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    yield system, code


def status_codes(concept: Any) -> set[str]:
    """The codes of a status CodeableConcept, whatever their system."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return set()
    return {c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)}


def concept_list_codings(concepts: Any) -> Iterator[tuple[str, str]]:
    for concept in concepts if isinstance(concepts, list) else []:
        yield from concept_codings(concept)


def subject_pid(obj: dict, aliases: dict[str, str], allow_patient: bool) -> str:
    """The patient id a resource refers to (`subject`, or `patient` for medications)."""
    ref = obj.get("subject")
    if ref is None and allow_patient:
        ref = obj.get("patient")
    return reference_pid(ref.get("reference") if isinstance(ref, dict) else None, aliases)


def reference_pid(text: Any, aliases: dict[str, str]) -> str:
    """The patient id of a reference's text (Bundle `aliases` first)."""
    if not isinstance(text, str) or not (text := text.strip()):
        raise Reject("no subject/patient reference")
    if aliases and text in aliases:
        return aliases[text]
    if text.startswith("urn:"):
        raise Reject("unresolved urn: patient reference")
    pid = _patient_id(text)
    if pid is None:
        raise Reject("subject is not a Patient reference")
    return pid


@functools.lru_cache(maxsize=1 << 16)
def _patient_id(reference: str) -> str | None:
    """`Patient/<id>` (relative, absolute or versioned) -> id; None for any other reference."""
    head, _, pid = reference.split("/_history/", 1)[0].rpartition("/")
    return pid if head.rpartition("/")[2] == "Patient" and pid else None


def bundle_patient_urls(entries: list) -> dict[str, str]:
    """fullUrl -> Patient id in one Bundle, so `urn:uuid:` references resolve."""
    aliases = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("fullUrl"), str):
            resource = entry.get("resource")
            if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
                if isinstance(resource.get("id"), str):
                    aliases[entry["fullUrl"]] = resource["id"]
    return aliases


# --- numbers, quantities and units ------------------------------------------------------------


def as_number(value: Any, what: str) -> float:
    if value is None:
        raise Reject(f"no {what}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Reject(f"{what} is not a number")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise Reject(f"{what} not finite (NaN/Inf)")
    return value


def unit_text(quantity: dict, default: str) -> str:
    """UCUM `code`, else `unit`, else `default`."""
    for key in ("code", "unit"):
        text = quantity.get(key)
        if isinstance(text, str) and text.strip():
            return text.strip()
    return default


def observation_quantity(obj: dict) -> tuple[float, str]:
    """An Observation's (value, unit): valueQuantity, or valueInteger (dimensionless, unit "1")."""
    if "valueQuantity" in obj:
        quantity = obj["valueQuantity"]
        if not isinstance(quantity, dict):
            raise Reject("value is not a number")
        return as_number(quantity.get("value"), "value"), unit_text(quantity, default="1")
    if "valueInteger" in obj:
        return as_number(obj["valueInteger"], "value"), "1"
    if any(key.startswith("value") for key in obj):
        raise Reject("value is not a number")
    raise Reject("no value")


def safe_unit(unit: str) -> str:
    return unit if _SAFE_UNIT.fullmatch(unit) else "(unprintable unit)"
