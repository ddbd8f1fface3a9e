"""Render a synthetic site as an OMOP CDM v5.4 database, so the OMOP reader derives its CSV table.

`write_omop_site(study, site_dir, conn, cdm_schema=...)` converts the site's FHIR rendering
(`simulations/fhir_cohorts.write_fhir_site`, written first when `<site>/train/` is absent) into CDM
rows for both splits in one schema, and the synthetic vocabulary (`simulations/omop_vocabulary.py`)
into the vocabulary schema; `write_database_toml` writes the `database.toml` a node reads it by;
`create_cdm_schema` creates the CDM tables (person, observation_period, visit_occurrence,
condition_occurrence, drug_exposure, measurement, observation) with the OHDSI indexes.

The conversion reads the FHIR resources as `client/fhir.py` does, so that `client/omop.py` with the
study's `[omop]` gives the CSV's values cell for cell:

* person ids: the n-th patient of a split (FHIR id order = CSV row order) gets the n-th positive
  integer whose `client.database.assign_split` is that split; person_source_value is the FHIR id;
  a partial birthDate leaves month/day_of_birth NULL (the reader takes the middle, as FHIR does);
* skipped as the FHIR reader skips them: Observations, Encounters and MedicationRequests with status
  entered-in-error or cancelled, Conditions verified refuted or entered-in-error;
* dates are the calendar date as written (no time-zone shift); *_datetime the wall time as written;
  a Condition dates from onsetDateTime, else recordedDate; a visit from period.start (end: period.end);
* Observation -> measurement (value_as_number; unit_concept_id the UCUM concept of the unit code, else
  0 with unit_source_value = the text the FHIR reader would use); valueInteger is dimensionless '1';
* MedicationRequest -> drug_exposure: drug_concept_id the RxNorm ingredient (an ATC-only coding maps
  through the renderer's drug table), drug_source_concept_id the first coding's concept; supply
  days_supply = ceil(expectedSupplyDuration in days), drug_exposure_end_date = start + days_supply - 1
  (the reader's [start, end_date + 1) is then FHIR's [start, start + days));
* Encounter -> visit_occurrence; each reasonCode -> an observation row linked by visit_occurrence_id
  (never a condition_occurrence row, which would count as a diagnosis); Conditions carry no visit id
  (a linked condition would become a visit reason the FHIR reader does not see);
* the area-deprivation-index extension -> an observation row, local concept, 30 days before the index.

Record ids follow the FHIR reading order (files by name, lines in order), so the reader's tie-break
for two records on one day (the higher id) is FHIR's (the later record).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.database import Split, assign_split
from client.fhir_datatypes import (
    concept_codings, concept_list_codings, first_present, parse_day, status_codes, unit_text,
)
from client.fhir_derived import reading_order
from client.fhir_resources import EXCLUDED_STATUSES, EXCLUDED_VERIFICATION, SUPPLY_DAY_UNITS
from fedcare.study import Study
from simulations.fhir_vocabulary import ATC, DRUGS, RXNORM
from simulations.omop_vocabulary import (
    ADI_CODE, FEMALE, MALE, VISIT_OF_CLASS, Vocabulary, copy_rows, create_tables, create_vocabulary_schema,
    synthetic_vocabulary, vocabulary_written, write_vocabulary,
)

log = logging.getLogger(__name__)

ADI_URL = "https://fedcare.example/fhir/StructureDefinition/area-deprivation-index"
ADI_DAYS_BEFORE_INDEX = 30
SPLITS = ("train", "test")
_ID = "bigint NOT NULL"
_C = "integer NOT NULL"  # a concept id column the CDM requires
CDM_DDL = {  # OMOP CDM v5.4 columns; value_as_number is double precision (v5.4: NUMERIC) to keep floats exact
    "person": f"""person_id {_ID}, gender_concept_id {_C}, year_of_birth integer NOT NULL, month_of_birth integer,
        day_of_birth integer, birth_datetime timestamp, race_concept_id {_C}, ethnicity_concept_id {_C},
        location_id bigint, provider_id bigint, care_site_id bigint, person_source_value varchar(50),
        gender_source_value varchar(50), gender_source_concept_id integer, race_source_value varchar(50),
        race_source_concept_id integer, ethnicity_source_value varchar(50), ethnicity_source_concept_id integer,
        CONSTRAINT xpk_person PRIMARY KEY (person_id)""",
    "observation_period": f"""observation_period_id {_ID}, person_id {_ID}, observation_period_start_date date NOT NULL,
        observation_period_end_date date NOT NULL, period_type_concept_id {_C},
        CONSTRAINT xpk_observation_period PRIMARY KEY (observation_period_id)""",
    "visit_occurrence": f"""visit_occurrence_id {_ID}, person_id {_ID}, visit_concept_id {_C},
        visit_start_date date NOT NULL, visit_start_datetime timestamp, visit_end_date date NOT NULL,
        visit_end_datetime timestamp, visit_type_concept_id {_C}, provider_id bigint, care_site_id bigint,
        visit_source_value varchar(50), visit_source_concept_id integer, admitted_from_concept_id integer,
        admitted_from_source_value varchar(50), discharged_to_concept_id integer,
        discharged_to_source_value varchar(50), preceding_visit_occurrence_id bigint,
        CONSTRAINT xpk_visit_occurrence PRIMARY KEY (visit_occurrence_id)""",
    "condition_occurrence": f"""condition_occurrence_id {_ID}, person_id {_ID}, condition_concept_id {_C},
        condition_start_date date NOT NULL, condition_start_datetime timestamp, condition_end_date date,
        condition_end_datetime timestamp, condition_type_concept_id {_C}, condition_status_concept_id integer,
        stop_reason varchar(20), provider_id bigint, visit_occurrence_id bigint, visit_detail_id bigint,
        condition_source_value varchar(50), condition_source_concept_id integer,
        condition_status_source_value varchar(50),
        CONSTRAINT xpk_condition_occurrence PRIMARY KEY (condition_occurrence_id)""",
    "drug_exposure": f"""drug_exposure_id {_ID}, person_id {_ID}, drug_concept_id {_C},
        drug_exposure_start_date date NOT NULL, drug_exposure_start_datetime timestamp,
        drug_exposure_end_date date NOT NULL, drug_exposure_end_datetime timestamp, verbatim_end_date date,
        drug_type_concept_id {_C}, stop_reason varchar(20), refills integer, quantity numeric, days_supply integer,
        sig text, route_concept_id integer, lot_number varchar(50), provider_id bigint, visit_occurrence_id bigint,
        visit_detail_id bigint, drug_source_value varchar(50), drug_source_concept_id integer,
        route_source_value varchar(50), dose_unit_source_value varchar(50),
        CONSTRAINT xpk_drug_exposure PRIMARY KEY (drug_exposure_id)""",
    "measurement": f"""measurement_id {_ID}, person_id {_ID}, measurement_concept_id {_C},
        measurement_date date NOT NULL, measurement_datetime timestamp, measurement_time varchar(10),
        measurement_type_concept_id {_C}, operator_concept_id integer, value_as_number double precision,
        value_as_concept_id integer, unit_concept_id integer, range_low numeric, range_high numeric,
        provider_id bigint, visit_occurrence_id bigint, visit_detail_id bigint, measurement_source_value varchar(50),
        measurement_source_concept_id integer, unit_source_value varchar(50), unit_source_concept_id integer,
        value_source_value varchar(50), measurement_event_id bigint, meas_event_field_concept_id integer,
        CONSTRAINT xpk_measurement PRIMARY KEY (measurement_id)""",
    "observation": f"""observation_id {_ID}, person_id {_ID}, observation_concept_id {_C},
        observation_date date NOT NULL, observation_datetime timestamp, observation_type_concept_id {_C},
        value_as_number double precision, value_as_string varchar(60), value_as_concept_id integer,
        qualifier_concept_id integer, unit_concept_id integer, provider_id bigint, visit_occurrence_id bigint,
        visit_detail_id bigint, observation_source_value varchar(50), observation_source_concept_id integer,
        unit_source_value varchar(50), qualifier_source_value varchar(50), value_source_value varchar(50),
        observation_event_id bigint, obs_event_field_concept_id integer,
        CONSTRAINT xpk_observation PRIMARY KEY (observation_id)""",
}
_SHORT_NAMES = {"visit_occurrence": "visit", "condition_occurrence": "condition", "drug_exposure": "drug",
                "measurement": "measurement", "observation": "observation"}
CDM_INDEXES = (  # those of the OHDSI v5.4 PostgreSQL DDL for these tables: idx_visit_person_id_1, ...
    ("idx_gender", "person", "gender_concept_id"), ("idx_observation_period_id_1", "observation_period", "person_id"),
    *((f"idx_{short}_{what}_id_1", table, column) for table, short in _SHORT_NAMES.items()
      for what, column in (("person", "person_id"), ("concept", f"{short}_concept_id"), ("visit", "visit_occurrence_id"))
      if table != "visit_occurrence" or what != "visit"),
)
_TYPE_OF_CATEGORY = {"survey": "Survey", "activity": "Patient self-report"}
_CONDITION_TYPE = {"problem-list-item": "EHR problem list", "encounter-diagnosis": "EHR encounter diagnosis"}
_RXNORM_OF_ATC = {drug.atc: drug.rxnorm for drug in DRUGS}


def create_cdm_schema(conn: Any, schema: str) -> None:
    """Create `schema` (if absent) with the CDM tables and indexes; fails if a table already exists."""
    create_tables(conn, schema, CDM_DDL, CDM_INDEXES)


def person_ids(split: str, test_fraction: float) -> Iterator[int]:
    """The person ids of a split, in order: the positive integers `assign_split` puts in it."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    wanted = Split(split)
    n = 0
    while True:
        n += 1
        if assign_split(n, test_fraction) is wanted:
            yield n


