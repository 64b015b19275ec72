"""`edge-tdmpc bench MODEL ...` (closed-loop benchmark), `edge-tdmpc bench compare A.json B.json`, the
benchmarks `edge-tdmpc bench step-latency | train-speed | wallclock` and `edge-tdmpc demo` (every stage at small
scale, benched). Each command imports what it runs when it runs."""
import os
import shlex
import sys

import click

from edge_tdmpc.bench.distill_study import main as distill_study
from edge_tdmpc.bench.finetune_study import main as finetune_study
from edge_tdmpc.bench.harness import BenchOptions
from edge_tdmpc.bench.planner_probe import main as planner_probe
from edge_tdmpc.compile.artifact import CompileOptions
from edge_tdmpc.options import click_options, pop_settings
from edge_tdmpc.planner import PlannerOverrides


class _DefaultToRun(click.Group):
    """`bench MODEL ...` means `bench run MODEL ...`; `bench compare ...`, `bench step-latency ...` and the other
    subcommands stay subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToRun)
def bench():
    """Closed-loop MT30 benchmark: score, latency, memory and size per runtime x precision.

    \b
      edge-tdmpc bench MODEL --tasks mt30 --episodes 10 --out runs/bench   (same as `bench run MODEL ...`)
      edge-tdmpc bench compare runs/a/report.json runs/b/report.json
      edge-tdmpc bench step-latency CKPT --precisions fp32,int8 --steps 30   (planning-step latency, |Δa|)
      edge-tdmpc bench train-speed --teacher-sizes 5,1 --updates 20        (trainer updates/s, peak RSS)
      edge-tdmpc bench wallclock CKPT --task cartpole-balance --hz 20      (real clock vs simulated time)
      edge-tdmpc bench distill-study run|report ...                        (the MT30 distillation study)
      edge-tdmpc bench planner-probe run|report ...                        (imitating the planner perfectly)
    """


@bench.command("run")
@click.argument("model", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--resume", is_flag=True, help="continue a killed run in --out, skipping finished episodes")
@click_options(BenchOptions, exclude=("planner",))
@click_options(PlannerOverrides)
@click_options(CompileOptions, exclude=("seed",))
def run_cmd(model, out, resume, **settings):
    """Run closed-loop episodes of MODEL (checkpoint or compiled artifact directory); write report.json,
    report.md and plots to OUT. A checkpoint is first compiled for the runtimes that run an artifact
    (onnxruntime, tensorrt), with the calibration and verification options below, into the compile cache."""
    from edge_tdmpc.bench.harness import run_bench
    compile_options = pop_settings(CompileOptions, settings)
    planner = pop_settings(PlannerOverrides, settings).given()
    command = " ".join(["edge-tdmpc", *map(shlex.quote, sys.argv[1:])])
    rep = run_bench(model, out, pop_settings(BenchOptions, settings), resume=resume, command=command,
                    compile_options=compile_options, planner=planner, echo=click.echo)
    for s in rep["summary"]:
        lat = s["latency_ms"]
        click.echo(f"{s['runtime']}/{s['precision']:<5} score {s['score']:6.2f} over {s['tasks']} task(s)  "
                   f"latency p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  peak RSS {s['peak_rss_mib']:.0f} MiB"
                   + (f"  fallback ticks {s['fallback_rate']:.1%}" if s["fallback_rate"] is not None else ""))
    for c in rep.get("check_actions") or []:
        click.echo(f"check {c['runtime']}/{c['precision']:<5} max |Δa| {c['max_abs']:.3g}  median {c['median_abs']:.3g}"
                   f"  (tolerance {c['tolerance']})")
    click.echo(f"wrote {os.path.join(out, 'report.json')}, report.md, {', '.join(rep['plots'])}")


@bench.command("compare")
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
def compare_cmd(a, b):
    """Difference of two bench reports (report.json files or their directories): B against A."""
    from edge_tdmpc.bench.report import compare, load_report
    click.echo(compare(load_report(a), load_report(b)), nl=False)


def _names(csv: str) -> list[str]:
    return [s for s in csv.split(",") if s]


@bench.command("step-latency")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--precisions", default="fp32,fp16,bf16,int8,mixed", show_default=True,
              help="precisions of the timed runtimes")
@click.option("--runtimes", default="onnxruntime", show_default=True,
              help="runtimes timed against eager fp32 (comma-separated): onnxruntime, tensorrt, "
                   "torch-cuda-graph(-triton), torch-compile(-fused/-triton)")
@click.option("--artifacts", default="", help="compiled artifact directories to time too (comma-separated)")
@click.option("--device", default="cpu", show_default=True, help="eager baseline's device; cuda on a GPU machine")
@click.option("--steps", default=30, show_default=True, help="timed planning steps (0: no latency table)")
@click.option("--own-noise", is_flag=True, help="also time each runtime drawing its own noise")
@click.option("--profile", is_flag=True, help="GPU: count each runtime's kernels per step")
@click.option("--tasks", default="", help="closed-loop tasks (comma-separated); none: latency only")
@click.option("--episode-steps", default=500, show_default=True)
@click.option("--eager-closed-loop", is_flag=True, help="also run the eager reference closed loop")
@click.option("--seed", default=1, show_default=True, help="closed-loop episode seed")
@click.option("--threads", type=int, default=None, help="intra-op threads for torch and ONNX Runtime")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write all numbers here")
def step_latency_cmd(checkpoint, precisions, runtimes, artifacts, device, steps, own_noise, profile, tasks,
                     episode_steps, eager_closed_loop, seed, threads, json_path):
    """Planning-step latency, size, |delta action| and closed-loop score per runtime x precision, in one run:
    every runtime plans the same recorded observations with the same noise, interleaved with eager fp32."""
    from edge_tdmpc.bench.step_latency import benchmark
    benchmark(checkpoint, _names(precisions), _names(runtimes), _names(artifacts), device, steps, own_noise, profile,
              _names(tasks), episode_steps, eager_closed_loop, seed, threads, json_path, echo=click.echo)


@bench.command("train-speed")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--student-size", default=1, show_default=True)
@click.option("--teacher-sizes", default="5,1", show_default=True)
@click.option("--updates", default=20, show_default=True, help="timed updates per variant")
@click.option("--warmup", default=3, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
@click.option("--rss-data", type=click.Path(file_okay=False), default=None,
              help="also measure peak RSS training on a synthetic dataset in this directory (written if absent)")
@click.option("--rss-gb", default=26.0, show_default=True, help="its size on disk (make it exceed RAM)")
@click.option("--rss-updates", default=60, show_default=True)
@click.option("--skip-speed", is_flag=True, help="only the RSS measurement")
def train_speed_cmd(batch_size, student_size, teacher_sizes, updates, warmup, threads, json_out, rss_data, rss_gb,
                    rss_updates, skip_speed):
    """Trainer updates/s vs an eager port of the official update (ratios measured in this run)."""
    from edge_tdmpc.bench.train_speed import benchmark
    benchmark(batch_size, student_size, [int(s) for s in _names(teacher_sizes)], updates, warmup, threads, json_out,
              rss_data, rss_gb, rss_updates, skip_speed, echo=click.echo)


@bench.command("wallclock")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", required=True)
@click.option("--hz", type=float, required=True)
@click.option("--ticks", default=200, show_default=True)
@click.option("--runtime", default="onnxruntime", show_default=True)
@click.option("--precision", default="fp32", show_default=True)
@click.option("--fallback", type=click.Choice(["hold", "plan"]), default="hold", show_default=True)
@click.option("--seed", default=1, show_default=True, help="env seed (official initial state of episode 0)")
def wallclock_cmd(checkpoint, task, hz, ticks, runtime, precision, fallback, seed):
    """The robot loop in wall-clock time, with a DMC task as the plant, against the bench's simulated time."""
    from edge_tdmpc.bench.wallclock import benchmark
    benchmark(checkpoint, task, hz, ticks, runtime, precision, fallback, seed, echo=click.echo)


bench.add_command(distill_study, "distill-study")
bench.add_command(finetune_study, "finetune-study")
bench.add_command(planner_probe, "planner-probe")


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="the CI form: tiny budgets, a couple of minutes")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="use this teacher instead of training one (trained on --tasks)")
@click.option("--tasks", default=None, help="comma-separated tasks [the demo's easy set]")
@click.option("--workers", default=2, show_default=True, help="collection worker processes")
@click.option("--seed", default=1, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads (the demo's models are small)")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress bars (off in a log)")
def demo(out, quick, teacher, tasks, workers, seed, threads, progress):
    """The whole pipeline at small scale on CPU: teacher -> data -> distilled student and from-scratch
    baseline -> compile -> bench -> OUT/report.md. Rerun to resume."""
    from edge_tdmpc.bench.demo import demo as run
    report = run(out, quick=quick, teacher=teacher, tasks=tasks, workers=workers, seed=seed, echo=click.echo,
                 threads=threads, progress=progress)
    click.echo(f"report: {report}")
