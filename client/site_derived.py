"""A tabular site's notes and readings files, beside its feature table, into the derived features.

A study whose `[mapping]` has `note` or `sensor` features (`fedcare/derived.py`) needs, beside
`<split>.csv` / `<split>.parquet` (which then has a `patient_id` column and no derived columns):

    <split>.notes.csv        patient_id, date, text       (one clinician note per record; text may span lines)
    <split>.readings.csv     patient_id, time, system, code, value, unit      (or .parquet; client/readings.py)

Dates count on the calendar day as written and windows end at the study's index date, as for FHIR.
A note with an unreadable or future date, an empty or oversized text, is quarantined with its
line and reason; a note of a patient the table does not hold is counted, not used. The notes are
read once, in a stream: each is reduced to its mentions and hashed n-grams by `NoteAggregator`,
and its text dropped. Only counts reach the report (`LoadReport.derived`): never a text, a
phrase, a reading or a patient id (invariant 7).
"""

from __future__ import annotations

import csv
import datetime
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.tables import MAX_EXAMPLES_PER_REASON, LoadReport, SiteDataError, parse_value
from fedcare.derived import Derivation, NoteAggregator, calendar_day
from fedcare.study import Study

NOTE_COLUMNS = ("patient_id", "date", "text")
MAX_NOTE_CHARS = 1 << 20  # a longer "note" is not a clinician's note (an embedded file?): quarantined


@dataclass
class NotesReport:
    """What happened to each note record: counts and line numbers only."""

    path: str
    records: int = 0
    used: int = 0
    unknown_patients: int = 0
    quarantined: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def quarantine(self, line: int, reason: str) -> None:
        self.quarantined[reason] += 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < MAX_EXAMPLES_PER_REASON:
            lines.append(line)

    def lines(self) -> list[str]:
        out = [f"notes file {Path(self.path).name}: {self.records} records, {self.used} used, "
               f"{self.unknown_patients} of patients not in the table"]
        for reason, count in sorted(self.quarantined.items()):
            where = ", ".join(str(n) for n in self.examples[reason])
            out.append(f"  quarantined {count}: {reason} (lines {where}{', ...' if count > len(self.examples[reason]) else ''})")
        return out


def read_notes(path: Path, *, patients: Mapping[str, int], notes: NoteAggregator, today: int,
               report: NotesReport) -> None:
    """Stream one notes CSV into `notes`; raises `SiteDataError` only for an unusable file (header)."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise SiteDataError(f"{path}: cannot be read ({type(err).__name__})") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SiteDataError(f"{path}: empty file (expected a header row: {', '.join(NOTE_COLUMNS)})") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise SiteDataError(f"{path}: line 1: unreadable header: {type(err).__name__}") from None
        absent = [c for c in NOTE_COLUMNS if c not in header]
        if absent:
            raise SiteDataError(f"{path}: line 1: missing columns: {', '.join(absent)}")
        pid_at, date_at, text_at = (header.index(c) for c in NOTE_COLUMNS)
        line = 1
        while True:
            first = line + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as err:
                line += 1
                report.records += 1
                report.quarantine(line, f"unreadable record ({type(err).__name__})")
                continue
            line = reader.line_num
            if not cells:
                continue
            report.records += 1
            if len(cells) != len(header):
                report.quarantine(first, f"expected {len(header)} columns, got {len(cells)}")
                continue
            row = patients.get(cells[pid_at].strip())
            if row is None:
                report.unknown_patients += 1
                continue
            day = calendar_day(cells[date_at])
            if day is None:
                report.quarantine(first, "date: not a date (YYYY-MM-DD or a dateTime)")
                continue
            if day > today:
                report.quarantine(first, "date: in the future")
                continue
            text = cells[text_at]
            if not text.strip():
                report.quarantine(first, "text: empty")
                continue
            if len(text) > MAX_NOTE_CHARS:
                report.quarantine(first, f"text: longer than {MAX_NOTE_CHARS >> 20} MiB characters")
                continue
            notes.add(patient=row, day=day, text=text)
            report.used += 1


def derived_file(table: Path, kind: str) -> Path | None:
    """`<split>.<kind>.csv` (or `.parquet` for readings) beside `table`, or None."""
    stem = table.name.split(".")[0]
    for suffix in (".csv", ".parquet") if kind == "readings" else (".csv",):
        candidate = table.with_name(f"{stem}.{kind}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def derive_table_inputs(study: Study, derivation: Derivation, table: Path, *, raw: np.ndarray,
                        patient_ids: list[str], report: LoadReport,
                        today: datetime.date | None = None) -> list[str | None]:
    """Fill `raw`'s derived columns from the files beside `table`; per row None or a quarantine reason.

    A missing notes (readings) file when the study derives features from notes (readings) is
    `SiteDataError` naming the file the site must provide.
    """
    today_day = (today or datetime.date.today()).toordinal()
    patients = {pid: i for i, pid in enumerate(patient_ids)}
    notes = readings = None
    if derivation.uses_notes:
        path = derived_file(table, "notes")
        if path is None:
            raise SiteDataError(f"{table}: the study derives features from clinician notes: expected "
                                f"{table.name.split('.')[0]}.notes.csv beside it ({', '.join(NOTE_COLUMNS)})")
        notes = derivation.notes(len(patient_ids))
        notes_report = NotesReport(path=str(path))
        read_notes(path, patients=patients, notes=notes, today=today_day, report=notes_report)
        report.derived += notes_report.lines() + notes.stats.lines()
    if derivation.uses_readings:
        from client.readings import ReadingsReport, read_readings

        path = derived_file(table, "readings")
        if path is None:
            raise SiteDataError(f"{table}: the study derives features from sensor readings: expected "
                                f"{table.name.split('.')[0]}.readings.csv or .parquet beside it")
        readings_report = ReadingsReport(path=str(path))
        values = read_readings(path, rules=derivation.sensor_rules, patients=patients,
                               index_day=derivation.index_day, today=today_day, report=readings_report)
        raw[:, derivation.sensor_columns] = values
        report.derived += readings_report.summary().splitlines()
    derivation.fill(raw, notes=notes, readings=None)
    return checked_rows(study, derivation, raw)


def checked_rows(study: Study, derivation: Derivation, raw: np.ndarray) -> list[str | None]:
    """Each row's derived values through the table cell checks (range, whole numbers, `reject`)."""
    reasons: list[str | None] = [None] * raw.shape[0]
    for column in sorted(derivation.columns):
        feature = study.features[column]
        for i, value in enumerate(raw[:, column].tolist()):
            if reasons[i] is None:
                reason = parse_value(feature, "" if math.isnan(value) else repr(value))[1]
                if reason:
                    reasons[i] = reason
    return reasons
