"""TD-MPC2 building blocks: NormedLinear, SimNorm, mlp, and a vectorised Q ensemble."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SimNorm(nn.Module):
    """Simplicial normalisation: softmax within groups of `dim` latent entries."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        shp = x.shape
        return F.softmax(x.view(*shp[:-1], -1, self.dim), dim=-1).view(shp)

    def extra_repr(self):
        return f"dim={self.dim}"


class NormedLinear(nn.Linear):
    """Linear -> (Dropout) -> LayerNorm -> activation (Mish unless given)."""

    def __init__(self, in_features, out_features, dropout=0.0, act=None):
        super().__init__(in_features, out_features)
        self.ln = nn.LayerNorm(out_features)
        self.act = act if act is not None else nn.Mish()
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x):
        x = super().forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.act(self.ln(x))


def mlp(in_dim, hidden, out_dim, act=None, dropout=0.0) -> nn.Sequential:
    """[in, *hidden, out]; the last layer is plain Linear, or NormedLinear with `act` (e.g. SimNorm)."""
    dims = [in_dim, *hidden, out_dim]
    layers = [NormedLinear(dims[i], dims[i + 1], dropout=dropout * (i == 0)) for i in range(len(dims) - 2)]
    layers.append(NormedLinear(dims[-2], dims[-1], act=act) if act is not None else nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


class _EnsembleLN(nn.Module):
    def __init__(self, n, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dim))
        self.bias = nn.Parameter(torch.zeros(n, dim))


class EnsembleLinear(nn.Module):
    """`n` independent Linear(+LayerNorm+Mish) layers stored stacked: weight [n, out, in]."""

    def __init__(self, n, in_features, out_features, normed=True, dropout=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n, out_features))
        self.ln = _EnsembleLN(n, out_features) if normed else None
        self.dropout = nn.Dropout(dropout) if dropout else None
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        # x: [B, in] shared by all heads, or [n, B, in] per head -> [n, B, out]
        w = self.weight.transpose(1, 2)
        x = torch.matmul(x, w) + self.bias.unsqueeze(1)
        if self.ln is None:
            return x
        if self.dropout is not None:
            x = self.dropout(x)
        x = F.layer_norm(x, x.shape[-1:]) * self.ln.weight.unsqueeze(1) + self.ln.bias.unsqueeze(1)
        return F.mish(x)


class Ensemble(nn.Module):
    """Vectorised ensemble of Q-MLPs; parameters live under `params.{layer}` like the official layout."""

    def __init__(self, n, in_dim, hidden, out_dim, dropout=0.0):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.params = nn.ModuleList(
            EnsembleLinear(n, dims[i], dims[i + 1], normed=i < len(dims) - 2, dropout=dropout * (i == 0))
            for i in range(len(dims) - 1)
        )
        self.n = n

    def __len__(self):
        return self.n

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        for layer in self.params:
            x = layer(x)
        return x.reshape(self.n, *lead, x.shape[-1])
