#!/usr/bin/env bash
# Two builds of kvx_bench on the same work, run alternately (A, B, A, B, ...),
# so that what this machine does meanwhile falls on both alike: each pair's
# GB/s and CPU seconds (user + system, every process of the run), the ratios
# B/A of each pair, and their medians and ranges. What a change costs is B/A
# with A the build before it (CPU time varies less than speed on a shared
# machine):
#
#   git worktree add /tmp/kvx-base <commit> && make -C /tmp/kvx-base build/kvx_bench
#   bench/ab.sh /tmp/kvx-base/build/kvx_bench build/kvx_bench 8 -- --random-blocks --num-blocks 1024 --blocks 64 ...
#
# A and B each run as given (env before them applies to both); PAIRS pairs.
set -u
[ $# -ge 4 ] && [ "$4" = "--" ] || { echo "usage: bench/ab.sh A_BENCH B_BENCH PAIRS -- KVX_BENCH_ARGS..."; exit 2; }
a=$1 b=$2 pairs=$3
shift 4
gbps() { sed -n 's/^  total: .*, \([0-9.]*\) GB\/s.*/\1/p' "$1" | tail -1; }
ratios=() cpus=()
for i in $(seq 1 "$pairs"); do
  for side in a b; do
    bin=$a; [ $side = b ] && bin=$b
    log=$(mktemp) tm=$(mktemp)
    /usr/bin/time -f "%U %S" -o "$tm" timeout 300 "$bin" "$@" >"$log" 2>&1 || { echo "pair $i: $side failed:"; tail -3 "$log"; rm -f "$log" "$tm"; exit 1; }
    eval "g_$side=$(gbps "$log")"
    eval "c_$side=$(awk '{ printf "%.3f", $1 + $2 }' "$tm")"
    rm -f "$log" "$tm"
  done
  r=$(awk -v x="$g_a" -v y="$g_b" 'BEGIN { printf "%.3f", y / x }')
  rc=$(awk -v x="$c_a" -v y="$c_b" 'BEGIN { printf "%.3f", y / x }')
  ratios+=("$r"); cpus+=("$rc")
  echo "pair $i: A $g_a GB/s $c_a s CPU, B $g_b GB/s $c_b s CPU; B/A speed $r, CPU $rc"
done
summary() {  # what, ratios...
  local what=$1; shift
  printf '%s\n' "$@" | sort -n | awk -v w="$what" '{ v[NR] = $1 } END {
    m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "B/A %s over %d pairs: median %.3f, range %.3f to %.3f\n", w, NR, m, v[1], v[NR] }'
}
summary speed "${ratios[@]}"
summary CPU "${cpus[@]}"
