"""The TD-MPC2 update (official `_update`/`update_pi`) + TD-MPC-Opt distillation terms, and the training loop.

One `Trainer.update(batch)` is, in order: TD targets from the target Qs; latent rollout through the dynamics;
consistency + reward + value losses (+ d_coef x distillation terms); one Adam step (encoder lr x0.3, grad clip
20); a policy step on the detached latents (scaled Q + entropy); Polyak update of the target Qs.

Every random draw of the update (policy noise, Q-head choice, Q dropout masks) comes from the trainer's own
generator, drawn for the *global* batch and sliced to this rank's rows: data-parallel ranks then see exactly
the noise a single process would, and `--resume` continues bit-for-bit from the saved generator state.
"""
import copy
import csv
import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from edge_tdmpc.checkpoint import atomic_save, save_model
from edge_tdmpc.distill.losses import (
    DISTILL_TERMS,
    RunningScale,
    consistency_loss,
    latent_distill_loss,
    policy_distill_loss,
    policy_loss,
    reward_distill_loss,
    reward_loss,
    td_target,
    value_distill_loss,
    value_loss,
)
from edge_tdmpc.distill.teacher import fit_dim
from edge_tdmpc.model import WorldModel


@dataclass(frozen=True)
class TrainConfig:
    # optimisation (official TD-MPC2 defaults)
    batch_size: int = 256
    lr: float = 3e-4
    enc_lr_scale: float = 0.3
    grad_clip_norm: float = 20.0
    rho: float = 0.5
    consistency_coef: float = 20.0
    reward_coef: float = 0.1
    value_coef: float = 0.1
    entropy_coef: float = 1e-4
    tau: float = 0.01
    # TD-MPC-Opt: d_coef x sum of the selected distillation terms (d_coef 0 = the from-scratch baseline)
    d_coef: float = 0.4
    distill: tuple[str, ...] = ("reward",)
    seed: int = 1

    @classmethod
    def make(cls, **overrides) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown training setting(s) {sorted(unknown)}: choose from {sorted(names)}")
        if isinstance(overrides.get("distill"), str):
            overrides["distill"] = tuple(t for t in overrides["distill"].split(",") if t)
        cfg = cls(**{k: v for k, v in overrides.items() if v is not None})
        bad = [t for t in cfg.distill if t not in DISTILL_TERMS]
        if bad:
            raise ValueError(f"unknown distillation term(s) {bad}: choose from {','.join(DISTILL_TERMS)}")
        if cfg.d_coef < 0:
            raise ValueError(f"d_coef must be >= 0 (0 = no distillation), got {cfg.d_coef}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {cfg.batch_size}")
        return cfg

    @property
    def distilling(self) -> bool:
        return self.d_coef > 0 and bool(self.distill)


class _Noise(NamedTuple):
    td_eps: torch.Tensor       # [H, B, A] policy noise for the TD target's next action
    td_qidx: torch.Tensor      # [2] target-Q heads of the min
    pi_eps: torch.Tensor       # [H+1, B, A] policy noise in the policy update
    pi_qidx: torch.Tensor      # [2] Q heads averaged in the policy update
    wm_drop: torch.Tensor | None   # [num_q, H*B, mlp] Q dropout mask (model update)
    pi_drop: torch.Tensor | None   # [num_q, (H+1)*B, mlp] Q dropout mask (policy update)


