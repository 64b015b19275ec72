"""Closed-loop episodes in parallel worker processes, one JSONL line per finished episode.

A job is one (runtime, precision, task, episode). Its initial state is the official evaluation's: each task's
env seeded with the base seed, episode k starting from its (k+1)-th reset (official `evaluate.py` resets one
env per task), so `--seed 1` starts every episode where the official code with seed=1 does. Its planner-noise
seed derives from (base seed, task, episode) alone, and every worker runs torch on one thread, so returns do
not depend on which worker runs a job or how many workers there are. Each finished episode is appended (and
fsynced) by the parent process to `episodes.jsonl`; a killed run resumes from there (`resume=True`),
recomputing nothing.
"""
import json
import multiprocessing as mp
import os
import queue
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_tdmpc.bench.meters import MIB, PeakRss, device_memory_peak_mib, device_memory_reset
from edge_tdmpc.compile.runtimes import make_runtime
from edge_tdmpc.files import atomic_write_text
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.rollout import evaluation_episode
from edge_tdmpc.workers import die_with_parent

EPISODES_FILE, RUN_FILE = "episodes.jsonl", "run.json"
PROGRESS_EVERY = 10  # steps between progress messages from a worker


@dataclass(frozen=True)
class Job:
    runtime: str
    precision: str
    task: str
    episode: int

    @property
    def key(self) -> tuple:
        return self.runtime, self.precision, self.task, self.episode


@dataclass(frozen=True)
class Settings:
    """Everything that decides an episode's return: a resumed run must match these exactly."""
    model_sha256: str
    seed: int = 1
    steps: int = 500
    eval_mode: bool = False
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    control: dict | None = None  # `rollout.ControlOptions`: deadline, fallback, action filter
    compile: dict | None = None  # `CompileOptions` of the artifacts compiled for this run's runtimes

    def identity(self) -> dict:
        return {**asdict(self), "planner": asdict(self.planner)}


def run_episode(runtime, model_cfg, task: str, seed: int, episode: int, steps: int, eval_mode: bool, device="cpu",
                progress=None, control: dict | None = None, policy=None) -> dict:
    """One episode of the official evaluation protocol (`rollout.evaluation_episode`) -> its JSONL record: agent
    time (around `act`, incl. host<->device copies) and env time apart, peak memory. With `control`, latency is
    that of the planning steps (a tick that takes a fallback plans nothing)."""
    rss = PeakRss()
    device_memory_reset(device)
    told = [0]

    def on_step(t, ep):
        rss.sample()
        if progress is not None and (t + 1) % PROGRESS_EVERY == 0:
            progress(t + 1 - told[0])
            told[0] = t + 1
    ep, agent, seeds = evaluation_episode(runtime, model_cfg, task, seed, episode, steps, eval_mode, control, policy,
                                          on_step)
    if progress is not None:
        progress(ep.steps - told[0])
    ticks = agent.stats.summary() if control else None
    return {
        "return": ep.ret, "steps": ep.steps, "nonfinite_obs": ep.nonfinite, **seeds,
        "latency_ms": [round(ns / 1e6, 4) for ns in ep.act_ns] if not control else
        [round(ms, 4) for ms in agent.stats.plan_ms], **({"control": ticks} if ticks else {}),
        "agent_s": sum(ep.act_ns) / 1e9, "env_s": ep.env_ns / 1e9, "wall_s": ep.wall_s,
        "peak_rss_mib": rss.peak_bytes() / MIB, "peak_device_mib": device_memory_peak_mib(device),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # was the CPU shared?
    }


# --- worker processes ---------------------------------------------------------------------------------
_W: dict = {}


def _init_worker(source, artifacts, planner, settings, device, warmup):
    torch.set_num_threads(1)  # one core per worker; also makes results independent of the worker count
    from edge_tdmpc.checkpoint import load_model
    model = load_model(*source) if isinstance(source, tuple) else source  # (checkpoint, its task set)
    _W.update(model=model, artifacts=artifacts, planner=planner, settings=settings, device=device,
              warmup=warmup, pair=None, runtime=None)


def _runtime(runtime: str, precision: str):
    """The worker keeps one runtime alive (so its memory is measured alone), warmed up outside any episode."""
    if _W["pair"] != (runtime, precision):
        if _W["runtime"] is not None:
            _W["runtime"].close()
        model = _W["artifacts"].get((runtime, precision), _W["model"])
        rt = make_runtime(runtime, model, precision, _W["planner"], seed=0, device=_W["device"])
        cfg = _W["model"].cfg
        obs, task = np.zeros(cfg.obs_dim, np.float32), 0 if cfg.multitask else None
        for i in range(_W["warmup"]):  # first calls pay for allocation / lazy init / compilation
            rt.act(obs, task, t0=i == 0)
        _W.update(pair=(runtime, precision), runtime=rt)
    return _W["runtime"]


