#!/usr/bin/env bash
# make test-gpu: kvx's CUDA tests on a machine with a GPU, every read
# byte-verified. Programs come from build/gpu (tests/gpu/build.sh, which needs
# UCX's and CUDA's headers; the GPU machine needs only their runtimes).
#   - ptxas on the embedded PTX (where ptxas is installed)
#   - test_cuda on GPU $KVX_GPU (default 0): refusals, reads between
#     processes (cuMemAlloc, VMM, pools; HND, NHD; TP splits), stream waits,
#     CUDA graphs replayed over 24 reads, failed reads releasing streams, UCX
#     host reads on a stream, verify mode on GPU caches
#   - kvx_demo_gpu, the GPU example
#   - kvx_bench --backends CUDA, pack: the TP matrix with several processes
#     on the one GPU, random and consecutive blocks, HND and NHD, cuMemAlloc,
#     VMM and pool caches, verify mode, block generations, a transport
#     policy, every kvx_bench option
#   - UCX 1.22 with CUDA (build/gpu/ucx122): GPU caches read over UCX
#     (cuda_ipc, and staged through the host as across hosts), byte-verified,
#     also from Python with torch's allocation per layer,
#     checked behind kvx_stream_wait; the transport chosen for cuMemAlloc,
#     VMM and pool memory, and the warning where it is not cuda_ipc
#   - the Python package on the machine's own Python and torch: CUDA
#     tensors from the default allocator and expandable segments, stream_wait
#     with a torch check behind it, torch.cuda.graph replays; the CPU suite
#   - with two GPUs visible (nvidia-smi): owner on GPU 0, reader on GPU 1
# Ends with "N passed, M failed". KVX_TEST_FILTER=regex runs matching entries.
set -u
cd "$(dirname "$0")/../.."
B=build/gpu
. tests/lib/runner.sh
# One entry at a time: they share the GPU, and some time their reads.
logdir=$B/test-logs
runner_init $logdir "${KVX_TEST_JOBS:-1}"
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
gpu=${KVX_GPU:-0}
for p in test_cuda kvx_bench kvx_demo_gpu; do [ -x $B/$p ] || { echo "$B/$p is not built: run tests/gpu/build.sh (make gpu-build)"; exit 2; }; done

one="env CUDA_VISIBLE_DEVICES=$gpu"
bench="$one $B/kvx_bench --backends CUDA"
small="--num-blocks 200 --blocks 24 --num-layers 3 --iters 3"
section "GPU: $(nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader 2>/dev/null | tr '\n' ';')"
section "PTX"
[ -x "${PTXAS:-/usr/local/cuda/bin/ptxas}" ] && entry "ptx check (ptxas sm_80, sm_90, sm_100)" 120 bash tools/ptx_check.sh
section "test_cuda (GPU $gpu)"
entry "test_cuda" 300 $one $B/test_cuda
entry "kvx_demo_gpu: two processes, cuMemAlloc caches, checked behind kvx_stream_wait" 120 $one $B/kvx_demo_gpu
section "kvx_bench --backends CUDA, pack (GPU $gpu, a process per rank)"
entry "CUDA pack 1->1 HND random" 120 $bench $small --random-blocks
entry "CUDA pack 1->1 NHD consecutive" 120 $bench $small --layout NHD
entry "CUDA pack 1->2 HND random" 120 $bench $small --random-blocks --prefill-tp 1 --decode-tp 2
entry "CUDA pack 2->1 NHD random" 120 $bench $small --random-blocks --prefill-tp 2 --decode-tp 1 --layout NHD
entry "CUDA pack 2->4 HND consecutive" 120 $bench $small --prefill-tp 2 --decode-tp 4
entry "CUDA pack 2->4 NHD random, VMM caches" 120 env KVX_BENCH_CUDA_MEM=vmm $bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD
entry "CUDA pack 4->2 NHD random, pool caches" 120 env KVX_BENCH_CUDA_MEM=pool $bench $small --random-blocks --prefill-tp 4 --decode-tp 2 --layout NHD
entry "CUDA pack 1->2 HND consecutive, VMM, every option" 120 env KVX_BENCH_CUDA_MEM=vmm $bench --strategy pack $small --prefill-tp 1 --decode-tp 2 \
  --block-tokens 32 --heads 4 --head-dim 64 --dtype-bytes 2 --seed 7 --max-ops 2 --verbose --json $logdir/pack.json
