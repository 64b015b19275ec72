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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.checkpoint import save_model
from edge_tdmpc.distill.collect import play
from edge_tdmpc.distill.data import Batch, EpisodeWriter
from edge_tdmpc.distill.loop import closed_loop_eval
from edge_tdmpc.distill.runlog import Checkpoints, MetricsLog, external_logger
from edge_tdmpc.distill.teacher import write_json
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.tasks import MT30_DIMS, resolve_tasks


class Replay:
    """In-memory episodes sampled as H+1-step slices that never cross an episode boundary (the Batch of
    edge_tdmpc.distill.data, so the same Trainer consumes both)."""

    def __init__(self, obs_dim, action_dim, horizon=3, batch_size=256, seed=0):
        self.obs_dim, self.action_dim, self.horizon, self.batch_size = obs_dim, action_dim, horizon, batch_size
        self.episodes: list[dict] = []
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._starts = np.zeros(0, np.int64)  # cumulative valid slice starts per episode

    def add(self, obs, action, reward, task: int):
        ep = dict(obs=_pad(np.asarray(obs, np.float32), self.obs_dim),
                  action=_pad(np.asarray(action, np.float32), self.action_dim),
                  reward=np.asarray(reward, np.float32), task=int(task))
        self.episodes.append(ep)
        n = max(len(ep["action"]) - self.horizon + 1, 0)
        self._starts = np.append(self._starts, (self._starts[-1] if len(self._starts) else 0) + n)

    @property
    def num_transitions(self) -> int:
        return sum(len(e["action"]) for e in self.episodes)

    def sample(self) -> Batch:
        total = int(self._starts[-1])
        s = self.rng.integers(0, total, size=self.batch_size)
        e = np.searchsorted(self._starts, s, side="right")
        t = s - np.concatenate([[0], self._starts])[e]
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
                    reward=cat("reward"))

    def load_state_dict(self, sd):
        self.episodes, self._starts = [], np.zeros(0, np.int64)
        o = a = 0
        for T, task in zip(sd["lengths"], sd["tasks"], strict=True):
            self.add(sd["obs"][o:o + T + 1].numpy(), sd["action"][a:a + T].numpy(), sd["reward"][a:a + T].numpy(),
                     task)
            o, a = o + T + 1, a + T
        self.rng.bit_generator.state = sd["rng"]


def _pad(x, dim):
    return np.pad(x, ((0, 0), (0, dim - x.shape[1]))) if x.shape[1] < dim else x


