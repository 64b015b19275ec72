"""Task sets as plain data: names, dims and episode lengths (no simulator import needed)."""
import difflib

import numpy as np

# (obs_dim, action_dim) per task, in the official MT30 order (task index = position).
MT30_DIMS = {
    "walker-stand": (24, 6), "walker-walk": (24, 6), "walker-run": (24, 6), "cheetah-run": (17, 6),
    "reacher-easy": (6, 2), "reacher-hard": (6, 2), "acrobot-swingup": (6, 1), "pendulum-swingup": (3, 1),
    "cartpole-balance": (5, 1), "cartpole-balance-sparse": (5, 1), "cartpole-swingup": (5, 1),
    "cartpole-swingup-sparse": (5, 1), "cup-catch": (8, 2), "finger-spin": (9, 2), "finger-turn-easy": (12, 2),
    "finger-turn-hard": (12, 2), "fish-swim": (24, 5), "hopper-stand": (15, 4), "hopper-hop": (15, 4),
    # the 11 custom tasks of TD-MPC2
    "walker-walk-backwards": (24, 6), "walker-run-backwards": (24, 6), "cheetah-run-backwards": (17, 6),
    "cheetah-run-front": (17, 6), "cheetah-run-back": (17, 6), "cheetah-jump": (17, 6),
    "hopper-hop-backwards": (15, 4), "reacher-three-easy": (8, 3), "reacher-three-hard": (8, 3),
    "cup-spin": (8, 2), "pendulum-spin": (3, 1),
}
MT30 = tuple(MT30_DIMS)
# Stock DeepMind Control tasks outside MT30 whose dims fit the MT30 models' 24/6: new tasks to fine-tune on.
DMC_DIMS = {
    "pointmass-easy": (4, 2), "pointmass-hard": (4, 2), "acrobot-swingup-sparse": (6, 1),
    "cartpole-two-poles": (8, 1), "cartpole-three-poles": (11, 1), "fish-upright": (21, 5),
}
TASK_DIMS = {**MT30_DIMS, **DMC_DIMS}  # every task the env wrapper makes
EPISODE_LENGTH = 500  # agent steps per DMC episode (action repeat 2)

TASK_SETS = {"mt30": MT30}


def unknown_task(task: str, known=tuple(TASK_DIMS)) -> ValueError:
    close = difflib.get_close_matches(task, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ValueError(f"unknown task '{task}': {hint}the known tasks are edge_tdmpc.tasks.TASK_DIMS (MT30 and "
                      "the DMControl tasks that fit its dims)")


def resolve_tasks(tasks) -> tuple[str, ...]:
    """'mt30' or a task name or a list of names -> tuple of task names."""
    if isinstance(tasks, str):
        if tasks in TASK_SETS:
            return TASK_SETS[tasks]
        tasks = [t for t in tasks.split(",") if t]
    tasks = tuple(tasks)
    for t in tasks:
        if t not in TASK_DIMS:
            raise unknown_task(t)
    return tasks


def check_task_subset(tasks, known, owner: str):
    """`tasks` must name tasks of `known` (the task set of `owner`, e.g. "the model"), each once."""
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"task {unknown[0]!r} is not in {owner}'s task set ({len(known)} tasks); pick from it")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task in {','.join(tasks)}: name each task once")


def discount(episode_length: int, denom=5, lo=0.95, hi=0.995) -> float:
    """TD-MPC2's heuristic: longer episodes -> larger discount (500 steps -> 0.99)."""
    frac = episode_length / denom
    return min(max((frac - 1) / frac, lo), hi)


def check_task_index(task, tasks) -> int | None:
    """A task index as runtimes and the Agent take it: an int (numpy integers too) into `tasks` for a multi-task
    model, None for a single-task one."""
    if len(tasks) <= 1:
        if task not in (None, 0):
            raise ValueError(f"single-task model ({tasks[0] if tasks else '?'}): pass task=None, not {task!r}")
        return None
    if isinstance(task, (bool, np.bool_)) or not isinstance(task, (int, np.integer)):
        raise ValueError(f"multi-task model: pass task=<an int index into its {len(tasks)} tasks>, not {task!r}")
    if not 0 <= task < len(tasks):
        raise ValueError(f"task index {task} is out of range: the model has {len(tasks)} tasks (0..{len(tasks) - 1})")
    return int(task)


def fit_obs(obs, obs_dim: int, task: str | None = None) -> np.ndarray:
    """An observation as a model takes it: obs_dim float32 entries. A multi-task model (pass the task's name)
    also takes the task's own observation and zero-pads it, as the official multitask env does."""
    if np.iscomplexobj(obs) or np.asarray(obs).dtype.kind not in "biuf":
        raise ValueError(f"observation must be real numbers, got dtype {np.asarray(obs).dtype}: pass a float array")
    if np.ndim(obs) > 1:
        raise ValueError(f"observation must be one vector, got shape {np.shape(obs)}: act on one observation at a "
                         "time")
    obs = np.asarray(obs, dtype=np.float32).reshape(-1)
    own = TASK_DIMS.get(task, (None,))[0]
    if obs.size == obs_dim:
        return obs
    if obs.size == own and own < obs_dim:
        return np.concatenate([obs, np.zeros(obs_dim - own, np.float32)])
    also = f" or {task}'s own {own}, zero-padded" if own else ""
    raise ValueError(f"observation has {obs.size} entries but the model expects {obs_dim}{also}")
