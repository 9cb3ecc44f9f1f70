#!/usr/bin/env bash
# Builds the CUPTI kernel-trace injection library (cupti_trace.cpp) into OUTPUT.
#
#   bash tools/cupti_trace/build.sh OUTPUT.so      (CUDA_HOME, default /usr/local/cuda, says where CUDA is)
#
# Use: CUDA_INJECTION64_PATH=OUTPUT.so PEARL_CUPTI_TRACE=trace.csv COMMAND. CUPTI lives under
# $CUDA_HOME/extras/CUPTI on some installs, beside the toolkit's own headers and libraries on others, and
# in the nvidia pip wheels (PyTorch's dependencies) where the toolkit lacks it.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTPUT.so" >&2; exit 2; }
output=$1
cuda=${CUDA_HOME:-/usr/local/cuda}

wheel_dirs=()
if command -v python3 >/dev/null; then
  for site in $(python3 -c 'import site; print(*site.getsitepackages())' 2>/dev/null); do
    for dir in "$site"/nvidia/*/; do [ -d "$dir" ] && wheel_dirs+=("${dir%/}"); done
  done
fi

include=
for dir in "$cuda/extras/CUPTI/include" "$cuda/include" "${wheel_dirs[@]/%//include}"; do
  [ -f "$dir/cupti.h" ] && { include=$dir; break; }
done
# The library as a file path: a wheel ships only the versioned name (libcupti.so.13).
library=
for dir in "$cuda/extras/CUPTI/lib64" "$cuda/lib64" "$cuda/lib" "$cuda"/targets/*/lib "${wheel_dirs[@]/%//lib}"; do
  for file in "$dir/libcupti.so" "$dir"/libcupti.so.[0-9]*; do
    [ -f "$file" ] && { library=$file; break 2; }
  done
done
[ -n "$include" ] || { echo "$0: cupti.h not found under $cuda (extras/CUPTI/include, include) or nvidia wheels" >&2; exit 1; }
[ -n "$library" ] || { echo "$0: libcupti.so not found under $cuda (extras/CUPTI/lib64, lib64, lib, targets/*/lib) or nvidia wheels" >&2; exit 1; }
echo "cupti_trace build: $include/cupti.h, $library"

# cupti.h includes cuda.h, which is in the toolkit's include folder. The rpath lets the driver load the
# library without LD_LIBRARY_PATH naming CUPTI's folder.
${CXX:-g++} -std=c++17 -O2 -Wall -Wextra -fPIC -shared -fvisibility=hidden \
  -isystem "$include" -isystem "$cuda/include" \
  "$(dirname "$0")/cupti_trace.cpp" -o "$output" \
  -L"$(dirname "$library")" -Wl,-rpath,"$(dirname "$library")" -Wl,-z,defs -l:"$(basename "$library")"
