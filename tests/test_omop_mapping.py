"""The study's [omop] table (fedcare/omop.py) and a site's database source (client/database.py):
every mistake is one line naming the file and the field; no database is needed here."""

import datetime
import os
import tomllib
from pathlib import Path

import pytest

from client.database import (
    DatabaseSourceError, SourceKind, Split, assign_split, data_argument, load_database_source, source_from_url,
)
from fedcare.omop import CdmTable, ConceptRef
from fedcare.study import StudyConfigError, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]
OMOP_STUDY = ROOT / "studies" / "depression-risk-omop.toml"


def _raw():
    return tomllib.loads(OMOP_STUDY.read_text())


def _error(raw) -> str:
    with pytest.raises(StudyConfigError) as err:
        parse_study(raw, source="s.toml")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_omop_study_parses_every_rule_and_shares_the_fhir_index_date():
    study = load_study(OMOP_STUDY)
    omop = study.omop
    assert list(omop.features) == [f.name for f in study.features]
    assert omop.index_date == study.mapping.index_date == datetime.date(2025, 7, 1)
    pdc = omop.features["antidepressant_pdc"]
    assert pdc.table is CdmTable.DRUG and pdc.aggregate == "pdc" and pdc.concepts.descendants
    assert ConceptRef(vocabulary="ATC", code="N06A") in pdc.concepts.refs
    assert omop.features["prior_depressive_episodes"].concepts.refs[0] == ConceptRef(
        vocabulary="ICD10CM", code="F32", is_prefix=True)
    admissions = omop.features["psych_admissions_12m"]
    assert admissions.reasons.refs == (ConceptRef(vocabulary="ICD10CM", code="F", is_prefix=True),)
    assert omop.label.window_days_after == 365 and len(omop.label.any_of) == 2


def test_the_omop_table_is_part_of_the_hash():
    raw = _raw()
    base = parse_study(raw).hash
    raw["omop"]["features"]["phq9_latest"]["window_days"] = 180
    assert parse_study(raw).hash != base
    del raw["omop"]
    assert parse_study(raw).hash != base


@pytest.mark.parametrize("edit, message", [
    (lambda o: o["features"]["phq9_latest"].update(table="measurements"),
     "s.toml: omop.features.phq9_latest.table: unknown value 'measurements' (expected one of: person, measurement, "
     "observation, condition_occurrence, drug_exposure, visit_occurrence)"),
    (lambda o: o["features"]["dx_anxiety"].update(aggregate="mean"),
     "s.toml: omop.features.dx_anxiety.aggregate: 'mean' is not allowed for table 'condition_occurrence' "
     "(allowed: count, any)"),
    (lambda o: o["features"]["phq9_latest"].pop("unit"),
     "s.toml: omop.features.phq9_latest.unit: missing field (aggregate 'latest' reads value_as_number)"),
    (lambda o: o["features"]["sleep_hours"].update(unit="hours"),
     "s.toml: omop.features.sleep_hours.unit: no known conversion to 'hours'"),
    (lambda o: o["features"]["gad7_latest"].update(concepts=["LOINC:70274-6"]),
     "s.toml: omop.features.gad7_latest.concepts[0]: expected a positive concept_id or \"<vocabulary_id>|<code>\" "
     "(a trailing * for a prefix), got 'LOINC:70274-6'"),
    (lambda o: o["features"]["gad7_latest"].update(concepts=[0]),
     "s.toml: omop.features.gad7_latest.concepts[0]: expected a positive concept_id"),
    (lambda o: o["features"].pop("bmi"), "s.toml: omop.features.bmi: missing rule for study feature 'bmi'"),
    (lambda o: o["features"].update(nope={"table": "person", "value": "age"}),
     "s.toml: omop.features.nope: no study feature is named 'nope'"),
    (lambda o: o["features"]["age"].update(value="dob"),
     "s.toml: omop.features.age.value: unknown value 'dob' (expected one of: age, female)"),
    (lambda o: o["features"]["bmi"].pop("height_concepts"),
     "s.toml: omop.features.bmi.height_concepts: missing field (aggregate 'bmi' needs weight and height concepts)"),
    (lambda o: o["features"]["ed_visits_12m"].update(codes=["Visit|ER"]),
     "s.toml: omop.features.ed_visits_12m.codes: unknown key for table 'visit_occurrence' (expected: table, concepts,"),
    (lambda o: o["label"]["any_of"][0].update(aggregate="count"),
     "s.toml: omop.label.any_of[0].aggregate: a label rule's aggregate is 'any', got 'count'"),
    (lambda o: o["label"]["any_of"][0].update(reason_concepts=["ICD10CM|F*"]),
     "s.toml: omop.label.any_of[0].reason_concepts: only a visit_occurrence rule has reasons"),
    (lambda o: o["features"]["dx_anxiety"].update(window_days=1_000_000),
     "s.toml: omop.features.dx_anxiety.window_days: must be <= 73000 (200 years), got 1000000"),
    (lambda o: o.update(index_date="2025-01-01"),
     "s.toml: omop.index_date: 2025-01-01 differs from mapping.index_date (2025-07-01): a study has one index date"),
])
def test_mistakes_in_the_omop_table_name_the_field(edit, message):
    raw = _raw()
    edit(raw["omop"])
    assert _error(raw).startswith(message)


