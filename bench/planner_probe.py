"""What a prior that imitated its planner perfectly would score: the planner's actions under the changes a policy
of the observation alone cannot avoid (docs/results/distill-mt30.md, session 18).

    edge-tdmpc bench planner-probe run CKPT --tasks walker-stand,reacher-easy --episodes 1 --out runs/probe
    edge-tdmpc bench planner-probe run CKPT --prior STUDENT --variants prior,prior-fit ... --out runs/probe-student
    edge-tdmpc bench planner-probe report runs/probe --md FILE

Every variant acts in eval mode on the same episodes (the bench's initial states and noise seeds):

    prior          the policy prior (its mean): what a distilled student executes (--prior: another checkpoint's
                   prior, a student of CKPT with its task set)
    prior-fit      the prior acting, with CKPT's planner labelling each state it visits along the way (its own
                   warm start, as a DAgger round labels): how well the prior fits the planner where it goes
    plan           MPPI as the bench runs it: the picked elite, warm-started from the previous step's plan
    mean           the same planner executing its final mean's first action, the label the planner term teaches
    mean-cold      that mean planned from no warm start at every step: the planner without its memory of the
                   previous plan, which a prior of the observation alone cannot have
    mean-cold-avg  the average of --replans cold means under independent noise: the function of the state that
                   a prior fitting cold labels by MSE tends to with unlimited data and capacity

Per step, over the task's own action dims: mean-cold-avg records the labels' spread (the variance of the first
action's mean across the replans: half the MSE two labels of one state have between them, the floor of a fit) and
the prior's squared error to their average; mean records the prior's squared error to the warm label (what a
dataset collected by the planner holds) and that label's squared distance to a cold replan of the same state on a
second runtime (the part of a label that the planner's memory makes, which no function of the state can fit);
prior-fit records the prior's squared error to the label of each state it visits.
`run` is resumable: finished (task, episode, variant) rows are kept in OUT/probe.jsonl and skipped.
"""
import json
from pathlib import Path

import click
import numpy as np

VARIANTS = ("prior", "prior-fit", "plan", "mean", "mean-cold", "mean-cold-avg")


