"""The fine-tuning study (docs/results/domain-students.md): a new task taught to a trained multi-task model
(`edge-tdmpc finetune`, with and without the old tasks' replay) against the same size trained on it from
scratch (`edge-tdmpc train`), and what the old tasks keep.

    edge-tdmpc bench finetune-study similarity CKPT --out held-out.json   # does the start measurement pick kin?
    edge-tdmpc bench finetune-study report RUNS --teacher-bench report.json --md FILE --plot FILE
    edge-tdmpc bench finetune-study subset STUDENTS --teacher CKPT --teacher-prior report.json  # subset students
    edge-tdmpc bench finetune-study hold-out CKPT --task TASK --out FILE    # a held-out MT30 task's start model
    edge-tdmpc bench finetune-study start CKPT --task NEW --init-from TASK --out FILE   # a borrowed row, no update

RUNS/TASK/KIND-sSEED holds one run's output: KIND ft, ft-replay or ft-replay-labels (finetune without replay, with
--replay, with --replay --replay-labels), ft-prior (finetune with a seed phase of one episode, so that the model's
own prior acts from then on), ft-embedding (finetune --trainable embedding: the new task's row alone learns),
ft-return and ft-embedding-return (ft and ft-embedding with --start-by return), ft-return-prior (ft-return with
--seed-steps 0: the prior acts from the first step, one update per step, no burst of seed-phase updates),
ft-return-warmup (ft-return with --pi-warmup 1000: the policy held through the seed phase's burst),
ft-return-anchor and ft-return-prior-anchor (ft-return and ft-return-prior with --anchor-coef: the prior held to
its start), ft-anchor (ft with --anchor-coef), ft-return-replay and ft-return-replay-anchor (ft-return and
ft-return-anchor with --replay) or scratch (train), each with its run.json and metrics.jsonl (the periodic eval:
eval mode, full episodes); fine-tuned runs also hold mt30/report.json (or another --old-bench), the `edge-tdmpc
bench --no-mpc` of the old tasks in the teacher's protocol (--teacher-bench).
"""
import json
from pathlib import Path

import click
import numpy as np

from edge_tdmpc.bench.distill_study import _ci, bootstrap, paired_difference, paired_ratio, scores, table
from edge_tdmpc.bench.report import save_figure
from edge_tdmpc.files import atomic_write_text

KINDS = ("ft-replay-labels", "ft-replay", "ft", "ft-prior", "ft-embedding", "ft-return", "ft-embedding-return",
         "ft-return-prior", "ft-return-warmup", "ft-return-anchor", "ft-return-prior-anchor", "ft-anchor",
         "ft-return-replay", "ft-return-replay-anchor", "ft-return-prior-self", "ft-return-prior-self-every",
         "ft-return-prior-anchor-self",
         "scratch")


RANKING_SEED = 1  # the env seed of the held-out rankings' episodes


def held_out_ranking(model, episodes=2, steps=500, seed=RANKING_SEED, by="loss") -> dict:
    """For each task of `model`: its other tasks ranked as starts for it -> {task: [(start, value), ...]}, best
    first. by="loss": `most_similar_task` on `episodes` random-action episodes of it (a task's ranking reads only
    the other tasks' embeddings, so it is the ranking of the model without the task); by="return": the prior's
    return on it under each other task's row (`returns_by_row`, `episodes` episodes of `steps` steps), with its own
    row's return, the ceiling a start could reach, under the task's own name first. A measurement that picks a
    task of the held-out task's own domain where there is one, or a row that acts nearly as well as its own, is
    doing its job."""
    import torch

    from edge_tdmpc.distill.collect import play
    from edge_tdmpc.distill.finetune import returns_by_row
    from edge_tdmpc.distill.teacher import fit_dim
    from edge_tdmpc.tasksets import most_similar_task
    c = model.cfg
    out = {}
    for i, task in enumerate(c.tasks):
        if by == "return":
            returns = returns_by_row(model, task, i, episodes, steps, seed, among=c.tasks)
            own = returns.pop(task)
            out[task] = [(task, own), *sorted(returns.items(), key=lambda tr: -tr[1])]
            continue
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


def run_setting(run: Path, name: str, default):
    """A setting of the run (its run.json), or `default` where the run names none."""
    settings = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    return default if settings.get(name) is None else settings[name]


