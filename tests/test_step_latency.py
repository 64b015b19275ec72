"""bench.step_latency (`edge-tdmpc bench step-latency`): the latency benchmark of the runtimes and compiled
artifacts."""
import pytest
import torch
from helpers import SMALL, make_tiny_model

from edge_tdmpc import save_model
from edge_tdmpc.compile import artifact


def test_step_latency_times_runtimes_on_identical_inputs(model, cache, tmp_path):
    """bench.step_latency (the latency benchmark) on a tiny model: every runtime timed, |Δa| against eager; a
    compiled artifact of the same checkpoint (--artifacts) is timed beside them."""
    from edge_tdmpc.bench import step_latency
    ckpt = tmp_path / "tiny.pt"
    save_model(model, ckpt)
    art = artifact.compile_model(model, "fp16", SMALL, out=tmp_path / "my-fp16", checkpoint=ckpt, verify_episodes=1,
                                 verify_steps=2)
    rts = step_latency._runtimes(model, ["fp32"], SMALL) | step_latency._artifacts(ckpt, [art], SMALL)
    lat = step_latency.latency(model, rts, SMALL, steps=3, warmup=1, settle=0)
    assert set(lat) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16 (my-fp16)")}
    assert lat[("onnxruntime", "fp16 (my-fp16)")]["bytes"] == artifact.artifact_size(art)
    assert lat[("torch", "fp32")]["speedup"] == 1.0 and lat[("onnxruntime", "fp32")]["p50_ms"] > 0
    assert lat[("onnxruntime", "fp32")]["mean_daction"] < 1e-2
    assert "| onnxruntime | fp32 |" in step_latency.markdown(lat)
    other = tmp_path / "other.pt"
    save_model(make_tiny_model(seed=1), other)
    with pytest.raises(ValueError, match="not compiled from .*other.pt"):
        step_latency._artifacts(other, [art], SMALL)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU"):
            step_latency._runtimes(model, ["fp16"], SMALL, ["torch-cuda-graph"])

