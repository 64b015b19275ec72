"""The demo end to end: --quick in the default run (CI), the full budget under -m slow; online `train` basics."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edge_tdmpc import load_model
from edge_tdmpc.bench.demo import QUICK, demo
from edge_tdmpc.cli import main
from edge_tdmpc.distill.online import Replay, train

TASKS = "cartpole-balance,cartpole-swingup"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_replay_slices_stay_inside_episodes():
    r = Replay(obs_dim=2, action_dim=1, horizon=3, batch_size=500, seed=0)
    for e, T in enumerate([3, 10, 5]):  # obs encode (episode, t)
        obs = np.stack([np.full(T + 1, e), np.arange(T + 1)], 1)
        r.add(obs, np.zeros((T, 1)), np.arange(T), task=e % 2)
    b = r.sample()
    ep, t = b.obs[..., 0], b.obs[..., 1]
    assert (ep == ep[0]).all()                                     # one episode per slice
    assert (t[1:] - t[:-1] == 1).all() and (t[-1] <= torch.tensor([3, 10, 5])[ep[0].long()]).all()
    assert set(ep[0].long().tolist()) == {0, 1, 2}
    assert torch.equal(b.reward[..., 0], t[:-1])                   # reward[t] follows obs[t]
    state = r.state_dict()
    again = Replay(2, 1, 3, 500, seed=9)
    again.load_state_dict(state)
    assert torch.equal(again.sample().obs, r.sample().obs)


def test_online_train_resumes_and_writes_model_and_replay(tmp_path):
    kw = dict(size=None, steps=300, seed_steps=100, episode_steps=50, batch_size=32, save_every=100, log_every=50,
              dims=dict(enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2, task_dim=8), progress=False)
    full = train(TASKS, tmp_path / "full", **kw)
    # official schedule: seed_steps updates at global step 100, then one per step for steps 101..299
    assert full["env_steps"] == 300 and full["updates"] == 100 + 199
    train(TASKS, tmp_path / "part", **{**kw, "steps": 150})
    with pytest.raises(ValueError, match="--resume"):
        train(TASKS, tmp_path / "part", **kw)
    with pytest.raises(ValueError, match="other settings .*utd=1.0, now 2.0"):
        train(TASKS, tmp_path / "part", resume=True, **{**kw, "utd": 2.0})
    train(TASKS, tmp_path / "part", resume=True, **kw)
    a, b = (load_model(tmp_path / d / "model.pt", tasks=TASKS).state_dict() for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from edge_tdmpc.distill.data import EpisodeDataset
    ds = EpisodeDataset(tmp_path / "full" / "replay")
    assert ds.num_transitions == 300 and ds.tasks == tuple(TASKS.split(","))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "episode" for r in rows) == 6
    run = json.loads((tmp_path / "full" / "run.json").read_text())  # the settings by their flags' names
    assert (run["seed_steps"], run["episode_steps"], run["log_every"], run["dims"]) == (100, 50, 50, kw["dims"])


def test_online_settings_are_checked_where_they_are_declared(tmp_path):
    from edge_tdmpc.distill.online import OnlineOptions
    for bad, flag in ((dict(steps=0), "--steps"), (dict(episode_steps=3), "--episode-steps"), (dict(utd=0), "--utd"),
                      (dict(utd=float("nan")), "--utd"), (dict(seed_steps=-1), "--seed-steps"),
                      (dict(size="huge"), "--size"), (dict(dims="width=3"), "--dims"),
                      (dict(save_every=0), "--save-every")):
        with pytest.raises(ValueError, match=flag):
            OnlineOptions(**bad)
        with pytest.raises(ValueError, match=flag):
            train(TASKS, tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_quick_demo_runs_end_to_end(tmp_path):
    report = demo(tmp_path, quick=True, workers=0, echo=lambda *a: None, progress=False)
    text = report.read_text()
    for name in ("teacher", "student", "baseline"):
        assert f"| {name} | policy | torch | fp32 |" in text
    assert (tmp_path / "training.png").is_file() and (tmp_path / "returns.png").is_file()
    student = load_model(tmp_path / "student" / "student.pt", tasks=TASKS)
    assert student.cfg.mlp_dim == dict(QUICK.student_dims)["mlp_dim"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert not [r["error"] for r in bench["rows"] if "error" in r]  # every runtime/precision row ran
    assert {(r["runtime"], r["precision"]) for r in bench["rows"]} == set(QUICK.runtimes)
    assert all(np.isfinite(r["mean_return"]) for r in bench["rows"])
    assert "| student | policy | onnxruntime | fp32 |" in text
    assert "## The student's prior against the teacher" in text and "| teacher | policy prior |" in text
    run = json.loads((tmp_path / "student" / "run.json").read_text())  # planner-labelled data: the planner term
    assert run["distill"] == ["reward", "planner"]
    assert json.loads((tmp_path / "baseline" / "run.json").read_text())["d_coef"] == 0
    # a rerun resumes: every stage is skipped (through the command a user types)
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--quick", "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.output.count("skipped") == 5 and f"report: {report}" in r.output


@pytest.mark.slow
def test_full_demo(tmp_path):
    report = demo(tmp_path, workers=2, echo=print)
    assert "distilled student" in report.read_text()


def test_train_cli(tmp_path):
    from click.testing import CliRunner

    from edge_tdmpc.cli import main
    args = ["train", "--tasks", "cartpole-balance", "--size", "custom", "--dims", "enc_dim=32,mlp_dim=32,latent_dim=16",
            "--steps", "60", "--seed-steps", "40", "--episode-steps", "20", "--batch-size", "16", "--out",
            str(tmp_path / "t"), "--no-progress", "--log-every", "10"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "t" / "model.pt", tasks="cartpole-balance").cfg.latent_dim == 16
    bad = [("mlp_dim=lots" if a.startswith("enc_dim") else a) for a in args]
    r = CliRunner().invoke(main, [a.replace(str(tmp_path / "t"), str(tmp_path / "u")) for a in bad])
    assert r.exit_code == 2 and "bad --dims entry" in r.output
