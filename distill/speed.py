"""Updates/s of our trainer against a straightforward eager port of the official update, same run, same data.

    python -m edge_tdmpc.distill.speed --batch-size 256 --teacher-sizes 5,1 --updates 20

`reference_update` is the official `_update` + `update_pi` with TD-MPC-Opt's reward term, written the way the
official code is (per-step Python loops, a live fp32 teacher forward every update, for-loop Adam). It is also the
test oracle: given the trainer's noise it must produce the trainer's parameters.
"""
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import psutil
import torch
import torch.nn.functional as F

from edge_tdmpc.model import WorldModel, soft_ce, two_hot_inv


# --- the straightforward implementation ------------------------------------------------------------------
class Reference:
    """Official-style TD-MPC2 (+ reward distillation) agent state: model, two Adams, running Q scale."""

    def __init__(self, model: WorldModel, cfg, teacher=None):
        m = model
        self.model, self.cfg, self.teacher = model, cfg, teacher
        groups = [{"params": m._encoder.parameters(), "lr": cfg.lr * cfg.enc_lr_scale},
                  {"params": m._dynamics.parameters()}, {"params": m._reward.parameters()},
                  {"params": m._Qs.parameters()}]
        if m.cfg.multitask:
            groups.append({"params": m._task_emb.parameters()})
        self.optim = torch.optim.Adam(groups, lr=cfg.lr, foreach=False)
        self.pi_optim = torch.optim.Adam(m._pi.parameters(), lr=cfg.lr, eps=1e-5, foreach=False)
        self.scale = torch.ones(1)
        self.discount = torch.tensor(m.cfg.discounts)


def reference_update(ref: Reference, batch, noise=None):
    """One update, loops and all. `noise` (the trainer's draws) makes it reproducible; else global RNG."""
    m, cfg, mc = ref.model, ref.cfg, ref.model.cfg
    obs, action, reward = batch.obs, batch.action, batch.reward
    task = batch.task if mc.multitask else None
    H, B = action.shape[:2]
    n = noise or (None,) * 6
    with torch.no_grad():
        next_z = m.encode(obs[1:], task)
        pi_a, _ = m.pi(next_z, task, eps=n[0])
        gamma = ref.discount[task].unsqueeze(-1) if task is not None else ref.discount[0]
        td_targets = reward + gamma * m.Q(next_z, pi_a, task, return_type="min", target=True, qidx=n[1])
    m.train()
    zs = torch.empty(H + 1, B, mc.latent_dim)
    z = m.encode(obs[0], task)
    zs[0] = z
    consistency = 0
    for t in range(H):
        z = m.next(z, action[t], task)
        consistency = consistency + F.mse_loss(z, next_z[t]) * cfg.rho ** t
        zs[t + 1] = z
    _zs = zs[:-1]
    if noise is not None and n[4] is not None:
        m._Qs.params[0].dropout.mask = n[4]
    qs = m.Q(_zs, action, task, return_type="all")
    reward_preds = m.reward(_zs, action, task)
    reward_loss, value_loss = 0, 0
    for t in range(H):
        reward_loss = reward_loss + soft_ce(reward_preds[t], reward[t]).mean() * cfg.rho ** t
        for q in range(mc.num_q):
            value_loss = value_loss + soft_ce(qs[q][t], td_targets[t]).mean() * cfg.rho ** t
    consistency = consistency / H
    reward_loss = reward_loss / H
    value_loss = value_loss / (H * mc.num_q)
    total = cfg.consistency_coef * consistency + cfg.reward_coef * reward_loss + cfg.value_coef * value_loss
    if ref.teacher is not None and cfg.d_coef > 0:  # TD-MPC-Opt: live teacher forward, student re-encoded
        t_model = ref.teacher
        with torch.no_grad():
            t_task = task
            t_reward = two_hot_inv(t_model.reward(t_model.encode(obs[0], t_task), action[0], t_task))
        s_reward = two_hot_inv(m.reward(m.encode(obs[0], task), action[0], task))
        total = total + cfg.d_coef * F.mse_loss(s_reward, t_reward)
    total.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip_norm)
    ref.optim.step()
    ref.optim.zero_grad(set_to_none=True)

    # policy update on detached latents
    zs = zs.detach()
    for p in m._Qs.parameters():
        p.requires_grad_(False)
    action_pi, info = m.pi_info(zs, task, eps=n[2])
    if noise is not None and n[5] is not None:
        m._Qs.params[0].dropout.mask = n[5]
    qs = m.Q(zs, action_pi, task, return_type="avg", qidx=n[3])
    x = qs[0].detach().flatten(1)
    srt = torch.sort(x, dim=0).values
    pos = torch.tensor([5.0, 95.0]) * (x.shape[0] - 1) / 100
    lo = torch.floor(pos)
    hi = torch.clamp(lo + 1, max=x.shape[0] - 1)
    w = (pos - lo).unsqueeze(1)
    pct = srt[lo.long()] * (1 - w) + srt[hi.long()] * w
    ref.scale.lerp_(torch.clamp(pct[1] - pct[0], min=1.0), cfg.tau)
    qs = qs / ref.scale
    rho = torch.pow(cfg.rho, torch.arange(len(qs)))
    pi_loss = (-(cfg.entropy_coef * info["scaled_entropy"] + qs).mean(dim=(1, 2)) * rho).mean()
    pi_loss.backward()
    for p in m._Qs.parameters():
        p.requires_grad_(True)
    torch.nn.utils.clip_grad_norm_(m._pi.parameters(), cfg.grad_clip_norm)
    ref.pi_optim.step()
    ref.pi_optim.zero_grad(set_to_none=True)
    m.soft_update_target_Q(cfg.tau)
    m.eval()
    return float(total.detach())


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
    from edge_tdmpc.distill.data import EpisodeDataset, SliceSampler
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
from edge_tdmpc.distill.trainer import distill
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


@click.command()
@click.option("--batch-size", default=256, show_default=True)
@click.option("--student-size", default=1, show_default=True)
@click.option("--teacher-sizes", default="5,1", show_default=True)
@click.option("--updates", default=20, show_default=True, help="timed updates per variant")
@click.option("--warmup", default=3, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
@click.option("--rss-data", type=click.Path(file_okay=False), default=None,
              help="also measure peak RSS training on a synthetic dataset in this directory (written if absent)")
@click.option("--rss-gb", default=26.0, show_default=True, help="its size on disk (make it exceed RAM)")
@click.option("--rss-updates", default=60, show_default=True)
@click.option("--skip-speed", is_flag=True, help="only the RSS measurement")
def main(batch_size, student_size, teacher_sizes, updates, warmup, threads, json_out, rss_data, rss_gb,
         rss_updates, skip_speed):
    """Trainer updates/s vs an eager port of the official update (ratios measured in this run)."""
    if threads:
        torch.set_num_threads(threads)
    rows = [] if skip_speed else run(batch_size, student_size, [int(s) for s in teacher_sizes.split(",")],
                                     updates, warmup)
    if rss_data:
        rows.append(dict(rss=rss_run(rss_data, rss_gb, rss_updates, batch_size)))
    peak = psutil.Process(os.getpid()).memory_info().rss
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads; this process's RSS now "
               f"{peak / 2**20:.0f} MiB")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
