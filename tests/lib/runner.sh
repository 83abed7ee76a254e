# The test runner of make test (tests/run.sh) and make test-gpu
# (tests/gpu/run.sh); source it, then:
#
#   runner_init LOGDIR JOBS     logs go to LOGDIR; up to JOBS entries run at once
#   section TITLE               prints "== TITLE" in its place
#   entry NAME TIMEOUT_S COMMAND...
#       a command that prints "N passed, M failed" counts those cases; any
#       other counts as one case, passing on exit 0 (77: skipped)
#   expect_fail NAME TIMEOUT_S PATTERN COMMAND...
#       passes when the command exits non-zero, not by its timeout, and
#       prints PATTERN (checks that a check can fail, or that a known
#       failure of a library is still there)
#   expect_out NAME TIMEOUT_S PATTERN COMMAND...
#       passes when the command exits 0 and prints PATTERN
#   runner_end                  waits for all, prints "N passed, M failed"
#                               last; returns non-zero if any failed
#
# Entries start in the order given, each in the background under its own
# timeout; results print in that same order, whatever order they end in.
# KVX_TEST_FILTER=regex runs only the entries whose name matches; a filter
# that matches none fails the run (a misspelt filter must not pass).
#
# An entry whose command timed out or died by a signal (exit 128+N) fails,
# whatever counts it printed before: a crash after "N passed, 0 failed"
# (at exit, say) is still a failure.

runner_init() {
  _r_logdir=$1 _r_jobs=${2:-1}
  # libfabric loads libinfinipath (psm), which catches SIGABRT, SIGSEGV and
  # the like, writes a .btr file and exits with status 1: a test's crash
  # would read as an ordinary failure, and a child's as nothing at all.
  export IPATH_NO_BACKTRACE=1
  mkdir -p "$_r_logdir"
  _r_tmp=$(mktemp -d)
  _r_n=0 _r_next=0
  _r_running=()
  _r_pass=0 _r_fail=0 _r_skip=0
  _r_failed=()
  _r_kind=() _r_name=() _r_log=() _r_pat=() _r_cmd=() _r_limit=()
  _r_matched=0
  trap '_r_interrupt' INT TERM
}

_r_interrupt() {
  local i
  for i in "${_r_running[@]}"; do [ -f "$_r_tmp/$i.pid" ] && kill -TERM "$(cat "$_r_tmp/$i.pid")" 2>/dev/null; done
  rm -rf "$_r_tmp"
  exit 130
}

section() { _r_add say "== $*"; }
# The entries after this start once every entry before it has ended (for
# those that need the machine's cores to themselves).
barrier() { _r_wait_below 1; }
entry() { _r_add entry "$@"; }
expect_fail() { _r_add expect "$@"; }
expect_out() { _r_add expect_out "$@"; }

_r_add() {  # kind, then the entry's arguments
  local kind=$1 i=$_r_n name="" limit pat=""
  shift
  _r_kind[i]=$kind
  if [ "$kind" = say ]; then _r_name[i]=$1; _r_n=$((i + 1)); _r_flush; return; fi
  name=$1 limit=$2; shift 2
  if [ "$kind" = expect ] || [ "$kind" = expect_out ]; then pat=$1; shift; fi
  if [ -n "${KVX_TEST_FILTER:-}" ] && ! [[ "$name" =~ $KVX_TEST_FILTER ]]; then return; fi
  _r_matched=$((_r_matched + 1))
  _r_name[i]=$name _r_pat[i]=$pat _r_cmd[i]="$*" _r_limit[i]=$limit
  _r_log[i]="$_r_logdir/$(echo "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
  _r_n=$((i + 1))
  _r_wait_below "$_r_jobs"
  (
    t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"${_r_log[i]}" 2>&1 </dev/null &
    echo $! > "$_r_tmp/$i.pid"
    wait $!
    echo "$? $((SECONDS - t0))" > "$_r_tmp/$i.rc.tmp" && mv "$_r_tmp/$i.rc.tmp" "$_r_tmp/$i.rc"
  ) &
  _r_running+=("$i")
  _r_flush
}

# Until fewer than $1 entries run.
_r_wait_below() {
  local i still
  while :; do
    still=()
    for i in "${_r_running[@]}"; do [ -f "$_r_tmp/$i.rc" ] || still+=("$i"); done
    _r_running=("${still[@]}")
    [ ${#_r_running[@]} -lt "$1" ] && break
    sleep 0.1
  done
  _r_flush
}

# Print every result that is due, in order.
_r_flush() {
  while [ "$_r_next" -lt "$_r_n" ]; do
    local i=$_r_next
    if [ "${_r_kind[i]}" = say ]; then echo "${_r_name[i]}"
    else
      [ -f "$_r_tmp/$i.rc" ] || return 0
      local rc dt
      read -r rc dt < "$_r_tmp/$i.rc"
      # anything but a plain exit status (none, negative, garbled) reads as
      # -1: a failure in every report below, never a pass
      [[ "$rc" =~ ^[0-9]+$ ]] || rc=-1
      [[ "$dt" =~ ^[0-9]+$ ]] || dt=0
      case ${_r_kind[i]} in
        entry) _r_report "${_r_name[i]}" "${_r_log[i]}" "$rc" "$dt" "${_r_cmd[i]}" "${_r_limit[i]}" ;;
        expect) _r_report_fail "${_r_name[i]}" "${_r_log[i]}" "$rc" "${_r_pat[i]}" "$dt" "${_r_limit[i]}" ;;
        *) _r_report_out "${_r_name[i]}" "${_r_log[i]}" "$rc" "${_r_pat[i]}" ;;
      esac
    fi
    _r_next=$((i + 1))
  done
}

