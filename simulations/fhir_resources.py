"""Building single FHIR R4 resources for one synthetic patient.

`PatientRecords` collects one patient's resources (ids, dates relative to the index date);
`observation`, `condition`, `encounter` and `medication_request` append one resource each;
`coding` and `quantity` render their parts. Also the few random draws every renderer uses
(`pick`, `weighted`, `distinct_days`), `FeatureColumn` (a study feature with its parsed
`fedcare.mapping.FeatureRule`) and `NotRepresentable`. Which resources a feature value needs
is decided in `simulations/fhir_observations.py` and `simulations/fhir_events.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np

from fedcare.mapping import FeatureRule
from simulations.fhir_vocabulary import (
    ACT_CODE,
    ACT_DISPLAYS,
    COND_CATEGORY,
    COND_CLINICAL,
    COND_VERIFICATION,
    DISPLAYS,
    OBS_CATEGORY,
    UCUM,
    UNIT_VARIANTS,
    UNIT_WEIGHTS,
    Drug,
)

RESOURCE_TYPES = ("Patient", "Observation", "Condition", "MedicationRequest", "Encounter")


class NotRepresentable(ValueError):
    """A row's values cannot all be produced by FHIR records under the mapping."""


@dataclass(frozen=True)
class FeatureColumn:
    """One study feature as the writer renders it: its column in the rows and its parsed rule."""

    name: str
    column: int
    rule: FeatureRule
    low: float
    high: float
    center: float
    integer: bool


def pick(rng: np.random.Generator, items: list | tuple) -> Any:
    return items[int(rng.integers(0, len(items)))]


def weighted(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    """Index drawn with probability proportional to `weights`."""
    x = rng.random() * sum(weights)
    for i, w in enumerate(weights):
        x -= w
        if x < 0:
            return i
    return len(weights) - 1


def distinct_days(rng: np.random.Generator, k: int, low: int, high: int) -> list[int]:
    """k distinct whole days in [low, high], most recent (smallest) first."""
    if k <= 0:
        return []
    if high - low + 1 < k:
        raise NotRepresentable(f"cannot place {k} records on distinct days in [{low}, {high}]")
    days: set[int] = set()
    while len(days) < k:
        days.update(int(d) for d in rng.integers(low, high + 1, size=k - len(days)))
    return sorted(days)


@dataclass
class PatientRecords:
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
        offset = pick(rng, ["Z", "+01:00", "+02:00", "-05:00"]) if offset is None else offset
        return f"{day.isoformat()}T{hour:02d}:{minute:02d}:00{offset}"

    def day(self, days_before: int) -> str:
        return (self.index - timedelta(days=int(days_before))).isoformat()


def coding(system: str, code: str) -> dict:
    out = {"system": system, "code": code}
    display = DISPLAYS.get((system, code)) or (ACT_DISPLAYS.get(code) if system == ACT_CODE else None)
    if display:
        out["display"] = display
    return out


def quantity(
    rng: np.random.Generator, value: float, target_unit: str, integer: bool = False, weights: tuple[float, ...] = UNIT_WEIGHTS
) -> dict:
    """valueQuantity of a target-unit value, in a unit a site might use (converted back exactly by the mapping).

    `weights`: how often sites use each of the target's `UNIT_VARIANTS`, in their order.
    """
    variants = UNIT_VARIANTS.get(target_unit)
    if not variants:
        return {"value": _number(value, integer), "unit": target_unit, "system": UCUM, "code": target_unit}
    unit = variants[weighted(rng, weights[: len(variants)])]
    reported = unit.from_target(value)
    whole = integer and unit.from_target(1.0) == 1.0
    return {"value": _number(reported, whole), "unit": unit.display, "system": UCUM, "code": unit.code}


def _number(value: float, integer: bool) -> float | int:
    value = float(value)
    if integer and value == int(value):
        return int(value)
    return value


def observation(
    p: PatientRecords,
    code: tuple[str, str],
    when: str,
    value: dict,
    category: str | None,
    status: str = "final",
    time_key: str = "effectiveDateTime",
    period_hours: float = 0.0,
) -> dict:
    obs: dict[str, Any] = {"resourceType": "Observation", "id": p.next_id("obs"), "status": status}
    if category:
        obs["category"] = [{"coding": [{"system": OBS_CATEGORY, "code": category}]}]
    obs["code"] = {"coding": [coding(*code)]}
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
    obs["valueQuantity"] = value
    p.resources["Observation"].append(obs)
    return obs


def condition(
    p: PatientRecords,
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
            {"coding": [{"system": COND_CATEGORY, "code": pick(p.rng, ["problem-list-item", "encounter-diagnosis"])}]}
        ],
        "code": {"coding": [coding(*code)], "text": DISPLAYS.get(code, code[1])},
        "subject": p.subject,
    }
    if days_before is not None:
        cond["onsetDateTime"] = p.day(days_before) if p.rng.random() < 0.5 else p.when(days_before)
    if recorded_before is not None:
        cond["recordedDate"] = p.when(recorded_before)
    p.resources["Condition"].append(cond)
    return cond


def encounter(p: PatientRecords, cls: str, days_before: int, reason: tuple[str, str] | None, stay_days: int = 0) -> dict:
    start = p.index - timedelta(days=int(days_before))
    hour = int(p.rng.integers(0, 24)) if cls == "EMER" else int(p.rng.integers(8, 17))
    # Emergency visits at night: the offset keeps the UTC date equal to the local date.
    offset = "Z" if hour < 9 else pick(p.rng, ["Z", "+01:00", "+02:00"])
    begin = datetime(start.year, start.month, start.day, hour, int(p.rng.integers(0, 60)))
    end = begin + timedelta(days=stay_days, hours=int(p.rng.integers(1, 8)) if cls != "IMP" else 0)
    enc: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": p.next_id("enc"),
        "status": "finished",
        "class": coding(ACT_CODE, cls),
        "subject": p.subject,
        "period": {"start": begin.isoformat() + offset, "end": end.isoformat() + offset},
    }
    if reason is not None:
        enc["reasonCode"] = [{"coding": [coding(*reason)]}]
    p.resources["Encounter"].append(enc)
    return enc


def medication_request(p: PatientRecords, drug: Drug, codings: list[dict], start_before: int, days: int, status: str) -> dict:
    req = {
        "resourceType": "MedicationRequest",
        "id": p.next_id("medrx"),
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"coding": codings, "text": drug.name},
        "subject": p.subject,
        "authoredOn": p.when(start_before, offset=pick(p.rng, ["Z", "+01:00", "+02:00"])),
        "dosageInstruction": [{"text": drug.sig}],
        "dispenseRequest": {
            "quantity": {"value": days, "unit": "tablet", "system": UCUM, "code": "{tbl}"},
            "expectedSupplyDuration": {"value": days, "unit": "days", "system": UCUM, "code": "d"},
        },
    }
    p.resources["MedicationRequest"].append(req)
    return req
