"""Planner distillation: planner labels (collected, and a re-run of the planner), the planner term (by hand, its
gradient's reach, weight 0), self-distillation from the teacher's weights, DAgger rounds and their resume after
kill -9, and the one-line errors of bad settings."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import make_tiny_model

from edge_tdmpc import load_model, save_model
from edge_tdmpc.distill import losses as L
from edge_tdmpc.distill.data import EpisodeDataset, EpisodeWriter
from edge_tdmpc.distill.labels import FieldLabels, PlannerLabelCache
from edge_tdmpc.distill.sampler import SliceSampler
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student

TASKS = ("cartpole-balance", "pendulum-swingup")
DIMS = dict(enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2, task_dim=8)
QUIET = dict(progress=False, echo=lambda *a: None)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def teacher_path(tmp_path):
    path = tmp_path / "teacher.pt"
    save_model(make_tiny_model(",".join(TASKS), seed=3, task_dim=8), path)
    return path


@pytest.fixture
def labelled(tmp_path, teacher_path):
    """Data collected by the teacher's planner, with its labels."""
    from edge_tdmpc.distill.collect import collect
    collect(teacher_path, ",".join(TASKS), tmp_path / "data", episodes=1, mpc=True, steps=12, workers=0,
            teacher_tasks=",".join(TASKS), **QUIET)
    return EpisodeDataset(tmp_path / "data")


def random_labelled(root, episodes=4, T=20, seed=0):
    rng = np.random.default_rng(seed)
    with EpisodeWriter(root, 5, 1, TASKS, fields={"planner": 3}) as w:
        for e in range(episodes):
            label = np.concatenate([rng.uniform(-1, 1, (T, 1)), rng.uniform(0.05, 2, (T, 1)),
                                    rng.uniform(-1, 1, (T, 1))], axis=1)
            w.add(rng.normal(size=(T + 1, 5)), rng.uniform(-1, 1, (T, 1)), rng.uniform(0, 1, T), task=e % 2, key=e,
                  planner=label)
    return EpisodeDataset(root)


# --- labels ------------------------------------------------------------------------------------------------
def test_collected_labels_equal_a_rerun_of_the_planner(tmp_path, teacher_path, labelled):
    """The labels stored with the data are what the teacher's planner gives when it replays the episode's
    observations with its own warm start and the episode's noise, in this process and in workers."""
    assert labelled.fields == {"planner": 3}
    stored = FieldLabels(labelled).lookup(np.arange(labelled.num_transitions)).numpy()
    mean, std, eval_action = np.split(stored, 3, axis=1)
    assert np.all((std >= 0.05) & (std <= 2)) and np.all(np.abs(mean) <= 1) and np.all(np.abs(eval_action) <= 1)
    for workers in (0, 2):
        cache = PlannerLabelCache.build(teacher_path, labelled, tmp_path / f"labels{workers}", ",".join(TASKS),
                                        workers=workers, seed=0, **QUIET)
        np.testing.assert_array_equal(cache.lookup(np.arange(labelled.num_transitions)).numpy(), stored)
    # another noise seed is another re-run: the labels differ
    other = PlannerLabelCache.build(teacher_path, labelled, tmp_path / "other", ",".join(TASKS), workers=0, seed=5,
                                    **QUIET)
    assert not np.array_equal(other.lookup(np.arange(labelled.num_transitions)).numpy(), stored)


def test_onnxruntime_labels_match_the_torch_planner(tmp_path, teacher_path, labelled):
    """The same re-run on the compiled teacher (ONNX Runtime fp32, the CPU's fast labeller): the planner's mean
    and std agree with torch's to float error on most steps (an elite picked differently on a near-tie shifts a
    whole trajectory's warm start, so not on all)."""
    cache = PlannerLabelCache.build(teacher_path, labelled, tmp_path / "ort", ",".join(TASKS), runtime="onnxruntime",
                                    workers=0, seed=0, **QUIET)
    ort = cache.lookup(np.arange(labelled.num_transitions)).numpy()
    ref = FieldLabels(labelled).lookup(np.arange(labelled.num_transitions)).numpy()
    close = np.abs(ort[:, :2] - ref[:, :2]).max(axis=1) < 1e-4
    assert close.mean() >= 0.5, np.abs(ort - ref).max(axis=1)
    assert close[[0, 12]].all()  # each episode's first step: same observation, no warm start yet
    assert cache.meta["runtime"] == "onnxruntime"


