#!/usr/bin/env bash
# Prepares make bench-peers for the GPU machine (make gpu-build first, for
# build/gpu/python): that machine has Python 3.12 and torch, and installs
# nothing, so NIXL comes from here, trimmed to fit one carry:
#   build/gpu/peers/site.tar.xz   nixl-cu12 1.5.1 for CPython 3.12 without its
#                                 torch extension modules (nixl_ep, 3 x 36 MB),
#                                 headers, scripts and the plugins and libraries
#                                 only they need (about 8 MB)
#   build/gpu/peers/libcudart.so.12  the CUDA 12 runtime NIXL's UCX CUDA module
#                                 and Mooncake's engine link (a CUDA 13 machine
#                                 has only .13)
#   build/gpu/peers/mooncake.tar.xz  mooncake-transfer-engine (the CUDA build)
#                                 for CPython 3.12: the package's engine module
#                                 and the libraries it loads (about 13 MB of 98)
#   build/gpu/peers/syslibs.tar.xz   the system libraries the engine loads
#                                 beyond glibc (libcurl, libibverbs, libnuma and
#                                 theirs), from here, for a machine without them
# Run there (carry build/gpu/python, build/gpu/peers and, for the "kvx
# ucx1.22" rows, build/gpu/ucx122/{libucx,libucx_cu12.libs,python}):
#   bash bench/peers/gpu_unpack.sh /tmp/px     # prints the PYTHONPATH and LD_LIBRARY_PATH to use
#   PYTHONPATH=... LD_LIBRARY_PATH=... python3 bench/peers/bench_peers.py --device cuda
set -eu
cd "$(dirname "$0")/../.."
PIP=${PIP:-build/venv/bin/pip}
out=build/gpu/peers
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat="--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64"
$PIP download --no-deps -q -d "$tmp" $plat "nixl-cu12==1.5.1" nvidia-cuda-runtime-cu12 "mooncake-transfer-engine==0.3.13.post1"
mkdir -p "$tmp/site" "$out"
python3 -m zipfile -e "$tmp"/nixl_cu12-*.whl "$tmp/site"
python3 -m zipfile -e "$tmp"/nvidia_cuda_runtime_cu12-*.whl "$tmp/cudart"
cp -L "$(find "$tmp/cudart" -name 'libcudart.so.12' | head -1)" "$out/"
rm -rf "$tmp/site"/nixl_ep_cu12 "$tmp/site"/nixl_cu12-*.data "$tmp/site"/nixl_cu12.scripts
# Keep what the bindings, the UCX plugin and UCX's CUDA and cma modules load.
python3 - "$tmp/site" <<'EOF'
import os, re, subprocess, sys
os.chdir(sys.argv[1])
roots = [p for p in (os.path.join(d, f) for d in ("nixl_cu12", ".nixl_cu12.mesonpy.libs/plugins", "nixl_cu12.libs/nixl", "nixl_cu12.libs/ucx")
                     for f in os.listdir(d))
         if re.search(r"(_bindings|libplugin_UCX|libuct_cuda|libucm_cuda|libuct_cma)[^/]*\.so", p)]
libs = {}
for d in (".nixl_cu12.mesonpy.libs", ".nixl_cu12.mesonpy.libs/plugins", "nixl_cu12.libs", "nixl_cu12.libs/nixl", "nixl_cu12.libs/ucx"):
    for f in os.listdir(d):
        if os.path.isfile(os.path.join(d, f)):
            libs.setdefault(f, []).append(os.path.join(d, f))
keep, todo = set(), list(roots)
while todo:
    p = todo.pop()
    if p in keep:
        continue
    keep.add(p)
    dyn = subprocess.run(["readelf", "-d", p], capture_output=True, text=True).stdout
    for name in re.findall(r"NEEDED.*\[(.*?)\]", dyn):
        todo += libs.get(name, [])
for paths in libs.values():
    for p in paths:
        if ".so" in p and p not in keep:
            os.remove(p)
EOF
tar -cJf "$out/site.tar.xz" -C "$tmp" site

# Mooncake: the engine module, what it loads from the wheel, the package's
# __init__ (and the one module that imports) and its metadata (the version).
mc=$tmp/mc/site
mkdir -p "$mc"
python3 -m zipfile -e "$tmp"/mooncake_transfer_engine-*.whl "$tmp/mcwheel"
mkdir -p "$mc/mooncake" "$mc/mooncake_transfer_engine.libs"
cp "$tmp"/mcwheel/mooncake/{__init__.py,buffer_pool.py,engine.so,libasio.so,libetcd_wrapper.so} "$mc/mooncake/"
cp -r "$tmp"/mcwheel/mooncake_transfer_engine-*.dist-info "$mc/"
for n in $(readelf -d "$mc/mooncake/engine.so" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
  [ -f "$tmp/mcwheel/mooncake_transfer_engine.libs/$n" ] && cp "$tmp/mcwheel/mooncake_transfer_engine.libs/$n" "$mc/mooncake_transfer_engine.libs/"
done
strip --strip-unneeded "$mc"/mooncake/*.so "$mc"/mooncake_transfer_engine.libs/* 2>/dev/null || true
tar -cJf "$out/mooncake.tar.xz" -C "$tmp/mc" site
# The system libraries it needs beyond glibc and libstdc++, as found here.
mkdir -p "$tmp/sys/syslibs"
LD_LIBRARY_PATH=$mc/mooncake:$mc/mooncake_transfer_engine.libs ldd "$mc/mooncake/engine.so" | awk '$3 ~ /^\// {print $3}' |
  grep -vE "/(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so|$tmp" |
  while read -r f; do cp -L "$f" "$tmp/sys/syslibs/"; done
tar -cJf "$out/syslibs.tar.xz" -C "$tmp/sys" syslibs
ls -la "$out"
