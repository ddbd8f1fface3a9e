import pytest

from client.data import SiteDataError, read_site_csv


def _csv(study, tmp_path, rows, header=None):
    names = header or [f.name for f in study.features] + [study.label.name]
    path = tmp_path / "train.csv"
    path.write_text("\n".join([",".join(names)] + rows) + "\n")
    return path


def _row(study, **overrides):
    values = {f.name: str(f.center if f.type == "numeric" else int(f.low)) for f in study.features}
    values[study.label.name] = "0"
    values.update({k: str(v) for k, v in overrides.items()})
    return ",".join(values[f.name] for f in study.features) + "," + values[study.label.name]


def test_good_rows_load_and_bad_rows_are_quarantined_with_reasons(study, tmp_path):
    rows = [
        _row(study),
        _row(study, phq9_latest="abc"),
        _row(study, age=130),
        _row(study, bmi="nan"),
        _row(study, resting_hr="inf"),
        _row(study, age=""),
        _row(study, ed_visits_12m="2.5"),
        _row(study, episode_12m="yes"),
        _row(study, sleep_hours="", episode_12m="1"),
        "1,2,3",
    ]
    table = read_site_csv(study, _csv(study, tmp_path, rows))
    assert table.features.shape == (3, len(study.features))
    assert table.labels.tolist() == [0.0, 0.0, 1.0]
    q = table.report.quarantined
    assert q["phq9_latest: not a number"] == 1
    assert q["age: outside valid range [18, 100] years"] == 1
    assert q["resting_hr: not finite (NaN/Inf)"] == 1
    assert q["age: missing but the study's policy is 'reject'"] == 1
    assert q["ed_visits_12m: a count must be a whole number"] == 1
    assert q["episode_12m: label must be 0 or 1"] == 1
    assert q[f"expected {len(study.features) + 1} columns, got 3"] == 1
    assert table.report.examples["phq9_latest: not a number"] == [3]
    assert table.report.missing_by_feature == {"bmi": 1, "sleep_hours": 1}
    summary = table.report.summary()
    assert "3/10 rows loaded" in summary and "abc" not in summary


def test_missing_column_is_fatal_and_named(study, tmp_path):
    header = [f.name for f in study.features if f.name != "gad7_latest"] + [study.label.name]
    path = _csv(study, tmp_path, [], header=header)
    with pytest.raises(SiteDataError, match="line 1: missing columns required by the study: gad7_latest"):
        read_site_csv(study, path)


def test_empty_and_absent_files(study, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SiteDataError, match="empty file"):
        read_site_csv(study, empty)
    with pytest.raises(SiteDataError, match="file not found"):
        read_site_csv(study, tmp_path / "nope.csv")


def test_no_usable_rows_is_fatal(study, tmp_path):
    with pytest.raises(SiteDataError, match="no usable rows"):
        read_site_csv(study, _csv(study, tmp_path, [_row(study, age=5)]))


def test_extra_columns_are_ignored_and_reported(study, tmp_path):
    header = [f.name for f in study.features] + [study.label.name, "mrn"]
    path = _csv(study, tmp_path, [_row(study) + ",12345"], header=header)
    table = read_site_csv(study, path)
    assert table.report.ignored_columns == ["mrn"]
    assert len(table.labels) == 1
