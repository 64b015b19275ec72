"""The planning step as Triton kernels: one launch runs a whole TD-MPC2 MLP (or the chosen Q heads), and the
policy trajectories, the horizon's value and the MPPI update are one launch each.

Why: a CUDA-graphed planning step costs about one kernel's latency (a few microseconds) per op, and
torch-compile still runs each layer as a GEMM kernel plus a LayerNorm/Mish kernel, so the launch count sets
the step's latency (docs/results/gpu-h200.md, "Where the time goes"). Here one program takes a block of rows
through all three layers - Linear -> LayerNorm -> Mish twice, then the head (plus LayerNorm -> SimNorm for a
latent) - and a second grid axis runs networks side by side: a rollout step (reward and dynamics) is one
launch, and so is the Q value (both heads q_idx picks, read on the device), with the two-hot decode done in
the kernel.
Exact rewrites, as in the ONNX graph: the task embedding's share of the first layer is a per-task bias row,
and the first layer takes z and a as two operands (no concatenation).

The glue between the MLPs is fused too, so that almost no elementwise ops are left between the launches:
one program per row block runs the policy-prior trajectories (policy -> squashed-Gaussian sample ->
dynamics over the horizon); each rollout step adds its discounted reward to the return in the kernel; one
program per row block runs the horizon's policy -> sample -> 2 Q heads -> value; and one program does the
MPPI update (top-k by a bitonic sort of (value, index) keys, the scores, the elites' mean and std).

Hidden activations round-trip through per-program scratch rows (they stay in L1/L2): the GEMMs run on small
[BM, BK] x [BK, BN] tiles, so that no thread holds a whole [BM, hidden] row block in registers (that spills
heavily; `ptxas_report` shows registers and spills per launch), and a row's LayerNorm needs all of its chunks
first.

The kernels themselves and their launches are in `triton_ops.py`; this module holds the models around them.
Without a CUDA GPU the same kernels run in Triton's interpreter, on CPU tensors: that is how the tests check
them against the PyTorch networks here. Only a GPU gives them speed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_tdmpc.compile import triton_ops as ops
from edge_tdmpc.layers import Ensemble, NormedLinear
from edge_tdmpc.model import WorldModel


def _latent_rows(z, width):
    """z [..., width] -> (rows [M, width], row stride): one latent expanded to all rows is read in place (stride
    0), not copied; anything else is made contiguous."""
    z = z.reshape(-1, width)
    return (z, 0) if z.stride() == (0, 1) else (z.contiguous(), width)


def _stacked(nets):
    """mlps (nn.Sequential) or one Q Ensemble -> per layer (weight [n, out, in], bias [n, out], ln_w, ln_b),
    the output layers zero-padded to a power of two at least as wide as the widest head."""
    if isinstance(nets, Ensemble):
        layers = [(m.weight, m.bias, None if m.ln is None else m.ln.weight, None if m.ln is None else m.ln.bias)
                  for m in nets.params]
    else:
        layers = []
        for i in range(len(nets[0])):
            ms = [net[i] for net in nets]
            width = max(m.out_features for m in ms)  # only the output layers may differ
            pad = lambda t, n=width: F.pad(t, (0, 0) * (t.ndim - 1) + (0, n - t.shape[0]))  # noqa: E731
            norm = i < len(nets[0]) - 1
            layers.append((torch.stack([pad(m.weight) for m in ms]), torch.stack([pad(m.bias) for m in ms]),
                           torch.stack([m.ln.weight for m in ms]) if norm else None,
                           torch.stack([m.ln.bias for m in ms]) if norm else None))
    w, b, _, _ = layers[-1]
    n = ops.pow2(w.shape[1]) - w.shape[1]
    layers[-1] = (F.pad(w, (0, 0, 0, n)), F.pad(b, (0, n)), None, None)
    return layers


class TritonMLP(nn.Module):
    """TD-MPC2 MLPs over [z, task embedding, a] (3 layers each) run side by side as one launch: the heads of a
    Q ensemble, or several networks on the same input (reward and dynamics: one rollout step). At most one
    of them may be a latent head (NormedLinear + SimNorm, the dynamics); `decode` returns the others' two-hot
    values instead of their logits."""
    BM, BK, BN, WARPS = 16, 64, 64, 4  # rows per program; GEMM tiles [BM, BK] x [BK, BN]

    def __init__(self, nets, z_dim: int, a_dim: int, emb: torch.Tensor | None, decode=None):
        super().__init__()
        seqs = [] if isinstance(nets, Ensemble) else list(nets)
        if any(len(net) != 3 for net in seqs) or (isinstance(nets, Ensemble) and len(nets.params) != 3):
            raise ValueError("TritonMLP runs 3-layer TD-MPC2 MLPs (2 hidden layers and a head)")
        latent = [i for i, net in enumerate(seqs) if isinstance(net[-1], NormedLinear)]
        self.latent = latent[0] if latent else -1
        (w0, b0, g0, e0), (w1, b1, g1, e1), (w2, b2, _, _) = _stacked(nets)
        e_dim = w0.shape[2] - z_dim - a_dim
        plain = [net[-1].out_features for i, net in enumerate(seqs) if i != self.latent] if seqs else \
            [nets.params[-1].weight.shape[1]]
        self.z_dim, self.a_dim, self.hidden = z_dim, a_dim, w1.shape[1]
        self.out_dim, self.stacked = (plain[0] if plain else 1), w2.shape[1]
        if len(set(plain)) > 1:
            raise ValueError(f"the plain heads of one TritonMLP must have one width, not {plain}")
        self.simnorm, self.latent_dim, self.decode = 0, 1, decode
        if decode and decode[0] != self.out_dim:
            raise ValueError(f"decode expects {decode[0]} bins, the heads give {self.out_dim}")
        if self.latent >= 0:
            head = seqs[self.latent][-1]
            self.simnorm, self.latent_dim = head.act.dim, head.out_features
            if self.latent_dim % self.simnorm or self.stacked % self.simnorm:
                raise ValueError(f"SimNorm groups of {self.simnorm} must divide the latent ({self.latent_dim})")
        # per-task first-layer bias: b0 + W_e e_t, with e_t the max_norm=1 row nn.Embedding would look up
        if emb is not None and e_dim:
            bias = b0.unsqueeze(1) + torch.einsum("te,nhe->nth", emb.to(w0.dtype), w0[:, :, z_dim:z_dim + e_dim])
        else:
            bias = b0.unsqueeze(1)
        t = lambda w: w.transpose(1, 2).contiguous()  # noqa: E731  [n, in, out], row-major for the kernel
        self._buf("w0", t(w0[:, :, :z_dim]))
        self._buf("wa0", t(w0[:, :, z_dim + e_dim:]) if a_dim else w0.new_zeros(1))
        self._buf("b0", bias)
        for name, v in dict(g0=g0, e0=e0, w1=t(w1), b1=b1, g1=g1, e1=e1, w2=t(w2), b2=b2).items():
            self._buf(name, v)
        ln = seqs[self.latent][-1].ln if self.latent >= 0 else None
        self._buf("g2", ln.weight if ln is not None else b2)  # unread without a latent head
        self._buf("e2", ln.bias if ln is not None else b2)
        self._buf("all_heads", torch.arange(w0.shape[0], device=w0.device))
        self.tasks = bias.shape[1]

    def _buf(self, name, value):
        # copies, kept out of the state dict: the checkpoint layout stays the official one
        self.register_buffer(name, value.detach().clone().contiguous(), persistent=False)

    def forward(self, x, a=None, task=None, heads=None, g=None, gamma=None, step=0):
        """x [..., z_dim], a [..., a_dim] -> (out [n, ..., out_dim], or [n, ..., 1] values with `decode`;
        z [..., latent_dim] when there is a latent head), n = len(heads), all heads by default. With `step` > 0
        (and `decode`), the decoded head returns g + gamma^step * value: the rollout's return so far."""
        lead, dev = x.shape[:-1], x.device
        x, xs = _latent_rows(x, self.z_dim)
        a = x if a is None else a.reshape(-1, self.a_dim).contiguous()
        sel = self.all_heads if heads is None else heads.reshape(-1).long()
        n, c = sel.shape[0], self._constants(STEP=step, XS=xs)
        out, z = ops.triton_mlp(x, a, self._task(task, dev), sel, [getattr(self, p) for p in ops.MLP_PARAMS],
                                x if g is None else g.reshape(-1), x if gamma is None else gamma,
                                [int(c[k]) for k in ops.MLP_INTS], [c["VMIN"], c["VMAX"], c["EPS"]], c["PREC"],
                                self.WARPS)
        out = out.reshape(n, *lead, 1 if self.decode else self.out_dim)
        return (out, z.reshape(*lead, self.latent_dim)) if self.latent >= 0 else out

    def _task(self, task, dev):
        if task is None or self.tasks == 1:
            return torch.zeros(1, dtype=torch.long, device=dev)
        return torch.tensor([task], device=dev) if isinstance(task, int) else task.reshape(-1)[:1].long()

    def _constants(self, **override):
        _, vmin, vmax = self.decode or (self.out_dim, 0.0, 0.0)
        return dict(KX=self.z_dim, XS=self.z_dim, KA=self.a_dim, KAP=ops.pow2(max(self.a_dim, 1)), H=self.hidden,
                    NO=self.out_dim, NL=self.latent_dim, NS=self.stacked, PW=max(self.hidden, self.stacked),
                    TASKS=self.tasks, LATENT=self.latent, SIMNORM=self.simnorm or 1, DECODE=bool(self.decode), STEP=0,
                    VMIN=float(vmin), VMAX=float(vmax), BM=self.BM, BK=self.BK, BN=self.BN, EPS=1e-5,
                    PREC=ops.dot_precision(self.w1.dtype)) | override

    def ptxas_report(self, arch: int, step=0) -> dict:
        """Compile this launch for an NVIDIA GPU of compute capability `arch` (90: H100/H200, 87: Jetson Orin)
        without one: registers and spills per thread from Triton's own ptxas, shared memory per program."""
        dt, f32, i64 = self.w1.dtype, torch.float32, torch.int64
        ptrs = dict(x_ptr=dt, a_ptr=f32 if self.a_dim else dt, task_ptr=i64, head_ptr=i64, w0=dt, wa0=dt,
                    b0=dt, g0=dt, e0=dt, w1=dt, b1=dt, g1=dt, e1=dt, w2=dt, b2=dt, g2=dt, e2=dt,
                    out_ptr=f32 if self.decode else dt, z_ptr=dt, pre_ptr=f32, act_ptr=dt, M="i32",
                    g_ptr=f32, gamma_ptr=f32)
        return ops.ptxas(ops.mlp_kernel, ptrs, self._constants(STEP=step), self.WARPS, arch)


