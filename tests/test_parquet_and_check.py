"""Parquet splits read like CSV ones, and `fedcare data check` reports counts only."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.data import SiteDataError, load_site, read_site_csv, read_site_parquet

from .conftest import DEFAULT_STUDY


def _to_parquet(csv_path, out_path, **column_overrides):
    import csv

    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    columns = {}
    for name in rows[0]:
        cells = [r[name] for r in rows]
        columns[name] = pa.array([float(c) if c not in ("",) else None for c in cells], type=pa.float64())
    columns.update(column_overrides)
    pq.write_table(pa.table(columns), out_path)
    return len(rows)


def test_parquet_split_equals_the_csv_split(study, cohorts_dir, tmp_path):
    n = _to_parquet(cohorts_dir / "hospital-01" / "train.csv", tmp_path / "train.parquet")
    from_csv = read_site_csv(study, cohorts_dir / "hospital-01" / "train.csv")
    from_parquet = read_site_parquet(study, tmp_path / "train.parquet", batch_rows=97)  # several batches
    assert from_parquet.report.rows_loaded == from_csv.report.rows_loaded == n
    np.testing.assert_array_equal(np.isnan(from_parquet.features), np.isnan(from_csv.features))
    np.testing.assert_allclose(np.nan_to_num(from_parquet.features), np.nan_to_num(from_csv.features), rtol=1e-12)
    np.testing.assert_array_equal(from_parquet.labels, from_csv.labels)


def test_parquet_bad_cells_and_wrong_column_types_are_quarantined(study, cohorts_dir, tmp_path):
    import csv

    with (cohorts_dir / "hospital-01" / "train.csv").open() as handle:
        n = sum(1 for _ in csv.DictReader(handle))
    ages = pa.array(["forty"] + ["50"] * (n - 1), type=pa.string())  # a string column: parsed per cell
    labels = pa.array([0.0, 2.0] + [1.0] * (n - 2))
    _to_parquet(cohorts_dir / "hospital-01" / "train.csv", tmp_path / "t.parquet", age=ages, episode_12m=labels)
    table = read_site_parquet(study, tmp_path / "t.parquet")
    assert table.report.quarantined["age: not a number"] == 1
    assert table.report.quarantined["episode_12m: label must be 0 or 1"] == 1
    assert table.report.rows_loaded == n - 2
    (tmp_path / "broken.parquet").write_bytes((tmp_path / "t.parquet").read_bytes()[:200])
    with pytest.raises(SiteDataError, match="not a readable Parquet file"):
        read_site_parquet(study, tmp_path / "broken.parquet")
    pq.write_table(pa.table({"age": [40.0]}), tmp_path / "cols.parquet")
    with pytest.raises(SiteDataError, match="schema: missing columns required by the study: sex_female"):
        read_site_parquet(study, tmp_path / "cols.parquet")


def test_a_site_may_mix_formats_per_split(study, cohorts_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _to_parquet(cohorts_dir / "hospital-02" / "train.csv", site / "train.parquet")
    shutil.copy(cohorts_dir / "hospital-02" / "test.csv", site / "test.csv")
    data = load_site(study, site)
    assert data.train.report.path.endswith("train.parquet") and data.test.report.path.endswith("test.csv")


def _check(*args):
    return subprocess.run([sys.executable, "-m", "cli", "data", "check", "--study", str(DEFAULT_STUDY), *args],
                          capture_output=True, text=True, timeout=120)


def test_data_check_prints_counts_never_values(study, cohorts_dir, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(cohorts_dir / "hospital-03", site)
    lines = (site / "train.csv").read_text().splitlines()
    secret = "77.7777"
    cells = lines[1].split(",")
    cells[0] = secret  # a real value that must never be echoed
    lines[1] = ",".join(cells)
    bad = lines[2].split(",")
    bad[0] = "130"  # out of range
    lines[2] = ",".join(bad)
    (site / "train.csv").write_text("\n".join(lines) + "\n")
    proc = _check("--data", str(site))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[train] csv" in out and "[test] csv" in out
    assert f"records read {len(lines) - 1}, patients built {len(lines) - 2}, quarantined 1" in out
    assert "quarantined 1: age: outside valid range [18, 100] years (lines 3)" in out
    assert "missing values by feature:" in out
    assert secret not in out and "130" not in out.replace("[18, 100]", "")


def test_data_check_fails_on_fatal_problems(tmp_path):
    (tmp_path / "train.csv").write_text("age,bmi\n40,22\n")
    proc = _check("--data", str(tmp_path / "train.csv"))
    assert proc.returncode == 2
    assert "FATAL" in proc.stderr and "missing columns required by the study" in proc.stderr
    proc = _check("--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_data_check_warns_when_the_training_split_has_one_class(study, cohorts_dir, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(cohorts_dir / "hospital-03", site)
    lines = (site / "train.csv").read_text().splitlines()
    label = lines[0].split(",").index(study.label.name)
    rows = [line.split(",") for line in lines[1:]]
    for cells in rows:
        cells[label] = "0"
    (site / "train.csv").write_text("\n".join([lines[0]] + [",".join(cells) for cells in rows]) + "\n")
    proc = _check("--data", str(site))
    assert proc.returncode == 0, proc.stderr
    assert f"WARNING: every training row has {study.label.name} = 0 (no cases)" in proc.stdout
    assert proc.stdout.count("WARNING") == 1  # the test split is not the model's to learn from