class _MaskDropout(nn.Module):
    """Dropout that applies a mask the trainer drew for the global batch (identity in eval mode)."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.mask = p, None

    def forward(self, x):
        if not self.training:
            return x
        if self.mask is None:  # used outside Trainer.update: ordinary dropout
            return F.dropout(x, self.p, True)
        mask, self.mask = self.mask, None
        return x * mask

    def extra_repr(self):
        return f"p={self.p}"


class Trainer:
    """Holds the student, its two optimisers, the running Q scale and the noise generator.

    With a teacher (or label cache) the selected distillation terms are computed and logged even at d_coef 0
    (how far the from-scratch baseline is from the teacher); they then weigh exactly nothing."""

    def __init__(self, model: WorldModel, cfg: TrainConfig, teacher=None, labels=None, rank=0, world_size=1):
        if cfg.distilling and teacher is None and labels is None:
            raise ValueError(f"d_coef {cfg.d_coef} with terms {cfg.distill} needs a teacher (or a label "
                             "cache); pass --d-coef 0 for the from-scratch baseline")
        self.model, self.cfg, self.teacher, self.labels = model, cfg, teacher, labels
        self.distill = tuple(cfg.distill) if (teacher is not None or labels is not None) else ()
        self.rank, self.world_size = rank, world_size
        self.device = next(model.parameters()).device
        self.step = 0
        m, mc = model, model.cfg
        # official Q dropout module swapped for one whose mask comes from our generator
        first_q = m._Qs.params[0]
        self._drop = None
        if mc.dropout > 0:
            self._drop = first_q.dropout = _MaskDropout(mc.dropout)
        groups = [
            {"params": list(m._encoder.parameters()), "lr": cfg.lr * cfg.enc_lr_scale},
            {"params": list(m._dynamics.parameters())},
            {"params": list(m._reward.parameters())},
            {"params": list(m._Qs.parameters())},
        ]
        if mc.multitask:
            groups.append({"params": list(m._task_emb.parameters())})
        self.proj = None
        if "latent" in self.distill:  # student latent -> teacher latent, learned jointly
            t_latent = (labels or teacher).latent_dim
            g = torch.Generator().manual_seed(cfg.seed)
            self.proj = nn.Linear(mc.latent_dim, t_latent).to(self.device)
            with torch.no_grad():
                bound = 1 / mc.latent_dim ** 0.5
                self.proj.weight.copy_(torch.empty_like(self.proj.weight, device="cpu").uniform_(
                    -bound, bound, generator=g))
                self.proj.bias.zero_()
            groups.append({"params": list(self.proj.parameters())})
        fused = self.device.type in ("cpu", "cuda")  # one kernel per step: ~4x faster than the for-loop Adam
        self.optim = torch.optim.Adam(groups, lr=cfg.lr, fused=fused)
        self.pi_optim = torch.optim.Adam(m._pi.parameters(), lr=cfg.lr, eps=1e-5, fused=fused)
        self.scale = RunningScale(cfg.tau, self.device)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.discount = torch.tensor(mc.discounts, device=self.device)
        self.model.eval()

    # --- randomness of one update, drawn for the global batch ---------------------------------------------
    def _local(self, x, dim):
        """This rank's rows of a global-batch tensor (contiguous chunks, like the sampler's rank split)."""
        if self.world_size == 1:
            return x
        n = x.shape[dim] // self.world_size
        return x.narrow(dim, self.rank * n, n)

    def _draw(self, H, B) -> _Noise:
        mc, g, dev = self.model.cfg, self.generator, self.device
        G = B * self.world_size
        td_eps = torch.randn(H, G, mc.action_dim, generator=g, device=dev)
        td_qidx = torch.randperm(mc.num_q, generator=g, device=dev)[:2]
        pi_eps = torch.randn(H + 1, G, mc.action_dim, generator=g, device=dev)
        pi_qidx = torch.randperm(mc.num_q, generator=g, device=dev)[:2]
        wm_drop = pi_drop = None
        if self._drop is not None:
            keep = 1 - mc.dropout

            def mask(T):
                m = torch.empty(mc.num_q, T, G, mc.mlp_dim, device=dev).bernoulli_(keep, generator=g) / keep
                return self._local(m, 2).reshape(mc.num_q, T * B, mc.mlp_dim)

            wm_drop, pi_drop = mask(H), mask(H + 1)
        return _Noise(self._local(td_eps, 1), td_qidx, self._local(pi_eps, 1), pi_qidx, wm_drop, pi_drop)

    # --- distributed helpers (no-ops in a single process) -------------------------------------------------
    def _all_gather(self, x):
        if self.world_size == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def _average_grads(self, params):
        """DDP's gradient averaging, by hand: the update has two backward passes over different parameters."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _renorm_task_emb(self, task):
        """nn.Embedding(max_norm=1) renormalises rows in place at lookup; do it for the global batch's tasks
        so every rank renormalises the rows a single process would (the local lookups are then no-ops)."""
        if self.model.cfg.multitask and self.world_size > 1:
            with torch.no_grad():
                self.model._task_emb(torch.unique(self._all_gather(task)))

    # --- teacher targets -------------------------------------------------------------------------------
    def _teacher_labels(self, batch):
        kinds = self.distill
        if self.labels is not None:
            out = self.labels.lookup(batch.index, kinds, self.device)
        else:
            out = self.teacher.labels(batch.obs[0], batch.action[0], batch.task, kinds)
        if "policy" in out:
            out["policy"] = fit_dim(out["policy"], self.model.cfg.action_dim)
        return {k: v.to(self.device) for k, v in out.items()}

    # --- the update ---------------------------------------------------------------------------------------
    def update(self, batch) -> dict:
        """One TD-MPC2 (+ distillation) step on a Batch (obs [H+1,B,O], action [H,B,A], reward [H,B,1])."""
        cfg, m = self.cfg, self.model
        dev = self.device
        # data may be padded for a larger task set (e.g. MT30's 24/6): cut to the student's dims
        obs = fit_dim(batch.obs.to(dev), m.cfg.obs_dim)
        action = fit_dim(batch.action.to(dev), m.cfg.action_dim)
        reward = batch.reward.to(dev)
        task = batch.task.to(dev) if m.cfg.multitask else None
        H, B = action.shape[:2]
        noise = self._draw(H, B)
        if task is not None:
            self._renorm_task_emb(task)
        gamma = self.discount[task].unsqueeze(-1) if task is not None else self.discount[0]

        # targets: encoded next observations and TD targets from the target Qs (no gradient)
        with torch.no_grad():
            next_z = m.encode(obs[1:], task)
            next_a, _ = m.pi(next_z, task, eps=noise.td_eps)
            td = td_target(reward, gamma, m.Q(next_z, next_a, task, "min", target=True, qidx=noise.td_qidx))

        # latent rollout through the dynamics with the real actions
        m.train()
        z = m.encode(obs[0], task)
        zs = [z]
        for t in range(H):
            z = m.next(z, action[t], task)
            zs.append(z)
        zs = torch.stack(zs)
        if self._drop is not None:
            self._drop.mask = noise.wm_drop
        qs = m.Q(zs[:-1], action, task, "all")
        reward_logits = m.reward(zs[:-1], action, task)

        mc = m.cfg
        bins = (mc.num_bins, mc.vmin, mc.vmax)
        info = {
            "consistency_loss": consistency_loss(zs[1:], next_z, cfg.rho),
            "reward_loss": reward_loss(reward_logits, reward, cfg.rho, *bins),
            "value_loss": value_loss(qs, td, cfg.rho, *bins),
        }
        total = (cfg.consistency_coef * info["consistency_loss"] + cfg.reward_coef * info["reward_loss"]
                 + cfg.value_coef * info["value_loss"])

        labels = None
        if self.distill:
            labels = self._teacher_labels(batch)
            terms = {}
            if "reward" in labels:
                terms["reward"] = reward_distill_loss(reward_logits[0], labels["reward"])
            if "value" in labels:
                terms["value"] = value_distill_loss(qs[:, 0], labels["value"])
            if "latent" in labels:
                terms["latent"] = latent_distill_loss(self.proj(zs[1]), labels["latent"])
            for k, v in terms.items():
                info[f"distill_{k}_loss"] = v
                total = total + cfg.d_coef * v
        info["total_loss"] = total

        total.backward()
        self._average_grads(self._model_params)
        info["grad_norm"] = torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip_norm)
        if self.proj is not None:
            torch.nn.utils.clip_grad_norm_(self.proj.parameters(), cfg.grad_clip_norm)
        self.optim.step()
        # official order: zeroed here, so the policy loss's task-embedding gradient joins the next model step
        self.optim.zero_grad(set_to_none=True)

        info.update(self._update_pi(zs.detach(), task, noise, labels))
        m.soft_update_target_Q(cfg.tau)
        m.eval()
        self.step += 1
        return {k: v.detach() for k, v in info.items()}

    def _update_pi(self, zs, task, noise, labels):
        cfg, m = self.cfg, self.model
        if task is not None:
            self._renorm_task_emb(task)
        m._Qs.requires_grad_(False)  # the official code reads Q through detached parameters here
        try:
            action, pi = m.pi_info(zs, task, eps=noise.pi_eps)
            if self._drop is not None:
                self._drop.mask = noise.pi_drop
            q = m.Q(zs, action, task, "avg", qidx=noise.pi_qidx)
            self.scale.update(self._all_gather(q[0]))
            loss = policy_loss(self.scale(q), pi["scaled_entropy"], cfg.rho, cfg.entropy_coef)
            out = {"pi_loss": loss}
            if labels is not None and "policy" in labels:
                out["distill_policy_loss"] = policy_distill_loss(pi["mean"][0], labels["policy"])
                loss = loss + cfg.d_coef * out["distill_policy_loss"]
            loss.backward()
        finally:
            m._Qs.requires_grad_(True)
        self._average_grads(m._pi.parameters())
        out["pi_grad_norm"] = torch.nn.utils.clip_grad_norm_(m._pi.parameters(), cfg.grad_clip_norm)
        self.pi_optim.step()
        self.pi_optim.zero_grad(set_to_none=True)
        out["pi_scale"] = self.scale.value[0]
        out["pi_entropy"] = pi["entropy"].mean()
        return out

    @property
    def _model_params(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + (list(self.proj.parameters()) if self.proj is not None else [])

    # --- state for bit-for-bit resume ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        emb = getattr(self.model, "_task_emb", None)
        return {
            "step": self.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "task_emb_grad": None if emb is None or emb.weight.grad is None else emb.weight.grad.clone(),
            "proj": None if self.proj is None else self.proj.state_dict(),
            "optim": self.optim.state_dict(),
            "pi_optim": self.pi_optim.state_dict(),
            "scale": self.scale.state_dict(),
            "generator": self.generator.get_state(),
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, sd: dict):
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in sd["config"].items()}
        if saved != asdict(self.cfg):
            diff = sorted(k for k in saved if saved[k] != asdict(self.cfg).get(k))
            raise ValueError(f"cannot resume: training settings differ from the checkpoint's "
                             f"({', '.join(diff)}); use the original settings or a new --out")
        self.step = sd["step"]
        self.model.load_state_dict(sd["model"])
        if sd["task_emb_grad"] is not None:
            self.model._task_emb.weight.grad = sd["task_emb_grad"].to(self.device).clone()
        if self.proj is not None:
            self.proj.load_state_dict(sd["proj"])
        self.optim.load_state_dict(sd["optim"])
        self.pi_optim.load_state_dict(sd["pi_optim"])
        self.scale.load_state_dict(sd["scale"])
        self.generator.set_state(sd["generator"])


