"""Runtimes over compiled artifacts, behind the bench's interface (`edge_tdmpc.runtime.Runtime`).

    onnxruntime       the artifact's step.onnx on ONNX Runtime: CPU here, device='cuda' / 'tensorrt' for the
                      CUDA and TensorRT execution providers of onnxruntime-gpu
    tensorrt          a TensorRT engine built from step.onnx, run with execute_async_v3 inside a CUDA graph
    torch-cuda-graph  `planner.plan` itself on a CUDA GPU, the whole step (noise drawn on the device included)
                      captured in one CUDA graph: fp32 / fp16 / bf16
    torch-compile     the same, with `plan` first fused by torch.compile (Inductor/Triton kernels), then captured
    torch-compile-fused  torch-compile with the rollout's reward and dynamics MLPs stacked into one (fused.py)
    torch-compile-triton torch-compile with each planner MLP one Triton kernel launch (kernels.py)
    torch-cuda-graph-triton  those kernels in the CUDA graph without torch.compile

`model` is a WorldModel (compiled on first use into the cache, keyed by weights, precision and planner) or
the path of a compiled artifact. Without `noise`, each step's noise is drawn as `planner.Agent` draws it
(torch Generator seeded with `seed`), so a seed gives the torch runtime's actions up to precision.
"""
import copy
from pathlib import Path

import numpy as np
import torch

from edge_tdmpc.compile import artifact
from edge_tdmpc.compile.fused import FusedWorldModel
from edge_tdmpc.compile.record import step_feed
from edge_tdmpc.planner import Noise, PlannerConfig, plan, sample_noise
from edge_tdmpc.runtime import PRECISIONS, TORCH_DTYPES, Runtime, TorchRuntime
from edge_tdmpc.tasks import fit_obs


def _numpy(t):
    return np.asarray(t.detach().cpu() if torch.is_tensor(t) else t)


class _ArtifactRuntime(Runtime):
    """A compiled artifact's runtime: noise drawn like planner.Agent, observation padding, warm-start state.
    It loads an artifact directory; compiling one is `artifact.compile_model` / `compiled_runtime`."""
    precisions = PRECISIONS
    target = "cpu"  # the device profile `compiled_runtime` compiles for

    def __init__(self, directory, precision=None, planner=None, seed=0, device=None):
        if not isinstance(directory, (str, Path)):
            raise ValueError(f"runtime '{self.name}' runs a compiled artifact, not a model: compile it first "
                             "(`edge-tdmpc compile`, or edge_tdmpc.compile.runtimes.compiled_runtime)")
        manifest = artifact.read_manifest(directory)
        super().__init__(precision or manifest["precision"], planner, seed)
        artifact.check_matches(manifest, self.precision, planner)
        self.dir, self.manifest = Path(directory), manifest
        self.cfg = PlannerConfig(**manifest["planner"])
        m = manifest["model"]
        self.tasks, self.obs_dim, self.action_dim, self.num_q = m["tasks"], m["obs_dim"], m["action_dim"], m["num_q"]
        self.multitask = len(self.tasks) > 1
        self.reset(seed)

    @classmethod
    def check_available(cls):
        """Raise a one-line ValueError before compiling when this runtime cannot run here."""

    def _reset(self, seed):
        self.generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        self.prev_mean = np.zeros((self.cfg.horizon, self.action_dim), np.float32)

    def _obs(self, obs, task):
        return fit_obs(_numpy(obs), self.obs_dim, self.tasks[task] if self.multitask and task is not None else None)

    def feed(self, obs, task, t0, eval_mode=False, noise: Noise | None = None) -> dict:
        if noise is None:
            noise = sample_noise(self.cfg, self.action_dim, self.num_q, self.generator)
        feed = step_feed(self._obs(obs, task), task, self.prev_mean, t0, noise)
        if eval_mode:  # action + std[0] * 0 == action: the eval-mode action of the same graph
            feed["noise_action"] = np.zeros_like(feed["noise_action"])
        return feed

    def _step(self, out: dict, eval_mode) -> np.ndarray:
        if not self.cfg.mpc:
            return (out["mean"] if eval_mode else out["action"]).astype(np.float32)
        self.prev_mean = out["mean"]
        if "eval_action" in out:
            self._label = np.concatenate([out["mean"][0], out["std"], out["eval_action"]]).astype(np.float32)
        return out["action"].astype(np.float32)

    def size_bytes(self):
        return artifact.artifact_size(self.dir, self.manifest)


