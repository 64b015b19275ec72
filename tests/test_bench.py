"""Bench harness: real short closed-loop episodes with a tiny random model and the shared MT30 student."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_tiny_model

from edge_tdmpc import save_model
from edge_tdmpc.bench import TOLERANCE, check_actions, compare, load_report, run_bench
from edge_tdmpc.bench.meters import deadline_misses, latency_stats
from edge_tdmpc.cli import main
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.seeding import evaluation_seeds
from edge_tdmpc.tasks import fit_obs

TASKS = "cartpole-swingup,pendulum-spin"
SMALL = dict(num_samples=64, num_elites=16, iterations=2)  # a fast planner for tiny models
ROW_FIELDS = {"runtime", "precision", "task", "returns", "score", "latency_ms", "peak_rss_mib", "size_mib",
              "size_bytes", "env_step_ms", "throughput_steps_per_s", "deadline", "episodes", "steps"}
LATENCY_FIELDS = {"mean", "p50", "p90", "p99", "max"}


def _returns(report):
    return {(r["runtime"], r["precision"], r["task"]): r["returns"] for r in report["rows"]}


def _check_report(rep, pairs, tasks, episodes):
    assert {(r["runtime"], r["precision"], r["task"]) for r in rep["rows"]} == {
        (*p, t) for p in pairs for t in tasks}
    for row in rep["rows"]:
        assert ROW_FIELDS <= set(row)
        lat = row["latency_ms"]
        assert set(lat) == LATENCY_FIELDS
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["mean"] > 0 and row["env_step_ms"] > 0 and row["throughput_steps_per_s"] > 0
        assert len(row["returns"]) == row["episodes"] == episodes
        assert row["score"] == pytest.approx(np.mean(row["returns"]) / 10)
        assert row["peak_rss_mib"] > 50 and row["size_mib"] > 0
    assert [(s["runtime"], s["precision"]) for s in rep["summary"]] == [tuple(p) for p in pairs]
    for s in rep["summary"]:
        rows = [r for r in rep["rows"] if (r["runtime"], r["precision"]) == (s["runtime"], s["precision"])]
        assert s["score"] == pytest.approx(np.mean([r["score"] for r in rows]))
        assert LATENCY_FIELDS <= set(s["latency_ms"]) and s["complete"]
    env = rep["environment"]
    assert env["cpu"] and env["cores_logical"] >= 1 and env["torch"]


# --- meters and seeding ---------------------------------------------------------------------------------
def test_latency_stats_and_deadlines():
    ms = np.arange(1, 101, dtype=float)  # 1..100 ms
    s = latency_stats(ms)
    assert s["mean"] == pytest.approx(50.5) and s["max"] == 100
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    d = deadline_misses(ms, hz=50)  # 20 ms budget: 21..100 miss
    assert d["missed"] == 80 and d["rate"] == pytest.approx(0.8) and d["budget_ms"] == 20
    assert deadline_misses(ms, None) is None


def test_fit_obs_and_seeds():
    """A multi-task model takes a task's own observation zero-padded (pendulum's 3 of 24), and nothing else
    short of its full width; a single-task model only its own width."""
    assert fit_obs(np.ones(3), 24, "pendulum-swingup").tolist() == [1.0] * 3 + [0.0] * 21
    assert fit_obs(np.ones(24), 24, "pendulum-swingup").dtype == np.float32
    for n, task in ((25, "pendulum-swingup"), (5, "pendulum-swingup"), (3, None)):
        with pytest.raises(ValueError, match=f"observation has {n} entries but the model expects 24"):
            fit_obs(np.ones(n), 24, task)
    assert evaluation_seeds(1, "walker-walk", 0) == evaluation_seeds(1, "walker-walk", 0)
    seeds = {evaluation_seeds(s, t, e) for s in (1, 2) for t in ("walker-walk", "cheetah-run") for e in range(3)}
    assert len(seeds) == 12


def test_episodes_start_where_the_official_evaluation_starts(parity_npz):
    """--seed 1 starts each task's episode 0 from the official evaluate.py's seed-1 reset (recorded from the
    official code for all 30 MT30 tasks); episode k is that env's (k+1)-th reset."""
    from edge_tdmpc.envs import episode_env
    from edge_tdmpc.tasks import resolve_tasks
    for task in resolve_tasks("mt30"):
        env_seed, _ = evaluation_seeds(1, task, 0)
        _, obs = episode_env(task, env_seed, 0)
        np.testing.assert_array_equal(obs, parity_npz[f"env/{task}/obs"][0])
    env, first = episode_env("cartpole-swingup", 1, 0)
    second, _ = env.reset()
    _, obs = episode_env("cartpole-swingup", evaluation_seeds(1, "cartpole-swingup", 1)[0], 1)
    np.testing.assert_array_equal(obs, second)
    assert not np.array_equal(obs, first)


