"""The throwaway PostgreSQL cluster (`tests/postgres.py`) and the synthetic OMOP CDM writer
(`simulations/omop_cdm.py`, `simulations/omop_vocabulary.py`), against a real server.

The writer's promise is that a site's CDM holds the CSV's patients: each split's persons are those
`assign_split` puts in it, in CSV row order, and the records derive the CSV's values. Here that is
checked in plain SQL, independently of the OMOP reader (tests/test_omop.py runs the reader):
counts, diagnoses by distinct dates, visits with a psychiatric reason, proportion of days covered
and the label for every patient, plus the vocabulary every study concept resolves in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import psycopg
import pytest

from client.data import read_site_csv
from client.database import Split, assign_split, load_database_source
from fedcare.omop import normalize_code
from fedcare.study import load_study
from simulations.fhir_cohorts import patient_id
from simulations.fhir_vocabulary import DISPLAYS, DRUGS, UNIT_VARIANTS

from . import postgres as pg
from .postgres import postgres_cluster  # noqa: F401 - the session's cluster fixture

ROOT = Path(__file__).resolve().parents[1]
OMOP_STUDY = ROOT / "studies" / "depression-risk-omop.toml"
SYSTEM_VOCABULARY = {"http://loinc.org": "LOINC", "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
                     "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm", "http://www.whocc.no/atc": "ATC"}


@pytest.fixture(scope="module")
def study():
    return load_study(OMOP_STUDY)


@pytest.fixture(scope="module")
def cdm(study, postgres_cluster, tmp_path_factory):  # noqa: F811
    """Two synthetic hospitals in database `synthetic`: CDM schemas site_1, site_2, one vocabulary schema."""
    from simulations.cohorts import write_cohorts
    from simulations.omop_cdm import write_omop_site

    root = tmp_path_factory.mktemp("omop-sites")
    write_cohorts(study, root, hospitals=2, seed=11, size_scale=0.05)
    sites = sorted(p for p in root.iterdir() if p.is_dir())
    postgres_cluster.create_database("synthetic")
    conn = psycopg.connect(postgres_cluster.superuser_conninfo(dbname="synthetic"))
    summaries = {site.name: write_omop_site(study, site, conn, cdm_schema=f"site_{i + 1}", vocabulary_schema="vocab")
                 for i, site in enumerate(sites)}
    yield {"conn": conn, "sites": {f"site_{i + 1}": site for i, site in enumerate(sites)}, "summaries": summaries,
           "cluster": postgres_cluster}
    conn.close()


def _rows(conn, query: str, *params) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


# ---------------------------------------------------------------- the cluster


def test_cluster_listens_on_loopback_with_password_logins(postgres_cluster):  # noqa: F811
    cluster = postgres_cluster
    cluster.create_role("pw_probe", "right-password")
    with psycopg.connect(cluster.conninfo("pw_probe", "right-password")) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "pw_probe"
    with psycopg.connect(cluster.superuser_conninfo()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
        socket_dir = conn.execute("SHOW unix_socket_directories").fetchone()[0]
        secret = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'pw_probe'").fetchone()[0]
    assert secret.startswith("SCRAM-SHA-256$")
    assert Path(socket_dir) == cluster.socket_dir and cluster.root in Path(socket_dir).parents
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.conninfo("pw_probe", "wrong-password"))
    hba = (cluster.data_dir / "pg_hba.conf").read_text()
    assert "host all all 127.0.0.1/32 scram-sha-256" in hba and "trust" not in hba.split("host", 1)[1]


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (the postmaster's parent is init, which reaps late)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_a_cluster_stops_and_leaves_nothing_behind():
    cluster = pg.PostgresCluster().start()
    pid, root = cluster.postmaster_pid, cluster.root
    assert pid and _running(pid)
    with psycopg.connect(cluster.superuser_conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    cluster.stop()
    assert not root.exists()
    assert not _running(pid)
    cluster.stop()  # idempotent


def test_missing_binaries_fail_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(pg, "BIN_GLOB", str(tmp_path / "no-postgresql" / "*" / "bin"))
    with pytest.raises(pg.PostgresUnavailable, match="install the Debian package 'postgresql'"):
        pg.PostgresCluster().start()


# ---------------------------------------------------------------- the vocabulary


def test_every_study_concept_and_rendered_code_resolves(study, cdm):
    conn = cdm["conn"]
    codes: dict[str, set[str]] = {}
    for vocabulary, code in _rows(conn, "SELECT vocabulary_id, concept_code FROM vocab.concept"):
        codes.setdefault(vocabulary, set()).add(normalize_code(code))
    for rule in study.omop.rules():
        for concepts in rule.concept_sets():
            for ref in concepts.refs:
                known = codes.get(ref.vocabulary, set())
                wanted = normalize_code(ref.code)
                hit = any(c.startswith(wanted) for c in known) if ref.is_prefix else wanted in known
                assert hit, f"{ref.describe()} does not resolve in the synthetic vocabulary"
    for system, code in DISPLAYS:
        assert normalize_code(code) in codes[SYSTEM_VOCABULARY[system]], (system, code)
    for drug in DRUGS:
        assert drug.rxnorm in codes["RxNorm"] and drug.atc in codes["ATC"]
    for unit in {u.code for variants in UNIT_VARIANTS.values() for u in variants} | {"mm[Hg]", "kg/m2"}:
        assert normalize_code(unit) in codes["UCUM"], unit
    ids = dict(((v, c), i) for i, v, c in _rows(conn, "SELECT concept_id, vocabulary_id, concept_code FROM vocab.concept"))
    assert (ids[("Gender", "M")], ids[("Gender", "F")]) == (8507, 8532)
    assert (ids[("Visit", "IP")], ids[("Visit", "OP")], ids[("Visit", "ER")]) == (9201, 9202, 9203)
    local = [i for (v, _), i in ids.items() if v not in ("Gender",) and i not in (9201, 9202, 9203)]
    assert min(local) > 2_000_000_000
    assert ids[("fedcare", "area-deprivation-index")] > 2_000_000_000


def test_atc_classes_reach_their_ingredients_through_concept_ancestor(cdm):
    conn = cdm["conn"]
    descendants = _rows(conn, """
        SELECT d.vocabulary_id, d.concept_code, a.min_levels_of_separation
        FROM vocab.concept_ancestor a JOIN vocab.concept c ON c.concept_id = a.ancestor_concept_id
        JOIN vocab.concept d ON d.concept_id = a.descendant_concept_id
        WHERE c.vocabulary_id = 'ATC' AND c.concept_code = 'N06A'""")
    found = {(v, c): level for v, c, level in descendants}
    antidepressants = [d for d in DRUGS if d.atc.startswith("N06A")]
    assert len(antidepressants) == 8
    for drug in antidepressants:
        assert found[("ATC", drug.atc[:5])] == 1 and found[("ATC", drug.atc)] == 2
        assert found[("RxNorm", drug.rxnorm)] == 3, drug.name
    assert found[("ATC", "N06A")] == 0  # Athena's self row
    assert not {d.rxnorm for d in DRUGS if not d.atc.startswith("N06A")} & {c for v, c in found if v == "RxNorm"}
    missing_self = _rows(conn, """
        SELECT c.concept_id FROM vocab.concept c WHERE c.standard_concept IN ('S', 'C') AND NOT EXISTS (
          SELECT 1 FROM vocab.concept_ancestor a WHERE a.ancestor_concept_id = c.concept_id
          AND a.descendant_concept_id = c.concept_id AND a.min_levels_of_separation = 0)""")
    assert not missing_self
    assert _rows(conn, "SELECT count(*) FROM vocab.vocabulary")[0][0] >= 8


# ---------------------------------------------------------------- the CDM


def _split_persons(conn, schema: str, split: Split) -> list[tuple[int, str]]:
    rows = _rows(conn, f"SELECT person_id, person_source_value FROM {schema}.person ORDER BY person_id")
    return [(pid, source) for pid, source in rows if assign_split(pid, 0.2) is split]


def test_person_ids_split_as_the_csv(study, cdm):
    conn = cdm["conn"]
    for schema, site in cdm["sites"].items():
        assert (site / "train").is_dir() and (site / "test").is_dir()  # the FHIR rendering was written first
        first = 0
        total = 0
        for split in Split:
            csv = read_site_csv(study, site / f"{split.value}.csv")
            persons = _split_persons(conn, schema, split)
            assert len(persons) == len(csv.labels) == cdm["summaries"][site.name]["persons"][split.value]
            # the n-th patient of the split is its n-th id: person_id order is CSV row order
            assert [source for _, source in persons] == [patient_id(first + k) for k in range(len(persons))]
            expected, n = [], 0
            while len(expected) < len(persons):
                n += 1
                if assign_split(n, 0.2) is split:
                    expected.append(n)
            assert [pid for pid, _ in persons] == expected
            first += len(persons)
            total += len(persons)
        assert _rows(conn, f"SELECT count(*) FROM {schema}.person")[0][0] == total


def _per_person(conn, query: str, *params) -> dict[int, float]:
    return {pid: float(value) for pid, value in _rows(conn, query, *params)}


def test_sql_over_the_cdm_gives_the_csv_values(study, cdm):
    """Several features and the label, derived in SQL for every patient, equal the CSV's cells."""
    conn = cdm["conn"]
    index = study.omop.index_date
    col = {f.name: j for j, f in enumerate(study.features)}
    concept = "(SELECT concept_id FROM vocab.concept WHERE vocabulary_id = %s AND concept_code = %s)"
    icd = "(SELECT concept_id FROM vocab.concept WHERE vocabulary_id = 'ICD10CM' AND ({}))"
    depression = icd.format("concept_code LIKE 'F32%%' OR concept_code LIKE 'F33%%'")
    psychiatric = icd.format("concept_code LIKE 'F%%'")
    antidepressant = ("(SELECT descendant_concept_id FROM vocab.concept_ancestor WHERE ancestor_concept_id = "
                      "(SELECT concept_id FROM vocab.concept WHERE vocabulary_id = 'ATC' AND concept_code = 'N06A'))")
    checked = 0
    for schema, site in cdm["sites"].items():
        s = schema
        queries = {
            "phq9_count_12m": (f"SELECT person_id, count(*) FROM {s}.measurement WHERE measurement_concept_id = {concept} "
                               "AND measurement_date > %s::date - 365 AND measurement_date <= %s GROUP BY 1",
                               "LOINC", "44261-6", index, index),
            "prior_depressive_episodes": (
                f"SELECT person_id, count(DISTINCT condition_start_date) FROM {s}.condition_occurrence "
                f"WHERE condition_concept_id IN {depression} AND condition_start_date > %s::date - 1825 "
                "AND condition_start_date <= %s GROUP BY 1", index, index),
            "ed_visits_12m": (f"SELECT person_id, count(*) FROM {s}.visit_occurrence WHERE visit_concept_id = 9203 "
                              "AND visit_start_date > %s::date - 365 AND visit_start_date <= %s GROUP BY 1", index, index),
            "psych_admissions_12m": (
                f"SELECT v.person_id, count(*) FROM {s}.visit_occurrence v WHERE v.visit_concept_id = 9201 "
                "AND v.visit_start_date > %s::date - 365 AND v.visit_start_date <= %s AND EXISTS (SELECT 1 FROM "
                f"{s}.observation o WHERE o.visit_occurrence_id = v.visit_occurrence_id "
                f"AND o.observation_concept_id IN {psychiatric}) GROUP BY 1", index, index),
            "antidepressant_pdc": (
                "SELECT person_id, count(DISTINCT day)::float8 / 180 FROM (SELECT person_id, generate_series("
                "greatest(drug_exposure_start_date, %s::date - 179), least(drug_exposure_end_date, %s::date), "
                f"'1 day')::date AS day FROM {s}.drug_exposure WHERE drug_concept_id IN {antidepressant}) d "
                "GROUP BY 1", index, index),
            "sex_female": (f"SELECT person_id, CASE gender_concept_id WHEN 8532 THEN 1 WHEN 8507 THEN 0 END "
                           f"FROM {s}.person WHERE gender_concept_id IN (8507, 8532)",),
            "age": (f"SELECT person_id, extract(year FROM age(%s::date, make_date(year_of_birth, "
                    f"coalesce(month_of_birth, 7), coalesce(day_of_birth, CASE WHEN month_of_birth IS NULL "
                    f"THEN 2 ELSE 15 END)))) FROM {s}.person", index),
        }
        derived = {name: _per_person(conn, q, *params) for name, (q, *params) in queries.items()}
        label = {pid for (pid,) in _rows(conn, f"""
            SELECT person_id FROM {s}.condition_occurrence WHERE condition_concept_id IN {depression}
              AND condition_start_date > %s AND condition_start_date <= %s::date + 365
            UNION SELECT v.person_id FROM {s}.visit_occurrence v WHERE v.visit_concept_id = 9203
              AND v.visit_start_date > %s AND v.visit_start_date <= %s::date + 365 AND EXISTS (
              SELECT 1 FROM {s}.observation o WHERE o.visit_occurrence_id = v.visit_occurrence_id
              AND o.observation_concept_id IN {psychiatric})""", index, index, index, index)}
        for split in Split:
            csv = read_site_csv(study, site / f"{split.value}.csv")
            persons = [pid for pid, _ in _split_persons(conn, schema, split)]
            for row, (pid, y) in enumerate(zip(persons, csv.labels)):
                for name, values in derived.items():
                    expected = csv.features[row, col[name]]
                    got = values.get(pid, math.nan if name == "sex_female" else 0.0)
                    if math.isnan(expected):
                        assert math.isnan(got), (schema, split, row, name)
                    else:
                        assert got == pytest.approx(expected, abs=1e-9), (schema, split, row, name, got, expected)
                assert (pid in label) == bool(y), (schema, split, row, "label")
                checked += 1
    assert checked > 300


