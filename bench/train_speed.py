"""Updates/s of our trainer against a straightforward eager port of the official update, same run, same data.

    edge-tdmpc bench train-speed --batch-size 256 --teacher-sizes 5,1 --updates 20
    edge-tdmpc bench train-speed --skip-speed --rss-data /tmp/big --rss-gb 26   # peak RSS, dataset > RAM

The baseline is `edge_tdmpc.bench.official_update.reference_update`: the official update written the way the
official code is (per-step Python loops, a live fp32 teacher forward every update, for-loop Adam).
"""
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from edge_tdmpc.bench.official_update import Reference, reference_update
from edge_tdmpc.files import atomic_write_text
from edge_tdmpc.model import WorldModel


# --- the benchmark -------------------------------------------------------------------------------------
def synthetic_dataset(root, tasks, episodes_per_task=2, steps=100, seed=0):
    """Random episodes in the on-disk format (for speed only: the update's cost does not depend on values)."""
    from edge_tdmpc.config import make_config
    from edge_tdmpc.distill.data import EpisodeWriter
    cfg = make_config(tasks)
    rng = np.random.default_rng(seed)
    with EpisodeWriter(root, cfg.obs_dim, cfg.action_dim, cfg.tasks) as w:
        for e in range(episodes_per_task):
            for i in range(len(cfg.tasks)):
                w.add(rng.normal(size=(steps + 1, cfg.obs_dim)), rng.uniform(-1, 1, (steps, cfg.action_dim)),
                      rng.uniform(0, 1, steps), task=i, key=e)
    return root


def _interleaved(variants: dict, updates: int, warmup: int) -> dict:
    """Median seconds per update of each variant, the variants taking turns update by update, so a shared
    machine's changing load hits them alike."""
    times = {k: [] for k in variants}
    for i in range(warmup + updates):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def run(batch_size=256, student_size=1, teacher_sizes=(5, 1), updates=20, warmup=3, tasks="mt30", seed=0,
        echo=print) -> list[dict]:
    """Per setting (no teacher, then each teacher size): the eager reference and our trainer's variants,
    interleaved; ratios are against the reference of the same setting."""
    from edge_tdmpc.config import make_config
    from edge_tdmpc.distill.data import EpisodeDataset
    from edge_tdmpc.distill.sampler import SliceSampler
    from edge_tdmpc.distill.teacher import LabelCache, Teacher
    from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = EpisodeDataset(synthetic_dataset(Path(tmp) / "data", tasks))
        sampler = lambda: SliceSampler(ds, batch_size=batch_size, seed=seed)  # noqa: E731
        student = lambda: build_student(ds.tasks, student_size, seed)  # noqa: E731

        def step(update, obj, s):
            return lambda: update(obj, s.sample())

        ref_update, tr_update = reference_update, Trainer.update
        settings = {"none (from scratch)": None, **{f"{t}M": t for t in teacher_sizes}}
        for label, t_size in settings.items():
            if t_size is None:
                cfg = TrainConfig.make(batch_size=batch_size, seed=seed, d_coef=0)
                variants = {"eager reference": step(ref_update, Reference(student(), cfg), sampler()),
                            "trainer": step(tr_update, Trainer(student(), cfg), sampler())}
            else:
                cfg = TrainConfig.make(batch_size=batch_size, seed=seed)
                torch.manual_seed(seed + 1)
                teacher = WorldModel(make_config(ds.tasks, t_size)).eval().requires_grad_(False)
                cache = LabelCache.build(Teacher(teacher, ds.tasks), ds, Path(tmp) / f"labels{t_size}", ("reward",),
                                         progress=False)
                bf16 = Teacher(copy.deepcopy(teacher), ds.tasks, precision="bf16")
                variants = {
                    # the straightforward implementation: a live fp32 teacher forward every update
                    "eager reference, live teacher": step(ref_update, Reference(student(), cfg, teacher), sampler()),
                    "trainer, live teacher": step(tr_update, Trainer(student(), cfg, Teacher(teacher, ds.tasks)),
                                                  sampler()),
                    "trainer, live bf16 teacher": step(tr_update, Trainer(student(), cfg, bf16), sampler()),
                    "trainer, label cache": step(tr_update, Trainer(student(), cfg, labels=cache), sampler()),
                }
            base = None
            for name, sec in _interleaved(variants, updates, warmup).items():
                ups = 1 / sec
                base = base or ups
                rows.append(dict(teacher=label, variant=name, updates_per_s=ups, vs_reference=ups / base,
                                 batch_size=batch_size, student=f"{student_size}M", threads=torch.get_num_threads()))
                echo(f"teacher {label:<20} {name:<32} {ups:6.2f} updates/s  x{ups / base:.2f}")
    return rows


