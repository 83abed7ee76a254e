#!/usr/bin/env bash
# Where an owner listens when nothing names its devices: in a network
# namespace of its own (loopback, and a veth whose far end is its default
# route), an owner over UCX and one over libfabric tcp each listen on the
# veth's address alone, never on every interface (0.0.0.0, ::); UCX not on
# loopback either. The owner is kvx_bench's prefill role, waiting for a
# decode side that never comes; its own rendezvous port is on --listen's
# address. KVX_LISTEN_UCX_ENV=UCX_NET_DEVICES=all shows the check failing
# (UCX's own default: every device). Root only (it skips, exit 77, otherwise).
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${KVX_BENCH:-$here/build/kvx_bench}
. "$here/tests/lib/netns_pair.sh"
netns_pair_need listen ss

tag=$$
A=kvxLA$tag B=kvxLB$tag VA=kla$tag VB=klb$tag
IPA=10.212.$((tag % 250)).1 IPB=10.212.$((tag % 250)).2
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; netns_pair_down "$A" "$B" "$VA"; }
trap cleanup EXIT INT TERM
netns_pair_up "$A" "$B" "$VA" "$VB" "$IPA" "$IPB" && ip -n "$A" route add default via "$IPB" ||
  { echo "listen: cannot set up the namespaces"; exit 2; }

fails=0
# check LABEL BACKEND ENV...: start the owner over BACKEND with the
# environment, wait until it listens beyond its rendezvous port, and judge
# every address it listens on.
check() {
  local label=$1 backend=$2 addrs n=0 bad
  shift 2
  # the last owner's sockets gone first: one still closing would be taken
  # for this owner's (5 s at most)
  while [ $n -lt 50 ] && [ -n "$(ip netns exec "$A" ss -Hltn | awk '{print $4}' | grep -v ":7799$")" ]; do sleep 0.1; n=$((n + 1)); done
  n=0
  ip netns exec "$A" env -u UCX_NET_DEVICES -u UCX_TLS -u FI_TCP_IFACE "$@" KVX_HOST_ID=kvx-listen \
    timeout 60 "$bench" --backends "$backend" --role prefill --listen "$IPA:7799" --strategy spread \
    --num-blocks 64 --blocks 8 --num-layers 2 >/dev/null 2>&1 &
  pid=$!
  while [ $n -lt 100 ]; do
    addrs=$(ip netns exec "$A" ss -Hltn | awk '{print $4}' | grep -v ":7799$")
    [ -n "$addrs" ] && break
    sleep 0.1; n=$((n + 1))
  done
  sleep 0.5
  addrs=$(ip netns exec "$A" ss -Hltn | awk '{print $4}' | grep -v ":7799$" | sort | tr '\n' ' ')
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=
  bad=$(for a in $addrs; do case $a in "$IPA":*) ;; *) echo "$a";; esac; done | tr '\n' ' ')
  if [ -z "$addrs" ]; then echo "FAIL $label: no listening socket seen"; fails=$((fails + 1))
  elif [ -n "$bad" ]; then echo "FAIL $label: listens on $bad(all: $addrs), not on $IPA alone"; fails=$((fails + 1))
  else echo "ok $label: listens on $addrs(the default route's device, $VA; not lo, not every interface)"; fi
}
check "ucx, no UCX_NET_DEVICES" UCX ${KVX_LISTEN_UCX_ENV:-}
check "libfabric tcp, no FI_TCP_IFACE" LIBFABRIC FI_PROVIDER=tcp
[ $fails -eq 0 ]