class TritonWorldModel(WorldModel):
    """A WorldModel whose planner networks (dynamics, reward, policy, Q) run as TritonMLP launches, and which
    offers `planner.plan` its hot loop as kernels: `fused_pi_rollout` (the policy trajectories in one launch),
    `fused_value` (estimate_value in horizon + 1 launches) and `fused_mppi` (one MPPI update in one). The
    encoder (one row per step) and the candidates' sampling stay in PyTorch."""
    PI_ROLLOUT_WARPS = 8  # 5 MLPs in one program: on 4 warps it spills for sm_87 (ptxas_report)

    @classmethod
    def of(cls, model: WorldModel) -> "TritonWorldModel":
        if ops.triton is None:
            raise ValueError("the Triton kernels need the 'triton' package (it ships with PyTorch's CUDA "
                             "builds): pip install triton, or use the torch-compile runtime")
        p = next(model.parameters())
        if p.dtype == torch.bfloat16 and ops.INTERPRETED:
            raise ValueError("Triton's interpreter (no CUDA GPU here) computes bf16 dots wrongly: run the bf16 "
                             "kernels on a GPU, or use fp32/fp16")
        m = cls(model.cfg).to(p.device, p.dtype)
        m.load_state_dict(model.state_dict())
        m.train(model.training)
        c = model.cfg
        emb = None
        if c.multitask:
            m._task_emb.max_norm = model._task_emb.max_norm
            emb = F.embedding(torch.arange(len(c.tasks), device=p.device), model._task_emb.weight.detach().clone(),
                              max_norm=model._task_emb.max_norm)
        z, a, two_hot = c.latent_dim, c.action_dim, (c.num_bins, c.vmin, c.vmax)
        m._k_rollout = TritonMLP([m._reward, m._dynamics], z, a, emb, decode=two_hot)  # one launch per step
        m._k_next = TritonMLP([m._dynamics], z, a, emb)
        m._k_pi = TritonMLP([m._pi], z, 0, emb)
        m._k_Q = TritonMLP(m._Qs, z, a, emb, decode=two_hot)
        if not m._k_pi.hidden == m._k_Q.hidden == m._k_next.hidden:
            raise ValueError("the fused kernels run policy, dynamics and Q in one program: they need one hidden width")
        masks = model._action_masks if c.multitask else torch.ones(1, a, device=p.device)
        m.register_buffer("_k_masks", masks.detach().float().clone(), persistent=False)
        return m

    def fused_pi_rollout(self, z, task, eps):
        """planner.pi_rollout in one launch: each program takes its rows through all the horizon's policy and
        dynamics steps."""
        pi, dyn, c = self._k_pi, self._k_next, self._rollout_constants(eps.shape[0])
        z, c["XS"] = _latent_rows(z, pi.z_dim)
        params = [getattr(pi, k) for k in ops.PI_PARAMS] + [getattr(dyn, k) for k in ops.MLP_PARAMS]
        floats = [c["LOG_STD_MIN"], c["LOG_STD_DIF"], c["EPS"]]
        return ops.triton_pi_rollout(z, eps.float().contiguous(), self._k_masks, pi._task(task, z.device), params,
                                     [int(c[k]) for k in ops.ROLLOUT_INTS], floats, c["PREC"], self.PI_ROLLOUT_WARPS)

    def _rollout_constants(self, horizon):
        pi, dyn = self._k_pi, self._k_next
        return dict(KX=pi.z_dim, XS=pi.z_dim, A=self.cfg.action_dim, AP=ops.pow2(self.cfg.action_dim), H=pi.hidden,
                    NSP=pi.stacked, NSD=dyn.stacked, SIMNORM=dyn.simnorm, TASKS=pi.tasks, HZ=horizon, BM=pi.BM,
                    BK=pi.BK, BN=pi.BN, LOG_STD_MIN=float(self.cfg.log_std_min),
                    LOG_STD_DIF=float(self.cfg.log_std_max - self.cfg.log_std_min), EPS=1e-5,
                    PREC=ops.dot_precision(pi.w1.dtype))

    def fused_value(self, z, actions, task, gamma, q_idx, q_pi):
        """planner.estimate_value(...).nan_to_num(0) [S] in horizon + 1 launches: each rollout step adds its
        discounted reward to the return, then one program per row block runs policy -> 2 Q heads -> value."""
        gamma = gamma.float().reshape(1) if torch.is_tensor(gamma) else torch.full((1,), gamma, device=z.device)
        G = None
        for t in range(actions.shape[0]):
            G, z = self._k_rollout(z, actions[t], task, g=G, gamma=gamma, step=t)
            G = G[0].reshape(-1)  # head 0 is the reward; head 1, the dynamics, gave z
        pi, q, c = self._k_pi, self._k_Q, self._value_constants(actions.shape[0])
        params = [getattr(pi, k) for k in ops.PI_PARAMS] + [getattr(q, k) for k in ops.Q_PARAMS]
        floats = [c[k] for k in ("LOG_STD_MIN", "LOG_STD_DIF", "VMIN", "VMAX", "EPS")]
        return ops.triton_value(z.contiguous(), G, gamma, q_pi.contiguous(), self._k_masks, pi._task(task, z.device),
                                q_idx.reshape(-1).long(), params, [int(c[k]) for k in ops.VALUE_INTS], floats,
                                c["PREC"], pi.WARPS)

    def _value_constants(self, horizon):
        pi, q, cfg = self._k_pi, self._k_Q, self.cfg
        return dict(KX=pi.z_dim, A=cfg.action_dim, AP=ops.pow2(cfg.action_dim), H=pi.hidden, NSP=pi.stacked,
                    NSQ=q.stacked, NO=q.out_dim, TASKS=pi.tasks, STEP=horizon, BM=pi.BM, BK=pi.BK, BN=pi.BN,
                    LOG_STD_MIN=float(cfg.log_std_min), LOG_STD_DIF=float(cfg.log_std_max - cfg.log_std_min),
                    VMIN=float(cfg.vmin), VMAX=float(cfg.vmax), EPS=1e-5, PREC=ops.dot_precision(pi.w1.dtype))

    def fused_mppi(self, value, actions, mask, cfg):
        """planner.mppi_update in one launch (one program: the top-k, the scores, the new mean and std)."""
        c = self._mppi_constants(actions.shape, cfg)
        return ops.triton_mppi(value.contiguous(), actions.contiguous(), mask.float().contiguous(),
                               [c[k] for k in ops.MPPI_INTS], [c["TEMPERATURE"], c["MIN_STD"], c["MAX_STD"]])

    @staticmethod
    def _mppi_constants(shape, cfg):
        HZ, S, A = shape
        return dict(S=S, SP=ops.pow2(S), K=cfg.num_elites, KP=ops.pow2(cfg.num_elites, 1), HZ=HZ, A=A,
                    AP=ops.pow2(A), TEMPERATURE=float(cfg.temperature), MIN_STD=float(cfg.min_std),
                    MAX_STD=float(cfg.max_std))

    def ptxas_report(self, arch: int, cfg=None,
                     launches=("rollout", "next", "pi", "Q", "value", "mppi", "pi_rollout")) -> dict:
        """ptxas's registers, spills and shared memory for the launches of a planning step on sm_`arch`
        (TritonMLP.ptxas_report), at the planner settings `cfg` (the official ones by default)."""
        from edge_tdmpc.planner import PlannerConfig
        cfg = cfg or PlannerConfig()
        dt, f32, i64 = self._k_pi.w1.dtype, torch.float32, torch.int64
        value = dict(z_ptr=dt, g_ptr=f32, gamma_ptr=f32, eps_ptr=f32, mask_ptr=f32, task_ptr=i64, qidx_ptr=i64)
        value |= {f"p{k}": dt for k in ops.PI_PARAMS} | {f"q{k}": dt for k in ops.Q_PARAMS}
        value |= dict(value_ptr=f32, a_ptr=f32, pre=f32, act=dt, M="i32")
        mppi = dict(value_ptr=f32, actions_ptr=f32, mask_ptr=f32, mean_ptr=f32, std_ptr=f32, elite_ptr=f32,
                    elite_value_ptr=f32, score_ptr=f32)
        rollout = dict(z_ptr=dt, eps_ptr=f32, mask_ptr=f32, task_ptr=i64) | {f"p{k}": dt for k in ops.PI_PARAMS}
        rollout |= {f"d{k}": dt for k in ops.MLP_PARAMS}
        rollout |= dict(actions_ptr=f32, zs_ptr=dt, pre_ptr=f32, act_ptr=dt, M="i32")
        shape = (cfg.horizon, cfg.num_samples, self.cfg.action_dim)
        report = {"rollout": lambda: self._k_rollout.ptxas_report(arch, step=1),
                  "next": lambda: self._k_next.ptxas_report(arch), "pi": lambda: self._k_pi.ptxas_report(arch),
                  "Q": lambda: self._k_Q.ptxas_report(arch),
                  "value": lambda: ops.ptxas(ops.value_kernel, value, self._value_constants(cfg.horizon),
                                             self._k_pi.WARPS, arch),
                  "mppi": lambda: ops.ptxas(ops.mppi_kernel, mppi, self._mppi_constants(shape, cfg), 4, arch),
                  "pi_rollout": lambda: ops.ptxas(ops.pi_rollout_kernel, rollout,
                                                  self._rollout_constants(cfg.horizon), self.PI_ROLLOUT_WARPS, arch)}
        return {k: report[k]() for k in launches}

    def rollout_step(self, z, a, task):
        reward, z = self._k_rollout(z, a, task)
        return reward[0], z  # row 1 belongs to the dynamics head, whose output is z

    def next(self, z, a, task):
        return self._k_next(z, a, task)[1]

    def pi_head(self, z, task):
        return self._k_pi(z, None, task)[0]

    def Q(self, z, a, task, return_type="all", target=False, qidx=None):
        if target or return_type == "all" or self.training:
            return super().Q(z, a, task, return_type, target, qidx)
        if qidx is None:
            qidx = torch.randperm(self.cfg.num_q, device=z.device)[:2]
        return self._pair_value(self._k_Q(z, a, task, heads=qidx), return_type)