def test_the_cdm_looks_like_an_etl_output(cdm):
    conn = cdm["conn"]
    schema = "site_2"
    tables = {"visit_occurrence": ("visit_concept_id", "visit_type_concept_id"),
              "condition_occurrence": ("condition_concept_id", "condition_type_concept_id"),
              "drug_exposure": ("drug_concept_id", "drug_type_concept_id"),
              "measurement": ("measurement_concept_id", "measurement_type_concept_id"),
              "observation": ("observation_concept_id", "observation_type_concept_id")}
    for table, (concept, kind) in tables.items():
        unknown = _rows(conn, f"SELECT count(*) FROM {schema}.{table} t WHERE NOT EXISTS (SELECT 1 FROM vocab.concept c "
                              f"WHERE c.concept_id = t.{concept}) OR NOT EXISTS (SELECT 1 FROM vocab.concept c "
                              f"WHERE c.concept_id = t.{kind} AND c.vocabulary_id = 'Type Concept')")[0][0]
        assert unknown == 0, table
        assert _rows(conn, f"SELECT count(*) FROM {schema}.{table}")[0][0] > 0, table
    # units are UCUM concepts; several units per measured quantity (the renderer varies them)
    units = {code for (code,) in _rows(conn, f"SELECT DISTINCT c.concept_code FROM {schema}.measurement m "
                                             "JOIN vocab.concept c ON c.concept_id = m.unit_concept_id")}
    assert {"kg", "[lb_av]", "cm", "[in_i]", "h", "min", "{score}", "{beats}/min", "{steps}/d"} <= units
    # visit reasons are observations of their visit, never conditions; conditions carry no visit
    orphans = _rows(conn, f"SELECT count(*) FROM {schema}.observation o WHERE o.visit_occurrence_id IS NOT NULL AND "
                          f"NOT EXISTS (SELECT 1 FROM {schema}.visit_occurrence v WHERE v.visit_occurrence_id = "
                          "o.visit_occurrence_id AND v.person_id = o.person_id AND v.visit_start_date = o.observation_date)")
    assert orphans == [(0,)]
    assert _rows(conn, f"SELECT count(*) FROM {schema}.observation WHERE visit_occurrence_id IS NOT NULL")[0][0] > 0
    assert _rows(conn, f"SELECT count(*) FROM {schema}.condition_occurrence WHERE visit_occurrence_id IS NOT NULL") == [(0,)]
    # supply: end date = start + days_supply - 1
    assert _rows(conn, f"SELECT count(*) FROM {schema}.drug_exposure WHERE drug_exposure_end_date <> "
                       "drug_exposure_start_date + days_supply - 1 OR days_supply < 1") == [(0,)]
    # one observation period per person, covering every record of the person
    assert _rows(conn, f"SELECT count(*), count(DISTINCT person_id) FROM {schema}.observation_period")[0] == \
        _rows(conn, f"SELECT count(*), count(*) FROM {schema}.person")[0]
    outside = _rows(conn, f"""SELECT count(*) FROM {schema}.measurement m JOIN {schema}.observation_period p USING (person_id)
        WHERE m.measurement_date NOT BETWEEN p.observation_period_start_date AND p.observation_period_end_date""")
    assert outside == [(0,)]
    indexes = {name for (name,) in _rows(conn, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", schema)}
    assert {"idx_measurement_person_id_1", "idx_measurement_concept_id_1", "idx_condition_concept_id_1",
            "idx_visit_person_id_1", "idx_drug_concept_id_1", "idx_observation_visit_id_1", "xpk_person"} <= indexes
    vocab_indexes = {name for (name,) in _rows(conn, "SELECT indexname FROM pg_indexes WHERE schemaname = 'vocab'")}
    assert {"idx_concept_code", "idx_concept_ancestor_id_1", "idx_concept_ancestor_id_2"} <= vocab_indexes
    skipped = cdm["summaries"][cdm["sites"][schema].name]["skipped"]
    assert skipped.get("Observation: status entered-in-error", 0) > 0
    assert skipped.get("Condition: verificationStatus refuted", 0) > 0


def test_a_schema_is_written_once(study, cdm):
    from simulations.omop_cdm import write_omop_site

    conn = cdm["conn"]
    with pytest.raises(psycopg.errors.DuplicateTable):
        write_omop_site(study, cdm["sites"]["site_1"], conn, cdm_schema="site_1", vocabulary_schema="vocab")
    conn.rollback()
    assert _rows(conn, "SELECT count(*) FROM site_1.person")[0][0] > 0


def test_database_toml_names_the_cdm_without_a_secret(cdm, tmp_path):
    from simulations.omop_cdm import write_database_toml

    password = tmp_path / "reader.pass"
    password.write_text("reader-secret\n")
    os.chmod(password, 0o600)
    path = write_database_toml(tmp_path, host="127.0.0.1", port=cdm["cluster"].port, dbname="synthetic",
                               user="reader", password_file=password, cdm_schema="site_1",
                               vocabulary_schema="vocab", test_fraction=0.2)
    assert path == tmp_path / "database.toml"
    text = path.read_text()
    assert "reader-secret" not in text and 'kind = "omop"' in text
    source = load_database_source(tmp_path)
    assert (source.kind.value, source.host, source.port, source.dbname, source.user) == \
        ("omop", "127.0.0.1", cdm["cluster"].port, "synthetic", "reader")
    assert (source.cdm_schema, source.vocabulary_schema, source.test_fraction) == ("site_1", "vocab", 0.2)
    assert source.password_file == password and source.sslmode == "prefer"


def test_person_ids_follow_assign_split():
    from simulations.omop_cdm import person_ids

    ids = person_ids("test", 0.2)
    first = [next(ids) for _ in range(50)]
    assert first == sorted(first) and all(assign_split(i, 0.2) is Split.TEST for i in first)
    train = person_ids("train", 0.2)
    assert not set(first) & {next(train) for _ in range(200)}
    with pytest.raises(ValueError):
        next(person_ids("train", 0.0))
    assert np.isclose(len(first) / first[-1], 0.2, atol=0.1)


def test_the_vocabulary_may_live_in_the_cdm_schema(study, cdm):
    from simulations.omop_cdm import write_omop_site

    conn = cdm["conn"]
    summary = write_omop_site(study, cdm["sites"]["site_1"], conn, cdm_schema="single")
    assert summary["vocabulary"]["concept"] == _rows(conn, "SELECT count(*) FROM single.concept")[0][0] > 100
    assert summary["tables"] == cdm["summaries"][cdm["sites"]["site_1"].name]["tables"]
    assert _rows(conn, "SELECT count(*) FROM single.person p JOIN site_1.person q USING (person_id, person_source_value)")[0][0] \
        == summary["tables"]["person"]
