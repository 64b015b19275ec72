"""`edge-tdmpc train`: online multi-task TD-MPC2 from scratch (collect, update, repeat) - makes a teacher when
none is at hand, and is the online baseline.

Tasks take turns episode by episode. Episodes that start within the first `seed_steps` environment steps act
uniformly at random. As in the official online trainer, learning is interleaved with acting: at global step
`seed_steps` the model is pretrained with `seed_steps` updates, then makes `utd` updates after every
environment step, sampling completed episodes (the official buffer also receives an episode when it ends), so
the acting policy changes within an episode. Episodes act with the planner (`mpc=True`,
official) or the policy prior (`mpc=False`: ~100x cheaper per step on a CPU), stochastically, seeded by
(seed, episode), so a resumed run replays exactly. State (model, optimisers, replay) is checkpointed
atomically at episode ends.
"""
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.checkpoint import save_model
from edge_tdmpc.distill.collect import play
from edge_tdmpc.distill.data import Batch, EpisodeWriter
from edge_tdmpc.distill.loop import LoopOptions, closed_loop_eval
from edge_tdmpc.distill.runlog import LOGGERS, Checkpoints, MetricsLog, external_logger
from edge_tdmpc.distill.teacher import write_json
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student, parse_dims, parse_size
from edge_tdmpc.options import check_choices, check_min, setting, split_settings
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.tasks import TASK_DIMS, resolve_tasks


@dataclass(frozen=True)
class ScheduleOptions(LoopOptions):
    """The official online schedule's settings (their flags: `--field-name`), shared by `edge-tdmpc train` and
    `edge-tdmpc finetune`. batch_size and seed (LoopOptions) are the run's side of the update's TrainConfig
    (their defaults are its); planner (overrides of the acting planner) is the Python API's only."""
    steps: int = setting(100_000, "environment steps, all tasks together")
    mpc: bool = setting(False, "act by MPPI planning (official, ~100x slower on CPU) or the policy prior")
    seed_steps: int | None = setting(None, "random-action steps first [max(1000, 5 x episode)]", type=int)
    episode_steps: int = setting(500, "agent steps per training episode")
    utd: float = setting(1.0, "updates per environment step")
    batch_size: int = setting(TrainConfig.batch_size)
    logger: str = setting("none", "also send metric rows to TensorBoard or wandb (when installed)", choices=LOGGERS)
    planner: dict | None = setting(None, "planner overrides (PlannerConfig fields) for acting and eval")
    min_steps: ClassVar[int] = 1  # a run that trains nothing is no run (finetune's 0 adds the task alone)

    def __post_init__(self):
        super().__post_init__()
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        put("planner", dict(self.planner or {}))
        if self.logger is None:
            put("logger", "none")
        check_min(self, self.min_steps, "steps")
        check_min(self, 1, "batch_size")
        check_min(self, 4, "episode_steps")
        if self.seed_steps is not None:
            check_min(self, 0, "seed_steps")
        if not (isinstance(self.utd, (int, float)) and 0 < self.utd < float("inf")):
            raise ValueError(f"--utd must be a number > 0, got {self.utd!r}")
        check_choices(self)
        PlannerConfig.make(mpc=self.mpc, **self.planner)  # unknown or inconsistent planner settings

    def schedule(self):
        """These options with the run's seed_steps (the default resolved, at most `steps`): what run.json records
        and a resumed run compares."""
        seed_steps = max(1000, 5 * self.episode_steps) if self.seed_steps is None else self.seed_steps
        return replace(self, seed_steps=min(seed_steps, self.steps))


@dataclass(frozen=True)
class OnlineOptions(ScheduleOptions):
    """The settings of `edge-tdmpc train` and `train()`: the schedule and the model trained from scratch."""
    size: int | None = setting(1, "size preset, or 'custom' with --dims", type=str)
    dims: dict | None = setting(None, "architecture overrides, e.g. mlp_dim=256,latent_dim=64", type=str)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "size", parse_size(self.size, "--size"))
        object.__setattr__(self, "dims", parse_dims(self.dims, "--dims"))


