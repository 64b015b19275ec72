"""Fixed-rate control: action filter, fallback, the simulated deadline and the threaded robot loop, with a
real runtime (the tiny model through the torch runtime)."""
import math
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_tiny_model

from edge_tdmpc import save_model
from edge_tdmpc.bench import run_bench
from edge_tdmpc.cli import main
from edge_tdmpc.control import ActionFilter, DeadlineSim, Fallback, RealtimeLoop, shift_mean
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.runtime import TorchRuntime

SMALL = PlannerConfig(num_samples=64, num_elites=16, iterations=2)
TASK = 10  # cartpole-swingup: 5 observations, 1 action


def _runtime(seed=3, **planner):
    return TorchRuntime(make_tiny_model(), "fp32", PlannerConfig.make(**{**vars(SMALL), **planner}), seed=seed)


def _observations(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 5)).astype(np.float32)


def test_action_filter():
    f = ActionFilter(smooth=0.5)
    assert f([0.8]).tolist() == pytest.approx([0.8])  # an episode's first action passes as planned
    assert f([0.0]).tolist() == pytest.approx([0.4])
    assert f([0.0]).tolist() == pytest.approx([0.2])
    f.reset()
    assert f([-0.6]).tolist() == pytest.approx([-0.6])
    limit = ActionFilter(rate_limit=0.1)
    limit([0.0, 0.0])
    assert limit([1.0, -0.05]).tolist() == pytest.approx([0.1, -0.05])
    assert limit([1.0, -1.0]).tolist() == pytest.approx([0.2, -0.15])
    assert ActionFilter(smooth=1.0)([2.0]).tolist() == [1.0]  # always within the action bounds
    assert not ActionFilter().active and ActionFilter(smooth=0.3).active
    for bad in (dict(smooth=0), dict(smooth=1.5), dict(rate_limit=0)):
        with pytest.raises(ValueError, match="smoothing alpha|rate limit"):
            ActionFilter(**bad)


def test_fallback_follows_the_plan_then_holds_its_last_step():
    mean = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 2.0]], np.float32)
    plan = Fallback("plan")
    with pytest.raises(RuntimeError, match="no plan has landed"):
        plan()
    plan.fresh([0.9, 0.9], mean)
    assert [plan().tolist() for _ in range(3)] == [pytest.approx([0.3, 0.4]), [0.5, 1.0], [0.5, 1.0]]
    plan.fresh([0.9, 0.9], mean, age=1)  # made from the observation of one tick ago
    assert plan().tolist() == [0.5, 1.0]
    hold = Fallback("hold")
    hold.fresh([0.9, -0.2], mean)
    assert hold().tolist() == hold().tolist() == pytest.approx([0.9, -0.2])
    with pytest.raises(ValueError, match="unknown fallback 'zero'"):
        Fallback("zero")
    with pytest.raises(ValueError, match="fallback 'policy' needs a policy"):
        Fallback("policy")


def test_without_a_deadline_the_runtime_acts_unchanged():
    obs = _observations(8)
    ref, sim = _runtime(), DeadlineSim(_runtime())
    sim.reset(3)
    for t, x in enumerate(obs):
        assert np.array_equal(sim.act(x, TASK, t0=t == 0), ref.act(x, TASK, t0=t == 0))
    assert all(sim.stats.fresh) and len(sim.stats.plan_ms) == 8


