"""Synthetic hospital cohorts with a known ground-truth risk model.

Each hospital gets patients with EHR-derived mental-health features (the default study's
feature spec) and a 12-month label drawn from a documented risk model. Hospitals differ
the way real ones do: sizes spanning >= 10x, label prevalence from 5 % to 30 %, shifted
age and deprivation mixes, and site-specific missingness (wearables, questionnaires).
Everything is a pure function of (number of hospitals, seed, size scale).

Ground truth. A latent depression severity d ~ N(0, 1) (shifted by deprivation) drives
the questionnaire scores and utilisation. The true log-odds of an episode is

    logit p = b_site + 0.12 (phq9 - 8) + 0.30 slope + 0.35 prior_episodes
            + 0.60 psych_admissions + 0.15 ed_visits + 0.30 anxiety + 0.40 substance_use
            + 0.25 chronic_pain + 0.012 (adi - 50) - 0.02 (age - 47) + 0.0006 (age - 47)^2
            - 1.60 pdc * [phq9 >= 10]                    (adherence protects the severely ill)
            + 0.60 substance_use * [prior_episodes > 0]  (relapse with substance use)
            + 0.30 (sleep - 7)^2                         (too little and too much sleep)
            + 0.50 [hrv < 25] * [resting_hr > 80]        (autonomic strain)

computed on the true values (before missingness is applied), with b_site solved so the
site's prevalence hits its target. Interactions and the U-shape mean an MLP can beat a
logistic regression; `ground_truth_auc` (AUC of the true probabilities on the test
splits) is the ceiling any model can reach.

Representable in FHIR. Every value is one that `simulations/fhir_cohorts.py` can render as
FHIR R4 resources and the study's `[mapping]` (docs/FHIR.md) derives back exactly:

* age is whole years (the mapping floors birthDate -> index date); continuous values are
  rounded to 4 decimals (what the CSV holds); antidepressant_pdc is a whole number of
  covered days / 180 (the mapping's 180-day window);
* features the mapping derives as a count, `any` or PDC (phq9_count_12m, the diagnosis
  flags, prior episodes, admissions, ED visits, antidepressant_pdc) are never missing: a
  patient without records has 0;
* the PHQ-9 history is consistent: phq9_latest is present iff phq9_count_12m >= 1, and
  phq9_slope_90d is present only when phq9_latest is and with >= 2 assessments (so the
  slope is missing about twice as often as the other questionnaire values); the true slope
  is bounded so the earlier score it implies (7 days back) stays in [0, 27].
"""

from __future__ import annotations

import csv
import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedcare.metrics import roc_auc
from fedcare.study import Feature, Study
from simulations.modalities import Modalities, latent_modalities, modality_log_odds, write_notes, write_readings

SMALLEST_SITE = 400
LARGEST_SITE = 6000
TEST_FRACTION = 0.2
WEARABLE_FEATURES = ("sleep_hours", "steps_per_day", "resting_hr", "hrv_rmssd")
QUESTIONNAIRE_FEATURES = ("phq9_latest", "phq9_slope_90d", "gad7_latest")
# Derived from FHIR as a count / `any` / proportion of days covered: no records means 0, never missing.
ALWAYS_RECORDED = (
    "phq9_count_12m",
    "prior_depressive_episodes",
    "dx_anxiety",
    "dx_substance_use",
    "dx_chronic_pain",
    "psych_admissions_12m",
    "ed_visits_12m",
    "antidepressant_pdc",
)
PDC_DAYS = 180  # the mapping's antidepressant_pdc window
DECIMALS = 4  # continuous values are generated at the precision the CSV holds


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital differs from the others."""

    name: str
    patients: int
    prevalence: float
    age_mean: float
    deprivation_mean: float
    wearable_missing: float
    questionnaire_missing: float
    other_missing: float


@dataclass(frozen=True)
class Cohort:
    """One hospital's patients: true features, observed features (NaN = missing), labels, truth."""

    profile: SiteProfile
    true_features: np.ndarray
    observed: np.ndarray
    labels: np.ndarray
    true_risk: np.ndarray
    severity: np.ndarray | None = None  # the latent d (row order)
    modalities: Modalities | None = None  # notes' states and wearable parameters (`simulations/modalities.py`)
    true_values: dict[str, np.ndarray] | None = None  # every generated true value by name


