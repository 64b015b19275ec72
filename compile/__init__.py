"""Compile: the whole planning step as one ONNX graph, reduced precision, TensorRT, verified artifacts.

    export.py     the networks and the planning step as ONNX graphs (mirrors planner.plan)
    precision.py  per-layer precisions, bf16 emulation on CPU, calibrated INT8 (Q/DQ)
    record.py     planning inputs recorded in real closed-loop episodes (calibration, verification)
    verify.py     artifact vs the torch fp32 reference, per-precision tolerances
    artifact.py   compile -> artifact directory + manifest, checksums, cache
    session.py    ONNX Runtime sessions (CPU / CUDA / TensorRT providers)
    trt.py        TensorRT engine build / run / verify (numpy + CUDA bindings only; ships as build_engine.py)
    runtimes.py   the onnxruntime, tensorrt, torch-cuda-graph(-triton), torch-compile(-fused/-triton) runtimes
    fused.py      the rollout's reward and dynamics MLPs stacked into one network (fewer GPU kernels)
    kernels.py    each planner MLP as one Triton kernel launch (fewer still)
    targets.py    device profiles (targets/*.json)
    cli.py        `edge-tdmpc compile`, `edge-tdmpc targets`

Their benchmark (latency / size / |delta action| / closed-loop table) is `edge-tdmpc bench step-latency`
(edge_tdmpc.bench.step_latency).
"""
