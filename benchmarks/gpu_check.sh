#!/usr/bin/env bash
# The GPU check in one go, for a machine with one CUDA GPU (written for an H200) whose python3 has CUDA torch and
# triton but not the rest of this project's dependencies, and no network. First, where pip reaches an index:
#   make gpu-bundle                       # .gpu-bundle/: ~36 MiB of wheels for Python 3.12 (GPU_PYTHON_VERSION=3.x)
# then, with the checkout and .gpu-bundle/ on the GPU machine:
#   bash benchmarks/gpu_check.sh OUT_DIR  # python3, or $PYTHON; the wheels from $GPU_BUNDLE_DIR (.gpu-bundle)
# About 15-20 minutes on an H200 and never more than ~26: each part has a limit of its own, and the whole run a
# budget (GPU_CHECK_BUDGET_S, default 1500 s) that the later parts are cut to. A part that fails or runs out of time
# is recorded in OUT_DIR/parts.jsonl and the next one runs. The parts, with their limits in seconds:
#   machine 60 (machine.txt), bundle 120 (unpacked for this python), matmul 180 (the bf16, fp32 and tf32 ceilings),
#   kernel-tests 480 (tests/test_kernels.py compiled, TF32 off), kernels 300 and kernels-compile 300 (the kernel
#   microbenchmarks), train-b128 420 and train-b512 420 (the training step), loaders 360;
# then one summary table (benchmarks/gpu_summary.py, also OUT_DIR/summary.json). GPU_CHECK_PARTS="matmul train-b128"
# runs only those (and machine and bundle). It writes only under OUT_DIR and a temporary folder (the unpacked
# bundle, Triton/inductor/extension caches, the loader benchmark's data) removed at the end; earlier results of
# these parts in OUT_DIR are removed first.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE_DIR:-.gpu-bundle}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-1500} ))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dcgan-gpu-check.XXXXXX")
WORKERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
export PY BUNDLE WORK
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tmp" "$WORK/site" "$WORK/plugins"
# nothing lands in the checkout or the home folder: bytecode, pytest's cache, compiler caches, matplotlib's fonts
export TMPDIR=$WORK/tmp PYTHONDONTWRITEBYTECODE=1 XDG_CACHE_HOME=$WORK/cache MPLCONFIGDIR=$WORK/matplotlib \
  TRITON_HOME=$WORK TRITON_CACHE_DIR=$WORK/triton TORCHINDUCTOR_CACHE_DIR=$WORK/inductor \
  TORCH_EXTENSIONS_DIR=$WORK/torch_extensions PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 MPLBACKEND=Agg
