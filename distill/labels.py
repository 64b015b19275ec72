"""The teacher planner's labels of a dataset's states (`planner.PlanLabel` rows: mean, std and noise-free action
of the first action, [3A]), the targets of `--distill planner`.

Two sources, one lookup by global transition index (`Batch.index`):
- the dataset's own per-step field `planner`, written by `data collect --mpc` (`FieldLabels`);
- a planner-label cache, for data collected without them (`PlannerLabelCache.build`): the teacher's planner
  replays each episode's observations in order, keeping its own warm start along the trajectory, with the
  noise seeded per episode as `data collect` seeds it, so the labels of collected data equal the ones
  collected with it. Episodes are labelled by parallel workers on the teacher's runtime (ONNX Runtime fp32 or
  int8 is the fastest planner on a CPU); an interrupted build resumes episode by episode.
"""
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.distill.teacher import _dataset_id, write_json
from edge_tdmpc.files import atomic_write
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.workers import worker_map

FIELD = "planner"
CACHE_FORMAT, CACHE_VERSION = "edge-tdmpc-planner-labels", 1


class FieldLabels:
    """The labels a dataset carries (its `planner` field)."""

    def __init__(self, dataset):
        if FIELD not in dataset.fields:
            raise ValueError(f"{dataset.root} carries no planner labels (collect with --mpc, or label it with "
                             "`edge-tdmpc data label`)")
        self.dataset, self.dim = dataset, dataset.fields[FIELD]

    def lookup(self, index) -> torch.Tensor:
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, np.int64)
        return torch.from_numpy(self.dataset.read_field(FIELD, idx))


class PlannerLabelCache:
    """labels.json + planner.npy [num_transitions, 3A] (memory-mapped) + done.npy [num_episodes] bool."""

    def __init__(self, root, expect: dict | None = None):
        self.root = Path(root)
        path = self.root / "labels.json"
        if not path.is_file():
            raise ValueError(f"{self.root}: no labels.json, not a planner-label cache (build one with "
                             "`edge-tdmpc data label`)")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: not a v{CACHE_VERSION} planner-label cache; delete it to rebuild")
        if not self.meta.get("complete"):
            raise ValueError(f"{self.root}: planner-label cache is incomplete (interrupted); run the labelling "
                             "again to resume it")
        for k, v in (expect or {}).items():
            if self.meta.get(k) != v:
                raise ValueError(f"{self.root}: planner labels were made for {k}={self.meta.get(k)!r}, this run "
                                 f"has {v!r}; label into another directory")
        self.array = np.load(self.root / f"{FIELD}.npy", mmap_mode="r")
        self.dim = self.array.shape[1]

    def lookup(self, index) -> torch.Tensor:
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, np.int64)
        order = np.argsort(idx, kind="stable")
        rows = np.empty((len(idx), self.dim), np.float32)
        rows[order] = self.array[idx[order]]
        return torch.from_numpy(rows)

    @classmethod
    def build(cls, teacher, dataset, root, teacher_tasks=None, runtime="torch", precision="fp32", planner=None,
              workers=1, seed=0, progress=True, echo=print) -> "PlannerLabelCache":
        """Label every episode of `dataset` (an EpisodeDataset) with the planner of the checkpoint `teacher`;
        resumes an interrupted build. `seed` is the `data collect` seed of the data (its labels are then the
        collected ones); `runtime`/`precision` the teacher's (`collect.compile_teacher`)."""
        from edge_tdmpc.checkpoint import load_model, weights_sha256
        from edge_tdmpc.distill.collect import compile_teacher
        root = Path(root)
        model = load_model(teacher, tasks=teacher_tasks)
        present = {dataset.tasks[i] for i in np.unique(dataset.episode_table()["task"])}
        unknown = sorted(present - set(model.cfg.tasks))
        if unknown:
            raise ValueError(f"the teacher was trained without {unknown[0]!r}, a task of the data; label with a "
                             "teacher that knows every task of the data")
        spec = compile_teacher(model, runtime, precision, True, planner, echo)
        meta = dict(format=CACHE_FORMAT, version=CACHE_VERSION, teacher=weights_sha256(model), runtime=runtime,
                    precision=precision, planner=spec.planner, seed=seed, dataset=_dataset_id(dataset),
                    rows=dataset.num_transitions, dim=3 * model.cfg.action_dim, complete=False)
        root.mkdir(parents=True, exist_ok=True)
        meta_path, array_path, done_path = root / "labels.json", root / f"{FIELD}.npy", root / "done.npy"
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        same = old is not None and all(old.get(k) == v for k, v in meta.items() if k != "complete")
        if same and old.get("complete"):
            return cls(root)
        if not (same and array_path.is_file() and done_path.is_file()):
            np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float32,
                                      shape=(dataset.num_transitions, meta["dim"]))
            _save_done(done_path, np.zeros(dataset.num_episodes, bool))
        write_json(meta_path, meta)
        array = np.load(array_path, mmap_mode="r+")
        done = np.load(done_path)
        table = dataset.episode_table()
        base = getattr(dataset, "keep", None)  # a TaskView: its episodes' indices in the dataset on disk
        jobs = [(int(i), int(i if base is None else base[i])) for i in np.flatnonzero(~done)]
        if len(jobs) < dataset.num_episodes:
            echo(f"{root}: {dataset.num_episodes - len(jobs)} of {dataset.num_episodes} episodes are labelled, "
                 "resuming")
        settings = dict(teacher=str(teacher), teacher_tasks=teacher_tasks, spec=spec, seed=seed,
                        root=str(dataset.root))
        with worker_map(_label, jobs, workers, _init, (settings,)) as results:
            for i, rows in tqdm(results, total=len(jobs), unit="ep", desc="planner labels", disable=not progress):
                lo = int(table["offset"][i])
                array[lo:lo + len(rows)] = rows
                array.flush()
                done[i] = True
                _save_done(done_path, done)  # after the rows are on disk: a crash relabels at most this episode
        meta["complete"] = True
        write_json(meta_path, meta)
        return cls(root)