def _when(value: Any) -> tuple[datetime.date, datetime.datetime | None]:
    """A FHIR date/dateTime as (the calendar date as written, the wall time as written or None)."""
    day = parse_day(value)
    if day is None:
        raise ValueError(f"unparseable FHIR date {value!r}")
    date = datetime.date.fromordinal(day)
    if isinstance(value, str) and len(value) >= 16:
        clock = value[11:19] if len(value) >= 19 and value[16] == ":" else value[11:16] + ":00"
        return date, datetime.datetime.combine(date, datetime.time.fromisoformat(clock))
    if isinstance(value, str) and len(value) == 10:
        return date, datetime.datetime.combine(date, datetime.time())
    return date, None  # a partial date: no time of day


class _Converter:
    """FHIR resources of both splits -> rows per CDM table (tuples in `columns[table]` order)."""

    def __init__(self, vocab: Vocabulary, index_date: datetime.date, export_date: datetime.date) -> None:
        self.v, self.index_date, self.export_date = vocab, index_date, export_date
        self.rows: dict[str, list[tuple]] = {table: [] for table in CDM_DDL}
        self.columns: dict[str, tuple[str, ...]] = {}
        self.persons: dict[str, int] = {}  # FHIR patient id -> person_id
        self.dates: dict[int, list[datetime.date]] = {}  # person_id -> record dates (observation_period)
        self.skipped: Counter = Counter()

    def emit(self, table: str, person_id: int, *dates: datetime.date | None, **row: Any) -> int:
        """Append one row (its id is the next of its table) and note its dates for the person."""
        record_id = len(self.rows[table]) + 1
        row = {f"{table}_id": record_id, "person_id": person_id, **row}
        columns = self.columns.setdefault(table, tuple(row))
        if len(columns) != len(row):
            raise AssertionError(f"{table}: rows with different columns ({sorted(set(row) ^ set(columns))})")
        self.rows[table].append(tuple(row[c] for c in columns))
        self.dates.setdefault(person_id, []).extend(d for d in dates if d is not None)
        return record_id

    # patients

    def patients(self, split: str, resources: list[dict], test_fraction: float) -> int:
        ids = person_ids(split, test_fraction)
        for patient in sorted(resources, key=lambda r: r["id"]):
            person_id = self.persons[patient["id"]] = next(ids)
            self.person(person_id, patient)
        return len(resources)

    def person(self, person_id: int, patient: dict) -> None:
        gender = patient.get("gender")
        birth = patient.get("birthDate")
        if not isinstance(birth, str) or len(birth) not in (4, 7, 10):
            raise ValueError(f"patient {patient['id']}: the CDM needs a year_of_birth, got birthDate {birth!r}")
        year, month, day = int(birth[:4]), int(birth[5:7]) if len(birth) >= 7 else None, int(birth[8:10]) if len(birth) == 10 else None
        row = dict(person_id=person_id, gender_concept_id={"female": FEMALE, "male": MALE}.get(gender, 0),
                   year_of_birth=year, month_of_birth=month, day_of_birth=day,
                   birth_datetime=datetime.datetime(year, month, day) if day else None,
                   race_concept_id=0, ethnicity_concept_id=0, person_source_value=patient["id"],
                   gender_source_value=gender if isinstance(gender, str) else None)
        columns = self.columns.setdefault("person", tuple(row))
        self.rows["person"].append(tuple(row[c] for c in columns))
        ext = next((e for e in patient.get("extension", []) if e.get("url") == ADI_URL), {})  # the first, as FHIR
        for value in [ext[k] for k in ("valueDecimal", "valueInteger") if k in ext][:1]:
            when = self.index_date - datetime.timedelta(days=ADI_DAYS_BEFORE_INDEX)
            self.emit("observation", person_id, when, observation_concept_id=self.v.id("fedcare", ADI_CODE),
                      observation_date=when, observation_datetime=None,
                      observation_type_concept_id=self.v.type_concept("EHR"), value_as_number=float(value),
                      unit_concept_id=self.v.id("UCUM", "{score}"), visit_occurrence_id=None,
                      observation_source_value=ADI_CODE,
                      observation_source_concept_id=self.v.id("fedcare", ADI_CODE), unit_source_value="{score}")

    # records

    def record(self, obj: dict) -> None:
        rtype = obj.get("resourceType")
        handler = {"Observation": self.observation, "Condition": self.condition, "Encounter": self.encounter,
                   "MedicationRequest": self.medication}.get(rtype)
        if handler is None:
            self.skipped[f"{rtype}: not converted"] += 1
            return
        if obj.get("status") in EXCLUDED_STATUSES.get(rtype, ()):
            self.skipped[f"{rtype}: status {obj['status']}"] += 1
            return
        reference = (obj.get("subject") or {}).get("reference", "")
        person_id = self.persons.get(reference.removeprefix("Patient/"))
        if person_id is None:
            raise ValueError(f"{rtype} {obj.get('id')}: subject {reference!r} is not a Patient of this split")
        handler(person_id, obj)

    def _coding(self, concept: Any, kind: str) -> tuple[str, str]:
        for system, code in concept_codings(concept):
            return system, code
        raise ValueError(f"{kind} without a coding")

    def observation(self, person_id: int, obj: dict) -> None:
        system, code = self._coding(obj.get("code"), "Observation")
        concept = self.v.of_coding(system, code)
        when = obj["effectiveDateTime"] if "effectiveDateTime" in obj else first_present(
            obj, "effectiveInstant", ("effectivePeriod", "start"), "issued")
        date, clock = _when(when)
        if "valueQuantity" in obj:
            quantity = obj["valueQuantity"]
            value = quantity.get("value")
            unit = unit_text(quantity, default="1")
            shown = quantity.get("unit") if isinstance(quantity.get("unit"), str) else unit
        elif "valueInteger" in obj:
            value, unit, shown = obj["valueInteger"], "1", None
        else:
            self.skipped["Observation: no numeric value"] += 1
            return
        unit_concept = self.v.ids.get(("UCUM", unit), 0)
        categories = [c for cat in obj.get("category", []) for _, c in concept_codings(cat)]
        self.emit("measurement", person_id, date, measurement_concept_id=concept, measurement_date=date,
                  measurement_datetime=clock, measurement_type_concept_id=self.v.type_concept(
                      next((_TYPE_OF_CATEGORY[c] for c in categories if c in _TYPE_OF_CATEGORY), "EHR")),
                  value_as_number=float(value), unit_concept_id=unit_concept, visit_occurrence_id=None,
                  measurement_source_value=code, measurement_source_concept_id=concept,
                  unit_source_value=shown if unit_concept else unit, value_source_value=str(value))

    def condition(self, person_id: int, obj: dict) -> None:
        verification = status_codes(obj.get("verificationStatus")) & EXCLUDED_VERIFICATION
        if verification:
            self.skipped[f"Condition: verificationStatus {sorted(verification)[0]}"] += 1
            return
        system, code = self._coding(obj.get("code"), "Condition")
        concept = self.v.of_coding(system, code)
        onset = obj.get("onsetDateTime")
        date, clock = _when(onset if onset is not None else obj.get("recordedDate"))
        end, end_clock = _when(obj["abatementDateTime"]) if isinstance(obj.get("abatementDateTime"), str) else (None, None)
        categories = [c for cat in obj.get("category", []) for _, c in concept_codings(cat)]
        clinical = sorted(status_codes(obj.get("clinicalStatus")))
        self.emit("condition_occurrence", person_id, date, end, condition_concept_id=concept,
                  condition_start_date=date, condition_start_datetime=clock, condition_end_date=end,
                  condition_end_datetime=end_clock, condition_type_concept_id=self.v.type_concept(
                      next((_CONDITION_TYPE[c] for c in categories if c in _CONDITION_TYPE), "EHR")),
                  condition_status_concept_id=0, visit_occurrence_id=None, condition_source_value=code,
                  condition_source_concept_id=concept, condition_status_source_value=clinical[0] if clinical else None)

    def encounter(self, person_id: int, obj: dict) -> None:
        cls = (obj.get("class") or {}).get("code")
        if cls not in VISIT_OF_CLASS:
            raise ValueError(f"Encounter {obj.get('id')}: no Visit concept for class {cls!r}")
        period = obj.get("period") or {}
        start, start_clock = _when(period.get("start"))
        end, end_clock = _when(period["end"]) if period.get("end") is not None else (start, start_clock)
        visit = self.emit("visit_occurrence", person_id, start, end, visit_concept_id=self.v.id("Visit", VISIT_OF_CLASS[cls]),
                          visit_start_date=start, visit_start_datetime=start_clock, visit_end_date=end,
                          visit_end_datetime=end_clock, visit_type_concept_id=self.v.type_concept("EHR encounter record"),
                          visit_source_value=cls, visit_source_concept_id=0)
        for system, code in concept_list_codings(obj.get("reasonCode")):
            concept = self.v.of_coding(system, code)
            self.emit("observation", person_id, start, observation_concept_id=concept, observation_date=start,
                      observation_datetime=start_clock, observation_type_concept_id=self.v.type_concept("EHR encounter record"),
                      value_as_number=None, unit_concept_id=None, visit_occurrence_id=visit,
                      observation_source_value=code, observation_source_concept_id=concept, unit_source_value=None)

    def medication(self, person_id: int, obj: dict) -> None:
        codings = list(concept_codings(obj.get("medicationCodeableConcept")))
        if not codings:
            raise ValueError(f"MedicationRequest {obj.get('id')} without a coding")
        rxnorm = next((c for s, c in codings if s == RXNORM), None)
        if rxnorm is None:
            atc = next((c for s, c in codings if s == ATC), None)
            rxnorm = _RXNORM_OF_ATC.get(atc or "")
            if rxnorm is None:
                raise ValueError(f"MedicationRequest {obj.get('id')}: no RxNorm ingredient for {codings}")
        dispense = obj.get("dispenseRequest") or {}
        duration = dispense.get("expectedSupplyDuration")
        if duration is not None:
            start, clock = _when(obj.get("authoredOn"))
            unit = unit_text(duration, default="d")
            factor = SUPPLY_DAY_UNITS.get(unit) or SUPPLY_DAY_UNITS[unit.lower()]
            days = math.ceil(float(duration["value"]) * factor)
        else:  # the validityPeriod, end inclusive
            start, clock = _when(dispense["validityPeriod"]["start"])
            days = (_when(dispense["validityPeriod"]["end"])[0] - start).days + 1
        end = start + datetime.timedelta(days=days - 1)
        quantity = (dispense.get("quantity") or {}).get("value")
        sig = next((d.get("text") for d in obj.get("dosageInstruction", []) if d.get("text")), None)
        self.emit("drug_exposure", person_id, start, end, drug_concept_id=self.v.id("RxNorm", rxnorm),
                  drug_exposure_start_date=start, drug_exposure_start_datetime=clock, drug_exposure_end_date=end,
                  drug_type_concept_id=self.v.type_concept("EHR prescription"), quantity=quantity, days_supply=days,
                  sig=sig, route_concept_id=0, visit_occurrence_id=None, drug_source_value=codings[0][1],
                  drug_source_concept_id=self.v.of_coding(*codings[0]))

    def observation_periods(self) -> None:
        """One observation_period per person: the first record's date to the later of the last one and the export."""
        for person_id in sorted(self.persons.values()):
            dates = self.dates.get(person_id, [])
            start = min(dates, default=self.index_date - datetime.timedelta(days=365))
            self.emit("observation_period", person_id, observation_period_start_date=start,
                      observation_period_end_date=max([*dates, self.export_date]),
                      period_type_concept_id=self.v.type_concept("EHR"))


