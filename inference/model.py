"""The served model: a verified package's input scaling (numpy) and its ONNX Runtime sessions.

`InputSpec` turns one request's raw feature values into the model's input row exactly as
`fedcare.features.model_inputs` does for a site's table (same float64 expression, same clip,
same indicator columns, then float32), using the *package's* scaling (`inputs.scaling`, e.g.
the federated standardization), never the study file's. It also enforces what the raw table
never has to: each value finite and inside the study range [low, high], and `missing =
"reject"` features present.

`ModelSet` opens one ONNX Runtime session per model file of the package (the file's bytes are
hashed again against the manifest before use), all on the best available execution provider in
the order QNN, OpenVINO, CoreML, DirectML, then CPU; a provider whose session cannot be created
falls back to CPU. Sessions run one row at a time: 1 intra-op thread, sequential execution.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.package import VerifiedPackage, read_inputs
from fedcare.errors import FedcareError

INPUT_NAME = "features"
OUTPUT_NAME = "risk_logit"
CPU = "CPUExecutionProvider"
# Accelerators first (NPU, then vendor runtimes, then GPU via DirectML); CPU is the fallback.
PROVIDER_ORDER = (
    "QNNExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
)
REQUIRED_MODELS = ("int8", "fp32")


class ServeError(FedcareError, ValueError):
    """The service cannot start: the package, kit or settings are unusable (one line, names the cause)."""


class InputError(ValueError):
    """A request's feature values cannot be scored; `feature` names the offending feature (or None)."""

    def __init__(self, message: str, feature: str | None = None, reason: str = "invalid") -> None:
        super().__init__(message)
        self.feature = feature
        self.reason = reason