def _fallback_policy(control):
    """The "policy" fallback: the model's policy prior, fp32 eager (a fraction of a ms on a CPU core)."""
    if not control or control.get("fallback") != "policy":
        return None
    if _W.get("policy") is None:
        _W["policy"] = make_runtime("torch", _W["model"], "fp32", PlannerConfig(mpc=False), device=_W["device"])
    return _W["policy"]


def _run_job(job: Job, progress=None) -> dict:
    model, s = _W["model"], _W["settings"]
    rt = _runtime(job.runtime, job.precision)
    rec = run_episode(rt, model.cfg, job.task, s.seed, job.episode, s.steps, s.eval_mode, _W["device"], progress,
                      s.control, _fallback_policy(s.control))
    return {**asdict(job), **rec, "worker": os.getpid()}


def _worker(parent, init_args, jobs, results):
    """Worker loop: take jobs until None; report ("steps", n), ("done", record) or ("error", traceback)."""
    die_with_parent(parent)
    try:
        _init_worker(*init_args)
        while (job := jobs.get()) is not None:
            results.put(("done", _run_job(job, lambda n: results.put(("steps", n)))))
    except Exception:
        results.put(("error", traceback.format_exc()))


# --- the episode log -----------------------------------------------------------------------------------
class EpisodeLog:
    """`episodes.jsonl` plus `run.json` (the settings it was made with) in the output directory."""

    def __init__(self, out: Path, settings: Settings, resume: bool):
        self.path, self.run_path = out / EPISODES_FILE, out / RUN_FILE
        self.records = self._load()
        identity = settings.identity()
        if self.records and not resume:
            raise ValueError(f"{out} already holds {len(self.records)} episode(s): pass --resume to continue "
                             "that run, or choose another --out")
        if self.run_path.exists() and (resume or self.records):
            old = json.loads(self.run_path.read_text())
            diff = [k for k in identity if old.get(k) != identity[k]]
            if diff:
                raise ValueError(f"cannot resume {out}: its episodes used different {', '.join(diff)} "
                                 f"({diff[0]}={old.get(diff[0])!r}, now {identity[diff[0]]!r}); use another --out")
        atomic_write_text(self.run_path, json.dumps(identity, indent=1))

    def _load(self) -> dict:
        records = {}
        if not self.path.exists():
            return records
        lines = self.path.read_text().splitlines()
        good = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn line of a killed run: that episode is simply run again
            records[Job(rec["runtime"], rec["precision"], rec["task"], rec["episode"]).key] = rec
            good.append(line)
        if len(good) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in good))
        return records

    def append(self, rec: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[Job(rec["runtime"], rec["precision"], rec["task"], rec["episode"]).key] = rec


def run_jobs(jobs: list[Job], log: EpisodeLog, source, artifacts: dict, planner: PlannerConfig,
             settings: Settings, workers: int, device="cpu", warmup=3, pbar=None):
    """Run the jobs not yet in the log on `workers` spawned processes, appending each episode as it finishes.

    Own processes rather than a multiprocessing.Pool: a worker that dies (OOM kill, a failing initializer)
    stops the run with an error instead of being respawned forever.
    """
    todo = [j for j in jobs if j.key not in log.records]
    if not todo:
        return
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and any CUDA context
    job_q, results = ctx.Queue(), ctx.Queue()
    n = max(1, min(workers, len(todo)))
    for job in [*todo, *[None] * n]:
        job_q.put(job)
    init = (source, artifacts, planner, settings, device, warmup)
    procs = [ctx.Process(target=_worker, args=(os.getpid(), init, job_q, results), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        left = len(todo)
        while left:
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"bench worker {dead[0].pid} died (exit code {dead[0].exitcode}, e.g. killed "
                                       "for memory); finished episodes are saved: rerun with --resume") from None
                continue
            if kind == "error":
                raise RuntimeError(f"bench worker failed (finished episodes are saved; fix and --resume):\n{payload}")
            if kind == "steps":
                if pbar is not None:
                    pbar.update(payload)
                continue
            log.append(payload)
            left -= 1
            if pbar is not None:
                pbar.set_postfix_str(f"{payload['task']} ep{payload['episode']} return {payload['return']:.1f}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
