"""The runtime interface: an executor of the planning step that keeps its own warm start (Polygraphy-style runners).

A runtime turns (obs, task, t0) into an action. Everything its callers use is declared here: `cfg` (the
planner settings it runs), `prev_mean` (the warm-start mean, None for a policy-only runtime) with
`planned_mean()` and `advance_mean(ticks)` for the control loop, `reset`, `act`, `close` and use as a context
manager.

A non-finite observation (NaN or Inf, from a broken sensor or a diverged simulation), or one with an entry
beyond +-`control.OBS_LIMIT`, never reaches the networks, in every runtime: `act` returns the safe action
instead, the last action this runtime returned in the episode (zeros before its first), plans nothing (the warm
start and the noise stream stay where they were), sets `flagged` and counts it in `nonfinite`. A step whose
action comes out non-finite all the same is answered and counted the same way (its warm start has moved).

`TorchRuntime` (PyTorch eager, the reference) lives here; the compiled runtimes and the registry of every
runtime by name are `edge_tdmpc.compile.runtimes`. A runtime only loads and runs: compiling is a step of its own
(`edge_tdmpc.compile`).
"""
import copy
from abc import ABC, abstractmethod

import numpy as np
import torch

from edge_tdmpc.control import copy_mean, shift_mean, usable
from edge_tdmpc.planner import Agent, Noise, PlannerConfig
from edge_tdmpc.tasks import check_task_index

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _host(x):
    return x.detach().cpu() if torch.is_tensor(x) else x


class Runtime(ABC):
    name = "base"
    precisions: tuple[str, ...] = ("fp32",)
    prev_mean = None  # the warm-start mean (H x A) after the last step: set by runtimes that plan
    action_dim: int   # the (padded) action dim it returns
    tasks: tuple      # the model's task set (`act` takes an index into it)
    nonfinite = 0     # steps flagged: non-finite observation or action (never reset: the caller takes differences)
    labels = False    # whether `plan_label()` gives the planner's label of a step

    def __init__(self, precision="fp32", planner: PlannerConfig | None = None, seed=0):
        if precision not in self.precisions:
            raise ValueError(f"runtime '{self.name}' supports precisions {list(self.precisions)}, not '{precision}'")
        self.precision, self.cfg, self.seed = precision, planner or PlannerConfig(), seed
        self.last_action, self.flagged, self._label = None, False, None

    def reset(self, seed: int | None = None):
        """Start of an episode: clear the warm-start mean and the safe action (and reseed the noise when given a
        seed)."""
        self.last_action, self.flagged, self._label = None, False, None
        self._reset(seed)

    def act(self, obs: np.ndarray, task: int | None, t0: bool, eval_mode=False,
            noise: Noise | None = None) -> np.ndarray:
        """Padded observation (or the task's own) -> action in [-1, 1] (padded action dim); a non-finite
        observation -> the safe action, flagged (module doc)."""
        task = check_task_index(task, self.tasks)
        self._label = None
        if not usable(_host(obs)):
            return self._safe_action()
        self.flagged = False
        action = np.asarray(self._act(obs, task, t0, eval_mode, noise), np.float32)
        if not np.isfinite(action).all():
            self._label = None
            return self._safe_action()
        self.last_action = action
        return action.copy()

    def _safe_action(self) -> np.ndarray:
        """A flagged step's answer: the last action returned in the episode, zeros before the first."""
        self.flagged = True
        self.nonfinite += 1
        return (self.last_action if self.last_action is not None else np.zeros(self.action_dim, np.float32)).copy()

    @abstractmethod
    def _reset(self, seed: int | None):
        """The runtime's own start of an episode."""

    @abstractmethod
    def _act(self, obs, task, t0, eval_mode, noise) -> np.ndarray:
        """One step on a finite observation."""

    def plan_label(self) -> np.ndarray:
        """The planner's label of the last step (`planner.PlanLabel` as one row: mean, std and eval-mode action
        of the first action, [3A] float32); None after a flagged step."""
        if not (self.labels and self.cfg.mpc):
            raise ValueError(f"runtime '{self.name}' gives no planner labels{'' if self.cfg.mpc else ' without MPC'}"
                             ": label with the torch or onnxruntime runtime, planning")
        return None if self._label is None else self._label.copy()

    def planned_mean(self) -> np.ndarray | None:
        """A copy of the warm-start mean after the last step (H x A), or None without MPC."""
        return copy_mean(self.prev_mean) if self.cfg.mpc else None

    def advance_mean(self, ticks: int):
        """Warm start across `ticks` skipped control ticks (each step shifts the mean by one; these passed
        unplanned), in place so a CUDA graph's input buffer stays put."""
        if self.cfg.mpc and self.prev_mean is not None:
            shift_mean(self.prev_mean, ticks)

    def size_bytes(self) -> int:
        """Bytes of the weights / artifact this runtime executes."""
        return 0

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchRuntime(Runtime):
    """PyTorch eager, the reference: fp32, or real fp16/bf16 execution (weights and activations cast)."""
    name = "torch"
    precisions = ("fp32", "fp16", "bf16")
    labels = True

    def __init__(self, model, precision="fp32", planner=None, seed=0, device=None):
        super().__init__(precision, planner, seed)
        self.model = copy.deepcopy(model).to(device=device or "cpu", dtype=TORCH_DTYPES[precision]).eval()
        self.action_dim, self.tasks = self.model.cfg.action_dim, self.model.cfg.tasks
        self.reset(seed)

    def _reset(self, seed):
        seed = self.seed if seed is None else seed
        self.agent = Agent(self.model, seed=seed, **vars(self.cfg))

    def _act(self, obs, task, t0, eval_mode, noise):
        action = self.agent.act(obs, t0=t0, eval_mode=eval_mode, task=task, noise=noise).numpy()
        if self.cfg.mpc:
            self._label = self.agent.last_label.row()
        return action

    @property
    def prev_mean(self):
        return self.agent.prev_mean

    def size_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
