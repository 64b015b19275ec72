"""Offline multi-task data on disk: episodes in memory-mapped .npy shards (sampled by `distill.sampler`).

Layout of a dataset directory (one format for converted and collected data):

    index.json                  format version, obs_dim, action_dim, task names, shards, totals, writer meta
    shard-000000.obs.npy        float32 [rows, obs_dim]   an episode of T steps owns T+1 consecutive rows
    shard-000000.action.npy     float32 [rows, action_dim] action[t] is taken at obs[t]; the last row is NaN
    shard-000000.reward.npy     float32 [rows]             reward[t] follows action[t]; the last row is NaN
    shard-000000.episodes.npy   int64 [episodes, 4]        start row, length T, task index, key
    shard-000000.<field>.npy    float32 [rows, d]          optional per-step fields named in the index's
                                                           "fields" (e.g. planner: the teacher planner's label
                                                           of each step, `planner.PlanLabel`); last row NaN

`key` is the writer's episode id (collect: the episode number within its task; convert: the source row), so
interrupted writers can resume. A transition's global index is its position in the concatenation of all
episodes' T steps; it names a slice by its first step (the key of the trainer's teacher-label cache).

Memory: a batch reads only its own rows, so a 40 GB dataset trains in a few GB of RAM. Shards are opened
with np.load(mmap_mode="r") (header, shapes, direct array access), but batches are read with positional reads
(os.preadv) by default: pages of a memory map stay mapped once touched and count in RSS, and on recent kernels
one fault maps a whole large folio, so a single batch of 256 random slices maps hundreds of MB. io="mmap"
reads through the maps instead: no system call per read, but RSS grows towards the dataset's size
(reclaimable page cache, released by `release()`); use it when the data fits in RAM.
"""
import errno
import json
import mmap
import os
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from edge_tdmpc.files import atomic_write, exclusive_lock

FORMAT, VERSION = "edge-tdmpc-episodes", 1
INDEX = "index.json"
_FIELDS = ("obs", "action", "reward", "episodes")


class Batch(NamedTuple):
    obs: torch.Tensor      # [H+1, B, obs_dim]
    action: torch.Tensor   # [H, B, action_dim]
    reward: torch.Tensor   # [H, B, 1]
    task: torch.Tensor     # [B] long
    index: torch.Tensor    # [B] long, global transition index of each slice's first step


def _save_rows(f, parts):
    """np.save of np.concatenate(parts), streamed piece by piece (no second copy of the shard in RAM)."""
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    header = dict(descr=np.lib.format.dtype_to_descr(parts[0].dtype), fortran_order=False, shape=shape)
    np.lib.format.write_array_header_1_0(f, header)
    for p in parts:
        f.write(np.ascontiguousarray(p).data)


def read_index(root) -> dict:
    path = Path(root) / INDEX
    if not path.is_file():
        raise ValueError(f"{root}: no {INDEX}, not an edge-tdmpc dataset (make one with `edge-tdmpc data "
                         "collect` or `edge-tdmpc data convert`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt index ({e}); restore it or rewrite the dataset") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path}: format {index.get('format')!r} v{index.get('version')}, expected "
                         f"{FORMAT!r} v{VERSION}; rewrite the dataset with this version of edge-tdmpc")
    return index