# a resumed run may change these (a longer run, other logging); any other setting must be the run's
RESUME_MAY_CHANGE = ("steps", "logger", "save_every", "log_every", "eval_every", "eval_steps", "eval_episodes")


class Replay:
    """In-memory episodes sampled as H+1-step slices that never cross an episode boundary (the Batch of
    edge_tdmpc.distill.data, so the same Trainer consumes both; its index is the slice's number). With
    `label_dim` every step also keeps a planner label row (NaN: none), which `labels(index)` reads back for the
    slices' first steps."""

    def __init__(self, obs_dim, action_dim, horizon=3, batch_size=256, seed=0, label_dim=0):
        self.obs_dim, self.action_dim, self.horizon, self.batch_size = obs_dim, action_dim, horizon, batch_size
        self.label_dim = label_dim
        self.episodes: list[dict] = []
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._starts = np.zeros(0, np.int64)  # cumulative valid slice starts per episode

    def add(self, obs, action, reward, task: int, labels=None):
        ep = dict(obs=_pad(np.asarray(obs, np.float32), self.obs_dim),
                  action=_pad(np.asarray(action, np.float32), self.action_dim),
                  reward=np.asarray(reward, np.float32), task=int(task))
        if self.label_dim:
            ep["planner"] = (np.full((len(ep["action"]), self.label_dim), np.nan, np.float32) if labels is None
                             else np.asarray(labels, np.float32).reshape(len(ep["action"]), self.label_dim))
        self.episodes.append(ep)
        n = max(len(ep["action"]) - self.horizon + 1, 0)
        self._starts = np.append(self._starts, (self._starts[-1] if len(self._starts) else 0) + n)

    @property
    def num_transitions(self) -> int:
        return sum(len(e["action"]) for e in self.episodes)

    def _locate(self, s):
        e = np.searchsorted(self._starts, s, side="right")
        return e, s - np.concatenate([[0], self._starts])[e]

    def labels(self, index) -> torch.Tensor:
        """[len(index), label_dim]: the planner label rows of slices `index`' first steps (NaN: none)."""
        e, t = self._locate(np.asarray(index, np.int64))
        return torch.from_numpy(np.stack([self.episodes[i]["planner"][j] for i, j in zip(e, t, strict=True)])
                                if len(e) else np.zeros((0, self.label_dim), np.float32))

    def sample(self) -> Batch:
        total = int(self._starts[-1])
        s = self.rng.integers(0, total, size=self.batch_size)
        e, t = self._locate(s)
        H = self.horizon
        obs = np.stack([self.episodes[i]["obs"][j:j + H + 1] for i, j in zip(e, t, strict=True)], 1)
        action = np.stack([self.episodes[i]["action"][j:j + H] for i, j in zip(e, t, strict=True)], 1)
        reward = np.stack([self.episodes[i]["reward"][j:j + H] for i, j in zip(e, t, strict=True)], 1)[..., None]
        task = np.array([self.episodes[i]["task"] for i in e], np.int64)
        return Batch(torch.from_numpy(obs), torch.from_numpy(action), torch.from_numpy(reward),
                     torch.from_numpy(task), torch.from_numpy(s.astype(np.int64)))

    def state_dict(self) -> dict:
        cat = (lambda k: torch.from_numpy(np.concatenate([e[k] for e in self.episodes]))) if self.episodes else (
            lambda k: torch.zeros(0))
        return dict(rng=self.rng.bit_generator.state, lengths=[len(e["action"]) for e in self.episodes],
                    tasks=[e["task"] for e in self.episodes], obs=cat("obs"), action=cat("action"),
                    reward=cat("reward"), **({"planner": cat("planner")} if self.label_dim else {}))

    def load_state_dict(self, sd):
        self.episodes, self._starts = [], np.zeros(0, np.int64)
        o = a = 0
        for T, task in zip(sd["lengths"], sd["tasks"], strict=True):
            self.add(sd["obs"][o:o + T + 1].numpy(), sd["action"][a:a + T].numpy(), sd["reward"][a:a + T].numpy(),
                     task, sd["planner"][a:a + T].numpy() if self.label_dim else None)
            o, a = o + T + 1, a + T
        self.rng.bit_generator.state = sd["rng"]