# How an entry ended, where its exit status says more than its output:
# "timed out" (timeout(1) exits 124 when it stopped the command, 128+9 when
# it had to kill it after -k's grace), "killed by signal N (SIGNAME)" for
# 128+N, "no exit status" for -1; nothing for an exit of its own.
_r_ended_by() {  # rc, seconds, limit
  local rc=$1 dt=$2 limit=${3:-0} sig
  if [ "$rc" -lt 0 ]; then echo "no exit status"
  elif [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$dt" -ge "$limit" ]; }; then echo "timed out"
  elif [ "$rc" -gt 128 ]; then
    sig=$(kill -l $((rc - 128)) 2>/dev/null)
    echo "killed by signal $((rc - 128))${sig:+ (SIG$sig)}"
  fi
}

_r_report() {  # name, log, rc, seconds, command, limit
  local name=$1 log=$2 rc=$3 dt=$4 cmd=$5 limit=$6 summary p f k why
  why=$(_r_ended_by "$rc" "$dt" "$limit")
  if [ "$rc" -eq 77 ]; then
    echo "skip $name: $(tail -1 "$log")"; _r_skip=$((_r_skip + 1)); return
  fi
  summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
  if [ -n "$summary" ] && [[ "$cmd" != *kvx_bench* ]] && [[ "$cmd" != *two_hosts* ]]; then
    p=$(echo "$summary" | awk '{print $1}'); f=$(echo "$summary" | awk '{print $3}')
    _r_pass=$((_r_pass + p)); _r_fail=$((_r_fail + f))
    k=$(echo "$summary" | sed -n 's/.*, \([0-9]*\) skipped.*/\1/p'); _r_skip=$((_r_skip + ${k:-0}))
    grep -E '^skip ' "$log" | sed 's/^/    /'
    # the exit status decides as much as the counts: a program that printed
    # "N passed, 0 failed" and then died by a signal or timed out fails
    if [ "$rc" -ne 0 ] || [ "$f" != 0 ]; then
      [ "$f" = 0 ] && _r_fail=$((_r_fail + 1))
      _r_failed+=("$name"); echo "FAIL $name (exit $rc${why:+, $why}, ${dt}s): $summary"
      grep -E '^FAIL' "$log" | sed 's/^/    /'; tail -5 "$log" | sed 's/^/    | /'
    else echo "ok   $name: $summary (${dt}s)"; fi
    return
  fi
  if [ "$rc" -eq 0 ]; then
    _r_pass=$((_r_pass + 1)); echo "ok   $name (${dt}s)$(grep -E '^  total:' "$log" | sed 's/^  total:/:/' | head -1)"
  else
    _r_fail=$((_r_fail + 1)); _r_failed+=("$name")
    echo "FAIL $name (exit $rc${why:+, $why}, ${dt}s)"; tail -15 "$log" | sed 's/^/    | /'
  fi
}

_r_report_fail() {  # name, log, rc, pattern, seconds, limit
  local name=$1 log=$2 rc=$3 pat=$4 why
  why=$(_r_ended_by "$rc" "${5:-0}" "${6:-0}")
  # a timeout (killed or not) or no exit status is no failure of the kind wanted
  if [ "$rc" -gt 0 ] && [ "$why" != "timed out" ] && grep -q -- "$pat" "$log"; then
    _r_pass=$((_r_pass + 1)); echo "ok   $name: $(grep -m1 -- "$pat" "$log" | cut -c1-160)"
  else
    _r_fail=$((_r_fail + 1)); _r_failed+=("$name")
    echo "FAIL $name (exit $rc${why:+, $why}, wanted a failure naming '$pat')"; tail -8 "$log" | sed 's/^/    | /'
  fi
}

_r_report_out() {  # name, log, rc, pattern
  local name=$1 log=$2 rc=$3 pat=$4
  if [ "$rc" -eq 0 ] && grep -q -- "$pat" "$log"; then
    _r_pass=$((_r_pass + 1)); echo "ok   $name: $(grep -m1 -- "$pat" "$log" | sed 's/^ *//' | cut -c1-160)"
  else
    _r_fail=$((_r_fail + 1)); _r_failed+=("$name")
    echo "FAIL $name (exit $rc, wanted success naming '$pat')"; tail -8 "$log" | sed 's/^/    | /'
  fi
}

runner_end() {
  _r_wait_below 1
  rm -rf "$_r_tmp"
  trap - INT TERM
  if [ -n "${KVX_TEST_FILTER:-}" ] && [ "$_r_matched" -eq 0 ]; then
    echo "FAIL no entry matched KVX_TEST_FILTER=$KVX_TEST_FILTER"; _r_fail=$((_r_fail + 1))
  fi
  echo
  [ ${#_r_failed[@]} -gt 0 ] && echo "failed: ${_r_failed[*]}"
  [ $_r_skip -gt 0 ] && echo "($_r_skip skipped)"
  echo "$_r_pass passed, $_r_fail failed"
  [ $_r_fail -eq 0 ]
}