@pytest.mark.parametrize("mode", ["plan", "hold", "policy"])
def test_a_late_plan_lands_later_and_the_ticks_between_take_the_fallback(mode):
    """25 ms plans at 100 Hz land 2 ticks late; the first plan of an episode is waited for, as on the robot."""
    obs = _observations(10)
    sim = DeadlineSim(_runtime(), hz=100, fallback=mode, latency_ms=25,
                      policy=_runtime(mpc=False) if mode == "policy" else None)
    sim.reset(3)
    got = [sim.act(x, TASK, t0=t == 0) for t, x in enumerate(obs)]
    assert sim.stats.fresh == [True, False, False, True, False, False, True, False, False, True]
    assert len(sim.stats.plan_ms) == 4  # the planner ran at ticks 0, 1, 4 and 7
    ref = _runtime()
    a0 = ref.act(obs[0], TASK, t0=True)
    mean0 = ref.planned_mean()
    a1 = ref.act(obs[1], TASK, t0=False)  # started at tick 1, lands at tick 3
    ref.advance_mean(2)  # the next plan starts at tick 4: 3 ticks on, the mean moves 2 more than one step
    a4 = ref.act(obs[4], TASK, t0=False)
    assert np.array_equal(got[0], a0) and np.array_equal(got[3], a1) and np.array_equal(got[6], a4)
    if mode == "plan":
        assert np.allclose(got[1], mean0[1]) and np.allclose(got[2], mean0[2])
        assert not np.allclose(got[1], a0)
    elif mode == "policy":  # the policy prior's mean action on each late tick's own observation
        pi = _runtime(mpc=False)
        for t in (1, 2, 4, 5):
            assert np.array_equal(got[t], pi.act(obs[t], TASK, t0=False, eval_mode=True))
        assert not np.allclose(got[1], got[2])
    else:
        assert np.array_equal(got[1], a0) and np.array_equal(got[2], a0)
    # a new episode starts afresh: its first plan is waited for again
    sim.reset(3)
    assert np.array_equal(sim.act(obs[0], TASK, t0=True), a0)


def test_deadline_that_fits_and_filter():
    obs = _observations(6)
    sim = DeadlineSim(_runtime(), hz=100, latency_ms=9.9, action_filter=ActionFilter(smooth=0.5))
    sim.reset(3)
    got = [sim.act(x, TASK, t0=t == 0)[0] for t, x in enumerate(obs)]
    assert all(sim.stats.fresh)
    ref = _runtime()
    raw = [ref.act(x, TASK, t0=t == 0)[0] for t, x in enumerate(obs)]
    want = [raw[0]]
    for u in raw[1:]:
        want.append(want[-1] + 0.5 * (u - want[-1]))
    assert got == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="control rate must be positive"):
        DeadlineSim(ref, hz=0)


def test_advance_mean_shifts_in_place():
    rt = _runtime()
    rt.act(_observations(1)[0], TASK, t0=True)
    before, buf = rt.planned_mean(), rt.prev_mean
    rt.advance_mean(1)
    assert rt.prev_mean is buf  # same buffer (a CUDA graph reads it in place)
    assert np.array_equal(rt.planned_mean()[:-1], before[1:]) and not rt.planned_mean()[-1].any()
    rt.advance_mean(10)
    assert not rt.planned_mean().any()
    mean = np.arange(6, dtype=np.float32).reshape(3, 2)  # numpy means (ONNX Runtime, TensorRT) too
    shift_mean(mean, 2)
    assert mean.tolist() == [[4, 5], [0, 0], [0, 0]]


def test_policy_only_runtime_falls_back_to_holding():
    rt = _runtime(mpc=False)
    rt.act(_observations(1)[0], TASK, t0=True)
    assert rt.planned_mean() is None  # its warm-start mean is never written: not a plan to follow
    assert _runtime().planned_mean() is not None


def test_realtime_loop_sends_an_action_every_tick():
    rt, obs = _runtime(), _observations(1)[0]
    sent = []
    stats = RealtimeLoop(rt, hz=200, sense=lambda: obs, actuate=sent.append, task=TASK,
                         action_filter=ActionFilter(rate_limit=0.5)).run(40)
    assert len(sent) == stats["ticks"] == 40
    assert stats["fresh"] + stats["fallback"] == 40 and stats["fresh"] >= 1
    assert stats["plan_ms_p50"] > 0 and "late_ms_p99" in stats
    a = np.stack(sent)
    assert a.shape == (40, rt.agent.model.cfg.action_dim) and np.abs(a).max() <= 1
    assert np.abs(np.diff(a, axis=0)).max() <= 0.5 + 1e-6  # the rate limit held on every tick


def test_realtime_loop_sends_each_ticks_own_plan_when_it_fits():
    """Plans far inside the period: every tick waits for the plan of its own observation, so the loop sends
    exactly the actions of the runtime called in step (same seed); none is a tick stale. The period is 30x the
    slowest of the reference's plans on this machine as it is now (at least 200 ms; the first tick has no
    deadline), so that a loaded machine still plans in time: the test measures no speed, it needs the plans to fit."""
    ref, want, slowest = _runtime(), [], 0.0
    for t, x in enumerate(_observations(8)):
        start = time.perf_counter()
        want.append(ref.act(x, TASK, t0=t == 0))
        slowest = max(slowest, (time.perf_counter() - start) * (t > 0))
    obs = iter(_observations(8))
    sent = []
    hz = 1 / min(max(30 * slowest, 0.2), 10.0)
    stats = RealtimeLoop(_runtime(), hz=hz, sense=lambda: next(obs), actuate=sent.append, task=TASK).run(8)
    assert stats["fresh"] == 8
    assert all(np.array_equal(a, b) for a, b in zip(sent, want))


