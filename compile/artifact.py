"""Compiled artifacts: what `edge-tdmpc compile` writes and every runtime loads.

    DIR/
      manifest.json      source checkpoint + sha256, precision and layer precisions, planner settings, target,
                         I/O shapes, sha256 of every file, verification results and status ("ok" / "failed")
      step.onnx          the whole planning step as one graph (one runtime call per control step)
      networks/*.onnx    encoder, dynamics, reward, pi, Q as separate graphs (batch axis B)
      verify.npz         planning inputs recorded in real closed-loop episodes + the torch fp32 outputs
      calibration.json   INT8 activation ranges (int8 / mixed)
      build_engine.py, verify.py   TensorRT targets: build and verify the engine on the device
      control.py         TensorRT targets: the fixed-rate control loop (`edge_tdmpc.control`), numpy only
      noise.py           TensorRT targets: the planning step's noise drawn with numpy (`edge_tdmpc.noise`)

The directory is written under a temporary name and renamed into place, so an interrupted compile leaves no
half artifact; recordings (the slow part) are cached and reused by the next compile of the same model.
"""
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from edge_tdmpc import control, noise
from edge_tdmpc.checkpoint import weights_sha256
from edge_tdmpc.compile import export, networks, record, verify
from edge_tdmpc.compile.graph import OPSET
from edge_tdmpc.compile.precision import load_layers, model_layer_precisions, quantize_int8
from edge_tdmpc.compile.targets import check_precision, load_target, min_tensorrt
from edge_tdmpc.files import atomic_write, exclusive_lock, file_sha256
from edge_tdmpc.model import WorldModel
from edge_tdmpc.options import check_min, setting
from edge_tdmpc.planner import PlannerConfig

FORMAT = "edge-tdmpc-artifact/3"
GRAPH = "step.onnx"
VERIFY_FILE = "verify.npz"
VERIFY_TASKS = ("walker-stand", "cheetah-run-backwards", "cartpole-balance", "finger-turn-easy", "hopper-hop")
BUNDLE_README = """edge-tdmpc deploy bundle: {target}, {precision}

On the device (JetPack ships TensorRT; `pip install cuda-python numpy` if missing):

    python3 build_engine.py              # step.onnx -> step.engine (+ step.json), then verifies it
    python3 build_engine.py --dla-core 0 # Orin NX / AGX Orin: DLA, unsupported layers on the GPU

Verification runs the recorded closed-loop inputs of verify.npz through the engine and compares with the
PyTorch fp32 outputs stored beside them, with the tolerances in manifest.json; it prints PASS or FAIL.
An engine is tied to the GPU and TensorRT version that built it: rebuild after a JetPack upgrade.
In your control loop: `from build_engine import Engine, Planner`; Planner(Engine("step.engine")).act(obs, task, t0).
At a fixed rate, planning in a thread (a tick waits at most its period for its plan, then falls back;
smoothing and a rate limit optional):

    from control import ActionFilter, RealtimeLoop
    loop = RealtimeLoop(planner, hz=100, sense=read_sensors, actuate=send_to_motors, task=task,
                        fallback="hold", action_filter=ActionFilter(smooth=0.5, rate_limit=0.2))
    print(loop.run(ticks=6000))   # fresh / fallback ticks, schedule lateness, planning latency
"""


def cache_root() -> Path:
    """$EDGE_TDMPC_CACHE, else $XDG_CACHE_HOME/edge-tdmpc, else ~/.cache/edge-tdmpc; where that cannot be written
    (a read-only HOME, a container's), a per-user directory under the system's temporary directory."""
    if os.environ.get("EDGE_TDMPC_CACHE"):
        return Path(os.environ["EDGE_TDMPC_CACHE"])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-tdmpc"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"edge-tdmpc-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --- recordings (cached: the slow, precision-independent part) -----------------------------------------------
def _tasks(model: WorldModel, wanted, n: int) -> list[str]:
    own = [t for t in wanted if t in model.cfg.tasks] or list(model.cfg.tasks)
    return [own[k % len(own)] for k in range(n)]


