#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a lent device machine (an H200 here):
#
#   run(command="tools/gpu_check.sh", timeout_s=590)
#
# 1. builds normkit for sm_90 only into the machine's python3, offline
#    (pip --no-build-isolation --no-deps: the image has torch, CuPy, mpi4py, NCCL, pybind11,
#    scikit-build-core, cmake, ninja and pytest);
# 2. runs the `gpu` tests (the MPI/NCCL ones launch their own mpiexec);
# 3. runs each benchmark's CUDA mode with its own time limit.
# Logs go under $OUT (or ./gpu-logs when $OUT is unset): build.log, pytest.log, one
# bench_*.log per benchmark, and summary.txt with each step's exit status. A step that fails or
# times out is recorded and the next one still runs, so one call shows everything that is wrong.
# Budgets (seconds) fit one 10-minute call with margin; override with GPU_CHECK_<STEP>_S.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-$PWD/gpu-logs}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
export PYTHONUNBUFFERED=1
# Open MPI refuses root without these; the device machine runs commands as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=true
py="${PYTHON:-python3}"

step() {  # step NAME SECONDS LOG CMD...: run CMD under a time limit, log it, record its status
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local what="rc=$rc"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMED OUT after ${limit}s"; fi
  printf '%-24s %-22s %4ss\n' "$name" "$what" "$((SECONDS - t0))" | tee -a "$summary"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch, cupy; print('torch', torch.__version__, torch.version.cuda,
      'cupy', cupy.__version__)"; } >"$out/machine.txt" 2>&1

# sm_90 only: the CI build compiles four architectures and takes several times as long.
if ! step build "${GPU_CHECK_BUILD_S:-240}" "$out/build.log" \
    env NORMKIT_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=16 \
    "$py" -m pip install --no-build-isolation --no-deps -v .; then
  echo "build failed: see build.log" | tee -a "$summary"
  exit 1
fi
# A build without its CUDA module would skip every gpu test and look green: stop here instead.
if ! step import 30 "$out/import.log" "$py" -c \
    "import normkit; print(normkit.__file__); assert normkit.cuda_available(), 'no CUDA module'"; then
  exit 1
fi

timeout_opt=()
if "$py" -c "import pytest_timeout" 2>/dev/null; then timeout_opt=(--timeout=120); fi
step pytest-gpu "${GPU_CHECK_PYTEST_S:-300}" "$out/pytest.log" \
  "$py" -m pytest -q -m gpu tests -rfE "${timeout_opt[@]}" -p no:cacheprovider

bench() {  # bench NAME SECONDS ARGS...
  local name="$1" limit="$2"
  shift 2
  step "$name" "$limit" "$out/$name.log" "$py" "benchmarks/$name.py" "$@"
}
bench bench_batchnorm "${GPU_CHECK_BENCH_S:-60}" --device cuda --rounds 3
bench bench_instancenorm "${GPU_CHECK_BENCH_S:-60}" --device cuda --rounds 3
bench bench_torch_encoding "${GPU_CHECK_BENCH_S:-60}" --device cuda
bench bench_wsconv "${GPU_CHECK_BENCH_S:-60}" --device cuda --no-numpy
bench bench_torch "${GPU_CHECK_BENCH_S:-60}" --device cuda --no-compiled
cat "$summary"
