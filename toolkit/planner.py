"""MPPI planning in the latent space of the world model (TD-MPC2, Alg. 1).

`plan` is one pure function of (model, obs, task, previous mean, t0, noise): every random draw is an input,
so every backend (eager, torch.compile, ONNX Runtime, TensorRT) runs the same computation and can be checked
against this reference on the same noise. `Agent` is the small stateful wrapper the official code calls `act`.
"""
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import NamedTuple

import torch

from edge_tdmpc import noise
from edge_tdmpc.model import WorldModel
from edge_tdmpc.options import setting
from edge_tdmpc.tasks import check_task_index, fit_obs


@dataclass(frozen=True)
class PlannerConfig:
    mpc: bool = True            # False: act from the policy prior alone
    iterations: int = 6
    num_samples: int = 512
    num_elites: int = 64
    num_pi_trajs: int = 24
    horizon: int = 3
    min_std: float = 0.05
    max_std: float = 2.0
    temperature: float = 0.5

    @classmethod
    def make(cls, **overrides) -> "PlannerConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown planner setting(s) {sorted(unknown)}: choose from {sorted(names)}")
        cfg = cls(**{k: v for k, v in overrides.items() if v is not None})
        if not 0 < cfg.num_elites <= cfg.num_samples - cfg.num_pi_trajs + cfg.num_pi_trajs:
            raise ValueError(f"num_elites ({cfg.num_elites}) must be in 1..num_samples ({cfg.num_samples})")
        if cfg.num_pi_trajs >= cfg.num_samples:
            raise ValueError(f"num_pi_trajs ({cfg.num_pi_trajs}) must be below num_samples ({cfg.num_samples})")
        return cfg


@dataclass(frozen=True)
class PlannerOverrides:
    """The planner settings a command may override, named as `PlannerConfig` names them (None: its default):
    the flags of `bench` and `compile` (`--num-samples`; the older `--samples` still works)."""
    mpc: bool | None = setting(None, "plan with MPPI (default) or act from the policy prior alone",
                               flag="--mpc/--no-mpc")
    num_samples: int | None = setting(None, "MPPI samples (512); a compiled graph's shapes are fixed per setting",
                                      flag=("--num-samples", "--samples"), type=int)
    num_elites: int | None = setting(None, "MPPI elites (64)", flag=("--num-elites", "--elites"), type=int)
    num_pi_trajs: int | None = setting(None, "policy-prior trajectories (24)", flag=("--num-pi-trajs", "--pi-trajs"),
                                       type=int)
    iterations: int | None = setting(None, "MPPI iterations (6)", type=int)
    horizon: int | None = setting(None, "planning horizon (3)", type=int)

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Noise(NamedTuple):
    """All randomness of one planning step (shapes and distributions: `edge_tdmpc.noise`)."""
    pi: torch.Tensor        # [H, P, A]   N(0,1), policy-trajectory sampling
    sample: torch.Tensor    # [I, H, S-P, A] N(0,1), MPPI candidate sampling per iteration
    q_idx: torch.Tensor     # [I, 2] long, the 2 Q heads averaged in each iteration
    q_pi: torch.Tensor      # [I, S, A] N(0,1), the policy sample at the horizon's end in each iteration
    gumbel: torch.Tensor    # [K] Gumbel(0,1), picks one elite trajectory
    action: torch.Tensor    # [A] N(0,1), final exploration noise (ignored in eval mode)


def noise_shapes(cfg: PlannerConfig, action_dim: int) -> dict[str, tuple]:
    return noise.shapes(cfg.horizon, cfg.num_pi_trajs, cfg.num_samples, cfg.iterations, cfg.num_elites, action_dim)


def sample_noise(cfg: PlannerConfig, action_dim: int, num_q: int, generator: torch.Generator | None = None,
                 device="cpu", capturable=False) -> Noise:
    """One step's noise drawn with torch (`noise.torch_noise`; capturable: in a CUDA graph)."""
    return Noise(**noise.torch_noise(noise_shapes(cfg, action_dim), num_q, generator, device, capturable))


