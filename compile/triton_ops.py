"""The Triton kernels behind `kernels.py`, and their launches as torch custom ops.

Device code only: a whole TD-MPC2 MLP per program (`mlp_kernel`), the policy-prior trajectories
(`pi_rollout_kernel`), the horizon's value (`value_kernel`) and one MPPI update (`mppi_kernel`). Each
launch is a custom op with a fake for shapes, so torch.compile sees one opaque call and never traces into
Triton; Inductor fuses the glue around them. `ptxas` compiles a kernel for a GPU architecture without a
GPU, for its register and spill counts.

Without a CUDA GPU the kernels run in Triton's interpreter, on CPU tensors.
"""
import os
import re
import subprocess
import tempfile

import torch

if not torch.cuda.is_available():  # read by each @triton.jit, Triton's own included: before `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:  # the runtime that needs it says so (see kernels.TritonWorldModel.of)
    triton = None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run in Triton's interpreter, on the CPU


def dot_precision(dtype):
    # fp32 without TF32 rounding; "tf32" is Triton's default for every dot and means nothing to fp16/bf16
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n, floor=16):  # tl.arange and tl.dot want power-of-two extents, tl.dot at least 16
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
    def _gemm(x_ptr, K: tl.constexpr, XS: tl.constexpr, a_ptr, KA: tl.constexpr, KAP: tl.constexpr, w_ptr,
              wa_ptr, bias_ptr, N: tl.constexpr, dst, rows, row_ok, BM: tl.constexpr, BK: tl.constexpr,
              BN: tl.constexpr, PREC: tl.constexpr):
        """dst[rows, :N] = x[rows, :K] @ w[:K, :N] (+ a[rows, :KA] @ wa[:KA, :N]) + bias, fp32. Inputs have row
        strides XS (0: one row broadcast) and KA, w and dst N. Small [BM, BK] x [BK, BN] tiles: registers stay
        free of spills."""
        dt = w_ptr.dtype.element_ty
        for n0 in tl.static_range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in tl.range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < K
                x = tl.load(x_ptr + rows[:, None] * XS + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
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
    def _mlp_layers(x_ptr, KX: tl.constexpr, XS: tl.constexpr, a_ptr, KA: tl.constexpr, KAP: tl.constexpr, task, head,
                    w0, wa0, b0, g0, e0, w1, b1, g1, e1, w2, b2, pre, act, rows, row_ok, H: tl.constexpr,
                    NS: tl.constexpr, TASKS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr, EPS: tl.constexpr):
        """Head `head` of a stack of 3-layer MLPs on rows [x, a] -> its output layer's pre-activations in
        pre[rows, :NS] (fp32, output layers stacked NS wide). act (weights' type) holds the hidden rows."""
        # layer 0: x @ W_z + a @ W_a + (bias + W_e e_task)
        _gemm(x_ptr, KX, XS, a_ptr, KA, KAP, w0 + head * KX * H, wa0 + head * KA * H, b0 + (head * TASKS + task) * H,
              H, pre, rows, row_ok, BM, BK, BN, PREC)
        _norm_mish(pre, act, g0 + head * H, e0 + head * H, H, rows, row_ok, BM, BN, EPS)
        # layer 1
        _gemm(act, H, H, act, 0, 16, w1 + head * H * H, w1, b1 + head * H, H, pre, rows, row_ok, BM, BK, BN, PREC)
        _norm_mish(pre, act, g1 + head * H, e1 + head * H, H, rows, row_ok, BM, BN, EPS)
        # output layer: heads stacked NS wide (each head's weights beyond its width are 0)
        _gemm(act, H, H, act, 0, 16, w2 + head * H * NS, w2, b2 + head * NS, NS, pre, rows, row_ok, BM, BK, BN, PREC)
        tl.debug_barrier()

    @triton.jit
    def _two_hot_inv(y, cols, NO: tl.constexpr, VMIN: tl.constexpr, VMAX: tl.constexpr):
        """Logits [BM, >= NO] -> values [BM]: softmax over NO symlog bins, expectation, symexp."""
        y = tl.where((cols < NO)[None, :], y, float("-inf"))
        p = tl.exp(y - tl.max(y, 1)[:, None])
        bins = VMIN + cols.to(tl.float32) * ((VMAX - VMIN) / (NO - 1))
        v = tl.sum(p * bins[None, :], 1) / tl.sum(p, 1)
        return tl.where(v < 0, -1.0, 1.0) * (tl.exp(tl.abs(v)) - 1.0)

    @triton.jit
    def _discount(gamma_ptr, STEP: tl.constexpr):
        d = 1.0
        for _ in tl.static_range(STEP):  # gamma^t as the reference forms it: one product per step
            d = d * tl.load(gamma_ptr)
        return d

    @triton.jit
    def _latent_head(y, g2, e2, NL: tl.constexpr, NS: tl.constexpr, SIMNORM: tl.constexpr, BM: tl.constexpr,
                     EPS: tl.constexpr):
        """A latent head's pre-activations [BM, NS] -> LayerNorm over NL, then SimNorm (softmax per group)."""
        cols = tl.arange(0, NS)
        y = _layer_norm(tl.where((cols < NL)[None, :], y, 0.0), g2, e2, NL, NS, EPS)
        y = tl.reshape(y, (BM, NS // SIMNORM, SIMNORM))  # groups past NL are padding, never stored
        g = tl.exp(y - tl.max(y, 2)[:, :, None])
        return tl.reshape(g / tl.sum(g, 2)[:, :, None], (BM, NS))

    @triton.jit
    def mlp_kernel(x_ptr, a_ptr, task_ptr, head_ptr,
                   w0, wa0, b0, g0, e0, w1, b1, g1, e1, w2, b2, g2, e2, out_ptr, z_ptr, pre_ptr, act_ptr, M,
                   g_ptr, gamma_ptr,
                   KX: tl.constexpr, XS: tl.constexpr, KA: tl.constexpr, KAP: tl.constexpr, H: tl.constexpr,
                   NO: tl.constexpr, NL: tl.constexpr, NS: tl.constexpr, PW: tl.constexpr, TASKS: tl.constexpr,
                   LATENT: tl.constexpr, SIMNORM: tl.constexpr, DECODE: tl.constexpr, STEP: tl.constexpr,
                   VMIN: tl.constexpr, VMAX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr, EPS: tl.constexpr):
        """Head heads[j] of a stack of 3-layer MLPs on rows [x, a]. Head j == LATENT is a latent head (LayerNorm
        + SimNorm over its NL outputs -> z); the others give NO outputs -> out[j], or with DECODE their two-hot
        value; at step STEP > 0 of a rollout, the return so far: out = g + gamma^STEP * value.
        pre (fp32) and act hold this program's rows between layers: [M, PW = max(H, NS)] and [M, H]."""
        j = tl.program_id(1)
        head = tl.load(head_ptr + j)
        task = tl.load(task_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < M
        pre, act = pre_ptr + j * M * PW, act_ptr + j * M * H
        _mlp_layers(x_ptr, KX, XS, a_ptr, KA, KAP, task, head, w0, wa0, b0, g0, e0, w1, b1, g1, e1, w2, b2, pre, act,
                    rows, row_ok, H, NS, TASKS, BM, BK, BN, PREC, EPS)
        cols = tl.arange(0, NS)
        y = tl.load(pre + rows[:, None] * NS + cols[None, :], mask=row_ok[:, None], other=0.0)
        if j == LATENT:
            y = _latent_head(y, g2, e2, NL, NS, SIMNORM, BM, EPS)
            tl.store(z_ptr + rows[:, None] * NL + cols[None, :], y, mask=row_ok[:, None] & (cols < NL)[None, :])
        else:
            if DECODE:
                v = _two_hot_inv(y, cols, NO, VMIN, VMAX)
                if STEP > 0:
                    v = tl.load(g_ptr + rows, mask=row_ok, other=0.0) + _discount(gamma_ptr, STEP) * v
                tl.store(out_ptr + j * M + rows, v, mask=row_ok)
            else:
                tl.store(out_ptr + j * M * NO + rows[:, None] * NO + cols[None, :], y,
                         mask=row_ok[:, None] & (cols < NO)[None, :])

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(x, 20.0)) + 1.0)  # tanh(20) is 1 in fp32; no inf

    @triton.jit
    def _pi_sample(pre, rows, ok, eps_ptr, mask_ptr, task, dt: tl.constexpr, A: tl.constexpr, AP: tl.constexpr,
                   NSP: tl.constexpr, LOG_STD_MIN: tl.constexpr, LOG_STD_DIF: tl.constexpr):
        """The policy head's output rows (mean | log_std, in the weights' type dt as the PyTorch head leaves
        them) -> the sampled action tanh(mean + eps * std) [BM, AP], fp32; a task's unused dims come out 0."""
        ac = tl.arange(0, AP)
        mu = tl.load(pre + rows[:, None] * NSP + ac[None, :], mask=ok, other=0.0).to(dt).to(tl.float32)
        ls = tl.load(pre + rows[:, None] * NSP + A + ac[None, :], mask=ok, other=0.0).to(dt).to(tl.float32)
        m = tl.load(mask_ptr + task * A + ac, mask=ac < A, other=0.0)[None, :]
        log_std = (LOG_STD_MIN + 0.5 * LOG_STD_DIF * (_tanh(ls) + 1.0)) * m
        eps = tl.load(eps_ptr + rows[:, None] * A + ac[None, :], mask=ok, other=0.0) * m
        return _tanh(mu * m + eps * tl.exp(log_std))

    @triton.jit
    def pi_rollout_kernel(z_ptr, eps_ptr, mask_ptr, task_ptr,
                          pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1, pw2, pb2,
                          dw0, dwa0, db0, dg0, de0, dw1, db1, dg1, de1, dw2, db2, dg2, de2,
                          actions_ptr, zs_ptr, pre_ptr, act_ptr, M,
                          KX: tl.constexpr, XS: tl.constexpr, A: tl.constexpr, AP: tl.constexpr, H: tl.constexpr,
                          NSP: tl.constexpr, NSD: tl.constexpr, SIMNORM: tl.constexpr, TASKS: tl.constexpr,
                          HZ: tl.constexpr, LOG_STD_MIN: tl.constexpr, LOG_STD_DIF: tl.constexpr, BM: tl.constexpr,
                          BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr):
        """The policy-prior trajectories for a block of rows, all HZ steps in one program: a_t ~ pi(z_t) with
        noise eps[t] -> actions[t]; z_t+1 = dynamics(z_t, a_t) through this program's scratch rows zs."""
        task = tl.load(task_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < M
        ac = tl.arange(0, AP)
        ok = row_ok[:, None] & (ac < A)[None, :]
        cols = tl.arange(0, NSD)
        # the start latent into this program's scratch rows (XS 0: one row broadcast to all)
        z = tl.load(z_ptr + rows[:, None] * XS + cols[None, :], mask=row_ok[:, None] & (cols < KX)[None, :])
        tl.store(zs_ptr + rows[:, None] * KX + cols[None, :], z, mask=row_ok[:, None] & (cols < KX)[None, :])
        tl.debug_barrier()
        for t in tl.static_range(HZ):
            _mlp_layers(zs_ptr, KX, KX, zs_ptr, 0, 16, task, 0, pw0, pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1, pw2, pb2,
                        pre_ptr, act_ptr, rows, row_ok, H, NSP, TASKS, BM, BK, BN, PREC, EPS)
            a = _pi_sample(pre_ptr, rows, ok, eps_ptr + t * M * A, mask_ptr, task, pw1.dtype.element_ty, A, AP, NSP,
                           LOG_STD_MIN, LOG_STD_DIF)
            tl.store(actions_ptr + t * M * A + rows[:, None] * A + ac[None, :], a, mask=ok)
            tl.debug_barrier()
            if t < HZ - 1:
                _mlp_layers(zs_ptr, KX, KX, actions_ptr + t * M * A, A, AP, task, 0, dw0, dwa0, db0, dg0, de0, dw1,
                            db1, dg1, de1, dw2, db2, pre_ptr, act_ptr, rows, row_ok, H, NSD, TASKS, BM, BK, BN, PREC,
                            EPS)
                y = tl.load(pre_ptr + rows[:, None] * NSD + cols[None, :], mask=row_ok[:, None], other=0.0)
                y = _latent_head(y, dg2, de2, KX, NSD, SIMNORM, BM, EPS)
                tl.store(zs_ptr + rows[:, None] * KX + cols[None, :], y, mask=row_ok[:, None] & (cols < KX)[None, :])
                tl.debug_barrier()

    @triton.jit
    def value_kernel(z_ptr, g_ptr, gamma_ptr, eps_ptr, mask_ptr, task_ptr, qidx_ptr,
                     pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1, pw2, pb2,
                     qw0, qwa0, qb0, qg0, qe0, qw1, qb1, qg1, qe1, qw2, qb2,
                     value_ptr, a_ptr, pre, act, M,
                     KX: tl.constexpr, A: tl.constexpr, AP: tl.constexpr, H: tl.constexpr, NSP: tl.constexpr,
                     NSQ: tl.constexpr, NO: tl.constexpr, TASKS: tl.constexpr,
                     STEP: tl.constexpr, LOG_STD_MIN: tl.constexpr, LOG_STD_DIF: tl.constexpr, VMIN: tl.constexpr,
                     VMAX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr, EPS: tl.constexpr):
        """The end of estimate_value for a block of rows, in one program: a ~ pi(z_H) (policy head, squashed
        Gaussian with noise eps), Q_avg(z_H, a) over the 2 heads q_idx names, value = g + gamma^H Q_avg,
        nan_to_num(0). a (fp32) goes from the policy to the Q heads through this program's scratch rows."""
        task = tl.load(task_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < M
        # policy head: mean | log_std, in the weights' type as the PyTorch head leaves them
        _mlp_layers(z_ptr, KX, KX, z_ptr, 0, 16, task, 0, pw0, pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1, pw2, pb2,
                    pre, act, rows, row_ok, H, NSP, TASKS, BM, BK, BN, PREC, EPS)
        ac = tl.arange(0, AP)
        ok = row_ok[:, None] & (ac < A)[None, :]
        a = _pi_sample(pre, rows, ok, eps_ptr, mask_ptr, task, pw1.dtype.element_ty, A, AP, NSP, LOG_STD_MIN,
                       LOG_STD_DIF)
        tl.store(a_ptr + rows[:, None] * A + ac[None, :], a, mask=ok)
        tl.debug_barrier()  # a and the scratch rows are free for the Q heads
        cols = tl.arange(0, NSQ)
        q = tl.zeros((BM,), dtype=tl.float32)
        for k in tl.static_range(2):
            _mlp_layers(z_ptr, KX, KX, a_ptr, A, AP, task, tl.load(qidx_ptr + k), qw0, qwa0, qb0, qg0, qe0, qw1, qb1,
                        qg1, qe1, qw2, qb2, pre, act, rows, row_ok, H, NSQ, TASKS, BM, BK, BN, PREC, EPS)
            y = tl.load(pre + rows[:, None] * NSQ + cols[None, :], mask=row_ok[:, None], other=0.0)
            q += _two_hot_inv(y, cols, NO, VMIN, VMAX)
            tl.debug_barrier()
        v = tl.load(g_ptr + rows, mask=row_ok, other=0.0) + _discount(gamma_ptr, STEP) * (q / 2.0)
        v = tl.minimum(tl.maximum(tl.where(v != v, 0.0, v), -3.4028234663852886e38), 3.4028234663852886e38)
        tl.store(value_ptr + rows, v, mask=row_ok)

    @triton.jit
    def mppi_kernel(value_ptr, actions_ptr, mask_ptr, mean_ptr, std_ptr, elite_ptr, elite_value_ptr, score_ptr,
                    S: tl.constexpr, SP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HZ: tl.constexpr,
                    A: tl.constexpr, AP: tl.constexpr, TEMPERATURE: tl.constexpr, MIN_STD: tl.constexpr,
                    MAX_STD: tl.constexpr):
        """One MPPI update in one program: the top-K of S values (ties to the lower index), their softmax
        scores at the temperature, and the score-weighted mean and std of the elite actions per step."""
        i = tl.arange(0, SP)
        v = tl.load(value_ptr + i, mask=i < S, other=0.0)
        # sort keys: the value's bits made order-preserving as int32, the index below them
        bits = v.to(tl.int32, bitcast=True)
        key = (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) << 32) | (SP - 1 - i).to(tl.int64)
        key = tl.where(i < S, key, -9223372036854775807 - 1)
        k = tl.arange(0, KP)
        idx = SP - 1 - (tl.topk(key, KP) & 0xFFFFFFFF)  # largest first, as torch.topk
        k_ok = k < K
        ev = tl.load(value_ptr + idx, mask=k_ok, other=float("-inf"))
        score = tl.where(k_ok, tl.exp(TEMPERATURE * (ev - tl.max(ev, 0))), 0.0)
        score = score / tl.sum(score, 0)
        norm = tl.sum(score, 0) + 1e-9
        tl.store(elite_value_ptr + k, ev, mask=k_ok)
        tl.store(score_ptr + k, score, mask=k_ok)
        ac = tl.arange(0, AP)
        ok = k_ok[:, None] & (ac < A)[None, :]
        m = tl.load(mask_ptr + ac, mask=ac < A, other=0.0)
        for h in tl.static_range(HZ):
            ea = tl.load(actions_ptr + h * S * A + idx[:, None] * A + ac[None, :], mask=ok, other=0.0)
            mean = tl.sum(score[:, None] * ea, 0) / norm
            d = tl.where(ok, ea - mean[None, :], 0.0)
            std = tl.sqrt(tl.sum(score[:, None] * d * d, 0) / norm)
            std = tl.minimum(tl.maximum(std, MIN_STD), MAX_STD) * m
            tl.store(mean_ptr + h * A + ac, mean * m, mask=ac < A)
            tl.store(std_ptr + h * A + ac, std, mask=ac < A)
            tl.store(elite_ptr + h * K * A + k[:, None] * A + ac[None, :], ea, mask=ok)


MLP_PARAMS = ("w0", "wa0", "b0", "g0", "e0", "w1", "b1", "g1", "e1", "w2", "b2", "g2", "e2")
MLP_INTS = ("KX", "XS", "KA", "KAP", "H", "NO", "NL", "NS", "PW", "TASKS", "LATENT", "SIMNORM", "DECODE", "STEP",
            "BM", "BK", "BN")


# Custom ops, so that torch.compile sees one opaque call per launch (the fakes give the shapes) whatever Triton
# version Dynamo would otherwise have to trace into.
@torch.library.custom_op("edge_tdmpc::triton_mlp", mutates_args=())
def triton_mlp(x: torch.Tensor, a: torch.Tensor, task: torch.Tensor, heads: torch.Tensor,
               params: list[torch.Tensor], g: torch.Tensor, gamma: torch.Tensor, ints: list[int],
               floats: list[float], prec: str, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mlp_kernel on rows x [M, KX], a [M, KA] for heads [n] -> (out [n, M] or [n, M, NO], z [M, NL]); with
    STEP > 0 the decoded head's out is g [M] + gamma^STEP * its value."""
    c = dict(zip(MLP_INTS, ints))
    M, n, dev, dt = x.shape[0], heads.shape[0], x.device, params[5].dtype
    out = torch.empty(n, M, device=dev) if c["DECODE"] else torch.empty(n, M, c["NO"], device=dev, dtype=dt)
    z = torch.empty(M, c["NL"], device=dev, dtype=dt)
    pre = torch.empty(n, M, c["PW"], device=dev, dtype=torch.float32)
    act = torch.empty(n, M, c["H"], device=dev, dtype=dt)
    c["DECODE"] = bool(c["DECODE"])
    mlp_kernel[(triton.cdiv(M, c["BM"]), n)](x, a, task, heads, *params, out, z, pre, act, M, g, gamma, **c,
                                             VMIN=floats[0], VMAX=floats[1], EPS=floats[2], PREC=prec,
                                             num_warps=warps)
    return out, z


@triton_mlp.register_fake
def _(x, a, task, heads, params, g, gamma, ints, floats, prec, warps):
    c = dict(zip(MLP_INTS, ints))
    M, n, dt = x.shape[0], heads.shape[0], params[5].dtype
    out = x.new_empty(n, M, dtype=torch.float32) if c["DECODE"] else x.new_empty(n, M, c["NO"], dtype=dt)
    return out, x.new_empty(M, c["NL"], dtype=dt)


# --- the policy trajectories, the value and the MPPI update, each one launch ---------------------------
PI_PARAMS = ("w0", "b0", "g0", "e0", "w1", "b1", "g1", "e1", "w2", "b2")
Q_PARAMS = ("w0", "wa0", "b0", "g0", "e0", "w1", "b1", "g1", "e1", "w2", "b2")
VALUE_INTS = ("KX", "A", "AP", "H", "NSP", "NSQ", "NO", "TASKS", "STEP", "BM", "BK", "BN")
ROLLOUT_INTS = ("KX", "XS", "A", "AP", "H", "NSP", "NSD", "SIMNORM", "TASKS", "HZ", "BM", "BK", "BN")
MPPI_INTS = ("S", "SP", "K", "KP", "HZ", "A", "AP")


@torch.library.custom_op("edge_tdmpc::triton_pi_rollout", mutates_args=())
def triton_pi_rollout(z: torch.Tensor, eps: torch.Tensor, masks: torch.Tensor, task: torch.Tensor,
                      params: list[torch.Tensor], ints: list[int], floats: list[float], prec: str,
                      warps: int) -> torch.Tensor:
    """pi_rollout_kernel: latents z [M, KX] (row stride XS), noise eps [HZ, M, A] -> actions [HZ, M, A]."""
    c = dict(zip(ROLLOUT_INTS, ints))
    M, dev, dt = z.shape[0], z.device, params[4].dtype
    actions = torch.empty(c["HZ"], M, c["A"], device=dev)
    zs = torch.empty(M, c["KX"], device=dev, dtype=dt)
    pre = torch.empty(M, max(c["H"], c["NSP"], c["NSD"]), device=dev)
    act = torch.empty(M, c["H"], device=dev, dtype=dt)
    pi_rollout_kernel[(triton.cdiv(M, c["BM"]),)](z, eps, masks, task, *params, actions, zs, pre, act, M, **c,
                                                  LOG_STD_MIN=floats[0], LOG_STD_DIF=floats[1], EPS=floats[2],
                                                  PREC=prec, num_warps=warps)
    return actions


@triton_pi_rollout.register_fake
def _(z, eps, masks, task, params, ints, floats, prec, warps):
    return eps.new_empty(eps.shape, dtype=torch.float32)


@torch.library.custom_op("edge_tdmpc::triton_value", mutates_args=())
def triton_value(z: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, eps: torch.Tensor, masks: torch.Tensor,
                 task: torch.Tensor, q_idx: torch.Tensor, params: list[torch.Tensor], ints: list[int],
                 floats: list[float], prec: str, warps: int) -> torch.Tensor:
    """value_kernel: rows z [M, KX] at the horizon, return so far g [M] -> values [M] (fp32)."""
    c = dict(zip(VALUE_INTS, ints))
    M, dev, dt = z.shape[0], z.device, params[4].dtype
    value = torch.empty(M, device=dev)
    a = torch.empty(M, c["A"], device=dev)
    pre = torch.empty(M, max(c["H"], c["NSP"], c["NSQ"]), device=dev)
    act = torch.empty(M, c["H"], device=dev, dtype=dt)
    value_kernel[(triton.cdiv(M, c["BM"]),)](z, g, gamma, eps, masks, task, q_idx, *params, value, a, pre, act, M,
                                             **c, LOG_STD_MIN=floats[0], LOG_STD_DIF=floats[1], VMIN=floats[2],
                                             VMAX=floats[3], EPS=floats[4], PREC=prec, num_warps=warps)
    return value


@triton_value.register_fake
def _(z, g, gamma, eps, masks, task, q_idx, params, ints, floats, prec, warps):
    return z.new_empty(z.shape[0], dtype=torch.float32)


@torch.library.custom_op("edge_tdmpc::triton_mppi", mutates_args=())
def triton_mppi(value: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, ints: list[int],
                floats: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mppi_kernel: values [S], actions [HZ, S, A] -> mean, std [HZ, A], elite actions [HZ, K, A], elite
    values [K], scores [K]."""
    c = dict(zip(MPPI_INTS, ints))
    HZ, K, A, dev = c["HZ"], c["K"], c["A"], value.device
    mean, std, elite = torch.empty(HZ, A, device=dev), torch.empty(HZ, A, device=dev), torch.empty(HZ, K, A, device=dev)
    elite_value, score = torch.empty(K, device=dev), torch.empty(K, device=dev)
    mppi_kernel[(1,)](value, actions, mask, mean, std, elite, elite_value, score, **c, TEMPERATURE=floats[0],
                       MIN_STD=floats[1], MAX_STD=floats[2], num_warps=4)
    return mean, std, elite, elite_value, score


@triton_mppi.register_fake
def _(value, actions, mask, ints, floats):
    c = dict(zip(MPPI_INTS, ints))
    HZ, K, A = c["HZ"], c["K"], c["A"]
    new = lambda *shape: value.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    return new(HZ, A), new(HZ, A), new(HZ, K, A), new(K), new(K)


def ptxas(kernel, args: dict, consts: dict, warps: int, arch: int) -> dict:
    """Compile `kernel` (pointer args by element dtype, scalars by Triton type, constexprs by value) for
    sm_`arch` and read registers, spills and shared memory per program from Triton's own ptxas."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernels are in Triton's interpreter: set TRITON_INTERPRET=0 before importing")
    ty = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}
    signature = {k: ty.get(v, v) for k, v in args.items()} | {k: "constexpr" for k in consts}
    names = kernel.arg_names
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", ptx,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True,
                             check=True).stderr
    num = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), shared=compiled.metadata.shared)