def test_eval_mode_collection_executes_the_labelled_noise_free_action(tmp_path, teacher_path):
    from edge_tdmpc.distill.collect import collect
    collect(teacher_path, "cartpole-balance", tmp_path / "d", episodes=1, mpc=True, steps=8, workers=0,
            eval_mode=True, teacher_tasks=",".join(TASKS), **QUIET)
    ep = EpisodeDataset(tmp_path / "d").episode(0)
    np.testing.assert_array_equal(ep["action"][:, 0], ep["planner"][:, 2])


def test_label_cache_resumes_and_refuses_another_teacher(tmp_path, teacher_path, labelled, monkeypatch):
    from edge_tdmpc.distill import labels as labels_mod
    calls = []
    real = labels_mod.label_episode

    def failing(*args):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(labels_mod, "label_episode", failing)
    with pytest.raises(KeyboardInterrupt):
        PlannerLabelCache.build(teacher_path, labelled, tmp_path / "c", ",".join(TASKS), workers=0, **QUIET)
    with pytest.raises(ValueError, match="incomplete"):
        PlannerLabelCache(tmp_path / "c")
    monkeypatch.setattr(labels_mod, "label_episode", real)
    said = []
    cache = PlannerLabelCache.build(teacher_path, labelled, tmp_path / "c", ",".join(TASKS), workers=0,
                                    progress=False, echo=said.append)
    assert any("1 of 2 episodes are labelled" in s for s in said)
    np.testing.assert_array_equal(cache.lookup(np.arange(24)).numpy(),
                                  FieldLabels(labelled).lookup(np.arange(24)).numpy())
    with pytest.raises(ValueError, match="made for teacher="):
        PlannerLabelCache(tmp_path / "c", expect={"teacher": "another"})


# --- the planner term --------------------------------------------------------------------------------------
def test_planner_loss_by_hand():
    mu = torch.tensor([[0.3, -2.0], [1.0, 0.0]])
    log_std = torch.tensor([[-1.0, 0.0], [0.5, 0.0]])
    info = dict(mean=torch.tanh(mu), mu=mu, log_std=log_std)
    target = torch.tensor([[0.5, -0.9], [0.0, 0.7]])
    label = (target, torch.full_like(target, 0.3), target)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second row's task has one action dim
    want = ((torch.tanh(mu) - target).pow(2) * mask).sum() / 3
    assert torch.allclose(L.planner_distill_loss(info, label, mask, "mse"), want)
    u = torch.atanh(target)
    nll = 0.5 * ((u - mu) / log_std.exp()).pow(2) + log_std
    assert torch.allclose(L.planner_distill_loss(info, label, mask, "nll"), (nll * mask).sum() / 3)


def _trainer(dataset, **cfg):
    model = build_student(TASKS, None, 1, **DIMS)
    return Trainer(model, TrainConfig.make(batch_size=16, d_coef=0, **cfg), plan_labels=FieldLabels(dataset))


def test_planner_term_moves_only_the_policy_and_weight_zero_is_the_plain_update(tmp_path):
    ds = random_labelled(tmp_path / "d")
    batches = [SliceSampler(ds, 3, 16, seed=0, prefetch=False).sample() for _ in range(2)]
    runs = {}
    for name, cfg in {"plain": dict(distill=""), "zero": dict(distill="planner", planner_coef=0.0),
                      "on": dict(distill="planner", planner_coef=5.0)}.items():
        tr = _trainer(ds, **cfg)
        infos = [tr.update(b) for b in batches]
        runs[name] = ({k: v.clone() for k, v in tr.model.state_dict().items()}, infos)
    plain, zero, on = (runs[k][0] for k in ("plain", "zero", "on"))
    for k in plain:
        assert torch.equal(plain[k], zero[k]), k  # weight 0: bitwise the update without the term
    assert "distill_planner_loss" in runs["zero"][1][0] and "distill_planner_loss" not in runs["plain"][1][0]
    # after one update the world model is still the same (its step runs first, on its own loss); the policy
    # learnt the planner; from the second update on the policy's gradient flows into the task embedding only
    # through the policy loss, as in the official update
    one = {}
    for name in ("zero", "on"):
        tr = _trainer(ds, distill="planner", planner_coef=0.0 if name == "zero" else 5.0)
        tr.update(batches[0])
        one[name] = {k: v.clone() for k, v in tr.model.state_dict().items()}
    changed = {k for k in one["on"] if not torch.equal(one["on"][k], one["zero"][k])}
    assert changed and all(k.startswith("_pi.") for k in changed), changed
    assert not any(torch.equal(on[k], zero[k]) for k in on if k.startswith("_pi.") and k.endswith("weight"))


