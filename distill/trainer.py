"""The TD-MPC2 update (official `_update`/`update_pi`) + TD-MPC-Opt distillation terms: `Trainer.update`.

One `Trainer.update(batch)` is, in order: TD targets from the target Qs; latent rollout through the dynamics;
consistency + reward + value losses (+ d_coef x distillation terms); one Adam step (encoder lr x0.3, grad clip
20); a policy step on the detached latents (scaled Q + entropy); Polyak update of the target Qs.

Every random draw of the update (policy noise, Q-head choice, Q dropout masks) comes from the trainer's own
generator, drawn for the *global* batch and sliced to this rank's rows: data-parallel ranks then see exactly
the noise a single process would, and `--resume` continues bit-for-bit from the saved generator state. The
loop around it is `distill.loop`; `edge-tdmpc distill` is `distill.offline`.
"""
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from edge_tdmpc.distill.losses import (
    DISTILL_TERMS,
    PI_OBJECTIVES,
    PLANNER_FILTERS,
    PLANNER_LOSSES,
    TEACHER_TERMS,
    RunningScale,
    consistency_loss,
    latent_distill_loss,
    planner_distill_loss,
    policy_distill_loss,
    policy_loss,
    reward_distill_loss,
    reward_loss,
    split_plan_label,
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
    # TD-MPC-Opt: d_coef x sum of the selected teacher terms (d_coef 0 = the from-scratch baseline)
    d_coef: float = 0.4
    distill: tuple[str, ...] = ("reward",)
    # planner distillation ("planner" in distill): planner_coef x the policy's loss to the planner's labels,
    # beside TD-MPC2's policy objective
    planner_coef: float = 1.0
    planner_loss: str = "mse"
    # "q": a row's label teaches the policy only where the model's own Q values the planner's mean above the
    # policy's eval-mode action (a Q filter): the mean of a spread of elites can be an action no elite took
    planner_filter: str = "none"
    # the policy's objective: "tdmpc2" (maximise Q + entropy, the planner term beside it) or "planner" (the
    # planner term alone, as BMPC trains its policy: no Q to climb, so the prior goes where the labels are)
    pi_objective: str = "tdmpc2"
    # False: the world model (encoder, dynamics, reward, Qs, task embedding) stays as it starts and only the
    # policy learns (policy-only distillation); the planner then differs from the start's only where it uses
    # the policy (its policy trajectories, the value at the horizon)
    world_model: bool = True
    # updates before the policy's first step: a trained prior started on a new task (finetune) otherwise climbs
    # Qs that still value another task's returns, and unlearns what it could do; the Qs first learn the new
    # task's values under the prior as it is
    pi_warmup: int = 0
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
        if not cfg.d_coef >= 0:
            raise ValueError(f"d_coef must be >= 0 (0 = no distillation), got {cfg.d_coef}")
        if not cfg.planner_coef >= 0:
            raise ValueError(f"planner_coef must be >= 0 (0 = the term is only logged), got {cfg.planner_coef}")
        if cfg.planner_loss not in PLANNER_LOSSES:
            raise ValueError(f"planner_loss {cfg.planner_loss!r}: choose from {', '.join(PLANNER_LOSSES)}")
        if cfg.planner_filter not in PLANNER_FILTERS:
            raise ValueError(f"planner_filter {cfg.planner_filter!r}: choose from {', '.join(PLANNER_FILTERS)}")
        if cfg.pi_objective not in PI_OBJECTIVES:
            raise ValueError(f"pi_objective {cfg.pi_objective!r}: choose from {', '.join(PI_OBJECTIVES)}")
        if cfg.pi_objective == "planner" and not ("planner" in cfg.distill and cfg.planner_coef > 0):
            raise ValueError("pi_objective planner teaches the policy the planner's labels alone: add planner to "
                             "--distill with a --planner-coef above 0")
        if cfg.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {cfg.batch_size}")
        if not (isinstance(cfg.pi_warmup, int) and cfg.pi_warmup >= 0):
            raise ValueError(f"pi_warmup must be a whole number of updates >= 0, got {cfg.pi_warmup!r}")
        if cfg.pi_warmup and not cfg.world_model:
            raise ValueError("pi_warmup holds the policy while the world model learns, which is frozen: drop one")
        model_terms = [t for t in cfg.teacher_terms if t != "policy"]
        if not cfg.world_model and cfg.d_coef > 0 and model_terms:
            raise ValueError(f"distillation term(s) {model_terms} train the world model, which is frozen: drop them "
                             "or train the world model")
        return cfg

    @property
    def teacher_terms(self) -> tuple[str, ...]:
        return tuple(t for t in self.distill if t in TEACHER_TERMS)

    @property
    def distilling(self) -> bool:
        """Whether the teacher's networks weigh in (the planner term's labels are data, not a teacher)."""
        return self.d_coef > 0 and bool(self.teacher_terms)


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
    (how far the from-scratch baseline is from the teacher); they then weigh exactly nothing. The planner term
    reads `plan_labels` (`distill.labels`: `lookup(index) -> [B, 3A]`), logged likewise at planner_coef 0."""

    def __init__(self, model: WorldModel, cfg: TrainConfig, teacher=None, labels=None, rank=0, world_size=1,
                 plan_labels=None):
        if cfg.distilling and teacher is None and labels is None:
            raise ValueError(f"d_coef {cfg.d_coef} with terms {cfg.teacher_terms} needs a teacher (or a label "
                             "cache); pass --d-coef 0 for the from-scratch baseline")
        if "planner" in cfg.distill and plan_labels is None:
            raise ValueError("the planner term needs the teacher planner's labels: data collected with --mpc, "
                             "or a --teacher to label the data with")
        self.model, self.cfg, self.teacher, self.labels = model, cfg, teacher, labels
        self.distill = cfg.teacher_terms if (teacher is not None or labels is not None) else ()
        self.plan_labels = plan_labels if "planner" in cfg.distill else None
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

    @torch.no_grad()
    def warm_scale(self, batch):
        """Start the running Q scale at the model's own 5-95 percentile range of Q(z, pi(z)) on `batch` (its
        first latents, the policy's mean action) instead of 1: a student starting from trained weights (--init
        teacher) has Q values in the hundreds, and a scale of 1 would let the Q term swamp every other policy
        objective for the hundreds of updates the scale takes to catch up (tau 0.01). No random draw."""
        m = self.model
        task = batch.task.to(self.device) if m.cfg.multitask else None
        z = m.encode(fit_dim(batch.obs[0].to(self.device), m.cfg.obs_dim), task)
        _, mean = m.pi(z, task, eps=torch.zeros(z.shape[0], m.cfg.action_dim, device=self.device))
        q = m.Q(z, mean, task, "avg", qidx=torch.arange(2, device=self.device))
        p = self.scale._percentile(self._all_gather(q).float())
        self.scale.value.fill_(float(torch.clamp(p[1] - p[0], min=1.0)))

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
        if not cfg.world_model:
            return self._update_policy_only(obs, action, task, noise, batch)
        gamma = self.discount[task].unsqueeze(-1) if task is not None else self.discount[0]

        # targets: encoded next observations and TD targets from the target Qs (no gradient)
        with torch.no_grad():
            next_z = m.encode(obs[1:], task)
            next_a, _ = m.pi(next_z, task, eps=noise.td_eps)
            td = td_target(reward, gamma, m.Q(next_z, next_a, task, "min", target=True, qidx=noise.td_qidx))

        m.train()
        zs = self._rollout(obs[0], action, task)
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

        labels = self._labels(batch)
        if self.distill:
            terms = {}
            if "reward" in labels:
                terms["reward"] = reward_distill_loss(reward_logits[0], labels["reward"])
            if "value" in labels:
                terms["value"] = value_distill_loss(qs[:, 0], labels["value"])
            if "latent" in labels:
                terms["latent"] = latent_distill_loss(self.proj(zs[1]), labels["latent"])
            for k, v in terms.items():
                info[f"distill_{k}_loss"] = v
                total = total + cfg.d_coef * v  # the paper's weight for every teacher term
        info["total_loss"] = total

        total.backward()
        self._average_grads(self._model_params)
        info["grad_norm"] = torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip_norm)
        if self.proj is not None:
            torch.nn.utils.clip_grad_norm_(self.proj.parameters(), cfg.grad_clip_norm)
        self.optim.step()
        # official order: zeroed here, so the policy loss's task-embedding gradient joins the next model step
        self.optim.zero_grad(set_to_none=True)

        if self.step >= cfg.pi_warmup:
            info.update(self._update_pi(zs.detach(), task, noise, labels))
        m.soft_update_target_Q(cfg.tau)
        m.eval()
        self.step += 1
        return {k: v.detach() for k, v in info.items()}

    def _labels(self, batch) -> dict:
        labels = {}
        if self.plan_labels is not None:
            labels["planner"] = split_plan_label(self.plan_labels.lookup(batch.index).to(self.device),
                                                 self.model.cfg.action_dim)
        if self.distill:
            labels.update(self._teacher_labels(batch))
        return labels

    def _rollout(self, obs0, action, task):
        """Latents [H+1, B, latent] of the rollout through the dynamics from obs_0 with the data's actions."""
        m = self.model
        z = m.encode(obs0, task)
        zs = [z]
        for a in action:
            z = m.next(z, a, task)
            zs.append(z)
        return torch.stack(zs)

    def _update_policy_only(self, obs, action, task, noise, batch) -> dict:
        """The policy step alone, on the latents of the world model as it is (cfg.world_model False)."""
        m = self.model
        m.train()
        with torch.no_grad():
            zs = self._rollout(obs[0], action, task)
        info = self._update_pi(zs, task, noise, self._labels(batch))
        m.eval()
        # the policy loss's task-embedding gradient has no model step to join: dropped, the embedding stays put
        self.optim.zero_grad(set_to_none=True)
        self.step += 1
        return {k: v.detach() for k, v in info.items()}

    @torch.no_grad()
    def _planner_beats_policy(self, zs, action, pi_mean, planner_mean, task, noise):
        """[B, 1]: 1 where Q(z_0, the planner's mean) > Q(z_0, the policy's eval-mode action), under the policy
        update's own Q heads and dropout mask (so the later latents ride along with the update's actions)."""
        m, rest = self.model, action[1:].detach()

        def q(first):  # the dropout mask is used up by each forward: set it again
            if self._drop is not None:
                self._drop.mask = noise.pi_drop
            return m.Q(zs, torch.cat([first[None], rest]), task, "avg", qidx=noise.pi_qidx)[0]
        q_plan, q_pi = q(planner_mean.nan_to_num(0)), q(pi_mean[0].detach())
        return ((q_plan > q_pi) & torch.isfinite(planner_mean).all(-1, keepdim=True)).float()

    def _update_pi(self, zs, task, noise, labels):
        cfg, m = self.cfg, self.model
        if task is not None:
            self._renorm_task_emb(task)
        tracked = [p.requires_grad for p in m._Qs.parameters()]
        m._Qs.requires_grad_(False)  # the official code reads Q through detached parameters here
        try:
            action, pi = m.pi_info(zs, task, eps=noise.pi_eps)
            if cfg.pi_objective == "tdmpc2":
                if self._drop is not None:
                    self._drop.mask = noise.pi_drop
                q = m.Q(zs, action, task, "avg", qidx=noise.pi_qidx)
                self.scale.update(self._all_gather(q[0]))
                loss = policy_loss(self.scale(q), pi["scaled_entropy"], cfg.rho, cfg.entropy_coef)
            else:  # the planner term below is the whole loss
                loss = torch.zeros((), device=zs.device)
            out = {"pi_loss": loss}
            if "policy" in labels:
                out["distill_policy_loss"] = policy_distill_loss(pi["mean"][0], labels["policy"])
                loss = loss + cfg.d_coef * out["distill_policy_loss"]
            if "planner" in labels:  # the first latent's policy (obs_0's, where the planner acted)
                mask = (m._action_masks[task] if task is not None
                        else torch.ones_like(pi["mean"][0]))
                first = {k: pi[k][0] for k in ("mean", "mu", "log_std")}
                if cfg.planner_filter == "q":
                    keep = self._planner_beats_policy(zs, action, pi["mean"], labels["planner"][0], task, noise)
                    mask = mask * keep
                    out["distill_planner_kept"] = keep.mean()
                out["distill_planner_loss"] = planner_distill_loss(first, labels["planner"], mask, cfg.planner_loss)
                if cfg.planner_coef > 0:  # at 0 only logged: the update is bitwise the one without the term
                    loss = loss + cfg.planner_coef * out["distill_planner_loss"]
            loss.backward()
        finally:  # as they were: a model trained in part (finetune --trainable embedding) keeps its Qs fixed
            for p, t in zip(m._Qs.parameters(), tracked):
                p.requires_grad_(t)
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
        # a setting added since the state was saved ran at its default then
        saved = asdict(TrainConfig()) | {k: tuple(v) if isinstance(v, list) else v for k, v in sd["config"].items()}
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


