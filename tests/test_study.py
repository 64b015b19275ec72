"""The distillation study's statistics and its grid: bootstrap intervals, paired differences, the report."""
import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from edge_tdmpc.bench import distill_study as study


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_more_tasks():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 5, (6, 3)), rng.normal(10, 5, (60, 3))
    for t in (small, large):
        m, lo, hi = study.bootstrap(t)
        assert lo < m < hi and m == pytest.approx(t.mean())
    assert np.subtract(*study.bootstrap(large)[2:0:-1]) < np.subtract(*study.bootstrap(small)[2:0:-1])
    assert study.bootstrap(np.full((5, 2), 3.0)) == (3.0, 3.0, 3.0)


def test_paired_difference_sees_a_shift_that_task_variance_hides():
    rng = np.random.default_rng(1)
    tasks = rng.uniform(0, 100, (30, 1))  # tasks differ far more than the objectives do
    a, b = tasks + 2 + rng.normal(0, 0.5, (30, 3)), tasks + rng.normal(0, 0.5, (30, 3))
    d, lo, hi = study.paired_difference(a, b)
    assert 0 < lo < d < hi and d == pytest.approx(2, abs=0.5)
    m_a, lo_a, hi_a = study.bootstrap(a)
    m_b, lo_b, hi_b = study.bootstrap(b)
    assert lo_a < hi_b  # unpaired, the intervals overlap


def test_paired_ratio_is_the_share_of_the_baseline_and_tight_where_tasks_scale_together():
    rng = np.random.default_rng(2)
    tasks = rng.uniform(10, 100, (8, 1))  # 8 tasks of very different scores; a keeps 90% of b on each
    a, b = 0.9 * tasks + rng.normal(0, 0.5, (8, 3)), tasks + rng.normal(0, 0.5, (8, 1))
    share, lo, hi = study.paired_ratio(a, b)
    assert share == pytest.approx(a.mean() / b.mean()) and lo < share < hi
    assert 0.85 < lo and hi < 0.95  # tasks drawn twice count twice in both means: their spread cancels
    d, d_lo, _ = study.paired_difference(a, b)
    assert d_lo / b.mean() < lo - 0.9 - 0.01  # the difference alone cannot say so: its interval scales with tasks
    zero = study.paired_ratio(np.ones((2, 1)), np.array([[0.0], [2.0]]))  # a draw of the zero task alone
    assert zero[0] == 1.0 and zero[2] == np.inf


def test_grid_names_its_runs_and_refuses_unknown_students_or_objectives():
    runs = study.grid("1M-teacher:tdmpc2,planner:1,2;s128:reward:3", 100)
    assert [r.name for r in runs] == ["1M-teacher-tdmpc2-s1", "1M-teacher-tdmpc2-s2", "1M-teacher-planner-s1",
                                      "1M-teacher-planner-s2", "s128-reward-s3"]
    for spec in ("2M:tdmpc2:1", "s128:vibes:1"):
        with pytest.raises(click.BadParameter):
            study.grid(spec, 100)


def _bench(path, scores):
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps({"rows": [{"task": t, "score": s} for t, s in scores.items()]}))


def test_report_reads_finished_runs(tmp_path):
    from edge_tdmpc.distill.data import FORMAT, INDEX, VERSION
    tasks = ["walker-walk", "cartpole-swingup", "reacher-easy"]
    data = tmp_path / "data"
    data.mkdir()
    (data / INDEX).write_text(json.dumps({"format": FORMAT, "version": VERSION, "num_transitions": 1000}))
    for objective, base in (("tdmpc2", 10.0), ("planner", 20.0), ("planner+dagger2", 30.0)):
        for seed in (1, 2):
            d = tmp_path / f"s128-{objective}-s{seed}"
            _bench(d / "bench-eval", {t: base + i + seed for i, t in enumerate(tasks)})
            if objective != "planner+dagger2" and seed == 1:
                _bench(d / "bench-plan", {t: 2 * base for t in tasks})
            (d / "done").write_text("")
            (d / "run.json").write_text(json.dumps({"data": str(data)}))
            rows = [{"kind": "eval", "step": 5, "mean_return": 10 * base}]
            if "dagger" in objective:
                rows = [{"kind": "eval", "step": 4, "mean_return": 10 * base - 10},
                        {"kind": "dagger", "step": 4, "labels": 300}, {"kind": "dagger", "step": 8, "labels": 200},
                        {"kind": "eval", "step": 6, "mean_return": 10 * base}]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _bench(tmp_path / "teacher", {t: 15.0 for t in tasks})
    _bench(tmp_path / "teacher-plan", {t: 34.0 for t in tasks})
    refs = [f"prior-eval={tmp_path / 'teacher' / 'report.json'}", f"plan={tmp_path / 'teacher-plan' / 'report.json'}"]
    r = CliRunner().invoke(study.main, ["report", str(tmp_path), "--teacher-bench", refs[0], "--teacher-bench", refs[1],
                                        "--md", str(tmp_path / "t.md"), "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "t.md").read_text()
    assert "| student | objective | seeds | prior, eval mode | planning |" in text
    assert "| s128 | planner | 2 | 22.50 [" in text and "| teacher | prior-eval | – | 15.00 [15.00, 15.00] |  |" in text
    assert "| teacher | plan | – |  | 34.00 [34.00, 34.00] |" in text
    assert "40.00 [40.00, 40.00] (1) |" in text  # the planning pass of one seed of two, marked
    assert "| s128 | planner | eval | teacher prior-eval | +7.50 [" in text
    assert "| s128 | planner | eval | s128 tdmpc2 | +10.00 [" in text
    assert "| s128 | planner | plan | s128 tdmpc2 | +20.00 [+20.00, +20.00] |" in text
    assert "| s128 | planner | plan | teacher plan | +6.00 [" in text
    assert "| s128 | planner+dagger2 | 2 | 32.50 [" in text
    assert (tmp_path / "c.png").stat().st_size > 0
    points = study.label_points(tmp_path / "s128-planner+dagger2-s1")
    # the eval at update 4 came before round 1; the one at 6 had the data and round 1's labels, not round 2's
    assert points == [(4, 1000, 29.0), (6, 1300, 30.0)]


def test_objective_flags_name_dagger_rounds():
    assert study.objective_flags("planner+dagger") == [*study.OBJECTIVES["planner"], "--dagger", "1"]
    assert study.objective_flags("planner+dagger3") == [*study.OBJECTIVES["planner"], "--dagger", "3"]
    assert study.objective_flags("planner-frozen+dagger2")[-3:] == ["--frozen-world-model", "--dagger", "2"]
    for bad in ("planner+dagger0", "reward+dagger2", "planner+daggerx"):
        with pytest.raises(click.BadParameter):
            study.objective_flags(bad)
