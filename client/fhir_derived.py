"""Clinician notes and device readings in a FHIR export, into the study's derived features.

* **Notes**: `DocumentReference` with `text/plain` attachments, as inline base64 `data` or as a
  `url` to a `Binary` in the same export (`Binary/<id>`, relative or absolute). The note's date is
  `DocumentReference.date`, else the attachment's `creation`. Status `entered-in-error` or
  `superseded` (a newer version exists) is excluded; attachments of another type are counted and
  skipped. The reader reads `Binary*` files after the others (`reading_order`), so a Binary's note is
  featurized the moment it arrives and dropped: nothing but the pending (id -> patient, day) of a
  reference is kept. A Binary met before its reference waits in memory, up to `MAX_PENDING_BYTES`.
* **Readings**: an `Observation` whose `code` or one of whose `component.code`s matches a
  `sensor` rule; dated by `effectiveDateTime` / `effectiveInstant`, or the *end* of `effectivePeriod`
  (a night's sleep counts on the morning it ended), else its start; the value is that coding's
  `valueQuantity` in the rule's unit (UCUM, with the reader's unit aliases).

A bad part quarantines the record (`Reject`), never a crash. Nothing here keeps or reports text or
values: the note is reduced by `fedcare.derived.NoteAggregator` and the reading by
`fedcare.streams.StreamAggregator`, both per patient row.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from client.fhir_datatypes import UCUM_UNITS, UNIT_ALIASES, Reject, as_number, safe_unit, unit_text
from client.fhir_rules import CodeIndex
from fedcare.derived import Derivation
from fedcare.mapping import CONVERSIONS

TEXT_TYPES = ("text/plain",)
EXCLUDED_DOC_STATUSES = frozenset({"entered-in-error", "superseded"})
MAX_PENDING_BYTES = 64 << 20
FLUSH_READINGS = 8192


def reading_order(files: Iterable[Path]) -> list[Path]:
    """Files in name order, Binary files last (their DocumentReferences are then already known)."""
    return sorted(files, key=lambda p: (p.name.lower().startswith("binary"), p.name))


def _decode(data: Any) -> str:
    if not isinstance(data, str):
        raise Reject("attachment: data is not base64 text")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Reject("attachment: data is not base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Reject("attachment: text is not UTF-8") from None


def _is_text(content_type: Any) -> bool:
    return isinstance(content_type, str) and content_type.split(";", 1)[0].strip().lower() in TEXT_TYPES


def _binary_id(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    head, _, rid = url.split("/_history/", 1)[0].rpartition("/")
    return rid if head.rpartition("/")[2] == "Binary" and rid else None


class DerivedFacts:
    """Per patient row: notes and readings of one split, reduced as they are read."""

    def __init__(self, derivation: Derivation, collector: Any) -> None:
        self.derivation, self.collector = derivation, collector
        self.rows: dict[str, int] = {}
        self.notes = derivation.notes(1024) if derivation.uses_notes else None
        self.readings = derivation.readings(1024) if derivation.uses_readings else None
        self.sensors = CodeIndex()
        for j, rule in enumerate(derivation.sensor_rules):
            for code in rule.codes:
                self.sensors.add(code, j)
        self.awaiting: dict[str, tuple[int, int]] = {}  # Binary id -> (row, day) of its DocumentReference
        self.early: dict[str, str] = {}  # Binary id -> text, met before its reference
        self.early_bytes = 0
        self.buffer: list[tuple[int, int, int, float]] = []  # (row, rule, day, value) not yet aggregated

    def row(self, pid: str) -> int:
        row = self.rows.get(pid)
        if row is None:
            row = self.rows[pid] = len(self.rows)
            for aggregator in (self.notes, self.readings):
                if aggregator is not None and row >= aggregator.patients:
                    self._flush()
                    aggregator.grow(2 * aggregator.patients)
        return row

    # notes

    def document(self, obj: dict, where: Any, aliases: dict[str, str]) -> bool:
        if self.notes is None:
            return False
        status = obj.get("status") if isinstance(obj.get("status"), str) else obj.get("docStatus")
        if isinstance(status, str) and status in EXCLUDED_DOC_STATUSES:
            self.collector.report.excluded[f"DocumentReference: status {status}"] += 1
            return False
        contents = obj.get("content")
        if not isinstance(contents, list) or not contents:
            raise Reject("no content")
        attachments = [c.get("attachment") for c in contents if isinstance(c, dict)]
        texts = [a for a in attachments if isinstance(a, dict) and _is_text(a.get("contentType"))]
        if not texts:
            self.collector.report.ignored["DocumentReference without a text/plain attachment"] += 1
            return False
        attachment = texts[0]
        when = obj.get("date") if obj.get("date") is not None else attachment.get("creation")
        day = self.collector._day(when)  # noqa: SLF001 - the reader's one date rule
        pid = self.collector._pid(obj, aliases, False)  # noqa: SLF001
        if "data" in attachment:
            text = _decode(attachment["data"])
            row = self.row(pid)
            self.collector._record(pid, where)  # noqa: SLF001
            self.notes.add(patient=row, day=day, text=text)
            return True
        rid = _binary_id(attachment.get("url"))
        if rid is None:
            raise Reject("attachment: neither data nor a Binary url")
        row = self.row(pid)
        self.collector._record(pid, where)  # noqa: SLF001
        if rid in self.early:
            text = self.early.pop(rid)
            self.early_bytes -= len(text)
            self.notes.add(patient=row, day=day, text=text)
        else:
            self.awaiting[rid] = (row, day)
        return True

    def binary(self, obj: dict, where: Any, aliases: dict[str, str]) -> bool:
        if self.notes is None:
            return False
        rid = obj.get("id")
        if not isinstance(rid, str) or not rid:
            raise Reject("missing id")
        if not _is_text(obj.get("contentType")):
            self.collector.report.ignored["Binary not text/plain"] += 1
            return False
        text = _decode(obj.get("data"))
        target = self.awaiting.pop(rid, None)
        if target is not None:
            self.notes.add(patient=target[0], day=target[1], text=text)
            return True
        if self.early_bytes + len(text) > MAX_PENDING_BYTES:
            raise Reject("Binary before its DocumentReference, beyond the memory set aside for them "
                         "(export Binary resources in their own file)", bare=True)
        self.early[rid] = text
        self.early_bytes += len(text)
        return True

    def finish(self) -> None:
        """Aggregate what is buffered; count notes whose Binary never came, and Binaries never referenced."""
        self._flush()
        if self.awaiting:
            self.collector.report.quarantined["DocumentReference: its Binary is not in the export"] += len(self.awaiting)
        if self.early:
            self.collector.report.ignored["Binary referenced by no DocumentReference"] += len(self.early)
        self.awaiting.clear()
        self.early.clear()

    # readings

    def matches(self, obj: dict) -> list[tuple[int, Any]]:
        """(sensor rule, the part holding its value) for `obj`'s code and each of its components."""
        if self.readings is None:
            return []
        found: list[tuple[int, Any]] = [(j, obj) for j in self.sensors.match_concept(obj.get("code"))]
        components = obj.get("component")
        if isinstance(components, list):
            for component in components:
                if isinstance(component, dict):
                    found += [(j, component) for j in self.sensors.match_concept(component.get("code"))]
        return found

    def observation(self, obj: dict, where: Any, aliases: dict[str, str], found: list[tuple[int, Any]]) -> None:
        """The readings `matches` found in `obj`, buffered for their patient's row."""
        day = self._reading_day(obj)
        pid = self.collector._pid(obj, aliases, False)  # noqa: SLF001
        readings = []
        for j, holder in found:
            readings.append((j, self._value(holder, self.derivation.sensor_rules[j].unit)))
        row = self.row(pid)
        self.collector._record(pid, where)  # noqa: SLF001
        self.buffer += [(row, j, day, value) for j, value in readings]
        if len(self.buffer) >= FLUSH_READINGS:
            self._flush()

    def _reading_day(self, obj: dict) -> int:
        for key in ("effectiveDateTime", "effectiveInstant"):
            if key in obj:
                return self.collector._day(obj[key])  # noqa: SLF001
        period = obj.get("effectivePeriod")
        if isinstance(period, dict):
            return self.collector._day(period["end"] if period.get("end") is not None else period.get("start"))  # noqa: SLF001
        raise Reject("missing date")

    def _value(self, holder: dict, target: str) -> float:
        quantity = holder.get("valueQuantity")
        if not isinstance(quantity, dict):
            raise Reject("reading without a valueQuantity")
        value = as_number(quantity.get("value"), "value")
        unit = unit_text(quantity, default="1")
        source = unit if unit in UCUM_UNITS else UNIT_ALIASES.get(unit.lower(), unit)
        convert = CONVERSIONS[target].get(source)
        report = self.collector.report
        if convert is None:
            report.unit_mismatches[f"{safe_unit(unit)}→{target}"] += 1
            raise Reject("unit mismatch")
        if source != target:
            report.conversions[f"{source}→{target}"] += 1
        converted = convert(value)
        if not math.isfinite(converted):
            raise Reject("value not finite (NaN/Inf)")
        return converted

    def _flush(self) -> None:
        if not self.buffer or self.readings is None:
            return
        rows, rules, days, values = (np.array(column) for column in zip(*self.buffer))
        self.readings.add(patient=rows.astype(np.int64), rule=rules.astype(np.int64), day=days.astype(np.int64),
                          value=values.astype(np.float64))
        self.buffer.clear()

    def stats_lines(self) -> list[str]:
        """Counts-only lines for the load report (notes read, mentions per marker, readings per rule)."""
        lines = self.notes.stats.lines() if self.notes is not None else []
        if self.readings is not None:
            lines += self.readings.summary_lines()
        return lines

    def values(self, pids: list[str]) -> np.ndarray:
        """Raw rows (len(pids) x features; NaN outside the derived columns) for these patient ids."""
        self.finish()
        capacity = max(a.patients for a in (self.notes, self.readings) if a is not None)
        raw = np.full((capacity, len(self.derivation.features)), math.nan)
        self.derivation.fill(raw, notes=self.notes, readings=self.readings)
        out = np.full((len(pids), raw.shape[1]), math.nan)
        blank = np.full((1, raw.shape[1]), math.nan)  # a patient with no note and no reading
        self.derivation.fill(blank, notes=self.derivation.notes(1) if self.notes is not None else None,
                             readings=self.derivation.readings(1) if self.readings is not None else None)
        empty = blank[0]
        for i, pid in enumerate(pids):
            row = self.rows.get(pid)
            out[i] = raw[row] if row is not None else empty
        return out
