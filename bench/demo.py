"""`edge-tdmpc demo`: the whole pipeline at small scale on a CPU, ending in one honest report.

    teacher (trained here by `train`, or given) -> data (`data collect`) -> a distilled student and a
    from-scratch baseline on the same data and budget (`distill`, d_coef 0.4 vs 0) -> compile (ONNX) ->
    closed-loop bench of teacher / student / baseline per runtime and precision -> report.md + plots.

Every stage writes into its own folder of OUT and is skipped when already complete, so rerunning the same
command resumes. Budgets are chosen for a 2-core CPU: the full demo targets <= 15 minutes, --quick (CI) about
two. At these budgets the teacher is weak; the report says what was measured, nothing more.
"""
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_tdmpc.bench.report import save_figure
from edge_tdmpc.files import atomic_write_text
from edge_tdmpc.rollout import evaluation_episode

DEMO_TASKS = ("cartpole-balance", "cartpole-swingup")


@dataclass(frozen=True)
class Budget:
    teacher_steps: int = 6_000           # environment steps of online training
    teacher_seed_steps: int = 1_000
    teacher_batch_size: int = 128        # half the paper's batch: twice the updates per CPU second
    teacher_dims: tuple = (("enc_dim", 128), ("mlp_dim", 128), ("latent_dim", 64), ("num_q", 2), ("task_dim", 16))
    student_dims: tuple = (("enc_dim", 64), ("mlp_dim", 64), ("latent_dim", 32), ("num_q", 2), ("task_dim", 16))
    episodes: int = 4                    # collected per task
    episode_steps: int = 500
    noise_std: float = 0.1               # exploration noise on collected actions
    collect_planner: tuple = (("iterations", 3), ("num_samples", 128), ("num_elites", 16), ("num_pi_trajs", 8))
    distill_steps: int = 2_000
    student_distill: tuple = ("reward", "planner")  # the planner term where the data has the planner's labels
    planner_coef: float = 10.0
    distill_eval_every: int = 500        # closed-loop eval of student and baseline during distillation
    batch_size: int = 256
    eval_episodes: int = 2               # per task, per model x runtime x precision (MPPI rows: 1)
    eval_steps: int = 500
    plan_eval: bool = True               # also bench MPPI planning (fp32, torch) besides the policy prior
    planner: tuple = (("iterations", 4), ("num_samples", 256), ("num_elites", 32), ("num_pi_trajs", 12))
    runtimes: tuple = (("torch", "fp32"), ("torch", "fp16"), ("torch", "bf16"), ("onnxruntime", "fp32"),
                       ("onnxruntime", "int8"))


QUICK = Budget(teacher_steps=600, teacher_seed_steps=200, teacher_batch_size=64, episodes=1,
               collect_planner=(("iterations", 2), ("num_samples", 32), ("num_elites", 4), ("num_pi_trajs", 4)),
               episode_steps=100, distill_steps=60, distill_eval_every=30, batch_size=64, eval_episodes=1,
               eval_steps=50, plan_eval=False, runtimes=(("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32")))


