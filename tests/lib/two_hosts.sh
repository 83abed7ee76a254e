#!/usr/bin/env bash
# Two hosts on one machine: two network namespaces joined by a veth pair. The
# prefill role of kvx_bench runs in one, the decode role in the other; the
# remaining arguments go to both. Root only (it skips, exit 77, otherwise).
# Cleans up after itself, also on failure or interrupt.
#
#   tests/lib/two_hosts.sh --backends UCX --prefill-tp 2 --decode-tp 4 --random-blocks
#
# Namespaces of one machine share memory, the boot id and the hostname, so the
# network path is forced: UCX_TLS=tcp bound to the veth, and each side gets
# its own KVX_HOST_ID.
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${KVX_BENCH:-$here/build/kvx_bench}
. "$here/tests/lib/netns_pair.sh"
netns_pair_need two_hosts
[ -x "$bench" ] || { echo "two_hosts: $bench is not built (make)"; exit 2; }

tag=$$
A=kvxA$tag B=kvxB$tag VA=kva$tag VB=kvb$tag
IPA=10.211.$((tag % 250)).1 IPB=10.211.$((tag % 250)).2
port=$((20000 + tag % 20000))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  netns_pair_down "$A" "$B" "$VA"
}
trap cleanup EXIT INT TERM

netns_pair_up "$A" "$B" "$VA" "$VB" "$IPA" "$IPB" || { echo "two_hosts: cannot set up the namespaces"; exit 2; }

limit=${KVX_TWO_HOSTS_TIMEOUT:-600}
ip netns exec "$A" env UCX_TLS=tcp UCX_NET_DEVICES="$VA" FI_TCP_IFACE="$VA" KVX_HOST_ID=kvx-host-a \
  timeout "$limit" "$bench" --role prefill --listen "$IPA:$port" --strategy spread "$@" > "${TMPDIR:-/tmp}/kvx_two_hosts_$tag.prefill.log" 2>&1 &
pids+=($!)
ip netns exec "$B" env UCX_TLS=tcp UCX_NET_DEVICES="$VB" FI_TCP_IFACE="$VB" KVX_HOST_ID=kvx-host-b \
  timeout "$limit" "$bench" --role decode --connect "$IPA:$port" --strategy spread "$@"
rc=$?
wait "${pids[0]}"; prc=$?
pids=()
if [ $prc -ne 0 ]; then
  echo "two_hosts: the prefill side exited with $prc:"; sed 's/^/  prefill: /' "${TMPDIR:-/tmp}/kvx_two_hosts_$tag.prefill.log"
  [ $rc -eq 0 ] && rc=$prc
fi
rm -f "${TMPDIR:-/tmp}/kvx_two_hosts_$tag.prefill.log"
exit $rc
