"""Planning inputs recorded from real closed-loop episodes: INT8 calibration data and verification inputs.

A recording is a dict of stacked arrays, one row per control step, keyed by the planning graph's input names
(obs, task, prev_mean, t0, noise_*), so any row can be fed to any artifact and to the torch reference.
"""
import numpy as np
import torch
from tqdm import tqdm

from edge_tdmpc.model import WorldModel
from edge_tdmpc.planner import Noise, PlannerConfig, plan, policy_action, sample_noise
from edge_tdmpc.rollout import run

# one task per domain first: calibration should see every body the model controls
CALIB_TASKS = ("walker-walk", "cheetah-run", "cartpole-swingup", "reacher-easy", "hopper-stand", "finger-spin",
               "cup-catch", "fish-swim", "acrobot-swingup", "pendulum-swingup", "reacher-three-easy", "walker-run")


def noise_feed(noise: Noise) -> dict[str, np.ndarray]:
    """Noise (torch tensors or numpy arrays) -> the graph's noise_* inputs."""
    n = Noise(*(np.asarray(t.detach().cpu() if torch.is_tensor(t) else t) for t in noise))
    return {"noise_pi": n.pi, "noise_sample": n.sample, "noise_q_idx": n.q_idx.astype(np.int64),
            "noise_q_pi": n.q_pi, "noise_gumbel": n.gumbel, "noise_action": n.action}


def step_feed(obs, task, prev_mean, t0, noise: Noise) -> dict[str, np.ndarray]:
    """One planning step's inputs as graph feeds (float32, int64 task)."""
    return {"obs": np.asarray(obs, np.float32), "task": np.array([task or 0], np.int64),
            "prev_mean": np.asarray(prev_mean, np.float32), "t0": np.array([float(t0)], np.float32),
            **noise_feed(noise)}


def feed_to_torch(feed: dict) -> tuple:
    """Graph feeds -> the arguments of `planner.plan` (obs, task, prev_mean, t0, noise)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
    noise = Noise(t["noise_pi"], t["noise_sample"], t["noise_q_idx"].long(), t["noise_q_pi"], t["noise_gumbel"],
                  t["noise_action"])
    return t["obs"], int(t["task"][0]), t["prev_mean"], bool(t["t0"][0] > 0.5), noise


def reference_step(model: WorldModel, feed: dict, cfg: PlannerConfig) -> dict[str, np.ndarray]:
    """The torch fp32 reference on one feed -> {action, mean, value, z}: `planner.plan`, or with mpc=False
    `planner.policy_action` (action sampled with noise_action, mean = the deterministic policy action)."""
    obs, task, prev_mean, t0, noise = feed_to_torch(feed)
    task = task if model.cfg.multitask else None
    with torch.no_grad():
        z = model.encode(obs.reshape(1, -1), task)[0].numpy()
    if not cfg.mpc:
        return {"action": policy_action(model, obs, task, noise.action).numpy(),
                "mean": policy_action(model, obs, task, noise.action, eval_mode=True).numpy(), "z": z}
    gamma = model.cfg.discounts[task or 0]
    action, mean, info = plan(model, obs, task, prev_mean, t0, noise, cfg, gamma)
    return {"action": action.numpy(), "mean": mean.numpy(), "value": info["value"].reshape(1).numpy(), "z": z,
            **runner_up(info, noise)}


RUNNER_UP = ("action_alt", "tie_gap")  # what `runner_up` adds to a reference step: no graph outputs these


def runner_up(info: dict, noise: Noise) -> dict[str, np.ndarray]:
    """The step as executed with the best elite other than the one picked -> {action_alt, tie_gap}: its action,
    and the picked elite's lead in value relative to max(|value|, 1). Where another runtime's value differs by
    more than that lead, it may rightly pick the runner-up (`verify.compare`)."""
    value = info["elite_value"].reshape(-1).double()
    if len(value) < 2:
        return {}
    pick = int(info["pick"])
    others = info["score"].reshape(-1).clone()
    others[pick] = -1.0
    alt = int(torch.argmax(others))
    action = (info["elite_first"][alt] + info["std"][0] * noise.action).clamp(-1, 1)
    gap = (value[pick] - value[alt]).abs() / value[pick].abs().clamp(min=1.0)
    return dict(zip(RUNNER_UP, (action.numpy(), gap.reshape(1).float().numpy()), strict=True))


def record(model: WorldModel, cfg: PlannerConfig, tasks, steps: int, seed: int = 0, step_fn=None,
           progress: str | None = None) -> dict:
    """Run one short episode per task with the MPPI planner; return every step's planning inputs, stacked.

    `step_fn(feed) -> (action, next mean)` plans one step (default: the torch reference; compile passes its
    verified fp32 ONNX session, 2-3x faster). Noise is drawn as `planner.Agent` draws it. `progress`: a progress
    bar's label (None: no bar).
    """
    from edge_tdmpc.envs import make_env
    rows = []
    bar = tqdm(total=len(tasks) * steps, unit="step", desc=progress, disable=progress is None)
    for k, task in enumerate(tasks):
        if task not in model.cfg.tasks:
            raise ValueError(f"task '{task}' is not in this model's task set; pick calibration tasks it was trained on")
        index = model.cfg.tasks.index(task) if model.cfg.multitask else None
        env = make_env(task, seed=seed + k, multitask=model.cfg.multitask,
                       pad_to=(model.cfg.obs_dim, model.cfg.action_dim))
        obs, _ = env.reset()
        run(env, obs, _recording_actor(model, cfg, index, torch.Generator().manual_seed(seed + k), rows, step_fn),
            steps, on_step=lambda *_: bar.update(1))
    bar.close()
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _recording_actor(model, cfg, index, gen, rows: list, step_fn):
    """act(obs, t) that plans with step_fn (or the reference) on noise drawn as `planner.Agent` draws it,
    keeps the warm start, and appends each step's planning inputs to `rows`."""
    prev_mean = np.zeros((cfg.horizon, model.cfg.action_dim), np.float32)

    def act(obs, t):
        nonlocal prev_mean
        feed = step_feed(obs, index, prev_mean, t == 0, sample_noise(cfg, model.cfg.action_dim, model.cfg.num_q, gen))
        rows.append(feed)
        if step_fn is None:
            out = reference_step(model, feed, cfg)
            action, mean = out["action"], out["mean"]
        else:
            action, mean = step_fn(feed)
        if cfg.mpc:  # the warm start; the policy prior alone has none
            prev_mean = mean
        return action
    return act


def rows(recording: dict):
    """Iterate a recording one step (dict of arrays) at a time."""
    n = len(next(iter(recording.values())))
    for i in range(n):
        yield {k: v[i] for k, v in recording.items()}
