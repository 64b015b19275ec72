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

import numpy as np
import onnx

from edge_tdmpc.compile.graph import Graph
from edge_tdmpc.compile.networks import Nets
from edge_tdmpc.model import WorldModel
from edge_tdmpc.planner import PlannerConfig


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
    candidate's value in the last iteration), z [Z] (the encoded observation), and the step's planner label
    besides mean[0]: std [A] (the final iteration's std of the first action) and eval_action [A] (the action
    without exploration noise). `precisions` maps layer names
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
    picked = g.reshape(g.op("Gather", first, idx, axis=0), [-1])
    std0 = g.reshape(g.slice(std, 0, 1, 0), [-1])
    action = g.op("Clip", g.op("Add", picked, g.op("Mul", std0, "noise_action")), g.scalar(-1.0), g.scalar(1.0))
    g.output("action", action, [A])
    g.output("mean", mean, [H, A])
    g.output("value", g.op("ReduceMax", value, axes=[0], keepdims=1), [1])
    # the planner's label of the step (planner.PlanLabel): std of the first action, the noise-free action
    g.output("std", std0, [A])
    g.output("eval_action", picked, [A])
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
