"""A real clinical data set as four hospitals: scikit-learn's Wisconsin diagnostic breast-cancer data.

569 patients (212 malignant, 357 benign), 30 features computed from digitized images of a fine-needle
aspirate (W. H. Wolberg, W. N. Street, O. L. Mangasarian, UCI, 1995), shipped inside scikit-learn
(no download). `write_breast_cancer_sites` splits it into four sites that differ the way real ones do:

  referral-centre   the largest; a high case mix, and its malignant cases are the larger tumours
  university        mid-sized, mid case mix
  community         small, mostly benign (a screening population)
  rural             the smallest

Assignment is a pure function of the seed: malignant patients are drawn for the referral centre with
probability rising with the tumour's mean area (a referral population), the rest at random. Each site
is split 75/25 into train/test, stratified by label. Files are written as the study
`studies/breast-cancer.toml` reads them (`malignant` is the label: 1 = malignant).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcare import APP_DIR

STUDY_FILE = APP_DIR / "studies" / "breast-cancer.toml"
LABEL = "malignant"
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class SitePlan:
    name: str
    malignant: int
    benign: int


PLAN = (
    SitePlan("referral-centre", malignant=120, benign=130),
    SitePlan("university", malignant=56, benign=104),
    SitePlan("community", malignant=20, benign=80),
    SitePlan("rural", malignant=16, benign=43),
)


def feature_names() -> list[str]:
    """The data set's 30 feature names as study identifiers ("mean radius" -> "mean_radius")."""
    from sklearn.datasets import load_breast_cancer

    return [name.replace(" ", "_") for name in load_breast_cancer().feature_names]


def load_rows() -> tuple[np.ndarray, np.ndarray]:
    """(features [569, 30], labels [569] with 1 = malignant). scikit-learn codes 0 = malignant."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return data.data.astype(np.float64), (data.target == 0).astype(np.int64)


def assign_sites(labels: np.ndarray, area: np.ndarray, seed: int) -> list[np.ndarray]:
    """Row indices per site in PLAN order."""
    rng = np.random.default_rng(seed)
    malignant, benign = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    ranks = np.argsort(np.argsort(area[malignant])) + 1.0
    first = rng.choice(malignant, size=PLAN[0].malignant, replace=False, p=ranks**2 / (ranks**2).sum())
    rest_malignant = rng.permutation(np.setdiff1d(malignant, first))
    benign = rng.permutation(benign)
    sites, m_at, b_at = [], 0, 0
    for i, plan in enumerate(PLAN):
        m = first if i == 0 else rest_malignant[m_at:m_at + plan.malignant]
        if i:
            m_at += plan.malignant
        b = benign[b_at:b_at + plan.benign]
        b_at += plan.benign
        sites.append(np.concatenate([m, b]))
    return sites


def split_train_test(rows: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 75/25 split of one site's rows."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in (0, 1):
        members = rng.permutation(rows[labels[rows] == cls])
        n_test = int(round(len(members) * TEST_FRACTION))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _write_csv(path: Path, names: list[str], x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*names, LABEL])
        for row, label in zip(x, y):
            writer.writerow([*(repr(float(v)) for v in row), int(label)])


def write_breast_cancer_sites(out_dir: str | Path, *, seed: int = 0) -> dict:
    """Write `<out_dir>/<site>/{train,test}.csv` for the four sites and `<out_dir>/sites.json` (counts);
    returns that manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = load_rows()
    names = feature_names()
    manifest = {"data_set": "scikit-learn load_breast_cancer (Wisconsin diagnostic)", "seed": seed, "sites": []}
    for i, (plan, rows) in enumerate(zip(PLAN, assign_sites(y, x[:, names.index("mean_area")], seed))):
        train, test = split_train_test(rows, y, seed + 1 + i)
        site = out_dir / plan.name
        site.mkdir(exist_ok=True)
        _write_csv(site / "train.csv", names, x[train], y[train])
        _write_csv(site / "test.csv", names, x[test], y[test])
        manifest["sites"].append({"name": plan.name, "train_rows": len(train), "test_rows": len(test),
                                  "prevalence": round(float(y[rows].mean()), 4)})
    (out_dir / "sites.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def study_toml(*, rounds: int = 10, epsilon: float = 1.0) -> str:
    """The text of `studies/breast-cancer.toml`: each feature's range is the data set's, widened to
    round numbers (a site's values outside it are quarantined); scaling is federated."""
    x, _ = load_rows()
    lines = [
        "# fedcare study: malignancy of a breast mass from a fine-needle aspirate (Wisconsin diagnostic",
        "# breast-cancer data, scikit-learn). Written by `python -m simulations.breast_cancer --study`.",
        "", "[study]", 'name = "breast-cancer"',
        'description = "malignant vs benign breast mass from 30 features of digitized fine-needle aspirate images"',
        "", "[label]", f'name = "{LABEL}"', 'description = "1 = malignant, 0 = benign (biopsy-confirmed)"',
    ]
    for j, name in enumerate(feature_names()):
        high = float(np.format_float_positional(x[:, j].max() * 2, precision=2, fractional=False))
        lines += ["", "[[features]]", f'name = "{name}"', 'type = "numeric"', 'unit = "as measured"',
                  f"range = [0, {high:g}]", 'missing = "reject"']
    lines += [
        "", "[model]", 'kind = "logistic"', "seed = 7",
        "", "[training]", f"rounds = {rounds}", "local_epochs = 1", "batch_size = 32", 'optimizer = "sgd"',
        "learning_rate = 0.5", "momentum = 0.0",
        "", "[privacy]", f"epsilon = {epsilon}", "delta = 1e-5", "clipping_norm = 1.0", 'accountant = "prv"',
        "", "[secure_aggregation]", "num_shares = 1.0", "reconstruction_threshold = 0.66", "max_weight = 1000.0",
        "clipping_range = 8.0", "quantization_range = 4194304", "timeout_seconds = 120.0",
        "", "[strategy]", 'name = "fedavg"', "server_learning_rate = 1.0", "min_sites = 3",
        "", "[standardization]", 'method = "federated"', "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the four sites' folders here")
    parser.add_argument("--study", action="store_true", help=f"(re)write {STUDY_FILE}")
    args = parser.parse_args()
    if args.study:
        STUDY_FILE.write_text(study_toml(), encoding="utf-8")
        print(f"wrote {STUDY_FILE}")
    if args.out:
        print(json.dumps(write_breast_cancer_sites(args.out), indent=2))
