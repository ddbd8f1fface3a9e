"""Export the study model to ONNX and quantize it.

`export_fp32` writes one self-contained file (no external-data sidecar) with a dynamic
batch axis: input `features` float32 [batch, n_inputs] (scaled, see `fedcare.features`),
output `risk_logit` float32 [batch]. Study metadata (hash, input order, scaling) is
embedded as ONNX metadata properties.

`quantize_int8` writes a static-QDQ model: uint8 activations, int8 per-channel weights,
calibrated on the inputs it is given.

`quantize_a16w8` writes the variant for QNN-class NPUs: the fp32 graph with its batch axis
fixed to 1 (input [1, n_inputs], output [1]), static QDQ with uint16 activations and int8
symmetric per-channel weights (opset 21, where QuantizeLinear/DequantizeLinear take 16-bit
types natively; ONNX Runtime's quantizer raises the opset itself).

`finish_model` puts a model in package form (the run's study hash and scaling method in its
metadata, exporter annotations stripped, outputs checked bit-identical); `run_onnx` runs one.
The whole path from a checkpoint to these files is `export.pipeline.export_models`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from fedcare.features import scaling
from fedcare.study import Study

logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices

INPUT_NAME = "features"
OUTPUT_NAME = "risk_logit"


def _metadata(study: Study) -> dict[str, str]:
    center, scale = scaling(study)
    return {
        "fedcare.study_hash": study.hash,
        "fedcare.study_name": study.name,
        "fedcare.label": study.label.name,
        "fedcare.inputs": json.dumps(study.input_names),
        "fedcare.scaling": json.dumps(
            {f.name: [c, s] for f, c, s in zip(study.features, center.tolist(), scale.tolist())}
        ),
        "fedcare.output": "logit of the label's probability; risk = sigmoid(risk_logit)",
    }


def _attach_metadata(path: Path, study: Study) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in _metadata(study).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_fp32(model: torch.nn.Module, study: Study, path: str | Path) -> Path:
    """Single-file fp32 ONNX with a dynamic batch axis; passes onnx.checker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(2, len(study.input_names), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    _attach_metadata(path, study)
    return path


class _Batches(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch_size: int = 256) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.astype(np.float32)}


def _quantize_qdq(source: Path, path: Path, calibration: CalibrationDataReader, activations: QuantType) -> None:
    """Pre-process, then static QDQ with int8 per-channel weights and MinMax calibration."""
    prepared = path.with_name(path.stem + ".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            calibration,
            quant_format=QuantFormat.QDQ,
            activation_type=activations,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)


def quantize_int8(fp32_path: str | Path, calibration_inputs: np.ndarray, path: str | Path, study: Study) -> Path:
    """Static QDQ: uint8 activations, int8 per-channel weights, MinMax calibration."""
    fp32_path, path = Path(fp32_path), Path(path)
    _quantize_qdq(fp32_path, path, _Batches(calibration_inputs), QuantType.QUInt8)
    _attach_metadata(path, study)
    return path


def fixed_batch_one(fp32_path: str | Path, path: str | Path) -> Path:
    """The fp32 model with its symbolic batch axis fixed to 1 (same graph and weights, so the same logits)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    model = onnx.load(str(fp32_path))
    shape = model.graph.input[0].type.tensor_type.shape
    batch = shape.dim[0].dim_param if shape.dim and shape.dim[0].HasField("dim_param") else None
    if batch is not None:
        make_dim_param_fixed(model.graph, batch, 1)
    fix_output_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def quantize_a16w8(fp32_path: str | Path, calibration_inputs: np.ndarray, path: str | Path, study: Study) -> Path:
    """Fixed batch 1, static QDQ: uint16 activations, int8 per-channel weights, MinMax calibration
    (one calibration row per run, as the model takes one row)."""
    fp32_path, path = Path(fp32_path), Path(path)
    batch_one = path.with_name(path.stem + ".b1.onnx")
    try:
        fixed_batch_one(fp32_path, batch_one)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer's "updating the model to opset 21" notice is expected
        try:
            _quantize_qdq(batch_one, path, _Batches(calibration_inputs, batch_size=1), QuantType.QUInt16)
        finally:
            root.setLevel(level)
    finally:
        batch_one.unlink(missing_ok=True)
    _attach_metadata(path, study)
    return path


def run_onnx(path: str | Path | bytes, x: np.ndarray) -> np.ndarray:
    """Logits of an ONNX model (file or bytes) with ONNX Runtime on the CPU; row by row when its
    batch axis is fixed to 1 (the A16W8 model)."""
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if session.get_inputs()[0].shape[0] == 1:
        return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def finish_model(path: Path, study_hash: str, scaling_method: str, check_inputs: np.ndarray) -> None:
    """Package form of an exported model: the run's study hash and scaling method in its metadata,
    exporter annotations (per-node stack traces with the build machine's paths, FX node dumps) and
    unused opset imports removed. Refuses if the outputs on `check_inputs` change at all."""
    from export.package import PackageError

    before = run_onnx(path, check_inputs)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({"fedcare.study_hash": study_hash, "fedcare.scaling_method": scaling_method})
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        del value.metadata_props[:]
        value.doc_string = ""
    for tensor in graph.initializer:
        del tensor.metadata_props[:]
        tensor.doc_string = ""
    del graph.metadata_props[:]
    graph.doc_string = model.doc_string = ""
    used = {("" if n.domain in ("", "ai.onnx") else n.domain) for n in graph.node}
    keep = [o for o in model.opset_import if (o.domain if o.domain != "ai.onnx" else "") in used | {""}]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    if not np.array_equal(before, run_onnx(data, check_inputs)):
        raise PackageError(f"{path.name}: internal error: compacting the model changed its outputs")
    path.write_bytes(data)
