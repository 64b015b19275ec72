"""The planner's MLPs as Triton kernels: one launch runs a whole TD-MPC2 MLP (or the chosen Q heads).

Why: a CUDA-graphed planning step costs about one kernel's latency (a few microseconds) per op, and
torch-compile still runs each layer as a GEMM kernel plus a LayerNorm/Mish kernel: ~50 launches per MPPI
iteration, 1.8 ms a step on an H200 against the 0.5 ms goal. Here one program takes a block of rows through
all three layers - Linear -> LayerNorm -> Mish twice, then the head (plus LayerNorm -> SimNorm for a latent) -
so a rollout step is two launches (reward, dynamics) and the Q value one (both chosen heads, a second grid
axis reading q_idx on the device). Exact rewrites, as in the ONNX graph: the task embedding's share of the
first layer is a per-task bias row, and the first layer takes z and a as two operands (no concatenation).

Hidden activations round-trip through a per-program scratch block (it stays in L2): a register tile cannot be
sliced into the N-chunks a GEMM needs, nor a row's LayerNorm be computed before all its chunks exist.

Without a CUDA GPU the same kernels run in Triton's interpreter, on CPU tensors: that is how the tests check
them against the PyTorch networks here. Only a GPU gives them speed.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():  # read by each @triton.jit, Triton's own included: before `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:  # the runtime that needs it says so (see TritonWorldModel.of)
    triton = None

from edge_tdmpc.layers import Ensemble, NormedLinear
from edge_tdmpc.model import WorldModel


def _pow2(n, floor=16):  # tl.arange and tl.dot want power-of-two extents, tl.dot at least 16
    return max(floor, 1 << (n - 1).bit_length())


if triton is not None:
    @triton.jit
    def _mish(x):
        # x * tanh(softplus(x)) = x * n / (n + 2), n = e^x (e^x + 2): one exp; softplus is x past 20
        e = tl.exp(tl.minimum(x, 20.0))
        n = e * (e + 2.0)
        return tl.where(x > 20.0, x, x * n / (n + 2.0))

    @triton.jit
    def _layer_norm(y, g_ptr, b_ptr, N: tl.constexpr, NP: tl.constexpr, EPS: tl.constexpr):
        """LayerNorm over the first N of NP columns (the rest are 0 and stay 0)."""
        cols = tl.arange(0, NP)
        keep = cols < N
        mean = tl.sum(y, 1) / N
        d = tl.where(keep[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + EPS)
        g = tl.load(g_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        return d * rstd[:, None] * g[None, :] + b[None, :]

    @triton.jit
    def _dense(x, w_ptr, K: tl.constexpr, KP: tl.constexpr, a, wa_ptr, KA: tl.constexpr, KAP: tl.constexpr,
               bias_ptr, N: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr, dst, stride: tl.constexpr, rows,
               row_ok, PREC: tl.constexpr):
        """dst[rows, :N] = x @ w[:K, :N] (+ a @ wa[:KA, :N]) + bias, in N-chunks of BN; w is [K, N] row-major."""
        k = tl.arange(0, KP)
        for n0 in tl.static_range(0, NP, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < N
            w = tl.load(w_ptr + k[:, None] * N + cols[None, :], mask=(k < K)[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(x, w, input_precision=PREC)
            if KA > 0:
                ka = tl.arange(0, KAP)
                wa = tl.load(wa_ptr + ka[:, None] * N + cols[None, :], mask=(ka < KA)[:, None] & col_ok[None, :],
                             other=0.0)
                acc += tl.dot(a, wa, input_precision=PREC)
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(dst + rows[:, None] * stride + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _reload(src, stride: tl.constexpr, rows, row_ok, N: tl.constexpr, NP: tl.constexpr):
        """A row block back from scratch, once every thread's chunk is written (and before any is overwritten)."""
        tl.debug_barrier()
        cols = tl.arange(0, NP)
        y = tl.load(src + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & (cols < N)[None, :], other=0.0)
        tl.debug_barrier()
        return y

    @triton.jit
    def _mlp_kernel(x_ptr, a_ptr, task_ptr, head_ptr,
                    w0, wa0, b0, g0, e0, w1, b1, g1, e1, w2, b2, g2, e2, out_ptr, scratch_ptr, M,
                    KX: tl.constexpr, KXP: tl.constexpr, KA: tl.constexpr, KAP: tl.constexpr,
                    H: tl.constexpr, HP: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr, TASKS: tl.constexpr,
                    SIMNORM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                    EPS: tl.constexpr):
        """out[j, rows] = MLP_head(x[rows], a[rows]) for head = heads[j]; SIMNORM > 0: LayerNorm + SimNorm head."""
        j = tl.program_id(1)
        head = tl.load(head_ptr + j)
        task = tl.load(task_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < M
        dt = w1.dtype.element_ty
        kx = tl.arange(0, KXP)
        x = tl.load(x_ptr + rows[:, None] * KX + kx[None, :], mask=row_ok[:, None] & (kx < KX)[None, :],
                    other=0.0).to(dt)
        a = x
        if KA > 0:
            ka = tl.arange(0, KAP)
            a = tl.load(a_ptr + rows[:, None] * KA + ka[None, :], mask=row_ok[:, None] & (ka < KA)[None, :],
                        other=0.0).to(dt)
        scratch = scratch_ptr + j * M * HP
        # layer 0: x @ W_z + a @ W_a + (bias + W_e e_task)
        _dense(x, w0 + head * KX * H, KX, KXP, a, wa0 + head * KA * H, KA, KAP, b0 + (head * TASKS + task) * H,
               H, HP, BN, scratch, HP, rows, row_ok, PREC)
        h = _mish(_layer_norm(_reload(scratch, HP, rows, row_ok, H, HP), g0 + head * H, e0 + head * H, H, HP, EPS))
        # layer 1
        _dense(h.to(dt), w1 + head * H * H, H, HP, h, w1, 0, 16, b1 + head * H, H, HP, BN, scratch, HP, rows,
               row_ok, PREC)
        h = _mish(_layer_norm(_reload(scratch, HP, rows, row_ok, H, HP), g1 + head * H, e1 + head * H, H, HP, EPS))
        # head
        out = out_ptr + j * M * NO
        if SIMNORM > 0:
            _dense(h.to(dt), w2 + head * H * NO, H, HP, h, w2, 0, 16, b2 + head * NO, NO, NOP, BN, scratch, HP,
                   rows, row_ok, PREC)
            y = _layer_norm(_reload(scratch, HP, rows, row_ok, NO, NOP), g2, e2, NO, NOP, EPS)
            y = tl.reshape(y, (BM, NOP // SIMNORM, SIMNORM))
            p = tl.exp(y - tl.max(y, 2)[:, :, None])
            y = tl.reshape(p / tl.sum(p, 2)[:, :, None], (BM, NOP))
            cols = tl.arange(0, NOP)
            tl.store(out + rows[:, None] * NO + cols[None, :], y, mask=row_ok[:, None])
        else:
            _dense(h.to(dt), w2 + head * H * NO, H, HP, h, w2, 0, 16, b2 + head * NO, NO, NOP, BN, out, NO, rows,
                   row_ok, PREC)


def _stacked(net):
    """An mlp (nn.Sequential) or a Q Ensemble -> per layer (weight [n, out, in], bias [n, out], ln_w, ln_b)."""
    if isinstance(net, Ensemble):
        return [(l.weight, l.bias, l.ln.weight if l.ln is not None else None,
             l.ln.bias if l.ln is not None else None) for l in net.params]
    one = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
    return [(one(m.weight), one(m.bias), one(m.ln.weight) if isinstance(m, NormedLinear) else None,
             one(m.ln.bias) if isinstance(m, NormedLinear) else None) for m in net]


class TritonMLP(nn.Module):
    """A TD-MPC2 MLP over [z, task embedding, a] (3 layers; heads stacked for an ensemble) as one launch."""
    BM, BN, WARPS = 16, 64, 4  # rows per program, output columns per GEMM chunk

    def __init__(self, net, z_dim: int, a_dim: int, emb: torch.Tensor | None):
        super().__init__()
        layers = _stacked(net)
        if len(layers) != 3:
            raise ValueError(f"TritonMLP runs 3-layer TD-MPC2 MLPs, not {len(layers)} layers")
        (w0, b0, g0, e0), (w1, b1, g1, e1), (w2, b2, g2, e2) = layers
        e_dim = w0.shape[2] - z_dim - a_dim
        self.z_dim, self.a_dim, self.hidden, self.out_dim = z_dim, a_dim, w1.shape[1], w2.shape[1]
        self.simnorm = 0
        if g2 is not None:  # a latent head: NormedLinear with SimNorm
            self.simnorm = net[-1].act.dim
            if self.out_dim != _pow2(self.out_dim) or self.out_dim % self.simnorm:
                raise ValueError(f"a SimNorm head needs a power-of-two width, not {self.out_dim}")
            g2, e2 = g2[0], e2[0]
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
        self._buf("g2", g2 if g2 is not None else b2)  # unread without a SimNorm head
        self._buf("e2", e2 if e2 is not None else b2)
        self._buf("all_heads", torch.arange(w0.shape[0]))
        self.tasks = bias.shape[1]

    def _buf(self, name, value):
        # copies, kept out of the state dict: the checkpoint layout stays the official one
        self.register_buffer(name, value.detach().clone().contiguous(), persistent=False)

    def forward(self, x, a=None, task=None, heads=None):
        """x [..., z_dim], a [..., a_dim] -> [..., out] (or [len(heads), ..., out] when heads is given)."""
        lead, dev = x.shape[:-1], x.device
        x = x.reshape(-1, self.z_dim).contiguous()
        a = x if a is None else a.reshape(-1, self.a_dim).contiguous()
        task = torch.zeros(1, dtype=torch.long, device=dev) if task is None or self.tasks == 1 else (
            torch.tensor([task], device=dev) if isinstance(task, int) else task.reshape(-1)[:1].long())
        sel = self.all_heads[:1] if heads is None else heads.reshape(-1).long()
        M, n = x.shape[0], sel.shape[0]
        HP = _pow2(self.hidden)
        out = torch.empty(n, M, self.out_dim, device=dev, dtype=self.w1.dtype)
        scratch = torch.empty(n, M, HP, device=dev, dtype=torch.float32)
        prec = "ieee" if self.w1.dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 operands
        _mlp_kernel[(triton.cdiv(M, self.BM), n)](
            x, a, task, sel, self.w0, self.wa0, self.b0, self.g0, self.e0, self.w1, self.b1, self.g1, self.e1,
            self.w2, self.b2, self.g2, self.e2, out, scratch, M,
            KX=self.z_dim, KXP=_pow2(self.z_dim), KA=self.a_dim, KAP=_pow2(max(self.a_dim, 1)), H=self.hidden,
            HP=HP, NO=self.out_dim, NOP=_pow2(self.out_dim), TASKS=self.tasks, SIMNORM=self.simnorm, BM=self.BM,
            BN=min(self.BN, HP), PREC=prec, EPS=1e-5, num_warps=self.WARPS)
        return out.reshape(*lead, self.out_dim) if heads is None else out.reshape(n, *lead, self.out_dim)


class TritonWorldModel(WorldModel):
    """A WorldModel whose planner networks (dynamics, reward, policy, Q) run as TritonMLP launches; the
    encoder (one row per step) and every planner statistic stay in PyTorch."""

    @classmethod
    def of(cls, model: WorldModel) -> "TritonWorldModel":
        if triton is None:
            raise ValueError("the Triton kernels need the 'triton' package (it ships with PyTorch's CUDA "
                             "builds): pip install triton, or use the torch-compile runtime")
        p = next(model.parameters())
        m = cls(model.cfg).to(p.device, p.dtype)
        m.load_state_dict(model.state_dict())
        m.train(model.training)
        c = model.cfg
        emb = None
        if c.multitask:
            m._task_emb.max_norm = model._task_emb.max_norm
            emb = F.embedding(torch.arange(len(c.tasks), device=p.device), model._task_emb.weight.detach().clone(),
                              max_norm=model._task_emb.max_norm)
        z, a = c.latent_dim, c.action_dim
        m._k_next = TritonMLP(m._dynamics, z, a, emb)
        m._k_reward = TritonMLP(m._reward, z, a, emb)
        m._k_pi = TritonMLP(m._pi, z, 0, emb)
        m._k_Q = TritonMLP(m._Qs, z, a, emb)
        return m

    def next(self, z, a, task):
        return self._k_next(z, a, task)

    def reward(self, z, a, task):
        return self._k_reward(z, a, task)

    def pi_head(self, z, task):
        return self._k_pi(z, None, task)

    def Q(self, z, a, task, return_type="all", target=False, qidx=None):
        if target or return_type == "all" or self.training:
            return super().Q(z, a, task, return_type, target, qidx)
        if qidx is None:
            qidx = torch.randperm(self.cfg.num_q, device=z.device)[:2]
        return self._decode_Q(self._k_Q(z, a, task, heads=qidx), return_type)
