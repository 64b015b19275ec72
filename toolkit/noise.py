"""All randomness of one planning step, defined once: the draws, their shapes and distributions, drawn with torch
(`planner.sample_noise`, every torch runtime) or with numpy (a deploy bundle's TensorRT `Planner`, on a robot
without torch). This module needs numpy only; it ships in deploy bundles as noise.py.

For H horizon, P policy trajectories, S samples, I iterations, K elites, A action dims:
    pi      [H, P, A]      N(0, 1)    policy-trajectory sampling
    sample  [I, H, S-P, A] N(0, 1)    MPPI candidates, per iteration
    q_idx   [I, 2]         int        the 2 Q heads averaged in each iteration (2 distinct of num_q)
    q_pi    [I, S, A]      N(0, 1)    the policy sample at the horizon's end, per iteration
    gumbel  [K]            Gumbel(0, 1), picks one elite trajectory
    action  [A]            N(0, 1)    the final exploration noise (ignored in eval mode)
"""
import numpy as np

FIELDS = ("pi", "sample", "q_idx", "q_pi", "gumbel", "action")
TINY = 1e-20  # floors of the Gumbel transform: log(0) never happens


def shapes(horizon: int, num_pi_trajs: int, num_samples: int, iterations: int, num_elites: int,
           action_dim: int) -> dict[str, tuple]:
    H, P, S, I, K, A = horizon, num_pi_trajs, num_samples, iterations, num_elites, action_dim
    return {"pi": (H, P, A), "sample": (I, H, S - P, A), "q_idx": (I, 2), "q_pi": (I, S, A), "gumbel": (K,),
            "action": (A,)}


def gumbel(u, log, floor):
    """Gumbel(0, 1) from uniforms u: -log(Exp(1)), in any array library (`log`, `floor(x, lo)` its ops)."""
    return -log(floor(-log(floor(u, TINY)), TINY))


def numpy_noise(shape: dict, num_q: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The draws `shape` names (a policy-only step has `action` alone) with numpy, float32 (q_idx int64), in
    the order of the torch draws."""
    out = {}
    if "q_idx" in shape:
        out["q_idx"] = np.stack([rng.permutation(num_q)[:2] for _ in range(shape["q_idx"][0])]).astype(np.int64)
    if "gumbel" in shape:
        out["gumbel"] = gumbel(rng.random(shape["gumbel"]), np.log, np.maximum).astype(np.float32)
    for name in ("pi", "sample", "q_pi", "action"):
        if name in shape:
            out[name] = rng.standard_normal(shape[name], dtype=np.float32)
    return {k: out[k] for k in FIELDS if k in out}


def torch_noise(shape: dict, num_q: int, generator=None, device="cpu", capturable=False) -> dict:
    """One step's draws with torch. capturable: only ops a CUDA graph can capture, from the device's default
    generator (randperm cannot be captured, so the Q-head pair is an argsort of uniforms)."""
    import torch
    g = dict(generator=generator, device=device)
    I = shape["q_idx"][0]
    if capturable:
        q_idx = torch.rand(I, num_q, **g).argsort(1)[:, :2]
    else:
        q_idx = torch.stack([torch.randperm(num_q, **g)[:2] for _ in range(I)])
    out = {"q_idx": q_idx, "gumbel": gumbel(torch.rand(shape["gumbel"], **g), torch.log, torch.clamp_min)}
    for name in ("pi", "sample", "q_pi", "action"):
        out[name] = torch.randn(shape[name], **g)
    return {k: out[k] for k in FIELDS}
