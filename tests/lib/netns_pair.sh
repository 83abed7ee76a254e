# Two network namespaces joined by a veth pair, each end given an address
# (/24) and brought up with its namespace's loopback: what the scripts that
# play two hosts on one machine share (tests/lib/two_hosts.sh,
# tests/ray/two_nodes.sh, tests/vllm/two_hosts.sh, tests/security/listen.sh,
# bench/bench.sh, bench/peers/bench_peers.py). Source it, then:
#   netns_pair_need WHO [CMD...]   exits 77 (skipped), saying why, unless this
#                                  is root with ip (and each CMD, iproute2's)
#   netns_pair_up NS_A NS_B VETH_A VETH_B IP_A IP_B    (fails if a step fails)
#                                  and turns GRO on at both ends where ethtool
#                                  is (netns_pair_gro says whether it is on)
#   netns_pair_down NS_A NS_B VETH_A                   (quiet; for traps)
netns_pair_need() {
  local who=$1 c
  shift
  if [ "$(id -u)" != 0 ]; then echo "$who: skipped: needs root to make network namespaces"; exit 77; fi
  for c in ip "$@"; do
    command -v "$c" >/dev/null || { echo "$who: skipped: no '$c' (apt-get install iproute2)"; exit 77; }
  done
}
netns_pair_up() {
  ip netns add "$1" && ip netns add "$2" &&
  ip link add "$3" type veth peer name "$4" &&
  ip link set "$3" netns "$1" && ip link set "$4" netns "$2" &&
  ip -n "$1" addr add "$5/24" dev "$3" && ip -n "$2" addr add "$6/24" dev "$4" &&
  ip -n "$1" link set "$3" up && ip -n "$2" link set "$4" up &&
  ip -n "$1" link set lo up && ip -n "$2" link set lo up &&
  { netns_pair_gro_on "$1" "$3"; netns_pair_gro_on "$2" "$4"; true; }
}
# GRO puts a veth in NAPI mode: what one end sends waits in one ring that
# one CPU drains, in order, as a NIC's queue does. Without it each packet
# joins the backlog of the CPU that sent it, and a TCP flow whose packets
# leave from two CPUs (the sender's thread, and the softirq that sends on an
# ACK) arrives out of order: spurious retransmits, and now and then a stall
# of a retransmission timeout (200 ms), which a real link does not have.
# GRO takes most of that away, not all (docs/benchmarks.md).
netns_pair_gro_on() { command -v ethtool >/dev/null 2>&1 && ip netns exec "$1" ethtool -K "$2" gro on >/dev/null 2>&1; }
# netns_pair_gro NS VETH: "on", or why not
netns_pair_gro() {
  command -v ethtool >/dev/null 2>&1 || { echo "off (no ethtool: apt-get install ethtool)"; return; }
  ip netns exec "$1" ethtool -k "$2" 2>/dev/null | grep -q "^generic-receive-offload: on" && echo on || echo "off (ethtool -K $2 gro on failed)"
}
netns_pair_down() {
  ip netns del "$1" 2>/dev/null; ip netns del "$2" 2>/dev/null
  ip link del "$3" 2>/dev/null  # gone with its namespace, unless that was never made
  true
}