def seed_steps(run: Path) -> int:
    """The run's seed phase (the official default where the run names none; 0: no seed phase)."""
    return int(run_setting(run, "seed_steps", 1000))


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
@click.option("--by", type=click.Choice(["loss", "return"]), default="loss", show_default=True,
              help="the start measurement: finetune's --start-by")
@click.option("--episodes", default=2, show_default=True,
              help="episodes of each held-out task (loss: random actions; return: the prior's, per row)")
@click.option("--steps", default=500, show_default=True, help="agent steps per episode")
@click.option("--loss-ranking", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --by return: an earlier --by loss ranking, whose picks are then scored too")
@click.option("--score-episodes", default=3, show_default=True,
              help="with --by return: fresh episodes (other initial states) on which the picks and the own row are "
              "scored, since the best of 29 rows on the ranking's own episodes is biased upward")
@click.option("--ranking", "earlier", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --by return: a ranking this command wrote before; score its picks without ranking again")
def similarity(checkpoint, out, by, episodes, steps, loss_ranking, score_episodes, earlier):
    """Hold out each task of CHECKPOINT in turn and rank the others as its start; how often kin wins (and, by
    return, how much of the task's own row's return the chosen row keeps, on fresh episodes)."""
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.distill.finetune import returns_by_row
    from edge_tdmpc.files import atomic_write_text
    model = load_model(checkpoint)
    if earlier:
        ranking = json.loads(Path(earlier).read_text())
    else:
        ranking = held_out_ranking(model, episodes, steps, by=by)
        atomic_write_text(out, json.dumps(ranking, indent=1))
    starts = {t: r[1:] if by == "return" else r for t, r in ranking.items()}
    kin = [t for t in ranking if any(domain(o) == domain(t) for o in ranking if o != t)]
    hits = sum(domain(starts[t][0][0]) == domain(t) for t in kin)
    if by == "loss":
        lines = ["| held-out task | start chosen | loss | next |", "|---|---|---|---|"]
        lines += [f"| {t} | {r[0][0]} | {r[0][1]:.3f} | {r[1][0]} {r[1][1]:.3f} |" for t, r in ranking.items()]
    else:
        picks = {"return": {t: r[0][0] for t, r in starts.items()}}
        if loss_ranking:
            picks["loss"] = {t: r[0][0] for t, r in json.loads(Path(loss_ranking).read_text()).items()}
        seed = RANKING_SEED + 1000  # other initial states than the ranking's
        lines = ["| held-out task | own row | " + " | ".join(f"start by {k}" for k in picks) + " |",
                 "|---|---|" + "---|" * len(picks)]
        share, scored = {k: [] for k in picks}, {}
        for i, t in enumerate(model.cfg.tasks):
            got = returns_by_row(model, t, i, score_episodes, steps, seed, among={t, *(p[t] for p in picks.values())})
            own = got[t]
            scored[t] = dict(own=own, **{k: (p[t], got[p[t]]) for k, p in picks.items()})
            cells = []
            for k, p in picks.items():
                cells.append(f"{p[t]} ({got[p[t]]:.0f})")
                share[k].append(got[p[t]] >= 0.9 * own)
            lines.append(f"| {t} | {own:.0f} | " + " | ".join(cells) + " |")
        atomic_write_text(Path(out).with_suffix(".scored.json"), json.dumps(scored, indent=1))
        lines += ["", f"Returns on {score_episodes} fresh episode(s) of {steps} steps per task (env seed {seed}; the "
                  f"ranking's were seed {RANKING_SEED})."] + [
            f"Start by {k}: the chosen row reaches at least 90% of the own row's return on {sum(v)} of {len(v)} "
            "held-out tasks." for k, v in share.items()]
    lines += ["", f"Of the {len(kin)} held-out tasks with another task of their domain in the model, the start chosen "
              f"is of that domain for {hits}."]
    click.echo("\n".join(lines))


@main.command("hold-out")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", required=True, help="the task to take out of CHECKPOINT's task set")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the model without it (official layout)")
def hold_out(checkpoint, task, out):
    """CHECKPOINT less one task (its embedding row; `subset_model`, so the other tasks' outputs stay the model's):
    the start of fine-tuning on a held-out task. Its shared weights were trained on the task too: what
    fine-tuning it back measures is how much of a task a new embedding row recovers, an upper end for a new task."""
    from edge_tdmpc.checkpoint import load_model, save_model
    from edge_tdmpc.tasks import check_task_subset
    from edge_tdmpc.tasksets import subset_model
    model = load_model(checkpoint)
    check_task_subset([task], model.cfg.tasks, "the model")
    held = subset_model(model, [t for t in model.cfg.tasks if t != task])
    save_model(held, out, dtype=next(model.parameters()).dtype)
    click.echo(f"{out}: {len(held.cfg.tasks)} tasks (without {task}), dims {held.cfg.obs_dim}/{held.cfg.action_dim}")


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", required=True, help="the new task")
@click.option("--init-from", required=True, help="the existing task whose embedding row the new one copies")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the model with it (official layout)")
def start(checkpoint, task, init_from, out):
    """CHECKPOINT with TASK added as `finetune` adds it, before any update: the baseline a fine-tuned run must
    beat (a borrowed row alone may already act well)."""
    from edge_tdmpc.checkpoint import load_model, save_model
    from edge_tdmpc.tasksets import add_task
    model = load_model(checkpoint)
    save_model(add_task(model, task, init_from), out, dtype=next(model.parameters()).dtype)
    click.echo(f"{out}: {task} added with {init_from}'s embedding row")


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
    lines = [f"| new task | run | seeds | start | first eval | return after the seed phase | final return (last {LAST} "
             "evals) | env steps to the from-scratch final | share of its steps |", "|---" * 9 + "|"]
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
            lines.append(f"| {task} | {kind} | {len(cs)} | {', '.join(starts) or '–'} | {mean[min(mean)]:.1f} | "
                         f"{first:.1f} | {final:.1f} "
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
        atomic_write_text(md, text + "\n")
    if plot:
        _plot(res, plot)


def subset_students(root: Path, prior_bench: str, planner_bench: str) -> dict:
    """{objective: {seed: (run directory, prior scores {task: score}, planner scores or None)}} of the subset
    students under `root` (OBJ-sSEED, each with student.pt and its benches)."""
    res = {}
    for d in sorted(root.glob("*-s*")):
        objective, seed = d.name.rsplit("-s", 1)
        prior, planner = d / prior_bench / "report.json", d / planner_bench / "report.json"
        if (d / "student.pt").exists() and prior.exists():
            res.setdefault(objective, {})[int(seed)] = (d, scores(prior), scores(planner) if planner.exists() else None)
    return res


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--teacher", required=True, type=click.Path(exists=True, dir_okay=False), help="the teacher checkpoint")
@click.option("--teacher-prior", required=True, type=click.Path(exists=True, dir_okay=False),
              help="report.json of the teacher's prior on (at least) the students' tasks, in their protocol")
@click.option("--teacher-planner", type=click.Path(exists=True, dir_okay=False), default=None,
              help="report.json of the teacher's planner on them")
@click.option("--prior-bench", default="bench-no-mpc", show_default=True, help="each student's prior bench")
@click.option("--planner-bench", default="bench-mpc-1ep", show_default=True, help="each student's planner bench")
@click.option("--md", type=click.Path(dir_okay=False), default=None, help="write the tables here")
def subset(root, teacher, teacher_prior, teacher_planner, prior_bench, planner_bench, md):
    """Subset students (ROOT/OBJ-sSEED: `distill --tasks LIST`, benched on their own tasks) against the teacher
    on those tasks: score of the prior and the planner, its share of the teacher's, parameters, latency, size."""
    from edge_tdmpc.checkpoint import load_model
    res = subset_students(Path(root), prior_bench, planner_bench)
    if not res:
        raise click.ClickException(f"no student under {root} has {prior_bench}/report.json: bench them first")
    tasks = list(next(iter(next(iter(res.values())).values()))[1])
    t_prior, t_plan = scores(teacher_prior), scores(teacher_planner) if teacher_planner else None
    missing = [t for t in tasks if t not in t_prior or (t_plan is not None and t not in t_plan)]
    if missing:
        raise click.ClickException(f"the teacher's reports lack {', '.join(missing)}: bench it on the students' tasks")
    rows = {r["task"]: r for r in json.loads(Path(teacher_prior).read_text())["rows"]}
    p50 = lambda rs: float(np.median([r["latency_ms"]["p50"] for r in rs]))  # noqa: E731
    n_teacher = load_model(teacher).total_params
    base = np.array([[t_prior[t]] for t in tasks])
    plan_mean = np.mean([t_plan[t] for t in tasks]) if t_plan else None
    lines = ["| model | parameters | seeds | prior | share of the teacher's prior / planner | planner | prior p50 "
             "latency | size |", "|---|---|---|---|---|---|---|---|",
             f"| teacher | {n_teacher:,} | – | {base.mean():.2f} | – | "
             f"{'–' if plan_mean is None else f'{plan_mean:.2f}'} | {p50(rows[t] for t in tasks):.2f} ms | "
             f"{rows[tasks[0]]['size_mib']:.2f} MiB |"]
    tables = {}
    for objective, seeds in res.items():
        table_ = np.array([[seeds[s][1][t] for s in sorted(seeds)] for t in tasks])
        tables[objective] = table_
        d0 = seeds[min(seeds)][0]
        own = {r["task"]: r for r in json.loads((d0 / prior_bench / "report.json").read_text())["rows"]}
        n = load_model(d0 / "student.pt").total_params
        plans = [np.mean([p[t] for t in tasks]) for _, _, p in seeds.values() if p is not None]
        share = f"{table_.mean() / base.mean():.0%}" + (f" / {table_.mean() / plan_mean:.0%}" if plan_mean else "")
        planned = f"{np.mean(plans):.2f} ({', '.join(f'{v:.1f}' for v in plans)})" if plans else "–"
        lines.append(f"| {objective} | {n:,} ({n / n_teacher:.0%}) | {len(seeds)} | {_ci(bootstrap(table_))} ("
                     + ", ".join(f"{table_[:, k].mean():.1f}" for k in range(table_.shape[1])) + f") | {share} | "
                     f"{planned} | {p50(own[t] for t in tasks):.2f} ms | {own[tasks[0]]['size_mib']:.2f} MiB |")
    lines += ["", "| comparison (prior) | difference or share (task-paired, 95%) |", "|---|---|"]
    names = list(tables)
    for i, a in enumerate(names):
        lines.append(f"| {a} - teacher | {_ci(paired_difference(tables[a], base), signed=True)} |")
        share, lo, hi = paired_ratio(tables[a], base)
        lines.append(f"| {a} / teacher (share of its prior) | {share:.0%} [{lo:.0%}, {hi:.0%}] |")
        lines += [f"| {a} - {b} | {_ci(paired_difference(tables[a], tables[b]), signed=True)} |" for b in names[i + 1:]]
    lines += ["", "| task | teacher prior | teacher planner | " + " | ".join(f"{o} prior" for o in names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for i, t in enumerate(tasks):
        lines.append(f"| {t} | {t_prior[t]:.1f} | {'–' if t_plan is None else f'{t_plan[t]:.1f}'} | "
                     + " | ".join(f"{tables[o][i].mean():.1f}" for o in names) + " |")
    text = "\n".join(lines)
    click.echo(text)
    if md:
        atomic_write_text(md, text + "\n")


def _plot(res: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res), figsize=(5 * len(res), 3.6), squeeze=False)
    for ax, (task, kinds) in zip(axes[0], res.items(), strict=True):
        for i, kind in enumerate(KINDS):
            color, ls = ("k", "-") if kind == "scratch" else (f"C{i % 10}", "-" if i < 10 else "--")
            cs = [eval_curve(d) for d in kinds.get(kind, {}).values()]
            if not cs:
                continue
            steps = sorted(set().union(*cs))
            for c in cs:
                ax.plot(sorted(c), [c[s] for s in sorted(c)], color=color, alpha=0.25, lw=1)
            ax.plot(steps, [np.mean([c[s] for c in cs if s in c]) for s in steps], color=color, ls=ls, marker="o",
                    ms=3, label=f"{kind} ({len(cs)} seeds)")
        episodes = sorted({run_setting(d, "eval_episodes", 1) for ks in kinds.values() for d in ks.values()})
        ax.set_title(task)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(f"return (eval mode, {'/'.join(map(str, episodes))} episode(s) a point)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
