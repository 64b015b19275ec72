import numpy as np
import pytest
import torch

from edge_tdmpc.planner import Agent, PlannerConfig, plan, sample_noise, warm_start
from edge_tdmpc.tasks import MT30

SMALL = dict(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=3)


def _noise(model, cfg, seed):
    return sample_noise(cfg, model.cfg.action_dim, model.cfg.num_q, torch.Generator().manual_seed(seed))


def _plan(model, noise, cfg, prev=None, t0=True, eval_mode=False, task=3):
    obs = torch.linspace(-1, 1, 24)
    prev = torch.zeros(cfg.horizon, 6) if prev is None else prev
    return plan(model, obs, task, prev, t0, noise, cfg, 0.99, eval_mode)


def test_plan_is_a_pure_function_of_its_noise(tiny_model):
    cfg = PlannerConfig(**SMALL)
    a1, m1, _ = _plan(tiny_model, _noise(tiny_model, cfg, 0), cfg)
    a2, m2, _ = _plan(tiny_model, _noise(tiny_model, cfg, 0), cfg)
    a3, _, _ = _plan(tiny_model, _noise(tiny_model, cfg, 1), cfg)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    assert not torch.equal(a1, a3)
    assert a1.shape == (6,) and m1.shape == (cfg.horizon, 6) and a1.abs().max() <= 1


def test_final_elite_is_a_gumbel_max_sample_of_the_scores(tiny_model):
    """The official agent samples the executed elite with probability `score` (Gumbel-max); it does not take
    the best one. Same noise but the Gumbel draw: the picks' frequencies follow the scores."""
    noise = sample_noise(PlannerConfig(), 6, 5, torch.Generator().manual_seed(0))
    assert torch.isfinite(noise.gumbel).all()
    g = torch.cat([_noise(tiny_model, PlannerConfig(), s).gumbel for s in range(300)])
    assert abs(g.mean() - 0.5772) < 0.05 and abs(g.std() - np.pi / 6 ** 0.5) < 0.05  # Gumbel(0, 1)
    cfg = PlannerConfig(**{**SMALL, "temperature": 0.02})  # flat scores: many elites are likely picks
    base = _noise(tiny_model, cfg, 0)
    picks, score = [], None
    for s in range(400):
        gumbel = _noise(tiny_model, cfg, 1000 + s).gumbel
        _, _, info = _plan(tiny_model, base._replace(gumbel=gumbel), cfg)
        picks.append(int(info["pick"]))
        score = info["score"] if score is None else score
        assert torch.equal(info["score"], score)  # the rest of the step is unchanged
    freq = np.bincount(picks, minlength=cfg.num_elites) / len(picks)
    assert len(set(picks)) > 3 and 0.5 * np.abs(freq - score.numpy()).sum() < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_model_plans_with_fp32_statistics(tiny_model, dtype):
    """An fp16/bf16 model runs its layers in that type; decoded values, actions and the MPPI statistics stay
    fp32 (as in the compiled graphs), so the step tracks the fp32 one on identical noise."""
    import copy
    cfg = PlannerConfig(**SMALL)
    noise = _noise(tiny_model, cfg, 0)
    noise = noise._replace(gumbel=torch.zeros_like(noise.gumbel))
    low = copy.deepcopy(tiny_model).to(dtype)
    a, mean, info = _plan(low, noise, cfg)
    ref, ref_mean, ref_info = _plan(tiny_model, noise, cfg)
    assert a.dtype == mean.dtype == info["score"].dtype == info["elite_value"].dtype == torch.float32
    z = low.encode(torch.zeros(1, 24), 3)
    assert z.dtype == dtype and low.reward(z, torch.zeros(1, 6), 3).dtype == dtype
    tol = 0.05 if dtype == torch.float16 else 0.3
    assert (info["elite_value"] - ref_info["elite_value"]).abs().max() < tol * ref_info["elite_value"].abs().max()


def test_agent_with_fixed_seed_repeats(tiny_model):
    def rollout(seed):
        agent = Agent(tiny_model, seed=seed, **SMALL)
        return torch.stack([agent.act(np.full(17, 0.1 * t, np.float32), t0=t == 0, task=3) for t in range(4)])
    assert torch.equal(rollout(5), rollout(5))
    assert not torch.equal(rollout(5), rollout(6))