def site_profiles(hospitals: int, seed: int, size_scale: float = 1.0) -> list[SiteProfile]:
    """Deterministic heterogeneous profiles for `hospitals` sites."""
    if hospitals < 1:
        raise ValueError("hospitals must be >= 1")
    rng = np.random.default_rng([seed, 1])
    steps = np.linspace(0.0, 1.0, hospitals) if hospitals > 1 else np.zeros(1)
    sizes = SMALLEST_SITE * (LARGEST_SITE / SMALLEST_SITE) ** steps * size_scale
    prevalences = 0.05 + 0.25 * rng.permutation(steps)
    return [
        SiteProfile(
            name=f"hospital-{i + 1:02d}",
            patients=max(50, int(round(sizes[i]))),
            prevalence=round(float(prevalences[i]), 4),
            age_mean=round(float(rng.uniform(36, 58)), 2),
            deprivation_mean=round(float(rng.uniform(25, 75)), 2),
            wearable_missing=round(float(rng.uniform(0.1, 0.7)), 3),
            questionnaire_missing=round(float(rng.uniform(0.02, 0.3)), 3),
            other_missing=round(float(rng.uniform(0.0, 0.05)), 3),
        )
        for i in range(hospitals)
    ]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _true_features(p: SiteProfile, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = p.patients
    age = np.floor(np.clip(rng.normal(p.age_mean, 15, n), 18, 95))  # whole years, as from a birth date
    female = rng.binomial(1, 0.56, n).astype(float)
    adi = np.clip(rng.normal(p.deprivation_mean, 20, n), 1, 100)
    d = rng.normal(0.01 * (adi - 50), 1.0, n)  # latent severity
    treated = rng.binomial(1, _sigmoid(-0.8 + 1.2 * d))
    phq9 = np.clip(np.round(8 + 4.5 * d + rng.normal(0, 2.5, n)), 0, 27)
    # The slope (points per 30 days) may not imply a score outside [0, 27] one week earlier.
    slope = np.clip(rng.normal(0.4 * d, 1.2, n), np.maximum(-15, -(27 - phq9) * 30 / 7), np.minimum(15, phq9 * 30 / 7))
    return {
        "_severity": d,
        "age": age,
        "sex_female": female,
        "phq9_latest": phq9,
        "phq9_slope_90d": slope,
        "phq9_count_12m": rng.poisson(1 + 1.5 * np.maximum(d, 0)).astype(float),
        "gad7_latest": np.clip(np.round(6 + 2.5 * d + rng.normal(0, 2.5, n)), 0, 21),
        "prior_depressive_episodes": rng.poisson(np.exp(-1 + 0.8 * d)).astype(float),
        "dx_anxiety": rng.binomial(1, _sigmoid(-1.5 + 1.0 * d)).astype(float),
        "dx_substance_use": rng.binomial(1, _sigmoid(-2.3 + 0.5 * d + 0.3 * (1 - female))).astype(float),
        "dx_chronic_pain": rng.binomial(1, _sigmoid(-2 + 0.03 * (age - 47))).astype(float),
        "psych_admissions_12m": rng.poisson(np.exp(-3 + 0.9 * d)).astype(float),
        "ed_visits_12m": rng.poisson(np.exp(-1 + 0.4 * d + 0.01 * (adi - 50))).astype(float),
        "antidepressant_pdc": np.where(treated == 1, np.round(rng.beta(4, 2, n) * PDC_DAYS) / PDC_DAYS, 0.0),
        "sleep_hours": np.clip(rng.normal(7 - 0.3 * d, 1.0, n), 2, 14),
        "steps_per_day": np.clip(np.exp(rng.normal(np.log(6500) - 0.1 * d, 0.45, n)), 100, 40000),
        "resting_hr": np.clip(rng.normal(70 + 2 * d, 8, n), 40, 130),
        "hrv_rmssd": np.clip(np.exp(rng.normal(np.log(45) - 0.01 * (age - 47) - 0.1 * d, 0.4, n)), 5, 200),
        "bmi": np.clip(rng.normal(28, 5, n), 15, 60),
        "area_deprivation_index": adi,
    }


def true_log_odds(f: dict[str, np.ndarray]) -> np.ndarray:
    """The documented ground-truth risk model, without the site intercept."""
    severe = (f["phq9_latest"] >= 10).astype(float)
    return (
        0.12 * (f["phq9_latest"] - 8)
        + 0.30 * f["phq9_slope_90d"]
        + 0.35 * f["prior_depressive_episodes"]
        + 0.60 * f["psych_admissions_12m"]
        + 0.15 * f["ed_visits_12m"]
        + 0.30 * f["dx_anxiety"]
        + 0.40 * f["dx_substance_use"]
        + 0.25 * f["dx_chronic_pain"]
        + 0.012 * (f["area_deprivation_index"] - 50)
        - 0.02 * (f["age"] - 47)
        + 0.0006 * (f["age"] - 47) ** 2
        - 1.60 * f["antidepressant_pdc"] * severe
        + 0.60 * f["dx_substance_use"] * (f["prior_depressive_episodes"] > 0)
        + 0.30 * (f["sleep_hours"] - 7) ** 2
        + 0.50 * (f["hrv_rmssd"] < 25) * (f["resting_hr"] > 80)
    )


def _intercept_for(log_odds: np.ndarray, prevalence: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(log_odds + mid).mean() < prevalence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def coded_features(study: Study) -> list[Feature]:
    """The study's features a table holds (not derived from notes or readings), in spec order."""
    if study.mapping is None:
        return list(study.features)
    from fedcare.derived import Derivation

    derived = Derivation(study).columns
    return [f for i, f in enumerate(study.features) if i not in derived]


def generate_site(study: Study, profile: SiteProfile, seed: int, index: int, *, modalities: bool = False) -> Cohort:
    """One hospital's cohort, deterministic in (profile, seed, index); with `modalities`, the notes'
    states and wearable parameters too, which then enter the ground truth (`simulations/modalities.py`)."""
    rng = np.random.default_rng([seed, 2, index])
    feats = _true_features(profile, rng)
    features = coded_features(study)
    missing = [f.name for f in features if f.name not in feats]
    if missing:
        raise ValueError(f"the synthetic generator has no model for features: {', '.join(missing)}")
    for f in features:
        if f.type == "numeric" and f.name != "antidepressant_pdc":
            feats[f.name] = np.round(feats[f.name], DECIMALS)
    log_odds = true_log_odds(feats)
    extra = None
    if modalities:
        extra = latent_modalities(feats["_severity"], wearable_missing=profile.wearable_missing,
                                  rng=np.random.default_rng([seed, 5, index]))
        log_odds = log_odds + modality_log_odds(extra)
    risk = _sigmoid(log_odds + _intercept_for(log_odds, profile.prevalence))
    labels = rng.binomial(1, risk).astype(np.int64)
    true_table = np.column_stack([feats[f.name] for f in features])
    observed = true_table.copy()
    for j, f in enumerate(features):
        if f.missing == "reject" or f.name in ALWAYS_RECORDED:
            continue
        rate = (
            profile.wearable_missing
            if f.name in WEARABLE_FEATURES
            else profile.questionnaire_missing
            if f.name in QUESTIONNAIRE_FEATURES
            else profile.other_missing
        )
        observed[rng.random(profile.patients) < rate, j] = np.nan
    _consistent_phq9_history(features, true_table, observed)
    return Cohort(profile, true_table, observed, labels, risk, severity=feats["_severity"], modalities=extra,
                  true_values=feats)


def _consistent_phq9_history(features: list[Feature], true_table: np.ndarray, observed: np.ndarray) -> None:
    """Make the recorded PHQ-9 count agree with the recorded latest score and slope (in place).

    No assessment on record (phq9_latest missing) means a count of 0 and no slope; a slope
    needs two assessments, a latest score one. The count is not in the risk model, so the
    ground truth is unchanged.
    """
    names = [f.name for f in features]
    if not {"phq9_latest", "phq9_slope_90d", "phq9_count_12m"} <= set(names):
        return
    latest, slope, count = names.index("phq9_latest"), names.index("phq9_slope_90d"), names.index("phq9_count_12m")
    has_latest = ~np.isnan(observed[:, latest])
    observed[~has_latest, slope] = np.nan
    has_slope = ~np.isnan(observed[:, slope])
    recorded = np.where(has_slope, np.maximum(observed[:, count], 2), np.maximum(observed[:, count], 1))
    observed[:, count] = np.where(has_latest, recorded, 0.0)
    true_table[:, count] = observed[:, count]


def _write_csv(path: Path, study: Study, rows: np.ndarray, labels: np.ndarray, ids: list[str] | None = None) -> None:
    # 12 significant digits: the 4-decimal values print as before, a PDC of k/180 stays exact to 1e-12.
    features = coded_features(study)
    formats = ["{:.0f}" if f.type in ("count", "binary") else "{:.12g}" for f in features]
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([f.name for f in features] + [study.label.name] + (["patient_id"] if ids else []))
        for n, (row, label) in enumerate(zip(rows, labels)):
            cells = ["" if np.isnan(v) else fmt.format(v) for fmt, v in zip(formats, row)]
            writer.writerow(cells + [int(label)] + ([ids[n]] if ids else []))


def patient_ids(first: int, count: int) -> list[str]:
    """`p` + 7 digits, as the FHIR rendering names patients (`simulations/fhir_cohorts.py`)."""
    return [f"p{first + i:07d}" for i in range(count)]


def _write_modalities(site_dir: Path, split: str, cohort: Cohort, rows: np.ndarray, ids: list[str],
                      index_date: datetime.date, rng: np.random.Generator) -> dict[str, int]:
    m, values = cohort.modalities, cohort.true_values
    notes = write_notes(site_dir / f"{split}.notes.csv", ids=ids, rows=rows, m=m, severity=cohort.severity,
                        index_date=index_date, rng=rng)
    readings = write_readings(site_dir / f"{split}.readings.csv", ids=ids, rows=rows, m=m,
                              sleep_hours=values["sleep_hours"], steps_per_day=values["steps_per_day"],
                              index_date=index_date, rng=rng)
    return {f"{split}_notes": notes, f"{split}_readings": readings}


def write_cohorts(
    study: Study, out_dir: str | Path, hospitals: int, seed: int, size_scale: float = 1.0, *,
    modalities: bool | None = None,
) -> dict:
    """Write `<out_dir>/<site>/{train,test}.csv` per hospital and `<out_dir>/cohorts.json`.

    With `modalities` (default: when the study derives features from notes or readings) the
    tables gain a `patient_id` column and each split its `.notes.csv` and `.readings.csv`, and
    the ground truth their terms (`simulations/modalities.py`); a coded-only study reads the same
    sites (it ignores the extra files and column), so both can be compared on one world.
    Returns the manifest: per-site profile, row counts and label prevalence, plus the
    ground-truth AUC on the union of the test splits.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if modalities is None:
        modalities = len(coded_features(study)) < len(study.features)
    index_date = study.mapping.index_date if study.mapping is not None else datetime.date(2025, 7, 1)
    sites, test_risk, test_labels = [], [], []
    for i, profile in enumerate(site_profiles(hospitals, seed, size_scale)):
        cohort = generate_site(study, profile, seed, i, modalities=modalities)
        n_test = max(1, int(round(profile.patients * TEST_FRACTION)))
        order = np.random.default_rng([seed, 3, i]).permutation(profile.patients)
        test_idx, train_idx = order[:n_test], order[n_test:]
        site_dir = out_dir / profile.name
        site_dir.mkdir(exist_ok=True)
        extra: dict[str, int] = {}
        if modalities:
            # ids as `simulations/fhir_cohorts.write_fhir_site` numbers a site's patients: train, then test
            train_ids, test_ids = patient_ids(0, len(train_idx)), patient_ids(len(train_idx), n_test)
            rng = np.random.default_rng([seed, 6, i])
            _write_csv(site_dir / "train.csv", study, cohort.observed[train_idx], cohort.labels[train_idx], train_ids)
            _write_csv(site_dir / "test.csv", study, cohort.observed[test_idx], cohort.labels[test_idx], test_ids)
            extra = {**_write_modalities(site_dir, "train", cohort, train_idx, train_ids, index_date, rng),
                     **_write_modalities(site_dir, "test", cohort, test_idx, test_ids, index_date, rng)}
        else:
            _write_csv(site_dir / "train.csv", study, cohort.observed[train_idx], cohort.labels[train_idx])
            _write_csv(site_dir / "test.csv", study, cohort.observed[test_idx], cohort.labels[test_idx])
        test_risk.append(cohort.true_risk[test_idx])
        test_labels.append(cohort.labels[test_idx])
        sites.append(
            {
                **asdict(profile),
                "train_rows": int(len(train_idx)),
                "test_rows": int(n_test),
                "observed_prevalence": round(float(cohort.labels.mean()), 4),
                "ground_truth_auc": round(roc_auc(cohort.labels[test_idx], cohort.true_risk[test_idx]), 4),
                **extra,
            }
        )
    manifest = {
        "seed": seed,
        "hospitals": hospitals,
        "study_hash": study.hash,
        "ground_truth_auc": round(roc_auc(np.concatenate(test_labels), np.concatenate(test_risk)), 4),
        "modalities": modalities,
        "sites": sites,
    }
    (out_dir / "cohorts.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