def _save_done(path, done):
    atomic_write(path, lambda f: np.save(f, done))


def labelled_step(runtime, obs, task_index, t: int) -> np.ndarray:
    """One planning step of the teacher on `obs` (step t of its episode) -> its `PlanLabel` row."""
    runtime.act(obs, task_index, t == 0)
    label = runtime.plan_label()
    if label is None:
        raise ValueError(f"observation {t} of an episode is not finite: it has no planner label")
    return label


def label_episode(runtime, obs, task_index, seed) -> np.ndarray:
    """The planner's labels [T, 3A] along an episode's observations [T+1, O] (the last has no action): the
    teacher keeps its own warm start, its noise seeded by `seed`."""
    runtime.reset(seed)
    return np.stack([labelled_step(runtime, obs[t], task_index, t) for t in range(len(obs) - 1)])


_WORKER = {}


def _init(settings):
    from edge_tdmpc.checkpoint import load_model
    from edge_tdmpc.distill.collect import teacher_planner
    from edge_tdmpc.distill.data import EpisodeDataset
    model = load_model(settings["teacher"], tasks=settings["teacher_tasks"])
    runtime = teacher_planner(model, settings["spec"])
    _WORKER.update(model=model, runtime=runtime, dataset=EpisodeDataset(settings["root"]), seed=settings["seed"])


def _label(job):
    i, on_disk = job
    ds, runtime, model = _WORKER["dataset"], _WORKER["runtime"], _WORKER["model"]
    ep = ds.episode(on_disk)
    name = ds.tasks[ep["task"]]
    index = model.cfg.tasks.index(name) if model.cfg.multitask else None
    return i, label_episode(runtime, ep["obs"], index, derive_seed(_WORKER["seed"], ep["task"], ep["key"]))


class ConcatLabels:
    """Labels of a `ConcatDataset`: each part's own source, looked up at the part's transition indices."""

    def __init__(self, sources, offsets):
        self.sources, self.offsets = list(sources), np.asarray(offsets, np.int64)

    def lookup(self, index) -> torch.Tensor:
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, np.int64)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        out = None
        for p in np.unique(part):
            m = np.flatnonzero(part == p)
            rows = self.sources[p].lookup(idx[m] - self.offsets[p])
            if out is None:
                out = torch.empty(len(idx), rows.shape[1])
            out[m] = rows
        return out
