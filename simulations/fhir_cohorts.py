"""Render synthetic cohorts as FHIR R4 bulk-data NDJSON that the study's `[mapping]` derives back exactly.

`write_fhir_split` turns one split (rows of raw feature values in spec order, NaN = missing,
plus 0/1 labels) into `Patient.ndjson`, `Observation.ndjson`, `Condition.ndjson`,
`MedicationRequest.ndjson` and `Encounter.ndjson` such that the derivation in docs/FHIR.md
yields the same values: same feature values (within float rounding), same missing cells,
same labels. It is driven by the parsed mapping (`fedcare.mapping`): codes, windows, units,
aggregates and the index date all come from it, so a study that changes a window or a code
still round-trips.

The records look like a real EHR export rather than the minimum the mapping needs:

* units vary where the mapping converts (weights in kg, [lb_av] or g; heights in cm, [in_i]
  or m; sleep in h or min; HRV in ms or s; scores as {score}, 1 or {#}; …);
* every aggregate is exercised the way it would be in practice: several PHQ-9 assessments
  with the latest and a 90-day trend, nightly wearable readings whose mean is the feature,
  refills whose union of supply days is the PDC (with gaps, early refills and a fill that
  started before the window), repeated diagnoses on the same date;
* distractors that must not change anything: unrelated Observation codes (PHQ-2, heart
  rate, blood pressure, a recorded BMI), records just outside a window, entered-in-error
  observations, refuted conditions, conditions whose onset is before the window but whose
  recordedDate is inside it, unrelated diagnoses (F43.10 is not F41*, G89.18 is not G89.2*),
  ambulatory encounters, non-psychiatric admissions, non-antidepressant prescriptions, and
  after the index date events that do not define the label.

Exactness has a price in two places: the earlier PHQ-9 scores that carry a 90-day slope are
decimals (latest - slope * days / 30; the slope is continuous), and the latest weight is
bmi * height² at full float precision (the height is a realistic 0.1 cm / 0.1 in / 0.01 m).
Dates stay away from window edges by at least a day, times keep the local date equal to the
UTC date, and nothing is dated after the label window closes (index date + the label's
`window_days_after`, the earliest day such an export can be made), so a reader that refuses
future dates accepts everything when `today` is at least that day.

Patient ids are `p` + 7 digits (`first_patient + row`), so sorting ids gives row order.
Lines of the non-Patient files are shuffled (a bulk export is not ordered by patient).
Everything is a pure function of (rows, labels, seed, first_patient).

`write_fhir_site` does this for one already written synthetic site (`<site>/train.csv`,
`<site>/test.csv` from `simulations/cohorts.py`), writing `<site>/train/` and `<site>/test/`
next to the CSVs from the values the CSVs hold; `write_fhir_cohorts` for every site of a tree.

This module is the entry point: it walks the rows and writes the files. The records come from
`simulations/fhir_observations.py` (observation and bmi features), `simulations/fhir_events.py`
(the Patient, conditions, encounters, medications, the label), built with
`simulations/fhir_resources.py` in the terminology of `simulations/fhir_vocabulary.py`.
"""


from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcare.mapping import FeatureRule, LabelRule, Mapping
from fedcare.study import Study
from simulations.fhir_events import (
    other_encounters,
    render_conditions,
    render_encounters,
    render_label,
    render_patient_resource,
    render_pdc,
    unrelated_conditions,
)
from simulations.fhir_modalities import write_fhir_modalities
from simulations.fhir_observations import render_observations
from simulations.fhir_resources import RESOURCE_TYPES, FeatureColumn, NotRepresentable, PatientRecords

ID_DIGITS = 7
# The mapping sources `_render_patient` renders (every source of `fedcare.mapping.SOURCES`).
RENDERED_SOURCES = frozenset(
    {"patient_age", "patient_female", "patient_extension", "observation", "bmi", "condition", "encounter", "medication"}
)


def _features(study: Study, mapping: Mapping) -> list[FeatureColumn]:
    """The study's coded features, in row order, each with its parsed rule (those derived from
    notes and readings are rendered by `simulations/fhir_modalities.py`)."""
    from fedcare.derived import Derivation

    derived = Derivation(study).columns
    out = []
    for j, f in enumerate(study.features):
        if j in derived:
            continue
        rule = mapping.features.get(f.name)
        if rule is None:
            raise ValueError(f"the mapping has no rule for feature {f.name}")
        out.append(FeatureColumn(f.name, j, rule, f.low, f.high, f.center, f.type in ("count", "binary")))
    unknown = {f.rule.source for f in out} - RENDERED_SOURCES
    if unknown:
        raise NotImplementedError(f"mapping sources {sorted(unknown)}")
    return out


def _render_patient(p: PatientRecords, feats: list[FeatureColumn], row: np.ndarray, label: int, label_rule: LabelRule, site: str) -> None:
    render_patient_resource(p, feats, row, site)
    by_source: dict[str, list[FeatureColumn]] = {}
    for f in feats:
        by_source.setdefault(f.rule.source, []).append(f)
    female = next((row[f.column] for f in feats if f.rule.source == "patient_female"), math.nan)
    render_observations(p, by_source.get("observation", []), by_source.get("bmi", []), row, female)

    label_rules = label_rule.any_of
    condition_patterns = [c for f in by_source.get("condition", []) for c in f.rule.codes]
    condition_patterns += [c for r in label_rules if r.source == "condition" for c in r.codes]
    for f in by_source.get("condition", []):
        render_conditions(p, f, row)
    unrelated_conditions(p, condition_patterns)

    encounter_rules: list[FeatureRule] = [f.rule for f in by_source.get("encounter", [])]
    for f in by_source.get("encounter", []):
        render_encounters(p, f, row, [r for r in encounter_rules if r is not f.rule])
    other_encounters(p, encounter_rules, [r for r in label_rules if r.source == "encounter"])

    for f in by_source.get("medication", []):
        render_pdc(p, f, row)
    render_label(p, label, label_rule)


