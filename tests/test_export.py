"""Export parity: fp32 ONNX equals torch; the calibrated int8 QDQ model keeps the AUC."""

import numpy as np
import onnx
import pytest
import torch

from client.data import load_site
from client.training import train_plain
from export.onnx_export import export_fp32, quantize_int8, run_onnx
from fedcare.features import model_inputs
from fedcare.metrics import roc_auc
from fedcare.model import build_model


@pytest.fixture(scope="module")
def exported(study, cohorts_dir, tmp_path_factory):
    data = load_site(study, cohorts_dir / "hospital-04")
    x, y = model_inputs(study, data.train.features), data.train.labels
    model = build_model(study)
    train_plain(study, model, x, y, epochs=4)
    out = tmp_path_factory.mktemp("export")
    fp32 = export_fp32(model, study, out / "model.onnx")
    int8 = quantize_int8(fp32, x[:1024], out / "model.int8.onnx", study)
    return model, fp32, int8, model_inputs(study, data.test.features), data.test.labels, out


def test_fp32_is_one_checked_file_with_dynamic_batch(exported, study):
    model, fp32, _, x, _, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx"]
    onnx.checker.check_model(onnx.load(str(fp32)))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(fp32, x), expected, atol=1e-5)
    assert run_onnx(fp32, x[:1]).shape == (1,)
    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    assert meta["fedcare.study_hash"] == study.hash


def test_int8_is_qdq_and_keeps_auc(exported):
    _, fp32, int8, x, y, _ = exported
    graph = onnx.load(str(int8))
    onnx.checker.check_model(graph)
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {i.name: i for i in graph.graph.initializer}
    weight_dequant = [
        n for n in graph.graph.node
        if n.op_type == "DequantizeLinear" and weights.get(n.input[0]) is not None
        and weights[n.input[0]].data_type == onnx.TensorProto.INT8 and len(weights[n.input[0]].dims) == 2
    ]
    assert len(weight_dequant) == 2  # both Linear layers' weights are int8
    for node in weight_dequant:  # per-channel: one scale per output channel
        assert int(np.prod(weights[node.input[1]].dims)) == weights[node.input[0]].dims[0]
    assert max(weights[n.input[0]].dims[0] for n in weight_dequant) > 1
    zero_points = [w for w in weights.values() if w.data_type == onnx.TensorProto.UINT8]
    assert zero_points, "activations are uint8"
    auc32, auc8 = roc_auc(y, run_onnx(fp32, x)), roc_auc(y, run_onnx(int8, x))
    assert auc32 > 0.6
    assert abs(auc32 - auc8) <= 0.005
