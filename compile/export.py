"""ONNX export: the world model's networks, and the whole MPPI planning step as one graph.

The planning graph mirrors `edge_tdmpc.planner.plan` op for op, unrolled over iterations x horizon, with every
random draw an input: one runtime call is one control step, and every backend is checked against plan() on the
same noise. Exact algebraic rewrites keep it cheap:
  - the task embedding's contribution to each first layer is a per-task constant, folded into a bias table
    (the embedding's max_norm=1 renormalisation applied once, as nn.Embedding does at lookup), so the
    embedding is never concatenated;
  - the [z, e, a] input of a first layer is split into z @ W_z + a @ W_a: no concatenation either, and at
    t=0, where every candidate starts from the same latent, z @ W_z is computed once for all of them;
  - Mish(x) = x tanh(softplus(x)) = x n / (n + 2) with n = e^x (e^x + 2): one exp instead of exp, log, tanh
    (the same function up to rounding; timings in docs/results/compile-cpu.md).
Shapes are static per planner setting (TensorRT builds one engine per shape) and the opset is 17, the lowest
with a native LayerNormalization, parsed by every TensorRT from 8.6 (JetPack 6.0) on. TensorRT 8.5 (JetPack 5,
the last for Xavier) has no importer for it: `native_layernorm=False` writes it out in primitive ops, in fp32.
"""
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edge_tdmpc.layers import NormedLinear, SimNorm
from edge_tdmpc.model import WorldModel
from edge_tdmpc.planner import PlannerConfig

OPSET = 17
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LN_EPS = 1e-5
MISH_CLAMP = {"fp32": 20.0, "fp16": 5.0, "bf16": 20.0}  # n/(n+2) rounds to 1 beyond these; e^x stays finite


def layer_names(model: WorldModel) -> list[str]:
    """The keys of the layer precisions: 'encoder.0', ..., 'Q.2'."""
    names = [f"encoder.{i}" for i in range(len(model._encoder["state"]))]
    names += [f"{net}.{i}" for net in ("dynamics", "reward", "pi") for i in range(len(getattr(model, f"_{net}")))]
    return names + [f"Q.{i}" for i in range(len(model._Qs.params))]


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


# --- the world model as folded weights ------------------------------------------------------------------
@dataclass
class Layer:
    """One NormedLinear (or the final Linear): x @ W + b, then LayerNorm and an activation.

    First layers keep W per input segment ({'z': ..., 'a': ...}) and the bias as a per-task table [T, out]
    with the embedding's contribution folded in. `name` is the layer-precisions key ('Q.1' for every Q head),
    `key` names the weights ('Q1.1' for head 1).
    """
    name: str
    key: str
    W: dict             # segment -> [in, out]
    b: np.ndarray       # [T or 1, out] for first layers, else [out]
    ln: tuple | None    # (weight, bias)
    act: str | None     # "mish" | "simnorm" | None


def _task_embedding(model: WorldModel) -> np.ndarray | None:
    """The embedding table as nn.Embedding(max_norm=1) sees it after renormalising every row at lookup."""
    if not model.cfg.multitask:
        return None
    w = model._task_emb.weight.detach().float().clone()
    torch.embedding_renorm_(w, torch.arange(w.shape[0]), model._task_emb.max_norm, 2.0)
    return w.double().numpy()


def _fold(W: np.ndarray, b: np.ndarray, segments: list[tuple[str, int]], emb) -> tuple[dict, np.ndarray]:
    """Split W [out, in] by input segment; fold the task-embedding segment 'e' into a per-task bias [T, out]."""
    parts, start = {}, 0
    for seg, width in segments:
        if width:
            parts[seg] = W[:, start:start + width]
        start += width
    bias = b.astype(np.float64)[None]
    if "e" in parts:  # bias[t] = e_t @ W_e^T + b, in float64, rounded once
        bias = emb @ parts.pop("e").astype(np.float64).T + bias
    return {k: np.ascontiguousarray(v.T, np.float32) for k, v in parts.items()}, bias.astype(np.float32)


