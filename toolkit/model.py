"""The TD-MPC2 implicit world model (state observations; single- and multi-task)."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_tdmpc.config import ModelConfig
from edge_tdmpc.layers import Ensemble, SimNorm, mlp


# --- two-hot regression in symlog space -------------------------------------------------------------
def symlog(x):
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x):
    return torch.sign(x) * (torch.exp(torch.abs(x)) - 1)


def two_hot(x, num_bins=101, vmin=-10.0, vmax=10.0):
    """Scalars [..., 1] (or [...]) -> soft two-hot targets [..., num_bins] over symlog bins."""
    if x.shape[-1:] == (1,):
        x = x.squeeze(-1)
    bin_size = (vmax - vmin) / (num_bins - 1)
    x = torch.clamp(symlog(x), vmin, vmax)
    pos = (x - vmin) / bin_size
    idx = torch.floor(pos)
    offset = (pos - idx).unsqueeze(-1)
    idx = idx.long().unsqueeze(-1)
    out = torch.zeros(*x.shape, num_bins, dtype=x.dtype, device=x.device)
    out = out.scatter(-1, idx, 1 - offset)
    # the official code wraps the upper neighbour around; its weight is 0 exactly at vmax
    return out.scatter_add(-1, (idx + 1) % num_bins, offset)


def two_hot_inv(logits, num_bins=None, vmin=-10.0, vmax=10.0):
    """Logits [..., num_bins] -> decoded scalars [..., 1], in fp32 whatever the logits' precision (a softmax
    over 101 bins, then symexp, is where fp16 loses the value)."""
    num_bins = num_bins or logits.shape[-1]
    bins = torch.linspace(vmin, vmax, num_bins, device=logits.device)
    return symexp(torch.sum(F.softmax(logits.float(), dim=-1) * bins, dim=-1, keepdim=True))


def soft_ce(logits, target, num_bins=101, vmin=-10.0, vmax=10.0):
    """Cross-entropy between logits and the two-hot encoding of scalar targets -> [..., 1]."""
    return -(two_hot(target, num_bins, vmin, vmax) * F.log_softmax(logits, dim=-1)).sum(-1, keepdim=True)


# --- the model --------------------------------------------------------------------------------------
class WorldModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        z, a, e = cfg.latent_dim, cfg.action_dim, cfg.task_dim
        if cfg.multitask:
            self._task_emb = nn.Embedding(len(cfg.tasks), e, max_norm=1)
            masks = torch.zeros(len(cfg.tasks), a)
            for i, d in enumerate(cfg.action_dims):
                masks[i, :d] = 1.0
            self.register_buffer("_action_masks", masks)
        enc_hidden = max(cfg.num_enc_layers - 1, 1) * [cfg.enc_dim]
        self._encoder = nn.ModuleDict({"state": mlp(cfg.obs_dim + e, enc_hidden, z, act=SimNorm(cfg.simnorm_dim))})
        self._dynamics = mlp(z + e + a, 2 * [cfg.mlp_dim], z, act=SimNorm(cfg.simnorm_dim))
        self._reward = mlp(z + e + a, 2 * [cfg.mlp_dim], cfg.num_bins)
        self._pi = mlp(z + e, 2 * [cfg.mlp_dim], 2 * a)
        self._Qs = Ensemble(cfg.num_q, z + e + a, 2 * [cfg.mlp_dim], cfg.num_bins, dropout=cfg.dropout)
        self._init_weights()
        self._target_Qs = copy.deepcopy(self._Qs).requires_grad_(False)
        self.register_buffer("log_std_min", torch.tensor(cfg.log_std_min))
        self.register_buffer("log_std_dif", torch.tensor(cfg.log_std_max - cfg.log_std_min))

    def _init_weights(self):
        # official init: truncated-normal linear weights, zero bias; reward and Q output layers start at 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.uniform_(m.weight, -0.02, 0.02)
        for layer in self._Qs.params:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self._reward[-1].weight)
        nn.init.zeros_(self._Qs.params[-1].weight)

    def train(self, mode=True):
        super().train(mode)
        self._target_Qs.train(False)  # target Qs never use dropout
        return self

    def requires_grad_(self, requires_grad=True):
        super().requires_grad_(requires_grad)
        self._target_Qs.requires_grad_(False)  # they follow the Qs by their running average, never by gradient
        return self

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def soft_update_target_Q(self, tau: float = 0.01):
        for t, p in zip(self._target_Qs.parameters(), self._Qs.parameters()):
            t.lerp_(p, tau)

    # --- helpers ---------------------------------------------------------------------------------------
    def _task(self, task, device):
        if task is None:
            raise ValueError("this is a multi-task model: pass task=<index> (see edge_tdmpc.envs.MT30)")
        if isinstance(task, int):
            if not 0 <= task < len(self.cfg.tasks):
                raise ValueError(f"task index {task} out of range for {len(self.cfg.tasks)} tasks")
            return torch.tensor([task], device=device)
        return task.long().to(device)

    def _in(self, *xs):
        """Layer inputs in the weights' precision (a no-op in fp32): the planner keeps actions and its
        statistics in fp32 while fp16/bf16 models run their layers in fp16/bf16, as the compiled graphs do."""
        dtype = self._encoder["state"][0].weight.dtype
        return xs[0].to(dtype) if len(xs) == 1 else [x.to(dtype) for x in xs]

    def task_emb(self, x, task):
        """Concatenate the task embedding of `task` (int or LongTensor [B]) to x [..., d]."""
        if not self.cfg.multitask:
            return x
        emb = self._task_emb(self._task(task, x.device)).to(x.dtype)
        if x.ndim == 3:  # [T, B, d]: same task per batch row at every step
            emb = emb.unsqueeze(0)
        return torch.cat([x, emb.expand(*x.shape[:-1], emb.shape[-1])], dim=-1)

    def action_mask(self, task):
        return self._action_masks[task] if self.cfg.multitask else None

    # --- the nouns of the paper -------------------------------------------------------------------------
    def encode(self, obs, task):
        if obs.shape[-1] != self.cfg.obs_dim:
            raise ValueError(
                f"observation has {obs.shape[-1]} entries but the model expects {self.cfg.obs_dim} "
                f"(multitask models take obs zero-padded to {self.cfg.obs_dim})"
            )
        return self._encoder["state"](self.task_emb(self._in(obs), task))

    def next(self, z, a, task):
        z, a = self._in(z, a)
        return self._dynamics(torch.cat([self.task_emb(z, task), a], dim=-1))

    def reward(self, z, a, task):
        """Reward logits [..., num_bins]; decode with two_hot_inv."""
        z, a = self._in(z, a)
        return self._reward(torch.cat([self.task_emb(z, task), a], dim=-1))

    def reward_next(self, z, a, task):
        """(reward logits, next latent) of the same (z, a): one step of the planner's rollout. A runtime may
        compute both in one batched pass (`edge_tdmpc.compile.fused`); here they are the two networks."""
        return self.reward(z, a, task), self.next(z, a, task)

    def rollout_step(self, z, a, task):
        """(decoded reward [..., 1], next latent) of (z, a): what each step of the planner's rollout needs."""
        reward, z = self.reward_next(z, a, task)
        return two_hot_inv(reward, self.cfg.num_bins, self.cfg.vmin, self.cfg.vmax), z

    def pi_info(self, z, task, eps=None):
        """Policy prior: (sampled action, info with mean/log_std/entropy); `eps` fixes the noise."""
        # the head in the weights' precision, the squashed Gaussian in fp32 (tanh/exp of log_std)
        mean, log_std = self.pi_head(z, task).float().chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * self.log_std_dif * (torch.tanh(log_std) + 1)
        eps = torch.randn_like(mean) if eps is None else eps.to(mean.dtype)
        if self.cfg.multitask:  # unused action dims: zero mean, zero log_std, zero noise
            mask = self._action_masks[self._task(task, z.device)]
            mean, log_std, eps = mean * mask, log_std * mask, eps * mask
            size = mask.sum(-1, keepdim=True)
        else:
            size = eps.shape[-1]
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.9189385175704956).sum(-1, keepdim=True)
        scaled_log_prob = log_prob * size
        action = mean + eps * log_std.exp()
        mu, mean, action = mean, torch.tanh(mean), torch.tanh(action)
        log_prob = log_prob - torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
        entropy_scale = scaled_log_prob / (log_prob + 1e-8)
        info = dict(mean=mean, mu=mu, log_std=log_std, log_prob=log_prob, entropy=-log_prob,
                    scaled_entropy=-log_prob * entropy_scale)
        return action, info

    def pi_head(self, z, task):
        """The policy MLP's raw output [..., 2 * action_dim]: mean and unsquashed log_std."""
        return self._pi(self.task_emb(self._in(z), task))

    def pi(self, z, task, eps=None):
        """(sampled action, deterministic mean action), both squashed to [-1, 1]."""
        action, info = self.pi_info(z, task, eps)
        return action, info["mean"]

    def Q(self, z, a, task, return_type="all", target=False, qidx=None):
        """'all': logits [num_q, ..., bins]; 'avg'/'min': decoded value of 2 random heads (or `qidx`)."""
        if return_type not in ("all", "avg", "min"):
            raise ValueError(f"return_type must be 'all', 'avg' or 'min', not {return_type!r}")
        z, a = self._in(z, a)
        out = (self._target_Qs if target else self._Qs)(torch.cat([self.task_emb(z, task), a], dim=-1))
        if return_type == "all":
            return out
        if qidx is None:
            qidx = torch.randperm(self.cfg.num_q, device=out.device)[:2]
        return self._pair_value(two_hot_inv(out[qidx], self.cfg.num_bins, self.cfg.vmin, self.cfg.vmax), return_type)

    @staticmethod
    def _pair_value(Q, return_type):
        """Decoded values of the 2 chosen heads [2, ..., 1] -> their 'min' or 'avg'."""
        return Q.min(0).values if return_type == "min" else Q.sum(0) / 2
