#!/usr/bin/env bash
# make bench: kvx_bench over a sweep of block sizes (bytes per block, per
# layer and K/V), in pack (this host) and spread (two network namespaces),
# each beside references taken in the same run over the same transport, with
# the same message size and as many reads outstanding as kvx keeps (-O =
# kvx's max_ops):
#   UCX: kvx built against Debian's UCX 1.13 (build/kvx_bench, backend
#     ucx1.13) and, when make test has built it, against UCX 1.22 from the
#     libucx-cu12 wheel (build/ucx122/kvx_bench, backend ucx1.22), each beside
#     the ucx_perftest of the SAME UCX: -t ucp_get (what an engine would call)
#     and -t ucp_am_bw (the active messages kvx's own get rides over TCP, where
#     UCX serves gets in software), both with -e (endpoints with peer failure
#     handling, as kvx makes them, so the same transports are picked); on
#     1.22 also ucp_am_bw -y, whose receiver copies each message as kvx does;
#     and am_ref (bench/am_ref.c): UCX's active messages of the same size
#     sent from random blocks of a region of kvx's cache size, each copied
#     to a random block of the receiver's (ucx_perftest sends one buffer
#     again and again, which stays in the CPU's cache);
#     in spread kvx over 1.22 opens 4 connections to each peer (the default
#     to another host over TCP); ucx1.22-x1 is the same with one
#     (KVX_UCX_CONNECTIONS=1), beside the same references;
#     ucx1.22-sm: UCX_TLS=sm, where kvx reads by ucp_get over cma without
#     failure handling, beside ucp_get without -e (sm transports have none),
#     and beside cma_ref: process_vm_readv of the same random blocks.
#   libfabric over tcp;ofi_rxm and shm: a raw fi_read loop (fi_read_ref).
# Random blocks, so every block is its own descriptor and the message sizes
# match. Prints a table (one row per reference), writes build/bench/results.tsv
# and plots build/bench/bench.png (gnuplot).
#   KVX_BENCH_SIZES="4096 65536"  KVX_BENCH_MODES="pack"  to narrow it.
#   KVX_BENCH_RUNS=3: each cell that many times, kvx and its references
#     taking turns, so that what the machine does meanwhile falls on both;
#     build/bench/summary.tsv and the table printed last give the median of
#     kvx, of the reference and of their ratio, each with its lowest and
#     highest (the plot draws the medians).
set -u
cd "$(dirname "$0")/.."
B=build
out=$B/bench
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.log "$out"/*.srv "$out"/*.cmd  # no result of an earlier run read as this one's
sizes=${KVX_BENCH_SIZES:-4096 16384 65536 262144 1048576}
modes=${KVX_BENCH_MODES:-pack spread}
ops=${KVX_BENCH_OPS:-64}          # reads kvx keeps in flight (kvx_queue_desc.max_ops default)
runs=${KVX_BENCH_RUNS:-1}
run=1
layers=4
target=${KVX_BENCH_BYTES:-67108864}  # bytes per request
tsv=$out/results.tsv
echo -e "mode\tbackend\tblock_bytes\tkvx_gbps\tref_gbps\tratio\tref\trun" > "$tsv"

# GB/s (1e9 bytes/s) from ucx_perftest's "Final:" line (its MB are 2^20 bytes).
perftest_gbps() { awk '/^Final:/ {printf "%.3f", $6 * 1048576 / 1e9}' "$1" 2>/dev/null; }
json_gbps() { sed -n 's/.*"gbps":\([0-9.]*\),"latency.*/\1/p' "$1" 2>/dev/null; }
ref_gbps() { sed -n 's/.*"gbps":\([0-9.]*\),"wrong.*/\1/p' "$1" 2>/dev/null; }
json_transport() { sed -n 's/.*"transport":"\([^"]*\)".*/\1/p' "$1" 2>/dev/null; }

