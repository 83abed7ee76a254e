#!/usr/bin/env bash
# Regenerates the PTX text that kvx embeds, from its CUDA C source:
#   kernels/kvx_cuda_copy.cu  ->  kvx_cuda_ptx.h       (block "PTX kvx_copy")
#   tests/gpu/kvx_cuda_test.cu -> tests/lib/kvx_cuda_test.h (block "PTX kvx_test")
# nvcc emits the ISA version of its own release (9.0 for CUDA 13); the text is
# lowered to .version 7.8 (.target sm_80), which drivers from CUDA 11.8 on
# compile for Ampere, Hopper and newer. tools/ptx_check.sh checks the result.
# Needs nvcc (NVCC=...); kvx's users never run this.
#   kernels/gen_ptx.sh               rewrites the two headers in place
#   kernels/gen_ptx.sh --out DIR     writes them under DIR instead, at the same
#                                    paths (DIR/kvx_cuda_ptx.h, ...), leaving the
#                                    tree alone (tools/ptx_check.sh compares)
set -eu
out=
while [ $# -gt 0 ]; do
  case $1 in
    --out) [ $# -ge 2 ] || { echo "gen_ptx.sh: --out needs a directory" >&2; exit 2; }; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    *) echo "usage: kernels/gen_ptx.sh [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -n "$out" ]; then mkdir -p "$out"; out=$(cd "$out" && pwd); fi
cd "$(dirname "$0")/.."
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gen() {  # source, header, block name
  local src=$1 hdr=$2 name=$3 dest=$2
  if ! grep -q "/\* PTX $name BEGIN \*/" "$hdr" || ! grep -q "/\* PTX $name END \*/" "$hdr"; then
    echo "gen_ptx.sh: $hdr has no /* PTX $name BEGIN */ ... /* PTX $name END */ markers" >&2; exit 1
  fi
  "$NVCC" -arch=compute_80 -ptx "$src" -o "$tmp/out.ptx"
  # Lower the ISA version; drop nvcc's comments, its "used_bytes_mask" load
  # hints (ISA 8.3) and blank lines; quote each line as a C string.
  sed -e 's/^\.version [0-9.]*/.version 7.8/' -e '/^[[:space:]]*\/\//d' -e '/\.pragma "used_bytes_mask/d' -e '/^[[:space:]]*$/d' \
      -e 's/\t/ /g' -e 's/"/\\"/g' -e 's/^/    "/' -e 's/$/\\n",/' "$tmp/out.ptx" > "$tmp/lines"
  awk -v name="$name" -v lines="$tmp/lines" '
    $0 ~ "/\\* PTX " name " BEGIN" { print; while ((getline l < lines) > 0) print l; skip = 1; next }
    $0 ~ "/\\* PTX " name " END" { skip = 0 }
    !skip { print }' "$hdr" > "$tmp/hdr"
  if [ -n "$out" ]; then dest=$out/$hdr; mkdir -p "$(dirname "$dest")"; fi
  cp "$tmp/hdr" "$dest"
  echo "$dest: $(wc -l < "$tmp/lines") lines of PTX ($name)"
}
gen kernels/kvx_cuda_copy.cu kvx_cuda_ptx.h kvx_copy
gen tests/gpu/kvx_cuda_test.cu tests/lib/kvx_cuda_test.h kvx_test