def test_frozen_world_model_moves_only_the_policy(tmp_path):
    ds = random_labelled(tmp_path / "d", episodes=2, T=10)
    final = {}
    for coef in (0.0, 50.0):
        tr = _trainer(ds, distill="planner", planner_coef=coef, world_model=False)
        start = {k: v.clone() for k, v in tr.model.state_dict().items()}
        sampler = SliceSampler(ds, 3, 16, seed=0, prefetch=False)
        losses = [tr.update(sampler.sample())["distill_planner_loss"].item() for _ in range(100)]
        final[coef] = np.mean(losses[-10:])
        after = tr.model.state_dict()
        moved = {k for k in after if not torch.equal(after[k], start[k])}
        assert moved and all(k.startswith("_pi.") for k in moved), moved  # the world model: the start's
    assert final[50.0] < 0.5 * final[0.0] and tr.step == 100, final
    state = tr.state_dict()
    assert state["task_emb_grad"] is None
    resumed = _trainer(ds, distill="planner", planner_coef=50.0, world_model=False)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="world_model"):  # a run with the world model trained is another run
        _trainer(ds, distill="planner", planner_coef=50.0).load_state_dict(state)
    state["config"].pop("world_model")  # a state saved before the setting existed: it trained the world model
    _trainer(ds, distill="planner", planner_coef=50.0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\['reward'\] train the world model, which is frozen"):
        TrainConfig.make(d_coef=0.4, distill="reward,planner", world_model=False)
    TrainConfig.make(d_coef=0.4, distill="policy,planner", world_model=False)  # the teacher's policy is fine


def test_pi_warmup_holds_the_policy_while_the_world_model_learns(tmp_path):
    ds = random_labelled(tmp_path / "d", episodes=2, T=10)
    tr = _trainer(ds, pi_warmup=3)
    sampler = SliceSampler(ds, 3, 16, seed=0, prefetch=False)
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    infos = [tr.update(sampler.sample()) for _ in range(3)]
    after = tr.model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert moved and not any(k.startswith("_pi.") for k in moved), moved  # the policy: the start's
    assert all("pi_loss" not in i for i in infos)
    info = tr.update(sampler.sample())  # the fourth update takes the policy's first step
    assert "pi_loss" in info and not torch.equal(tr.model.state_dict()["_pi.0.weight"], start["_pi.0.weight"])
    with pytest.raises(ValueError, match="pi_warmup holds the policy"):
        TrainConfig.make(pi_warmup=5, world_model=False)
    with pytest.raises(ValueError, match="pi_warmup must be"):
        TrainConfig.make(pi_warmup=-1)


def test_frozen_world_model_through_the_cli(tmp_path, teacher_path, labelled):
    """The student from the teacher, its prior taught with the world model frozen: all else is the teacher's."""
    from click.testing import CliRunner

    from edge_tdmpc.cli import main
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["distill", "--data", str(labelled.root), "--teacher", str(teacher_path), "--init",
                                  "teacher", "--distill", "planner", "--d-coef", "0", "--frozen-world-model",
                                  "--steps", "6", "--batch-size", "8", "--log-every", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    tasks = ",".join(TASKS)
    student, teacher = load_model(out / "student.pt", tasks=tasks), load_model(teacher_path, tasks=tasks)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])}
    assert moved and all(k.startswith("_pi.") for k in moved), moved


def test_planner_term_teaches_the_policy_the_planners_mean(tmp_path):
    ds = random_labelled(tmp_path / "d", episodes=2, T=10)
    final = {}
    for coef in (0.0, 50.0):
        tr = _trainer(ds, distill="planner", planner_coef=coef)
        sampler = SliceSampler(ds, 3, 16, seed=0, prefetch=False)
        losses = [tr.update(sampler.sample())["distill_planner_loss"].item() for _ in range(100)]
        final[coef] = np.mean(losses[-10:])
    assert final[50.0] < 0.5 * final[0.0], final


