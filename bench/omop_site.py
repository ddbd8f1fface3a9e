"""The synthetic CDM site of bench/omop_ingest.py, generated server-side (`INSERT ... SELECT` over
`generate_series`, no Python per row) into the `simulations/omop_cdm.py` DDL and vocabulary: the
cluster, the database, the read-only role, and the rows (see bench/omop_ingest.py for the mix)."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DBNAME = "cdm_bench"
CDM, VOCAB = "cdm", "vocab"
READER = "fedcare_bench_reader"

# The measurement mix per patient (expected rows) that does not depend on the wearable share.
PHQ9_N, GAD7_N, WEIGHT_N, HEIGHT_N, OTHER_N = 12 * 0.75, 6 * 0.75, 5 * 0.5, 3 * 0.5, 8
WEARABLE_DAYS, WEARABLE_KEEP = 70, 0.9


# --- the CDM site (parent process) -----------------------------------------------------------------


def _z() -> str:
    """An approximately standard normal draw (Irwin-Hall of 4), per row."""
    return "((random() + random() + random() + random() - 2.0) * 1.7320508)"


def _pick(ids: list[int]) -> str:
    if not ids:
        raise RuntimeError("a concept group of the synthetic site is empty")
    return f"(ARRAY[{', '.join(str(i) for i in ids)}]::int[])[1 + floor(random() * {len(ids)})::int]"


STUDY_LOINC = {"phq9": "44261-6", "gad7": "70274-6", "sleep": "93832-4", "steps": "41950-7", "hr": "40443-4",
               "hrv": "80404-7", "weight": "29463-7", "height": "8302-2"}
ANTIDEPRESSANTS = ("36437", "4493", "321988", "2556", "42347", "39786", "15996", "72625")  # RxNorm ingredients


def site_concepts(cur) -> dict:
    """The vocabulary's concept ids the site's rows use: the study's, and others no rule reads (the
    vocabulary's other LOINC codes, ICD10CM codes and RxNorm ingredients) so the queries filter."""
    from fedcare.omop import normalize_code

    cur.execute(f"SELECT concept_id, vocabulary_id, concept_code FROM {VOCAB}.concept ORDER BY concept_id")
    by_code: dict[tuple[str, str], int] = {}
    icd: dict[str, list[int]] = {"dep": [], "anx": [], "sub": [], "pain": [], "f_other": [], "z": [], "other": []}
    other_loinc, other_drugs = [], []
    for concept_id, vocabulary, code in cur.fetchall():
        by_code.setdefault((vocabulary, code), concept_id)
        if vocabulary == "ICD10CM":
            c = normalize_code(code)
            group = ("dep" if c[:3] in ("F32", "F33") else "anx" if c[:3] == "F41"
                     else "sub" if c[:2] == "F1" and len(c) >= 3 and c[2].isdigit() else
                     "pain" if c[:4] in ("G892", "G894") else "f_other" if c[:1] == "F" else
                     "z" if c[:1] == "Z" else "other")
            icd[group].append(concept_id)
        elif vocabulary == "LOINC" and code not in STUDY_LOINC.values():
            other_loinc.append(concept_id)
        elif vocabulary == "RxNorm" and code not in ANTIDEPRESSANTS:
            other_drugs.append(concept_id)

    def need(vocabulary: str, code: str) -> int:
        if (vocabulary, code) not in by_code:
            raise RuntimeError(f"the vocabulary has no {vocabulary}|{code}")
        return by_code[(vocabulary, code)]

    def unit(code: str) -> tuple[int, str]:
        """(unit_concept_id, unit_source_value): 0 and the code when the vocabulary lacks it."""
        return (by_code[("UCUM", code)], code) if ("UCUM", code) in by_code else (0, code)

    units = {code: unit(code) for code in ("{score}", "1", "h", "min", "{steps}/d", "/d", "/min", "{beats}/min",
                                           "ms", "s", "kg", "[lb_av]", "cm", "[in_i]", "m", "mm[Hg]")}
    types = {name: by_code.get(("Type Concept", name), 0) for name in ("EHR", "Survey", "Patient self-report",
                                                                         "EHR prescription", "EHR encounter record")}
    return {"loinc": {name: need("LOINC", code) for name, code in STUDY_LOINC.items()}, "other_loinc": other_loinc,
            "icd": icd, "antidepressants": [need("RxNorm", c) for c in ANTIDEPRESSANTS], "other_drugs": other_drugs,
            "visits": {name: need("Visit", name) for name in ("IP", "ER", "OP")}, "units": units, "types": types,
            "adi": need("fedcare", "area-deprivation-index")}


