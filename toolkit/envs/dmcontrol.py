"""DMControl tasks (MT30's 30 and the stock ones of tasks.DMC_DIMS) as gymnasium environments, wrapped exactly
as in the official TD-MPC2 code.

Per agent step the action in [-1, 1] is rescaled to the task's bounds and repeated for ACTION_REPEAT control
steps, summing the rewards; an episode is truncated after EPISODE_LENGTH agent steps (1000 control steps, the
dm_control time limit of every task here). The observation is the dm_control observation dict flattened in
spec order, as float32.
"""
import gymnasium as gym
import numpy as np
from dm_control import suite
from dm_control.suite.wrappers import action_scale

from ..tasks import EPISODE_LENGTH, MT30, TASK_DIMS, unknown_task
from .custom import CUSTOM_TASKS

ACTION_REPEAT = 2
MT30_OBS_DIM, MT30_ACTION_DIM = 24, 6  # largest obs / action dims in MT30: the multitask padding targets
DOMAIN_ALIASES = {"cup": "ball_in_cup", "pointmass": "point_mass"}  # the official code's


def check_task(task: str) -> None:
    if task not in TASK_DIMS:
        raise unknown_task(task)


def split_task(task: str) -> tuple[str, str]:
    """'walker-walk-backwards' -> ('walker', 'walk_backwards'); 'cup-catch' -> ('ball_in_cup', 'catch')."""
    domain, name = task.replace("-", "_").split("_", 1)
    return DOMAIN_ALIASES.get(domain, domain), name


def load(domain: str, task: str, task_kwargs=None, environment_kwargs=None):
    """`dm_control.suite.load` that also knows the custom TD-MPC2 tasks, without touching its registry."""
    if (domain, task) in CUSTOM_TASKS:
        return CUSTOM_TASKS[domain, task](**(task_kwargs or {}), environment_kwargs=environment_kwargs)
    return suite.load(domain, task, task_kwargs=task_kwargs, environment_kwargs=environment_kwargs)


def _flatten(observation) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel() for v in observation.values()]).astype(np.float32)


class DMControlEnv(gym.Env):
    """One task. `seed` seeds the dm_control task (its `random`), exactly as the official code does.

    `dm_env` is the underlying dm_control environment (it takes actions in [-1, 1]); `physics` its physics.
    """

    max_episode_steps = EPISODE_LENGTH

    def __init__(self, task: str, seed: int = 0):
        check_task(task)
        self.task, self.task_index = task, MT30.index(task) if task in MT30 else None  # None: not an MT30 task
        self.obs_dim, self.action_dim = TASK_DIMS[task]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)
        self.dm_env = self._load(seed)
        self._t = None  # agent steps in the current episode; None until reset

    def _load(self, seed):
        domain, name = split_task(self.task)
        env = load(domain, name, task_kwargs={"random": seed})
        return action_scale.Wrapper(env, minimum=-1.0, maximum=1.0)

    @property
    def physics(self):
        return self.dm_env.physics

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            # A fresh dm_control env: the task's random stream is seeded at construction only.
            self.dm_env = self._load(seed)
        self._t = 0
        return _flatten(self.dm_env.reset().observation), {}

    def step(self, action):
        if self._t is None or self._t >= self.max_episode_steps:
            raise RuntimeError(f"{self.task}: call reset() before stepping a new episode")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_dim,):
            raise ValueError(f"{self.task} takes actions of shape ({self.action_dim},), got {action.shape}")
        reward = 0.0
        for _ in range(ACTION_REPEAT):
            time_step = self.dm_env.step(action)
            reward += time_step.reward
        self._t += 1
        return _flatten(time_step.observation), float(reward), False, self._t >= self.max_episode_steps, {}


class MultitaskEnv(gym.Wrapper):
    """Zero-pads observations to `obs_dim` (MT30's 24 by default; a model of a smaller task set pads to its own
    cfg.obs_dim); takes `action_dim` actions, ignoring the extra entries."""

    def __init__(self, env: DMControlEnv, obs_dim: int = MT30_OBS_DIM, action_dim: int = MT30_ACTION_DIM):
        super().__init__(env)
        if obs_dim < env.obs_dim or action_dim < env.action_dim:
            raise ValueError(f"{env.task} has {env.obs_dim} observations and {env.action_dim} actions: it cannot "
                             f"be padded to ({obs_dim}, {action_dim}); use a model whose task set includes it")
        self.padded_obs_dim = obs_dim
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.task, self.task_index = env.task, env.task_index
        self.obs_dim, self.action_dim = env.obs_dim, env.action_dim  # the task's own, unpadded dims
        self.max_episode_steps = env.max_episode_steps

    def _pad(self, obs):
        padded = np.zeros(self.padded_obs_dim, np.float32)
        padded[: self.obs_dim] = obs
        return padded

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._pad(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(action)[: self.action_dim])
        return self._pad(obs), reward, terminated, truncated, info


def make_env(task: str, seed: int = 0, multitask: bool = False, pad_to: tuple[int, int] | None = None) -> gym.Env:
    """The gymnasium env of a task (of tasks.TASK_DIMS); `multitask=True` pads it to the shared MT30 obs/action
    sizes, or to `pad_to` = (obs_dim, action_dim) of a multitask model trained on another task set."""
    env = DMControlEnv(task, seed)
    return MultitaskEnv(env, *(pad_to or (MT30_OBS_DIM, MT30_ACTION_DIM))) if multitask else env


def episode_env(task: str, seed: int, episode: int = 0, **kw) -> tuple[gym.Env, np.ndarray]:
    """(env, first observation) of episode `episode` as the official evaluation starts it: the task's env
    seeded with `seed`, reset episode+1 times (official evaluate.py keeps one env per task, and only resets
    draw from its random stream). `kw` goes to make_env."""
    env = make_env(task, seed=seed, **kw)
    for _ in range(episode + 1):
        obs, _ = env.reset()
    return env, obs