entry "CUDA pack 4->8 HND random (12 processes)" 180 $bench $small --random-blocks --prefill-tp 4 --decode-tp 8
entry "CUDA pack 1 KV head replicated, 1->2" 120 $bench $small --random-blocks --heads 1 --prefill-tp 1 --decode-tp 2
entry "CUDA pack 2 KV heads replicated, 2->4 NHD" 120 $bench $small --random-blocks --heads 2 --prefill-tp 2 --decode-tp 4 --layout NHD
entry "CUDA pack odd sizes: 3-byte elements, 5 tokens (unaligned path)" 120 $bench --num-blocks 50 --blocks 9 --num-layers 2 --block-tokens 5 --heads 2 --head-dim 7 --dtype-bytes 3 --random-blocks --iters 2 --decode-tp 2 --layout NHD
entry "CUDA pack 2->4 NHD random, verify mode, every block" 120 $bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD --verify 1
entry "CUDA pack 1->2 HND random, verify mode, 1 block in 3" 120 $bench $small --random-blocks --prefill-tp 1 --decode-tp 2 --verify 3
entry "CUDA pack odd sizes, verify mode, every block (unaligned heads)" 120 $bench --num-blocks 50 --blocks 9 --num-layers 2 --block-tokens 5 --heads 2 --head-dim 7 --dtype-bytes 3 --random-blocks --iters 2 --decode-tp 2 --layout NHD --verify 1
# A read's table of more than 4 KB is copied to the GPU before the launch;
# smaller ones travel in the launch's parameters (kvx_copy_inline).
entry "CUDA pack 1000 random blocks: the table copied, not in the launch" 120 $bench --num-blocks 2000 --blocks 1000 --num-layers 4 --random-blocks --iters 2
entry "CUDA pack 3750 blocks x 50 layers x 128, 4 KiB blocks" 300 \
  $bench --num-blocks 3750 --num-layers 50 --blocks 128 --block-tokens 16 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 2
entry "CUDA pack 3750 blocks x 50 layers x 128, verify mode, every block (heads summed a thread each)" 300 \
  $bench --num-blocks 3750 --num-layers 50 --blocks 128 --block-tokens 16 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 2 --verify 1
expect_fail "CUDA a planted wrong byte fails the run" 120 "TEST FAILED: decode rank 0, iteration 2" env KVX_BENCH_FLIP_BYTE=1 $bench $small --random-blocks
entry "CUDA pack 2->4 NHD random, block generations on every read, verify mode" 120 $bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD --verify 1 --generations
entry "CUDA pack 1->2 HND consecutive, block generations, VMM caches" 120 env KVX_BENCH_CUDA_MEM=vmm $bench $small --prefill-tp 1 --decode-tp 2 --generations
entry "CUDA pack 4->1 HND random, block generations (a decode rank reads four owners)" 180 $bench $small --random-blocks --prefill-tp 4 --decode-tp 1 --generations
entry "CUDA pack 3750 blocks x 50 layers x 128, block generations (a read's check after thousands of tasks)" 300 \
  $bench --num-blocks 3750 --num-layers 50 --blocks 128 --block-tokens 16 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 2 --generations
expect_fail "CUDA a transport policy that refuses CUDA IPC refuses the peer, saying why" 60 "refuses (\"!ipc\"); why that transport: owner and reader use the same GPU" \
  $bench $small --transport-policy '!ipc'
entry "CUDA a transport policy that demands CUDA IPC or RDMA passes" 60 $bench $small --transport-policy 'ipc,rdma'
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
  expect_fail "CUDA spread across two hosts is refused" 120 "within one host" env KVX_BENCH=$B/kvx_bench CUDA_VISIBLE_DEVICES=$gpu bash tests/lib/two_hosts.sh --backends CUDA $small
