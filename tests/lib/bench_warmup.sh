#!/usr/bin/env bash
# bench_warmup.sh BENCH ARGS...: runs kvx_bench with --iters 3 --warmup 1 and
# checks what make bench relies on: the warm-up iteration is checked (the
# bytes checked are every iteration's), marked in the JSON, and left out of
# the total (the total's bytes and GB/s are those of the other two).
set -u
bench=$1; shift
json=$(mktemp); log=$(mktemp)
trap 'rm -f "$json" "$log"' EXIT
"$bench" "$@" --iters 3 --warmup 1 --json "$json" > "$log" 2>&1
rc=$?
cat "$log"
[ $rc = 0 ] || { echo "FAIL: kvx_bench exited $rc"; exit 1; }
grep -q "^  iter 0: .* (warm-up, not counted)$" "$log" || { echo "FAIL: iteration 0 is not marked as the warm-up"; exit 1; }
grep -q "(warm-up" <(grep "^  iter [12]:" "$log") && { echo "FAIL: a counted iteration is marked as warm-up"; exit 1; }
python3 - "$json" "$log" <<'PY' || exit 1
import json, re, sys
d = json.load(open(sys.argv[1]))
its = d["iterations"]
log = open(sys.argv[2]).read()
checked = int(re.search(r"TEST PASSED: every byte of (\d+) checked", log).group(1))
counted = [i for i in its if not i["warmup"]]
bad = []
if d["warmup"] != 1 or len(its) != 3 or [i["warmup"] for i in its] != [True, False, False]:
    bad.append("warm-up marks %r" % [i["warmup"] for i in its])
if checked != sum(i["bytes"] for i in its):
    bad.append("checked %d bytes, the iterations moved %d" % (checked, sum(i["bytes"] for i in its)))
if d["total_bytes"] != sum(i["bytes"] for i in counted):
    bad.append("total %d bytes, the counted iterations %d" % (d["total_bytes"], sum(i["bytes"] for i in counted)))
want = sum(i["bytes"] for i in counted) / sum(i["seconds"] for i in counted) / 1e9
if abs(d["gbps"] - want) > 1e-3 * want:
    bad.append("total %.6f GB/s, the counted iterations' %.6f" % (d["gbps"], want))
for b in bad:
    print("FAIL:", b)
sys.exit(1 if bad else 0)
PY
echo "PASS: the warm-up iteration checked ($(sed -n 's/TEST PASSED: every byte of \([0-9]*\) checked/\1/p' "$log") bytes in all), not counted"
