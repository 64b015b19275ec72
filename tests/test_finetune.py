"""`edge-tdmpc finetune`: a new task for a trained multi-task model, online; its start (the embedding chosen by
measurement), resume after kill -9, the old tasks' replay, the one-line errors, the official layout."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_tiny_model

from edge_tdmpc import load_model
from edge_tdmpc.checkpoint import save_model
from edge_tdmpc.cli import main
from edge_tdmpc.distill.data import EpisodeWriter
from edge_tdmpc.distill.finetune import CHOICE, MixedSampler, finetune
from edge_tdmpc.distill.online import Replay
from edge_tdmpc.tasksets import subset_model

pytestmark = pytest.mark.usefixtures("one_thread")

OLD = ("cartpole-swingup", "reacher-easy")  # a 6/2 model: pointmass-easy (4/2) fits, cheetah-run (17/6) does not
QUICK = dict(steps=60, seed_steps=20, episode_steps=20, batch_size=16, save_every=20, log_every=10)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.pt"
    save_model(subset_model(make_tiny_model("mt30", seed=3), OLD), path)
    return path


def _flags(settings):
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_finetune_adds_the_task_and_trains_it_online(base, tmp_path):
    s = finetune(base, "pointmass-easy", tmp_path / "ft", progress=False, echo=lambda *a: None, **QUICK)
    model = load_model(tmp_path / "ft" / "model.pt")  # the file names its task set: one more task
    assert model.cfg.tasks == (*OLD, "pointmass-easy") and s["tasks"] == list(model.cfg.tasks)
    assert model.cfg.action_dims[-1] == 2 and model.cfg.discounts[-1] == model.cfg.discounts[0]
    assert s["env_steps"] == 60 and s["updates"] == 20 + 39  # the official schedule: seed_steps, then 1 per step
    choice = json.loads((tmp_path / "ft" / CHOICE).read_text())
    assert choice["init_from"] == s["init_from"] and set(choice["world_model_loss"]) == set(OLD)
    assert choice["measured_on"] == 20  # the one random episode of the seed phase
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    episodes = [r for r in rows if r["kind"] == "episode"]
    assert [r["task"] for r in episodes] == ["pointmass-easy"] * 3 and [r["random"] for r in episodes] == [1, 0, 0]
    # the replay it writes holds the new task's episodes under its index in the model
    from edge_tdmpc.distill.data import EpisodeDataset
    ds = EpisodeDataset(tmp_path / "ft" / "replay")
    assert ds.tasks == model.cfg.tasks and set(ds.episode_table()["task"].tolist()) == {2}
    # --init-from names the start: the new row is that task's, exactly, before the first update
    named = finetune(base, "pointmass-easy", tmp_path / "named", init_from="reacher-easy", progress=False,
                     echo=lambda *a: None, **{**QUICK, "steps": 20})
    assert named["updates"] == 0 and named["init_from"] == "reacher-easy"
    emb = load_model(tmp_path / "named" / "model.pt")._task_emb.weight
    assert torch.equal(emb[2], emb[1])


def test_the_chosen_start_is_the_task_whose_world_model_fits_best(base, tmp_path):
    from edge_tdmpc.tasksets import most_similar_task
    s = finetune(base, "pointmass-easy", tmp_path / "ft", progress=False, echo=lambda *a: None,
                 **{**QUICK, "steps": 40})
    model = load_model(base)
    replay = Replay(6, 2)
    from edge_tdmpc.distill.collect import play
    from edge_tdmpc.seeding import derive_seed
    obs, action, reward, _ = play(model, "pointmass-easy", 2, derive_seed(QUICK.get("seed", 1), 0), 20,
                                  random_actions=True)
    replay.add(obs, action, reward, 2)
    e = replay.episodes[0]
    ranking = most_similar_task(model, [(e["obs"], e["action"], e["reward"])])
    assert s["init_from"] == ranking[0][0]
    assert json.loads((tmp_path / "ft" / CHOICE).read_text())["world_model_loss"] == pytest.approx(dict(ranking))


_RUN = [sys.executable, "-m", "edge_tdmpc.cli", "finetune"]


def test_start_by_return_picks_the_row_whose_prior_acts_best(base, tmp_path):
    from edge_tdmpc.distill.loop import closed_loop_eval
    from edge_tdmpc.tasksets import add_task
    s = finetune(base, "pointmass-easy", tmp_path / "ft", start_by="return", seed=3, progress=False,
                 echo=lambda *a: None, **{**QUICK, "steps": 40})
    choice = json.loads((tmp_path / "ft" / CHOICE).read_text())
    returns = choice["prior_return"]
    assert choice["start_by"] == "return" and set(returns) == set(OLD) and returns[OLD[0]] != returns[OLD[1]]
    assert choice["init_from"] == s["init_from"] == max(OLD, key=returns.get) and choice["tied"] == [s["init_from"]]
    for t in OLD:  # each row's return is the prior's on the model that starts the new task from that row
        start = add_task(load_model(base), "pointmass-easy", t)
        assert closed_loop_eval(start, ["pointmass-easy"], 10, QUICK["episode_steps"], 3 + 20_000)[
            "pointmass-easy"] == returns[t]  # the default: 10 episodes a row
    # measured before the run acts: with no seed phase and no update yet, the model already holds the chosen row
    s = finetune(base, "pointmass-easy", tmp_path / "now", start_by="return", seed=3, progress=False,
                 echo=lambda *a: None, **{**QUICK, "seed_steps": 0, "steps": 1})
    emb = load_model(tmp_path / "now" / "model.pt")._task_emb.weight
    assert s["updates"] == 0 and torch.equal(emb[2], emb[OLD.index(s["init_from"])])


def test_steps_0_writes_the_start_the_fine_tune_would_take(base, tmp_path):
    """--steps 0: the task added, its row chosen by --start-by return (or named), no update, no env step past the
    measurement; the model is the first-update start of the same run with steps."""
    r = CliRunner().invoke(main, ["finetune", str(base), "--task", "pointmass-easy", "--steps", "0", "--start-by",
                                  "return", "--seed", "3", "--episode-steps", "20", "--out", str(tmp_path / "zero"),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "0 env steps, 0 updates" in r.output
    choice = json.loads((tmp_path / "zero" / CHOICE).read_text())
    returns = choice["prior_return"]
    assert choice["init_from"] == max(OLD, key=returns.get)
    zero = load_model(tmp_path / "zero" / "model.pt")
    assert zero.cfg.tasks == (*OLD, "pointmass-easy")
    emb = zero._task_emb.weight
    assert torch.equal(emb[2], emb[OLD.index(choice["init_from"])])
    # the same choice and the same weights as the start of the run that trains (seed phase 0, one env step)
    s = finetune(base, "pointmass-easy", tmp_path / "one", start_by="return", seed=3, progress=False,
                 echo=lambda *a: None, **{**QUICK, "seed_steps": 0, "steps": 1})
    one = load_model(tmp_path / "one" / "model.pt")
    assert s["init_from"] == choice["init_from"] and s["updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(zero.state_dict().values(), one.state_dict().values(), strict=True))
    named = finetune(base, "pointmass-easy", tmp_path / "named", init_from="reacher-easy", steps=0, progress=False,
                     echo=lambda *a: None)
    assert named["init_from"] == "reacher-easy" and named["env_steps"] == 0
    emb = load_model(tmp_path / "named" / "model.pt")._task_emb.weight
    assert torch.equal(emb[2], emb[1])
    with pytest.raises(ValueError, match="already holds a model"):
        finetune(base, "pointmass-easy", tmp_path / "named", init_from="reacher-easy", steps=0, progress=False,
                 echo=lambda *a: None)


def test_finetune_resumes_after_kill_9_bit_for_bit(base, tmp_path):
    settings = {**QUICK, "steps": 100, "save_every": 1}
    args = [str(base), "--task", "pointmass-easy", *_flags(settings), "--no-progress", "--threads", "1"]
    ref = subprocess.run([*_run_args(args, tmp_path / "ref")], capture_output=True, text=True, env=_env())
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(_run_args(args, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(
            int(p.name[6:15]) >= 40 for p in (run / "checkpoints").glob("state-*.pt")):
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run([*_run_args(args, run), "--resume"], capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (load_model(d / "model.pt").state_dict() for d in (tmp_path / "ref", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    episodes = lambda d: [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                          if json.loads(x)["kind"] == "episode"]
    assert episodes(run) == episodes(tmp_path / "ref") == [20, 40, 60, 80, 100]


def _run_args(args, out):
    return [*_RUN, *args, "--out", str(out)]


def _env():
    return dict(os.environ, MUJOCO_GL="disable")


def _old_data(root, tasks=OLD, seed=0, labels=False):
    rng = np.random.default_rng(seed)
    with EpisodeWriter(root, 6, 2, tasks, fields={"planner": 6} if labels else None) as w:
        for k, (task, (o, a)) in enumerate([(0, (5, 1)), (1, (6, 2)), (0, (5, 1))]):
            more = {"planner": rng.uniform(-1, 1, (30, 6))} if labels else {}
            w.add(rng.standard_normal((31, o)), rng.uniform(-1, 1, (30, a)), rng.uniform(0, 1, 30), task, key=k,
                  **more)
    return root


def test_replay_mixes_the_old_tasks_into_every_batch(base, tmp_path):
    from edge_tdmpc.distill.data import EpisodeDataset
    data = EpisodeDataset(_old_data(tmp_path / "old", tasks=OLD[::-1]))  # another order: indices are mapped
    replay = Replay(6, 2, batch_size=6, seed=0)
    replay.add(np.full((21, 4), 7.0), np.zeros((20, 2)), np.zeros(20), 2)
    sampler = MixedSampler(replay, data, (*OLD, "pointmass-easy"), 16, seed=1)
    b = sampler.sample()
    assert b.obs.shape == (4, 16, 6) and b.action.shape == (3, 16, 2)
    assert (b.task[:6] == 2).all() and (b.obs[:, :6, :4] == 7).all()
    own = data.gather(b.index[6:])  # the old rows are the data's slices, their task indices the model's
    assert torch.equal(b.obs[:, 6:], own.obs) and torch.equal(b.task[6:], 1 - own.task)
    state = sampler.state_dict()
    nxt = sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.old.sample().index, nxt.index[6:])
    s = finetune(base, "pointmass-easy", tmp_path / "ft", replay=str(tmp_path / "old"), replay_ratio=0.25,
                 progress=False, echo=lambda *a: None, **QUICK)
    assert s["updates"] == 59
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["replay"] == str(tmp_path / "old") and run["replay_ratio"] == 0.25


def test_replay_labels_teach_the_prior_on_the_replayed_rows_only(base, tmp_path):
    from edge_tdmpc.distill.losses import planner_distill_loss
    # a row without a label (NaN) counts nothing: the loss and its gradient are those of the labelled rows alone
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 2, generator=g, requires_grad=True)
    label = torch.rand(5, 2, generator=g)
    with_nan = torch.cat([label[:3], torch.full((2, 2), float("nan"))])
    mask = torch.ones(5, 2)
    loss = planner_distill_loss({"mean": pred}, (with_nan, None, None), mask)
    loss.backward()
    assert torch.equal(loss, planner_distill_loss({"mean": pred[:3]}, (label[:3], None, None), mask[:3]))
    assert pred.grad[3:].abs().sum() == 0 and pred.grad[:3].abs().sum() > 0
    data = _old_data(tmp_path / "old", labels=True)
    s = finetune(base, "pointmass-easy", tmp_path / "ft", replay=str(data), replay_labels=True, planner_coef=3.0,
                 progress=False, echo=lambda *a: None, **QUICK)
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert s["updates"] == 59 and train and all(np.isfinite(r["distill_planner_loss"]) for r in train)
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["train"]["distill"] == ["planner"] and run["train"]["planner_coef"] == 3.0


def test_trainable_embedding_moves_the_new_row_alone(base, tmp_path):
    from edge_tdmpc.tasksets import add_task
    # replayed old rows (with labels, so the policy's loss runs too) would move their own rows: the hook stops them
    data = _old_data(tmp_path / "old", labels=True)
    s = finetune(base, "pointmass-easy", tmp_path / "ft", trainable="embedding", init_from="reacher-easy",
                 replay=str(data), replay_labels=True, progress=False, echo=lambda *a: None, **QUICK)
    assert s["updates"] == 59
    before = add_task(load_model(base), "pointmass-easy", "reacher-easy")
    after = load_model(tmp_path / "ft" / "model.pt")
    p0, p1 = dict(before.named_parameters()), dict(after.named_parameters())
    for name in p0:  # the target Qs follow the (fixed) Qs by their running average; nothing acts through them
        if name != "_task_emb.weight" and not name.startswith("_target_Qs"):
            assert torch.equal(p0[name], p1[name]), name
    e0, e1 = p0["_task_emb.weight"], p1["_task_emb.weight"]
    assert torch.equal(e0[:2], e1[:2]) and not torch.equal(e0[2], e1[2])
    g = torch.Generator().manual_seed(0)
    obs, a = torch.randn(8, 6, generator=g), torch.rand(8, 2, generator=g) * 2 - 1
    with torch.no_grad():
        for task in (0, 1):  # the old tasks' outputs, bit for bit
            t = torch.full((8,), task)
            z0, z1 = before.encode(obs, t), after.encode(obs, t)
            assert torch.equal(z0, z1) and torch.equal(before.pi_head(z0, t)[0], after.pi_head(z1, t)[0])
            assert torch.equal(before.Q(z0, a, t, "all"), after.Q(z1, a, t, "all"))
            assert torch.equal(before.reward(z0, a, t), after.reward(z1, a, t))
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["trainable"] == "embedding"


def test_bad_finetune_settings_are_one_line_errors(base, tmp_path):
    single = tmp_path / "single.pt"
    save_model(make_tiny_model("cartpole-swingup"), single)
    _old_data(tmp_path / "walker", tasks=("walker-walk", "reacher-easy"))
    cases = [
        ([str(base), "--task", "dog-run"], "unknown task 'dog-run'"),
        ([str(base), "--task", "reacher-easy"], "already one of the model's 2 tasks"),
        ([str(base), "--task", "cheetah-run"], "the model takes at most 6 and 2"),
        ([str(single), "--task", "pointmass-easy"], "needs a multi-task model"),
        ([str(base), "--task", "pointmass-easy", "--init-from", "walker-walk"], "is not one of the model's tasks"),
        ([str(base), "--task", "pointmass-easy", "--seed-steps", "0"], "--start-by loss measures"),
        ([str(base), "--task", "pointmass-easy", "--replay-ratio", "1"], "--replay-ratio must be"),
        ([str(base), "--task", "pointmass-easy", "--replay-ratio", "nan"], "--replay-ratio must be"),
        ([str(base), "--task", "pointmass-easy", "--replay", str(tmp_path / "walker")], "'walker-walk' is not in"),
        ([str(base), "--task", "pointmass-easy", "--steps", "-1"], "--steps must be at least 0"),
        ([str(base), "--task", "pointmass-easy", "--steps", "0"], "--steps 0 adds the task without a seed phase"),
        ([str(base), "--task", "pointmass-easy", "--replay-labels"], "--replay-labels teaches the prior"),
        ([str(base), "--task", "pointmass-easy", "--replay", str(_old_data(tmp_path / "plain")), "--replay-labels"],
         "carries no planner labels"),
        ([str(base), "--task", "pointmass-easy", "--planner-coef", "nan"], "--planner-coef must be at least 0"),
        ([str(base), "--task", "pointmass-easy", "--anchor-coef", "-1"], "--anchor-coef must be at least 0"),
        ([str(base), "--task", "pointmass-easy", "--self-label-every", "-1"], "--self-label-every must be at least 0"),
        ([str(base), "--task", "pointmass-easy", "--self-label-every", "2", "--mpc"], "with --mpc the acting planner"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        r = CliRunner().invoke(main, ["finetune", *args, "--out", str(out), "--no-progress"])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert not out.exists(), args  # refused before anything is written


def test_the_mt30_model_takes_a_new_task_in_the_official_layout(checkpoint_path, tmp_path):
    from edge_tdmpc.checkpoint import read_checkpoint
    s = finetune(checkpoint_path, "fish-upright", tmp_path / "ft", progress=False, echo=lambda *a: None,
                 **{**QUICK, "steps": 40, "batch_size": 4})
    assert len(s["tasks"]) == 31 and s["tasks"][-1] == "fish-upright"
    ours, meta = read_checkpoint(tmp_path / "ft" / "model.pt")
    save_model(load_model(checkpoint_path), tmp_path / "mt30.pt")  # the shared file, in the newer official layout
    theirs, _ = read_checkpoint(tmp_path / "mt30.pt")
    assert set(ours) == set(theirs) and meta["tasks"] == s["tasks"]  # the official keys, one more embedding row
    assert {k: getattr(v, "shape", v) for k, v in ours.items() if "task_emb" not in k and "action_masks" not in k} == \
        {k: getattr(v, "shape", v) for k, v in theirs.items() if "task_emb" not in k and "action_masks" not in k}
    emb = next(k for k in ours if "task_emb" in k)
    assert ours[emb].shape == (31, theirs[emb].shape[1])
    model = load_model(tmp_path / "ft" / "model.pt")
    assert model.cfg.tasks[:30] == load_model(checkpoint_path).cfg.tasks
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "ft" / "model.pt"), "--tasks", "fish-upright", "--no-mpc",
                                  "--steps", "5"])
    assert r.exit_code == 0 and "fish-upright" in r.output, r.output
    with pytest.raises(ValueError, match="a model of 31 task.*not of the 30 asked for"):
        load_model(tmp_path / "ft" / "model.pt", tasks="mt30")


def test_held_out_ranking_ranks_the_other_tasks():
    from edge_tdmpc.bench.finetune_study import held_out_ranking
    model = subset_model(make_tiny_model("mt30", seed=2), ("cartpole-swingup", "cartpole-balance", "reacher-easy"))
    ranking = held_out_ranking(model, episodes=1, steps=10)
    assert list(ranking) == list(model.cfg.tasks)
    for task, r in ranking.items():
        assert sorted(t for t, _ in r) == sorted(t for t in model.cfg.tasks if t != task)
        assert [v for _, v in r] == sorted(v for _, v in r)
    rows = model._task_emb.weight.detach().clone()
    by_return = held_out_ranking(model, episodes=1, steps=10, by="return")
    for task, r in by_return.items():  # its own row first, then the others, best return first
        assert r[0][0] == task and sorted(t for t, _ in r[1:]) == sorted(t for t in model.cfg.tasks if t != task)
        assert [v for _, v in r[1:]] == sorted((v for _, v in r[1:]), reverse=True)
    assert torch.equal(model._task_emb.weight, rows)  # every row left as it was found


def test_similarity_by_return_scores_the_picks_on_fresh_episodes(tmp_path):
    from edge_tdmpc.bench.finetune_study import main as study
    tasks = ("cartpole-swingup", "cartpole-balance", "reacher-easy")
    save_model(subset_model(make_tiny_model("mt30", seed=2), tasks), tmp_path / "m.pt")
    run = lambda *args: CliRunner().invoke(study, ["similarity", str(tmp_path / "m.pt"), *map(str, args)])  # noqa: E731
    assert run("--out", tmp_path / "loss.json", "--episodes", 1, "--steps", 10).exit_code == 0
    r = run("--by", "return", "--episodes", 1, "--steps", 10, "--score-episodes", 1, "--loss-ranking",
            tmp_path / "loss.json", "--out", tmp_path / "ret.json")
    assert r.exit_code == 0, r.output
    ranking = json.loads((tmp_path / "ret.json").read_text())
    scored = json.loads((tmp_path / "ret.scored.json").read_text())
    assert set(scored) == set(tasks) and "of 3 held-out tasks" in r.output
    for t in tasks:  # the pick is the ranking's best other row, scored with the loss's pick and the own row
        assert scored[t]["return"][0] == ranking[t][1][0] != t and scored[t]["loss"][0] != t
        assert set(scored[t]) == {"own", "return", "loss"}
    again = run("--by", "return", "--ranking", tmp_path / "ret.json", "--steps", 10, "--score-episodes", 1,
                "--out", tmp_path / "again.json")  # reuses the ranking: the same scores
    assert again.exit_code == 0 and json.loads((tmp_path / "again.scored.json").read_text()) == {
        t: {k: v for k, v in s.items() if k != "loss"} for t, s in scored.items()}


def test_hold_out_and_start_make_the_held_out_studys_models(tmp_path):
    from edge_tdmpc.bench.finetune_study import main as study
    tasks = ("cartpole-swingup", "cartpole-balance", "reacher-easy")
    model = subset_model(make_tiny_model("mt30", seed=2), tasks)
    save_model(model, tmp_path / "m.pt")
    run = lambda *args: CliRunner().invoke(study, [str(a) for a in args])  # noqa: E731
    r = run("hold-out", tmp_path / "m.pt", "--task", "cartpole-balance", "--out", tmp_path / "held.pt")
    assert r.exit_code == 0, r.output
    held = load_model(tmp_path / "held.pt")
    assert held.cfg.tasks == ("cartpole-swingup", "reacher-easy")
    r = run("start", tmp_path / "held.pt", "--task", "cartpole-balance", "--init-from", "cartpole-swingup",
            "--out", tmp_path / "start.pt")
    assert r.exit_code == 0, r.output
    back = load_model(tmp_path / "start.pt")
    assert back.cfg.tasks == ("cartpole-swingup", "reacher-easy", "cartpole-balance")
    emb = back._task_emb.weight
    assert torch.equal(emb[2], emb[0]) and torch.equal(emb[:2], model._task_emb.weight[[0, 2]])
    obs = torch.randn(4, model.cfg.obs_dim)
    for old, new in ((0, 0), (2, 1)):  # the kept tasks' latents are the model's, bit for bit
        assert torch.equal(back.encode(obs, torch.tensor([new])), model.encode(obs, torch.tensor([old])))
    r = run("hold-out", tmp_path / "m.pt", "--task", "walker-walk", "--out", tmp_path / "x.pt")
    assert r.exit_code != 0 and "'walker-walk' is not in the model's task set" in str(r.exception or r.output)


def test_study_report_finds_the_steps_to_the_from_scratch_final(tmp_path):
    from edge_tdmpc.bench.finetune_study import main as study
    curves = {"scratch": {1: [10, 20, 40, 80], 2: [10, 30, 50, 60]}, "ft": {1: [50, 75, 90, 96], 2: [40, 60, 81, 90]},
              "ft-prior": {1: [70, 80, 95, 99]}, "ft-return-prior": {1: [60, 20, 30, 40]},
              "ft-return-replay-anchor": {1: [60, 58, 61, 62]}}
    for kind, seeds in curves.items():
        for seed, returns in seeds.items():
            d = tmp_path / "pointmass-easy" / f"{kind}-s{seed}"
            d.mkdir(parents=True)
            if kind in ("ft-prior", "ft-return-prior"):  # a seed phase of one episode (its first eval after it is
                seeded = 500 if kind == "ft-prior" else 0  # at step 1000), and none
                (d / "run.json").write_text(json.dumps({"seed_steps": seeded}))
            rows = [{"kind": "eval", "step": 500 * (i + 1), "mean_return": r} for i, r in enumerate(returns)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "done").touch()
    def bench(path, scores):  # a bench report's rows
        path.mkdir(parents=True)
        (path / "report.json").write_text(json.dumps({"rows": [{"task": t, "score": v} for t, v in scores.items()]}))

    bench(tmp_path / "before", {"walker-run": 10.0, "cheetah-run": 20.0})  # the old tasks, before
    bench(tmp_path / "pointmass-easy" / "ft-s1" / "old3", {"walker-run": 12.0, "cheetah-run": 20.0})
    bench(tmp_path / "pointmass-easy" / "ft-s2" / "old3", {"walker-run": 10.0, "cheetah-run": 22.0})
    r = CliRunner().invoke(study, ["report", str(tmp_path), "--plot", str(tmp_path / "c.png"), "--teacher-bench",
                                   str(tmp_path / "before" / "report.json"), "--old-bench", "old3"])
    assert r.exit_code == 0, r.output
    old = next(x for x in r.output.splitlines() if x.startswith("| pointmass-easy | ft | 2 | 16.00"))
    assert "| +1.00 [" in old, old  # task-paired: (12 + 20 + 10 + 22) / 4 - 15
    row = next(x for x in r.output.splitlines() if "| ft |" in x)
    # final: the mean of the last 3 evals; scratch's is 46.7 for both seeds; the fine-tuned mean curve (45, 67.5,
    # 85.5, 93) first reaches it at 1000 steps, 0.50 of the from-scratch run's 2000; its finals are 87 and 77
    assert "| 1000 | 0.50 |" in row and "| 82.0 (87, 77) |" in row, row
    assert "| 45.0 | 85.5 |" in row  # the first eval (the start), and after the default seed phase: the eval at 1500
    early = next(x for x in r.output.splitlines() if "| ft-prior |" in x)
    assert "| 80.0 |" in early and "| 500 | 0.25 |" in early, early
    now = next(x for x in r.output.splitlines() if "| ft-return-prior |" in x)
    assert "| 60.0 | 60.0 |" in now, now  # no seed phase: the first eval is already after it
    held = next(x for x in r.output.splitlines() if "| ft-return-replay-anchor |" in x)
    assert "| 500 | 0.25 |" in held and "| 60.3 (60) |" in held, held  # every kind has its row and its curve
    assert (tmp_path / "c.png").stat().st_size > 0


def test_subset_report_compares_students_with_the_teacher_on_their_tasks(tmp_path):
    from edge_tdmpc.bench.finetune_study import main as study
    tasks = ("cartpole-swingup", "cartpole-balance")

    def bench(path, scores):  # a bench report's rows
        path.mkdir(parents=True)
        rows = [{"task": t, "score": v, "latency_ms": {"p50": 1.0}, "size_mib": 2.0} for t, v in scores.items()]
        (path / "report.json").write_text(json.dumps({"rows": rows}))

    teacher = make_tiny_model("mt30", seed=1)
    save_model(teacher, tmp_path / "teacher.pt")
    bench(tmp_path / "t-prior", {"cartpole-swingup": 40.0, "cartpole-balance": 80.0, "walker-run": 10.0})
    bench(tmp_path / "t-plan", {"cartpole-swingup": 50.0, "cartpole-balance": 90.0, "walker-run": 20.0})
    student = subset_model(teacher, tasks)
    for seed, (a, b) in {1: (30.0, 90.0), 2: (50.0, 70.0)}.items():
        d = tmp_path / "runs" / f"reward+planner-s{seed}"
        d.mkdir(parents=True)
        save_model(student, d / "student.pt")
        bench(d / "bench-no-mpc", {"cartpole-swingup": a, "cartpole-balance": b})
    args = ["subset", str(tmp_path / "runs"), "--teacher", str(tmp_path / "teacher.pt"), "--teacher-prior",
            str(tmp_path / "t-prior" / "report.json")]
    r = CliRunner().invoke(study, [*args, "--teacher-planner", str(tmp_path / "t-plan" / "report.json")])
    assert r.exit_code == 0, r.output
    row = next(x for x in r.output.splitlines() if x.startswith("| reward+planner |"))
    # prior 60 against the teacher's prior 60 (its walker-run left out) and planner 70; no planner bench
    n = load_model(tmp_path / "runs" / "reward+planner-s1" / "student.pt").total_params
    assert f"| {n:,} (" in row and "| 2 | 60.00 [" in row and "| 100% / 86% | – |" in row, row
    assert "| reward+planner - teacher | +0.00 [" in r.output
    assert "| reward+planner / teacher (share of its prior) | 100% [" in r.output
    bench(tmp_path / "t-short", {"cartpole-swingup": 40.0})
    r = CliRunner().invoke(study, [*args[:-1], str(tmp_path / "t-short" / "report.json")])
    assert r.exit_code != 0 and "lack cartpole-balance" in r.output


def test_anchor_holds_the_prior_to_the_start_and_resumes_with_it(base, tmp_path):
    from edge_tdmpc.tasksets import add_task
    start = add_task(load_model(base), "pointmass-easy", "reacher-easy").float()
    g = torch.Generator().manual_seed(0)
    obs, t = torch.randn(64, 6, generator=g), torch.full((64,), 2)

    def drift(out):  # how far the prior's eval-mode actions on the new task moved from the start's
        m = load_model(out / "model.pt").float()
        with torch.no_grad():
            return (m.pi_head(m.encode(obs, t), t)[0] - start.pi_head(start.encode(obs, t), t)[0]).abs().mean()

    settings = dict(init_from="reacher-easy", progress=False, echo=lambda *a: None, **QUICK)
    free = finetune(base, "pointmass-easy", tmp_path / "free", **settings)
    held = finetune(base, "pointmass-easy", tmp_path / "held", anchor_coef=1000.0, **settings)
    assert free["updates"] == held["updates"] == 59
    assert drift(tmp_path / "held") < 0.5 * drift(tmp_path / "free")
    run = json.loads((tmp_path / "held" / "run.json").read_text())
    assert run["anchor_coef"] == 1000.0 and run["train"]["distill"] == ["policy"]
    rows = [json.loads(x) for x in (tmp_path / "held" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["distill_policy_loss"]) for r in rows if r["kind"] == "train")
    # resumed halfway, the anchor is the start again (the row measured at the first update, not the checkpoint it
    # resumes from): the same run, bit for bit
    other = tmp_path / "other.pt"  # the old tasks in the other order, so the row measured is not the first
    save_model(subset_model(make_tiny_model("mt30", seed=3), OLD[::-1]), other)
    auto = dict(settings, init_from="auto", anchor_coef=1000.0)
    whole = finetune(other, "pointmass-easy", tmp_path / "whole", **auto)
    assert whole["init_from"] != OLD[-1]  # not the row the run holds before it measures
    finetune(other, "pointmass-easy", tmp_path / "half", **{**auto, "steps": 40})
    finetune(other, "pointmass-easy", tmp_path / "half", resume=True, **auto)
    a, b = (load_model(tmp_path / d / "model.pt").state_dict() for d in ("whole", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_self_labels_are_the_live_models_planner_on_the_steps_the_prior_acts_in(base):
    from edge_tdmpc.distill.collect import play
    from edge_tdmpc.planner import Agent
    from edge_tdmpc.seeding import derive_seed
    model = load_model(base).float()
    obs, action, _, labels = play(model, "reacher-easy", 1, 5, 6, mpc=False, label_every=2)
    assert labels.shape == (6, 3 * model.cfg.action_dim)
    assert np.isnan(labels[1::2]).all() and np.isfinite(labels[::2]).all()
    replan = Agent(model, seed=derive_seed(5, 1))  # a cold start at each labelled step, its noise drawn in turn
    for t in (0, 2, 4):
        replan.act(obs[t], t0=True, eval_mode=True, task=1)
        assert np.array_equal(labels[t], replan.last_label.row()), t
    every = play(model, "reacher-easy", 1, 5, 4, mpc=False, label_every=1)[3]  # K 1: its own warm start
    warm = Agent(model, seed=derive_seed(5, 1))
    for t in range(4):
        warm.act(obs[t], t0=t == 0, eval_mode=True, task=1)
        assert np.array_equal(every[t], warm.last_label.row()), t
    plain = play(model, "reacher-easy", 1, 5, 6, mpc=False)
    assert plain[3] is None and np.array_equal(plain[1], action)  # the labeller does not change how the prior acts
    assert np.isnan(play(model, "reacher-easy", 1, 5, 4, mpc=False, random_actions=True, label_every=2)[3]).all()
    with pytest.raises(ValueError, match="a planning agent's labels are its own"):
        play(model, "reacher-easy", 1, 5, 4, mpc=True, label_every=2)


def test_self_labels_reach_the_batch_rows_of_the_new_task_and_resume(base, tmp_path):
    from edge_tdmpc.distill.data import EpisodeDataset
    from edge_tdmpc.distill.finetune import BatchLabels
    # a mixed batch: the new task's rows read the replay's labels, the old rows the data's (or none)
    data = EpisodeDataset(_old_data(tmp_path / "old", labels=True))
    replay = Replay(6, 2, batch_size=5, seed=0, label_dim=6)
    rows = np.arange(20 * 6, dtype=np.float32).reshape(20, 6) / 100
    rows[1::2] = np.nan
    replay.add(np.zeros((21, 4)), np.zeros((20, 2)), np.zeros(20), 2, rows)
    b = MixedSampler(replay, data, (*OLD, "pointmass-easy"), 12, seed=1).sample()
    got = BatchLabels(2, True, data, replay).lookup(b.index)
    new = -1 - b.index[:5]
    assert torch.equal(got[:5].nan_to_num(-9), torch.from_numpy(rows[new.numpy()]).nan_to_num(-9))
    from edge_tdmpc.distill.labels import FieldLabels
    assert torch.equal(got[5:], FieldLabels(data).lookup(b.index[5:]))
    assert torch.isnan(BatchLabels(2, True, None, replay).lookup(b.index)[5:]).all()
    # the run: the planner term on the self-labelled rows; stopped halfway and resumed, the same run bit for bit
    settings = dict(init_from="reacher-easy", self_label_every=3, planner_coef=5.0, progress=False,
                    echo=lambda *a: None, **QUICK)
    whole = finetune(base, "pointmass-easy", tmp_path / "whole", **settings)
    assert whole["updates"] == 59
    run = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert run["self_label_every"] == 3 and run["train"]["distill"] == ["planner"]
    train = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["distill_planner_loss"] for r in train if r["kind"] == "train"]
    assert all(np.isfinite(losses)) and max(losses) > 0
    finetune(base, "pointmass-easy", tmp_path / "half", **{**settings, "steps": 40})
    finetune(base, "pointmass-easy", tmp_path / "half", resume=True, **settings)
    a, b = (load_model(tmp_path / d / "model.pt").state_dict() for d in ("whole", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    free = finetune(base, "pointmass-easy", tmp_path / "free", **{**settings, "self_label_every": 0})
    c = load_model(tmp_path / "free" / "model.pt").state_dict()
    assert free["updates"] == 59 and not all(torch.equal(a[k], c[k]) for k in a)  # the term moved the update
    finetune(base, "pointmass-easy", tmp_path / "q", **{**settings, "planner_filter": "q"})  # the Q filter on them
    rows = [json.loads(x) for x in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    kept = [r["distill_planner_kept"] for r in rows if r["kind"] == "train"]
    assert kept and all(0 <= k <= 1 for k in kept)
    assert json.loads((tmp_path / "q" / "run.json").read_text())["train"]["planner_filter"] == "q"