class OnnxRuntime(_ArtifactRuntime):
    """step.onnx on ONNX Runtime: one session call per control step."""
    name = "onnxruntime"
    labels = True

    def __init__(self, directory, precision=None, planner=None, seed=0, device=None, threads=None):
        super().__init__(directory, precision, planner, seed, device)
        from edge_tdmpc.compile.session import OnnxSession
        self.session = OnnxSession(self.dir / self.manifest["graph"], device, threads,
                                   trt_cache=self.dir / "ort-trt-cache" if device == "tensorrt" else None,
                                   precision=self.manifest["precision"])

    def _act(self, obs, task, t0, eval_mode, noise):
        return self._step(self.session.run(self.feed(obs, task, t0, eval_mode, noise)), eval_mode)


class TensorRTRuntime(_ArtifactRuntime):
    """A TensorRT engine of step.onnx (built by `edge-tdmpc compile` on a matching GPU, or by the bundle's
    build_engine.py on a Jetson), CUDA-graphed."""
    name = "tensorrt"
    target = "x86-dgpu"
    labels = True

    def __init__(self, directory, precision=None, planner=None, seed=0, device=None, cuda_graph=True):
        super().__init__(directory, precision, planner, seed, device)
        from edge_tdmpc.compile import trt
        engine = self.dir / "step.engine"
        if not engine.exists():
            raise ValueError(f"{self.dir} has no step.engine: build it on this GPU (python3 {self.dir}/build_engine.py)"
                             " or compile for this GPU's target")
        self.engine = trt.Engine(engine, cuda_graph=cuda_graph)

    @classmethod
    def check_available(cls):
        from edge_tdmpc.compile import trt
        trt._trt()

    def _act(self, obs, task, t0, eval_mode, noise):
        return self._step(self.engine.run(self.feed(obs, task, t0, eval_mode, noise)), eval_mode)

    def close(self):
        self.engine.close()


def graph_step(model, cfg: PlannerConfig, obs, task, prev_mean, t0, noise: Noise, gamma, explore):
    """`plan` on tensors only (explore = 0 is eval mode, exactly; task may come as a float): what the CUDA-graph
    runtimes capture and torch-compile hands to torch.compile."""
    noise = noise._replace(action=noise.action * explore)
    task = None if task is None else task.long()
    action, mean, _ = plan(model, obs, task, prev_mean, t0, noise, cfg, gamma)
    return action, mean