def _pad(x, dim):
    return np.pad(x, ((0, 0), (0, dim - x.shape[1]))) if x.shape[1] < dim else x


def train(tasks, out, options: OnlineOptions | None = None, *, resume=False, progress=True, echo=print,
          **settings) -> dict:
    """Online TD-MPC2 on `tasks` for `steps` environment steps -> out/model.pt (official layout), metrics.

    `settings` override fields of `options` (OnlineOptions: the flags of `edge-tdmpc train`); any others are
    TrainConfig fields (lr, tau, ...). `resume` continues the run in `out`."""
    tasks = resolve_tasks(tasks)
    own, train_overrides = split_settings(OnlineOptions, settings)
    opts = replace(options or OnlineOptions(), **own).schedule()
    cfg = TrainConfig.make(batch_size=opts.batch_size, seed=opts.seed, d_coef=0.0, **train_overrides)
    model = build_student(tasks, opts.size, opts.seed, "cpu", **opts.dims)
    trainer = Trainer(model, cfg)
    replay = Replay(model.cfg.obs_dim, model.cfg.action_dim, batch_size=opts.batch_size, seed=opts.seed)
    settings = dict(tasks=list(tasks), **asdict(opts), train=asdict(cfg))
    acting = [(t, i if model.cfg.multitask else None) for i, t in enumerate(tasks)]
    return run_online(trainer, replay, acting, out, opts, settings, resume=resume, progress=progress, echo=echo)


