#!/usr/bin/env bash
# vLLM with kvx as its KV connector on two hosts: two network namespaces
# joined by a veth pair, the prefill engine in A, the decode engine in B, the
# driver (tests/vllm/pd_two_hosts.py, which also runs the single engine they
# are compared with) outside both. Root only (it skips, exit 77, otherwise).
# On exit, also on failure or interrupt, every process in the two namespaces
# is ended and the namespaces and the veth pair are removed.
#
#   tests/vllm/two_hosts.sh [--backend ucx|ofi]
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
py=${KVX_VLLM_PYTHON:-$here/build/vllm/bin/python}
. "$here/tests/lib/netns_pair.sh"
netns_pair_need "vllm two_hosts"
"$py" -c 'import vllm, kvx.vllm' 2>/dev/null || { echo "vllm two_hosts: $py lacks vllm or kvx (make vllm)"; exit 2; }

tag=$$
A=kvlA$tag B=kvlB$tag VA=kvla$tag VB=kvlb$tag
net=10.213.$((tag % 250))
IPA=$net.1 IPB=$net.2

stop_all() {
  local sig p i now
  for sig in TERM KILL; do
    now=$( (ip netns pids "$A"; ip netns pids "$B") 2>/dev/null)
    [ -z "$now" ] && break
    for p in $now; do kill -"$sig" "$p" 2>/dev/null; done
    for i in $(seq 30); do
      now=$( (ip netns pids "$A"; ip netns pids "$B") 2>/dev/null)
      [ -z "$now" ] && break 2
      sleep 0.1
    done
  done
  netns_pair_down "$A" "$B" "$VA"
}
trap stop_all EXIT INT TERM

netns_pair_up "$A" "$B" "$VA" "$VB" "$IPA" "$IPB" || { echo "vllm two_hosts: cannot set up the namespaces"; exit 2; }
timeout "${KVX_VLLM_TIMEOUT:-900}" "$py" "$here/tests/vllm/pd_two_hosts.py" --ns "$A" "$B" --ip "$IPA" "$IPB" --dev "$VA" "$VB" \
  --logs "$here/build/test-logs/vllm" "$@"