# --- episodes, reports, workers, resume ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The same tiny-model bench with 1 and with 2 workers (real episodes, 3 precisions)."""
    model = make_tiny_model()
    runs = {}
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"w{workers}")
        runs[workers] = run_bench(model, out, tasks=TASKS, precisions="fp32,bf16,fp16", episodes=2, steps=20,
                                  planner=SMALL, workers=workers, hz=50, check_actions=4, progress=False,
                                  echo=lambda *_: None), out
    return runs


def test_report_has_every_field(tiny_runs):
    rep, out = tiny_runs[2]
    pairs = [("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16")]
    _check_report(rep, pairs, TASKS.split(","), episodes=2)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rep["rows"]))
    for name in ("report.md", "latency.png", "scores.png", "episodes.jsonl"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| torch | bf16 |" in md and "pendulum-spin" in md and "missed @ 50 Hz" in md
    s = {x["precision"]: x for x in rep["summary"]}
    assert s["fp32"]["delta"] is None and s["bf16"]["reference"] == "torch/fp32"
    assert s["fp16"]["size_bytes"] * 2 == s["fp32"]["size_bytes"]  # real half-precision weights
    assert s["bf16"]["check_actions"]["n"] == 4
    assert {c["precision"]: c["max_abs"] for c in rep["check_actions"]}["fp32"] == 0


def test_returns_do_not_depend_on_worker_count(tiny_runs):
    (one, _), (two, _) = tiny_runs[1], tiny_runs[2]
    assert _returns(one) == _returns(two)
    # and they are not trivially equal: episodes differ from each other
    assert len({r for rets in _returns(one).values() for r in rets}) > 2


def test_resume_after_kill_matches_uninterrupted(tiny_runs, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    save_model(make_tiny_model(), ckpt)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "edge_tdmpc.cli", "bench", str(ckpt), "--tasks", TASKS, "--precision",
            "fp32,bf16,fp16", "--episodes", "2", "--steps", "20", "--workers", "1", "--out", str(out), "--hz", "50",
            "--samples", "64", "--elites", "16", "--iterations", "2", "--check-actions", "4"]
    proc = subprocess.Popen(args + ["--resume"], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "episodes.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker: a hard kill mid-run
    finally:
        proc.wait()
    before = log.read_text().splitlines()
    assert 3 <= len(before) < 12, "the run should have been killed part way"
    with open(log, "a") as f:
        f.write('{"runtime": "torch", "precision": "fp3')  # a line torn by the kill
    res = CliRunner().invoke(main, args[3:] + ["--resume"])
    assert res.exit_code == 0, res.output
    after = log.read_text().splitlines()
    assert len(after) == 12 and after[: len(before)] == before  # finished episodes kept, not recomputed
    assert "resuming:" in res.output
    resumed = json.loads((out / "report.json").read_text())
    uninterrupted, _ = tiny_runs[1]  # same model weights (seed 0), settings and seeds, never killed
    assert _returns(resumed) == _returns(uninterrupted)


def test_out_dir_with_results_needs_resume_and_same_settings(tiny_runs):
    _, out = tiny_runs[1]
    model = make_tiny_model()
    with pytest.raises(ValueError, match="pass --resume"):
        run_bench(model, out, tasks=TASKS, episodes=2, steps=20, planner=SMALL, progress=False)
    with pytest.raises(ValueError, match="cannot resume .* seed"):
        run_bench(model, out, tasks=TASKS, episodes=2, steps=20, planner=SMALL, seed=7, resume=True,
                  progress=False)


def test_check_only_run(tmp_path):
    rep = run_bench(make_tiny_model(), tmp_path, tasks=TASKS, precisions="fp32,bf16", episodes=0, steps=5,
                    planner=SMALL, check_actions=4, progress=False)
    assert rep["rows"] == [] and rep["summary"] == [] and len(rep["check_actions"]) == 2
    md = (tmp_path / "report.md").read_text()
    assert "Faithfulness" in md and "Per task" not in md
    with pytest.raises(ValueError, match="--check-actions"):
        run_bench(make_tiny_model(), tmp_path / "x", tasks=TASKS, episodes=0, progress=False)


# --- bad input: one-line errors before any episode -------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--runtime", "tflite"], "unknown runtime 'tflite'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--precision", "int8"], "no requested runtime runs precision 'int8'"),
    (["--tasks", "walker-wlak"], "unknown task 'walker-wlak'"),
    (["--samples", "16"], "num_elites"),
    (["--tasks", "walker-walk", "--model-tasks", "cartpole-swingup"],
     "task 'walker-walk' is not in this model's task set"),
])
def test_bad_input_one_line_error(tmp_path, extra, message):
    single = "--model-tasks" in extra
    ckpt = tmp_path / "tiny.pt"
    save_model(make_tiny_model("cartpole-swingup" if single else "mt30"), ckpt)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["bench", str(ckpt), "--tasks", "cartpole-swingup", "--out", str(out),
                                    "--steps", "5", "--episodes", "1", *extra])
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (out / "episodes.jsonl").exists()


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write to output directory"):
        run_bench(make_tiny_model(), blocker / "out", tasks="cartpole-swingup", steps=5, progress=False)


