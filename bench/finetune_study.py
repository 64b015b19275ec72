"""The fine-tuning study (docs/results/domain-students.md): a new task taught to a trained multi-task model
(`edge-tdmpc finetune`, with and without the old tasks' replay) against the same size trained on it from
scratch (`edge-tdmpc train`), and what the old tasks keep.

    edge-tdmpc bench finetune-study similarity CKPT --out held-out.json   # does the start measurement pick kin?
    edge-tdmpc bench finetune-study report RUNS --teacher-bench report.json --md FILE --plot FILE

RUNS/TASK/KIND-sSEED holds one run's output: KIND ft, ft-replay or ft-replay-labels (finetune without replay,
with --replay, with --replay --replay-labels), ft-prior (finetune with a seed phase of one episode, so that the
model's own prior acts from then on) or scratch (train), each with its run.json and
metrics.jsonl (the periodic eval: eval mode, full episodes); fine-tuned runs also hold mt30/report.json (or
another --old-bench), the `edge-tdmpc bench --no-mpc` of the old tasks in the teacher's protocol (--teacher-bench).
"""
import json
from pathlib import Path

import click
import numpy as np

from edge_tdmpc.bench.distill_study import _ci, bootstrap, paired_difference, scores, table

KINDS = ("ft-replay-labels", "ft-replay", "ft", "ft-prior", "scratch")


def held_out_ranking(model, episodes=2, steps=500, seed=1) -> dict:
    """For each task of `model`: its other tasks ranked as starts for it (`most_similar_task`) on `episodes`
    random-action episodes of it -> {task: [(start, loss), ...]}. (A task's ranking reads only the other tasks'
    embeddings, so it is the ranking of the model without the task.) A measurement that picks a task of the
    held-out task's own domain where there is one is doing its job."""
    import torch

    from edge_tdmpc.distill.collect import play
    from edge_tdmpc.distill.teacher import fit_dim
    from edge_tdmpc.tasksets import most_similar_task
    c = model.cfg
    out = {}
    for task in c.tasks:
        data = []
        for k in range(episodes):
            obs, action, reward, _ = play(model, task, None, seed + k, steps, random_actions=True)
            data.append((fit_dim(torch.from_numpy(obs), c.obs_dim), fit_dim(torch.from_numpy(action), c.action_dim),
                         reward))
        out[task] = [(t, v) for t, v in most_similar_task(model, data) if t != task]
    return out


def domain(task: str) -> str:
    return task.split("-", 1)[0]


def eval_curve(run: Path) -> dict[int, float]:
    """env step -> return of the run's periodic eval (metrics.jsonl, its one task)."""
    from edge_tdmpc.distill.runlog import read_metrics
    return {r["step"]: r["mean_return"] for r in read_metrics(run) if r["kind"] == "eval"}


def collect_runs(root: Path) -> dict:
    """{task: {kind: {seed: run directory}}} of the finished runs (a `done` file) under `root`."""
    res = {}
    for d in sorted(root.glob("*/*-s*")):
        kind, seed = d.name.rsplit("-s", 1)
        if kind in KINDS and (d / "done").exists():
            res.setdefault(d.parent.name, {}).setdefault(kind, {})[int(seed)] = d
    return res


LAST = 3  # eval points (of one episode each) averaged into a run's final return: one alone swings by hundreds


def seed_steps(run: Path) -> int:
    """The run's seed phase (run.json; the official default where the run names none)."""
    settings = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    return int(settings.get("seed_steps") or 1000)


def final_return(curve: dict[int, float]) -> float:
    return float(np.mean([curve[s] for s in sorted(curve)[-LAST:]]))


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    """The first eval step whose return is at least `target` (None: never)."""
    return next((s for s in sorted(curve) if curve[s] >= target), None)


@click.group()
def main():
    """The fine-tuning study: the start measurement held out, and the report of finished runs."""


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the rankings (JSON)")
@click.option("--episodes", default=2, show_default=True, help="random-action episodes of each held-out task")
def similarity(checkpoint, out, episodes):
    """Hold out each task of CHECKPOINT in turn and rank the others as its start; how often kin wins."""
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.files import atomic_write_text
    ranking = held_out_ranking(load_model(checkpoint), episodes)
    atomic_write_text(out, json.dumps(ranking, indent=1))
    lines = ["| held-out task | start chosen | loss | next |", "|---|---|---|---|"]
    kin = [t for t in ranking if any(domain(o) == domain(t) for o in ranking if o != t)]
    for t, r in ranking.items():
        lines.append(f"| {t} | {r[0][0]} | {r[0][1]:.3f} | {r[1][0]} {r[1][1]:.3f} |")
    hits = sum(domain(ranking[t][0][0]) == domain(t) for t in kin)
    lines += ["", f"Of the {len(kin)} held-out tasks with another task of their domain in the model, the start chosen "
              f"is of that domain for {hits}."]
    click.echo("\n".join(lines))


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--teacher-bench", type=click.Path(exists=True, dir_okay=False), default=None,
              help="report.json of the model before fine-tuning, on the old tasks (the forgetting baseline)")