def run_online(trainer: Trainer, replay: Replay, acting, out, opts: ScheduleOptions, settings: dict, *,
               sampler=None, before_first_update=None, label_every=0, resume=False, progress=True,
               echo=print) -> dict:
    """The official online schedule around `trainer`'s model: the tasks of `acting` ([(task, the model's index of
    it)]) take turns episode by episode, their episodes go to `replay`, and updates draw from `sampler` (default:
    `replay`; anything with sample/state_dict/load_state_dict). `before_first_update(replay)` runs once, right
    before the first update (after the seed phase). `label_every` K: every K-th step an episode's prior acts
    in gets the live model's planner label (`collect.play`), kept in `replay`. State is checkpointed at episode
    ends in out/checkpoints; `resume` continues from the newest, refusing other `settings` (but
    RESUME_MAY_CHANGE)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, mc = trainer.model, trainer.model.cfg
    sampler = replay if sampler is None else sampler
    settings = json.loads(json.dumps(settings))
    ckpts = Checkpoints(out / "checkpoints")
    env_steps = episodes = 0
    update_budget = 0.0
    resume_step = None
    if ckpts.paths() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or pick a new --out")
    if resume and (state := ckpts.latest(echo)) is not None:
        old = state["settings"]
        diff = sorted(k for k in {*old, *settings} - set(RESUME_MAY_CHANGE) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"cannot resume {out}: it was started with other settings ("
                             + ", ".join(f"{k}={old.get(k)!r}, now {settings.get(k)!r}" for k in diff) + ")")
        trainer.load_state_dict(state["trainer"])
        replay.load_state_dict(state["replay"])
        if sampler is not replay:
            sampler.load_state_dict(state["sampler"])
        env_steps, episodes, update_budget = state["env_steps"], state["episodes"], state["update_budget"]
        resume_step = env_steps
        echo(f"resumed at {env_steps} environment steps, {trainer.step} updates")
    write_json(out / "run.json", settings)
    log = MetricsLog(out, resume_step, external_logger(opts.logger, out, settings))

    def checkpoint():
        ckpts.save(dict(trainer=trainer.state_dict(), replay=replay.state_dict(), env_steps=env_steps,
                        episodes=episodes, update_budget=update_budget, settings=settings,
                        **({} if sampler is replay else {"sampler": sampler.state_dict()})),
                   env_steps)
        save_model(model, out / "model.pt")

    last_save = env_steps
    sums, n, t_log = {}, 0, time.perf_counter()

    def learn(t):
        """After global step s = env_steps + t (0-based, the official `_step`): pretrain with `seed_steps`
        updates at s == seed_steps, then `utd` per step."""
        nonlocal update_budget, sums, n, t_log
        s = env_steps + t
        if s < opts.seed_steps or not replay.episodes:
            return
        update_budget += opts.seed_steps if s == opts.seed_steps else opts.utd
        if update_budget >= 1 and trainer.step == 0 and before_first_update is not None:
            before_first_update(replay)
        while update_budget >= 1:
            info = trainer.update(sampler.sample())
            update_budget -= 1
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if trainer.step % opts.log_every == 0:
                dt = time.perf_counter() - t_log
                log.write({"kind": "train", "step": s + 1, "updates": trainer.step,
                           **{k: v / n for k, v in sums.items()}, "updates_per_s": n / dt})
                sums, n, t_log = {}, 0, time.perf_counter()

    eval_tasks = [t for t, _ in acting]
    with tqdm(total=opts.steps, initial=env_steps, unit="step", desc="train", disable=not progress,
              dynamic_ncols=True) as pbar:
        while env_steps < opts.steps:
            task, index = acting[episodes % len(acting)]
            length = min(opts.episode_steps, opts.steps - env_steps)
            random_phase = env_steps < opts.seed_steps
            obs, action, reward, labels = play(model, task, index, derive_seed(opts.seed, episodes), length,
                                               opts.mpc, random_actions=random_phase, after_step=learn,
                                               label_every=label_every, **opts.planner)
            replay.add(obs, action, reward, index or 0, labels)
            T = len(action)
            env_steps, episodes = env_steps + T, episodes + 1
            pbar.update(T)
            log.write({"kind": "episode", "step": env_steps, "task": task, "return": float(reward.sum()),
                       "length": T, "random": random_phase})
            if opts.eval_every and (env_steps // opts.eval_every) > ((env_steps - T) // opts.eval_every):
                returns = closed_loop_eval(model, eval_tasks, opts.eval_episodes, opts.eval_steps, opts.seed + 10_000,
                                           opts.mpc, **opts.planner)
                log.write({"kind": "eval", "step": env_steps, **returns,
                           "mean_return": float(np.mean(list(returns.values())))})
                pbar.set_postfix(eval=f"{np.mean(list(returns.values())):.0f}")
            if env_steps - last_save >= opts.save_every or env_steps >= opts.steps:
                checkpoint()
                last_save = env_steps
    if resume_step == env_steps:
        save_model(model, out / "model.pt")
    write_replay(replay, out / "replay", mc.tasks)
    return dict(model=str(out / "model.pt"), env_steps=env_steps, updates=trainer.step, episodes=episodes)


def write_replay(replay: Replay, root: Path, tasks):
    """The run's replay in the on-disk episode format (so `edge-tdmpc distill --data` can use it)."""
    if (root / "index.json").exists():
        import shutil
        shutil.rmtree(root)
    own = [TASK_DIMS[t] for t in tasks]
    with EpisodeWriter(root, replay.obs_dim, replay.action_dim, tasks) as w:
        for k, ep in enumerate(replay.episodes):
            o, a = own[ep["task"]]
            w.add(ep["obs"][:, :o], ep["action"][:, :a], ep["reward"], ep["task"], key=k)
