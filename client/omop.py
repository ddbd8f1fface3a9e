"""Read a site's OMOP CDM v5.4 database (docs/OMOP.md) into its train and test `SiteTable`s.

`read_omop_site(study, source)` connects read-only (`client.database.connect`), resolves the
concepts of the study's `[omop]` rules in the site's vocabulary schema (codes and prefixes through
`concept`, descendants through `concept_ancestor`: `client/omop_concepts.py`), then streams one
query per CDM table the rules use, through server-side cursors inside one read-only transaction,
reduced as it arrives to one small accumulator per rule and patient (the FHIR reader's:
`client/fhir_aggregates.py`). Memory follows patients × rules, never the number of records.

The same checks as files: a derived value goes through the CSV cell checks (`checked`); a record
with a date after `today`, no value where a value is needed, or a unit that does not convert to the
rule's is quarantined with its table, record id and reason (the patient still loads without it);
a patient whose derived values fail is quarantined (its row number in person_id order is the
location, never its id); a split that loses more than half of its patients is not used. If the
connection drops mid-read, nothing read is used: the error says so and which table it was reading.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.database import DatabaseSource, DatabaseSourceError, Split, assign_split, connect, connection_lost, \
    first_line
from client.fhir_aggregates import Count, DistinctDays, Exists, Mean, Pdc, Slope
from client.fhir_datatypes import whole_years
from client.fhir_rules import Invalid, bmi, checked
from client.omop_concepts import CDM_COLUMNS, ResolvedConcepts, check_tables, resolve_concepts, unit_codes
from client.tables import LoadReport, SiteDataError, SiteTable
from fedcare.mapping import CONVERSIONS, UNIT_ALIASES
from fedcare.omop import CdmTable, OmopMapping, OmopRule
from fedcare.study import Study

log = logging.getLogger(__name__)

FETCH_ROWS = 20_000  # rows per round trip of a server-side cursor
LABEL = "label"
FEMALE, MALE = 8532, 8507
MIN_PATIENTS_FOR_SHARE = 10


@dataclass
class OmopLoadReport(LoadReport):
    """`LoadReport` for a CDM: rows are patients; locations are `table id N` or `person row k`."""

    examples: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    records_read: Counter = field(default_factory=Counter)  # per table, rows the queries returned
    records_used: Counter = field(default_factory=Counter)  # of them, rows that fed a rule
    unknown_person: Counter = field(default_factory=Counter)  # per table, rows whose person is not in `person`
    conversions: Counter = field(default_factory=Counter)  # "from→to" unit conversions applied
    unit_mismatches: Counter = field(default_factory=Counter)
    concepts: list[str] = field(default_factory=list)  # what each rule's concepts resolved to (counts)
    not_found: list[str] = field(default_factory=list)  # concepts a rule names that the vocabulary does not hold

    def summary(self) -> str:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{key} {n}" for key, n in sorted(counter.items()))

        lines = [f"{self.path}: {self.rows_loaded}/{self.rows_read} patients loaded from {self.source}"]
        if self.records_read:
            lines.append(f"  records read (both splits): {counts(self.records_read)}; used in this split: "
                         f"{counts(self.records_used)}")
        for reason, count in sorted(self.quarantined.items()):
            where = ", ".join(self.examples[reason])
            lines.append(f"  quarantined {count}: {reason} ({where}{', ...' if count > len(self.examples[reason]) else ''})")
        if self.unknown_person:
            lines.append(f"  records of persons not in person (ignored): {counts(self.unknown_person)}")
        if self.conversions:
            lines.append(f"  unit conversions: {counts(self.conversions)}")
        if self.unit_mismatches:
            lines.append(f"  unit mismatches (records quarantined): {counts(self.unit_mismatches)}")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class Target:
    """One rule as the reader applies it: where its facts go, its window (lo, hi] as day ordinals,
    the unit its values need (None: no value), and for visits the reason column that must be true."""

    key: Hashable
    lo: int
    hi: int
    make: Any
    unit: str | None = None
    reason: int | None = None


class LatestRecord:
    """Value of the latest record; a tie on the day goes to the higher record id (stable across reads)."""

    __slots__ = ("day", "rid", "value")

    def __init__(self) -> None:
        self.day, self.rid, self.value = -1, -1, 0.0

    def add(self, day: int, value: Any) -> None:
        rid, number = value
        if (day, rid) > (self.day, self.rid):
            self.day, self.rid, self.value = day, rid, number

    def result(self) -> float | None:
        return self.value


def _accumulator(rule: OmopRule, lo: int, hi: int) -> Any:
    aggregate = rule.aggregate
    if aggregate == "pdc":
        return lambda: Pdc(lo, hi)
    if aggregate == "slope_per_30d":
        return lambda: Slope(hi)
    if aggregate == "count":
        return DistinctDays if rule.table is CdmTable.CONDITION else Count
    return {"latest": LatestRecord, "mean": Mean, "any": Exists}[aggregate or "any"]


class Patient:
    __slots__ = ("split", "row", "facts", "direct", "duplicate")

    def __init__(self, split: Split, row: int) -> None:
        self.split, self.row = split, row
        self.duplicate = False  # a second person row with this id: both are quarantined
        self.facts: dict[Hashable, Any] = {}
        self.direct: dict[int, float | None | Invalid] = {}


def read_omop_site(study: Study, source: DatabaseSource, *, today: datetime.date | None = None,
                   fetch_rows: int = FETCH_ROWS) -> dict[Split, SiteTable]:
    """Both splits of the site's CDM for `study` (which must have an `[omop]` table).

    Raises `SiteDataError` (a `DatabaseSourceError` for the connection, the role and the schema)
    when the database cannot be read safely or a split yields no usable patient."""
    mapping = study.omop
    if mapping is None:
        raise SiteDataError(f"{source.origin}: an OMOP database, but study '{study.name}' has no [omop] table "
                            "saying how to derive its features from the CDM (docs/OMOP.md)")
    import psycopg

    conn = connect(source)
    reader = _Reader(study, mapping, source, (today or datetime.date.today()).toordinal(), fetch_rows)
    try:
        with conn.transaction():
            check_tables(conn, source, {rule.table for rule in mapping.rules()} | {CdmTable.PERSON})
            reader.concepts = resolve_concepts(conn, source, mapping)
            reader.units = unit_codes(conn, source)
            reader.read(conn)
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable, psycopg.errors.SerializationFailure) as err:
        raise DatabaseSourceError(
            f"{source.origin}: the database cancelled the read of {reader.reading} ({type(err).__name__}: "
            f"{first_line(err)}): a statement_timeout or lock_timeout "
            "of the role, or a standby's recovery conflict. Nothing read is used") from None
    except psycopg.Error as err:
        text = first_line(err)
        if connection_lost(conn, err):
            raise DatabaseSourceError(
                f"{source.origin}: the connection to {source.describe()} was lost while reading {reader.reading}: "
                f"{text}. Nothing read from it is used; run again when the database is reachable") from None
        raise DatabaseSourceError(f"{source.origin}: reading {reader.reading} failed: {type(err).__name__}: {text}") from None
    finally:
        conn.close()
    return {split: reader.table(split) for split in Split}


class _Reader:
    def __init__(self, study: Study, mapping: OmopMapping, source: DatabaseSource, today: int, fetch_rows: int) -> None:
        self.study, self.mapping, self.source = study, mapping, source
        self.today, self.fetch_rows = today, fetch_rows
        self.index = mapping.index_date.toordinal()
        self.patients: dict[int, Patient] = {}
        self.reports = {split: OmopLoadReport(path=f"{split.value} split", source=source.describe()) for split in Split}
        self.concepts: ResolvedConcepts | None = None
        self.units: dict[int, str] = {}
        self.reading = "the vocabulary"

    # reading

    def read(self, conn: Any) -> None:
        assert self.concepts is not None
        for report in self.reports.values():
            report.concepts, report.not_found = self.concepts.lines, self.concepts.not_found
        self.reading = f"{self.source.cdm_schema}.person"
        self._read_persons(conn)
        targets = self._targets()
        for table, by_concept in targets.items():
            self.reading = f"{self.source.cdm_schema}.{table.value}"
            self._read_records(conn, table, by_concept)

    def _cursor(self, conn: Any, name: str) -> Any:
        cur = conn.cursor(name=f"fedcare_{name}", binary=True)  # numbers and dates as sent, not parsed from text
        cur.itersize = self.fetch_rows
        return cur

    def _read_persons(self, conn: Any) -> None:
        from psycopg import sql

        person_rules = [(i, f, self.mapping.features[f.name]) for i, f in enumerate(self.study.features)
                        if self.mapping.features[f.name].table is CdmTable.PERSON]
        query = sql.SQL("SELECT person_id, gender_concept_id, year_of_birth, month_of_birth, day_of_birth "
                        "FROM {}.person ORDER BY person_id").format(sql.Identifier(self.source.cdm_schema))
        rows = {split: 0 for split in Split}
        with self._cursor(conn, "person") as cur:
            cur.execute(query)
            while batch := cur.fetchmany(self.fetch_rows):
                for person_id, gender, year, month, day in batch:
                    if person_id is None:  # a view over person can hold one; no record can belong to it
                        self.reports[Split.TRAIN].rows_read += 1
                        self.reports[Split.TRAIN].reject("a person row", "person: no person_id")
                        continue
                    split = assign_split(person_id, self.source.test_fraction)
                    report = self.reports[split]
                    report.rows_read += 1
                    rows[split] += 1
                    if person_id in self.patients:
                        report.reject(f"person row {rows[split]}", "person: duplicate person_id")
                        self.patients[person_id].duplicate = True  # and the first row too, in `table`
                        continue
                    patient = self.patients[person_id] = Patient(split, rows[split])
                    for i, feature, rule in person_rules:
                        patient.direct[i] = self._person_value(rule, gender, year, month, day, feature.name)

    def _person_value(self, rule: OmopRule, gender: Any, year: Any, month: Any, day: Any,
                      name: str) -> float | None | Invalid:
        if rule.value == "female":
            return 1.0 if gender == FEMALE else 0.0 if gender == MALE else None
        if year is None:
            return None
        try:
            born = datetime.date(int(year), int(month) if month else 7, int(day) if day and month else (15 if month else 2))
        except (ValueError, TypeError, OverflowError):
            return Invalid(f"{name}: year/month/day_of_birth is not a date")
        return float(whole_years(born, self.mapping.index_date))

    def _targets(self) -> dict[CdmTable, dict[int, list[Target]]]:
        """For each table, the targets each concept id feeds (standard or source concept)."""
        assert self.concepts is not None
        out: dict[CdmTable, dict[int, list[Target]]] = {}
        self.reason_sets: dict[CdmTable, list[frozenset[int]]] = {}

        def add(table: CdmTable, ids: frozenset[int], target: Target) -> None:
            by_concept = out.setdefault(table, {})
            for concept in ids:
                by_concept.setdefault(concept, []).append(target)

        for i, feature in enumerate(self.study.features):
            rule = self.mapping.features[feature.name]
            if rule.table is CdmTable.PERSON:
                continue
            lo, hi = self.index - (rule.window_days or 0), self.index
            if rule.aggregate == "bmi":
                for role, concepts, unit in (("weight", rule.weight_concepts, "kg"), ("height", rule.height_concepts, "m")):
                    add(rule.table, self.concepts.ids(concepts), Target((i, role), lo, hi, LatestRecord, unit=unit))
                continue
            add(rule.table, self.concepts.ids(rule.concepts),
                Target(i, lo, hi, _accumulator(rule, lo, hi), unit=rule.unit, reason=self._reason(rule)))
        for rule in self.mapping.label.any_of:
            add(rule.table, self.concepts.ids(rule.concepts),
                Target(LABEL, self.index, self.index + (rule.window_days_after or 0), Exists, reason=self._reason(rule)))
        return out

    def _reason(self, rule: OmopRule) -> int | None:
        if rule.reasons is None:
            return None
        assert self.concepts is not None
        sets = self.reason_sets.setdefault(rule.table, [])
        ids = self.concepts.ids(rule.reasons)
        if ids not in sets:
            sets.append(ids)
        return sets.index(ids)

    def _read_records(self, conn: Any, table: CdmTable, by_concept: dict[int, list[Target]]) -> None:
        from client.omop_concepts import record_query

        windows: dict[tuple[int, int], set[int]] = {}  # each rule's own window: no row that feeds no rule
        for concept, targets in by_concept.items():
            for t in targets:
                windows.setdefault((t.lo, t.hi), set()).add(concept)
        query, params = record_query(self.source, table, reasons=self.reason_sets.get(table, []),
                                     windows=[(sorted(ids), lo, hi) for (lo, hi), ids in sorted(windows.items())])
        lookup = {concept: tuple(ts) for concept, ts in by_concept.items()}
        patients, today, values_of = self.patients, self.today, _Values(self.units)
        read = unknown = 0
        used = {split: 0 for split in Split}
        name = table.value
        id_column = CDM_COLUMNS[table].id
        drug, visit = table is CdmTable.DRUG, table is CdmTable.VISIT
        with self._cursor(conn, name) as cur:
            cur.execute(query, params)
            while batch := cur.fetchmany(self.fetch_rows):
                read += len(batch)
                for row in batch:
                    # person_id, record id, concept, source concept, day, end day, value, unit id, unit text, reasons...
                    patient = patients.get(row[0])
                    if patient is None:
                        unknown += 1
                        continue
                    if patient.duplicate:
                        continue
                    hits = lookup.get(row[2], ())
                    if row[3] is not None and row[3] != row[2]:
                        more = lookup.get(row[3], ())
                        if more:
                            hits = tuple(dict.fromkeys(hits + more))
                    day, end = row[4], row[5]
                    if day is None or end == -1:  # an infinite date (PostgreSQL's 'infinity')
                        if hits:
                            self.reports[patient.split].reject(f"{id_column} {row[1]}", f"{name}: date not finite")
                        continue
                    if drug:
                        hits = [t for t in hits if day <= t.hi and end > t.lo + 1]
                    else:
                        hits = [t for t in hits if t.lo < day <= t.hi]
                    if hits and visit:
                        hits = [t for t in hits if t.reason is None or row[9 + t.reason]]
                    if not hits:
                        continue
                    if day > today:
                        self.reports[patient.split].reject(f"{id_column} {row[1]}", f"{name}: date in the future")
                        continue
                    if end is not None and end <= day:
                        self.reports[patient.split].reject(f"{id_column} {row[1]}",
                                                           f"{name}: supply ends before it starts")
                        continue
                    values = values_of(row, hits, patient.split)
                    if values.__class__ is str:
                        self.reports[patient.split].reject(f"{id_column} {row[1]}", f"{name}: {values}")
                        continue
                    used[patient.split] += 1
                    facts = patient.facts
                    for t in hits:
                        acc = facts.get(t.key)
                        if acc is None:
                            acc = facts[t.key] = t.make()
                        if t.unit is None:
                            acc.add(day, end)
                        elif acc.__class__ is LatestRecord:
                            acc.add(day, (row[1], values[t.unit]))
                        else:
                            acc.add(day, values[t.unit])
        for split, report in self.reports.items():  # a record's split is known once its person is
            report.records_read[name] = read
            report.records_used[name] = used[split]
            if unknown:
                report.unknown_person[name] = unknown
        values_of.count(self.reports)


    # the table

    def table(self, split: Split) -> SiteTable:
        report = self.reports[split]
        features = self.study.features
        rows: list[list[float]] = []
        labels: list[int] = []
        plan = []
        for i, feature in enumerate(features):
            rule = self.mapping.features[feature.name]
            empty = 0.0 if rule.aggregate in ("count", "any", "pdc") else None
            plan.append((i, feature, rule, checked(feature, None), checked(feature, empty)))
        for patient in self.patients.values():  # person_id order
            if patient.split is not split:
                continue
            if patient.duplicate:
                report.reject(f"person row {patient.row}", "person: duplicate person_id")
                continue
            values, reason = self._row(patient, plan)
            if reason:
                report.reject(f"person row {patient.row}", reason)
                continue
            for feature, value in zip(features, values):
                if math.isnan(value):
                    report.missing_by_feature[feature.name] += 1
            rows.append(values)
            labels.append(1 if LABEL in patient.facts else 0)
        report.rows_loaded = len(rows)
        where = f"{self.source.origin}: {split.value} split"
        if not rows:
            raise SiteDataError(f"{where}: no usable patients\n{report.summary()}")
        if report.rows_read >= MIN_PATIENTS_FOR_SHARE and 2 * len(rows) < report.rows_read:
            raise SiteDataError(f"{where}: only {len(rows)} of {report.rows_read} patients loaded; the split is not "
                                f"used (fix the records quarantined below)\n{report.summary()}")
        return SiteTable(features=np.asarray(rows, dtype=np.float64), labels=np.asarray(labels, dtype=np.float32),
                         report=report)

    def _row(self, patient: Patient, plan: list) -> tuple[list[float], str | None]:
        values = []
        facts = patient.facts
        for i, feature, rule, missing, empty in plan:
            if rule.table is CdmTable.PERSON:
                value = patient.direct.get(i)
                result = missing if value is None else checked(feature, value)
            elif rule.aggregate == "bmi":
                result = checked(feature, bmi(facts.get((i, "weight")), facts.get((i, "height")), feature.name))
            else:
                acc = facts.get(i)
                value = None if acc is None else acc.result()
                result = (empty if acc is None else missing) if value is None else checked(feature, value)
            if result[1]:
                return [], result[1]
            values.append(result[0])
        return values, None


_NO_VALUES: dict[str, float] = {}  # a record that feeds only rules without a unit (never written to)


class _Values:
    """A record's value in each unit its rules need, or the reason it has none (a str). The unit of a
    (unit_concept_id, unit_source_value) pair and each conversion are resolved once per read."""

    def __init__(self, units: dict[int, str]) -> None:
        self.units = units
        self.sources: dict[tuple[Any, Any], tuple[str, str]] = {}  # -> (unit as read, its CONVERSIONS code)
        self.converters: dict[tuple[str, str], Any] = {}
        self.conversions: Counter = Counter()  # (split, source, target) -> records converted
        self.mismatches: Counter = Counter()  # (split, unit as read, target) -> records refused

    def __call__(self, row: tuple, hits: list[Target], split: Split) -> dict[str, float] | str:
        needed = [t.unit for t in hits if t.unit]
        if not needed:
            return _NO_VALUES
        value = row[6]
        if value is None:
            return "no value_as_number"
        value = float(value)
        if value - value != 0.0:
            return "value not finite (NaN/Inf)"
        key = (row[7], row[8])
        unit, source = self.sources.get(key) or self._source(key)
        values = {}
        for target in needed:
            if target in values:
                continue
            convert = self.converters.get((source, target))
            if convert is None:
                convert = self.converters[(source, target)] = CONVERSIONS[target].get(source, False)
            if convert is False:
                self.mismatches[(split, unit, target)] += 1
                return "unit mismatch"
            values[target] = convert(value)
            if source != target:
                self.conversions[(split, source, target)] += 1
        return values

    def _source(self, key: tuple[Any, Any]) -> tuple[str, str]:
        unit_id, text = key
        unit = self.units.get(unit_id) if unit_id else None
        if unit is None:
            unit = (text or "").strip() or "1"
        known = any(unit in table for table in CONVERSIONS.values())
        found = self.sources[key] = (unit, unit if known else UNIT_ALIASES.get(unit.lower(), unit))
        return found

    def count(self, reports: dict[Split, OmopLoadReport]) -> None:
        """Conversions and mismatches, summed over the read, onto each split's report (counts only)."""
        for (split, source, target), n in self.conversions.items():
            reports[split].conversions[f"{source}→{target}"] += n
        for (split, unit, target), n in self.mismatches.items():
            reports[split].unit_mismatches[f"{_printable(unit)}→{target}"] += n

def _printable(unit: str) -> str:
    text = "".join(c for c in unit[:24] if c.isprintable())
    return text or "?"
