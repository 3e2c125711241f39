#!/usr/bin/env bash
# Builds attnext._core with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# ATTNEXT_SANITIZE=ON) into its own build folder and runs the test suite against it.
#
#   tools/sanitize.sh                      # build/sanitize, then pytest -q tests
#   tools/sanitize.sh tests/hardening -x   # extra arguments go to pytest instead of "-q tests"
#   tools/sanitize.sh --run python3 tools/fuzz_crash.py --calls 20000
#
# The interpreter is not instrumented, so the compiler's libasan is preloaded. Leak detection
# is off (CPython keeps objects alive until exit by design, which LeakSanitizer reports);
# any ASan report aborts the run, and UBSan halts on its first finding with a stack trace.
# Requests above 4 GB get null (MemoryError in Python), as the crash fuzzer's 8 GiB address-space
# limit does in normal runs, which ASan's terabytes of shadow mappings rule out here.
# The bench's peers (ONNX Runtime, OpenVINO) are left out with ATTNEXT_BENCH_PEERS=0: they are
# not built for ASan, and OpenVINO aborts under the preloaded runtime.
# The sanitized module never replaces the developer build: the package is staged in
# build/sanitize/pkg (links to python/attnext/*.py plus the sanitized _core).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build/sanitize}
python=${PYTHON:-python3}
cxx=${CXX:-c++}  # CMake also reads CXX (on the first configure of the build folder)
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pybind=$("$python" -c "import pybind11; print(pybind11.get_cmake_dir())")
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
start=$(date +%s)
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DATTNEXT_SANITIZE=ON -DPython_EXECUTABLE="$(command -v "$python")" -Dpybind11_DIR="$pybind" \
  -DCMAKE_PREFIX_PATH="$site" >/dev/null
cmake --build "$build_dir" -j "${JOBS:-2}"
built=$(date +%s)

pkg="$build_dir/pkg/attnext"
rm -rf "$build_dir/pkg" && mkdir -p "$pkg"
for f in python/attnext/*; do
  case "$f" in *.so) ;; *) ln -s "$PWD/$f" "$pkg/" ;; esac
done
ln -s "$PWD/$(ls "$build_dir"/_core*.so)" "$pkg/"

if "$cxx" --version | grep -qi clang; then
  asan=$("$cxx" -print-file-name=libclang_rt.asan-x86_64.so)
else
  asan=$("$cxx" -print-file-name=libasan.so)
fi
[ -f "$asan" ] || { echo "sanitize.sh: cannot find the ASan runtime ($asan)" >&2; exit 2; }
# libstdc++ must be loaded with the ASan runtime too: the interpreter does not link it, and
# ASan's __cxa_throw interceptor aborts ("real___cxa_throw != 0") on the first C++ exception
# when it was not there at start-up.
preload="$asan"
stdcxx=$("$cxx" -print-file-name=libstdc++.so)
[ -f "$stdcxx" ] && preload="$asan $(readlink -f "$stdcxx")"

# `--run CMD...` runs CMD under the sanitizers instead of pytest (e.g. the crash fuzzer:
#   tools/sanitize.sh --run python3 tools/fuzz_crash.py --calls 20000).
if [ "${1:-}" = "--run" ]; then
  shift
  cmd=("$@")
else
  cmd=("$python" -m pytest -p no:cacheprovider "$@")
  [ $# -eq 0 ] && cmd+=(-q tests)
fi
set +e
LD_PRELOAD="$preload" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:max_allocation_size_mb=4096 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONMALLOC=malloc \
PYTHONPATH="$build_dir/pkg" \
ATTNEXT_SANITIZED=1 \
ATTNEXT_BENCH_PEERS=0 \
  "${cmd[@]}"
rc=$?
set -e
end=$(date +%s)
echo "sanitize.sh: build $((built - start)) s, tests $((end - built)) s, exit $rc"
exit $rc
