"""`run_bench`: validate everything, check faithfulness, run the episodes, write the reports.

All user errors (unknown runtime or precision, a task the model was not trained on, an unwritable output
directory, a resume with different settings) are raised as one-line ValueErrors before any episode starts.
"""
import copy
import datetime
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from edge_tdmpc.bench import faithful, report
from edge_tdmpc.bench.meters import environment
from edge_tdmpc.bench.runner import EpisodeLog, Job, Settings, run_jobs
from edge_tdmpc.checkpoint import load_model, read_checkpoint, weights_sha256
from edge_tdmpc.compile.artifact import CompileOptions, read_manifest
from edge_tdmpc.compile.runtimes import ARTIFACT_RUNTIMES, compile_for, make_runtime, runtime_class
from edge_tdmpc.control import ActionFilter
from edge_tdmpc.files import atomic_write_text, exclusive_lock, file_sha256
from edge_tdmpc.model import WorldModel
from edge_tdmpc.options import check_min, setting
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.rollout import ControlOptions
from edge_tdmpc.runtime import PRECISIONS
from edge_tdmpc.tasks import resolve_tasks

CHECK_FILE = "check.json"


def _split(x) -> list[str]:
    return [s.strip() for s in x.split(",") if s.strip()] if isinstance(x, str) else list(x)


def resolve_pairs(runtimes, precisions) -> list[tuple[str, str]]:
    """runtimes x precisions, keeping the combinations a runtime supports (each precision must have one)."""
    runtimes, precisions = _split(runtimes), _split(precisions)
    if not runtimes or not precisions:
        raise ValueError("pass at least one --runtime and one --precision")
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision '{p}': choose from {list(PRECISIONS)}")
    classes = {r: runtime_class(r) for r in runtimes}
    pairs = [(r, p) for r in runtimes for p in precisions if p in classes[r].precisions]
    for p in precisions:
        if not any(q == p for _, q in pairs):
            offer = {r: list(c.precisions) for r, c in classes.items()}
            raise ValueError(f"no requested runtime runs precision '{p}' (supported: {offer})")
    return pairs


def _model_tasks(path: Path, model_tasks, tasks) -> str:
    """The task set a checkpoint was trained on: given, the one the file names, mt30 for other multitask files, or
    the single task benched."""
    if model_tasks:
        return model_tasks
    sd, metadata = read_checkpoint(path)
    if metadata.get("tasks"):
        return ",".join(metadata["tasks"])
    if "_task_emb.weight" in sd:
        return "mt30"
    if len(tasks) != 1:
        raise ValueError(f"{path.name} is a single-task checkpoint: bench one task, or name it with --model-tasks")
    return tasks[0]


def open_model(model, tasks=("mt30",), model_tasks=None):
    """Checkpoint path, compiled artifact directory or in-memory WorldModel ->
    (fp32 reference model, what workers load, {pair: artifact dir}, model facts)."""
    if isinstance(model, WorldModel):
        ref = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
        return ref.eval(), ref, {}, {"kind": "in-memory", "path": None, "sha256": weights_sha256(ref)}
    path = Path(model)
    if path.is_dir():
        manifest = read_manifest(path)
        if not manifest.get("checkpoint"):
            raise ValueError(f"{path} names no source checkpoint (compiled from a model in memory); compile it from "
                             "a checkpoint file to bench it against fp32 eager")
        ckpt = Path(manifest["checkpoint"])
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else path / ckpt
        sha = file_sha256(ckpt)
        if manifest.get("checkpoint_sha256") not in (None, sha):
            raise ValueError(f"{ckpt} is not the checkpoint {path} was compiled from (sha256 differs); "
                             "recompile the artifact or restore that checkpoint")
        pair = (manifest["runtime"], manifest["precision"])
        facts = {"kind": "artifact", "path": str(path), "sha256": sha, "checkpoint": str(ckpt),
                 "artifact": {pair[0]: pair[1]}, "manifest": manifest}
        source = (str(ckpt), _model_tasks(ckpt, model_tasks, tasks))
        return load_model(*source), source, {pair: str(path)}, facts
    if not path.is_file():
        raise ValueError(f"model not found: {path} (pass a checkpoint file or a compiled artifact directory)")
    source = (str(path), _model_tasks(path, model_tasks, tasks))
    return load_model(*source), source, {}, {"kind": "checkpoint", "path": str(path), "sha256": file_sha256(path)}


