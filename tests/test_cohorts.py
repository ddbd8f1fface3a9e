import hashlib

import numpy as np

from client.data import load_site
from simulations.cohorts import site_profiles, write_cohorts


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.csv"))}


def test_same_seed_same_files_other_seed_other_files(study, tmp_path):
    write_cohorts(study, tmp_path / "a", hospitals=3, seed=11, size_scale=0.3)
    write_cohorts(study, tmp_path / "b", hospitals=3, seed=11, size_scale=0.3)
    write_cohorts(study, tmp_path / "c", hospitals=3, seed=12, size_scale=0.3)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert len(a) == 6
    assert all(a[k] != c[k] for k in a)


def test_hospitals_are_heterogeneous(study, cohorts_dir):
    profiles = site_profiles(4, seed=7)
    sizes = [p.patients for p in profiles]
    assert max(sizes) / min(sizes) >= 10
    prevalence, missing_sleep, mean_age = [], [], []
    sleep = [f.name for f in study.features].index("sleep_hours")
    for p in profiles:
        data = load_site(study, cohorts_dir / p.name)
        labels = np.concatenate([data.train.labels, data.test.labels])
        table = np.concatenate([data.train.features, data.test.features])
        prevalence.append(labels.mean())
        missing_sleep.append(np.isnan(table[:, sleep]).mean())
        mean_age.append(table[:, 0].mean())
        assert abs(labels.mean() - p.prevalence) < 0.06
    assert min(prevalence) < 0.1 and max(prevalence) > 0.2
    assert all(0.03 <= v <= 0.35 for v in prevalence)
    assert max(missing_sleep) - min(missing_sleep) > 0.1
    assert max(mean_age) - min(mean_age) > 3


def test_manifest_reports_an_achievable_auc(study, tmp_path):
    manifest = write_cohorts(study, tmp_path, hospitals=3, seed=5, size_scale=0.5)
    assert 0.7 < manifest["ground_truth_auc"] < 0.95
    assert manifest["study_hash"] == study.hash
    assert [s["name"] for s in manifest["sites"]] == ["hospital-01", "hospital-02", "hospital-03"]