# UCX 1.22 (make test builds build/ucx122/kvx_bench; the wheel's prefix is in
# build/ucx122/prefix). Its ucx_perftest loads Debian's libucp 1.13 unless
# LD_LIBRARY_PATH names the wheel's lib/; Debian's never gets LD_LIBRARY_PATH.
v113=$(env -u LD_LIBRARY_PATH timeout 20 ucx_info -v 2>/dev/null | sed -n 's/^# \(Library \)*[Vv]ersion:* //p')
ucx_vers="1.13"
P122=$(cat $B/ucx122/prefix 2>/dev/null)
if [ ! -x $B/ucx122/kvx_bench ]; then
  echo "(UCX 1.22 rows skipped: $B/ucx122/kvx_bench is missing; make test builds it, or: make $B/ucx122/kvx_bench)"
elif [ -z "$P122" ] || [ ! -x "$P122/bin/ucx_perftest" ]; then
  echo "(UCX 1.22 rows skipped: no ucx_perftest in the wheel's prefix ${P122:-(no $B/ucx122/prefix)})"
else
  ucx_vers="1.13 1.22"
  v122=$(LD_LIBRARY_PATH=$P122/lib timeout 20 "$P122/bin/ucx_info" -v 2>/dev/null | sed -n 's/^# \(Library \)*[Vv]ersion:* //p')
  for f in kvx*.h bench/kvx_bench.c tests/lib/kvx_impl.c; do
    [ "$f" -nt $B/ucx122/kvx_bench ] && { echo "(warning: $B/ucx122/kvx_bench is older than $f; rebuild it with make $B/ucx122/kvx_bench)"; break; }
  done
fi
kvx_bin() { [ "$1" = 1.22 ] && echo $B/ucx122/kvx_bench || echo $B/kvx_bench; }
ucx_env() { [ "$1" = 1.22 ] && echo "LD_LIBRARY_PATH=$P122/lib" || echo "-u LD_LIBRARY_PATH"; }
perftest_bin() { [ "$1" = 1.22 ] && echo "$P122/bin/ucx_perftest" || echo ucx_perftest; }
am_ref_bin() { [ "$1" = 1.22 ] && echo $B/ucx122/am_ref || echo $B/am_ref; }

. tests/lib/netns_pair.sh
ns_setup() {
  tag=$$; A=kvxbA$tag; Bn=kvxbB$tag; VA=kba$tag; VB=kbb$tag; IPA=10.212.$((tag % 250)).1; IPB=10.212.$((tag % 250)).2
  netns_pair_up $A $Bn $VA $VB $IPA $IPB
}
ns_cleanup() { netns_pair_down "${A:-none}" "${Bn:-none}" "${VA:-none}"; }
trap ns_cleanup EXIT INT TERM

# Each listener of the run gets a port of its own.
port=$((13400 + RANDOM % 1000))
newport() { port=$((port + 1)); }
# Waits (10 s at most) until a server started in the background listens on
# $port ($1: the ip netns exec prefix, or empty); fails if it exited first.
wait_listen() {
  local i
  for i in $(seq 50); do
    $1 ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}
# Gives a background server 10 s to finish after its client, then ends it.
reap() {
  local i
  for i in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.2; done
  kill "$1" 2>/dev/null; wait "$1" 2>/dev/null; true
}

# pair_ends WHERE: where a reference's server and client run, into the
# caller's locals sns, cns (the ip netns exec prefixes), sdev, cdev (their
# UCX_NET_DEVICES) and host (the server's address): on lo (pack) or across
# the namespaces (spread); and a new $port.
pair_ends() {
  sns="" cns="" sdev=lo cdev=lo host=127.0.0.1
  if [ "$1" = spread ]; then sns="ip netns exec $A"; cns="ip netns exec $Bn"; sdev=$VA; cdev=$VB; host=$IPA; fi
  newport
}
# pair_run OUT SCMD CCMD: the server in the background, the client once the
# server listens (pair_ends' $sns), the server reaped; the client's log is
# OUT.log, the server's OUT.srv, both command lines OUT.cmd. The client's status.
pair_run() {
  local f=$1 scmd=$2 ccmd=$3 spid rc
  printf 'server: %s\nclient: %s\n' "${scmd# }" "${ccmd# }" > "$f.cmd"
  $scmd > "$f.srv" 2>&1 &
  spid=$!
  if wait_listen "$sns" $spid; then
    $ccmd > "$f.log" 2>&1; rc=$?
  else
    echo "(server did not listen on $port)" > "$f.log"; rc=1
  fi
  reap $spid
  return $rc
}

