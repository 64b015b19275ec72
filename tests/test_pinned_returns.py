"""Per-episode returns of a short fixed-seed bench on the shared MT30 1M student, recorded before the rollout loop
was written once (edge_tdmpc.rollout): the bench must keep giving them for the same seeds.

PyTorch's CPU matmuls (MKL) take another kernel path on another CPU, and differ in the last bit; 20 steps of
MPPI carry that into the returns. So each case holds one set of returns per kernel path recorded (ONNX
Runtime's agree on all of them), and the bench must give one whole set. A new CPU that gives none: check it
with the parity tests (the official recordings), then record its set here."""
import json

import pytest

from edge_tdmpc.bench.harness import run_bench

SMALL = dict(num_samples=64, num_elites=8, iterations=2)
CASES = {
    "mpc": (dict(runtimes="torch,onnxruntime", precisions="fp32", planner=dict(mpc=True, **SMALL)), {
        ('onnxruntime', 'cartpole-balance', 0): 38.07468354632294,
        ('onnxruntime', 'cartpole-balance', 1): 36.591900199228,
        ('onnxruntime', 'walker-walk', 0): 5.667511838897212,
        ('onnxruntime', 'walker-walk', 1): 3.1449606039452607,
        ('torch', 'cartpole-balance', 0): 37.973653717830885,
        ('torch', 'cartpole-balance', 1): 37.18218477076914,
        ('torch', 'walker-walk', 0): 5.672394326284638,
        ('torch', 'walker-walk', 1): 2.9932263327698654,
    }),
    "prior": (dict(runtimes="torch", precisions="fp32", planner=dict(mpc=False), eval_mode=True), {
        ('torch', 'cartpole-balance', 0): 36.18862109569004,
        ('torch', 'cartpole-balance', 1): 36.6974624012794,
        ('torch', 'walker-walk', 0): 6.022256287749887,
        ('torch', 'walker-walk', 1): 2.674702563915734,
    }),
    "deadline": (dict(runtimes="torch", precisions="fp32", planner=dict(mpc=True, **SMALL), hz=50, latency_ms=30,
                      fallback="hold", smooth=0.5), {
        ('torch', 'cartpole-balance', 0): 39.399054542583,
        ('torch', 'cartpole-balance', 1): 38.07832385131714,
        ('torch', 'walker-walk', 0): 9.695875386153906,
        ('torch', 'walker-walk', 1): 3.341927537615156,
    }),
}


# the torch returns on other kernel paths, by the CPU that gave them; the rest as in CASES
OTHER_PATHS = {
    "AMD EPYC with AVX-512 BF16": {
        "mpc": {('torch', 'cartpole-balance', 0): 38.07466622918436,
                ('torch', 'cartpole-balance', 1): 36.591896916358294,
                ('torch', 'walker-walk', 0): 5.670144426109454, ('torch', 'walker-walk', 1): 3.1422257827007636},
        "prior": {('torch', 'cartpole-balance', 0): 36.1886281478343,
                  ('torch', 'cartpole-balance', 1): 36.69747035364499,
                  ('torch', 'walker-walk', 0): 6.022330753556726, ('torch', 'walker-walk', 1): 2.674647723433738},
        "deadline": {('torch', 'cartpole-balance', 0): 39.399034430306536,
                     ('torch', 'cartpole-balance', 1): 38.078332864415756,
                     ('torch', 'walker-walk', 0): 9.696855845668074,
                     ('torch', 'walker-walk', 1): 3.3420653956271322},
    },
    "AMD EPYC with AVX2 only (no AVX-512)": {
        "mpc": {('torch', 'cartpole-balance', 0): 38.07467760694223,
                ('torch', 'cartpole-balance', 1): 36.59191522194683,
                ('torch', 'walker-walk', 0): 5.667788502489932, ('torch', 'walker-walk', 1): 3.1426991037969247},
        "prior": {('torch', 'cartpole-balance', 0): 36.188632214029525,
                  ('torch', 'cartpole-balance', 1): 36.69746627778734,
                  ('torch', 'walker-walk', 0): 6.022251665011477, ('torch', 'walker-walk', 1): 2.6746475495038093},
        "deadline": {('torch', 'cartpole-balance', 0): 39.39903560840315,
                     ('torch', 'cartpole-balance', 1): 38.07833028222608,
                     ('torch', 'walker-walk', 0): 9.696907464628428,
                     ('torch', 'walker-walk', 1): 3.3419259221669817},
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_returns_are_pinned(case, checkpoint_path, tmp_path):
    """2 tasks x 2 episodes x 20 steps from the official initial states (--seed 1): planning on torch and on
    ONNX Runtime, the policy prior in eval mode, and a 50 Hz deadline with plans 30 ms late (hold, smoothed)."""
    settings, pinned = CASES[case]
    run_bench(checkpoint_path, tmp_path, tasks="cartpole-balance,walker-walk", episodes=2, seed=1, steps=20,
              workers=1, echo=lambda *_: None, **settings)
    got = {(r["runtime"], r["task"], r["episode"]): r["return"]
           for r in map(json.loads, (tmp_path / "episodes.jsonl").read_text().splitlines())}
    assert got.keys() == pinned.keys()
    sets = [pinned, *({**pinned, **path[case]} for path in OTHER_PATHS.values())]
    assert any(all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in s.items()) for s in sets), \
        {k: (got[k], *(s[k] for s in sets)) for k in sorted(got)}