# --- memory: train on a dataset larger than RAM ---------------------------------------------------------------
def big_dataset(root, gigabytes: float, tasks="mt30", episode_steps=500, seed=0):
    """Write (or reuse) a synthetic dataset of about `gigabytes` on disk, cycling a pool of random episodes."""
    from edge_tdmpc.config import make_config
    from edge_tdmpc.distill.data import EpisodeDataset, EpisodeWriter
    root = Path(root)
    if (root / "index.json").exists():
        ds = EpisodeDataset(root)
        if _disk_bytes(root) >= gigabytes * 1e9 * 0.98:
            return ds
    cfg = make_config(tasks)
    rng = np.random.default_rng(seed)
    pool = [(rng.normal(size=(episode_steps + 1, cfg.obs_dim)).astype(np.float32),
             rng.uniform(-1, 1, (episode_steps, cfg.action_dim)).astype(np.float32),
             rng.uniform(0, 1, episode_steps).astype(np.float32)) for _ in range(16)]
    with EpisodeWriter(root, cfg.obs_dim, cfg.action_dim, cfg.tasks, shard_rows=1 << 22) as w:
        e = w.index["num_episodes"]
        while _disk_bytes(root) + w._pending_rows * 4 * (cfg.obs_dim + cfg.action_dim + 1) < gigabytes * 1e9:
            obs, action, reward = pool[e % len(pool)]
            w.add(obs, action, reward, task=e % len(cfg.tasks), key=e)
            e += 1
    return EpisodeDataset(root)


def _disk_bytes(root) -> int:
    return sum(p.stat().st_size for p in Path(root).glob("*.npy"))


_RSS_CHILD = """
import json, sys, time, psutil
from edge_tdmpc.distill.offline import distill
t = time.perf_counter()
s = distill(sys.argv[1], sys.argv[2], teacher=None, steps=int(sys.argv[3]), batch_size=int(sys.argv[4]),
            save_every=10**9, log_every=10, progress=False, echo=lambda *a: None)
p = psutil.Process()
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's RSS at fork, kept across exec)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps(dict(peak_rss_mib=hwm / 1024,
                      uss_mib=p.memory_full_info().uss / 2**20, seconds=time.perf_counter() - t)))
"""


def rss_run(root, gigabytes: float, updates=100, batch_size=256, echo=print) -> dict:
    """Peak RSS of `distill` (1M student, from scratch) training on a dataset of `gigabytes` on disk."""
    import subprocess
    import sys
    ds = big_dataset(root, gigabytes)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the child uses our thread count
        res = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(root), tmp, str(updates), str(batch_size)],
                             check=True, capture_output=True, text=True, env=env)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row.update(dataset_gb=_disk_bytes(root) / 1e9, transitions=ds.num_transitions, updates=updates,
               ram_gb=psutil.virtual_memory().total / 1e9)
    echo(f"dataset {row['dataset_gb']:.1f} GB on disk ({ds.num_transitions / 1e6:.0f}M transitions), RAM "
         f"{row['ram_gb']:.1f} GB: {updates} updates, peak RSS {row['peak_rss_mib']:.0f} MiB, "
         f"USS at end {row['uss_mib']:.0f} MiB")
    return row


def benchmark(batch_size=256, student_size=1, teacher_sizes=(5, 1), updates=20, warmup=3, threads=None,
              json_out=None, rss_data=None, rss_gb=26.0, rss_updates=60, skip_speed=False, echo=print) -> list[dict]:
    """`edge-tdmpc bench train-speed`: `run` (unless `skip_speed`), then `rss_run` on `rss_data` if given; the
    rows also go to `json_out`."""
    if threads:
        torch.set_num_threads(threads)
    rows = [] if skip_speed else run(batch_size, student_size, teacher_sizes, updates, warmup, echo=echo)
    if rss_data:
        rows.append(dict(rss=rss_run(rss_data, rss_gb, rss_updates, batch_size, echo=echo)))
    peak = psutil.Process(os.getpid()).memory_info().rss
    echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads; this process's RSS now "
         f"{peak / 2**20:.0f} MiB")
    if json_out:
        atomic_write_text(json_out, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    from edge_tdmpc.bench.cli import train_speed_cmd
    train_speed_cmd()
