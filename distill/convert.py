"""The official TD-MPC2 datasets (mt30 / mt80 files of TensorDicts) -> our episode format.

An official file is a `torch.save`d TensorDict (or dict) with batch [episodes, L] (L = 501 for mt30, 101
for mt80): obs [E, L, obs_dim], action [E, L, A], reward [E, L], task [E, L] int. It comes from the replay
buffers of single-task agents, which store action/reward one row late (row 0 is filler): the step from obs[t]
to obs[t+1] is action[t+1], reward[t+1]. We store action[t], reward[t] with obs[t], so row 0 is dropped.

Loading needs full unpickling (arbitrary code), hence `trust_pickle`. Files are read memory-mapped where the
format allows (torch's zip format) and written in shard-sized chunks, so a 12 GB file needs no 2x RAM; the
progress of each file is saved with each shard, so an interrupted conversion resumes where it stopped.
"""
import ctypes
import functools
import gc
import mmap
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.distill.data import INDEX, EpisodeWriter, read_index
from edge_tdmpc.tasks import MT30, unknown_task

# Meta-World MT50 in the official mt80 order (task index = 30 + position)
MT50 = (
    "mw-assembly", "mw-basketball", "mw-button-press-topdown", "mw-button-press-topdown-wall",
    "mw-button-press", "mw-button-press-wall", "mw-coffee-button", "mw-coffee-pull", "mw-coffee-push",
    "mw-dial-turn",
    "mw-disassemble", "mw-door-open", "mw-door-close", "mw-drawer-close", "mw-drawer-open",
    "mw-faucet-open", "mw-faucet-close", "mw-hammer", "mw-handle-press-side", "mw-handle-press",
    "mw-handle-pull-side", "mw-handle-pull", "mw-lever-pull", "mw-peg-insert-side", "mw-peg-unplug-side",
    "mw-pick-out-of-hole", "mw-pick-place", "mw-pick-place-wall", "mw-plate-slide", "mw-plate-slide-side",
    "mw-plate-slide-back", "mw-plate-slide-back-side", "mw-push-back", "mw-push", "mw-push-wall",
    "mw-reach", "mw-reach-wall", "mw-shelf-place", "mw-soccer", "mw-stick-push",
    "mw-stick-pull", "mw-sweep-into", "mw-sweep", "mw-window-open", "mw-window-close",
    "mw-bin-picking", "mw-box-close", "mw-door-lock", "mw-door-unlock", "mw-hand-insert",
)
OFFICIAL_TASK_SETS = {"mt30": MT30, "mt80": MT30 + MT50}
KEYS = ("obs", "action", "reward", "task")


def official_tasks(tasks) -> tuple[str, ...]:
    """'mt30' | 'mt80' | 'a,b,...' | list -> task names, index = the file's task id."""
    if isinstance(tasks, str):
        if tasks in OFFICIAL_TASK_SETS:
            return OFFICIAL_TASK_SETS[tasks]
        tasks = [t for t in tasks.split(",") if t]
    known = OFFICIAL_TASK_SETS["mt80"]
    for t in tasks:
        if t not in known:
            raise unknown_task(t, known)
    return tuple(tasks)


def load_official(path, trust_pickle=False) -> dict:
    """An official dataset file -> {key: tensor [E, L, ...]}, memory-mapped when the file format allows."""
    path = Path(path)
    if not trust_pickle:
        raise ValueError(f"{path.name}: official dataset files are pickled TensorDicts and loading one can "
                         "run arbitrary code; pass --trust-pickle (trust_pickle=True) for files from a "
                         "source you trust, such as the TD-MPC2 dataset release")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) torch format cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ValueError(f"{path.name} needs the '{e.name}' package to unpickle: pip install {e.name}") \
            from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path.name}: corrupt or truncated file ({str(e).splitlines()[0]})") from None
    keys = set(obj.keys()) if hasattr(obj, "keys") else set()
    missing = [k for k in KEYS if k not in keys and k != "task"]
    if missing:
        raise ValueError(f"{path.name}: no '{missing[0]}' entry (has {sorted(map(str, keys))}); not a "
                         "TD-MPC2 dataset file")
    fields = {k: obj[k] for k in KEYS if k in keys}
    E, L = fields["obs"].shape[:2]
    for k, v in fields.items():
        ndim = 3 if k in ("obs", "action") else 2
        if not torch.is_tensor(v) or v.dim() != ndim or tuple(v.shape[:2]) != (E, L):
            raise ValueError(f"{path.name}: '{k}' has shape {tuple(getattr(v, 'shape', ()))}, expected "
                             f"{ndim} dims starting [{E}, {L}] (episodes, rows) like obs")
    if L < 2:
        raise ValueError(f"{path.name}: episodes of {L} row(s) hold no transition")
    return fields


