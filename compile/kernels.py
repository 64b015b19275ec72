"""The planner's MLPs as Triton kernels: one launch runs a whole TD-MPC2 MLP (or the chosen Q heads), and
the MPPI iteration's value and update as a few launches.

Why: a CUDA-graphed planning step costs about one kernel's latency (a few microseconds) per op, and
torch-compile still runs each layer as a GEMM kernel plus a LayerNorm/Mish kernel: ~50 launches per MPPI
iteration, 1.8 ms a step on an H200 against the 0.5 ms goal. Here one program takes a block of rows through
all three layers - Linear -> LayerNorm -> Mish twice, then the head (plus LayerNorm -> SimNorm for a latent) -
and a second grid axis runs networks side by side: a rollout step (reward and dynamics) is one launch, and so
is the Q value (both heads q_idx picks, read on the device), with the two-hot decode done in the kernel.
Exact rewrites, as in the ONNX graph: the task embedding's share of the first layer is a per-task bias row,
and the first layer takes z and a as two operands (no concatenation).

Per MPPI iteration the rest is fused too, so that no elementwise glue is left between the launches: each
rollout step adds its discounted reward to the return in the kernel, one program per row block runs the
horizon's policy -> squashed-Gaussian sample -> 2 Q heads -> value, and one program does the MPPI update
(top-k by a bitonic sort of (value, index) keys, the scores, the elites' mean and std).

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


def _prec(dtype):
    # fp32 without TF32 rounding; "tf32" is Triton's default for every dot and means nothing to fp16/bf16
    return "ieee" if dtype == torch.float32 else "tf32"


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
    def _mlp_kernel(x_ptr, a_ptr, task_ptr, head_ptr,
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
    def _pi_rollout_kernel(z_ptr, eps_ptr, mask_ptr, task_ptr,
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
        for t in tl.static_range(HZ):
            if t == 0:  # the encoded latent, read in place (XS 0: one row for all)
                _mlp_layers(z_ptr, KX, XS, z_ptr, 0, 16, task, 0, pw0, pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1, pw2,
                            pb2, pre_ptr, act_ptr, rows, row_ok, H, NSP, TASKS, BM, BK, BN, PREC, EPS)
            else:
                _mlp_layers(zs_ptr, KX, KX, zs_ptr, 0, 16, task, 0, pw0, pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1,
                            pw2, pb2, pre_ptr, act_ptr, rows, row_ok, H, NSP, TASKS, BM, BK, BN, PREC, EPS)
            a = _pi_sample(pre_ptr, rows, ok, eps_ptr + t * M * A, mask_ptr, task, pw1.dtype.element_ty, A, AP, NSP,
                           LOG_STD_MIN, LOG_STD_DIF)
            tl.store(actions_ptr + t * M * A + rows[:, None] * A + ac[None, :], a, mask=ok)
            tl.debug_barrier()
            if t < HZ - 1:
                if t == 0:
                    _mlp_layers(z_ptr, KX, XS, actions_ptr, A, AP, task, 0, dw0, dwa0, db0, dg0, de0, dw1, db1, dg1,
                                de1, dw2, db2, pre_ptr, act_ptr, rows, row_ok, H, NSD, TASKS, BM, BK, BN, PREC, EPS)
                else:
                    _mlp_layers(zs_ptr, KX, KX, actions_ptr + t * M * A, A, AP, task, 0, dw0, dwa0, db0, dg0, de0,
                                dw1, db1, dg1, de1, dw2, db2, pre_ptr, act_ptr, rows, row_ok, H, NSD, TASKS, BM, BK,
                                BN, PREC, EPS)
                y = tl.load(pre_ptr + rows[:, None] * NSD + cols[None, :], mask=row_ok[:, None], other=0.0)
                y = _latent_head(y, dg2, de2, KX, NSD, SIMNORM, BM, EPS)
                tl.store(zs_ptr + rows[:, None] * KX + cols[None, :], y, mask=row_ok[:, None] & (cols < KX)[None, :])
                tl.debug_barrier()

    @triton.jit
    def _value_kernel(z_ptr, g_ptr, gamma_ptr, eps_ptr, mask_ptr, task_ptr, qidx_ptr,
                      pw0, pb0, pg0, pe0, pw1, pb1, pg1, pe1, pw2, pb2,
                      qw0, qwa0, qb0, qg0, qe0, qw1, qb1, qg1, qe1, qw2, qb2,
                      value_ptr, a_ptr, pre_ptr, act_ptr, M,
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
        pre, act = pre_ptr, act_ptr
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
    def _mppi_kernel(value_ptr, actions_ptr, mask_ptr, mean_ptr, std_ptr, elite_ptr, elite_value_ptr, score_ptr,
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
_INTS = ("KX", "XS", "KA", "KAP", "H", "NO", "NL", "NS", "PW", "TASKS", "LATENT", "SIMNORM", "DECODE", "STEP", "BM",
         "BK", "BN")


# A custom op, so that torch.compile sees one opaque call (its fake below gives the shapes) whatever Triton
# version Dynamo would otherwise have to trace into; Inductor fuses the planner's glue around it.
@torch.library.custom_op("edge_tdmpc::triton_mlp", mutates_args=())
def triton_mlp(x: torch.Tensor, a: torch.Tensor, task: torch.Tensor, heads: torch.Tensor,
               params: list[torch.Tensor], g: torch.Tensor, gamma: torch.Tensor, ints: list[int],
               floats: list[float], prec: str, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_mlp_kernel on rows x [M, KX], a [M, KA] for heads [n] -> (out [n, M] or [n, M, NO], z [M, NL]); with
    STEP > 0 the decoded head's out is g [M] + gamma^STEP * its value."""
    c = dict(zip(_INTS, ints))
    M, n, dev, dt = x.shape[0], heads.shape[0], x.device, params[5].dtype
    out = torch.empty(n, M, device=dev) if c["DECODE"] else torch.empty(n, M, c["NO"], device=dev, dtype=dt)
    z = torch.empty(M, c["NL"], device=dev, dtype=dt)
    pre = torch.empty(n, M, c["PW"], device=dev, dtype=torch.float32)
    act = torch.empty(n, M, c["H"], device=dev, dtype=dt)
    c["DECODE"] = bool(c["DECODE"])
    _mlp_kernel[(triton.cdiv(M, c["BM"]), n)](x, a, task, heads, *params, out, z, pre, act, M, g, gamma, **c,
                                              VMIN=floats[0], VMAX=floats[1], EPS=floats[2], PREC=prec,
                                              num_warps=warps)
    return out, z


