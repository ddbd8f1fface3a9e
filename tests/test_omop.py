"""Sites read live from PostgreSQL (issue 17), against a real server: a throwaway cluster
(`tests/postgres.py`: initdb/pg_ctl on a free loopback port) with OMOP CDM schemas.

What matters here: the study's [omop] rules derive what docs/OMOP.md says (concept prefixes and
descendants, standard or source concepts, windows, units, ties, visit reasons, supply), bad records
are quarantined and named, a role that can write is refused with the reason, a connection dropped
mid-read is reported and nothing read is used, and a site's own query reads like a CSV.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client.database import DatabaseSourceError, Split, assign_split, load_database_source
from client.database_site import read_database_site
from fedcare.study import load_study

from .postgres import postgres_cluster  # noqa: F401 - the session-scoped cluster fixture (one per xdist worker)

ROOT = Path(__file__).resolve().parents[1]
OMOP_STUDY = ROOT / "studies" / "depression-risk-omop.toml"
INDEX = datetime.date(2025, 7, 1)
TODAY = datetime.date(2025, 12, 31)  # records after it are "in the future"


def _ids(split: Split, count: int, start: int = 1) -> list[int]:
    out, i = [], start
    while len(out) < count:
        if assign_split(i, 0.2) is split:
            out.append(i)
        i += 1
    return out


def _day(days_before: int) -> str:
    return (INDEX - datetime.timedelta(days=days_before)).isoformat()


@pytest.fixture(scope="module")
def cdm(postgres_cluster, tmp_path_factory):  # noqa: F811
    """Database `cdm`: schemas cdm and vocab (the synthetic vocabulary), a reader role (SELECT only) and
    a writer role (INSERT on one table); returns a function making a database.toml for a role."""
    import psycopg

    from simulations.omop_cdm import create_cdm_schema, create_vocabulary_schema, write_vocabulary

    cluster = postgres_cluster
    cluster.create_database("cdm")
    root = tmp_path_factory.mktemp("omop")
    for role in ("reader", "writer"):
        cluster.create_role(role, f"{role}-pw")
        (root / f"{role}.pass").write_text(f"{role}-pw\n")
        os.chmod(root / f"{role}.pass", 0o600)
    with psycopg.connect(cluster.superuser_conninfo(dbname="cdm"), autocommit=True) as conn:
        create_cdm_schema(conn, "cdm")
        create_vocabulary_schema(conn, "vocab")
        write_vocabulary(conn, "vocab")
        for role in ("reader", "writer"):
            conn.execute(f"GRANT USAGE ON SCHEMA cdm, vocab TO {role}")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA cdm, vocab TO {role}")
        conn.execute("GRANT INSERT ON cdm.measurement TO writer")

    def source(role: str = "reader", **extra: str) -> Path:
        folder = root / f"site-{role}-{len(list(root.iterdir()))}"
        folder.mkdir()
        lines = ["[database]", 'kind = "omop"', 'host = "127.0.0.1"', f"port = {cluster.port}", 'dbname = "cdm"',
                 f'user = "{role}"', f'password_file = "{root / (role + ".pass")}"', 'cdm_schema = "cdm"',
                 'vocabulary_schema = "vocab"', *(f"{k} = {v}" for k, v in extra.items())]
        (folder / "database.toml").write_text("\n".join(lines) + "\n")
        return folder

    source.cluster = cluster  # type: ignore[attr-defined]
    return source


def _concept(conn, vocabulary: str, code: str) -> int:
    row = conn.execute("SELECT concept_id FROM vocab.concept WHERE vocabulary_id = %s AND concept_code = %s",
                       (vocabulary, code)).fetchone()
    assert row is not None, f"{vocabulary}|{code} is not in the synthetic vocabulary"
    return row[0]


def test_rules_derive_what_docs_omop_says(cdm):
    """A hand-made CDM where each person exercises one rule, read with the OMOP study."""
    import psycopg

    study = load_study(OMOP_STUDY)
    train, test = _ids(Split.TRAIN, 8, start=7_000_001), _ids(Split.TEST, 3, start=7_000_001)
    a, b, c, d, e, f, g, h = train
    with psycopg.connect(cdm.cluster.superuser_conninfo(dbname="cdm"), autocommit=True) as conn:
        phq = _concept(conn, "LOINC", "44261-6")
        sleep = _concept(conn, "LOINC", "93832-4")
        weight, height = _concept(conn, "LOINC", "29463-7"), _concept(conn, "LOINC", "8302-2")
        score, minutes = _concept(conn, "UCUM", "{score}"), _concept(conn, "UCUM", "min")
        pounds, inches = _concept(conn, "UCUM", "[lb_av]"), _concept(conn, "UCUM", "[in_i]")
        f321, f411, f430 = (_concept(conn, "ICD10CM", code) for code in ("F32.1", "F41.1", "F43.0"))
        sertraline = _concept(conn, "RxNorm", "36437")
        metformin = _concept(conn, "RxNorm", "6809")
        inpatient, emergency = 9201, 9203
        conn.execute("DELETE FROM cdm.person")
        for table in ("measurement", "observation", "condition_occurrence", "drug_exposure", "visit_occurrence"):
            conn.execute(f"DELETE FROM cdm.{table}")
        for pid in [*train, *test]:
            conn.execute("INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, month_of_birth, "
                         "day_of_birth, race_concept_id, ethnicity_concept_id) VALUES (%s, %s, 1980, 7, 1, 0, 0)",
                         (pid, 8532 if pid != b else 0))
        m = "INSERT INTO cdm.measurement (measurement_id, person_id, measurement_concept_id, measurement_date, " \
            "measurement_type_concept_id, value_as_number, unit_concept_id, measurement_source_concept_id) " \
            "VALUES (%s, %s, %s, %s, 0, %s, %s, %s)"
        # a: three PHQ-9 in the year (the latest of two on one day: the higher id), one outside the window
        conn.execute(m, (1, a, phq, _day(200), 8, score, 0))
        conn.execute(m, (3, a, phq, _day(10), 14, score, 0))
        conn.execute(m, (2, a, phq, _day(10), 12, score, 0))
        conn.execute(m, (4, a, phq, _day(400), 20, score, 0))
        # b: sleep in minutes (converted to hours); a PHQ-9 by its source concept only; no value: quarantined
        conn.execute(m, (5, b, sleep, _day(3), 420, minutes, 0))
        conn.execute(m, (6, b, sleep, _day(5), 480, minutes, 0))
        conn.execute(m, (7, b, 0, _day(20), 9, score, phq))
        conn.execute(m, (8, b, phq, _day(30), None, score, 0))
        # c: weight in pounds, height in inches (bmi); a reading dated after "today" is quarantined
        conn.execute(m, (9, c, weight, _day(40), 154.0, pounds, 0))
        conn.execute(m, (10, c, height, _day(40), 70.0, inches, 0))
        conn.execute(m, (11, c, phq, _day(-400), 5, score, 0))  # in no window: not read at all
        conn.execute(m, (12, c, sleep, _day(2), 7.5, _concept(conn, "UCUM", "kg"), 0))  # a unit that does not convert
        co = "INSERT INTO cdm.condition_occurrence (condition_occurrence_id, person_id, condition_concept_id, " \
             "condition_start_date, condition_type_concept_id, condition_source_concept_id, visit_occurrence_id) " \
             "VALUES (%s, %s, %s, %s, 0, %s, %s)"
        # d: F32.1 twice on one day and once later (2 distinct days), F43.0 (no rule), F41.1 long ago (any)
        conn.execute(co, (1, d, f321, _day(100), f321, None))
        conn.execute(co, (2, d, f321, _day(100), f321, None))
        conn.execute(co, (3, d, 0, _day(50), f321, None))  # standard concept 0: matched by its source concept
        conn.execute(co, (4, d, f430, _day(20), f430, None))
        conn.execute(co, (5, d, f411, _day(5000), f411, None))
        conn.execute(co, (6, d, f321, _day(-30), f321, None))  # after the index date: the label
        v = "INSERT INTO cdm.visit_occurrence (visit_occurrence_id, person_id, visit_concept_id, visit_start_date, " \
            "visit_end_date, visit_type_concept_id, visit_source_concept_id) VALUES (%s, %s, %s, %s, %s, 0, 0)"
        o = "INSERT INTO cdm.observation (observation_id, person_id, observation_concept_id, observation_date, " \
            "observation_type_concept_id, observation_source_concept_id, visit_occurrence_id) VALUES (%s, %s, %s, %s, 0, 0, %s)"
        # e: two admissions, one for a psychiatric reason (an observation of the visit), one not; an ED visit
        conn.execute(v, (1, e, inpatient, _day(60), _day(50), ))
        conn.execute(o, (1, e, f430, _day(60), 1))
        conn.execute(v, (2, e, inpatient, _day(30), _day(25)))
        conn.execute(v, (3, e, emergency, _day(10), _day(10)))
        # f: an ED visit after the index date for F41.1 (the label's second rule)
        conn.execute(v, (4, f, emergency, _day(-100), _day(-100)))
        conn.execute(co, (7, f, f411, _day(-100), f411, 4))
        dx = "INSERT INTO cdm.drug_exposure (drug_exposure_id, person_id, drug_concept_id, drug_exposure_start_date, " \
             "drug_exposure_end_date, days_supply, drug_type_concept_id, drug_source_concept_id) " \
             "VALUES (%s, %s, %s, %s, %s, %s, 0, 0)"
        # g: sertraline (an ATC N06A descendant) for 30 days, then 45 days overlapping it
        conn.execute(dx, (1, g, sertraline, _day(100), _day(71), None))
        conn.execute(dx, (2, g, sertraline, _day(80), _day(36), 45))
        conn.execute(dx, (3, g, metformin, _day(60), _day(1), None))
        conn.execute(dx, (4, g, sertraline, _day(20), _day(30), None))  # ends before it starts: quarantined
        conn.execute(dx, (5, g, sertraline, _day(10), "infinity", None))  # never ends: quarantined
        # h: a depressive episode dated after "today" (quarantined); records of a person not in `person`
        conn.execute(co, (8, h, f321, _day(-300), f321, None))
        conn.execute(m, (13, 999_999, phq, _day(5), 3, score, 0))
    tables = read_database_site(study, cdm(), today=TODAY)
    names = [feat.name for feat in study.features]
    table = tables[Split.TRAIN]
    rows = {pid: dict(zip(names, table.features[i])) for i, pid in enumerate(sorted(train))}
    labels = dict(zip(sorted(train), table.labels))
    assert table.features.shape == (8, len(names)) and tables[Split.TEST].features.shape[0] == 3
    assert rows[a]["age"] == 45 and rows[a]["sex_female"] == 1 and math.isnan(rows[b]["sex_female"])
    assert rows[a]["phq9_latest"] == 14 and rows[a]["phq9_count_12m"] == 3
    assert math.isnan(rows[a]["phq9_slope_90d"])  # two readings in 90 days, but on one day: no slope
    assert rows[b]["sleep_hours"] == pytest.approx(7.5) and rows[b]["phq9_latest"] == 9
    assert rows[b]["phq9_count_12m"] == 1  # the reading without a value is quarantined, not counted
    assert rows[c]["bmi"] == pytest.approx((154.0 * 0.45359237) / (70 * 0.0254) ** 2)
    assert math.isnan(rows[c]["sleep_hours"])
    assert rows[d]["prior_depressive_episodes"] == 2 and rows[d]["dx_anxiety"] == 1 and labels[d] == 1
    assert rows[e]["psych_admissions_12m"] == 1 and rows[e]["ed_visits_12m"] == 1 and labels[e] == 0
    assert labels[f] == 1 and labels[a] == 0
    assert rows[g]["antidepressant_pdc"] == pytest.approx(65 / 180)  # days 100..36 before the index date
    report = table.report
    assert report.quarantined == {"measurement: no value_as_number": 1, "measurement: unit mismatch": 1,
                                  "drug_exposure: supply ends before it starts": 1,
                                  "condition_occurrence: date in the future": 1, "drug_exposure: date not finite": 1}
    assert labels[h] == 0
    assert report.examples["measurement: no value_as_number"] == ["measurement_id 8"]
    assert report.unknown_person["measurement"] == 1
    assert report.conversions["min→h"] == 2 and report.conversions["[lb_av]→kg"] == 1
    text = report.summary()
    assert not any(str(pid) in text for pid in [*train, *test])  # record ids only, never a person id


def test_a_role_that_can_write_is_refused_with_the_reason(cdm):
    study = load_study(OMOP_STUDY)
    with pytest.raises(DatabaseSourceError) as err:
        read_database_site(study, cdm("writer"))
    assert "refusing to read with a role that can write: role writer has INSERT on cdm.measurement" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "cli", "data", "check", "--study", str(OMOP_STUDY),
                           "--data", str(cdm("writer"))], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "role writer has INSERT on cdm.measurement" in proc.stderr
    assert "writer-pw" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("grant, reason", [
    ("GRANT writer TO {role}", "role {role} can SET ROLE writer, which has INSERT on cdm.measurement"),
    ("GRANT pg_execute_server_program TO {role}",
     "role {role} is a member of pg_execute_server_program (it can write on the database server)"),
    ("CREATE FUNCTION cdm.wipe_{role}() RETURNS void LANGUAGE sql SECURITY DEFINER AS 'DELETE FROM cdm.measurement'",
     "role {role} may EXECUTE the SECURITY DEFINER function cdm.wipe_{role}"),
])
def test_a_role_that_can_become_a_writer_is_refused(cdm, grant, reason):
    """NOINHERIT hides a writer role's privileges from has_table_privilege, but SET ROLE still reaches them."""
    import psycopg

    role = f"sneaky_{abs(hash(grant)) % 10_000}"
    cdm.cluster.create_role(role, f"{role}-pw")
    with psycopg.connect(cdm.cluster.superuser_conninfo(dbname="cdm"), autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} NOINHERIT")
        conn.execute(f"GRANT USAGE ON SCHEMA cdm, vocab TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA cdm, vocab TO {role}")
        conn.execute(grant.format(role=role))
    folder = cdm("reader")
    (folder / "reader.pass").write_text(f"{role}-pw\n")
    os.chmod(folder / "reader.pass", 0o600)
    text = (folder / "database.toml").read_text()
    text = text.replace('user = "reader"', f'user = "{role}"')
    text = "\n".join(f'password_file = "{folder / "reader.pass"}"' if line.startswith("password_file") else line
                      for line in text.splitlines()) + "\n"
    (folder / "database.toml").write_text(text)
    with pytest.raises(DatabaseSourceError) as err:
        read_database_site(load_study(OMOP_STUDY), folder)
    assert reason.format(role=role) in str(err.value)
    with psycopg.connect(cdm.cluster.superuser_conninfo(dbname="cdm"), autocommit=True) as conn:
        conn.execute(f"DROP FUNCTION IF EXISTS cdm.wipe_{role}()")


