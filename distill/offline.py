"""`edge-tdmpc distill`: a student (distilled from a teacher, or from scratch at d_coef 0) trained offline on a
dataset, resumable, data-parallel under torchrun."""
import copy
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from edge_tdmpc.distill.collect import COLLECT_RUNTIMES
from edge_tdmpc.distill.loop import LoopOptions, closed_loop_eval, fit, init_distributed
from edge_tdmpc.distill.losses import DISTILL_TERMS, PI_OBJECTIVES, PLANNER_FILTERS, PLANNER_LOSSES
from edge_tdmpc.distill.runlog import LOGGERS, external_logger
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student, parse_dims, parse_size
from edge_tdmpc.options import check_choices, check_min, setting, split_settings
from edge_tdmpc.runtime import PRECISIONS, TORCH_DTYPES
from edge_tdmpc.tasks import resolve_tasks

INITS = ("scratch", "teacher")


@dataclass(frozen=True)
class DistillOptions(LoopOptions):
    """The settings of `edge-tdmpc distill` and `distill()` (their flags: `--field-name`), as run.json records
    them. d_coef, distill, batch_size and seed (LoopOptions) are the run's side of the update's TrainConfig
    (their defaults are its); horizon is the Python API's only."""
    teacher_tasks: str | None = setting(None, "teacher's task set [the one its file names, the data's, or mt30]")
    tasks: tuple[str, ...] | None = setting(None, "the student's tasks, a subset of the data's (its dims: the "
                                            "largest of theirs) [the data's]")
    student_size: int | None = setting(1, "size preset, or 'custom' with --student-dims", type=str)
    student_dims: dict | None = setting(None, "architecture overrides, e.g. mlp_dim=128,latent_dim=64", type=str)
    init: str = setting("scratch", "the student's start: fresh weights of --student-size, or the teacher's own "
                        "(self-distillation)", choices=INITS)
    d_coef: float = setting(TrainConfig.d_coef, "weight of the teacher terms (paper 0.4; 0 = from scratch)")
    distill: tuple[str, ...] = setting(",".join(TrainConfig.distill),
                                       "distillation terms: reward (paper), value, policy, latent; planner (the "
                                       "teacher planner's actions, weighted by --planner-coef)")
    planner_coef: float = setting(TrainConfig.planner_coef, "weight of the planner term (0: only logged)")
    planner_loss: str = setting(TrainConfig.planner_loss, "the planner term: mse to the planner's mean, or nll of "
                                "it under the policy", choices=PLANNER_LOSSES)
    planner_filter: str = setting(TrainConfig.planner_filter, "q: teach a state's label only where the model's Q "
                                  "values the planner's mean above the policy's action (none: every state)",
                                  choices=PLANNER_FILTERS)
    pi_objective: str = setting(TrainConfig.pi_objective, "the policy's objective: tdmpc2 (climb Q, the planner "
                                "term beside it) or planner (the planner term alone, as BMPC)", choices=PI_OBJECTIVES)
    world_model: bool = setting(True, "train the world model, or keep it as it starts (encoder, dynamics, "
                                "reward, Qs) and teach the policy alone",
                                flag="--train-world-model/--frozen-world-model")
    dagger: int = setting(0, "on-policy rounds: the student's prior acts, the teacher's planner labels")
    dagger_episodes: int = setting(1, "episodes per task in each round")
    dagger_steps: int = setting(500, "agent steps per round episode (500 = full)")
    label_runtime: str = setting("torch", "the teacher planner's runtime for labels (onnxruntime: faster on a CPU)",
                                 choices=COLLECT_RUNTIMES)
    label_precision: str = setting("fp32", "its precision (onnxruntime also int8)", choices=PRECISIONS)
    workers: int = setting(1, "worker processes for planner labels and rounds (0: this process)")
    batch_size: int = setting(TrainConfig.batch_size, "global batch (split over torchrun ranks)")
    steps: int = setting(1_000_000, "updates (paper: 1M)")
    teacher_precision: str = setting("fp32", choices=tuple(TORCH_DTYPES))
    eval_tasks: tuple[str, ...] | None = setting(None, "tasks of the periodic eval [those the data covers]")
    eval_mpc: bool = setting(False, "periodic eval by MPPI planning or the policy prior (cheap)",
                             flag="--eval-mpc/--eval-policy")
    logger: str = setting("none", "extra metrics sink besides metrics.jsonl/.csv", choices=LOGGERS)
    device: str | None = setting(None, "cpu or cuda [cuda when available]")
    horizon: int = setting(3, "latent rollout steps of each training slice")

    def __post_init__(self):
        super().__post_init__()
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        put("student_size", parse_size(self.student_size, "--student-size"))
        put("student_dims", parse_dims(self.student_dims, "--student-dims"))
        terms = self.distill.split(",") if isinstance(self.distill, str) else self.distill
        put("distill", tuple(t for t in terms if t))
        if isinstance(self.tasks, str):
            put("tasks", tuple(resolve_tasks(self.tasks)) or None)
        elif self.tasks is not None:
            put("tasks", tuple(self.tasks))
        if isinstance(self.eval_tasks, str):
            put("eval_tasks", tuple(t for t in self.eval_tasks.split(",") if t) or None)
        elif self.eval_tasks is not None:
            put("eval_tasks", tuple(self.eval_tasks))
        if self.logger is None:
            put("logger", "none")
        bad = [t for t in self.distill if t not in DISTILL_TERMS]
        if bad:
            raise ValueError(f"--distill: unknown distillation term(s) {bad}: choose from {','.join(DISTILL_TERMS)}")
        check_min(self, 0, "d_coef", "planner_coef", "dagger", "workers")
        check_min(self, 1, "batch_size", "steps", "horizon", "dagger_episodes", "dagger_steps")
        check_choices(self)
        if self.label_runtime == "torch" and self.label_precision not in TORCH_DTYPES:
            raise ValueError(f"--label-precision {self.label_precision} runs on onnxruntime: pass --label-runtime "
                             "onnxruntime")
        if self.dagger and "planner" not in self.distill:
            raise ValueError("--dagger labels the student's states with the teacher's planner: add planner to "
                             "--distill")
        if self.dagger > self.steps:
            raise ValueError(f"--dagger {self.dagger} rounds need at least as many --steps ({self.steps})")


