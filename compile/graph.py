"""A minimal ONNX graph builder: named tensors, constants deduplicated, each op at a dtype; what the exporters
(`compile.networks`, `compile.export`) write graphs with."""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edge_tdmpc.runtime import TORCH_DTYPES

OPSET = 17
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
LN_EPS = 1e-5
MISH_CLAMP = {"fp32": 20.0, "fp16": 5.0, "bf16": 20.0}  # n/(n+2) rounds to 1 beyond these; e^x stays finite



# --- a minimal ONNX graph builder ---------------------------------------------------------------------
def _tensor(name: str, value, dtype: str) -> TensorProto:
    """numpy/torch value -> initializer of the given precision (bf16 rounded by torch, to nearest even)."""
    t = torch.as_tensor(np.asarray(value)) if not torch.is_tensor(value) else value.detach().cpu()
    if dtype in ("int64", "bool"):
        return onnx.numpy_helper.from_array(t.numpy().astype(dtype), name)
    t = t.to(TORCH_DTYPES[dtype]).contiguous()
    out = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(t.shape))
    out.raw_data = (t.view(torch.int16) if dtype == "bf16" else t).numpy().tobytes()
    return out


class Graph:
    """Nodes, initializers and a dtype per tensor name; `scope` prefixes node names (e.g. 'it2/dynamics.1')."""

    def __init__(self, native_layernorm=True):
        self.native_layernorm = native_layernorm
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.dtype: dict[str, str] = {}
        self.scope = ""
        self._count = 0
        self._consts: dict = {}
        self._casts: dict = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.scope}/{hint}_{self._count}" if self.scope else f"{hint}_{self._count}"

    def input(self, name, dtype, shape):
        self.inputs.append(helper.make_tensor_value_info(name, _elem(dtype), shape))
        self.dtype[name] = dtype
        return name

    def output(self, name, value, shape):
        """Expose `value` (cast to fp32 when floating) as graph output `name` of a documented shape."""
        dtype = self.dtype[value]
        if dtype in ONNX_DTYPES:
            value, dtype = self.cast(value, "fp32"), "fp32"
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"out/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, _elem(dtype), shape))
        self.dtype[name] = dtype

    def const(self, value, dtype="fp32", key=None) -> str:
        """An initializer; `key` shares one copy between the unrolled steps that use it."""
        cache = (key, dtype) if key is not None else None
        if cache is not None and cache in self._consts:
            return self._consts[cache]
        name = key if key is not None else self._name("const")
        name = f"{name}.{dtype}" if key is not None and dtype != "fp32" else name
        self.inits.append(_tensor(name, value, dtype))
        self.dtype[name] = dtype
        if cache is not None:
            self._consts[cache] = name
        return name

    def scalar(self, value, dtype="fp32") -> str:
        return self.const(np.array(value, dtype=np.float64), dtype, key=f"scalar:{float(value)!r}")

    def ints(self, values) -> str:
        return self.const(np.array(values, dtype=np.int64), "int64", key=f"ints:{list(values)}")

    def op(self, op_type, *inputs, n_out=1, dtype=None, **attrs):
        outs = [self._name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name(op_type), **attrs))
        out_dtype = dtype or next((self.dtype[i] for i in inputs if i and self.dtype.get(i) in ONNX_DTYPES),
                                  self.dtype.get(inputs[0]) if inputs else None)
        for o in outs:
            self.dtype[o] = out_dtype
        return outs[0] if n_out == 1 else outs

    def cast(self, x, dtype) -> str:
        if self.dtype[x] == dtype:
            return x
        if (x, dtype) not in self._casts:  # cast each tensor once, however many consumers it has
            self._casts[x, dtype] = self.op("Cast", x, to=_elem(dtype), dtype=dtype)
        return self._casts[x, dtype]

    def model(self, name="edge_tdmpc", doc="") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits, doc_string=doc)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-tdmpc")
        m.ir_version = 8  # readable by onnxruntime >= 1.10 and TensorRT 8.6's parser
        return m

    # --- small composites -------------------------------------------------------------------------------
    def mish(self, x):
        c = MISH_CLAMP[self.dtype[x]]
        e = self.op("Exp", self.op("Min", x, self.scalar(c, self.dtype[x])))
        n = self.op("Mul", e, self.op("Add", e, self.scalar(2.0, self.dtype[x])))
        return self.op("Mul", x, self.op("Div", n, self.op("Add", n, self.scalar(2.0, self.dtype[x]))))

    def layer_norm(self, x, w, b):
        """LayerNormalization over the last axis; in primitive ops for parsers without it (TensorRT < 8.6),
        computed in fp32 (x^2 means in fp16 are where such decompositions lose accuracy)."""
        if self.native_layernorm:
            return self.op("LayerNormalization", x, w, b, axis=-1, epsilon=LN_EPS)
        dt = self.dtype[x]
        x = self.cast(x, "fp32")
        d = self.op("Sub", x, self.op("ReduceMean", x, axes=[-1], keepdims=1))
        var = self.op("ReduceMean", self.op("Mul", d, d), axes=[-1], keepdims=1)
        y = self.cast(self.op("Div", d, self.op("Sqrt", self.op("Add", var, self.scalar(LN_EPS)))), dt)
        return self.op("Add", self.op("Mul", y, w), b)

    def reduce_sum(self, x, axes, keepdims=1):
        return self.op("ReduceSum", x, self.ints(axes), keepdims=keepdims)

    def reshape(self, x, shape):
        return self.op("Reshape", x, self.ints(shape))

    def slice(self, x, start, end, axis):
        return self.op("Slice", x, self.ints([start]), self.ints([end]), self.ints([axis]))

    def nan_to_num(self, x):
        """torch.nan_to_num(x, 0): NaN -> 0, +-inf -> the largest finite values (NaN != NaN)."""
        x = self.op("Where", self.op("Equal", x, x), x, self.scalar(0.0))
        big = float(np.finfo(np.float32).max)
        return self.op("Clip", x, self.scalar(-big), self.scalar(big))


def _elem(dtype: str) -> int:
    return {"int64": TensorProto.INT64, "bool": TensorProto.BOOL, **ONNX_DTYPES}[dtype]
