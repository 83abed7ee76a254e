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
base="-std=c99 -D_GNU_SOURCE -O2 -g $W -DKVX_UCX -DKVX_CUDA -isystem $CUDA/include"
stubs=$(tools/cuda_stub.sh)
cuda_libs="-L$stubs -L$CUDA/lib64 -lcuda"
# build_set DIR "CFLAGS" "LIBS" PROGRAM.c...: kvx's implementation once into
# DIR, for the programs that do not hold it (test_cuda sets a test hook
# before it; the demo is one self-contained file), then each program.
# bench_gpu times the calls a post makes (its section 7): they are wrapped.
wraps=""
for f in cuLaunchKernel cuEventRecord cuStreamBatchMemOp_v2 cuStreamWaitEvent cuStreamIsCapturing cuCtxPushCurrent_v2 \
         cuCtxPopCurrent_v2 cuMemcpyHtoDAsync_v2 cuEventQuery cuStreamWaitValue64_v2 cuStreamGetCtx cuCtxGetDevice \
         pthread_mutex_lock pthread_mutex_unlock pthread_cond_signal write; do wraps="$wraps -Wl,--wrap=$f"; done
build_set() {
  local dir=$1 flags=$2 libs=$3 p n impl w
  shift 3
  $CC $flags -c tests/lib/kvx_impl.c -o "$dir/kvx_impl.o"
  for p in "$@"; do
    n=$(basename "$p" .c)
    impl=$(grep -q '^#define KVX_IMPLEMENTATION' "$p" || echo "$dir/kvx_impl.o")
    w=""; [ "$n" = bench_gpu ] && w="-DKVX_BENCH_WRAP $wraps"
    $CC $flags $w "$p" $impl -o "$dir/$n" $libs
    echo "built $dir/$n"
  done
}
build_set "$out" "$base $(pkg-config --cflags ucx)" "$cuda_libs $(pkg-config --libs ucx) -lpthread" \
  bench/kvx_bench.c bench/bench_gpu.c tests/gpu/test_cuda.c examples/kvx_demo_gpu.c

# The same programs against UCX 1.22 from the libucx wheel, which is built
# with CUDA (make builds build/ucx122/prefix), into build/gpu/ucx122 with the
# UCX libraries they load beside them (stripped: about 10 MB to carry) and an
# rpath to them, so the GPU machine's own UCX is not used.
ucx=$(cat build/ucx122/prefix 2>/dev/null || true)
if [ -n "$ucx" ] && [ -f "$ucx/include/ucp/api/ucp.h" ]; then
  # The wheel's layout, which its modules' rpaths expect: libucx/lib,
  # libucx/lib/ucx (modules), and beside libucx the CUDA runtime it bundles.
  o2=$out/ucx122
  rm -rf "$o2" && mkdir -p "$o2/libucx/lib/ucx"
  for f in libucp libucs libuct libucm libucs_signal; do cp -L "$ucx/lib/$f.so.0" "$o2/libucx/lib/"; done
  for f in libuct_cma libuct_cuda libucm_cuda; do cp -L "$ucx/lib/ucx/$f.so.0" "$o2/libucx/lib/ucx/"; done
  for d in "$ucx"/../libucx_cu*.libs; do [ -d "$d" ] && cp -r "$d" "$o2/"; done
  strip --strip-debug "$o2"/libucx/lib/*.so.0 "$o2"/libucx/lib/ucx/*.so.0
  echo "UCX $(sed -n 's/^#define UCP_API_MINOR *\([0-9]*\).*/1.\1/p' "$ucx/include/ucp/api/ucp_version.h") in $o2:"
  build_set "$o2" "$base -I$ucx/include" "$cuda_libs -L$ucx/lib -Wl,-rpath,\$ORIGIN/libucx/lib -lucp -luct -lucs -lucm -lpthread" \
    bench/kvx_bench.c bench/bench_gpu.c tests/gpu/test_cuda.c
  # The Python package's library against this UCX, for GPU caches read over
  # UCX from Python (bench/peers' "kvx ucx1.22" row: KVX_LIBRARY and
  # LD_LIBRARY_PATH=$o2/libucx/lib there).
  PY=${PYTHON:-python3}
  [ -x build/venv/bin/python ] && PY=build/venv/bin/python
  KVX_UCX_PREFIX=$ucx KVX_PY_BACKENDS=ucx,cuda "$PY" python/kvx/_build.py "$o2/python"
else
  echo "no UCX 1.22 here (make builds it: make build/ucx122/prefix): build/gpu/ucx122 not built"
fi

# The Python package as the GPU machine's own Python imports it
# (PYTHONPATH=build/gpu/python:build/gpu/pylib): its modules, libkvx.so and
# libkvx_cuda.so built here (against Debian's UCX; the runtime there serves
# host caches), the C side of bench/py_overhead.py, and pytest (pure Python)
# for tests/python, since that machine installs nothing.
py=$out/python
rm -rf "$py" && mkdir -p "$py/kvx"
cp python/kvx/*.py python/kvx/py.typed "$py/kvx/"
PY=${PYTHON:-python3}
[ -x build/venv/bin/python ] && PY=build/venv/bin/python
"$PY" python/kvx/_build.py "$py/kvx"
$CC -std=c99 -D_GNU_SOURCE -O2 $W -fPIC -shared bench/py_overhead.c -o "$py/py_overhead.so"
echo "built $py (kvx package: $(cd "$py/kvx" && ls lib*.so | tr '\n' ' '))"
if [ ! -d $out/pylib/pytest ] && [ -x build/venv/bin/pip ]; then
  build/venv/bin/pip install -q --target $out/pylib pytest && echo "pytest into $out/pylib"
fi
