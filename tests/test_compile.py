"""Compile: ONNX export of the networks and of the whole planning step, precisions, artifacts, runtimes.

Tolerances (vs the torch fp32 reference on the same noise): fp32 1e-5 on the tiny model (reordered sums only);
fp16 / bf16 / int8 through the per-precision verification tolerances of edge_tdmpc.compile.verify.
"""
import copy
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
from conftest import make_tiny_model

from edge_tdmpc import WorldModel, make_config, save_model
from edge_tdmpc.compile import artifact, export, precision, record, trt
from edge_tdmpc.compile.session import OnnxSession
from edge_tdmpc.compile.targets import check_precision, load_target
from edge_tdmpc.planner import PlannerConfig, plan, policy_action, sample_noise
from edge_tdmpc.runtime import make_runtime

SMALL = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private compile cache for this module (never the user's ~/.cache)."""
    old = os.environ.get("EDGE_TDMPC_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["EDGE_TDMPC_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EDGE_TDMPC_CACHE", None)
    else:
        os.environ["EDGE_TDMPC_CACHE"] = old


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


def _feed(model, cfg, seed, task=3, t0=False):
    g = torch.Generator().manual_seed(seed)
    noise = sample_noise(cfg, model.cfg.action_dim, model.cfg.num_q, g)
    obs = torch.randn(model.cfg.obs_dim, generator=g)
    prev = torch.rand(cfg.horizon, model.cfg.action_dim, generator=g) * 2 - 1
    return record.plan_feed(obs.numpy(), task if model.cfg.multitask else None, prev.numpy(), t0, noise)


def _close(out, ref, atol):
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], atol=atol, rtol=0, err_msg=k)


# --- export ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,t0", [(0, True), (3, False), (7, False), (29, True)])
def test_plan_graph_matches_plan_fp32(model, task, t0):
    session = OnnxSession(export.plan_graph(model, SMALL))
    feed = _feed(model, SMALL, seed=task, task=task, t0=t0)
    _close(session.run(feed), record.reference_step(model, feed, SMALL), atol=1e-5)


def test_plan_graph_eval_mode_is_zero_action_noise(model):
    session = OnnxSession(export.plan_graph(model, SMALL))
    feed = _feed(model, SMALL, seed=1)
    obs, task, prev, t0, noise = record.feed_to_torch(feed)
    a_eval, _, _ = plan(model, obs, task, prev, t0, noise, SMALL, 0.99, eval_mode=True)
    out = session.run({**feed, "noise_action": np.zeros_like(feed["noise_action"])})
    np.testing.assert_allclose(out["action"], a_eval.numpy(), atol=1e-5)


def test_plan_graph_gathers_q_heads_and_single_task():
    """num_q > 2 takes the q_idx input; a single-task model has no task input."""
    torch.manual_seed(0)
    for cfg_model in (make_config("mt30", size=None, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=5, task_dim=16),
                      make_config("cheetah-run", size=None, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=5),
                      make_config("cheetah-run", size=None, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2)):
        m = WorldModel(cfg_model).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        graph = export.plan_graph(m, SMALL)
        if m.cfg.num_q > 2:  # only the 2 heads q_idx picks are computed, not all 5
            assert not any("/Q4." in n.name for n in graph.graph.node)
            assert sum("of2." in n.name and n.op_type == "MatMul" for n in graph.graph.node) == 2 * 4 * SMALL.iterations
        session = OnnxSession(graph)
        assert ("noise_q_idx" in session.inputs) == (m.cfg.num_q > 2)
        assert ("task" in session.inputs) == m.cfg.multitask
        feed = _feed(m, SMALL, seed=2)
        _close(session.run(feed), record.reference_step(m, feed, SMALL), atol=1e-5)


def test_policy_graph_for_mpc_false(model):
    cfg = PlannerConfig(mpc=False)
    session = OnnxSession(export.plan_graph(model, cfg))
    feed = _feed(model, cfg, seed=4)
    obs, task, _, _, noise = record.feed_to_torch(feed)
    out = session.run(feed)
    np.testing.assert_allclose(out["action"], policy_action(model, obs, task, noise.action).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["mean"], policy_action(model, obs, task, noise.action, True).numpy(), atol=1e-5)


def test_network_graphs_match_the_model(model):
    graphs = export.network_graphs(model)
    g = torch.Generator().manual_seed(0)
    B, c = 5, model.cfg
    obs, task = torch.randn(B, c.obs_dim, generator=g), torch.tensor([0, 3, 7, 12, 29])
    z = model.encode(obs, task).detach()
    a, eps = torch.rand(B, c.action_dim, generator=g) * 2 - 1, torch.randn(B, c.action_dim, generator=g)
    feeds = {"obs": obs.numpy(), "z": z.numpy(), "a": a.numpy(), "eps": eps.numpy(), "task": task.numpy()}
    with torch.no_grad():
        action, mean = model.pi(z, task, eps)
        ref = {"encoder": {"z": z}, "dynamics": {"next_z": model.next(z, a, task)},
               "reward": {"logits": model.reward(z, a, task)}, "pi": {"action": action, "mean": mean},
               "Q": {"logits": model.Q(z, a, task)}}
    for name, proto in graphs.items():
        onnx.checker.check_model(proto)
        out = OnnxSession(proto).run(feeds)
        _close(out, {k: v.numpy() for k, v in ref[name].items()}, atol=1e-5)


