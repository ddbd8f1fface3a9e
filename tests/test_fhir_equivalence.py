"""The FHIR and CSV forms of the same synthetic hospitals derive the same features and labels.

`simulations/fhir_cohorts.py` renders each CSV row as FHIR R4 resources (varied units,
distractors, records just outside windows); `client.fhir.read_site_fhir` derives them back
through the study's `[mapping]` (docs/FHIR.md). Both readers must agree cell by cell.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client.data import read_site_csv
from client.fhir import read_site_fhir
from fedcare.study import load_mapping
from simulations.cohorts import ALWAYS_RECORDED, PDC_DAYS, write_cohorts
from simulations.fhir_cohorts import NotRepresentable, patient_id, write_fhir_cohorts, write_fhir_split

from .conftest import DEFAULT_STUDY

SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def mapping():
    return load_mapping(DEFAULT_STUDY)


@pytest.fixture(scope="module")
def export_date(mapping):
    """The export is made once the label window has closed (records after it would be 'in the future')."""
    return mapping.index_date + datetime.timedelta(days=mapping.label.window_days_after)


@pytest.fixture(scope="module")
def sites(study, mapping, tmp_path_factory):
    out = tmp_path_factory.mktemp("fhir-sites")
    write_cohorts(study, out, hospitals=3, seed=3, size_scale=0.1)
    summary = write_fhir_cohorts(study, mapping, out)
    return out, summary


def _site_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _resources(split_dir: Path, kind: str) -> list[dict]:
    path = split_dir / f"{kind}.ndjson"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fhir_rendering_derives_exactly_the_csv_values(study, mapping, export_date, sites):
    root, _ = sites
    names = [f.name for f in study.features]
    checked = 0
    for site in _site_dirs(root):
        for split in SPLITS:
            csv = read_site_csv(study, site / f"{split}.csv")
            fhir = read_site_fhir(study, mapping, site / split, today=export_date)
            assert not fhir.report.quarantined, fhir.report.summary()
            assert not fhir.report.unit_mismatches, fhir.report.summary()
            assert fhir.report.rows_loaded == csv.report.rows_loaded == len(csv.labels)
            assert fhir.features.shape == csv.features.shape
            a, b = csv.features, fhir.features
            assert np.array_equal(np.isnan(a), np.isnan(b)), {
                names[j]: int((np.isnan(a[:, j]) != np.isnan(b[:, j])).sum()) for j in range(a.shape[1]) if (np.isnan(a[:, j]) != np.isnan(b[:, j])).any()
            }
            diff = np.where(np.isnan(a), 0.0, np.abs(a - np.nan_to_num(b)))
            worst = {names[j]: float(diff[:, j].max()) for j in range(a.shape[1]) if diff[:, j].max() > 1e-6}
            assert not worst, f"{site.name}/{split}: features differ (max abs difference): {worst}"
            assert np.array_equal(csv.labels, fhir.labels), f"{site.name}/{split}: {int((csv.labels != fhir.labels).sum())} labels differ"
            checked += len(csv.labels)
    assert checked > 500


def test_the_rendering_exercises_conversions_aggregates_and_distractors(study, mapping, export_date, sites):
    root, summary = sites
    site = _site_dirs(root)[-1]  # the largest site
    fhir = read_site_fhir(study, mapping, site / "train", today=export_date)
    report = fhir.report
    conversions = set(report.conversions)
    for expected in ("[lb_av]→kg", "g→kg", "cm→m", "[in_i]→m", "min→h", "s→ms", "{beats}/min→/min", "{steps}/d→/d", "1→{score}", "{#}→{score}"):
        assert expected in conversions, f"no {expected} conversion in {sorted(conversions)}"
    assert report.excluded["Observation: status entered-in-error"] > 0
    assert report.excluded["Condition: verificationStatus refuted"] + report.excluded["Condition: verificationStatus entered-in-error"] > 0
    # Distractors are read but derive nothing: fewer resources used than read, per type.
    for kind in ("Observation", "Condition", "Encounter", "MedicationRequest"):
        assert 0 < report.resources_used[kind] < report.resources_read[kind], kind
    assert summary[site.name]["train"]["distractors"] > 0
    # Every kind of value occurs: missing and present indicator features, slopes, partial PDC, both labels.
    table = fhir.features
    col = {f.name: j for j, f in enumerate(study.features)}
    for f in study.features:
        values = table[:, col[f.name]]
        if f.missing != "reject" and f.name not in ALWAYS_RECORDED:
            assert np.isnan(values).any() and (~np.isnan(values)).any(), f.name
    pdc = table[:, col["antidepressant_pdc"]]
    assert ((pdc > 0) & (pdc < 1)).any() and (pdc == 0).any()
    assert (table[:, col["phq9_count_12m"]] >= 3).any()
    assert 0 < fhir.labels.mean() < 1


def test_records_look_like_an_ehr_export(sites):
    root, _ = sites
    split = _site_dirs(root)[0] / "train"
    patients = _resources(split, "Patient")
    ids = [p["id"] for p in patients]
    assert ids == sorted(ids) and ids[0] == patient_id(0)
    known = set(ids)
    systems = Counter()
    for kind in ("Observation", "Condition", "Encounter", "MedicationRequest"):
        resources = _resources(split, kind)
        assert resources and all(r["resourceType"] == kind for r in resources)
        assert len({r["id"] for r in resources}) == len(resources)
        assert all(r["subject"]["reference"].removeprefix("Patient/") in known for r in resources)
        for r in resources:
            concept = r.get("code") or r.get("medicationCodeableConcept") or {}
            systems.update(c["system"] for c in concept.get("coding", []))
    for system in ("http://loinc.org", "http://hl7.org/fhir/sid/icd-10-cm", "http://www.nlm.nih.gov/research/umls/rxnorm", "http://www.whocc.no/atc"):
        assert systems[system] > 0, system
    for obs in _resources(split, "Observation"):
        q = obs["valueQuantity"]
        assert q["system"] == "http://unitsofmeasure.org" and q["code"] and "value" in q
        when = obs.get("effectiveDateTime") or (obs.get("effectivePeriod") or {}).get("start") or obs.get("issued")
        datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))


def test_rendering_is_deterministic(study, mapping, tmp_path):
    root = tmp_path / "sites"
    write_cohorts(study, root, hospitals=1, seed=9, size_scale=0.1)
    table = read_site_csv(study, root / "hospital-01" / "train.csv")
    rows, labels = table.features[:60], table.labels[:60].astype(int)

    def digest(out: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.iterdir()))).hexdigest()

    write_fhir_split(study, mapping, rows, labels, tmp_path / "a", seed=5)
    write_fhir_split(study, mapping, rows, labels, tmp_path / "b", seed=5)
    write_fhir_split(study, mapping, rows, labels, tmp_path / "c", seed=6)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_a_value_fhir_cannot_express_is_refused(study, mapping, tmp_path):
    names = [f.name for f in study.features]
    row = np.array([[f.center if f.type == "numeric" else f.low for f in study.features]], dtype=float)
    row[0, names.index("age")] = 40
    row[0, names.index("antidepressant_pdc")] = 0.0
    row[0, names.index("phq9_count_12m")] = 2  # a latest score and a slope need two assessments
    write_fhir_split(study, mapping, row, np.array([1]), tmp_path / "ok", seed=1)
    missing_count = row.copy()
    missing_count[0, names.index("ed_visits_12m")] = math.nan  # a count is 0 without records, never missing
    with pytest.raises(NotRepresentable, match="ed_visits_12m"):
        write_fhir_split(study, mapping, missing_count, np.array([0]), tmp_path / "x", seed=1)
    odd_pdc = row.copy()
    odd_pdc[0, names.index("antidepressant_pdc")] = 0.5001  # not a whole number of days / 180
    with pytest.raises(NotRepresentable, match="antidepressant_pdc"):
        write_fhir_split(study, mapping, odd_pdc, np.array([0]), tmp_path / "y", seed=1)


def test_synthetic_values_are_representable_in_fhir(study, sites):
    """The generator's consistency rules (simulations/cohorts.py docstring) hold in the CSVs."""
    root, _ = sites
    col = {f.name: j for j, f in enumerate(study.features)}
    for site in _site_dirs(root):
        for split in SPLITS:
            t = read_site_csv(study, site / f"{split}.csv").features
            latest, slope, count = t[:, col["phq9_latest"]], t[:, col["phq9_slope_90d"]], t[:, col["phq9_count_12m"]]
            assert np.array_equal(~np.isnan(latest), count >= 1)
            assert np.all(count[~np.isnan(slope)] >= 2)
            for name in ALWAYS_RECORDED:
                assert not np.isnan(t[:, col[name]]).any(), name
            pdc_days = t[:, col["antidepressant_pdc"]] * PDC_DAYS
            assert np.allclose(pdc_days, np.round(pdc_days), atol=1e-6)
            assert np.array_equal(t[:, col["age"]], np.floor(t[:, col["age"]]))