def convert(sources, out_dir, tasks="mt30", trust_pickle=False, obs_dim=None, action_dim=None,
            shard_rows=1 << 21, echo=print, progress=True) -> dict:
    """Official files (or directories of *.pt) -> episodes appended to `out_dir`; resumable per shard."""
    files = []
    for src in map(Path, sources):
        files += sorted(src.glob("*.pt")) if src.is_dir() else [src]
    if not files:
        raise ValueError(f"no .pt files in {', '.join(map(str, sources))}")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError("two source files share a name (progress is tracked by name); convert them apart")
    tasks = official_tasks(tasks)
    out_dir, converted = Path(out_dir), {}
    if (out_dir / INDEX).exists():  # appending or resuming: keep the dataset's dims unless told otherwise
        index = read_index(out_dir)
        obs_dim, action_dim = obs_dim or index["obs_dim"], action_dim or index["action_dim"]
        converted = index["meta"].get("converted", {})
    if not trust_pickle:
        load_official(files[0], trust_pickle)  # refuses, before anything is written
    writer, summary = None, dict(files=0, episodes=0, skipped=0)
    try:
        for path in files:
            state = converted.get(path.name)
            if state and state["done"] == state["episodes"]:
                echo(f"{path.name}: already converted, skipped")
                continue
            fields = load_official(path, trust_pickle)
            E, L = fields["obs"].shape[:2]
            if writer is None:
                writer = EpisodeWriter(out_dir, obs_dim or fields["obs"].shape[2],
                                       action_dim or fields["action"].shape[2], tasks, shard_rows)
            state = writer.meta.setdefault("converted", {}).setdefault(path.name, dict(episodes=E, done=0,
                                                                                       skipped=0))
            if state["episodes"] != E:
                raise ValueError(f"{path.name} has {E} episodes but a conversion into {out_dir} recorded "
                                 f"{state['episodes']}; a different file with the same name? use a new --out")
            chunk = max(1, shard_rows // L)
            bar = tqdm(total=E, initial=state["done"], unit="ep", desc=path.name, disable=not progress)
            for lo in range(state["done"], E, chunk):
                hi = min(lo + chunk, E)
                _convert_chunk(fields, lo, hi, writer, state, path.name)
                state["done"] = hi
                writer.flush()  # the shard and the progress that covers it land in one index write
                for t in fields.values():
                    _drop_pages(t, lo, hi)
                bar.update(hi - lo)
            bar.close()
            summary["files"] += 1
            summary["episodes"] += E - state["skipped"]
            summary["skipped"] += state["skipped"]
            del fields
            gc.collect()  # drop this file's mapping before the next one
    finally:
        if writer is not None:
            writer.close()
    echo(f"converted {summary['files']} file(s) into {out_dir}: {summary['episodes']} episodes"
         + (f", skipped {summary['skipped']} holding NaN/inf" if summary["skipped"] else ""))
    return summary


def _drop_pages(t: torch.Tensor, lo: int, hi: int):
    """Give back the pages of rows lo:hi of `t`, which are never read again: mapped file pages would otherwise
    pile up in RSS until the whole file is resident (anonymous ones, when the file could not be mapped, are
    freed). Only for a tensor that owns its whole storage, so the pages hold no other rows or fields."""
    if not hasattr(mmap, "MADV_DONTNEED") or not t.is_contiguous() or t.storage_offset() != 0 \
            or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return
    row = t[0].numel() * t.element_size()
    start, end = t.data_ptr() + lo * row, t.data_ptr() + hi * row
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:  # whole pages inside the rows only
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _convert_chunk(fields, lo, hi, writer, state, name):
    obs = fields["obs"][lo:hi].float().numpy()
    action = fields["action"][lo:hi, 1:].float().numpy()  # one row late in the official buffer
    reward = fields["reward"][lo:hi, 1:].float().numpy()
    if "task" in fields:
        task = fields["task"][lo:hi].long().numpy()
        if (task != task[:, :1]).any():
            raise ValueError(f"{name}: an episode in rows {lo}..{hi} changes task mid-episode")
        task = task[:, 0]
    elif len(writer.tasks) == 1:
        task = np.zeros(hi - lo, np.int64)
    else:
        raise ValueError(f"{name} has no 'task' entry: a single-task file, convert it with --tasks TASK")
    if task.min() < 0 or task.max() >= len(writer.tasks):
        raise ValueError(f"{name} has task id {task.max()} but the dataset names {len(writer.tasks)} tasks; "
                         "pass --tasks mt80 (or the file's task list)")
    finite = np.isfinite(obs).all((1, 2)) & np.isfinite(action).all((1, 2)) & np.isfinite(reward).all(1)
    for i in range(hi - lo):
        if finite[i]:
            writer.add(obs[i], action[i], reward[i], task=int(task[i]), key=lo + i)
    state["skipped"] += int((~finite).sum())
