"""Fixed-rate control: act on a clock, plan in the background, never let the planner stall the control loop.

A planning step can outlast the control period (a loaded CPU, a cold cache, a small board). A robot cannot wait
for it: each tick must send an action. So the tick takes the newest planned action when one has landed since
the last tick, and otherwise a fallback: the last action held, the last plan's own continuation (its MPPI mean
for the step that has come), or the policy prior on this tick's observation (one small MLP: a fast reflex
under the slow planner). An optional filter (low-pass and rate limit) smooths what reaches the motors.

`RealtimeLoop` is that loop on a robot (wall clock, planner in a thread). `DeadlineSim` is the same timing in
simulated time, for the bench: each env step is one tick, and a plan's measured latency decides at which tick
its action lands. In both, a tick waits at most `budget` (a fraction of the period, 1 by default) for the plan
of its own observation; a plan that takes longer lands at the first tick whose budget it meets. Both take any
runtime with the interface of `edge_tdmpc.runtime.Runtime` (`act`, `reset`, `planned_mean`, `advance_mean`):
a bench runtime, or the TensorRT `Planner` of a deploy bundle (numpy only; this module needs no torch).
"""
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

FALLBACKS = ("hold", "plan", "policy")


# Larger entries are no sensor reading of a robot these models control, and squared in the encoder's LayerNorm
# they overflow fp32 (past ~1e18), where PyTorch's kernels return NaN and ONNX Runtime's a finite action: one
# bound keeps every runtime's answer the same, the safe action, flagged.
OBS_LIMIT = 1e6


def usable(obs) -> bool:
    """Whether an observation may reach the networks: every entry finite (no NaN, no Inf) and within
    +-OBS_LIMIT."""
    x = np.asarray(obs, np.float64)
    return bool(np.isfinite(x).all() and (np.abs(x) <= OBS_LIMIT).all())


def check_fallback(mode: str) -> str:
    if mode not in FALLBACKS:
        raise ValueError(f"unknown fallback '{mode}': choose from {list(FALLBACKS)}")
    return mode


class ActionFilter:
    """a_t = clip(a_{t-1} + clamp(smooth (u_t - a_{t-1}), ±rate_limit), ±1): a first-order low-pass (its
    smoothing alpha `smooth` < 1) and a per-tick rate limit, both off by default. Start of an episode:
    `reset()`."""

    def __init__(self, smooth: float = 1.0, rate_limit: float | None = None):
        if not 0 < smooth <= 1:
            raise ValueError(f"smooth (the low-pass's smoothing alpha) must be in (0, 1] (1 = off), got {smooth}")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError(f"rate limit must be positive (action change per tick), got {rate_limit}")
        self.smooth, self.rate_limit, self.prev = smooth, rate_limit, None

    @property
    def active(self) -> bool:
        return self.smooth < 1 or self.rate_limit is not None

    def reset(self):
        self.prev = None

    def __call__(self, u) -> np.ndarray:
        a = np.asarray(u, np.float32)
        if self.prev is not None:  # the first action of an episode passes as planned
            if self.smooth < 1:
                a = self.prev + self.smooth * (a - self.prev)
            if self.rate_limit is not None:
                a = self.prev + np.clip(a - self.prev, -self.rate_limit, self.rate_limit)
        self.prev = np.clip(a, -1, 1).astype(np.float32)
        return self.prev.copy()


class Fallback:
    """The action of a tick that no fresh plan reached: the last planned action ("hold"), the last plan's mean
    for this step ("plan"; its last step held once the horizon runs out), or `policy`'s action for this tick's
    observation ("policy": a runtime without MPC, acting from its policy prior's mean)."""

    def __init__(self, mode: str = "hold", policy=None):
        if check_fallback(mode) == "policy" and policy is None:
            raise ValueError("fallback 'policy' needs a policy: pass policy=<a runtime made with mpc=False>")
        self.mode, self.policy, self.action, self.mean, self.age = mode, policy, None, None, 0

    def fresh(self, action, mean=None, age: int = 0):
        """A plan landed; it was made from the observation of `age` ticks ago."""
        self.action = np.asarray(action, np.float32)
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(-1, self.action.shape[-1])
        self.age = age

    def mean_of(self, runtime):
        """The runtime's planned mean, where this fallback follows it (fetching it costs a device sync on a GPU)."""
        return runtime.planned_mean() if self.mode == "plan" else None

    def __call__(self, obs=None, task=None) -> np.ndarray:
        if self.action is None:
            raise RuntimeError("no plan has landed yet: the first tick must wait for one")
        self.age += 1
        if self.mode == "policy":
            return np.asarray(self.policy.act(obs, task, t0=False, eval_mode=True), np.float32)
        if self.mode == "hold" or self.mean is None:
            return self.action.copy()
        return np.clip(self.mean[min(self.age, len(self.mean) - 1)], -1, 1)


