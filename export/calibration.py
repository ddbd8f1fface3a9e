"""Calibration inputs for int8 quantization when no patient rows are at hand (the coordinator).

Drawn from the study spec alone: each scaled feature ~ N(0, 1) clipped to the model's
input range (binary features take their two scaled values with P(1) = center), and each
missing indicator is 0 or 1. This bounds every activation range the model sees in use;
on-site calibration from local data can only be tighter.
"""

from __future__ import annotations

import numpy as np

from fedcare.features import CLIP
from fedcare.study import Study


def spec_calibration_inputs(study: Study, rows: int = 2048, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    columns = []
    for f in study.features:
        if f.type == "binary":
            ones = rng.random(rows) < min(max(f.center, 0.0), 1.0)
            columns.append(np.where(ones, (1 - f.center) / f.scale, (0 - f.center) / f.scale))
        else:
            columns.append(np.clip(rng.normal(0.0, 1.0, rows), -CLIP, CLIP))
    indicators = [rng.random(rows) < 0.2 for f in study.features if f.missing == "indicator"]
    return np.column_stack(columns + indicators).astype(np.float32)
