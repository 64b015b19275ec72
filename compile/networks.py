"""The world model's networks as ONNX: folded weights (the task embedding's contribution to each first layer a
per-task bias, first layers split into their z / e / a segments), emitted into a `graph.Graph` at each layer's
precision, and each network as a graph of its own with a batch axis."""
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from edge_tdmpc.compile.graph import Graph
from edge_tdmpc.layers import NormedLinear, SimNorm
from edge_tdmpc.model import WorldModel


def layer_names(model: WorldModel) -> list[str]:
    """The keys of the layer precisions: 'encoder.0', ..., 'Q.2'."""
    names = [f"encoder.{i}" for i in range(len(model._encoder["state"]))]
    names += [f"{net}.{i}" for net in ("dynamics", "reward", "pi") for i in range(len(getattr(model, f"_{net}")))]
    return names + [f"Q.{i}" for i in range(len(model._Qs.params))]


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
    elif emb is not None:  # multi-task with task_dim 0: the same bias for every task, still gathered by task
        bias = np.repeat(bias, emb.shape[0], axis=0)
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
