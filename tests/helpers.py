"""Plain helpers for the tests (fixtures are in conftest.py): paths, a tiny random model, planner inputs."""
from pathlib import Path

import numpy as np
import torch

from edge_tdmpc.compile import record
from edge_tdmpc.planner import PlannerConfig, sample_noise

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHECKPOINTS = SHARED / "checkpoints"
PARITY = SHARED / "reference" / "parity"

SMALL = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=3)


def make_tiny_model(tasks="mt30", seed=0, task_dim=None):
    """A small random multitask model with the real architecture (fast to run in tests)."""
    from edge_tdmpc import WorldModel, make_config
    torch.manual_seed(seed)
    cfg = make_config(tasks, size=None, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2,
                      task_dim=task_dim if task_dim is not None else 16 if tasks == "mt30" else 0)
    model = WorldModel(cfg).eval()
    # official init zeroes reward/Q output layers; give them values so outputs are not trivially 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_feed(model, cfg, seed, task=3, t0=False):
    """One planning step's inputs (the plan graph's feed) on seeded noise."""
    g = torch.Generator().manual_seed(seed)
    noise = sample_noise(cfg, model.cfg.action_dim, model.cfg.num_q, g)
    obs = torch.randn(model.cfg.obs_dim, generator=g)
    prev = torch.rand(cfg.horizon, model.cfg.action_dim, generator=g) * 2 - 1
    return record.step_feed(obs.numpy(), task if model.cfg.multitask else None, prev.numpy(), t0, noise)


def assert_outputs_close(out, ref, atol):
    """The graph's outputs against the reference's, leaving out the runner-up elite's step (no graph output)."""
    from edge_tdmpc.compile.record import RUNNER_UP
    for k in set(ref) - set(RUNNER_UP):
        np.testing.assert_allclose(out[k], ref[k], atol=atol, rtol=0, err_msg=k)
