#!/usr/bin/env bash
# Developer build: compiles attnext._core incrementally into build/dev (or $BUILD_DIR) and
# links it into python/attnext, so `PYTHONPATH=python pytest` runs against the tree without
# a pip install. Extra arguments go to CMake's configure step (e.g. -DATTNEXT_SANITIZE=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build/dev}
python=${PYTHON:-python3}
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pybind=$("$python" -c "import pybind11; print(pybind11.get_cmake_dir())")
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$python")" \
  -Dpybind11_DIR="$pybind" -DCMAKE_PREFIX_PATH="$site" "$@" >/dev/null
cmake --build "$build_dir" -j "${JOBS:-2}"
so=$(ls "$build_dir"/_core*.so)
ln -sf "$(cd "$(dirname "$so")" && pwd)/$(basename "$so")" python/attnext/
echo "built $so"