def test_an_omop_only_study_needs_its_own_index_date():
    raw = _raw()
    del raw["mapping"]
    assert _error(raw) == ("s.toml: omop.index_date: missing field (the study has no [mapping] whose index_date "
                           "it could take)")
    raw["omop"]["index_date"] = "2025-07-01"
    assert parse_study(raw).omop.index_date == datetime.date(2025, 7, 1)


# --- the site's database source ------------------------------------------------------------------


def _source_file(tmp_path, body: str) -> Path:
    path = tmp_path / "database.toml"
    path.write_text("[database]\n" + body)
    return path


def test_a_database_toml_reads_back_with_secure_defaults(tmp_path):
    path = _source_file(tmp_path, 'kind = "omop"\nhost = "cdm.example.org"\ndbname = "cdm"\nuser = "reader"\n'
                                  'password_file = "cdm.pass"\nvocabulary_schema = "vocab"\n')
    source = load_database_source(tmp_path)
    assert source.kind is SourceKind.OMOP and source.port == 5432 and source.cdm_schema == "cdm"
    assert source.sslmode == "verify-full"  # off loopback, the server's certificate is verified by default
    assert source.password_file == tmp_path / "cdm.pass" and source.origin == str(path)
    loopback = _source_file(tmp_path, 'kind = "omop"\ndbname = "cdm"\nuser = "reader"\n')
    assert load_database_source(loopback).sslmode == "prefer"


@pytest.mark.parametrize("body, message", [
    ('kind = "omop"\ndbname = "cdm"\nuser = "r"\npassword = "hunter2"\n',
     "database.password: a password is never written here: use password_file or password_env"),
    ('kind = "csv"\ndbname = "cdm"\nuser = "r"\n', "database.kind: unknown value 'csv' (expected one of: omop, sql)"),
    ('kind = "omop"\ndbname = "cdm"\nuser = "r"\ncdm_schema = "cdm; drop"\n',
     "database.cdm_schema: expected a schema name (letters, digits, _), got 'cdm; drop'"),
    ('kind = "sql"\ndbname = "cdm"\nuser = "r"\n', "database.query: kind 'sql' needs exactly one of query and query_file"),
    ('kind = "omop"\ndbname = "cdm"\nuser = "r"\nport = 70000\n', "database.port: must be <= 65535, got 70000"),
    ('kind = "omop"\nuser = "r"\n', "database.dbname: missing field"),
    ('kind = "omop"\ndbname = "cdm"\nuser = "r"\ntest_fraction = 1.5\n', "database.test_fraction: must be < 1"),
    ('kind = "omop"\nhost = "db.example.org"\ndbname = "cdm"\nuser = "r"\nsslmode = "require"\n',
     "database.sslmode: 'require' to db.example.org does not verify the server"),
])
def test_mistakes_in_database_toml_name_the_field(tmp_path, body, message):
    path = _source_file(tmp_path, body)
    with pytest.raises(DatabaseSourceError) as err:
        load_database_source(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_an_unverified_tls_mode_off_loopback_needs_insecure_tls_and_warns(tmp_path, caplog):
    path = _source_file(tmp_path, 'kind = "omop"\nhost = "db.example.org"\ndbname = "c"\nuser = "r"\n'
                                  'sslmode = "require"\ninsecure_tls = true\n')
    with caplog.at_level("WARNING"):
        assert load_database_source(path).sslmode == "require"
    assert "INSECURE" in caplog.text and "db.example.org" in caplog.text


def test_a_url_never_carries_a_password_and_becomes_a_database_toml(tmp_path):
    with pytest.raises(DatabaseSourceError, match="a password is never given on the command line"):
        source_from_url("postgresql://reader:hunter2@db:5432/cdm")
    url = "postgresql://reader@127.0.0.1:6543/cdm?cdm_schema=site_a&vocabulary_schema=vocab&password_env=CDM_PW"
    path = data_argument(url, state_dir=tmp_path / "state")
    source = load_database_source(path)
    assert (source.host, source.port, source.dbname, source.user) == ("127.0.0.1", 6543, "cdm", "reader")
    assert (source.cdm_schema, source.vocabulary_schema, source.password_env) == ("site_a", "vocab", "CDM_PW")
    assert "hunter2" not in path.read_text()
    assert data_argument("/srv/site", state_dir=tmp_path) == Path("/srv/site")
    with pytest.raises(DatabaseSourceError, match=r"--data: url.cdm_schema: expected a schema name"):
        source_from_url("postgresql://reader@db/cdm?cdm_schema=a-b")


def test_a_password_file_readable_by_others_is_refused(tmp_path):
    from client.database import read_password

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    source = load_database_source(_source_file(tmp_path, f'kind = "omop"\ndbname = "c"\nuser = "r"\n'
                                                         f'password_file = "{secret}"\n'))
    with pytest.raises(DatabaseSourceError, match="readable by others"):
        read_password(source)
    os.chmod(secret, 0o600)
    assert read_password(source) == "s3cret"


def test_the_split_is_a_stable_hash_of_the_patient_id():
    splits = [assign_split(i, 0.2) for i in range(20_000)]
    share = splits.count(Split.TEST) / len(splits)
    assert 0.19 < share < 0.21
    assert assign_split(12345, 0.2) is assign_split("12345", 0.2)  # the id's text decides
    assert all(assign_split(i, 0.0) is Split.TRAIN for i in range(1000))
