"""Artifacts: compile into a verified directory with a manifest, refusing tampered or mismatched ones, the compile
cache (keyed, safe for concurrent processes), targets, `edge-tdmpc compile` and the robot bundle."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, SMALL, make_feed, make_tiny_model

from edge_tdmpc import save_model
from edge_tdmpc.compile import artifact, export, record, verify
from edge_tdmpc.compile.runtimes import compiled_runtime, make_runtime
from edge_tdmpc.compile.targets import check_precision, load_target
from edge_tdmpc.planner import PlannerConfig, plan


def test_fp32_artifact_is_verified(fp32_artifact):
    m = artifact.read_manifest(fp32_artifact)
    assert m["status"] == "ok" and m["precision"] == "fp32" and m["runtime"] == "onnxruntime"
    assert m["verification"]["rows"] == 6 and m["verification"]["outputs"]["z"]["max_abs"] < 1e-5
    assert set(m["files"]) >= {"step.onnx", "verify.npz", "networks/Q.onnx", "networks/encoder.onnx"}
    with np.load(fp32_artifact / "verify.npz") as data:  # real closed-loop inputs + reference outputs
        assert {"obs", "noise_sample", "expected_action", "expected_z"} <= set(data.files)
        assert np.abs(data["obs"]).sum() > 0



def test_runner_up_is_the_step_executed_with_the_second_elite(model):
    """The verification's runner-up action is what the planner executes when its pick is the best other elite."""
    feed = make_feed(model, SMALL, seed=3)
    feed["noise_gumbel"][:] = 0.0  # as recorded: the top elite is the pick
    ref = record.reference_step(model, feed, SMALL)
    obs, task, prev, t0, noise = record.feed_to_torch(feed)
    _, _, info = plan(model, obs, task, prev, t0, noise, SMALL, model.cfg.discounts[task])
    alt = int(torch.argsort(info["score"], descending=True)[1])
    forced = record.feed_to_torch({**feed, "noise_gumbel": np.where(np.arange(SMALL.num_elites) == alt, 1e6, 0.0)
                                   .astype(np.float32)})[4]
    action, _, info2 = plan(model, obs, task, prev, t0, forced, SMALL, model.cfg.discounts[task])
    assert int(info2["pick"]) == alt and not np.allclose(ref["action"], ref["action_alt"])
    np.testing.assert_array_equal(action.numpy(), ref["action_alt"])
    v = info["elite_value"].double()
    assert ref["tie_gap"][0] == pytest.approx(float((v.max() - v[alt]) / max(v.max().abs(), 1)), rel=1e-5)


def test_verification_takes_the_runner_up_on_a_near_tie_only(model):
    """An elite pick flipped by float error is not a broken graph; a flip where the values differ, or an action
    that is neither elite's, still fails."""
    feed = make_feed(model, SMALL, seed=3)
    feed["noise_gumbel"][:] = 0.0
    ref = record.reference_step(model, feed, SMALL)
    flipped = {**ref, "action": ref["action_alt"]}
    far = verify.compare([flipped], [ref], "fp32")[0]
    assert far.output == "action" and not far.ok and far.near_ties == 0 and ref["tie_gap"][0] > 1e-4
    tie = {**ref, "tie_gap": np.array([1e-6], np.float32)}
    near = verify.compare([flipped], [tie], "fp32")[0]
    assert near.ok and near.near_ties == 1 and near.max_abs == 0.0 and "1 near-tie" in near.row()
    wrong = verify.compare([{**ref, "action": ref["action"] + 0.5}], [tie], "fp32")[0]
    assert not wrong.ok and wrong.near_ties == 0
    assert verify.report([near])["outputs"]["action"]["near_ties"] == 1