def _nullable(cur, table: str, column: str) -> bool:
    cur.execute("SELECT is_nullable = 'YES' FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s AND column_name = %s", (CDM, table, column))
    row = cur.fetchone()
    return bool(row and row[0])


def generate_site(conn, patients: int, per_patient: float, index: datetime.date, seed: int,
                  deferred: list[str]) -> dict:
    """Fill the (empty) CDM schema server-side, then run `deferred` (its indexes) and add the date
    indexes; returns the row counts and the seconds each step took."""
    cur = conn.cursor()
    c = site_concepts(cur)
    L, U, V, T = c["loinc"], c["units"], c["visits"], c["types"]
    idx = f"DATE '{index.isoformat()}'"
    fixed = PHQ9_N + GAD7_N + WEIGHT_N + HEIGHT_N + OTHER_N
    wear_share = min(1.0, max(0.0, (per_patient - fixed) / (4 * WEARABLE_DAYS * WEARABLE_KEEP)))
    timings: dict[str, float] = {}

    def step(name: str, *statements: str) -> None:
        t0 = time.perf_counter()
        for statement in statements:
            cur.execute(statement)
        conn.commit()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def u(code: str) -> str:
        return str(U[code][0])

    def ut(code: str) -> str:
        return "'" + U[code][1].replace("'", "''") + "'"

    cur.execute("SELECT setseed(%s)", (((seed * 7919) % 10007) / 10007.0,))
    for name in ("measurement", "observation", "condition", "drug", "visit"):
        cur.execute(f"CREATE TEMP SEQUENCE bench_{name}_id CACHE 10000")
    step("person", f"""
        INSERT INTO {CDM}.person (person_id, gender_concept_id, year_of_birth, month_of_birth, day_of_birth,
                                  race_concept_id, ethnicity_concept_id, person_source_value)
        SELECT g, CASE WHEN r < 0.52 THEN 8532 WHEN r < 0.995 THEN 8507 ELSE 0 END,
               CASE WHEN y < 0.002 THEN 2012 ELSE 1935 + floor(y * 72)::int END,
               CASE WHEN m < 0.05 THEN NULL ELSE 1 + floor(m * 12)::int % 12 END,
               CASE WHEN m < 0.05 OR d < 0.1 THEN NULL ELSE 1 + floor(d * 28)::int % 28 END,
               0, 0, 'P' || g
        FROM (SELECT g, random() r, random() y, random() m, random() d FROM generate_series(1, {patients}) g) s""")

    measurement = (f"INSERT INTO {CDM}.measurement (measurement_id, person_id, measurement_concept_id, "
                   "measurement_date, measurement_type_concept_id, value_as_number, unit_concept_id, "
                   "unit_source_value, measurement_source_concept_id, measurement_source_value) "
                   "SELECT nextval('bench_measurement_id'), p, concept, dt, type, value, unit, unit_text, 0, source "
                   "FROM ")
    scores = []
    for name, n, center, scale, top in (("phq9", 12, 8, 6, 27), ("gad7", 6, 6, 5, 21)):
        scores.append(measurement + f"""(
            SELECT p, {L[name]} concept, {idx} - k * {1095 // n} - floor(random() * {1095 // n // 2})::int + 45 AS dt,
                   {T['Survey']} type,
                   CASE WHEN r < 0.005 THEN NULL
                        ELSE least({top}, greatest(0, round({center} + (p % 7 - 3) * {scale / 4}
                                                            + {scale / 2} * {_z()}))) END value,
                   CASE WHEN r < 0.90 THEN {u('{score}')} WHEN r < 0.95 THEN {u('1')} ELSE 0 END unit,
                   CASE WHEN r < 0.90 THEN {ut('{score}')} WHEN r < 0.95 THEN {ut('1')} ELSE 'score' END unit_text,
                   '{name}' source
            FROM (SELECT p, k, random() r FROM generate_series(1, {patients}) p, generate_series(0, {n - 1}) k
                  WHERE random() < 0.75) s) t""")
    step("measurement: PHQ-9, GAD-7", *scores)
    step("measurement: weight, height", measurement + f"""(
            SELECT p, {L['weight']} concept, {idx} - floor(random() * 1400)::int + 10 AS dt, {T['EHR']} type,
                   CASE WHEN r < 0.9 THEN kg ELSE kg * 2.20462 END value,
                   CASE WHEN r < 0.9 THEN {u('kg')} ELSE {u('[lb_av]')} END unit,
                   CASE WHEN r < 0.9 THEN {ut('kg')} ELSE {ut('[lb_av]')} END unit_text, 'weight' source
            FROM (SELECT p, random() r, greatest(35, 80 + 15 * {_z()}) kg
                  FROM generate_series(1, {patients}) p, generate_series(1, 5) k WHERE random() < 0.5) s) t""",
         measurement + f"""(
            SELECT p, {L['height']} concept, {idx} - floor(random() * 1400)::int + 10 AS dt, {T['EHR']} type,
                   CASE WHEN r < 0.8 THEN cm WHEN r < 0.9 THEN cm / 2.54 ELSE cm / 100 END value,
                   CASE WHEN r < 0.8 THEN {u('cm')} WHEN r < 0.9 THEN {u('[in_i]')} ELSE {u('m')} END unit,
                   CASE WHEN r < 0.8 THEN {ut('cm')} WHEN r < 0.9 THEN {ut('[in_i]')} ELSE {ut('m')} END unit_text,
                   'height' source
            FROM (SELECT p, random() r, greatest(140, 170 + 10 * {_z()}) cm
                  FROM generate_series(1, {patients}) p, generate_series(1, 3) k WHERE random() < 0.5) s) t""")
    step("measurement: other labs", measurement + f"""(
            SELECT p, {_pick(c['other_loinc'])} concept, {idx} - floor(random() * 1095)::int + 30 AS dt,
                   {T['EHR']} type, round((50 + 80 * random())::numeric, 1)::float8 value, {u('mm[Hg]')} unit,
                   {ut('mm[Hg]')} unit_text, 'lab' source
            FROM generate_series(1, {patients}) p, generate_series(1, {int(OTHER_N)}) k) t""")
    # Wearables: kind 1 sleep, 2 steps, 3 resting HR, 4 HRV; a per-patient offset from its id.
    step("measurement: wearables",
         f"CREATE TEMP TABLE bench_wear AS SELECT p FROM generate_series(1, {patients}) p "
         f"WHERE random() < {wear_share}",
         measurement + f"""(
            SELECT p, CASE kind WHEN 1 THEN {L['sleep']} WHEN 2 THEN {L['steps']} WHEN 3 THEN {L['hr']}
                                ELSE {L['hrv']} END concept,
                   {idx} - 59 + d AS dt, {T['Patient self-report']} type,
                   CASE kind
                     WHEN 1 THEN CASE WHEN r < 0.15 THEN 60 * greatest(1, 7 + (p % 9 - 4) * 0.2 + 1.0 * z)
                                      ELSE greatest(1, 7 + (p % 9 - 4) * 0.2 + 1.0 * z) END
                     WHEN 2 THEN greatest(0, round(6500 + (p % 11 - 5) * 400 + 2500 * z))
                     WHEN 3 THEN greatest(35, round(70 + (p % 13 - 6) * 1.5 + 6 * z))
                     ELSE CASE WHEN r < 0.05 THEN greatest(3, 40 + (p % 7 - 3) * 5 + 12 * z) / 1000
                               ELSE greatest(3, 40 + (p % 7 - 3) * 5 + 12 * z) END END value,
                   CASE kind
                     WHEN 1 THEN CASE WHEN r < 0.15 THEN {u('min')} ELSE {u('h')} END
                     WHEN 2 THEN CASE WHEN r < 0.5 THEN {u('{steps}/d')} ELSE {u('/d')} END
                     WHEN 3 THEN CASE WHEN r < 0.5 THEN {u('/min')} ELSE {u('{beats}/min')} END
                     ELSE CASE WHEN r < 0.05 THEN {u('s')} ELSE {u('ms')} END END unit,
                   CASE kind
                     WHEN 1 THEN CASE WHEN r < 0.15 THEN {ut('min')} ELSE {ut('h')} END
                     WHEN 2 THEN CASE WHEN r < 0.5 THEN {ut('{steps}/d')} ELSE {ut('/d')} END
                     WHEN 3 THEN CASE WHEN r < 0.5 THEN {ut('/min')} ELSE {ut('{beats}/min')} END
                     ELSE CASE WHEN r < 0.05 THEN {ut('s')} ELSE {ut('ms')} END END unit_text,
                   'wearable' source
            FROM (SELECT w.p, d, kind, random() r, {_z()} z
                  FROM bench_wear w, generate_series(0, {WEARABLE_DAYS - 1}) d, (VALUES (1), (2), (3), (4)) k(kind)
                  WHERE random() < {WEARABLE_KEEP}) s) t""")

    icd = c["icd"]
    psych = icd["dep"] + icd["anx"] + icd["sub"] + icd["f_other"]
    non_psych = icd["pain"] + icd["other"]
    step("visit_occurrence", f"""
        INSERT INTO {CDM}.visit_occurrence (visit_occurrence_id, person_id, visit_concept_id, visit_start_date,
                                            visit_end_date, visit_type_concept_id, visit_source_concept_id,
                                            visit_source_value)
        SELECT nextval('bench_visit_id'), p, concept, dt,
               dt + CASE WHEN concept = {V['IP']} THEN 1 + floor(random() * 9)::int ELSE 0 END,
               {T['EHR encounter record']}, 0, 'visit'
        FROM (SELECT p, CASE WHEN r < 0.08 THEN {V['IP']} WHEN r < 0.2 THEN {V['ER']} ELSE {V['OP']} END concept,
                     {idx} - floor(random() * 1460)::int + 365 AS dt
              FROM (SELECT p, random() r FROM generate_series(1, {patients}) p, generate_series(1, 6) k
                    WHERE random() < 0.8) s) t""")
    observation = (f"INSERT INTO {CDM}.observation (observation_id, person_id, observation_concept_id, "
                   "observation_date, observation_type_concept_id, value_as_number, value_as_concept_id, "
                   "unit_concept_id, observation_source_concept_id, observation_source_value, visit_occurrence_id) "
                   f"SELECT nextval('bench_observation_id'), p, concept, dt, {T['EHR']}, value, value_concept, NULL, "
                   "source_concept, source, visit FROM ")
    step("observation", observation + f"""(
            SELECT p, {c['adi']} concept, {idx} - 30 AS dt, (1 + floor(random() * 100))::float8 value,
                   NULL::int value_concept, {c['adi']} source_concept, 'adi' source, NULL::bigint visit
            FROM generate_series(1, {patients}) p WHERE random() < 0.9) t""",
         observation + f"""(
            SELECT p, concept, {idx} - floor(random() * 1825)::int AS dt, NULL::float8 value,
                   NULL::int value_concept, concept source_concept, 'z' source, NULL::bigint visit
            FROM (SELECT p, {_pick(icd['z'] or icd['other'])} concept
                  FROM generate_series(1, {patients}) p, generate_series(1, 2) k) s) t""",
         observation + f"""(
            SELECT person_id p, concept, visit_start_date AS dt, NULL::float8 value, NULL::int value_concept,
                   concept source_concept, 'reason' source, visit_occurrence_id visit
            FROM (SELECT person_id, visit_start_date, visit_occurrence_id,
                         CASE WHEN random() < 0.45 THEN {_pick(psych)} ELSE {_pick(non_psych)} END concept
                  FROM {CDM}.visit_occurrence
                  WHERE visit_concept_id IN ({V['IP']}, {V['ER']}) AND random() < 0.9) s) t""")
    step("condition_occurrence", f"""
        INSERT INTO {CDM}.condition_occurrence (condition_occurrence_id, person_id, condition_concept_id,
                                                condition_start_date, condition_type_concept_id,
                                                condition_source_concept_id, condition_source_value)
        SELECT nextval('bench_condition_id'), p, concept, dt, {T['EHR']}, concept, 'dx'
        FROM (SELECT p, {idx} - floor(random() * 4015)::int + 365 AS dt,
                     CASE WHEN r < 0.12 THEN {_pick(icd['dep'])} WHEN r < 0.22 THEN {_pick(icd['anx'])}
                          WHEN r < 0.27 THEN {_pick(icd['sub'])} WHEN r < 0.32 THEN {_pick(icd['pain'])}
                          WHEN r < 0.37 THEN {_pick(icd['f_other'] or icd['dep'])}
                          ELSE {_pick(icd['other'])} END concept
              FROM (SELECT p, random() r FROM generate_series(1, {patients}) p, generate_series(1, 5) k
                    WHERE random() < 0.8) s) t""")
    end_nullable = _nullable(cur, "drug_exposure", "drug_exposure_end_date")
    no_end = "0.7" if end_nullable else "2.0"  # r above it: no end date (days_supply, or nothing)
    step("drug_exposure", f"""
        INSERT INTO {CDM}.drug_exposure (drug_exposure_id, person_id, drug_concept_id, drug_exposure_start_date,
                                         drug_exposure_end_date, days_supply, drug_type_concept_id,
                                         drug_source_concept_id, drug_source_value)
        SELECT nextval('bench_drug_id'), p, concept, dt, CASE WHEN r < {no_end} THEN dt + supply - 1 END,
               CASE WHEN r < 0.95 THEN supply END, {T['EHR prescription']}, concept, 'rx'
        FROM (SELECT p, random() r, {idx} - floor(random() * 540)::int + 30 AS dt,
                     (ARRAY[30, 30, 60, 90])[1 + floor(random() * 4)::int] supply,
                     CASE WHEN random() < 0.35 THEN {_pick(c['antidepressants'])}
                          ELSE {_pick(c['other_drugs'])} END concept
              FROM generate_series(1, {patients}) p, generate_series(1, 3) k WHERE random() < 0.5) s""")
    step("observation_period", f"""
        INSERT INTO {CDM}.observation_period (observation_period_id, person_id, observation_period_start_date,
                                              observation_period_end_date, period_type_concept_id)
        SELECT p, p, {idx} - 3650 - floor(random() * 3650)::int, {idx} + 365, {T['EHR']}
        FROM generate_series(1, {patients}) p""")
    step("indexes", *deferred, *(f"CREATE INDEX bench_{table}_date ON {CDM}.{table} ({column})"
                                 for table, column in DATE_INDEXES))
    step("ANALYZE", f"ANALYZE {CDM}.person", f"ANALYZE {CDM}.measurement", f"ANALYZE {CDM}.observation",
         f"ANALYZE {CDM}.condition_occurrence", f"ANALYZE {CDM}.drug_exposure", f"ANALYZE {CDM}.visit_occurrence",
         f"ANALYZE {VOCAB}.concept", f"ANALYZE {VOCAB}.concept_ancestor")
    counts = {}
    for table in ("person", "measurement", "observation", "condition_occurrence", "drug_exposure", "visit_occurrence"):
        cur.execute(f"SELECT count(*) FROM {CDM}.{table}")
        counts[table] = cur.fetchone()[0]
    cur.execute(f"SELECT pg_total_relation_size('{CDM}.measurement'), pg_database_size(current_database())")
    measurement_bytes, database_bytes = cur.fetchone()
    conn.commit()
    return {"rows": counts, "wearable_share": wear_share, "seconds": timings,
            "measurement_bytes": measurement_bytes, "database_bytes": database_bytes}