def _recording(model, cfg, model_sha, tasks, steps, seed, kind, step_fn, reference: bool, progress=False) -> dict:
    key = _digest([model_sha, asdict(cfg), tasks, steps, seed, kind, reference, _code_sha256()])[:20]
    path = cache_root() / "recordings" / f"{kind}-{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    rec = record.record(model, cfg, tasks, steps, seed, step_fn, progress=kind if progress else None)
    if reference:  # the torch fp32 reference's outputs on every recorded input
        # ... with a zero Gumbel draw, so both sides execute the top elite. The draw is indexed by elite rank:
        # with it, a last-bit near-tie between any two of the ranked elites changes which trajectory is
        # executed; without it only a tie for the top does, so the check compares graphs, not near-ties
        # (docs/results/compile-cpu.md). The pick's arithmetic (log score + draw, ArgMax) still runs.
        if "noise_gumbel" in rec:
            rec["noise_gumbel"] = np.zeros_like(rec["noise_gumbel"])
        outs = [record.reference_step(model, row, cfg) for row in record.rows(rec)]
        rec.update({f"expected_{k}": np.stack([o[k] for o in outs]) for k in outs[0]})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **rec))
    return rec


# --- compile ---------------------------------------------------------------------------------------------------
def _layers(text):
    return load_layers(text) if isinstance(text, str) else text


@dataclass(frozen=True)
class CompileOptions:
    """How an artifact is calibrated and verified, and which layers run at which precision: what
    `edge-tdmpc compile`, `edge-tdmpc bench` (for its compiled runtimes) and `compile_model` share."""
    calib_episodes: int = setting(6, "closed-loop episodes for int8 calibration")
    calib_steps: int = setting(8, "steps per calibration episode")
    calib_percentile: float = setting(99.99, "int8 activation range: this percentile of |x| per step (100: the max)")
    verify_episodes: int = setting(2, "recorded episodes checked against the fp32 reference")
    verify_steps: int = setting(6, "steps per verification episode")
    layers: dict | None = setting(None, "JSON {layer: precision}, inline or a file, overriding the named "
                                        "precision's layer precisions (e.g. for mixed: '{\"dynamics.1\": \"int8\"}')",
                                  type=str)
    seed: int = setting(0, "seed of the calibration episodes (verification: seed + 1000)")

    def __post_init__(self):
        object.__setattr__(self, "layers", _layers(self.layers))
        check_min(self, 1, "calib_episodes", "calib_steps", "verify_episodes", "verify_steps")
        if not 0 < self.calib_percentile <= 100:
            raise ValueError(f"--calib-percentile must be in (0, 100], got {self.calib_percentile} (100: the max "
                             "of |x|)")


