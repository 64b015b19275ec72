"""Runtimes: ONNX Runtime on an artifact, the torch CUDA-graph and torch-compile(-fused) runtimes, and TensorRT
(engine checks, fp32 pinning, the CUDA helper) - against the torch runtime and planner.plan."""
import copy

import numpy as np
import pytest
import torch
from helpers import SMALL, make_feed, make_tiny_model

from edge_tdmpc.compile import artifact, record, trt
from edge_tdmpc.compile.runtimes import compiled_runtime, make_runtime
from edge_tdmpc.planner import PlannerConfig, plan, sample_noise


def test_artifact_runtime_matches_torch_runtime_on_same_seed(fp32_artifact, model):
    rt = make_runtime("onnxruntime", fp32_artifact, "fp32", SMALL, seed=3)
    ref = make_runtime("torch", model, "fp32", SMALL, seed=3)
    obs = np.linspace(-1, 1, 17, dtype=np.float32)  # cheetah-run's own 17 entries: padded to 24
    for t in range(4):
        a, b = rt.act(obs * t, 3, t == 0), ref.act(obs * t, 3, t == 0)
        assert a.shape == (6,) and np.abs(a - b).max() < 1e-5
    assert rt.size_bytes() == artifact.read_manifest(fp32_artifact)["files"]["step.onnx"]["bytes"]
    rt.reset(3)
    ref.reset(3)
    np.testing.assert_allclose(rt.act(obs, 3, True, eval_mode=True), ref.act(obs, 3, True, eval_mode=True), atol=1e-5)
    with pytest.raises(ValueError, match="pass task"):
        rt.act(obs, None, True)


def test_policy_only_runtime_matches_torch(model, cache):
    cfg = PlannerConfig(mpc=False)
    rt = compiled_runtime("onnxruntime", model, "fp32", cfg, seed=1)
    ref = make_runtime("torch", model, "fp32", cfg, seed=1)
    assert artifact.read_manifest(rt.dir)["status"] == "ok"
    obs = np.linspace(-1, 1, 24, dtype=np.float32)
    for eval_mode in (False, True, False):
        np.testing.assert_allclose(rt.act(obs, 5, False, eval_mode), ref.act(obs, 5, False, eval_mode), atol=1e-5)


def test_plan_step_traces_whole_under_torch_compile(model):
    """The planning step is one graph for torch.compile (fullgraph: no graph breaks, no host syncs), computing
    what eager computes; the GPU runtime then compiles it with Inductor (tested on the device machine)."""
    from edge_tdmpc.compile.runtimes import graph_step
    feed = make_feed(model, SMALL, seed=6)
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
    feed = make_feed(model, SMALL, seed=6)
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


@pytest.mark.parametrize("name", ["torch-cuda-graph", "torch-cuda-graph-triton"])
def test_cuda_graph_runtime_stages_inputs_and_keeps_the_warm_start(model, name):
    """What the CUDA-graph runtimes do around the captured step - observation, task (as a float), t0,
    discount and exploration staged in one buffer; the warm-start mean kept on the device - run eagerly on
    the CPU (capture off; the Triton kernels in Triton's interpreter): consecutive steps equal planner.plan on
    the same noise, each warm-started from the last, in stochastic and in eval mode; a wrong-size observation
    is refused."""
    import edge_tdmpc.compile.runtimes  # noqa: F401  (registers the runtimes)
    from edge_tdmpc.compile.runtimes import RUNTIMES
    if name.endswith("triton"):
        pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

    class Eager(RUNTIMES[name]):
        capture = False

    rt = Eager(model, "fp32", SMALL, seed=0)
    task, mean = 3, None  # cheetah-run: 17 of the 24 observation entries
    for step, (t0, eval_mode) in enumerate([(True, False), (False, False), (False, True)]):
        feed = make_feed(model, SMALL, seed=10 + step, task=task, t0=t0)
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
    cfg = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=300)
    torch.manual_seed(0)
    drawn = sample_noise(cfg, 6, 5, device="cpu", capturable=True)
    ref = sample_noise(cfg, 6, 5, torch.Generator().manual_seed(0))
    assert [(t.shape, t.dtype) for t in drawn] == [(t.shape, t.dtype) for t in ref]
    q = drawn.q_idx
    assert ((q >= 0) & (q < 5)).all() and (q[:, 0] != q[:, 1]).all()
    assert np.bincount(q.flatten().numpy(), minlength=5).min() > 0.8 * q.numel() / 5  # every head, evenly
    assert abs(drawn.sample.mean()) < 0.01 and abs(drawn.sample.std() - 1) < 0.01
    gumbel = torch.cat([sample_noise(cfg, 6, 5, device="cpu", capturable=True).gumbel for _ in range(500)])
    assert abs(gumbel.mean() - 0.5772) < 0.05 and abs(gumbel.std() - np.pi / 6 ** 0.5) < 0.05  # Gumbel(0, 1)
    m = make_tiny_model()
    small = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=2)
    action, mean, _ = plan(m, torch.zeros(m.cfg.obs_dim), 0, torch.zeros(small.horizon, 6), True,
                           sample_noise(small, 6, m.cfg.num_q, device="cpu", capturable=True), small)
    assert action.shape == (6,) and torch.isfinite(mean).all() and action.abs().max() <= 1


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
    feed = make_feed(model, SMALL, seed=6, t0=True)
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
    engine = trt.Engine(art / "step.engine")  # deserialized from the file: the serialization round trip
    ok, table = trt.verify_engine(engine, art, m)
    assert ok, table
    graphed = trt.Engine(art / "step.engine", cuda_graph=True)
    with np.load(art / "verify.npz") as data:
        feed = {k: data[k][0] for k in graphed.inputs}
    np.testing.assert_allclose(graphed.run(feed)["action"], engine.run(feed)["action"], atol=1e-6)


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