class ProbeActor:
    """One variant as the bench's episode loop runs a runtime (`reset(seed)`, `act(obs, task, t0, eval_mode)`),
    over a planning runtime and a prior runtime (`edge_tdmpc.runtime.Runtime`)."""

    def __init__(self, variant: str, planner, prior, action_mask: np.ndarray, replans: int = 4, cold=None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant '{variant}': choose from {', '.join(VARIANTS)}")
        if replans < 1:
            raise ValueError(f"--replans must be at least 1, got {replans}")
        self.variant, self.planner, self.prior, self.replans, self.cold = variant, planner, prior, replans, cold
        self.dims = np.flatnonzero(action_mask)  # the task's own action dims (the rest are padding)
        self.stats = {}

    def reset(self, seed):
        self.planner.reset(seed)
        self.prior.reset(seed)
        if self.cold is not None:
            self.cold.reset(seed + 1)  # its own noise: the variant's actions stay those of the planner alone
        self.stats = {}

    def _record(self, name, a, b):
        self.stats.setdefault(name, []).append(float(((a - b)[self.dims] ** 2).mean()))

    def _mean(self, obs, task, t0) -> np.ndarray:
        self.planner.act(obs, task, t0=t0, eval_mode=True)
        return self.planner.planned_mean()[0]

    def act(self, obs, task, t0, eval_mode=True):
        v = self.variant
        if v == "prior":
            return self.prior.act(obs, task, t0=t0, eval_mode=True)
        if v == "prior-fit":
            action = self.prior.act(obs, task, t0=t0, eval_mode=True)
            self._record("prior_to_warm", action, self._mean(obs, task, t0))
            return action
        if v == "plan":
            return self.planner.act(obs, task, t0=t0, eval_mode=True)
        if v == "mean-cold":
            return self._mean(obs, task, True)
        prior = self.prior.act(obs, task, t0=t0, eval_mode=True)
        if v == "mean":
            label = self._mean(obs, task, t0)
            if self.cold is not None:
                self.cold.act(obs, task, t0=True, eval_mode=True)
                self._record("memory", label, self.cold.planned_mean()[0])
        else:
            means = np.stack([self._mean(obs, task, True) for _ in range(self.replans)])
            label = means.mean(0)
            self.stats.setdefault("spread", []).append(float(means[:, self.dims].var(0).mean()))
        self._record("prior_to_warm" if v == "mean" else "prior_to_cold", prior, label)
        return label


# --- run: (task, episode, variant) jobs in worker processes ------------------------------------------------------
_WORKER = {}


def _init(settings):
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.planner import PlannerConfig
    from edge_tdmpc.runtime import TorchRuntime
    model = load_model(settings["checkpoint"])
    student = load_model(settings["prior"]) if settings["prior"] else model
    cfg = PlannerConfig(**settings["planner"])

    def planner():
        if settings["runtime"] == "torch":
            return TorchRuntime(model, settings["precision"], cfg)
        from edge_tdmpc.compile.runtimes import OnnxRuntime
        return OnnxRuntime(settings["directory"], settings["precision"], cfg, threads=1)
    prior = TorchRuntime(student, "fp32", PlannerConfig(mpc=False))
    _WORKER.update(model=model, planner=planner(), cold=planner(), prior=prior, settings=settings)


def _job(job) -> dict:
    from edge_tdmpc.rollout import evaluation_episode
    task, episode, variant = job
    model, s = _WORKER["model"], _WORKER["settings"]
    index = model.cfg.tasks.index(task) if model.cfg.multitask else None
    mask = model.action_mask(index)
    mask = np.ones(model.cfg.action_dim) if mask is None else mask.reshape(-1).float().numpy()
    actor = ProbeActor(variant, _WORKER["planner"], _WORKER["prior"], mask, s["replans"], _WORKER["cold"])
    ep, _, seeds = evaluation_episode(actor, model.cfg, task, s["seed"], episode, s["steps"], eval_mode=True)
    row = dict(task=task, episode=episode, variant=variant, ret=ep.ret, score=ep.ret / 10, steps=ep.steps,
               wall_s=round(ep.wall_s, 2), **seeds)
    row.update({name: float(np.mean(x)) for name, x in actor.stats.items()})
    return row


def read_rows(out: Path) -> list[dict]:
    """OUT/probe.jsonl's rows, a line cut by a kill left out."""
    from edge_tdmpc.distill.runlog import read_jsonl
    return read_jsonl(out / "probe.jsonl")


def run_probe(checkpoint, tasks, variants, episodes, out: Path, seed=1, steps=500, replans=4, runtime="onnxruntime",
              precision="int8", workers=2, planner=None, prior=None, echo=print) -> list[dict]:
    """Every (task, episode, variant) not yet in OUT/probe.jsonl, appended as it finishes -> all rows (planner: a
    PlannerConfig, the official one by default; prior: the checkpoint whose prior acts, CKPT's by default)."""
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.files import atomic_write_text
    from edge_tdmpc.planner import PlannerConfig
    from edge_tdmpc.workers import worker_map
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    model = load_model(checkpoint)
    unknown = [t for t in tasks if t not in model.cfg.tasks]
    if unknown:
        raise ValueError(f"task(s) {unknown} are not in the model's task set: choose from {list(model.cfg.tasks)}")
    theirs = load_model(prior).cfg.tasks if prior is not None else model.cfg.tasks
    if tuple(theirs) != tuple(model.cfg.tasks):
        raise ValueError(f"--prior {prior} has the task set {list(theirs)}, CKPT {list(model.cfg.tasks)}: give a "
                         "student of CKPT with its task set")
    cfg = planner or PlannerConfig()
    settings = dict(checkpoint=str(checkpoint), prior=str(prior) if prior else None, planner=dict(vars(cfg)),
                    runtime=runtime, precision=precision, directory=None, seed=seed, steps=steps, replans=replans)
    if runtime != "torch":
        from edge_tdmpc.compile.runtimes import compile_for
        settings["directory"] = str(compile_for(runtime, model, precision, cfg, echo=echo))
    out.mkdir(parents=True, exist_ok=True)
    rows, path = read_rows(out), out / "probe.jsonl"
    if path.exists() and len(rows) != len(path.read_text().splitlines()):  # a killed run's torn last line: the
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # next row must not join it
    done = {(r["task"], r["episode"], r["variant"]) for r in rows}
    cost = {"mean-cold-avg": replans + 0.1, "mean": 2, "prior": 0.1}  # longest first, so the workers finish together
    jobs = sorted(((t, e, v) for t in tasks for e in range(episodes) for v in variants if (t, e, v) not in done),
                  key=lambda j: -cost.get(j[2], 1))
    if jobs:
        with open(path, "a") as log, worker_map(_job, jobs, workers, _init, (settings,), ordered=False) as results:
            for row in results:
                log.write(json.dumps(row) + "\n")
                log.flush()
                echo(f"{row['task']} ep{row['episode']} {row['variant']}: {row['score']:.1f}")
    return read_rows(out)


# --- report ------------------------------------------------------------------------------------------------------
STATS = {("mean-cold-avg", "spread"): "cold labels' spread",  # per-step statistics (module doc), their columns
         ("mean-cold-avg", "prior_to_cold"): "prior to cold label",
         ("mean", "prior_to_warm"): "prior to warm label (planner's states)",
         ("mean", "memory"): "warm to cold label",
         ("prior-fit", "prior_to_warm"): "prior to warm label (prior's states)"}


def score_table(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """(tasks, variants, {(task, variant): [score per episode]}) over the tasks every variant finished."""
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["variant"]), {})[r["episode"]] = r["score"]
    variants = [v for v in VARIANTS if any(k[1] == v for k in by)]
    tasks = sorted({k[0] for k in by if all((k[0], v) in by for v in variants)})
    eps = {t: set.intersection(*(set(by[t, v]) for v in variants)) for t in tasks}
    return tasks, variants, {(t, v): [by[t, v][e] for e in sorted(eps[t])] for t in tasks for v in variants}