def patient_id(number: int) -> str:
    """Ids sort in row order: `p0000000`, `p0000001`, …"""
    return f"p{number:0{ID_DIGITS}d}"


def write_fhir_split(
    study: Study,
    mapping: Mapping,
    rows: np.ndarray,
    labels: np.ndarray,
    out_dir: Path,
    seed: int | Sequence[int],
    first_patient: int = 0,
) -> dict:
    """Write one split as FHIR R4 NDJSON (one file per resource type) in `out_dir`.

    `rows`: raw feature values in the study's feature order (NaN = missing), one row per
    patient; `labels`: 0/1; `mapping`: the parsed `fedcare.mapping.Mapping`; `seed`: an int
    or a sequence of ints. Patient ids are `patient_id(first_patient + i)`. Raises
    `NotRepresentable` (naming the row) if a row cannot come out of FHIR under the mapping,
    e.g. a missing count. Returns {"patients", "resources": {type: count}, "distractors", "files"}.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping: expected the parsed fedcare.mapping.Mapping (study.mapping), got {type(mapping).__name__}")
    rows = np.asarray(rows, dtype=np.float64)
    labels = np.asarray(labels)
    if rows.ndim != 2 or rows.shape[1] != len(study.features) or len(labels) != len(rows):
        raise ValueError(f"rows must be (n, {len(study.features)}) with n labels; got {rows.shape} and {labels.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    feats = _features(study, mapping)
    site = out_dir.parent.name or "site"
    seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(x) for x in seed]
    lines: dict[str, list[str]] = {t: [] for t in RESOURCE_TYPES}
    distractors = 0
    for i, (row, label) in enumerate(zip(rows, labels)):
        number = first_patient + i
        if number >= 10**ID_DIGITS:
            raise ValueError("too many patients for the id width")
        p = PatientRecords(patient_id(number), np.random.default_rng([*seeds, 17, number]), mapping.index_date)
        try:
            _render_patient(p, feats, row, int(label), mapping.label, site)
        except NotRepresentable as err:
            raise NotRepresentable(f"row {i} (patient {p.pid}): {err}") from None
        distractors += p.distractors
        for kind, resources in p.resources.items():
            lines[kind].extend(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in resources)
    shuffle = np.random.default_rng([*seeds, 18, first_patient])
    files = {}
    for kind in RESOURCE_TYPES:
        body = lines[kind]
        if kind != "Patient":
            body = [body[k] for k in shuffle.permutation(len(body))]
        path = out_dir / f"{kind}.ndjson"
        path.write_text("".join(line + "\n" for line in body), encoding="utf-8")
        files[kind] = str(path)
    return {
        "patients": int(len(rows)),
        "resources": {kind: len(lines[kind]) for kind in RESOURCE_TYPES},
        "distractors": distractors,
        "files": files,
    }


def write_fhir_site(study: Study, mapping: Mapping, site_dir: str | Path, seed: int = 0) -> dict:
    """Write `<site_dir>/train/` and `<site_dir>/test/` from `<site_dir>/{train,test}.csv`.

    The values are the CSVs' (read with `client.data.read_site_csv`, which must load every
    row), so the FHIR and CSV forms of a site are the same data. Patient ids continue from
    train into test. Deterministic in (CSV contents, seed, site directory name). Returns
    {"train": summary, "test": summary} with `write_fhir_split`'s summaries.
    """
    from client.data import read_site_csv

    site_dir = Path(site_dir)
    site_seed = zlib.crc32(site_dir.name.encode())
    first = 0
    out: dict[str, dict] = {}
    for k, split in enumerate(("train", "test")):
        table = read_site_csv(study, site_dir / f"{split}.csv")
        if table.report.quarantined:
            raise ValueError(f"{site_dir / split}.csv: rows quarantined, cannot render them:\n{table.report.summary()}")
        out[split] = write_fhir_split(
            study,
            mapping,
            table.features,
            table.labels.astype(np.int64),
            site_dir / split,
            seed=[int(seed), site_seed, k],
            first_patient=first,
        )
        out[split]["modalities"] = write_fhir_modalities(site_dir, split)
        first += out[split]["patients"]
    return out


def write_fhir_cohorts(study: Study, mapping: Mapping, sites_dir: str | Path, seed: int = 0) -> dict:
    """`write_fhir_site` for every `<site>/` under `sites_dir` that holds train.csv and test.csv.

    Returns {site name: {"train": summary, "test": summary}}.
    """
    sites_dir = Path(sites_dir)
    sites = sorted(d for d in sites_dir.iterdir() if (d / "train.csv").is_file() and (d / "test.csv").is_file())
    if not sites:
        raise ValueError(f"{sites_dir}: no site directories with train.csv and test.csv")
    return {site.name: write_fhir_site(study, mapping, site, seed) for site in sites}


__all__ = ["NotRepresentable", "patient_id", "write_fhir_cohorts", "write_fhir_site", "write_fhir_split"]
