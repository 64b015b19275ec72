"""The planner's rollout step with the reward and dynamics MLPs run side by side, as one network.

Every step of `planner.estimate_value` feeds the same [z, e, a] to the reward MLP and to the dynamics MLP.
Stacked, the two need one GEMM per layer instead of two: the first layers' weights concatenated along the
output, the later layers as a batch of 2 (bmm), the reward head zero-padded to the latent's width. On a GPU,
where a CUDA-graphed step costs about one kernel's latency per op, that halves the rollout's GEMMs and its
LayerNorm/Mish kernels (measure it with `edge-tdmpc bench step-latency --runtimes
torch-compile,torch-compile-fused`). On the CPU the time is in the GEMMs' arithmetic, not in launches, and the
stack does not pay in ONNX Runtime (docs/results/compile-cpu.md). The arithmetic is the same, up to summation
order.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_tdmpc.layers import NormedLinear
from edge_tdmpc.model import WorldModel


class FusedRollout(nn.Module):
    """reward and dynamics MLPs (same input, same hidden widths) -> (reward logits, next latent), stacked."""

    def __init__(self, reward: nn.Sequential, dynamics: nn.Sequential):
        super().__init__()
        if (len(reward) != len(dynamics) or reward[0].in_features != dynamics[0].in_features
                or not isinstance(dynamics[-1], NormedLinear)):
            raise ValueError("reward and dynamics MLPs must have the same input and depth (and the dynamics a "
                             "normed output layer, as in TD-MPC2) to be fused")
        self.bins, self.latent = reward[-1].out_features, dynamics[-1].out_features
        self.simnorm = dynamics[-1].act
        stack = lambda f, *pair: torch.stack([f(m) for m in pair])  # noqa: E731
        first, hidden = (reward[0], dynamics[0]), list(zip(reward[1:-1], dynamics[1:-1]))
        # first layer: one GEMM over the concatenated outputs [in, 2 * width]
        self._buf("w0", torch.cat([m.weight for m in first]).T)
        self._buf("b0", torch.cat([m.bias for m in first]))
        self._buf("ln0_w", stack(lambda m: m.ln.weight, *first))
        self._buf("ln0_b", stack(lambda m: m.ln.bias, *first))
        # hidden layers: a batch of 2 GEMMs each, weights [2, in, out]
        for i, pair in enumerate(hidden, start=1):
            self._buf(f"w{i}", stack(lambda m: m.weight.T, *pair))
            self._buf(f"b{i}", stack(lambda m: m.bias, *pair).unsqueeze(1))
            self._buf(f"ln{i}_w", stack(lambda m: m.ln.weight, *pair).unsqueeze(1))
            self._buf(f"ln{i}_b", stack(lambda m: m.ln.bias, *pair).unsqueeze(1))
        # heads: the reward head zero-padded to the widest output (the extra columns are sliced off)
        out = max(self.bins, self.latent)
        pad = lambda t, n: F.pad(t, (0, out - n))  # noqa: E731
        heads = (reward[-1], self.bins), (dynamics[-1], self.latent)
        self._buf("w_out", torch.stack([pad(m.weight.T, n) for m, n in heads]))
        self._buf("b_out", torch.stack([pad(m.bias, n) for m, n in heads]).unsqueeze(1))
        self._buf("ln_out_w", dynamics[-1].ln.weight)  # LayerNorm + SimNorm on the next latent
        self._buf("ln_out_b", dynamics[-1].ln.bias)
        self.depth = len(hidden)

    def _buf(self, name, value):
        # copies, kept out of the state dict: the checkpoint layout stays the official one
        self.register_buffer(name, value.detach().clone().contiguous(), persistent=False)

    @staticmethod
    def _norm_mish(x, w, b):
        return F.mish(F.layer_norm(x, x.shape[-1:]) * w + b)

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        h = torch.addmm(self.b0, x, self.w0).view(x.shape[0], 2, -1)  # [N, 2, width]
        h = self._norm_mish(h, self.ln0_w, self.ln0_b).transpose(0, 1)  # [2, N, width]
        for i in range(1, self.depth + 1):
            h = self._norm_mish(torch.baddbmm(getattr(self, f"b{i}"), h, getattr(self, f"w{i}")),
                                getattr(self, f"ln{i}_w"), getattr(self, f"ln{i}_b"))
        out = torch.baddbmm(self.b_out, h, self.w_out)  # [2, N, max(bins, latent)]
        logits, z = out[0, :, :self.bins], out[1, :, :self.latent]
        z = self.simnorm(F.layer_norm(z, z.shape[-1:], self.ln_out_w, self.ln_out_b))
        return logits.reshape(*lead, self.bins), z.reshape(*lead, self.latent)


class FusedWorldModel(WorldModel):
    """A WorldModel whose `reward_next` (the planner's rollout step) is one FusedRollout pass."""

    @classmethod
    def of(cls, model: WorldModel) -> "FusedWorldModel":
        p = next(model.parameters())
        m = cls(model.cfg).to(p.device, p.dtype)
        m.load_state_dict(model.state_dict())
        m.train(model.training)
        if model.cfg.multitask:
            m._task_emb.max_norm = model._task_emb.max_norm
        m._rollout = FusedRollout(m._reward, m._dynamics)
        return m

    def reward_next(self, z, a, task):
        z, a = self._in(z, a)
        return self._rollout(torch.cat([self.task_emb(z, task), a], dim=-1))