class EpisodeWriter:
    """Append episodes to a dataset directory (new or existing); each flush adds one shard atomically.

        with EpisodeWriter(out, obs_dim=24, action_dim=6, tasks=MT30) as w:
            w.add(obs, action, reward, task=3)       # obs [T+1, <=obs_dim], action [T, <=A], reward [T]

    Narrower obs/actions are zero-padded (the multitask convention). Shard files are written before the
    index that lists them, so a crash loses at most the episodes added since the last flush, and files a
    crash left behind unlisted are overwritten by the next flush. `meta` is saved in the index with each flush
    (writers keep their resume state there). One writer per directory at a time (an advisory lock).
    """

    def __init__(self, out_dir, obs_dim: int, action_dim: int, tasks, shard_rows: int = 1 << 20,
                 fields: dict[str, int] | None = None):
        self.root = Path(out_dir)
        self.fields = {str(k): int(v) for k, v in (fields or {}).items()}
        self.obs_dim, self.action_dim, self.tasks = int(obs_dim), int(action_dim), [str(t) for t in tasks]
        if self.obs_dim < 1 or self.action_dim < 1 or not self.tasks:
            raise ValueError(f"EpisodeWriter needs obs_dim, action_dim >= 1 and a task list, got {obs_dim}, "
                             f"{action_dim}, {len(self.tasks)} tasks")
        self.shard_rows = int(shard_rows)
        self.root.mkdir(parents=True, exist_ok=True)
        self._closed, self._lock = False, ExitStack()
        self._lock.enter_context(exclusive_lock(self.root / ".lock", what=self.root))
        if (self.root / INDEX).exists():
            self.index = read_index(self.root)
            have = (self.index["obs_dim"], self.index["action_dim"], self.index["tasks"])
            if self.index.get("fields", {}) != self.fields:
                self._lock.close()
                raise ValueError(f"{self.root} holds data with per-step fields {self.index.get('fields', {})}; "
                                 f"cannot append episodes with {self.fields} (choose another output directory)")
            if have != (self.obs_dim, self.action_dim, self.tasks):
                self._lock.close()
                raise ValueError(
                    f"{self.root} holds data with obs_dim {have[0]}, action_dim {have[1]}, {len(have[2])} "
                    f"tasks; cannot append obs_dim {self.obs_dim}, action_dim {self.action_dim}, "
                    f"{len(self.tasks)} tasks (choose another output directory)")
        else:
            self.index = dict(format=FORMAT, version=VERSION, obs_dim=self.obs_dim,
                              action_dim=self.action_dim, tasks=self.tasks, shards=[],
                              num_episodes=0, num_transitions=0, num_rows=0, meta={})
            if self.fields:
                self.index["fields"] = dict(self.fields)
        self.meta = self.index["meta"]
        self._pending, self._pending_rows = [], 0

    def add(self, obs, action, reward, task: int, key: int = -1, **fields):
        """One episode; `fields` are the writer's per-step fields, each [T, d]."""
        if set(fields) != set(self.fields):
            raise ValueError(f"this dataset's episodes carry the per-step fields {sorted(self.fields)}; got "
                             f"{sorted(fields)}")
        obs, action = np.asarray(obs, np.float32), np.asarray(action, np.float32)
        reward = np.asarray(reward, np.float32).reshape(-1)
        T = len(action)
        if obs.ndim != 2 or action.ndim != 2 or T < 1 or len(obs) != T + 1 or len(reward) != T:
            raise ValueError(f"an episode of T steps needs obs [T+1, obs_dim], action [T, A], reward [T]; "
                             f"got obs {obs.shape}, action {action.shape}, reward {reward.shape}")
        if obs.shape[1] > self.obs_dim or action.shape[1] > self.action_dim:
            raise ValueError(f"episode has obs dim {obs.shape[1]} / action dim {action.shape[1]}, more than "
                             f"the dataset's {self.obs_dim} / {self.action_dim}")
        if not 0 <= int(task) < len(self.tasks):
            raise ValueError(f"task index {task} out of range for {len(self.tasks)} tasks")
        extra = {}
        for name, d in self.fields.items():
            v = np.asarray(fields[name], np.float32)
            if v.shape != (T, d):
                raise ValueError(f"field {name!r} of an episode of {T} steps must be [{T}, {d}], got {v.shape}")
            extra[name] = np.concatenate([v, np.full((1, d), np.nan, np.float32)])
        if not (np.isfinite(obs).all() and np.isfinite(action).all() and np.isfinite(reward).all()
                and all(np.isfinite(v[:T]).all() for v in extra.values())):
            raise ValueError(f"episode (task {task}, key {key}) holds NaN/inf values; drop or repair it")
        obs = np.pad(obs, ((0, 0), (0, self.obs_dim - obs.shape[1])))
        padded = np.zeros((T + 1, self.action_dim), np.float32)  # padded action columns are zeros
        padded[:T, :action.shape[1]] = action
        padded[T] = np.nan  # the final observation has no action or reward: NaN filler, never sampled
        action, reward = padded, np.append(reward, np.float32(np.nan))
        if self._pending_rows and self._pending_rows + T + 1 > self.shard_rows:
            self.flush()
        self._pending.append((obs, action, reward, int(task), int(key), extra))
        self._pending_rows += T + 1

    def flush(self):
        """Write the pending episodes as one new shard, then the index that lists it."""
        if self._pending:
            name = f"shard-{len(self.index['shards']):06d}"
            lengths = np.array([len(p[1]) - 1 for p in self._pending], np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
            tasks = np.array([p[3] for p in self._pending], np.int64)
            keys = np.array([p[4] for p in self._pending], np.int64)
            pieces = dict(obs=[p[0] for p in self._pending], action=[p[1] for p in self._pending],
                          reward=[p[2] for p in self._pending],
                          episodes=[np.stack([starts, lengths, tasks, keys], axis=1)],
                          **{k: [p[5][k] for p in self._pending] for k in self.fields})
            for field, parts in pieces.items():
                atomic_write(self.root / f"{name}.{field}.npy", lambda f, p=parts: _save_rows(f, p))
            ix = self.index
            ix["shards"].append(dict(name=name, rows=int(self._pending_rows), episodes=len(lengths),
                                     transitions=int(lengths.sum())))
            ix["num_episodes"] += len(lengths)
            ix["num_transitions"] += int(lengths.sum())
            ix["num_rows"] += int(self._pending_rows)
            self._pending, self._pending_rows = [], 0
        self._write_index()

    def _write_index(self):
        text = json.dumps(self.index, indent=1).encode()
        atomic_write(self.root / INDEX, lambda f: f.write(text))

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # episodes added before an error are complete: keep them


def _allow_open_files(n: int):
    """Raise the soft open-file limit towards the hard one if a dataset needs n descriptors (3 per shard)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        n = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _open_shard(path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        raise ValueError(f"too many open files reading {Path(path).parent} (3 per shard); raise the limit "
                         "(ulimit -n) or rewrite the data with larger shards") from None
    if hasattr(os, "posix_fadvise"):  # small random reads: read-ahead would only waste page cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


class EpisodeDataset:
    """Read-only view of a dataset directory; shards are memory-mapped, the episode table is in RAM.

    io: "pread" (positional reads, RSS holds only the batch) or "mmap" (reads through the memory maps)."""

    def __init__(self, root, io: str = "pread"):
        if io not in ("pread", "mmap"):
            raise ValueError(f"io={io!r}: choose 'pread' (bounded RSS) or 'mmap' (faster, data fits in RAM)")
        self.root, self.io, self._fds, self._lock = Path(root), io, {}, threading.Lock()
        self.index = index = read_index(self.root)
        self.obs_dim, self.action_dim = index["obs_dim"], index["action_dim"]
        self.tasks = tuple(index["tasks"])
        self.fields = dict(index.get("fields", {}))
        self.shards, tables = [], []
        _allow_open_files(3 * len(index["shards"]) + 256)
        for i, shard in enumerate(index["shards"]):
            arrays = {}
            for field in (*_FIELDS, *self.fields):
                path = self.root / f"{shard['name']}.{field}.npy"
                try:
                    arrays[field] = np.load(path, mmap_mode=None if field == "episodes" else "r")
                except (OSError, ValueError) as e:
                    raise ValueError(f"{path}: missing or unreadable shard file ({e}); the dataset is "
                                     "damaged, rewrite it") from None
            rows, table = shard["rows"], arrays["episodes"]
            expect = dict(obs=(rows, self.obs_dim), action=(rows, self.action_dim), reward=(rows,),
                          episodes=(shard["episodes"], 4), **{k: (rows, d) for k, d in self.fields.items()})
            for field, shape in expect.items():
                if arrays[field].shape != shape:
                    raise ValueError(f"{self.root}/{shard['name']}.{field}.npy has shape "
                                     f"{arrays[field].shape}, index says {shape}; the dataset is damaged, "
                                     "rewrite it")
            self.shards.append(arrays)
            tables.append(np.column_stack([np.full(len(table), i), table]))
        table = np.concatenate(tables) if tables else np.zeros((0, 5), np.int64)
        self._shard, self._row, self._length, self._task, self._key = table.T.astype(np.int64)
        # global transition index of each episode's first step
        self._offset = np.concatenate([[0], np.cumsum(self._length)[:-1]]).astype(np.int64)
        if self.num_transitions != index["num_transitions"]:
            raise ValueError(f"{self.root}: episode table sums to {self.num_transitions} transitions, index "
                             f"says {index['num_transitions']}; the dataset is damaged, rewrite it")
        self._valid_cache = {}

    @property
    def num_episodes(self) -> int:
        return len(self._length)

    @property
    def num_transitions(self) -> int:
        return int(self._length.sum())

    @property
    def meta(self) -> dict:
        return self.index["meta"]

    def episode_table(self) -> dict:
        """Per-episode arrays: length, task, key, offset (global index of its first transition)."""
        return dict(length=self._length, task=self._task, key=self._key, offset=self._offset)

    def episode(self, i: int) -> dict:
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range for {self.num_episodes} episodes")
        i = i % self.num_episodes
        s, r, T = int(self._shard[i]), int(self._row[i]), int(self._length[i])
        out = self._read_span(s, r, r + T + 1)
        out["action"], out["reward"] = out["action"][:T], out["reward"][:T]  # drop the NaN filler row
        for name, d in self.fields.items():
            out[name] = np.empty((T, d), np.float32)
            self._read(s, name, r, out[name])
        return dict(out, task=int(self._task[i]), key=int(self._key[i]))

    # slices ---------------------------------------------------------------------------------------------
    def _valid(self, horizon: int):
        """Per episode: number of slice starts with `horizon` steps inside it, and their cumulative sum."""
        if horizon not in self._valid_cache:
            n = np.maximum(self._length - horizon + 1, 0)
            self._valid_cache[horizon] = n, np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        return self._valid_cache[horizon]

    def num_valid_slices(self, horizon: int = 3) -> int:
        return int(self._valid(horizon)[1][-1])

    def slice_index(self, s, horizon: int = 3) -> np.ndarray:
        """Slice number(s) in [0, num_valid_slices) -> global transition index of the first step."""
        n, cum = self._valid(horizon)
        s = np.asarray(s, np.int64)
        e = np.searchsorted(cum, s, side="right") - 1
        return self._offset[e] + (s - cum[e])

    def slice_starts(self, horizon: int = 3, chunk: int = 1 << 20):
        """Yield every valid slice start (global transition index), in order, `chunk` at a time."""
        total = self.num_valid_slices(horizon)
        for lo in range(0, total, chunk):
            yield self.slice_index(np.arange(lo, min(lo + chunk, total)), horizon)

    def gather(self, index, horizon: int = 3) -> Batch:
        """Slices starting at global transition indices `index` [B] -> Batch (numpy-backed CPU tensors)."""
        index = np.asarray(index, np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_transitions):
            raise ValueError(f"transition index out of range [0, {self.num_transitions})")
        e = np.searchsorted(self._offset, index, side="right") - 1
        t = index - self._offset[e]
        past = t > self._length[e] - horizon
        if past.any():
            raise ValueError(f"a slice of {horizon} steps from transition {index[past][0]} runs past its "
                             "episode's end; take starts from slice_starts() or the sampler")
        B, H = len(index), horizon
        obs = np.empty((B, H + 1, self.obs_dim), np.float32)
        action = np.empty((B, H, self.action_dim), np.float32)
        reward = np.empty((B, H), np.float32)
        shard, row = self._shard[e], self._row[e] + t
        for s in np.unique(shard):
            m = np.flatnonzero(shard == s)
            r = row[m]
            lo, hi = int(r.min()), int(r.max()) + H + 1
            if self.io == "mmap" or hi - lo <= 4 * len(m) * (H + 1):
                # through the maps, or dense starts (a pass over all slices): one read of the span
                src, base = (self.shards[s], 0) if self.io == "mmap" else (self._read_span(s, lo, hi), lo)
                rows = r[:, None] - base + np.arange(H + 1)
                obs[m], action[m] = src["obs"][rows], src["action"][rows[:, :H]]
                reward[m] = src["reward"][rows[:, :H]]
            else:  # sparse random starts: a slice's rows are contiguous, one read per field
                for b, rb in zip(m.tolist(), r.tolist(), strict=True):
                    self._read(s, "obs", rb, obs[b])
                    self._read(s, "action", rb, action[b])
                    self._read(s, "reward", rb, reward[b])
        return Batch(torch.from_numpy(obs.transpose(1, 0, 2).copy()),
                     torch.from_numpy(action.transpose(1, 0, 2).copy()),
                     torch.from_numpy(reward.T[..., None].copy()),
                     torch.from_numpy(self._task[e].copy()), torch.from_numpy(index.copy()))

    def read_field(self, name: str, index) -> np.ndarray:
        """A per-step field at global transition indices `index` [B] -> float32 [B, d]."""
        if name not in self.fields:
            raise ValueError(f"{self.root}: its episodes carry no {name!r} field (fields: {sorted(self.fields)})")
        index = np.asarray(index, np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_transitions):
            raise ValueError(f"transition index out of range [0, {self.num_transitions})")
        e = np.searchsorted(self._offset, index, side="right") - 1
        rows = self._row[e] + index - self._offset[e]
        out = np.empty((len(index), self.fields[name]), np.float32)
        for b, (s, r) in enumerate(zip(self._shard[e].tolist(), rows.tolist(), strict=True)):
            self._read(int(s), name, int(r), out[b])
        return out

    def _read_span(self, s: int, lo: int, hi: int) -> dict:
        n = hi - lo
        out = dict(obs=np.empty((n, self.obs_dim), np.float32),
                   action=np.empty((n, self.action_dim), np.float32), reward=np.empty(n, np.float32))
        for field, arr in out.items():
            self._read(s, field, lo, arr)
        return out

    def _read(self, s: int, field: str, row: int, out: np.ndarray):
        """Rows row, row+1, ... of shard s's `field` into the C-contiguous `out`, without mapping them."""
        arr = self.shards[s][field]
        fd = self._fds.get((s, field))
        if fd is None:
            with self._lock:  # the sampler's prefetch thread reads too
                fd = self._fds.get((s, field))
                if fd is None:
                    fd = self._fds[s, field] = _open_shard(arr.filename)
        if os.preadv(fd, [out], arr.offset + row * arr.strides[0]) != out.nbytes:
            raise ValueError(f"{arr.filename}: shard file is truncated; the dataset is damaged, rewrite it")

    def release(self):
        """io="mmap": unmap this process's touched shard pages (they stay in the page cache)."""
        for sh in self.shards:
            for field in ("obs", "action", "reward"):
                mm = getattr(sh[field], "_mmap", None)
                if mm is not None and hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_DONTNEED)

    def __reduce__(self):  # pickled (e.g. to worker processes) as its path, never as the mapped arrays
        return EpisodeDataset, (self.root, self.io)

    def close(self):
        fds = getattr(self, "_fds", {})
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __del__(self):
        self.close()


def summarize(root) -> str:
    """A few lines a user can read: size, dims and episodes per task of a dataset directory."""
    ds = EpisodeDataset(root)
    size = sum(f.stat().st_size for f in ds.root.glob("shard-*.npy"))
    lines = [f"{ds.root}: {ds.num_episodes} episodes, {ds.num_transitions} transitions, "
             f"{len(ds.shards)} shard(s), {size / 2**20:.1f} MiB",
             f"obs_dim {ds.obs_dim}, action_dim {ds.action_dim}, {len(ds.tasks)} task names"]
    counts = np.bincount(ds._task, minlength=len(ds.tasks))
    for i in np.flatnonzero(counts):
        steps = ds._length[ds._task == i]
        lines.append(f"  {ds.tasks[i]:<26} {counts[i]:>8} episodes  {int(steps.sum()):>10} steps")
    return "\n".join(lines)