def build_student(tasks, size=1, seed=1, device="cpu", **dims) -> WorldModel:
    """A fresh student for `tasks` (size preset, or custom dims when size is None), seeded."""
    from edge_tdmpc.config import make_config
    cfg = make_config(tasks, size=size, **{k: v for k, v in dims.items() if v is not None})
    torch.manual_seed(seed)
    return WorldModel(cfg).to(device)


STUDENT_DIMS = ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "task_dim", "simnorm_dim")


def parse_size(value, flag="--size") -> int | None:
    """A size preset as the command line gives it ('1'; 'custom' or None: the dims decide) -> int | None."""
    if value is None or value == "custom":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {value!r}: use a size preset (1, 5, 19, 48, 317) or 'custom'") from None


def parse_dims(dims, flag="--dims") -> dict:
    """Architecture overrides: 'mlp_dim=128,latent_dim=64' (or such a dict) -> {'mlp_dim': 128, 'latent_dim': 64}."""
    if not isinstance(dims, str):
        return dict(dims or {})
    out = {}
    for item in filter(None, dims.split(",")):
        key, _, value = item.partition("=")
        if key not in STUDENT_DIMS or not value.isdigit():
            raise ValueError(f"bad {flag} entry {item!r}: use key=int with keys {', '.join(STUDENT_DIMS)}")
        out[key] = int(value)
    return out
