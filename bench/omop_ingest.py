"""OMOP CDM ingest on one core: fedcare's streaming reader vs a naive `pandas.read_sql` (issue 17).

    .venv/bin/python bench/omop_ingest.py [--patients 100000] [--measurements-per-patient 100]
                                          [--repeats 1] [--seed 17] [--keep --workdir DIR] [--profile]
                                          [--no-baseline]

A throwaway PostgreSQL cluster is started (`tests.postgres.PostgresCluster`), and one CDM site is
generated in it server-side (`INSERT ... SELECT` over `generate_series`, no Python per row): the
CDM and vocabulary schemas of `simulations.omop_cdm` (the vocabulary its `write_vocabulary` writes,
so every concept of studies/depression-risk-omop.toml resolves), `--patients` persons and about
`--measurements-per-patient` measurement rows each:

* PHQ-9 (LOINC 44261-6) ~9 and GAD-7 (70274-6) ~4.5 per patient over three years (about quarterly,
  a few after the index date, 0.5% without a value); weight ~2.5 (kg, some [lb_av]) and height ~1.5
  (cm, some [in_i] or m) over four years; ~8 rows of the vocabulary's other LOINC codes (blood
  pressure, BMI, ...), which no rule reads;
* daily wearable readings for a share of the patients (set so the total comes out at the
  requested mean): sleep 93832-4 (h, 15% in min), steps 41950-7 ({steps}/d or /d), resting HR
  40443-4 (/min or {beats}/min), HRV 80404-7 (ms, 5% in s), over the 60 days before the index date
  and 10 after, a day missing now and then;
* ~4 conditions over ten years (ICD10CM F32/F33, F41, F1x, G89.2/G89.4, other F codes, and for
  63% codes no rule reads: E11, I10, J45, ...), ~4.8 visits (OP/ER/IP) with a reason observation
  (an F code for 45%) on 90% of the ER and IP visits, ~1.5 drug exposures (a third of them
  antidepressant ingredients), an area-deprivation-index observation for 90% of the patients, two
  Z-code observations each, one observation_period each;
* the CDM DDL's primary keys and indexes (person_id, concept ids, visit_occurrence_id) are dropped
  for the load and built after it, with an index on each table's date; ANALYZE; a read-only role
  for the reader (CONNECT, USAGE on both schemas, SELECT on their tables).

The site is dropped at the end unless `--keep` (then it is kept under `--workdir` and reused by a
rerun with the same size and seed).

Every measurement runs in a fresh subprocess pinned to CPU 0 (`sched_setaffinity`; the PostgreSQL
backend that serves it is not pinned and runs on the other core), which reports wall and CPU time
and its peak RSS (`ru_maxrss`, imports included) as JSON. `--repeats N` interleaves N runs of each
and keeps the best wall time. Measured:

* fedcare: `client.omop.read_omop_site(study, DatabaseSource)` for the role (password from a 0600
  password_file): both splits, every table the study reads, concepts resolved, records reduced to
  the per-patient aggregates. Records read = the sum of `report.records_read`; the time spent in
  each table's query is timed too, so the measurement table's own rate is shown;
* baseline: `pandas.read_sql` of the reader's own measurement query (`client.omop_concepts.record_query`
  for `CdmTable.MEASUREMENT`, the concept ids the study resolves to in this vocabulary, the window
  of the measurement rules) over a plain psycopg connection: a DataFrame of the rows, no derivation;
* floor: the same query through a server-side cursor, a `fetchmany` loop that does nothing.

The rates are rows returned by the queries per second. fedcare's include reading the other tables
and deriving every feature; pandas' only fetch the measurement rows into a DataFrame.

`--profile` also runs the fedcare reader under cProfile (a separate run, not timed) and prints
where its time goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUDY = ROOT / "studies" / "depression-risk-omop.toml"
GOAL_RSS_MB = 1024
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
from bench.omop_site import CDM, DBNAME, READER, VOCAB, build_database, open_cluster  # noqa: E402

def measurement_query(source, study) -> tuple[str, dict]:
    """The reader's own measurement query (`record_query`) with the concept ids this vocabulary resolves
    the study's measurement rules to, and their window: what the baseline fetches."""
    from client.database import connect
    from client.omop_concepts import record_query, resolve_concepts
    from fedcare.omop import CdmTable

    mapping = study.omop
    rules = [r for r in mapping.rules() if r.table is CdmTable.MEASUREMENT]
    conn = connect(source)
    try:
        with conn.transaction():
            resolved = resolve_concepts(conn, source, mapping)
        index = mapping.index_date.toordinal()
        windows: dict[tuple[int, int], set[int]] = {}  # as the reader groups them: each rule's own window
        for r in rules:
            lo, hi = (index - r.window_days, index) if r.window_days else (index, index + (r.window_days_after or 0))
            windows.setdefault((lo, hi), set()).update(i for s in r.concept_sets() for i in resolved.ids(s))
        query, params = record_query(source, CdmTable.MEASUREMENT, reasons=[],
                                     windows=[(sorted(ids), lo, hi) for (lo, hi), ids in sorted(windows.items())])
        text = query.as_string(conn)
    finally:
        conn.close()
    return text, {key: value.isoformat() if isinstance(value, datetime.date) else value for key, value in params.items()}


