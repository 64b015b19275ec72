"""Subset students: a model restricted to some of its tasks gives its outputs on them (latents, values, rewards and
dynamics exactly; the policy to float rounding); files name their
task set and every loader takes it; `distill --tasks`."""
import json

import numpy as np
import pytest
import torch
from helpers import CHECKPOINTS, make_tiny_model

from edge_tdmpc import load_model, save_model
from edge_tdmpc.checkpoint import CheckpointError
from edge_tdmpc.tasks import MT30_DIMS
from edge_tdmpc.tasksets import subset_model

CARTPOLE = ("cartpole-balance", "cartpole-balance-sparse", "cartpole-swingup", "cartpole-swingup-sparse")
WALKER = ("walker-stand", "walker-walk", "walker-run", "walker-walk-backwards", "walker-run-backwards")


def _outputs(model, tasks, names, obs, act, eps):
    """encode, policy (action, mean, log_std), Q logits, reward logits, next latent on each task of `names`."""
    out = {}
    with torch.no_grad():
        for name in names:
            t = torch.full((len(obs),), tasks.index(name))
            O, A = model.cfg.obs_dim, model.cfg.action_dim
            z = model.encode(obs[:, :O], t)
            action, info = model.pi_info(z, t, eps=eps[:, :A])
            a = act[:, :A]
            out[name] = dict(z=z, action=action, mean=info["mean"], log_std=info["log_std"],
                             q=model.Q(z, a, t, "all"), reward=model.reward(z, a, t), next=model.next(z, a, t))
    return out


@pytest.mark.parametrize("names", [CARTPOLE, WALKER, ("cartpole-swingup", "walker-run", "reacher-easy")])
def test_subset_model_gives_the_models_outputs_exactly(names):
    model = make_tiny_model("mt30", seed=2)
    sub = subset_model(model, names)
    dims = [MT30_DIMS[t] for t in names]
    assert (sub.cfg.obs_dim, sub.cfg.action_dim) == (max(d[0] for d in dims), max(d[1] for d in dims))
    assert sub.cfg.tasks == names and sub._task_emb.weight.shape[0] == len(names)
    g = torch.Generator().manual_seed(0)
    for name in names:
        O, A = MT30_DIMS[name]
        obs, act, eps = torch.zeros(9, 24), torch.zeros(9, 6), torch.zeros(9, 6)
        obs[:, :O], act[:, :A], eps[:, :A] = torch.randn(9, O, generator=g), torch.rand(9, A, generator=g), \
            torch.randn(9, A, generator=g)
        full = _outputs(model, model.cfg.tasks, [name], obs, act, eps)[name]
        cut = _outputs(sub, names, [name], obs, act, eps)[name]
        a = sub.cfg.action_dim
        same_shapes = (sub.cfg.obs_dim, sub.cfg.action_dim) == (model.cfg.obs_dim, model.cfg.action_dim)
        for k in ("z", "q", "reward", "next"):
            if same_shapes:  # the same GEMMs over the same numbers: bit for bit
                assert torch.equal(full[k], cut[k]), (name, k)
            else:  # fewer input columns (the padded zeros dropped): another GEMM shape, which some CPUs' kernels
                # sum in another order, so the same sums up to rounding
                torch.testing.assert_close(full[k], cut[k], atol=1e-6, rtol=1e-6), (name, k)
        for k in ("action", "mean", "log_std"):  # the cut action dims are the padded ones: 0 in the model
            # the policy's last layer has fewer outputs: another GEMM shape, the same sums up to rounding
            torch.testing.assert_close(full[k][:, :a], cut[k], atol=1e-6, rtol=0), (name, k)
            assert not full[k][:, a:].any(), (name, k)
    assert sum(p.numel() for p in sub.parameters()) <= sum(p.numel() for p in model.parameters())


def test_bad_subsets_are_one_line_errors():
    model = make_tiny_model("mt30")
    for tasks, message in ((("walker-walk", "dog-run"), "not in the model's task set"),
                           (("walker-walk", "walker-walk"), "duplicate task"), (("walker-walk",), "at least two")):
        with pytest.raises(ValueError, match=message):
            subset_model(model, tasks)


