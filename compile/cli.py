"""`edge-tdmpc compile` and `edge-tdmpc targets`."""
from pathlib import Path

import click

from edge_tdmpc.compile.artifact import CompileOptions
from edge_tdmpc.options import click_options, pop_settings
from edge_tdmpc.planner import PlannerOverrides
from edge_tdmpc.runtime import PRECISIONS


@click.command("compile")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--target", default="cpu", show_default=True,
              help="device profile: cpu, jetson (= orin-nano), orin-nx, agx-orin, xavier-nx, thor, x86-dgpu, ...")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="artifact directory [default: out/<checkpoint>-<precision>-<target>]")
@click.option("--tasks", default=None, help="task set the checkpoint was trained on  [default: the one the file "
              "names, else mt30]")
@click_options(PlannerOverrides)
@click_options(CompileOptions)
def compile_cmd(checkpoint, precision, target, out, tasks, **settings):
    """Compile CHECKPOINT's whole planning step into a verified artifact (ONNX / TensorRT deploy bundle)."""
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.compile.artifact import compile_model, read_manifest
    from edge_tdmpc.compile.targets import load_target
    from edge_tdmpc.planner import PlannerConfig

    options = pop_settings(CompileOptions, settings)
    planner = PlannerConfig.make(**pop_settings(PlannerOverrides, settings).given())
    profile = load_target(target)
    out = Path(out or Path("out") / f"{Path(checkpoint).stem}-{precision}-{profile['name']}")
    model = load_model(checkpoint, tasks=tasks)
    path = compile_model(model, precision, planner, profile["name"], out=out, checkpoint=checkpoint, options=options,
                         echo=click.echo)
    m = read_manifest(path)
    click.echo(summary(m, Path(checkpoint).stat().st_size))
    click.echo(f"artifact: {path}")
    if m["status"] != "ok":
        raise click.ClickException("verification FAILED: the artifact is marked 'failed' and runtimes refuse it")


def summary(m: dict, checkpoint_bytes: int | None = None) -> str:
    """The compile summary table."""
    graph = m["files"][m["graph"]]["bytes"]
    engine = m.get("engine") or {}
    counts = {}
    for p in m["layer_precisions"].values():
        counts[p] = counts.get(p, 0) + 1
    ckpt = f"  (checkpoint {checkpoint_bytes / 1e6:.2f} MB)" if checkpoint_bytes else ""
    rows = [
        ("target", f"{m['target']} ({m['target_family']}), runtime {m['runtime']}"),
        ("precision", f"{m['precision']}  layers: " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))),
        ("planner", ", ".join(f"{k}={v}" for k, v in m["planner"].items())),
        ("step.onnx", f"{graph / 1e6:.2f} MB{ckpt}"),
        ("engine", engine.get("status", "-") if not engine.get("bytes") else
         f"{engine['bytes'] / 1e6:.2f} MB, TensorRT {engine['tensorrt']}, {engine['gpu']}"),
    ]
    if m.get("calibration"):
        c = m["calibration"]
        rows.append(("calibration", f"{c['rows']} planning steps from {len(c['tasks'])} episodes, {c['method']}"))
    v = m["verification"]
    rows.append(("verified", f"{v['rows']} recorded steps, {v['executed_by']}"))
    for name, o in v["outputs"].items():
        tol = f"mean <= {o['tol_mean']:.0e}" + (f", max <= {o['tol_max']:.0e}" if o["tol_max"] is not None else "")
        label = f"  {name}" + (" (rel)" if name == "value" else "")
        rows.append((label, f"max |d| {o['max_abs']:.2e}  mean |d| {o['mean_abs']:.2e}  ({tol})  "
                            f"{'PASS' if o['ok'] else 'FAIL'}"))
    rows.append(("status", m["status"] + f"  ({m['compile_seconds']} s)"))
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


@click.command("targets")
def targets_cmd():
    """List the device profiles `compile --target` knows."""
    from edge_tdmpc.compile.targets import summary_rows
    click.echo("\n".join(summary_rows()))
