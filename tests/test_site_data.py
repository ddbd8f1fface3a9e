import pytest

from client.data import SiteDataError, load_site, read_site_csv


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
    ] + [_row(study)] * 8  # most of the file is good (a file that lost most of its lines is refused whole)
    table = read_site_csv(study, _csv(study, tmp_path, rows))
    assert table.features.shape == (11, len(study.features))
    assert table.labels.tolist() == [0.0, 0.0, 1.0] + [0.0] * 8
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
    assert "11/18 rows loaded" in summary and "abc" not in summary


def test_real_export_quirks_get_a_clear_result(study, tmp_path):
    """A byte-order mark is read; a quote left open, a split that is a directory, and a file that
    lost most of its lines are each one clear error naming the file (and the line)."""
    good = _csv(study, tmp_path, [_row(study)] * 20)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + good.read_bytes())
    assert read_site_csv(study, bom).report.rows_loaded == 20

    lines = good.read_text().splitlines()
    lines[3] = '"' + lines[3]  # an opening quote that is never closed swallows the rest of the file
    open_quote = tmp_path / "open-quote.csv"
    open_quote.write_text("\n".join(lines) + "\n")
    with pytest.raises(SiteDataError) as refused:
        read_site_csv(study, open_quote)
    assert "only 2 of 20 data lines loaded; the file is not used" in str(refused.value)
    assert "a quoted field runs from line 4 to line 21: a quote left open?" in str(refused.value)

    mostly_bad = _csv(study, tmp_path, [_row(study)] * 4 + [_row(study, age=130)] * 8)
    with pytest.raises(SiteDataError, match=r"only 4 of 12 data lines loaded"):
        read_site_csv(study, mostly_bad)

    site = tmp_path / "site"
    (site / "train.csv").mkdir(parents=True)
    with pytest.raises(SiteDataError, match=r"train.csv: is a directory, expected a CSV file"):
        load_site(study, site)


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
