"""Faults and bad input: non-finite observations, non-finite weights, a second writer, killed parents, the umask.

Each case asserts the exit code or the error's one line, and that what was there before is intact."""
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from helpers import SMALL, make_tiny_model

from edge_tdmpc import load_model, save_model
from edge_tdmpc.cli import main
from edge_tdmpc.compile.runtimes import compiled_runtime
from edge_tdmpc.control import RealtimeLoop
from edge_tdmpc.envs import episode_env
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.rollout import run, runtime_actor
from edge_tdmpc.runtime import TorchRuntime

TASK = 10  # cartpole-swingup: 5 observations, 1 action
NAN = np.full(5, np.nan, np.float32)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model()


def _obs(seed):
    return np.random.default_rng(seed).standard_normal(5).astype(np.float32)


def _runtimes(model):
    return {"torch": TorchRuntime(model, "fp32", SMALL, seed=3),
            "onnxruntime": compiled_runtime("onnxruntime", model, "fp32", SMALL, seed=3)}


def test_nonfinite_observation_gets_the_same_flagged_safe_action_everywhere(tiny):
    """torch and ONNX Runtime: zeros before the first action of an episode, then the last action held; flagged
    and counted; nothing planned, so the warm start and the noise stream go on as if the step never came."""
    for name, rt in _runtimes(tiny).items():
        rt.reset(3)
        for bad in (NAN, np.array([0, np.inf, 0, 0, 0], np.float32), np.array([0, 0, 1e30, 0, 0], np.float32)):
            assert np.array_equal(rt.act(bad, TASK, t0=True), np.zeros(6, np.float32)) and rt.flagged, name
        a1 = rt.act(_obs(1), TASK, t0=True)
        assert not rt.flagged and np.abs(a1).max() > 0
        assert np.array_equal(rt.act(NAN, TASK, t0=False), a1) and rt.flagged and rt.nonfinite == 4, name
        a2 = rt.act(_obs(2), TASK, t0=False)
        ref = _runtimes(tiny)[name]  # the same episode without the bad steps
        ref.reset(3)
        assert np.array_equal(ref.act(_obs(1), TASK, t0=True), a1)
        assert np.array_equal(ref.act(_obs(2), TASK, t0=False), a2), name
        rt.reset(3)  # a new episode has no action to hold yet
        assert np.array_equal(rt.act(NAN, TASK, t0=True), np.zeros(6, np.float32))


def test_a_finite_but_absurd_observation_is_refused_alike_by_every_runtime(tiny):
    """1e30 overflows the encoder's LayerNorm: PyTorch's prior would return NaN, ONNX Runtime's a finite action.
    Past control.OBS_LIMIT both give the safe action, flagged; up to it both act, and agree."""
    from edge_tdmpc.control import OBS_LIMIT
    prior = PlannerConfig.make(mpc=False)
    runtimes = {"torch": TorchRuntime(tiny, "fp32", prior, seed=3),
                "onnxruntime": compiled_runtime("onnxruntime", tiny, "fp32", prior, seed=3)}
    edge = np.array([OBS_LIMIT, 0, 0, 0, 0], np.float32)
    acts = {}
    for name, rt in runtimes.items():
        rt.reset(3)
        assert np.array_equal(rt.act(np.array([0, 1e30, 0, 0, 0], np.float32), TASK, t0=True), np.zeros(6)), name
        assert rt.flagged and rt.nonfinite == 1, name
        acts[name] = rt.act(edge, TASK, t0=True)
        assert not rt.flagged and np.isfinite(acts[name]).all(), name
    np.testing.assert_allclose(acts["torch"], acts["onnxruntime"], atol=1e-4)


class _BrokenSensor:
    """A real env whose observations are NaN on the given steps (a sensor dropping out)."""

    def __init__(self, env, bad_steps):
        self.env, self.bad, self.t = env, set(bad_steps), 0
        self.action_dim = env.action_dim

    def step(self, action):
        obs, *rest = self.env.step(action)
        self.t += 1
        return (np.full_like(obs, np.nan) if self.t in self.bad else obs), *rest

    def close(self):
        self.env.close()