def test_task_embedding_is_folded_not_concatenated(model):
    proto = export.plan_graph(model, SMALL)
    assert not any(n.op_type == "Concat" and "encoder" in n.name for n in proto.graph.node)
    names = {t.name for t in proto.graph.initializer}
    assert "dynamics.0.b" in names and "dynamics.0.W_z" in names and "dynamics.0.W_a" in names
    table = next(t for t in proto.graph.initializer if t.name == "dynamics.0.b")
    assert list(table.dims) == [len(model.cfg.tasks), model.cfg.mlp_dim]  # one folded bias row per task


def test_real_student_plan_graph_matches(student):
    cfg = PlannerConfig()
    session = OnnxSession(export.plan_graph(student, cfg))
    feed = _feed(student, cfg, seed=0, task=10, t0=True)
    out, ref = session.run(feed), record.reference_step(student, feed, cfg)
    np.testing.assert_allclose(out["z"], ref["z"], atol=1e-5)
    np.testing.assert_allclose(out["value"], ref["value"], rtol=1e-3)
    assert np.abs(out["action"] - ref["action"]).mean() < 1e-2


# --- precisions ----------------------------------------------------------------------------------------------
def _types(proto):
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if t.dims}


@pytest.mark.parametrize("prec,atol", [("fp16", 5e-3), ("bf16", 5e-2)])
def test_half_precision_graphs_are_real_and_close(model, prec, atol):
    proto = export.plan_graph(model, SMALL, precision.model_plan(model, prec))
    assert {"FLOAT16" if prec == "fp16" else "BFLOAT16"} <= _types(proto)
    assert any(n.op_type == "MatMul" for n in proto.graph.node)
    session = OnnxSession(proto)
    assert session.emulated == (prec == "bf16")  # the CPU provider has no bf16 kernels
    feed = _feed(model, SMALL, seed=5)
    out, ref = session.run(feed), record.reference_step(model, feed, SMALL)
    assert 0 < np.abs(out["z"] - ref["z"]).max() < atol  # rounded, but close


@pytest.mark.parametrize("prec,atol", [("fp32", 2e-5), ("fp16", 2e-3)])
def test_primitive_layernorm_for_tensorrt_8_5_matches_native(model, prec, atol):
    """TensorRT 8.5 (JetPack 5, Xavier) has no LayerNormalization importer: the same graph with it written out
    in primitive ops parses there and computes the same step."""
    layers = precision.model_plan(model, prec)
    native = export.plan_graph(model, SMALL, layers)
    primitive = export.plan_graph(model, SMALL, layers, native_layernorm=False)
    assert export.tensorrt_unsupported(native, (8, 5, 2)) == ["LayerNormalization"]
    assert export.tensorrt_unsupported(native, (8, 6)) == export.tensorrt_unsupported(primitive, (8, 5, 2)) == []
    feed = _feed(model, SMALL, seed=8)
    feed["noise_gumbel"] = np.zeros_like(feed["noise_gumbel"])
    out, ref = OnnxSession(primitive).run(feed), OnnxSession(native).run(feed)
    for k in ("z", "mean", "action"):
        np.testing.assert_allclose(out[k], ref[k], atol=atol, rtol=0, err_msg=k)
    for net in export.network_graphs(model, native_layernorm=False).values():
        assert export.tensorrt_unsupported(net, (8, 5, 2)) == []


def test_bf16_emulation_rounds_every_tensor():
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8)
    w = np.linspace(0.1, 1.7, 64, dtype=np.float32).reshape(8, 8)
    g = export.Graph()
    g.input("x", "fp32", [8, 8])
    g.output("y", g.op("MatMul", g.cast("x", "bf16"), g.const(w, "bf16", key="w")), [8, 8])
    y = OnnxSession(g.model()).run({"x": x})["y"]
    ref = (torch.from_numpy(x).bfloat16().float() @ torch.from_numpy(w).bfloat16().float()).bfloat16().float()
    np.testing.assert_array_equal(y, ref.numpy())


def test_precision_plans(tmp_path):
    layers = export.layer_names(make_tiny_model())
    assert set(precision.precision_plan("fp16", layers).values()) == {"fp16"}
    mixed = precision.precision_plan("mixed", layers)
    assert {"int8", "fp16", "fp32"} <= set(mixed.values())
    assert precision.precision_plan("int8", layers, {"Q.2": "fp32"})["Q.2"] == "fp32"
    with pytest.raises(ValueError, match="unknown layer"):
        precision.precision_plan("int8", layers, {"decoder.0": "fp32"})
    with pytest.raises(ValueError, match="unknown precision"):
        precision.precision_plan("fp8", layers)
    # compile --plan: inline JSON or a file
    (tmp_path / "plan.json").write_text('{"dynamics.1": "int8"}')
    plan = precision.load_plan(tmp_path / "plan.json")
    assert precision.load_plan(' {"dynamics.1": "int8"}') == plan
    assert precision.precision_plan("mixed", layers, plan)["dynamics.1"] == "int8"
    with pytest.raises(ValueError, match="cannot read precision plan"):
        precision.load_plan('{"dynamics.1": int8}')
    with pytest.raises(ValueError, match="cannot read precision plan"):
        precision.load_plan(tmp_path / "missing.json")


