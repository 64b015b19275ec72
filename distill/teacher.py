"""The frozen teacher and its label cache.

The teacher's targets depend only on (obs_0, a_0, task) of a slice, so they can be computed once for every
slice start of a dataset and stored memory-mapped, keyed by the global transition index the sampler returns
(`Batch.index`): later runs (every d_coef / seed of a sweep) then need no teacher forward at all.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.checkpoint import weights_sha256
from edge_tdmpc.files import atomic_write
from edge_tdmpc.model import WorldModel, two_hot_inv
from edge_tdmpc.runtime import TORCH_DTYPES

CACHE_FORMAT, CACHE_VERSION = "edge-tdmpc-teacher-labels", 1


def fit_dim(x, dim: int):
    """Zero-pad or cut the last axis to `dim` (multitask padding differs between task sets; cut entries are
    padding for the tasks both models share)."""
    n = x.shape[-1]
    if n == dim:
        return x
    if n > dim:
        return x[..., :dim]
    return torch.cat([x, x.new_zeros(*x.shape[:-1], dim - n)], dim=-1)


class Teacher:
    """A frozen world model (eval mode, no gradients) giving distillation targets at (obs_0, a_0, task).

    `tasks` are the student's/dataset's task names; they are mapped to the teacher's own task indices.
    `precision` fp16/bf16 runs the teacher cast to that dtype (targets are returned in float32).
    """

    def __init__(self, model: WorldModel, tasks=None, precision: str = "fp32", device=None):
        if precision not in TORCH_DTYPES:
            raise ValueError(f"teacher precision must be one of {list(TORCH_DTYPES)}, not {precision!r}")
        self.device = torch.device(device or next(model.parameters()).device)
        self.dtype = TORCH_DTYPES[precision]
        self.precision = precision
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        own = model.cfg.tasks
        tasks = tuple(tasks) if tasks is not None else own
        missing = [t for t in tasks if t not in own]
        if missing:
            raise ValueError(f"teacher was trained on {len(own)} task(s) without {missing[0]!r}; pick a "
                             "teacher that knows every task of the data")
        self.task_map = torch.tensor([own.index(t) for t in tasks], device=self.device)
        self.digest = weights_sha256(model)

    @property
    def latent_dim(self) -> int:
        return self.model.cfg.latent_dim

    @torch.no_grad()
    def labels(self, obs0, action0, task, kinds) -> dict:
        """Targets for the distillation terms `kinds` (reward/value/policy/latent) -> float32 [B, .]."""
        m, mc = self.model, self.model.cfg
        t = self.task_map[task.to(self.device)] if mc.multitask else None
        obs = fit_dim(obs0.to(self.device, self.dtype), mc.obs_dim)
        a = fit_dim(action0.to(self.device, self.dtype), mc.action_dim)
        z = m.encode(obs, t)
        out = {}
        if "reward" in kinds:
            out["reward"] = two_hot_inv(m.reward(z, a, t).float())
        if "value" in kinds:  # mean of all heads: deterministic, unlike the 2-random-head 'avg'
            out["value"] = two_hot_inv(m.Q(z, a, t, "all").float()).mean(0)
        if "policy" in kinds:
            _, info = m.pi_info(z, t, eps=torch.zeros(z.shape[0], mc.action_dim, device=self.device))
            out["policy"] = fit_dim(info["mean"].float(), action0.shape[-1])
        if "latent" in kinds:
            out["latent"] = m.next(z, a, t).float()
        return out


class LabelCache:
    """Teacher targets at every slice start of a dataset: memory-mapped `<kind>.npy` [num_transitions, d].

        cache = LabelCache.build(teacher, dataset, "labels/", kinds=("reward",))   # resumable
        cache.lookup(batch.index, ("reward",))  ->  {"reward": [B, 1] float32}
    """

    def __init__(self, root, kinds=None, expect: dict | None = None):
        self.root = Path(root)
        meta_path = self.root / "labels.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.root}: no labels.json, not a teacher-label cache (build one with "
                             "--label-cache DIR)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{meta_path}: not a v{CACHE_VERSION} teacher-label cache; delete it to rebuild")
        if not self.meta.get("complete"):
            raise ValueError(f"{self.root}: label cache is incomplete (interrupted); run again to resume")
        for k, v in (expect or {}).items():
            if self.meta.get(k) != v:
                raise ValueError(f"{self.root}: label cache was built for {k}={self.meta.get(k)!r}, this run "
                                 f"has {v!r}; use another --label-cache directory")
        kinds = tuple(kinds or self.meta["kinds"])
        absent = [k for k in kinds if k not in self.meta["kinds"]]
        if absent:
            raise ValueError(f"{self.root}: label cache lacks {absent} (has {self.meta['kinds']}); rebuild "
                             "it with those terms in --distill")
        self.arrays = {k: np.load(self.root / f"{k}.npy", mmap_mode="r") for k in kinds}
        self.latent_dim = self.meta["dims"].get("latent")

    def lookup(self, index, kinds, device="cpu") -> dict:
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the page cache
        out = {}
        for k in kinds:
            rows = np.empty((len(idx), self.arrays[k].shape[1]), np.float32)
            rows[order] = self.arrays[k][idx[order]]
            out[k] = torch.from_numpy(rows).to(device)
        return out

    @classmethod
    def build(cls, teacher: Teacher, dataset, root, kinds, horizon: int = 3, batch_size: int = 4096,
              progress: bool = True) -> "LabelCache":
        """Run the teacher over every slice start of `dataset` once; resumes an interrupted build."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        kinds = tuple(kinds)
        probe = dataset.gather(next(dataset.slice_starts(horizon, 1)), horizon)
        dims = {k: int(v.shape[-1]) for k, v in teacher.labels(probe.obs[0], probe.action[0], probe.task,
                                                               kinds).items()}
        meta = dict(format=CACHE_FORMAT, version=CACHE_VERSION, teacher=teacher.digest,
                    precision=teacher.precision, dataset=_dataset_id(dataset), horizon=horizon,
                    kinds=list(kinds), dims=dims, rows=dataset.num_transitions, done=0, complete=False)
        meta_path = root / "labels.json"
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        same = old is not None and all(old.get(k) == meta[k] for k in
                                       ("teacher", "precision", "dataset", "horizon", "kinds", "dims"))
        if same and old.get("complete"):
            return cls(root, kinds)
        if same:
            meta["done"] = old["done"]
        for k, d in dims.items():
            path = root / f"{k}.npy"
            if not (same and path.is_file()):
                np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                          shape=(dataset.num_transitions, d))
        arrays = {k: np.load(root / f"{k}.npy", mmap_mode="r+") for k in kinds}
        write_json(meta_path, meta)
        total = dataset.num_valid_slices(horizon)
        with tqdm(total=total, initial=meta["done"], unit="slice", desc="teacher labels",
                  disable=not progress) as pbar:
            for lo in range(meta["done"], total, batch_size):
                s = np.arange(lo, min(lo + batch_size, total))
                idx = dataset.slice_index(s, horizon)
                batch = dataset.gather(idx, horizon)
                for k, v in teacher.labels(batch.obs[0], batch.action[0], batch.task, kinds).items():
                    arrays[k][idx] = v.cpu().numpy()
                for a in arrays.values():
                    a.flush()
                meta["done"] = int(s[-1]) + 1  # checkpoint the progress only after the rows are on disk
                write_json(meta_path, meta)
                pbar.update(len(s))
        meta["complete"] = True
        write_json(meta_path, meta)
        return cls(root, kinds)


def _dataset_id(dataset) -> str:
    """Identity of a dataset's listing (shards, counts, tasks): a changed dataset invalidates a cache."""
    ix = dataset.index
    key = json.dumps(dict(shards=ix["shards"], tasks=ix["tasks"], obs_dim=ix["obs_dim"],
                          action_dim=ix["action_dim"]), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_json(path: Path, obj):
    """Atomic JSON write: tmp file, fsync, rename."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")
