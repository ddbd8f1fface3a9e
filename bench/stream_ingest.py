"""Sensor-readings ingest on one core: `client.readings.read_readings` (CSV and Parquet) vs a naive
`csv.DictReader` + per-row Python aggregation, measured in the same run.

    .venv/bin/python -m bench.stream_ingest [--patients 20000] [--days 60] [--baseline-rows 300000]
                                            [--repeats 3] [--workdir DIR] [--block-bytes 1048576]

A synthetic readings table is written once (cached under `--workdir`, default the system temp
directory): `--patients` patients × 4 sensor types (heart rate, HRV, steps, sleep) × `--days`
days, each day present with probability 0.8 (gaps), heart rate 1–3 readings a day; some sleep in
minutes and HRV in seconds (converted), ~0.1 % bad rows (unparseable values, unknown units, bad
dates), 2 % of the readings of patients not in the table. It is written as CSV (ISO dates and
dateTimes) and as Parquet (typed: date32 time, float64 value, dictionary-encoded codes).

Every measurement runs in its own subprocess pinned to CPU 0 (`os.sched_setaffinity(0, {0})`,
BLAS/OMP threads 1) and reports wall and CPU time, the peak RSS (VmHWM, imports included)
and the growth while reading (VmHWM reset after the imports). Measured:

* fedcare `read_readings` on the whole CSV and the whole Parquet file (readings/s);
* baseline: `csv.DictReader`, `date.fromisoformat`, `float`, a dict of per-(patient, rule)
  running sums, on the first `--baseline-rows` lines; fedcare runs on that same subset for the
  ratio (repeats interleaved, medians). Both compute the same features; the bench checks that
  they agree.

Goal: >= 200,000 readings/s on one core.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_RATE = 200_000
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
LOINC = "http://loinc.org"
INDEX = datetime.date(2024, 3, 1)
SENSORS = {  # code: (unit, mean, sd, alternative unit, its factor from the unit, share in the alternative)
    "8867-4": ("/min", 70.0, 9.0, "bpm", 1.0, 0.3),
    "80404-7": ("ms", 45.0, 12.0, "s", 1 / 1000, 0.2),
    "41950-7": ("/d", 8000.0, 2500.0, "{steps}/d", 1.0, 0.1),
    "93832-4": ("h", 7.0, 1.1, "min", 60.0, 0.5),
}


def study_rules():
    from fedcare.mapping import Code
    from fedcare.streams import SensorRule

    def code(c: str) -> tuple:
        return (Code(LOINC, c, False),)

    return (
        SensorRule("hr_mean_30d", code("8867-4"), "/min", 30, "mean"),
        SensorRule("hr_sd_30d", code("8867-4"), "/min", 30, "sd"),
        SensorRule("hr_slope_60d", code("8867-4"), "/min", 60, "slope_per_30d"),
        SensorRule("hrv_mean_14d", code("80404-7"), "ms", 14, "mean"),
        SensorRule("steps_mean_30d", code("41950-7"), "/d", 30, "mean"),
        SensorRule("steps_slope_60d", code("41950-7"), "/d", 60, "slope_per_30d"),
        SensorRule("sleep_mean_30d", code("93832-4"), "h", 30, "mean"),
        SensorRule("sleep_days_14d", code("93832-4"), "h", 14, "days_covered"),
    )


# --- the synthetic table (parent process) --------------------------------------------------------


def build(workdir: Path, patients: int, days: int, seed: int) -> dict:
    """Write (or reuse) the CSV and Parquet tables; returns the manifest."""
    root = workdir / f"fedcare-stream-ingest-{patients}x{days}-seed{seed}"
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    csv_path, parquet_path = root / "train.readings.csv", root / "train.readings.parquet"
    writer = None
    total, step = 0, 2000
    with csv_path.open("wb") as out:
        out.write(b"patient_id,time,system,code,value,unit\n")
        for first in range(0, patients + patients // 50, step):  # the last 2 %: patients not in the table
            table = _block(rng, first, min(step, patients + patients // 50 - first), days)
            pacsv.write_csv(table.drop_columns(["day", "number"]), out,
                            pacsv.WriteOptions(include_header=False, quoting_style="none"))
            typed = pa.table({"patient_id": table["patient_id"], "time": table["day"], "system":
                              table["system"].dictionary_encode(), "code": table["code"].dictionary_encode(),
                              "value": table["number"], "unit": table["unit"].dictionary_encode()})
            writer = writer or pq.ParquetWriter(parquet_path, typed.schema)
            writer.write_table(typed)
            total += len(table)
    writer.close()
    manifest = {"readings": total, "patients": patients, "days": days, "seed": seed, "csv": str(csv_path),
                "parquet": str(parquet_path), "csv_bytes": csv_path.stat().st_size,
                "parquet_bytes": parquet_path.stat().st_size, "render_seconds": round(time.perf_counter() - t0, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _block(rng, first: int, count: int, days: int):
    """The readings of patients first..first+count-1, patient by patient, each in day order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    index = INDEX.toordinal()
    parts = []
    for code, (unit, mean, sd, alt, factor, share) in SENSORS.items():
        per_day = rng.integers(1, 4, (count, days)) if code == "8867-4" else np.ones((count, days), np.int64)
        per_day *= rng.random((count, days)) < 0.8
        patient = np.repeat(np.repeat(np.arange(first, first + count), days), per_day.ravel())
        day = np.repeat(np.tile(index - days + 1 + np.arange(days), count), per_day.ravel())
        value = rng.normal(mean, sd, len(day)) + 0.01 * mean * (day - index) / 30
        in_alt = rng.random(len(day)) < share
        value = np.where(in_alt, value * factor, value)
        parts.append((patient, day, np.full(len(day), code), value, np.where(in_alt, alt, unit)))
    patient, day, code, value, unit = (np.concatenate(c) for c in zip(*parts))
    order = np.lexsort((day, patient))
    patient, day, code, value, unit = patient[order], day[order], code[order], value[order], unit[order]
    text = np.round(value, 3).astype(str).astype(object)
    bad = rng.random(len(day)) < 0.001
    text[bad & (rng.random(len(day)) < 0.5)] = "n/a?"
    unit = unit.astype(object)
    unit[bad & (rng.random(len(day)) < 0.3)] = "furlong"
    dates = pa.array(day - 719163, pa.int32()).cast(pa.date32())
    iso = pc.strftime(dates.cast(pa.timestamp("s")), "%Y-%m-%d")
    stamped = pc.binary_join_element_wise(iso, "T08:15:00Z", "")
    when = pc.if_else(pa.array(rng.random(len(day)) < 0.5), stamped, iso)
    number = pa.array(np.where(text == "n/a?", np.nan, np.round(value, 3)))
    return pa.table({"patient_id": pa.array(np.char.add("P", patient.astype(str))), "time": when,
                     "system": pa.array(np.full(len(day), LOINC)), "code": pa.array(code), "value": pa.array(text, pa.string()),
                     "unit": pa.array(unit, pa.string()), "day": dates, "number": number})


