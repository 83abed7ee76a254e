#!/usr/bin/env bash
# On the GPU machine: unpacks what bench/peers/gpu_build.sh made into DIR and
# prints the environment bench_peers.py --device cuda runs with. System
# libraries from the build machine are used only where this machine lacks
# them (ldconfig does not know them).
#   eval "$(bash bench/peers/gpu_unpack.sh /tmp/px)"
set -eu
cd "$(dirname "$0")/../.."
dir=${1:?usage: gpu_unpack.sh DIR}
src=build/gpu/peers
mkdir -p "$dir/nixl" "$dir/mooncake" "$dir/sys" "$dir/missing"
tar -xJf "$src/site.tar.xz" -C "$dir/nixl"
[ -f "$src/mooncake.tar.xz" ] && tar -xJf "$src/mooncake.tar.xz" -C "$dir/mooncake"
if [ -f "$src/syslibs.tar.xz" ]; then
  tar -xJf "$src/syslibs.tar.xz" -C "$dir/sys"
  for f in "$dir"/sys/syslibs/*; do
    n=$(basename "$f")
    ldconfig -p | grep -q "^[[:space:]]*$n " || ln -sf "$f" "$dir/missing/$n"
  done
fi
echo "export PYTHONPATH=$PWD/build/gpu/python:$dir/nixl/site:$dir/mooncake/site"
echo "export LD_LIBRARY_PATH=$PWD/$src:$dir/missing${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "# from the build machine (missing here): $(ls "$dir/missing" | tr '\n' ' ')" >&2
