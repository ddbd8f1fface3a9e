"""Sensor streams: the kernel's windowed aggregates (`fedcare/streams.py`) against a plain numpy
reference, and the site's readings reader (`client/readings.py`): units, quarantine reasons with
their lines, unknown patients, damaged files, CSV = Parquet, chunking, and the one-patient
inference path equal to the table path bit for bit."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.fhir_datatypes import parse_day
from client.readings import (
    FUTURE, MISSING, NOT_FINITE, NOT_NUMBER, TIME_BAD, ReadingsReport, read_readings,
)
from client.tables import SiteDataError
from fedcare.mapping import Code
from fedcare.streams import Reading, RuleIndex, SensorRule, StreamAggregator, aggregate_patient

LOINC = "http://loinc.org"
HR, HRV, STEPS, SLEEP = (Code(LOINC, c, False) for c in ("8867-4", "80404-7", "41950-7", "93832-4"))
INDEX = datetime.date(2024, 3, 1).toordinal()
TODAY = INDEX + 10
HEADER = "patient_id,time,system,code,value,unit"
RULES = (
    SensorRule("hr_mean", (HR,), "/min", 30, "mean"),
    SensorRule("hr_sd", (HR,), "/min", 30, "sd"),
    SensorRule("hrv_mean", (HRV,), "ms", 14, "mean"),
    SensorRule("steps_slope", (STEPS,), "/d", 60, "slope_per_30d"),
    SensorRule("sleep_mean", (SLEEP,), "h", 30, "mean"),
    SensorRule("sleep_days", (SLEEP,), "h", 7, "days_covered"),
)
CODES = {HR: ("bpm", 70.0, 8.0), HRV: ("ms", 45.0, 12.0), STEPS: ("/d", 8000.0, 2500.0), SLEEP: ("h", 7.0, 1.2)}


def iso(day: int) -> str:
    return datetime.date.fromordinal(day).isoformat()


def reference(rule: SensorRule, days: np.ndarray, values: np.ndarray) -> float:
    """The aggregate as a straightforward numpy computation on the readings in the window."""
    inside = (days > INDEX - rule.window_days) & (days <= INDEX)
    d, v = days[inside].astype(np.float64), values[inside]
    if rule.aggregate == "mean":
        return float(np.mean(v)) if len(v) else np.nan
    if rule.aggregate == "sd":
        return float(np.std(v, ddof=1)) if len(v) > 1 else np.nan
    if rule.aggregate == "slope_per_30d":
        if len(np.unique(d)) < 2:
            return np.nan
        dc = d - d.mean()
        return float(30 * np.sum(dc * (v - v.mean())) / np.sum(dc * dc))
    return len(np.unique(d)) / rule.window_days


def random_readings(rng: np.random.Generator, patients: int, per_patient: int) -> list[tuple[str, int, Code, float, str]]:
    """(patient id, day, code, value, unit) in a shuffled file order; days on both sides of every window."""
    out = []
    for p in range(patients):
        for _ in range(rng.integers(0, per_patient)):
            code = list(CODES)[rng.integers(0, 4)]
            unit, mean, sd = CODES[code]
            out.append((f"p{p}", int(INDEX - rng.integers(-3, 70)), code, float(rng.normal(mean, sd)), unit))
    rng.shuffle(out)
    return out


def write_csv(path: Path, rows: list[tuple[str, int, Code, float, str]]) -> Path:
    with path.open("w", newline="") as handle:
        handle.write(HEADER + "\n")
        for pid, day, code, value, unit in rows:
            handle.write(f"{pid},{iso(day)},{code.system},{code.code},{value!r},{unit}\n")
    return path


def read(path: Path, patients: dict[str, int], **options) -> tuple[np.ndarray, ReadingsReport]:
    report = ReadingsReport()
    out = read_readings(path, rules=RULES, patients=patients, index_day=INDEX, today=TODAY, report=report, **options)
    return out, report


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


# --- the kernel ---------------------------------------------------------------------------------


def test_aggregates_equal_a_numpy_reference_on_random_readings():
    rng = np.random.default_rng(3)
    rows = random_readings(rng, 60, 80)
    index = RuleIndex(RULES)
    agg = StreamAggregator(RULES, index_day=INDEX, patients=60)
    pairs = [(int(pid[1:]), r, day, value) for pid, day, code, value, _ in rows for r in index.match(code.system, code.code)]
    patient, rule, day, value = (np.array(c) for c in zip(*pairs))
    for part in np.array_split(np.arange(len(pairs)), 7):
        agg.add(patient=patient[part], rule=rule[part], day=day[part], value=value[part])
    got = agg.results()
    for p in range(60):
        for r, sensor_rule in enumerate(RULES):
            mine = (patient == p) & (rule == r)
            want = reference(sensor_rule, day[mine], value[mine])
            np.testing.assert_allclose(got[p, r], want, rtol=1e-9, atol=1e-9 * max(1.0, abs(want)) if np.isfinite(want) else 0)
    assert agg.used.sum() + agg.outside.sum() == len(pairs)


def test_sums_stay_accurate_for_large_values_with_a_small_spread():
    rule = (SensorRule("x", (HR,), "/min", 30, "sd"), SensorRule("y", (HR,), "/min", 30, "slope_per_30d"))
    rng = np.random.default_rng(1)
    days = INDEX - rng.integers(0, 30, 5000)
    values = 1e9 + 0.25 * days + rng.normal(0, 1e-3, 5000)
    agg = StreamAggregator(rule, index_day=INDEX, patients=1)
    for r in (0, 1):
        agg.add(patient=np.zeros(5000, int), rule=np.full(5000, r), day=days, value=values)
    got = agg.results()[0]
    np.testing.assert_allclose(got[0], reference(rule[0], days, values), rtol=1e-6)
    np.testing.assert_allclose(got[1], reference(rule[1], days, values), rtol=1e-9)


def test_window_edges_and_missing_aggregates():
    rules = tuple(SensorRule(a, (HR,), "/min", 10, a) for a in ("mean", "sd", "slope_per_30d", "days_covered"))
    agg = StreamAggregator(rules, index_day=INDEX, patients=3)
    days = [INDEX - 10, INDEX - 9, INDEX, INDEX + 1]  # (index - 10, index]: the middle two count
    for r in range(4):
        agg.add(patient=np.zeros(4, int), rule=np.full(4, r), day=np.array(days), value=np.array([100.0, 1.0, 3.0, 100.0]))
        agg.add(patient=np.ones(2, int), rule=np.full(2, r), day=np.array([INDEX - 2] * 2), value=np.array([5.0, 7.0]))
    got = agg.results()
    np.testing.assert_allclose(got[0], [2.0, np.sqrt(2.0), 30 * 2 / 9, 0.2])
    assert got[1, 0] == 6.0 and got[1, 1] == pytest.approx(np.sqrt(2.0))
    assert np.isnan(got[1, 2]), "two readings on one day: no slope"
    assert got[1, 3] == 0.1
    assert np.isnan(got[2, :3]).all() and got[2, 3] == 0.0, "no readings: missing, but days_covered 0"
    assert agg.outside.tolist() == [2, 2, 2, 2] and agg.used.tolist() == [4, 4, 4, 4]
    one = StreamAggregator(rules[1:2], index_day=INDEX, patients=1)
    one.add(patient=np.zeros(1, int), rule=np.zeros(1, int), day=np.array([INDEX]), value=np.array([1.0]))
    assert np.isnan(one.results()[0, 0]), "sd of one reading"


def test_aggregator_refuses_bad_input_and_rules_validate():
    agg = StreamAggregator(RULES, index_day=INDEX, patients=2)
    with pytest.raises(ValueError, match="out of range"):
        agg.add(patient=np.array([2]), rule=np.array([0]), day=np.array([INDEX]), value=np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        agg.add(patient=np.array([0]), rule=np.array([0]), day=np.array([INDEX]), value=np.array([np.nan]))
    for bad in ({"unit": "furlong"}, {"aggregate": "median"}, {"window_days": 0}, {"codes": ()}):
        with pytest.raises(ValueError):
            SensorRule(**{"feature": "f", "codes": (HR,), "unit": "/min", "window_days": 7, "aggregate": "mean", **bad})


def test_rule_index_matches_exact_codes_prefixes_and_icd10_and_converts_units():
    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    rules = (SensorRule("a", (HR, Code(icd, "F32", True)), "/min", 7, "mean"),
             SensorRule("b", (HR,), "/min", 7, "sd"), SensorRule("c", (Code(LOINC, "41950", True),), "/d", 7, "mean"))
    index = RuleIndex(rules, unit_aliases={"bpm": "/min"})
    assert index.match(LOINC, "8867-4") == (0, 1)
    assert index.match(icd, "f32.1") == (0,) and index.match(icd, "F33") == ()
    assert index.match(LOINC, "41950-7") == (2,) and index.match("other", "8867-4") == ()
    assert index.conversion(0, "BPM")(72.0) == 72.0 and index.conversion(0, "kg") is None
    reading, rule = index.pairs([LOINC, icd], ["8867-4", "F32.9", "x"], np.array([0, 1, 0, 0]), np.array([0, 1, 2, 0]))
    assert reading.tolist() == [0, 0, 1, 3, 3] and rule.tolist() == [0, 1, 0, 0, 1]


# --- the readings reader ------------------------------------------------------------------------


def test_units_convert_sleep_minutes_and_hrv_seconds(tmp_path):
    lines = [HEADER,
             f"p0,{iso(INDEX - 1)},{LOINC},93832-4,420,min", f"p0,{iso(INDEX - 2)},{LOINC},93832-4,8,h",
             f"p0,{iso(INDEX - 3)},{LOINC},93832-4,27000,s", f"p0,{iso(INDEX - 1)},{LOINC},80404-7,0.05,s",
             f"p0,{iso(INDEX - 2)},{LOINC},80404-7,30,ms", f"p0,{iso(INDEX)},{LOINC},8867-4,60,bpm",
             f"p0,{iso(INDEX)},{LOINC},8867-4,80,{{beats}}/min"]
    path = tmp_path / "train.readings.csv"
    path.write_text("\n".join(lines) + "\n")
    out, report = read(path, {"p0": 0})
    assert out[0, 4] == pytest.approx((7 + 8 + 7.5) / 3)
    assert out[0, 2] == pytest.approx(40.0)
    assert out[0, 0] == 70.0 and out[0, 5] == pytest.approx(3 / 7)
    assert report.conversions["min→h"] == 2 and report.conversions["s→h"] == 2 and report.conversions["s→ms"] == 1
    assert report.readings_used == 7 and not report.quarantined


def test_each_quarantine_reason_is_reported_with_its_line(tmp_path):
    good = f"{LOINC},8867-4"
    lines = [HEADER,
             f"p0,{iso(INDEX)},{good},70,/min",  # 2
             f"p0,2024-02-30,{good},70,/min",  # 3: no such day
             f"p0,{iso(INDEX)}T25:00,{good},70,/min",  # 4: no such hour
             f"p0,{iso(TODAY + 1)},{good},70,/min",  # 5: after today
             f"p0,{iso(INDEX)},{good},,/min",  # 6
             f"p0,{iso(INDEX)},{good},seventy,/min",  # 7
             f"p0,{iso(INDEX)},{good},inf,/min",  # 8
             f"p0,{iso(INDEX)},{good},70,kg",  # 9
             f"p0,{iso(INDEX)},{good},70",  # 10
             "",  # 11: an empty line is skipped, and still counted as a line
             f",{iso(INDEX)},{good},70,/min",  # 12
             f"p0,{iso(INDEX)},{LOINC},80404-7,1e308,s",  # 13: 1e311 ms is not finite
             f"p9,{iso(INDEX)},{good},70,/min",  # 14: not in the table: counted
             f"p0,{iso(INDEX)},{LOINC},0000-0,70,/min",  # 15: no rule: ignored
             f"p0,{iso(INDEX - 400)},{good},70,/min"]  # 16: outside every window: counted
    path = tmp_path / "r.csv"
    path.write_text("\n".join(lines) + "\n")
    out, report = read(path, {"p0": 0})
    assert report.examples == {TIME_BAD: [3, 4], FUTURE: [5], MISSING: [6], NOT_NUMBER: [7], NOT_FINITE: [8, 13],
                               "unit: not convertible to /min": [9], "expected 6 columns, got 5": [10],
                               "patient_id: missing": [12]}
    assert report.unknown_patients == 1 and report.ignored == 1
    assert report.outside_window == {"hr_mean": 1, "hr_sd": 1}
    assert report.readings_read == 14 and report.readings_used == 1
    assert report.unit_mismatches == {"kg→/min": 1}
    assert out[0, 0] == 70.0 and np.isnan(out[0, 1])


def test_report_never_shows_a_value_or_a_patient_id(tmp_path):
    lines = [HEADER, f"SECRET-PID-1,{iso(INDEX)},{LOINC},8867-4,987.654321,/min",
             f"SECRET-PID-2,{iso(INDEX)},{LOINC},8867-4,123456789,kg", f"SECRET-PID-1,{iso(INDEX)},{LOINC},8867-4,oops123,/min",
             f"SECRET-PID-1,{iso(INDEX)},{LOINC},8867-4,5,55555-secret-unit", "SECRET-PID-3,x,y"]
    path = tmp_path / "r.csv"
    path.write_text("\n".join(lines) + "\n")
    _, report = read(path, {"SECRET-PID-1": 0, "SECRET-PID-2": 1})
    text = report.summary() + repr(report.examples) + repr(report.unit_mismatches)
    for secret in ("SECRET", "987", "123456789", "oops", "55555"):
        assert secret not in text
    assert "(other unit)→/min" in text


def test_damaged_files_do_not_crash_and_keep_their_good_lines(tmp_path):
    rng = np.random.default_rng(5)
    rows = random_readings(rng, 20, 30)
    patients = {f"p{i}": i for i in range(20)}
    whole = write_csv(tmp_path / "clean.csv", rows).read_bytes()
    head, body = whole[:len(HEADER) + 1], whole[len(HEADER) + 1:]
    damaged = {
        "truncated": whole[: len(whole) // 2 + 7],
        "not-utf8": head + body.replace(b"\n", b"\n\xff\xfe", 3),
        "stray-quote": head + body.replace(b"\np1,", b'\n"p1,', 2),
        "long-line": head + b"x" * (1 << 21) + b"\n" + body,
        "lone-cr": head + body.replace(b"\n", b"\r", 5),
        "binary": whole[:200] + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes() + whole[200:],
        "nul-bytes": head + body.replace(b",", b"\0", 40),
    }
    for name, data in damaged.items():
        path = tmp_path / f"{name}.csv"
        path.write_bytes(data)
        for block in (300, 1 << 20):
            out, report = read(path, patients, block_bytes=block)
            assert out.shape == (20, len(RULES)), name
            assert report.readings_used > 0, name
            if name == "long-line":
                assert report.examples == {"line longer than 1048576 bytes": [2]}, block
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(HEADER.encode() + b"\n" + rng.integers(0, 256, 50000, dtype=np.uint8).tobytes())
    out, report = read(garbage, patients, block_bytes=512)
    assert np.isnan(out[:, 0]).all() and report.readings_used == 0


def test_header_and_file_errors_name_the_file_and_the_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("patient_id,time,system,code,value\np0,2024-01-01,s,c,1\n")
    with pytest.raises(SiteDataError, match=r"r\.csv: line 1: missing column unit"):
        read(path, {})
    path.write_text("patient_id,time,system,code,value,unit,value\n")
    with pytest.raises(SiteDataError, match="duplicated column value"):
        read(path, {})
    path.write_text("")
    with pytest.raises(SiteDataError, match="empty file"):
        read(path, {})
    with pytest.raises(SiteDataError, match="file not found"):
        read(tmp_path / "absent.csv", {})
    pq.write_table(pa.table({"patient_id": ["p0"], "time": ["2024-01-01"], "code": ["c"], "value": [1.0],
                             "unit": ["h"]}), tmp_path / "r.parquet")
    with pytest.raises(SiteDataError, match=r"r\.parquet: schema: missing column system"):
        read(tmp_path / "r.parquet", {})
    table = pa.table({"patient_id": ["p0"] * 5000, "time": ["2024-02-20"] * 5000, "system": [LOINC] * 5000,
                      "code": ["8867-4"] * 5000, "value": np.linspace(50, 90, 5000), "unit": ["/min"] * 5000})
    pq.write_table(table, tmp_path / "ok.parquet", row_group_size=1000)
    data = bytearray((tmp_path / "ok.parquet").read_bytes())
    data[4:204] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()  # the first page header
    (tmp_path / "damaged.parquet").write_bytes(bytes(data))
    _, report = read(tmp_path / "damaged.parquet", {"p0": 0})
    assert list(report.examples.values()) == [[1]] and "unreadable from here on" in report.summary()
    (tmp_path / "cut.parquet").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SiteDataError, match="not a readable Parquet file"):
        read(tmp_path / "cut.parquet", {})
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SiteDataError, match="not a readable Parquet file"):
        read(tmp_path / "bad.parquet", {})
    path.write_text(HEADER + ",note\n")
    out, report = read(path, {"p0": 0})
    assert report.ignored_columns == ["note"] and report.readings_read == 0 and np.isnan(out[0, 0])


def test_parquet_and_csv_give_the_same_result_whatever_the_chunks(tmp_path):
    rng = np.random.default_rng(11)
    rows = random_readings(rng, 50, 60)
    patients = {f"p{i}": (i * 7) % 45 for i in range(45)}  # some patients unknown; rows in another order
    csv_path = write_csv(tmp_path / "train.readings.csv", rows)
    base, report = read(csv_path, patients)
    assert report.unknown_patients > 0 and report.readings_used > 0
    strings = pa.csv.read_csv(csv_path, convert_options=pa.csv.ConvertOptions(
        column_types={c: pa.string() for c in HEADER.split(",")}))
    typed = pa.table({"patient_id": [r[0] for r in rows], "time": pa.array([datetime.date.fromordinal(r[1]) for r in rows]),
                      "system": pa.array([r[2].system for r in rows]).dictionary_encode(), "code": [r[2].code for r in rows],
                      "value": [r[3] for r in rows], "unit": [r[4] for r in rows]})
    stamps = typed.set_column(1, "time", pa.array([datetime.datetime.fromordinal(r[1]).replace(hour=23) for r in rows],
                                                  pa.timestamp("s", tz="America/New_York")))
    for name, table in (("strings", strings), ("typed", typed), ("stamps", stamps)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        for batch in (1, 97, 65536) if name == "strings" else (97, 65536):
            out, parquet_report = read(tmp_path / f"{name}.parquet", patients, batch_rows=batch)
            assert same_bits(out, base), (name, batch)
            assert parquet_report.used == report.used and parquet_report.readings_used == report.readings_used
    for block in (64, 333, 4096):
        assert same_bits(read(csv_path, patients, block_bytes=block)[0], base), block


def test_quoted_cells_datetimes_and_white_space_read_like_plain_ones(tmp_path):
    rng = np.random.default_rng(2)
    rows = random_readings(rng, 10, 40)
    patients = {f"p{i}": i for i in range(10)}
    plain = read(write_csv(tmp_path / "plain.csv", rows), patients)[0]
    with (tmp_path / "quoted.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        writer.writerow(HEADER.split(","))
        for i, (pid, day, code, value, unit) in enumerate(rows):
            when = [iso(day), f"{iso(day)}T23:59:60.5+14:00", f"{iso(day)}T00:00Z", f" {iso(day)}T08:30:00-11:00 "][i % 4]
            writer.writerow([pid, when, code.system, code.code, f" {value!r} ", unit])
    assert same_bits(read(tmp_path / "quoted.csv", patients)[0], plain)


def test_time_parsing_agrees_with_the_fhir_reader(tmp_path):
    times = ["2024-02-29", "2023-02-29", "2024-02-29T10:00", "2024-02-29T10:00:59", "2024-02-29T23:59:60.123Z",
             "2024-02-29T10:00+01:00", "2024-02-29T24:00", "2024-02-29T10", "2024-02-29 10:00", "2024-2-29",
             "20240229", "2024-02-29T10:00:00+1:00", "2024-13-01", "0000-01-01", "2024-02-29Z", "2024-02-29T10:61"]
    lines = [HEADER] + [f"p{i},{t},{LOINC},8867-4,{i + 1},/min" for i, t in enumerate(times)]
    path = tmp_path / "r.csv"
    path.write_text("\n".join(lines) + "\n")
    wide = (SensorRule("hr", (HR,), "/min", 10_000, "mean"),)
    report = ReadingsReport()
    out = read_readings(path, rules=wide, patients={f"p{i}": i for i in range(len(times))}, index_day=INDEX,
                        today=INDEX, report=report)
    for i, text in enumerate(times):
        assert np.isnan(out[i, 0]) == (parse_day(text) is None), text


def test_one_patient_inference_path_equals_the_table_path_bit_for_bit(tmp_path):
    rng = np.random.default_rng(8)
    rows = random_readings(rng, 30, 120)
    rows += [("p3", INDEX - 2, SLEEP, 455.0, "min"), ("p3", INDEX - 1, HRV, 0.0431, "s"), ("p3", INDEX, HR, 71.3, "bpm")]
    patients = {f"p{i}": i for i in range(30)}
    table, _ = read(write_csv(tmp_path / "r.csv", rows), patients, block_bytes=512)
    index = RuleIndex(RULES)  # the kernel's unit aliases, as the reader's
    for p in (0, 3, 17):
        mine = [Reading(code.system, code.code, day, float(repr(value)), unit)
                for pid, day, code, value, unit in rows if pid == f"p{p}" and day <= TODAY]
        served = aggregate_patient(RULES, mine, index_day=INDEX, index=index)
        assert same_bits(served, table[p]), p