def train(tasks, out, size: int | None = 1, steps: int = 100_000, seed: int = 1, dims: dict | None = None,
          mpc=False, seed_steps: int | None = None, episode_steps: int = 500, utd: float = 1.0,
          batch_size: int = 256, save_every: int = 10_000, log_every: int = 500, eval_every: int = 0,
          eval_episodes: int = 1, eval_steps: int = 500, resume=False, logger=None, progress=True, echo=print,
          planner: dict | None = None, **train_overrides) -> dict:
    """Online TD-MPC2 on `tasks` for `steps` environment steps -> out/model.pt (official layout), metrics."""
    tasks = resolve_tasks(tasks)
    if steps < 1 or episode_steps < 4 or utd <= 0:
        raise ValueError(f"need steps >= 1, episode_steps >= 4 and utd > 0; got {steps}, {episode_steps}, {utd}")
    seed_steps = max(1000, 5 * episode_steps) if seed_steps is None else seed_steps
    seed_steps = min(seed_steps, steps)
    planner = planner or {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.make(batch_size=batch_size, seed=seed, d_coef=0.0, **train_overrides)
    model = build_student(tasks, size, seed, "cpu", **(dims or {}))
    mc = model.cfg
    trainer = Trainer(model, cfg)
    replay = Replay(mc.obs_dim, mc.action_dim, batch_size=batch_size, seed=seed)
    settings = dict(tasks=list(tasks), size=size, dims=dims or {}, steps=steps, seed=seed, mpc=mpc,
                    seed_steps=seed_steps, episode_steps=episode_steps, utd=utd, planner=planner,
                    train=asdict(cfg))
    ckpts = Checkpoints(out / "checkpoints")
    env_steps = episodes = 0
    update_budget = 0.0
    resume_step = None
    if ckpts.paths() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or pick a new --out")
    if resume and (state := ckpts.latest(echo)) is not None:
        same = lambda d: {k: v for k, v in d.items() if k != "steps"}  # noqa: E731 (a longer run may resume)
        if same(state["settings"]) != same(json.loads(json.dumps(settings))):
            raise ValueError(f"cannot resume {out}: it was started with other settings ({state['settings']})")
        trainer.load_state_dict(state["trainer"])
        replay.load_state_dict(state["replay"])
        env_steps, episodes, update_budget = state["env_steps"], state["episodes"], state["update_budget"]
        resume_step = env_steps
        echo(f"resumed at {env_steps} environment steps, {trainer.step} updates")
    write_json(out / "run.json", settings)
    log = MetricsLog(out, resume_step, external_logger(logger, out, settings))

    def checkpoint():
        ckpts.save(dict(trainer=trainer.state_dict(), replay=replay.state_dict(), env_steps=env_steps,
                        episodes=episodes, update_budget=update_budget, settings=json.loads(json.dumps(settings))),
                   env_steps)
        save_model(model, out / "model.pt")

    last_save = env_steps
    sums, n, t_log = {}, 0, time.perf_counter()

    def learn(t):
        """After global step s = env_steps + t (0-based, the official `_step`): pretrain with `seed_steps`
        updates at s == seed_steps, then `utd` per step."""
        nonlocal update_budget, sums, n, t_log
        s = env_steps + t
        if s < seed_steps or not replay.episodes:
            return
        update_budget += seed_steps if s == seed_steps else utd
        while update_budget >= 1:
            info = trainer.update(replay.sample())
            update_budget -= 1
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if trainer.step % log_every == 0:
                dt = time.perf_counter() - t_log
                log.write({"kind": "train", "step": s + 1, "updates": trainer.step,
                           **{k: v / n for k, v in sums.items()}, "updates_per_s": n / dt})
                sums, n, t_log = {}, 0, time.perf_counter()

    with tqdm(total=steps, initial=env_steps, unit="step", desc="train", disable=not progress,
              dynamic_ncols=True) as pbar:
        while env_steps < steps:
            i = episodes % len(tasks)
            task = tasks[i]
            length = min(episode_steps, steps - env_steps)
            random_phase = env_steps < seed_steps
            obs, action, reward = play(model, task, i if mc.multitask else None, derive_seed(seed, episodes),
                                       length, mpc, random_actions=random_phase, after_step=learn, **planner)
            replay.add(obs, action, reward, i)
            T = len(action)
            env_steps, episodes = env_steps + T, episodes + 1
            pbar.update(T)
            log.write({"kind": "episode", "step": env_steps, "task": task, "return": float(reward.sum()),
                       "length": T, "random": random_phase})
            if eval_every and (env_steps // eval_every) > ((env_steps - T) // eval_every):
                returns = closed_loop_eval(model, tasks, eval_episodes, eval_steps, seed + 10_000, mpc, **planner)
                log.write({"kind": "eval", "step": env_steps, **returns,
                           "mean_return": float(np.mean(list(returns.values())))})
                pbar.set_postfix(eval=f"{np.mean(list(returns.values())):.0f}")
            if env_steps - last_save >= save_every or env_steps >= steps:
                checkpoint()
                last_save = env_steps
    if resume_step == env_steps:
        save_model(model, out / "model.pt")
    write_replay(replay, out / "replay", tasks)
    return dict(model=str(out / "model.pt"), env_steps=env_steps, updates=trainer.step, episodes=episodes)


def write_replay(replay: Replay, root: Path, tasks):
    """The run's replay in the on-disk episode format (so `edge-tdmpc distill --data` can use it)."""
    if (root / "index.json").exists():
        import shutil
        shutil.rmtree(root)
    own = [MT30_DIMS[t] for t in tasks]
    with EpisodeWriter(root, replay.obs_dim, replay.action_dim, tasks) as w:
        for k, ep in enumerate(replay.episodes):
            o, a = own[ep["task"]]
            w.add(ep["obs"][:, :o], ep["action"][:, :a], ep["reward"], ep["task"], key=k)