def test_a_dropped_connection_mid_read_uses_nothing(cdm):
    """The reader streams 200k measurements 500 at a time; the server ends its session in the middle."""
    import psycopg

    from client.omop import read_omop_site

    study = load_study(OMOP_STUDY)
    people = _ids(Split.TRAIN, 40) + _ids(Split.TEST, 10)
    admin = cdm.cluster.superuser_conninfo(dbname="cdm")
    with psycopg.connect(admin, autocommit=True) as conn:
        phq, score = _concept(conn, "LOINC", "44261-6"), _concept(conn, "UCUM", "{score}")
        conn.execute("DELETE FROM cdm.measurement")
        conn.execute("DELETE FROM cdm.person")
        for pid in people:
            conn.execute("INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, "
                         "ethnicity_concept_id) VALUES (%s, 8507, 1970, 0, 0)", (pid,))
        conn.execute("INSERT INTO cdm.measurement (measurement_id, person_id, measurement_concept_id, measurement_date, "
                     "measurement_type_concept_id, value_as_number, unit_concept_id, measurement_source_concept_id) "
                     "SELECT g, (%s::bigint[])[1 + g %% %s], %s, DATE '2025-06-30' - (g %% 300), 0, g %% 27, %s, 0 "
                     "FROM generate_series(1, 200000) g", (people, len(people), phq, score))
    site = load_database_source(cdm())
    result: dict[str, object] = {}

    def read() -> None:
        try:
            result["tables"] = read_omop_site(study, site, today=TODAY, fetch_rows=500)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            result["error"] = err

    reader = threading.Thread(target=read)
    reader.start()
    terminated = False
    with psycopg.connect(admin, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while reader.is_alive() and time.monotonic() < deadline and not terminated:
            row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'fedcare-site' "
                               "AND query LIKE 'FETCH%%fedcare_measurement%%'").fetchone()
            if row is not None:
                terminated = conn.execute("SELECT pg_terminate_backend(%s)", (row[0],)).fetchone()[0]
            time.sleep(0.005)
    reader.join(60)
    assert terminated, "the reader finished before its session could be ended; the test did not run"
    assert "tables" not in result
    error = result["error"]
    assert isinstance(error, DatabaseSourceError)
    assert "was lost while reading cdm.measurement" in str(error) and "Nothing read from it is used" in str(error)