def bench_main(argv=None):
    """GPU: the policy trajectories, one rollout step, Q, policy head, the horizon's value and an MPPI update as
    Triton launches vs PyTorch (eager and torch.compile'd), per rows-per-program BM - the numbers behind a
    planning step."""
    import argparse

    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.planner import PlannerConfig, estimate_value, mppi_update, pi_rollout
    ap = argparse.ArgumentParser(description=bench_main.__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--rows", type=int, default=512)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark needs a CUDA GPU")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    ref = load_model(args.checkpoint).to("cuda", dtype).eval()
    z = torch.randn(args.rows, ref.cfg.latent_dim, device="cuda").softmax(-1).to(dtype)
    a = torch.rand(args.rows, ref.cfg.action_dim, device="cuda") * 2 - 1
    task, heads = torch.tensor([3], device="cuda"), torch.tensor([1, 0], device="cuda")

    def time_us(fn, n=200):
        for _ in range(10):
            fn()
        graph = torch.cuda.CUDAGraph()  # replayed, as the planner runs: launch cost out of the way
        with torch.cuda.graph(graph):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return 1000 * start.elapsed_time(end) / n

    cfg = PlannerConfig()
    actions = torch.rand(cfg.horizon, args.rows, ref.cfg.action_dim, device="cuda") * 2 - 1
    q_pi, value = torch.randn(args.rows, ref.cfg.action_dim, device="cuda"), torch.randn(args.rows, device="cuda")
    mask, gamma = torch.ones(ref.cfg.action_dim, device="cuda"), torch.tensor(0.99, device="cuda")
    z1, eps = z[:1].expand(cfg.num_pi_trajs, -1), torch.randn(cfg.horizon, cfg.num_pi_trajs, ref.cfg.action_dim,
                                                                device="cuda")

    def calls(m):
        fused = isinstance(m, TritonWorldModel)
        return {"pi trajectories": (lambda: m.fused_pi_rollout(z1, task, eps)) if fused else
                (lambda: pi_rollout(m, z1, task, eps)),
                "rollout_step": lambda: m.rollout_step(z, a, task),
                "Q avg": lambda: m.Q(z, a, task, "avg", qidx=heads), "pi head": lambda: m.pi_head(z, task),
                "value": (lambda: m.fused_value(z, actions, task, gamma, heads, q_pi)) if fused else
                (lambda: estimate_value(m, z, actions, task, gamma, heads, q_pi).nan_to_num(0)),
                "mppi update": (lambda: m.fused_mppi(value, actions, mask, cfg)) if fused else
                (lambda: mppi_update(value, actions, mask, cfg))}

    rows = {"torch eager": calls(ref)}
    compiled = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in calls(ref).items()}
    rows["torch.compile"] = compiled
    for bm, warps in ((16, 4), (32, 8), (64, 8)):  # without spills on sm_90 (ptxas_report); 64 rows on 4
        m = TritonWorldModel.of(ref)             # warps spill
        for k in ("_k_rollout", "_k_next", "_k_pi", "_k_Q"):
            getattr(m, k).BM, getattr(m, k).WARPS = bm, warps
        rows[f"triton {bm}x{warps}w"] = calls(m)
    print(f"{args.rows} rows, {args.precision}, {torch.cuda.get_device_name()}: us per call (CUDA graph replay)")
    for name, fns in rows.items():
        print(f"{name:16s}" + "".join(f"  {k} {time_us(f):7.1f}" for k, f in fns.items()))