# --- the training loop: checkpoints, metrics, eval ----------------------------------------------------------
STATE_RE = re.compile(r"state-(\d+)\.pt")


class Checkpoints:
    """Training-state files `state-<step>.pt`, written atomically; the newest `keep` are kept so a corrupt or
    half-written last one falls back to the previous good one."""

    def __init__(self, root, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def paths(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.root.glob("state-*.pt")
                 if (m := STATE_RE.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int):
        atomic_save(state, self.root / f"state-{step:09d}.pt")
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)

    def latest(self, echo=print) -> dict | None:
        for path in self.paths():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated / corrupt: fall back to the previous file
                echo(f"warning: skipping unreadable checkpoint {path.name} ({str(e).splitlines()[0][:120]})")
        return None


class MetricsLog:
    """metrics.jsonl (every row) + metrics.csv (train rows) / <kind>.csv; a resume drops rows past its step."""

    def __init__(self, out, resume_step: int | None = None, external=None):
        self.out, self.external, self._fields = Path(out), external, {}
        self.jsonl = self.out / "metrics.jsonl"
        rows = []
        if resume_step is not None and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", 0) <= resume_step:
                    rows.append(row)
        for name in ("metrics.jsonl", "metrics.csv", "eval.csv", "episode.csv"):
            (self.out / name).unlink(missing_ok=True)
        for row in rows:
            self.write(row, external=False)

    def write(self, row: dict, external=True):
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        kind = row.get("kind", "train")
        name = "metrics.csv" if kind == "train" else f"{kind}.csv"  # one CSV per row kind: fixed columns
        new = name not in self._fields
        if new:
            self._fields[name] = list(row)
        with open(self.out / name, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields[name], extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if external and self.external is not None:
            self.external(row)


def external_logger(kind: str | None, out: Path, config: dict):
    """Optional TensorBoard / wandb sink for metric rows; a clear error if the package is missing."""
    if not kind or kind == "none":
        return None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--logger tensorboard needs the tensorboard package (pip install tensorboard)") \
                from None
        writer = SummaryWriter(str(out / "tensorboard"))

        def log(row):
            prefix = "eval/" if row.get("kind") == "eval" else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(prefix + k, v, row["step"])
            writer.flush()
        return log
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise ValueError("--logger wandb needs the wandb package: pip install wandb") from None
        wandb.init(project="edge-tdmpc", dir=str(out), config=config, resume="allow")
        return lambda row: wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    raise ValueError(f"unknown logger {kind!r}: choose none, tensorboard or wandb")


def closed_loop_eval(model: WorldModel, tasks, episodes=1, steps=100, seed=0, mpc=False, **planner) -> dict:
    """Short closed-loop episodes of the official evaluation protocol (`rollout.evaluation_episode`: torch fp32
    runtime, eval-mode actions, seeds as `edge-tdmpc bench` draws them) -> {task: mean return}."""
    from edge_tdmpc.planner import PlannerConfig
    from edge_tdmpc.rollout import evaluation_episode
    from edge_tdmpc.runtime import TorchRuntime
    model.eval()
    rt = TorchRuntime(model, "fp32", PlannerConfig.make(mpc=mpc, **planner), seed=seed)
    out = {}
    for task in tasks:
        rets = [evaluation_episode(rt, model.cfg, task, seed, ep, steps, eval_mode=True)[0].ret
                for ep in range(episodes)]
        out[task] = float(np.mean(rets))
    rt.close()
    return out


def fit(trainer: Trainer, sampler, steps: int, out, save_every=10_000, log_every=100, eval_every=0,
        eval_fn=None, resume=False, logger=None, progress=True, echo=print, on_save=None) -> dict:
    """Train to `steps` updates: log averaged metrics, eval, checkpoint (state + student.pt) every N steps.

    With `resume`, continues from the newest readable state in out/checkpoints, bit-for-bit."""
    from tqdm import tqdm

    out = Path(out)
    ckpts = Checkpoints(out / "checkpoints")
    lead = trainer.rank == 0
    resume_step = None
    if ckpts.paths() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or pick a new "
                         "--out")
    if resume:
        state = ckpts.latest(echo if lead else (lambda *_: None))
        if state is not None:
            trainer.load_state_dict(state["trainer"])
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            resume_step = trainer.step
            if lead:
                echo(f"resumed from step {trainer.step}")
    log = MetricsLog(out, resume_step, logger) if lead else None

    def save():
        if lead:
            state = {"trainer": trainer.state_dict(), "sampler": sampler.state_dict(),
                     "torch_rng": torch.get_rng_state()}
            ckpts.save(state, trainer.step)
            save_model(trainer.model, out / "student.pt")
            if on_save is not None:
                on_save(trainer)
        if trainer.world_size > 1:
            dist.barrier()

    sums, n, t0, start = {}, 0, time.perf_counter(), trainer.step
    with tqdm(total=steps, initial=trainer.step, unit="upd", desc="train", disable=not (progress and lead),
              dynamic_ncols=True) as pbar:
        while trainer.step < steps:
            info = trainer.update(sampler.sample())
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            pbar.update(1)
            step = trainer.step
            if step % log_every == 0 or step == steps:
                vec = torch.stack([sums[k] / n for k in sorted(sums)])
                if trainer.world_size > 1:  # losses are per-rank means: average them
                    dist.all_reduce(vec)
                    vec /= trainer.world_size
                dt = time.perf_counter() - t0
                row = {"kind": "train", "step": step, **dict(zip(sorted(sums), vec.tolist(), strict=True)),
                       "updates_per_s": n / dt if dt > 0 else float("nan")}
                if lead:
                    log.write(row)
                    pbar.set_postfix(loss=f"{row['total_loss']:.3f}", ups=f"{row['updates_per_s']:.1f}")
                sums, n, t0 = {}, 0, time.perf_counter()
            if eval_fn is not None and eval_every and step % eval_every == 0 and lead:
                returns = eval_fn(trainer.model)
                log.write({"kind": "eval", "step": step, **returns,
                           "mean_return": float(np.mean(list(returns.values())))})
                t0 = time.perf_counter()  # eval time is not training time
            if step % save_every == 0 or step == steps:
                save()
    if trainer.step == start and lead:  # resumed a finished run: still hand back the student
        save_model(trainer.model, out / "student.pt")
    return {"steps": trainer.step, "student": str(out / "student.pt")}


# --- distributed launch (torchrun) --------------------------------------------------------------------------
def init_distributed(device="cpu") -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; initialises the process group (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), world


# --- `edge-tdmpc distill` -------------------------------------------------------------------------------
def build_student(tasks, size=1, seed=1, device="cpu", **dims) -> WorldModel:
    """A fresh student for `tasks` (size preset, or custom dims when size is None), seeded."""
    from edge_tdmpc.config import make_config
    cfg = make_config(tasks, size=size, **{k: v for k, v in dims.items() if v is not None})
    torch.manual_seed(seed)
    return WorldModel(cfg).to(device)


def load_teacher(path, tasks, precision="fp32", teacher_tasks=None, device="cpu"):
    """Load a teacher checkpoint; its task set is `teacher_tasks`, else the data's or MT30 by row count."""
    from edge_tdmpc.checkpoint import load_model, read_state_dict, to_internal
    if teacher_tasks is None:
        sd = to_internal(read_state_dict(path))
        rows = sd["_task_emb.weight"].shape[0] if "_task_emb.weight" in sd else 1
        if rows == len(tasks):
            teacher_tasks = ",".join(tasks)
        elif rows == 30:
            teacher_tasks = "mt30"
        else:
            raise ValueError(f"{path} is a {rows}-task teacher and the data has {len(tasks)} tasks: name its "
                             "task set with --teacher-tasks")
    from edge_tdmpc.distill.teacher import Teacher
    return Teacher(load_model(path, tasks=teacher_tasks, device=device), tasks=tasks, precision=precision,
                   device=device)


def distill(data, out, teacher=None, student_size: int | None = 1, steps: int = 1_000_000, resume=False,
            teacher_precision="fp32", teacher_tasks=None, label_cache=None, horizon=3, save_every=10_000,
            log_every=100, eval_every=0, eval_tasks=None, eval_steps=100, eval_episodes=1, eval_mpc=False,
            student_dims: dict | None = None, device=None, logger=None, progress=True, echo=print,
            **train) -> dict:
    """Distill `teacher` into a fresh student on the dataset `data` (d_coef=0 or no teacher: from scratch).

    Writes out/student.pt (official layout), out/metrics.jsonl + .csv, out/run.json and resumable training
    state in out/checkpoints. Launch under `torchrun --nproc_per_node N` for data-parallel training."""
    from edge_tdmpc.distill.data import EpisodeDataset, SliceSampler
    from edge_tdmpc.distill.teacher import LabelCache

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cfg = TrainConfig.make(**train)
    if teacher is None and cfg.d_coef > 0:
        cfg = TrainConfig.make(**{**asdict(cfg), "d_coef": 0.0})
        if rank == 0:
            echo("no --teacher: training the from-scratch baseline (d_coef 0)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = EpisodeDataset(data)
    tasks = dataset.tasks
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world} processes")
    # --batch-size is the global batch: each of the `world` ranks takes its contiguous share
    sampler = SliceSampler(dataset, horizon=horizon, batch_size=cfg.batch_size // world, seed=cfg.seed,
                           device=device, rank=rank, world_size=world)

    run = dict(data=str(Path(data).resolve()), teacher=str(teacher) if teacher else None, tasks=list(tasks),
               student_size=student_size, student_dims=student_dims or {}, horizon=horizon, steps=steps,
               world_size=world, train=asdict(cfg))
    if rank == 0:
        from edge_tdmpc.distill.teacher import write_json
        write_json(out / "run.json", run)

    teach = labels = None
    if teacher is not None and cfg.distill:  # at d_coef 0 the terms are only logged
        teach = load_teacher(teacher, tasks, teacher_precision, teacher_tasks, device)
        if label_cache is not None:
            if rank == 0:
                LabelCache.build(teach, dataset, label_cache, cfg.distill, horizon, progress=progress)
            if world > 1:
                dist.barrier()
            labels = LabelCache(label_cache, cfg.distill, expect=dict(teacher=teach.digest, horizon=horizon))
    student = build_student(tasks, student_size, cfg.seed, device, **(student_dims or {}))
    trainer = Trainer(student, cfg, teacher=teach, labels=labels, rank=rank, world_size=world)
    eval_fn = None
    if eval_every:
        if isinstance(eval_tasks, str):
            eval_tasks = eval_tasks.split(",")
        present = sorted(set(dataset.episode_table()["task"].tolist()))
        eval_tasks = list(eval_tasks or [tasks[i] for i in present])  # default: the tasks the data covers
        unknown = [t for t in eval_tasks if t not in tasks]
        if unknown:
            raise ValueError(f"eval task {unknown[0]!r} is not in the data's task set")

        def eval_fn(model):
            cpu = copy.deepcopy(model).cpu().float().eval()
            return closed_loop_eval(cpu, eval_tasks, eval_episodes, eval_steps, seed=cfg.seed, mpc=eval_mpc)
    ext = external_logger(logger, out, run) if rank == 0 else None
    summary = fit(trainer, sampler, steps, out, save_every, log_every, eval_every, eval_fn, resume, ext,
                  progress, echo)
    summary.update(tasks=list(tasks), d_coef=cfg.d_coef, distill=list(cfg.distill), rank=rank)
    if world > 1:
        dist.destroy_process_group()
    return summary
