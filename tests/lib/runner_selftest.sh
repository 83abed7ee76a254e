#!/usr/bin/env bash
# runner_selftest.sh -- what tests/lib/runner.sh makes of how an entry ends,
# checked on runners of its own: a program that prints "1 passed, 0 failed"
# and then dies by a signal, or overruns its time (stopped, or killed after
# ignoring the stop), fails its entry whatever it printed; so does a signal
# with no counts, an expect_fail whose command only timed out, and a filter
# that matches no entry. A clean exit passes. One line per check, then
# "N passed, M failed".
set -u
cd "$(dirname "$0")/../.."
# the signals below must not leave core files in the tree
ulimit -c 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0

check() {  # name, then a command that succeeds where the check holds
  local name=$1; shift
  if "$@"; then echo "ok $name"; pass=$((pass + 1))
  else echo "FAIL $name"; fail=$((fail + 1)); fi
}

# A runner of its own: inner FILTER OUT SCRIPT runs SCRIPT (runner.sh calls)
# under KVX_TEST_FILTER=FILTER (none where empty), its output to OUT; returns
# runner_end's status.
inner() {
  local filter=$1 out=$2 script=$3
  env -u KVX_TEST_FILTER ${filter:+KVX_TEST_FILTER="$filter"} bash -c \
    '. tests/lib/runner.sh; runner_init "$1" 8; eval "$2"; runner_end' inner "$tmp/logs" "$script" >"$out" 2>&1
}

has() { grep -q -- "$2" "$1"; }
last_is() { [ "$(tail -1 "$1")" = "$2" ]; }

inner "" "$tmp/ends" '
entry "dies by SIGSEGV after 1 passed, 0 failed" 30 sh -c "echo \"1 passed, 0 failed\"; kill -SEGV \$\$"
entry "dies by SIGABRT, no counts" 30 sh -c "kill -ABRT \$\$"
entry "overruns its time after 1 passed, 0 failed" 1 sh -c "echo \"1 passed, 0 failed\"; exec sleep 30"
entry "ignores the stop at its time after 1 passed, 0 failed" 1 sh -c "trap \"\" TERM; echo \"1 passed, 0 failed\"; exec sleep 30"
expect_fail "times out having printed the failure wanted" 1 "wanted failure" sh -c "echo wanted failure; exec sleep 30"
entry "exits 0 after 1 passed, 0 failed" 30 sh -c "echo \"1 passed, 0 failed\""
'
rc=$?
check "a run with failed entries ends non-zero" [ "$rc" -ne 0 ]
check "an entry printing 1 passed, 0 failed, then dying by SIGSEGV, fails" \
  has "$tmp/ends" "^FAIL dies by SIGSEGV after 1 passed, 0 failed (exit 139, killed by signal 11 (SIGSEGV)"
check "an entry dying by SIGABRT with no counts fails, the signal named" \
  has "$tmp/ends" "^FAIL dies by SIGABRT, no counts (exit 134, killed by signal 6 (SIGABRT)"
check "an entry printing 1 passed, 0 failed, then overrunning its time, fails as timed out" \
  has "$tmp/ends" "^FAIL overruns its time after 1 passed, 0 failed (exit 124, timed out"
check "an entry that ignores the stop and is killed after the grace fails as timed out" \
  has "$tmp/ends" "^FAIL ignores the stop at its time after 1 passed, 0 failed (exit 137, timed out"
check "an expect_fail whose command only timed out fails" \
  has "$tmp/ends" "^FAIL times out having printed the failure wanted (exit 124, timed out"
check "an entry exiting 0 after 1 passed, 0 failed passes" \
  has "$tmp/ends" "^ok   exits 0 after 1 passed, 0 failed"
check "five failures counted" has "$tmp/ends" "^[0-9]* passed, 5 failed$"

inner "nothing-matches-this" "$tmp/none" 'entry "exits 0" 30 true'
rc=$?
check "a filter that matches no entry ends the run non-zero" [ "$rc" -ne 0 ]
check "... saying so" has "$tmp/none" "^FAIL no entry matched KVX_TEST_FILTER=nothing-matches-this"
check "... counted as a failure" last_is "$tmp/none" "0 passed, 1 failed"

inner "^exits" "$tmp/some" 'entry "exits 0" 30 true; entry "not selected" 30 false'
rc=$?
check "a filter that matches an entry that passes ends the run zero" [ "$rc" -eq 0 ]
check "... having run that entry alone" last_is "$tmp/some" "1 passed, 0 failed"

if [ "$fail" -ne 0 ]; then
  for f in ends none some; do echo "--- runner output ($f)"; sed 's/^/    | /' "$tmp/$f"; done
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
