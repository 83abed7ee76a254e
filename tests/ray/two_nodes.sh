#!/usr/bin/env bash
# A Ray cluster of two nodes on one machine: two network namespaces joined by
# a veth pair, `ray start --head` in A, a second node in B joining over A's
# veth address; then the driver, tests/ray/kvx_ray_test.py, in A with the
# remaining arguments. Root only (it skips, exit 77, otherwise). On exit, also
# on failure or interrupt, every process in the two namespaces (all of them
# started here: Ray's and the driver) is ended by its pid, and the namespaces,
# the veth pair and Ray's temporary folders are removed.
#
#   tests/ray/two_nodes.sh --strategy spread --backends UCX --prefill-tp 2 --decode-tp 1
#   tests/ray/two_nodes.sh --suite make-test
#
# Namespaces of one machine share memory, the boot id and the hostname, so
# each node's environment forces kvx onto that node's network path, as
# tests/lib/two_hosts.sh does: UCX_TLS=tcp and FI_PROVIDER=tcp bound to the
# node's veth, and a KVX_HOST_ID per node. Ray's workers inherit it from
# `ray start`.
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
venv=${KVX_RAY_VENV:-$here/build/venv}
py=$venv/bin/python ray=$venv/bin/ray
. "$here/tests/lib/netns_pair.sh"
netns_pair_need two_nodes
"$py" -c 'import ray, kvx' 2>/dev/null || { echo "two_nodes: $venv lacks ray or kvx (make ray)"; exit 2; }

tag=$$
A=krayA$tag B=krayB$tag VA=kra$tag VB=krb$tag
net=10.212.$((tag % 250))
IPA=$net.1 IPB=$net.2
# Short: Ray's Unix sockets live below (107 characters at most)
TA=/tmp/kray$tag.a TB=/tmp/kray$tag.b
CPUS=${KVX_RAY_CPUS:-16}         # logical: enough for the largest TP pair in one node
STORE=${KVX_RAY_STORE:-100000000} # object store bytes per node; metadata is small
limit=${KVX_RAY_TIMEOUT:-1800}
driver=

stop_nodes() {
  # TERM, then KILL after 2 s, to every process in the two namespaces (all
  # started here); then until each is gone: a dying process leaves its
  # namespace before it has let go of its memory.
  local sig p i now seen=""
  for sig in TERM KILL; do
    for i in $(seq 20); do
      now=$( (ip netns pids "$A"; ip netns pids "$B") 2>/dev/null)
      [ -z "$now" ] && break 2
      seen="$seen $now"
      [ "$i" = 1 ] && for p in $now; do kill -"$sig" "$p" 2>/dev/null; done
      sleep 0.1
    done
  done
  for i in $(seq 50); do
    now=""
    for p in $seen; do grep -qs '^State:[^Z]*$' "/proc/$p/status" && now="$now $p"; done  # zombies are gone enough
    [ -z "$now" ] && return 0
    seen=$now
    sleep 0.1
  done
}
cleanup() {
  trap - EXIT INT TERM
  [ -n "$driver" ] && exec 2>/dev/null  # not bash's notice of the driver it ends
  [ -n "$driver" ] && kill "$driver" 2>/dev/null
  stop_nodes
  netns_pair_down "$A" "$B" "$VA"
  rm -f "$TA.start.log" "$TB.start.log"
  [ -n "${KVX_RAY_KEEP:-}" ] && echo "two_nodes: Ray's logs kept in $TA and $TB" || rm -rf "$TA" "$TB"
  true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

netns_pair_up "$A" "$B" "$VA" "$VB" "$IPA" "$IPB" || { echo "two_nodes: cannot set up the namespaces"; exit 2; }

# The environment of each node: kvx on the node's veth, Ray quiet.
env_of() {  # VETH HOST_ID
  echo RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 UCX_TLS=tcp UCX_NET_DEVICES="$1" FI_PROVIDER="${FI_PROVIDER:-tcp}" FI_TCP_IFACE="$1" KVX_HOST_ID="$2"
}
EA=$(env_of "$VA" kvx-node-a) EB=$(env_of "$VB" kvx-node-b)
common=(--num-cpus "$CPUS" --object-store-memory "$STORE" --disable-usage-stats --log-style record)
t0=$(date +%s%N)
ip netns exec "$A" env $EA timeout 120 "$ray" start --head --node-ip-address "$IPA" --port 6379 --include-dashboard=false \
  --temp-dir "$TA" "${common[@]}" > "$TA.start.log" 2>&1 || { echo "two_nodes: ray start --head failed:"; cat "$TA.start.log"; rm -f "$TA.start.log"; exit 2; }
t1=$(date +%s%N)
ip netns exec "$B" env $EB timeout 120 "$ray" start --address "$IPA:6379" --node-ip-address "$IPB" \
  --temp-dir "$TB" "${common[@]}" > "$TB.start.log" 2>&1 || { echo "two_nodes: ray start (node B) failed:"; cat "$TB.start.log"; rm -f "$TA.start.log" "$TB.start.log"; exit 2; }
t2=$(date +%s%N)
rm -f "$TA.start.log" "$TB.start.log"
echo "two_nodes: Ray $("$ray" --version | awk '{print $3}'): head $IPA ($VA) up in $(((t1 - t0) / 1000000)) ms," \
  "node $IPB ($VB) joined in $(((t2 - t1) / 1000000)) ms"

# The driver in the background: a signal to this script ends it (and the nodes) at once.
ip netns exec "$A" env $EA RAY_ADDRESS="$IPA:6379" timeout "$limit" "$py" -u "$here/tests/ray/kvx_ray_test.py" "$@" &
driver=$!
wait "$driver"
rc=$?
driver=
exit $rc