def demo(out, quick=False, teacher=None, tasks=None, workers=2, seed=1, echo=print, budget: Budget | None = None,
         progress=True, threads: int | None = 1):
    """Run (or resume) the demo in `out` -> path of report.md.

    `threads`: torch threads for training and bench. The demo's models are small (128-wide layers), where one
    thread beats OpenMP's fork/join overhead (and, on a shared machine, its spin-waiting) - measured here."""
    if threads:
        torch.set_num_threads(threads)
    from edge_tdmpc.distill.collect import collect
    from edge_tdmpc.distill.offline import distill
    from edge_tdmpc.distill.online import train
    from edge_tdmpc.tasks import resolve_tasks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = budget or (QUICK if quick else Budget())
    tasks = resolve_tasks(tasks or ",".join(DEMO_TASKS))
    task_list = ",".join(tasks)
    times = _load_json(out / "timings.json")  # stage -> wall seconds
    cpu = _load_json(out / "cpu_times.json")  # stage -> CPU seconds (this process + reaped workers)

    def stage(name, fn):
        if name in times:
            echo(f"[demo] {name}: done before ({times[name]:.0f} s), skipped")
            return
        echo(f"[demo] {name} ...")
        t, c = time.perf_counter(), _cpu_seconds()
        fn()
        times[name], cpu[name] = time.perf_counter() - t, _cpu_seconds() - c
        _write_json(out / "cpu_times.json", cpu)
        _write_json(out / "timings.json", times)

    # 1. teacher
    if teacher is None:
        teacher = out / "teacher" / "model.pt"
        stage("teacher", lambda: train(
            task_list, out / "teacher", size=None, steps=b.teacher_steps, seed=seed, dims=dict(b.teacher_dims),
            seed_steps=b.teacher_seed_steps, episode_steps=b.episode_steps, batch_size=b.teacher_batch_size,
            save_every=max(b.teacher_steps // 4, 1), log_every=100, eval_every=max(b.teacher_steps // 3, 1),
            eval_steps=b.eval_steps, resume=(out / "teacher" / "checkpoints").is_dir(), progress=progress,
            echo=echo))
    teacher = Path(teacher)

    # 2. data from the teacher: a small MPPI planner (official datasets come from planning agents; an early
    #    policy prior alone can be far worse); its labels teach the student the planner (Budget.student_distill)
    mpc = bool(b.collect_planner)
    stage("data", lambda: collect(teacher, task_list, out / "data", episodes=b.episodes, mpc=mpc,
                                  noise_std=b.noise_std, steps=b.episode_steps, workers=workers, seed=seed,
                                  teacher_tasks=task_list, planner=dict(b.collect_planner), progress=progress,
                                  echo=echo))

    # 3. distilled student and from-scratch baseline: same data, same steps, same seed
    common = dict(student_size=None, student_dims=dict(b.student_dims), steps=b.distill_steps,
                  batch_size=b.batch_size, seed=seed, save_every=max(b.distill_steps // 4, 1),
                  log_every=max(b.distill_steps // 20, 1), eval_every=b.distill_eval_every,
                  eval_steps=b.eval_steps, eval_episodes=b.eval_episodes, progress=progress, echo=echo)
    terms = student_terms(out / "data", b)
    for name, d_coef, distill_terms in (("student", 0.4, terms), ("baseline", 0.0, "reward")):
        stage(name, lambda name=name, d_coef=d_coef, distill_terms=distill_terms: distill(
            out / "data", out / name, teacher=teacher, d_coef=d_coef, distill=distill_terms,
            planner_coef=b.planner_coef, resume=(out / name / "checkpoints").is_dir(), **common))

    # 4-5. compile + bench
    models = {"teacher": teacher, "student": out / "student" / "student.pt", "baseline": out / "baseline" /
              "student.pt"}
    stage("bench", lambda: _write_json(out / "bench.json", bench(models, tasks, b, seed, echo)))

    # 6. report
    report = write_report(out, tasks, b, models, times, quick, cpu)
    echo(f"[demo] total {sum(times.values()) / 60:.1f} min of stages")
    return report


# --- bench: closed-loop episodes per model x runtime x precision -----------------------------------------------
def student_terms(data, b: Budget) -> str:
    """The student's distillation terms: the Budget's, without the planner term where the data has no planner
    labels (collected by the policy prior: the quick form)."""
    from edge_tdmpc.distill.data import EpisodeDataset
    labelled = "planner" in EpisodeDataset(data).fields
    return ",".join(t for t in b.student_distill if t != "planner" or labelled)


def _runtimes(wanted):
    """The wanted (runtime, precision) pairs, and TensorRT fp16 where a GPU is present."""
    return list(wanted) + ([("tensorrt", "fp16")] if torch.cuda.is_available() else []), ""


def bench(models: dict, tasks, b: Budget, seed=1, echo=print) -> dict:
    """Returns, per-act latency and weight bytes of each model on each available runtime/precision."""
    from edge_tdmpc import load_model
    from edge_tdmpc.compile.runtimes import compiled_runtime
    from edge_tdmpc.planner import PlannerConfig

    pairs, note = _runtimes(b.runtimes)
    task_list = ",".join(tasks)
    rows = []
    for name, path in models.items():
        model = load_model(path, tasks=task_list)
        modes = [("policy", PlannerConfig.make(mpc=False))]
        if b.plan_eval:
            modes.append(("mppi", PlannerConfig.make(**dict(b.planner))))
        for mode, planner in modes:
            for rt_name, precision in pairs:
                if mode == "mppi" and (rt_name, precision) != ("torch", "fp32"):
                    continue  # planning on a CPU is the expensive part: fp32 eager only
                row = dict(model=name, mode=mode, runtime=rt_name, precision=precision, returns={})
                try:  # another subpackage's runtime failing is a row of the report, not the end of the demo
                    rt = compiled_runtime(rt_name, model, precision, planner, seed=seed)
                    row["bytes"] = rt.size_bytes()
                    lat = []
                    for task in tasks:
                        rets = []
                        for ep in range(b.eval_episodes if mode == "policy" else 1):
                            ret, ms = _episode(rt, model, task, seed, ep, b.eval_steps)
                            rets.append(ret)
                            lat += ms
                        row["returns"][task] = float(np.mean(rets))
                        row.setdefault("episode_returns", {})[task] = rets
                    rt.close()
                except Exception as e:  # noqa: BLE001
                    msg = " ".join(str(e).split())[:100]
                    rows.append(dict(row, error=f"{type(e).__name__}: {msg}"))
                    echo(f"[bench] {name} {mode} {rt_name} {precision}: failed ({type(e).__name__})")
                    continue
                row["mean_return"] = float(np.mean(list(row["returns"].values())))
                row["act_ms_p50"] = float(np.percentile(lat, 50))
                row["act_ms_p99"] = float(np.percentile(lat, 99))
                rows.append(row)
                echo(f"[bench] {name:<8} {mode:<6} {rt_name:<11} {precision:<5} mean return "
                     f"{row['mean_return']:7.1f}  act p50 {row['act_ms_p50']:.2f} ms")
    return dict(rows=rows, note=note, pairs=pairs)


def _episode(rt, model, task, seed, episode, steps):
    ep, _, _ = evaluation_episode(rt, model.cfg, task, seed, episode, steps, eval_mode=True)
    ms = [ns / 1e6 for ns in ep.act_ns]
    return ep.ret, ms[3:] or ms  # the first acts warm up caches


# --- report -------------------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def write_report(out: Path, tasks, b: Budget, models: dict, times: dict, quick: bool, cpu=None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench_rows = _load_json(out / "bench.json")
    from edge_tdmpc.distill.runlog import read_metrics
    metrics = {k: read_metrics(out / k) for k in ("teacher", "student", "baseline")}
    data_info = _data_summary(out / "data")

    # plot 1: student vs baseline: loss, reward error against the teacher, closed-loop return while training
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, color in (("student", "tab:blue"), ("baseline", "tab:orange")):
        rows = [r for r in metrics[name] if r.get("kind") == "train"]
        if rows:
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["total_loss"] for r in rows], color=color, label=name)
            if "distill_reward_loss" in rows[0]:
                axes[1].plot(steps, [r["distill_reward_loss"] for r in rows], color=color, label=name)
        ev = [r for r in metrics[name] if r.get("kind") == "eval"]
        if ev:
            axes[2].plot([r["step"] for r in ev], [r["mean_return"] for r in ev], "o-", color=color, label=name)
    axes[0].set(title="training loss", xlabel="update")
    axes[1].set(title="MSE to the teacher's reward", xlabel="update", yscale="log")
    axes[2].set(title=f"eval return ({b.eval_steps} steps, policy prior)", xlabel="update")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "training.png")
    plt.close(fig)

    # plot 2: closed-loop mean return per model and runtime/precision
    ok = [r for r in bench_rows.get("rows", []) if "mean_return" in r]
    if ok:
        labels = sorted({f"{r['mode']} {r['runtime']} {r['precision']}" for r in ok})
        names = list(models)
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 3.8))
        w = 0.8 / len(names)
        for j, name in enumerate(names):
            vals = [next((r["mean_return"] for r in ok if r["model"] == name and
                          f"{r['mode']} {r['runtime']} {r['precision']}" == lab), np.nan) for lab in labels]
            ax.bar(np.arange(len(labels)) + j * w, vals, w, label=name)
        ax.set_xticks(np.arange(len(labels)) + w * (len(names) - 1) / 2, labels, rotation=20, ha="right")
        ax.set(ylabel=f"mean return ({b.eval_steps} steps)", title="closed loop")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out / "returns.png")
        plt.close(fig)

    lines = ["# edge-tdmpc demo report", ""]
    lines += [f"{'Quick (CI) form: tiny budgets, numbers are smoke-level only.' if quick else 'Full demo.'} "
              f"Tasks: {', '.join(tasks)}. Machine: {_machine()}.", ""]
    cpu = cpu or {}
    lines += ["## What ran", "", "| stage | wall time | CPU time | what |", "|---|---|---|---|"]
    what = {
        "teacher": f"online TD-MPC2 (`edge-tdmpc train`), {b.teacher_steps} env steps, policy-prior acting, "
                   f"batch {b.teacher_batch_size}, dims {dict(b.teacher_dims)}",
        "data": f"`edge-tdmpc data collect`: {b.episodes} episode(s) x {b.episode_steps} steps per task from the "
                + (f"teacher planning (MPPI {dict(b.collect_planner)})" if b.collect_planner else
                   "teacher's policy prior") + f", stochastic + N(0, {b.noise_std}) action noise",
        "student": f"`edge-tdmpc distill --d-coef 0.4 --distill {student_terms(out / 'data', b)} --planner-coef "
                   f"{b.planner_coef}`, {b.distill_steps} updates, batch {b.batch_size}, dims {dict(b.student_dims)}",
        "baseline": "same, TD-MPC2 alone (`--d-coef 0 --distill reward`: from scratch), same data, steps, seed",
        "bench": f"{b.eval_episodes} episode(s) (MPPI: 1) x {b.eval_steps} steps per task, eval-mode actions, "
                 "per model x runtime x precision",
    }
    for k, v in times.items():
        c = f"{cpu[k]:.0f} s" if k in cpu else "-"
        lines.append(f"| {k} | {v:.0f} s | {c} | {what.get(k, '')} |")
    lines += ["", f"Total: {sum(times.values()) / 60:.1f} min wall, {sum(cpu.values()) / 60:.1f} min CPU "
              f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: wall time on a "
              "shared machine overstates what a dedicated one needs).", ""]

    lines += ["## Teacher and data", ""]
    ev = [r for r in metrics["teacher"] if r.get("kind") == "eval"]
    if ev:
        lines.append("Teacher eval during training (eval-mode policy prior, full episodes, return):")
        lines.append("")
        lines.append("| env steps | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for r in ev:
            lines.append(f"| {r['step']} | " + " | ".join(f"{r.get(t, float('nan')):.1f}" for t in tasks) + " |")
        lines.append("")
    elif not (out / "teacher").exists():
        lines += [f"Teacher given: `{models['teacher']}`.", ""]
    if data_info:
        lines += [f"Data: {data_info}", ""]

    lines += ["## Distillation", "", "Same data, steps, batch and seed; only the distillation terms differ. Final "
              "training rows:",
              "", "| run | total loss | reward loss | value loss | MSE to teacher reward |", "|---|---|---|---|---|"]
    for name in ("student", "baseline"):
        rows = [r for r in metrics[name] if r.get("kind") == "train"]
        if rows:
            r = rows[-1]
            err = r.get("distill_reward_loss", float("nan"))
            lines.append(f"| {name} (d_coef {0.4 if name == 'student' else 0}) | {r['total_loss']:.4f} | "
                         f"{r['reward_loss']:.4f} | {r['value_loss']:.4f} | {err:.5f} |")
    lines += ["", "The student's total loss includes 0.4 x its reward term (its planner term is in the policy's "
              "loss); the last column is measured for both (the baseline's at zero weight).", ""]
    evals = {n: {r["step"]: r for r in metrics[n] if r.get("kind") == "eval"} for n in ("student", "baseline")}
    steps = sorted(set(evals["student"]) | set(evals["baseline"]))
    if steps:
        lines += ["Closed-loop return during distillation (policy prior, eval mode, mean over tasks; "
                  f"{b.eval_episodes} episode(s) x {b.eval_steps} steps per task):", "",
                  "| update | student (d_coef 0.4) | baseline (d_coef 0) |", "|---|---|---|"]
        for s in steps:
            cell = [f"{evals[n][s]['mean_return']:.1f}" if s in evals[n] else "-" for n in ("student", "baseline")]
            lines.append(f"| {s} | {cell[0]} | {cell[1]} |")
        lines.append("")
    lines += ["![training](training.png)", ""]

    lines += ["## Closed loop (bench)", ""]
    if bench_rows.get("note"):
        lines += [f"Note: {bench_rows['note']}", ""]
    lines += ["| model | acting | runtime | precision | " + " | ".join(tasks) +
              " | mean return | act p50 ms | act p99 ms | weights |",
              "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for r in bench_rows.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['runtime']} | {r['precision']} | " +
                         " | ".join("-" for _ in tasks) + f" | unavailable: {r['error']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mode']} | {r['runtime']} | {r['precision']} | " +
                     " | ".join(f"{r['returns'][t]:.1f}" for t in tasks) +
                     f" | {r['mean_return']:.1f} | {r['act_ms_p50']:.2f} | {r['act_ms_p99']:.2f} | "
                     f"{r['bytes'] / 1024:.0f} KiB |")
    lines += ["", f"Returns over {b.eval_steps}-step episodes (at most {2 * b.eval_steps}: each action is held "
              f"for 2 physics steps of reward <= 1; a full episode is 500 steps); {b.eval_episodes} episode(s) per "
              "task and row, so single rows vary a lot. Latency is per act call (policy prior: one encode + pi; "
              "mppi: a whole planning step), on this machine. Weights: the torch model's parameters; for "
              "onnxruntime, the compiled graph of that acting mode (the policy-prior graph holds the encoder "
              "and policy only).", "",
              "![returns](returns.png)" if ok else "", ""]
    lines += prior_table(bench_rows, tasks)
    lines += ["## Reading it honestly", "", _verdict(bench_rows, metrics, quick), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def prior_table(bench_rows, tasks) -> list[str]:
    """The student's policy prior against the teacher's prior and planner (torch fp32), with 95% intervals from
    a bootstrap over tasks and episodes: as wide as a demo's few episodes make them."""
    from edge_tdmpc.bench.distill_study import bootstrap
    rows = [r for r in bench_rows.get("rows", []) if "episode_returns" in r and (r["runtime"], r["precision"]) ==
            ("torch", "fp32")]
    if not rows:
        return []
    lines = ["## The student's prior against the teacher", "",
             "Mean return over tasks (torch fp32, eval mode) and its 95% interval (bootstrap over tasks and "
             "episodes):", "", "| model | acting | mean return | 95% interval | episodes per task |",
             "|---|---|---|---|---|"]
    for r in rows:
        n = min(len(r["episode_returns"][t]) for t in tasks)
        m, lo, hi = bootstrap(np.array([r["episode_returns"][t][:n] for t in tasks]))
        lines.append(f"| {r['model']} | {'policy prior' if r['mode'] == 'policy' else 'MPPI planning'} | {m:.1f} | "
                     f"[{lo:.1f}, {hi:.1f}] | {n} |")
    return [*lines, ""]


def _verdict(bench_rows, metrics, quick) -> str:
    ok = {(r["model"], r["mode"], r["runtime"], r["precision"]): r["mean_return"]
          for r in bench_rows.get("rows", []) if "mean_return" in r}
    key = ("policy", "torch", "fp32")
    parts = []
    if all((m, *key) in ok for m in ("teacher", "student", "baseline")):
        t, s, b = (ok[(m, *key)] for m in ("teacher", "student", "baseline"))
        parts.append(f"Policy prior, fp32: teacher {t:.1f}, distilled student {s:.1f}, from-scratch baseline "
                     f"{b:.1f} mean return. The student {'beats' if s > b else 'does not beat'} the baseline "
                     "in this run (one seed, few episodes: not a significant comparison).")
    key = ("mppi", "torch", "fp32")
    if all((m, *key) in ok for m in ("teacher", "student", "baseline")):
        t, s, b = (ok[(m, *key)] for m in ("teacher", "student", "baseline"))
        parts.append(f"MPPI planning, fp32 (it ranks candidates with the learned reward, the model part reward "
                     f"distillation trains): teacher {t:.1f}, student {s:.1f}, baseline {b:.1f}; the student "
                     f"{'beats' if s > b else 'does not beat'} the baseline (1 episode per task).")
    if quick:
        parts.append("This is the --quick form: budgets are far too small to learn; it checks the pipeline runs.")
    else:
        parts.append("At a few thousand environment steps the teacher is far from converged TD-MPC2 "
                     "performance; the distillation comparison is only as informative as the teacher.")
    return " ".join(parts)


def _data_summary(root: Path) -> str:
    try:
        from edge_tdmpc.distill.data import EpisodeDataset
        ds = EpisodeDataset(root)
    except (ValueError, ImportError):
        return ""
    table = ds.episode_table()
    rets = {}
    for i in range(ds.num_episodes):
        rets.setdefault(ds.tasks[table["task"][i]], []).append(float(ds.episode(i)["reward"].sum()))
    per = ", ".join(f"{t} {np.mean(r):.1f}" for t, r in rets.items())
    return f"{ds.num_episodes} episodes, {ds.num_transitions} transitions; mean collected return per task: {per}."


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, obj):
    from edge_tdmpc.distill.teacher import write_json
    write_json(path, obj)
