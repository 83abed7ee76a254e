#!/usr/bin/env bash
# Checks the PTX that kvx embeds (no GPU needed): the copy kernel in
# kvx_cuda_ptx.h and the test kernels in tests/lib/kvx_cuda_test.h.
# - layout: the structs the host fills for the kernels (kvx__cuda_rd,
#   kvx__cuda_sum_lay) are asserted field by field on both sides from
#   KVX__CUDA_*_LAYOUT lists; those lists must be the same text in kvx_cuda.h
#   and kernels/kvx_cuda_copy.cu. Needs nothing.
# - ptxas: each block must declare an ISA .version no newer than 7.8
#   (drivers from CUDA 11.8 on JIT it) and .target sm_80, and assemble with
#   ptxas for sm_80, sm_90 and sm_100. PTXAS=... overrides
#   /usr/local/cuda/bin/ptxas; skipped without it.
# - regen: kernels/gen_ptx.sh --out regenerates both headers from their .cu
#   into a temporary directory; each must be what is embedded, byte for
#   byte (else the diff). NVCC=... overrides /usr/local/cuda/bin/nvcc;
#   skipped without it. The text depends on nvcc's release: one other than
#   the release that generated the headers may differ.
# Ends with "N passed, M failed"; exit 77 only when nothing could be checked.
set -u
cd "$(dirname "$0")/.."
PTXAS=${PTXAS:-/usr/local/cuda/bin/ptxas}
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
out=build/ptx
mkdir -p "$out"
pass=0 fail=0

# The definitions of KVX__CUDA_<STRUCT>_BYTES and KVX__CUDA_<STRUCT>_LAYOUT
# (with their continuation lines) in a file, spaces squeezed.
layout_lists() {
  awk '/^#define KVX__CUDA_[A-Z_]*_(BYTES|LAYOUT)[( ]/ { on = 1 } on { print; if ($0 !~ /\\$/) on = 0 }' "$1" | tr -s ' '
}
layout_lists kvx_cuda.h > "$out/layout.host"
layout_lists kernels/kvx_cuda_copy.cu > "$out/layout.kernel"
if ! [ -s "$out/layout.host" ] || ! grep -q _LAYOUT "$out/layout.host"; then
  echo "FAIL layout: no KVX__CUDA_*_LAYOUT list in kvx_cuda.h"; fail=$((fail+1))
elif ! diff -u --label kvx_cuda.h --label kernels/kvx_cuda_copy.cu "$out/layout.host" "$out/layout.kernel" > "$out/layout.diff"; then
  echo "FAIL layout: the host's and the kernel's struct layouts differ (each side asserts its own list; they must be the same):"
  sed 's/^/    /' "$out/layout.diff"; fail=$((fail+1))
else
  echo "ok layout: kvx_cuda.h and kernels/kvx_cuda_copy.cu assert the same $(grep -c '_BYTES' "$out/layout.host") struct layouts"
  pass=$((pass+1))
fi

extract() {  # header, block name -> PTX text
  sed -n "/\/\* PTX $2 BEGIN \*\//,/\/\* PTX $2 END \*\//p" "$1" | sed -e '1d;$d' \
    -e 's/^ *"//' -e 's/\\n",$//' -e 's/\\"/"/g'
}
entries() {  # ptxas -v log -> "kernel N registers, ..." for each entry function
  awk -F"'" '/Compiling entry function/ { k = $2 }
    k != "" && match($0, /Used [0-9]+ registers/) { printf "%s%s %s", sep, k, substr($0, RSTART + 5, RLENGTH - 5); sep = ", "; k = "" }' "$1"
}
check() {  # name, header, block
  local name=$1 f="$out/$1.ptx" v arch
  extract "$2" "$3" > "$f"
  if ! [ -s "$f" ]; then echo "FAIL ptx $name: no PTX between the markers in $2"; fail=$((fail+1)); return; fi
  v=$(sed -n 's/^\.version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' "$f")
  if [ -z "$v" ] || [ "$(echo "$v" | awk '{print ($1 > 7 || ($1 == 7 && $2 > 8))}')" = 1 ]; then
    echo "FAIL ptx $name: ISA .version '$v' is newer than 7.8"; fail=$((fail+1)); return
  fi
  if ! grep -q '^\.target sm_80$' "$f"; then echo "FAIL ptx $name: .target is not sm_80"; fail=$((fail+1)); return; fi
  for arch in sm_80 sm_90 sm_100; do
    if "$PTXAS" -arch=$arch -v "$f" -o "$out/$name.$arch.cubin" > "$out/$name.$arch.log" 2>&1; then
      echo "ok ptx $name for $arch (.version $(echo $v | tr ' ' .)): $(entries "$out/$name.$arch.log")"
      pass=$((pass+1))
    else
      echo "FAIL ptx $name for $arch:"; sed 's/^/    /' "$out/$name.$arch.log" | head -20; fail=$((fail+1))
    fi
  done
}
if [ -x "$PTXAS" ]; then
  check kvx_copy kvx_cuda_ptx.h kvx_copy
  check kvx_test tests/lib/kvx_cuda_test.h kvx_test
else
  echo "skip ptx: no ptxas at $PTXAS"
fi

regen() {  # name, header, source
  local name=$1 hdr=$2 src=$3
  if ! [ -f "$tmp/$hdr" ]; then echo "FAIL ptx regen $name: kernels/gen_ptx.sh wrote no $hdr"; fail=$((fail+1)); return; fi
  if diff -u --label "$hdr (embedded)" --label "$hdr (from $src by $rel)" "$hdr" "$tmp/$hdr" > "$out/$name.regen.diff"; then
    echo "ok ptx regen $name: $hdr is what $rel makes of $src"
    pass=$((pass+1))
  else
    echo "FAIL ptx regen $name: $hdr is not what $rel makes of $src: run kernels/gen_ptx.sh (or use the nvcc release that made it). Diff, embedded -> regenerated ($(grep -c '^[-+][^-+]' "$out/$name.regen.diff") lines):"
    sed 's/^/    /' "$out/$name.regen.diff" | head -80; fail=$((fail+1))
  fi
}
if [ -x "$NVCC" ]; then
  rel=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/nvcc \1/p')
  rel=${rel:-nvcc}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if NVCC=$NVCC bash kernels/gen_ptx.sh --out "$tmp" > "$out/regen.log" 2>&1; then
    regen kvx_copy kvx_cuda_ptx.h kernels/kvx_cuda_copy.cu
    regen kvx_test tests/lib/kvx_cuda_test.h tests/gpu/kvx_cuda_test.cu
  else
    echo "FAIL ptx regen: kernels/gen_ptx.sh --out failed:"; sed 's/^/    /' "$out/regen.log" | head -30; fail=$((fail+1))
  fi
else
  echo "skip ptx regen: no nvcc at $NVCC (the embedded PTX is not compared with its source)"
fi

echo "$pass passed, $fail failed"
if [ $((pass + fail)) -eq 0 ]; then exit 77; fi
[ $fail -eq 0 ]
