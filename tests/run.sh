#!/usr/bin/env bash
# Runs every test of `make test`: unit, fault and compile tests, then the
# kvx_bench matrix (pack on this host, spread across two network namespaces),
# every run byte-verified. Ends with one line "N passed, M failed".
# KVX_TEST_FILTER=regex runs only the entries whose name matches;
# KVX_TEST_JOBS=1 runs them one at a time.
set -u
cd "$(dirname "$0")/.."
B=build
. tests/lib/runner.sh
# Entries run KVX_TEST_JOBS at a time (default 3). They share nothing: ports
# are ephemeral, two_hosts.sh names its namespaces and links by its pid, the
# compile matrices write to a folder per backend set. The fault tests'
# deadline checks have room to spare beside two other entries.
runner_init $B/test-logs "${KVX_TEST_JOBS:-3}"
# Pack runs stay on loopback; the sanitizer runtime must not trip over UCX's
# own memory hooks.
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

bench=$B/kvx_bench
# Result lines name the UCX they ran against: Debian's (pkg-config) here, the wheel's below.
vdeb=$(pkg-config --modversion ucx 2>/dev/null | cut -d. -f1,2)
small="--num-blocks 200 --blocks 24 --num-layers 3 --iters 3"
# The UCX unit, fault and verify suites of one build: ucx_suites DIR VERSION
# (Debian's in build/, the wheel's in build/ucx122/).
ucx_suites() {
  local d=$1 v=$2
  entry "unit (ucx $v default)" 120 $d/test_unit
  entry "unit (ucx $v tcp)" 120 env UCX_TLS=tcp $d/test_unit
  # kvx's get where the user set UCX's 64 KiB segments: replies of 60 KiB
  entry "unit (ucx $v tcp, UCX_TCP_RX_SEG_SIZE=64k): kvx's get" 120 env UCX_TLS=tcp UCX_TCP_RX_SEG_SIZE=64k KVX_TEST_ONLY="kvx's get (ucx tcp)" $d/test_unit
  entry "unit (ucx $v, asan+ubsan)" 300 $d/test_unit.asan
  entry "owner failures (ucx $v default)" 180 $d/test_owner_failures
  entry "owner failures (ucx $v tcp)" 180 env UCX_TLS=tcp $d/test_owner_failures
  entry "owner failures (ucx $v tcp, asan+ubsan)" 300 env UCX_TLS=tcp $d/test_owner_failures.asan
  entry "reader failures (ucx $v tcp)" 180 env UCX_TLS=tcp $d/test_reader_failures
  entry "reader failures (ucx $v tcp, asan+ubsan)" 300 env UCX_TLS=tcp $d/test_reader_failures.asan
  entry "hostile input (ucx $v tcp)" 180 env UCX_TLS=tcp $d/test_hostile_input
  entry "hostile input (ucx $v tcp, asan+ubsan)" 300 env UCX_TLS=tcp $d/test_hostile_input.asan
  entry "verify mode (ucx $v default)" 120 $d/test_verify
  entry "verify mode (ucx $v, asan+ubsan)" 300 $d/test_verify.asan
}

section "unit, fault and compile tests"
entry "local backend, no network library" 120 $B/test_local
entry "local backend (asan+ubsan)" 300 $B/test_local.asan
entry "valgrind: local backend" 300 valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite $B/test_local
ucx_suites $B "$vdeb"
entry "owner failures (ucx $vdeb, asan+ubsan)" 300 $B/test_owner_failures.asan
# What kvx's UCX workarounds are for, shown on this version with each one
# taken away (docs/ucx.md, "What each version needs"; seams in kvx.h). UCX's own
# software get exists only with software RMA on (KVX_UCX_SOFTWARE_RMA=1).
R="env UCX_TLS=tcp $B/test_reader_failures"
expect_fail "ucx $vdeb, software RMA on, no first read at connect: a reader dying just after connecting aborts the owner" 180 "got REP message" \
  env KVX_UCX_SOFTWARE_RMA=1 KVX_TEST_UCX_NO_PROBE=1 KVX_TEST_ONLY=stranded $R