# Besides the OHDSI DDL's indexes (primary keys, person_id, concept ids, visit_occurrence_id): the dates.
DATE_INDEXES = (("measurement", "measurement_date"), ("observation", "observation_date"),
                ("condition_occurrence", "condition_start_date"), ("drug_exposure", "drug_exposure_start_date"),
                ("visit_occurrence", "visit_start_date"))


# --- the cluster, the schemas, the role ----------------------------------------------------------------


def open_cluster(home: Path, *, keep: bool, reuse: bool):
    """A started `tests.postgres.PostgresCluster` under `home`; with `reuse`, the one a `--keep` run left."""
    from tests.postgres import PostgresCluster, find_bin_dir

    class KeptCluster(PostgresCluster):
        """Keeps its directory on stop, and starts again on it (`--keep`)."""

        def start_kept(self, root: Path) -> KeptCluster:
            self.bin_dir, self.root = find_bin_dir(), root
            self._start_server()
            return self

        def _remove(self) -> None:  # keep the directory; note where it is
            if self.root is not None:
                (home / "cluster").write_text(str(self.root))

    cluster = (KeptCluster if keep else PostgresCluster)(base_dir=home)
    if reuse:
        return cluster.start_kept(Path((home / "cluster").read_text()))
    return cluster.start()


