#!/usr/bin/env bash
# make bench: kvx_bench over a sweep of block sizes (bytes per block, per
# layer and K/V), in pack (this host) and spread (two network namespaces),
# each beside a reference taken in the same run over the same transport:
# ucx_perftest -t ucp_get for UCX, a raw fi_read loop (fi_read_ref) for
# libfabric over tcp;ofi_rxm and shm, with the same message size and as many
# reads outstanding as kvx keeps (-O = kvx's max_ops). Random blocks, so every block
# is its own descriptor and the message sizes match. Prints a table, writes
# build/bench/results.tsv and plots build/bench/bench.png (gnuplot).
#   KVX_BENCH_SIZES="4096 65536"  KVX_BENCH_MODES="pack"  to narrow it.
set -u
cd "$(dirname "$0")/.."
B=build
out=$B/bench
mkdir -p "$out"
sizes=${KVX_BENCH_SIZES:-4096 16384 65536 262144 1048576}
modes=${KVX_BENCH_MODES:-pack spread}
ops=${KVX_BENCH_OPS:-64}          # reads kvx keeps in flight (kvx_queue_desc.max_ops default)
layers=4
target=${KVX_BENCH_BYTES:-67108864}  # bytes per request
tsv=$out/results.tsv
echo -e "mode\tbackend\tblock_bytes\tkvx_gbps\tref_gbps\tratio\tref" > "$tsv"

# GB/s (1e9 bytes/s) from ucx_perftest's "Final:" line (its MB are 2^20 bytes).
perftest_gbps() { awk '/^Final:/ {printf "%.3f", $6 * 1048576 / 1e9}' "$1"; }
json_gbps() { sed -n 's/.*"gbps":\([0-9.]*\),"latency.*/\1/p' "$1"; }
ref_gbps() { sed -n 's/.*"gbps":\([0-9.]*\),"wrong.*/\1/p' "$1"; }

ns_setup() {
  tag=$$; A=kvxbA$tag; Bn=kvxbB$tag; VA=kba$tag; VB=kbb$tag; IPA=10.212.$((tag % 250)).1; IPB=10.212.$((tag % 250)).2
  ip netns add $A && ip netns add $Bn && ip link add $VA type veth peer name $VB &&
  ip link set $VA netns $A && ip link set $VB netns $Bn &&
  ip -n $A addr add $IPA/24 dev $VA && ip -n $Bn addr add $IPB/24 dev $VB &&
  ip -n $A link set $VA up && ip -n $Bn link set $VB up && ip -n $A link set lo up && ip -n $Bn link set lo up
}
ns_cleanup() { ip netns del ${A:-none} 2>/dev/null; ip netns del ${Bn:-none} 2>/dev/null; true; }
trap ns_cleanup EXIT INT TERM

