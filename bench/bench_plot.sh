#!/usr/bin/env bash
# Plots make bench's table (results.tsv) into a PNG with gnuplot: GB/s against
# block size, kvx beside its reference, one line per transport and mode.
#   bench/bench_plot.sh build/bench/results.tsv build/bench/bench.png 64
set -u
tsv=$1 png=$2 ops=${3:-64}
command -v gnuplot >/dev/null || { echo "(no plot: gnuplot is not installed)"; exit 0; }
dir=$(dirname "$png")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plots=()
for key in "pack ucx" "spread ucx" "pack ofi-tcp" "pack ofi-shm" "spread ofi-tcp"; do
  set -- $key
  f="$tmp/$1_$2.tsv"
  awk -F'\t' -v m="$1" -v b="$2" '$1 == m && $2 == b { print $3 "\t" $4 "\t" $5 }' "$tsv" > "$f"
  [ -s "$f" ] || continue
  ref=$([ "$2" = ucx ] && echo "ucx_perftest" || echo "raw fi_read")
  plots+=("\"$f\" using 1:2 with linespoints lw 2 title \"kvx $2 $1\"")
  plots+=("\"$f\" using 1:3 with linespoints dt 2 lw 2 title \"$ref $2 $1\"")
done
[ ${#plots[@]} -gt 0 ] || exit 0
list=$(printf '%s, ' "${plots[@]}")
gnuplot 2>/dev/null <<PLOT && echo "plot: $png"
set terminal pngcairo size 1000,620 noenhanced
set output "$png"
set title "kvx reads vs the transport's own reference (random blocks, $ops in flight, same run)"
set xlabel "block size (bytes per layer and K/V)"
set ylabel "GB/s"
set logscale x 2
set xtics ("4K" 4096, "16K" 16384, "64K" 65536, "256K" 262144, "1M" 1048576)
set yrange [0:*]
set key outside right
set grid
plot ${list%, }
PLOT