def build_database(cluster, patients: int, per_patient: float, index: datetime.date, seed: int,
                   password_file: Path) -> dict:
    """A fresh database with the CDM and vocabulary schemas (`simulations.omop_cdm`), the site's rows
    and the reader's role (its password in `password_file`, mode 0600). The CDM DDL's indexes are
    dropped while loading and built after it."""
    import secrets

    import psycopg

    from simulations.omop_cdm import create_cdm_schema, create_vocabulary_schema, write_vocabulary

    cluster.create_database(DBNAME)
    password = secrets.token_urlsafe(18)
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")
    cluster.create_role(READER, password)
    with psycopg.connect(cluster.superuser_conninfo(dbname=DBNAME)) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        create_cdm_schema(conn, CDM)
        create_vocabulary_schema(conn, VOCAB)
        write_vocabulary(conn, VOCAB)
        conn.commit()
        deferred = drop_cdm_indexes(conn)
        manifest = generate_site(conn, patients, per_patient, index, seed, deferred)
        conn.execute(f"GRANT CONNECT ON DATABASE {DBNAME} TO {READER}")
        for schema in (CDM, VOCAB):
            conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {READER}")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {READER}")
        conn.commit()
    return manifest


def drop_cdm_indexes(conn) -> list[str]:
    """Drop the CDM schema's primary keys and indexes (a bulk load builds them after); returns the
    statements that recreate them."""
    cur = conn.cursor()
    cur.execute("SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), c.conindid "
                "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                "WHERE n.nspname = %s AND c.contype = 'p'", (CDM,))
    keys = cur.fetchall()
    cur.execute("SELECT i.indexrelid, pg_get_indexdef(i.indexrelid), x.relname FROM pg_index i "
                "JOIN pg_class x ON x.oid = i.indexrelid JOIN pg_namespace n ON n.oid = x.relnamespace "
                "WHERE n.nspname = %s", (CDM,))
    key_indexes = {k[3] for k in keys}
    indexes = [(definition, name) for oid, definition, name in cur.fetchall() if oid not in key_indexes]
    for table, name, _, _ in keys:
        cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for _, name in indexes:
        cur.execute(f'DROP INDEX {CDM}."{name}"')
    conn.commit()
    return ([f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}' for table, name, definition, _ in keys]
            + [definition for definition, _ in indexes])