def teacher_task_set(path, tasks) -> str:
    """A teacher checkpoint's task set: the one its file names, else the data's `tasks` or MT30 by the rows of its
    task embedding."""
    from edge_tdmpc.checkpoint import read_checkpoint, to_internal
    raw, metadata = read_checkpoint(path)
    if metadata.get("tasks"):
        return ",".join(metadata["tasks"])
    sd = to_internal(raw)
    rows = sd["_task_emb.weight"].shape[0] if "_task_emb.weight" in sd else 1
    if rows == len(tasks):
        return ",".join(tasks)
    if rows == 30:
        return "mt30"
    raise ValueError(f"{path} is a {rows}-task teacher and the data has {len(tasks)} tasks: name its task set "
                     "with --teacher-tasks")


def load_teacher(path, tasks, precision="fp32", teacher_tasks=None, device="cpu"):
    """Load a teacher checkpoint; its task set is `teacher_tasks`, else `teacher_task_set`'s."""
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.distill.teacher import Teacher
    model = load_model(path, tasks=teacher_tasks or teacher_task_set(path, tasks), device=device)
    return Teacher(model, tasks=tasks, precision=precision, device=device)


def planner_labels(dataset, teacher, opts, label_cache, out, rank=0, world=1, progress=True, echo=print):
    """The planner labels of `dataset`: its own (collected with --mpc), else a planner-label cache the teacher
    fills once (LABEL_CACHE/planner, or OUT/planner-labels), seeded as `data collect` seeded the data."""
    from edge_tdmpc.distill.labels import FIELD, FieldLabels, PlannerLabelCache
    if FIELD in dataset.fields:
        return FieldLabels(dataset)
    root = Path(label_cache) / "planner" if label_cache else Path(out) / "planner-labels"
    seed = int((dataset.meta.get("collect") or {}).get("seed", 0))
    if rank == 0:
        PlannerLabelCache.build(teacher, dataset, root, opts.teacher_tasks or teacher_task_set(teacher, dataset.tasks),
                                opts.label_runtime, opts.label_precision, workers=opts.workers, seed=seed,
                                progress=progress, echo=echo)
    if world > 1:
        dist.barrier()
    return PlannerLabelCache(root)