# ucx_ref VER WHERE TLS TEST SIZE ITERS FLAGS OUT: ucx_perftest of UCX VER,
# server and client (pair_run).
ucx_ref() {
  local ver=$1 where=$2 tls=$3 test=$4 size=$5 n=$6 flags=$7 f=$8
  local bin lib sns cns sdev cdev host rc
  bin=$(perftest_bin $ver); lib=$(ucx_env $ver)
  pair_ends $where
  pair_run "$f" "$sns env $lib UCX_TLS=$tls UCX_NET_DEVICES=$sdev timeout 120 $bin -t $test -s $size -O $ops -n $n -p $port $flags" \
    "$cns env $lib UCX_TLS=$tls UCX_NET_DEVICES=$cdev timeout 120 $bin $host -t $test -s $size -O $ops -n $n -p $port $flags"
  rc=$?
  if [ -z "$(perftest_gbps "$f.log")" ]; then
    echo "ucx_perftest $ver $test ($where, $tls, $size bytes) gave no result (rc $rc):"
    grep -h -m1 "incompatible" "$f.log" "$f.srv"
    tail -n 2 "$f.log" | sed 's/^/  client: /'; tail -n 2 "$f.srv" | sed 's/^/  server: /'
  fi
}

# kvx_ucx VER WHERE TLS OUT: kvx_bench built against UCX VER (the args of
# this size), pack on lo or spread across the namespaces; OUT.json, OUT.log.
declare -A seen_transport
kvx_ucx() {
  local ver=$1 where=$2 tls=$3 f=$4 bin lib
  bin=$(kvx_bin $ver); lib="$(ucx_env $ver) ${KVX_ENV:-}"
  if [ "$where" = pack ]; then
    env $lib UCX_TLS=$tls UCX_NET_DEVICES=lo timeout 300 $bin --strategy pack $args --json "$f.json" > "$f.log" 2>&1
  else
    newport
    ip netns exec $A env $lib UCX_TLS=$tls UCX_NET_DEVICES=$VA KVX_HOST_ID=bench-a timeout 300 $bin --role prefill --listen $IPA:$port $args > "$f.srv" 2>&1 &
    ip netns exec $Bn env $lib UCX_TLS=$tls UCX_NET_DEVICES=$VB KVX_HOST_ID=bench-b timeout 300 $bin --role decode --connect $IPA:$port $args \
      --json "$f.json" > "$f.log" 2>&1
    wait
  fi
  grep -q "TEST PASSED" "$f.log" || { echo "kvx_bench (UCX $ver, $where, UCX_TLS=$tls, $size bytes) did not pass:"; tail -5 "$f.log"; }
  local t; t=$(json_transport "$f.json")
  [ -n "$t" ] && seen_transport["$where ucx$ver$([ $tls = sm ] && echo -sm)${KVX_ENV:+ ($KVX_ENV)}"]=$t
}

# am_ref_run VER WHERE OUT: am_ref of UCX VER with kvx_bench's size, region,
# bytes per iteration and reads in flight; the sender where kvx's owner is
# (lo, or namespace A), the receiver where its reader is (pair_run); OUT.json too.
am_ref_run() {
  local ver=$1 where=$2 f=$3 bin lib sns cns sdev cdev host a
  bin=$(am_ref_bin $ver); lib=$(ucx_env $ver)
  a="--size $size --region $((nb * layers * 2 * size)) --pass $((blocks * layers * 2 * size)) --outstanding $ops --iters 5 --warmup 1"
  pair_ends $where
  pair_run "$f" "$sns env $lib UCX_TLS=tcp UCX_NET_DEVICES=$sdev timeout 120 $bin --listen $host:$port $a" \
    "$cns env $lib UCX_TLS=tcp UCX_NET_DEVICES=$cdev timeout 120 $bin --connect $host:$port $a --json $f.json"
  grep -q "TEST PASSED" "$f.log" || { echo "am_ref (UCX $ver, $where, $size bytes) did not pass:"; tail -2 "$f.log"; }
}