@triton_mlp.register_fake
def _(x, a, task, heads, params, g, gamma, ints, floats, prec, warps):
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

    def forward(self, x, a=None, task=None, heads=None, g=None, gamma=None, step=0):
        """x [..., z_dim], a [..., a_dim] -> (out [n, ..., out_dim], or [n, ..., 1] values with `decode`;
        z [..., latent_dim] when there is a latent head), n = len(heads), all heads by default. With `step` > 0
        (and `decode`), the decoded head returns g + gamma^step * value: the rollout's return so far."""
        lead, dev = x.shape[:-1], x.device
        x = x.reshape(-1, self.z_dim)
        broadcast = x.stride() == (0, 1)  # one latent expanded to all samples: read it in place, no copy
        x = x if broadcast else x.contiguous()
        a = x if a is None else a.reshape(-1, self.a_dim).contiguous()
        sel = self.all_heads if heads is None else heads.reshape(-1).long()
        n, c = sel.shape[0], self._constants(STEP=step, XS=0 if broadcast else self.z_dim)
        out, z = triton_mlp(x, a, self._task(task, dev), sel, [getattr(self, p) for p in _PARAMS],
                            x if g is None else g.reshape(-1), x if gamma is None else gamma,
                            [int(c[k]) for k in _INTS], [c["VMIN"], c["VMAX"], c["EPS"]], c["PREC"], self.WARPS)
        out = out.reshape(n, *lead, 1 if self.decode else self.out_dim)
        return (out, z.reshape(*lead, self.latent_dim)) if self.latent >= 0 else out

    def _task(self, task, dev):
        if task is None or self.tasks == 1:
            return torch.zeros(1, dtype=torch.long, device=dev)
        return torch.tensor([task], device=dev) if isinstance(task, int) else task.reshape(-1)[:1].long()

    def _constants(self, **override):
        _, vmin, vmax = self.decode or (self.out_dim, 0.0, 0.0)
        return dict(KX=self.z_dim, XS=self.z_dim, KA=self.a_dim, KAP=_pow2(max(self.a_dim, 1)), H=self.hidden,
                    NO=self.out_dim, NL=self.latent_dim, NS=self.stacked, PW=max(self.hidden, self.stacked),
                    TASKS=self.tasks, LATENT=self.latent, SIMNORM=self.simnorm or 1, DECODE=bool(self.decode), STEP=0,
                    VMIN=float(vmin), VMAX=float(vmax), BM=self.BM, BK=self.BK, BN=self.BN, EPS=1e-5,
                    PREC=_prec(self.w1.dtype)) | override

    def ptxas_report(self, arch: int, step=0) -> dict:
        """Compile this launch for an NVIDIA GPU of compute capability `arch` (90: H100/H200, 87: Jetson Orin)
        without one: registers and spills per thread from Triton's own ptxas, shared memory per program."""
        dt, f32, i64 = self.w1.dtype, torch.float32, torch.int64
        ptrs = dict(x_ptr=dt, a_ptr=f32 if self.a_dim else dt, task_ptr=i64, head_ptr=i64, w0=dt, wa0=dt,
                    b0=dt, g0=dt, e0=dt, w1=dt, b1=dt, g1=dt, e1=dt, w2=dt, b2=dt, g2=dt, e2=dt,
                    out_ptr=f32 if self.decode else dt, z_ptr=dt, pre_ptr=f32, act_ptr=dt, M="i32",
                    g_ptr=f32, gamma_ptr=f32)
        return _ptxas(_mlp_kernel, ptrs, self._constants(STEP=step), self.WARPS, arch)


