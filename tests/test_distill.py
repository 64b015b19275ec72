"""Trainer: loss terms by hand, the update against an official-style oracle, distillation, label cache, resume,
kill -9, corrupt checkpoints, 2-process data parallel, and the CLI."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_model

from edge_tdmpc import load_model, save_model
from edge_tdmpc.bench.official_update import Reference, reference_update
from edge_tdmpc.distill import losses as L
from edge_tdmpc.distill.data import Batch, EpisodeDataset, EpisodeWriter
from edge_tdmpc.distill.runlog import Checkpoints
from edge_tdmpc.distill.sampler import SliceSampler
from edge_tdmpc.distill.teacher import LabelCache, Teacher
from edge_tdmpc.distill.trainer import TrainConfig, Trainer, build_student
from edge_tdmpc.model import two_hot_inv

TASKS = ("cartpole-balance", "pendulum-swingup")
DIMS = dict(enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2, task_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(root, episodes=6, T=40, seed=0, tasks=TASKS, obs_dim=5, action_dim=1):
    rng = np.random.default_rng(seed)
    with EpisodeWriter(root, obs_dim, action_dim, tasks) as w:
        for e in range(episodes):
            w.add(rng.normal(size=(T + 1, obs_dim)), rng.uniform(-1, 1, (T, action_dim)), rng.uniform(0, 1, T),
                  task=e % len(tasks), key=e)
    return root


@pytest.fixture
def dataset(tmp_path):
    return EpisodeDataset(write_dataset(tmp_path / "data"))


@pytest.fixture
def teacher_path(tmp_path):
    path = tmp_path / "teacher.pt"
    save_model(make_tiny_model(",".join(TASKS), seed=3), path)
    return path


def student(seed=1, **kw):
    return build_student(TASKS, None, seed, **{**DIMS, **kw})


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- loss terms against hand-computed cases -----------------------------------------------------------------
def test_consistency_loss_by_hand():
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])       # H=2, B=1, L=2
    target = torch.tensor([[[0.0, 0.0]], [[2.0, 2.0]]])
    # t=0: mse 0.5, weight 1; t=1: mse 4, weight 0.5 -> (0.5 + 2) / 2
    assert L.consistency_loss(z, target, rho=0.5).item() == pytest.approx(1.25)


def test_reward_and_value_loss_by_hand():
    K = 101
    logits = torch.zeros(2, 3, K)                           # uniform: CE = log K for any target
    r = torch.rand(2, 3, 1)
    assert L.reward_loss(logits, r, 0.5).item() == pytest.approx((1 + 0.5) * math.log(K) / 2, rel=1e-6)
    # a target of exactly 0 is bin 50 alone: CE = -log_softmax(logits)[50]
    logits = torch.randn(1, 1, K)
    expect = -F.log_softmax(logits[0, 0], -1)[50].item()
    assert L.reward_loss(logits, torch.zeros(1, 1, 1), 0.5).item() == pytest.approx(expect, rel=1e-6)
    q = torch.zeros(2, 2, 3, K)                             # Q=2 heads, H=2
    assert L.value_loss(q, r, 0.5).item() == pytest.approx((1 + 0.5) * 2 * math.log(K) / (2 * 2), rel=1e-6)
    q[1, 0, :, 50] = 50.0                                   # head 1 at t=0 is certain of 0 -> CE ~ 0 there
    td = torch.zeros(2, 3, 1)
    assert L.value_loss(q, td, 0.5).item() == pytest.approx((math.log(K) * (1 + 0.5 + 0.5)) / 4, rel=1e-4)


def test_td_target_and_policy_loss_by_hand():
    assert L.td_target(torch.tensor([1.0]), 0.9, torch.tensor([10.0])).item() == pytest.approx(10.0)
    q = torch.tensor([[[2.0], [4.0]], [[8.0], [8.0]]])     # [H+1=2, B=2, 1]
    ent = torch.ones(2, 2, 1)
    # t=0: -(3 + 1e-4) * 1; t=1: -(8 + 1e-4) * 0.5; mean over 2 steps
    expect = (-(3 + 1e-4) - 0.5 * (8 + 1e-4)) / 2
    assert L.policy_loss(q, ent, 0.5, 1e-4).item() == pytest.approx(expect, rel=1e-6)


def test_running_scale_is_the_lerped_percentile_range():
    x = torch.arange(101, dtype=torch.float32).reshape(-1, 1)  # 5th..95th percentile = 5..95
    s = L.RunningScale(tau=0.01)
    s.update(x)
    assert s.value.item() == pytest.approx(1 + 0.01 * (90 - 1))
    s.update(torch.zeros(10, 1))                             # range 0 is clamped to 1
    assert s.value.item() == pytest.approx((1 + 0.01 * 89) * 0.99 + 0.01)
    xs = torch.randn(37, 1)
    assert torch.allclose(s._percentile(xs).flatten(), torch.from_numpy(
        np.percentile(xs.numpy(), [5, 95])).float(), atol=1e-6)


def test_distillation_terms_by_hand():
    K = 101
    logits = torch.zeros(4, K)                               # uniform over symmetric bins decodes to 0
    assert two_hot_inv(logits).abs().max() < 1e-5
    assert L.reward_distill_loss(logits, torch.ones(4, 1)).item() == pytest.approx(1.0, abs=1e-5)
    q = torch.full((2, 4, K), -1e4)
    q[0, :, 60] = 0.0                                        # head 0 says symexp(2) exactly, head 1 symexp(0)=0
    q[1, :, 50] = 0.0
    assert L.value_distill_loss(q, torch.zeros(4, 1)).item() == pytest.approx((math.expm1(2) / 2) ** 2, rel=1e-5)
    a, b = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert L.policy_distill_loss(a, b).item() == pytest.approx(0.125)
    assert L.latent_distill_loss(torch.ones(1, 3), torch.zeros(1, 3)).item() == pytest.approx(1.0)


# --- the update --------------------------------------------------------------------------------------------
def _batch(seed=0, B=16, H=3, obs_dim=5, A=1, tasks=2):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(H + 1, B, obs_dim, generator=g), torch.rand(H, B, A, generator=g) * 2 - 1,
                 torch.rand(H, B, 1, generator=g), torch.randint(0, tasks, (B,), generator=g),
                 torch.arange(B))


@pytest.mark.parametrize("dropout", [0.0, 0.01])
def test_update_matches_the_official_style_oracle(dropout):
    """Trainer.update == a loop-for-loop port of the official _update/update_pi on the same noise."""
    cfg = TrainConfig.make(batch_size=16, d_coef=0)
    tr = Trainer(student(dropout=dropout), cfg)
    ref = Reference(copy.deepcopy(tr.model), cfg)
    for step in range(3):
        batch = _batch(step)
        state = tr.generator.get_state()
        noise = tr._draw(3, 16)
        tr.generator.set_state(state)
        tr.update(batch)
        reference_update(ref, batch, noise)
    a, b = params(tr.model), params(ref.model)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert tr.scale.value.item() == pytest.approx(ref.scale.item(), rel=1e-6)


def test_update_trains_a_loss_down():
    torch.manual_seed(0)
    tr = Trainer(student(), TrainConfig.make(batch_size=16, d_coef=0))
    batch = _batch(0)
    first = tr.update(batch)["total_loss"].item()
    for _ in range(60):
        last = tr.update(batch)["total_loss"].item()
    assert last < 0.6 * first


def test_teacher_is_frozen_and_unchanged(teacher_path):
    teacher = Teacher(load_model(teacher_path, tasks=",".join(TASKS)), TASKS)
    before = params(teacher.model)
    tr = Trainer(student(), TrainConfig.make(batch_size=16, distill="reward,value,policy,latent"), teacher=teacher)
    for s in range(3):
        info = tr.update(_batch(s))
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    assert not teacher.model.training
    assert_same(before, params(teacher.model))
    assert {"distill_reward_loss", "distill_value_loss", "distill_policy_loss", "distill_latent_loss"} <= set(info)


def test_d_coef_zero_is_exactly_the_from_scratch_update(teacher_path):
    teacher = Teacher(load_model(teacher_path, tasks=",".join(TASKS)), TASKS)
    a = Trainer(student(), TrainConfig.make(batch_size=16, d_coef=0.0, distill="reward,value,policy,latent"),
                teacher=teacher)
    b = Trainer(student(), TrainConfig.make(batch_size=16, d_coef=0.0, distill="reward,value,policy,latent"))
    for s in range(4):
        a.update(_batch(s))
        b.update(_batch(s))
    assert_same(params(a.model), params(b.model))
    # and a positive d_coef does change the student
    c = Trainer(student(), TrainConfig.make(batch_size=16, d_coef=0.4), teacher=teacher)
    for s in range(4):
        c.update(_batch(s))
    assert not torch.equal(params(c.model)["_reward.0.weight"], params(b.model)["_reward.0.weight"])


def test_d_coef_zero_with_a_teacher_still_reports_the_terms(teacher_path):
    """The from-scratch baseline logs how far it is from the teacher, at zero weight."""
    teacher = Teacher(load_model(teacher_path, tasks=",".join(TASKS)), TASKS)
    cfg = TrainConfig.make(batch_size=16, d_coef=0.0)
    assert not cfg.distilling
    info = Trainer(student(), cfg, teacher=teacher).update(_batch(0))
    assert info["distill_reward_loss"] > 0


def test_label_cache_gives_the_live_teacher_loss(tmp_path, dataset, teacher_path):
    teacher = Teacher(load_model(teacher_path, tasks=",".join(TASKS)), TASKS)
    kinds = ("reward", "value", "policy", "latent")
    cache = LabelCache.build(teacher, dataset, tmp_path / "labels", kinds, batch_size=50, progress=False)
    cfg = TrainConfig.make(batch_size=16, distill=",".join(kinds))
    live, cached = Trainer(student(), cfg, teacher=teacher), Trainer(student(), cfg, labels=cache)
    s1, s2 = SliceSampler(dataset, batch_size=16, seed=4), SliceSampler(dataset, batch_size=16, seed=4)
    for _ in range(3):
        a, b = live.update(s1.sample()), cached.update(s2.sample())
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    # rebuilding is a no-op; a cache for another teacher is refused
    assert LabelCache.build(teacher, dataset, tmp_path / "labels", kinds, progress=False).meta["complete"]
    with pytest.raises(ValueError, match="built for teacher"):
        LabelCache(tmp_path / "labels", kinds, expect=dict(teacher="other"))


def test_label_cache_build_resumes_after_interruption(tmp_path, dataset, teacher_path, monkeypatch):
    teacher = Teacher(load_model(teacher_path, tasks=",".join(TASKS)), TASKS)
    calls = {"n": 0}
    real = teacher.labels

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the probe, one chunk, then die
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(teacher, "labels", flaky)
    with pytest.raises(KeyboardInterrupt):
        LabelCache.build(teacher, dataset, tmp_path / "labels", ("reward",), batch_size=64, progress=False)
    meta = json.loads((tmp_path / "labels" / "labels.json").read_text())
    assert meta["done"] == 64 and not meta["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        LabelCache(tmp_path / "labels")
    monkeypatch.setattr(teacher, "labels", real)
    cache = LabelCache.build(teacher, dataset, tmp_path / "labels", ("reward",), batch_size=64, progress=False)
    starts = np.concatenate(list(dataset.slice_starts(3)))
    batch = dataset.gather(starts)
    expect = teacher.labels(batch.obs[0], batch.action[0], batch.task, ("reward",))["reward"]
    assert torch.allclose(cache.lookup(torch.from_numpy(starts), ("reward",))["reward"], expect, atol=1e-6)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown distillation term"):
        TrainConfig.make(distill="reward,vibes")
    with pytest.raises(ValueError, match="needs a teacher"):
        Trainer(student(), TrainConfig.make(d_coef=0.4))
    with pytest.raises(ValueError, match="d_coef must be"):
        TrainConfig.make(d_coef=-1)
    from edge_tdmpc.distill.offline import DistillOptions
    for bad, flag in ((dict(d_coef=-1), "--d-coef"), (dict(d_coef=math.nan), "--d-coef"),
                      (dict(distill="reward,vibes"), "--distill"), (dict(batch_size=0), "--batch-size"),
                      (dict(steps=0), "--steps"), (dict(student_size="huge"), "--student-size"),
                      (dict(student_dims="mlp_dim=x"), "--student-dims"), (dict(log_every=0), "--log-every"),
                      (dict(eval_every=-1), "--eval-every"), (dict(teacher_precision="fp8"), "--teacher-precision"),
                      (dict(logger="mlflow"), "--logger")):
        with pytest.raises(ValueError, match=flag):
            DistillOptions(**bad)


# --- the loop: checkpoints, resume, faults ---------------------------------------------------------------------
RUN = dict(student_size=None, batch_size=16, save_every=5, log_every=5, progress=False, student_dims=DIMS)


def test_resume_continues_bit_for_bit(tmp_path, dataset, teacher_path):
    from edge_tdmpc.distill.offline import distill
    data = dataset.root
    distill(data, tmp_path / "full", teacher=teacher_path, steps=12, **RUN)
    distill(data, tmp_path / "part", teacher=teacher_path, steps=7, **RUN)
    with pytest.raises(ValueError, match="--resume"):
        distill(data, tmp_path / "part", teacher=teacher_path, steps=12, **RUN)
    distill(data, tmp_path / "part", teacher=teacher_path, steps=12, resume=True, **RUN)
    tasks = ",".join(TASKS)
    assert_same(params(load_model(tmp_path / "full" / "student.pt", tasks=tasks)),
                params(load_model(tmp_path / "part" / "student.pt", tasks=tasks)))
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 7, 10, 12]  # the stopped run's rows, then the resumed run's
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["total_loss"] == full[-1]["total_loss"]


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, dataset):
    from edge_tdmpc.distill.offline import distill
    distill(dataset.root, tmp_path / "run", d_coef=0, steps=10, **RUN)
    ck = Checkpoints(tmp_path / "run" / "checkpoints")
    newest, previous = ck.paths()
    assert (newest.name, previous.name) == ("state-000000010.pt", "state-000000005.pt")
    newest.write_bytes(newest.read_bytes()[:1000])           # truncated, as by a crash mid-write elsewhere
    msgs = []
    assert ck.latest(msgs.append)["trainer"]["step"] == 5
    assert "skipping unreadable checkpoint state-000000010.pt" in msgs[0]
    distill(dataset.root, tmp_path / "run", d_coef=0, steps=10, resume=True, **RUN)  # redoes 6..10
    distill(dataset.root, tmp_path / "ref", d_coef=0, steps=10, **RUN)
    tasks = ",".join(TASKS)
    assert_same(params(load_model(tmp_path / "ref" / "student.pt", tasks=tasks)),
                params(load_model(tmp_path / "run" / "student.pt", tasks=tasks)))


_KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from edge_tdmpc.distill.offline import distill
dims = dict(enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2, task_dim=8)
distill(sys.argv[1], sys.argv[2], teacher=sys.argv[3], student_size=None, steps=int(sys.argv[4]), batch_size=16,
        save_every=4, log_every=4, progress=False, student_dims=dims, resume=sys.argv[5] == "1")
"""


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, dataset, teacher_path):
    steps = 120
    args = [str(dataset.root), None, str(teacher_path), str(steps)]
    run = lambda out, resume: [sys.executable, "-c", _KILL_SCRIPT, *args[:1], str(out), *args[2:], resume]  # noqa
    subprocess.run(run(tmp_path / "ref", "0"), check=True, capture_output=True)
    proc = subprocess.Popen(run(tmp_path / "killed", "0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = Checkpoints(tmp_path / "killed" / "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not any(int(p.name[6:15]) >= 12 for p in ck.paths()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(int(p.name[6:15]) for p in ck.paths())
    assert 12 <= done < steps, "the run was not killed mid-way"
    subprocess.run(run(tmp_path / "killed", "1"), check=True, capture_output=True)
    tasks = ",".join(TASKS)
    assert_same(params(load_model(tmp_path / "ref" / "student.pt", tasks=tasks)),
                params(load_model(tmp_path / "killed" / "student.pt", tasks=tasks)))


# --- data parallel ---------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, init, batches, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tr = Trainer(student(), TrainConfig.make(batch_size=16, d_coef=0), rank=rank, world_size=world)
    infos = []
    for b in batches:
        n = b.task.shape[0] // world
        local = Batch(*(x.narrow(1 if x.ndim == 3 else 0, rank * n, n) for x in b))
        infos.append({k: v.item() for k, v in tr.update(local).items()})
    torch.save({"params": params(tr.model), "infos": infos}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's threads can abort it (SIGABRT, "terminate called without an active
    # exception") after the work is done, rarely.
    os._exit(0)


def test_two_process_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    batches = [_batch(s, B=16) for s in range(3)]
    single = Trainer(student(), TrainConfig.make(batch_size=16, d_coef=0))
    infos = [{k: v.item() for k, v in single.update(b).items()} for b in batches]
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_ddp_worker, args=(2, init, batches, tmp_path), nprocs=2, start_method="spawn")
    for rank in range(2):  # every rank holds the single process's weights
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in params(single.model).items():
            assert torch.allclose(v, ddp["params"][k], atol=1e-6, rtol=1e-5), (rank, k)
        for a, b in zip(infos, ddp["infos"], strict=True):  # gradient norms are of the averaged (global) gradient
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert a["pi_grad_norm"] == pytest.approx(b["pi_grad_norm"], rel=1e-5)
            assert a["pi_scale"] == pytest.approx(b["pi_scale"], rel=1e-6)


# --- CLI ---------------------------------------------------------------------------------------------------
def test_distill_cli_writes_a_loadable_student(tmp_path, dataset, teacher_path):
    from click.testing import CliRunner

    from edge_tdmpc.cli import main
    out = tmp_path / "out"
    dims = "enc_dim=32,mlp_dim=32,latent_dim=16,num_q=2,task_dim=8"
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher_path), "--data", str(dataset.root),
                                  "--student-dims", dims, "--steps", "6", "--batch-size", "16", "--out", str(out),
                                  "--distill", "reward,value", "--log-every", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    model = load_model(out / "student.pt", tasks=",".join(TASKS))
    assert model.cfg.latent_dim == 16
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and "distill_value_loss" in rows[-1]
    run = json.loads((out / "run.json").read_text())  # the settings by their flags' names
    assert (run["steps"], run["batch_size"], run["log_every"], run["distill"]) == (6, 16, 3, ["reward", "value"])
    assert run["student_dims"] == DIMS and run["train"]["distill"] == ["reward", "value"]
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher_path), "--data", str(dataset.root),
                                  "--steps", "6", "--out", str(out), "--distill", "reward,vibes"])
    assert r.exit_code == 2 and "unknown distillation term" in r.output


