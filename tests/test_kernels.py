"""Triton kernels: TritonWorldModel's networks, planner kernels and planning step against the reference (in Triton's
interpreter without a GPU), and the kernels' register / spill report from ptxas."""
import json
import subprocess
import sys

import pytest
import torch
from helpers import SMALL, make_feed

from edge_tdmpc import WorldModel, make_config
from edge_tdmpc.compile import record
from edge_tdmpc.planner import PlannerConfig


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
    feed = make_feed(ref, SMALL, seed=6)
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


@pytest.mark.slow  # ptxas for two GPUs takes minutes on a loaded CI machine: `pytest -m slow`, and gpu_check.sh
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