def _ptxas(kernel, args: dict, consts: dict, warps: int, arch: int) -> dict:
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


# --- the planner's value and MPPI update, each one launch -------------------------------------------------
_PI = ("w0", "b0", "g0", "e0", "w1", "b1", "g1", "e1", "w2", "b2")
_Q = ("w0", "wa0", "b0", "g0", "e0", "w1", "b1", "g1", "e1", "w2", "b2")
_VALUE_INTS = ("KX", "A", "AP", "H", "NSP", "NSQ", "NO", "TASKS", "STEP", "BM", "BK", "BN")
_ROLLOUT_INTS = ("KX", "XS", "A", "AP", "H", "NSP", "NSD", "SIMNORM", "TASKS", "HZ", "BM", "BK", "BN")
_MPPI_INTS = ("S", "SP", "K", "KP", "HZ", "A", "AP")


@torch.library.custom_op("edge_tdmpc::triton_pi_rollout", mutates_args=())
def triton_pi_rollout(z: torch.Tensor, eps: torch.Tensor, masks: torch.Tensor, task: torch.Tensor,
                      params: list[torch.Tensor], ints: list[int], floats: list[float], prec: str,
                      warps: int) -> torch.Tensor:
    """_pi_rollout_kernel: latents z [M, KX] (row stride XS), noise eps [HZ, M, A] -> actions [HZ, M, A]."""
    c = dict(zip(_ROLLOUT_INTS, ints))
    M, dev, dt = z.shape[0], z.device, params[4].dtype
    actions = torch.empty(c["HZ"], M, c["A"], device=dev)
    zs = torch.empty(M, c["KX"], device=dev, dtype=dt)
    pre = torch.empty(M, max(c["H"], c["NSP"], c["NSD"]), device=dev)
    act = torch.empty(M, c["H"], device=dev, dtype=dt)
    _pi_rollout_kernel[(triton.cdiv(M, c["BM"]),)](z, eps, masks, task, *params, actions, zs, pre, act, M, **c,
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
    """_value_kernel: rows z [M, KX] at the horizon, return so far g [M] -> values [M] (fp32)."""
    c = dict(zip(_VALUE_INTS, ints))
    M, dev, dt = z.shape[0], z.device, params[4].dtype
    value = torch.empty(M, device=dev)
    a = torch.empty(M, c["A"], device=dev)
    pre = torch.empty(M, max(c["H"], c["NSP"], c["NSQ"]), device=dev)
    act = torch.empty(M, c["H"], device=dev, dtype=dt)
    _value_kernel[(triton.cdiv(M, c["BM"]),)](z, g, gamma, eps, masks, task, q_idx, *params, value, a, pre, act, M,
                                              **c, LOG_STD_MIN=floats[0], LOG_STD_DIF=floats[1], VMIN=floats[2],
                                              VMAX=floats[3], EPS=floats[4], PREC=prec, num_warps=warps)
    return value


@triton_value.register_fake
def _(z, g, gamma, eps, masks, task, q_idx, params, ints, floats, prec, warps):
    return z.new_empty(z.shape[0], dtype=torch.float32)


@torch.library.custom_op("edge_tdmpc::triton_mppi", mutates_args=())
def triton_mppi(value: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, ints: list[int],
                floats: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_mppi_kernel: values [S], actions [HZ, S, A] -> mean, std [HZ, A], elite actions [HZ, K, A], elite
    values [K], scores [K]."""
    c = dict(zip(_MPPI_INTS, ints))
    HZ, K, A, dev = c["HZ"], c["K"], c["A"], value.device
    mean, std, elite = torch.empty(HZ, A, device=dev), torch.empty(HZ, A, device=dev), torch.empty(HZ, K, A, device=dev)
    elite_value, score = torch.empty(K, device=dev), torch.empty(K, device=dev)
    _mppi_kernel[(1,)](value, actions, mask, mean, std, elite, elite_value, score, **c, TEMPERATURE=floats[0],
                       MIN_STD=floats[1], MAX_STD=floats[2], num_warps=4)
    return mean, std, elite, elite_value, score


@triton_mppi.register_fake
def _(value, actions, mask, ints, floats):
    c = dict(zip(_MPPI_INTS, ints))
    HZ, K, A = c["HZ"], c["K"], c["A"]
    new = lambda *shape: value.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    return new(HZ, A), new(HZ, A), new(HZ, K, A), new(K), new(K)


class TritonWorldModel(WorldModel):
    """A WorldModel whose planner networks (dynamics, reward, policy, Q) run as TritonMLP launches, and which
    offers `planner.plan` its hot loop as kernels: `fused_pi_rollout` (the policy trajectories in one launch),
    `fused_value` (estimate_value in horizon + 1 launches) and `fused_mppi` (one MPPI update in one). The
    encoder (one row per step) and the candidates' sampling stay in PyTorch."""
    PI_ROLLOUT_WARPS = 8  # 5 MLPs in one program: on 4 warps ptxas spills ~100 B per thread for sm_87

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
        if not m._k_pi.hidden == m._k_Q.hidden == m._k_next.hidden:
            raise ValueError("the fused kernels run policy, dynamics and Q in one program: they need one hidden width")
        masks = model._action_masks if c.multitask else torch.ones(1, a, device=p.device)
        m.register_buffer("_k_masks", masks.detach().float().clone(), persistent=False)
        return m

    def fused_pi_rollout(self, z, task, eps):
        """planner.pi_rollout in one launch: each program takes its rows through all the horizon's policy and
        dynamics steps."""
        pi, dyn, c = self._k_pi, self._k_next, self._rollout_constants(eps.shape[0])
        z = z.reshape(-1, pi.z_dim)
        broadcast = z.stride() == (0, 1)
        z = z if broadcast else z.contiguous()
        c["XS"] = 0 if broadcast else pi.z_dim
        params = [getattr(pi, k) for k in _PI] + [getattr(dyn, k) for k in _PARAMS]
        return triton_pi_rollout(z, eps.float().contiguous(), self._k_masks, pi._task(task, z.device), params,
                                 [int(c[k]) for k in _ROLLOUT_INTS], [c["LOG_STD_MIN"], c["LOG_STD_DIF"], c["EPS"]],
                                 c["PREC"], self.PI_ROLLOUT_WARPS)

    def _rollout_constants(self, horizon):
        pi, dyn = self._k_pi, self._k_next
        return dict(KX=pi.z_dim, XS=pi.z_dim, A=self.cfg.action_dim, AP=_pow2(self.cfg.action_dim), H=pi.hidden,
                    NSP=pi.stacked, NSD=dyn.stacked, SIMNORM=dyn.simnorm, TASKS=pi.tasks, HZ=horizon, BM=pi.BM,
                    BK=pi.BK, BN=pi.BN, LOG_STD_MIN=float(self.cfg.log_std_min),
                    LOG_STD_DIF=float(self.cfg.log_std_max - self.cfg.log_std_min), EPS=1e-5, PREC=_prec(pi.w1.dtype))

    def fused_value(self, z, actions, task, gamma, q_idx, q_pi):
        """planner.estimate_value(...).nan_to_num(0) [S] in horizon + 1 launches: each rollout step adds its
        discounted reward to the return, then one program per row block runs policy -> 2 Q heads -> value."""
        gamma = gamma.float().reshape(1) if torch.is_tensor(gamma) else torch.full((1,), gamma, device=z.device)
        G = None
        for t in range(actions.shape[0]):
            G, z = self._k_rollout(z, actions[t], task, g=G, gamma=gamma, step=t)
            G = G[0].reshape(-1)  # head 0 is the reward; head 1, the dynamics, gave z
        pi, q, c = self._k_pi, self._k_Q, self._value_constants(actions.shape[0])
        params = [getattr(pi, k) for k in _PI] + [getattr(q, k) for k in _Q]
        return triton_value(z.contiguous(), G, gamma, q_pi.contiguous(), self._k_masks, pi._task(task, z.device),
                            q_idx.reshape(-1).long(), params, [int(c[k]) for k in _VALUE_INTS],
                            [c[k] for k in ("LOG_STD_MIN", "LOG_STD_DIF", "VMIN", "VMAX", "EPS")], c["PREC"],
                            pi.WARPS)

    def _value_constants(self, horizon):
        pi, q, cfg = self._k_pi, self._k_Q, self.cfg
        return dict(KX=pi.z_dim, A=cfg.action_dim, AP=_pow2(cfg.action_dim), H=pi.hidden, NSP=pi.stacked,
                    NSQ=q.stacked, NO=q.out_dim, TASKS=pi.tasks, STEP=horizon, BM=pi.BM, BK=pi.BK, BN=pi.BN,
                    LOG_STD_MIN=float(cfg.log_std_min), LOG_STD_DIF=float(cfg.log_std_max - cfg.log_std_min),
                    VMIN=float(cfg.vmin), VMAX=float(cfg.vmax), EPS=1e-5, PREC=_prec(pi.w1.dtype))

    def fused_mppi(self, value, actions, mask, cfg):
        """planner.mppi_update in one launch (one program: the top-k, the scores, the new mean and std)."""
        c = self._mppi_constants(actions.shape, cfg)
        return triton_mppi(value.contiguous(), actions.contiguous(), mask.float().contiguous(),
                           [c[k] for k in _MPPI_INTS], [c["TEMPERATURE"], c["MIN_STD"], c["MAX_STD"]])

    @staticmethod
    def _mppi_constants(shape, cfg):
        HZ, S, A = shape
        return dict(S=S, SP=_pow2(S), K=cfg.num_elites, KP=_pow2(cfg.num_elites, 1), HZ=HZ, A=A, AP=_pow2(A),
                    TEMPERATURE=float(cfg.temperature), MIN_STD=float(cfg.min_std), MAX_STD=float(cfg.max_std))

    def ptxas_report(self, arch: int, cfg=None,
                     launches=("rollout", "next", "pi", "Q", "value", "mppi", "pi_rollout")) -> dict:
        """ptxas's registers, spills and shared memory for the launches of a planning step on sm_`arch`
        (TritonMLP.ptxas_report), at the planner settings `cfg` (the official ones by default)."""
        from edge_tdmpc.planner import PlannerConfig
        cfg = cfg or PlannerConfig()
        dt, f32, i64 = self._k_pi.w1.dtype, torch.float32, torch.int64
        value = dict(z_ptr=dt, g_ptr=f32, gamma_ptr=f32, eps_ptr=f32, mask_ptr=f32, task_ptr=i64, qidx_ptr=i64)
        value |= {f"p{k}": dt for k in _PI} | {f"q{k}": dt for k in _Q}
        value |= dict(value_ptr=f32, a_ptr=f32, pre_ptr=f32, act_ptr=dt, M="i32")
        mppi = dict(value_ptr=f32, actions_ptr=f32, mask_ptr=f32, mean_ptr=f32, std_ptr=f32, elite_ptr=f32,
                    elite_value_ptr=f32, score_ptr=f32)
        rollout = dict(z_ptr=dt, eps_ptr=f32, mask_ptr=f32, task_ptr=i64) | {f"p{k}": dt for k in _PI}
        rollout |= {f"d{k}": dt for k in _PARAMS} | dict(actions_ptr=f32, zs_ptr=dt, pre_ptr=f32, act_ptr=dt, M="i32")
        shape = (cfg.horizon, cfg.num_samples, self.cfg.action_dim)
        report = {"rollout": lambda: self._k_rollout.ptxas_report(arch, step=1),
                  "next": lambda: self._k_next.ptxas_report(arch), "pi": lambda: self._k_pi.ptxas_report(arch),
                  "Q": lambda: self._k_Q.ptxas_report(arch),
                  "value": lambda: _ptxas(_value_kernel, value, self._value_constants(cfg.horizon),
                                          self._k_pi.WARPS, arch),
                  "mppi": lambda: _ptxas(_mppi_kernel, mppi, self._mppi_constants(shape, cfg), 4, arch),
                  "pi_rollout": lambda: _ptxas(_pi_rollout_kernel, rollout, self._rollout_constants(cfg.horizon),
                                               self.PI_ROLLOUT_WARPS, arch)}
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
        m = TritonWorldModel.of(ref)             # warps spill 3 KB per thread
        for k in ("_k_rollout", "_k_next", "_k_pi", "_k_Q"):
            getattr(m, k).BM, getattr(m, k).WARPS = bm, warps
        rows[f"triton {bm}x{warps}w"] = calls(m)
    print(f"{args.rows} rows, {args.precision}, {torch.cuda.get_device_name()}: us per call (CUDA graph replay)")
    for name, fns in rows.items():
        print(f"{name:16s}" + "".join(f"  {k} {time_us(f):7.1f}" for k, f in fns.items()))

