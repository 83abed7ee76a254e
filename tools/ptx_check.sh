#!/usr/bin/env bash
# Checks the PTX that kvx embeds (no GPU needed): the copy kernel in
# kvx_cuda_ptx.h and the test kernels in tests/lib/kvx_cuda_test.h. Each must declare
# an ISA .version no newer than 7.8 (drivers from CUDA 11.8 on JIT it) and
# .target sm_80, and assemble with ptxas for sm_80, sm_90 and sm_100.
# PTXAS=... overrides /usr/local/cuda/bin/ptxas; exit 77 when there is none.
set -u
cd "$(dirname "$0")/.."
PTXAS=${PTXAS:-/usr/local/cuda/bin/ptxas}
if ! [ -x "$PTXAS" ]; then echo "skip: no ptxas at $PTXAS"; exit 77; fi
out=build/ptx
mkdir -p "$out"
pass=0 fail=0
extract() {  # header, block name -> PTX text
  sed -n "/\/\* PTX $2 BEGIN \*\//,/\/\* PTX $2 END \*\//p" "$1" | sed -e '1d;$d' \
    -e 's/^ *"//' -e 's/\\n",$//' -e 's/\\"/"/g'
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
      echo "ok ptx $name for $arch (.version $(echo $v | tr ' ' .)): $(grep -m1 'Used' "$out/$name.$arch.log" | sed 's/.*info *: *//')"
      pass=$((pass+1))
    else
      echo "FAIL ptx $name for $arch:"; sed 's/^/    /' "$out/$name.$arch.log" | head -20; fail=$((fail+1))
    fi
  done
}
check kvx_copy kvx_cuda_ptx.h kvx_copy
check kvx_test tests/lib/kvx_cuda_test.h kvx_test
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