def pi_rollout(model: WorldModel, z, task, eps):
    """Actions [H, P, A] of P trajectories of the policy prior from latents z [P, L]: a_t ~ pi(z_t) with noise
    eps[t], z_t+1 = d(z_t, a_t)."""
    actions = []
    for t in range(eps.shape[0]):
        a, _ = model.pi(z, task, eps=eps[t])
        actions.append(a)
        if t < eps.shape[0] - 1:
            z = model.next(z, a, task)
    return torch.stack(actions)


def estimate_value(model: WorldModel, z, actions, task, gamma, q_idx, q_pi):
    """G = sum_t gamma^t r(z_t, a_t) + gamma^H Q_avg(z_H, pi(z_H)); actions [H, N, A] -> [N, 1]."""
    G, disc = 0, 1
    for t in range(actions.shape[0]):
        reward, z = model.rollout_step(z, actions[t], task)
        G = G + disc * reward
        disc = disc * gamma
    action, _ = model.pi(z, task, eps=q_pi)  # a sampled (not mean) policy action, as in the official code
    return G + disc * model.Q(z, action, task, return_type="avg", qidx=q_idx)


def mppi_update(value, actions, mask, cfg: PlannerConfig):
    """The elites (top-K values), their softmax scores at the temperature, and the score-weighted mean and std
    of their actions -> (mean [H, A], std [H, A], elite actions [H, K, A], elite values [K], scores [K])."""
    elite_value, elite_idxs = torch.topk(value, cfg.num_elites, dim=0)
    elite_actions = actions[:, elite_idxs]
    score = torch.exp(cfg.temperature * (elite_value - elite_value.max()))
    score = score / score.sum()
    mean = (score.view(1, -1, 1) * elite_actions).sum(1) / (score.sum() + 1e-9)
    std = ((score.view(1, -1, 1) * (elite_actions - mean.unsqueeze(1)) ** 2).sum(1) / (score.sum() + 1e-9)).sqrt()
    return mean * mask, std.clamp(cfg.min_std, cfg.max_std) * mask, elite_actions, elite_value, score


def warm_start(prev_mean, t0):
    """Previous mean shifted one step ahead, last row 0; all zeros at the first step of an episode."""
    keep = 1.0 - torch.as_tensor(t0, dtype=prev_mean.dtype, device=prev_mean.device)
    return torch.cat([prev_mean[1:], torch.zeros_like(prev_mean[:1])]) * keep


@torch.no_grad()
def plan(model: WorldModel, obs, task, prev_mean, t0, noise: Noise, cfg: PlannerConfig, gamma=0.99,
         eval_mode=False):
    """One MPPI step -> (action [A] in [-1,1], mean [H, A] for the next warm start, info).

    Actions, values and the MPPI statistics are fp32 whatever the model's precision (an fp16/bf16 model runs
    its layers in that type), as in the compiled graphs."""
    H, P, S, A = cfg.horizon, cfg.num_pi_trajs, cfg.num_samples, model.cfg.action_dim
    f32 = dict(dtype=torch.float32, device=obs.device)
    mask = model.action_mask(task)
    mask = torch.ones(A, **f32) if mask is None else mask.reshape(-1).float()
    z = model.encode(obs.reshape(1, -1), task)

    # 1. trajectories from the policy prior (a model may run them, the value and the update as fused kernels:
    # compile/kernels.py)
    pi_fn = getattr(model, "fused_pi_rollout", None) or partial(pi_rollout, model)
    pi_actions = pi_fn(z.expand(P, -1), task, noise.pi) if P else torch.zeros(H, 0, A, **f32)

    # 2. warm start from the previous step's plan
    mean = warm_start(prev_mean.float(), t0)
    std = torch.full((H, A), cfg.max_std, **f32)
    z = z.expand(S, -1)

    # 3. MPPI iterations
    value_fn = getattr(model, "fused_value", None) or (
        lambda *args: estimate_value(model, *args).nan_to_num(0).squeeze(1))
    update_fn = getattr(model, "fused_mppi", None) or mppi_update
    for i in range(cfg.iterations):
        sampled = (mean.unsqueeze(1) + std.unsqueeze(1) * noise.sample[i]).clamp(-1, 1)
        actions = torch.cat([pi_actions, sampled], dim=1) * mask
        value = value_fn(z, actions, task, gamma, noise.q_idx[i], noise.q_pi[i])
        mean, std, elite_actions, elite_value, score = update_fn(value, actions, mask, cfg)

    # 4. pick one elite by a Gumbel-max draw over log(score); explore with std[0] unless evaluating
    idx = torch.argmax(torch.log(score) + noise.gumbel)
    picked = elite_actions[0].index_select(0, idx.view(1)).squeeze(0)  # no .item(): a CUDA graph can capture it
    action = picked if eval_mode else picked + std[0] * noise.action
    info = dict(elite_value=elite_value, score=score, std=std, value=elite_value.max(), pick=idx,
                eval_action=picked.clamp(-1, 1), elite_first=elite_actions[0])
    return action.clamp(-1, 1), mean, info


