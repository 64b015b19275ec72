"""Roll a teacher out on named tasks and write the episodes as an offline dataset (no download needed).

Each (task, episode) has its own seed, derived from (seed, task index, episode), for the environment and the
agent's noise alike, so an episode is the same whichever worker runs it. Workers are spawned processes with
one torch thread each; their episodes are written in job order, so the dataset does not depend on --workers.
Exploration: the agent acts stochastically (the planner's final action noise, or a sampled policy action
with --no-mpc), plus optional Gaussian noise of std `noise_std`. An interrupted collection resumes: episodes
already in the dataset are skipped.

With --mpc every step also stores the planner's label (`planner.PlanLabel`: the final MPPI iteration's mean and
std of the first action and the action it would execute without noise) as the dataset's per-step field
`planner`, the targets of `--distill planner`. The teacher runs on `runtime` (torch, or onnxruntime: the
teacher compiled first, the fastest planner on a CPU).
"""
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from edge_tdmpc.checkpoint import load_model
from edge_tdmpc.distill.data import INDEX, EpisodeDataset, EpisodeWriter
from edge_tdmpc.files import file_sha256
from edge_tdmpc.options import check_choices, check_min, setting
from edge_tdmpc.planner import Agent, PlannerConfig
from edge_tdmpc.rollout import run
from edge_tdmpc.runtime import PRECISIONS, TORCH_DTYPES
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.tasks import resolve_tasks
from edge_tdmpc.workers import worker_map