def compile_model(model: WorldModel, precision="fp32", planner: PlannerConfig | None = None, target="cpu",
                  out=None, checkpoint=None, options: CompileOptions | None = None, echo=None, **settings) -> Path:
    """Checkpoint/model -> verified artifact directory (see module doc). Returns its path.

    `target` names a device profile (targets/*.json). cpu: an ONNX Runtime artifact, verified here. A
    Jetson: a deploy bundle (ONNX, calibration, manifest, recorded inputs, build_engine.py) verified here
    with ONNX Runtime and built into a TensorRT engine on the device; on a machine whose GPU and TensorRT
    match the target, the engine is built and verified directly. `settings` override fields of `options`.
    """
    shown, echo = echo is not None, echo or (lambda *_: None)  # with echo, recordings show a progress bar too
    cfg = planner or PlannerConfig()
    opts = replace(options or CompileOptions(), **settings)
    calib_episodes, calib_steps, calib_percentile = opts.calib_episodes, opts.calib_steps, opts.calib_percentile
    verify_episodes, verify_steps, seed = opts.verify_episodes, opts.verify_steps, opts.seed
    profile = load_target(target)
    check_precision(profile, precision)
    model = model.float().cpu().eval()
    model_sha = weights_sha256(model)
    layer_precisions = model_layer_precisions(model, precision, opts.layers)
    key = cache_key(model_sha, precision, cfg, target, layer_precisions, opts)
    out = Path(out) if out is not None else cache_root() / "artifacts" / key
    _parent(out)  # an unwritable --out fails here, before minutes of recording
    from edge_tdmpc.compile.session import OnnxSession

    t_start = time.time()
    trt_min = min_tensorrt(profile) if profile["family"] != "cpu" else None
    native_ln = trt_min is None or trt_min >= export.TENSORRT_OPS["LayerNormalization"]
    fp32 = export.step_graph(model, cfg)
    ref_session = OnnxSession(fp32)

    def step_fn(feed):
        o = ref_session.run(feed)
        return o["action"], o["mean"]

    echo(f"recording {verify_episodes} verification episode(s) x {verify_steps} steps (torch fp32 reference)")
    ver = _recording(model, cfg, model_sha, _tasks(model, VERIFY_TASKS, verify_episodes), verify_steps,
                     seed + 1000, "verify", step_fn, reference=True, progress=shown)
    graph, calib_meta = fp32, None
    if any(p != "fp32" for p in layer_precisions.values()) or not native_ln:  # int8 layers: fp32 per Q head, then Q/DQ
        graph = export.step_graph(model, cfg, layer_precisions, native_layernorm=native_ln)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
    tmp.chmod(0o755)
    try:
        if "int8" in layer_precisions.values():
            tasks = _tasks(model, record.CALIB_TASKS, calib_episodes)
            echo(f"calibrating int8 on {calib_episodes} closed-loop episode(s) x {calib_steps} steps: "
                 f"{', '.join(tasks)}")
            calib = _recording(model, cfg, model_sha, tasks, calib_steps, seed, "calib", step_fn, reference=False,
                               progress=shown)
            pct = calib_percentile if calib_percentile and calib_percentile < 100 else None
            graph, cache = quantize_int8(graph, layer_precisions, calib, tmp, pct)
            calib_meta = {"tasks": tasks, "steps": calib_steps, "rows": int(len(calib["obs"])), "file": cache.name,
                          "method": "absmax" if pct is None else f"percentile {pct} of |x|", "seed": seed}
        if trt_min is not None and (bad := export.tensorrt_unsupported(graph, trt_min)):
            raise ValueError(f"{GRAPH} uses {bad}, which TensorRT {'.'.join(map(str, trt_min))} (target "
                             f"'{profile['name']}') cannot parse: compile for another target or precision")
        onnx.save(graph, tmp / GRAPH)
        (tmp / "networks").mkdir()
        float_layers = {k: ("fp32" if v == "int8" else v) for k, v in layer_precisions.items()}
        for name, net in networks.network_graphs(model, float_layers, native_layernorm=native_ln).items():
            onnx.save(net, tmp / "networks" / f"{name}.onnx")
        np.savez(tmp / VERIFY_FILE, **ver)

        echo(f"verifying {GRAPH} on {len(ver['obs'])} recorded steps against the torch fp32 reference")
        session = OnnxSession(graph)
        rows = list(record.rows(ver))
        outputs = [session.run(r) for r in rows]
        expected = [{k[len("expected_"):]: r[k] for k in r if k.startswith("expected_")} for r in rows]
        checks = verify.compare(outputs, expected, precision)
        executed_by = "onnxruntime-cpu" + (" (bf16 emulated: fp32 ops rounded to bf16)" if session.emulated else "")
        result = {**verify.report(checks), "file": VERIFY_FILE, "rows": len(rows), "executed_by": executed_by,
                  "tasks": sorted(set(_tasks(model, VERIFY_TASKS, verify_episodes)))}
        echo(verify.format_checks(checks))

        engine = None
        if profile["family"] != "cpu":
            engine = _engine_or_bundle(tmp, profile, precision, rows, expected, echo)
        manifest = {
            "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "compile_seconds": None,
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
            "weights_sha256": model_sha,
            "model": {"tasks": list(model.cfg.tasks), "size": model.cfg.size, "obs_dim": model.cfg.obs_dim,
                      "action_dim": model.cfg.action_dim, "latent_dim": model.cfg.latent_dim, "num_q": model.cfg.num_q},
            "tasks": list(model.cfg.tasks),
            "precision": precision, "layer_precisions": layer_precisions,
            "runtime": "onnxruntime" if profile["family"] == "cpu" else "tensorrt",
            "target": profile["name"], "target_family": profile["family"],
            "planner": asdict(cfg), "opset": OPSET, "graph": GRAPH,
            "layernorm": "native" if native_ln else "primitive ops, fp32 (TensorRT < 8.6 has no importer for it)",
            "tensorrt_min": ".".join(map(str, trt_min)) if trt_min else None,
            "inputs": {k: {"dtype": d, "shape": s} for k, (d, s) in export.step_inputs(model, cfg).items()},
            "outputs": [o.name for o in graph.graph.output],
            "calibration": calib_meta, "verification": result, "engine": engine,
            "status": "ok" if result["ok"] and (engine or {}).get("verification", {}).get("ok", True) else "failed",
        }
        manifest["compile_seconds"] = round(time.time() - t_start, 1)
        write_manifest(tmp, manifest)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _code_sha256() -> str:
    """The code that shapes an artifact (graph, calibration and verification recordings, which the reference
    planner and model produce in closed-loop episodes): a cached artifact from older code is compiled again."""
    from edge_tdmpc import layers, model, planner, rollout
    here = Path(__file__).resolve().parent
    files = [here / f for f in ("artifact.py", "export.py", "graph.py", "networks.py", "precision.py", "record.py",
                                "verify.py")]
    files += [Path(m.__file__) for m in (planner, model, layers, noise, rollout)]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def cache_key(model_sha, precision, cfg, target, layer_precisions, options: CompileOptions) -> str:
    settings = {k: v for k, v in asdict(options).items() if k != "layers"}  # layers: in layer_precisions
    if "int8" not in layer_precisions.values():
        settings = {k: v for k, v in settings.items() if not k.startswith("calib_")}
    return _digest([FORMAT, _code_sha256(), model_sha, precision, asdict(cfg), target, layer_precisions,
                    settings])[:20]


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _install(tmp: Path, out: Path):
    """Rename the finished directory into place (replacing an older artifact at the same path)."""
    old = None
    if out.exists():
        if not (out / "manifest.json").exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not an edge-tdmpc artifact: choose another --out")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _engine_or_bundle(tmp: Path, profile: dict, precision: str, rows, expected, echo) -> dict:
    """Build and verify the TensorRT engine when this machine matches the target; else ship the builder."""
    here = Path(__file__).resolve().parent
    shutil.copy(here / "trt.py", tmp / "build_engine.py")
    shutil.copy(here / "verify.py", tmp / "verify.py")
    shutil.copy(control.__file__, tmp / "control.py")
    shutil.copy(noise.__file__, tmp / "noise.py")
    (tmp / "README.txt").write_text(BUNDLE_README.format(target=profile["description"], precision=precision))
    try:
        from edge_tdmpc.compile import trt
        info = trt.device_info()
    except (ValueError, RuntimeError) as e:
        echo(f"deploy bundle for {profile['name']}: on the device, run `python3 build_engine.py` "
             f"(no engine built here: {type(e).__name__})")
        return {"status": "bundle", "reason": str(e).splitlines()[0]}
    cc = (profile.get("gpu") or {}).get("compute_capability")
    if cc not in (None, "any", info["compute_capability"]):
        echo(f"deploy bundle: this GPU is sm {info['compute_capability']}, {profile['name']} is sm {cc}")
        return {"status": "bundle", "reason": f"compiling GPU is sm {info['compute_capability']}, target is sm {cc}"}
    meta = trt.build_engine(tmp / GRAPH, tmp / "step.engine", precision, timing_cache=tmp / "timing.cache")
    echo(f"built step.engine with TensorRT {meta['tensorrt']} on {meta['gpu']}; verifying it")
    engine = trt.Engine(tmp / "step.engine")  # deserialized from the file: serialization round trip included
    checks = verify.compare([engine.run(r) for r in rows], expected, precision)
    engine.close()
    echo(verify.format_checks(checks))
    return {"status": "built", "file": "step.engine", **meta, "verification": verify.report(checks)}