# --- artifacts --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_artifact(model, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "fp32"
    return artifact.compile_model(model, "fp32", SMALL, out=out, verify_episodes=2, verify_steps=3)


@pytest.fixture(scope="module")
def int8_artifact(model, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "int8"
    # 8 steps per episode: with 3, this random model's ranges were too narrow (values 3% off)
    return artifact.compile_model(model, "int8", SMALL, out=out, calib_episodes=3, calib_steps=8,
                                  verify_episodes=2, verify_steps=3)


def test_fp32_artifact_is_verified(fp32_artifact):
    m = artifact.read_manifest(fp32_artifact)
    assert m["status"] == "ok" and m["precision"] == "fp32" and m["runtime"] == "onnxruntime"
    assert m["verification"]["rows"] == 6 and m["verification"]["outputs"]["z"]["max_abs"] < 1e-5
    assert set(m["files"]) >= {"plan.onnx", "verify.npz", "networks/Q.onnx", "networks/encoder.onnx"}
    with np.load(fp32_artifact / "verify.npz") as data:  # real closed-loop inputs + reference outputs
        assert {"obs", "noise_sample", "expected_action", "expected_z"} <= set(data.files)
        assert np.abs(data["obs"]).sum() > 0


def test_int8_is_calibrated_on_recorded_episodes(int8_artifact, model, tmp_path):
    m = artifact.read_manifest(int8_artifact)
    assert m["status"] == "ok"
    calib = m["calibration"]
    assert calib["rows"] == 24 and len(calib["tasks"]) == 3 and all(t in model.cfg.tasks for t in calib["tasks"])
    ranges = json.loads((int8_artifact / calib["file"]).read_text())["absmax"]
    assert ranges and all(v > 0 for v in ranges.values())  # activation ranges seen in the episodes
    proto = onnx.load(int8_artifact / "plan.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert export.tensorrt_unsupported(proto, (8, 6)) == []  # Q/DQ included: the parser takes every op
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    action_part = [n for n in matmuls if n.input[1].endswith(".W_a")]  # K = action dim: kept in fp32
    kept = [n for n in matmuls if precision.layer_of(n.name) in precision.INT8_KEEP_FP32]
    int8_layers = [n for n in matmuls if n not in kept and n not in action_part]
    assert {precision.layer_of(n.name) for n in kept} == set(precision.INT8_KEEP_FP32)  # encoder, 2-hot outputs
    assert m["layer_plan"]["Q.2"] == m["layer_plan"]["reward.2"] == "fp32" and m["layer_plan"]["Q.1"] == "int8"
    assert action_part and not any(n.input[0].endswith("/x_dq") for n in action_part + kept)
    assert ops.count("QuantizeLinear") == len(int8_layers)  # one dedicated activation pair per int8 MatMul
    assert all(n.input[0].endswith("/x_dq") and n.input[1].endswith(".dequantized") for n in int8_layers)
    # ONNX Runtime runs each of them as an integer GEMM, not as fake-quant (dequantize, then an fp32 GEMM)
    OnnxSession(proto, optimized=tmp_path / "executed.onnx")
    executed = [n.op_type for n in onnx.load(tmp_path / "executed.onnx").graph.node]
    assert executed.count("MatMulIntegerToFloat") == len(int8_layers)
    inits = {t.name: t for t in proto.graph.initializer}
    w8 = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(w8) == len({n.input[1] for n in int8_layers}) > 0
    for w in w8:  # weights stored once as int8, with one scale per output channel
        assert list(inits[w.name.replace(".int8", ".scale")].dims) == [w.dims[1]]
    assert not any(t.name == w8[0].name.replace(".int8", "") for t in inits.values())  # no fp32 copy kept
    out = m["verification"]["outputs"]
    assert out["z"]["max_abs"] < 1e-5  # the fp32 encoder is untouched by its int8 neighbours
    assert out["value"]["mean_abs"] > 1e-5  # really quantized: not bit-exact
    for w in w8:  # AVX2 without VNNI adds two u8 x s8 products in int16 (vpmaddubsw): no pair may overflow it
        q = np.abs(onnx.numpy_helper.to_array(w).astype(np.int32))
        assert q.max() <= precision.WEIGHT_QMAX and 255 * (q[0::2] + q[1::2]).max() <= 2**15 - 1


def test_compile_cache_is_safe_for_concurrent_processes(tmp_path):
    """Two processes asking the cache for the same artifact at once: one compiles, the other waits for it and
    reads what it built (no half-written directory, no second compile)."""
    code = """if True:
        import sys
        sys.path.insert(0, sys.argv[1])
        from conftest import make_tiny_model
        from edge_tdmpc.compile import artifact
        from edge_tdmpc.planner import PlannerConfig
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


def test_tampered_or_edited_artifact_is_refused(fp32_artifact, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(fp32_artifact, bad)
    artifact.read_manifest(bad)
    data = bytearray((bad / "plan.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "plan.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="plan.onnx does not match its sha256"):
        artifact.read_manifest(bad)
    shutil.copy(fp32_artifact / "plan.onnx", bad / "plan.onnx")
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


def test_artifact_runtime_matches_torch_runtime_on_same_seed(fp32_artifact, model):
    rt = make_runtime("onnxruntime", fp32_artifact, "fp32", SMALL, seed=3)
    ref = make_runtime("torch", model, "fp32", SMALL, seed=3)
    obs = np.linspace(-1, 1, 17, dtype=np.float32)  # cheetah-run's own 17 entries: padded to 24
    for t in range(4):
        a, b = rt.act(obs * t, 3, t == 0), ref.act(obs * t, 3, t == 0)
        assert a.shape == (6,) and np.abs(a - b).max() < 1e-5
    assert rt.size_bytes() == artifact.read_manifest(fp32_artifact)["files"]["plan.onnx"]["bytes"]
    rt.reset(3)
    ref.reset(3)
    np.testing.assert_allclose(rt.act(obs, 3, True, eval_mode=True), ref.act(obs, 3, True, eval_mode=True), atol=1e-5)
    with pytest.raises(ValueError, match="pass task"):
        rt.act(obs, None, True)


def test_policy_only_runtime_matches_torch(model, cache):
    cfg = PlannerConfig(mpc=False)
    rt, ref = make_runtime("onnxruntime", model, "fp32", cfg, seed=1), make_runtime("torch", model, "fp32", cfg, seed=1)
    assert artifact.read_manifest(rt.dir)["status"] == "ok"
    obs = np.linspace(-1, 1, 24, dtype=np.float32)
    for eval_mode in (False, True, False):
        np.testing.assert_allclose(rt.act(obs, 5, False, eval_mode), ref.act(obs, 5, False, eval_mode), atol=1e-5)


def test_mixed_plan_mixes_precisions(model, cache, tmp_path):
    art = artifact.compile_model(model, "mixed", SMALL, out=tmp_path / "mixed", calib_episodes=2, calib_steps=2,
                                 verify_episodes=1, verify_steps=3)
    m = artifact.read_manifest(art)
    assert set(m["layer_plan"].values()) == {"fp32", "fp16", "int8"}
    assert m["verification"]["outputs"]["z"]["max_abs"] < 1e-5  # fp32 encoder, untouched by int8 neighbours
    proto = onnx.load(art / "plan.onnx")
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer}
    assert types["encoder.0.W_obs"] == "FLOAT" and types["dynamics.0.W_z.fp16"] == "FLOAT16"
    assert types["reward.1.W_x.int8"] == "INT8" and types["dynamics.1.W_x.fp16"] == "FLOAT16"


def test_runtime_compiles_on_the_fly_into_a_keyed_cache(model, cache):
    rt = make_runtime("onnxruntime", model, "fp16", SMALL, seed=0)
    again = make_runtime("onnxruntime", model, "fp16", SMALL, seed=0)
    assert rt.dir == again.dir and rt.dir.parent == cache / "artifacts"
    other = make_runtime("onnxruntime", model, "fp32", SMALL, seed=0)
    assert other.dir != rt.dir
    obs = np.zeros(24, np.float32)
    assert np.abs(rt.act(obs, 0, True) - other.act(obs, 0, True)).max() < 0.1


# --- targets and CLI -----------------------------------------------------------------------------------------------
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
    assert {"build_engine.py", "verify.py", "control.py", "plan.onnx", "verify.npz"} <= set(m["files"])
    assert m["layernorm"] == "native" and m["tensorrt_min"] == "8.6.2"
    res = runner.invoke(main, ["compile", str(ckpt), "--precision", "fp16", "--target", "xavier-nx",
                               "--out", str(tmp_path / "xavier"), *small])
    assert res.exit_code == 0, res.output
    m = artifact.read_manifest(tmp_path / "xavier")
    assert m["layernorm"].startswith("primitive") and m["verification"]["ok"]
    ops = {n.op_type for n in onnx.load(tmp_path / "xavier" / "plan.onnx").graph.node}
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
            "from control import ActionFilter; print(ActionFilter(alpha=0.5)([0.4]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and "[0.4]" in res.stdout, res.stderr


def test_engine_from_another_gpu_or_tensorrt_is_refused():
    built = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    trt.check_compatible(built, dict(built))
    with pytest.raises(ValueError, match="built by TensorRT 10.3.0 but this is TensorRT 10.13"):
        trt.check_compatible(built, {**built, "tensorrt": "10.13"})
    with pytest.raises(ValueError, match="compute capability 8.7 .* this GPU is 9.0"):
        trt.check_compatible(built, {**built, "compute_capability": "9.0", "gpu": "H100"})


def test_tensorrt_8_pins_fp32_layers_but_leaves_int8_matmuls_to_their_qdq():
    """TensorRT 8.x (weakly typed) with FP16+INT8 for mixed: which layers get an fp32 constraint. TensorRT does
    not install here, so this runs the selection on a stand-in network with TensorRT's layer/tensor interface."""
    from types import SimpleNamespace as NS

    class Layer:
        def __init__(self, kind, ins, out, dtype):
            self.type, self.ins, self.out, self.precision, self.types = kind, ins, NS(name=out, dtype=dtype), None, {}
            self.num_inputs, self.num_outputs = len(ins), 1

        def get_input(self, k):
            return NS(name=self.ins[k])

        def get_output(self, k):
            return self.out

        def set_output_type(self, k, t):
            self.types[k] = t

    fake = NS(float32="f32", LayerType=NS(QUANTIZE="Q", DEQUANTIZE="DQ"),
              BuilderFlag=NS(PREFER_PRECISION_CONSTRAINTS="prefer"))
    layers = {"encoder": Layer("op", ["obs"], "z", "f32"),                  # fp32 in mixed: pinned
              "q": Layer("Q", ["z"], "z_q", "i8"), "dq": Layer("DQ", ["z_q"], "z_dq", "f32"),
              "int8_matmul": Layer("op", ["z_dq", "w_dq"], "h", "f32"),     # int8 through its Q/DQ: left alone
              "fp16_layer": Layer("op", ["h"], "h16", "f16"),               # fp16: left to the FP16 flag
              "decode": Layer("op", ["h16"], "r", "f32")}                   # fp32 island: pinned
    network = NS(num_layers=len(layers), get_layer=lambda i: list(layers.values())[i])
    flags = []
    trt._pin_fp32(fake, network, NS(set_flag=flags.append))
    assert flags == ["prefer"]
    assert {n for n, la in layers.items() if la.precision == "f32"} == {"encoder", "decode"}
    assert layers["decode"].types == {0: "f32"} and layers["int8_matmul"].types == {}


# --- GPU (skipped here with a reason) ----------------------------------------------------------------------------
def _has_tensorrt():
    try:
        import tensorrt  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.trt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs tensorrt and a CUDA GPU (not installable in this workplace)")
@pytest.mark.parametrize("prec", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_builds_matches_and_round_trips(prec, model, cache, tmp_path):
    art = artifact.compile_model(model, prec, SMALL, target="x86-dgpu", out=tmp_path / prec, calib_episodes=2,
                                 calib_steps=8, verify_episodes=1, verify_steps=3)
    m = artifact.read_manifest(art)
    assert m["engine"]["status"] == "built"
    engine = trt.Engine(art / "plan.engine")  # deserialized from the file: the serialization round trip
    ok, table = trt.verify_engine(engine, art, m)
    assert ok, table
    graphed = trt.Engine(art / "plan.engine", cuda_graph=True)
    with np.load(art / "verify.npz") as data:
        feed = {k: data[k][0] for k in graphed.inputs}
    np.testing.assert_allclose(graphed.run(feed)["action"], engine.run(feed)["action"], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,prec,atol", [("torch-cuda-graph", "fp32", 1e-4), ("torch-cuda-graph", "fp16", 5e-2),
                                            ("torch-cuda-graph", "bf16", 0.5), ("torch-compile", "fp32", 1e-4),
                                            ("torch-compile-fused", "fp16", 5e-2),
                                            ("torch-compile-triton", "fp16", 5e-2),
                                            ("torch-compile-triton", "bf16", 0.5),  # not in the interpreter
                                            ("torch-cuda-graph-triton", "fp16", 5e-2)])
def test_torch_cuda_graph_matches_plan(name, prec, atol, model):
    rt = make_runtime(name, model, prec, SMALL, seed=0)
    feed = _feed(model, SMALL, seed=6, t0=True)
    obs, task, _, _, noise = record.feed_to_torch(feed)
    ref = record.reference_step(model, feed, SMALL)
    a = rt.act(obs.numpy(), task, True, noise=noise)
    assert np.abs(a - ref["action"]).mean() < atol
    b = rt.act(obs.numpy(), task, True)  # noise drawn on the device, inside the graph
    assert b.shape == a.shape and np.all(np.abs(b) <= 1)
    rt.reset(5)
    c = rt.act(obs.numpy(), task, True)
    rt.reset(5)
    assert np.array_equal(rt.act(obs.numpy(), task, True), c)  # a seed replays the device draws
    assert not np.array_equal(rt.act(obs.numpy(), task, False), c)  # and each replay draws afresh


@pytest.mark.gpu
@pytest.mark.skipif(trt._cudart() is None or not torch.cuda.is_available(), reason="needs cuda-python and a CUDA GPU")
def test_tensorrt_runner_cuda_helper_copies_and_replays_graphs():
    """The CUDA layer under the TensorRT runner (cuda-python, no torch on the robot): memory, copies, stream
    capture and graph launch, without TensorRT itself."""
    cuda = trt.Cuda()
    assert cuda.device()["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
    x = np.arange(1000, dtype=np.float32)
    y = np.zeros_like(x)
    src, dst = cuda.malloc(x.nbytes), cuda.malloc(x.nbytes)
    d2d = cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    graph = cuda.capture(lambda: cuda._call("cudaMemcpyAsync", dst, src, x.nbytes, d2d, cuda.stream))
    cuda.htod(src, x)
    cuda.launch(graph)  # the captured copy, replayed
    cuda.dtoh(y, dst)
    cuda.sync()
    np.testing.assert_array_equal(y, x)
    cuda.free(src)
    cuda.free(dst)


def test_plan_step_traces_whole_under_torch_compile(model):
    """The planning step is one graph for torch.compile (fullgraph: no graph breaks, no host syncs), computing
    what eager computes; the GPU runtime then compiles it with Inductor (tested on the device machine)."""
    from edge_tdmpc.compile.runtimes import graph_step
    feed = _feed(model, SMALL, seed=6)
    obs, task, prev, t0, noise = record.feed_to_torch(feed)
    args = (model, SMALL, obs, torch.tensor([task]), prev, torch.tensor(float(t0)), noise, torch.tensor(0.99),
            torch.tensor(1.0))
    ref = graph_step(*args)
    out = torch.compile(graph_step, backend="aot_eager", fullgraph=True, dynamic=False)(*args)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_fused_rollout_plans_as_the_reference(model, dtype, atol):
    """FusedWorldModel (reward and dynamics MLPs stacked, what torch-compile-fused runs) keeps the official
    state-dict layout, computes each rollout step as the two networks do, and plans the same step (top elite,
    fp32 and bf16 layers); the fused step still traces whole under torch.compile."""
    from edge_tdmpc.compile.fused import FusedWorldModel
    from edge_tdmpc.compile.runtimes import graph_step
    ref_model = copy.deepcopy(model).to(dtype)
    fused = FusedWorldModel.of(ref_model)
    assert fused.state_dict().keys() == ref_model.state_dict().keys()
    g = torch.Generator().manual_seed(3)
    z, a = torch.randn(40, model.cfg.latent_dim, generator=g).softmax(-1), torch.rand(40, 6, generator=g) * 2 - 1
    for ours, ref in zip(fused.reward_next(z, a, 5), ref_model.reward_next(z, a, 5)):
        assert ours.dtype == ref.dtype == dtype
        torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=0)
    feed = _feed(model, SMALL, seed=6)
    obs, task, prev, t0, noise = record.feed_to_torch(feed)
    noise = noise._replace(gumbel=torch.zeros_like(noise.gumbel))
    args = (SMALL, obs, torch.tensor([task]), prev, torch.tensor(float(t0)), noise, torch.tensor(0.99),
            torch.tensor(0.0))
    ref = graph_step(ref_model, *args)
    out = graph_step(fused, *args)
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, atol=10 * atol, rtol=0)
    traced = torch.compile(graph_step, backend="aot_eager", fullgraph=True, dynamic=False)(fused, *args)
    for x, y in zip(traced, out):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 2e-2)])