fmt() { awk -v v="$1" 'BEGIN { if (v ~ /^[0-9.]+$/) printf "%.3f", v; else print "-" }'; }
line() { printf "%-7s %-10s %9s %10s %10s %7s   %s\n" "$@"; }
row() {  # mode backend size kvx ref refname
  local ratio
  ratio=$(awk -v a="$4" -v b="$5" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }')
  line "$1" "$2" "$3" "$(fmt "$4")" "$(fmt "$5")" "$ratio" "$6"
  echo -e "$1\t$2\t$3\t${4:--}\t${5:--}\t$ratio\t$6\t$run" >> "$tsv"
}

echo "kvx bench: random blocks, $layers layers x K/V, ~$((target >> 20)) MiB per request, $ops reads in flight"
echo "UCX: ucx1.13 = Debian's UCX ${v113:-?}$([ -n "${v122:-}" ] && echo ", ucx1.22 = UCX $v122 (libucx-cu12 wheel)"); each beside the ucx_perftest of the same UCX"
line mode backend block kvx_GB/s ref_GB/s ratio reference
for mode in $modes; do
  if [ "$mode" = spread ]; then
    if [ "$(id -u)" != 0 ]; then echo "(spread skipped: needs root for network namespaces)"; continue; fi
    ns_setup || { echo "(spread skipped: cannot make namespaces)"; ns_cleanup; continue; }
    echo "(spread: the veth pair's GRO is $(netns_pair_gro $A $VA): tests/lib/netns_pair.sh says why it matters)"
  fi
  for size in $sizes; do
    tokens=$((size / 256))
    blocks=$((target / (size * layers * 2))); [ $blocks -lt 8 ] && blocks=8
    nb=$((blocks * 2))
    args="--num-blocks $nb --blocks $blocks --num-layers $layers --block-tokens $tokens --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 6 --warmup 1 --max-ops $ops"
    iters=$((blocks * layers * 2 * 5)); [ $iters -gt 200000 ] && iters=200000
    for run in $(seq 1 "$runs"); do
    [ "$runs" -gt 1 ] && echo "($mode, $size bytes: run $run of $runs)"
    # UCX over TCP, each version beside its own ucp_get and ucp_am_bw (-e)
    for ver in $ucx_vers; do
      k="$out/kvx_${mode}_ucx${ver}_$size"
      kvx_ucx $ver $mode tcp "$k"
      for t in ucp_get ucp_am_bw; do
        r="$out/perf_${mode}_ucx${ver}_${t}_$size"
        ucx_ref $ver $mode tcp $t $size $iters -e "$r"
        row "$mode" "ucx$ver" "$size" "$(json_gbps "$k.json")" "$(perftest_gbps "$r.log")" "ucx_perftest $ver $t -e -O $ops"
      done
      # ucp_am_bw's receiver leaves the bytes where UCX received them; with
      # -y (1.22's perftest has it) it copies them to its buffer, as kvx
      # must copy each reply where its blocks go.
      if [ $ver = 1.22 ]; then
        r="$out/perf_${mode}_ucx${ver}_ucp_am_bw_y_$size"
        ucx_ref $ver $mode tcp ucp_am_bw $size $iters "-e -y" "$r"
        row "$mode" "ucx$ver" "$size" "$(json_gbps "$k.json")" "$(perftest_gbps "$r.log")" "ucx_perftest $ver ucp_am_bw -e -y -O $ops (the receiver copies)"
      fi
      # the same active messages over memory like kvx's (bench/am_ref.c)
      if [ -x "$(am_ref_bin $ver)" ]; then
        r="$out/am_ref_${mode}_ucx${ver}_$size"
        am_ref_run $ver $mode "$r"
        row "$mode" "ucx$ver" "$size" "$(json_gbps "$k.json")" "$(ref_gbps "$r.json")" "am_ref $ver -O $ops: ucp_am from random blocks of kvx's cache size, each copied to a random block"
      fi
      # Between hosts kvx over 1.22 reads each peer over 4 connections (the
      # default, kvx_ucx_desc.connections); the same with one, beside the
      # same references.
      if [ $ver = 1.22 ] && [ "$mode" = spread ]; then
        k1="$out/kvx_${mode}_ucx${ver}x1_$size"
        KVX_ENV=KVX_UCX_CONNECTIONS=1 kvx_ucx $ver $mode tcp "$k1"
        for t in ucp_get ucp_am_bw ucp_am_bw_y; do
          r="$out/perf_${mode}_ucx${ver}_${t}_$size"
          row "$mode" "ucx$ver-x1" "$size" "$(json_gbps "$k1.json")" "$(perftest_gbps "$r.log")" \
            "ucx_perftest $ver $(echo $t | sed 's/_y$//') -e$([ $t = ucp_am_bw_y ] && echo ' -y') -O $ops$([ $t = ucp_am_bw_y ] && echo ' (the receiver copies)')"
        done
        r="$out/am_ref_${mode}_ucx${ver}_$size"
        [ -f "$r.log" ] && row "$mode" "ucx$ver-x1" "$size" "$(json_gbps "$k1.json")" "$(ref_gbps "$r.json")" \
          "am_ref $ver -O $ops: ucp_am from random blocks of kvx's cache size, each copied to a random block"
      fi
    done
    # UCX 1.22 over shared memory (pack): kvx over cma without failure
    # handling, beside ucp_get without -e (no sm transport has it).
    if [ "$mode" = pack ] && [[ " $ucx_vers " == *" 1.22 "* ]]; then
      k="$out/kvx_pack_ucx1.22-sm_$size"; r="$out/perf_pack_ucx1.22-sm_ucp_get_$size"
      kvx_ucx 1.22 pack sm "$k"
      ucx_ref 1.22 pack sm ucp_get $size $iters "" "$r"
      row "$mode" "ucx1.22-sm" "$size" "$(json_gbps "$k.json")" "$(perftest_gbps "$r.log")" "ucx_perftest 1.22 ucp_get -O $ops, UCX_TLS=sm (no -e)"
      # and beside the kernel's own copy of the same random blocks, one
      # process_vm_readv per block as UCX's cma does (bench/cma_ref.c)
      timeout 120 $B/cma_ref --size $size --region $((nb * layers * 2 * size)) --total $((blocks * layers * 2 * size)) \
        --json "$out/cma_ref_$size.json" > "$out/cma_ref_$size.log" 2>&1 || { echo "cma_ref ($size bytes) did not pass:"; tail -2 "$out/cma_ref_$size.log"; }
      row "$mode" "ucx1.22-sm" "$size" "$(json_gbps "$k.json")" "$(ref_gbps "$out/cma_ref_$size.json")" "cma_ref: process_vm_readv of the same random blocks, one a call"
    fi
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
      newport
      ip netns exec $A env FI_PROVIDER=tcp FI_TCP_IFACE=$VA KVX_HOST_ID=bench-a timeout 300 $B/kvx_bench --role prefill --listen $IPA:$port --backends LIBFABRIC $args > "$out/ofi_spread_$size.srv" 2>&1 &
      ip netns exec $Bn env FI_PROVIDER=tcp FI_TCP_IFACE=$VB KVX_HOST_ID=bench-b timeout 300 $B/kvx_bench --role decode --connect $IPA:$port --backends LIBFABRIC $args \
        --json "$out/ofi_spread_$size.json" > "$out/ofi_spread_$size.log" 2>&1
      wait
      newport
      ip netns exec $A env FI_TCP_IFACE=$VA timeout 120 $B/fi_read_ref --provider tcp --size $size --outstanding $ops --total $total --listen $IPA:$port > "$out/ref_spread_$size.srv" 2>&1 &
      sleep 0.5
      ip netns exec $Bn env FI_TCP_IFACE=$VB timeout 120 $B/fi_read_ref --provider tcp --size $size --outstanding $ops --total $total --connect $IPA:$port \
        --json "$out/ref_spread_$size.json" > "$out/ref_spread_$size.log" 2>&1
      wait
      grep -q "TEST PASSED" "$out/ofi_spread_$size.log" || { echo "kvx_bench LIBFABRIC spread $size did not pass:"; tail -3 "$out/ofi_spread_$size.log"; }
      row "$mode" "ofi-tcp" "$size" "$(json_gbps "$out/ofi_spread_$size.json")" "$(ref_gbps "$out/ref_spread_$size.json")" "fi_read_ref tcp -O $ops"
    fi
    done  # runs
  done
  [ "$mode" = spread ] && ns_cleanup
