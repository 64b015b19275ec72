"""edge_tdmpc.envs: parity with the official TD-MPC2 envs, episodes, custom rewards, multitask padding."""
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from dm_control import suite
from dm_control.suite.wrappers import action_scale

from edge_tdmpc.envs import DMC_DIMS, MT30, MT30_ACTION_DIM, MT30_OBS_DIM, TASK_DIMS, make_env
from edge_tdmpc.tasks import MT30_DIMS

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "parity"


@pytest.fixture(scope="module")
def parity():
    if not (PARITY / "official-seed1.npz").exists():
        pytest.skip(f"official parity data not found in {PARITY} (the shared/ folder beside the repository)")
    meta = json.loads((PARITY / "official-seed1.json").read_text())
    return meta, np.load(PARITY / "official-seed1.npz")


def _replay(env, actions):
    obs, _ = env.reset()
    observations, rewards = [obs], []
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(a)
        assert not terminated and not truncated
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards)


@pytest.mark.parametrize("task", MT30)
def test_parity_with_official(parity, task):
    _, data = parity
    observations, rewards = _replay(make_env(task, seed=1), data[f"env/{task}/actions"])
    np.testing.assert_allclose(observations, data[f"env/{task}/obs"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rewards, data[f"env/{task}/rewards"], rtol=0, atol=1e-6)


def test_task_order_and_dims_match_official(parity):
    meta, _ = parity
    official = meta["tasks"]
    assert list(MT30) == sorted(official, key=lambda t: official[t]["index"])
    assert {t: (v["obs_dim"], v["action_dim"]) for t, v in official.items()} == dict(MT30_DIMS)


def test_reset_seed_reproduces_construction_seed(parity):
    _, data = parity
    env = make_env("cup-spin", seed=0)
    env.reset()
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(obs, data["env/cup-spin/obs"][0])
    next_obs, _ = env.reset()  # the next episode continues the seeded stream
    assert not np.array_equal(next_obs, obs)


@pytest.mark.parametrize("task", MT30)
def test_full_episode(task):
    env = make_env(task, seed=0)
    assert isinstance(env, gym.Env)
    obs_dim, action_dim = TASK_DIMS[task]
    assert (env.obs_dim, env.action_dim, env.task_index) == (obs_dim, action_dim, MT30.index(task))
    assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (action_dim,)
    assert env.dm_env.action_spec().shape == (action_dim,)
    obs, _ = env.reset()
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    rng = np.random.default_rng(0)
    for t in range(1, env.max_episode_steps + 1):
        obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, action_dim).astype(np.float32))
        assert not terminated and truncated == (t == 500)
        assert 0 <= reward <= 2 and np.isfinite(obs).all()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(action_dim))


# The stock tasks outside MT30 have no official recordings: the official wrapper on them is dm_control's
# suite.load seeded with `random`, actions rescaled from [-1, 1] and repeated twice with summed rewards, the
# observation dict flattened in spec order; that construction, written out here, is their reference.
OFFICIAL_DOMAINS = {"pointmass": "point_mass"}


def _official_dmc(task, seed, actions):
    domain, name = task.replace("-", "_").split("_", 1)
    env = action_scale.Wrapper(suite.load(OFFICIAL_DOMAINS.get(domain, domain), name, task_kwargs={"random": seed}),
                               minimum=-1.0, maximum=1.0)
    flat = lambda ts: np.concatenate([np.asarray(v).ravel() for v in ts.observation.values()])  # noqa: E731
    ts = env.reset()
    observations, rewards = [flat(ts)], []
    for a in actions:
        r = 0.0
        for _ in range(2):
            ts = env.step(a)
            r += ts.reward
        observations.append(flat(ts))
        rewards.append(r)
    return np.array(observations, np.float32), np.array(rewards), ts.last()


@pytest.mark.parametrize("task", DMC_DIMS)
def test_dmc_tasks_match_the_official_construction(task):
    obs_dim, action_dim = DMC_DIMS[task]
    actions = np.random.default_rng(7).uniform(-1, 1, (500, action_dim)).astype(np.float32)
    ref_obs, ref_rewards, last = _official_dmc(task, 2, actions)
    env = make_env(task, seed=2)
    assert (env.obs_dim, env.action_dim, env.task_index) == (obs_dim, action_dim, None) and task not in MT30
    obs, _ = env.reset()
    observations, rewards = [obs], []
    for t, a in enumerate(actions, 1):
        obs, reward, terminated, truncated, _ = env.step(a)
        assert not terminated and truncated == (t == 500)
        observations.append(obs)
        rewards.append(reward)
    assert last  # dm_control's own time limit ends where the wrapper truncates: 1000 control steps
    np.testing.assert_array_equal(np.array(observations), ref_obs)
    np.testing.assert_array_equal(np.array(rewards), ref_rewards)
    padded = make_env(task, seed=2, multitask=True)
    assert padded.reset()[0].shape == (MT30_OBS_DIM,) and padded.action_space.shape == (MT30_ACTION_DIM,)


