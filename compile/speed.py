"""Planning-step latency, size, |delta action| and closed-loop score per runtime x precision, in one run.

    python -m edge_tdmpc.compile.speed CHECKPOINT [--precisions fp32,fp16,int8] [--steps 30]
                                                 [--tasks cartpole-swingup,walker-walk] [--threads 1]
    # on a GPU machine: eager on the GPU against the CUDA-graph step (and TensorRT where it imports)
    python -m edge_tdmpc.compile.speed CHECKPOINT --device cuda --runtimes torch-cuda-graph --precisions fp32,fp16

Latency: every runtime plans the same recorded observations with the same noise, interleaved step by step
with the eager PyTorch reference (so machine load hits all alike); ratios are against that reference in the
same run. |delta action| is measured on those identical inputs. Closed loop: full episodes through the runtime
interface, score = return / 10 as in the official evaluation.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from edge_tdmpc.compile import record
from edge_tdmpc.planner import PlannerConfig, sample_noise
from edge_tdmpc.runtime import make_runtime


def _runtimes(model, precisions, planner, names=("onnxruntime",), device="cpu"):
    """The eager fp32 baseline on `device` first, then each named runtime x precision. On a GPU machine
    (device 'cuda'): onnxruntime runs its CUDA provider, torch-cuda-graph and tensorrt their own GPU path."""
    out = {("torch", "fp32"): make_runtime("torch", model, "fp32", planner, device=device)}
    for name in names:
        for p in precisions:
            if name == "torch-cuda-graph" and p not in ("fp32", "fp16", "bf16"):
                continue
            ort_device = device if name == "onnxruntime" and device != "cpu" else None  # its CUDA provider
            out[(name, p)] = make_runtime(name, model, p, planner, device=ort_device)
    return out


def latency(model, runtimes: dict, planner: PlannerConfig, steps=30, warmup=3, seed=0, settle=0.02) -> dict:
    """Per runtime: p50/p99 ms of act() and max/mean |action - eager fp32 action| on identical inputs.

    Runtimes take turns step by step, the order rotating each step, with `settle` seconds of sleep before each
    timed call: thread pools (OpenMP's, ONNX Runtime's) spin for a while after a call, and without the pause
    that spinning steals the cores from whichever runtime comes next."""
    tasks = [t for t in ("walker-walk", "cheetah-run", "cartpole-swingup") if t in model.cfg.tasks] or model.cfg.tasks
    rec = record.record(model, planner, tasks, (steps + warmup) // len(tasks) + 1, seed=seed + 7)
    rows = list(record.rows(rec))[: steps + warmup]
    gen = torch.Generator().manual_seed(seed)
    times = {k: [] for k in runtimes}
    deltas = {k: [] for k in runtimes}
    for i, row in enumerate(rows):
        noise = sample_noise(planner, model.cfg.action_dim, model.cfg.num_q, gen)
        task = int(row["task"][0]) if model.cfg.multitask else None
        keys = list(runtimes)
        keys = keys[i % len(keys):] + keys[:i % len(keys)]
        actions = {}
        for key in keys:
            rt = runtimes[key]
            rt.reset()
            time.sleep(settle)
            t = time.perf_counter()
            actions[key] = np.asarray(rt.act(row["obs"], task, True, noise=noise))
            dt = time.perf_counter() - t
            if i >= warmup:
                times[key].append(dt * 1e3)
        ref = actions[("torch", "fp32")]
        for key, a in actions.items():
            deltas[key].append(float(np.abs(a - ref).max()))
    base = np.median(times[("torch", "fp32")])
    return {key: {"p50_ms": float(np.median(v)), "p99_ms": float(np.percentile(v, 99)),
                  "speedup": float(base / np.median(v)), "max_daction": max(deltas[key]),
                  "mean_daction": float(np.mean(deltas[key])), "bytes": runtimes[key].size_bytes()}
            for key, v in times.items()}


def closed_loop(model, rt, tasks, steps=500, seed=1) -> dict:
    """One episode per task through the runtime interface (stochastic act, as the official evaluation)."""
    from edge_tdmpc.envs import make_env
    scores = {}
    for task in tasks:
        env = make_env(task, seed=seed, multitask=model.cfg.multitask,
                       pad_to=(model.cfg.obs_dim, model.cfg.action_dim))
        index = model.cfg.tasks.index(task) if model.cfg.multitask else None
        rt.reset(seed)
        obs, _ = env.reset()
        ret = 0.0
        for t in range(steps):
            obs, reward, terminated, truncated, _ = env.step(rt.act(obs, index, t == 0))
            ret += reward
            if terminated or truncated:
                break
        scores[task] = ret / 10
    return scores


def markdown(lat: dict, scores: dict | None = None, tasks=()) -> str:
    head = "| runtime | precision | p50 ms | p99 ms | vs eager | size MB | max \\|Δa\\| | mean \\|Δa\\| |"
    head += "".join(f" {t} |" for t in tasks) + (" mean score |" if tasks else "")
    lines = [head, "|" + "---|" * (8 + len(tasks) + bool(tasks))]
    for (name, prec), r in lat.items():
        row = (f"| {name} | {prec} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['speedup']:.2f}x | "
               f"{r['bytes'] / 1e6:.2f} | {r['max_daction']:.2e} | {r['mean_daction']:.2e} |")
        if tasks:
            s = (scores or {}).get(f"{name}/{prec}", {})
            row += "".join(f" {s[t]:.1f} |" if t in s else " - |" for t in tasks)
            row += f" {np.mean(list(s.values())):.1f} |" if s else " - |"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    from edge_tdmpc.checkpoint import load_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--precisions", default="fp32,fp16,bf16,int8,mixed", help="precisions of the timed runtimes")
    ap.add_argument("--runtimes", default="onnxruntime",
                    help="runtimes timed against eager fp32: onnxruntime, torch-cuda-graph, tensorrt (comma-separated)")
    ap.add_argument("--device", default="cpu", help="eager baseline's device; cuda on a GPU machine")
    ap.add_argument("--steps", type=int, default=30, help="timed planning steps (0: no latency table)")
    ap.add_argument("--tasks", default="", help="closed-loop tasks (comma-separated); none: latency only")
    ap.add_argument("--episode-steps", type=int, default=500)
    ap.add_argument("--eager-closed-loop", action="store_true", help="also run the eager reference closed loop")
    ap.add_argument("--seed", type=int, default=1, help="closed-loop episode seed")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ONNX Runtime")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["EDGE_TDMPC_ORT_THREADS"] = str(args.threads)
    model = load_model(args.checkpoint)
    planner = PlannerConfig()
    rts = _runtimes(model, [p for p in args.precisions.split(",") if p], planner,
                    [r for r in args.runtimes.split(",") if r], args.device)
    result = {"torch_threads": torch.get_num_threads(), "episode_steps": args.episode_steps, "seed": args.seed}
    if args.steps:
        lat = latency(model, rts, planner, args.steps)
        result["latency"] = {f"{k[0]}/{k[1]}": v for k, v in lat.items()}
        print(markdown(lat), flush=True)
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks:
        result["scores"] = {}
        for (name, prec), rt in rts.items():
            if name == "torch" and not args.eager_closed_loop:
                continue
            t = time.time()
            scores = closed_loop(model, rt, tasks, args.episode_steps, args.seed)
            result["scores"][f"{name}/{prec}"] = scores
            print(f"{name}/{prec}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()) +
                  f"  ({time.time() - t:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
