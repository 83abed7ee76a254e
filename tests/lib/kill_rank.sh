#!/usr/bin/env bash
# kill_rank.sh ROLE RANK ITER CMD...: runs CMD (a kvx_bench launcher), and
# once it has printed iteration ITER, kills with SIGKILL its ROLE rank RANK
# (prefill or decode), a process found among CMD's descendants; then waits
# for CMD and exits with its status, its output on stdout. It says how long
# CMD ran on after the kill.
set -u
role=$1 rank=$2 iter=$3
shift 3
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$@" > "$log" 2>&1 &
top=$!
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
victim=""
for _ in $(seq 1200); do  # 120 s at most
  if grep -q "iter $iter:" "$log"; then
    for p in $(descendants $top); do
      if tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q -- "--role $role-rank --rank $rank "; then victim=$p; break; fi
    done
    break
  fi
  kill -0 $top 2>/dev/null || break
  sleep 0.1
done
if [ -z "$victim" ]; then
  cat "$log"
  echo "kill_rank: no $role rank $rank found after iteration $iter"
  kill $top 2>/dev/null
  wait $top
  exit 2
fi
kill -9 "$victim"
t0=$SECONDS
wait $top
rc=$?
cat "$log"
echo "kill_rank: killed $role rank $rank (pid $victim) after iteration $iter; the run ended $((SECONDS - t0)) s later, status $rc"
exit $rc
