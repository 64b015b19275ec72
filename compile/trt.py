"""TensorRT: build an engine from the planning graph, run it with execute_async_v3, verify it on the device.

Needs only tensorrt, numpy and CUDA bindings (cuda-python; pycuda where a Jetson image has it instead) - no
torch, no edge_tdmpc: a deploy bundle ships this very file as build_engine.py, so on the robot

    python3 build_engine.py            # build step.engine from step.onnx, verify it on the recorded inputs

Engines are tied to the GPU architecture and the TensorRT version that built them: the build writes
engine.json (TensorRT version, GPU, compute capability, sha256) and loading checks it first, so an engine
from another GPU or TensorRT raises a one-line ValueError instead of failing inside deserialization.
Precision comes from the graph itself (strongly typed network: fp16/bf16 tensors and INT8 Q/DQ nodes in the
ONNX); TensorRT < 10 has no strongly typed mode and gets the equivalent builder flags.
"""
import argparse
import ctypes
import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

WORKSPACE = 1 << 30


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ValueError("TensorRT is not installed: it ships with JetPack on a Jetson (python3-libnvinfer); on a "
                         "workstation `pip install tensorrt` from NVIDIA's index; without TensorRT, run this bundle's "
                         f"step.onnx with ONNX Runtime (`edge-tdmpc bench DIR --runtime onnxruntime`) ({e})") from None
    return trt