entry "ucx $vdeb, active messages only, no first read at connect: readers dying at every point, the owner survives" 180 \
  env KVX_TEST_UCX_NO_PROBE=1 KVX_TEST_ONLY=stranded $R
expect_fail "ucx $vdeb, UCX's own get: a cache deregistered under a stopped reader hands it the memory's next bytes" 180 "FAIL cache deregistered" \
  env KVX_UCX_SOFTWARE_RMA=1 KVX_TEST_UCX_NATIVE_GET=1 KVX_TEST_ONLY=deregistered $R
entry "ucx $vdeb, UCX's own get: readers killed at 16 points of their reads, the owner survives" 180 env KVX_UCX_SOFTWARE_RMA=1 KVX_TEST_UCX_NATIVE_GET=1 KVX_TEST_ONLY="16 points" $R
expect_fail "a child that dies by a signal fails its test, even where the parent saw all it wanted from it" 120 "died by signal 6" \
  env KVX_TEST_OWNER_ABORT=1 KVX_TEST_ONLY="another kvx version" $B/test_hostile_input
entry "runner: an entry that prints \"1 passed, 0 failed\" and then dies by a signal or overruns its time fails; a filter that matches no entry fails the run" 60 \
  bash tests/lib/runner_selftest.sh
expect_fail "a KVX_TEST_ONLY that selects no case fails the test program" 60 "FAIL no case matched KVX_TEST_ONLY=" \
  env KVX_TEST_ONLY=nothing-matches-this $B/test_local
expect_out "ucx $vdeb, same host with cma allowed: no shared memory under peer failure handling, read over tcp and said" 120 "transport ucx:tcp (sw)" \
  env UCX_TLS=tcp,cma $bench $small --random-blocks
entry "stress: 8 peers, 4 queues, 20000 reads (ucx $vdeb tcp)" 300 env UCX_TLS=tcp $B/test_stress
entry "valgrind: unit (ucx $vdeb tcp)" 300 env UCX_TLS=tcp valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite $B/test_unit
entry "valgrind: kvx_bench pack 1->1, every process (ucx $vdeb tcp)" 300 env UCX_TLS=tcp valgrind -q --trace-children=yes --error-exitcode=99 \
  --leak-check=full --errors-for-leak-kinds=definite $B/kvx_bench --num-blocks 64 --blocks 16 --random-blocks --iters 2