row() {  # mode backend size kvx ref refname
  local ratio
  ratio=$(awk -v a="$4" -v b="$5" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
  printf "%-7s %-6s %9s %10s %10s %7s   %s\n" "$1" "$2" "$3" "$4" "$5" "$ratio" "$6"
  echo -e "$1\t$2\t$3\t$4\t$5\t$ratio\t$6" >> "$tsv"
}

echo "kvx bench: random blocks, $layers layers x K/V, ~$((target >> 20)) MiB per request, $ops reads in flight"
printf "%-7s %-6s %9s %10s %10s %7s   %s\n" mode backend block kvx_GB/s ref_GB/s ratio reference
for mode in $modes; do
  if [ "$mode" = spread ]; then
    if [ "$(id -u)" != 0 ]; then echo "(spread skipped: needs root for network namespaces)"; continue; fi
    ns_setup || { echo "(spread skipped: cannot make namespaces)"; ns_cleanup; continue; }
  fi
  for size in $sizes; do
    tokens=$((size / 256))
    blocks=$((target / (size * layers * 2))); [ $blocks -lt 8 ] && blocks=8
    nb=$((blocks * 2))
    args="--num-blocks $nb --blocks $blocks --num-layers $layers --block-tokens $tokens --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 5 --max-ops $ops"
    port=$((13400 + RANDOM % 1000))
    iters=$((blocks * layers * 2 * 5)); [ $iters -gt 200000 ] && iters=200000
    if [ "$mode" = pack ]; then
      UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 300 $B/kvx_bench --strategy pack $args --json "$out/kvx_${mode}_$size.json" > "$out/kvx_${mode}_$size.log" 2>&1
      (UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 120 ucx_perftest -t ucp_get -s $size -O $ops -n $iters -p $port > "$out/perf_${mode}_$size.srv" 2>&1 &)
      sleep 0.5
      UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 120 ucx_perftest 127.0.0.1 -t ucp_get -s $size -O $ops -n $iters -p $port > "$out/perf_${mode}_$size.log" 2>&1
    else
      ip netns exec $A env UCX_TLS=tcp UCX_NET_DEVICES=$VA KVX_HOST_ID=bench-a timeout 300 $B/kvx_bench --role prefill --listen $IPA:$port $args > "$out/kvx_${mode}_$size.srv" 2>&1 &
      ip netns exec $Bn env UCX_TLS=tcp UCX_NET_DEVICES=$VB KVX_HOST_ID=bench-b timeout 300 $B/kvx_bench --role decode --connect $IPA:$port $args \
        --json "$out/kvx_${mode}_$size.json" > "$out/kvx_${mode}_$size.log" 2>&1
      wait
      (ip netns exec $A env UCX_TLS=tcp UCX_NET_DEVICES=$VA timeout 120 ucx_perftest -t ucp_get -s $size -O $ops -n $iters -p $((port + 1)) > "$out/perf_${mode}_$size.srv" 2>&1 &)
      sleep 0.5
      ip netns exec $Bn env UCX_TLS=tcp UCX_NET_DEVICES=$VB timeout 120 ucx_perftest $IPA -t ucp_get -s $size -O $ops -n $iters -p $((port + 1)) \
        > "$out/perf_${mode}_$size.log" 2>&1
    fi
    grep -q "TEST PASSED" "$out/kvx_${mode}_$size.log" || { echo "kvx_bench $mode $size did not pass:"; tail -5 "$out/kvx_${mode}_$size.log"; }
    row "$mode" ucx "$size" "$(json_gbps "$out/kvx_${mode}_$size.json")" "$(perftest_gbps "$out/perf_${mode}_$size.log")" "ucx_perftest ucp_get -O $ops"
    # libfabric, beside a raw fi_read loop with the same size and reads outstanding
    total=$((blocks * layers * 2 * size * 5))
    if [ "$mode" = pack ]; then
      for p in tcp shm; do
        FI_PROVIDER=$p FI_TCP_IFACE=lo timeout 300 $B/kvx_bench --strategy pack --backends LIBFABRIC $args --json "$out/ofi_${p}_$size.json" > "$out/ofi_${p}_$size.log" 2>&1
        FI_TCP_IFACE=lo timeout 120 $B/fi_read_ref --provider $p --size $size --outstanding $ops --total $total --json "$out/ref_${p}_$size.json" > "$out/ref_${p}_$size.log" 2>&1
        grep -q "TEST PASSED" "$out/ofi_${p}_$size.log" || { echo "kvx_bench LIBFABRIC $p $size did not pass:"; tail -3 "$out/ofi_${p}_$size.log"; }
        row "$mode" "ofi-$p" "$size" "$(json_gbps "$out/ofi_${p}_$size.json")" "$(ref_gbps "$out/ref_${p}_$size.json")" "fi_read_ref $p -O $ops"
      done
    else
      ip netns exec $A env FI_PROVIDER=tcp FI_TCP_IFACE=$VA KVX_HOST_ID=bench-a timeout 300 $B/kvx_bench --role prefill --listen $IPA:$((port + 2)) --backends LIBFABRIC $args > "$out/ofi_spread_$size.srv" 2>&1 &
      ip netns exec $Bn env FI_PROVIDER=tcp FI_TCP_IFACE=$VB KVX_HOST_ID=bench-b timeout 300 $B/kvx_bench --role decode --connect $IPA:$((port + 2)) --backends LIBFABRIC $args \
        --json "$out/ofi_spread_$size.json" > "$out/ofi_spread_$size.log" 2>&1
      wait
      ip netns exec $A env FI_TCP_IFACE=$VA timeout 120 $B/fi_read_ref --provider tcp --size $size --outstanding $ops --total $total --listen $IPA:$((port + 3)) > "$out/ref_spread_$size.srv" 2>&1 &
      sleep 0.5
      ip netns exec $Bn env FI_TCP_IFACE=$VB timeout 120 $B/fi_read_ref --provider tcp --size $size --outstanding $ops --total $total --connect $IPA:$((port + 3)) \
        --json "$out/ref_spread_$size.json" > "$out/ref_spread_$size.log" 2>&1
      wait
      grep -q "TEST PASSED" "$out/ofi_spread_$size.log" || { echo "kvx_bench LIBFABRIC spread $size did not pass:"; tail -3 "$out/ofi_spread_$size.log"; }
      row "$mode" "ofi-tcp" "$size" "$(json_gbps "$out/ofi_spread_$size.json")" "$(ref_gbps "$out/ref_spread_$size.json")" "fi_read_ref tcp -O $ops"
    fi
  done
  [ "$mode" = spread ] && ns_cleanup
done

# The make-demo transfer (128 random 32 KiB blocks x 32 layers x K/V) beside
# ucx_perftest at 32 KiB with the same reads outstanding.
if [[ " $modes " == *" pack "* ]] && [ -x $B/kvx_demo ]; then
  UCX_NET_DEVICES=lo $B/kvx_demo > "$out/demo.log" 2>&1
  port=$((14500 + RANDOM % 1000))
  (UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 120 ucx_perftest -t ucp_get -s 32768 -O $ops -n 20000 -p $port > "$out/perf_demo.srv" 2>&1 &)
  sleep 0.5
  UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 120 ucx_perftest 127.0.0.1 -t ucp_get -s 32768 -O $ops -n 20000 -p $port > "$out/perf_demo.log" 2>&1
  grep -q "TEST PASSED" "$out/demo.log" || { echo "kvx_demo did not pass:"; tail -3 "$out/demo.log"; }
  row demo ucx 32768 "$(sed -n 's/.*, \([0-9.]*\) GB\/s/\1/p' "$out/demo.log")" "$(perftest_gbps "$out/perf_demo.log")" "ucx_perftest ucp_get -O $ops (make demo's transfer)"
fi

# What verify mode costs: the same 64 KiB transfer unverified, checking one
# block in 64, and checking every block (pack, same run).
if [[ " $modes " == *" pack "* ]]; then
  vargs="--num-blocks 1024 --blocks 128 --num-layers 8 --block-tokens 256 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 5"
  for v in 0 64 1; do
    UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 300 $B/kvx_bench --strategy pack $vargs --verify $v --json "$out/verify_$v.json" > "$out/verify_$v.log" 2>&1
    grep -q "TEST PASSED" "$out/verify_$v.log" || { echo "kvx_bench --verify $v did not pass:"; tail -3 "$out/verify_$v.log"; }
  done
  base=$(json_gbps "$out/verify_0.json")
  for v in 64 1; do
    row "verify" ucx 65536 "$(json_gbps "$out/verify_$v.json")" "$base" "kvx unverified, same run (--verify $v: $([ $v = 1 ] && echo 'every block' || echo "1 block in $v"))"
  done
fi

if [ -x $B/bench_post ]; then
  echo
  UCX_NET_DEVICES=lo $B/bench_post | tee "$out/post_cost.txt"
fi

bash bench/bench_plot.sh "$tsv" "$out/bench.png" "$ops"
echo "table: $tsv"
