"""Reduced precision, for real: fp16/bf16 graphs, calibrated INT8 (Q/DQ) and per-layer mixed plans.

The layer precisions map each layer ('encoder.0', ..., 'Q.2', see `networks.layer_names`) to fp32/fp16/bf16/int8.
fp16/bf16 layers are emitted in that type (weights, matmuls, LayerNorm, Mish): what TensorRT's strongly typed
mode and ONNX Runtime's CUDA EP execute. The two-hot decode, the policy's tanh/exp and the MPPI statistics
stay fp32: they are a few hundred values per candidate, and exp(log_std) or a softmax over 101 bins in fp16 is
where accuracy goes. INT8 layers get QuantizeLinear/DequantizeLinear pairs on their MatMuls (symmetric
per-tensor activations calibrated on real closed-loop planning inputs, symmetric per-channel int8 weights):
the explicit-quantization (QDQ) form TensorRT builds INT8 kernels from and ONNX Runtime fuses on CPU.
"""
import json
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_tdmpc.compile.networks import layer_names
from edge_tdmpc.files import atomic_write

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")

# The encoder runs once per step on one row: int8 there saves nothing, and it is the most sensitive layer (it
# sees raw observations of 30 tasks at different scales through one per-tensor scale; docs/results/compile-cpu.md).
ENCODER = ("encoder.0", "encoder.1")
# int8 keeps the two-hot output layers (101 bins each) in fp32 too: their rounding dominates the value error
# and moves fine steady-state control, for little time and size (docs/results/bench-cpu.md)
INT8_KEEP_FP32 = (*ENCODER, "reward.2", "Q.2")
# mixed: int8 for the hidden 384x384 matmuls of reward, Q and policy, fp16 elsewhere, the encoder in fp32. The
# dynamics' stays fp16: its rounding compounds over the horizon's latents, and it is the layer whose int8
# costs closed-loop score (per layer: docs/results/bench-cpu.md)
MIXED = {"int8": ("reward.1", "Q.1", "pi.1"), "fp32": ENCODER}