fi
# UCX 1.22 built with CUDA (the libucx wheel; build/gpu/ucx122 carries its
# libraries): GPU caches read over UCX, between processes on the one GPU.
U=$B/ucx122
if [ -x $U/test_cuda ]; then
  ubench="$one $U/kvx_bench --backends UCX"
  section "UCX 1.22 with CUDA, from the libucx wheel (GPU $gpu): GPU caches over UCX"
  entry "test_cuda, UCX cases (ucx 1.22)" 300 env KVX_TEST_ONLY=UCX $one $U/test_cuda
  # UCX turns cuda_ipc gets off where it sees no NVLink (a single GPU):
  # the "ipc" entries turn them on, the others take UCX's default and show
  # the fallback kvx names and warns about.
  ipc="env UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y"
  entry "UCX GPU pack 1->1 HND random, cuMemAlloc, UCX's default (ucx 1.22)" 120 env KVX_BENCH_CUDA_MEM=malloc $ubench $small --random-blocks
  entry "UCX GPU pack 1->1 HND random, cuMemAlloc, cuda_ipc gets on (ucx 1.22)" 120 $ipc KVX_BENCH_CUDA_MEM=malloc $ubench $small --random-blocks
  entry "UCX GPU pack 2->1 NHD random, cuMemAlloc, cuda_ipc gets on (ucx 1.22)" 120 $ipc KVX_BENCH_CUDA_MEM=malloc $ubench $small --random-blocks --prefill-tp 2 --layout NHD
  entry "UCX GPU pack 1->2 HND consecutive, VMM caches, cuda_ipc gets on (ucx 1.22)" 120 $ipc KVX_BENCH_CUDA_MEM=vmm $ubench $small --prefill-tp 1 --decode-tp 2
  entry "UCX GPU pack 2->4 NHD random, pool caches, cuda_ipc gets on (ucx 1.22)" 120 $ipc KVX_BENCH_CUDA_MEM=pool $ubench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD
  # Staged through TCP, UCX serves the gets in software: only with software RMA on (kvx_ucx.h)
  sw="env KVX_UCX_SOFTWARE_RMA=1 UCX_TLS=tcp,cuda_copy"
  entry "UCX GPU pack 1->1 HND random, staged (UCX_TLS=tcp,cuda_copy, software RMA on) (ucx 1.22)" 120 $sw KVX_BENCH_CUDA_MEM=malloc $ubench $small --random-blocks
  entry "UCX GPU pack 2->1 NHD random, VMM, staged (UCX_TLS=tcp,cuda_copy, software RMA on) (ucx 1.22)" 120 $sw KVX_BENCH_CUDA_MEM=vmm $ubench $small --random-blocks --prefill-tp 2 --layout NHD
  # refused at the first read, or at registration where UCX opens no
  # context of cuda_copy alone (seen on some machines)
  expect_fail "UCX GPU staged through TCP without software RMA: refused, saying why (ucx 1.22)" 120 \
    "reachable only over transports UCX serves in software\\|offers kvx no transport here that enforces remote keys" \
    env UCX_TLS=tcp,cuda_copy KVX_BENCH_CUDA_MEM=malloc $ubench $small --random-blocks
  expect_fail "UCX GPU a planted wrong byte fails the run (ucx 1.22)" 120 "TEST FAILED: decode rank 0, iteration 2" env KVX_BENCH_FLIP_BYTE=1 KVX_BENCH_CUDA_MEM=malloc $ubench $small --random-blocks
  # kvx_bench's caches are one allocation each; torch gives each layer its
  # own, often adjacent to the next: one UCX registration must not span two
  # (cuda_ipc's key names one allocation; the other layers' reads then land
  # another layer's bytes)
  if [ -f $U/python/libkvx_cuda.so ] && python3 -c 'import torch' 2>/dev/null; then
    entry "UCX GPU from Python: torch tensors, an allocation per layer, cuda_ipc gets on, HND and NHD, TP 1->1 and 2->1 (ucx 1.22)" 300 \
      env PYTHONPATH=$PWD/$B/python $one python3 bench/peers/bench_peers.py --device cuda --rows kvx-ucx1.22-ipc-get --sizes 65536 \
      --tp 1,2 --patterns random --layouts HND,NHD --request-bytes 8388608 --deadline-s 60 --strict --out $logdir/peers-ucx122
  fi