def test_q_filter_teaches_only_the_rows_where_the_models_q_prefers_the_planner(tmp_path):
    ds = random_labelled(tmp_path / "d", episodes=2, T=10)
    tr = _trainer(ds, distill="planner", planner_coef=5.0, world_model=False, planner_filter="q")
    m, batch = tr.model, SliceSampler(ds, 3, 16, seed=0, prefetch=False).sample()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the Qs' output layers start at zero (every action valued alike): give them a view
        for p in m._Qs.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    # the update's own draws, replayed: its latents, policy and Q heads (the world model is frozen)
    state = tr.generator.get_state()
    noise = tr._draw(3, 16)
    tr.generator.set_state(state)
    task, m_was = batch.task, m.training
    m.train()
    with torch.no_grad():
        zs = tr._rollout(batch.obs[0], batch.action, task)
        action, pi = m.pi_info(zs, task, eps=noise.pi_eps)
        labels = tr._labels(batch)["planner"]
        keep = tr._planner_beats_policy(zs, action, pi["mean"], labels[0], task, noise)
        want = L.planner_distill_loss({"mean": pi["mean"][0]}, labels, m._action_masks[task] * keep)
    m.train(m_was)
    assert 0 < keep.sum() < 16  # a random model prefers the planner on some rows, not all
    info = tr.update(batch)
    assert torch.allclose(info["distill_planner_loss"], want) and info["distill_planner_kept"] == keep.mean()
    with pytest.raises(ValueError, match="planner_filter 'x'"):
        TrainConfig.make(planner_filter="x")


def test_planner_objective_is_the_planner_term_alone(tmp_path):
    """--pi-objective planner: the policy's step is the gradient of planner_coef x the planner term and nothing
    else (no Q to climb, no entropy bonus); the world model and the Q scale stay as they were."""
    ds = random_labelled(tmp_path / "d", episodes=2, T=10)
    tr = _trainer(ds, distill="planner", planner_coef=5.0, world_model=False, pi_objective="planner")
    m, batch = tr.model, SliceSampler(ds, 3, 16, seed=0, prefetch=False).sample()
    state, scale = tr.generator.get_state(), tr.scale.value.clone()
    noise = tr._draw(3, 16)
    tr.generator.set_state(state)
    task, world = batch.task, {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("_pi.")}
    m.train()
    zs = tr._rollout(batch.obs[0], batch.action, task).detach()
    _, pi = m.pi_info(zs, task, eps=noise.pi_eps)
    loss = 5.0 * L.planner_distill_loss({"mean": pi["mean"][0]}, tr._labels(batch)["planner"], m._action_masks[task])
    want = torch.autograd.grad(loss, list(m._pi.parameters()))
    m.eval()
    grads = {}
    hooks = [p.register_hook(lambda g, i=i: grads.__setitem__(i, g.clone())) for i, p in enumerate(m._pi.parameters())]
    info = tr.update(batch)
    for h in hooks:
        h.remove()
    assert info["pi_loss"] == 0 and torch.allclose(5.0 * info["distill_planner_loss"], loss.detach())
    for i, g in enumerate(want):
        assert torch.allclose(grads[i], g, atol=1e-6)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in world.items()) and torch.equal(tr.scale.value, scale)
    with pytest.raises(ValueError, match="pi_objective 'x'"):
        TrainConfig.make(pi_objective="x")
    for bad in (dict(distill="reward"), dict(distill="planner", planner_coef=0.0)):
        with pytest.raises(ValueError, match="add planner to --distill"):
            TrainConfig.make(pi_objective="planner", **bad)


# --- self-distillation, DAgger ------------------------------------------------------------------------------
def test_init_teacher_starts_from_the_teachers_weights(tmp_path, teacher_path, labelled):
    from edge_tdmpc.distill.offline import DistillOptions, teacher_student
    student = teacher_student(teacher_path, labelled.tasks, DistillOptions(init="teacher"), "cpu")
    teacher = load_model(teacher_path, tasks=",".join(TASKS))
    sd = teacher.state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert all(p.requires_grad for n, p in student.named_parameters() if not n.startswith("_target_Qs."))
    assert not any(p.requires_grad for p in student._target_Qs.parameters())  # moved by the running average only
    with pytest.raises(ValueError, match="drop --student-dims"):
        teacher_student(teacher_path, labelled.tasks, DistillOptions(init="teacher", student_dims="mlp_dim=8"), "cpu")