done

run=1  # what follows runs once
# The make-demo transfer (128 random 32 KiB blocks x 32 layers x K/V, Debian's
# UCX) beside ucx_perftest at 32 KiB with the same reads outstanding.
if [[ " $modes " == *" pack "* ]] && [ -x $B/kvx_demo ]; then
  env -u LD_LIBRARY_PATH UCX_NET_DEVICES=lo timeout 300 $B/kvx_demo > "$out/demo.log" 2>&1
  grep -q "TEST PASSED" "$out/demo.log" || { echo "kvx_demo did not pass:"; tail -3 "$out/demo.log"; }
  for t in ucp_get ucp_am_bw; do
    ucx_ref 1.13 pack tcp $t 32768 20000 -e "$out/perf_demo_$t"
    row demo ucx1.13 32768 "$(sed -n 's/.*, \([0-9.]*\) GB\/s/\1/p' "$out/demo.log")" "$(perftest_gbps "$out/perf_demo_$t.log")" "ucx_perftest 1.13 $t -e -O $ops (make demo's transfer)"
  done
fi

# What verify mode costs: the same 64 KiB transfer unverified, checking one
# block in 64, and checking every block (pack, same run).
if [[ " $modes " == *" pack "* ]]; then
  vargs="--num-blocks 1024 --blocks 128 --num-layers 8 --block-tokens 256 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 5"
  for v in 0 64 1; do
    env -u LD_LIBRARY_PATH UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 300 $B/kvx_bench --strategy pack $vargs --verify $v --json "$out/verify_$v.json" > "$out/verify_$v.log" 2>&1
    grep -q "TEST PASSED" "$out/verify_$v.log" || { echo "kvx_bench --verify $v did not pass:"; tail -3 "$out/verify_$v.log"; }
  done
  base=$(json_gbps "$out/verify_0.json")
  for v in 64 1; do
    row "verify" ucx1.13 65536 "$(json_gbps "$out/verify_$v.json")" "$base" "kvx unverified, same run (--verify $v: $([ $v = 1 ] && echo 'every block' || echo "1 block in $v"))"
  done