def test_files_name_their_task_set_and_loaders_take_it(tmp_path):
    sub = subset_model(make_tiny_model("mt30"), CARTPOLE)
    save_model(sub, tmp_path / "s.pt")
    again = load_model(tmp_path / "s.pt")  # no task set named: the file's
    assert again.cfg.tasks == CARTPOLE and (again.cfg.obs_dim, again.cfg.action_dim) == (5, 1)
    for k, v in sub.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="model of 4 task"):
        load_model(tmp_path / "s.pt", tasks="mt30")
    assert load_model(tmp_path / "s.pt", tasks=",".join(CARTPOLE)).cfg.tasks == CARTPOLE
    # bench with no --tasks runs the file's own task set (a cartpole student has no walker-stand to run)
    from click.testing import CliRunner

    from edge_tdmpc.cli import main
    r = CliRunner().invoke(main, ["bench", "run", str(tmp_path / "s.pt"), "--no-mpc", "--episodes", "1", "--steps", "3",
                                  "--warmup", "0", "--workers", "0", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b" / "report.json").read_text())["rows"]
    assert [row["task"] for row in rows] == list(CARTPOLE)


@pytest.mark.skipif(not (CHECKPOINTS / "mt30-1M-distilled-fp16.pt").exists(), reason="needs ../shared checkpoints")
def test_official_files_still_load_as_mt30():
    assert len(load_model(CHECKPOINTS / "mt30-1M-distilled-fp16.pt").cfg.tasks) == 30


def test_distill_tasks_makes_a_subset_student_from_the_teacher(tmp_path):
    from edge_tdmpc.distill.data import EpisodeWriter
    from edge_tdmpc.distill.offline import distill
    teacher = make_tiny_model("mt30", seed=4)
    save_model(teacher, tmp_path / "t.pt")
    rng = np.random.default_rng(0)
    with EpisodeWriter(tmp_path / "data", 24, 6, teacher.cfg.tasks) as w:
        for e, name in enumerate(("cartpole-swingup", "walker-walk", "cartpole-balance", "cheetah-run")):
            O, A = MT30_DIMS[name]
            w.add(rng.normal(size=(21, O)), rng.uniform(-1, 1, (20, A)), rng.uniform(0, 1, 20),
                  task=teacher.cfg.tasks.index(name), key=e)
    distill(tmp_path / "data", tmp_path / "run", teacher=tmp_path / "t.pt", tasks="cartpole-swingup,cartpole-balance",
            init="teacher", distill="reward", steps=2, batch_size=8, save_every=2, log_every=1, progress=False,
            echo=lambda *a: None)
    student = load_model(tmp_path / "run" / "student.pt")
    assert student.cfg.tasks == ("cartpole-swingup", "cartpole-balance")
    assert (student.cfg.obs_dim, student.cfg.action_dim) == (5, 1)
    with pytest.raises(ValueError, match="unknown task .dog-run."):
        distill(tmp_path / "data", tmp_path / "run2", tasks="cartpole-swingup,dog-run", steps=2, progress=False)


def test_adding_a_task_leaves_the_old_tasks_bitwise_unchanged():
    from edge_tdmpc.tasksets import add_task, most_similar_task
    old = subset_model(make_tiny_model("mt30", seed=5), CARTPOLE[:3])
    new = add_task(old, "cartpole-swingup-sparse", init_from="cartpole-swingup")
    assert new.cfg.tasks == (*CARTPOLE[:3], "cartpole-swingup-sparse") and new.cfg.discounts[-1] == old.cfg.discounts[0]
    g = torch.Generator().manual_seed(1)
    obs, act, eps = torch.randn(6, 5, generator=g), torch.rand(6, 1, generator=g), torch.randn(6, 1, generator=g)
    before, after = _outputs(old, old.cfg.tasks, old.cfg.tasks, obs, act, eps), \
        _outputs(new, new.cfg.tasks, old.cfg.tasks, obs, act, eps)
    for name in old.cfg.tasks:
        for k, v in before[name].items():
            assert torch.equal(v, after[name][k]), (name, k)
    # before training, the new task is read as the task it started from
    same = _outputs(new, new.cfg.tasks, ["cartpole-swingup-sparse", "cartpole-swingup"], obs, act, eps)
    for k in ("z", "q", "reward"):
        assert torch.equal(same["cartpole-swingup-sparse"][k], same["cartpole-swingup"][k]), k
    ranked = most_similar_task(old, [(obs, act[:5], torch.rand(5, generator=g))])
    assert sorted(t for t, _ in ranked) == sorted(old.cfg.tasks) and ranked[0][1] <= ranked[-1][1]
    for task, init, message in (("cartpole-swingup", "cartpole-swingup", "already one of"),
                                ("walker-walk", "cartpole-swingup", "the model takes at most 5"),
                                ("dog-run", "cartpole-swingup", "unknown task"),
                                ("cartpole-swingup-sparse", "walker-walk", "is not one of the model's tasks")):
        with pytest.raises(ValueError, match=message):
            add_task(old, task, init_from=init)