# --- CUDA memory, streams and graphs: cuda-python, or pycuda -----------------------------------------
def _cudart():
    """cuda-python's runtime bindings, or None where cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
            return cudart
        except ImportError:
            return None


class Cuda:
    """The few CUDA calls a runner needs, over cuda-python's runtime bindings (or pycuda, without graphs)."""

    def __init__(self):
        cudart = _cudart()
        if cudart is not None:
            self.rt, self.pycuda = cudart, None
        else:
            try:
                import pycuda.autoinit  # noqa: F401
                import pycuda.driver as drv
            except ImportError:
                raise ValueError("no CUDA bindings: `pip install cuda-python` (or use an image with pycuda)") from None
            self.rt, self.pycuda = None, drv
        self.stream = self._call("cudaStreamCreate") if self.rt else self.pycuda.Stream()
        self._pinned = []

    def _call(self, fn, *args):
        err, *out = getattr(self.rt, fn)(*args)
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise RuntimeError(f"{fn} failed: {name.decode() if isinstance(name, bytes) else name}")
        return out[0] if len(out) == 1 else (out or None)

    def malloc(self, nbytes: int) -> int:
        if self.rt:
            return int(self._call("cudaMalloc", max(nbytes, 1)))
        return self.pycuda.mem_alloc(max(nbytes, 1))

    def free(self, ptr):
        if self.rt:
            self._call("cudaFree", ptr)
        else:
            ptr.free()

    def host_empty(self, shape, dtype) -> np.ndarray:
        """A page-locked numpy array: copies from and to it run asynchronously on the stream (pageable memory
        makes the driver stage each copy through a pinned buffer of its own, synchronously)."""
        dtype = np.dtype(dtype)
        if not self.rt:
            return self.pycuda.pagelocked_empty(shape, dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        ptr = int(self._call("cudaMallocHost", nbytes))
        self._pinned.append(ptr)
        buf = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def close(self):
        """Release the page-locked buffers and the stream (device buffers are freed by their owner)."""
        if self.rt:
            for ptr in self._pinned:
                self._call("cudaFreeHost", ptr)
            if self.stream is not None:
                self._call("cudaStreamDestroy", self.stream)
        self._pinned, self.stream = [], None

    def htod(self, ptr, array: np.ndarray):
        if self.rt:
            self._call("cudaMemcpyAsync", ptr, array.ctypes.data, array.nbytes,
                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
        else:
            self.pycuda.memcpy_htod_async(ptr, array, self.stream)

    def dtoh(self, array: np.ndarray, ptr):
        if self.rt:
            self._call("cudaMemcpyAsync", array.ctypes.data, ptr, array.nbytes,
                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        else:
            self.pycuda.memcpy_dtoh_async(array, ptr, self.stream)

    def sync(self):
        if self.rt:
            self._call("cudaStreamSynchronize", self.stream)
        else:
            self.stream.synchronize()

    @property
    def handle(self) -> int:
        return int(self.stream) if self.rt else self.stream.handle

    def capture(self, fn):
        """Record fn()'s work on the stream as a CUDA graph -> instantiated graph (None without cuda-python)."""
        if not self.rt:
            return None
        self._call("cudaStreamBeginCapture", self.stream,
                   self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        fn()
        graph = self._call("cudaStreamEndCapture", self.stream)
        # the WithFlags form: (graph, flags) -> (err, exec) in cuda-python 11 and 12 alike (plain
        # cudaGraphInstantiate takes a log buffer in 11.x, the JetPack 5 bindings)
        graph_exec = self._call("cudaGraphInstantiateWithFlags", graph, 0)
        self._call("cudaGraphDestroy", graph)  # the executable graph does not need its template
        return graph_exec

    def launch(self, graph_exec):
        self._call("cudaGraphLaunch", graph_exec, self.stream)

    def destroy(self, graph_exec):
        self._call("cudaGraphExecDestroy", graph_exec)

    def device(self) -> dict:
        """Name and compute capability of the current GPU."""
        if self.rt:
            dev = self._call("cudaGetDevice")
            prop = self._call("cudaGetDeviceProperties", dev)
            name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
            return {"gpu": name, "compute_capability": f"{prop.major}.{prop.minor}"}
        dev = self.pycuda.Context.get_device()
        major, minor = dev.compute_capability()
        return {"gpu": dev.name(), "compute_capability": f"{major}.{minor}"}


def device_info() -> dict:
    """What an engine built here is tied to: TensorRT version, GPU name and compute capability."""
    cuda = Cuda()
    try:
        return {"tensorrt": _trt().__version__, **cuda.device()}
    finally:
        cuda.close()


def check_compatible(built: dict, here: dict):
    """Refuse an engine built by another TensorRT version or for another GPU architecture."""
    if built.get("tensorrt") != here["tensorrt"]:
        raise ValueError(f"engine was built by TensorRT {built.get('tensorrt')} but this is TensorRT "
                         f"{here['tensorrt']}: rebuild it here (python3 build_engine.py)")
    if built.get("compute_capability") != here["compute_capability"]:
        raise ValueError(f"engine was built for compute capability {built.get('compute_capability')} "
                         f"({built.get('gpu')}) but this GPU is {here['compute_capability']} ({here['gpu']}): "
                         "rebuild it here (python3 build_engine.py)")


# --- build ------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _pin_fp32(trt, network, config):
    """Weakly typed networks (TensorRT 8.x): ask for fp32 on every layer whose ONNX outputs are fp32, so the
    FP16 flag speeds up the fp16 layers only (the strongly typed mode of TensorRT >= 9 does this by itself).

    Q/DQ layers and the MatMuls that read a DequantizeLinear output are left alone: explicit quantization
    decides their precision (int8), and a constraint there would at best be ignored."""
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    dequantized = {layer.get_output(k).name for layer in layers if layer.type == trt.LayerType.DEQUANTIZE
                   for k in range(layer.num_outputs)}
    for layer in layers:
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        ins = [layer.get_input(k) for k in range(layer.num_inputs)]
        if layer.type in qdq or any(t is not None and t.name in dequantized for t in ins):
            continue
        if outs and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)


def build_engine(onnx_path, engine_path, precision: str, timing_cache=None, dla_core: int | None = None,
                 workspace: int = WORKSPACE, verbose=False) -> dict:
    """ONNX -> serialized engine (+ engine.json beside it); reuses and updates `timing_cache` when given."""
    trt = _trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = trt.NetworkDefinitionCreationFlag
    strongly_typed = hasattr(flags, "STRONGLY_TYPED")  # TensorRT >= 9; always on (flag ignored) from 11
    network = builder.create_network(1 << int(flags.STRONGLY_TYPED) if strongly_typed else
                                     1 << int(flags.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    # TF32 is on by default on Ampere and newer: the graph's fp32 parts (all of fp32, the encoder kept fp32 in
    # int8/mixed, the decode and MPPI statistics) should be fp32, as verified on the CPU
    config.clear_flag(trt.BuilderFlag.TF32)
    if not strongly_typed:  # TensorRT 8.x: the graph's types are hints; enable the kernels they need
        if precision in ("fp16", "mixed"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision in ("int8", "mixed"):
            config.set_flag(trt.BuilderFlag.INT8)
        if precision == "bf16":
            raise ValueError(f"TensorRT {trt.__version__} has no bf16: use fp16, or TensorRT >= 10 (JetPack 6.1+)")
        if precision in ("fp16", "mixed"):  # and keep the graph's fp32 parts (encoder in mixed, decode, MPPI
            _pin_fp32(trt, network, config)  # statistics) in fp32
    if dla_core is not None and precision in ("fp32", "bf16"):
        raise ValueError(f"the DLA runs fp16 and int8 only, not {precision}: use --precision fp16 or int8, or "
                         "build for the GPU")
    if dla_core is not None:  # unsupported layers (TopK, Gather, ...) fall back to the GPU
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another TensorRT (e.g. before a JetPack upgrade) is refused: start a fresh one
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    _atomic_write(engine_path, bytes(serialized))
    if timing_cache:
        _atomic_write(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    meta = {**device_info(), "precision": precision, "onnx_sha256": _sha256(onnx_path),
            "engine_sha256": _sha256(engine_path), "bytes": engine_path.stat().st_size, "dla_core": dla_core}
    _atomic_write(engine_path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return meta


# --- run --------------------------------------------------------------------------------------------------
class Engine:
    """A deserialized engine with device buffers for every I/O tensor; `run(feeds) -> outputs` (numpy)."""

    def __init__(self, engine_path, cuda_graph=False):
        trt = _trt()
        engine_path = Path(engine_path)
        meta_path = engine_path.with_suffix(".json")
        if not meta_path.exists():
            raise ValueError(f"{engine_path.name}: no {meta_path.name} beside it, so its TensorRT version and GPU "
                             "are unknown; rebuild it with build_engine.py")
        meta = json.loads(meta_path.read_text())
        self.cuda = Cuda()
        check_compatible(meta, {"tensorrt": trt.__version__, **self.cuda.device()})
        if _sha256(engine_path) != meta.get("engine_sha256"):
            raise ValueError(f"{engine_path.name} does not match the checksum in {meta_path.name}: rebuild it")
        self.meta = meta
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT {trt.__version__} could not deserialize {engine_path.name}: rebuild it here")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs, self.ptrs = {}, {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            host = self.cuda.host_empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = host
            self.ptrs[name] = self.cuda.malloc(host.nbytes)
            self.context.set_tensor_address(name, int(self.ptrs[name]))
        self.graph = None
        if cuda_graph:  # one launch replays the whole engine; run once first so TensorRT finishes its setup
            self._enqueue()
            self.cuda.sync()
            self.graph = self.cuda.capture(self._enqueue)

    def _enqueue(self):
        if not self.context.execute_async_v3(self.cuda.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, feeds: dict) -> dict:
        for name, host in self.inputs.items():
            np.copyto(host, np.asarray(feeds[name]).reshape(host.shape), casting="unsafe")  # int64 -> int32 on 8.x
            self.cuda.htod(self.ptrs[name], host)
        if self.graph is not None:
            self.cuda.launch(self.graph)
        else:
            self._enqueue()
        out = {}
        for name, host in self.outputs.items():
            self.cuda.dtoh(host, self.ptrs[name])
        self.cuda.sync()
        for name, host in self.outputs.items():
            out[name] = host.copy()
        return out

    def close(self):
        if self.graph is not None:
            self.cuda.destroy(self.graph)
            self.graph = None
        for ptr in self.ptrs.values():
            self.cuda.free(ptr)
        self.ptrs, self.inputs, self.outputs = {}, {}, {}  # the host arrays point into freed page-locked memory
        self.cuda.close()


class Planner:
    """The control loop on the robot: obs -> action with the warm-start mean kept between steps. A non-finite
    observation (or one beyond control.OBS_LIMIT) gets the safe action, as in every edge_tdmpc runtime: the last
    action returned this episode (zeros before the first), nothing planned, `flagged` set and counted in
    `nonfinite`. A step whose action comes out non-finite all the same is answered and counted the same way."""

    def __init__(self, engine: Engine, seed=0, num_q=2):
        self.engine, self.rng, self.num_q = engine, np.random.default_rng(seed), num_q
        shape = engine.inputs["prev_mean"].shape if "prev_mean" in engine.inputs else None
        self.prev_mean = np.zeros(shape, np.float32) if shape else None
        self.action_dim = engine.inputs["noise_action"].shape[-1]
        self.last_action, self.flagged, self.nonfinite = None, False, 0

    def reset(self, seed=None):
        """Start of an episode: the warm start and the safe action cleared (the noise reseeded when given a
        seed)."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        if self.prev_mean is not None:
            self.prev_mean = np.zeros_like(self.prev_mean)
        self.last_action, self.flagged = None, False

    def planned_mean(self):
        return None if self.prev_mean is None else self.prev_mean.copy()

    def advance_mean(self, ticks: int):
        if self.prev_mean is not None:
            _bundled("control").shift_mean(self.prev_mean, ticks)

    def act(self, obs, task=0, t0=False, eval_mode=False):
        if _bundled("control").usable(obs):
            action = np.asarray(self._plan(obs, task, t0, eval_mode), np.float32)
            if np.isfinite(action).all():
                self.flagged, self.last_action = False, action
                return action.copy()
        self.flagged = True
        self.nonfinite += 1
        return (self.last_action if self.last_action is not None else np.zeros(self.action_dim, np.float32)).copy()

    def _plan(self, obs, task, t0, eval_mode):
        shape = {k[len("noise_"):]: v.shape for k, v in self.engine.inputs.items() if k.startswith("noise_")}
        drawn = _bundled("noise").numpy_noise(shape, self.num_q, self.rng)
        feeds = {"obs": obs, "task": np.array([task]), "t0": np.array([float(t0)]),
                 **{f"noise_{k}": v for k, v in drawn.items()}}
        if self.prev_mean is not None:
            feeds["prev_mean"] = self.prev_mean
        if eval_mode:
            feeds["noise_action"] = np.zeros_like(feeds["noise_action"])
        out = self.engine.run(feeds)
        if "mean" in out and self.prev_mean is not None:
            self.prev_mean = out["mean"]
        return out["action"]


@functools.cache  # looked up on every control step: resolve each module once
def _bundled(name: str):
    """edge_tdmpc's module `name` (control, noise, verify), or in a deploy bundle the copy beside this file."""
    import importlib
    try:
        return importlib.import_module(f"edge_tdmpc.{'compile.' if name == 'verify' else ''}{name}")
    except ImportError:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        return importlib.import_module(name)


# --- verify on the device ---------------------------------------------------------------------------------
def verify_engine(engine: Engine, directory: Path, manifest: dict) -> tuple[bool, str]:
    """Recorded inputs (verify.npz) through the engine vs the fp32 reference outputs stored with them."""
    compare, format_checks = (getattr(_bundled("verify"), f) for f in ("compare", "format_checks"))
    data = np.load(directory / manifest["verification"]["file"])
    n = len(data["obs"])
    outputs, expected = [], []
    for i in range(n):
        out = engine.run({k: data[k][i] for k in engine.inputs})
        outputs.append(out)
        expected.append({k[len("expected_"):]: data[k][i] for k in data.files if k.startswith("expected_")})
    tol = {manifest["precision"]: {k: (v["tol_mean"], v["tol_max"])
                                   for k, v in manifest["verification"]["outputs"].items()}}
    checks = compare(outputs, expected, manifest["precision"], tol)
    return all(c.ok for c in checks), format_checks(checks)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build (and verify) the TensorRT engine of an edge-tdmpc bundle.")
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent), help="the bundle (manifest.json)")
    ap.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (GPU fallback on)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true", help="verify through a captured CUDA graph")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    directory = Path(args.dir)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {directory} has no readable manifest.json ({e}): copy the whole bundle from "
                 "`edge-tdmpc compile`")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest() != \
            manifest.get("manifest_sha256"):
        sys.exit("error: manifest.json was edited after compile (its digest does not match): compile the bundle "
                 "again rather than editing it")
    onnx_path = directory / manifest["graph"]
    if _sha256(onnx_path) != manifest["files"][manifest["graph"]]["sha256"]:
        sys.exit(f"error: {onnx_path.name} does not match manifest.json: the bundle was modified or truncated")
    try:
        meta = build_engine(onnx_path, directory / "step.engine", manifest["precision"],
                            timing_cache=directory / "timing.cache", dla_core=args.dla_core, verbose=args.verbose)
        print(f"built step.engine: TensorRT {meta['tensorrt']}, {meta['gpu']} (sm {meta['compute_capability']}), "
              f"{meta['bytes'] / 1e6:.2f} MB")
        if args.no_verify:
            return 0
        engine = Engine(directory / "step.engine", cuda_graph=args.cuda_graph)
        ok, table = verify_engine(engine, directory, manifest)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(table)
    print("verification:", "PASS" if ok else "FAIL")
    meta["verified"] = ok
    _atomic_write(directory / "step.json", json.dumps(meta, indent=1).encode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