def subset(manifest: dict, lines: int) -> str:
    """The first `lines` readings of the CSV, as a file of their own (made once)."""
    path = Path(manifest["csv"]).with_name(f"first-{lines}.readings.csv")
    if not path.is_file():
        with open(manifest["csv"], "rb") as src, path.open("wb") as out:
            for i, line in enumerate(src):
                if i > lines:
                    break
                out.write(line)
    return str(path)


# --- measurements (child processes) --------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.M).group(1)) / 1024


def _child(kind: str, path: str, patients: int, block_bytes: int) -> dict:
    os.sched_setaffinity(0, {0})
    import numpy as np

    from client.readings import ReadingsReport, read_readings

    rules, ids = study_rules(), {f"P{i}": i for i in range(patients)}
    today, index = INDEX.toordinal() + 1, INDEX.toordinal()
    peak0 = _status_mb("VmHWM")  # the imports' peak (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    rss0 = _status_mb("VmRSS")
    w0, c0 = time.perf_counter(), time.process_time()
    if kind == "baseline":
        out, read = naive(Path(path), rules, ids, index, today)
    else:
        report = ReadingsReport()
        out = read_readings(Path(path), rules=rules, patients=ids, index_day=index, today=today, report=report,
                            block_bytes=block_bytes)
        read = report.readings_read
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"kind": kind, "readings": read, "wall": wall, "cpu": cpu, "rss_mb": max(peak0, _status_mb("VmHWM")),
            "growth_mb": _status_mb("VmHWM") - rss0, "digest": [float(np.nansum(out)), int(np.isnan(out).sum())]}


