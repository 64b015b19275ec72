"""`edge-tdmpc distill`: a student (distilled from a teacher, or from scratch at d_coef 0) trained offline on a
dataset, resumable, data-parallel under torchrun."""
import copy
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from edge_tdmpc.distill.loop import closed_loop_eval, fit, init_distributed
from edge_tdmpc.distill.runlog import external_logger
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student


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


def distill(data, out, teacher=None, student_size: int | None = 1, steps: int = 1_000_000, resume=False,
            teacher_precision="fp32", teacher_tasks=None, label_cache=None, horizon=3, save_every=10_000,
            log_every=100, eval_every=0, eval_tasks=None, eval_steps=100, eval_episodes=1, eval_mpc=False,
            student_dims: dict | None = None, device=None, logger=None, progress=True, echo=print,
            **train) -> dict:
    """Distill `teacher` into a fresh student on the dataset `data` (d_coef=0 or no teacher: from scratch).

    Writes out/student.pt (official layout), out/metrics.jsonl + .csv, out/run.json and resumable training
    state in out/checkpoints. Launch under `torchrun --nproc_per_node N` for data-parallel training."""
    from edge_tdmpc.distill.data import EpisodeDataset
    from edge_tdmpc.distill.sampler import SliceSampler
    from edge_tdmpc.distill.teacher import LabelCache

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cfg = TrainConfig.make(**train)
    if teacher is None and cfg.d_coef > 0:
        cfg = TrainConfig.make(**{**asdict(cfg), "d_coef": 0.0})
        if rank == 0:
            echo("no --teacher: training the from-scratch baseline (d_coef 0)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = EpisodeDataset(data)
    tasks = dataset.tasks
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world} processes")
    # --batch-size is the global batch: each of the `world` ranks takes its contiguous share
    sampler = SliceSampler(dataset, horizon=horizon, batch_size=cfg.batch_size // world, seed=cfg.seed,
                           device=device, rank=rank, world_size=world)

    run = dict(data=str(Path(data).resolve()), teacher=str(teacher) if teacher else None, tasks=list(tasks),
               student_size=student_size, student_dims=student_dims or {}, horizon=horizon, steps=steps,
               world_size=world, train=asdict(cfg))
    if rank == 0:
        from edge_tdmpc.distill.teacher import write_json
        write_json(out / "run.json", run)

    teach = labels = None
    if teacher is not None and cfg.distill:  # at d_coef 0 the terms are only logged
        teach = load_teacher(teacher, tasks, teacher_precision, teacher_tasks, device)
        if label_cache is not None:
            if rank == 0:
                LabelCache.build(teach, dataset, label_cache, cfg.distill, horizon, progress=progress)
            if world > 1:
                dist.barrier()
            labels = LabelCache(label_cache, cfg.distill, expect=dict(teacher=teach.digest, horizon=horizon))
    student = build_student(tasks, student_size, cfg.seed, device, **(student_dims or {}))
    trainer = Trainer(student, cfg, teacher=teach, labels=labels, rank=rank, world_size=world)
    eval_fn = None
    if eval_every:
        if isinstance(eval_tasks, str):
            eval_tasks = eval_tasks.split(",")
        present = sorted(set(dataset.episode_table()["task"].tolist()))
        eval_tasks = list(eval_tasks or [tasks[i] for i in present])  # default: the tasks the data covers
        unknown = [t for t in eval_tasks if t not in tasks]
        if unknown:
            raise ValueError(f"eval task {unknown[0]!r} is not in the data's task set")

        def eval_fn(model):
            cpu = copy.deepcopy(model).cpu().float().eval()
            return closed_loop_eval(cpu, eval_tasks, eval_episodes, eval_steps, seed=cfg.seed, mpc=eval_mpc)
    ext = external_logger(logger, out, run) if rank == 0 else None
    summary = fit(trainer, sampler, steps, out, save_every, log_every, eval_every, eval_fn, resume, ext,
                  progress, echo)
    summary.update(tasks=list(tasks), d_coef=cfg.d_coef, distill=list(cfg.distill), rank=rank)
    if world > 1:
        dist.destroy_process_group()
    return summary
