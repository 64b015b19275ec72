"""The official TD-MPC2 update ported as the official code writes it: per-step Python loops, a live fp32 teacher
forward every update, for-loop Adam.

`reference_update` is the official `_update` + `update_pi` with TD-MPC-Opt's reward term. It is the baseline of
`edge-tdmpc bench train-speed` (our trainer's updates/s against it) and the trainer's test oracle: given the
trainer's noise it must produce the trainer's parameters (tests/test_distill.py).
"""
import torch
import torch.nn.functional as F

from edge_tdmpc.model import WorldModel, soft_ce, two_hot_inv


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
