"""Benchmark harness: closed-loop MT30 score, per-action latency, memory and size per runtime x precision.

    from edge_tdmpc.bench import run_bench
    report = run_bench("mt30-1M-distilled-fp16.pt", "runs/bench", tasks="cartpole-swingup,walker-walk",
                       precisions="fp32,bf16", episodes=2, check_actions=20)

Modules: runner (episodes in worker processes, resumable JSONL), meters (latency, memory, machine facts),
faithful (same inputs and noise through every runtime), report (JSON, Markdown, plots, compare), harness
(`run_bench`, which validates everything before the first episode), cli (`edge-tdmpc bench`, `edge-tdmpc demo`),
demo (every stage at small scale).

The other benchmarks, each a subcommand of `edge-tdmpc bench` (and `python -m edge_tdmpc.bench.<module>`):
step_latency (`bench step-latency`: planning-step latency, |delta action|, kernel profile, closed-loop scores of
the runtimes), train_speed (`bench train-speed`: trainer updates/s against official_update, the official update
ported as written, which is also the trainer's test oracle; peak RSS on a dataset larger than RAM), wallclock
(`bench wallclock`: the robot loop on a real clock against the bench's simulated time).
"""
from edge_tdmpc.bench.faithful import TOLERANCE, check_actions
from edge_tdmpc.bench.harness import open_model, resolve_pairs, run_bench
from edge_tdmpc.bench.report import compare, load_report
from edge_tdmpc.bench.runner import run_episode

__all__ = ["TOLERANCE", "check_actions", "compare", "load_report", "open_model",
           "resolve_pairs", "run_bench", "run_episode"]