_DAGGER = """
import sys
import torch
torch.set_num_threads(1)
from edge_tdmpc.distill.offline import distill
data, out, teacher, resume = sys.argv[1:5]
distill(data, out, teacher=teacher, init="teacher", distill="planner", d_coef=0, dagger=2, dagger_episodes=2,
        dagger_steps=30, steps=12, batch_size=16, save_every=2, log_every=2, workers=0, resume=resume == "1",
        progress=False, device="cpu", echo=lambda *a: None)
"""


def _dagger_run(tmp_path, data, out, teacher, resume):
    return subprocess.Popen([sys.executable, "-c", _DAGGER, str(data), str(out), str(teacher), resume],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, ready, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _episodes(root):
    return EpisodeDataset(root).num_episodes if (root / "index.json").exists() else 0


def test_dagger_resumes_after_kill_9_with_no_round_repeated_or_lost(tmp_path, teacher_path, labelled):
    ref = _dagger_run(tmp_path, labelled.root, tmp_path / "ref", teacher_path, "0")
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    run = tmp_path / "run"
    # killed in the middle of round 1 (some of its episodes written), then in the middle of the last phase
    _kill_when(_dagger_run(tmp_path, labelled.root, run, teacher_path, "0"),
               lambda: _episodes(run / "dagger-data") >= 1)
    _kill_when(_dagger_run(tmp_path, labelled.root, run, teacher_path, "1"),
               lambda: any(int(p.name[6:15]) > 8 for p in (run / "checkpoints").glob("state-*")))
    last = _dagger_run(tmp_path, labelled.root, run, teacher_path, "1")
    assert last.wait() == 0, last.stderr.read().decode()[-2000:]

    tasks = ",".join(TASKS)
    a, b = load_model(tmp_path / "ref" / "student.pt", tasks=tasks), load_model(run / "student.pt", tasks=tasks)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    keys = lambda root: sorted(zip(*(EpisodeDataset(root).episode_table()[k].tolist()  # noqa: E731
                                     for k in ("task", "key")), strict=True))
    assert keys(run / "dagger-data") == keys(tmp_path / "ref" / "dagger-data")
    assert keys(run / "dagger-data") == sorted((t, r * 10_000 + e) for t in (0, 1) for r in (1, 2) for e in (0, 1))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    dagger = [r for r in rows if r["kind"] == "dagger"]
    assert [(r["round"], r["step"], r["episodes"], r["labels"]) for r in dagger] == [(1, 4, 4, 120), (2, 8, 4, 120)]
    assert dagger == [r for r in ref_rows if r["kind"] == "dagger"]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12]


# --- bad settings --------------------------------------------------------------------------------------------
def test_bad_planner_distillation_settings_are_one_line_errors(tmp_path, teacher_path):
    from click.testing import CliRunner
    from test_distill import write_dataset

    from edge_tdmpc.cli import main
    plain = write_dataset(tmp_path / "plain")
    cases = [
        (["--data", str(plain), "--distill", "planner", "--dagger", "1"], "--dagger needs a --teacher"),
        (["--data", str(plain), "--distill", "planner", "--d-coef", "0"], "carries no planner labels"),
        (["--data", str(plain), "--teacher", str(teacher_path), "--dagger", "1"], "add planner to --distill"),
        (["--data", str(plain), "--distill", "planner", "--planner-coef", "nan"], "--planner-coef"),
        (["--data", str(plain), "--init", "teacher"], "--init teacher needs a --teacher"),
        (["--data", str(plain), "--teacher", str(teacher_path), "--frozen-world-model"],
         "['reward'] train the world model, which is frozen"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        r = CliRunner().invoke(main, ["distill", *args, "--steps", "4", "--out", str(out), "--no-progress"])
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert not (out / "student.pt").exists()
    r = CliRunner().invoke(main, ["distill", "--data", str(plain), "--planner-loss", "kl", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "'kl' is not one of 'mse', 'nll'" in r.output  # click's own usage error