def test_eval_mode_differs_only_by_final_noise(tiny_model):
    cfg = PlannerConfig(**SMALL)
    noise = _noise(tiny_model, cfg, 0)
    a_eval, m_eval, info = _plan(tiny_model, noise, cfg, eval_mode=True)
    a_stoch, m_stoch, _ = _plan(tiny_model, noise, cfg, eval_mode=False)
    assert torch.equal(m_eval, m_stoch)
    assert not torch.equal(a_eval, a_stoch)
    # the stochastic action is the eval action plus std[0] * noise, clamped
    assert torch.allclose(a_stoch, (a_eval + info["std"][0] * noise.action).clamp(-1, 1), atol=1e-6)
    a_zero, _, _ = _plan(tiny_model, noise._replace(action=torch.zeros(6)), cfg, eval_mode=False)
    assert torch.equal(a_zero, a_eval)


def test_warm_start_shifts_the_mean():
    prev = torch.arange(18.0).view(3, 6)
    shifted = warm_start(prev, False)
    assert torch.equal(shifted[:2], prev[1:]) and (shifted[2] == 0).all()
    assert (warm_start(prev, True) == 0).all()


def test_warm_start_used_only_after_t0(tiny_model):
    cfg = PlannerConfig(**SMALL)
    noise = _noise(tiny_model, cfg, 0)
    prev = torch.full((cfg.horizon, 6), 0.7)
    a_t0, _, _ = _plan(tiny_model, noise, cfg, prev=prev, t0=True)
    a_t0_zero, _, _ = _plan(tiny_model, noise, cfg, prev=torch.zeros_like(prev), t0=True)
    a_warm, _, _ = _plan(tiny_model, noise, cfg, prev=prev, t0=False)
    assert torch.equal(a_t0, a_t0_zero)
    assert not torch.equal(a_t0, a_warm)


def test_masked_dims_stay_zero(tiny_model):
    cfg = PlannerConfig(**SMALL)
    task = MT30.index("pendulum-swingup")
    a, mean, _ = _plan(tiny_model, _noise(tiny_model, cfg, 0), cfg, task=task, eval_mode=True)
    assert (a[1:] == 0).all() and (mean[:, 1:] == 0).all()


def test_policy_prior_mode(tiny_model):
    agent = Agent(tiny_model, seed=0, mpc=False)
    a_eval = agent.act(np.zeros(24, np.float32), t0=True, eval_mode=True, task=1)
    z = tiny_model.encode(torch.zeros(1, 24), 1)
    assert torch.allclose(a_eval, tiny_model.pi(z, 1)[1][0])


def test_bad_inputs(tiny_model):
    agent = Agent(tiny_model, **SMALL)
    with pytest.raises(ValueError, match="expects 24"):
        agent.act(np.zeros(7, np.float32), t0=True, task=3)  # cheetah obs is 17, not 7
    with pytest.raises(ValueError, match="pass task"):
        agent.act(np.zeros(24, np.float32), t0=True)
    with pytest.raises(ValueError, match="unknown planner setting"):
        Agent(tiny_model, num_sample=5)


def test_closed_loop_cartpole_balance_keeps_pole_up(student, one_thread):
    """Model, planner and env agree: planning on the real student beats a random policy by far."""
    from edge_tdmpc.envs import make_env
    task, steps = "cartpole-balance", 100
    env = make_env(task, seed=1)
    agent = Agent(student, seed=1)
    obs, _ = env.reset()
    ret = 0.0
    for t in range(steps):
        obs, r, *_ = env.step(agent.act(obs, t0=t == 0, task=MT30.index(task)).numpy()[:1])
        ret += r
    rng = np.random.default_rng(1)
    env = make_env(task, seed=1)
    env.reset()
    rand = sum(env.step(rng.uniform(-1, 1, 1).astype(np.float32))[1] for _ in range(steps))
    assert ret > 0.9 * steps * 2 * 0.9, (ret, rand)  # near the 2-per-step maximum of an upright pole
    assert ret > rand + 0.2 * steps, (ret, rand)
