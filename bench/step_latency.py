"""Planning-step latency, size, |delta action| and closed-loop score per runtime x precision, in one run.

    edge-tdmpc bench step-latency CHECKPOINT [--precisions fp32,fp16,int8] [--steps 30]
                                            [--tasks cartpole-swingup,walker-walk] [--threads 1]
                                            [--artifacts out/my-mixed-plan]   # compiled with --layers
    # on a GPU machine: eager on the GPU against the CUDA-graph steps (and TensorRT where it imports);
    # bench/gpu_check.sh runs this (as python -m edge_tdmpc.bench.step_latency) and the GPU tests in one go
    edge-tdmpc bench step-latency CHECKPOINT --device cuda --runtimes torch-cuda-graph,torch-compile \
        --precisions fp32,fp16,bf16 --own-noise --profile

Latency: every runtime plans the same recorded observations with the same noise, interleaved step by step
with the eager PyTorch reference (so machine load hits all alike); ratios are against that reference in the
same run. |delta action| is measured on those identical inputs. Closed loop: full episodes through the runtime
interface, score = return / 10 as in the official evaluation.
"""
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from edge_tdmpc.compile import record
from edge_tdmpc.compile.runtimes import compiled_runtime, make_runtime
from edge_tdmpc.files import atomic_write
from edge_tdmpc.planner import PlannerConfig, sample_noise
from edge_tdmpc.rollout import evaluation_episode


def _runtimes(model, precisions, planner, names=("onnxruntime",), device="cpu"):
    """The eager fp32 baseline on `device` first, then each named runtime x precision. On a GPU machine
    (device 'cuda'): onnxruntime runs its CUDA provider, the torch-* runtimes and tensorrt their own GPU path."""
    out = {("torch", "fp32"): make_runtime("torch", model, "fp32", planner, device=device)}
    for name in names:
        for p in precisions:
            if name.startswith("torch-") and p not in ("fp32", "fp16", "bf16"):
                continue
            ort_device = device if name == "onnxruntime" and device != "cpu" else None  # its CUDA provider
            out[(name, p)] = compiled_runtime(name, model, p, planner, device=ort_device, echo=print)
    return out


def _artifacts(checkpoint, dirs, planner: PlannerConfig) -> dict:
    """Compiled artifact directories (e.g. mixed with other `compile --layers`) as more runtimes to time, each
    keyed (its runtime, 'precision (directory name)'); they must come from `checkpoint`, with `planner`'s
    settings."""
    from edge_tdmpc.compile.artifact import read_manifest
    from edge_tdmpc.files import file_sha256
    sha, out = file_sha256(checkpoint), {}
    for d in dirs:
        m = read_manifest(d)
        if m.get("checkpoint_sha256") != sha:
            raise ValueError(f"{d} was not compiled from {checkpoint} (sha256 differs): compile it from that file")
        key = (m["runtime"], f"{m['precision']} ({Path(d).name})")
        out[key] = make_runtime(m["runtime"], d, m["precision"], planner)
    return out