else
  entry "UCX 1.22 GPU programs are built (tests/gpu/build.sh with build/ucx122/prefix)" 10 test -x $U/test_cuda
fi
# The Python package on this machine's own Python and torch (build/gpu/python
# and build/gpu/pylib from tests/gpu/build.sh: nothing is installed here).
PYP="env PYTHONPATH=$PWD/$B/python:$PWD/$B/pylib"
if [ -f $B/python/kvx/libkvx_cuda.so ] && python3 -c 'import torch' 2>/dev/null; then
  section "Python: the kvx package on $(python3 -c 'import sys, torch; print("Python %d.%d, torch %s" % (sys.version_info[:2] + (torch.__version__,)))') (GPU $gpu)"
  entry "python: torch CUDA tensors between processes (default allocator, expandable segments), stream_wait + a torch check, torch.cuda.graph 24 replays" 600 \
    $PYP $one python3 -m pytest -q -p no:cacheprovider tests/python/test_gpu.py
  entry "python example on the GPU: prefill server and decode client, prefill TP 2 -> decode TP 1, torch CUDA tensors, 2 abandoned" 180 \
    $PYP $one python3 examples/python/run_example.py --device cuda --prefill-tp 2 --decode-tp 1 --abandon 2 --lease-ms 5000
  entry "python example on the GPU: prefill TP 1 -> decode TP 2, HND, bfloat16" 180 \
    $PYP $one python3 examples/python/run_example.py --device cuda --prefill-tp 1 --decode-tp 2 --layout HND --dtype bfloat16
  entry "python: the CPU suite on this Python (numpy and torch CPU tensors over UCX tcp)" 300 \
    $PYP $one env UCX_TLS=tcp python3 -m pytest -q -p no:cacheprovider tests/python/test_kvx.py
else
  entry "python: build/gpu/python is built and python3 has torch" 10 test -f $B/python/kvx/libkvx_cuda.so -a -n "$(python3 -c 'import torch' 2>&1 && echo y)"
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "${ngpu:-0}" -ge 2 ]; then
  section "two GPUs: owner on GPU 0, reader on GPU 1"
  entry "test_cuda two GPUs" 300 env CUDA_VISIBLE_DEVICES=0,1 KVX_TEST_ONLY="two GPUs" $B/test_cuda
  entry "CUDA pack GPU 0 -> GPU 1, 1->2 NHD random" 120 env CUDA_VISIBLE_DEVICES=0,1 KVX_BENCH_PREFILL_GPU=0 KVX_BENCH_DECODE_GPU=1 \
    $B/kvx_bench --backends CUDA $small --random-blocks --prefill-tp 1 --decode-tp 2 --layout NHD
  entry "CUDA pack GPU 0 -> GPU 1, 1->2 NHD random, verify mode, every block" 120 env CUDA_VISIBLE_DEVICES=0,1 KVX_BENCH_PREFILL_GPU=0 KVX_BENCH_DECODE_GPU=1 \
    $B/kvx_bench --backends CUDA $small --random-blocks --prefill-tp 1 --decode-tp 2 --layout NHD --verify 1
  entry "CUDA pack GPU 0 -> GPU 1, 2->1 HND, VMM" 120 env CUDA_VISIBLE_DEVICES=0,1 KVX_BENCH_PREFILL_GPU=0 KVX_BENCH_DECODE_GPU=1 KVX_BENCH_CUDA_MEM=vmm \
    $B/kvx_bench --backends CUDA $small --random-blocks --prefill-tp 2 --decode-tp 1
fi
runner_end
