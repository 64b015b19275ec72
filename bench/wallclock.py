"""The robot loop in wall-clock time, with a DMC task as the plant, against the bench's simulated time.

`control.RealtimeLoop` drives the env one step per tick on a real clock (the planner in its thread, as on a
robot); then `control.DeadlineSim` replays the same episode start in simulated time with each plan's measured
latency. Agreement of the two (fallback share, return) is what lets `edge-tdmpc bench --realtime` stand in for
the robot. One episode start per mode; the planner's noise differs, so returns agree only roughly.

    edge-tdmpc bench wallclock CKPT --task cartpole-balance --hz 20 --ticks 200
"""
import json

import numpy as np

from edge_tdmpc.checkpoint import load_model
from edge_tdmpc.compile.runtimes import compiled_runtime
from edge_tdmpc.control import DeadlineSim, RealtimeLoop
from edge_tdmpc.envs import episode_env
from edge_tdmpc.rollout import run, runtime_actor
from edge_tdmpc.tasks import fit_obs


class Plant:
    """A DMC task standing in for the robot: `sense()` its observation, `actuate(action)` one env step."""

    def __init__(self, task: str, seed: int, obs_dim: int, multitask: bool):
        self.env, self.obs = episode_env(task, seed, 0)
        self.task, self.obs_dim, self.multitask, self.ret = task, obs_dim, multitask, 0.0

    def sense(self):
        return fit_obs(self.obs, self.obs_dim, self.task if self.multitask else None)

    def actuate(self, action):
        self.obs, reward, *_ = self.env.step(np.asarray(action, np.float32)[: self.env.action_dim])
        self.ret += reward


def compare(model, task: str, hz: float, ticks: int, runtime="onnxruntime", precision="fp32", fallback="hold",
            seed=1, warmup=3) -> dict:
    """{"wall": ..., "sim": ...}: return and `TickStats.summary()` of each mode from the same initial state."""
    ti = model.cfg.tasks.index(task) if model.cfg.multitask else None
    rt = compiled_runtime(runtime, model, precision, seed=0, echo=print)
    for i in range(warmup):  # lazy init and allocation outside the timed loop
        rt.act(np.zeros(model.cfg.obs_dim, np.float32), ti, t0=i == 0)
    out = {}
    for mode in ("wall", "sim"):
        plant = Plant(task, seed, model.cfg.obs_dim, ti is not None)
        rt.reset(0)
        if mode == "wall":
            stats = RealtimeLoop(rt, hz, plant.sense, plant.actuate, task=ti, fallback=fallback).run(ticks)
            plant.env.close()
            out[mode] = {"return": plant.ret, **stats}
        else:
            sim = DeadlineSim(rt, hz, fallback)
            ep = run(plant.env, plant.obs, runtime_actor(sim, model.cfg, task), ticks)
            out[mode] = {"return": ep.ret, **sim.stats.summary()}
    rt.close()
    return out


def benchmark(checkpoint, task: str, hz: float, ticks=200, runtime="onnxruntime", precision="fp32", fallback="hold",
              seed=1, echo=print) -> dict:
    """`edge-tdmpc bench wallclock`: `compare` on the model in `checkpoint`, one line per mode, then the JSON."""
    res = compare(load_model(checkpoint), task, hz, ticks, runtime, precision, fallback, seed)
    for mode, r in res.items():
        echo(f"{mode:4}  return {r['return']:8.1f}  fallback ticks {r['fallback_rate']:6.1%}  "
             f"plan p50 {r['plan_ms_p50']:.1f} ms" + (f"  tick late p99 {r['late_ms_p99']:.2f} ms"
                                                      if "late_ms_p99" in r else ""))
    echo(json.dumps(res))
    return res


if __name__ == "__main__":
    from edge_tdmpc.bench.cli import wallclock_cmd
    wallclock_cmd()
