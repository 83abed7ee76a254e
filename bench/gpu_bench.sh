#!/usr/bin/env bash
# make bench-gpu: the CUDA backend's table (bench/bench_gpu.c) on GPU
# $KVX_GPU (default 0), then, with two GPUs visible, owner on GPU 0 and reader
# on GPU 1. Logs in build/gpu/bench/. Programs from build/gpu (tests/gpu/build.sh).
set -u
cd "$(dirname "$0")/.."
B=build/gpu
out=$B/bench
mkdir -p "$out"
# The build against UCX 1.22 with CUDA (build/gpu/ucx122) where there is one:
# its table has kvx over UCX beside the CUDA backend, with cuda_ipc gets on
# (UCX turns them off where it sees no NVLink; then UCX would not use cuda_ipc).
prog=$B/bench_gpu
[ -x $B/ucx122/bench_gpu ] && prog=$B/ucx122/bench_gpu
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=${UCX_CUDA_IPC_ENABLE_GET_ZCOPY:-y}
[ -x $prog ] || { echo "$prog is not built: run tests/gpu/build.sh (make gpu-build)"; exit 2; }
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
rc=0
echo "== one GPU (GPU ${KVX_GPU:-0}), two processes"
CUDA_VISIBLE_DEVICES=${KVX_GPU:-0} timeout -k 5 ${KVX_BENCH_TIMEOUT:-400} $prog "$@" 2>&1 | tee "$out/one_gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
# What Python costs (bench/py_overhead.py with the package of build/gpu/python):
# posts and completions against the C calls, and a CUDA read's post to the
# resume of a stream that waits for it.
if [ -f $B/python/kvx/libkvx_cuda.so ] && python3 -c 'import torch' 2>/dev/null; then
  for be in local cuda; do
    echo "== Python vs C, backend $be"
    CUDA_VISIBLE_DEVICES=${KVX_GPU:-0} PYTHONPATH=$B/python timeout -k 5 300 python3 bench/py_overhead.py --backend $be --iters 2000 \
      --json "$out/py_overhead_$be.json" 2>&1 | tee "$out/py_overhead_$be.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
fi
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ]; then
  echo "== two GPUs: owner on GPU 0, reader on GPU 1"
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 5 ${KVX_BENCH_TIMEOUT:-400} $prog --two-gpu "$@" 2>&1 | tee "$out/two_gpu.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
