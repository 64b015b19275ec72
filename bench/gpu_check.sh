#!/usr/bin/env bash
# Every GPU check in one run, for a CUDA machine with PyTorch (TensorRT where it imports):
#   [STAGES=compile,kernels,tests] bash bench/gpu_check.sh OUT_DIR CHECKPOINT
# Stages run in the order STAGES names them, each under its own time limit, each writing its numbers under
# OUT_DIR as soon as it has them (a lent GPU has ~15 minutes in all: name the stages that matter first).
#   compile  planning-step latency, fp16: eager PyTorch vs torch.compile'd + CUDA-graphed (torch-compile), vs
#            the Triton planning step (torch-compile-triton, and torch-cuda-graph-triton: those kernels without
#            Inductor); kernels per step (--profile), |delta action| on identical noise, closed-loop scores on
#            three MT30 tasks (COMPILE_RUNTIMES adds e.g. torch-compile-fused)
#   kernels  each Triton launch of the planning step alone (policy trajectories, rollout step, Q, policy
#            head, value, MPPI update) against PyTorch eager and torch.compile, per rows-per-program
#   tests    the GPU/TensorRT tests (`pytest -m "gpu or trt"`; the TensorRT ones skip without tensorrt)
#   speed    the CUDA-graph step without torch.compile in fp32/fp16/bf16 (measured in session 3)
# Default: compile,kernels,tests (about 12 minutes): the whole step's latency first.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR CHECKPOINT}
ckpt=${2:?usage: gpu_check.sh OUT_DIR CHECKPOINT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-disable}
tasks=walker-walk,cheetah-run,cartpole-swingup

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name(), '| triton', triton.__version__, '| onnxruntime', ort.__version__,
    ort.get_available_providers())"
} 2>&1 | tee "$out/gpu.txt"

stage_kernels() {
  timeout "${KERNELS_S:-150}" python3 -c \
    'import sys; from edge_tdmpc.compile.kernels import bench_main; bench_main(sys.argv[1:])' "$ckpt" \
    2>&1 | tee "$out/triton-kernels.txt"
}
stage_compile() {
  timeout "${COMPILE_S:-420}" python3 -m edge_tdmpc.bench.step_latency "$ckpt" --device cuda \
    --runtimes "${COMPILE_RUNTIMES:-torch-compile,torch-compile-triton,torch-cuda-graph-triton}" \
    --precisions "${COMPILE_PRECISIONS:-fp16}" --steps 100 --own-noise --profile --tasks "$tasks" \
    --json "$out/gpu-compile.json" 2>&1 | tee "$out/gpu-compile.txt"
}
stage_tests() {
  { timeout "${PYTEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -m "gpu or trt" -rs tests
    timeout "${PTXAS_S:-200}" python3 -m pytest -q -p no:cacheprovider -m slow -rs tests/test_kernels.py; } 2>&1 \
    | tee "$out/pytest-gpu.txt"
}
stage_speed() {
  timeout "${SPEED_S:-200}" python3 -m edge_tdmpc.bench.step_latency "$ckpt" --device cuda \
    --runtimes torch-cuda-graph --precisions fp32,fp16,bf16 --steps 100 --own-noise --profile --tasks "$tasks" \
    --json "$out/gpu-speed.json" 2>&1 | tee "$out/gpu-speed.txt"
}
stages=${STAGES:-compile,kernels,tests}
for s in ${stages//,/ }; do "stage_$s" || echo "stage $s: exit $?"; done
