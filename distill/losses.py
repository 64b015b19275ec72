"""TD-MPC2 training losses (Hansen et al. 2024) and the TD-MPC-Opt distillation terms (Kuzmenko & Shvai 2025).

Shapes: H horizon, B batch, L latent, A action, Q ensemble heads, K bins. Every term is a mean over the batch,
so with data-parallel training the average of per-rank losses (and gradients) equals the full-batch one.
Temporal terms are weighted by rho^t and divided by H, as in the official `_update`.
"""
import torch
import torch.nn.functional as F

from edge_tdmpc.model import soft_ce, two_hot_inv

DISTILL_TERMS = ("reward", "value", "policy", "latent", "planner")
TEACHER_TERMS = DISTILL_TERMS[:4]  # targets from the teacher's networks; "planner" from its planner's labels
PLANNER_LOSSES = ("mse", "nll")
PLANNER_FILTERS = ("none", "q")
PI_OBJECTIVES = ("tdmpc2", "planner")  # the policy's own objective: climb Q (TD-MPC2), or imitate the planner (BMPC)


def rho_weights(n: int, rho: float, device=None) -> torch.Tensor:
    """[rho^0, ..., rho^(n-1)]: later steps of the latent rollout count less."""
    return rho ** torch.arange(n, dtype=torch.float32, device=device)


# --- the TD-MPC2 world-model update -----------------------------------------------------------------------
def consistency_loss(z_pred, z_target, rho: float):
    """sum_t rho^t MSE(dynamics rollout z_{t+1}, encode(obs_{t+1})) / H;  z_* [H, B, L]."""
    H = z_pred.shape[0]
    per_t = (z_pred - z_target).pow(2).mean(dim=(1, 2))
    return (per_t * rho_weights(H, rho, z_pred.device)).sum() / H


def reward_loss(logits, reward, rho: float, num_bins=101, vmin=-10.0, vmax=10.0):
    """sum_t rho^t soft-CE(reward logits, two-hot(r_t)) / H;  logits [H, B, K], reward [H, B, 1]."""
    H = logits.shape[0]
    per_t = soft_ce(logits, reward, num_bins, vmin, vmax).mean(dim=(1, 2))
    return (per_t * rho_weights(H, rho, logits.device)).sum() / H


def value_loss(q_logits, td_target, rho: float, num_bins=101, vmin=-10.0, vmax=10.0):
    """sum_t sum_q rho^t soft-CE(Q_q logits, two-hot(TD target)) / (H Q); [Q,H,B,K], [H,B,1]."""
    Q, H = q_logits.shape[:2]
    per_qt = soft_ce(q_logits, td_target, num_bins, vmin, vmax).mean(dim=(2, 3))  # broadcast over heads
    return (per_qt * rho_weights(H, rho, q_logits.device)).sum() / (H * Q)


def td_target(reward, discount, next_q_min):
    """r_t + gamma * min of 2 target-Q heads at (z_{t+1}, pi(z_{t+1}));  discount scalar or [B, 1]."""
    return reward + discount * next_q_min


def policy_loss(q_scaled, scaled_entropy, rho: float, entropy_coef: float = 1e-4):
    """Maximise scaled Q + entropy_coef * entropy, rho-weighted over the H+1 rollout latents; [H+1, B, 1]."""
    per_t = -(entropy_coef * scaled_entropy + q_scaled).mean(dim=(1, 2))
    return (per_t * rho_weights(per_t.shape[0], rho, per_t.device)).mean()


class RunningScale:
    """Running 5-95 percentile range of Q (official `RunningScale`): a scale-free policy loss across tasks."""

    def __init__(self, tau: float = 0.01, device=None):
        self.tau = tau
        self.value = torch.ones(1, device=device)
        self.percentiles = torch.tensor([5.0, 95.0], device=device)

    def _percentile(self, x):
        # linear interpolation between order statistics, written out as the official code does
        x = x.flatten(1)
        n = x.shape[0]
        ordered = torch.sort(x, dim=0).values
        pos = self.percentiles * (n - 1) / 100
        lo = torch.floor(pos)
        hi = torch.clamp(lo + 1, max=n - 1)
        w_hi = (pos - lo).unsqueeze(1)
        return ordered[lo.long()] * (1 - w_hi) + ordered[hi.long()] * w_hi

    def update(self, x):
        p = self._percentile(x.detach().float())
        self.value.lerp_(torch.clamp(p[1] - p[0], min=1.0), self.tau)

    def __call__(self, x):
        return x / self.value

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, sd):
        self.value.copy_(sd["value"])


# --- TD-MPC-Opt distillation terms (each model on its own latent of obs[0]) ---------------------------------
def reward_distill_loss(student_logits, teacher_reward):
    """The paper's term: MSE(decoded student reward, decoded teacher reward) at (obs_0, a_0); [B,K], [B,1]."""
    return F.mse_loss(two_hot_inv(student_logits), teacher_reward)


def value_distill_loss(student_q_logits, teacher_value):
    """MSE(mean of the student's Q heads, the teacher's all-head mean Q) at (obs_0, a_0); [Q,B,K], [B,1]."""
    return F.mse_loss(two_hot_inv(student_q_logits).mean(0), teacher_value)


def policy_distill_loss(student_mean, teacher_mean):
    """MSE(student tanh(pi mean), teacher tanh(pi mean)) at obs_0; padded action dims are 0 in both; [B,A]."""
    return F.mse_loss(student_mean, teacher_mean)


def latent_distill_loss(projected_next_z, teacher_next_z):
    """MSE(P z'_student, z'_teacher): the student's predicted next latent, projected to the teacher's size."""
    return F.mse_loss(projected_next_z, teacher_next_z)


# --- planner distillation: the policy prior learns the teacher planner's first action ----------------------
def split_plan_label(label, action_dim: int):
    """[B, 3A'] rows of `planner.PlanLabel` (mean, std, eval_action) -> three [B, action_dim] (zero-padded or cut:
    the padded action dims of a multi-task model are 0)."""
    from edge_tdmpc.distill.teacher import fit_dim
    return tuple(fit_dim(x, action_dim) for x in label.chunk(3, dim=-1))


def planner_distill_loss(pi_info: dict, label, mask, kind: str = "mse", eps: float = 1e-3):
    """The policy prior's first action against the planner's, at obs_0 (B rows); `mask` [B, A] marks the task's
    action dims. A row whose label is NaN has none and counts nothing (a fine-tuning batch's new-task rows).

    mse: MSE(tanh(mu), planner mean) over the task's dims: moves the action the prior executes in eval mode.
    nll: the planner mean's negative log-likelihood under the prior's Gaussian before the tanh (its atanh,
    clipped to 1 - eps): moves mu and also fits log_std, weighting each dim by the prior's own confidence."""
    mean, _, _ = label
    have = torch.isfinite(mean).all(-1, keepdim=True)
    mask, mean = mask * have, torch.where(have, mean, 0.0)
    n = mask.sum().clamp(min=1)
    if kind == "mse":
        return ((pi_info["mean"] - mean) * mask).pow(2).sum() / n
    u = torch.atanh(mean.clamp(-1 + eps, 1 - eps))
    log_std = pi_info["log_std"]
    nll = 0.5 * ((u - pi_info["mu"]) * torch.exp(-log_std)).pow(2) + log_std
    return (nll * mask).sum() / n