def _resources(split_dir: Path) -> Iterator[dict]:
    """Every resource of a FHIR split directory, in the FHIR reader's order (files by name, lines in order)."""
    for path in reading_order(p for p in split_dir.iterdir() if p.name.endswith(".ndjson")):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def write_omop_site(study: Study, site_dir: str | Path, conn: Any, *, cdm_schema: str,
                    vocabulary_schema: str | None = None, test_fraction: float = 0.2) -> dict:
    """Write a synthetic site (train and test) into CDM schema `cdm_schema` over psycopg connection `conn`.

    The vocabulary goes to `vocabulary_schema` (default: `cdm_schema`) unless that schema already holds
    one. The CDM schema must not already hold CDM tables. One transaction. Returns {"tables": rows per
    CDM table, "vocabulary": rows per vocabulary table (empty if it was there), "persons": {split: n},
    "skipped": {reason: n}}.
    """
    from psycopg import sql

    from simulations.fhir_cohorts import write_fhir_site

    if study.mapping is None or study.omop is None:
        raise ValueError(f"study {study.name}: needs a [mapping] (to render FHIR) and an [omop] table")
    other = {r.url for r in study.mapping.features.values() if r.source == "patient_extension"} - {ADI_URL}
    if other:
        raise NotImplementedError(f"Patient extensions without an OMOP concept here: {sorted(other)}")
    site_dir = Path(site_dir)
    if not (site_dir / "train").is_dir():
        write_fhir_site(study, study.mapping, site_dir)
    vocab = synthetic_vocabulary()
    export_date = study.mapping.index_date + datetime.timedelta(days=study.mapping.label.window_days_after)
    converter = _Converter(vocab, study.mapping.index_date, export_date)
    persons = {}
    for split in SPLITS:
        resources = list(_resources(site_dir / split))
        persons[split] = converter.patients(split, [r for r in resources if r.get("resourceType") == "Patient"],
                                            test_fraction)
        for obj in resources:
            if obj.get("resourceType") != "Patient":
                converter.record(obj)
    converter.observation_periods()
    vocabulary_schema = vocabulary_schema or cdm_schema
    with conn.transaction():
        create_cdm_schema(conn, cdm_schema)
        written: dict[str, int] = {}
        if not vocabulary_written(conn, vocabulary_schema):
            if conn.execute("SELECT to_regclass(%s) IS NULL", (f'"{vocabulary_schema}".concept',)).fetchone()[0]:
                create_vocabulary_schema(conn, vocabulary_schema)
            written = write_vocabulary(conn, vocabulary_schema)
        tables = {table: copy_rows(conn, cdm_schema, table, converter.columns[table], rows) if rows else 0
                  for table, rows in converter.rows.items()}
        for table in CDM_DDL:
            conn.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(cdm_schema), sql.Identifier(table)))
    log.info("%s -> OMOP schema %s: %s persons, %s", site_dir.name, cdm_schema, persons, tables)
    return {"tables": tables, "vocabulary": written, "persons": persons, "skipped": dict(converter.skipped)}


def write_database_toml(site_dir: str | Path, *, host: str, port: int, dbname: str, user: str,
                        password_file: str | Path, cdm_schema: str, vocabulary_schema: str | None = None,
                        test_fraction: float = 0.2) -> Path:
    """Write `<site_dir>/database.toml` ([database] kind "omop", no secret in it); returns its path."""
    from client.database import DatabaseSource, SourceKind, is_loopback, write_database_source

    source = DatabaseSource(kind=SourceKind.OMOP, host=host, port=int(port), dbname=dbname, user=user,
                            cdm_schema=cdm_schema, vocabulary_schema=vocabulary_schema or cdm_schema,
                            password_file=Path(password_file), sslmode="prefer" if is_loopback(host) else "verify-full",
                            test_fraction=float(test_fraction))
    return write_database_source(source, Path(site_dir) / "database.toml")


__all__ = ["create_cdm_schema", "create_vocabulary_schema", "person_ids", "write_database_toml", "write_omop_site",
           "write_vocabulary"]
