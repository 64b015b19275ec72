"""Benchmark harness: closed-loop MT30 score, per-action latency, memory and size per runtime x precision.

    from edge_tdmpc.bench import run_bench
    report = run_bench("mt30-1M-distilled-fp16.pt", "runs/bench", tasks="cartpole-swingup,walker-walk",
                       precisions="fp32,bf16", episodes=2, check_actions=20)

Modules: runner (episodes in worker processes, resumable JSONL), meters (latency, memory, machine facts),
faithful (same inputs and noise through every runtime), report (JSON, Markdown, plots, compare), harness
(`run_bench`, which validates everything before the first episode).
"""
from edge_tdmpc.bench.faithful import TOLERANCE, check_actions
from edge_tdmpc.bench.harness import open_model, resolve_pairs, run_bench
from edge_tdmpc.bench.report import compare, load_report
from edge_tdmpc.bench.runner import run_episode

__all__ = ["TOLERANCE", "check_actions", "compare", "load_report", "open_model",
           "resolve_pairs", "run_bench", "run_episode"]
