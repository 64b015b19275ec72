"""Verification, Polygraphy-style: the same recorded inputs through the artifact and the fp32 reference.

Per output: max and mean |delta| over the recorded steps, checked against per-precision tolerances on the
mean (what a controller feels) and, for the latent, on the max. Values (discounted returns, ~0.1 to ~500 across
tasks) are compared relative to max(|reference|, 1). MPPI is a discrete selection (top-k elites,
a Gumbel-max pick): a 1e-6 change can swap two near-equal candidates and move one step's action a lot, so
actions and plan means are judged by their mean error, not their worst step. Where the reference's picked
elite leads the runner-up by less than the precision's value tolerance (a near-tie), the artifact may pick
either: its action is compared with the nearer of the two, and the row counts those steps. A failing artifact is
written with status "failed", and runtimes refuse it.
"""
from dataclasses import dataclass

import numpy as np

OUTPUTS = ("action", "mean", "value", "z")

# precision -> output -> (bound on mean |delta|, bound on max |delta| or None): the observed error of each
# precision with margin (docs/results/compile-cpu.md). fp32 differs from torch only by reordered sums; fp16
# rounds every activation; bf16 keeps 8 mantissa bits; int8/mixed keep the encoder in fp32 (z exact) and round
# the values a little. For int8 the action bound is only a sanity check, near the distance between two
# unrelated MPPI plans. A broken graph fails on z or value, far outside these bounds.
TOLERANCES = {
    "fp32": {"action": (1e-2, None), "mean": (1e-2, None), "value": (1e-4, None), "z": (1e-5, 1e-4)},
    "fp16": {"action": (0.1, None), "mean": (0.1, None), "value": (1e-3, None), "z": (2e-3, 1e-2)},
    "bf16": {"action": (0.5, None), "mean": (0.4, None), "value": (1e-2, None), "z": (2e-2, 1e-1)},
    "int8": {"action": (0.8, None), "mean": (0.6, None), "value": (3e-2, None), "z": (1e-5, 1e-4)},
    "mixed": {"action": (0.8, None), "mean": (0.6, None), "value": (3e-2, None), "z": (1e-5, 1e-4)},
}


@dataclass
class Check:
    output: str
    max_abs: float
    mean_abs: float
    tol_mean: float
    tol_max: float | None
    near_ties: int = 0  # steps compared with the runner-up's action, which was nearer

    @property
    def ok(self) -> bool:
        return self.mean_abs <= self.tol_mean and (self.tol_max is None or self.max_abs <= self.tol_max)

    def row(self) -> str:
        tol = f"mean <= {self.tol_mean:.0e}" + (f", max <= {self.tol_max:.0e}" if self.tol_max is not None else "")
        name = "value*" if self.output == "value" else self.output
        ties = f"  [{self.near_ties} near-tie(s): the runner-up elite]" if self.near_ties else ""
        return f"{name:<7} max |d| {self.max_abs:9.2e}  mean |d| {self.mean_abs:9.2e}  ({tol})  " + \
            ("PASS" if self.ok else "FAIL") + ties


def compare(outputs: list[dict], expected: list[dict], precision: str, tolerances=None) -> list[Check]:
    """Per-output |delta| between artifact outputs and reference outputs (lists of dicts, one per step)."""
    tol = (tolerances or TOLERANCES)[precision]
    tie_tol = tol["value"][0] if "value" in tol else 0.0
    checks = []
    for name in OUTPUTS:
        if name not in expected[0] or name not in outputs[0]:
            continue
        d, ties = [], 0
        for o, e in zip(outputs, expected):
            ref = np.asarray(e[name], np.float64)
            delta = np.abs(np.asarray(o[name], np.float64) - ref)
            if name == "action" and "action_alt" in e and float(e["tie_gap"].reshape(-1)[0]) <= tie_tol:
                alt = np.abs(np.asarray(o[name], np.float64) - np.asarray(e["action_alt"], np.float64))
                if alt.max() < delta.max():
                    delta, ties = alt, ties + 1
            d.append((delta / np.maximum(np.abs(ref), 1.0) if name == "value" else delta).ravel())
        d = np.concatenate(d)
        d = np.nan_to_num(d, nan=np.inf)  # a NaN output fails every tolerance
        checks.append(Check(name, float(d.max()), float(d.mean()), *tol[name], near_ties=ties))
    return checks


def report(checks: list[Check]) -> dict:
    """JSON-able summary stored in the manifest."""
    return {"ok": all(c.ok for c in checks),
            "outputs": {c.output: {"max_abs": c.max_abs, "mean_abs": c.mean_abs, "tol_mean": c.tol_mean,
                                   "tol_max": c.tol_max, "near_ties": c.near_ties, "ok": c.ok} for c in checks}}


def format_checks(checks: list[Check]) -> str:
    return "\n".join(c.row() for c in checks) + "\n(value*: |delta| relative to max(|reference value|, 1))"