def test_deploy_bundle_planner_gives_the_same_flagged_safe_action(tiny):
    """The deploy bundle's Planner (compile/trt.py as build_engine.py, the robot's loop) over the compiled step
    graph, executed by ONNX Runtime behind the engine's interface where TensorRT is not installed: the same safe
    action and flag as every runtime above, nothing planned on a refused observation, and a non-finite action from
    the engine answered the same way."""
    from edge_tdmpc.compile.trt import Planner
    rt = compiled_runtime("onnxruntime", tiny, "fp32", SMALL, seed=3)

    class OnnxEngine:  # trt.Engine's interface: host buffers of the graph's inputs, filled as Engine.run fills them
        poison = False

        def __init__(self):
            self.inputs = rt.feed(np.zeros(5, np.float32), TASK, True)

        def run(self, feeds):
            for name, host in self.inputs.items():
                np.copyto(host, np.asarray(feeds[name]).reshape(host.shape), casting="unsafe")
            out = rt.session.run(self.inputs)
            if self.poison:  # what a diverged engine returns
                out = {k: np.full_like(v, np.nan) for k, v in out.items()}
            return out

    engine = OnnxEngine()
    p = Planner(engine, seed=0, num_q=tiny.cfg.num_q)
    pad = lambda x: np.concatenate([x, np.zeros(rt.obs_dim - 5, np.float32)])  # noqa: E731
    for bad in (NAN, np.array([0, np.inf, 0, 0, 0], np.float32), np.array([0, 0, 1e30, 0, 0], np.float32)):
        assert np.array_equal(p.act(pad(bad), TASK, t0=True), np.zeros(rt.action_dim, np.float32)) and p.flagged
        assert not p.planned_mean().any()  # nothing planned
    a1 = p.act(pad(_obs(1)), TASK, t0=True)
    assert not p.flagged and np.isfinite(a1).all() and np.abs(a1).max() > 0 and p.planned_mean().any()
    mean = p.planned_mean()
    assert np.array_equal(p.act(pad(NAN), TASK), a1) and p.flagged and p.nonfinite == 4
    assert np.array_equal(p.planned_mean(), mean)  # the warm start stays where it was
    engine.poison = True
    assert np.array_equal(p.act(pad(_obs(2)), TASK), a1) and p.flagged and p.nonfinite == 5
    engine.poison = False
    p.reset()
    assert np.array_equal(p.act(pad(NAN), TASK, t0=True), np.zeros(rt.action_dim, np.float32))


def test_rollout_counts_nonfinite_observations_and_the_runtime_holds(tiny):
    rt = TorchRuntime(tiny, "fp32", SMALL, seed=0)
    rt.reset(0)
    env, obs = episode_env("cartpole-swingup", 1)
    ep = run(_BrokenSensor(env, {3, 4, 7}), obs, runtime_actor(rt, tiny.cfg, "cartpole-swingup"), 10)
    assert ep.nonfinite == 3 and rt.nonfinite == 3 and np.isfinite(ep.rewards).all()
    assert np.array_equal(ep.actions[3], ep.actions[2]) and np.array_equal(ep.actions[4], ep.actions[2])
    assert np.array_equal(ep.actions[7], ep.actions[6])


def test_realtime_loop_counts_nonfinite_observations(tiny):
    rt = TorchRuntime(tiny, "fp32", SMALL, seed=0)
    sent, ticks = [], iter(range(100))

    def sense():
        return NAN if next(ticks) in (2, 3) else _obs(0)
    stats = RealtimeLoop(rt, hz=20, sense=sense, actuate=sent.append, task=TASK).run(6)
    assert stats["nonfinite"] == 2 and len(sent) == 6 and all(np.isfinite(a).all() for a in sent)


def test_model_with_nonfinite_weights_is_refused_at_load(tiny, tmp_path):
    bad = make_tiny_model()
    with torch.no_grad():
        bad._dynamics[0].weight[0, 0] = float("nan")
    save_model(bad, tmp_path / "nan.pt")
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "nan.pt"), "--tasks", "cartpole-swingup", "--steps", "2"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "hold NaN or Inf" in res.output and "use an earlier checkpoint" in res.output