def layer_precisions(precision: str, layers: list[str], overrides: dict | None = None) -> dict[str, str]:
    """{layer: precision} of a named precision; `overrides` ({layer: precision}) win."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': choose from {list(PRECISIONS)}")
    if precision in ("fp32", "fp16", "bf16"):
        precisions = dict.fromkeys(layers, precision)
    elif precision == "int8":
        precisions = {n: "fp32" if n in INT8_KEEP_FP32 else "int8" for n in layers}
    else:  # mixed: see MIXED
        precisions = dict.fromkeys(layers, "fp16")
        for p, names in MIXED.items():
            precisions.update({n: p for n in names if n in precisions})
    for name, p in (overrides or {}).items():
        if name not in precisions:
            raise ValueError(f"layer precisions name unknown layer '{name}': layers are {layers}")
        if p not in ("fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"layer '{name}': unknown precision '{p}' (fp32, fp16, bf16 or int8)")
        precisions[name] = p
    return precisions


def model_layer_precisions(model, precision: str, overrides=None) -> dict[str, str]:
    return layer_precisions(precision, layer_names(model), overrides)


def load_layers(text_or_path) -> dict[str, str]:
    """{layer: precision} from inline JSON ('{"dynamics.1": "int8"}') or a JSON file (`compile --layers`)."""
    inline = str(text_or_path).lstrip().startswith("{")
    try:
        precisions = json.loads(text_or_path if inline else Path(text_or_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read layer precisions {text_or_path}: {e}") from None
    if not isinstance(precisions, dict):
        raise ValueError(f"layer precisions {text_or_path} must be a JSON object {{layer: precision}}")
    return precisions


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
MIN_INT8_K = 16  # narrower products (the action segment, K = action dim) stay fp32, see int8_nodes
# Weights use 7 bits (|q| <= 63) of their int8. x86-64 CPUs without VNNI (AVX2 only) multiply u8 x s8 with
# vpmaddubsw, which adds two products in int16: 2 x 255 x 127 overflows it and ONNX Runtime's integer GEMM
# saturates, while 2 x 255 x 63 fits. ONNX Runtime documents the same cure (`reduce_range`); with 8-bit weights
# an int8 artifact verified on a VNNI CPU would give wrong values on an AVX2 one (docs/results/compile-cpu.md).
WEIGHT_QMAX = 63


def int8_nodes(model: onnx.ModelProto, precisions: dict[str, str]) -> list[onnx.NodeProto]:
    """MatMul nodes of the layers `precisions` puts in int8 (found by the layer key in the node's scope).

    A layer's action-segment product (K = action dim, < MIN_INT8_K) stays fp32: its FLOPs are negligible
    next to the latent and hidden products, so quantizing it would add Q/DQ work and rounding for nothing."""
    int8 = {n for n, p in precisions.items() if p == "int8"}
    width = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) == 2}
    return [node for node in model.graph.node if node.op_type == "MatMul" and layer_of(node.name) in int8
            and width.get(node.input[1], MIN_INT8_K) >= MIN_INT8_K]


def layer_of(node_name: str) -> str | None:
    """The layer key of a MatMul node ('Q3.2/MatMul' -> 'Q.2': the Q heads share one entry)."""
    m = re.search(r"(?:^|/)(encoder|dynamics|reward|pi|Q\d+)\.(\d+)/MatMul", node_name)
    return m and f"{'Q' if m.group(1)[0] == 'Q' else m.group(1)}.{m.group(2)}"


def calibrate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], recording: dict,
              percentile: float | None = None) -> dict[str, float]:
    """Range of every int8 MatMul's activation input over the recorded planning steps.

    absmax (percentile None): max |x|. Otherwise the largest per-step `percentile` of |x| (a TopK in the
    graph: one scalar per tensor and step leaves the session, so calibration memory stays flat).
    """
    from edge_tdmpc.compile.session import OnnxSession
    probe = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in probe.graph.value_info}
    tensors = sorted({n.input[0] for n in nodes})
    for k, t in enumerate(tensors):
        name = f"calib/range_{k}"
        flat = [helper.make_node("Abs", [t], [name + "/abs"])]
        if percentile is None:
            flat.append(helper.make_node("ReduceMax", [name + "/abs"], [name], keepdims=0))
        else:
            n = int(np.prod(shapes[t]))
            top = max(1, int(round(n * (1 - percentile / 100))))
            probe.graph.initializer.extend([onnx.numpy_helper.from_array(np.array([-1], np.int64), name + "/flat"),
                                            onnx.numpy_helper.from_array(np.array([top], np.int64), name + "/k")])
            flat += [helper.make_node("Reshape", [name + "/abs", name + "/flat"], [name + "/v"]),
                     helper.make_node("TopK", [name + "/v", name + "/k"], [name + "/top", name + "/idx"]),
                     helper.make_node("ReduceMin", [name + "/top"], [name], keepdims=0)]
        probe.graph.node.extend(flat)
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
    session = OnnxSession(probe)
    ranges = dict.fromkeys(tensors, 0.0)
    for i in range(len(recording["obs"])):
        out = session.run({k: v[i] for k, v in recording.items()})
        for k, t in enumerate(tensors):
            ranges[t] = max(ranges[t], float(out[f"calib/range_{k}"]))
    return ranges


def quantize_int8(model: onnx.ModelProto, precisions: dict[str, str], recording: dict, out_dir: Path,
                  percentile: float | None = None) -> tuple[onnx.ModelProto, Path]:
    """Explicit INT8 on the int8 layers -> (model with Q/DQ, calibration file with the ranges).

    Each int8 MatMul gets its own QuantizeLinear/DequantizeLinear pair on the activation (symmetric, zero
    point 0, scale = max|x| / 127 over real closed-loop planning steps) and reads its weight through one
    per-output-channel DequantizeLinear of an int8 initializer. Pairs are per MatMul on purpose: ONNX Runtime's
    quantize_static puts one pair on a tensor and hands the dequantized copy to every consumer, so an int8
    policy layer would also feed rounded latents to fp32 layers and to the `z` output
    (docs/results/compile-cpu.md).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = int8_nodes(out, precisions)
    if not nodes:
        raise ValueError("the layer precisions put no layer in int8: nothing to quantize")
    ranges = calibrate(model, nodes, recording, percentile)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    zero = onnx.numpy_helper.from_array(np.zeros((), np.int8), "int8_zero")
    g.initializer.append(zero)
    dq_weights, new_nodes = {}, {}
    for node in nodes:
        x, w = node.input[0], node.input[1]
        if w not in dq_weights:  # per output channel: W [in, out] -> int8, scale [out]
            W = onnx.numpy_helper.to_array(inits[w]).astype(np.float32)
            scale = np.maximum(np.abs(W).max(0), 1e-12) / WEIGHT_QMAX
            q = np.clip(np.round(W / scale), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
            g.initializer.extend([onnx.numpy_helper.from_array(q, f"{w}.int8"),
                                  onnx.numpy_helper.from_array(scale.astype(np.float32), f"{w}.scale"),
                                  onnx.numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{w}.zero")])
            dq_weights[w] = f"{w}.dequantized"
            new_nodes.setdefault(node.name, []).append(helper.make_node(
                "DequantizeLinear", [f"{w}.int8", f"{w}.scale", f"{w}.zero"], [dq_weights[w]], axis=1,
                name=f"{w}/DequantizeLinear"))
        s = f"{node.name}/x_scale"
        g.initializer.append(onnx.numpy_helper.from_array(np.array(max(ranges[x], 1e-12) / 127.0, np.float32), s))
        q, dq = f"{node.name}/x_q", f"{node.name}/x_dq"
        new_nodes.setdefault(node.name, []).extend([
            helper.make_node("QuantizeLinear", [x, s, zero.name], [q], name=f"{node.name}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [q, s, zero.name], [dq], name=f"{node.name}/DequantizeLinear")])
        node.input[0], node.input[1] = dq, dq_weights[w]
    nodes_out = []
    for node in g.node:
        nodes_out.extend(new_nodes.get(node.name, []))
        nodes_out.append(node)
    del g.node[:]
    g.node.extend(nodes_out)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]  # the fp32 copies of quantized weights go
    del g.initializer[:]
    g.initializer.extend(keep)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "calibration.json"
    method = "absmax" if percentile is None else f"percentile {percentile}"
    text = json.dumps({"method": f"{method} of |x| (symmetric, per-tensor activations; per-channel weights, "
                                 f"|q| <= {WEIGHT_QMAX})",
                       "rows": int(len(recording["obs"])), "absmax": ranges}, indent=1)
    atomic_write(cache, lambda f: f.write(text), mode="w")
    return out, cache