def copy_mean(mean) -> np.ndarray:
    """A host copy of a warm-start mean (a numpy array, or a torch tensor on any device)."""
    return mean.detach().float().cpu().numpy().copy() if hasattr(mean, "detach") else np.array(mean, np.float32)


def shift_mean(mean, ticks: int):
    """Shift a warm-start mean (H x A, numpy or torch) `ticks` steps ahead in place, zeros after its end, as the
    official warm start leaves the new last step."""
    if ticks <= 0:
        return
    tail = mean[ticks:] * 1  # a copy, for numpy arrays and torch tensors alike
    mean[:len(tail)] = tail
    mean[len(tail):] = 0


def check_budget(budget: float) -> float:
    if not 0 < budget <= 1:
        raise ValueError(f"budget is the fraction of the control period a tick waits for its plan: (0, 1], "
                         f"got {budget}")
    return budget


@dataclass
class TickStats:
    """Per tick: was the action fresh, and (wall clock only) how late the tick ran against its schedule."""
    fresh: list = field(default_factory=list)
    late_ms: list = field(default_factory=list)
    plan_ms: list = field(default_factory=list)
    nonfinite: int = 0  # ticks whose observation had a NaN or Inf entry (the runtime acted safely on them)

    def summary(self) -> dict:
        fresh = np.asarray(self.fresh, bool)
        out = {"ticks": int(fresh.size), "fresh": int(fresh.sum()), "fallback": int((~fresh).sum()),
               "fallback_rate": float((~fresh).mean()) if fresh.size else 0.0, "nonfinite": self.nonfinite}
        if self.late_ms:
            out["late_ms_p50"], out["late_ms_p99"] = (float(np.percentile(self.late_ms, q)) for q in (50, 99))
        if self.plan_ms:
            out["plan_ms_p50"], out["plan_ms_p99"] = (float(np.percentile(self.plan_ms, q)) for q in (50, 99))
        return out


class DeadlineSim:
    """Simulated time: the planner runs when idle, on the newest observation; its action lands
    ceil(latency / period - budget) ticks later (at once if it fits in the budget); ticks between take the
    fallback.
    The latency is the measured wall time of `act`, or `latency_ms` when given (reproducible what-ifs).
    Without `hz` every plan lands at once (the filter alone). As on the robot, an episode's first plan is
    waited for."""

    def __init__(self, runtime, hz: float | None = None, fallback: str = "hold",
                 action_filter: ActionFilter | None = None, latency_ms: float | None = None, policy=None,
                 budget: float = 1.0):
        if hz is not None and hz <= 0:
            raise ValueError(f"control rate must be positive, got {hz} Hz")
        check_budget(budget)
        self.runtime, self.latency_ms, self.budget = runtime, latency_ms, budget
        self.period_ms = 1000.0 / hz if hz else math.inf
        self.mode, self.policy, self.filter = fallback, policy, action_filter or ActionFilter()
        self.stats = TickStats()
        self._episode()

    def _episode(self):
        self.fallback = Fallback(self.mode, self.policy)
        self.filter.reset()
        self.tick, self.last, self.pending = 0, 0, None

    def reset(self, seed=None):
        self.runtime.reset(seed)
        self._episode()
        self.stats = TickStats()

    def act(self, obs, task=None, t0=False, eval_mode=False):
        self.stats.nonfinite += not usable(obs)
        if t0:
            self._episode()
        if self.pending is None:  # the planner is idle: it starts on this tick's observation
            if not t0:
                self.runtime.advance_mean(self.tick - self.last - 1)
            self.last = self.tick
            start = time.perf_counter()
            action = self.runtime.act(obs, task, t0=t0, eval_mode=eval_mode)
            self.stats.plan_ms.append((time.perf_counter() - start) * 1e3)
            ms = self.stats.plan_ms[-1] if self.latency_ms is None else self.latency_ms
            late = 0 if self.fallback.action is None else max(math.ceil(ms / self.period_ms - self.budget), 0)
            self.pending = (self.tick + late, self.tick, np.asarray(action, np.float32),
                            self.fallback.mean_of(self.runtime))
        lands, made, action, mean = self.pending
        fresh = lands <= self.tick
        if fresh:
            self.fallback.fresh(action, mean, age=self.tick - made)
            self.pending, out = None, action
        else:
            out = self.fallback(obs, task)
        self.stats.fresh.append(fresh)
        self.tick += 1
        return self.filter(out)