def sigmoid(logit: float) -> float:
    """Risk from a logit, in float64, without overflow for large |logit|."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    e = math.exp(logit)
    return e / (1.0 + e)


def _fmt(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class InputSpec:
    """The package's `inputs` section, as arrays in the raw-feature (spec) order."""

    features: tuple[str, ...]
    model_inputs: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    low: np.ndarray
    high: np.ndarray
    missing: tuple[str, ...]
    clip: float
    index: Mapping[str, int] = field(repr=False)
    indicator_cols: np.ndarray = field(repr=False)
    reject_cols: tuple[int, ...] = field(repr=False)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> InputSpec:
        """The manifest's `inputs`, validated by `export.package.read_inputs` (the one validator)."""
        inputs = read_inputs(manifest)
        features = inputs.features
        missing = tuple(f.missing for f in features)
        return cls(
            features=inputs.names,
            model_inputs=inputs.model_inputs,
            center=np.array([f.center for f in features], dtype=np.float64),
            scale=np.array([f.scale for f in features], dtype=np.float64),
            low=np.array([f.low for f in features], dtype=np.float64),
            high=np.array([f.high for f in features], dtype=np.float64),
            missing=missing,
            clip=inputs.clip,
            index={f.name: i for i, f in enumerate(features)},
            indicator_cols=np.array([i for i, m in enumerate(missing) if m == "indicator"], dtype=np.intp),
            reject_cols=tuple(i for i, m in enumerate(missing) if m == "reject"),
        )

    # -- request values -> model input row --------------------------------------------------

    def values_from_features(self, values: Mapping[str, float | None]) -> list[float | None]:
        """Values in spec order from {feature name: value or None}; an absent name is a missing value."""
        index = self.index
        for name in values:
            if name not in index:
                shown = name if len(name) <= 64 else name[:61] + "..."
                raise InputError(f"unknown feature '{shown}'; this package's features are listed by GET /v1/models",
                                 None, "unknown_feature")
        return [values.get(name) for name in self.features]

    def values_from_vector(self, values: Sequence[float | None]) -> Sequence[float | None]:
        """Values in `inputs.features` order (None = missing), after checking their number."""
        if len(values) != len(self.features):
            raise InputError(
                f"feature_vector: expected {len(self.features)} values (in the order of inputs.features), got {len(values)}",
                None, "vector_length",
            )
        return values

    def check(self, values: Sequence[float | None]) -> list[float]:
        """The raw row (NaN = missing) after the request rules, in spec order: each value finite and in
        [low, high], `missing = "reject"` features present. Raises `InputError` naming the first offender."""
        lows, highs, rejects, names = self._lows, self._highs, self._rejects, self.features
        raw: list[float] = []
        for i, v in enumerate(values):
            if v is None:
                if rejects[i]:
                    raise InputError(
                        f"feature '{names[i]}': missing, and the study rejects rows without it (missing = \"reject\")",
                        names[i], "missing_rejected",
                    )
                raw.append(math.nan)
            elif lows[i] <= v <= highs[i]:
                raw.append(v)
            elif not math.isfinite(v):  # a request's NaN or infinity is an error, not a missing value
                raise InputError(f"feature '{names[i]}': {v} is not a finite number "
                                 "(send null or leave the feature out for a missing value)", names[i], "not_finite")
            else:
                raise InputError(f"feature '{names[i]}': {_fmt(v)} is outside the study range "
                                 f"[{_fmt(lows[i])}, {_fmt(highs[i])}]", names[i], "out_of_range")
        return raw

    def scale_rows(self, raw: np.ndarray) -> np.ndarray:
        """`fedcare.features.model_inputs` on raw rows [n, features] (NaN = missing), in numpy."""
        missing = np.isnan(raw)
        scaled = np.clip(np.where(missing, 0.0, (raw - self.center) / self.scale), -self.clip, self.clip)
        indicators = missing[:, self.indicator_cols].astype(np.float64)
        return np.concatenate([scaled, indicators], axis=1).astype(np.float32)

    def prepare(self, values: Sequence[float | None]) -> np.ndarray:
        """Checked and scaled model input for one request row: float32 [1, len(model_inputs)].

        The same float64 arithmetic as `scale_rows` / `model_inputs` (so the same float32 result),
        with fewer numpy calls for a single row."""
        raw = np.array(self.check(values), dtype=np.float64)
        missing = np.isnan(raw)
        scaled = (raw - self.center) / self.scale
        scaled[missing] = 0.0
        np.maximum(scaled, -self.clip, out=scaled)
        np.minimum(scaled, self.clip, out=scaled)
        out = np.empty((1, len(self.model_inputs)), dtype=np.float32)
        n = len(self.features)
        out[0, :n] = scaled
        out[0, n:] = missing[self.indicator_cols]
        return out

    @property
    def _lows(self) -> list[float]:
        return self._lists[0]

    @property
    def _highs(self) -> list[float]:
        return self._lists[1]

    @property
    def _rejects(self) -> list[bool]:
        return self._lists[2]

    @functools.cached_property
    def _lists(self) -> tuple[list[float], list[float], list[bool]]:
        return self.low.tolist(), self.high.tolist(), [m == "reject" for m in self.missing]


# -- ONNX Runtime ----------------------------------------------------------------------------


def choose_provider(available: Sequence[str] | None = None) -> str:
    """The best execution provider this onnxruntime build offers (QNN, OpenVINO, CoreML, DirectML, CPU)."""
    available = ort.get_available_providers() if available is None else list(available)
    for name in PROVIDER_ORDER:
        if name in available:
            return name
    return CPU


def session_options(provider: str = CPU) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if provider == "DmlExecutionProvider":
        options.enable_mem_pattern = False  # required by DirectML
    return options


def _provider_options(provider: str) -> dict[str, str]:
    if provider == "QNNExecutionProvider":
        return {"backend_path": "QnnHtp.dll" if platform.system() == "Windows" else "libQnnHtp.so"}
    return {}


