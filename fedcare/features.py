"""From a site's raw feature table to model inputs, identically at every site.

A raw table is a float matrix with one column per study feature (spec order) and NaN
where a value is missing. `model_inputs` applies the spec's fixed scaling, imputes
missing values with the scaled center (0), clips scaled values to +-CLIP (outliers
such as 40 ED visits would otherwise dominate the int8 input quantization range), and appends one 0/1 indicator column per
feature whose missing-value policy is `indicator` (order: `Study.input_names`).
"""

from __future__ import annotations

import numpy as np

from fedcare.study import Study

CLIP = 5.0


def scaling(study: Study) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (center, scale) vectors, in spec order."""
    center = np.array([f.center for f in study.features], dtype=np.float64)
    scale = np.array([f.scale for f in study.features], dtype=np.float64)
    return center, scale


def model_inputs(study: Study, raw: np.ndarray) -> np.ndarray:
    """Scaled, imputed float32 model inputs with missing-value indicators appended."""
    if raw.ndim != 2 or raw.shape[1] != len(study.features):
        raise ValueError(
            f"expected a raw table with {len(study.features)} feature columns, got shape {raw.shape}"
        )
    center, scale = scaling(study)
    missing = np.isnan(raw)
    scaled = np.clip(np.where(missing, 0.0, (raw - center) / scale), -CLIP, CLIP)
    indicator_cols = [i for i, f in enumerate(study.features) if f.missing == "indicator"]
    indicators = missing[:, indicator_cols].astype(np.float64)
    return np.concatenate([scaled, indicators], axis=1).astype(np.float32)
