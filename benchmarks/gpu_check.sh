#!/usr/bin/env bash
# The GPU check in one go, for a machine with one CUDA GPU (about 10 minutes on an H100/H200):
# kernel correctness (compiled Triton, bf16 at full batch), the kernel microbenchmarks, and the
# end-to-end training step with and without the fused kernels. Results go to RESULTS (default
# benchmarks/results/gpu-<date>), with the machine's description.
#   bash benchmarks/gpu_check.sh [RESULTS]
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$RESULTS/machine.txt"
status=0
timeout 240 $PY -m pytest -q tests/test_kernels.py 2>&1 | tail -15 | tee "$RESULTS/test_kernels.txt" || status=1
# torch.compile costs ~20 s per shape: the full grid for eager and fused, compile at the paper's widths only
timeout 180 $PY benchmarks/kernels.py --no-compile --out "$RESULTS/kernels.json" | tee "$RESULTS/kernels.txt" \
  || status=1
timeout 180 $PY benchmarks/kernels.py --ngf 128 --batch 128 --out "$RESULTS/kernels-compile.json" \
  | tee "$RESULTS/kernels-compile.txt" || status=1
timeout 150 $PY benchmarks/train_throughput.py --resolution 64 --width 64 --batch 128 --rounds 5 --steps 10 \
  --out "$RESULTS/train_throughput.json" | tee "$RESULTS/train_throughput.txt" || status=1
exit $status
