#!/usr/bin/env bash
# Builds a stand-in for the driver's libcuda.so.1, for linking and running
# kvx's CUDA builds on machines without a GPU driver: every function that
# cuda.h declares returns CUDA_ERROR_STUB_LIBRARY (34), so a program starts
# and each CUDA call fails cleanly. Used where the toolkit ships no stub
# (lib64/stubs/libcuda.so); on the GPU machine the driver's own library is
# found first at run time. Prints the directory that holds libcuda.so.
#   tools/cuda_stub.sh [OUTDIR]   (default build/cuda-stub; CUDA_HOME as usual)
set -eu
cd "$(dirname "$0")/.."
CUDA=${CUDA_HOME:-/usr/local/cuda}
out=${1:-build/cuda-stub}
if [ -f "$CUDA/lib64/stubs/libcuda.so" ]; then echo "$CUDA/lib64/stubs"; exit 0; fi
[ -f "$out/libcuda.so" ] && [ "$out/libcuda.so" -nt "$CUDA/include/cuda.h" ] && { echo "$out"; exit 0; }
mkdir -p "$out"
# The names after cuda.h's own renaming (cuCtxCreate -> cuCtxCreate_v2, ...).
echo '#include <cuda.h>' | ${CC:-cc} -E -isystem "$CUDA/include" -x c - |
  tr '\n' ' ' | grep -oE 'CUresult +[A-Za-z_][A-Za-z0-9_]* *\(' | sed -E 's/CUresult +//; s/ *\($//' | sort -u |
  awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$out/libcuda_stub.c"
${CC:-cc} -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 "$out/libcuda_stub.c" -o "$out/libcuda.so.1"
ln -sf libcuda.so.1 "$out/libcuda.so"
echo "$out"