# --- the shared MT30 student -----------------------------------------------------------------------------
def test_real_checkpoint_short_episodes(checkpoint_path, tmp_path):
    out = tmp_path / "real"
    rep = run_bench(checkpoint_path, out, tasks="cartpole-swingup,cheetah-run-backwards", precisions="fp32,bf16",
                    episodes=1, steps=50, planner=dict(mpc=False), workers=2, hz=20, check_actions=10,
                    progress=False, echo=lambda *_: None)
    _check_report(rep, [("torch", "fp32"), ("torch", "bf16")], ["cartpole-swingup", "cheetah-run-backwards"], 1)
    s = rep["summary"][0]
    assert s["size_bytes"] == 1_980_357 * 4 and rep["model"]["kind"] == "checkpoint"
    assert all(c["ok"] for c in rep["check_actions"])
    assert "median \\|Δa\\|" in (out / "report.md").read_text()


def test_compare(tiny_runs, checkpoint_path, tmp_path):
    (a, out_a), (b, _) = tiny_runs[1], tiny_runs[2]
    text = compare(a, b)
    assert "torch/bf16" in text and "+0.00" in text  # same returns, different timings
    res = CliRunner().invoke(main, ["bench", "compare", str(out_a / "report.json"), str(out_a)])
    assert res.exit_code == 0 and "Δ score" in res.output
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an edge-tdmpc bench report"):
        load_report(bad)


def test_low_precision_policy_actions_close_to_fp32(student):
    """fp16/bf16 execution of the real student: the policy prior stays within the stated tolerance."""
    res = check_actions(student, [("torch", "fp32"), ("torch", "fp16"), ("torch", "bf16")],
                        ["walker-walk", "cheetah-run", "reacher-easy", "pendulum-spin"], 40, PlannerConfig(mpc=False))
    by = {r["precision"]: r for r in res}
    assert by["fp32"]["max_abs"] == 0
    for p in ("fp16", "bf16"):
        assert by[p]["tolerance"] == TOLERANCE["policy"][p]
        assert 0 < by[p]["median_abs"] <= by[p]["tolerance"], by[p]
    assert by["fp16"]["mean_abs"] < by["bf16"]["mean_abs"]  # 10 vs 7 mantissa bits


@pytest.mark.slow
def test_low_precision_planning_actions_close_to_fp32(student):
    """Full MPPI in fp16/bf16 on the same noise: within the (looser) planning tolerance."""
    res = check_actions(student, [("torch", "fp32"), ("torch", "fp16"), ("torch", "bf16")],
                        ["walker-walk", "cheetah-run", "cartpole-swingup", "pendulum-spin"], 16, PlannerConfig())
    by = {r["precision"]: r for r in res}
    assert by["fp32"]["max_abs"] == 0
    for p in ("fp16", "bf16"):
        assert by[p]["ok"], by[p]


def test_compiled_artifact_directory(tmp_path, monkeypatch):
    """`bench ARTIFACT_DIR`: the artifact's runtime against fp32 eager on its source checkpoint."""
    artifact = pytest.importorskip("edge_tdmpc.compile.artifact", reason="compile issue not merged yet")
    monkeypatch.setenv("EDGE_TDMPC_CACHE", str(tmp_path / "cache"))
    model, ckpt = make_tiny_model(), tmp_path / "tiny.pt"
    save_model(model, ckpt)
    art = artifact.compile_model(model, "fp32", PlannerConfig.make(**SMALL), "cpu", out=tmp_path / "art",
                                 checkpoint=ckpt)
    rep = run_bench(art, tmp_path / "out", tasks="pendulum-spin", episodes=1, steps=8, workers=1, check_actions=3,
                    progress=False, echo=lambda *_: None)
    _check_report(rep, [("torch", "fp32"), ("onnxruntime", "fp32")], ["pendulum-spin"], 1)
    assert rep["model"]["kind"] == "artifact" and rep["settings"]["planner"]["num_samples"] == 64
    ort = {c["runtime"]: c for c in rep["check_actions"]}["onnxruntime"]
    assert ort["ok"] and ort["max_abs"] < 1e-4
    assert rep["summary"][1]["size_bytes"] == artifact.artifact_size(art)
    with pytest.raises(ValueError, match="compiled with num_samples=64"):
        run_bench(art, tmp_path / "out2", tasks="pendulum-spin", planner=dict(num_samples=128), progress=False)
    # --runtime alone runs the artifact at its own precision, not a fresh fp32 compile of its checkpoint
    art16 = artifact.compile_model(model, "fp16", PlannerConfig.make(**SMALL), "cpu", out=tmp_path / "art16",
                                   checkpoint=ckpt)
    rep = run_bench(art16, tmp_path / "out3", tasks="pendulum-spin", runtimes="onnxruntime", episodes=1, steps=2,
                    workers=1, progress=False, echo=lambda *_: None)
    assert [(s["runtime"], s["precision"]) for s in rep["summary"]] == [("onnxruntime", "fp16")]
    assert rep["summary"][0]["size_bytes"] == artifact.artifact_size(art16)
