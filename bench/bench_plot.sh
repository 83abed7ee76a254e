#!/usr/bin/env bash
# Plots make bench's table (summary.tsv: medians over its runs) into a PNG
# with gnuplot: GB/s against block size, one panel per mode (pack, spread);
# per backend (UCX version or libfabric provider) one colour: kvx solid, its
# references dashed (ucp_get, fi_read) and dotted (ucp_am_bw); ucx1.22-x1
# (spread, one connection to each peer) is a kvx line alone, its references
# being ucx1.22's. The GB/s axis is logarithmic when the values span 10x or
# more (sm at 1 MiB against tcp at 4 KiB does), linear from 0 otherwise.
#   bench/bench_plot.sh build/bench/summary.tsv build/bench/bench.png 64 [RUNS]
set -u
tsv=$1 png=$2 ops=${3:-64} runs=${4:-1}
command -v gnuplot >/dev/null || { echo "(no plot: gnuplot is not installed)"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
colour() {
  case $1 in
    ucx1.13) echo "#1f77b4" ;; ucx1.22) echo "#d62728" ;; ucx1.22-x1) echo "#8c564b" ;; ucx1.22-sm) echo "#9467bd" ;;
    ofi-tcp) echo "#2ca02c" ;; ofi-shm) echo "#ff7f0e" ;; *) echo "#7f7f7f" ;;
  esac
}
# size, kvx GB/s and reference GB/s of the rows of one mode, backend and reference
# (ucp_am_bw: the row without -y; the -y row, its receiver copying, is in the table)
pick() { awk -F'\t' -v m="$1" -v b="$2" -v r="$3" '$1 == m && $2 == b && index($7, r) && !index($7, " -y") && $5 != "-" { print $3 "\t" $4 "\t" $5 }' "$tsv"; }
panels=()
for mode in pack spread; do
  plots=()
  for be in ucx1.13 ucx1.22 ucx1.22-x1 ucx1.22-sm ofi-tcp ofi-shm; do
    c=$(colour $be)
    # ucx1.22-x1 (one connection) has ucx1.22's references: its kvx line alone
    case $be in ucx1.22-x1) refs="ucp_am_bw" ;; ucx*) refs="ucp_get ucp_am_bw" ;; *) refs="fi_read_ref" ;; esac
    kvx_done=0
    for r in $refs; do
      f="$tmp/${mode}_${be}_$r.tsv"
      pick $mode $be $r > "$f"
      [ -s "$f" ] || continue
      if [ $kvx_done = 0 ]; then
        plots+=("\"$f\" using 1:2 with linespoints lw 2 pt 7 lc rgb \"$c\" title \"kvx $be\"")
        kvx_done=1
      fi
      [ $be = ucx1.22-x1 ] && continue
      dt=2; [ $r = ucp_am_bw ] && dt=3
      name=$r; [ $r = fi_read_ref ] && name="raw fi_read"; [ ${be#ucx} != $be ] && name="perftest $r$([ $be = ucx1.22-sm ] || echo ' -e')"
      plots+=("\"$f\" using 1:3 with linespoints dt $dt lw 2 pt 6 lc rgb \"$c\" title \"$name $be\"")
    done
  done
  [ ${#plots[@]} -gt 0 ] || continue
  list=$(printf '%s, ' "${plots[@]}")
  panels+=("set title \"$mode\"
plot ${list%, }")
done
[ ${#panels[@]} -gt 0 ] || exit 0
# kvx's and the references' GB/s over the whole table: log scale at a span of 10x or more
yaxis=$(awk -F'\t' '{ for (i = 4; i <= 5; i++) if ($i ~ /^[0-9.]+$/ && $i + 0 > 0) { v = $i + 0; if (!n++ || v < lo) lo = v; if (v > hi) hi = v } }
  END { if (n && hi >= 10 * lo) print "log"; else print "lin" }' "$tsv")
if [ "$yaxis" = log ]; then
  yset='set logscale y 10
set format y "%g"
set mytics 10
set ylabel "GB/s (log scale)"'
else
  yset='set yrange [0:*]'
fi
timeout 60 gnuplot 2>/dev/null <<PLOT && echo "plot: $png"
set terminal pngcairo size 1100,$((430 * ${#panels[@]} + 40)) noenhanced
set output "$png"
set multiplot layout ${#panels[@]},1 title "kvx reads vs the transport's own references (random blocks, $ops in flight, $([ "$runs" -gt 1 ] && echo "medians of $runs interleaved runs" || echo "same run"))"
set xlabel "block size (bytes per layer and K/V)"
set ylabel "GB/s"
set logscale x 2
set offsets graph 0.04, graph 0.04, 0, 0
set xtics ("4K" 4096, "16K" 16384, "64K" 65536, "256K" 262144, "1M" 1048576)
$yset
set key outside right
set grid
$(printf '%s\n' "${panels[@]}")
unset multiplot
PLOT
