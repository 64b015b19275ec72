"""`edge-tdmpc data convert|collect|info`: write and inspect offline datasets for distillation."""
import click

from edge_tdmpc.distill.collect import COLLECT_RUNTIMES, CollectOptions
from edge_tdmpc.options import click_options, order_options, pop_settings
from edge_tdmpc.runtime import PRECISIONS

_out = click.option("--out", required=True, type=click.Path(file_okay=False),
                    help="dataset directory (created, or appended to)")

@click.group("data")
def data():
    """Offline datasets: convert the official files, collect from a teacher, inspect."""


@data.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@_out
@click.option("--tasks", default="mt30", show_default=True,
              help="names of the files' task ids: mt30, mt80, or a comma-separated list")
@click.option("--trust-pickle", is_flag=True,
              help="allow unpickling the files (they are pickled TensorDicts; only for files you trust)")
@click.option("--obs-dim", type=int, default=None, help="pad observations to this size [file's]")
@click.option("--action-dim", type=int, default=None, help="pad actions to this size [file's]")
@click.option("--shard-rows", default=1 << 21, show_default=True, help="rows per shard (bounds RAM in use)")
def convert(sources, out, tasks, trust_pickle, obs_dim, action_dim, shard_rows):
    """Convert official TD-MPC2 dataset files (.pt files or directories).

    Streams one file at a time, memory-mapped, in shard-sized chunks into --out; rerun the same command to
    resume. The files are pickled TensorDicts: --trust-pickle is required to unpickle them."""
    from edge_tdmpc.distill.convert import convert as run
    run(sources, out, tasks=tasks, trust_pickle=trust_pickle, obs_dim=obs_dim, action_dim=action_dim,
        shard_rows=shard_rows, echo=click.echo)


@order_options("teacher", "teacher_tasks", "tasks", "episodes", "out")
@data.command()
@click.option("--teacher", required=True, type=click.Path(exists=True, dir_okay=False), help="checkpoint")
@click.option("--tasks", required=True, help="comma-separated task names to collect on, or mt30")
@_out
@click_options(CollectOptions, exclude=("eval_mode", "planner"))
def collect(teacher, tasks, out, **settings):
    """Collect episodes by rolling a teacher checkpoint out on tasks.

    Planning (--mpc) or the policy prior (--no-mpc), acting stochastically plus --noise-std Gaussian noise;
    one seed per (task, episode), so the data does not depend on --workers. Rerun the same command to
    resume or to add episodes."""
    from edge_tdmpc.distill.collect import collect as run
    run(teacher, tasks, out, pop_settings(CollectOptions, settings), echo=click.echo)


@data.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--teacher", required=True, type=click.Path(exists=True, dir_okay=False), help="checkpoint")
@click.option("--teacher-tasks", default=None, help="the teacher's task set [by its embedding rows]")
@_out
@click.option("--runtime", default="torch", show_default=True, type=click.Choice(COLLECT_RUNTIMES),
              help="the teacher planner's runtime (onnxruntime: compiled first, faster on a CPU)")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0), help="worker processes")
@click.option("--seed", default=None, type=int, help="noise seed of the planner [the data's collect seed, else 0]")
def label(dataset, teacher, teacher_tasks, out, runtime, precision, workers, seed):
    """Label every state of DATASET with the teacher's planner (the targets of `distill --distill planner`).

    The planner replays each episode in order with its own warm start; rerun the same command to resume.
    Pass the directory to `distill --label-cache` as its planner/ subdirectory, or use OUT directly."""
    from edge_tdmpc.distill.data import EpisodeDataset
    from edge_tdmpc.distill.labels import PlannerLabelCache
    from edge_tdmpc.distill.offline import teacher_task_set
    ds = EpisodeDataset(dataset)
    if seed is None:
        seed = int((ds.meta.get("collect") or {}).get("seed", 0))
    cache = PlannerLabelCache.build(teacher, ds, out, teacher_tasks or teacher_task_set(teacher, ds.tasks), runtime,
                                    precision, workers=workers, seed=seed, echo=click.echo)
    click.echo(f"{out}: planner labels of {cache.array.shape[0]} states")


@data.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def info(directory):
    """Size, dims and episodes per task of a dataset DIRECTORY."""
    from edge_tdmpc.distill.data import summarize
    click.echo(summarize(directory))