fi

# What block generations cost: reads of 64 random blocks that carry them
# (the generation words fetched after the data, one op per run) against the
# same reads without them, same run, over UCX 1.13 and libfabric tcp.
if [[ " $modes " == *" pack "* ]]; then
  gargs="--num-blocks 1024 --blocks 64 --num-layers 8 --block-tokens 256 --heads 1 --head-dim 128 --dtype-bytes 2 --random-blocks --iters 5"
  for be in UCX LIBFABRIC; do
    for g in "" --generations; do
      n=gen_${be}${g:+_on}
      env -u LD_LIBRARY_PATH UCX_TLS=tcp UCX_NET_DEVICES=lo FI_PROVIDER=tcp FI_TCP_IFACE=lo timeout 300 $B/kvx_bench --strategy pack --backends $be $gargs $g --json "$out/$n.json" > "$out/$n.log" 2>&1
      grep -q "TEST PASSED" "$out/$n.log" || { echo "kvx_bench --backends $be $g did not pass:"; tail -3 "$out/$n.log"; }
    done
    row "generations" "$([ $be = UCX ] && echo ucx1.13 || echo ofi-tcp)" 65536 "$(json_gbps "$out/gen_${be}_on.json")" "$(json_gbps "$out/gen_${be}.json")" \
      "kvx without generations, same run (64 random blocks per read, 8 layers)"
  done
