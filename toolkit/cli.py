"""`edge-tdmpc` command line: a thin layer over functions users can also import."""
import errno
import os
import sys
from pathlib import Path

import click


class _OneLineErrors(click.Group):
    """User errors (bad task, bad checkpoint, wrong dims) and the machine's (an unwritable directory, a full
    disk) print one line, not a traceback (EDGE_TDMPC_DEBUG=1 shows it)."""

    def parse_args(self, ctx, args):
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        out = _out(ctx.meta.get("argv", ()))
        try:
            return super().invoke(ctx)
        except (ValueError, OSError) as e:
            if "EDGE_TDMPC_DEBUG" in os.environ:
                raise
            click.echo(f"error: {_one_line(e, out)}", err=True)
            sys.exit(2)


def _out(args) -> str | None:
    """The command line's --out, if any: where a write that names no file (a library's) was going."""
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a[len("--out="):]
    return None


def _one_line(e: Exception, out: str | None = None) -> str:
    if isinstance(e, ValueError) or not isinstance(e, OSError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" {e.filename}" if e.filename else f" a file under {out}" if out else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device for{where or ' a file'}: free some space or write elsewhere (--out)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return (f"cannot write{where} ({e.strerror}): choose a writable --out, or set EDGE_TDMPC_CACHE for the "
                "compile cache")
    return f"{e.strerror or e}{':' + where if where else ''}"


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="edge-tdmpc")
def main():
    """Distill, quantize, compile and benchmark TD-MPC2 agents for edge robots."""


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--tasks", default=None, help="task set or task name the file was trained on  [default: the one the "
              "file names, else mt30]")
def inspect(checkpoint, tasks):
    """Size preset, task set, parameter counts, dtype and bytes on disk of CHECKPOINT."""
    from edge_tdmpc.inspect import summarize
    click.echo(summarize(checkpoint, tasks))


@main.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--tasks", default=None, help="comma-separated task names, or mt30  [default: the model's own]")
@click.option("--episodes", default=1, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--eval-mode/--stochastic", default=False, show_default=True,
              help="official evaluate.py acts stochastically; --eval-mode drops the final action noise")
@click.option("--mpc/--no-mpc", default=True, show_default=True, help="plan with MPPI, or act from the policy prior")
@click.option("--steps", default=500, show_default=True, help="agent steps per episode (500 = full)")
def eval_cmd(checkpoint, tasks, episodes, seed, eval_mode, mpc, steps):
    """Closed-loop episodes of CHECKPOINT on TASKS: per-task return and normalised score."""
    from edge_tdmpc.evaluate import evaluate
    evaluate(checkpoint, tasks, episodes=episodes, seed=seed, eval_mode=eval_mode, mpc=mpc, steps=steps,
             echo=click.echo)


def _add_stage_commands():
    """bench, compile, distill, data...: the commands the packages built on toolkit declare as entry points
    (pyproject.toml, group edge_tdmpc.commands)."""
    from importlib.metadata import entry_points
    for ep in entry_points(group="edge_tdmpc.commands"):
        main.add_command(ep.load(), ep.name)


_add_stage_commands()

if __name__ == "__main__":
    main(prog_name=Path(sys.argv[0]).name)