def test_a_sites_own_query_reads_like_a_csv(cdm, tmp_path):
    import psycopg

    study = load_study(ROOT / "studies" / "depression-risk.toml")
    names = [feat.name for feat in study.features]
    admin = cdm.cluster.superuser_conninfo(dbname="cdm")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS research CASCADE")
        conn.execute("CREATE SCHEMA research")
        columns = ", ".join(f"{n} double precision" for n in names)
        conn.execute(f"CREATE TABLE research.cohort (patient_id text, {columns}, episode_12m numeric, note text)")
        for i in range(60):
            values = []
            for feat in study.features:  # a value inside each feature's range, varying by row
                value = min(max(feat.center + (i % 5 - 2) * feat.scale / 4, feat.low), feat.high)
                values.append(float(round(value)) if feat.type in ("count", "binary") else value)
            if i == 7:
                values[0] = 300.0  # out of range: quarantined like a CSV cell
            if i == 9:
                values[names.index("phq9_latest")] = None  # NULL: missing (its policy: indicator)
            conn.execute(f"INSERT INTO research.cohort VALUES (%s, {', '.join(['%s'] * len(names))}, %s, 'x')",
                         (f"mrn-{i}", *values, int(i % 3 == 0)))
        conn.execute("GRANT USAGE ON SCHEMA research TO reader")
        conn.execute("GRANT SELECT ON research.cohort TO reader")
    folder = cdm("reader")
    text = (folder / "database.toml").read_text().replace('kind = "omop"', 'kind = "sql"')
    (folder / "database.toml").write_text(text + 'query = "SELECT * FROM research.cohort"\n')
    tables = read_database_site(study, folder)
    train, test = tables[Split.TRAIN], tables[Split.TEST]
    expected_test = sum(assign_split(f"mrn-{i}", 0.2) is Split.TEST for i in range(60))
    assert train.features.shape[0] + test.features.shape[0] == 59 and test.report.rows_read == expected_test
    reports = train.report, test.report
    assert sum(r.quarantined.get("age: outside valid range [18, 100] years", 0) for r in reports) == 1, reports[0].quarantined
    assert sum(r.missing_by_feature["phq9_latest"] for r in reports) == 1
    assert "note" in train.report.ignored_columns and "patient_id" not in train.report.ignored_columns


