"""Export: the networks and the whole planning step as ONNX graphs, against the torch model and planner.plan.

Tolerance vs the torch fp32 reference on the same noise: 1e-5 on the tiny model (reordered sums only).
"""
import numpy as np
import onnx
import pytest
import torch
from helpers import SMALL, assert_outputs_close, make_feed

from edge_tdmpc import WorldModel, make_config
from edge_tdmpc.compile import export, networks, precision, record
from edge_tdmpc.compile.session import OnnxSession
from edge_tdmpc.planner import PlannerConfig, plan, policy_action


@pytest.mark.parametrize("task,t0", [(0, True), (3, False), (7, False), (29, True)])
def test_plan_graph_matches_plan_fp32(model, task, t0):
    session = OnnxSession(export.step_graph(model, SMALL))
    feed = make_feed(model, SMALL, seed=task, task=task, t0=t0)
    assert_outputs_close(session.run(feed), record.reference_step(model, feed, SMALL), atol=1e-5)


def test_plan_graph_gives_the_planner_label(model):
    """std and eval_action, with mean[0] the planner's label of the step (planner.PlanLabel)."""
    session = OnnxSession(export.step_graph(model, SMALL))
    feed = make_feed(model, SMALL, seed=2, task=5)
    obs, task, prev, t0, noise = record.feed_to_torch(feed)
    _, mean, info = plan(model, obs, task, prev, t0, noise, SMALL, 0.99)
    out = session.run(feed)
    np.testing.assert_allclose(out["std"], info["std"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["eval_action"], info["eval_action"].numpy(), atol=1e-5)


def test_multitask_model_without_task_embedding_runs_every_task():
    from helpers import make_tiny_model
    model = make_tiny_model("cartpole-balance,pendulum-swingup", seed=3)  # task_dim 0
    session = OnnxSession(export.step_graph(model, SMALL))
    for task in (0, 1):
        feed = make_feed(model, SMALL, seed=task, task=task)
        assert_outputs_close(session.run(feed), record.reference_step(model, feed, SMALL), atol=1e-5)


def test_plan_graph_eval_mode_is_zero_action_noise(model):
    session = OnnxSession(export.step_graph(model, SMALL))
    feed = make_feed(model, SMALL, seed=1)
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
        graph = export.step_graph(m, SMALL)
        if m.cfg.num_q > 2:  # only the 2 heads q_idx picks are computed, not all 5
            assert not any("/Q4." in n.name for n in graph.graph.node)
            assert sum("of2." in n.name and n.op_type == "MatMul" for n in graph.graph.node) == 2 * 4 * SMALL.iterations
        session = OnnxSession(graph)
        assert ("noise_q_idx" in session.inputs) == (m.cfg.num_q > 2)
        assert ("task" in session.inputs) == m.cfg.multitask
        feed = make_feed(m, SMALL, seed=2)
        assert_outputs_close(session.run(feed), record.reference_step(m, feed, SMALL), atol=1e-5)


def test_policy_graph_for_mpc_false(model):
    cfg = PlannerConfig(mpc=False)
    session = OnnxSession(export.step_graph(model, cfg))
    feed = make_feed(model, cfg, seed=4)
    obs, task, _, _, noise = record.feed_to_torch(feed)
    out = session.run(feed)
    np.testing.assert_allclose(out["action"], policy_action(model, obs, task, noise.action).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["mean"], policy_action(model, obs, task, noise.action, True).numpy(), atol=1e-5)


def test_network_graphs_match_the_model(model):
    graphs = networks.network_graphs(model)
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
        assert_outputs_close(out, {k: v.numpy() for k, v in ref[name].items()}, atol=1e-5)


def test_task_embedding_is_folded_not_concatenated(model):
    proto = export.step_graph(model, SMALL)
    assert not any(n.op_type == "Concat" and "encoder" in n.name for n in proto.graph.node)
    names = {t.name for t in proto.graph.initializer}
    assert "dynamics.0.b" in names and "dynamics.0.W_z" in names and "dynamics.0.W_a" in names
    table = next(t for t in proto.graph.initializer if t.name == "dynamics.0.b")
    assert list(table.dims) == [len(model.cfg.tasks), model.cfg.mlp_dim]  # one folded bias row per task


def test_real_student_plan_graph_matches(student):
    cfg = PlannerConfig()
    session = OnnxSession(export.step_graph(student, cfg))
    feed = make_feed(student, cfg, seed=0, task=10, t0=True)
    out, ref = session.run(feed), record.reference_step(student, feed, cfg)
    np.testing.assert_allclose(out["z"], ref["z"], atol=1e-5)
    np.testing.assert_allclose(out["value"], ref["value"], rtol=1e-3)
    assert np.abs(out["action"] - ref["action"]).mean() < 1e-2


@pytest.mark.parametrize("prec,atol", [("fp32", 2e-5), ("fp16", 2e-3)])
def test_primitive_layernorm_for_tensorrt_8_5_matches_native(model, prec, atol):
    """TensorRT 8.5 (JetPack 5, Xavier) has no LayerNormalization importer: the same graph with it written out
    in primitive ops parses there and computes the same step."""
    layers = precision.model_layer_precisions(model, prec)
    native = export.step_graph(model, SMALL, layers)
    primitive = export.step_graph(model, SMALL, layers, native_layernorm=False)
    assert export.tensorrt_unsupported(native, (8, 5, 2)) == ["LayerNormalization"]
    assert export.tensorrt_unsupported(native, (8, 6)) == export.tensorrt_unsupported(primitive, (8, 5, 2)) == []
    feed = make_feed(model, SMALL, seed=8)
    feed["noise_gumbel"] = np.zeros_like(feed["noise_gumbel"])
    out, ref = OnnxSession(primitive).run(feed), OnnxSession(native).run(feed)
    for k in ("z", "mean", "action"):
        np.testing.assert_allclose(out[k], ref[k], atol=atol, rtol=0, err_msg=k)
    for net in networks.network_graphs(model, native_layernorm=False).values():
        assert export.tensorrt_unsupported(net, (8, 5, 2)) == []
