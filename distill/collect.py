"""Roll a teacher out on named tasks and write the episodes as an offline dataset (no download needed).

Each (task, episode) has its own seed, derived from (seed, task index, episode), for the environment and the
agent's noise alike, so an episode is the same whichever worker runs it. Workers are spawned processes with
one torch thread each; their episodes are written in job order, so the dataset does not depend on --workers.
Exploration: the agent acts stochastically (the planner's final action noise, or a sampled policy action
with --no-mpc), plus optional Gaussian noise of std `noise_std`. An interrupted collection resumes: episodes
already in the dataset are skipped.
"""
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.checkpoint import load_model
from edge_tdmpc.distill.data import INDEX, EpisodeDataset, EpisodeWriter
from edge_tdmpc.files import file_sha256
from edge_tdmpc.planner import Agent
from edge_tdmpc.rollout import run
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.tasks import resolve_tasks


def play(model, task: str, task_index, seed: int, steps: int, mpc=True, eval_mode=False, noise_std=0.0,
         random_actions=False, after_step=None, **planner) -> tuple:
    """One episode (the rollout loop of `data collect` and `train`) -> (obs [T+1, own obs dim], action [T, own
    action dim], reward [T]). Env, agent noise and the episode's numpy draws (uniform actions when
    `random_actions`, else N(0, noise_std) added to the agent's action) are all seeded by `seed`;
    `after_step(t)` runs after the t-th step (the online trainer's updates)."""
    from edge_tdmpc.envs import make_env
    env = make_env(task, seed=seed)
    agent = None if random_actions else Agent(model, seed=seed, mpc=mpc, **planner)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset()

    def act(obs, t):
        if agent is None:
            return rng.uniform(-1, 1, env.action_dim).astype(np.float32)
        action = agent.act(obs, t0=t == 0, eval_mode=eval_mode, task=task_index).numpy()[: env.action_dim]
        if noise_std:
            action = np.clip(action + noise_std * rng.standard_normal(action.shape), -1, 1)
        return action.astype(np.float32)
    return run(env, obs, act, steps, None if after_step is None else lambda t, _: after_step(t)).arrays()


def rollout(model, task: str, episode: int, seed=0, mpc=True, noise_std=0.0, steps=500, eval_mode=False,
            **planner) -> dict:
    """One collected episode of `model` on `task`, seeded by (seed, task, episode) -> a dataset record."""
    index = model.cfg.tasks.index(task)
    obs, action, reward = play(model, task, index if model.cfg.multitask else None, derive_seed(seed, index, episode),
                               steps, mpc, eval_mode, noise_std, **planner)
    return dict(task=index, key=episode, obs=obs, action=action, reward=reward)


_WORKER = {}


def _init_worker(teacher, teacher_tasks, settings):
    torch.set_num_threads(1)  # parallelism comes from processes; one thread each also makes runs repeatable
    _WORKER.update(model=load_model(teacher, tasks=teacher_tasks), settings=settings)


def _run_job(job):
    task, episode = job
    return rollout(_WORKER["model"], task, episode, **_WORKER["settings"])


def collect(teacher, tasks, episodes: int, out_dir, mpc=True, noise_std=0.0, steps=500, workers=1, seed=0,
            teacher_tasks="mt30", eval_mode=False, flush_seconds=60.0, echo=print, progress=True,
            **planner) -> dict:
    """Collect `episodes` per task into `out_dir` -> {task: [episode returns]} of the episodes run now.

    workers=0 runs in this process (still one torch thread, so results match any worker count)."""
    if episodes < 1 or steps < 1 or workers < 0 or noise_std < 0:
        raise ValueError(f"need episodes >= 1, steps >= 1, workers >= 0, noise_std >= 0; got {episodes}, "
                         f"{steps}, {workers}, {noise_std}")
    model = load_model(teacher, tasks=teacher_tasks)
    tasks = resolve_tasks(tasks)
    for t in tasks:
        if t not in model.cfg.tasks:
            raise ValueError(f"task '{t}' is not in the teacher's task set ({len(model.cfg.tasks)} tasks); "
                             "pick tasks it was trained on, or pass --teacher-tasks")
    settings = dict(seed=seed, mpc=mpc, noise_std=noise_std, steps=steps, eval_mode=eval_mode, **planner)
    record = dict(settings, teacher=Path(teacher).name, teacher_sha256=file_sha256(teacher))
    out_dir = Path(out_dir)
    done = set()
    if (out_dir / INDEX).exists():
        ds = EpisodeDataset(out_dir)
        old = ds.meta.get("collect") or {}
        same = {**old, "teacher": None} == {**record, "teacher": None}  # the teacher by content, not by name
        if ds.num_episodes and not same:
            raise ValueError(f"{out_dir} already holds episodes collected with other settings or another "
                             f"teacher ({old}); choose another --out to collect with these")
        table = ds.episode_table()
        done = set(zip(table["task"].tolist(), table["key"].tolist(), strict=True))
    jobs = [(t, e) for t in tasks for e in range(episodes) if (model.cfg.tasks.index(t), e) not in done]
    if len(jobs) < len(tasks) * episodes:
        echo(f"{out_dir}: {len(tasks) * episodes - len(jobs)} of the episodes are already there, resuming")

    returns = {t: [] for t in tasks}
    cfg = model.cfg
    with EpisodeWriter(out_dir, cfg.obs_dim, cfg.action_dim, cfg.tasks) as writer:
        writer.meta["collect"] = record
        results, pool = _results(model, jobs, workers, teacher, teacher_tasks, settings)
        last = time.monotonic()
        try:
            for ep in tqdm(results, total=len(jobs), unit="ep", desc="collect", disable=not progress):
                writer.add(ep["obs"], ep["action"], ep["reward"], task=ep["task"], key=ep["key"])
                returns[cfg.tasks[ep["task"]]].append(float(ep["reward"].sum()))
                if time.monotonic() - last > flush_seconds:  # bound what an interruption can lose
                    writer.flush()
                    last = time.monotonic()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    for t, r in returns.items():
        if r:
            echo(f"{t:<26} {len(r)} episode(s), mean return {np.mean(r):8.1f}")
    return returns


def _results(model, jobs, workers, teacher, teacher_tasks, settings):
    """An iterator of rollouts in job order, from a spawn pool (workers >= 1) or this process (0)."""
    if workers == 0:
        def run_here():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for task, episode in jobs:
                    yield rollout(model, task, episode, **settings)
            finally:
                torch.set_num_threads(threads)
        return run_here(), None
    pool = mp.get_context("spawn").Pool(min(workers, max(len(jobs), 1)), initializer=_init_worker,
                                        initargs=(str(teacher), teacher_tasks, settings))
    return pool.imap(_run_job, jobs), pool
