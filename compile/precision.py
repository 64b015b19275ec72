"""Reduced precision, for real: fp16/bf16 graphs, calibrated INT8 (Q/DQ) and per-layer mixed plans.

A precision plan maps each layer ('encoder.0', ..., 'Q.2', see `export.layer_names`) to fp32/fp16/bf16/int8.
fp16/bf16 layers are emitted in that type (weights, matmuls, LayerNorm, Mish): what TensorRT's strongly typed
mode and ONNX Runtime's CUDA EP execute. The two-hot decode, the policy's tanh/exp and the MPPI statistics
stay fp32: they are a few hundred values per candidate, and exp(log_std) or a softmax over 101 bins in fp16 is
where accuracy goes. INT8 layers get QuantizeLinear/DequantizeLinear pairs on their MatMuls (ONNX Runtime's
quantize_static, QDQ format: symmetric per-tensor activations calibrated on real closed-loop planning inputs,
symmetric per-channel weights) - the explicit-quantization form TensorRT builds INT8 kernels from.
"""
import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_tdmpc.compile.export import layer_names

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")

# Measured on the MT30 1M student (docs/results/compile-cpu.md): quantizing the layers whose input is the
# raw observation or whose output is decoded (logits, latents through SimNorm) costs most of INT8's error.
INT8_KEEP_FP32 = ("encoder.0",)
MIXED = {"int8": ("dynamics.1", "reward.1", "Q.1", "pi.1"), "fp32": ("encoder.0", "encoder.1")}


def precision_plan(precision: str, layers: list[str], overrides: dict | None = None) -> dict[str, str]:
    """Per-layer plan for a named precision; `overrides` ({layer: precision}) win."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': choose from {list(PRECISIONS)}")
    if precision in ("fp32", "fp16", "bf16"):
        plan = dict.fromkeys(layers, precision)
    elif precision == "int8":
        plan = {n: "fp32" if n in INT8_KEEP_FP32 else "int8" for n in layers}
    else:  # mixed: int8 for the big hidden matmuls, fp32 for the encoder, fp16 for the rest
        plan = dict.fromkeys(layers, "fp16")
        for p, names in MIXED.items():
            plan.update({n: p for n in names if n in plan})
    for name, p in (overrides or {}).items():
        if name not in plan:
            raise ValueError(f"precision plan names unknown layer '{name}': layers are {layers}")
        if p not in ("fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"layer '{name}': unknown precision '{p}' (fp32, fp16, bf16 or int8)")
        plan[name] = p
    return plan


def model_plan(model, precision: str, overrides=None) -> dict[str, str]:
    return precision_plan(precision, layer_names(model), overrides)


def load_plan(path) -> dict[str, str]:
    """A JSON file {layer: precision} (the --plan option of `edge-tdmpc compile`)."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read precision plan {path}: {e}") from None
    if not isinstance(plan, dict):
        raise ValueError(f"precision plan {path} must be a JSON object {{layer: precision}}")
    return plan


# --- bf16 on CPU ----------------------------------------------------------------------------------------
def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every bf16 tensor computed in fp32 and rounded to bf16 (Cast there and back).

    ONNX Runtime's CPU provider has no bf16 kernels; this is how the bf16 artifact is executed and verified
    here (each op's output rounded exactly as a bf16 kernel with fp32 internals rounds it). GPUs run the
    artifact itself.
    """
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    for init in g.initializer:
        types[init.name] = init.data_type
    BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    for init in list(g.initializer):
        if init.data_type == BF16:  # bf16 bits -> the same values in fp32 (exact)
            bits = np.frombuffer(init.raw_data, np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32).reshape(tuple(init.dims))
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    nodes = []
    for node in g.node:
        rounded = [o for o in node.output if types.get(o) == BF16]
        for k, out in enumerate(node.output):
            if out in rounded:
                node.output[k] = out + "/fp32"
        if node.op_type == "Cast" and node.attribute[0].i == BF16:
            node.attribute[0].i = F32
        nodes.append(node)
        for out in rounded:  # round to bf16 and back
            nodes.append(helper.make_node("Cast", [out + "/fp32"], [out + "/bf16"], to=BF16))
            nodes.append(helper.make_node("Cast", [out + "/bf16"], [out], to=F32))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


# --- INT8 -----------------------------------------------------------------------------------------------
def int8_nodes(model: onnx.ModelProto, plan: dict[str, str]) -> list[str]:
    """MatMul nodes of the layers the plan puts in int8 (found by the layer key in the node's scope)."""
    int8 = {n for n, p in plan.items() if p == "int8"}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        m = re.search(r"(?:^|/)(encoder|dynamics|reward|pi|Q\d+)\.(\d+)/", node.name)
        if m and f"{'Q' if m.group(1).startswith('Q') else m.group(1)}.{m.group(2)}" in int8:
            out.append(node.name)
    return out


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over recorded planning inputs."""

    def __init__(self, recording: dict, names: list[str]):
        self.rows = [{k: recording[k][i] for k in names} for i in range(len(recording["obs"]))]
        self._it = iter(self.rows)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.rows)


def quantize_int8(model: onnx.ModelProto, plan: dict[str, str], recording: dict, out_dir: Path,
                  method: str = "minmax") -> tuple[onnx.ModelProto, Path]:
    """Static INT8 (QDQ) on the plan's int8 layers, calibrated on `recording` -> (model, calibration cache)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    nodes = int8_nodes(model, plan)
    if not nodes:
        raise ValueError("the precision plan puts no layer in int8: nothing to quantize")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"unknown calibration method '{method}': choose from {sorted(methods)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "calibration.json"
    cache.unlink(missing_ok=True)  # ranges belong to this graph and recording: never reuse stale ones
    names = [i.name for i in model.graph.input]
    with tempfile.TemporaryDirectory(prefix="edge-tdmpc-int8.") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing at WARNING
        try:
            quantize_static(
                str(src), str(dst), _Reader(recording, names), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"], calibrate_method=methods[method],
                calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,  # TensorRT: zero point 0
                               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # W [in, out]: per output
                               # Q/DQ on matmul inputs only: outputs feed bias + LayerNorm in fp32, and
                               # a dedicated pair per consumer keeps e.g. policy actions exact elsewhere
                               "OpTypesToExcludeOutputQuantization": ["MatMul"], "DedicatedQDQPair": True})
        finally:
            logging.getLogger().setLevel(level)
        out = onnx.load(dst)
    return out, cache
