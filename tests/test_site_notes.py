"""Clinician notes and wearable streams at a site: the study's `[notes]` and derived features, the
tabular and FHIR readers, the synthetic cohorts, and the one derivation the prediction service shares.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.check import check_site_export
from client.data import SiteDataError, load_site, read_site_csv
from client.fhir import read_site_fhir
from fedcare.derived import Derivation, calendar_day
from fedcare.errors import StudyConfigError
from fedcare.notes import NoteReader
from fedcare.streams import Reading
from fedcare.study import load_study, parse_study
from simulations.cohorts import write_cohorts
from simulations.fhir_cohorts import write_fhir_site
from simulations.notes_corpus import STUDY_MARKERS

from .conftest import DEFAULT_STUDY, ROOT

NOTES_STUDY = ROOT / "studies" / "depression-risk-notes.toml"


@pytest.fixture(scope="module")
def notes_study():
    return load_study(NOTES_STUDY)


@pytest.fixture(scope="module")
def notes_sites(notes_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("notes-sites")
    manifest = write_cohorts(notes_study, out, hospitals=2, seed=4, size_scale=0.1)
    return out, manifest


def _raw(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_studies_written_before_notes_keep_their_hash():
    # the values of commit 7acc80c: ledgers and packages made before notes existed stay valid
    assert load_study(DEFAULT_STUDY).hash == "9b018286726722ff3f41cf523907a03c6c2a6aa9506daf09042f4b3978a14093"
    assert load_study(ROOT / "studies" / "breast-cancer.toml").hash == (
        "41b6aff130823b84d0c83ab5c6b6f41dd4bac6ec283b0f86922cb0f3ba19229d")


def test_the_notes_study_parses_markers_rules_and_the_hashed_block(notes_study):
    assert {m.name: m.phrases for m in notes_study.notes.markers} == {m.name: m.phrases for m in STUDY_MARKERS}
    hashing = notes_study.notes.hashing
    assert notes_study.hashed_feature_names == tuple(f"note_hash_{i:03d}" for i in range(32)) == hashing.feature_names
    assert [f.name for f in notes_study.features[-32:]] == list(hashing.feature_names)
    derivation = Derivation(notes_study)
    assert len(derivation.note_rules) == 7 and len(derivation.sensor_rules) == 4
    assert len(derivation.columns) == 7 + 4 + 32
    again = parse_study(_raw_toml(notes_study.to_toml()), "again")
    assert again == notes_study and again.hash == notes_study.hash
    assert len(notes_study.input_names) == len(notes_study.features) + sum(
        f.missing == "indicator" for f in notes_study.features)


def _raw_toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["mapping"]["features"]["anhedonia_mentions_12m"].update(marker="apathy"),
     "mapping.features.anhedonia_mentions_12m.marker: no marker 'apathy' (markers: anhedonia, hopelessness"),
    (lambda r: r["mapping"]["features"]["anhedonia_mentions_12m"].update(aggregate="mean"),
     "mapping.features.anhedonia_mentions_12m.aggregate: 'mean' is not allowed for source 'note' "
     "(allowed: count, any, days_since)"),
    (lambda r: r["mapping"]["features"]["sleep_sd_30d"].update(unit="furlongs"),
     "mapping.features.sleep_sd_30d.unit: no known conversion to 'furlongs'"),
    (lambda r: r["notes"]["markers"].update(anhedonia=[]),
     "notes.markers.anhedonia: expected a non-empty list of phrases"),
    (lambda r: r["notes"]["markers"].update(anhedonia=["..."]),
     "notes.markers.anhedonia[0]: expected a phrase with at least one letter or digit"),
    (lambda r: r["notes"]["hashing"].update(dimension=100000), "notes.hashing.dimension: must be <= 4096"),
    (lambda r: r["notes"]["hashing"].update(size=8), "notes.hashing.size: unknown key"),
    (lambda r: r.pop("mapping"), "notes.hashing: needs a [mapping]"),
])
def test_a_mistake_in_notes_or_derived_rules_names_its_field(change, message):
    raw = _raw(NOTES_STUDY)
    change(raw)
    with pytest.raises(StudyConfigError) as err:
        parse_study(raw, "s.toml")
    assert str(err.value).startswith("s.toml: ") and message in str(err.value)


def test_synthetic_sites_have_notes_and_streams_with_distractors(notes_sites):
    root, manifest = notes_sites
    assert manifest["modalities"] is True
    site = root / manifest["sites"][0]["name"]
    notes, readings = _rows(site / "train.notes.csv"), _rows(site / "train.readings.csv")
    assert len(notes) > 50 and len(readings) > 1000
    assert {r["unit"] for r in readings} >= {"h", "min", "/d", "{steps}/d", "/min", "{beats}/min"}
    text = " ".join(n["text"].lower() for n in notes)
    for cue in ("denies", "mother", "history of"):
        assert cue in text


def _reference_counts(study, site: Path, split: str) -> dict[str, np.ndarray]:
    """Affirmed mentions per note feature computed directly from the notes file (no aggregator)."""
    table = _rows(site / f"{split}.csv")
    ids = [r["patient_id"] for r in table]
    mapping = study.mapping
    index = mapping.index_date.toordinal()
    reader = NoteReader(study.notes.markers)
    out = {name: np.zeros(len(ids)) for name, rule in mapping.features.items() if rule.source == "note"
           and rule.aggregate == "count"}
    row = {pid: i for i, pid in enumerate(ids)}
    for note in _rows(site / f"{split}.notes.csv"):
        age = index - calendar_day(note["date"])
        found = reader.mentions(note["text"])
        for name in out:
            rule = mapping.features[name]
            if 0 <= age < rule.window_days:
                out[name][row[note["patient_id"]]] += sum(m.affirmed and m.marker == rule.marker for m in found)
    return out


def test_a_tabular_site_derives_note_and_sensor_features(notes_study, notes_sites):
    root, manifest = notes_sites
    site = root / manifest["sites"][0]["name"]
    data = load_site(notes_study, site)
    names = [f.name for f in notes_study.features]
    train = data.train.features
    assert len(train) == manifest["sites"][0]["train_rows"]
    for name, counts in _reference_counts(notes_study, site, "train").items():
        np.testing.assert_array_equal(train[:, names.index(name)], counts, err_msg=name)
        assert counts.sum() > 0, name
    # streams: heart rate mean over 14 days, against numpy on the file
    index = notes_study.mapping.index_date.toordinal()
    ids = [r["patient_id"] for r in _rows(site / "train.csv")]
    hr: dict[str, list[float]] = {}
    for r in _rows(site / "train.readings.csv"):
        if r["code"] == "8889-8" and 0 <= index - calendar_day(r["time"]) < 14:
            hr.setdefault(r["patient_id"], []).append(float(r["value"]))
    column = train[:, names.index("heart_rate_mean_14d")]
    for i, pid in enumerate(ids):
        if pid in hr:
            assert column[i] == pytest.approx(np.mean(hr[pid]), rel=1e-12)
        else:
            assert math.isnan(column[i])
    assert 0 < np.isnan(column).mean() < 1
    report = data.train.report.summary()
    assert "notes file train.notes.csv:" in report and "marker suicidal_ideation:" in report
    assert "readings" in report


def test_fhir_rendering_of_notes_and_streams_derives_the_same_table(notes_study, notes_sites, tmp_path):
    root, manifest = notes_sites
    site = tmp_path / "site"
    shutil.copytree(root / manifest["sites"][1]["name"], site)
    summary = write_fhir_site(notes_study, notes_study.mapping, site)
    assert summary["train"]["modalities"]["Binary"] > 0
    export_date = notes_study.mapping.index_date + datetime.timedelta(days=365)
    for split in ("train", "test"):
        tabular = read_site_csv(notes_study, site / f"{split}.csv")
        fhir = read_site_fhir(notes_study, notes_study.mapping, site / split, today=export_date)
        np.testing.assert_array_equal(fhir.labels, tabular.labels)
        np.testing.assert_allclose(fhir.features, tabular.features, rtol=1e-9, atol=1e-9, equal_nan=True)
        derived = sorted(Derivation(notes_study).columns)
        np.testing.assert_array_equal(fhir.features[:, derived[:7]], tabular.features[:, derived[:7]])
        text = fhir.report.summary()
        assert "DocumentReference" in text and "notes: " in text and "marker hopelessness:" in text


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)


def test_bad_note_records_are_quarantined_with_their_line_and_nothing_else_is_lost(notes_study, notes_sites, tmp_path):
    root, manifest = notes_sites
    site = tmp_path / "site"
    shutil.copytree(root / manifest["sites"][0]["name"], site)
    rows = _rows(site / "train.notes.csv")
    pid = rows[0]["patient_id"]
    bad = [[pid, "2025-13-01", "reports hopelessness"], [pid, "2031-01-01", "reports hopelessness"],
           [pid, "2025-06-01", "   "], ["nobody", "2025-06-01", "reports hopelessness"]]
    _write(site / "train.notes.csv", ["patient_id", "date", "text"],
           [[r["patient_id"], r["date"], r["text"]] for r in rows] + bad)
    before = load_site(notes_study, root / manifest["sites"][0]["name"]).train
    after = read_site_csv(notes_study, site / "train.csv")
    np.testing.assert_array_equal(after.features, before.features)  # the bad records changed nothing
    text = after.report.summary()
    n = (site / "train.notes.csv").read_text(encoding="utf-8").count("\n") - 4  # the bad records: the last 4 lines
    assert f"quarantined 1: date: not a date (YYYY-MM-DD or a dateTime) (lines {n + 1})" in text
    assert f"quarantined 1: date: in the future (lines {n + 2})" in text
    assert f"quarantined 1: text: empty (lines {n + 3})" in text
    assert "1 of patients not in the table" in text
    assert "hopelessness" not in text.replace("marker hopelessness", "")  # counts, never text


def test_a_missing_notes_file_or_patient_id_column_is_one_clear_error(notes_study, notes_sites, tmp_path):
    root, manifest = notes_sites
    site = tmp_path / "site"
    shutil.copytree(root / manifest["sites"][0]["name"], site)
    (site / "test.notes.csv").unlink()
    with pytest.raises(SiteDataError, match=r"test.csv: the study derives features from clinician notes: "
                                            r"expected test.notes.csv beside it"):
        read_site_csv(notes_study, site / "test.csv")
    table = _rows(site / "train.csv")
    _write(site / "train.csv", [k for k in table[0] if k != "patient_id"],
           [[v for k, v in r.items() if k != "patient_id"] for r in table])
    with pytest.raises(SiteDataError, match="missing columns required by the study: patient_id"):
        read_site_csv(notes_study, site / "train.csv")


def test_the_coded_study_reads_the_same_sites(study, notes_sites):
    root, manifest = notes_sites
    data = load_site(study, root / manifest["sites"][0]["name"])
    assert data.train.report.ignored_columns == ["patient_id"]
    assert data.train.features.shape[1] == len(study.features)


def test_data_check_reports_counts_and_never_a_note_or_a_reading(notes_study, notes_sites):
    root, manifest = notes_sites
    site = root / manifest["sites"][0]["name"]
    check = check_site_export(notes_study, site)
    assert not check.fatal, check.text
    assert "marker suicidal_ideation:" in check.text and "mentions" in check.text and "negated" in check.text
    for note in _rows(site / "train.notes.csv")[:200]:
        for sentence in note["text"].split("."):
            if len(sentence.strip()) >= 20:
                assert sentence.strip() not in check.text
    assert "p000" not in check.text  # no patient id
    values = {r["value"] for r in _rows(site / "train.readings.csv") if "." in r["value"]}
    assert not any(v in check.text for v in values if len(v) >= 5)


def test_the_served_row_equals_the_training_row_bit_for_bit(notes_study, notes_sites):
    root, manifest = notes_sites
    site = root / manifest["sites"][0]["name"]
    table = read_site_csv(notes_study, site / "train.csv")
    ids = [r["patient_id"] for r in _rows(site / "train.csv")]
    notes: dict[str, list] = {}
    for n in _rows(site / "train.notes.csv"):
        notes.setdefault(n["patient_id"], []).append((calendar_day(n["date"]), n["text"]))
    readings: dict[str, list] = {}
    for r in _rows(site / "train.readings.csv"):
        readings.setdefault(r["patient_id"], []).append(
            Reading(system=r["system"], code=r["code"], day=calendar_day(r["time"]), value=float(r["value"]),
                    unit=r["unit"]))
    derivation = Derivation(notes_study)
    columns = sorted(derivation.columns)
    for i in range(0, len(ids), max(1, len(ids) // 40)):
        served = derivation.patient_values(notes=notes.get(ids[i], []), readings=readings.get(ids[i], []),
                                           index_day=derivation.index_day)
        np.testing.assert_array_equal(served[columns], table.features[i, columns], err_msg=ids[i])


def test_the_note_reader_agrees_with_medspacy_context_on_held_out_notes():
    """fedcare's own ConText (fedcare/notes.py) against medspacy's default pipeline (PyRuSH sentences,
    target matcher, ConText) on synthetic notes with every kind of distractor: which spans are mentions
    and each mention's negated / hypothetical / historical / family / uncertain flags."""
    from loguru import logger

    logger.remove()  # medspacy's PyRuSH logs every sentence at DEBUG
    import medspacy
    from medspacy.target_matcher import TargetRule

    from simulations.notes_corpus import labelled_corpus

    nlp = medspacy.load()
    nlp.get_pipe("medspacy_target_matcher").add([TargetRule(p, m.name) for m in STUDY_MARKERS for p in m.phrases])
    reader = NoteReader(STUDY_MARKERS)
    total = agree = 0
    kinds: dict[str, int] = {}
    for note in labelled_corpus(120, seed=2468, length=2000):
        ref = {(e.start_char, e.end_char): (e._.is_negated, e._.is_hypothetical, e._.is_historical, e._.is_family,
                                            e._.is_uncertain) for e in nlp(note).ents}
        mine = {(m.start, m.end): (m.negated, m.hypothetical, m.historical, m.family, m.uncertain)
                for m in reader.mentions(note)}
        for span in set(ref) | set(mine):
            total += 1
            if ref.get(span) == mine.get(span):
                agree += 1
            else:
                kind = "missed" if span not in mine else "extra" if span not in ref else "flags"
                kinds[kind] = kinds.get(kind, 0) + 1
    assert total > 1000
    assert agree / total >= 0.99, kinds