export PYTHONPATH=$WORK/site:$WORK/plugins:$ROOT${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET  # the interpreter would replace the compiler: the point here is the compiled kernels

rm -f "$OUT"/{parts.jsonl,summary.json,summary.txt,machine.txt,matmul_ceiling.json,loader_throughput.json} \
  "$OUT"/kernels*.json "$OUT"/kernels*.png "$OUT"/train_throughput*.json "$OUT"/*.log
failed=0

record() {  # record PART STATUS RC SECONDS LIMIT NOTE (notes are fixed text here: no quotes to escape)
  printf '{"part": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "note": "%s"}\n' "$@" \
    >> "$OUT/parts.jsonl"
}

part() {  # part NAME LIMIT_S NOTE COMMAND...: COMMAND under `timeout`, its output in OUT_DIR/NAME.log too
  local name=$1 limit=$2 note=$3 left rc start
  shift 3
  if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ " machine bundle $GPU_CHECK_PARTS " != *" $name "* ]]; then
    return
  fi
  left=$(( DEADLINE - $(date +%s) ))
  (( limit > left )) && limit=$left
  if (( limit < 30 )); then
    echo "== $name: skipped, the run's budget is spent"
    record "$name" skipped 0 0 0 "the run's budget (GPU_CHECK_BUDGET_S) was spent"
    return
  fi
  echo "== $name (at most ${limit} s)"
  # `timeout` runs programs, not this script's functions: those run in a bash of their own
  declare -F "$1" >/dev/null && set -- bash -c "$(declare -f "$1"); $1"
  start=$(date +%s)
  # timeout signals the whole process group: DataLoader workers, torch.compile's and pytest's subprocesses too
  timeout -k 30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local status=ok
  case $rc in 0) ;; 124|137) status=timeout failed=1 ;; *) status=failed failed=1 ;; esac
  echo "== $name: $status (rc $rc, $(( $(date +%s) - start )) s)"
  record "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$limit" "$note"
}

# shellcheck disable=SC2329  # run through `part`
machine() {
  echo "date: $(date -u +%FT%TZ)"
  echo "host_cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as metadata
import platform

import torch

print("python:", platform.python_version())
print("torch:", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
for name in ("triton", "deepspeed", "webdataset", "pydantic", "numpy", "nvidia-dali-cuda120"):
    try:
        print(f"{name}:", metadata.version(name))
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
}

# shellcheck disable=SC2329  # run through `part`
install_bundle() {
  local wheels=("$BUNDLE"/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    echo "no wheels in $BUNDLE: run 'make gpu-bundle GPU_PYTHON_VERSION=<this python's X.Y>' where pip reaches an index"
    return 1
  fi
  if "$PY" -m pip --version >/dev/null 2>&1; then
    # pip also refuses wheels built for another Python version, with a message that says so
    "$PY" -m pip install --quiet --no-deps --no-compile --no-cache-dir --target "$WORK/site" "${wheels[@]}"
  else
    # without pip: a wheel is a zip laid out as site-packages, so unpacking it is the install minus bookkeeping
    "$PY" - "$WORK/site" "${wheels[@]}" <<'EOF'
import sys
import zipfile

for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
  fi
  ls "$WORK/site"
}

# a pytest plugin, not a test edit: PyTorch's fp32 convolutions default to TF32 on a GPU, which the fp32
# comparisons at 1e-5 do not allow; kernels/launch.py follows the same switch for the fused kernels' dots
cat > "$WORK/plugins/gpu_check_exact_fp32.py" <<'EOF'
import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
EOF

part machine 60 "" machine
[ -f "$OUT/machine.log" ] && mv "$OUT/machine.log" "$OUT/machine.txt"
part bundle 120 "$BUNDLE unpacked for this python" install_bundle
part matmul 180 "bf16, fp32 with TF32 off, tf32" \
  "$PY" benchmarks/matmul_ceiling.py --out "$OUT/matmul_ceiling.json"

deselect=()
tests_note="TRITON_INTERPRET unset, TF32 off"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  deselect=(--deselect tests/test_kernels.py::test_dcgan_train_with_fused_kernels)
  tests_note+="; test_dcgan_train_with_fused_kernels left out: no Fashion-MNIST in /usr/share/datasets"
fi
part kernel-tests 480 "$tests_note" \
  "$PY" -m pytest -q -p no:cacheprovider -p gpu_check_exact_fp32 tests/test_kernels.py ${deselect[@]+"${deselect[@]}"}

# torch.compile costs ~20 s per shape: the full grid for eager and fused, compile at the paper's widths only
part kernels 300 "ngf 64 and 128, batch 128 and 512, bf16: eager and fused" \
  "$PY" benchmarks/kernels.py --no-compile --out "$OUT/kernels.json"
part kernels-compile 300 "ngf 128, batch 128, bf16: eager, torch.compile and fused" \
  "$PY" benchmarks/kernels.py --ngf 128 --batch 128 --out "$OUT/kernels-compile.json"

train_args=(--resolution 64 --width 64 --rounds 5 --steps 10)
train_note="64x64, ngf=ndf=64"
if grep -q -- '"--methods"' benchmarks/train_throughput.py; then
  train_args+=(--methods "plain,eager,compiled,fused" --precisions "fp32,bf16")
  train_note+=", plain/eager/compiled/fused x fp32/bf16"
fi
for batch in 128 512; do
  part "train-b$batch" 420 "$train_note" \
    "$PY" benchmarks/train_throughput.py "${train_args[@]}" --batch "$batch" --out "$OUT/train_throughput-b$batch.json"
done

# a few thousand images: enough for steady loader rates, little enough to build the sample LMDB in a minute
loader_args=(--images 4000 --workers "$WORKERS" --work "$WORK/loader-data" --out "$OUT/loader_throughput.json")
loader_note="4000 images, $WORKERS workers, data in a temporary folder"
# what this GPU's fastest bf16 step consumes, rather than the CPU figure the benchmark defaults to
step_rate=$(timeout 60 "$PY" benchmarks/gpu_summary.py --step-rate "$OUT" 2>/dev/null)
if [ -n "$step_rate" ] && grep -q -- '"--step-img-per-s"' benchmarks/loader_throughput.py; then
  loader_args+=(--step-img-per-s "$step_rate")
  loader_note+=", vs step: the fastest bf16 step at batch 128"
fi
part loaders 360 "$loader_note" "$PY" benchmarks/loader_throughput.py "${loader_args[@]}"
if ! "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
  # its wheel is hundreds of MB, far more than can travel with the checkout
  record dali skipped 0 0 0 "nvidia.dali is not importable here and the bundle does not carry it: no DALI GPU rows"
fi

echo "== summary"
timeout 60 "$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
exit $failed
