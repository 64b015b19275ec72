"""The planner's MLPs as Triton kernels: one launch runs a whole TD-MPC2 MLP (or the chosen Q heads).

Why: a CUDA-graphed planning step costs about one kernel's latency (a few microseconds) per op, and
torch-compile still runs each layer as a GEMM kernel plus a LayerNorm/Mish kernel: ~50 launches per MPPI
iteration, 1.8 ms a step on an H200 against the 0.5 ms goal. Here one program takes a block of rows through
all three layers - Linear -> LayerNorm -> Mish twice, then the head (plus LayerNorm -> SimNorm for a latent) -
and a second grid axis runs networks side by side: a rollout step (reward and dynamics) is one launch, and so
is the Q value (both heads q_idx picks, read on the device), with the two-hot decode done in the kernel.
Exact rewrites, as in the ONNX graph: the task embedding's share of the first layer is a per-task bias row,
and the first layer takes z and a as two operands (no concatenation).

Hidden activations round-trip through per-program scratch rows (they stay in L1/L2): the GEMMs run on small
[BM, BK] x [BK, BN] tiles, so that no thread holds a whole [BM, hidden] row block in registers (that spilled
heavily: ptxas reported 255 registers and 4.7 KB of spills per thread), and a row's LayerNorm needs all of its
chunks first.

Without a CUDA GPU the same kernels run in Triton's interpreter, on CPU tensors: that is how the tests check
them against the PyTorch networks here. Only a GPU gives them speed.
"""
import os
import re
import subprocess
import tempfile

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
        """LayerNorm of a whole row tile [BM, NP] over its first N columns (the rest come out 0)."""
        cols = tl.arange(0, NP)
        keep = cols < N
        mean = tl.sum(y, 1) / N
        d = tl.where(keep[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + EPS)
        g = tl.load(g_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        return d * rstd[:, None] * g[None, :] + b[None, :]

    @triton.jit
    def _gemm(x_ptr, K: tl.constexpr, a_ptr, KA: tl.constexpr, KAP: tl.constexpr, w_ptr, wa_ptr, bias_ptr,
              N: tl.constexpr, dst, rows, row_ok, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
              PREC: tl.constexpr):
        """dst[rows, :N] = x[rows, :K] @ w[:K, :N] (+ a[rows, :KA] @ wa[:KA, :N]) + bias, fp32. Inputs have row
        strides K and KA, w and dst N. Small [BM, BK] x [BK, BN] tiles: registers stay free of spills."""
        dt = w_ptr.dtype.element_ty
        for n0 in tl.static_range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in tl.range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < K
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + ks[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc += tl.dot(x.to(dt), w, input_precision=PREC)
            if KA > 0:  # the first layer's action operand (KA <= KAP, one tile)
                ka = tl.arange(0, KAP)
                a = tl.load(a_ptr + rows[:, None] * KA + ka[None, :], mask=row_ok[:, None] & (ka < KA)[None, :],
                            other=0.0)
                wa = tl.load(wa_ptr + ka[:, None] * N + cols[None, :], mask=(ka < KA)[:, None] & col_ok[None, :],
                             other=0.0)
                acc += tl.dot(a.to(dt), wa, input_precision=PREC)
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(dst + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _norm_mish(src, dst, g_ptr, b_ptr, N: tl.constexpr, rows, row_ok, BM: tl.constexpr, BN: tl.constexpr,
                   EPS: tl.constexpr):
        """dst = Mish(LayerNorm(src)) over rows of N, chunk by chunk (mean, then variance, then the output)."""
        tl.debug_barrier()  # every thread's GEMM chunks are in src
        s = tl.zeros((BM,), dtype=tl.float32)
        for n0 in tl.static_range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            s += tl.sum(tl.load(src + rows[:, None] * N + cols[None, :], mask=row_ok[:, None] & (cols < N)[None, :],
                                other=0.0), 1)
        mean = s / N
        v = tl.zeros((BM,), dtype=tl.float32)
        for n0 in tl.static_range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            d = tl.where(ok, tl.load(src + rows[:, None] * N + cols[None, :], mask=ok, other=0.0) - mean[:, None], 0.0)
            v += tl.sum(d * d, 1)
        rstd = 1.0 / tl.sqrt(v / N + EPS)
        for n0 in tl.static_range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            y = tl.load(src + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
            g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = _mish((y - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :])
            tl.store(dst + rows[:, None] * N + cols[None, :], y, mask=ok)
        tl.debug_barrier()  # dst is whole before the next GEMM reads it, src read before it is overwritten

    @triton.jit
    def _mlp_kernel(x_ptr, a_ptr, task_ptr, head_ptr,
                    w0, wa0, b0, g0, e0, w1, b1, g1, e1, w2, b2, g2, e2, out_ptr, z_ptr, pre_ptr, act_ptr, M,
                    KX: tl.constexpr, KA: tl.constexpr, KAP: tl.constexpr, H: tl.constexpr, NO: tl.constexpr,
                    NL: tl.constexpr, NS: tl.constexpr, PW: tl.constexpr, TASKS: tl.constexpr, LATENT: tl.constexpr,
                    SIMNORM: tl.constexpr, DECODE: tl.constexpr, VMIN: tl.constexpr, VMAX: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr):
        """Head heads[j] of a stack of 3-layer MLPs on rows [x, a], output layers stacked NS wide. Head j == LATENT
        is a latent head (LayerNorm + SimNorm over its NL outputs -> z); the others give NO outputs -> out[j], or
        with DECODE their two-hot value. pre (fp32) and act (weights' type) hold this program's rows between
        layers: pre-activations [M, PW = max(H, NS)], activations [M, H]."""
        j = tl.program_id(1)
        head = tl.load(head_ptr + j)
        task = tl.load(task_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < M
        pre, act = pre_ptr + j * M * PW, act_ptr + j * M * H
        # layer 0: x @ W_z + a @ W_a + (bias + W_e e_task)
        _gemm(x_ptr, KX, a_ptr, KA, KAP, w0 + head * KX * H, wa0 + head * KA * H, b0 + (head * TASKS + task) * H,
              H, pre, rows, row_ok, BM, BK, BN, PREC)
        _norm_mish(pre, act, g0 + head * H, e0 + head * H, H, rows, row_ok, BM, BN, EPS)
        # layer 1
        _gemm(act, H, act, 0, 16, w1 + head * H * H, w1, b1 + head * H, H, pre, rows, row_ok, BM, BK, BN, PREC)
        _norm_mish(pre, act, g1 + head * H, e1 + head * H, H, rows, row_ok, BM, BN, EPS)
        # output layer: heads stacked NS wide (each head's weights beyond its width are 0)
        _gemm(act, H, act, 0, 16, w2 + head * H * NS, w2, b2 + head * NS, NS, pre, rows, row_ok, BM, BK, BN, PREC)
        tl.debug_barrier()
        cols = tl.arange(0, NS)
        y = tl.load(pre + rows[:, None] * NS + cols[None, :], mask=row_ok[:, None], other=0.0)
        if j == LATENT:
            y = _layer_norm(tl.where((cols < NL)[None, :], y, 0.0), g2, e2, NL, NS, EPS)
            y = tl.reshape(y, (BM, NS // SIMNORM, SIMNORM))  # groups past NL are padding, never stored
            g = tl.exp(y - tl.max(y, 2)[:, :, None])  # (names differ per branch: Triton types each once)
            y = tl.reshape(g / tl.sum(g, 2)[:, :, None], (BM, NS))
            tl.store(z_ptr + rows[:, None] * NL + cols[None, :], y, mask=row_ok[:, None] & (cols < NL)[None, :])
        else:
            if DECODE:  # two_hot_inv: softmax over NO symlog bins, expectation, symexp
                y = tl.where((cols < NO)[None, :], y, float("-inf"))
                p = tl.exp(y - tl.max(y, 1)[:, None])
                bins = VMIN + cols.to(tl.float32) * ((VMAX - VMIN) / (NO - 1))
                v = tl.sum(p * bins[None, :], 1) / tl.sum(p, 1)
                v = tl.where(v < 0, -1.0, 1.0) * (tl.exp(tl.abs(v)) - 1.0)
                tl.store(out_ptr + j * M + rows, v, mask=row_ok)
            else:
                tl.store(out_ptr + j * M * NO + rows[:, None] * NO + cols[None, :], y,
                         mask=row_ok[:, None] & (cols < NO)[None, :])


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
    n = _pow2(w.shape[1]) - w.shape[1]
    layers[-1] = (F.pad(w, (0, 0, 0, n)), F.pad(b, (0, n)), None, None)
    return layers


_PARAMS = ("w0", "wa0", "b0", "g0", "e0", "w1", "b1", "g1", "e1", "w2", "b2", "g2", "e2")
_INTS = ("KX", "KA", "KAP", "H", "NO", "NL", "NS", "PW", "TASKS", "LATENT", "SIMNORM", "DECODE", "BM", "BK", "BN")


# A custom op, so that torch.compile sees one opaque call (its fake below gives the shapes) whatever Triton
# version Dynamo would otherwise have to trace into; Inductor fuses the planner's glue around it.
@torch.library.custom_op("edge_tdmpc::triton_mlp", mutates_args=())
def triton_mlp(x: torch.Tensor, a: torch.Tensor, task: torch.Tensor, heads: torch.Tensor,
               params: list[torch.Tensor], ints: list[int], floats: list[float], prec: str,
               warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_mlp_kernel on rows x [M, KX], a [M, KA] for heads [n] -> (out [n, M] or [n, M, NO], z [M, NL])."""
    c = dict(zip(_INTS, ints))
    M, n, dev, dt = x.shape[0], heads.shape[0], x.device, params[5].dtype
    out = torch.empty(n, M, device=dev) if c["DECODE"] else torch.empty(n, M, c["NO"], device=dev, dtype=dt)
    z = torch.empty(M, c["NL"], device=dev, dtype=dt)
    pre = torch.empty(n, M, c["PW"], device=dev, dtype=torch.float32)
    act = torch.empty(n, M, c["H"], device=dev, dtype=dt)
    c["DECODE"] = bool(c["DECODE"])
    _mlp_kernel[(triton.cdiv(M, c["BM"]), n)](x, a, task, heads, *params, out, z, pre, act, M, **c,
                                              VMIN=floats[0], VMAX=floats[1], EPS=floats[2], PREC=prec,
                                              num_warps=warps)
    return out, z


@triton_mlp.register_fake
def _(x, a, task, heads, params, ints, floats, prec, warps):
    c = dict(zip(_INTS, ints))
    M, n, dt = x.shape[0], heads.shape[0], params[5].dtype
    out = x.new_empty(n, M, dtype=torch.float32) if c["DECODE"] else x.new_empty(n, M, c["NO"], dtype=dt)
    return out, x.new_empty(M, c["NL"], dtype=dt)


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

    def forward(self, x, a=None, task=None, heads=None):
        """x [..., z_dim], a [..., a_dim] -> (out [n, ..., out_dim], or [n, ..., 1] values with `decode`;
        z [..., latent_dim] when there is a latent head), n = len(heads), all heads by default."""
        lead, dev = x.shape[:-1], x.device
        x = x.reshape(-1, self.z_dim).contiguous()
        a = x if a is None else a.reshape(-1, self.a_dim).contiguous()
        task = torch.zeros(1, dtype=torch.long, device=dev) if task is None or self.tasks == 1 else (
            torch.tensor([task], device=dev) if isinstance(task, int) else task.reshape(-1)[:1].long())
        sel = self.all_heads if heads is None else heads.reshape(-1).long()
        n, c = sel.shape[0], self._constants()
        out, z = triton_mlp(x, a, task, sel, [getattr(self, p) for p in _PARAMS], [int(c[k]) for k in _INTS],
                            [c["VMIN"], c["VMAX"], c["EPS"]], c["PREC"], self.WARPS)
        out = out.reshape(n, *lead, 1 if self.decode else self.out_dim)
        return (out, z.reshape(*lead, self.latent_dim)) if self.latent >= 0 else out

    def _constants(self):
        _, vmin, vmax = self.decode or (self.out_dim, 0.0, 0.0)
        return dict(KX=self.z_dim, KA=self.a_dim, KAP=_pow2(max(self.a_dim, 1)), H=self.hidden, NO=self.out_dim,
                    NL=self.latent_dim, NS=self.stacked, PW=max(self.hidden, self.stacked), TASKS=self.tasks,
                    LATENT=self.latent, SIMNORM=self.simnorm or 1, DECODE=bool(self.decode), VMIN=float(vmin),
                    VMAX=float(vmax), BM=self.BM, BK=self.BK, BN=self.BN, EPS=1e-5,
                    PREC="ieee" if self.w1.dtype == torch.float32 else "tf32")  # fp32 without TF32 rounding;
        # "tf32" is Triton's default for every dot and means nothing to fp16/bf16 operands

    def ptxas_report(self, arch: int) -> dict:
        """Compile this launch for an NVIDIA GPU of compute capability `arch` (90: H100/H200, 87: Jetson Orin)
        without one: registers and spills per thread from Triton's own ptxas, shared memory per program."""
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource
        if not isinstance(_mlp_kernel, triton.runtime.JITFunction):
            raise RuntimeError("kernels are in Triton's interpreter: set TRITON_INTERPRET=0 before importing")
        ty = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}
        dt, f32, i64 = self.w1.dtype, torch.float32, torch.int64
        ptrs = dict(x_ptr=dt, a_ptr=f32 if self.a_dim else dt, task_ptr=i64, head_ptr=i64, w0=dt, wa0=dt,
                    b0=dt, g0=dt, e0=dt, w1=dt, b1=dt, g1=dt, e1=dt, w2=dt, b2=dt, g2=dt, e2=dt,
                    out_ptr=f32 if self.decode else dt, z_ptr=dt, pre_ptr=f32, act_ptr=dt)
        consts = self._constants()
        signature = {k: ty[v] for k, v in ptrs.items()} | {"M": "i32"} | {k: "constexpr" for k in consts}
        names = _mlp_kernel.arg_names
        src = ASTSource(_mlp_kernel, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=self.WARPS))
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "mlp.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                                  ptx, "-o", os.path.join(tmp, "mlp.cubin")], capture_output=True, text=True,
                                 check=True).stderr
        num = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
        return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                    spill_loads=num(r"(\d+) bytes spill loads"), shared=kernel.metadata.shared)


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
        z, a, two_hot = c.latent_dim, c.action_dim, (c.num_bins, c.vmin, c.vmax)
        m._k_rollout = TritonMLP([m._reward, m._dynamics], z, a, emb, decode=two_hot)  # one launch per step
        m._k_next = TritonMLP([m._dynamics], z, a, emb)
        m._k_pi = TritonMLP([m._pi], z, 0, emb)
        m._k_Q = TritonMLP(m._Qs, z, a, emb, decode=two_hot)
        return m

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
    """GPU: one rollout step, Q and policy head as Triton launches vs the PyTorch networks (eager and
    torch.compile'd), per rows-per-program BM - the per-kernel numbers behind the planning step's latency."""
    import argparse

    from edge_tdmpc.checkpoint import load_model
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

    calls = lambda m: {"rollout_step": lambda: m.rollout_step(z, a, task),  # noqa: E731
                       "Q avg": lambda: m.Q(z, a, task, "avg", qidx=heads), "pi head": lambda: m.pi_head(z, task)}
    rows = {"torch eager": calls(ref)}
    compiled = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in calls(ref).items()}
    rows["torch.compile"] = compiled
    for bm, warps in ((16, 4), (32, 8), (64, 8)):  # without spills on sm_90 (ptxas_report); 64 rows on 4
        m = TritonWorldModel.of(ref)             # warps spill 3 KB per thread
        for k in ("_k_rollout", "_k_pi", "_k_Q"):
            getattr(m, k).BM, getattr(m, k).WARPS = bm, warps
        rows[f"triton {bm}x{warps}w"] = calls(m)
    print(f"{args.rows} rows, {args.precision}, {torch.cuda.get_device_name()}: us per call (CUDA graph replay)")
    for name, fns in rows.items():
        print(f"{name:16s}" + "".join(f"  {k} {time_us(f):7.1f}" for k, f in fns.items()))

