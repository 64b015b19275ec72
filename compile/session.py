"""ONNX Runtime sessions over the planning graph: one code path for the CPU, CUDA and TensorRT providers."""
import os
from pathlib import Path

import numpy as np
import onnx

from edge_tdmpc.compile.precision import emulate_bf16

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _has_bf16(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer)


class OnnxSession:
    """A graph (ModelProto or path) on one provider; `run(feeds) -> {output: array}`, feeds filtered by name.

    device: 'cpu' (default), 'cuda' or 'tensorrt' (ONNX Runtime's TensorRT provider, engine cache in
    `trt_cache`; `precision` picks its builder flags). A bf16 graph on the CPU provider, which has no bf16
    kernels, runs emulated (`emulate_bf16`).
    threads: intra-op threads (default: $EDGE_TDMPC_ORT_THREADS, else ONNX Runtime's choice, one per core).
    On the CPU provider an int8 graph's Q/DQ MatMuls run as integer GEMMs (MatMulIntegerToFloat); `optimized`
    saves the graph ONNX Runtime actually executes, to check that.
    """

    def __init__(self, model, device: str | None = None, threads: int | None = None, trt_cache: Path | None = None,
                 precision: str = "fp32", optimized: Path | None = None):
        import onnxruntime as ort
        device = device or "cpu"
        if device not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime device '{device}': choose from {sorted(PROVIDERS)}")
        wanted = PROVIDERS[device][0]
        if wanted not in ort.get_available_providers():
            raise ValueError(f"ONNX Runtime here has no {wanted} (available: {ort.get_available_providers()}); "
                             "install onnxruntime-gpu for 'cuda'/'tensorrt', or use device='cpu'")
        proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
        self.emulated = device == "cpu" and _has_bf16(proto)
        if self.emulated:
            proto = emulate_bf16(proto)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        threads = threads or int(os.environ.get("EDGE_TDMPC_ORT_THREADS", 0))
        if threads:
            so.intra_op_num_threads = threads
        if optimized:
            so.optimized_model_filepath = str(optimized)
        disabled = []
        if device == "cpu" and any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            # two graph rewrites would leave fake-quant (dequantized weights, an fp32 GEMM: slower than fp32):
            # MatMul + bias Add -> Gemm runs first and hides DQ -> MatMul from the QDQ fusion, and CSE merges
            # the identical Q/DQ pairs of reward and dynamics on one latent into a DQ with two consumers,
            # which the fusion skips. Without them every int8 MatMul becomes MatMulIntegerToFloat.
            disabled = ["MatMulAddFusion", "CommonSubexpressionElimination"]
        providers = PROVIDERS[device]
        if device == "tensorrt":
            # TensorRT's builder flags: fp16 kernels only where the graph asks for them (an fp32 artifact
            # stays fp32), int8 for the Q/DQ nodes of int8/mixed graphs
            opts = {"trt_fp16_enable": precision in ("fp16", "mixed"),
                    "trt_int8_enable": precision in ("int8", "mixed"), "trt_engine_cache_enable": bool(trt_cache)}
            if trt_cache:
                opts["trt_engine_cache_path"] = str(trt_cache)
            providers = [("TensorrtExecutionProvider", opts), *providers[1:]]
        self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=providers,
                                            disabled_optimizers=disabled)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"planning step needs inputs {sorted(missing)}")
        out = self.session.run(None, {k: feeds[k] for k in self.inputs})
        return dict(zip(self.output_names, out))