class PlanLabel(NamedTuple):
    """What the planner knew about the first action of a step: its final MPPI iteration's mean and std, and the
    noise-free action it would execute (the eval-mode action); each [A]. The targets of planner distillation."""
    mean: torch.Tensor
    std: torch.Tensor
    eval_action: torch.Tensor

    def row(self):
        """[3A] float32 numpy: mean, std, eval_action (how datasets and label caches store it)."""
        import numpy as np
        return np.concatenate([np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, np.float32).reshape(-1)
                               for x in self])


def plan_label(mean, info) -> PlanLabel:
    """The label of a step from `plan`'s outputs."""
    return PlanLabel(mean[0].float(), info["std"][0].float(), info["eval_action"].float())


@torch.no_grad()
def policy_action(model: WorldModel, obs, task, noise_action, eval_mode=False):
    """mpc=False: act from the policy prior alone (its mean in eval mode)."""
    z = model.encode(obs.reshape(1, -1), task)
    action, mean = model.pi(z, task, eps=noise_action.reshape(1, -1))
    return (mean if eval_mode else action)[0]


class Agent:
    """Stateful wrapper: draws noise from a torch Generator and keeps the warm-start mean across steps."""

    def __init__(self, model: WorldModel, seed: int = 0, device=None, **planner_overrides):
        self.model = model
        self.cfg = PlannerConfig.make(**planner_overrides)
        p = next(model.parameters())
        self.device = torch.device(device or p.device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.prev_mean = torch.zeros(self.cfg.horizon, model.cfg.action_dim, device=self.device)
        self.gammas = model.cfg.discounts
        self.last_label: PlanLabel | None = None  # of the last planned step

    def _obs(self, obs, task):
        c = self.model.cfg
        obs = obs.detach().cpu() if torch.is_tensor(obs) else obs
        obs = fit_obs(obs, c.obs_dim, c.tasks[task] if c.multitask and task is not None else None)
        return torch.from_numpy(obs).to(self.device)

    def noise(self) -> Noise:
        return sample_noise(self.cfg, self.model.cfg.action_dim, self.model.cfg.num_q, self.generator, self.device)

    def _cast(self, noise: Noise) -> Noise:
        """Noise from any source (numpy, another device or dtype) -> this agent's device, in fp32."""
        out = [torch.as_tensor(t).to(self.device) for t in noise]
        return Noise(*(t if t.dtype == torch.long else t.float() for t in out))  # fp32, as plan() keeps it

    @torch.no_grad()
    def act(self, obs, t0=False, eval_mode=False, task=None, noise: Noise | None = None) -> torch.Tensor:
        task = check_task_index(task, self.model.cfg.tasks)
        obs = self._obs(obs, task)
        if not torch.isfinite(obs).all():
            raise ValueError("observation has non-finite entries (NaN/Inf): a runtime (edge_tdmpc.runtime) acts "
                             "safely on them; the Agent refuses them")
        noise = self._cast(noise if noise is not None else self.noise())
        if not self.cfg.mpc:
            return policy_action(self.model, obs, task, noise.action, eval_mode).float().cpu()
        gamma = self.gammas[task or 0]
        action, self.prev_mean, info = plan(self.model, obs, task, self.prev_mean, bool(t0), noise, self.cfg,
                                            gamma, eval_mode)
        self.last_label = plan_label(self.prev_mean, info)
        return action.float().cpu()
