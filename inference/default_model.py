"""Which model `fedcare serve` scores with when a request names none: the fastest one here, within the
accuracy bound.

A package holds fp32 (the reference), int8 (static QDQ) and often a16w8 (NPU-shaped). Which is fastest
depends on the model and the machine: on this project's CPUs, for the study's small MLP, int8 is
*slower* per row than fp32 (ONNX Runtime fuses fp32's layers into 3 kernels but int8 needs 5 —
QuantizeLinear, two QGemm, Squeeze, DequantizeLinear — and for a 30×32 layer the quantize/dequantize
steps cost more than the integer matrix product saves: 6.7 vs 8.6 µs at batch 1, 8.7 vs 11.0 µs at
batch 64, even at batch 1,024; BENCHMARKS.md). On an NPU, or for a wide model, the quantized ones win.
So the choice is measured at start-up, on this machine and execution provider:

1. probe rows (`probe_rows`): PROBE_ROWS model-input rows as the spec's calibration draws them
   (`export.calibration`: each scaled feature ~ N(0, 1) within its range, indicators at random; no
   patient data), i.e. the inputs the quantized models were calibrated for;
2. accuracy: each quantized model's largest |risk − fp32 risk| over the probe rows; a model above
   ACCURACY_BOUND is never the default;
3. speed: one-row latency of each model, interleaved, best of TIMING_TRIALS (about 30 ms in all);
   a quantized model must beat fp32 by MIN_SPEEDUP to be chosen (fp32, the reference, wins ties).

`fedcare serve --model NAME` pins the default instead. The start-up line states the choice and the
numbers behind it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from inference.model import INPUT_NAME, OUTPUT_NAME, InputSpec, ServeError

REFERENCE = "fp32"
ACCURACY_BOUND = 0.01  # largest |Δ risk| against fp32 a default model may have on the probe rows
MIN_SPEEDUP = 1.10
PROBE_ROWS = 256
TIMING_TRIALS = 5
CALLS_PER_TRIAL = 100


@dataclass(frozen=True)
class DefaultChoice:
    """The default model and the measurements it was chosen by (empty when pinned)."""

    model: str
    pinned: bool
    per_row_us: Mapping[str, float]
    max_delta_risk: Mapping[str, float]

    def describe(self) -> str:
        if self.pinned:
            return f"default {self.model} (--model)"
        timing = ", ".join(f"{name} {us:.1f} µs" for name, us in self.per_row_us.items())
        over = [name for name, delta in self.max_delta_risk.items() if delta > ACCURACY_BOUND]
        outside = f"; outside the bound: {', '.join(over)}" if over else ""
        return f"default {self.model} (fastest here within |Δ risk| ≤ {ACCURACY_BOUND:g} of fp32: {timing} per row{outside})"


def probe_rows(inputs: InputSpec, *, rows: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """Model-input rows: each scaled feature ~ N(0, 1) within its scaled range (and the serving clip),
    each missing indicator 0 or 1 (P(1) = 0.2), as the spec-derived calibration draws them."""
    rng = np.random.default_rng(seed)
    low = np.maximum((inputs.low - inputs.center) / inputs.scale, -inputs.clip)
    high = np.minimum((inputs.high - inputs.center) / inputs.scale, inputs.clip)
    x = np.zeros((rows, len(inputs.model_inputs)), dtype=np.float32)
    x[:, : len(inputs.features)] = np.clip(rng.normal(0.0, 1.0, size=(rows, len(inputs.features))), low, high)
    x[:, len(inputs.features):] = rng.random((rows, len(inputs.model_inputs) - len(inputs.features))) < 0.2
    return x


def _risks(session, x: np.ndarray) -> np.ndarray:
    batch = session.get_inputs()[0].shape[0]
    if isinstance(batch, int):  # a static batch (a16w8 is batch 1): row by row
        logits = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0].reshape(-1)
                                 for i in range(0, len(x), batch)])
    else:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].reshape(-1)
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -700, 700)))


def _per_row_us(sessions: Mapping[str, object], row: np.ndarray) -> dict[str, float]:
    best = {name: float("inf") for name in sessions}
    feed = {INPUT_NAME: row}
    for _ in range(TIMING_TRIALS):
        for name, session in sessions.items():  # interleaved: a noisy moment hits every model alike
            run = session.run
            started = time.perf_counter()
            for _ in range(CALLS_PER_TRIAL):
                run([OUTPUT_NAME], feed)
            best[name] = min(best[name], (time.perf_counter() - started) / CALLS_PER_TRIAL * 1e6)
    return {name: round(us, 2) for name, us in best.items()}


def choose_default(sessions: Mapping[str, object], inputs: InputSpec, *, pinned: str | None = None,
                   bound: float = ACCURACY_BOUND, min_speedup: float = MIN_SPEEDUP) -> DefaultChoice:
    """The default model among `sessions` (name → ONNX Runtime session; `fp32` is required): `pinned`,
    or the fastest whose largest |Δ risk| against fp32 is at most `bound` and which beats fp32's
    per-row latency by `min_speedup` (else fp32)."""
    if pinned is not None:
        if pinned not in sessions:
            raise ServeError(f"--model: the package serves {', '.join(sessions)}; no model '{pinned}'")
        return DefaultChoice(pinned, True, {}, {})
    x = probe_rows(inputs)
    reference = _risks(sessions[REFERENCE], x)
    deltas = {name: round(float(np.abs(_risks(s, x) - reference).max()), 6)
              for name, s in sessions.items() if name != REFERENCE}
    timing = _per_row_us(sessions, x[:1])
    chosen = REFERENCE
    for name, us in sorted(timing.items(), key=lambda item: item[1]):
        if name != REFERENCE and deltas[name] <= bound and us * min_speedup <= timing[REFERENCE]:
            chosen = name
            break
    return DefaultChoice(chosen, False, timing, deltas)
