#!/usr/bin/env bash
# libfabric shm between processes in two PID namespaces (as two containers
# on one host): the reader cannot read the owner with process_vm_readv, so
# shm moves the bytes through its bounce buffers. kvx must say so, why, and
# what it costs, and every byte must still land.
#   tests/ofi/shm_pidns.sh KVX_BENCH
set -u
bench=$1
unshare --pid --fork true 2>/dev/null || { echo "skip: unshare --pid is not permitted here (needs root)"; exit 77; }
args="--backends LIBFABRIC --num-blocks 128 --blocks 32 --num-layers 2 --block-tokens 64 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 1"
port=$((15000 + RANDOM % 2000))
log=$(mktemp)
FI_PROVIDER=shm timeout 60 "$bench" --role prefill --listen 127.0.0.1:$port $args > "$log" 2>&1 &
owner=$!
for _ in $(seq 50); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.2; done
out=$(FI_PROVIDER=shm timeout 60 unshare --pid --fork "$bench" --role decode --connect 127.0.0.1:$port $args 2>&1)
rc=$?
wait $owner; orc=$?
echo "$out"
sed 's/^/  owner: /' "$log" | tail -3
rm -f "$log"
fail=0
for want in "shm reads prefill/0 without CMA, since process_vm_readv of pid [0-9]*'s memory fails here (No such process): another PID namespace" \
            "about 100x slower; FI_PROVIDER=tcp is faster" "transport ofi:shm (sw)" "TEST PASSED: every byte"; do
  echo "$out" | grep -q -- "$want" || { echo "FAIL: the reader did not say: $want"; fail=1; }
done
[ $rc = 0 ] && [ $orc = 0 ] && [ $fail = 0 ] || { echo "FAIL: reader exit $rc, owner exit $orc"; exit 1; }
echo "ok: said without CMA, why and what it costs; every byte landed"