def _arr(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _sequential(seq) -> list[tuple]:
    """nn.Sequential of NormedLinear (+ a final Linear) -> [(W [out, in], b, ln or None, act or None)]."""
    out = []
    for m in seq:
        ln = (_arr(m.ln.weight), _arr(m.ln.bias)) if isinstance(m, NormedLinear) else None
        act = None if ln is None else ("simnorm" if isinstance(m.act, SimNorm) else "mish")
        out.append((_arr(m.weight), _arr(m.bias), ln, act))
    return out


def _q_head(ensemble, h: int) -> list[tuple]:
    return [(_arr(p.weight[h]), _arr(p.bias[h]), None if p.ln is None else (_arr(p.ln.weight[h]), _arr(p.ln.bias[h])),
             None if p.ln is None else "mish") for p in ensemble.params]


def fold_model(model: WorldModel) -> dict[str, list[Layer]]:
    """WorldModel -> {net: [Layer]} ('Q0', 'Q1', ... per head), task embedding folded into first layers."""
    c, emb = model.cfg, _task_embedding(model)
    E = c.task_dim if c.multitask else 0
    za = [("z", c.latent_dim), ("e", E), ("a", c.action_dim)]
    nets = {"encoder": (_sequential(model._encoder["state"]), [("obs", c.obs_dim), ("e", E)]),
            "dynamics": (_sequential(model._dynamics), za), "reward": (_sequential(model._reward), za),
            "pi": (_sequential(model._pi), [("z", c.latent_dim), ("e", E)])}
    nets.update({f"Q{h}": (_q_head(model._Qs, h), za) for h in range(c.num_q)})
    out = {}
    for net, (layers, segments) in nets.items():
        out[net] = []
        for i, (W, b, ln, act) in enumerate(layers):
            parts, b = _fold(W, b, segments, emb) if i == 0 else ({"x": np.ascontiguousarray(W.T)}, b)
            name = f"Q.{i}" if net.startswith("Q") else f"{net}.{i}"
            out[net].append(Layer(name, f"{net}.{i}", parts, b, ln, act))
    return out


# --- emitting the networks --------------------------------------------------------------------------------
class Nets:
    """Emits the world model's networks into a Graph, each layer at the precision `precisions` names.

    A layer planned as int8 is emitted in fp32: `quantize` then puts Q/DQ nodes on its MatMuls, found by the
    layer name in the node's scope (e.g. 'it2/t1/dynamics.1/MatMul_812').
    """

    def __init__(self, g: Graph, model: WorldModel, precisions: dict[str, str], task=None):
        self.g, self.cfg, self.layers = g, model.cfg, fold_model(model)
        self.precisions, self.task = precisions, task
        self.masks = model._action_masks.detach().float().numpy() if model.cfg.multitask else None

    def dtype(self, layer: Layer) -> str:
        p = self.precisions.get(layer.name, "fp32")
        return "fp32" if p == "int8" else p

    def layer(self, layer: Layer, x: dict, shared=()):
        """x: {segment: tensor}; segments in `shared` have a single row that all candidates share."""
        g, dt = self.g, self.dtype(layer)
        prev_scope = g.scope
        g.scope = f"{prev_scope}/{layer.key}" if prev_scope else layer.key
        W = {seg: g.const(w, dt, key=f"{layer.key}.W_{seg}") for seg, w in layer.W.items()}
        b = g.const(layer.b, dt, key=f"{layer.key}.b")
        if layer.name.endswith(".0") and self.task is not None:
            b = g.op("Gather", b, self.task, axis=0)  # this task's row of the folded bias table
        const, terms = b, []
        for seg in layer.W:
            prod = g.op("MatMul", g.cast(x[seg], dt), W[seg])
            if seg in shared:  # [1, out]: add to the bias row once, broadcast afterwards
                const = g.op("Add", prod, const)
            else:
                terms.append(prod)
        y = const
        for t in terms:
            y = g.op("Add", t, y)
        if layer.ln is not None:
            y = g.layer_norm(y, g.const(layer.ln[0], dt, key=f"{layer.key}.ln_w"),
                             g.const(layer.ln[1], dt, key=f"{layer.key}.ln_b"))
        if layer.act == "mish":
            y = g.mish(y)
        elif layer.act == "simnorm":
            d = self.cfg.simnorm_dim
            y = g.reshape(g.op("Softmax", g.reshape(y, [0, -1, d]), axis=-1), [0, -1])
        g.scope = prev_scope
        return y

    def mlp(self, net, x: dict, shared=()):
        layers = self.layers[net]
        h = self.layer(layers[0], x, shared)
        for layer in layers[1:]:
            h = self.layer(layer, {"x": h})
        return h

    # --- the nouns of the paper ----------------------------------------------------------------------------
    def mask(self):
        """The task's action mask [1|B, A] (all ones for a single-task model)."""
        if self.masks is None:
            return self.g.const(np.ones((1, self.cfg.action_dim)), key="ones_mask")
        return self.g.op("Gather", self.g.const(self.masks, key="action_masks"), self.task, axis=0)

    def encode(self, obs):
        return self.mlp("encoder", {"obs": obs})

    def next(self, z, a, shared=()):
        return self.mlp("dynamics", {"z": z, "a": a}, shared)

    def reward(self, z, a, shared=()):
        return self.two_hot_inv(self.mlp("reward", {"z": z, "a": a}, shared))

    def pi(self, z, eps, mask):
        """Sampled action tanh(mean + eps exp(log_std)) and tanh(mean), masked as WorldModel.pi_info does."""
        g, c = self.g, self.cfg
        out = g.cast(self.mlp("pi", {"z": z}), "fp32")
        mean, log_std = g.op("Split", out, axis=-1, n_out=2)
        half_dif = g.scalar(0.5 * (c.log_std_max - c.log_std_min))  # 0.5 * log_std_dif, exact in fp32
        log_std = g.op("Add", g.op("Mul", half_dif, g.op("Add", g.op("Tanh", log_std), g.scalar(1.0))),
                       g.scalar(c.log_std_min))
        mean, log_std, eps = (g.op("Mul", t, mask) for t in (mean, log_std, eps))
        action = g.op("Add", mean, g.op("Mul", eps, g.op("Exp", log_std)))
        return g.op("Tanh", action), g.op("Tanh", mean)

    def Q_avg(self, z, a, heads=None):
        """Mean decoded value of 2 heads [N, 1]: `heads` [2] picks them; with num_q = 2 it is both heads."""
        g = self.g
        if heads is not None and not any(self.precisions.get(l.name) == "int8" for l in self.layers["Q0"]):
            return self.Q_picked(z, a, heads)
        values = [self.two_hot_inv(self.mlp(f"Q{h}", {"z": z, "a": a})) for h in range(self.cfg.num_q)]
        if heads is None:
            assert len(values) == 2
            pair = g.op("Add", *values)  # a + b == b + a exactly, whatever order q_idx names them in
        else:
            stacked = g.op("Concat", *(g.op("Unsqueeze", v, g.ints([0])) for v in values), axis=0)
            pair = g.reduce_sum(g.op("Gather", stacked, heads, axis=0), [0], keepdims=0)
        return g.op("Mul", pair, g.scalar(0.5))

    def Q_picked(self, z, a, heads):
        """Q_avg computing only the 2 heads `heads` names (of num_q = 5: 2/5 of the work, the same values).
        Each picked head's weights are gathered from a [num_q, ...] stack into plain 2-D matrices: two 2-D GEMMs
        beat ONNX Runtime's broadcast batched MatMul (docs/results/compile-cpu.md). Int8 Q layers keep one
        MatMul per head, the form their per-channel Q/DQ weights take."""
        g, values = self.g, []
        for k in range(2):
            head = g.op("Gather", heads, g.const(np.array(k), "int64", key=f"index:{k}"), axis=0)  # a scalar
            x, prev_scope = {"z": z, "a": a}, g.scope
            for i in range(len(self.layers["Q0"])):
                layers = [self.layers[f"Q{h}"][i] for h in range(self.cfg.num_q)]
                first, dt = layers[0], self.dtype(layers[0])
                g.scope = f"{prev_scope}/Q{k}of2.{i}"
                pick = lambda key, rows, task_axis=None: self._pick(f"Qs.{i}.{key}", rows, dt, head, task_axis)  # noqa: B023,E731
                y = pick("b", [l.b if i == 0 else l.b[None] for l in layers], 1 if i == 0 and self.task else None)
                for seg in first.W:
                    y = g.op("Add", g.op("MatMul", g.cast(x[seg], dt), pick(f"W_{seg}", [l.W[seg] for l in layers])), y)
                if first.ln is not None:
                    y = g.layer_norm(y, pick("ln_w", [l.ln[0] for l in layers]),
                                     pick("ln_b", [l.ln[1] for l in layers]))
                    y = g.mish(y)
                x = {"x": y}
            g.scope = prev_scope
            values.append(self.two_hot_inv(x["x"]))
        return g.op("Mul", g.op("Add", *values), g.scalar(0.5))  # a + b == b + a: the order of q_idx is free

    def _pick(self, key, rows, dt, head, task_axis=None):
        """A [num_q, ...] stack of per-head constants -> one head's slice (after this task's row)."""
        t = self.g.const(np.stack(rows), dt, key=key)
        if task_axis is not None:
            t = self.g.op("Gather", t, self.task, axis=task_axis)
        return self.g.op("Gather", t, head, axis=0)

    def Q_all(self, z, a):
        """Logits of every head [num_q, N, bins]."""
        g = self.g
        return g.op("Concat", *(g.op("Unsqueeze", self.mlp(f"Q{h}", {"z": z, "a": a}), g.ints([0]))
                                for h in range(self.cfg.num_q)), axis=0)

    def two_hot_inv(self, logits):
        """symexp(sum(softmax(logits) * bins)), in fp32 whatever the layer precision."""
        g, c = self.g, self.cfg
        bins = g.const(np.linspace(c.vmin, c.vmax, c.num_bins, dtype=np.float32), key="bins")
        x = g.reduce_sum(g.op("Mul", g.op("Softmax", g.cast(logits, "fp32"), axis=-1), bins), [-1])
        mag = g.op("Sub", g.op("Exp", g.op("Abs", x)), g.scalar(1.0))
        return g.op("Mul", g.op("Sign", x), mag)


# --- the planning step --------------------------------------------------------------------------------------
def step_inputs(model: WorldModel, cfg: PlannerConfig) -> dict[str, tuple[str, list[int]]]:
    """Input name -> (dtype, fixed shape) of the planning graph for this planner setting."""
    c = model.cfg
    H, P, S, I, K, A = cfg.horizon, cfg.num_pi_trajs, cfg.num_samples, cfg.iterations, cfg.num_elites, c.action_dim
    spec = {"obs": ("fp32", [c.obs_dim])}
    if c.multitask:
        spec["task"] = ("int64", [1])
    spec.update(prev_mean=("fp32", [H, A]), t0=("fp32", [1]))
    if not cfg.mpc:
        return {"obs": spec["obs"], **({"task": spec["task"]} if c.multitask else {}), "noise_action": ("fp32", [A])}
    if P:
        spec["noise_pi"] = ("fp32", [H, P, A])
    spec["noise_sample"] = ("fp32", [I, H, S - P, A])
    if c.num_q > 2:  # with 2 heads both are averaged whatever q_idx says (a + b == b + a exactly)
        spec["noise_q_idx"] = ("int64", [I, 2])
    spec.update(noise_q_pi=("fp32", [I, S, A]), noise_gumbel=("fp32", [K]), noise_action=("fp32", [A]))
    return spec


def step_graph(model: WorldModel, cfg: PlannerConfig, precisions: dict[str, str] | None = None,
               gammas=None, native_layernorm=True) -> onnx.ModelProto:
    """The whole planning step (encode -> policy trajectories -> MPPI iterations -> action) as one graph.

    Inputs: see `step_inputs` (obs, task, prev_mean, t0 and the noise of `planner.Noise`). Outputs: action [A]
    (clamped, exploration added unless noise_action is 0), mean [H, A] (next warm start), value [1] (best
    candidate's value in the last iteration) and z [Z] (the encoded observation). `precisions` maps layer names
    (see `layer_names`) to a precision; unnamed layers run in fp32.
    """
    c = model.cfg
    H, P, I, K, A = cfg.horizon, cfg.num_pi_trajs, cfg.iterations, cfg.num_elites, c.action_dim
    g = Graph(native_layernorm)
    spec = step_inputs(model, cfg)
    for name, (dtype, shape) in spec.items():
        g.input(name, dtype, shape)
    nets = Nets(g, model, precisions or {}, task="task" if c.multitask else None)
    mask = nets.mask()  # [1, A]
    z = nets.encode(g.reshape("obs", [1, -1]))  # [1, Z]
    g.output("z", g.reshape(z, [-1]), [c.latent_dim])
    if not cfg.mpc:
        action, mean = nets.pi(z, g.reshape("noise_action", [1, -1]), mask)
        g.output("action", g.reshape(action, [-1]), [A])
        g.output("mean", g.reshape(mean, [-1]), [A])
        return g.model(doc="edge-tdmpc policy step (mpc=False)")

    # discounts per task: gamma^t for t = 0..H, rows gathered by task (all 0.99 for the 500-step MT30 tasks)
    gammas = gammas or c.discounts
    disc = np.array([[g_ ** t for t in range(H + 1)] for g_ in gammas])
    disc = g.const(disc, key="discounts")
    disc = g.op("Gather", disc, "task", axis=0) if c.multitask else g.reshape(disc, [1, -1])  # [1, H+1]
    disc_t = [g.slice(disc, t, t + 1, 1) for t in range(H + 1)]  # each [1, 1]

    # 1. trajectories from the policy prior; at t=0 all P start from the same latent
    pi_actions = []
    if P:
        g.scope = "pi_trajs"
        _z = z
        for t in range(H):
            eps = g.op("Squeeze", g.slice("noise_pi", t, t + 1, 0), g.ints([0]))  # [P, A]
            a, _ = nets.pi(_z, eps, mask)
            pi_actions.append(g.op("Unsqueeze", a, g.ints([0])))
            if t < H - 1:
                _z = nets.next(_z, a, shared=("z",) if t == 0 else ())
        pi_actions = g.op("Concat", *pi_actions, axis=0) if H > 1 else pi_actions[0]  # [H, P, A]

    # 2. warm start
    keep = g.op("Sub", g.scalar(1.0), "t0")
    mean = g.op("Mul", g.op("Concat", g.slice("prev_mean", 1, H, 0), g.const(np.zeros((1, A)), key="zeros_row"),
                            axis=0), keep)
    std = g.const(np.full((H, A), cfg.max_std), key="std0")

    # 3. MPPI iterations; the policy trajectories' rollout (same actions, same start) is shared by all of them
    pi_rollout = _rollout(g, nets, z, g.op("Mul", pi_actions, mask), disc_t, "pi_rollout") if P else None
    for i in range(I):
        g.scope = f"it{i}"
        noise = g.op("Squeeze", g.slice("noise_sample", i, i + 1, 0), g.ints([0]))  # [H, S-P, A]
        sampled = g.op("Clip", g.op("Add", g.op("Unsqueeze", mean, g.ints([1])),
                                    g.op("Mul", g.op("Unsqueeze", std, g.ints([1])), noise)),
                       g.scalar(-1.0), g.scalar(1.0))
        sampled = g.op("Mul", sampled, mask)
        actions = g.op("Concat", pi_actions, sampled, axis=1) if P else sampled  # [H, S, A], masked
        value = _estimate_value(g, nets, z, sampled, disc_t, i, mask, c.num_q > 2, pi_rollout)  # [S]
        elite_value, elite_idx = g.op("TopK", value, g.ints([K]), axis=0, largest=1, sorted=1, n_out=2)
        g.dtype[elite_idx] = "int64"
        elite_actions = g.op("Gather", actions, elite_idx, axis=1)  # [H, K, A]
        score = g.op("Exp", g.op("Mul", g.scalar(cfg.temperature),
                                 g.op("Sub", elite_value, g.op("ReduceMax", elite_value, axes=[0], keepdims=1))))
        score = g.op("Div", score, g.reduce_sum(score, [0]))
        denom = g.op("Add", g.reduce_sum(score, [0]), g.scalar(1e-9))
        w = g.reshape(score, [1, K, 1])
        mean = g.op("Div", g.reduce_sum(g.op("Mul", w, elite_actions), [1], keepdims=0), denom)
        dev = g.op("Sub", elite_actions, g.op("Unsqueeze", mean, g.ints([1])))
        var = g.op("Div", g.reduce_sum(g.op("Mul", w, g.op("Mul", dev, dev)), [1], keepdims=0), denom)
        std = g.op("Mul", g.op("Clip", g.op("Sqrt", var), g.scalar(cfg.min_std), g.scalar(cfg.max_std)), mask)
        mean = g.op("Mul", mean, mask)

    # 4. Gumbel-max pick of one elite, exploration noise (zero in eval mode), clamp
    g.scope = "act"
    idx = g.op("ArgMax", g.op("Add", g.op("Log", score), "noise_gumbel"), axis=0, keepdims=1, dtype="int64")
    first = g.op("Squeeze", g.slice(elite_actions, 0, 1, 0), g.ints([0]))  # [K, A]
    action = g.reshape(g.op("Gather", first, idx, axis=0), [-1])
    std0 = g.reshape(g.slice(std, 0, 1, 0), [-1])
    action = g.op("Clip", g.op("Add", action, g.op("Mul", std0, "noise_action")), g.scalar(-1.0), g.scalar(1.0))
    g.output("action", action, [A])
    g.output("mean", mean, [H, A])
    g.output("value", g.op("ReduceMax", value, axes=[0], keepdims=1), [1])
    return g.model(doc=f"edge-tdmpc MPPI planning step: {cfg}")


def _rollout(g: Graph, nets: Nets, z, actions, disc_t, scope):
    """(sum_t gamma^t r(z_t, a_t) [N, 1], z_H [N, Z]) for actions [H, N, A] from the encoded latent z [1, Z]."""
    G = None
    for t in range(len(disc_t) - 1):
        g.scope = f"{scope}/t{t}"
        a = g.op("Squeeze", g.slice(actions, t, t + 1, 0), g.ints([0]))  # [N, A]
        shared = ("z",) if t == 0 else ()  # every candidate starts from the encoded observation
        term = g.op("Mul", disc_t[t], nets.reward(z, a, shared))
        G = term if G is None else g.op("Add", G, term)
        z = nets.next(z, a, shared)
    return G, z


def _estimate_value(g: Graph, nets: Nets, z, actions, disc_t, i, mask, gather_heads, pi_rollout=None):
    """G = sum_t gamma^t r(z_t, a_t) + gamma^H Q_avg(z_H, pi(z_H)); NaN -> 0; actions [H, S, A] -> [S].

    `pi_rollout` (G, z_H) of the policy trajectories, the same in every iteration, is computed once; `actions`
    are then the sampled candidates only.
    """
    H = len(disc_t) - 1
    G, z = _rollout(g, nets, z, actions, disc_t, f"it{i}")
    if pi_rollout is not None:
        G, z = g.op("Concat", pi_rollout[0], G, axis=0), g.op("Concat", pi_rollout[1], z, axis=0)
    g.scope = f"it{i}/value"
    eps = g.op("Squeeze", g.slice("noise_q_pi", i, i + 1, 0), g.ints([0]))  # [S, A]
    a, _ = nets.pi(z, eps, mask)
    heads = g.op("Squeeze", g.slice("noise_q_idx", i, i + 1, 0), g.ints([0])) if gather_heads else None
    value = g.op("Add", G, g.op("Mul", disc_t[H], nets.Q_avg(z, a, heads)))
    return g.reshape(g.nan_to_num(value), [-1])


# --- the networks, one graph each (dynamic batch) ----------------------------------------------------------
def network_graphs(model: WorldModel, precisions: dict[str, str] | None = None,
                   native_layernorm=True) -> dict[str, onnx.ModelProto]:
    """encoder, dynamics, reward (logits), pi (action, mean) and Q (all heads' logits) with batch axis 'B'."""
    c = model.cfg
    out = {}
    io = {"encoder": [("obs", c.obs_dim)], "dynamics": [("z", c.latent_dim), ("a", c.action_dim)],
          "pi": [("z", c.latent_dim), ("eps", c.action_dim)]}
    io["reward"] = io["Q"] = io["dynamics"]
    for net, ins in io.items():
        g = Graph(native_layernorm)
        x = {name: g.input(name, "fp32", ["B", d]) for name, d in ins}
        task = g.input("task", "int64", ["B"]) if c.multitask else None
        nets = Nets(g, model, precisions or {}, task=task)
        if net == "pi":
            action, mean = nets.pi(x["z"], x["eps"], nets.mask())
            g.output("action", action, ["B", c.action_dim])
            g.output("mean", mean, ["B", c.action_dim])
        elif net == "Q":
            g.output("logits", nets.Q_all(x["z"], x["a"]), [c.num_q, "B", c.num_bins])
        else:
            name, dim = {"encoder": ("z", c.latent_dim), "dynamics": ("next_z", c.latent_dim),
                         "reward": ("logits", c.num_bins)}[net]
            g.output(name, nets.mlp(net, x), ["B", dim])
        out[net] = g.model(name=net, doc=f"edge-tdmpc {net} network")
    return out


# --- what TensorRT's ONNX parser takes ---------------------------------------------------------------------
# The ops this exporter emits, each with the first TensorRT whose ONNX parser imports it (onnx-tensorrt's
# operator matrix). An op missing here is refused for TensorRT targets until someone checks that matrix.
TENSORRT_OPS = {op: (8, 4) for op in (
    "Abs", "Add", "ArgMax", "Cast", "Clip", "Concat", "DequantizeLinear", "Div", "Equal", "Exp", "Gather",
    "Identity", "Log", "MatMul", "Min", "Mul", "QuantizeLinear", "ReduceMax", "ReduceMean", "ReduceSum",
    "Reshape", "Sign", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "TopK", "Unsqueeze",
    "Where")}
TENSORRT_OPS["LayerNormalization"] = (8, 6)


def tensorrt_unsupported(graph: onnx.ModelProto, version: tuple[int, ...]) -> list[str]:
    """Ops of `graph` that TensorRT `version`'s ONNX parser cannot import (empty: it parses)."""
    ops = {n.op_type for n in graph.graph.node}
    return sorted(op for op in ops if op not in TENSORRT_OPS or tuple(version[:2]) < TENSORRT_OPS[op])
