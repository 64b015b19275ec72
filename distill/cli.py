"""`edge-tdmpc distill | train`: thin wrappers over edge_tdmpc.distill functions."""
import click

_DIMS = ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "task_dim", "simnorm_dim")


def parse_dims(text: str | None) -> dict:
    """'mlp_dim=128,latent_dim=64' -> {'mlp_dim': 128, 'latent_dim': 64}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in _DIMS or not value.isdigit():
            raise ValueError(f"bad --dims entry {item!r}: use key=int with keys {', '.join(_DIMS)}")
        out[key] = int(value)
    return out


def _size(value):
    if value in (None, "custom"):
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a size preset (1, 5, 19, 48, 317) or 'custom'") from None


_common = [
    click.option("--seed", default=1, show_default=True),
    click.option("--save-every", default=10_000, show_default=True, help="checkpoint period (state + model file)"),
    click.option("--log-every", default=100, show_default=True, help="metrics row period (averaged)"),
    click.option("--eval-every", default=0, show_default=True, help="closed-loop eval period (0: never)"),
    click.option("--eval-steps", default=100, show_default=True, help="agent steps per eval episode"),
    click.option("--threads", type=int, default=None, help="torch CPU threads [torch's default]"),
    click.option("--progress/--no-progress", default=True, show_default=True),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


def _threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


@click.command()
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="teacher checkpoint (omit, or --d-coef 0, for the from-scratch baseline)")
@click.option("--teacher-tasks", default=None, help="teacher's task set [the data's, or mt30 for 30 tasks]")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="dataset directory")
@click.option("--student-size", default="1", show_default=True, help="size preset, or 'custom' with --student-dims")
@click.option("--student-dims", default=None, help="architecture overrides, e.g. mlp_dim=128,latent_dim=64")
@click.option("--d-coef", default=0.4, show_default=True, help="distillation weight (paper 0.4; 0 = from scratch)")
@click.option("--distill", "terms", default="reward", show_default=True,
              help="distillation terms: reward (paper), value, policy, latent")
@click.option("--batch-size", default=256, show_default=True, help="global batch (split over torchrun ranks)")
@click.option("--steps", default=1_000_000, show_default=True, help="updates (paper: 1M)")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="continue the run in --out from its newest good checkpoint")
@click.option("--label-cache", type=click.Path(file_okay=False), default=None,
              help="precompute the teacher's targets here once; later runs reuse them (no teacher forward)")
@click.option("--teacher-precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True)
@click.option("--eval-tasks", default=None, help="tasks of the periodic eval [those the data covers]")
@click.option("--eval-episodes", default=1, show_default=True)
@click.option("--eval-mpc/--eval-policy", default=False, show_default=True,
              help="periodic eval by MPPI planning or the policy prior (cheap)")
@click.option("--logger", type=click.Choice(["none", "tensorboard", "wandb"]), default="none",
              show_default=True, help="extra metrics sink besides metrics.jsonl/.csv")
@click.option("--device", default=None, help="cpu or cuda [cuda when available]")
@common
def distill(teacher, teacher_tasks, data, student_size, student_dims, d_coef, terms, batch_size, steps, out,
            resume, label_cache, teacher_precision, eval_tasks, eval_episodes, eval_mpc, logger, device, seed,
            save_every, log_every, eval_every, eval_steps, threads, progress):
    """Distill TEACHER into a small student on --data (TD-MPC-Opt); writes OUT/student.pt and metrics.jsonl.

    Data-parallel: torchrun --nproc_per_node N -m edge_tdmpc.cli distill ..."""
    from edge_tdmpc.distill.offline import distill as run
    _threads(threads)
    summary = run(data, out, teacher=teacher, student_size=_size(student_size), steps=steps, resume=resume,
                  teacher_precision=teacher_precision, teacher_tasks=teacher_tasks, label_cache=label_cache,
                  save_every=save_every, log_every=log_every, eval_every=eval_every, eval_steps=eval_steps,
                  eval_tasks=eval_tasks, eval_episodes=eval_episodes, eval_mpc=eval_mpc,
                  student_dims=parse_dims(student_dims), device=device, logger=logger, progress=progress,
                  echo=click.echo, d_coef=d_coef, distill=terms, batch_size=batch_size, seed=seed)
    if summary["rank"] == 0:
        click.echo(f"student: {summary['student']} ({summary['steps']} updates, d_coef {summary['d_coef']}, "
                   f"load with tasks={','.join(summary['tasks'])!r})")


@click.command()
@click.option("--tasks", required=True, help="comma-separated task names (or mt30)")
@click.option("--size", default="1", show_default=True, help="size preset, or 'custom' with --dims")
@click.option("--dims", default=None, help="architecture overrides, e.g. mlp_dim=256,latent_dim=64")
@click.option("--steps", default=100_000, show_default=True, help="environment steps, all tasks together")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--mpc/--no-mpc", default=False, show_default=True,
              help="act by MPPI planning (official, ~100x slower on CPU) or the policy prior")
@click.option("--seed-steps", type=int, default=None, help="random-action steps first [max(1000, 5 x episode)]")
@click.option("--episode-steps", default=500, show_default=True, help="agent steps per training episode")
@click.option("--utd", default=1.0, show_default=True, help="updates per environment step")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--resume", is_flag=True, help="continue the run in --out")
@click.option("--logger", type=click.Choice(["none", "tensorboard", "wandb"]), default="none",
              show_default=True, help="also send metric rows to TensorBoard or wandb (when installed)")
@common
def train(tasks, size, dims, steps, out, mpc, seed_steps, episode_steps, utd, batch_size, resume, logger, seed,
          save_every, log_every, eval_every, eval_steps, threads, progress):
    """Online TD-MPC2 from scratch on TASKS (makes a teacher); writes OUT/model.pt and OUT/replay/ (CPU)."""
    from edge_tdmpc.distill.online import train as run
    _threads(threads)
    s = run(tasks, out, size=_size(size), steps=steps, seed=seed, dims=parse_dims(dims), mpc=mpc,
            seed_steps=seed_steps, episode_steps=episode_steps, utd=utd, batch_size=batch_size,
            save_every=save_every, log_every=log_every, eval_every=eval_every, eval_steps=eval_steps, resume=resume,
            logger=logger, progress=progress, echo=click.echo)
    click.echo(f"model: {s['model']} ({s['env_steps']} env steps, {s['updates']} updates); "
               f"its episodes: {out}/replay (usable with `edge-tdmpc distill --data`)")