class RealtimeLoop:
    """A robot's control loop at `hz`: every period, `sense()` -> observation and `actuate(action)`.

    The planner runs in a worker thread on the newest observation (older ones are dropped, never queued), so a
    slow step delays only its own action. Each tick sends its action as soon as the plan of its observation
    lands, or the fallback once `budget` of the period has passed (lower it for the "policy" fallback, whose
    reflex is worth most early). Ticks follow an absolute schedule (no drift); a tick that overran its period
    is run at once, not skipped. The first tick waits for the first plan."""

    def __init__(self, runtime, hz: float, sense, actuate, task=None, fallback: str = "hold",
                 action_filter: ActionFilter | None = None, eval_mode=False, policy=None, budget: float = 1.0):
        if hz <= 0:
            raise ValueError(f"control rate must be positive, got {hz} Hz")
        self.budget = check_budget(budget)
        self.runtime, self.period, self.sense, self.actuate = runtime, 1.0 / hz, sense, actuate
        self.task, self.eval_mode = task, eval_mode
        self.fallback, self.filter = Fallback(fallback, policy), action_filter or ActionFilter()
        self._cv = threading.Condition()
        self._obs = self._result = self._error = None
        self._stop = False

    def _plan_worker(self):
        last = None  # the tick of the last plan's observation
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._obs is not None or self._stop)
                if self._stop:
                    return
                (obs, tick), self._obs = self._obs, None
            t0 = last is None
            if not t0:
                self.runtime.advance_mean(tick - last - 1)
            last = tick
            try:
                start = time.perf_counter()
                action = self.runtime.act(obs, self.task, t0=t0, eval_mode=self.eval_mode)
                result = (tick, np.asarray(action, np.float32), self.fallback.mean_of(self.runtime),
                          (time.perf_counter() - start) * 1e3)
            except Exception as e:  # surfaced on the control thread, which stops the loop
                result, self._error = None, e
            with self._cv:
                self._result = result
                self._cv.notify_all()

    def run(self, ticks: int) -> dict:
        """Run `ticks` control ticks; returns `TickStats.summary()`. A planner error stops the loop and is
        raised here."""
        stats = TickStats()
        worker = threading.Thread(target=self._plan_worker, daemon=True)
        worker.start()
        try:
            start = time.perf_counter()
            for tick in range(ticks):
                due = start + tick * self.period
                time.sleep(max(due - time.perf_counter(), 0))
                stats.late_ms.append((time.perf_counter() - due) * 1e3)
                obs = self.sense()
                stats.nonfinite += not usable(obs)
                with self._cv:
                    self._obs = (obs, tick)
                    self._cv.notify_all()
                    # the first tick has nothing to fall back on: it waits for its plan
                    wait = None if tick == 0 else max(due + self.budget * self.period - time.perf_counter(), 0)
                    self._cv.wait_for(lambda: self._result is not None or self._error is not None, wait)
                    result, self._result = self._result, None
                if self._error is not None:
                    raise RuntimeError(f"planner failed at tick {tick}: {self._error}") from self._error
                if result is not None:
                    made, action, mean, ms = result
                    self.fallback.fresh(action, mean, age=tick - made)
                    stats.plan_ms.append(ms)
                    out = action
                else:
                    out = self.fallback(obs, self.task)
                stats.fresh.append(result is not None)
                self.actuate(self.filter(out))
        finally:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
            worker.join(timeout=10)
        return stats.summary()