fi

if [ -x $B/bench_post ]; then
  echo
  env -u LD_LIBRARY_PATH UCX_NET_DEVICES=lo timeout 300 $B/bench_post | tee "$out/post_cost.txt"
fi

if [ ${#seen_transport[@]} -gt 0 ]; then
  echo
  echo "kvx's UCX transports:"
  for k in "${!seen_transport[@]}"; do echo "  $k: ${seen_transport[$k]}"; done | sort
fi

# Per cell and reference: the median of kvx, of the reference and of their
# ratio over the runs, each with its lowest and highest. The first seven
# columns are results.tsv's, medians in place of one run's values.
sum=$out/summary.tsv
awk -F'\t' -v OFS='\t' '
  function sorted(s, a,   n, i, j, t) { n = split(s, a, " ")  # (mawk has no asort)
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n }
  function med(s,   a, n) { n = sorted(s, a); return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  function lo(s,   a) { sorted(s, a); return a[1] }
  function hi(s,   a, n) { n = sorted(s, a); return a[n] }
  function f(x) { return x == "" ? "-" : sprintf("%.3f", x) }
  NR == 1 { print $1, $2, $3, $4, $5, $6, $7, "runs", "kvx_lo", "kvx_hi", "ref_lo", "ref_hi", "ratio_lo", "ratio_hi"; next }
  { k = $1 OFS $2 OFS $3 OFS $7; if (!(k in n)) order[++m] = k; n[k]++
    if ($4 ~ /^[0-9.]+$/) K[k] = K[k] " " $4; if ($5 ~ /^[0-9.]+$/) R[k] = R[k] " " $5; if ($6 ~ /^[0-9.]+$/) Q[k] = Q[k] " " $6 }
  END { for (i = 1; i <= m; i++) { k = order[i]; split(k, c, OFS)
    kk = K[k] == "" ? "" : med(K[k]); rr = R[k] == "" ? "" : med(R[k]); qq = Q[k] == "" ? "" : med(Q[k])
    print c[1], c[2], c[3], f(kk), f(rr), qq == "" ? "-" : sprintf("%.2f", qq), c[4], n[k],
          K[k] == "" ? "-" : f(lo(K[k])), K[k] == "" ? "-" : f(hi(K[k])), R[k] == "" ? "-" : f(lo(R[k])), R[k] == "" ? "-" : f(hi(R[k])),
          Q[k] == "" ? "-" : sprintf("%.2f", lo(Q[k])), Q[k] == "" ? "-" : sprintf("%.2f", hi(Q[k])) } }' "$tsv" > "$sum"
if [ "$runs" -gt 1 ]; then
  echo
  echo "Over $runs runs: medians (lowest-highest)"
  printf "%-7s %-10s %9s %-22s %-22s %-18s %s\n" mode backend block kvx_GB/s ref_GB/s ratio reference
  awk -F'\t' 'NR > 1 { printf "%-7s %-10s %9s %-22s %-22s %-18s %s\n", $1, $2, $3, $4 " (" $9 "-" $10 ")", $5 " (" $11 "-" $12 ")", $6 " (" $13 "-" $14 ")", $7 }' "$sum"
fi

bash bench/bench_plot.sh "$sum" "$out/bench.png" "$ops" "$runs"
echo "table: $tsv; over the runs: $sum"