def report_markdown(rows: list[dict]) -> str:
    from edge_tdmpc.bench.distill_study import _ci, bootstrap, paired_difference
    tasks, variants, scores = score_table(rows)
    if not tasks:
        raise ValueError("no task has finished every variant yet: run `planner-probe run` first")
    mat = {v: np.array([[np.mean(scores[t, v])] for t in tasks]) for v in variants}
    n_eps = min(len(scores[t, variants[0]]) for t in tasks)
    lines = [f"{len(tasks)} tasks, {n_eps}+ episode(s) each, eval mode; intervals over tasks (95%).", "",
             "| variant | score | - plan (task-paired) | - prior (task-paired) |", "|---|---|---|---|"]
    for v in variants:
        cells = [_ci(bootstrap(mat[v]))]
        for ref in ("plan", "prior"):
            cells.append("" if v == ref or ref not in mat else _ci(paired_difference(mat[v], mat[ref]), signed=True))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    stats = {}  # (task, stat) -> values over episodes
    for r in rows:
        for variant, name in STATS:
            if name in r and r["variant"] == variant:
                stats.setdefault((r["task"], variant, name), []).append(r[name])
    shown = [k for k in STATS if any(s[1:] == k for s in stats)]
    head = " | ".join(variants + [STATS[k] for k in shown])
    lines += ["", f"| task | {head} |", "|---|" + "---|" * (len(variants) + len(shown))]
    for t in tasks:
        cells = [f"{np.mean(scores[t, v]):.1f}" for v in variants]
        cells += [f"{np.mean(stats[(t, *k)]):.3f}" if (t, *k) in stats else "" for k in shown]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.group()
def main():
    """What a perfect imitation of the planner would score (module doc: the variants)."""


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--tasks", required=True, help="comma-separated tasks of the checkpoint")
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--episodes", default=1, show_default=True, help="episodes per task and variant")
@click.option("--seed", default=1, show_default=True, help="env seed (the bench's protocol)")
@click.option("--steps", default=500, show_default=True, help="agent steps per episode")
@click.option("--replans", default=4, show_default=True, help="cold replans averaged by mean-cold-avg")
@click.option("--prior", type=click.Path(exists=True, dir_okay=False), help="whose prior acts [CKPT's]: a student")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="onnxruntime", show_default=True)
@click.option("--precision", default="int8", show_default=True)
@click.option("--workers", default=2, show_default=True, help="worker processes (0: this process)")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def run(checkpoint, tasks, variants, episodes, seed, steps, replans, prior, runtime, precision, workers, out):
    """Play every variant on every task (resumable)."""
    try:
        rows = run_probe(checkpoint, [t for t in tasks.split(",") if t], [v for v in variants.split(",") if v],
                         episodes, Path(out), seed, steps, replans, runtime, precision, workers, prior=prior,
                         echo=click.echo)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(report_markdown(rows))


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--md", type=click.Path(dir_okay=False), help="write the tables here too")
def report(out, md):
    """The variants' scores, their differences and the labels' spread."""
    from edge_tdmpc.files import atomic_write_text
    try:
        text = report_markdown(read_rows(Path(out)))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if md:
        atomic_write_text(md, text)
    click.echo(text)