@pytest.fixture(scope="module")
def synthetic_sites(postgres_cluster, tmp_path_factory):  # noqa: F811
    """Three synthetic hospitals as CSV, FHIR and OMOP (schemas site_1..3 of database `network`, one
    vocabulary schema), each site folder's database.toml naming its schema for a read-only role."""
    import psycopg

    from simulations.cohorts import write_cohorts
    from simulations.omop_cdm import write_database_toml, write_omop_site

    cluster = postgres_cluster
    study = load_study(OMOP_STUDY)
    root = tmp_path_factory.mktemp("network")
    files, databases = root / "files", root / "databases"
    write_cohorts(study, files, hospitals=3, seed=5, size_scale=0.1)
    cluster.create_database("network")
    cluster.create_role("site_reader", "site-reader-pw")
    secret = root / "reader.pass"
    secret.write_text("site-reader-pw\n")
    os.chmod(secret, 0o600)
    sites = sorted(p for p in files.iterdir() if p.is_dir())
    with psycopg.connect(cluster.superuser_conninfo(dbname="network")) as conn:
        for n, site in enumerate(sites, start=1):
            write_omop_site(study, site, conn, cdm_schema=f"site_{n}", vocabulary_schema="vocab")
            conn.commit()
            folder = databases / site.name
            folder.mkdir(parents=True)
            write_database_toml(folder, host="127.0.0.1", port=cluster.port, dbname="network", user="site_reader",
                                password_file=secret, cdm_schema=f"site_{n}", vocabulary_schema="vocab")
        schemas = ", ".join(["vocab", *(f"site_{n}" for n in range(1, len(sites) + 1))])
        conn.execute(f"GRANT USAGE ON SCHEMA {schemas} TO site_reader")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schemas} TO site_reader")
        conn.commit()
    return study, sites, sorted(p for p in databases.iterdir())