def play(model, task: str, task_index, seed: int, steps: int, mpc=True, eval_mode=False, noise_std=0.0,
         random_actions=False, after_step=None, runtime=None, labels=False, label_every=0, **planner) -> tuple:
    """One episode (the rollout loop of `data collect` and `train`) -> (obs [T+1, own obs dim], action [T, own
    action dim], reward [T], planner labels [T, 3A] or None). Env, agent noise and the episode's numpy draws
    (uniform actions when `random_actions`, else N(0, noise_std) added to the agent's action) are all seeded by
    `seed`; `after_step(t)` runs after the t-th step (the online trainer's updates). The agent is `model` itself
    (an `Agent` over the live weights), or `runtime` (a `Runtime`, reset with `seed`); `labels` keeps each step's
    `PlanLabel` (planning only). `label_every` K > 0 (an agent acting from its prior) has the live model's planner
    label every K-th step the agent acts in; the other steps' rows are NaN (no label). At K 1 the labeller keeps
    its own warm start along the trajectory, as a planning agent would; at K > 1 each label is planned from a
    cold start (a warm start needs a plan at every step: K times the cost)."""
    from edge_tdmpc.envs import make_env
    if label_every and (labels or mpc or runtime is not None):
        raise ValueError("label_every labels a prior's steps with the live model's planner; a planning agent's "
                         "labels are its own (labels=True)")
    env = make_env(task, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    labeller = Agent(model, seed=derive_seed(seed, 1), **{**planner, "mpc": True}) if label_every else None
    no_label = np.full(3 * model.cfg.action_dim, np.nan, np.float32) if label_every else None
    if random_actions:
        agent = None
    elif runtime is not None:
        runtime.reset(seed)

        def agent(obs, t):
            action = runtime.act(obs, task_index, t == 0, eval_mode)
            if labels:
                rows.append(runtime.plan_label())
            return action
    else:
        planner_agent = Agent(model, seed=seed, mpc=mpc, **planner)

        def agent(obs, t):
            action = planner_agent.act(obs, t0=t == 0, eval_mode=eval_mode, task=task_index).numpy()
            if labels:
                rows.append(planner_agent.last_label.row())
            return action
    obs, _ = env.reset()

    def act(obs, t):
        if labeller is not None:
            if agent is not None and t % label_every == 0:
                labeller.act(obs, t0=t == 0 or label_every > 1, eval_mode=True, task=task_index)
                rows.append(labeller.last_label.row())
            else:
                rows.append(no_label)
        if agent is None:
            return rng.uniform(-1, 1, env.action_dim).astype(np.float32)
        action = np.asarray(agent(obs, t))[: env.action_dim]
        if noise_std:
            action = np.clip(action + noise_std * rng.standard_normal(action.shape), -1, 1)
        return action.astype(np.float32)
    obs, action, reward = run(env, obs, act, steps, None if after_step is None else lambda t, _: after_step(t)).arrays()
    if labels and any(r is None for r in rows):
        raise ValueError(f"{task} (seed {seed}): a step saw a non-finite observation and has no planner label")
    return obs, action, reward, np.stack(rows) if labels or label_every else None


def rollout(model, task: str, episode: int, seed=0, mpc=True, noise_std=0.0, steps=500, eval_mode=False,
            runtime=None, **planner) -> dict:
    """One collected episode of `model` (on `runtime` when given) on `task`, seeded by (seed, task, episode) -> a
    dataset record, with the planner's labels when planning."""
    index = model.cfg.tasks.index(task)
    obs, action, reward, labels = play(model, task, index if model.cfg.multitask else None,
                                       derive_seed(seed, index, episode), steps, mpc, eval_mode, noise_std,
                                       runtime=runtime, labels=mpc, **planner)
    fields = {} if labels is None else {"planner": labels}
    return dict(task=index, key=episode, obs=obs, action=action, reward=reward, fields=fields)


COLLECT_RUNTIMES = ("torch", "onnxruntime")


class TeacherSpec(NamedTuple):
    """The teacher's planner as any process loads it (`load_teacher_runtime`): runtime name, compiled artifact
    directory (None for torch), precision, planner settings (PlannerConfig fields)."""
    runtime: str
    directory: str | None
    precision: str
    planner: dict


def compile_teacher(model, runtime="torch", precision="fp32", mpc=True, planner=None, echo=None) -> TeacherSpec:
    """The compile step of collecting or labelling on `runtime` (onnxruntime: the artifact, from the compile cache
    when it was compiled before)."""
    cfg = PlannerConfig.make(mpc=mpc, **(planner or {}))
    directory = None
    if runtime != "torch":
        from edge_tdmpc.compile.runtimes import compile_for
        directory = str(compile_for(runtime, model, precision, cfg, echo=echo))
    return TeacherSpec(runtime, directory, precision, dict(vars(cfg)))


def load_teacher_runtime(model, spec: TeacherSpec, seed=0):
    """The teacher's runtime (one ONNX Runtime thread: processes give the parallelism), or None for torch fp32,
    which `play` runs as an `Agent` over the weights."""
    if spec.runtime == "torch" and spec.precision == "fp32":
        return None
    return teacher_planner(model, spec, seed)


def teacher_planner(model, spec: TeacherSpec, seed=0):
    """The teacher's planning runtime for `spec`, torch fp32 included (what labelling steps through)."""
    cfg = PlannerConfig(**spec.planner)
    if spec.runtime == "torch":
        from edge_tdmpc.runtime import TorchRuntime
        return TorchRuntime(model, spec.precision, cfg, seed=seed)
    from edge_tdmpc.compile.runtimes import RUNTIMES
    kwargs = {"threads": 1} if spec.runtime == "onnxruntime" else {}
    return RUNTIMES[spec.runtime](spec.directory, spec.precision, cfg, seed=seed, **kwargs)


@dataclass(frozen=True)
class CollectOptions:
    """The settings of `edge-tdmpc data collect` and `collect()` (their flags: `--field-name`), as the dataset's
    index records them (meta "collect"). eval_mode and planner (overrides of the teacher's planner) are the Python
    API's only."""
    teacher_tasks: str = setting("mt30", "the teacher's task set")
    episodes: int = setting(10, "episodes per task")
    mpc: bool = setting(True, "MPPI planning, or the policy prior")
    noise_std: float = setting(0.0, "extra Gaussian noise on actions")
    steps: int = setting(500, "agent steps per episode (500 = full)")
    workers: int = setting(1, "worker processes (0: this process)")
    seed: int = setting(0)
    eval_mode: bool = setting(False, "act without the final action noise (the planner's eval mode)")
    planner: dict | None = setting(None, "planner overrides (PlannerConfig fields)")
    runtime: str = setting("torch", "the teacher's runtime (onnxruntime: compiled first, faster on a CPU)",
                           choices=COLLECT_RUNTIMES)
    precision: str = setting("fp32", "the teacher runtime's precision (torch: fp32/fp16/bf16; onnxruntime also "
                             "int8/mixed)", choices=PRECISIONS)

    def __post_init__(self):
        object.__setattr__(self, "planner", dict(self.planner or {}))
        check_min(self, 1, "episodes", "steps")
        check_min(self, 0, "workers", "noise_std")
        check_choices(self)
        if self.runtime == "torch" and self.precision not in TORCH_DTYPES:
            raise ValueError(f"--precision {self.precision} runs on onnxruntime: pass --runtime onnxruntime")
        PlannerConfig.make(mpc=self.mpc, **self.planner)  # unknown or inconsistent planner settings


# settings that do not change the episodes: a collection may resume with others
RESUME_MAY_CHANGE = ("episodes", "workers")


_WORKER = {}


def _init_worker(teacher, teacher_tasks, settings, spec):
    model = load_model(teacher, tasks=teacher_tasks)
    _WORKER.update(model=model, settings=settings, runtime=load_teacher_runtime(model, spec, settings["seed"]))


def _run_job(job):
    task, episode = job
    return rollout(_WORKER["model"], task, episode, runtime=_WORKER["runtime"], **_WORKER["settings"])


def collect(teacher, tasks, out_dir, options: CollectOptions | None = None, *, echo=print, progress=True,
            flush_seconds=60.0, **settings) -> dict:
    """Collect `episodes` per task into `out_dir` -> {task: [episode returns]} of the episodes run now.

    `settings` override fields of `options` (CollectOptions: the flags of `edge-tdmpc data collect`).
    workers=0 runs in this process (still one torch thread, so results match any worker count)."""
    opts = replace(options or CollectOptions(), **settings)
    model = load_model(teacher, tasks=opts.teacher_tasks)
    tasks = resolve_tasks(tasks)
    for t in tasks:
        if t not in model.cfg.tasks:
            raise ValueError(f"task '{t}' is not in the teacher's task set ({len(model.cfg.tasks)} tasks); "
                             "pick tasks it was trained on, or pass --teacher-tasks")
    run_settings = dict(seed=opts.seed, mpc=opts.mpc, noise_std=opts.noise_std, steps=opts.steps,
                        eval_mode=opts.eval_mode, **opts.planner)  # what rollout() takes
    record = json.loads(json.dumps(dict(asdict(opts), teacher=Path(teacher).name,
                                        teacher_sha256=file_sha256(teacher))))
    out_dir = Path(out_dir)
    done = set()
    if (out_dir / INDEX).exists():
        ds = EpisodeDataset(out_dir)
        old = ds.meta.get("collect") or {}
        ignored = {*RESUME_MAY_CHANGE, "teacher"}  # the teacher by content (teacher_sha256), not by name
        diff = sorted(k for k in {*old, *record} - ignored if old.get(k) != record.get(k))
        if ds.num_episodes and diff:
            raise ValueError(f"{out_dir} already holds episodes collected with other settings or another "
                             "teacher (" + ", ".join(f"{k}={old.get(k)!r}, now {record.get(k)!r}" for k in diff)
                             + "); choose another --out to collect with these")
        table = ds.episode_table()
        done = set(zip(table["task"].tolist(), table["key"].tolist(), strict=True))
    episodes = opts.episodes
    jobs = [(t, e) for t in tasks for e in range(episodes) if (model.cfg.tasks.index(t), e) not in done]
    if len(jobs) < len(tasks) * episodes:
        echo(f"{out_dir}: {len(tasks) * episodes - len(jobs)} of the episodes are already there, resuming")

    returns = {t: [] for t in tasks}
    cfg = model.cfg
    spec = compile_teacher(model, opts.runtime, opts.precision, opts.mpc, opts.planner, echo) if jobs else None
    fields = {"planner": 3 * cfg.action_dim} if opts.mpc else {}
    with EpisodeWriter(out_dir, cfg.obs_dim, cfg.action_dim, cfg.tasks, fields=fields) as writer:
        writer.meta["collect"] = record
        init = (str(teacher), opts.teacher_tasks, run_settings, spec)
        with worker_map(_run_job, jobs, opts.workers, _init_worker, init) as results:
            last = time.monotonic()
            for ep in tqdm(results, total=len(jobs), unit="ep", desc="collect", disable=not progress):
                writer.add(ep["obs"], ep["action"], ep["reward"], task=ep["task"], key=ep["key"], **ep["fields"])
                returns[cfg.tasks[ep["task"]]].append(float(ep["reward"].sum()))
                if time.monotonic() - last > flush_seconds:  # bound what an interruption can lose
                    writer.flush()
                    last = time.monotonic()
    for t, r in returns.items():
        if r:
            echo(f"{t:<26} {len(r)} episode(s), mean return {np.mean(r):8.1f}")
    return returns
