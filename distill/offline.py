"""`edge-tdmpc distill`: a student (distilled from a teacher, or from scratch at d_coef 0) trained offline on a
dataset, resumable, data-parallel under torchrun."""
import copy
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from edge_tdmpc.distill.loop import LoopOptions, closed_loop_eval, fit, init_distributed
from edge_tdmpc.distill.losses import DISTILL_TERMS
from edge_tdmpc.distill.runlog import LOGGERS, external_logger
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student, parse_dims, parse_size
from edge_tdmpc.options import check_choices, check_min, setting, split_settings
from edge_tdmpc.runtime import TORCH_DTYPES


@dataclass(frozen=True)
class DistillOptions(LoopOptions):
    """The settings of `edge-tdmpc distill` and `distill()` (their flags: `--field-name`), as run.json records
    them. d_coef, distill, batch_size and seed (LoopOptions) are the run's side of the update's TrainConfig
    (their defaults are its); horizon is the Python API's only."""
    teacher_tasks: str | None = setting(None, "teacher's task set [the data's, or mt30 for 30 tasks]")
    student_size: int | None = setting(1, "size preset, or 'custom' with --student-dims", type=str)
    student_dims: dict | None = setting(None, "architecture overrides, e.g. mlp_dim=128,latent_dim=64", type=str)
    d_coef: float = setting(TrainConfig.d_coef, "distillation weight (paper 0.4; 0 = from scratch)")
    distill: tuple[str, ...] = setting(",".join(TrainConfig.distill),
                                       "distillation terms: reward (paper), value, policy, latent")
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
        if isinstance(self.eval_tasks, str):
            put("eval_tasks", tuple(t for t in self.eval_tasks.split(",") if t) or None)
        elif self.eval_tasks is not None:
            put("eval_tasks", tuple(self.eval_tasks))
        if self.logger is None:
            put("logger", "none")
        bad = [t for t in self.distill if t not in DISTILL_TERMS]
        if bad:
            raise ValueError(f"--distill: unknown distillation term(s) {bad}: choose from {','.join(DISTILL_TERMS)}")
        check_min(self, 0, "d_coef")
        check_min(self, 1, "batch_size", "steps", "horizon")
        check_choices(self)


def load_teacher(path, tasks, precision="fp32", teacher_tasks=None, device="cpu"):
    """Load a teacher checkpoint; its task set is `teacher_tasks`, else the data's or MT30 by row count."""
    from edge_tdmpc.checkpoint import load_model, read_state_dict, to_internal
    if teacher_tasks is None:
        sd = to_internal(read_state_dict(path))
        rows = sd["_task_emb.weight"].shape[0] if "_task_emb.weight" in sd else 1
        if rows == len(tasks):
            teacher_tasks = ",".join(tasks)
        elif rows == 30:
            teacher_tasks = "mt30"
        else:
            raise ValueError(f"{path} is a {rows}-task teacher and the data has {len(tasks)} tasks: name its "
                             "task set with --teacher-tasks")
    from edge_tdmpc.distill.teacher import Teacher
    return Teacher(load_model(path, tasks=teacher_tasks, device=device), tasks=tasks, precision=precision,
                   device=device)


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
    if teacher is None and opts.d_coef > 0:
        opts = replace(opts, d_coef=0.0)
        if rank == 0:
            echo("no --teacher: training the from-scratch baseline (d_coef 0)")
    cfg = TrainConfig.make(d_coef=opts.d_coef, distill=opts.distill, batch_size=opts.batch_size, seed=opts.seed,
                           **train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = EpisodeDataset(data)
    tasks = dataset.tasks
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes")
    # --batch-size is the global batch: each of the `world` ranks takes its contiguous share
    sampler = SliceSampler(dataset, horizon=opts.horizon, batch_size=cfg.batch_size // world, seed=cfg.seed,
                           device=device, rank=rank, world_size=world)

    run = dict(data=str(Path(data).resolve()), teacher=str(teacher) if teacher else None, tasks=list(tasks),
               **asdict(opts), world_size=world, train=asdict(cfg))
    if rank == 0:
        from edge_tdmpc.distill.teacher import write_json
        write_json(out / "run.json", run)

    teach = labels = None
    if teacher is not None and cfg.distill:  # at d_coef 0 the terms are only logged
        teach = load_teacher(teacher, tasks, opts.teacher_precision, opts.teacher_tasks, device)
        if label_cache is not None:
            if rank == 0:
                LabelCache.build(teach, dataset, label_cache, cfg.distill, opts.horizon, progress=progress)
            if world > 1:
                dist.barrier()
            labels = LabelCache(label_cache, cfg.distill, expect=dict(teacher=teach.digest, horizon=opts.horizon))
    student = build_student(tasks, opts.student_size, cfg.seed, device, **opts.student_dims)
    trainer = Trainer(student, cfg, teacher=teach, labels=labels, rank=rank, world_size=world)
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
    summary = fit(trainer, sampler, opts.steps, out, opts.save_every, opts.log_every, opts.eval_every, eval_fn,
                  resume, ext, progress, echo)
    summary.update(tasks=list(tasks), d_coef=cfg.d_coef, distill=list(cfg.distill), rank=rank)
    if world > 1:
        dist.destroy_process_group()
    return summary
