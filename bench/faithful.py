"""Faithfulness check: recorded observations and identical planner noise through every runtime, against fp32
eager, so precision loss is seen apart from episode-to-episode variance (Polygraphy-style comparison).

Observations come from short real rollouts of the fp32 eager agent; each task's sequence is replayed in order
(t0 at its first step, so the warm-start mean is part of what is compared) with the same `Noise` per step.
"""
import math
import time

import numpy as np
import torch

from edge_tdmpc.compile.runtimes import make_runtime
from edge_tdmpc.planner import PlannerConfig, sample_noise
from edge_tdmpc.rollout import run
from edge_tdmpc.tasks import fit_obs

# Bounds on the median over steps of max_j |Δa_j| against fp32 eager (actions live in [-1, 1]). The median, not
# the max: MPPI picks elites by top-k and one trajectory by argmax, so a last-bit difference sometimes flips a
# choice and moves an action by up to the exploration std; the max is reported to show how often. Planning
# amplifies precision loss (bf16 keeps 8 mantissa bits, so value estimates reorder the elites); the policy prior
# alone stays close. Measured on the MT30 1M student, default planner (docs/results/bench-cpu.md).
TOLERANCE = {
    "mpc": {"fp32": 1e-3, "fp16": 0.25, "bf16": 0.6},
    "policy": {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2},
}


def judge(results: list[dict], mpc: bool) -> list[dict]:
    """Attach the stated tolerance and pass/fail to raw check results."""
    tols = TOLERANCE["mpc" if mpc else "policy"]
    out = []
    for r in results:
        tol = tols.get(r["precision"])
        out.append({**r, "tolerance": tol, "ok": None if tol is None else r["median_abs"] <= tol})
    return out


def record(model, tasks, n: int, planner: PlannerConfig, seed=1, eval_mode=False) -> list[dict]:
    """n real observations split over `tasks`, each with the Noise used and the fp32 eager action taken."""
    from edge_tdmpc.envs import episode_env
    ref = make_runtime("torch", model, "fp32", planner)
    gen = torch.Generator().manual_seed(seed)
    per_task = math.ceil(n / len(tasks))
    segments, left = [], n
    for task in tasks:
        if left <= 0:
            break
        k = min(per_task, left)
        left -= k
        env, obs = episode_env(task, seed)  # episode 0's official initial state
        ref.reset(seed)
        seg = dict(task=task, task_index=model.cfg.tasks.index(task) if model.cfg.multitask else None,
                   action_dim=env.action_dim, obs=[], noise=[], actions=[])

        def act(obs, t, seg=seg, name=task if model.cfg.multitask else None):
            x = fit_obs(obs, model.cfg.obs_dim, name)
            noise = sample_noise(planner, model.cfg.action_dim, model.cfg.num_q, gen)
            a = np.asarray(ref.act(x, seg["task_index"], t0=t == 0, eval_mode=eval_mode, noise=noise))
            seg["obs"].append(x), seg["noise"].append(noise), seg["actions"].append(a)
            return a
        run(env, obs, act, k)
        segments.append(seg)
    return segments


def replay(runtime, segments, eval_mode=False) -> dict:
    """Per step max_j |a_j - a_ref_j| over the task's own action dims, summarised; plus act latency."""
    deltas, ms = [], []
    for seg in segments:
        runtime.reset()
        for t, (x, noise, ref) in enumerate(zip(seg["obs"], seg["noise"], seg["actions"])):
            t0 = time.perf_counter_ns()
            a = runtime.act(x, seg["task_index"], t0=t == 0, eval_mode=eval_mode, noise=noise)
            ms.append((time.perf_counter_ns() - t0) / 1e6)
            d = np.abs(np.asarray(a, np.float64)[: seg["action_dim"]] - ref[: seg["action_dim"]])
            deltas.append(float(d.max()))
    d = np.asarray(deltas)
    return {"n": int(d.size), "max_abs": float(d.max()), "median_abs": float(np.median(d)),
            "mean_abs": float(d.mean()), "act_ms_median": float(np.median(ms))}


def check_actions(model, pairs, tasks, n: int, planner: PlannerConfig, seed=1, eval_mode=False,
                  artifacts=None, device="cpu") -> list[dict]:
    """Max/median |Δaction| of every (runtime, precision) against fp32 eager on the same inputs and noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # latencies comparable with the episode workers
    try:
        segments = record(model, tasks, n, planner, seed, eval_mode)
        out = []
        for runtime, precision in pairs:
            src = (artifacts or {}).get((runtime, precision), model)
            rt = make_runtime(runtime, src, precision, planner, seed=seed, device=device)
            try:
                res = replay(rt, segments, eval_mode)
            finally:
                rt.close()
            out.append({"runtime": runtime, "precision": precision, **res})
        return judge(out, planner.mpc)
    finally:
        torch.set_num_threads(threads)
