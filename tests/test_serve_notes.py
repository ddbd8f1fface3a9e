"""`/v1/analyze` with clinician notes and device readings, over real HTTP: the service derives the
inputs with the training code (risk equal to ONNX Runtime on the site table's row), refuses a derived
feature given as a value, and writes no note or reading anywhere (audit log, service logs, state)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from client.data import read_site_csv
from export.onnx_export import run_onnx
from fedcare.features import model_inputs
from fedcare.study import Overrides, load_study
from simulations.cohorts import write_cohorts

from .conftest import ROOT
from .test_serve import add_token, serving, sigmoid64

NOTES_STUDY = ROOT / "studies" / "depression-risk-notes.toml"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def notes_world(tmp_path_factory):
    from deploy.kits import coordinator_signing_key, load_coordinator_kit
    from deploy.provision import provision
    from export.build import build_package
    from fedcare.model import build_model, get_weights
    from fedcare.run_record import RoundEntry, RunRecord

    root = tmp_path_factory.mktemp("serve-notes")
    study = load_study(NOTES_STUDY)
    kits = provision(NOTES_STUDY, ["127.0.0.1"], ["north", "south", "east"], root / "kits")
    record = RunRecord(root / "run")
    record.start(study, Overrides())
    rng = np.random.default_rng(5)
    weights = [w + rng.normal(0.0, 0.4, w.shape).astype(np.float32) for w in get_weights(build_model(study))]
    record.save_checkpoint(2, weights, study.hash)
    record.write_rounds([RoundEntry(round=r, aggregated=True, sites_aggregated=3, auc=0.7, loss=0.5,
                                    sites_evaluated=3, seconds=1.0) for r in (1, 2)])
    (record.path / "report.json").write_text(json.dumps({
        "study_hash": study.hash, "rounds": record.rounds(),
        "sites": [{"name": n, "epsilon": None} for n in ("north", "south", "east")]}))
    package = build_package(record, root / "pkg", coordinator_signing_key(load_coordinator_kit(kits["coordinator"])))
    manifest = write_cohorts(study, root / "sites", hospitals=1, seed=8, size_scale=0.1)
    return study, kits["north"], package, root / "sites" / manifest["sites"][0]["name"], root


def _request(i: int, row: dict, notes: list[dict], readings: list[dict], study) -> dict:
    coded = {k: (float(v) if v != "" else None) for k, v in row.items()
             if k not in ("patient_id", study.label.name)}
    return {"patient_id": f"mrn-{i}", "model": "fp32", "features": coded, "index_date": "2025-07-01",
            "notes": [{"date": n["date"], "text": n["text"]} for n in notes],
            "readings": [{k: (float(r[k]) if k == "value" else r[k]) for k in ("time", "system", "code", "value", "unit")}
                         for r in readings]}


def test_notes_and_readings_are_derived_with_the_training_code_and_never_stored(notes_world, tmp_path):
    study, kit, package, site, root = notes_world
    table = read_site_csv(study, site / "train.csv")
    rows = _rows(site / "train.csv")
    notes, readings = _rows(site / "train.notes.csv"), _rows(site / "train.readings.csv")
    by_patient: dict[str, tuple[list, list]] = {r["patient_id"]: ([], []) for r in rows}
    for n in notes:
        by_patient[n["patient_id"]][0].append(n)
    for r in readings:
        by_patient[r["patient_id"]][1].append(r)
    pkg_manifest = json.loads((package / "manifest.json").read_text())
    expected = sigmoid64(run_onnx(package / pkg_manifest["models"]["fp32"]["file"], model_inputs(study, table.features)))
    token = add_token(kit, "clinic", "analyze", "models")
    chosen = [i for i, r in enumerate(rows) if by_patient[r["patient_id"]][0] and by_patient[r["patient_id"]][1]][:6]
    assert len(chosen) == 6
    secrets = [n["text"][:60] for i in chosen for n in by_patient[rows[i]["patient_id"]][0]]
    with serving(package, kit, tmp_path / "logs") as server, httpx.Client(
            base_url=server.base_url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        models = client.get("/v1/models").json()
        assert "hopelessness_mentions_12m" in models["inputs"]["derived"]
        assert "note_hash_000" in models["inputs"]["derived"]
        for i in chosen:
            pid = rows[i]["patient_id"]
            body = _request(i, rows[i], *by_patient[pid], study)
            r = client.post("/v1/analyze", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["risk"] == pytest.approx(expected[i], rel=1e-9)
        # a derived feature given as a value is refused, naming it
        body = _request(0, rows[0], [], [], study)
        body["features"]["hopelessness_mentions_12m"] = 2.0
        r = client.post("/v1/analyze", json=body)
        assert r.status_code == 422 and r.json()["feature"] == "hopelessness_mentions_12m"
        assert "derived from the request's notes and readings" in r.json()["detail"]
        # a reading in a unit that does not convert names its position, not its value
        body = _request(0, rows[0], [], [{"time": "2025-06-30", "system": "http://loinc.org", "code": "8889-8",
                                          "value": 71.0, "unit": "kg"}], study)
        r = client.post("/v1/analyze", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith("readings[0]: unit not convertible to /min")
        r = client.post("/v1/analyze", json={**body, "readings": [], "notes": [{"date": "2025-02-30", "text": "x"}]})
        assert r.status_code == 422 and r.json()["detail"].startswith("notes[0].date: expected YYYY-MM-DD")
    written = [p for p in (*root.rglob("*"), *(tmp_path / "logs").rglob("*"), *kit.rglob("*")) if p.is_file()]
    text = b"".join(p.read_bytes() for p in written if p.stat().st_size < 50 << 20
                    and not p.name.endswith((".notes.csv",)))
    for secret in secrets:
        assert secret.encode() not in text, "a note reached a file"
    audit = b"".join(p.read_bytes() for p in kit.rglob("audit*") if p.is_file())
    assert b"mrn-" not in audit and audit  # the audit log exists and holds pseudonyms only


def test_a_package_without_derived_features_refuses_notes(tmp_path):
    from .test_serve import build_world

    world = build_world(tmp_path_factory_root(tmp_path))
    token = add_token(world.hospital, "clinic2", "analyze")
    with serving(world.package, world.hospital, tmp_path / "logs") as server:
        r = httpx.post(f"{server.base_url}/v1/analyze", headers={"Authorization": f"Bearer {token}"}, timeout=10,
                       json={"patient_id": "x", "features": {"age": 50.0}, "notes": [{"date": "2025-01-01", "text": "t"}]})
    assert r.status_code == 422 and "derives no feature from notes or readings" in r.json()["detail"]


def tmp_path_factory_root(tmp_path: Path) -> Path:
    return tmp_path / "world"
