#!/usr/bin/env bash
# am_ref_pair.sh AM_REF [ARGS...]: make bench's ucp_am reference
# (bench/am_ref.c) on this host over TCP on lo, sender and receiver, each
# with ARGS; passes when the receiver took every message, whole and in
# order ("TEST PASSED") and the sender ended cleanly.
set -u
bin=$1; shift
port=$((26000 + $$ % 2000))
log=$(mktemp)
trap 'rm -f "$log"' EXIT
UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 60 "$bin" --listen 127.0.0.1:$port "$@" > "$log" 2>&1 &
sender=$!
UCX_TLS=tcp UCX_NET_DEVICES=lo timeout 60 "$bin" --connect 127.0.0.1:$port "$@"
rc=$?
wait $sender
src=$?
sed 's/^/sender: /' "$log"
[ $rc = 0 ] && [ $src = 0 ] || { echo "FAIL: receiver exit $rc, sender exit $src"; exit 1; }
