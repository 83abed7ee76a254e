#!/usr/bin/env bash
# Builds the GPU test, benchmark and example programs into build/gpu (make
# gpu-build): kvx_bench, test_cuda, bench_gpu and kvx_demo_gpu with KVX_UCX
# and KVX_CUDA, against CUDA's headers and libcuda (the driver's, or the stub
# where there is none).
# Build here, run there: the GPU machine needs libcuda.so.1 and UCX's runtime
# libraries only.
set -eu
cd "$(dirname "$0")/../.."
CUDA=${CUDA_HOME:-/usr/local/cuda}
out=build/gpu
mkdir -p "$out"
CC=${CC:-cc}
W="-Wall -Wextra -pedantic -Werror"
flags="-std=c99 -D_GNU_SOURCE -O2 -g $W -DKVX_UCX -DKVX_CUDA -isystem $CUDA/include $(pkg-config --cflags ucx)"
stubs=$(tools/cuda_stub.sh)
libs="-L$stubs -L$CUDA/lib64 -lcuda $(pkg-config --libs ucx) -lpthread"
# kvx's implementation once, for the programs that do not hold it (test_cuda
# sets a test hook before it; the demo is one self-contained file).
$CC $flags -c tests/lib/kvx_impl.c -o "$out/kvx_impl.o"
for p in bench/kvx_bench.c bench/bench_gpu.c tests/gpu/test_cuda.c examples/kvx_demo_gpu.c; do
  n=$(basename "$p" .c)
  impl=$(grep -q '^#define KVX_IMPLEMENTATION' "$p" || echo "$out/kvx_impl.o")
  $CC $flags "$p" $impl -o "$out/$n" $libs
  echo "built $out/$n"
done
