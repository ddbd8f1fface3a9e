"""FHIR R4 reader (client/fhir.py) and the study's [mapping] (fedcare/mapping.py), per docs/FHIR.md."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import tomllib
import tracemalloc

import pytest

from client.data import SiteDataError
from client.fhir import MAX_LINE_BYTES, read_site_fhir
from fedcare.mapping import Code, parse_mapping
from fedcare.study import load_mapping
from fedcare.study import Feature, StudyConfigError

from .conftest import DEFAULT_STUDY

INDEX = datetime.date(2025, 7, 1)
TODAY = datetime.date(2026, 9, 1)
LOINC = "http://loinc.org"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ADI_URL = "https://fedcare.example/fhir/StructureDefinition/area-deprivation-index"


# --- fixtures: small resources written inline ---------------------------------------------


def day(offset: int) -> str:
    """The ISO date `offset` days after the index date."""
    return (INDEX + datetime.timedelta(days=offset)).isoformat()


def patient(pid: str, birth: str | None = "1980-01-15", gender: str | None = "female", **extra) -> dict:
    resource = {"resourceType": "Patient", "id": pid, **extra}
    if birth is not None:
        resource["birthDate"] = birth
    if gender is not None:
        resource["gender"] = gender
    return resource


def obs(pid: str, code: str, when: int | None, value, unit: str | None = None, **extra) -> dict:
    quantity = {"value": value}
    if unit is not None:
        quantity["code"] = unit
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": quantity,
        **extra,
    }
    if when is not None:
        resource["effectiveDateTime"] = day(when) + "T09:30:00+02:00"
    return resource


def condition(pid: str, code: str, onset: int | None = None, recorded: int | None = None, **extra) -> dict:
    resource = {
        "resourceType": "Condition",
        "code": {"coding": [{"system": ICD, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        **extra,
    }
    if onset is not None:
        resource["onsetDateTime"] = day(onset)
    if recorded is not None:
        resource["recordedDate"] = day(recorded)
    return resource


def encounter(pid: str, cls: str, when: int, reason: str | None = None, **extra) -> dict:
    resource = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": cls},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": day(when) + "T22:00:00Z", "end": day(when + 1)},
        **extra,
    }
    if reason is not None:
        resource["reasonCode"] = [{"coding": [{"system": ICD, "code": reason}]}]
    return resource


def med_request(pid: str, system: str, code: str, authored: int, days: float, unit: str = "d", **extra) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "status": "active",
        "medicationCodeableConcept": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": day(authored),
        "dispenseRequest": {"expectedSupplyDuration": {"value": days, "unit": unit, "code": unit}},
        **extra,
    }


def med_statement(pid: str, system: str, code: str, start: int, end: int | None, **extra) -> dict:
    period = {"start": day(start)} | ({"end": day(end)} if end is not None else {})
    return {
        "resourceType": "MedicationStatement",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": system, "code": code}]},
        "patient": {"reference": f"Patient/{pid}"},
        "effectivePeriod": period,
        **extra,
    }


def write_ndjson(directory, name: str, lines: list) -> None:
    """Resources (dicts) or raw text lines, one per line."""
    directory.mkdir(exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (directory / name).write_text(text + "\n", encoding="utf-8")


def write_bundle(directory, name: str, resources: list, full_urls: list | None = None) -> None:
    directory.mkdir(exist_ok=True)
    entries = [{"resource": r} for r in resources]
    for entry, url in zip(entries, full_urls or []):
        if url:
            entry["fullUrl"] = url
    (directory / name).write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))


def read(study, directory, mapping=None):
    return read_site_fhir(study, mapping or study.mapping, directory, today=TODAY)


def rows(study, table) -> list[dict[str, float]]:
    names = [f.name for f in study.features]
    return [dict(zip(names, row)) for row in table.features.tolist()]


def _raw_mapping() -> dict:
    return copy.deepcopy(tomllib.loads(DEFAULT_STUDY.read_text())["mapping"])


# --- the mapping ----------------------------------------------------------------------------


def test_default_study_mapping_matches_the_spec_table(study):
    mapping = load_mapping(DEFAULT_STUDY)
    assert mapping == study.mapping
    assert mapping.index_date == INDEX
    assert list(mapping.features) == [f.name for f in study.features]
    phq9 = mapping.features["phq9_latest"]
    assert (phq9.source, phq9.codes, phq9.window_days, phq9.aggregate, phq9.unit) == (
        "observation", (Code(LOINC, "44261-6", False),), 365, "latest", "{score}"
    )
    assert len(mapping.features["dx_substance_use"].codes) == 10
    assert mapping.features["antidepressant_pdc"].codes[0] == Code(ATC, "N06A", True)
    psych = mapping.features["psych_admissions_12m"]
    assert psych.classes == ("IMP",) and psych.reason_codes == (Code(ICD, "F", True),)
    assert mapping.features["area_deprivation_index"].url == ADI_URL
    assert [r.source for r in mapping.label.any_of] == ["condition", "encounter"]
    assert mapping.label.window_days_after == 365


def _mapping_error(raw: dict, names: list[str]) -> str:
    with pytest.raises(StudyConfigError) as err:
        parse_mapping(raw, names, "s.toml")
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda m: m["features"]["phq9_latest"].update(aggregate="median"),
            "s.toml: mapping.features.phq9_latest.aggregate: unknown value 'median' (expected one of: latest, mean, "
            "count, any, slope_per_30d, pdc, days_since, sd, days_covered)",
        ),
        (
            lambda m: m["features"]["phq9_latest"].update(aggregate="pdc"),
            "s.toml: mapping.features.phq9_latest.aggregate: 'pdc' is not allowed for source 'observation' "
            "(allowed: latest, mean, count, any, slope_per_30d)",
        ),
        (
            lambda m: m["features"]["age"].update(source="patient_birthday"),
            "s.toml: mapping.features.age.source: unknown value 'patient_birthday' (expected one of: patient_age, "
            "patient_female, patient_extension, observation, bmi, condition, encounter, medication, note, sensor)",
        ),
        (
            lambda m: m["features"]["sleep_hours"].pop("window_days"),
            "s.toml: mapping.features.sleep_hours.window_days: missing field",
        ),
        (
            lambda m: m["features"]["dx_anxiety"].update(codes=["F41*"]),
            "s.toml: mapping.features.dx_anxiety.codes[0]: expected \"<system>|<code>\" (a trailing * for a "
            "prefix), got 'F41*'",
        ),
        (
            lambda m: m["features"]["dx_anxiety"].update(codes=[f"{ICD}|F*41"]),
            f"s.toml: mapping.features.dx_anxiety.codes[0]: expected \"<system>|<code>\" (a trailing * for a "
            f"prefix), got '{ICD}|F*41'",
        ),
        (
            lambda m: m["features"]["bmi"].update(unit="furlong/fortnight"),
            "s.toml: mapping.features.bmi.unit: unknown value 'furlong/fortnight' (expected one of: kg/m2)",
        ),
        (
            lambda m: m["features"]["sleep_hours"].update(unit="fortnight"),
            "s.toml: mapping.features.sleep_hours.unit: no known conversion to 'fortnight' (known units: kg, cm, m, "
            "h, /min, ms, {score}, /d, Cel)",
        ),
        (
            lambda m: m["features"].pop("gad7_latest"),
            "s.toml: mapping.features.gad7_latest: missing rule for study feature 'gad7_latest'",
        ),
        (
            lambda m: m["features"].update(shoe_size={"source": "patient_age"}),
            "s.toml: mapping.features.shoe_size: no study feature is named 'shoe_size'",
        ),
        (
            lambda m: m.update(index_date="2025-13-01"),
            "s.toml: mapping.index_date: expected an ISO date string \"YYYY-MM-DD\", got '2025-13-01'",
        ),
        (
            lambda m: m.update(index_date=datetime.date(2025, 7, 1)),
            "s.toml: mapping.index_date: expected an ISO date string \"YYYY-MM-DD\", got datetime.date(2025, 7, 1)",
        ),
        (
            lambda m: m["features"]["ed_visits_12m"].update(reason_code=[f"{ICD}|F*"]),
            "s.toml: mapping.features.ed_visits_12m.reason_code: unknown key for source 'encounter' (expected: "
            "source, classes, window_days, aggregate, reason_codes)",
        ),
        (
            lambda m: m["features"]["ed_visits_12m"].update(window_days=0),
            "s.toml: mapping.features.ed_visits_12m.window_days: must be >= 1, got 0",
        ),
        (
            lambda m: m["label"]["any_of"][1].update(aggregate="count"),
            "s.toml: mapping.label.any_of[1].aggregate: a label rule's aggregate is 'any', got 'count'",
        ),
        (
            lambda m: m["label"]["any_of"][0].pop("window_days_after"),
            "s.toml: mapping.label.any_of[0].window_days_after: missing field",
        ),
        (lambda m: m.pop("label"), "s.toml: mapping.label: missing table"),
    ],
)
def test_mapping_errors_name_the_file_and_field(study, edit, expected):
    raw = _raw_mapping()
    edit(raw)
    assert _mapping_error(raw, [f.name for f in study.features]) == expected


def test_label_window_may_be_given_once_for_all_rules(study):
    raw = _raw_mapping()
    for rule in raw["label"]["any_of"]:
        del rule["window_days_after"]
    raw["label"]["window_days_after"] = 200
    mapping = parse_mapping(raw, [f.name for f in study.features], "s.toml")
    assert [r.window_days_after for r in mapping.label.any_of] == [200, 200]
    assert mapping.label.window_days_after == 200


# --- Patient -------------------------------------------------------------------------------


def test_patient_age_sex_and_extension(study, tmp_path):
    write_ndjson(tmp_path, "Patient.ndjson", [
        patient("a", birth="1980-07-01", gender="female", extension=[{"url": ADI_URL, "valueDecimal": 55.5}]),
        patient("b", birth="1980-07-02", gender="male", extension=[{"url": ADI_URL, "valueInteger": 7}]),
        patient("c", birth="2000-02-29", gender="other"),
        patient("d", birth="1990-01-01", gender=None, extension=[{"url": ADI_URL, "valueString": "55"}]),
        patient("e", birth="2015-01-01"),
        patient("f", birth=None),
        patient("g", birth="1980"),  # partial dates (valid FHIR): the middle of the year / month
        patient("h", birth="1975-06"),
        patient("i", birth="1980-13"),
    ])
    table = read(study, tmp_path)
    got = rows(study, table)
    assert [(r["age"], r["sex_female"]) for r in got[:2]] == [(45.0, 1.0), (44.0, 0.0)]
    assert [r["age"] for r in got[3:]] == [44.0, 50.0]  # 1980 -> 1980-07-02, 1975-06 -> 1975-06-15
    assert got[0]["area_deprivation_index"] == 55.5 and got[1]["area_deprivation_index"] == 7.0
    assert got[2]["age"] == 25.0 and math.isnan(got[2]["sex_female"]) and math.isnan(got[2]["area_deprivation_index"])
    q = table.report.quarantined
    assert q["area_deprivation_index: not a number"] == 1
    assert q["age: outside valid range [18, 100] years"] == 1
    assert q["age: missing but the study's policy is 'reject'"] == 1
    assert q["age: unparseable birthDate"] == 1
    assert table.report.examples["age: outside valid range [18, 100] years"] == ["Patient.ndjson:5"]
    assert table.report.missing_by_feature["sex_female"] == 1
    assert table.report.rows_read == 9 and table.report.rows_loaded == 5


# --- Observation aggregates ------------------------------------------------------------------


def test_observation_latest_slope_count_and_window(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        obs("p", "44261-6", -365, 25, "{score}"),  # on the window's open end: outside
        obs("p", "44261-6", -364, 20, "{score}"),  # inside 365 days, outside 90
        obs("p", "44261-6", -60, 10, "{score}"),
        obs("p", "44261-6", -30, 13, "1"),
        obs("p", "44261-6", 0, 16, "{score}"),
        obs("p", "44261-6", 1, 27, "{score}"),  # after the index date: outside
        obs("p", "44261-6", -10, 0, "{score}", status="entered-in-error"),
        obs("p", "70274-6", -5, 9, "{score}"),
        obs("p", "70274-6", -5, 11, "{score}"),  # same day: the later in file order wins
    ])
    table = read(study, tmp_path)
    (row,) = rows(study, table)
    assert row["phq9_latest"] == 16.0
    assert row["phq9_count_12m"] == 4.0
    assert row["phq9_slope_90d"] == pytest.approx(3.0)  # +3 points per 30 days
    assert row["gad7_latest"] == 11.0
    assert table.report.excluded["Observation: status entered-in-error"] == 1
    assert table.report.conversions["1→{score}"] == 1


def test_slope_needs_two_distinct_days(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("one"), obs("one", "44261-6", -3, 10, "{score}"),
        patient("same"), obs("same", "44261-6", -3, 10, "{score}"), obs("same", "44261-6", -3, 14, "{score}"),
        patient("two"), obs("two", "44261-6", -33, 14, "{score}"), obs("two", "44261-6", -3, 10, "{score}"),
    ])
    got = {pid: r for pid, r in zip(["one", "same", "two"], rows(study, read(study, tmp_path)))}
    assert math.isnan(got["one"]["phq9_slope_90d"]) and math.isnan(got["same"]["phq9_slope_90d"])
    assert got["two"]["phq9_slope_90d"] == pytest.approx(-4.0)
    assert got["same"]["phq9_count_12m"] == 2.0


def test_observation_mean_with_unit_conversions(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        obs("p", "93832-4", -1, 420, "min"),
        obs("p", "93832-4", -2, 8, "h"),
        obs("p", "93832-4", -40, 2, "h"),  # outside the 30-day window
        obs("p", "41950-7", -1, 6000, "{steps}/d"),
        obs("p", "41950-7", -2, 8000, "/d"),
        obs("p", "40443-4", -1, 60, "{beats}/min"),
        obs("p", "40443-4", -2, 70, None, valueQuantity={"value": 70, "unit": "bpm"}),
        obs("p", "80404-7", -1, 0.05, "s"),
    ])
    table = read(study, tmp_path)
    (row,) = rows(study, table)
    assert row["sleep_hours"] == pytest.approx(7.5)
    assert row["steps_per_day"] == 7000.0
    assert row["resting_hr"] == 65.0
    assert row["hrv_rmssd"] == pytest.approx(50.0)
    assert table.report.conversions == {"min→h": 1, "{steps}/d→/d": 1, "{beats}/min→/min": 1, "s→ms": 1}


def test_bmi_from_latest_weight_and_height_with_lb_and_in(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        obs("p", "29463-7", -400, 70, "kg"),
        obs("p", "29463-7", -10, 176, None, valueQuantity={"value": 176, "unit": "lb"}),
        obs("p", "8302-2", -500, 70, "[in_i]"),
        obs("p", "8302-2", -800, 150, "cm"),  # outside the 730-day window
        patient("q"),
        obs("q", "29463-7", -10, 80000, "g"),  # no height: bmi missing
    ])
    table = read(study, tmp_path)
    p, q = rows(study, table)
    assert p["bmi"] == pytest.approx(176 * 0.45359237 / (70 * 0.0254) ** 2)
    assert math.isnan(q["bmi"])
    assert table.report.conversions == {"[lb_av]→kg": 1, "[in_i]→m": 1, "g→kg": 1}


def test_custom_rules_any_latest_celsius_medication_any_and_observation_label(study, tmp_path):
    features = (
        Feature("age", "numeric", "years", 18, 100, "reject", 50, 10),
        Feature("temp", "numeric", "Cel", 30, 45, "indicator", 37, 1),
        Feature("has_a1c", "binary", "1 = measured", 0, 1, "impute", 0.5, 0.5),
        Feature("on_ssri", "binary", "1 = supplied", 0, 1, "impute", 0.5, 0.5),
    )
    small = dataclasses.replace(study, features=features, mapping_source=None)
    mapping = parse_mapping({
        "index_date": "2025-07-01",
        "features": {
            "age": {"source": "patient_age"},
            "temp": {"source": "observation", "codes": [f"{LOINC}|8310-5"], "window_days": 10,
                     "aggregate": "latest", "unit": "Cel"},
            "has_a1c": {"source": "observation", "codes": [f"{LOINC}|4548-4"], "window_days": 365,
                        "aggregate": "any", "unit": "{score}"},
            "on_ssri": {"source": "medication", "codes": [f"{ATC}|N06AB*"], "window_days": 30, "aggregate": "any"},
        },
        "label": {"any_of": [{"source": "observation", "codes": [f"{LOINC}|4548-4"], "window_days_after": 90}]},
    }, [f.name for f in features], "custom.toml")
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        obs("p", "8310-5", -1, 98.6, "[degF]"),
        obs("p", "4548-4", -100, 6.5, "1"),
        med_statement("p", ATC, "N06AB06", -60, None),  # ongoing: covers the window
        obs("p", "4548-4", 30, 7.0, "%"),  # label rules need no value or unit
        patient("q"),
        med_request("q", ATC, "N06AB06", -100, 30),  # supply ended before the window
        obs("q", "4548-4", 91, 7.0, "%"),  # after the label window
    ])
    table = read(small, tmp_path, mapping)
    p, q = rows(small, table)
    assert p["temp"] == pytest.approx(37.0) and p["has_a1c"] == 1.0 and p["on_ssri"] == 1.0
    assert math.isnan(q["temp"]) and q["has_a1c"] == 0.0 and q["on_ssri"] == 0.0
    assert table.labels.tolist() == [1.0, 0.0]
    assert table.report.conversions["[degF]→Cel"] == 1


# --- Condition, Encounter, Medication ------------------------------------------------------


def test_conditions_date_fallback_distinct_days_and_prefixes(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        condition("p", "F32.1", onset=-100),
        condition("p", "F33.0", onset=-100),  # same date: one episode
        condition("p", "F329", recorded=-50),  # no onset: recordedDate
        condition("p", "F32.0", onset=-2000, recorded=-10),  # onset wins: outside 1825 days
        condition("p", "F32.2", onset=-20, verificationStatus={"coding": [{"code": "refuted"}]}),
        condition("p", "g89.29", onset=-9000),  # ICD-10 compared without dots, case-insensitive
        condition("p", "F41.1", onset=None),  # no date at all
        condition("p", "F17.210", onset=-3),
    ])
    table = read(study, tmp_path)
    (row,) = rows(study, table)
    assert row["prior_depressive_episodes"] == 2.0
    assert row["dx_chronic_pain"] == 1.0 and row["dx_substance_use"] == 1.0 and row["dx_anxiety"] == 0.0
    assert table.report.excluded["Condition: verificationStatus refuted"] == 1
    assert table.report.quarantined["Condition: missing date"] == 1
    assert table.report.examples["Condition: missing date"] == ["a.ndjson:8"]


def test_encounters_by_class_and_reason(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        encounter("p", "IMP", -30, reason="F32.1"),
        encounter("p", "IMP", -60, reason="I21.9"),  # not a psychiatric reason
        encounter("p", "IMP", -90),  # no reason
        encounter("p", "EMER", -5),
        encounter("p", "EMER", -400),  # outside 365 days
        encounter("p", "EMER", -6, status="cancelled"),
        encounter("p", "AMB", -7, reason="F32.1"),
    ])
    table = read(study, tmp_path)
    (row,) = rows(study, table)
    assert row["psych_admissions_12m"] == 1.0 and row["ed_visits_12m"] == 1.0
    assert table.report.excluded["Encounter: status cancelled"] == 1
    assert table.labels.tolist() == [0.0]


def test_pdc_with_overlapping_supplies_and_window_clipping(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        med_request("p", RXNORM, "36437", -200, 30),  # [-200, -170): 9 days inside (-180, 0]
        med_statement("p", RXNORM, "4493", -100, -71),  # [-100, -70): 30 days
        med_request("p", ATC, "N06AB06", -80, 30),  # [-80, -50): overlaps by 10 -> union 50 days
        med_request("p", RXNORM, "72625", -10, 2, unit="wk"),  # 14 days, clipped at the index: 11 days
        med_request("p", RXNORM, "72625", -40, 10, status="entered-in-error"),
        med_request("p", RXNORM, "1191", -40, 90),  # aspirin: not an antidepressant
        patient("q"),
        {"resourceType": "MedicationRequest", "status": "completed", "subject": {"reference": "Patient/q"},
         "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "2556"}]}, "authoredOn": day(-5),
         "dispenseRequest": {"validityPeriod": {"start": day(-20), "end": day(-11)}}},
    ])
    table = read(study, tmp_path)
    p, q = rows(study, table)
    assert p["antidepressant_pdc"] == pytest.approx(70 / 180)
    assert q["antidepressant_pdc"] == pytest.approx(10 / 180)
    assert table.report.conversions["wk→d"] == 1
    assert table.report.excluded["MedicationRequest: status entered-in-error"] == 1


def test_medication_and_encounter_record_problems_are_quarantined(study, tmp_path):
    no_supply = med_request("p", RXNORM, "36437", -30, 30)
    no_supply["dispenseRequest"] = {}
    open_validity = med_request("p", RXNORM, "36437", -30, 30)
    open_validity["dispenseRequest"] = {"validityPeriod": {"start": day(-30)}}
    backwards = med_statement("p", RXNORM, "4493", -10, -20)
    no_period = encounter("p", "EMER", -3)
    del no_period["period"]
    write_ndjson(tmp_path, "a.ndjson", [
        patient("p"),
        no_supply,
        open_validity,
        med_request("p", RXNORM, "36437", -30, 1, unit="mo"),
        med_request("p", RXNORM, "36437", -30, -5),
        backwards,
        med_statement("p", RXNORM, "4493", -10, -5, status="not-taken"),
        med_statement("p", RXNORM, "4493", -10, -5, patient={"reference": "urn:uuid:123"}),
        no_period,
        med_request("p", RXNORM, "36437", -30, 15),  # the one good supply
    ])
    table = read(study, tmp_path)
    assert table.report.quarantined == {
        "MedicationRequest: no supply interval (expectedSupplyDuration or validityPeriod)": 1,
        "MedicationRequest: period without an end": 1,
        "MedicationRequest: unit mismatch": 1,
        "MedicationRequest: supply duration is not positive": 1,
        "MedicationStatement: period ends before it starts": 1,
        "MedicationStatement: unresolved urn: patient reference": 1,
        "Encounter: missing date": 1,
    }
    assert table.report.unit_mismatches == {"mo→d": 1}
    assert table.report.excluded == {"MedicationStatement: status not-taken": 1}
    (row,) = rows(study, table)
    assert row["antidepressant_pdc"] == pytest.approx(15 / 180) and row["ed_visits_12m"] == 0.0


def test_label_any_of_looks_forward_from_the_index_date(study, tmp_path):
    cases = {
        "at_index": [condition("at_index", "F32.1", onset=0)],
        "next_day": [condition("next_day", "F32.1", onset=1)],
        "last_day": [condition("last_day", "F33.9", onset=365)],
        "too_late": [condition("too_late", "F33.9", onset=366)],
        "crisis": [encounter("crisis", "EMER", 100, reason="F43.0")],
        "injury": [encounter("injury", "EMER", 100, reason="S52.5")],
        "admitted": [encounter("admitted", "IMP", 100, reason="F32.1")],
    }
    write_ndjson(tmp_path, "a.ndjson", [r for pid, rs in cases.items() for r in [patient(pid), *rs]])
    table = read(study, tmp_path)
    labels = dict(zip(sorted(cases), table.labels.tolist()))
    assert labels == {
        "admitted": 0.0, "at_index": 0.0, "crisis": 1.0, "injury": 0.0,
        "last_day": 1.0, "next_day": 1.0, "too_late": 0.0,
    }
    at_index = rows(study, table)[sorted(cases).index("at_index")]
    assert at_index["prior_depressive_episodes"] == 1.0  # the index date is in the look-back window


# --- Bundles, files and ordering -------------------------------------------------------------


def test_bundles_resolve_urn_references_and_rows_are_sorted_by_patient_id(study, tmp_path):
    split = tmp_path / "train"
    write_bundle(split, "b.json", [
        patient("zed"),
        obs("ignored", "44261-6", -3, 9, "{score}", subject={"reference": "urn:uuid:0001"}),
        patient("amy"),
    ], full_urls=["urn:uuid:0001", None, "https://ehr.example/fhir/Patient/amy"])
    write_ndjson(split, "a.ndjson", [obs("amy", "44261-6", -3, 5, "{score}",
                                         subject={"reference": "https://ehr.example/fhir/Patient/amy/_history/2"})])
    table = read(study, split)
    amy, zed = rows(study, table)
    assert (amy["phq9_latest"], zed["phq9_latest"]) == (5.0, 9.0)
    assert table.report.files == ["a.ndjson", "b.json"]


def test_later_file_wins_a_same_day_tie_and_a_byte_order_mark_is_fine(study, tmp_path):
    write_ndjson(tmp_path, "1.ndjson", [patient("p"), obs("p", "44261-6", -3, 9, "{score}")])
    (tmp_path / "2.ndjson").write_bytes(b"\xef\xbb\xbf" + json.dumps(obs("p", "44261-6", -3, 4, "{score}")).encode())
    table = read(study, tmp_path)
    (row,) = rows(study, table)
    assert row["phq9_latest"] == 4.0 and not table.report.quarantined


def test_bad_input_corpus_each_case_has_its_reason_and_good_records_still_load(study, tmp_path):
    nested = "[" * 200_000 + "]" * 200_000
    good_obs = obs("good", "44261-6", -3, 12, "{score}")
    lines = [
        patient("good"),                                                      # 1
        "{not json",                                                          # 2
        "[1, 2, 3]",                                                          # 3
        {"id": "x", "status": "final"},                                       # 4 missing resourceType
        {"resourceType": "Practitioner", "id": "doc"},                        # 5 ignored
        {**good_obs, "subject": None},                                        # 6
        {**good_obs, "subject": {"reference": "Group/7"}},                    # 7
        obs("ghost", "44261-6", -3, 12, "{score}"),                           # 8
        obs("good", "44261-6", None, 12, "{score}"),                          # 9
        {**good_obs, "effectiveDateTime": "2025-02-30"},                      # 10
        obs("good", "44261-6", 500, 12, "{score}"),                           # 11 after TODAY
        obs("good", "29463-7", -3, 12, "furlong"),                            # 12
        '{"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", '
        '"code": "44261-6"}]}, "subject": {"reference": "Patient/good"}, "effectiveDateTime": "2025-06-28", '
        '"valueQuantity": {"value": NaN}}',                                   # 13
        obs("good", "44261-6", -3, "12", "{score}"),                          # 14
        patient("good", birth="1950-01-01"),                                  # 15
        patient("kid", birth="2015-01-01"),                                   # 16
        "x" * (MAX_LINE_BYTES + 10),                                          # 17
        nested,                                                               # 18
        {"resourceType": "Patient", "gender": "male"},                        # 19
        good_obs,                                                             # 20
    ]
    write_ndjson(tmp_path, "a.ndjson", lines)
    with (tmp_path / "a.ndjson").open("ab") as out:
        out.write(b'\xff\xfe{"resourceType": "Patient"}\n')                  # 21 not UTF-8
        out.write(b'{"resourceType": "Patient", "id": "late"')               # 22 truncated
    (tmp_path / "empty.ndjson").write_text("\n  \n")
    (tmp_path / "list.json").write_text(json.dumps([patient("in_list")]))
    (tmp_path / "x.json").write_text(json.dumps({"resourceType": "Bundle", "entry": [
        {"fullUrl": "urn:uuid:1"}, {"resource": patient("bundled")}]}))
    with (tmp_path / "z_huge.json").open("wb") as out:
        out.truncate(256 * 1024 * 1024 + 1)  # sparse: refused by size, never read
    (tmp_path / "notes.txt").write_text("not FHIR")

    table = read(study, tmp_path)
    report = table.report
    assert report.quarantined == {
        "malformed JSON": 2,
        "not a JSON object": 1,
        "Observation: no subject/patient reference": 1,
        "Observation: subject is not a Patient reference": 1,
        "no Patient resource": 1,
        "Observation: missing date": 1,
        "Observation: unparseable date": 1,
        "Observation: date in the future": 1,
        "Observation: unit mismatch": 1,
        "Observation: value not finite (NaN/Inf)": 1,
        "Observation: value is not a number": 1,
        "duplicate patient": 1,
        "age: outside valid range [18, 100] years": 1,
        "line longer than 1 MB (not parsed)": 1,
        "malformed JSON (nested too deeply)": 1,
        "Patient: missing id": 1,
        "truncated last line": 1,
        "empty file": 1,
        "not a Bundle": 1,
        "Bundle entry without a resource": 1,
        "Bundle file larger than 256 MB (export it as NDJSON)": 1,
    }
    ex = report.examples
    assert ex["malformed JSON"] == ["a.ndjson:2", "a.ndjson:21"]
    assert ex["not a JSON object"] == ["a.ndjson:3"]
    assert ex["no Patient resource"] == ["a.ndjson:8"]
    assert ex["Observation: unit mismatch"] == ["a.ndjson:12"]
    assert ex["duplicate patient"] == ["a.ndjson:15"]
    assert ex["age: outside valid range [18, 100] years"] == ["a.ndjson:16"]
    assert ex["line longer than 1 MB (not parsed)"] == ["a.ndjson:17"]
    assert ex["truncated last line"] == ["a.ndjson:22"]
    assert ex["empty file"] == ["empty.ndjson"] and ex["not a Bundle"] == ["list.json"]
    assert ex["Bundle entry without a resource"] == ["x.json:entry[0]"]
    assert report.ignored == {"missing resourceType": 1, "ignored resource type Practitioner": 1}
    assert report.unit_mismatches == {"furlong→kg": 1}
    assert report.ignored_files == ["notes.txt"]
    # The good records in the same files still load: the first "good" Patient (1980) and its line-20 PHQ-9.
    bundled, good = rows(study, table)  # sorted by patient id
    assert good["age"] == 45.0 and good["phq9_latest"] == 12.0 and good["phq9_count_12m"] == 1.0
    assert bundled["age"] == 45.0
    assert report.rows_read == 5 and report.rows_loaded == 2
    assert report.resources_read["Patient"] == 5 and report.resources_read["Observation"] == 10
    summary = report.summary().replace(str(tmp_path), "<split>")
    for secret in ("good", "kid", "ghost", "bundled", "1950"):
        assert secret not in summary
    assert "2/5 patients loaded" in summary and "quarantined 1: duplicate patient (a.ndjson:15)" in summary


def test_summary_has_counts_and_never_ids_or_values(study, tmp_path):
    write_ndjson(tmp_path, "a.ndjson", [patient("MRN-48213", birth="1961-03-04"),
                                        obs("MRN-48213", "44261-6", -3, 23, "{score}")])
    summary = read(study, tmp_path).report.summary().replace(str(tmp_path), "<split>")
    assert "MRN-48213" not in summary and "23" not in summary and "1961" not in summary
    assert "resources read: Observation 1, Patient 1" in summary


def test_report_names_only_generic_files(study, tmp_path):
    """A Bundle named after its patient (Synthea) is `file #k` in the report; resource-type names print."""
    synthea = "Aaron697_Brekke496_2fa15bc7-8866-461a-9000-f739e425860a.json"
    write_bundle(tmp_path, synthea, [patient("amy"), {**obs("amy", "44261-6", -3, 9, "{score}"), "effectiveDateTime": "2025-02-30"}])
    write_ndjson(tmp_path, "Patient.1.ndjson", [patient("bob"), "{not json", "null"])
    write_ndjson(tmp_path, "jane_doe-1961.ndjson", ["{not json"])
    write_ndjson(tmp_path, "1.Observation.NDJSON", ["{not json"])
    report = read(study, tmp_path).report
    assert report.files == ["1.Observation.NDJSON", synthea, "Patient.1.ndjson", "jane_doe-1961.ndjson"]
    assert report.examples["malformed JSON"] == ["1.Observation.NDJSON:1", "Patient.1.ndjson:2", "file #4:1"]
    assert report.examples["Observation: unparseable date"] == ["file #2:entry[1]"]
    assert report.examples["not a JSON object"] == ["Patient.1.ndjson:3"]  # a `null` line
    summary = report.summary().replace(str(tmp_path), "<split>")
    for secret in ("Aaron", "Brekke", "2fa15bc7", "jane", "doe", "1961"):
        assert secret not in summary
    assert "(1.Observation.NDJSON:1, Patient.1.ndjson:2, file #4:1)" in summary


def test_unusable_directories_are_fatal(study, tmp_path):
    with pytest.raises(SiteDataError, match="FHIR split directory not found"):
        read(study, tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SiteDataError, match="no .ndjson, .ndjson.gz or .json files"):
        read(study, tmp_path)
    write_ndjson(tmp_path, "a.ndjson", [patient("kid", birth="2015-01-01"), obs("x", "44261-6", -3, 1, "{score}")])
    with pytest.raises(SiteDataError, match="no usable patients") as err:
        read(study, tmp_path)
    assert "quarantined 1: age: outside valid range" in str(err.value)


def test_ndjson_is_streamed_not_held_in_memory(study, tmp_path):
    """Memory follows patients and kept facts, not file size: 6 000 long lines for 4 patients."""
    note = {"text": {"status": "generated", "div": "<div>" + "x" * 2000 + "</div>"}}
    lines = [json.dumps(obs(f"p{i % 4}", "93832-4", -(i % 30), 6 + i % 3, "h", **note)) for i in range(6000)]
    with (tmp_path / "a.ndjson").open("w") as out:
        out.write("\n".join(json.dumps(patient(f"p{i}")) for i in range(4)) + "\n")
        out.write("\n".join(lines) + "\n")
    size = (tmp_path / "a.ndjson").stat().st_size
    tracemalloc.start()
    try:
        table = read(study, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table.labels) == 4 and table.report.resources_read["Observation"] == 6000
    assert table.report.resources_used["Observation"] == 6000 and rows(study, table)[0]["sleep_hours"] == pytest.approx(7.0, abs=0.01)
    assert size > 12_000_000 and peak < size / 20