def teacher_student(teacher, tasks, opts, device):
    """--init teacher: the student is a copy of the teacher (its width), for the student's tasks: all of the
    teacher's, or a subset (`tasksets.subset_model`: their embedding rows, the columns their dims keep)."""
    if opts.student_dims:
        raise ValueError("--init teacher starts from the teacher's weights, at its size: drop --student-dims")
    t = load_teacher(teacher, tasks, "fp32", opts.teacher_tasks, device).model
    if tuple(t.cfg.tasks) != tuple(tasks):
        from edge_tdmpc.tasksets import subset_model
        t = subset_model(t, tasks)
    student = copy.deepcopy(t).requires_grad_(True).train(False)
    return student.float()


def dagger_fit(trainer, dataset, plan_labels, out, teacher, opts, eval_fn, resume, ext, progress, echo, device):
    """`fit` in --dagger + 1 phases with an on-policy round between phases (`distill.dagger`)."""
    import numpy as np

    from edge_tdmpc.distill import dagger
    from edge_tdmpc.distill.collect import compile_teacher
    from edge_tdmpc.distill.runlog import MetricsLog
    from edge_tdmpc.distill.sampler import SliceSampler
    from edge_tdmpc.seeding import derive_seed
    teacher_model = load_teacher(teacher, dataset.tasks, "fp32", opts.teacher_tasks).model
    teacher_tasks = ",".join(teacher_model.cfg.tasks)
    spec = compile_teacher(teacher_model, opts.label_runtime, opts.label_precision, True, None, echo)
    present = sorted(set(dataset.episode_table()["task"].tolist()))
    summary = None
    for phase, end in enumerate(dagger.phase_ends(opts.steps, opts.dagger)):
        if phase and phase not in dagger.finished_rounds(out):
            cpu = copy.deepcopy(trainer.model).cpu().float().eval()
            returns = dagger.run_round(phase, cpu, dataset, present, out, teacher, teacher_tasks, spec,
                                       3 * teacher_model.cfg.action_dim, opts.dagger_episodes, opts.dagger_steps,
                                       opts.seed, opts.workers, progress)
            flat = [r for rs in returns.values() for r in rs]
            MetricsLog(out, trainer.step).write({"kind": "dagger", "step": trainer.step, "round": phase,
                                                 "episodes": len(flat), "labels": dagger.round_labels(out, phase),
                                                 "mean_return": float(np.mean(flat)),
                                                 **{t: float(np.mean(r)) for t, r in returns.items()}})
            echo(f"dagger round {phase}: {len(flat)} episodes of the student's prior, mean return "
                 f"{np.mean(flat):.1f}; training on")
        data, labels = dagger.training_data(dataset, plan_labels, out)
        trainer.plan_labels = labels
        sampler = SliceSampler(data, horizon=opts.horizon, batch_size=trainer.cfg.batch_size,
                               seed=trainer.cfg.seed if phase == 0 else derive_seed(trainer.cfg.seed, phase),
                               device=device)
        summary = fit(trainer, sampler, end, out, opts.save_every, opts.log_every, opts.eval_every, eval_fn,
                      resume or phase > 0, ext, progress, echo if resume or not phase else (lambda *_: None),
                      sampler_tag=phase)
    return summary


