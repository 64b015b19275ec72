"""The 30 DMControl tasks of TD-MPC2's MT30 benchmark (19 stock + 11 custom), and the stock tasks of DMC_DIMS
that fit MT30's dims (new tasks to fine-tune on), as gymnasium environments.

    env = make_env("cheetah-run-backwards", seed=1)                # obs (17,), actions (6,) in [-1, 1]
    env = make_env("cheetah-run-backwards", seed=1, multitask=True)  # obs padded to (24,), actions (6,)
"""
import os

# Nothing here renders (observations are state), but dm_control's import looks for a display and warns on every
# headless machine unless told not to; a renderer the user names (MUJOCO_GL=egl, osmesa, glfw) is kept.
os.environ.setdefault("MUJOCO_GL", "disable")

from ..tasks import DMC_DIMS, MT30, TASK_DIMS  # noqa: E402 (after the renderer choice)
from .custom import CUSTOM_TASKS  # noqa: E402
from .dmcontrol import (  # noqa: E402
    ACTION_REPEAT,
    MT30_ACTION_DIM,
    MT30_OBS_DIM,
    DMControlEnv,
    MultitaskEnv,
    check_task,
    episode_env,
    load,
    make_env,
    split_task,
)

__all__ = [
    "ACTION_REPEAT", "CUSTOM_TASKS", "DMC_DIMS", "MT30", "MT30_ACTION_DIM", "MT30_OBS_DIM", "TASK_DIMS", "DMControlEnv",
    "MultitaskEnv", "check_task", "episode_env", "load", "make_env", "split_task",
]