# --- manifest ----------------------------------------------------------------------------------------------------
def _files(directory: Path) -> dict:
    skip = {"manifest.json", "step.engine", "step.json", "timing.cache"}  # engine files carry their own metadata
    return {str(p.relative_to(directory)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def write_manifest(directory: Path, manifest: dict):
    manifest = {**manifest, "files": _files(directory)}
    manifest["manifest_sha256"] = _digest({k: v for k, v in manifest.items() if k != "manifest_sha256"})
    text = json.dumps(manifest, indent=1, default=str) + "\n"
    atomic_write(directory / "manifest.json", lambda f: f.write(text), mode="w")


def read_manifest(directory) -> dict:
    """Read and validate an artifact's manifest: format, its own digest, every file's sha256."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a compiled artifact (no manifest.json): run `edge-tdmpc compile` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest ({e}); recompile the artifact") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this edge-tdmpc reads {FORMAT!r}; recompile")
    if _digest({k: v for k, v in manifest.items() if k != "manifest_sha256"}) != manifest.get("manifest_sha256"):
        raise ValueError(f"{path} was edited after compile (its digest does not match): recompile the artifact")
    for name, info in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise ValueError(f"{directory}: {name} is missing; recompile the artifact")
        if f.stat().st_size != info["bytes"] or file_sha256(f) != info["sha256"]:
            raise ValueError(f"{directory}: {name} does not match its sha256 in the manifest (tampered or truncated); "
                             "recompile the artifact")
    return manifest


def check_matches(manifest: dict, precision=None, planner: PlannerConfig | None = None, model=None,
                  allow_failed=False):
    """Refuse an artifact compiled for another precision, planner setting or model, or one that failed."""
    if not allow_failed and manifest["status"] != "ok":
        bad = [k for k, v in manifest["verification"]["outputs"].items() if not v["ok"]]
        raise ValueError(f"artifact failed verification ({', '.join(bad)} outside tolerance): see its manifest; "
                         "recompile with another precision or --layers")
    if precision is not None and precision != manifest["precision"]:
        raise ValueError(f"artifact is {manifest['precision']}, not {precision}: pass precision="
                         f"'{manifest['precision']}' or compile another")
    if planner is not None:
        built = manifest["planner"]
        diff = {k: (v, built.get(k)) for k, v in asdict(planner).items() if built.get(k) != v}
        if diff:
            raise ValueError("artifact was compiled for other planner settings: " +
                             ", ".join(f"{k}={b} (asked {a})" for k, (a, b) in diff.items()) +
                             "; compile it with these settings (the graph's shapes are fixed)")
    if model is not None and weights_sha256(model) != manifest["weights_sha256"]:
        raise ValueError("artifact was compiled from other weights than this model: recompile it")


def compile_cached(model: WorldModel, precision="fp32", planner=None, target="cpu", options=None, echo=None,
                   **settings) -> Path:
    """The artifact for (weights, precision, planner, target) from the cache, compiling it on first use.

    Safe for concurrent processes: an entry appears whole (renamed into place) and is never replaced while it
    reads back intact, so a reader needs no lock; a writer holds the entry's lock, so a second process asking
    for the same entry waits for the first and then reads what it built."""
    cfg = planner or PlannerConfig()
    opts = replace(options or CompileOptions(), **settings)
    model = model.float().cpu().eval()
    key = cache_key(weights_sha256(model), precision, cfg, load_target(target)["name"],
                    model_layer_precisions(model, precision, opts.layers), opts)
    out = cache_root() / "artifacts" / key
    if _intact(out):
        return out
    with exclusive_lock(_parent(out) / f".{key}.lock", wait=True):
        if _intact(out):  # built by the process we waited for
            return out
        return compile_model(model, precision, cfg, target, out=out, options=opts, echo=echo)


def _intact(directory: Path) -> bool:
    if not (directory / "manifest.json").exists():
        return False
    try:
        read_manifest(directory)
        return True
    except ValueError:  # damaged cache entry: compile it again
        return False


def artifact_size(directory, manifest=None) -> int:
    """Bytes of what a runtime executes: step.onnx (or the engine, when one was built)."""
    manifest = manifest or read_manifest(directory)
    engine = Path(directory) / "step.engine"
    return engine.stat().st_size if engine.exists() else manifest["files"][manifest["graph"]]["bytes"]

