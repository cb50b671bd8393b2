#!/usr/bin/env bash
# The core under AddressSanitizer + UndefinedBehaviorSanitizer: builds the extension with
# NORMKIT_CUDA=OFF and -fsanitize=address,undefined (UB aborts: -fno-sanitize-recover), then runs
# the CPU test files against it. CI runs this (.ci/run); run it by hand the same way:
#
#   tools/sanitize.sh [pytest args...]      # default: the CPU test files, quietly
#
# Python itself is not sanitized, so libasan must be loaded first (LD_PRELOAD), and libstdc++ with
# it so that C++ exceptions thrown by the core unwind through ASan's interceptors instead of
# aborting. One ISA (NORMKIT_ISA_CLONES=OFF): the clones are the same source at other vector
# widths, and three sanitized copies of every hot loop would triple the build. Leak checking is
# off: CPython keeps its objects to the end. The MPI, torchrun and GPU tests are not run here
# (they launch other processes or need a GPU); everything they call on the CPU is exercised by
# the test files that are.
set -euo pipefail
cd "$(dirname "$0")/.."

build="build/sanitize"
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S . -B "$build" "${generator[@]}" -DNORMKIT_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DNORMKIT_ISA_CLONES=OFF -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
  >/dev/null
cmake --build "$build" --target _C

# The package sources with the sanitized module beside them, first on the path.
pkg="$(mktemp -d)"
trap 'rm -rf "$pkg"' EXIT
cp -r python/normkit "$pkg/normkit"
cp "$build"/_C*.so "$pkg/normkit/"
# An editable install of normkit (a development checkout) hooks the import system ahead of
# PYTHONPATH; drop its finder in every process, test subprocesses included.
cat >"$pkg/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "normkit" not in type(f).__module__]
PY

export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
export NORMKIT_SANITIZED=1
# This is also CI's CPU-only build (NORMKIT_CUDA=OFF): the tests of the build check that wording.
unset NORMKIT_REQUIRE_CUDA_BUILD
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
preload="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libstdc++.so)"

LD_PRELOAD="$preload" python - "$pkg" <<'PY'
import sys, normkit
where = normkit._C.__file__
assert where.startswith(sys.argv[1]), f"the sanitized module was not the one imported: {where}"
assert not normkit._C.built_with_cuda(), "the sanitized build must be the CPU-only one"
PY

if [ "$#" -eq 0 ]; then
  # Every test file that runs in this process on the CPU. Left out: the launchers of mpiexec /
  # torchrun (the divergence scenarios too), the GPU files, and torch.compile's tests, whose
  # inductor builds and loads C++ of its own (not normkit's) and takes minutes under ASan.
  set -- -q -p no:cacheprovider $(ls tests/test_*.py |
    grep -v -e _mpi -e _dist -e _gpu -e _divergence -e _compile)
fi
LD_PRELOAD="$preload" python -m pytest "$@"
