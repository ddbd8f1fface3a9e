"""A federated study over notes and wearable streams (Flower's engine, the real ClientApp, SecAgg+):
no substring of any note and no reading appears in any message the coordinator receives (invariant 7)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedcare.study import load_study
from simulations.cohorts import write_cohorts

from .conftest import ROOT
from .test_privacy_federation import _simulate

NOTES_STUDY = ROOT / "studies" / "depression-risk-notes.toml"
WINDOW = 16


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_no_note_and_no_reading_reaches_the_coordinator(tmp_path):
    study = load_study(NOTES_STUDY).with_overrides(rounds=1)
    (tmp_path / "study.toml").write_text(study.to_toml())
    write_cohorts(study, tmp_path / "sites", 3, seed=11, size_scale=0.15)
    run_config = {"study": str(tmp_path / "study.toml"), "out-dir": str(tmp_path / "coordinator"),
                  "sim-sites-dir": str(tmp_path / "sites")}
    out = _simulate(run_config, "tests.apps.recording:app")
    assert "model after round 1/1" in out
    received = json.loads((tmp_path / "coordinator" / "received.json").read_text())
    assert sum(1 for r in received if r["masked_values"]) == 3 + 3 + 3  # statistics, training, evaluation
    wire: set[str] = set()
    for reply in received:
        for run in reply["text"]:
            wire |= {run[i:i + WINDOW] for i in range(len(run) - WINDOW + 1)}
    assert wire, "the recording saw the messages' text"
    windows, values = set(), set()
    for site in sorted(p for p in (tmp_path / "sites").iterdir() if p.is_dir()):
        for split in ("train", "test"):
            for note in _rows(site / f"{split}.notes.csv"):
                text = note["text"]
                windows |= {text[i:i + WINDOW] for i in range(0, len(text) - WINDOW + 1, 4)}
            values |= {float(r["value"]) for r in _rows(site / f"{split}.readings.csv") if "." in r["value"]}
    assert len(windows) > 10_000
    assert not windows & wire, "a piece of a note reached the coordinator"
    numbers = {n for reply in received for n in reply["numbers"]}
    assert not values & numbers, "a reading reached the coordinator"
    for reply in received:
        assert reply["arrays"] == 0 and reply["metrics_keys"] == []