def test_tampered_or_edited_artifact_is_refused(fp32_artifact, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(fp32_artifact, bad)
    artifact.read_manifest(bad)
    data = bytearray((bad / "step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "step.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="step.onnx does not match its sha256"):
        artifact.read_manifest(bad)
    shutil.copy(fp32_artifact / "step.onnx", bad / "step.onnx")
    m = json.loads((bad / "manifest.json").read_text())
    m["precision"] = "int8"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="edited after compile"):
        artifact.read_manifest(bad)
    with pytest.raises(ValueError, match="no manifest.json"):
        artifact.read_manifest(tmp_path)


def test_mismatched_or_failed_artifact_is_refused(fp32_artifact, model):
    with pytest.raises(ValueError, match="artifact is fp32, not fp16"):
        make_runtime("onnxruntime", fp32_artifact, "fp16", SMALL)
    with pytest.raises(ValueError, match="num_samples=64 \\(asked 512\\)"):
        make_runtime("onnxruntime", fp32_artifact, "fp32", PlannerConfig())
    m = artifact.read_manifest(fp32_artifact)
    with pytest.raises(ValueError, match="other weights"):
        artifact.check_matches(m, model=make_tiny_model(seed=1))
    failed = {**m, "status": "failed"}
    failed["verification"] = {**m["verification"], "outputs": {"z": {"ok": False}}}
    with pytest.raises(ValueError, match="failed verification \\(z outside tolerance\\)"):
        artifact.check_matches(failed)


def test_compiled_runtime_compiles_into_a_keyed_cache(model, cache):
    rt = compiled_runtime("onnxruntime", model, "fp16", SMALL, seed=0)
    again = compiled_runtime("onnxruntime", model, "fp16", SMALL, seed=0)
    assert rt.dir == again.dir and rt.dir.parent == cache / "artifacts"
    other = compiled_runtime("onnxruntime", model, "fp32", SMALL, seed=0)
    assert other.dir != rt.dir
    obs = np.zeros(24, np.float32)
    assert np.abs(rt.act(obs, 0, True) - other.act(obs, 0, True)).max() < 0.1
    with pytest.raises(ValueError, match="runs a compiled artifact, not a model: compile it first"):
        make_runtime("onnxruntime", model, "fp32", SMALL)  # a runtime only loads: it never compiles


def test_compile_cache_is_safe_for_concurrent_processes(tmp_path):
    """Two processes asking the cache for the same artifact at once: one compiles, the other waits for it and
    reads what it built (no half-written directory, no second compile)."""
    code = """if True:
        import sys
        sys.path.insert(0, sys.argv[1])
        from helpers import make_tiny_model
        from edge_tdmpc.compile import artifact
        from edge_tdmpc.planner import PlannerConfig, plan
        small = PlannerConfig(num_samples=16, num_elites=4, num_pi_trajs=2, iterations=2)
        out = artifact.compile_cached(make_tiny_model(), "fp32", small, echo=lambda m: print("compiling", m),
                                      verify_episodes=1, verify_steps=2)
        artifact.read_manifest(out)
        print("artifact", out)"""
    env = {**os.environ, "EDGE_TDMPC_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    dirs = {line for out, _ in outs for line in out.splitlines() if line.startswith("artifact ")}
    assert len(dirs) == 1
    assert sum("compiling" in out for out, _ in outs) == 1
    assert [p.name for p in (tmp_path / "cache" / "artifacts").iterdir() if not p.name.endswith(".lock")] == \
        [Path(dirs.pop().split()[1]).name]  # no temporary directory left behind


def test_targets():
    assert load_target("jetson")["name"] == "orin-nano"
    assert load_target("agx-orin")["gpu"]["compute_capability"] == "8.7"
    assert {load_target(n)["family"] for n in ("cpu", "thor", "x86-dgpu")} == {"cpu", "jetson", "dgpu"}
    with pytest.raises(ValueError, match="did you mean orin-nano"):
        load_target("orin-nan")
    with pytest.raises(ValueError, match="does not support bf16"):
        check_precision(load_target("xavier-nx"), "bf16")


def test_cli_compile_cpu_and_jetson_bundle(model, cache, tmp_path):
    from edge_tdmpc.cli import main
    ckpt = tmp_path / "tiny.pt"
    save_model(model, ckpt)
    runner = CliRunner()
    small = ["--samples", "64", "--elites", "8", "--pi-trajs", "4", "--iterations", "3", "--verify-episodes", "1"]
    res = runner.invoke(main, ["compile", str(ckpt), "--out", str(tmp_path / "cpu"), *small])
    assert res.exit_code == 0, res.output
    assert re.search(r"status\s+ok", res.output) and "PASS" in res.output
    res = runner.invoke(main, ["compile", str(ckpt), "--precision", "fp16", "--target", "jetson",
                               "--out", str(tmp_path / "jetson"), *small])
    assert res.exit_code == 0, res.output
    m = artifact.read_manifest(tmp_path / "jetson")
    assert m["target"] == "orin-nano" and m["runtime"] == "tensorrt" and m["engine"]["status"] == "bundle"
    assert m["checkpoint_sha256"] == artifact.file_sha256(ckpt)
    assert {"build_engine.py", "verify.py", "control.py", "step.onnx", "verify.npz"} <= set(m["files"])
    assert m["layernorm"] == "native" and m["tensorrt_min"] == "8.6.2"
    res = runner.invoke(main, ["compile", str(ckpt), "--precision", "fp16", "--target", "xavier-nx",
                               "--out", str(tmp_path / "xavier"), *small])
    assert res.exit_code == 0, res.output
    m = artifact.read_manifest(tmp_path / "xavier")
    assert m["layernorm"].startswith("primitive") and m["verification"]["ok"]
    ops = {n.op_type for n in onnx.load(tmp_path / "xavier" / "step.onnx").graph.node}
    assert "LayerNormalization" not in ops and ops <= set(export.TENSORRT_OPS)
    res = runner.invoke(main, ["compile", str(ckpt), "--precision", "bf16", "--target", "xavier-nx", *small])
    assert res.exit_code == 2 and "does not support bf16" in res.output
    res = runner.invoke(main, ["compile", str(ckpt), "--precision", "int8", "--calib-percentile", "0", *small])
    assert res.exit_code == 2 and "calib-percentile must be in (0, 100]" in res.output
    res = runner.invoke(main, ["targets"])
    assert res.exit_code == 0 and "orin-nano" in res.output and "thor" in res.output


def test_bundle_builder_needs_no_torch(tmp_path):
    """build_engine.py (= trt.py) must import on a robot with numpy only: no torch, no edge_tdmpc."""
    import shutil
    script = shutil.copy(ROOT / "compile" / "trt.py", tmp_path / "build_engine.py")
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['edge_tdmpc'] = None; "
            f"sys.argv = ['build_engine.py', '--help']; runpy.run_path({str(script)!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and "Build (and verify) the TensorRT engine" in res.stdout, res.stderr
    shutil.copy(ROOT / "toolkit" / "control.py", tmp_path / "control.py")  # the bundle's control loop too
    code = ("import sys; sys.modules['torch'] = None; sys.modules['edge_tdmpc'] = None; "
            "from control import ActionFilter; print(ActionFilter(smooth=0.5)([0.4]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and "[0.4]" in res.stdout, res.stderr
    # the bundle's Planner draws its noise with the bundle's noise.py and shifts its warm start with control.py
    shutil.copy(ROOT / "toolkit" / "noise.py", tmp_path / "noise.py")
    code = """if True:
        import sys; sys.modules['torch'] = None; sys.modules['edge_tdmpc'] = None
        import numpy as np
        from build_engine import Planner
        shapes = {"noise_pi": (3, 4, 6), "noise_sample": (2, 3, 60, 6), "noise_q_idx": (2, 2),
                  "noise_q_pi": (2, 64, 6), "noise_gumbel": (8,), "noise_action": (6,), "prev_mean": (3, 6)}
        class Engine:
            inputs = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
            def run(self, feeds):
                assert all(feeds[k].shape == v for k, v in shapes.items() if k != "prev_mean"), feeds
                assert feeds["noise_q_idx"].dtype == np.int64 and (feeds["noise_q_idx"] < 5).all()
                return {"action": np.ones(6, np.float32), "mean": np.arange(18, dtype=np.float32).reshape(3, 6)}
        p = Planner(Engine(), seed=0, num_q=5)
        p.act(np.zeros(24, np.float32), 0, t0=True)
        p.advance_mean(1)
        print(p.planned_mean()[0].tolist(), p.planned_mean()[2].tolist())"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("]")[0] == "[6.0, 7.0, 8.0, 9.0, 10.0, 11.0" and "[0.0, 0.0" in res.stdout, res.stdout

