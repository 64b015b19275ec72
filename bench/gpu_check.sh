#!/usr/bin/env bash
# Every GPU check in one run, for a CUDA machine with PyTorch (TensorRT where it imports):
#   bash bench/gpu_check.sh OUT_DIR CHECKPOINT
# 1. the GPU/TensorRT tests (`pytest -m "gpu or trt"`: the TensorRT ones skip, with a reason, without tensorrt);
# 2. planning-step latency of eager PyTorch on the GPU against the CUDA-graph step in fp32/fp16/bf16, on
#    identical observations and noise (|delta action|), also with the noise drawn on the device; closed-loop
#    scores on three MT30 tasks;
# 3. the same for torch.compile'd + CUDA-graphed fp16: plain, with the rollout's reward and dynamics MLPs
#    stacked (torch-compile-fused), and with each MLP one Triton kernel (torch-compile-triton; and those
#    kernels without Inductor, torch-cuda-graph-triton), in its own process (about a minute per compile);
# 2 and 3 also count each runtime's CUDA kernels per step (--profile);
# kernels: the Triton MLP kernels alone against the PyTorch networks, per rows-per-program (compile/kernels.py).
# Each stage has its own time limit and writes its numbers under OUT_DIR as soon as it has them. All four take
# about 15 minutes; STAGES (default "tests,speed,kernels,compile") picks some, to split them over device calls.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR CHECKPOINT}
ckpt=${2:?usage: gpu_check.sh OUT_DIR CHECKPOINT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-disable}
tasks=walker-walk,cheetah-run,cartpole-swingup
stages=,${STAGES:-tests,speed,kernels,compile},

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name(), '| onnxruntime', ort.__version__, ort.get_available_providers())"
} 2>&1 | tee "$out/gpu.txt"

[[ $stages == *,tests,* ]] && timeout "${PYTEST_S:-240}" python3 -m pytest -q -p no:cacheprovider \
  -m "gpu or trt" -rs tests 2>&1 | tee "$out/pytest-gpu.txt"

[[ $stages == *,speed,* ]] && timeout "${SPEED_S:-200}" python3 -m edge_tdmpc.compile.speed "$ckpt" \
  --device cuda --runtimes torch-cuda-graph --precisions fp32,fp16,bf16 --steps 100 --own-noise --profile --tasks "$tasks" \
  --json "$out/gpu-speed.json" 2>&1 | tee "$out/gpu-speed.txt"

[[ $stages == *,kernels,* ]] && timeout "${KERNELS_S:-150}" python3 -c \
  'import sys; from edge_tdmpc.compile.kernels import bench_main; bench_main(sys.argv[1:])' "$ckpt" \
  2>&1 | tee "$out/triton-kernels.txt"

[[ $stages == *,compile,* ]] && timeout "${COMPILE_S:-420}" python3 -m edge_tdmpc.compile.speed "$ckpt" --device cuda \
  --runtimes "${COMPILE_RUNTIMES:-torch-compile,torch-compile-fused,torch-compile-triton,torch-cuda-graph-triton}" --precisions "${COMPILE_PRECISIONS:-fp16}" \
  --steps 100 --own-noise --profile --tasks "$tasks" \
  --json "$out/gpu-compile.json" 2>&1 | tee "$out/gpu-compile.txt"
true  # a skipped last stage is not a failure
