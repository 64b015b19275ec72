"""The MT30 distillation study: students x objectives x training seeds, trained by `edge-tdmpc distill`, scored by
`edge-tdmpc bench --no-mpc`, reported with bootstrap intervals (docs/results/distill-mt30.md).

    edge-tdmpc bench distill-study run --teacher T --data D --out runs/study --grid '1M-teacher:tdmpc2,planner:1,2,3'
    edge-tdmpc bench distill-study report runs/study --teacher-bench prior=runs/teacher/report.json --md FILE

`run` is resumable: a run whose student and bench reports exist is skipped, an interrupted one resumes
(`distill --resume`, `bench --resume`). Each run is a subprocess with one torch thread; --jobs of them at once.
"""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from edge_tdmpc.bench.report import save_figure
from edge_tdmpc.files import atomic_write_text

# student: the flags that make it
STUDENTS = {
    "1M-teacher": ["--init", "teacher"],                        # (a) the teacher's own weights, 1M
    "s128": ["--student-size", "custom", "--student-dims",     # (b) from scratch, 128 wide (~0.2M)
             "enc_dim=128,mlp_dim=128,latent_dim=64,num_q=5,task_dim=96"],
}
# objective: the flags that make it (equal data, equal updates); planner+daggerN (objective_flags): N rounds
OBJECTIVES = {
    "tdmpc2": ["--d-coef", "0", "--distill", ""],
    "reward": ["--d-coef", "0.4", "--distill", "reward"],
    "planner": ["--d-coef", "0", "--distill", "planner"],
    "reward+planner": ["--d-coef", "0.4", "--distill", "reward,planner"],
    "planner+dagger": ["--d-coef", "0", "--distill", "planner", "--dagger", "1"],
    "planner-c100": ["--d-coef", "0", "--distill", "planner", "--planner-coef", "100"],
    "planner-nll": ["--d-coef", "0", "--distill", "planner", "--planner-loss", "nll", "--planner-coef", "1"],
    "planner-frozen": ["--d-coef", "0", "--distill", "planner", "--frozen-world-model"],
    "planner-frozen-c100": ["--d-coef", "0", "--distill", "planner", "--frozen-world-model", "--planner-coef", "100"],
    "planner-frozen-q": ["--d-coef", "0", "--distill", "planner", "--frozen-world-model", "--planner-filter", "q"],
    "planner-frozen-bc": ["--d-coef", "0", "--distill", "planner", "--frozen-world-model", "--pi-objective", "planner"],
}
# bench protocols: the prior in eval mode and stochastic (--episodes each), and MPPI planning with the student's
# own world model, in the official stochastic protocol (--plan-episodes each: a pass costs ~20x the prior's)
EVALS = {"eval": ["--no-mpc", "--eval-mode"], "stochastic": ["--no-mpc", "--stochastic"],
         "plan": ["--mpc", "--stochastic", "--runtime", "onnxruntime", "--precision", "fp32"]}


def objective_flags(name: str) -> list[str]:
    """An objective's distill flags; 'OBJ+daggerN' is a planner objective OBJ with N DAgger rounds."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    head, _, rounds = name.partition("+dagger")
    if head in OBJECTIVES and "planner" in OBJECTIVES[head] and rounds.isdigit() and int(rounds) > 0:
        return [*OBJECTIVES[head], "--dagger", rounds]
    raise click.BadParameter(f"unknown objective {name!r}: choose from {', '.join(OBJECTIVES)}, or OBJ+daggerN "
                             "with OBJ a planner objective")


@dataclass(frozen=True)
class Run:
    student: str
    objective: str
    seed: int
    steps: int
    extra: tuple = field(default=())

    @property
    def name(self) -> str:
        return f"{self.student}-{self.objective}-s{self.seed}"


def grid(spec: str, steps: int) -> list[Run]:
    """'student:obj1,obj2:seeds;...' e.g. '1M-teacher:tdmpc2,planner:1,2,3;s128:tdmpc2,reward:1'."""
    runs = []
    for part in filter(None, spec.split(";")):
        student, objectives, seeds = part.split(":")
        if student not in STUDENTS:
            raise click.BadParameter(f"unknown student {student!r}: choose from {', '.join(STUDENTS)}")
        for o in objectives.split(","):
            objective_flags(o)
            runs += [Run(student, o, int(s), steps) for s in seeds.split(",")]
    return runs


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "edge_tdmpc.cli", *args]


def _die_with_parent():
    """In a run's process, before exec: SIGTERM when the driver dies (Linux), so a killed study leaves no run."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the runs finish on their own
        pass