def test_triton_kernels_compute_the_networks_and_plan_as_the_reference(dtype, atol, dev):
    """TritonWorldModel (each planner MLP one Triton kernel, what torch-compile-triton runs; without a GPU, in
    Triton's interpreter) gives the networks' outputs - next latent with SimNorm, policy head, a rollout step
    (decoded reward and next latent in one launch), the two Q heads q_idx picks out of 5, decoded - for widths
    that are not powers of two (hidden 48, latent 24, 101 bins: all padded), and plans the reference's step,
    also compiled whole by torch.compile (Inductor)."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")
    from edge_tdmpc.compile.kernels import TritonWorldModel
    from edge_tdmpc.compile.runtimes import graph_step
    if (dev == "cuda") != torch.cuda.is_available():
        pytest.skip("with a CUDA GPU the kernels compile for it (the cuda case); without, they run in Triton's "
                    "interpreter (the cpu case)")
    torch.manual_seed(1)
    ref = WorldModel(make_config("mt30", size=None, enc_dim=32, mlp_dim=48, latent_dim=24, num_q=5, task_dim=16))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = ref.eval().to(dev, dtype)
    ours = TritonWorldModel.of(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 24, generator=g).softmax(-1).to(dev, dtype)
    a = (torch.rand(40, 6, generator=g) * 2 - 1).to(dev)
    heads = torch.tensor([3, 1], device=dev)
    for task in (5, torch.tensor([17], device=dev)):
        pairs = [(ours.next(z, a, task), ref.next(z, a, task)), (ours.pi_head(z, task), ref.pi_head(z, task))]
        pairs += zip(ours.rollout_step(z, a, task), ref.rollout_step(z, a, task))
        pairs += [(ours.Q(z, a, task, q, qidx=heads), ref.Q(z, a, task, q, qidx=heads)) for q in ("avg", "min")]
        for x, y in pairs:
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(x.float(), y.float(), atol=atol * max(1, y.abs().max().item()), rtol=0)
    if dtype != torch.float32:
        return  # fp16 rounding reorders near-tied elites: the step is compared where the arithmetic is exact
    feed = _feed(ref, SMALL, seed=6)
    obs, task, prev, t0, noise = record.feed_to_torch(feed)
    noise = noise._replace(gumbel=torch.zeros_like(noise.gumbel))
    args = (SMALL, obs, torch.tensor([task]), prev, torch.tensor(float(t0)), noise, torch.tensor(0.99),
            torch.tensor(0.0))
    args = tuple(x.to(dev) if torch.is_tensor(x) else x._replace(**{k: v.to(dev) for k, v in x._asdict().items()})
                 if hasattr(x, "_asdict") and not isinstance(x, PlannerConfig) else x for x in args)
    out = graph_step(ours, *args)
    for x, y in zip(out, graph_step(ref, *args)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    # one graph for torch.compile, lowered by Inductor (its C++ backend here, Triton on a GPU): each kernel
    # launch is an opaque custom op (edge_tdmpc::triton_*) and Inductor fuses the glue between them
    traced = torch.compile(graph_step, fullgraph=True, dynamic=False)(ours, *args)
    for x, y in zip(traced, out):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("multitask", [True, False])
def test_triton_planner_kernels_match_the_reference(multitask):
    """The policy trajectories in one program (policy -> sample -> dynamics over the horizon) equal
    planner.pi_rollout, from one latent broadcast or from one per row; the fused value (rollout steps adding
    their discounted rewards, then policy -> 2 Q heads -> value in one program) equals
    planner.estimate_value(...).nan_to_num(0); and the one-program MPPI update equals planner.mppi_update -
    the top-k order, scores, elite actions, masked mean and std. Counts are not powers of two (40 samples, 6
    elites, 6 action dims, 5 trajectories), multi-task (masked action dims) and single-task; in Triton's
    interpreter here, compiled on a GPU."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")
    from edge_tdmpc.compile.kernels import TritonWorldModel
    from edge_tdmpc.planner import estimate_value, mppi_update, pi_rollout
    torch.manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(enc_dim=32, mlp_dim=48, latent_dim=24, num_q=5)
    cfg = make_config("mt30" if multitask else "cheetah-run", size=None, **kw, **(
        dict(task_dim=16) if multitask else {}))
    ref = WorldModel(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = ref.eval().to(dev)
    ours = TritonWorldModel.of(ref)
    g = torch.Generator().manual_seed(4)
    S, H, A = 40, 3, 6
    for task in ((3, 4) if multitask else (None,)):  # cheetah-run: all 6 action dims; reacher-easy: 2
        mask = ref.action_mask(task).float() if multitask else torch.ones(A, device=dev)
        z = torch.randn(S, 24, generator=g).softmax(-1).to(dev)
        actions = ((torch.rand(H, S, A, generator=g) * 2 - 1).to(dev)) * mask
        q_idx, q_pi = torch.tensor([4, 2], device=dev), torch.randn(S, A, generator=g).to(dev)
        eps = torch.randn(H, 5, A, generator=g).to(dev)
        for z0 in (z[:1].expand(5, -1), z[:5]):
            pi = ours.fused_pi_rollout(z0, task, eps)
            assert pi.shape == (H, 5, A) and pi.dtype == torch.float32
            torch.testing.assert_close(pi, pi_rollout(ref, z0, task, eps), atol=1e-5, rtol=0)
        value = ours.fused_value(z, actions, task, torch.tensor(0.95, device=dev), q_idx, q_pi)
        expect = estimate_value(ref, z, actions, task, 0.95, q_idx, q_pi).nan_to_num(0).squeeze(1)
        assert value.shape == expect.shape == (S,)
        torch.testing.assert_close(value, expect, atol=1e-5 * max(1, expect.abs().max().item()), rtol=0)
        plan_cfg = PlannerConfig.make(num_samples=S, num_elites=6, num_pi_trajs=4, min_std=0.1)
        for x, y in zip(ours.fused_mppi(expect, actions, mask, plan_cfg), mppi_update(expect, actions, mask, plan_cfg)):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        if task == 4:
            assert (ours.fused_mppi(expect, actions, mask, plan_cfg)[1][:, 2:] == 0).all()  # unused dims: std 0


def test_triton_model_refuses_bf16_in_the_interpreter():
    """Triton's interpreter computes tl.dot on bf16 operands wrongly (values ~1e10 off), so a bf16 TritonWorldModel
    without a GPU is refused in one line instead of planning on garbage."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")
    from edge_tdmpc.compile import triton_ops
    from edge_tdmpc.compile.kernels import TritonWorldModel
    if not triton_ops.INTERPRETED:
        pytest.skip("kernels compile for the GPU here: bf16 is checked by the gpu tests")
    with pytest.raises(ValueError, match="interpreter .* bf16"):
        TritonWorldModel.of(WorldModel(make_config("mt30", size=None, enc_dim=32, mlp_dim=48, latent_dim=24,
                                                   num_q=5, task_dim=16)).to(torch.bfloat16))


def test_triton_kernels_compile_for_gpus_without_spilling():
    """The 1M student's rollout and Q kernels compile for an H100/H200 (sm_90) and a Jetson Orin (sm_87) with
    Triton's own ptxas, no GPU needed, and so do the value (policy -> 2 Q heads in one program), MPPI update
    and policy-trajectory kernels for the Orin, where registers are tightest: within the registers and shared
    memory a program has, and without spilling to local memory (a whole-row-block design spilled 4.7 KB per
    thread; tens of bytes are noise)."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")
    code = """if True:
        import json, os
        os.environ["TRITON_INTERPRET"] = "0"  # compile for a GPU, not for the interpreter
        from edge_tdmpc import WorldModel, make_config
        from edge_tdmpc.compile.kernels import TritonWorldModel
        m = TritonWorldModel.of(WorldModel(make_config("mt30", size=1)).eval().half())
        reports = {f"{k} sm_90": r for k, r in m.ptxas_report(90, launches=("rollout", "Q")).items()}
        reports |= {f"{k} sm_87": r for k, r in m.ptxas_report(87, launches=("rollout", "Q", "value", "mppi",
                                                                             "pi_rollout")).items()}
        print(json.dumps(reports))"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(reports) == 7
    for name, r in reports.items():
        assert r["registers"] <= 255 and r["shared"] <= 96 * 1024, (name, r)
        assert r["spill_stores"] <= 64 and r["spill_loads"] <= 64, (name, r)


@pytest.mark.parametrize("name", ["torch-cuda-graph", "torch-cuda-graph-triton"])
def test_cuda_graph_runtime_stages_inputs_and_keeps_the_warm_start(model, name):
    """What the CUDA-graph runtimes do around the captured step - observation, task (as a float), t0,
    discount and exploration staged in one buffer; the warm-start mean kept on the device - run eagerly on
    the CPU (capture off; the Triton kernels in Triton's interpreter): consecutive steps equal planner.plan on
    the same noise, each warm-started from the last, in stochastic and in eval mode; a wrong-size observation
    is refused."""
    import edge_tdmpc.compile.runtimes  # noqa: F401  (registers the runtimes)
    from edge_tdmpc.runtime import RUNTIMES
    if name.endswith("triton"):
        pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

    class Eager(RUNTIMES[name]):
        capture = False

    rt = Eager(model, "fp32", SMALL, seed=0)
    task, mean = 3, None  # cheetah-run: 17 of the 24 observation entries
    for step, (t0, eval_mode) in enumerate([(True, False), (False, False), (False, True)]):
        feed = _feed(model, SMALL, seed=10 + step, task=task, t0=t0)
        feed["obs"][17:] = 0.0  # what the runtime pads a cheetah-run observation with
        feed["noise_gumbel"][:] = 0.0  # the top elite: no near-tie between elites decides the comparison
        if eval_mode:
            feed["noise_action"][:] = 0.0
        if mean is not None:
            feed["prev_mean"] = mean
        obs, _, _, _, noise = record.feed_to_torch(feed)
        ref = record.reference_step(model, feed, SMALL)
        a = rt.act(obs.numpy()[:17], task, t0, eval_mode=eval_mode, noise=noise)
        np.testing.assert_allclose(a, ref["action"], atol=1e-5)
        np.testing.assert_allclose(rt.prev_mean.numpy(), ref["mean"], atol=1e-5)
        mean = ref["mean"]
    with pytest.raises(ValueError, match="observation has 25 entries but the model expects 24"):
        rt.act(np.zeros(25), task, False)


def test_cuda_graph_noise_draws_match_sample_noise():
    """The torch-cuda-graph runtime's capturable draws (run here on the CPU) have sample_noise's shapes, dtypes
    and distributions, and plan() accepts them."""
    from edge_tdmpc.compile.runtimes import draw_noise
    cfg = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=300)
    torch.manual_seed(0)
    drawn, ref = draw_noise(cfg, 6, 5, "cpu"), sample_noise(cfg, 6, 5, torch.Generator().manual_seed(0))
    assert [(t.shape, t.dtype) for t in drawn] == [(t.shape, t.dtype) for t in ref]
    q = drawn.q_idx
    assert ((q >= 0) & (q < 5)).all() and (q[:, 0] != q[:, 1]).all()
    assert np.bincount(q.flatten().numpy(), minlength=5).min() > 0.8 * q.numel() / 5  # every head, evenly
    assert abs(drawn.sample.mean()) < 0.01 and abs(drawn.sample.std() - 1) < 0.01
    gumbel = torch.cat([draw_noise(cfg, 6, 5, "cpu").gumbel for _ in range(500)])
    assert abs(gumbel.mean() - 0.5772) < 0.05 and abs(gumbel.std() - np.pi / 6 ** 0.5) < 0.05  # Gumbel(0, 1)
    m = make_tiny_model()
    small = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=2)
    action, mean, _ = plan(m, torch.zeros(m.cfg.obs_dim), 0, torch.zeros(small.horizon, 6), True,
                           draw_noise(small, 6, m.cfg.num_q, "cpu"), small)
    assert action.shape == (6,) and torch.isfinite(mean).all() and action.abs().max() <= 1


def test_speed_bench_times_runtimes_on_identical_inputs(model, cache, tmp_path):
    """compile.speed (the latency benchmark) on a tiny model: every runtime timed, |Δa| against eager; a
    compiled artifact of the same checkpoint (--artifacts) is timed beside them."""
    from edge_tdmpc.compile import speed
    ckpt = tmp_path / "tiny.pt"
    save_model(model, ckpt)
    art = artifact.compile_model(model, "fp16", SMALL, out=tmp_path / "my-fp16", checkpoint=ckpt, verify_episodes=1,
                                 verify_steps=2)
    rts = speed._runtimes(model, ["fp32"], SMALL) | speed._artifacts(ckpt, [art], SMALL)
    lat = speed.latency(model, rts, SMALL, steps=3, warmup=1, settle=0)
    assert set(lat) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16 (my-fp16)")}
    assert lat[("onnxruntime", "fp16 (my-fp16)")]["bytes"] == artifact.artifact_size(art)
    assert lat[("torch", "fp32")]["speedup"] == 1.0 and lat[("onnxruntime", "fp32")]["p50_ms"] > 0
    assert lat[("onnxruntime", "fp32")]["mean_daction"] < 1e-2
    assert "| onnxruntime | fp32 |" in speed.markdown(lat)
    other = tmp_path / "other.pt"
    save_model(make_tiny_model(seed=1), other)
    with pytest.raises(ValueError, match="not compiled from .*other.pt"):
        speed._artifacts(other, [art], SMALL)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU"):
            speed._runtimes(model, ["fp16"], SMALL, ["torch-cuda-graph"])
