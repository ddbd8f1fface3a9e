"""A request's clinician notes and device readings into the study's derived features, in memory.

The prediction service derives them with the very code a site's reader uses in training
(`fedcare.derived.Derivation.patient_values`): the same note analysis, the same aggregators, so a
served row equals the row the patient would have had in training, bit for bit. Notes and readings
live only in this request's memory: never written to disk, never logged, never audited (the audit
log records who asked, which model, and the outcome).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

from fedcare.derived import Derivation, calendar_day
from fedcare.streams import Reading
from inference.model import InputError
from inference.schemas import AnalyzeRequest, ApiError


def derive_values(derivation: Derivation, values: Sequence[float | None], body: AnalyzeRequest,
                  *, today: datetime.date | None = None) -> list[float | None]:
    """`values` (spec order) with the derived features filled from `body.notes` and `body.readings`."""
    names = [f.name for f in derivation.features]
    columns = sorted(derivation.columns)
    for column in columns:
        if values[column] is not None:
            raise InputError(f"feature '{names[column]}' is derived from the request's notes and readings; "
                             "send them (or nothing) instead of a value", names[column], "derived_feature")
    index_day = (today or datetime.datetime.now(datetime.timezone.utc).date()).toordinal()
    if body.index_date:
        index_day = calendar_day(body.index_date)
        if index_day is None or len(body.index_date) != 10:
            raise ApiError(422, "index_date: expected YYYY-MM-DD", reason="invalid_body")
    notes = []
    for i, note in enumerate(body.notes or ()):
        day = calendar_day(note.date)
        if day is None:
            raise ApiError(422, f"notes[{i}].date: expected YYYY-MM-DD or a dateTime", reason="invalid_body")
        notes.append((day, note.text))
    readings = []
    for i, reading in enumerate(body.readings or ()):
        day = calendar_day(reading.time)
        if day is None:
            raise ApiError(422, f"readings[{i}].time: expected YYYY-MM-DD or a dateTime", reason="invalid_body")
        if not math.isfinite(reading.value):
            raise ApiError(422, f"readings[{i}].value: must be finite", reason="invalid_body")
        readings.append(Reading(system=reading.system, code=reading.code, day=day, value=reading.value,
                                unit=reading.unit))
    try:
        derived = derivation.patient_values(notes=notes, readings=readings, index_day=index_day)
    except ValueError as err:  # "reading 3: unit not convertible to /min": the position, never a value
        text = str(err)
        where = text.split(":", 1)
        if where[0].startswith("reading "):
            text = f"readings[{where[0].split()[1]}]:{where[1]}"
        raise ApiError(422, text, reason="invalid_body") from None
    out = list(values)
    for column in columns:
        value = float(derived[column])
        out[column] = None if math.isnan(value) else value
    return out