def open_session(model: bytes, provider: str) -> tuple[ort.InferenceSession, str, str | None]:
    """(session, provider actually used, why the preferred one was not used or None)."""
    reason = None
    if provider != CPU and provider not in ort.get_available_providers():
        reason = f"{provider} is not available in this onnxruntime build"
    elif provider != CPU:
        try:
            session = ort.InferenceSession(
                model, sess_options=session_options(provider),
                providers=[(provider, _provider_options(provider)), CPU],
            )
            used = session.get_providers()[0]
            if used == provider:
                return session, used, None
            reason = f"{provider} took no part of the graph"
        except Exception as err:  # noqa: BLE001 - any provider failure means: fall back to the CPU
            reason = f"{provider} failed ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    session = ort.InferenceSession(model, sess_options=session_options(CPU), providers=[CPU])
    return session, CPU, reason


@dataclass
class ServedModel:
    name: str
    file: str
    sha256: str
    batch: Any
    provider: str
    session: ort.InferenceSession = field(repr=False)

    def logit(self, x: np.ndarray) -> float:
        return float(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0][0])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "sha256": self.sha256, "batch": self.batch, "provider": self.provider}


class ModelSet:
    """The package's models, each in an ONNX Runtime session on the chosen execution provider."""

    def __init__(self, models: dict[str, Any], preferred_provider: str, notes: list[str]) -> None:
        self.models = models
        self.preferred_provider = preferred_provider
        self.notes = notes
        self.default = "fp32"  # the model a request that names none is scored by (`inference.default_model`)

    @classmethod
    def open(cls, package: VerifiedPackage, manifest: Mapping[str, Any], inputs: InputSpec,
             provider: str | None = None) -> ModelSet:
        """Sessions for the models of a verified package (`manifest` passed `export.package.check_manifest`),
        read from its directory or, for an encrypted package, from memory."""
        listed = manifest["models"]
        for required in REQUIRED_MODELS:
            if required not in listed:
                raise ServeError(f"manifest.json: the package has no '{required}' model")
        preferred = provider or choose_provider()
        models: dict[str, Any] = {}
        notes: list[str] = []
        for name, entry in listed.items():
            file, digest = entry["file"], entry["sha256"]
            path = package.path / file
            try:
                data = package.read(file)
            except OSError as err:
                raise ServeError(f"{path}: cannot read the model file ({err.strerror})") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise ServeError(f"{path}: sha256 does not match the signed manifest; refusing to serve")
            try:
                session, used, reason = open_session(data, preferred)
                _check_io(session, inputs, path)
            except ServeError:
                raise
            except Exception as err:  # noqa: BLE001 - an unusable optional model is skipped, a required one is fatal
                message = f"{path}: ONNX Runtime cannot load it ({type(err).__name__})"
                if name in REQUIRED_MODELS:
                    raise ServeError(message) from None
                notes.append(f"model '{name}' not served: {message}")
                continue
            if reason:
                notes.append(f"model '{name}': {reason}; using {CPU}")
            models[name] = ServedModel(name, file, digest, entry.get("batch"), used, session)
        return cls(models, preferred, notes)

    @property
    def provider(self) -> str:
        """The provider the default model runs on (the one reported at startup)."""
        return self.models[self.default].provider


def _check_io(session: ort.InferenceSession, inputs: InputSpec, path: Path) -> None:
    ins, outs = session.get_inputs(), session.get_outputs()
    if [i.name for i in ins] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outs]:
        raise ServeError(f"{path}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}'")
    width = ins[0].shape[-1] if ins[0].shape else None
    if isinstance(width, int) and width != len(inputs.model_inputs):
        raise ServeError(f"{path}: takes {width} inputs, the manifest lists {len(inputs.model_inputs)}")
    meta = session.get_modelmeta().custom_metadata_map
    if "fedcare.inputs" in meta:
        try:
            names = json.loads(meta["fedcare.inputs"])
        except ValueError:
            names = None
        if names != list(inputs.model_inputs):
            raise ServeError(f"{path}: its embedded input order differs from the manifest's inputs.model_inputs")