def test_csv_fhir_and_omop_renderings_yield_the_same_table(synthetic_sites):
    from client.data import read_site_csv
    from client.fhir import read_site_fhir

    study, sites, databases = synthetic_sites
    names = [feat.name for feat in study.features]
    export_date = study.mapping.index_date + datetime.timedelta(days=study.mapping.label.window_days_after)
    checked = 0
    for site, database in zip(sites, databases):
        tables = read_database_site(study, database, today=export_date)
        for split in Split:
            csv = read_site_csv(study, site / f"{split.value}.csv")
            fhir = read_site_fhir(study, study.mapping, site / split.value, today=export_date)
            omop = tables[split]
            assert not omop.report.quarantined and not omop.report.unit_mismatches, omop.report.summary()
            assert omop.features.shape == csv.features.shape == fhir.features.shape
            for other, label in ((csv, "csv"), (fhir, "fhir")):
                a, b = other.features, omop.features
                nan_differs = {names[j]: int((np.isnan(a[:, j]) != np.isnan(b[:, j])).sum())
                               for j in range(a.shape[1]) if (np.isnan(a[:, j]) != np.isnan(b[:, j])).any()}
                assert not nan_differs, f"{site.name}/{split.value} vs {label}: missing cells differ {nan_differs}"
                diff = np.where(np.isnan(a), 0.0, np.abs(a - np.nan_to_num(b)))
                worst = {names[j]: float(diff[:, j].max()) for j in range(a.shape[1]) if diff[:, j].max() > 1e-6}
                assert not worst, f"{site.name}/{split.value} vs {label}: features differ {worst}"
                assert np.array_equal(other.labels, omop.labels), f"{site.name}/{split.value} vs {label}: labels differ"
            checked += len(csv.labels)
    assert checked > 500


