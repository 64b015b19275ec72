"""Views of episode datasets that the sampler and the trainer read like one: several datasets in a row
(`ConcatDataset`: the data and DAgger's rounds) and a task subset of one (`TaskView`: a subset student's data).
Both keep the global transition indices of what they view, so label caches and per-step fields stay valid."""
import numpy as np
import torch

from edge_tdmpc.distill.data import Batch
from edge_tdmpc.tasks import check_task_subset


class ConcatDataset:
    """Several EpisodeDatasets of one layout as one: global transition indices run through them in order."""

    def __init__(self, parts):
        self.parts = [p for p in parts if p.num_episodes]
        first = self.parts[0]
        for p in self.parts[1:]:
            if (p.obs_dim, p.action_dim, p.tasks) != (first.obs_dim, first.action_dim, first.tasks):
                raise ValueError(f"{p.root} and {first.root} have different dims or task sets")
        self.root, self.tasks, self.obs_dim, self.action_dim = first.root, first.tasks, first.obs_dim, first.action_dim
        self.offsets = np.cumsum([0] + [p.num_transitions for p in self.parts])[:-1]
        self.fields = {k: v for k, v in first.fields.items() if all(p.fields.get(k) == v for p in self.parts)}

    @property
    def num_episodes(self):
        return sum(p.num_episodes for p in self.parts)

    @property
    def num_transitions(self):
        return sum(p.num_transitions for p in self.parts)

    def episode_table(self):
        tables = [p.episode_table() for p in self.parts]
        out = {k: np.concatenate([t[k] for t in tables]) for k in ("length", "task", "key")}
        out["offset"] = np.concatenate([t["offset"] + o for t, o in zip(tables, self.offsets, strict=True)])
        return out

    def num_valid_slices(self, horizon=3):
        return sum(p.num_valid_slices(horizon) for p in self.parts)

    def slice_index(self, s, horizon=3):
        s = np.asarray(s, np.int64)
        cum = np.cumsum([0] + [p.num_valid_slices(horizon) for p in self.parts])
        part = np.searchsorted(cum, s, side="right") - 1
        out = np.empty_like(s)
        for k in np.unique(part):
            m = part == k
            out[m] = self.parts[k].slice_index(s[m] - cum[k], horizon) + self.offsets[k]
        return out

    def gather(self, index, horizon=3):
        index = np.asarray(index, np.int64).reshape(-1)
        part = np.searchsorted(self.offsets, index, side="right") - 1
        pieces, order = [], []
        for k in np.unique(part):
            m = np.flatnonzero(part == k)
            pieces.append(self.parts[k].gather(index[m] - self.offsets[k], horizon))
            order.append(m)
        inv = np.argsort(np.concatenate(order), kind="stable")
        cat = [torch.cat(x, dim=1 if x[0].dim() == 3 else 0) for x in zip(*pieces, strict=True)]
        obs, action, reward, task, _ = cat
        return Batch(obs[:, inv], action[:, inv], reward[:, inv], task[inv], torch.from_numpy(index.copy()))


class TaskView:
    """The episodes of `tasks` (names in the dataset's task set), their task indices those of `tasks`. Transition
    indices stay the dataset's (slices of other tasks are never drawn)."""

    def __init__(self, dataset, tasks):
        tasks = tuple(tasks)
        check_task_subset(tasks, dataset.tasks, f"the data ({dataset.root})")
        self.base, self.tasks = dataset, tasks
        self.root, self.obs_dim, self.action_dim, self.fields = dataset.root, dataset.obs_dim, dataset.action_dim, \
            dataset.fields
        self.to_view = np.full(len(dataset.tasks), -1, np.int64)
        self.to_view[[dataset.tasks.index(t) for t in tasks]] = np.arange(len(tasks))
        table = dataset.episode_table()
        self.keep = np.flatnonzero(self.to_view[table["task"]] >= 0)
        if not len(self.keep):
            raise ValueError(f"{dataset.root} has no episode of {','.join(tasks)}: collect data on those tasks")
        self.table = {k: v[self.keep] for k, v in table.items()}
        self.table["task"] = self.to_view[self.table["task"]]
        self.index = dict(dataset.index, tasks=list(tasks))  # a label cache of the view is not the data's
        self.meta = dataset.meta
        self.num_transitions = dataset.num_transitions  # the index space: the dataset's
        self._valid_cache = {}

    @property
    def num_episodes(self):
        return len(self.keep)

    def episode_table(self):
        return dict(self.table)

    def episode(self, i):
        ep = self.base.episode(int(self.keep[i]))
        return dict(ep, task=int(self.to_view[ep["task"]]))

    def _valid(self, horizon):
        """Per kept episode: slice starts with `horizon` steps inside it, and their cumulative sum (cached: the
        sampler asks for every batch)."""
        if horizon not in self._valid_cache:
            n = np.maximum(self.table["length"] - horizon + 1, 0)
            self._valid_cache[horizon] = n, np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        return self._valid_cache[horizon]

    def num_valid_slices(self, horizon=3):
        return int(self._valid(horizon)[1][-1])

    def slice_index(self, s, horizon=3):
        _, cum = self._valid(horizon)
        s = np.asarray(s, np.int64)
        e = np.searchsorted(cum, s, side="right") - 1
        return self.table["offset"][e] + (s - cum[e])

    def slice_starts(self, horizon=3, chunk=1 << 20):
        total = self.num_valid_slices(horizon)
        for lo in range(0, total, chunk):
            yield self.slice_index(np.arange(lo, min(lo + chunk, total)), horizon)

    def gather(self, index, horizon=3):
        b = self.base.gather(index, horizon)
        task = torch.from_numpy(self.to_view[b.task.numpy()])
        if (task < 0).any():
            raise ValueError("a slice of a task outside the view")
        return b._replace(task=task)

    def read_field(self, name, index):
        return self.base.read_field(name, index)
