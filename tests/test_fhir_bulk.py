"""Files as FHIR bulk-data servers deliver them (`$export`): gzip-compressed NDJSON, numbered parts and
the completion manifest, which the reader holds the delivery to (client/fhir_bulk.py)."""

from __future__ import annotations

import datetime
import gzip
import json
import shutil

import numpy as np
import pytest

from client.check import check_site_export
from client.fhir import read_site_fhir
from client.tables import SiteDataError
from fedcare.study import load_mapping
from simulations.cohorts import write_cohorts
from simulations.fhir_cohorts import write_fhir_site

from .conftest import DEFAULT_STUDY


@pytest.fixture(scope="module")
def split(study, tmp_path_factory):
    """One synthetic site's FHIR training split, and the export date after its label window."""
    out = tmp_path_factory.mktemp("bulk")
    mapping = load_mapping(DEFAULT_STUDY)
    write_cohorts(study, out, hospitals=3, seed=5, size_scale=0.1)
    write_fhir_site(study, mapping, out / "hospital-01")
    today = mapping.index_date + datetime.timedelta(days=mapping.label.window_days_after)
    return out / "hospital-01" / "train", today


def _read(study, path, today):
    return read_site_fhir(study, study.mapping, path, today=today)


def _as_bulk_export(source, target, *, compress=True, counts=True):
    """`source` re-delivered as a bulk-data client stores an $export: one numbered, gzipped file per
    resource type and the completion manifest naming them by URL, with their counts."""
    target.mkdir()
    output = []
    for i, path in enumerate(sorted(source.glob("*.ndjson"))):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        name = f"{i + 1}.{path.stem}.ndjson"
        if compress:
            with gzip.open(target / f"{name}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        else:
            (target / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        entry = {"type": path.stem, "url": f"https://ehr.example.org/bulk/job-7/{name}"}
        if counts:
            entry["count"] = len(lines)
        output.append(entry)
    manifest = {"transactionTime": "2026-07-01T00:00:00Z", "request": "https://ehr.example.org/fhir/$export",
                "requiresAccessToken": True, "output": output, "error": []}
    (target / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


def test_a_gzipped_bulk_export_with_its_manifest_reads_as_the_plain_files(study, split, tmp_path):
    source, today = split
    plain = _read(study, source, today)
    _as_bulk_export(source, tmp_path / "bulk")
    bulk = _read(study, tmp_path / "bulk", today)
    assert bulk.report.rows_loaded == plain.report.rows_loaded > 0
    assert np.array_equal(bulk.labels, plain.labels)
    assert np.array_equal(np.nan_to_num(bulk.features, nan=-1), np.nan_to_num(plain.features, nan=-1))
    assert not bulk.report.quarantined  # the manifest is not data: nothing refused, nothing "not a Bundle"
    assert check_site_export(study, tmp_path / "bulk").fatal is False


def test_a_file_the_manifest_lists_but_the_download_lacks_is_fatal(study, split, tmp_path):
    source, today = split
    manifest = _as_bulk_export(source, tmp_path / "bulk")
    missing = manifest["output"][1]["url"].rsplit("/", 1)[1]
    (tmp_path / "bulk" / f"{missing}.gz").unlink()
    with pytest.raises(SiteDataError) as err:
        _read(study, tmp_path / "bulk", today)
    assert str(err.value) == (f"{tmp_path / 'bulk' / 'manifest.json'}: the bulk-data export lists {missing} "
                              f"({manifest['output'][1]['type']}), which is not in {tmp_path / 'bulk'}: the download is incomplete")


def test_a_file_shorter_than_its_manifest_count_is_fatal(study, split, tmp_path):
    source, today = split
    manifest = _as_bulk_export(source, tmp_path / "bulk", compress=False)
    entry = manifest["output"][-1]
    name = entry["url"].rsplit("/", 1)[1]
    path = tmp_path / "bulk" / name
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(SiteDataError, match=rf"{name}: the bulk-data manifest says {entry['count']} "
                                            rf"{entry['type']} resources, the file holds {entry['count'] - 1} lines"):
        _read(study, tmp_path / "bulk", today)


def test_a_damaged_gzip_is_quarantined_from_there_on_never_a_traceback(study, split, tmp_path):
    source, today = split
    _as_bulk_export(source, tmp_path / "bulk", counts=False)
    observations = next((tmp_path / "bulk").glob("*.Observation.ndjson.gz"))
    data = observations.read_bytes()
    observations.write_bytes(data[: len(data) // 2])  # a download cut off half-way
    table = _read(study, tmp_path / "bulk", today)
    reasons = list(table.report.quarantined)
    assert any(r.startswith("unreadable from here on (EOFError") for r in reasons), reasons
    assert table.report.rows_loaded > 0


def test_a_malformed_manifest_names_its_entry(study, split, tmp_path):
    source, today = split
    target = tmp_path / "bulk"
    shutil.copytree(source, target)
    (target / "manifest.json").write_text(json.dumps({"transactionTime": "x", "output": [{"type": "Patient", "count": -1,
                                                                                      "url": "https://x/Patient.ndjson"}]}))
    with pytest.raises(SiteDataError, match=r"manifest.json: output\[0\].count: expected a whole number, got -1"):
        _read(study, target, today)


def test_an_ndjson_file_that_lost_most_of_its_lines_is_fatal(study, split, tmp_path):
    source, today = split
    target = tmp_path / "damaged"
    shutil.copytree(source, target)
    path = target / "Observation.ndjson"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line[: len(line) // 2] if i % 3 else line for i, line in enumerate(lines)) + "\n")
    with pytest.raises(SiteDataError, match=r"Observation.ndjson: \d+ of \d+ lines are not readable JSON"):
        _read(study, target, today)
