"""A model for a subset of its tasks: `subset_model(model, tasks)`.

The subset keeps the task-embedding rows of its tasks, and its observation and action dims are the largest of
its tasks' own (a walker-only model takes 24/6, a cartpole-only one 5/1). A multi-task model zero-pads every
task's observation and action to its own dims, and the padded inputs multiply first-layer columns that then
contribute nothing: cutting those columns (and the policy's outputs for the cut action dims) gives a smaller
model whose outputs on its tasks equal the original's (latents, values, rewards and dynamics bit for bit; the
policy's last layer, a GEMM of another shape, to float rounding). The policy's log-probability differs by a
constant: the official one counts -log(2 pi)/2 for every padded dim too. That is the start of a subset student
(`distill --tasks LIST --init teacher`).
"""
from dataclasses import replace

import torch

from edge_tdmpc.model import WorldModel
from edge_tdmpc.tasks import TASK_DIMS, check_task_subset, resolve_tasks, unknown_task


def subset_config(cfg, tasks):
    """The config of `cfg` for `tasks` (names in cfg.tasks; at least two: a multi-task model)."""
    tasks = tuple(resolve_tasks(tasks) if isinstance(tasks, str) else tasks)
    check_task_subset(tasks, cfg.tasks, "the model")
    if len(tasks) < 2 or not cfg.multitask:
        raise ValueError("a subset student needs a multi-task model and at least two of its tasks")
    rows = [cfg.tasks.index(t) for t in tasks]
    dims = [TASK_DIMS.get(t, (cfg.obs_dim, cfg.action_dims[i])) for t, i in zip(tasks, rows, strict=True)]
    return replace(cfg, tasks=tasks, obs_dim=max(d[0] for d in dims), action_dim=max(d[1] for d in dims),
                   action_dims=tuple(cfg.action_dims[i] for i in rows),
                   episode_lengths=tuple(cfg.episode_lengths[i] for i in rows) if cfg.episode_lengths else (),
                   size=None), rows


def subset_model(model: WorldModel, tasks) -> WorldModel:
    """`model` restricted to `tasks`: their embedding rows, the input columns and policy outputs their dims keep."""
    c = model.cfg
    cfg, rows = subset_config(c, tasks)
    out = WorldModel(cfg).to(next(model.parameters()).device)
    sd = model.state_dict()
    z, e, O, A, a = c.latent_dim, c.task_dim, cfg.obs_dim, c.action_dim, cfg.action_dim
    keep_obs = [*range(O), *range(c.obs_dim, c.obs_dim + e)]                  # [obs, e] -> [obs', e]
    keep_za = [*range(z + e), *range(z + e, z + e + a)]                      # [z, e, a] -> [z, e, a']
    keep_pi = [*range(a), *range(A, A + a)]                                  # [mean, log_std] -> first a of each
    new = {}
    for k, v in sd.items():
        if k == "_task_emb.weight":
            v = v[rows]
        elif k == "_action_masks":
            v = v[rows][:, :a]
        elif k == "_encoder.state.0.weight":
            v = v[:, keep_obs]
        elif k in ("_dynamics.0.weight", "_reward.0.weight"):
            v = v[:, keep_za]
        elif k.endswith("Qs.params.0.weight"):
            v = v[:, :, keep_za]
        elif k in ("_pi.2.weight", "_pi.2.bias"):
            v = v[keep_pi]
        new[k] = v.clone()
    out.load_state_dict(new)
    return out.train(model.training).requires_grad_(any(p.requires_grad for p in model.parameters()))


def add_task(model: WorldModel, task: str, init_from: str | None = None) -> WorldModel:
    """`model` with one more task, `task`: its embedding row starts as `init_from`'s (a task of the model), its
    action mask and discount are its own, every other weight is the model's, so the old tasks' outputs stay bit
    for bit what they were. The task must fit the model's observation and action dims."""
    from edge_tdmpc.tasks import EPISODE_LENGTH
    c = model.cfg
    if not c.multitask:
        raise ValueError("adding a task needs a multi-task model (a task embedding to extend)")
    if task in c.tasks:
        raise ValueError(f"task {task!r} is already one of the model's {len(c.tasks)} tasks")
    if task not in TASK_DIMS:
        raise unknown_task(task)
    O, A = TASK_DIMS[task]
    if O > c.obs_dim or A > c.action_dim:
        raise ValueError(f"{task} has {O} observations and {A} actions; the model takes at most {c.obs_dim} and "
                         f"{c.action_dim}: pick a task that fits, or a model with larger dims")
    if init_from is None:
        raise ValueError("name the task whose embedding the new one starts from (init_from), e.g. the one "
                         "`most_similar_task` finds")
    if init_from not in c.tasks:
        raise ValueError(f"init_from {init_from!r} is not one of the model's tasks")
    cfg = replace(c, tasks=(*c.tasks, task), action_dims=(*c.action_dims, A),
                  episode_lengths=(*c.episode_lengths, EPISODE_LENGTH) if c.episode_lengths else ())
    out = WorldModel(cfg).to(next(model.parameters()).device)
    sd = dict(model.state_dict())
    emb = sd["_task_emb.weight"]
    sd["_task_emb.weight"] = torch.cat([emb, emb[c.tasks.index(init_from)][None]])
    mask = torch.zeros(1, c.action_dim, dtype=sd["_action_masks"].dtype)
    mask[0, :A] = 1
    sd["_action_masks"] = torch.cat([sd["_action_masks"], mask])
    out.load_state_dict({k: v.clone() for k, v in sd.items()})
    return out.train(model.training)


@torch.no_grad()
def most_similar_task(model: WorldModel, episodes, consistency_coef=20.0, reward_coef=0.1) -> list[tuple[str, float]]:
    """The model's tasks ranked by TD-MPC2's own world-model loss (one-step latent consistency and reward
    cross-entropy, with its coefficients) on a little data of a new task, read through each task's embedding ->
    [(task, loss)], best first. It is the loss fine-tuning then minimises, so the best start has the least to
    learn; the dynamics term is what separates tasks where the reward alone cannot (random actions on a sparse
    task see reward 0 throughout, which every reward head predicts). `episodes`: (obs [T+1, O], action [T, A],
    reward [T]) each, padded to the model's dims."""
    from edge_tdmpc.model import soft_ce
    c = model.cfg
    obs = torch.cat([torch.as_tensor(o[:-1], dtype=torch.float32) for o, _, _ in episodes])
    nxt = torch.cat([torch.as_tensor(o[1:], dtype=torch.float32) for o, _, _ in episodes])
    action = torch.cat([torch.as_tensor(a, dtype=torch.float32) for _, a, _ in episodes])
    reward = torch.cat([torch.as_tensor(r, dtype=torch.float32).reshape(-1, 1) for _, _, r in episodes])
    out = []
    for i, name in enumerate(c.tasks):
        t = torch.full((len(obs),), i)
        z = model.encode(obs, t)
        consistency = (model.next(z, action, t) - model.encode(nxt, t)).pow(2).mean()
        rew = soft_ce(model.reward(z, action, t), reward, c.num_bins, c.vmin, c.vmax).mean()
        out.append((name, float(consistency_coef * consistency + reward_coef * rew)))
    return sorted(out, key=lambda x: x[1])
