"""Closed-loop evaluation with the official protocol: act(obs, t0=(t==0), task=i), 500 steps, score = return/10."""
import numpy as np
from tqdm import tqdm

from edge_tdmpc.checkpoint import load_model
from edge_tdmpc.planner import Agent
from edge_tdmpc.tasks import resolve_tasks


def run_episode(agent: Agent, task: str, task_index: int | None, seed: int, eval_mode=False, steps=500,
                pbar=None, episode=0) -> float:
    from edge_tdmpc.envs import episode_env
    env, obs = episode_env(task, seed, episode)  # the official evaluation's initial state
    ret = 0.0
    for t in range(steps):
        action = agent.act(obs, t0=t == 0, eval_mode=eval_mode, task=task_index).numpy()
        obs, reward, terminated, truncated, _ = env.step(action[: env.action_dim])
        ret += reward
        if pbar is not None:
            pbar.update(1)
        if terminated or truncated:
            break
    env.close()
    return ret


def evaluate(checkpoint, tasks="mt30", episodes=1, seed=1, eval_mode=False, mpc=True, steps=500, echo=print):
    model = load_model(checkpoint)
    tasks = resolve_tasks(tasks)
    for t in tasks:
        if t not in model.cfg.tasks:
            raise ValueError(f"task '{t}' is not in this checkpoint's task set ({len(model.cfg.tasks)} tasks)")
    scores = {}
    with tqdm(total=len(tasks) * episodes * steps, unit="step", desc="eval") as pbar:
        for task in tasks:
            i = model.cfg.tasks.index(task) if model.cfg.multitask else None
            rets = []
            for ep in range(episodes):
                agent = Agent(model, seed=seed + ep, mpc=mpc)
                rets.append(run_episode(agent, task, i, seed, eval_mode, steps, pbar, episode=ep))
            scores[task] = (rets, float(np.mean(rets)) / 10)
    for task, (rets, score) in scores.items():
        echo(f"{task:<26} return {np.mean(rets):8.1f}  score {score:6.2f}  ({', '.join(f'{r:.1f}' for r in rets)})")
    echo(f"{'mean score':<26} {np.mean([s for _, s in scores.values()]):.2f} over {len(scores)} task(s)")
    return scores
