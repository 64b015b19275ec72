"""On-policy rounds (DAgger, Ross et al. 2011) for planner distillation.

A round rolls the current student's policy prior out (stochastic, as it explores) on the data's tasks; the
teacher's planner walks along the same trajectory, keeping its own warm start, and labels every state the
student visits. The episodes, with those labels, are appended to the run's own dataset (OUT/dagger-data) and
training goes on over the original data and every round's. `--dagger R` splits `--steps` into R+1 equal phases
with a round between phases; the round's student is saved (OUT/dagger/round-<r>.pt) before it is rolled out, so
workers load it and a resumed run rolls out the same student. Round r's episode e of a task has key
r * KEY_STRIDE + e: a resumed round skips the episodes it wrote; OUT/dagger/rounds.json marks finished rounds.
"""
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_tdmpc.distill.data import EpisodeDataset, EpisodeWriter
from edge_tdmpc.distill.labels import FIELD, ConcatLabels, labelled_step
from edge_tdmpc.distill.teacher import write_json
from edge_tdmpc.distill.views import ConcatDataset
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.workers import worker_map

KEY_STRIDE = 10_000


def phase_ends(steps: int, rounds: int) -> list[int]:
    """The update count at which each of the rounds+1 training phases ends."""
    return [steps * (p + 1) // (rounds + 1) for p in range(rounds + 1)]


def training_data(base, base_labels, run_dir):
    """The dataset and planner labels of the current phase: the original data and every finished round's."""
    path = Path(run_dir) / "dagger-data"
    rounds = finished_rounds(run_dir)
    if not rounds or not (path / "index.json").exists():
        return base, base_labels
    extra = EpisodeDataset(path)
    table = extra.episode_table()
    if not np.isin(table["key"] // KEY_STRIDE, rounds).all():
        raise ValueError(f"{path} holds episodes of an unfinished round: resume the run (--resume) to finish it")
    from edge_tdmpc.distill.labels import FieldLabels
    data = ConcatDataset([base, extra])
    labels = None if base_labels is None else ConcatLabels([base_labels, FieldLabels(extra)], data.offsets)
    return data, labels


def finished_rounds(run_dir) -> list[int]:
    path = Path(run_dir) / "dagger" / "rounds.json"
    return json.loads(path.read_text())["finished"] if path.is_file() else []


_WORKER = {}


def _init(teacher, teacher_tasks, spec):
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.distill.collect import teacher_planner
    model = load_model(teacher, tasks=teacher_tasks)
    runtime = teacher_planner(model, spec)
    _WORKER.update(teacher=model, runtime=runtime, students={})


def _episode(job):
    """One round episode: the student's prior acts, the teacher's planner labels -> a dataset record."""
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.envs import make_env
    from edge_tdmpc.planner import PlannerConfig
    from edge_tdmpc.rollout import run
    from edge_tdmpc.runtime import TorchRuntime
    student_path, tasks, task, key, steps, seed = job
    students = _WORKER["students"]
    if student_path not in students:
        students.clear()
        students[student_path] = load_model(student_path, tasks=",".join(tasks))
    model = students[student_path]
    student = TorchRuntime(model, "fp32", PlannerConfig(mpc=False), seed=seed)
    teacher, rt = _WORKER["teacher"], _WORKER["runtime"]
    data_index = tasks.index(task)
    s_index = data_index if model.cfg.multitask else None
    t_index = teacher.cfg.tasks.index(task) if teacher.cfg.multitask else None
    env = make_env(task, seed=seed)
    obs, _ = env.reset()
    rt.reset(seed)
    labels = []

    def act(obs, t):
        labels.append(labelled_step(rt, obs, t_index, t))
        return student.act(obs, s_index, t == 0)
    obs, action, reward = run(env, obs, act, steps).arrays()
    return dict(task=data_index, key=key, obs=obs, action=action, reward=reward, planner=np.stack(labels))


def run_round(r: int, student, data, present, run_dir, teacher, teacher_tasks, spec, label_dim: int, episodes=1,
              steps=500, seed=1, workers=1, progress=True) -> dict:
    """Round r (1-based) of DAgger on the tasks `present` (indices into the dataset `data`'s task set):
    `episodes` per task -> {task: [returns]} of the round's episodes (those of an interrupted try included,
    read back from the round's data)."""
    from edge_tdmpc.checkpoint import save_model
    run_dir = Path(run_dir)
    rounds_dir = run_dir / "dagger"
    rounds_dir.mkdir(parents=True, exist_ok=True)
    student_path = rounds_dir / f"round-{r}.pt"
    if not student_path.exists():  # a resumed round rolls out the student it started with
        save_model(student, student_path)
    data_dir = run_dir / "dagger-data"
    done = set()
    if (data_dir / "index.json").exists():
        ds = EpisodeDataset(data_dir)
        t = ds.episode_table()
        done = set(zip(t["task"].tolist(), t["key"].tolist(), strict=True))
    tasks = list(data.tasks)
    jobs = [(str(student_path), tasks, tasks[i], r * KEY_STRIDE + e, steps, derive_seed(seed, 7919, r, i, e))
            for i in present for e in range(episodes) if (i, r * KEY_STRIDE + e) not in done]
    with EpisodeWriter(data_dir, data.obs_dim, data.action_dim, tasks, fields={FIELD: label_dim}) as writer:
        with worker_map(_episode, jobs, workers, _init, (str(teacher), teacher_tasks, spec)) as results:
            for ep in tqdm(results, total=len(jobs), unit="ep", desc=f"dagger round {r}", disable=not progress):
                writer.add(ep["obs"], ep["action"], ep["reward"], task=ep["task"], key=ep["key"],
                           **{FIELD: ep["planner"]})
                writer.flush()  # each episode costs a planner's worth of labels: a kill loses none
    ds = EpisodeDataset(data_dir)
    t = ds.episode_table()
    returns = {}
    for k in np.flatnonzero(t["key"] // KEY_STRIDE == r):
        returns.setdefault(tasks[int(t["task"][k])], []).append(float(ds.episode(int(k))["reward"].sum()))
    path = rounds_dir / "rounds.json"
    finished = sorted({*finished_rounds(run_dir), r})
    write_json(path, {"finished": finished})
    return returns


def round_labels(run_dir, r: int) -> int:
    """The planner labels (transitions) round r added to the run's data."""
    t = EpisodeDataset(Path(run_dir) / "dagger-data").episode_table()
    return int(t["length"][t["key"] // KEY_STRIDE == r].sum())
