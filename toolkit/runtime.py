"""Runtimes: interchangeable executors of the planning step behind one interface (Polygraphy-style runners).

A runtime turns (obs, task, t0) into an action, keeping its own warm-start state. The bench measures any
registered runtime; compile/ registers ONNX Runtime, TensorRT and CUDA-graph runtimes on import.
"""
import importlib
from abc import ABC, abstractmethod

import numpy as np
import torch

from edge_tdmpc.planner import Agent, Noise, PlannerConfig

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUNTIMES: dict[str, type["Runtime"]] = {}
# runtimes provided by other subpackages, imported on first use (keeps `import edge_tdmpc` light)
_PLUGINS = {"onnxruntime": "edge_tdmpc.compile.runtimes", "tensorrt": "edge_tdmpc.compile.runtimes",
            "torch-cuda-graph": "edge_tdmpc.compile.runtimes", "torch-compile": "edge_tdmpc.compile.runtimes",
            "torch-compile-fused": "edge_tdmpc.compile.runtimes", "torch-compile-triton": "edge_tdmpc.compile.runtimes",
            "torch-cuda-graph-triton": "edge_tdmpc.compile.runtimes"}


def register_runtime(name: str):
    def deco(cls):
        cls.name = name
        RUNTIMES[name] = cls
        return cls
    return deco


class Runtime(ABC):
    name = "base"
    precisions: tuple[str, ...] = ("fp32",)

    def __init__(self, model, precision="fp32", planner: PlannerConfig | None = None, seed=0, device=None):
        if precision not in self.precisions:
            raise ValueError(f"runtime '{self.name}' supports precisions {list(self.precisions)}, not '{precision}'")
        self.precision, self.planner, self.seed = precision, planner or PlannerConfig(), seed

    @abstractmethod
    def reset(self, seed: int | None = None):
        """Start of an episode: clear the warm-start mean (and reseed the noise when given a seed)."""

    @abstractmethod
    def act(self, obs: np.ndarray, task: int | None, t0: bool, eval_mode=False,
            noise: Noise | None = None) -> np.ndarray:
        """Padded observation (or the task's own) -> action in [-1, 1] (padded action dim)."""

    def size_bytes(self) -> int:
        """Bytes of the weights / artifact this runtime executes."""
        return 0

    def close(self):
        pass


@register_runtime("torch")
class TorchRuntime(Runtime):
    """PyTorch eager, the reference: fp32, or real fp16/bf16 execution (weights and activations cast)."""
    precisions = ("fp32", "fp16", "bf16")

    def __init__(self, model, precision="fp32", planner=None, seed=0, device=None):
        super().__init__(model, precision, planner, seed, device)
        import copy
        self.model = copy.deepcopy(model).to(device=device or "cpu", dtype=TORCH_DTYPES[precision]).eval()
        self.reset(seed)

    def reset(self, seed=None):
        seed = self.seed if seed is None else seed
        self.agent = Agent(self.model, seed=seed, **vars(self.planner))

    def act(self, obs, task, t0, eval_mode=False, noise=None):
        return self.agent.act(obs, t0=t0, eval_mode=eval_mode, task=task, noise=noise).numpy()

    @property
    def prev_mean(self):  # the warm-start mean after the last step, as the other runtimes keep it
        return self.agent.prev_mean

    def size_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def runtime_class(name: str) -> type[Runtime]:
    """The registered class for `name`, importing its plugin module on first use."""
    if name not in RUNTIMES and name in _PLUGINS:
        importlib.import_module(_PLUGINS[name])
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime '{name}': choose from {sorted(set(RUNTIMES) | set(_PLUGINS))}")
    return RUNTIMES[name]


def make_runtime(name: str, model, precision="fp32", planner=None, seed=0, device=None) -> Runtime:
    return runtime_class(name)(model, precision=precision, planner=planner, seed=seed, device=device)
