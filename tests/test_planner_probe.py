"""The planner probe (bench/planner_probe.py): its variants are the bench's planner and prior where they should be,
the cold average is the cold mean at one replan, and a run resumes without repeating a row."""
import json

import numpy as np
import pytest
import torch
from helpers import SMALL, make_tiny_model

from edge_tdmpc.bench.planner_probe import VARIANTS, ProbeActor, read_rows, run_probe
from edge_tdmpc.planner import PlannerConfig
from edge_tdmpc.rollout import evaluation_episode
from edge_tdmpc.runtime import TorchRuntime

TASK, STEPS = "cartpole-balance", 4


def _actor(model, variant, replans=2, cold=False):
    mask = model.action_mask(model.cfg.tasks.index(TASK)).reshape(-1).float().numpy()
    prior = TorchRuntime(model, "fp32", PlannerConfig(mpc=False))
    return ProbeActor(variant, TorchRuntime(model, "fp32", SMALL), prior, mask, replans,
                      TorchRuntime(model, "fp32", SMALL) if cold else None)


def _episode(model, runtime):
    ep, _, _ = evaluation_episode(runtime, model.cfg, TASK, 1, 0, STEPS, eval_mode=True)
    return np.stack(ep.actions)


def test_plan_and_prior_are_the_bench_runtimes(tiny_model, one_thread):
    for variant, cfg in (("plan", SMALL), ("prior", PlannerConfig(mpc=False))):
        bench = _episode(tiny_model, TorchRuntime(tiny_model, "fp32", cfg))
        np.testing.assert_array_equal(_episode(tiny_model, _actor(tiny_model, variant)), bench)


def test_mean_executes_the_label_the_planner_term_teaches(tiny_model, one_thread):
    runtime = TorchRuntime(tiny_model, "fp32", SMALL)
    runtime.reset(123)
    runtime.act(np.zeros(tiny_model.cfg.obs_dim, np.float32), 3, t0=True, eval_mode=True)
    label = runtime.plan_label()[:tiny_model.cfg.action_dim]
    actor = _actor(tiny_model, "mean")
    actor.reset(123)
    np.testing.assert_array_equal(actor.act(np.zeros(tiny_model.cfg.obs_dim, np.float32), 3, t0=True), label)
    assert not np.array_equal(label, runtime.act(np.zeros(tiny_model.cfg.obs_dim, np.float32), 3, t0=True))


def test_measuring_the_memory_leaves_the_mean_variant_alone(tiny_model, one_thread):
    measured = _actor(tiny_model, "mean", cold=True)
    np.testing.assert_array_equal(_episode(tiny_model, measured), _episode(tiny_model, _actor(tiny_model, "mean")))
    assert len(measured.stats["memory"]) == STEPS and max(measured.stats["memory"]) > 0
    assert len(measured.stats["prior_to_warm"]) == STEPS


def test_cold_average_of_one_replan_is_the_cold_mean(tiny_model, one_thread):
    one = _actor(tiny_model, "mean-cold-avg", replans=1)
    np.testing.assert_array_equal(_episode(tiny_model, one), _episode(tiny_model, _actor(tiny_model, "mean-cold")))
    assert one.stats["spread"] == [0.0] * STEPS and len(one.stats["prior_to_cold"]) == STEPS
    four = _actor(tiny_model, "mean-cold-avg", replans=4)
    _episode(tiny_model, four)
    assert min(four.stats["spread"]) > 0  # independent noise: the replans differ
    assert not np.array_equal(_episode(tiny_model, _actor(tiny_model, "mean")),
                              _episode(tiny_model, _actor(tiny_model, "mean-cold")))  # the warm start matters


def test_run_resumes_without_repeating_a_row(tiny_model, tmp_path):
    from edge_tdmpc.checkpoint import save_model
    ckpt = tmp_path / "tiny.pt"
    save_model(tiny_model, ckpt)
    kw = dict(steps=STEPS, runtime="torch", precision="fp32", workers=0, planner=SMALL, echo=lambda _: None)
    threads = torch.get_num_threads()
    try:
        rows = run_probe(ckpt, [TASK], ["plan", "mean-cold-avg"], 1, tmp_path / "out", **kw)
        assert sorted(r["variant"] for r in rows) == ["mean-cold-avg", "plan"]
        assert {"spread", "prior_to_cold"} <= set(next(r for r in rows if r["variant"] == "mean-cold-avg"))
        rows = run_probe(ckpt, [TASK], ["mean"], 1, tmp_path / "out", **kw)
        assert {"memory", "prior_to_warm"} <= set(next(r for r in rows if r["variant"] == "mean"))
        rows = run_probe(ckpt, [TASK], list(VARIANTS), 1, tmp_path / "out", **kw)
    finally:
        torch.set_num_threads(threads)
    assert sorted(r["variant"] for r in rows) == sorted(VARIANTS)  # each once: the first two kept, not rerun
    lines = (tmp_path / "out" / "probe.jsonl").read_text().splitlines()
    assert len(lines) == len(VARIANTS) and all(json.loads(x)["steps"] == STEPS for x in lines)
    assert read_rows(tmp_path / "out") == rows
    with open(tmp_path / "out" / "probe.jsonl", "a") as f:  # a run killed mid-write leaves a torn line
        f.write('{"task": "cartpole-bal')
    rows = run_probe(ckpt, [TASK], list(VARIANTS), 1, tmp_path / "out", **kw)
    assert sorted(r["variant"] for r in rows) == sorted(VARIANTS)  # read past it, nothing rerun
    assert len((tmp_path / "out" / "probe.jsonl").read_text().splitlines()) == len(VARIANTS)  # and dropped
    other = tmp_path / "other.pt"
    save_model(make_tiny_model(seed=5), other)  # another prior on the same task set: the prior variants follow it
    rows = run_probe(ckpt, [TASK], ["prior", "prior-fit"], 1, tmp_path / "other", prior=other, **kw)
    mine = {r["variant"]: r for r in read_rows(tmp_path / "out")}
    theirs = {r["variant"]: r for r in rows}
    assert theirs["prior"]["ret"] == theirs["prior-fit"]["ret"] != mine["prior"]["ret"]  # labelling moves nothing
    assert theirs["prior-fit"]["prior_to_warm"] > 0
    save_model(make_tiny_model("cartpole-balance,reacher-easy"), tmp_path / "two.pt")
    with pytest.raises(ValueError, match="a student of CKPT with its task set"):
        run_probe(ckpt, [TASK], ["prior"], 1, tmp_path / "x", prior=tmp_path / "two.pt", **kw)
    with pytest.raises(ValueError, match="unknown variant"):
        run_probe(ckpt, [TASK], ["elite"], 1, tmp_path / "out", **kw)
    with pytest.raises(ValueError, match="not in the model's task set"):
        run_probe(ckpt, ["walker-sprint"], ["plan"], 1, tmp_path / "out", **kw)