def test_bench_refuses_a_nan_rate_and_a_second_writer(tiny, tmp_path):
    save_model(tiny, tmp_path / "tiny.pt")
    args = ["bench", str(tmp_path / "tiny.pt"), "--tasks", "cartpole-swingup", "--episodes", "1", "--steps", "3",
            "--workers", "1", "--samples", "64", "--elites", "16", "--iterations", "2"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--hz", "nan"])
    assert res.exit_code == 2 and "--hz must be positive" in res.output
    out = tmp_path / "b"
    out.mkdir()
    import fcntl
    with open(out / ".lock", "a") as held:  # another bench holds this --out
        fcntl.flock(held, fcntl.LOCK_EX)
        res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 2 and "is being written by another process" in res.output
    assert not (out / "episodes.jsonl").exists()
    res = CliRunner().invoke(main, [*args, "--out", str(out)])  # once it is free, it runs
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command", ["bench", "collect"])
def test_kill_9_leaves_no_worker(command, tiny, tmp_path):
    """kill -9 of `bench` or `data collect` (the parent alone): its spawned workers exit too, by pid."""
    save_model(tiny, tmp_path / "tiny.pt")
    tasks = "cartpole-swingup,walker-walk"
    args = {"bench": ["bench", str(tmp_path / "tiny.pt"), "--tasks", tasks, "--episodes", "4", "--workers", "2",
                      "--out", str(tmp_path / "run")],
            "collect": ["data", "collect", "--teacher", str(tmp_path / "tiny.pt"), "--tasks", tasks, "--episodes",
                        "4", "--workers", "2", "--out", str(tmp_path / "data")]}[command]
    proc = subprocess.Popen([sys.executable, "-m", "edge_tdmpc.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, children = time.time() + 120, []
        while time.time() < deadline and len(children) < 2:  # the spawned workers (resource tracker aside)
            children = [c for c in psutil.Process(proc.pid).children()
                        if "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.1)
        assert len(children) >= 2, "the command should have started its workers"
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone: its workers are orphaned
    finally:
        proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)  # a worker still importing torch exits once it can
    assert not alive, [p.pid for p in alive]


def test_atomic_writes_honour_the_umask(tiny, tmp_path):
    old = os.umask(0o027)
    try:
        save_model(tiny, tmp_path / "student.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "student.pt").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert load_model(tmp_path / "student.pt").cfg == tiny.cfg  # and complete


def test_figures_are_written_whole_with_the_umask(tmp_path):
    """A study's plot is a figure written like any other file: whole, with the umask's mode, or not at all."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_tdmpc.bench.report import save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    old = os.umask(0o027)
    try:
        save_figure(fig, tmp_path / "curves.png")
        with pytest.raises(ValueError):  # an unknown format fails inside savefig, after the temporary file opened
            save_figure(fig, tmp_path / "curves.notaformat")
    finally:
        os.umask(old)
        plt.close(fig)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "curves.png").stat().st_mode & 0o777 == 0o640
    assert sorted(q.name for q in tmp_path.iterdir()) == ["curves.png"]  # no half-written file, no temporary


def _act_of(name, rt):
    if name == "agent":  # the Agent's signature: act(obs, t0, eval_mode, task)
        return lambda o, task: rt.act(o, t0=True, task=task)
    return lambda o, task: rt.act(o, task, t0=True)


def test_bad_task_and_observation_are_one_line_errors_everywhere(tiny):
    """One set of validators for every runtime and the Agent: numpy integers are task indices, booleans and
    out-of-range indices are not; an observation is one real vector."""
    from edge_tdmpc.planner import Agent
    obs = _obs(0)
    for name, rt in {**_runtimes(tiny), "agent": Agent(tiny, seed=3, **vars(SMALL))}.items():
        act = _act_of(name, rt)
        if name != "agent":
            rt.reset(3)
            a = act(obs, np.int64(TASK))
            rt.reset(3)
            assert np.array_equal(a, act(obs, TASK)), name
        for task, message in ((True, "pass task="), (-1, "out of range"), (30, "out of range"), ("3", "pass task="),
                              (None, "pass task=")):
            with pytest.raises(ValueError, match=message):
                act(obs, task)
        with pytest.raises(ValueError, match="one vector"):
            act(np.zeros((2, 12), np.float32), TASK)
        with pytest.raises(ValueError, match="real numbers"):
            act(np.zeros(5, np.complex64), TASK)


def test_a_flipped_bit_in_a_checkpoint_is_caught(tiny, tmp_path, checkpoint_path):
    """Our files carry a checksum of their weights (torch does not check the zip's CRCs); official files, which
    carry none, still load."""
    from edge_tdmpc import load_model
    from edge_tdmpc.checkpoint import METADATA
    save_model(tiny, tmp_path / "ok.pt")
    obj = torch.load(tmp_path / "ok.pt", weights_only=True)
    assert set(obj) == {"model", METADATA}
    key = next(k for k, v in obj["model"].items() if v.is_floating_point() and v.numel() > 10)
    obj["model"][key].view(-1)[3] += 1e-3  # one weight changed, the file otherwise well-formed
    torch.save(obj, tmp_path / "flipped.pt")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "flipped.pt")])
    assert res.exit_code == 2 and "do not match the checksum" in res.output and len(res.output.splitlines()) == 1
    assert load_model(tmp_path / "ok.pt").cfg == tiny.cfg
    assert METADATA not in torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    load_model(checkpoint_path)


def test_runs_that_would_do_nothing_and_unwritable_places_are_one_line_errors(tiny, tmp_path):
    save_model(tiny, tmp_path / "tiny.pt")
    ckpt = str(tmp_path / "tiny.pt")
    for args, message in ((["--episodes", "0"], "--episodes must be at least 1"),
                          (["--steps", "0"], "--steps must be at least 1"), (["--tasks", ""], "no tasks given")):
        res = CliRunner().invoke(main, ["eval", ckpt, "--tasks", "cartpole-swingup", *args])
        assert res.exit_code == 2 and message in res.output and "nan" not in res.output
    (tmp_path / "a-file").write_text("")  # nothing can be written under a file, whoever runs this (root too)
    small = ["--samples", "64", "--elites", "16", "--iterations", "2"]
    for args in (["compile", ckpt, "--out", str(tmp_path / "a-file" / "art"), *small],
                 ["data", "collect", "--teacher", ckpt, "--tasks", "cartpole-swingup", "--episodes", "1", "--steps",
                  "3", "--out", str(tmp_path / "a-file" / "data")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "cannot write" in res.output and "writable --out" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A real 192 KiB file system (tmpfs) to fill: needs root and a kernel that lets this process mount."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs mounted for the test: needs root")
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs (a full disk cannot be made)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


def test_a_full_disk_is_a_one_line_error_and_earlier_outputs_stay_intact(tiny, tmp_path, small_disk):
    """ENOSPC on a real file system: the commands print one line naming the fix; an atomic re-save that no longer
    fits leaves the file it would have replaced whole."""
    save_model(tiny, tmp_path / "tiny.pt")
    ckpt = str(tmp_path / "tiny.pt")
    size = (tmp_path / "tiny.pt").stat().st_size
    assert size < 192 * 1024 < 2 * size + 32 * 1024, size  # one copy fits, a second beside it does not
    save_model(tiny, small_disk / "model.pt")
    with pytest.raises(OSError) as err:
        save_model(tiny, small_disk / "model.pt")
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.pt"]  # no temporary file left behind
    assert load_model(small_disk / "model.pt").cfg == tiny.cfg
    small = ["--samples", "64", "--elites", "16", "--iterations", "2"]
    for args in (["compile", ckpt, "--out", str(small_disk / "art"), *small],
                 ["data", "collect", "--teacher", ckpt, "--tasks", "cartpole-swingup", "--episodes", "4", "--steps",
                  "500", "--no-mpc", "--out", str(small_disk / "data")]):
        res = CliRunner().invoke(main, args)
        errors = [x for x in res.output.splitlines() if x.startswith("error:")]  # after the progress it printed
        assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, (args, res.output)
        assert f"no space left on the device for a file under {small_disk}" in errors[0] or \
            f"no space left on the device for {small_disk}" in errors[0], errors
    assert load_model(small_disk / "model.pt").cfg == tiny.cfg


def test_cache_falls_back_where_home_cannot_be_written(monkeypatch, tmp_path):
    from edge_tdmpc.compile.artifact import cache_root
    monkeypatch.delenv("EDGE_TDMPC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file-not-dir"))
    (tmp_path / "file-not-dir").write_text("")  # no directory can be made under a file, whoever runs this
    assert cache_root().parent == Path(tempfile.gettempdir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edge-tdmpc"


def test_bundle_builder_refuses_an_edited_or_missing_manifest(tiny, tmp_path):
    from edge_tdmpc.compile import artifact
    bundle = artifact.compile_model(tiny, "fp16", SMALL, target="jetson", out=tmp_path / "bundle",
                                    verify_episodes=1, verify_steps=2)
    script = [sys.executable, str(bundle / "build_engine.py"), "--dir", str(bundle)]
    # intact, on a machine without TensorRT (where `tensorrt` imports, the builder would build instead)
    trt_missing = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode != 0
    res = subprocess.run(script, capture_output=True, text=True, timeout=120)
    if trt_missing:
        err = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(err) == 1 and "--runtime onnxruntime" in err[0], res.stderr
    m = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**m, "precision": "fp32"}))
    res = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "manifest.json was edited after compile" in res.stderr
    (bundle / "manifest.json").unlink()
    res = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no readable manifest.json" in res.stderr


def test_bad_settings_are_one_line_errors_through_the_cli(tiny, tmp_path):
    """The cases the reliability issue found as tracebacks: each is exit 2 with one line, and writes nothing."""
    save_model(tiny, tmp_path / "tiny.pt")
    ckpt, data = str(tmp_path / "tiny.pt"), str(tmp_path / "data")
    bench = ["bench", ckpt, "--tasks", "cartpole-swingup", "--episodes", "1", "--steps", "3", "--out",
             str(tmp_path / "b")]
    cases = [([*bench, "--hz", "10", "--latency-ms", "nan"], "--latency-ms must be positive"),
             ([*bench, "--smooth", "0"], "smoothing alpha"),
             ([*bench, "--tasks", ""], "no tasks given"),
             (["data", "collect", "--teacher", ckpt, "--tasks", "cartpole-swingup", "--episodes", "0", "--out", data],
              "--episodes must be at least 1")]
    for args, message in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "b" / "episodes.jsonl").exists() and not (tmp_path / "data" / "index.json").exists()
