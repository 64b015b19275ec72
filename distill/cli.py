"""`edge-tdmpc distill | train | finetune`: thin wrappers over edge_tdmpc.distill functions; their settings' flags
come from DistillOptions, OnlineOptions and FinetuneOptions (one name, default and help text from the flag to
run.json)."""
import click

from edge_tdmpc.distill.finetune import FinetuneOptions
from edge_tdmpc.distill.offline import DistillOptions
from edge_tdmpc.distill.online import OnlineOptions
from edge_tdmpc.options import click_options, order_options, pop_settings

_out = click.option("--out", required=True, type=click.Path(file_okay=False))


def process_options(f):
    """--threads and --progress: how this process runs, not settings of the run."""
    f = click.option("--progress/--no-progress", default=True, show_default=True)(f)
    return click.option("--threads", type=int, default=None, help="torch CPU threads [torch's default]")(f)


def _threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


@order_options("teacher", "teacher_tasks", "data", "student_size", "student_dims", "d_coef", "distill", "batch_size",
               "steps", "out", "resume", "label_cache", "teacher_precision", "eval_tasks", "eval_episodes", "eval_mpc",
               "logger", "device")
@click.command()
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="teacher checkpoint (omit, or --d-coef 0, for the from-scratch baseline)")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="dataset directory")
@_out
@click.option("--resume", is_flag=True, help="continue the run in --out from its newest good checkpoint")
@click.option("--label-cache", type=click.Path(file_okay=False), default=None,
              help="precompute the teacher's targets here once; later runs reuse them (no teacher forward)")
@click_options(DistillOptions, exclude=("horizon",))
@process_options
def distill(teacher, data, out, resume, label_cache, threads, progress, **settings):
    """Distill TEACHER into a small student on --data (TD-MPC-Opt); writes OUT/student.pt and metrics.jsonl.

    Data-parallel: torchrun --nproc_per_node N -m edge_tdmpc.cli distill ..."""
    from edge_tdmpc.distill.offline import distill as run
    options = pop_settings(DistillOptions, settings)
    _threads(threads)
    summary = run(data, out, teacher=teacher, options=options, resume=resume, label_cache=label_cache,
                  progress=progress, echo=click.echo)
    if summary["rank"] == 0:
        click.echo(f"student: {summary['student']} ({summary['steps']} updates, d_coef {summary['d_coef']}, "
                   f"load with tasks={','.join(summary['tasks'])!r})")


@order_options("tasks", "size", "dims", "steps", "out", "mpc", "seed_steps", "episode_steps", "utd", "batch_size",
               "resume", "logger")
@click.command()
@click.option("--tasks", required=True, help="comma-separated task names (or mt30)")
@_out
@click.option("--resume", is_flag=True, help="continue the run in --out")
@click_options(OnlineOptions, exclude=("planner",))
@process_options
def train(tasks, out, resume, threads, progress, **settings):
    """Online TD-MPC2 from scratch on TASKS (makes a teacher); writes OUT/model.pt and OUT/replay/ (CPU)."""
    from edge_tdmpc.distill.online import train as run
    options = pop_settings(OnlineOptions, settings)
    _threads(threads)
    s = run(tasks, out, options, resume=resume, progress=progress, echo=click.echo)
    click.echo(f"model: {s['model']} ({s['env_steps']} env steps, {s['updates']} updates); "
               f"its episodes: {out}/replay (usable with `edge-tdmpc distill --data`)")


@order_options("checkpoint", "task", "steps", "out", "init_from", "start_by", "start_episodes", "replay",
               "replay_ratio", "mpc", "seed_steps", "episode_steps", "utd", "batch_size", "resume", "logger")
@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", required=True, help="the new task: one of edge_tdmpc.tasks.TASK_DIMS that fits the model's "
              "dims and is not yet its")
@_out
@click.option("--resume", is_flag=True, help="continue the run in --out")
@click_options(FinetuneOptions, exclude=("planner",))
@process_options
def finetune(checkpoint, task, out, resume, threads, progress, **settings):
    """Teach the multi-task model in CHECKPOINT one more task, online; writes OUT/model.pt (one more task).

    --steps 0 adds the task with the row --start-by return (or --init-from) chooses and trains nothing."""
    from edge_tdmpc.distill.finetune import finetune as run
    options = pop_settings(FinetuneOptions, settings)
    _threads(threads)
    s = run(checkpoint, task, out, options, resume=resume, progress=progress, echo=click.echo)
    click.echo(f"model: {s['model']} ({len(s['tasks'])} tasks, {task} from {s['init_from']}'s embedding; "
               f"{s['env_steps']} env steps, {s['updates']} updates)")