def test_collect_then_distill_then_resume(tmp_path, teacher_path):
    """The user's path without the official dataset: teacher rollouts -> distill -> resume a longer run."""
    from edge_tdmpc.distill.collect import collect
    from edge_tdmpc.distill.offline import distill
    tasks = ",".join(TASKS)
    collect(teacher_path, tasks, tmp_path / "data", episodes=2, mpc=False, noise_std=0.1, steps=20, workers=0,
            teacher_tasks=tasks, progress=False, echo=lambda *a: None)
    kw = dict(teacher=teacher_path, student_size=None, student_dims=DIMS, batch_size=16, save_every=4, log_every=4,
              progress=False, eval_every=4, eval_steps=5, echo=lambda *a: None)
    distill(tmp_path / "data", tmp_path / "run", steps=4, **kw)
    summary = distill(tmp_path / "data", tmp_path / "run", steps=8, resume=True, **kw)
    assert summary["steps"] == 8
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and set(TASKS) <= set(evals[0])
    assert (tmp_path / "run" / "eval.csv").read_text().startswith("kind,step,")


@pytest.mark.parametrize("precision,tol", [("fp16", 2e-3), ("bf16", 3e-2)])
def test_reduced_precision_teacher_targets_stay_close(precision, tol):
    m = make_tiny_model(",".join(TASKS), seed=3)
    b = _batch(0)
    kinds = ("reward", "value", "policy", "latent")
    ref = Teacher(copy.deepcopy(m)).labels(b.obs[0], b.action[0], b.task, kinds)
    out = Teacher(copy.deepcopy(m), precision=precision).labels(b.obs[0], b.action[0], b.task, kinds)
    for k in kinds:
        assert out[k].dtype == torch.float32 and torch.allclose(out[k], ref[k], atol=tol), k
    with pytest.raises(ValueError, match="without 'walker-walk'"):
        Teacher(m, tasks=("walker-walk",))


def test_external_loggers_are_optional(tmp_path):
    from edge_tdmpc.distill.runlog import external_logger
    assert external_logger("none", tmp_path, {}) is None
    with pytest.raises(ValueError, match="unknown logger"):
        external_logger("mlflow", tmp_path, {})
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(ValueError, match=f"pip install {module}"):
                external_logger(name, tmp_path, {})


def test_distill_logs_to_tensorboard(tmp_path, dataset):
    """The rows of metrics.jsonl reach TensorBoard's event file, read back with TensorBoard's own reader."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed (it is in the [dev] extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from edge_tdmpc.distill.offline import distill
    distill(dataset.root, tmp_path / "run", d_coef=0, steps=10, logger="tensorboard", **RUN)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind", "train") == "train"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/total_loss")
    assert [s.step for s in scalars] == [r["step"] for r in train_rows]
    assert np.allclose([s.value for s in scalars], [r["total_loss"] for r in train_rows])


def test_distill_logs_to_wandb_offline(tmp_path, dataset, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (optional: pip install wandb)")
    from edge_tdmpc.distill.offline import distill
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    distill(dataset.root, tmp_path / "run", d_coef=0, steps=10, logger="wandb", **RUN)
    import wandb
    wandb.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