def _run(cmd, log, env):
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)


def execute(run: Run, teacher, data, out: Path, flags: list[str], episodes: int, dagger_steps: int,
            evals=("eval", "stochastic"), plan_episodes: int = 1) -> str:
    d = out / run.name
    env = dict(os.environ, OMP_NUM_THREADS="1", EDGE_TDMPC_ORT_THREADS="1",
               MUJOCO_GL=os.environ.get("MUJOCO_GL", "disable"))
    log = open(out / f"{run.name}.log", "a")
    if not (d / "done").exists():
        cmd = _cli("distill", "--teacher", str(teacher), "--data", str(data), "--out", str(d), "--steps",
                   str(run.steps), "--seed", str(run.seed), "--threads", "1", "--no-progress", "--device", "cpu",
                   "--label-cache", str(d / "labels"), "--dagger-steps", str(dagger_steps), "--workers", "1",
                   *flags, *STUDENTS[run.student], *objective_flags(run.objective))  # the run's own flags win
        if (d / "checkpoints").exists():
            cmd.append("--resume")
        _run(cmd, log, env)
        (d / "done").write_text("")
    for kind in evals:
        n = plan_episodes if kind == "plan" else episodes
        if not (d / f"bench-{kind}" / "report.json").exists():
            _run(_cli("bench", "run", str(d / "student.pt"), "--tasks", "mt30", *EVALS[kind], "--episodes", str(n),
                      "--seed", "1", "--workers", "1", "--warmup", "0", "--out", str(d / f"bench-{kind}"),
                      "--resume"), log, env)
    return run.name


@click.group()
def main():
    """The MT30 distillation study."""