entry "compile matrix" 300 bash tests/compile/matrix.sh
entry "compile matrix with KVX_CUDA (stub libcuda)" 600 bash tests/compile/matrix_cuda.sh
entry "make install into a staging root, a program built against it alone (local, UCX), make uninstall" 120 bash tests/compile/install.sh
entry "PTX check (ptxas sm_80, sm_90, sm_100)" 120 bash tools/ptx_check.sh
# The package's ctypes mirrors are generated from kvx.h: stale ones fail here
# (with the diff), before the library's own check refuses them at load.
entry "python struct mirrors: python/kvx/_structs.py is what tools/gen_pymirrors.py makes of the headers" 60 python3 tools/gen_pymirrors.py --check
if [ -x $B/venv/bin/python ] && $B/venv/bin/python -c 'import kvx' 2>/dev/null; then
  entry "python: the kvx package (ctypes), reads between processes, numpy and torch CPU (ucx $vdeb tcp)" 300 \
    env UCX_TLS=tcp $B/venv/bin/python -m pytest -q -p no:cacheprovider tests/python
  entry "python example: prefill server and decode client, prefill TP 2 -> decode TP 1, 2 abandoned, 1 read after its lease (stale) (ucx $vdeb tcp)" 180 \
    env UCX_TLS=tcp UCX_NET_DEVICES=lo $B/venv/bin/python examples/python/run_example.py --prefill-tp 2 --decode-tp 1 --abandon 2 --late 1 --lease-ms 5000
  entry "python example: prefill server and decode client, prefill TP 1 -> decode TP 2, HND, 2 abandoned, 1 read after its lease (stale) (ucx $vdeb tcp)" 180 \
    env UCX_TLS=tcp UCX_NET_DEVICES=lo $B/venv/bin/python examples/python/run_example.py --prefill-tp 1 --decode-tp 2 --layout HND --abandon 2 --late 1 --lease-ms 5000
  # make bench-peers' workload and driver, on kvx alone (NIXL and Mooncake
  # are installed by make bench-peers only): the rows run and check every byte
  P="$B/venv/bin/python bench/peers/bench_peers.py --rows kvx-ucx1.13 --sizes 16384 --tp 2 --patterns random --request-bytes 8388608 --strict"
  # twice each, the summary's median with its range
  expect_out "bench-peers driver: kvx, pack and spread, HND and NHD, TP 2->1, two runs each, every byte checked (ucx $vdeb tcp)" 300 \
    "| spread | NHD | 2->1 | random | 16 KiB | [0-9.]* ([0-9.]*-[0-9.]*) |" $P --layouts HND,NHD --runs 2 --out $B/bench-peers-test
  # the batched check (the GPU's default) on the host, NHD: it must fail too
  expect_fail "bench-peers driver: a planted wrong byte fails the row and says where (ucx $vdeb tcp)" 180 "FAILED: RuntimeError: request 0: wrong bytes: owner rank 0, layer 0, K" \
    env KVX_PEERS_FLIP_BYTE=1 $P --modes pack --layouts NHD --check batch --out $B/bench-peers-test
else
  entry "python: the kvx package is installed (make python)" 10 $B/venv/bin/python -c 'import kvx'
fi
if [ -x $B/fuzz_metadata ]; then
  rm -rf $B/fuzz-corpus && mkdir -p $B/fuzz-corpus && $B/make_seeds $B/fuzz-corpus >/dev/null
  entry "metadata fuzzer, 30 s (libFuzzer, asan+ubsan)" 120 $B/fuzz_metadata -max_total_time=30 -print_final_stats=1 -artifact_prefix=$B/ $B/fuzz-corpus
fi

ofi=$B/ofi
# libfabric's shm provider names its regions /dev/shm/PID:N:N; a process
# killed by a fault test leaves its own behind, and a later process given the
# same pid can then fail to open its endpoint (EBUSY, seen in the shm
# entries). Regions of processes no longer alive are removed first.
for f in /dev/shm/*:*:*; do
  n=${f##*/} pid=${n%%:*}
  [[ "$n" =~ ^[0-9]+:[0-9]+:[0-9]+$ ]] && ! [ -d "/proc/$pid" ] && rm -f "$f"