def latency(model, runtimes: dict, planner: PlannerConfig, steps=30, warmup=3, seed=0, settle=0.02,
            own_noise=False) -> dict:
    """Per runtime: p50/p99 ms of act() and max/mean |action - eager fp32 action| on identical inputs; with
    `own_noise`, also p50/p99 ms when each runtime draws its own noise (`own_p50_ms`, `own_p99_ms`).

    Runtimes take turns step by step, the order rotating each step, with `settle` seconds of sleep before each
    timed call: thread pools (OpenMP's, ONNX Runtime's) spin for a while after a call, and without the pause
    that spinning steals the cores from whichever runtime comes next. The Gumbel draw is fed as zeros (every
    runtime executes the top elite; the pick's arithmetic still runs), as compile verification does: the draw
    follows the elites' rank, so a last-bit near-tie among 64 elites would swap the executed trajectory and
    |delta action| would measure that, not the runtime."""
    tasks = [t for t in ("walker-walk", "cheetah-run", "cartpole-swingup") if t in model.cfg.tasks] or model.cfg.tasks
    rec = record.record(model, planner, tasks, (steps + warmup) // len(tasks) + 1, seed=seed + 7)
    rows = list(record.rows(rec))[: steps + warmup]
    gen = torch.Generator().manual_seed(seed)
    times = {k: [] for k in runtimes}
    deltas = {k: [] for k in runtimes}
    for i, row in enumerate(rows):
        noise = sample_noise(planner, model.cfg.action_dim, model.cfg.num_q, gen)
        noise = noise._replace(gumbel=torch.zeros_like(noise.gumbel))  # the top elite: see the docstring
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
    out = {key: {"p50_ms": float(np.median(v)), "p99_ms": float(np.percentile(v, 99)),
                 "speedup": float(base / np.median(v)), "max_daction": max(deltas[key]),
                 "mean_daction": float(np.mean(deltas[key])), "bytes": runtimes[key].size_bytes()}
           for key, v in times.items()}
    if own_noise:  # deployment: the runtime draws its own noise (on the device for the CUDA-graph runtimes)
        for key, rt in runtimes.items():
            rt.reset()
            own = []
            for i, row in enumerate(rows):
                task = int(row["task"][0]) if model.cfg.multitask else None
                time.sleep(settle)
                t = time.perf_counter()
                rt.act(row["obs"], task, i == 0)
                if i >= warmup:
                    own.append((time.perf_counter() - t) * 1e3)
            out[key].update(own_p50_ms=float(np.median(own)), own_p99_ms=float(np.percentile(own, 99)))
    return out


def kernel_profile(model, runtimes: dict, planner: PlannerConfig) -> dict:
    """Per GPU runtime: CUDA kernels in one planning step and their summed device time (CUPTI sees kernels
    inside graph replays too). Against the step's latency this splits launch/gap cost from arithmetic."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    obs = np.zeros(model.cfg.obs_dim, np.float32)
    task = 0 if model.cfg.multitask else None
    out = {}
    for key, rt in runtimes.items():
        rt.act(obs, task, True)  # build / warm whatever the runtime builds on first use
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            rt.act(obs, task, False)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        by_name = {}
        for e in kernels:
            n, t = by_name.get(e.name[:80], (0, 0.0))
            by_name[e.name[:80]] = (n + 1, t + e.device_time / 1e3)
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
        out[key] = {"kernels": len(kernels), "kernel_ms": sum(e.device_time for e in kernels) / 1e3,
                    "top": [{"name": k, "count": n, "ms": t} for k, (n, t) in top]}
    return out


def closed_loop(model, rt, tasks, steps=500, seed=1) -> dict:
    """One episode per task through the runtime interface, by the official evaluation protocol -> scores."""
    return {task: evaluation_episode(rt, model.cfg, task, seed, 0, steps)[0].ret / 10 for task in tasks}


def markdown(lat: dict, scores: dict | None = None, tasks=()) -> str:
    own = all("own_p50_ms" in r for r in lat.values())
    digits = 3 if min(r["p50_ms"] for r in lat.values()) < 1 else 1  # GPU steps are sub-millisecond
    head = "| runtime | precision | p50 ms | p99 ms | vs eager |" + (" own noise p50 ms | own p99 ms |" if own else "")
    head += " size MB | max \\|Δa\\| | mean \\|Δa\\| |"
    head += "".join(f" {t} |" for t in tasks) + (" mean score |" if tasks else "")
    lines = [head, "|" + "---|" * (8 + 2 * own + len(tasks) + bool(tasks))]
    for (name, prec), r in lat.items():
        row = f"| {name} | {prec} | {r['p50_ms']:.{digits}f} | {r['p99_ms']:.{digits}f} | {r['speedup']:.2f}x |"
        if own:
            row += f" {r['own_p50_ms']:.{digits}f} | {r['own_p99_ms']:.{digits}f} |"
        row += f" {r['bytes'] / 1e6:.2f} | {r['max_daction']:.2e} | {r['mean_daction']:.2e} |"
        if tasks:
            s = (scores or {}).get(f"{name}/{prec}", {})
            row += "".join(f" {s[t]:.1f} |" if t in s else " - |" for t in tasks)
            row += f" {np.mean(list(s.values())):.1f} |" if s else " - |"
        lines.append(row)
    return "\n".join(lines)


def benchmark(checkpoint, precisions=("fp32", "fp16", "bf16", "int8", "mixed"), runtimes=("onnxruntime",),
              artifacts=(), device="cpu", steps=30, own_noise=False, profile=False, tasks=(), episode_steps=500,
              eager_closed_loop=False, seed=1, threads=None, json_path=None,
              echo=lambda s: print(s, flush=True)) -> dict:
    """`edge-tdmpc bench step-latency`: the latency table (`steps` > 0), the kernel profile (`profile`) and the
    closed-loop scores on `tasks`, each written to `json_path` as soon as it is measured -> all numbers."""
    from edge_tdmpc.checkpoint import load_model
    if threads:
        torch.set_num_threads(threads)
        os.environ["EDGE_TDMPC_ORT_THREADS"] = str(threads)
    model = load_model(checkpoint)
    planner = PlannerConfig()
    rts = _runtimes(model, list(precisions), planner, list(runtimes), device)
    rts.update(_artifacts(checkpoint, list(artifacts), planner))
    gpu = device.startswith("cuda")
    result = {"torch_threads": torch.get_num_threads(), "episode_steps": episode_steps, "seed": seed,
              "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()}

    def save():  # after each stage: a run cut short keeps what it measured
        if json_path:
            atomic_write(json_path, lambda f: json.dump(result, f, indent=1), mode="w")

    if steps:
        lat = latency(model, rts, planner, steps, own_noise=own_noise)
        result["latency"] = {f"{k[0]}/{k[1]}": v for k, v in lat.items()}
        save()
        echo(markdown(lat))
    if profile:
        result["kernels"] = {f"{k[0]}/{k[1]}": v for k, v in kernel_profile(model, rts, planner).items()}
        save()
        for k, v in result["kernels"].items():
            echo(f"{k}: {v['kernels']} kernels per step, {v['kernel_ms']:.3f} ms of kernel time")
    if tasks:
        result["scores"] = {}
        for (name, prec), rt in rts.items():
            if name == "torch" and not eager_closed_loop:
                continue
            t = time.time()
            scores = closed_loop(model, rt, list(tasks), episode_steps, seed)
            result["scores"][f"{name}/{prec}"] = scores
            save()
            echo(f"{name}/{prec}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()) +
                 f"  ({time.time() - t:.0f} s)")
    return result


if __name__ == "__main__":
    from edge_tdmpc.bench.cli import step_latency_cmd
    step_latency_cmd()