@main.command()
@click.option("--teacher", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--grid", "spec", required=True, help="student:objectives:seeds;... (see `grid`)")
@click.option("--steps", default=2000, show_default=True, help="updates per run")
@click.option("--episodes", default=3, show_default=True, help="bench episodes per task of the prior (seed 1)")
@click.option("--plan-episodes", default=1, show_default=True, help="bench episodes per task with planning")
@click.option("--dagger-steps", default=100, show_default=True, help="steps per DAgger episode")
@click.option("--jobs", default=2, show_default=True, help="runs at once")
@click.option("--flags", default="", help="extra distill flags for every run, e.g. '--planner-coef 1'")
@click.option("--evals", default="eval,stochastic", show_default=True,
              help="bench protocols: eval (the prior, eval mode), stochastic (the prior), plan (MPPI)")
def run(teacher, data, out, spec, steps, episodes, plan_episodes, dagger_steps, jobs, flags, evals):
    """Train and bench every run of --grid (resumable)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = grid(spec, steps)
    kinds = tuple(k for k in evals.split(",") if k)
    bad = [k for k in kinds if k not in EVALS]
    if bad:
        raise click.BadParameter(f"unknown protocol(s) {bad}: choose from {', '.join(EVALS)}", param_hint="--evals")
    with ThreadPoolExecutor(jobs) as pool:
        for name in pool.map(lambda r: execute(r, teacher, data, out, flags.split(), episodes, dagger_steps, kinds,
                                               plan_episodes), runs):
            click.echo(f"done: {name}")


# --- report ----------------------------------------------------------------------------------------------------
def scores(report_path) -> dict[str, float]:
    """task -> score (mean return / 10 over the report's episodes) of a bench report's first row set."""
    rows = json.loads(Path(report_path).read_text())["rows"]
    return {r["task"]: r["score"] for r in rows}


def bootstrap(table: np.ndarray, reps=2000, seed=0) -> tuple[float, float, float]:
    """Mean over tasks of the mean over seeds of table [tasks, seeds], and its 95% interval: tasks resampled
    with replacement, and the training seeds within each task."""
    rng = np.random.default_rng(seed)
    T, S = table.shape
    ti = rng.integers(0, T, (reps, T))
    si = rng.integers(0, S, (reps, T, S))
    boot = table[ti[..., None], si].mean(axis=(1, 2))
    return float(table.mean()), *map(float, np.percentile(boot, [2.5, 97.5]))


def _paired_draws(a: np.ndarray, b: np.ndarray, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`reps` bootstrap means of a and of b [tasks, seeds each]: the same tasks drawn for both, with replacement,
    and each one's seeds drawn within it."""
    rng = np.random.default_rng(seed)
    T = a.shape[0]
    ti = rng.integers(0, T, (reps, T))
    sa = rng.integers(0, a.shape[1], (reps, T, a.shape[1]))
    sb = rng.integers(0, b.shape[1], (reps, T, b.shape[1]))
    return a[ti[..., None], sa].mean(axis=(1, 2)), b[ti[..., None], sb].mean(axis=(1, 2))


def paired_difference(a: np.ndarray, b: np.ndarray, reps=2000, seed=0) -> tuple[float, float, float]:
    """mean(a) - mean(b) over tasks [tasks, seeds each], with the 95% interval of a task-paired bootstrap."""
    boot_a, boot_b = _paired_draws(a, b, reps, seed)
    return float(a.mean() - b.mean()), *map(float, np.percentile(boot_a - boot_b, [2.5, 97.5]))


def paired_ratio(a: np.ndarray, b: np.ndarray, reps=2000, seed=0) -> tuple[float, float, float]:
    """mean(a) / mean(b) over tasks [tasks, seeds each] (a's share of b's score), with the 95% interval of the
    same task-paired bootstrap as paired_difference: a task drawn twice counts twice in both means."""
    num, den = _paired_draws(a, b, reps, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(den > 0, num / den, np.inf)  # a draw of b's zero-score tasks only: no share to speak of
    # nearest, not interpolated: an infinite draw would make an interpolated end NaN
    return float(a.mean() / b.mean()), *map(float, np.percentile(boot, [2.5, 97.5], method="nearest"))


def collect_results(out: Path) -> dict:
    """{(student, objective): {kind: {seed: {task: score}}}} of every finished run under `out`."""
    res = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and (p / "done").exists()):
        head, seed = d.name.rsplit("-s", 1)
        seed = int(seed)
        student = next(s for s in STUDENTS if head.startswith(s + "-"))
        objective = head[len(student) + 1:]
        for kind in EVALS:
            path = d / f"bench-{kind}" / "report.json"
            if path.exists():
                res.setdefault((student, objective), {}).setdefault(kind, {})[seed] = scores(path)
    return res


def table(per_seed: dict[int, dict[str, float]], tasks) -> np.ndarray:
    return np.array([[per_seed[s][t] for s in sorted(per_seed)] for t in tasks])


PROTOCOL_NAMES = {"eval": "prior, eval mode", "stochastic": "prior, stochastic", "plan": "planning"}


def protocol_of(name: str) -> str | None:
    """The protocol a teacher reference's NAME names (prior-eval, prior-stochastic, planner-plan...), if any."""
    return next((k for k in EVALS if k in name.split("-")), None)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--teacher-bench", multiple=True,
              help="NAME=report.json of the teacher; NAME holds its protocol (eval, stochastic, plan), e.g. prior-eval")
@click.option("--md", type=click.Path(dir_okay=False), default=None, help="write the tables here")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="score against updates and against planner labels (PNG)")
def report(out, teacher_bench, md, plot):
    """Tables (score and 95% interval per student x objective x protocol, per task) and the learning curves."""
    out = Path(out)
    res = collect_results(out)
    refs = {k: scores(v) for k, v in (x.split("=", 1) for x in teacher_bench)}
    first = next(iter(refs.values())) if refs else next(iter(next(iter(next(iter(res.values())).values())).values()))
    tasks = list(first)
    kinds = [k for k in EVALS if any(k in r for r in res.values()) or any(protocol_of(n) == k for n in refs)]
    lines = ["| student | objective | seeds | " + " | ".join(PROTOCOL_NAMES[k] for k in kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    for name, sc in refs.items():
        v = np.array([sc[t] for t in tasks])[:, None]
        cells = [_ci(bootstrap(v)) if protocol_of(name) == k else "" for k in kinds]
        lines.append(f"| teacher | {name} | – | " + " | ".join(cells) + " |")
    for (student, objective), got in res.items():
        cells = [_ci(bootstrap(table(got[k], tasks))) + ("" if len(got[k]) == _seeds(got) else f" ({len(got[k])})")
                 if k in got else "–" for k in kinds]
        lines.append(f"| {student} | {objective} | {_seeds(got)} | " + " | ".join(cells) + " |")
    lines += ["", "Differences (task-paired bootstrap; a teacher reference is compared on its own protocol, named "
              "in it):", "", "| student | objective | protocol | vs | difference |", "|---|---|---|---|---|"]
    for (student, objective), got in res.items():
        for kind in (k for k in EVALS if k in got):
            base = res.get((student, "tdmpc2"), {}).get(kind)
            if objective != "tdmpc2" and base:
                d = paired_difference(table(got[kind], tasks), table(base, tasks))
                lines.append(f"| {student} | {objective} | {kind} | {student} tdmpc2 | {_ci(d, signed=True)} |")
            for name, sc in refs.items():
                if protocol_of(name) == kind:
                    d = paired_difference(table(got[kind], tasks), np.array([sc[t] for t in tasks])[:, None])
                    lines.append(f"| {student} | {objective} | {kind} | teacher {name} | {_ci(d, signed=True)} |")
    for kind in (k for k in ("eval", "plan") if k in kinds):
        names = [n for n in refs if (protocol_of(n) == "plan") == (kind == "plan")]
        runs = [(s, o) for (s, o), got in res.items() if kind in got]
        lines += ["", f"Per task ({PROTOCOL_NAMES[kind]}, mean over seeds):", "",
                  "| task | " + " | ".join([*(f"teacher {n}" for n in names), *(f"{s} {o}" for s, o in runs)]) + " |",
                  "|---|" + "---|" * (len(names) + len(runs))]
        for t in tasks:
            cells = [f"{refs[n][t]:.1f}" for n in names]
            cells += [f"{np.mean([v[t] for v in res[r][kind].values()]):.1f}" for r in runs]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    click.echo(text)
    if md:
        atomic_write_text(md, text + "\n")
    if plot:
        curves(out, res, plot)


def _seeds(got: dict) -> int:
    return max(len(v) for v in got.values())


def _ci(x, signed=False) -> str:
    m, lo, hi = x
    f = "+.2f" if signed else ".2f"
    return f"{m:{f}} [{lo:{f}}, {hi:{f}}]"


def label_points(run_dir: Path) -> list[tuple[int, int | None, float]]:
    """(update, planner labels trained on, MT30 score) of each periodic eval of a run (metrics.jsonl: eval mode,
    1 episode per task). The labels are the dataset's (its run.json names it) plus those of the DAgger rounds
    the updates before that eval trained on (a round at update s follows the eval at s); None where the dataset
    cannot be read."""
    from edge_tdmpc.distill.data import read_index
    from edge_tdmpc.distill.runlog import read_metrics
    try:
        base = int(read_index(json.loads((run_dir / "run.json").read_text())["data"])["num_transitions"])
    except (OSError, ValueError, KeyError):
        base = None
    rows = read_metrics(run_dir)
    points = []
    for row in (r for r in rows if r["kind"] == "eval"):
        rounds = [r["labels"] for r in rows if r["kind"] == "dagger" and r["step"] < row["step"]]
        points.append((row["step"], None if base is None else base + sum(rounds), row["mean_return"] / 10))
    return points


def curves(out: Path, res: dict, path):
    """The periodic eval, mean over seeds per student x objective, against updates and against planner labels
    (of a run's evals at the same labels, the last: the most trained on them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_updates, by_labels) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for student, objective in res:
        at_step, at_labels = {}, {}
        for d in out.glob(f"{student}-{objective}-s*"):
            last = {}
            for step, labels, score in sorted(label_points(d)):
                at_step.setdefault(step, []).append(score)
                if labels is not None:
                    last[labels] = score
            for labels, score in last.items():
                at_labels.setdefault(labels, []).append(score)
        for ax, points in ((by_updates, at_step), (by_labels, at_labels)):
            if points:
                x = sorted(points)
                ax.plot(x, [np.mean(points[v]) for v in x], marker="o", label=f"{student} {objective}",
                        linestyle=("-", "--", ":")[list(STUDENTS).index(student) % 3])  # colours repeat
    by_updates.set_xlabel("updates")
    by_labels.set_xlabel("planner labels trained on (data + DAgger rounds)")
    by_updates.set_ylabel("MT30 score of the prior (eval mode, 1 ep/task)")
    by_labels.legend(*by_updates.get_legend_handles_labels(), fontsize=7, loc="lower right")  # the empty corner
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
