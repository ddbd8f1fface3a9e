"""What notes and wearable streams add: one synthetic world, two studies, the same sites.

    python -m bench.notes_auc [--hospitals 5] [--size-scale 0.5] [--epsilon 3] [--seed 42]

Writes the synthetic hospitals once with notes and streams (`simulations/modalities.py`), then runs
`fedcare simulate --sites` on them twice at the same ε: `studies/depression-risk.toml` (coded features
only; it ignores the notes and readings files) and `studies/depression-risk-notes.toml` (the same coded
features, plus the note markers, the stream aggregates and the hashed n-gram block). Prints the DP
federated test AUC of each, and the ceilings: the generator's true risk (everything, latent states
included), and a centralized, non-private gradient-boosted model on the pooled training rows of each
feature set (what the inputs can reach without privacy or federation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from client.data import load_site
from fedcare.metrics import roc_auc
from fedcare.study import load_study
from simulations.cohorts import write_cohorts

ROOT = Path(__file__).resolve().parent.parent
CODED = ROOT / "studies" / "depression-risk.toml"
NOTES = ROOT / "studies" / "depression-risk-notes.toml"


def _simulate(study: Path, sites: Path, out: Path, epsilon: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", "simulate", "--sites", str(sites), "--study", str(study),
                           "--out", str(out), "--epsilon", str(epsilon)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"simulate {study.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"auc": report["final"]["auc"], "seconds": time.perf_counter() - start,
            "epsilon_max": max(s["epsilon_spent"] for s in report["privacy"]["sites"])
            if isinstance(report.get("privacy"), dict) and "sites" in report["privacy"] else None}


def _centralized_auc(study_path: Path, sites: Path) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier

    study = load_study(study_path)
    train_x, train_y, test_x, test_y = [], [], [], []
    for site in sorted(p for p in sites.iterdir() if p.is_dir()):
        data = load_site(study, site)
        train_x.append(data.train.features)
        train_y.append(data.train.labels)
        test_x.append(data.test.features)
        test_y.append(data.test.labels)
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True, random_state=0)
    model.fit(np.vstack(train_x), np.concatenate(train_y))
    return roc_auc(np.concatenate(test_y), model.predict_proba(np.vstack(test_x))[:, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--size-scale", type=float, default=0.5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = write_cohorts(load_study(NOTES), work / "sites", args.hospitals, args.seed, args.size_scale)
        patients = sum(s["train_rows"] + s["test_rows"] for s in manifest["sites"])
        notes = sum(s["train_notes"] + s["test_notes"] for s in manifest["sites"])
        readings = sum(s["train_readings"] + s["test_readings"] for s in manifest["sites"])
        print(f"{args.hospitals} hospitals, {patients} patients, {notes} notes in the last year, {readings} readings; "
              f"ε = {args.epsilon:g} per site")
        rows = []
        for name, path in (("coded features only", CODED), ("coded + notes + streams", NOTES)):
            run = _simulate(path, work / "sites", work / f"run-{path.stem}", args.epsilon)
            ceiling = _centralized_auc(path, work / "sites")
            rows.append((name, run["auc"], ceiling, run["seconds"]))
    print(f"\n{'inputs':<26} {'DP federated AUC':>17} {'centralized GBM (non-private)':>30} {'simulate s':>11}")
    for name, auc, ceiling, seconds in rows:
        print(f"{name:<26} {auc:>17.4f} {ceiling:>30.4f} {seconds:>11.0f}")
    print(f"{'true risk (generator)':<26} {'':>17} {manifest['ground_truth_auc']:>30.4f}")
    print(f"\nDP AUC gain from notes and streams: {rows[1][1] - rows[0][1]:+.4f} "
          f"(centralized ceiling gain {rows[1][2] - rows[0][2]:+.4f})")


if __name__ == "__main__":
    main()