def _writable(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output directory {out} ({e.strerror}); choose a writable --out") from None
    return out


def control_settings(hz, realtime, latency_ms, fallback, smooth, rate_limit, budget=1.0) -> dict | None:
    """The `rollout.ControlOptions` of a run as report.json records them (None: runtimes act as they are),
    validated; --hz alone only reports the actions that miss its deadline."""
    realtime = realtime or latency_ms is not None
    if realtime and not hz:
        raise ValueError("--realtime / --latency-ms need --hz: the control rate whose deadline the actions meet")
    options = ControlOptions(hz if realtime else None, latency_ms, fallback, budget, smooth, rate_limit)
    return asdict(options) if realtime or ActionFilter(smooth, rate_limit).active else None


@dataclass(frozen=True)
class BenchOptions:
    """What `edge-tdmpc bench` and `run_bench` take besides the model and the output directory: each setting's one
    name (its flag: `--field-name`), default and help. report.json records them under "settings"."""
    tasks: str | None = setting(None, "mt30 or comma-separated task names  [default: the model's own task set]",
                                type=str)
    episodes: int = setting(10, "episodes per task (official MT30: 10; 0 with --check-actions: the check alone)")
    runtimes: str | None = setting(
        None, "comma-separated: torch, onnxruntime, tensorrt, torch-cuda-graph(-triton), "
        "torch-compile(-fused/-triton)  [default: torch; for an artifact: torch fp32 and the artifact, or the "
        "artifact's runtime]", flag="--runtime")
    precisions: str | None = setting(
        None, "comma-separated: fp32, fp16, bf16, int8, mixed  [default: fp32, or an artifact's precision]",
        flag="--precision")
    workers: int | None = setting(None, "parallel episode processes  [default: CPU cores]", type=int)
    seed: int = setting(1, "env seed, as the official evaluation uses it (same initial states); noise seeds derive "
                           "from it")
    hz: float | None = setting(None, "control rate: report actions that miss its deadline", type=float)
    realtime: bool = setting(False, "with --hz: run each runtime as a fixed-rate robot loop; a late plan's ticks take "
                                    "the fallback", flag="--realtime", is_flag=True)
    latency_ms: float | None = setting(None, "with --hz: as --realtime, but assume this planning latency (a what-if "
                                             "for another device)", type=float)
    fallback: str = setting("hold", "a tick without a fresh plan: the last action held, the last plan's mean for "
                                    "that step, or the policy prior on that tick's observation",
                            choices=("hold", "plan", "policy"))
    budget: float = setting(1.0, "fraction of the control period a tick waits for its own plan before the fallback")
    smooth: float = setting(1.0, "action low-pass a += smooth (u - a), smooth in (0, 1]; 1 = off")
    rate_limit: float | None = setting(None, "largest action change per tick (off by default)", type=float)
    check_actions: int = setting(0, "replay N recorded observations through every runtime with fp32 eager's noise; "
                                    "report |Δaction|")
    eval_mode: bool = setting(False, "official evaluate.py acts stochastically; --eval-mode drops the final action "
                                     "noise", flag="--eval-mode/--stochastic")
    steps: int = setting(500, "agent steps per episode (500 = full)")
    warmup: int = setting(3, "untimed actions per runtime before its episodes")
    device: str = setting("cpu", "torch device for the runtimes (cpu, cuda)")
    model_tasks: str | None = setting(None, "task set MODEL was trained on  [default: the one the file names, "
                                            "else mt30, or the benched task for a single-task file]")
    planner: PlannerConfig | dict | None = None  # a PlannerConfig or overrides (the flags: `PlannerOverrides`)

    def __post_init__(self):
        check_min(self, 0, "episodes", "warmup", "check_actions")
        check_min(self, 1, "steps")
        if not self.episodes and not self.check_actions:
            raise ValueError("--episodes 0 runs no episodes: give --check-actions N for a faithfulness check alone")
        if self.hz is not None and not self.hz > 0:  # NaN too
            raise ValueError(f"--hz must be positive, got {self.hz}")

    def planner_overrides(self) -> dict:
        """The planner settings asked for, where given."""
        base = asdict(self.planner) if isinstance(self.planner, PlannerConfig) else dict(self.planner or {})
        return {k: v for k, v in base.items() if v is not None}


def run_bench(model, out, options: BenchOptions | None = None, resume=False, progress=True, command=None,
              compile_options: CompileOptions | None = None, echo=print, **settings) -> dict:
    """Closed-loop benchmark of `model` (checkpoint, artifact dir or WorldModel); returns report.json's dict.

    `settings` override fields of `options` (`BenchOptions`). runtimes / precisions: comma-separated or lists
    (default torch / fp32; for an artifact: fp32 eager and the artifact, and the artifact's runtime or precision
    where only the other is given). planner: PlannerConfig or overrides such as {"mpc": False, "num_samples":
    256}. model_tasks: the task set a checkpoint was trained on (default mt30, or the benched task for a
    single-task file). realtime: run each runtime as the robot's fixed-rate loop would at `hz`
    (`edge_tdmpc.control`): an action lands when its measured planning latency (or `latency_ms`) and the tick's
    `budget` allow, ticks between take the `fallback`; smooth / rate_limit filter actions. compile_options: how
    the runtimes that run a compiled artifact are compiled (calibration, verification, layer precisions), here
    before any episode.
    """
    # --- validate everything before the first episode ---
    o = replace(options or BenchOptions(), **settings)
    tasks, runtimes, precisions, episodes, seed, steps = o.tasks, o.runtimes, o.precisions, o.episodes, o.seed, o.steps
    eval_mode, workers, hz, check_actions, warmup, device = o.eval_mode, o.workers, o.hz, o.check_actions, o.warmup, \
        o.device
    tasks = None if tasks is None else resolve_tasks(tasks)  # None: the model's own, once it is open
    if tasks == ():
        raise ValueError("no tasks given: pass --tasks mt30 or comma-separated task names")
    control = control_settings(hz, o.realtime, o.latency_ms, o.fallback, o.smooth, o.rate_limit, o.budget)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' asked for, but torch sees no CUDA device; use --device cpu")
    out = _writable(Path(out))
    with exclusive_lock(out / ".lock", what=out):  # one bench per --out at a time
        ref_model, source, artifacts, model_facts = open_model(model, tasks or (), o.model_tasks)
        tasks = tuple(ref_model.cfg.tasks) if tasks is None else tasks
        overrides = o.planner_overrides()
        if artifacts:  # the planner is baked into a compiled artifact: use its settings, refuse others
            base = model_facts["manifest"].get("planner") or {}
            clash = sorted(k for k in overrides if k in base and overrides[k] != base[k])
            if clash:
                raise ValueError(f"{model_facts['path']} was compiled with {clash[0]}={base[clash[0]]!r}, not "
                                 f"{overrides[clash[0]]!r}; drop that override or recompile the artifact")
            overrides = {**base, **overrides}
        planner = PlannerConfig.make(**overrides)
        if artifacts and runtimes is None and precisions is None:  # the artifact against the fp32 eager reference
            pairs = list(dict.fromkeys([report.REFERENCE, *artifacts]))
            for r, _ in pairs:
                runtime_class(r)
        else:  # with an artifact, the option not given is the artifact's (--runtime onnxruntime: the artifact, not
            # a fresh fp32 compile of its checkpoint)
            (art_rt, art_prec), = artifacts or [("torch", "fp32")]
            pairs = resolve_pairs(runtimes or art_rt, precisions or art_prec)
        missing = [t for t in tasks if t not in ref_model.cfg.tasks]
        if missing:
            raise ValueError(f"task '{missing[0]}' is not in this model's task set ({len(ref_model.cfg.tasks)} tasks: "
                             f"{', '.join(ref_model.cfg.tasks[:4])}, ...); pick tasks it was trained on")
        identity = model_facts["sha256"]
        if artifacts:  # a recompiled artifact is another model as far as resuming goes
            identity += "+" + str(model_facts["manifest"].get("manifest_sha256"))
        compiles = any(r in ARTIFACT_RUNTIMES and (r, p) not in artifacts for r, p in pairs)
        compile_options = compile_options or CompileOptions()
        settings = Settings(identity, seed, steps, eval_mode, planner, control,
                            asdict(compile_options) if compiles else None)
        log = EpisodeLog(out, settings, resume)
        sizes = {}
        for rt_name, prec in pairs:  # the compile step of compiled runtimes, then each runtime once (validates it)
            if rt_name in ARTIFACT_RUNTIMES and (rt_name, prec) not in artifacts:
                artifacts[rt_name, prec] = str(compile_for(rt_name, ref_model, prec, planner, compile_options, echo))
            with make_runtime(rt_name, artifacts.get((rt_name, prec), ref_model), prec, planner, seed, device) as rt:
                sizes[rt_name, prec] = rt.size_bytes()

        # --- faithfulness on identical inputs (cached, so a resumed run does not redo it) ---
        check = None
        if check_actions:
            key = {"n": check_actions, "pairs": [list(p) for p in pairs], **settings.identity()}
            cache = out / CHECK_FILE
            cached = json.loads(cache.read_text()) if resume and cache.exists() else None
            if cached and cached.get("key") == key:
                check = faithful.judge(cached["results"], planner.mpc)
            else:
                check = faithful.check_actions(ref_model, pairs, tasks, check_actions, planner, seed, eval_mode,
                                               artifacts, device)
                atomic_write_text(cache, json.dumps({"key": key, "results": check}, indent=1))

        # --- episodes ---
        jobs = [Job(r, p, t, e) for r, p in pairs for t in tasks for e in range(episodes)]
        workers = workers or os.cpu_count() or 1
        todo = sum(j.key not in log.records for j in jobs)
        if todo < len(jobs):
            echo(f"resuming: {len(jobs) - todo} of {len(jobs)} episodes already in {out / 'episodes.jsonl'}")
        with tqdm(total=todo * steps, unit="step", desc="bench", disable=not progress or not todo,
                  smoothing=0.05) as pbar:
            run_jobs(jobs, log, source, artifacts, planner, settings, workers, device, warmup, pbar)

        # --- reports ---
        records = [log.records[j.key] for j in jobs]
        meta = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "model": model_facts, "environment": environment(),
            "settings": {"tasks": list(tasks), "episodes": episodes, "seed": seed, "steps": steps,
                         "eval_mode": eval_mode, "mpc": planner.mpc, "planner": asdict(planner), "hz": hz,
                         "control": control, "compile": settings.compile,
                         "workers": workers, "warmup": warmup, "device": str(device),
                         "pairs": [list(p) for p in pairs]},
        }
        rep = report.build_report(records, pairs, tasks, sizes, meta, check, hz)
        for s in rep["summary"]:
            if s["nonfinite_obs"]:
                echo(f"warning: {s['runtime']}/{s['precision']}: {s['nonfinite_obs']} step(s) had a NaN or Inf "
                     "observation and got the safe action (report.md says more)")
        return report.write_reports(rep, records, out)
