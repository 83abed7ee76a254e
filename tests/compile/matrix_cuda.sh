#!/usr/bin/env bash
# The compile matrix with KVX_CUDA, for machines without a GPU (CI): the
# headers with -DKVX_CUDA alone and beside UCX (and libfabric where it is
# installed), C99 and C++17 under -Wall -Wextra -pedantic -Werror, two
# translation units, C and C++ mixed, KVX_STATIC; then the GPU programs
# (kvx_bench, test_cuda, bench_gpu, kvx_demo_gpu) as C99 and C++17. Links against CUDA's
# stub libcuda and runs the small programs with it: without a driver every
# CUDA call fails cleanly and the UCX context still works. Ends with
# "N passed, M failed"; exit 77 without /usr/local/cuda.
set -u
cd "$(dirname "$0")/../.."
CUDA=${CUDA_HOME:-/usr/local/cuda}
if ! [ -f "$CUDA/include/cuda.h" ]; then echo "skip: no CUDA toolkit at $CUDA"; exit 77; fi
out=build/compile-cuda
stubs=$(tools/cuda_stub.sh) || { echo "FAIL: no stub libcuda (tools/cuda_stub.sh)"; exit 1; }
mkdir -p "$out/stub"
ln -sf "$(cd "$stubs" && pwd)/libcuda.so" "$out/stub/libcuda.so.1"
W="-Wall -Wextra -pedantic -Werror"
CU="-isystem $CUDA/include"
pass=0 fail=0
try() {  # name, command...
  local name=$1; shift
  if "$@" >"$out/$name.log" 2>&1; then echo "ok compile $name"; pass=$((pass+1))
  else echo "FAIL compile $name:"; head -c 3000 "$out/$name.log" | sed 's/^/    /'; fail=$((fail+1)); fi
}
# Built and run; with the CUDA backend alone the run must end in a clean
# refusal (no driver here), not a crash.
run() {
  local name=$1; shift
  if [ "$mode" = cuda-only ] && [[ "$name" != *static* ]]; then try "$name" bash -c "$* && LD_LIBRARY_PATH=$out/stub $out/$name.bin | grep -q 'KVX_ERR_UNSUPPORTED: cuda: cuInit failed'"
  else try "$name" bash -c "$* && LD_LIBRARY_PATH=$out/stub $out/$name.bin >/dev/null"; fi
}
matrix() {  # tag, defines, cflags, libs
  local t=$1 defs=$2 cf=$3 libs="-L$stubs -lcuda $4 -lpthread"
  mode=$([ "$defs" = -DKVX_CUDA ] && echo cuda-only || echo mixed)
  run "$t-c99" "cc -std=c99 $W $defs $cf tests/compile/impl.c tests/compile/user.c -o $out/$t-c99.bin $libs"
  run "$t-cxx17" "c++ -std=c++17 $W $defs $cf -x c++ tests/compile/impl.c -x c++ tests/compile/user.c -o $out/$t-cxx17.bin $libs"
  run "$t-cxx20" "c++ -std=c++20 $W $defs $cf -x c++ tests/compile/impl.c -x c++ tests/compile/user.c -o $out/$t-cxx20.bin $libs"
  run "$t-c-impl-cxx-user" "cc -std=c99 $W $defs $cf -c tests/compile/impl.c -o $out/$t-impl.o && c++ -std=c++17 $W -x c++ tests/compile/user.c -x none $out/$t-impl.o -o $out/$t-c-impl-cxx-user.bin $libs"
  run "$t-cxx-impl-c-user" "c++ -std=c++17 $W $defs $cf -x c++ -c tests/compile/impl.c -o $out/$t-implxx.o && cc -std=c99 $W -c tests/compile/user.c -o $out/$t-user.o && c++ $out/$t-implxx.o $out/$t-user.o -o $out/$t-cxx-impl-c-user.bin $libs"
  run "$t-static-c99" "cc -std=c99 $W $defs $cf tests/compile/static.c -o $out/$t-static-c99.bin $libs"
  run "$t-static-cxx17" "c++ -std=c++17 $W $defs $cf -x c++ tests/compile/static.c -o $out/$t-static-cxx17.bin $libs"
}
matrix cuda "-DKVX_CUDA" "$CU" ""
# The CUDA rooms by themselves, C99 and C++17 (the others: tests/compile/matrix.sh).
for h in kvx_gpu.h kvx_cuda.h; do
  try "alone-c99-$h" cc -std=c99 $W -Wno-unused-function -DKVX_CUDA $CU -fsyntax-only -x c $h
  try "alone-cxx17-$h" c++ -std=c++17 $W -Wno-unused-function -DKVX_CUDA $CU -fsyntax-only -x c++ $h
done
if pkg-config --exists ucx; then
  matrix ucx-cuda "-DKVX_UCX -DKVX_CUDA" "$CU $(pkg-config --cflags ucx)" "$(pkg-config --libs ucx)"
  if pkg-config --exists libfabric && [ -f kvx_ofi.h ]; then
    matrix all "-DKVX_UCX -DKVX_OFI -DKVX_CUDA" "$CU $(pkg-config --cflags ucx libfabric)" "$(pkg-config --libs ucx libfabric)"
  fi
  gl="-L$stubs -lcuda $(pkg-config --libs ucx) -lpthread"
  for p in bench/kvx_bench.c tests/gpu/test_cuda.c bench/bench_gpu.c examples/kvx_demo_gpu.c; do
    n=$(basename "$p" .c)
    # a program without the implementation links tests/lib/kvx_impl.c, in its language
    impl=$(grep -q '^#define KVX_IMPLEMENTATION' "$p" || echo tests/lib/kvx_impl.c)
    try "$n-c99" cc -std=c99 -D_GNU_SOURCE $W -DKVX_UCX -DKVX_CUDA $CU $(pkg-config --cflags ucx) "$p" $impl -o "$out/$n.bin" $gl
    try "$n-cxx17" c++ -std=c++17 $W -DKVX_UCX -DKVX_CUDA $CU $(pkg-config --cflags ucx) -x c++ "$p" $impl -o "$out/$n.cxx.bin" $gl
  done
  # Without a driver the GPU tests skip (77) rather than fail.
  try "test_cuda-skips-without-gpu" bash -c "LD_LIBRARY_PATH=$out/stub $out/test_cuda.bin; [ \$? = 77 ]"
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
