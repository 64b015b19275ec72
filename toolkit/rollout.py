"""The closed-loop episode, written once: env, seeds, the actor call, timing, an `on_step` hook, the deadline.

Every caller (`eval`, the bench's workers, calibration and verification recordings, data collection, online
training, the trainer's evaluation, the demo) runs its episodes through `run`; what differs between them is
the actor, a function `act(obs, t) -> action` built around an `Agent` or a runtime.

    env, obs = episode_env("walker-walk", seed=1, episode=0)      # the official evaluation's initial state
    ep = run(env, obs, runtime_actor(runtime, model.cfg, "walker-walk"), steps=500)
    ep.ret, ep.act_ns                                             # return, agent time per step
"""
import time
from dataclasses import dataclass, field

import numpy as np

from edge_tdmpc.control import ActionFilter, DeadlineSim, check_budget, check_fallback, usable
from edge_tdmpc.seeding import evaluation_seeds
from edge_tdmpc.tasks import fit_obs


@dataclass
class Episode:
    """What one episode saw and did, in the env's own dimensions."""
    obs: list = field(default_factory=list)        # T + 1 observations (the first one included)
    actions: list = field(default_factory=list)    # T actions as executed (float32, the env's action dims)
    rewards: list = field(default_factory=list)    # T rewards
    act_ns: list = field(default_factory=list)     # T agent times (around `act`, host<->device copies included)
    env_ns: int = 0                                 # env time, all steps together
    wall_s: float = 0.0
    nonfinite: int = 0                              # steps whose observation was not control.usable

    @property
    def ret(self) -> float:
        return float(sum(self.rewards))

    @property
    def steps(self) -> int:
        return len(self.rewards)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(obs [T+1, obs dim], action [T, action dim], reward [T]) as a dataset stores an episode."""
        return np.stack(self.obs), np.stack(self.actions), np.asarray(self.rewards, np.float32)


def run(env, obs, act, steps: int, on_step=None) -> Episode:
    """Up to `steps` steps from `obs` (the env's first observation): action = act(obs, t), cut to the env's action
    dims; on_step(t, episode) after each step (progress, memory samples, the online trainer's updates)."""
    ep, wall = Episode(obs=[obs]), time.perf_counter()
    for t in range(steps):
        ep.nonfinite += not usable(obs)  # the runtimes act safely on them (`runtime.Runtime`); counted here
        t0 = time.perf_counter_ns()
        action = np.asarray(act(obs, t), np.float32)[: env.action_dim]
        t1 = time.perf_counter_ns()
        obs, reward, terminated, truncated, _ = env.step(action)
        ep.env_ns += time.perf_counter_ns() - t1
        ep.act_ns.append(t1 - t0)
        ep.obs.append(obs)
        ep.actions.append(action)
        ep.rewards.append(reward)
        if on_step is not None:
            on_step(t, ep)
        if terminated or truncated:
            break
    env.close()
    ep.wall_s = time.perf_counter() - wall
    return ep


def runtime_actor(runtime, model_cfg, task: str, eval_mode=False):
    """act(obs, t) of a runtime (or an `Agent`-like object with the runtime signature) on `task`: the observation
    padded to the model's, the task's index for a multi-task model, t0 at the first step."""
    index = model_cfg.tasks.index(task) if model_cfg.multitask else None
    name = task if model_cfg.multitask else None

    def act(obs, t):
        return runtime.act(fit_obs(obs, model_cfg.obs_dim, name), index, t0=t == 0, eval_mode=eval_mode)
    return act


@dataclass(frozen=True)
class ControlOptions:
    """The robot's control loop as the bench simulates it (`control.DeadlineSim`); the names of the bench's
    flags (--hz, --latency-ms, --fallback, --budget, --smooth, --rate-limit) and of report.json's settings."""
    hz: float | None = None            # the control rate whose deadline applies (None: none, the filter alone)
    latency_ms: float | None = None    # assumed planning latency (None: each plan's measured one)
    fallback: str = "hold"             # a tick without a fresh plan: hold, plan or policy
    budget: float = 1.0                # fraction of the period a tick waits for its own plan
    smooth: float = 1.0                # the action low-pass's smoothing alpha (1: off)
    rate_limit: float | None = None    # largest action change per tick (None: off)

    def __post_init__(self):
        check_fallback(self.fallback)
        check_budget(self.budget)
        ActionFilter(self.smooth, self.rate_limit)  # checks them
        if self.hz is not None and not self.hz > 0:
            raise ValueError(f"--hz must be positive, got {self.hz}")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise ValueError(f"--latency-ms must be positive, got {self.latency_ms}")


def with_deadline(runtime, control: ControlOptions | dict | None, policy=None):
    """The runtime as the robot's control loop runs it (`control.DeadlineSim`), or as it is without settings;
    policy: the "policy" fallback's runtime."""
    if not control:
        return runtime
    c = control if isinstance(control, ControlOptions) else ControlOptions(**control)
    return DeadlineSim(runtime, c.hz, c.fallback, ActionFilter(c.smooth, c.rate_limit), c.latency_ms, policy,
                       c.budget)


def evaluation_episode(runtime, model_cfg, task: str, seed: int, episode: int, steps=500, eval_mode=False,
                       control: ControlOptions | dict | None = None, policy=None,
                       on_step=None) -> tuple[Episode, object, dict]:
    """One episode of the official evaluation protocol: the initial state of `episode` under env seed `seed`,
    planner noise seeded from (seed, task, episode) (`seeding.evaluation_seeds`), optionally under a control
    deadline. -> (episode, the actor that ran it (a DeadlineSim keeps tick stats), its seeds)."""
    from edge_tdmpc.envs import episode_env
    env_seed, noise_seed = evaluation_seeds(seed, task, episode)
    env, obs = episode_env(task, env_seed, episode)
    agent = with_deadline(runtime, control, policy)
    agent.reset(noise_seed)
    ep = run(env, obs, runtime_actor(agent, model_cfg, task, eval_mode), steps, on_step)
    return ep, agent, {"env_seed": env_seed, "noise_seed": noise_seed}