# --- measurements (child processes) -----------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(kind: str, conf: dict) -> dict:
    os.sched_setaffinity(0, {0})
    result: dict = {"kind": kind}
    if kind in ("fedcare", "fedcare-profile"):
        from client import omop
        from client.database import DatabaseSource, SourceKind
        from fedcare.study import load_study

        study = load_study(STUDY)
        source = DatabaseSource(kind=SourceKind.OMOP, host=conf["host"], port=conf["port"], dbname=conf["dbname"],
                                user=conf["user"], cdm_schema=CDM, vocabulary_schema=VOCAB,
                                password_file=Path(conf["password_file"]), sslmode="prefer", origin="bench")
        phases: dict[str, float] = {}
        reader = getattr(omop, "_Reader", None)  # per-table time, if the reader still has this shape
        for method in ("_read_records", "_read_persons"):
            if reader is not None and hasattr(reader, method):
                original = getattr(reader, method)

                def timed(self, conn, *args, _original=original, _method=method):
                    t0 = time.perf_counter()
                    out = _original(self, conn, *args)
                    phases[args[0].value if args else "person"] = time.perf_counter() - t0
                    return out

                setattr(reader, method, timed)
        today = datetime.date.fromisoformat(conf["today"])
        rss0 = _status_mb("VmRSS")
        if kind == "fedcare-profile":
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            w0, c0 = time.perf_counter(), time.process_time()
            profiler.enable()
            tables = omop.read_omop_site(study, source, today=today)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(22)
            result["profile"] = out.getvalue()
        else:
            w0, c0 = time.perf_counter(), time.process_time()
            tables = omop.read_omop_site(study, source, today=today)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        report = next(iter(tables.values())).report  # records_read is per table, the same in both splits
        result.update(rows=sum(report.records_read.values()), by_table=dict(report.records_read), phases=phases,
                      patients_read=sum(t.report.rows_read for t in tables.values()),
                      patients_loaded=sum(t.report.rows_loaded for t in tables.values()),
                      quarantined={k: v for t in tables.values() for k, v in t.report.quarantined.items()},
                      records_used=sum(sum(t.report.records_used.values()) for t in tables.values()))
    elif kind in ("pandas", "cursor"):
        import psycopg

        password = Path(conf["password_file"]).read_text().strip()
        params = {key: datetime.date.fromisoformat(value) if isinstance(value, str) else value
                  for key, value in conf["params"].items()}  # c0, lo0, hi0, ...: the reader's windows
        if kind == "pandas":
            import warnings

            import pandas as pd

            rss0 = _status_mb("VmRSS")
            w0, c0 = time.perf_counter(), time.process_time()
            conn = psycopg.connect(host=conf["host"], port=conf["port"], dbname=conf["dbname"], user=conf["user"],
                                   password=password)
            with warnings.catch_warnings():  # "pandas only supports SQLAlchemy connectable ...": it works
                warnings.simplefilter("ignore", UserWarning)
                frame = pd.read_sql(conf["query"], conn, params=params)
            conn.close()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            result.update(rows=len(frame), frame_mb=frame.memory_usage(deep=True).sum() / 2**20)
        else:
            rss0 = _status_mb("VmRSS")
            w0, c0 = time.perf_counter(), time.process_time()
            conn = psycopg.connect(host=conf["host"], port=conf["port"], dbname=conf["dbname"], user=conf["user"],
                                   password=password)
            rows = 0
            with conn.cursor(name="bench_floor") as cur:
                cur.itersize = 20_000
                cur.execute(conf["query"], params)
                while batch := cur.fetchmany(20_000):
                    rows += len(batch)
            conn.close()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            result.update(rows=rows)
    else:
        raise SystemExit(f"unknown measurement {kind}")
    result.update(wall=wall, cpu=cpu, rss_imports_mb=rss0,
                  rss_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def measure(kind: str, conf_path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(conf_path)],
                         env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------------


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--measurements-per-patient", type=float, default=100.0,
                        help="mean measurement rows per patient (the wearable share is set to reach it)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each measurement; best wall time")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--keep", action="store_true", help="keep the generated site under --workdir and reuse it")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--profile", action="store_true", help="also run the fedcare reader under cProfile")
    parser.add_argument("--no-baseline", action="store_true", help="fedcare only (no pandas, no floor)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CONF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(Path(args.child[1]).read_text()))))
        return 0

    from fedcare.study import load_study

    study = load_study(STUDY)
    index = study.omop.index_date
    today = index + datetime.timedelta(days=365)
    name = f"fedcare-omop-ingest-{args.patients}x{args.measurements_per_patient:g}-seed{args.seed}"
    home = args.workdir / name if args.keep else Path(tempfile.mkdtemp(prefix="bench-omop-ingest-"))
    manifest_path = home / "manifest.json"
    password_file = home / "reader.pass"
    reuse = args.keep and manifest_path.is_file()
    if args.keep and not reuse and (home / "cluster").is_file():  # a kept run that did not finish
        shutil.rmtree((home / "cluster").read_text(), ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o711)  # the cluster's directory inside it belongs to the postgres user
    try:
        cluster = open_cluster(home, keep=args.keep, reuse=reuse)
    except BaseException:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        raise
    try:
        if reuse:
            manifest = json.loads(manifest_path.read_text())
            print(f"site: reusing {home} (generated in {sum(manifest['seconds'].values()):.0f} s)")
        else:
            print(f"generating {args.patients:,} patients x ~{args.measurements_per_patient:g} measurements "
                  f"in {home} ...", flush=True)
            manifest = build_database(cluster, args.patients, args.measurements_per_patient, index, args.seed,
                                      password_file)
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        conf = {"host": "127.0.0.1", "port": cluster.port, "dbname": DBNAME, "user": READER,
                "password_file": str(password_file), "today": today.isoformat()}
        from client.database import DatabaseSource, SourceKind

        source = DatabaseSource(kind=SourceKind.OMOP, host="127.0.0.1", port=cluster.port, dbname=DBNAME,
                                user=READER, cdm_schema=CDM, vocabulary_schema=VOCAB,
                                password_file=password_file, sslmode="prefer", origin="bench")
        conf["query"], conf["params"] = measurement_query(source, study)
        conf_path = home / "child.json"
        conf_path.write_text(json.dumps(conf))
        rows = manifest["rows"]
        print(f"site: {rows['person']:,} persons; measurement {rows['measurement']:,} rows "
              f"({manifest['measurement_bytes'] / 2**20:,.0f} MiB with indexes), observation {rows['observation']:,}, "
              f"condition_occurrence {rows['condition_occurrence']:,}, drug_exposure {rows['drug_exposure']:,}, "
              f"visit_occurrence {rows['visit_occurrence']:,}; database {manifest['database_bytes'] / 2**20:,.0f} MiB; "
              f"wearable share {manifest['wearable_share']:.1%}")
        print("  generated in " + ", ".join(f"{k} {v:.0f} s" for k, v in manifest["seconds"].items()))
        load0 = os.getloadavg()[0]
        print(f"one core (CPU 0) per measurement, fresh process each, {args.repeats} interleaved repeat(s), "
              f"best wall time; today={today}; load average {load0:.1f}", flush=True)

        kinds = ["fedcare"] + ([] if args.no_baseline else ["pandas", "cursor"])
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(measure(kind, conf_path))
                r = runs[kind][-1]
                print(f"  {kind}: {r['rows']:,} rows in {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, "
                      f"peak RSS {r['rss_peak_mb']:,.0f} MB", flush=True)
        profile = measure("fedcare-profile", conf_path) if args.profile else None
        load1 = os.getloadavg()[0]
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)

    f = _best(runs["fedcare"])
    print(f"load average at the end {load1:.1f}")
    print()
    m_rows = f["by_table"].get("measurement", 0)
    m_time = f["phases"].get("measurement")
    quarantined = ", ".join(f"{k} {v}" for k, v in sorted(f["quarantined"].items()))
    print(f"fedcare read: {f['patients_read']:,} persons, {f['patients_loaded']:,} loaded in the two splits, "
          f"quarantined {sum(f['quarantined'].values()):,} ({quarantined}); "
          f"records read " + ", ".join(f"{k} {v:,}" for k, v in f["by_table"].items())
          + f"; used {f['records_used']:,}")
    if f["phases"]:
        print("  time per query: " + ", ".join(f"{k} {v:.1f} s" for k, v in f["phases"].items())
              + f"; the rest (connect, checks, concepts, tables) {f['wall'] - sum(f['phases'].values()):.1f} s")
    print()
    heads = ("rows", "wall s", "CPU s", "rows/s wall", "rows/s CPU", "peak RSS MB")
    print(f"{'':40s} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, (11, 9, 8, 12, 11, 12))))
    line = "{:40s} {:>11,} {:9.1f} {:8.1f} {:12,.0f} {:11,.0f} {:12,.0f}"
    print(line.format("fedcare read_omop_site, all tables", f["rows"], f["wall"], f["cpu"], f["rows"] / f["wall"],
                      f["rows"] / f["cpu"], f["rss_peak_mb"]))
    if m_time:
        print(f"{'  of which the measurement query':40s} {m_rows:>11,} {m_time:9.1f} {'':8s} {m_rows / m_time:12,.0f}")
    if not args.no_baseline:
        p, c = _best(runs["pandas"]), _best(runs["cursor"])
        print(line.format("pandas.read_sql, measurement query", p["rows"], p["wall"], p["cpu"], p["rows"] / p["wall"],
                          p["rows"] / p["cpu"], p["rss_peak_mb"]) + f"  (DataFrame {p['frame_mb']:,.0f} MB)")
        print(line.format("server-side cursor, fetchmany (floor)", c["rows"], c["wall"], c["cpu"],
                          c["rows"] / c["wall"], c["rows"] / c["cpu"], c["rss_peak_mb"]))
        if p["rows"] != m_rows:
            print(f"WARNING: pandas read {p['rows']:,} measurement rows, fedcare {m_rows:,}")
        print()
        ratio = (f["rows"] / f["wall"]) / (p["rows"] / p["wall"])
        print(f"ratio fedcare / pandas rows/s (wall): {ratio:.2f}x all tables"
              + (f", {(m_rows / m_time) / (p['rows'] / p['wall']):.2f}x on the measurement query alone"
                 if m_time else "")
              + f"; CPU {(f['rows'] / f['cpu']) / (p['rows'] / p['cpu']):.2f}x")
        print(f"peak RSS fedcare / pandas: {f['rss_peak_mb']:,.0f} / {p['rss_peak_mb']:,.0f} MB "
              f"({p['rss_peak_mb'] / f['rss_peak_mb']:.1f}x less)")
    per_patient_kb = (f["rss_peak_mb"] - f["rss_imports_mb"]) * 1024 / f["patients_read"]
    met = "met" if f["rss_peak_mb"] <= GOAL_RSS_MB else "NOT met"
    print(f"goal peak RSS <= 1 GB: {met} ({f['rss_peak_mb']:,.0f} MB; "
          f"{f['rss_imports_mb']:,.0f} MB after the imports, so {per_patient_kb:.1f} KB per patient while reading)")
    if profile:
        print()
        print("cProfile of the fedcare reader (a separate run; tottime order):")
        print(profile["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
