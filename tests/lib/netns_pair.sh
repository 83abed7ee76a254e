# Two network namespaces joined by a veth pair, each end given an address
# (/24) and brought up with its namespace's loopback: what the scripts that
# play two hosts on one machine share (tests/lib/two_hosts.sh,
# tests/ray/two_nodes.sh, tests/vllm/two_hosts.sh, tests/security/listen.sh,
# bench/bench.sh, bench/peers/bench_peers.py). Source it, then:
#   netns_pair_need WHO [CMD...]   exits 77 (skipped), saying why, unless this
#                                  is root with ip (and each CMD, iproute2's)
#   netns_pair_up NS_A NS_B VETH_A VETH_B IP_A IP_B    (fails if a step fails)
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
  ip -n "$1" link set lo up && ip -n "$2" link set lo up
}
netns_pair_down() {
  ip netns del "$1" 2>/dev/null; ip netns del "$2" 2>/dev/null
  ip link del "$3" 2>/dev/null  # gone with its namespace, unless that was never made
  true
}
