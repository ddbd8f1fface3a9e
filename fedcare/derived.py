"""Inputs a site derives from clinician notes and device readings, identically in training and serving.

A study declares its linguistic markers and an optional hashed n-gram block in `[notes]`:

    [notes.markers]
    hopelessness = ["hopeless", "no hope for the future"]      # name -> phrases (whole words, any case)

    [notes.hashing]                                            # optional
    dimension = 32       # buckets, each one more model input: note_hash_000 ... note_hash_031
    ngrams = 2           # word 1- and 2-grams
    window_days = 365    # notes dated in (index - 365 d, index]
    salt = "..."         # optional, default the study name

and each derived feature in `[mapping.features]` with `source = "note"` (a marker, a window, count /
any / days_since of its *affirmed* mentions: `fedcare/notes.py` decides negated, hypothetical,
historical, family and uncertain mentions with ConText) or `source = "sensor"` (codes, a unit, a
window, mean / sd / slope_per_30d / days_covered of readings: `fedcare/streams.py`).

`Derivation(study)` compiles that once. A site's reader and the prediction service both push one
patient's notes and readings through the same aggregators (`NoteAggregator`, `StreamAggregator`) and
write the results into the raw feature row (`Derivation.fill`), so a served row is bit-identical to
the row the same patient would have had in training. The hashed block is log(1 + count) per bucket;
no vocabulary is built, so no word can leave the site through it except as one of `dimension` sums.

Only counts leave this module for reports (`NoteStats`): notes read, mentions per marker and how
many were negated, family, historical, hypothetical or uncertain. Never a note's text, a phrase
found in it, or a reading.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcare.mapping import UNIT_ALIASES
from fedcare.notes import NoteReader, hashed_ngrams
from fedcare.notes_spec import MENTION_KINDS, Hashing, NotesSpec, parse_notes  # noqa: F401 - re-exported: [notes]
from fedcare.study import Study
from fedcare.streams import Reading, RuleIndex, SensorRule, StreamAggregator, aggregate_patient

from fedcare.study import Study

def calendar_day(text: str) -> int | None:
    """The date ordinal of `YYYY-MM-DD`, or of a dateTime starting with it (the calendar date as
    written, no time-zone shift: the FHIR reader's rule); None when it is neither."""
    text = text.strip()
    if len(text) < 10 or (len(text) > 10 and text[10] not in "T "):
        return None
    try:
        return datetime.date.fromisoformat(text[:10]).toordinal()
    except ValueError:
        return None


@dataclass(frozen=True)
class NoteRule:
    """One `source = "note"` feature: column `column` of the raw row."""

    column: int
    marker: int  # index into the study's markers
    window_days: int
    aggregate: str


@dataclass
class NoteStats:
    """What a site may report about its notes: counts only."""

    notes_read: int = 0
    notes_in_window: int = 0
    notes_outside_window: int = 0
    mentions: Counter = field(default_factory=Counter)  # marker -> mentions found
    affirmed: Counter = field(default_factory=Counter)  # marker -> affirmed mentions
    kinds: Counter = field(default_factory=Counter)  # negated/historical/... -> mentions with that flag

    def lines(self) -> list[str]:
        if not self.notes_read:
            return ["notes: none read"]
        out = [f"notes: {self.notes_read} read, {self.notes_in_window} inside a study window"]
        total = sum(self.mentions.values())
        for name in sorted(self.mentions):
            out.append(f"  marker {name}: {self.mentions[name]} mentions, {self.affirmed[name]} affirmed")
        if total:
            shares = ", ".join(f"{kind} {self.kinds[kind] / total:.1%}" for kind in MENTION_KINDS)
            out.append(f"  of {total} mentions: {shares}")
        return out


class Derivation:
    """A study's note, sensor and hashed features, compiled once (see the module docstring)."""

    def __init__(self, study: Study) -> None:
        mapping = study.mapping
        notes = study.notes
        self.features = study.features
        self.markers = notes.markers if notes is not None else ()
        self.hashing = notes.hashing if notes is not None else None
        self.index_day = mapping.index_date.toordinal() if mapping is not None else 0
        marker_index = {m.name: i for i, m in enumerate(self.markers)}
        names = [f.name for f in study.features]
        self.note_rules: list[NoteRule] = []
        sensor_rules: list[SensorRule] = []
        self.sensor_columns: list[int] = []
        for name, rule in (mapping.features.items() if mapping is not None else ()):
            if rule.source == "note":
                self.note_rules.append(NoteRule(column=names.index(name), marker=marker_index[rule.marker],
                                                window_days=rule.window_days, aggregate=rule.aggregate))
            elif rule.source == "sensor":
                sensor_rules.append(SensorRule(feature=name, codes=rule.codes, unit=rule.unit,
                                               window_days=rule.window_days, aggregate=rule.aggregate))
                self.sensor_columns.append(names.index(name))
        self.sensor_rules = tuple(sensor_rules)
        self.sensor_index = RuleIndex(self.sensor_rules, unit_aliases=UNIT_ALIASES)
        hashed = set(study.hashed_feature_names)
        self.hash_columns = [i for i, name in enumerate(names) if name in hashed]
        self.reader = NoteReader(self.markers) if self.markers else None

    @property
    def columns(self) -> frozenset[int]:
        """Raw-row columns this derivation fills (a table never holds them)."""
        return frozenset([r.column for r in self.note_rules] + self.sensor_columns + self.hash_columns)

    @property
    def uses_notes(self) -> bool:
        return bool(self.note_rules or self.hash_columns)

    @property
    def uses_readings(self) -> bool:
        return bool(self.sensor_rules)

    def notes(self, patients: int, *, index_day: int | None = None) -> NoteAggregator:
        return NoteAggregator(self, patients=patients, index_day=self.index_day if index_day is None else index_day)

    def readings(self, patients: int, *, index_day: int | None = None) -> StreamAggregator:
        return StreamAggregator(self.sensor_rules, index_day=self.index_day if index_day is None else index_day,
                                patients=patients)

    def patient_values(self, *, notes: Sequence[tuple[int, str]], readings: Sequence[Reading],
                       index_day: int) -> np.ndarray:
        """One patient's raw row (NaN outside the derived columns) from `notes` ((day, text) pairs) and
        `readings`, through the aggregators a site's reader uses: the prediction service's one path.
        A reading whose unit does not convert is a ValueError naming its position."""
        raw = np.full((1, len(self.features)), math.nan)
        aggregator = None
        if self.uses_notes:
            aggregator = self.notes(1, index_day=index_day)
            for day, text in notes:
                aggregator.add(patient=0, day=day, text=text)
        if self.uses_readings:
            raw[0, self.sensor_columns] = aggregate_patient(self.sensor_rules, readings, index_day=index_day,
                                                            index=self.sensor_index)
        self.fill(raw, notes=aggregator, readings=None)
        return raw[0]

    def fill(self, raw: np.ndarray, *, notes: NoteAggregator | None, readings: StreamAggregator | None) -> None:
        """Write the derived values into `raw` (patients x features, spec order), in place."""
        if self.uses_notes and notes is not None:
            values = notes.results()
            for j, rule in enumerate(self.note_rules):
                raw[:, rule.column] = values[:, j]
            if self.hash_columns:
                raw[:, self.hash_columns] = values[:, len(self.note_rules):]
        if self.uses_readings and readings is not None:
            raw[:, self.sensor_columns] = readings.results()


class NoteAggregator:
    """Per-patient sums over notes: affirmed mentions per note rule, the latest such day, the hashed block."""

    def __init__(self, derivation: Derivation, *, patients: int, index_day: int) -> None:
        self.derivation, self.index_day = derivation, index_day
        rules = derivation.note_rules
        self.counts = np.zeros((patients, len(rules)), dtype=np.float64)
        self.latest = np.full((patients, len(rules)), -1, dtype=np.int64)
        width = derivation.hashing.dimension if derivation.hashing is not None else 0
        self.hashed = np.zeros((patients, width), dtype=np.float64)
        self.stats = NoteStats()
        widest = max([r.window_days for r in rules] + [derivation.hashing.window_days if width else 0])
        self.earliest = index_day - widest  # a note dated on or before this day is in no window

    @property
    def patients(self) -> int:
        return self.counts.shape[0]

    def grow(self, patients: int) -> None:
        """Room for `patients` rows (a FHIR export meets its patients as it goes)."""
        extra = patients - self.patients
        if extra > 0:
            self.counts = np.vstack([self.counts, np.zeros((extra, self.counts.shape[1]))])
            self.latest = np.vstack([self.latest, np.full((extra, self.latest.shape[1]), -1, dtype=np.int64)])
            self.hashed = np.vstack([self.hashed, np.zeros((extra, self.hashed.shape[1]))])

    def add(self, *, patient: int, day: int, text: str) -> None:
        """One note of row `patient`, dated `day` (a date ordinal)."""
        self.stats.notes_read += 1
        age = self.index_day - day
        if day <= self.earliest or age < 0:
            self.stats.notes_outside_window += 1
            return
        self.stats.notes_in_window += 1
        d = self.derivation
        if d.note_rules and d.reader is not None:
            found = d.reader.mentions(text)
            affirmed = Counter()
            for mention in found:
                self.stats.mentions[mention.marker] += 1
                if mention.affirmed:
                    affirmed[mention.marker] += 1
                    self.stats.affirmed[mention.marker] += 1
                for kind in MENTION_KINDS:
                    if getattr(mention, kind):
                        self.stats.kinds[kind] += 1
            for j, rule in enumerate(d.note_rules):
                hits = affirmed.get(d.markers[rule.marker].name, 0)
                if hits and age < rule.window_days:
                    self.counts[patient, j] += hits
                    self.latest[patient, j] = max(self.latest[patient, j], day)
        if d.hashing is not None and age < d.hashing.window_days:
            self.hashed[patient] += hashed_ngrams(text, dimension=d.hashing.dimension, ngrams=d.hashing.ngrams,
                                                  salt=d.hashing.salt)

    def results(self) -> np.ndarray:
        """patients x (note rules, then hashed buckets): count, any (0/1), days_since (NaN if none); log1p."""
        rules = self.derivation.note_rules
        out = np.empty((self.counts.shape[0], len(rules) + self.hashed.shape[1]), dtype=np.float64)
        for j, rule in enumerate(rules):
            if rule.aggregate == "count":
                out[:, j] = self.counts[:, j]
            elif rule.aggregate == "any":
                out[:, j] = (self.counts[:, j] > 0).astype(np.float64)
            else:
                latest = self.latest[:, j]
                out[:, j] = np.where(latest >= 0, (self.index_day - latest).astype(np.float64), math.nan)
        out[:, len(rules):] = np.log1p(self.hashed)
        return out


def derived_names(study: Study) -> Sequence[str]:
    """Names of the features a site derives from notes and readings (never table columns)."""
    derivation = Derivation(study)
    return [study.features[i].name for i in sorted(derivation.columns)]