def test_data_check_against_the_database_reports_concepts_and_counts_only(synthetic_sites):
    study, _, databases = synthetic_sites
    proc = subprocess.run([sys.executable, "-m", "cli", "data", "check", "--study", str(OMOP_STUDY),
                           "--data", str(databases[0])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "read-only role site_reader checked" in out and "[train] omop" in out and "[test] omop" in out
    assert "antidepressant_pdc: " in out and "ATC|N06A 1+" in out and "descendants" in out
    assert "records read (both splits): condition_occurrence" in out and "missing values by feature:" in out
    assert "site-reader-pw" not in out + proc.stderr


def test_a_simulated_study_whose_sites_are_three_schemas(synthetic_sites, tmp_path):
    """`fedcare simulate --sites` over three database sites: the same ServerApp/ClientApp, DP + SecAgg+."""
    import json

    study, _, databases = synthetic_sites
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cli", "simulate", "--sites", str(databases[0].parent),
                           "--study", str(OMOP_STUDY), "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["aggregated"], r["sites_aggregated"]) for r in report["rounds"]] == [(1, True, 3)]
    assert sorted(s["name"] for s in report["sites"]) == sorted(d.name for d in databases)
    assert all(s["rounds_trained"] == 1 and 0 < s["epsilon"] for s in report["sites"])
    assert (out / "checkpoints" / "round-001.npz").exists()


def test_the_omop_example_writes_a_network_that_data_check_reads(postgres_cluster, tmp_path):  # noqa: F811
    cluster = postgres_cluster
    cluster.create_database("example")
    cluster.create_role("example_reader", "example-reader-pw")
    admin_pass, reader_pass = tmp_path / "admin.pass", tmp_path / "reader.pass"
    admin_pass.write_text(cluster.password + "\n")
    reader_pass.write_text("example-reader-pw\n")
    os.chmod(admin_pass, 0o600)
    os.chmod(reader_pass, 0o600)
    base = f"127.0.0.1:{cluster.port}/example"
    out = tmp_path / "network"
    proc = subprocess.run([sys.executable, "-m", "cli", "example", "omop", "--out", str(out), "--hospitals", "2",
                           "--size-scale", "0.1",
                           "--database", f"postgresql://{cluster.superuser}@{base}?password_file={admin_pass}",
                           "--reader", f"postgresql://example_reader@{base}?password_file={reader_pass}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "schema site_01" in proc.stdout and "run it: fedcare simulate --sites" in proc.stdout
    folders = sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [sorted(f.name for f in folder.iterdir()) for folder in folders] == [["database.toml"]] * 2
    assert cluster.password not in "".join((f / "database.toml").read_text() for f in folders)
    check = subprocess.run([sys.executable, "-m", "cli", "data", "check", "--study", str(OMOP_STUDY),
                            "--data", str(folders[1])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "read-only role example_reader checked" in check.stdout, check.stderr


def test_a_wrong_schema_or_a_missing_grant_is_one_line_naming_it(cdm):
    import psycopg

    study = load_study(OMOP_STUDY)
    folder = cdm()
    toml = folder / "database.toml"
    text = toml.read_text()
    toml.write_text(text.replace('vocabulary_schema = "vocab"', 'vocabulary_schema = "vocabx"'))
    with pytest.raises(DatabaseSourceError) as err:
        read_database_site(study, folder)
    assert str(err.value) == (f"{toml}: schema vocabx: missing in database cdm "
                              "(are cdm_schema and vocabulary_schema right?)")
    with psycopg.connect(cdm.cluster.superuser_conninfo(dbname="cdm"), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS hidden")
    toml.write_text(text.replace('vocabulary_schema = "vocab"', 'vocabulary_schema = "hidden"'))
    with pytest.raises(DatabaseSourceError) as err:
        read_database_site(study, folder)
    assert str(err.value) == (f"{toml}: schema hidden: the role reader has no USAGE on it "
                              "(GRANT USAGE ON SCHEMA hidden TO reader)")