def test_budget():
    obs = _observations(6)
    sim = DeadlineSim(_runtime(), hz=100, latency_ms=9, budget=0.5)  # 9 ms > half of the 10 ms period
    sim.reset(3)
    for t, x in enumerate(obs):
        sim.act(x, TASK, t0=t == 0)
    assert sim.stats.fresh == [True, False, True, False, True, False]
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="budget is the fraction of the control period"):
            DeadlineSim(_runtime(), hz=100, budget=bad)


def test_realtime_loop_raises_the_planners_error():
    bad = np.zeros(7, np.float32)  # cartpole has 5 observations, the model 24
    loop = RealtimeLoop(_runtime(), hz=100, sense=lambda: bad, actuate=lambda a: None, task=TASK)
    with pytest.raises(RuntimeError, match="planner failed at tick 0: observation has 7 entries"):
        loop.run(5)


def test_bench_realtime(tmp_path):
    rep = run_bench(make_tiny_model(), tmp_path / "rt", tasks="cartpole-swingup", episodes=1, steps=20,
                    planner=vars(SMALL), workers=1, hz=100, realtime=True, latency_ms=25, progress=False,
                    echo=lambda *_: None)
    (s,) = rep["summary"]
    fresh = math.ceil(20 / 3)  # every third tick: 2 of 3 ticks take the fallback
    assert s["fallback_rate"] == pytest.approx(1 - fresh / 20)
    assert rep["settings"]["control"] == {"hz": 100, "fallback": "hold", "smooth": 1.0, "rate_limit": None,
                                          "latency_ms": 25, "budget": 1.0}
    assert "fallback ticks" in (tmp_path / "rt" / "report.md").read_text()
    pi = run_bench(make_tiny_model(), tmp_path / "pi", tasks="cartpole-swingup", episodes=1, steps=20,
                   planner=vars(SMALL), workers=1, hz=100, latency_ms=25, fallback="policy", progress=False,
                   echo=lambda *_: None)  # the policy prior acts on the late ticks, in the bench's worker
    assert pi["summary"][0]["fallback_rate"] == s["fallback_rate"]
    assert pi["rows"][0]["returns"] != rep["rows"][0]["returns"]
    for kwargs, message in ((dict(realtime=True), "need --hz"), (dict(hz=100, latency_ms=-1), "must be positive"),
                            (dict(smooth=0.0), "smoothing alpha"), (dict(hz=10, realtime=True, budget=2), "budget")):
        with pytest.raises(ValueError, match=message):
            run_bench(make_tiny_model(), tmp_path / "bad", tasks="cartpole-swingup", episodes=1, steps=5,
                      progress=False, echo=lambda *_: None, **kwargs)


def test_bench_cli_control_options(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    save_model(make_tiny_model(), ckpt)
    args = ["bench", str(ckpt), "--tasks", "cartpole-swingup", "--episodes", "1", "--steps", "12", "--workers", "1",
            "--samples", "64", "--elites", "16", "--iterations", "2"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--hz", "100", "--latency-ms", "15",
                                    "--fallback", "hold", "--smooth", "0.5", "--rate-limit", "0.3", "--budget", "1"])
    assert res.exit_code == 0, res.output
    assert "fallback ticks 50.0%" in res.output  # 15 ms at 100 Hz: every plan lands one tick late
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--realtime"])
    assert res.exit_code == 2 and "need --hz" in res.output and len(res.output.strip().splitlines()) == 1


def test_wallclock_loop_agrees_with_simulated_time():
    """The robot loop on a real clock (a DMC task as the plant) and the bench's simulated time, tiny model."""
    from edge_tdmpc.bench.wallclock import compare
    res = compare(make_tiny_model(), "cartpole-swingup", hz=20, ticks=15, runtime="torch")
    for r in res.values():
        assert r["ticks"] == 15 and r["fresh"] + r["fallback"] == 15 and np.isfinite(r["return"])
    assert res["wall"]["late_ms_p99"] >= 0 and "late_ms_p99" not in res["sim"]