def distill(data, out, teacher=None, options: DistillOptions | None = None, *, resume=False, label_cache=None,
            progress=True, echo=print, **settings) -> dict:
    """Distill `teacher` into a fresh student on the dataset `data` (d_coef=0 or no teacher: from scratch).

    `settings` override fields of `options` (DistillOptions: the flags of `edge-tdmpc distill`); any others are
    TrainConfig fields (lr, tau, ...). `resume` continues the run in `out`; `label_cache` is a directory for the
    teacher's precomputed targets. Writes out/student.pt (official layout), out/metrics.jsonl + .csv,
    out/run.json and resumable training state in out/checkpoints. Launch under `torchrun --nproc_per_node N`
    for data-parallel training."""
    from edge_tdmpc.distill.data import EpisodeDataset
    from edge_tdmpc.distill.sampler import SliceSampler
    from edge_tdmpc.distill.teacher import LabelCache

    own, train = split_settings(DistillOptions, settings)
    opts = replace(options or DistillOptions(), **own)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if teacher is None:
        for flag, bad in (("--dagger", opts.dagger), ("--init teacher", opts.init == "teacher")):
            if bad:
                raise ValueError(f"{flag} needs a --teacher checkpoint")
    if teacher is None and opts.d_coef > 0 and set(opts.distill) - {"planner"}:
        opts = replace(opts, d_coef=0.0)
        if rank == 0:
            echo("no --teacher: training the from-scratch baseline (d_coef 0)")
    cfg = TrainConfig.make(d_coef=opts.d_coef, distill=opts.distill, batch_size=opts.batch_size, seed=opts.seed,
                           planner_coef=opts.planner_coef, planner_loss=opts.planner_loss,
                           planner_filter=opts.planner_filter, pi_objective=opts.pi_objective,
                           world_model=opts.world_model, **train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = EpisodeDataset(data)
    if opts.tasks and tuple(opts.tasks) != dataset.tasks:
        from edge_tdmpc.distill.views import TaskView
        dataset = TaskView(dataset, opts.tasks)
    tasks = dataset.tasks
    if "planner" in cfg.distill and "planner" not in dataset.fields and teacher is None:
        raise ValueError(f"--distill planner: {data} carries no planner labels and there is no --teacher to label "
                         "it; collect with `data collect --mpc`, or pass --teacher")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes")
    # --batch-size is the global batch: each of the `world` ranks takes its contiguous share
    sampler = SliceSampler(dataset, horizon=opts.horizon, batch_size=cfg.batch_size // world, seed=cfg.seed,
                           device=device, rank=rank, world_size=world)

    run = dict(data=str(Path(data).resolve()), teacher=str(teacher) if teacher else None,
               **dict(asdict(opts), tasks=list(tasks)), world_size=world, train=asdict(cfg))
    if rank == 0:
        from edge_tdmpc.distill.teacher import write_json
        write_json(out / "run.json", run)

    teach = labels = None
    terms = cfg.teacher_terms
    if teacher is not None and (terms or opts.init == "teacher"):  # at d_coef 0 the terms are only logged
        teach = load_teacher(teacher, tasks, opts.teacher_precision, opts.teacher_tasks, device)
        if label_cache is not None and terms and not opts.dagger:  # rounds add data: their targets come live
            if rank == 0:
                LabelCache.build(teach, dataset, label_cache, terms, opts.horizon, progress=progress)
            if world > 1:
                dist.barrier()
            labels = LabelCache(label_cache, terms, expect=dict(teacher=teach.digest, horizon=opts.horizon))
        if not terms:
            teach = None
    plan_labels = None
    if "planner" in cfg.distill:
        plan_labels = planner_labels(dataset, teacher, opts, label_cache, out, rank, world, progress, echo)
    if opts.init == "teacher":
        student = teacher_student(teacher, tasks, opts, device)
    else:
        student = build_student(tasks, opts.student_size, cfg.seed, device, **opts.student_dims)
    trainer = Trainer(student, cfg, teacher=teach, labels=labels, rank=rank, world_size=world,
                      plan_labels=plan_labels)
    if opts.init == "teacher":  # a resumed run restores its own scale over this
        n = dataset.num_valid_slices(opts.horizon)  # evenly spread over the data (every task), no RNG
        start = dataset.slice_index(np.unique(np.linspace(0, n - 1, cfg.batch_size).astype(np.int64)), opts.horizon)
        trainer.warm_scale(dataset.gather(start, opts.horizon))
    eval_fn = None
    if opts.eval_every:
        present = sorted(set(dataset.episode_table()["task"].tolist()))
        eval_tasks = list(opts.eval_tasks or [tasks[i] for i in present])  # default: the tasks the data covers
        unknown = [t for t in eval_tasks if t not in tasks]
        if unknown:
            raise ValueError(f"--eval-tasks: {unknown[0]!r} is not in the data's task set")

        def eval_fn(model):
            cpu = copy.deepcopy(model).cpu().float().eval()
            return closed_loop_eval(cpu, eval_tasks, opts.eval_episodes, opts.eval_steps, seed=cfg.seed,
                                    mpc=opts.eval_mpc)
    ext = external_logger(opts.logger, out, run) if rank == 0 else None
    if not opts.dagger:
        summary = fit(trainer, sampler, opts.steps, out, opts.save_every, opts.log_every, opts.eval_every, eval_fn,
                      resume, ext, progress, echo)
    else:
        if world > 1:
            raise ValueError("--dagger runs in one process: launch it without torchrun")
        summary = dagger_fit(trainer, dataset, plan_labels, out, teacher, opts, eval_fn, resume, ext, progress,
                             echo, device)
    summary.update(tasks=list(tasks), d_coef=cfg.d_coef, distill=list(cfg.distill), rank=rank)
    if world > 1:
        dist.destroy_process_group()
    return summary