def naive(path: Path, rules, ids: dict[str, int], index: int, today: int):
    """The baseline: csv.DictReader, then per reading Python checks and running sums per (patient, rule)."""
    import numpy as np

    from client.fhir_datatypes import UNIT_ALIASES
    from fedcare.mapping import CONVERSIONS
    from fedcare.streams import UCUM_UNITS

    by_code: dict[tuple[str, str], list[int]] = {}
    for i, rule in enumerate(rules):
        for code in rule.codes:
            by_code.setdefault((code.system, code.code), []).append(i)
    sums: dict[tuple[int, int], list] = {}
    read = 0
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            read += 1
            matched, patient = by_code.get((row["system"], row["code"])), ids.get(row["patient_id"])
            if not matched or patient is None:
                continue
            try:
                day, value = datetime.date.fromisoformat(row["time"][:10]).toordinal(), float(row["value"])
            except ValueError:
                continue
            unit = row["unit"]
            unit = unit if unit in UCUM_UNITS else UNIT_ALIASES.get(unit.lower(), unit)
            if day > today or not math.isfinite(value):
                continue
            converts = [CONVERSIONS[rules[r].unit].get(unit) for r in matched]
            if None in converts:
                continue
            for r, convert in zip(matched, converts):
                t = day - index
                if -rules[r].window_days < t <= 0:
                    v = convert(value)
                    acc = sums.setdefault((patient, r), [0, 0.0, 0.0, 0, 0, 0.0, set()])
                    acc[0] += 1
                    acc[1] += v
                    acc[2] += v * v
                    acc[3] += t
                    acc[4] += t * t
                    acc[5] += t * v
                    acc[6].add(day)
    out = np.full((len(ids), len(rules)), np.nan)
    for (p, r), (n, s, ss, st, stt, stv, seen) in sums.items():
        agg = rules[r].aggregate
        if agg == "mean":
            out[p, r] = s / n
        elif agg == "sd" and n > 1:
            out[p, r] = math.sqrt(max(ss - s * s / n, 0.0) / (n - 1))
        elif agg == "slope_per_30d" and len(seen) > 1:
            out[p, r] = 30 * (n * stv - st * s) / (n * stt - st * st)
        elif agg == "days_covered":
            out[p, r] = len(seen) / rules[r].window_days
    for r, rule in enumerate(rules):
        if rule.aggregate == "days_covered":
            out[np.isnan(out[:, r]), r] = 0.0
    return out, read


def measure(kind: str, path: str, patients: int, block_bytes: int) -> dict:
    command = [sys.executable, "-m", "bench.stream_ingest", "--child", kind, path, str(patients), str(block_bytes)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--baseline-rows", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-bytes", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, path, patients, block = args.child
        print(json.dumps(_child(kind, path, int(patients), int(block))))
        return 0
    manifest = build(args.workdir, args.patients, args.days, args.seed)
    print(f"table: {manifest['readings']:,} readings, {args.patients:,} patients × 4 sensors × {args.days} days "
          f"(CSV {manifest['csv_bytes'] / 1e6:.0f} MB, Parquet {manifest['parquet_bytes'] / 1e6:.0f} MB); "
          f"load average {os.getloadavg()[0]:.2f}; one core (CPU 0)")
    small = subset(manifest, min(args.baseline_rows, manifest["readings"]))
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits every kind alike
        for name, kind, path in (("csv", "fedcare", manifest["csv"]), ("parquet", "fedcare", manifest["parquet"]),
                                 ("subset", "fedcare", small), ("baseline", "baseline", small)):
            runs.setdefault(name, []).append(measure(kind, path, args.patients, args.block_bytes))
    rate = {name: statistics.median(r["readings"] / r["wall"] for r in rs) for name, rs in runs.items()}
    cpu_rate = {name: statistics.median(r["readings"] / r["cpu"] for r in rs) for name, rs in runs.items()}
    print(f"{'run':<34}{'readings':>11}{'wall s':>9}{'readings/s':>13}{'(cpu)':>12}{'peak RSS':>10}{'growth':>9}")
    labels = {"csv": "fedcare read_readings, CSV", "parquet": "fedcare read_readings, Parquet",
              "subset": "fedcare, CSV subset", "baseline": "baseline DictReader, CSV subset"}
    for name, rs in runs.items():
        r = rs[0]
        print(f"{labels[name]:<34}{r['readings']:>11,}{statistics.median(x['wall'] for x in rs):>9.2f}"
              f"{rate[name]:>13,.0f}{cpu_rate[name]:>12,.0f}{max(x['rss_mb'] for x in rs):>8.0f}MB"
              f"{max(x['growth_mb'] for x in rs):>7.0f}MB")
    (mine, mine_nan), (theirs, theirs_nan) = runs["subset"][0]["digest"], runs["baseline"][0]["digest"]
    agree = mine_nan == theirs_nan and abs(mine - theirs) <= 1e-9 * max(1.0, abs(theirs))
    print(f"ratio fedcare / baseline on the same {runs['subset'][0]['readings']:,} readings: "
          f"{rate['subset'] / rate['baseline']:.1f}x (features agree: {'yes' if agree else 'NO'})")
    print(f"ratio Parquet / CSV: {rate['parquet'] / rate['csv']:.2f}x")
    ok = min(rate["csv"], rate["parquet"]) >= GOAL_RATE
    print(f"goal >= {GOAL_RATE:,} readings/s on one core: {'met' if ok else 'NOT met'} "
          f"(CSV {rate['csv']:,.0f}, Parquet {rate['parquet']:,.0f})")
    return 0 if ok and agree else 1


if __name__ == "__main__":
    sys.exit(main())