class TorchCudaGraphRuntime(Runtime):
    """`planner.plan` on a CUDA GPU with the whole step - noise drawn on the device included - in one CUDA graph.

    Replaying the graph costs one launch instead of the ~1300 kernel launches of an eager step, which is what
    bounds a PyTorch MPPI loop on a GPU (and on Jetson). Noise comes from the device's default generator
    (Philox, seeded by `seed`): a different stream from the CPU Agent's, so same-seed parity with the torch
    runtime holds when `noise` is passed (then a second graph reads it from static buffers).

    Per step the host does one copy in (observation, task, t0, discount and exploration staged in one
    page-locked buffer), one replay and one copy out; the warm-start mean stays on the device.
    """
    name = "torch-cuda-graph"
    precisions = ("fp32", "fp16", "bf16")
    world = None  # model -> the same model with faster networks (fused.py, kernels.py)
    capture = True  # False: run the step eagerly, without a CUDA graph (how the CPU tests check the rest)

    def __init__(self, model, precision="fp32", planner=None, seed=0, device=None):
        super().__init__(precision, planner, seed)
        if self.capture and not torch.cuda.is_available():
            raise ValueError(f"{self.name} needs a CUDA GPU (torch.cuda.is_available() is False): use "
                             "'onnxruntime' or 'torch' here")
        self.device = torch.device(device or ("cuda" if self.capture else "cpu"))
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"{self.name} runs on a CUDA device, not '{device}': pass --device cuda")
        self.dtype = TORCH_DTYPES[precision]
        m = copy.deepcopy(model).to(self.device, self.dtype).eval()
        if m.cfg.multitask:  # renormalise the embedding once: nn.Embedding(max_norm) rewrites it in place per lookup
            with torch.no_grad():
                torch.embedding_renorm_(m._task_emb.weight, torch.arange(len(m.cfg.tasks), device=self.device),
                                        m._task_emb.max_norm, 2.0)
            m._task_emb.max_norm = None
        if self.world is not None:
            m = self.world(m)
        self.model, c = m, m.cfg
        self.action_dim, self.tasks = c.action_dim, c.tasks
        self.gammas = c.discounts
        # static buffers, fp32 as plan() keeps its inputs and statistics (the model casts to its precision)
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, device=self.device, dtype=dtype)  # noqa: E731
        H, A, pin = self.cfg.horizon, c.action_dim, self.device.type == "cuda"
        self.host_in = torch.zeros(c.obs_dim + 4, pin_memory=pin)  # obs, task, t0, gamma, explore
        self.host_action = torch.zeros(A, pin_memory=pin)  # page-locked: both copies are DMA, no staging
        self.inputs, self.prev_mean = z(c.obs_dim + 4), z(H, A)
        self.noise_in = Noise(*(z(*t.shape, dtype=t.dtype) for t in sample_noise(self.cfg, A, c.num_q)))
        self.graphs = {}
        self.step = graph_step
        self.reset(seed)

    def _plan(self, draw: bool):
        c, D, x = self.model.cfg, self.model.cfg.obs_dim, self.inputs
        noise = sample_noise(self.cfg, c.action_dim, c.num_q, device=self.device, capturable=True) if draw \
            else self.noise_in
        task = x[D:D + 1] if c.multitask else None
        action, mean = self.step(self.model, self.cfg, x[:D], task, self.prev_mean, x[D + 1], noise, x[D + 2],
                                 x[D + 3])
        self.prev_mean.copy_(mean)  # the next step's warm start, without a trip through the host
        return action.float()

    def _run(self, draw: bool):
        if not self.capture:
            return self._plan(draw)
        if draw not in self.graphs:
            warm_start = self.prev_mean.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm up outside the graph (allocator, cuBLAS handles)
                for _ in range(2):
                    self._plan(draw)
            torch.cuda.current_stream().wait_stream(s)
            self.prev_mean.copy_(warm_start)  # the warm-up steps moved it
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                action = self._plan(draw)
            self.graphs[draw] = (graph, action)
        graph, action = self.graphs[draw]
        graph.replay()
        return action

    def _reset(self, seed):
        (torch.cuda.manual_seed if self.capture else torch.manual_seed)(self.seed if seed is None else seed)
        self.prev_mean.zero_()

    @torch.no_grad()
    def _act(self, obs, task, t0, eval_mode, noise):
        c, D = self.model.cfg, self.model.cfg.obs_dim
        host = self.host_in.numpy()
        host[:D] = fit_obs(_numpy(obs), D, c.tasks[task] if c.multitask and task is not None else None)
        host[D:] = (task or 0, float(bool(t0)), self.gammas[task or 0], 0.0 if eval_mode else 1.0)
        self.inputs.copy_(self.host_in, non_blocking=True)
        if noise is not None:
            for buf, t in zip(self.noise_in, noise):
                buf.copy_(torch.as_tensor(_numpy(t)))
        self.host_action.copy_(self._run(noise is None), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # host_action is written
        return self.host_action.numpy().copy()

    def size_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


class TorchCompileRuntime(TorchCudaGraphRuntime):
    """torch-cuda-graph with the planning step fused by torch.compile first: Inductor merges the elementwise
    chains (LayerNorm + Mish, SimNorm, the two-hot decode, the MPPI update) into Triton kernels, so the captured
    graph replays a few hundred kernels instead of ~1300. Compiling takes a minute or two per precision; noise
    draws stay outside the compiled region, inside the graph."""
    name = "torch-compile"

    def __init__(self, model, precision="fp32", planner=None, seed=0, device=None):
        super().__init__(model, precision, planner, seed, device)
        self.step = torch.compile(graph_step, fullgraph=True, dynamic=False)


class TorchCompileFusedRuntime(TorchCompileRuntime):
    """torch-compile over a FusedWorldModel: each rollout step runs the reward and dynamics MLPs as one stacked
    network, one GEMM per layer for both, so fewer kernels per step. Kept beside torch-compile until a GPU run
    shows which is faster."""
    name = "torch-compile-fused"
    world = staticmethod(FusedWorldModel.of)


def _triton_world(model):
    from edge_tdmpc.compile.kernels import TritonWorldModel  # imported here: needs triton, built for a GPU
    return TritonWorldModel.of(model)


class TorchCudaGraphTritonRuntime(TorchCudaGraphRuntime):
    """torch-cuda-graph over a TritonWorldModel, without Inductor: the Triton MLP kernels alone, and a fallback
    where torch.compile will not take them."""
    name = "torch-cuda-graph-triton"
    world = staticmethod(_triton_world)


class TorchCompileTritonRuntime(TorchCompileRuntime):
    """torch-compile over a TritonWorldModel: dynamics, reward, policy and the chosen Q heads each run as one
    Triton kernel (all three layers of an MLP in one launch), Inductor fuses the planner's statistics around
    them, and the step is captured in one CUDA graph: ~15 launches per MPPI iteration instead of ~50."""
    name = "torch-compile-triton"
    world = staticmethod(_triton_world)


RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (
    TorchRuntime, OnnxRuntime, TensorRTRuntime, TorchCudaGraphRuntime, TorchCompileRuntime, TorchCompileFusedRuntime,
    TorchCudaGraphTritonRuntime, TorchCompileTritonRuntime)}
