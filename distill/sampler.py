"""Training batches from an `EpisodeDataset`: uniform H+1-step slices that never cross an episode boundary,
drawn from one seeded stream (resumable, the same global batch under data parallelism), read ahead in a
thread."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from edge_tdmpc.distill.data import Batch, EpisodeDataset


class SliceSampler:
    """Uniform H+1-step slices that never cross episode boundaries; resumable; DDP-aware.

    Every rank draws the same global batch (batch_size * world_size slice numbers from one RNG stream) and
    keeps its contiguous chunk, so DDP over world_size ranks sees exactly the single-process global batch.
    With `prefetch`, the next batch is read in a background thread while the caller trains on this one (the
    reads release the GIL); the stream and `state_dict()` are the same as without it.
    """

    def __init__(self, dataset: EpisodeDataset, horizon: int = 3, batch_size: int = 256, seed: int = 0,
                 device="cpu", rank: int = 0, world_size: int = 1, prefetch: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if horizon < 1 or batch_size < 1:
            raise ValueError(f"horizon ({horizon}) and batch_size ({batch_size}) must be >= 1")
        self.dataset, self.horizon, self.batch_size = dataset, horizon, batch_size
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.num_valid_slices = dataset.num_valid_slices(horizon)
        if self.num_valid_slices == 0:
            raise ValueError(f"{dataset.root}: none of its {dataset.num_episodes} episodes has {horizon} "
                             "steps; collect longer episodes or use a shorter horizon")
        self.seed, self.batches = seed, 0
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="slice-prefetch") if prefetch else None
        self._pending = None  # the next batch, being read
        self._state = None    # RNG state right after the last batch handed out (the next one is pre-drawn)

    def slice_starts(self, chunk: int = 1 << 20):
        return self.dataset.slice_starts(self.horizon, chunk)

    def _next(self):
        s = self.rng.integers(0, self.num_valid_slices, size=self.batch_size * self.world_size)
        index = self.dataset.slice_index(s[self.rank * self.batch_size:(self.rank + 1) * self.batch_size],
                                         self.horizon)
        if self._pool is None:
            return self.dataset.gather(index, self.horizon)
        return self._pool.submit(self.dataset.gather, index, self.horizon)

    def sample(self) -> Batch:
        pending = self._pending if self._pending is not None else self._next()
        batch = pending.result() if self._pool is not None else pending
        self._state, self.batches = self.rng.bit_generator.state, self.batches + 1
        self._pending = self._next() if self._pool is not None else None
        if self.device.type != "cpu":
            batch = Batch(*(x.pin_memory().to(self.device, non_blocking=True) for x in batch))
        return batch

    def state_dict(self) -> dict:
        return dict(rng=self._state or self.rng.bit_generator.state, batches=self.batches, seed=self.seed,
                    num_valid_slices=self.num_valid_slices, horizon=self.horizon,
                    batch_size=self.batch_size, world_size=self.world_size)

    def load_state_dict(self, state: dict):
        mine = (self.num_valid_slices, self.horizon, self.batch_size, self.world_size)
        theirs = tuple(state[k] for k in ("num_valid_slices", "horizon", "batch_size", "world_size"))
        if mine != theirs:
            raise ValueError(f"sampler state is for (slices, horizon, batch, world size) {theirs}, this "
                             f"sampler has {mine}; resume on the same dataset with the same settings")
        if self._pending is not None:
            self._pending.result()  # a read in flight belongs to the old stream: finish and drop it
        self._pending, self._state = None, None
        self.rng.bit_generator.state = state["rng"]
        self.batches, self.seed = state["batches"], state["seed"]
