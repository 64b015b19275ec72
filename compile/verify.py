"""Verification, Polygraphy-style: the same recorded inputs through the artifact and the fp32 reference.

Per output: max and mean |delta| over the recorded steps, checked against per-precision tolerances on the
mean (what a controller feels) and, for the latent, on the max. MPPI is a discrete selection (top-k elites,
a Gumbel-max pick): a 1e-6 change can swap two near-equal candidates and move one step's action a lot, so
actions and plan means are judged by their mean error, not their worst step. A failing artifact is written
with status "failed", and runtimes refuse it.
"""
from dataclasses import dataclass

import numpy as np

OUTPUTS = ("action", "mean", "value", "z")

# precision -> output -> (max mean |delta|, max max |delta| or None). Measured margins on the MT30 1M student
# (docs/results/compile-cpu.md): fp32 differs from torch by reordered sums only (z ~5e-7); fp16 rounds every
# activation (z ~1e-3); bf16 keeps 8 mantissa bits (z ~2e-2); int8 per-tensor activations (z ~5e-2).
TOLERANCES = {
    "fp32": {"action": (1e-2, None), "mean": (1e-2, None), "value": (1e-2, None), "z": (1e-5, 1e-4)},
    "fp16": {"action": (5e-2, None), "mean": (5e-2, None), "value": (5e-2, None), "z": (2e-3, 1e-2)},
    "bf16": {"action": (0.5, None), "mean": (0.3, None), "value": (0.5, None), "z": (2e-2, 1e-1)},
    "int8": {"action": (0.5, None), "mean": (0.3, None), "value": (1.0, None), "z": (3e-2, 1.5e-1)},
    "mixed": {"action": (0.5, None), "mean": (0.3, None), "value": (1.0, None), "z": (3e-2, 1.5e-1)},
}


@dataclass
class Check:
    output: str
    max_abs: float
    mean_abs: float
    tol_mean: float
    tol_max: float | None

    @property
    def ok(self) -> bool:
        return self.mean_abs <= self.tol_mean and (self.tol_max is None or self.max_abs <= self.tol_max)

    def row(self) -> str:
        tol = f"mean <= {self.tol_mean:.0e}" + (f", max <= {self.tol_max:.0e}" if self.tol_max is not None else "")
        return f"{self.output:<7} max |d| {self.max_abs:9.2e}  mean |d| {self.mean_abs:9.2e}  ({tol})  " + \
            ("PASS" if self.ok else "FAIL")


def compare(outputs: list[dict], expected: list[dict], precision: str, tolerances=None) -> list[Check]:
    """Per-output |delta| between artifact outputs and reference outputs (lists of dicts, one per step)."""
    tol = (tolerances or TOLERANCES)[precision]
    checks = []
    for name in OUTPUTS:
        if name not in expected[0] or name not in outputs[0]:
            continue
        d = np.concatenate([np.abs(np.asarray(o[name], np.float64) - np.asarray(e[name], np.float64)).ravel()
                            for o, e in zip(outputs, expected)])
        d = np.nan_to_num(d, nan=np.inf)  # a NaN output fails every tolerance
        checks.append(Check(name, float(d.max()), float(d.mean()), *tol[name]))
    return checks


def report(checks: list[Check]) -> dict:
    """JSON-able summary stored in the manifest."""
    return {"ok": all(c.ok for c in checks),
            "outputs": {c.output: {"max_abs": c.max_abs, "mean_abs": c.mean_abs, "tol_mean": c.tol_mean,
                                   "tol_max": c.tol_max, "ok": c.ok} for c in checks}}


def format_checks(checks: list[Check]) -> str:
    return "\n".join(c.row() for c in checks)