done
section "libfabric: tcp;ofi_rxm on loopback, shm (tests built with libfabric alone)"
T="env FI_PROVIDER=tcp FI_TCP_IFACE=lo" S="env FI_PROVIDER=shm"
entry "unit (ofi tcp)" 120 $T $ofi/test_unit
entry "unit (ofi shm)" 120 $S $ofi/test_unit
entry "unit (ofi tcp, asan+ubsan)" 300 $T $ofi/test_unit.asan
entry "unit (ofi shm, asan+ubsan)" 300 $S $ofi/test_unit.asan
entry "owner failures (ofi tcp)" 180 $T $ofi/test_owner_failures
entry "owner failures (ofi shm)" 180 $S $ofi/test_owner_failures
entry "owner failures (ofi tcp, asan+ubsan)" 300 $T $ofi/test_owner_failures.asan
entry "ofi only (tcp)" 120 $T $ofi/test_ofi
entry "ofi only (shm)" 120 $S $ofi/test_ofi
entry "ofi only (tcp, asan+ubsan)" 300 $T $ofi/test_ofi.asan
entry "ofi only (shm, asan+ubsan)" 300 $S $ofi/test_ofi.asan
entry "verify mode (ofi tcp)" 120 $T $ofi/test_verify
entry "stress: 8 peers, 4 queues, 20000 reads (ofi tcp)" 300 $T $ofi/test_stress
entry "valgrind: unit (ofi tcp)" 300 $T valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite $ofi/test_unit
entry "compile matrix (ofi alone)" 300 env KVX_BACKEND_DEFS="-DKVX_OFI" KVX_BACKEND_LIBS="$(pkg-config --libs libfabric) -lpthread" bash tests/compile/matrix.sh
for p in tcp shm; do for tp in "1 2" "2 1" "4 2"; do for lay in HND NHD; do
  pt=${tp% *} dt=${tp#* }
  entry "pack ofi $p $pt->$dt $lay random" 120 env FI_PROVIDER=$p FI_TCP_IFACE=lo $bench --backends LIBFABRIC $small --random-blocks --prefill-tp $pt --decode-tp $dt --layout $lay
done; done; done
entry "pack ofi tcp 1 KV head replicated, 1->2" 120 $T $bench --backends LIBFABRIC $small --random-blocks --heads 1 --prefill-tp 1 --decode-tp 2
entry "pack ofi tcp 2->1 HND, reads split at 1000 bytes" 120 env KVX_OFI_MAX_MSG=1000 FI_PROVIDER=tcp FI_TCP_IFACE=lo $bench --backends LIBFABRIC $small --random-blocks --prefill-tp 2 --decode-tp 1 --block-tokens 4
entry "pack ofi shm 2->4 NHD, kvx verifies every block" 120 $S $bench --backends LIBFABRIC $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD --verify 1
entry "ofi shm across two PID namespaces: no CMA, said with why and cost, every byte checked" 120 bash tests/ofi/shm_pidns.sh $bench
# NHD 2->1: a block's 16 token pieces as fi_readmsg's, one op per block and
# plane (288), not a fi_read per piece (4608 with KVX_OFI_GATHER=0)
expect_out "pack ofi tcp 2->1 NHD: a block's token pieces in one op" 120 "288 descriptors -> 288 after merging" $T $bench --backends LIBFABRIC $small --random-blocks --prefill-tp 2 --decode-tp 1 --layout NHD
expect_out "pack ofi tcp 2->1 NHD, KVX_OFI_GATHER=0: a fi_read per token piece" 120 "288 descriptors -> 4608 after merging" env KVX_OFI_GATHER=0 FI_PROVIDER=tcp FI_TCP_IFACE=lo $bench --backends LIBFABRIC $small --random-blocks --prefill-tp 2 --decode-tp 1 --layout NHD
entry "pack ofi tcp 4->2 NHD random, every read carries block generations, verified" 120 $T $bench --backends LIBFABRIC $small --random-blocks --prefill-tp 4 --decode-tp 2 --layout NHD --verify 1 --generations
entry "pack ofi tcp 1->2 HND consecutive, block generations" 120 $T $bench --backends LIBFABRIC $small --prefill-tp 1 --decode-tp 2 --generations
expect_fail "a transport policy that demands RDMA refuses libfabric tcp at kvx_peer_add, saying why (ofi tcp)" 60 "requires one of its other terms; why that transport: libfabric tcp" \
  $T $bench --backends LIBFABRIC $small --transport-policy rdma
entry "fi_read_ref tcp 64 KiB x 64" 120 env FI_TCP_IFACE=lo $B/fi_read_ref --provider tcp --size 64k --outstanding 64 --total 256m
entry "fi_read_ref shm 64 KiB x 64" 120 $B/fi_read_ref --provider shm --size 64k --outstanding 64 --total 256m
entry "cma_ref 16 KiB random blocks, every byte checked" 60 $B/cma_ref --size 16384 --region 16777216 --total 8388608 --iters 2
entry "spread ofi tcp 1->1 HND random" 180 env FI_PROVIDER=tcp bash tests/lib/two_hosts.sh --backends LIBFABRIC $small --random-blocks
entry "spread ofi tcp 2->4 NHD random" 180 env FI_PROVIDER=tcp bash tests/lib/two_hosts.sh --backends LIBFABRIC $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD
entry "spread ofi tcp 4->2 HND consecutive" 180 env FI_PROVIDER=tcp bash tests/lib/two_hosts.sh --backends LIBFABRIC $small --prefill-tp 4 --decode-tp 2

# A hostile process (tests/security): raw UCX and libfabric calls against an
# owner and a reader, which lack nothing but read every byte true beside it.
section "security: a process that reaches the ports but lacks the metadata (raw UCX and libfabric calls)"
entry "rogue against kvx (ucx $vdeb tcp)" 300 env UCX_TLS=tcp KVX_ROGUE=$B/rogue_ucx $B/test_rogue
entry "rogue against kvx (ofi tcp)" 300 env FI_PROVIDER=tcp FI_TCP_IFACE=lo KVX_ROGUE=$B/rogue_ofi $ofi/test_rogue
entry "rogue against kvx: rendezvous messages, every process under valgrind (ucx $vdeb tcp)" 300 env UCX_TLS=tcp KVX_ROGUE=$B/rogue_ucx \
  KVX_TEST_ONLY=rendezvous valgrind -q --trace-children=yes --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite $B/test_rogue
entry "where an owner listens with no devices named: the default route's device alone (ucx $vdeb, ofi tcp)" 120 bash tests/security/listen.sh
expect_fail "... and UCX's own default (every device) fails that check" 120 "FAIL ucx, no UCX_NET_DEVICES: listens on 127.0.0.1" \
  env KVX_LISTEN_UCX_ENV=UCX_NET_DEVICES=all bash tests/security/listen.sh

section "kvx_bench, pack (this host, UCX $vdeb from Debian)"
entry "pack ucx $vdeb 1->1 HND random" 120 $bench $small --random-blocks
entry "pack ucx $vdeb 1->1 NHD consecutive" 120 $bench $small --layout NHD
entry "pack ucx $vdeb 1->2 HND random" 120 $bench $small --random-blocks --prefill-tp 1 --decode-tp 2
entry "pack ucx $vdeb 2->1 NHD random" 120 $bench $small --random-blocks --prefill-tp 2 --decode-tp 1 --layout NHD
entry "pack ucx $vdeb 2->4 HND consecutive" 120 $bench $small --prefill-tp 2 --decode-tp 4
entry "pack ucx $vdeb 4->2 NHD random" 120 $bench $small --random-blocks --prefill-tp 4 --decode-tp 2 --layout NHD
entry "pack ucx $vdeb 4->8 HND random" 180 $bench $small --random-blocks --prefill-tp 4 --decode-tp 8
entry "pack ucx $vdeb 8->4 NHD consecutive" 180 $bench $small --prefill-tp 8 --decode-tp 4 --layout NHD
entry "pack ucx $vdeb 1 KV head replicated, 1->2" 120 $bench $small --random-blocks --heads 1 --prefill-tp 1 --decode-tp 2
entry "pack ucx $vdeb 2 KV heads replicated, 2->4 NHD" 120 $bench $small --random-blocks --heads 2 --prefill-tp 2 --decode-tp 4 --layout NHD
entry "pack ucx $vdeb 1 KV head on both sides, 4->2" 120 $bench $small --random-blocks --heads 1 --prefill-tp 4 --decode-tp 2
entry "pack ucx $vdeb shared memory (UCX_TLS=sm) 1->1" 120 env UCX_TLS=sm $bench $small --random-blocks
entry "pack ucx $vdeb shared memory (UCX_TLS=sm) 2->1 NHD" 120 env UCX_TLS=sm $bench $small --random-blocks --prefill-tp 2 --layout NHD
entry "pack ucx $vdeb 3750 blocks x 50 layers x 128, 4 KiB blocks (1.5 GB caches)" 600 \
  $bench --num-blocks 3750 --num-layers 50 --blocks 128 --block-tokens 16 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 2
entry "pack ucx $vdeb 2->4 NHD random, kvx verifies every block" 120 $bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD --verify 1
entry "pack ucx $vdeb 2->4 NHD random, every read carries block generations, verified" 120 $bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD --verify 1 --generations
entry "pack ucx $vdeb 2->1 HND consecutive, block generations, replicated head" 120 $bench $small --heads 1 --prefill-tp 2 --decode-tp 1 --generations
expect_fail "a transport policy that refuses software-served paths refuses ucx:tcp at kvx_peer_add, saying why (ucx $vdeb)" 60 \
  "which the transport policy \"!sw\" refuses (\"!sw\"); why that transport: UCX" $bench $small --transport-policy '!sw'
entry "a transport policy from the environment that accepts ucx:tcp passes (ucx $vdeb)" 60 env KVX_TRANSPORT_POLICY='!ucx:ud*,ucx:tcp*' $bench $small
entry "pack ucx $vdeb 1->2 under asan+ubsan" 300 env KVX_BENCH=1 $B/kvx_bench.asan $small --random-blocks --prefill-tp 1 --decode-tp 2
expect_fail "a planted wrong byte fails the run (ucx $vdeb)" 120 "TEST FAILED: decode rank 0, iteration 2" env KVX_BENCH_FLIP_BYTE=1 $bench $small --random-blocks
expect_fail "mismatched TP options are refused (ucx $vdeb)" 60 "do not divide" $bench --heads 6 --decode-tp 4
entry "make bench's warm-up iteration is checked, marked, and left out of the total (ucx $vdeb)" 120 \
  bash tests/lib/bench_warmup.sh $bench $small --random-blocks --prefill-tp 2 --decode-tp 2
expect_fail "a warm-up of every iteration is refused (ucx $vdeb)" 30 "--warmup must be below --iters 3" $bench $small --warmup 3
entry "make bench's ucp_am reference (bench/am_ref.c) takes every message whole and in order (ucx $vdeb)" 90 \
  bash tests/lib/am_ref_pair.sh $B/am_ref --size 65536 --pass 8388608 --iters 2 --region 16777216
# A rank killed from outside ends the run at once, named, not after every
# remaining iteration has failed alike.
expect_fail "a prefill rank killed mid-run stops the run after the iteration that failed (ucx $vdeb)" 120 "stopped after iteration [0-9]* of 500: a read failed" \
  bash tests/lib/kill_rank.sh prefill 1 3 $bench $small --iters 500 --prefill-tp 2 --decode-tp 1
expect_fail "a decode rank killed mid-run ends the run, naming it (ucx $vdeb)" 120 "decode rank 1 exited with status 0x9" \
  bash tests/lib/kill_rank.sh decode 1 3 $bench $small --iters 500 --prefill-tp 1 --decode-tp 2

section "kvx_bench, spread (two network namespaces, UCX $vdeb over TCP on a veth)"
entry "spread ucx $vdeb 1->1 HND random" 180 bash tests/lib/two_hosts.sh $small --random-blocks
entry "spread ucx $vdeb 2->4 NHD random" 180 bash tests/lib/two_hosts.sh $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD
entry "spread ucx $vdeb 4->2 HND consecutive" 180 bash tests/lib/two_hosts.sh $small --prefill-tp 4 --decode-tp 2
entry "spread ucx $vdeb 1 KV head replicated, 1->2" 180 bash tests/lib/two_hosts.sh $small --random-blocks --heads 1 --decode-tp 2

# UCX 1.22 from the libucx wheel (make builds build/ucx122/ against it): the
# UCX suites again, each line naming the version.
U=$B/ucx122
if [ -x $U/test_unit ]; then
  v=$(sed -n 's/^#define UCP_API_MINOR *\([0-9]*\).*/1.\1/p' "$(cat $U/prefix)/include/ucp/api/ucp_version.h")
  section "UCX $v (the libucx wheel): unit, faults, verify, stress, kvx_bench pack and spread"
  ucx_suites $U "$v"
  # The workarounds taken away on this version (see the 1.13 entries above)
  R="env UCX_TLS=tcp $U/test_reader_failures"
  entry "ucx $v, no first read at connect: readers dying at every point, the owner survives (kvx skips it from 1.22)" 180 env KVX_TEST_UCX_NO_PROBE=1 $R
  expect_fail "ucx $v, UCX's own get: a cache deregistered under a stopped reader hands it the memory's next bytes" 180 "FAIL cache deregistered" \
    env KVX_UCX_SOFTWARE_RMA=1 KVX_TEST_UCX_NATIVE_GET=1 KVX_TEST_ONLY=deregistered $R
  entry "ucx $v, UCX's own get: readers killed at 16 points of their reads, the owner survives" 180 env KVX_UCX_SOFTWARE_RMA=1 KVX_TEST_UCX_NATIVE_GET=1 KVX_TEST_ONLY="16 points" $R
  expect_out "ucx $v, 4 connections to a peer: readers dying at every point, the owner survives and serves the next" 180 "reads over ucx:tcp (sw) (4 connections)" \
    env KVX_UCX_CONNECTIONS=4 $R
  expect_out "ucx $v, 4 connections to a peer: owners killed, stopped, restarted and removed mid-read, every outcome in time" 300 "peer transport: ucx:tcp (sw) (4 connections)" \
    env UCX_TLS=tcp KVX_UCX_CONNECTIONS=4 $U/test_owner_failures
  expect_out "ucx $v, same host with cma allowed: no cma under peer failure handling, read over tcp and said" 120 "transport ucx:tcp (sw)" \
    env UCX_TLS=tcp,cma $U/kvx_bench $small --random-blocks
  expect_out "ucx $v, shared memory only (UCX_TLS=sm): cma one-sided, without failure handling, and said" 120 "transport ucx:cma (no failure handling)" \
    env UCX_TLS=sm $U/kvx_bench $small --random-blocks
  up=$(cat $U/prefix)
  entry "compile matrix (ucx $v)" 300 env KVX_BACKEND_DEFS="-DKVX_UCX -I$up/include" KVX_BACKEND_LIBS="-L$up/lib -Wl,-rpath,$up/lib -lucp -luct -lucs -lucm -lpthread" \
    KVX_COMPILE_OUT=$B/compile/ucx122 bash tests/compile/matrix.sh
  entry "stress: 8 peers, 4 queues, 20000 reads (ucx $v tcp)" 300 env UCX_TLS=tcp $U/test_stress
  entry "rogue against kvx (ucx $v tcp)" 300 env UCX_TLS=tcp KVX_ROGUE=$U/rogue_ucx $U/test_rogue
  entry "rogue against kvx, its reader over 4 connections to the owner (forged replies taken from none of them) (ucx $v tcp)" 300 \
    env UCX_TLS=tcp KVX_UCX_CONNECTIONS=4 KVX_ROGUE=$U/rogue_ucx $U/test_rogue
  entry "rogue against kvx: rendezvous messages, every process under valgrind (ucx $v tcp)" 300 env UCX_TLS=tcp KVX_ROGUE=$U/rogue_ucx \
    KVX_TEST_ONLY=rendezvous valgrind -q --trace-children=yes --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite $U/test_rogue
  entry "pack ucx $v 1->1 HND random" 120 $U/kvx_bench $small --random-blocks
  entry "pack ucx $v 1->2 HND random" 120 $U/kvx_bench $small --random-blocks --prefill-tp 1 --decode-tp 2
  entry "pack ucx $v 2->4 NHD random" 120 $U/kvx_bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD
  entry "pack ucx $v 4->2 NHD random" 120 $U/kvx_bench $small --random-blocks --prefill-tp 4 --decode-tp 2 --layout NHD
  entry "pack ucx $v 1 KV head replicated, 1->2" 120 $U/kvx_bench $small --random-blocks --heads 1 --prefill-tp 1 --decode-tp 2
  entry "pack ucx $v shared memory (UCX_TLS=sm) 2->1 NHD" 120 env UCX_TLS=sm $U/kvx_bench $small --random-blocks --prefill-tp 2 --layout NHD
  entry "pack ucx $v 2->4 NHD random, kvx verifies every block" 120 $U/kvx_bench $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD --verify 1
  entry "pack ucx $v 4->8 HND random" 180 $U/kvx_bench $small --random-blocks --prefill-tp 4 --decode-tp 8
  entry "pack ucx $v 8->4 NHD consecutive" 180 $U/kvx_bench $small --prefill-tp 8 --decode-tp 4 --layout NHD
  entry "pack ucx $v 1->2 under asan+ubsan" 300 env KVX_BENCH=1 $U/kvx_bench.asan $small --random-blocks --prefill-tp 1 --decode-tp 2
  expect_fail "a planted wrong byte fails the run (ucx $v)" 120 "TEST FAILED: decode rank 0, iteration 2" env KVX_BENCH_FLIP_BYTE=1 $U/kvx_bench $small --random-blocks
  entry "make bench's ucp_am reference (bench/am_ref.c) takes every message whole and in order (ucx $v)" 90 \
    bash tests/lib/am_ref_pair.sh $U/am_ref --size 65536 --pass 8388608 --iters 2 --region 16777216
  entry "spread ucx $v 1->1 HND random" 180 env KVX_BENCH=$U/kvx_bench bash tests/lib/two_hosts.sh $small --random-blocks
  entry "spread ucx $v 2->4 NHD random" 180 env KVX_BENCH=$U/kvx_bench bash tests/lib/two_hosts.sh $small --random-blocks --prefill-tp 2 --decode-tp 4 --layout NHD
  expect_out "spread ucx $v 2->1 HND random: 4 connections to each peer (the default to another host over TCP)" 180 "transport ucx:tcp (sw) (4 connections)" \
    env KVX_BENCH=$U/kvx_bench bash tests/lib/two_hosts.sh $small --random-blocks --prefill-tp 2
else
  entry "UCX 1.22 (the libucx wheel) is built" 10 test -x $U/test_unit
fi

# kvx_bench's test with Ray actors (tests/ray; make ray installs Ray): one
# cluster of two nodes for its cases, about 30 s alone (make test-ray: the whole matrix).
section "Ray: two nodes in network namespaces joined by a veth pair, prefill and decode actors placed by pack and spread groups"
entry "ray: spread ucx 2->1, pack libfabric 1->2, a planted wrong byte, a killed prefill and decode actor, a wrong rank, spread on one node (ucx $vdeb tcp)" 300 \
  bash tests/ray/two_nodes.sh --suite make-test

# vLLM with kvx as its KV connector (tests/vllm; make vllm installs vLLM's CPU
# build into build/vllm): five engine processes in turn, alone on the cores,
# about 90 s (make test-vllm: the whole matrix).
section "vLLM: KvxConnector in a prefill and a decode engine on two hosts (network namespaces), against one engine alone"
entry "vllm: the connector's side channel and its checks of kv_transfer_params, against hostile clients and routers" 120 \
  build/vllm/bin/python -m pytest -q -p no:warnings -p no:cacheprovider tests/vllm/test_connector.py
barrier
entry "vllm: equal tokens and logprobs, no prompt token computed on decode, blocks freed when read or at the lease's end, a stale read, misrouted parameters and a killed prefill engine recomputed (ucx $vdeb tcp)" 600 \
  bash tests/vllm/two_hosts.sh --backend ucx

runner_end