def test_stock_suite_registry_untouched():
    make_env("walker-walk-backwards")
    assert ("walker", "walk_backwards") not in suite.ALL_TASKS
    assert "spin" not in suite.ball_in_cup.SUITE


def test_multitask_padding():
    env = make_env("pendulum-spin", seed=3, multitask=True)
    plain = make_env("pendulum-spin", seed=3)
    assert (env.task_index, env.obs_dim, env.action_dim) == (29, 3, 1)
    assert env.observation_space.shape == (MT30_OBS_DIM,) and env.action_space.shape == (MT30_ACTION_DIM,)
    obs, _ = env.reset()
    ref, _ = plain.reset()
    assert obs.shape == (24,) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[:3], ref)
    assert not obs[3:].any()
    action = np.array([0.5, -1, 1, 1, 1, 1], np.float32)  # extra entries must be ignored
    obs, reward, *_ = env.step(action)
    ref, ref_reward, *_ = plain.step(action[:1])
    np.testing.assert_array_equal(obs[:3], ref)
    assert reward == ref_reward and not obs[3:].any()
    # a model of a smaller task set pads to its own dims; a task that does not fit is refused
    small = make_env("pendulum-spin", seed=3, multitask=True, pad_to=(5, 1))
    assert small.reset()[0].shape == (5,) and small.action_space.shape == (1,)
    with pytest.raises(ValueError, match="cannot be padded"):
        make_env("cheetah-run", multitask=True, pad_to=(5, 1))


def test_unknown_task_names_close_match():
    with pytest.raises(ValueError) as err:
        make_env("cheetah-run-backward")
    message = str(err.value)
    assert "cheetah-run-backward" in message and "cheetah-run-backwards" in message
    assert "edge_tdmpc.tasks.TASK_DIMS" in message and "\n" not in message


# --- custom rewards respond to their goals: set the state directly, then read the task's reward ---

def _reward(env, qpos=None, qvel=None):
    physics = env.physics
    with physics.reset_context():
        for name, value in (qpos or {}).items():
            physics.named.data.qpos[name] = value
        for name, value in (qvel or {}).items():
            physics.named.data.qvel[name] = value
    return env.dm_env.task.get_reward(physics)


def _env(task):
    env = make_env(task, seed=0)
    env.reset()
    return env


def test_walker_backwards_rewards_moving_backwards():
    walk, run = _env("walker-walk-backwards"), _env("walker-run-backwards")
    assert _reward(walk, qvel={"rootx": -1.0}) == pytest.approx(1)  # upright at full height, backwards
    assert _reward(walk, qvel={"rootx": 1.0}) == pytest.approx(1 / 6)  # standing only
    assert _reward(run, qvel={"rootx": -8.0}) == pytest.approx(1)
    assert _reward(run, qvel={"rootx": -4.0}) == pytest.approx((5 * 0.5 + 1) / 6)  # at the margin: move = 0.5
    assert _reward(walk, qpos={"rootz": -1.0}, qvel={"rootx": -1.0}) < 0.5  # fallen: torso too low


def test_walker_floor_is_twice_as_long():
    assert _env("walker-run-backwards").physics.named.model.geom_size["floor", 0] == 500
    assert _env("cheetah-run-backwards").physics.named.model.geom_size["ground", 0] == 200


def test_cheetah_run_backwards_rewards_backward_speed():
    env = _env("cheetah-run-backwards")
    assert _reward(env, qvel={"rootx": -10.0}) == pytest.approx(1)
    assert _reward(env, qvel={"rootx": -4.0}) == pytest.approx(0.5)
    assert _reward(env, qvel={"rootx": 10.0}) == 0


def test_cheetah_run_front_and_back_reward_the_raised_end():
    front, back = _env("cheetah-run-front"), _env("cheetah-run-back")
    lifted = {"rootz": 2.0}  # torso and both feet far above 1.2
    assert _reward(front, lifted, {"rootx": 6.0}) == pytest.approx(1)
    assert _reward(front, lifted, {"rootx": 0.0}) == pytest.approx(1 / 6)
    assert _reward(back, lifted, {"rootx": -6.0}) == pytest.approx(1 / 6)
    # Pitch the body so one end is up; that end's task must pay more than the other's.
    for pitch in (-1.0, 1.0):
        r_front, r_back = _reward(front, {"rooty": pitch}), _reward(back, {"rooty": pitch})
        feet_z = front.physics.named.data.xpos[["bfoot", "ffoot"], "z"]
        assert abs(feet_z[0] - feet_z[1]) > 0.5
        assert (r_front > r_back) == (feet_z[0] > feet_z[1])


