"""Precision: layer precisions, fp16 / bf16 graphs (bf16 emulated on the CPU), calibrated int8, mixed.

Tolerances vs the torch fp32 reference: the per-precision verification tolerances of edge_tdmpc.compile.verify.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from helpers import SMALL, make_feed, make_tiny_model

from edge_tdmpc.compile import artifact, export, graph, networks, precision, record
from edge_tdmpc.compile.session import OnnxSession


@pytest.fixture(scope="module")
def int8_artifact(model, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "int8"
    # 8 steps per episode: with 3, this random model's ranges were too narrow (values 3% off)
    return artifact.compile_model(model, "int8", SMALL, out=out, calib_episodes=3, calib_steps=8,
                                  verify_episodes=2, verify_steps=3)


def _types(proto):
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if t.dims}


@pytest.mark.parametrize("prec,atol", [("fp16", 5e-3), ("bf16", 5e-2)])
def test_half_precision_graphs_are_real_and_close(model, prec, atol):
    proto = export.step_graph(model, SMALL, precision.model_layer_precisions(model, prec))
    assert {"FLOAT16" if prec == "fp16" else "BFLOAT16"} <= _types(proto)
    assert any(n.op_type == "MatMul" for n in proto.graph.node)
    session = OnnxSession(proto)
    assert session.emulated == (prec == "bf16")  # the CPU provider has no bf16 kernels
    feed = make_feed(model, SMALL, seed=5)
    out, ref = session.run(feed), record.reference_step(model, feed, SMALL)
    assert 0 < np.abs(out["z"] - ref["z"]).max() < atol  # rounded, but close


def test_bf16_emulation_rounds_every_tensor():
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8)
    w = np.linspace(0.1, 1.7, 64, dtype=np.float32).reshape(8, 8)
    g = graph.Graph()
    g.input("x", "fp32", [8, 8])
    g.output("y", g.op("MatMul", g.cast("x", "bf16"), g.const(w, "bf16", key="w")), [8, 8])
    y = OnnxSession(g.model()).run({"x": x})["y"]
    ref = (torch.from_numpy(x).bfloat16().float() @ torch.from_numpy(w).bfloat16().float()).bfloat16().float()
    np.testing.assert_array_equal(y, ref.numpy())


def test_precision_plans(tmp_path):
    layers = networks.layer_names(make_tiny_model())
    assert set(precision.layer_precisions("fp16", layers).values()) == {"fp16"}
    mixed = precision.layer_precisions("mixed", layers)
    assert {"int8", "fp16", "fp32"} <= set(mixed.values())
    assert precision.layer_precisions("int8", layers, {"Q.2": "fp32"})["Q.2"] == "fp32"
    with pytest.raises(ValueError, match="unknown layer"):
        precision.layer_precisions("int8", layers, {"decoder.0": "fp32"})
    with pytest.raises(ValueError, match="unknown precision"):
        precision.layer_precisions("fp8", layers)
    # compile --layers: inline JSON or a file
    (tmp_path / "layers.json").write_text('{"dynamics.1": "int8"}')
    plan = precision.load_layers(tmp_path / "layers.json")
    assert precision.load_layers(' {"dynamics.1": "int8"}') == plan
    assert precision.layer_precisions("mixed", layers, plan)["dynamics.1"] == "int8"
    with pytest.raises(ValueError, match="cannot read layer precisions"):
        precision.load_layers('{"dynamics.1": int8}')
    with pytest.raises(ValueError, match="cannot read layer precisions"):
        precision.load_layers(tmp_path / "missing.json")


def test_int8_is_calibrated_on_recorded_episodes(int8_artifact, model, tmp_path):
    m = artifact.read_manifest(int8_artifact)
    assert m["status"] == "ok"
    calib = m["calibration"]
    assert calib["rows"] == 24 and len(calib["tasks"]) == 3 and all(t in model.cfg.tasks for t in calib["tasks"])
    ranges = json.loads((int8_artifact / calib["file"]).read_text())["absmax"]
    assert ranges and all(v > 0 for v in ranges.values())  # activation ranges seen in the episodes
    proto = onnx.load(int8_artifact / "step.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert export.tensorrt_unsupported(proto, (8, 6)) == []  # Q/DQ included: the parser takes every op
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    action_part = [n for n in matmuls if n.input[1].endswith(".W_a")]  # K = action dim: kept in fp32
    kept = [n for n in matmuls if precision.layer_of(n.name) in precision.INT8_KEEP_FP32]
    int8_layers = [n for n in matmuls if n not in kept and n not in action_part]
    assert {precision.layer_of(n.name) for n in kept} == set(precision.INT8_KEEP_FP32)  # encoder, 2-hot outputs
    layers = m["layer_precisions"]
    assert layers["Q.2"] == layers["reward.2"] == "fp32" and layers["Q.1"] == "int8"
    assert action_part and not any(n.input[0].endswith("/x_dq") for n in action_part + kept)
    assert ops.count("QuantizeLinear") == len(int8_layers)  # one dedicated activation pair per int8 MatMul
    assert all(n.input[0].endswith("/x_dq") and n.input[1].endswith(".dequantized") for n in int8_layers)
    # ONNX Runtime runs each of them as an integer GEMM, not as fake-quant (dequantize, then an fp32 GEMM)
    OnnxSession(proto, optimized=tmp_path / "executed.onnx")
    executed = [n.op_type for n in onnx.load(tmp_path / "executed.onnx").graph.node]
    assert executed.count("MatMulIntegerToFloat") == len(int8_layers)
    inits = {t.name: t for t in proto.graph.initializer}
    w8 = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(w8) == len({n.input[1] for n in int8_layers}) > 0
    for w in w8:  # weights stored once as int8, with one scale per output channel
        assert list(inits[w.name.replace(".int8", ".scale")].dims) == [w.dims[1]]
    assert not any(t.name == w8[0].name.replace(".int8", "") for t in inits.values())  # no fp32 copy kept
    out = m["verification"]["outputs"]
    assert out["z"]["max_abs"] < 1e-5  # the fp32 encoder is untouched by its int8 neighbours
    assert out["value"]["mean_abs"] > 1e-5  # really quantized: not bit-exact
    for w in w8:  # AVX2 without VNNI adds two u8 x s8 products in int16 (vpmaddubsw): no pair may overflow it
        q = np.abs(onnx.numpy_helper.to_array(w).astype(np.int32))
        assert q.max() <= precision.WEIGHT_QMAX and 255 * (q[0::2] + q[1::2]).max() <= 2**15 - 1


def test_mixed_plan_mixes_precisions(model, cache, tmp_path):
    art = artifact.compile_model(model, "mixed", SMALL, out=tmp_path / "mixed", calib_episodes=2, calib_steps=2,
                                 verify_episodes=1, verify_steps=3)
    m = artifact.read_manifest(art)
    assert set(m["layer_precisions"].values()) == {"fp32", "fp16", "int8"}
    assert m["verification"]["outputs"]["z"]["max_abs"] < 1e-5  # fp32 encoder, untouched by int8 neighbours
    proto = onnx.load(art / "step.onnx")
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer}
    assert types["encoder.0.W_obs"] == "FLOAT" and types["dynamics.0.W_z.fp16"] == "FLOAT16"
    assert types["reward.1.W_x.int8"] == "INT8" and types["dynamics.1.W_x.fp16"] == "FLOAT16"
