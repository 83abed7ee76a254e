#!/usr/bin/env bash
# Installs what kvx's build, tests and benchmarks need, from Debian's packages,
# when it is missing. As root it runs apt-get; otherwise it says what to run.
#   tools/deps.sh build   compiler, pkg-config, UCX and libfabric headers
#   tools/deps.sh test    + iproute2 and ethtool (two-host tests), clang and its fuzzer/sanitizer runtime
#   tools/deps.sh bench   + ucx_perftest, gnuplot
set -u
what=${1:-build}
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have_cmd cc || need+=(gcc)
have_cmd c++ || need+=(g++)
have_cmd make || need+=(make)
have_cmd pkg-config || need+=(pkg-config)
have_pkg libucx-dev || need+=(libucx-dev)
have_pkg libfabric-dev || need+=(libfabric-dev)
if [ "$what" = test ] || [ "$what" = bench ]; then
  have_cmd ip || need+=(iproute2)
  have_cmd ethtool || need+=(ethtool)
  have_cmd timeout || need+=(coreutils)
  have_cmd clang || need+=(clang)
  have_cmd valgrind || need+=(valgrind)
  have_pkg libclang-rt-14-dev || have_pkg libclang-rt-dev || need+=(libclang-rt-14-dev)
fi
if [ "$what" = bench ]; then
  have_cmd ucx_perftest || need+=(ucx-utils)
  have_cmd gnuplot || need+=(gnuplot-nox)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && have_cmd apt-get; then
  echo "kvx: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null || {
    echo "kvx: apt-get install ${need[*]} failed" >&2; exit 1; }
else
  echo "kvx: missing ${need[*]}; run: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