def test_cheetah_jump_rewards_height_while_still():
    env = _env("cheetah-jump")
    assert _reward(env, {"rootz": 2.0}) == pytest.approx(1)
    assert _reward(env, {"rootz": 2.0}, {"rootx": 3.0}) == pytest.approx(5 / 6)
    assert _reward(env) < 0.25  # at rest on the ground: little more than the stillness term (1/6)


def test_hopper_hop_backwards():
    env = _env("hopper-hop-backwards")
    assert _reward(env, qvel={"rootx": -1.0}) == pytest.approx(1)  # upright with straight legs: standing
    assert _reward(env, qvel={"rootx": -0.5}) == pytest.approx(0.5)  # at the margin
    assert _reward(env, qvel={"rootx": 1.0}) == 0


def test_reacher_three_links():
    easy, hard = _env("reacher-three-easy"), _env("reacher-three-hard")
    model = easy.physics.named.model
    assert list(model.jnt_range.axes.row.names) == ["shoulder0", "shoulder1", "wrist"]
    np.testing.assert_allclose(model.jnt_range[["shoulder1", "wrist"]], np.deg2rad([[-80, 80]] * 2))
    assert model.geom_size["target", 0] == 0.05 and hard.physics.named.model.geom_size["target", 0] == 0.015
    for env in (easy, hard):
        physics = env.physics
        with physics.reset_context():
            physics.named.data.qpos[:] = 0
        np.testing.assert_allclose(physics.named.data.geom_xpos["finger", :2], [0.27, 0], atol=1e-12)
        physics.named.model.geom_pos["target", :2] = [0.27, 0.0]
        assert _reward(env) == 1
        physics.named.model.geom_pos["target", :2] = [0.0, 0.2]
        assert _reward(env) == 0


def test_cup_spin_rewards_fast_ball_outside_cup():
    env = _env("cup-spin")
    in_cup = {"ball_x": 0.0, "ball_z": 0.35}  # the ball slides from z=0.2; the cup target is centred at 0.55
    assert _reward(env, in_cup, {"ball_x": 8.0}) == 0
    fast = _reward(env, {"ball_x": 0.0, "ball_z": 0.0}, {"ball_x": 6.0, "ball_z": 1.0})
    still = _reward(env, {"ball_x": 0.0, "ball_z": 0.0})
    assert fast > 0.8 and 0 < still < 1 / 3


def test_cup_spin_starts_in_cup_unless_first_draw_below_0_1():
    # The episode's first random draw decides whether a start outside the cup is allowed (10%).
    allowed_out = {s: np.random.RandomState(s).uniform() < 0.1 for s in range(30)}
    assert 0 < sum(allowed_out.values()) < 30
    starts = {}
    for seed in allowed_out:
        env = make_env("cup-spin", seed=seed)
        env.reset()
        starts[seed] = env.physics.in_target()
        assert env.physics.data.ncon == 0
    assert all(starts[s] == 1 for s, out in allowed_out.items() if not out)
    assert any(starts[s] == 0 for s, out in allowed_out.items() if out)


def test_pendulum_spin_rewards_angular_speed():
    env = _env("pendulum-spin")
    assert _reward(env, qvel={"hinge": 9.0}) == pytest.approx(1)
    assert _reward(env, qvel={"hinge": -12.0}) == pytest.approx(1)
    assert _reward(env, qvel={"hinge": 4.5}) == pytest.approx(0.5)
    assert _reward(env, qvel={"hinge": 0.0}) == 0


@pytest.mark.parametrize("preset", [None, "glfw"])
def test_headless_by_default_and_a_chosen_renderer_is_kept(preset):
    """Without MUJOCO_GL the envs need no display and print no GLFW warning; a renderer the user names stays."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY")}
    if preset:
        env["MUJOCO_GL"] = preset
    code = ("import os; from edge_tdmpc.envs import make_env; make_env('walker-walk').reset(seed=1); "
            "print(os.environ['MUJOCO_GL'])")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (preset or "disable")
    if preset is None:
        assert "GLFW" not in r.stderr and "display" not in r.stderr.lower(), r.stderr