ARTIFACT_RUNTIMES = tuple(n for n, r in RUNTIMES.items() if issubclass(r, _ArtifactRuntime))


def runtime_class(name: str) -> type[Runtime]:
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime '{name}': choose from {list(RUNTIMES)}")
    return RUNTIMES[name]


def make_runtime(name: str, source, precision="fp32", planner=None, seed=0, device=None) -> Runtime:
    """The runtime `name` over `source`: a WorldModel for the torch runtimes, a compiled artifact directory for
    onnxruntime and tensorrt (`compiled_runtime` compiles one first)."""
    return runtime_class(name)(source, precision=precision, planner=planner, seed=seed, device=device)


def compile_for(name: str, model, precision="fp32", planner=None, options=None, echo=None) -> Path:
    """The compile step of a compiled runtime: `model`'s artifact for it, from the cache when it was compiled
    before (`artifact.compile_cached`, with `options`: an `artifact.CompileOptions`), its directory named through
    `echo`."""
    cls = runtime_class(name)
    if name not in ARTIFACT_RUNTIMES:
        raise ValueError(f"runtime '{name}' runs a model as it is: there is nothing to compile for it")
    cls.check_available()
    directory = artifact.compile_cached(model, precision, planner, target=cls.target, options=options, echo=echo)
    if echo is not None:
        echo(f"{name} {precision}: artifact {directory}")
    return directory


def compiled_runtime(name: str, model, precision="fp32", planner=None, seed=0, device=None, options=None,
                     echo=None) -> Runtime:
    """`model` compiled for the runtime `name` (`compile_for`), then loaded; torch runtimes take it as it is."""
    source = compile_for(name, model, precision, planner, options, echo) if name in ARTIFACT_RUNTIMES else model
    return make_runtime(name, source, precision, planner, seed, device)