@click.option("--old-bench", default="mt30", show_default=True,
              help="each fine-tuned run's directory of its old-task bench, run in --teacher-bench's protocol")
@click.option("--md", type=click.Path(dir_okay=False), default=None, help="write the tables here")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="return against env steps (PNG)")
def report(root, teacher_bench, old_bench, md, plot):
    """Tables (final return, steps to the from-scratch model's final return, the old tasks' MT30 score) and the
    learning curves of the finished runs under ROOT."""
    res = collect_runs(Path(root))
    lines = [f"| new task | run | seeds | start | return after the seed phase | final return (last {LAST} evals) | "
             "env steps to the from-scratch final | share of its steps |", "|---|---|---|---|---|---|---|---|"]
    for task, kinds in res.items():
        curves = {k: {s: eval_curve(d) for s, d in seeds.items()} for k, seeds in kinds.items()}
        scratch = curves.get("scratch", {})
        target = np.mean([final_return(c) for c in scratch.values()]) if scratch else None
        horizon = max(max(c) for c in scratch.values()) if scratch else None
        for kind in KINDS:
            if kind not in curves:
                continue
            cs = curves[kind]
            mean = {s: np.mean([c[s] for c in cs.values() if s in c]) for s in sorted(set().union(*cs.values()))}
            final = np.mean([final_return(c) for c in cs.values()])
            seeded = max(seed_steps(d) for d in kinds[kind].values())
            first = mean.get(min((s for s in mean if s > seeded), default=min(mean)))
            starts = sorted({json.loads((d / "new_task.json").read_text())["init_from"] for d in kinds[kind].values()
                             if (d / "new_task.json").exists()})
            reach = steps_to_reach(mean, target) if target is not None and kind != "scratch" else None
            share = f"{reach / horizon:.2f}" if reach else "–"
            shown = "–" if kind == "scratch" else reach or "not reached"
            lines.append(f"| {task} | {kind} | {len(cs)} | {', '.join(starts) or '–'} | {first:.1f} | {final:.1f} "
                         f"({', '.join(f'{final_return(c):.0f}' for c in cs.values())}) | {shown} | {share} |")
    if teacher_bench:
        ref = scores(teacher_bench)
        old = list(ref)
        before = np.array([ref[t] for t in old])[:, None]
        lines += ["", "The old tasks (MT30 score of the prior, eval mode; 95% intervals over tasks x seeds; "
                  "differences task-paired):", "", "| new task | run | seeds | MT30 score | vs before |",
                  "|---|---|---|---|---|", f"| – | before | – | {_ci(bootstrap(before))} | |"]
        for task, kinds in res.items():
            for kind in KINDS[:-1]:  # the fine-tuned ones
                per_seed = {s: scores(d / old_bench / "report.json") for s, d in kinds.get(kind, {}).items()
                            if (d / old_bench / "report.json").exists()}
                if per_seed:
                    t = table(per_seed, old)
                    d = paired_difference(t, before)
                    lines.append(f"| {task} | {kind} | {len(per_seed)} | {_ci(bootstrap(t))} | {_ci(d, signed=True)} |")
    text = "\n".join(lines)
    click.echo(text)
    if md:
        Path(md).write_text(text + "\n")
    if plot:
        _plot(res, plot)


def _plot(res: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res), figsize=(5 * len(res), 3.6), squeeze=False)
    for ax, (task, kinds) in zip(axes[0], res.items(), strict=True):
        for kind, color in zip(KINDS, ("C3", "C0", "C1", "C4", "C2"), strict=True):
            cs = [eval_curve(d) for d in kinds.get(kind, {}).values()]
            if not cs:
                continue
            steps = sorted(set().union(*cs))
            for c in cs:
                ax.plot(sorted(c), [c[s] for s in sorted(c)], color=color, alpha=0.25, lw=1)
            ax.plot(steps, [np.mean([c[s] for c in cs if s in c]) for s in steps], color=color, marker="o", ms=3,
                    label=f"{kind} ({len(cs)} seeds)")
        ax.set_title(task)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("return (eval mode, 1 episode)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
