"""Closed-loop evaluation with the official protocol (`rollout.evaluation_episode`): 500 steps, score = return/10."""
import numpy as np
from tqdm import tqdm

from edge_tdmpc.checkpoint import load_model
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.rollout import evaluation_episode
from edge_tdmpc.runtime import TorchRuntime
from edge_tdmpc.tasks import resolve_tasks


def evaluate(checkpoint, tasks=None, episodes=1, seed=1, eval_mode=False, mpc=True, steps=500, echo=print):
    """Per-task returns and scores of CHECKPOINT on the torch fp32 runtime; the episodes `edge-tdmpc bench` runs
    for the same seed."""
    for name, v in (("episodes", episodes), ("steps", steps)):
        if not v >= 1:
            raise ValueError(f"--{name} must be at least 1, got {v}: a run that does nothing is no result")
    tasks = None if tasks is None else resolve_tasks(tasks)
    if tasks is not None and not tasks:
        raise ValueError("no tasks given: pass --tasks mt30 or comma-separated task names")
    model = load_model(checkpoint)
    tasks = list(model.cfg.tasks) if tasks is None else tasks
    for t in tasks:
        if t not in model.cfg.tasks:
            raise ValueError(f"task '{t}' is not in this checkpoint's task set ({len(model.cfg.tasks)} tasks)")
    scores = {}
    runtime = TorchRuntime(model, "fp32", PlannerConfig(mpc=mpc))
    with tqdm(total=len(tasks) * episodes * steps, unit="step", desc="eval") as pbar:
        for task in tasks:
            rets = [evaluation_episode(runtime, model.cfg, task, seed, ep, steps, eval_mode,
                                       on_step=lambda *_: pbar.update(1))[0].ret for ep in range(episodes)]
            scores[task] = (rets, float(np.mean(rets)) / 10)
    for task, (rets, score) in scores.items():
        echo(f"{task:<26} return {np.mean(rets):8.1f}  score {score:6.2f}  ({', '.join(f'{r:.1f}' for r in rets)})")
    echo(f"{'mean score':<26} {np.mean([s for _, s in scores.values()]):.2f} over {len(scores)} task(s)")
    return scores
