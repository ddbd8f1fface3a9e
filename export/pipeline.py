"""The one export pipeline: a run's weights and the study as run -> fp32 ONNX -> int8 QDQ (-> A16W8 QDQ).

Every place that exports the global model calls `export_models`: the signed package
(`export.build.build_package`, all three forms, finished for the package), the coordinator's
study report and the simulation's evaluator (fp32 and int8 into the run folder's `export/`).

    exported = export_models(record.study(), weights, record.path / "export",
                             calibration=rows)          # default: spec-derived inputs
    exported.fp32.path, exported.int8.bytes, exported.scaling_method

`study` is the study exactly as run (`RunRecord.study()`: the run's overrides and federated
scaling applied); the models take its scaled inputs and carry its hash. The int8 and A16W8
models are calibrated on `calibration` (scaled model inputs), by default on inputs drawn from the
study spec alone (`export.calibration.spec_calibration_inputs`), as the coordinator holds no
patient rows. With `package=True` each model is put in package form (`finish_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.package import MODEL_FILES, PackageError
from fedcare.errors import FedcareError
from fedcare.study import Study

KINDS = tuple(MODEL_FILES)  # fp32, int8, a16w8
DEFAULT_KINDS = ("fp32", "int8")
CHECK_ROWS = 64  # rows on which a finished model's outputs must stay bit-identical


@dataclass(frozen=True)
class ExportedModel:
    kind: str  # "fp32", "int8" or "a16w8"
    path: Path
    bytes: int


@dataclass(frozen=True)
class ExportedModels:
    """What `export_models` wrote: one entry per kind, in the order fp32, int8, a16w8."""

    models: dict[str, ExportedModel]
    scaling_method: str  # "federated" (the run's pooled standardization) or "spec"
    calibration_rows: int

    def __getitem__(self, kind: str) -> ExportedModel:
        return self.models[kind]

    @property
    def fp32(self) -> ExportedModel:
        return self.models["fp32"]

    @property
    def int8(self) -> ExportedModel:
        return self.models["int8"]


def scaling_method(study: Study) -> str:
    """"federated" when the study carries a run's federated standardization (`Study.with_scaling`), else "spec"."""
    return "federated" if study.scaled_from else "spec"


@contextlib.contextmanager
def onnx_step(what: str) -> Iterator[None]:
    """A failure of the ONNX tooling (exporter, quantizer, checker, ONNX Runtime) becomes one `PackageError` line."""
    try:
        yield
    except FedcareError:
        raise
    except Exception as err:  # noqa: BLE001 - their exception types are many and undocumented
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise PackageError(f"{what}: {type(err).__name__}: {text}" if text else f"{what}: {type(err).__name__}") from None


def export_models(study: Study, weights: Sequence[np.ndarray], out_dir: str | Path, *,
                  calibration: np.ndarray | None = None, kinds: Sequence[str] = DEFAULT_KINDS,
                  package: bool = False) -> ExportedModels:
    """Export `weights` (the study's model, `fedcare.model.get_weights` order) to `out_dir/model.onnx`
    and quantize it to each further kind (`model.int8.onnx`, `model.a16w8.onnx`).

    `kinds` must include "fp32" (the quantized models are made from it). `calibration` is scaled
    model inputs [rows, len(study.input_names)]; None: spec-derived inputs. `package=True` puts
    every model in package form. Raises `PackageError` (one line) when the weights do not fit the
    study's model or the ONNX tooling refuses a step."""
    from export.calibration import spec_calibration_inputs
    from export.onnx_export import export_fp32, finish_model, quantize_a16w8, quantize_int8
    from fedcare.model import build_model, set_weights

    unknown = [k for k in kinds if k not in KINDS]
    if unknown or "fp32" not in kinds:
        raise ValueError(f"kinds: expected fp32 and any of {', '.join(KINDS[1:])}, got {list(kinds)}")
    model = build_model(study)
    try:
        set_weights(model, list(weights))
    except (ValueError, RuntimeError) as err:
        raise PackageError(f"the weights do not fit study {study.name}'s model ({str(err).splitlines()[0]})") from None
    out_dir = Path(out_dir)
    method = scaling_method(study)
    x = spec_calibration_inputs(study) if calibration is None else np.asarray(calibration, dtype=np.float32)
    quantize = {"int8": quantize_int8, "a16w8": quantize_a16w8}
    paths: dict[str, Path] = {}
    for kind in KINDS:
        if kind not in kinds:
            continue
        target = out_dir / MODEL_FILES[kind]
        with onnx_step(f"{target.name}: {kind} export"):
            if kind == "fp32":
                paths[kind] = export_fp32(model, study, target)
            else:
                paths[kind] = quantize[kind](paths["fp32"], x, target, study)
            if package:
                finish_model(paths[kind], study.hash, method, x[:CHECK_ROWS])
    models = {kind: ExportedModel(kind, path, path.stat().st_size) for kind, path in paths.items()}
    return ExportedModels(models, method, int(len(x)))
