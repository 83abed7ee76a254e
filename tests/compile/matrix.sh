#!/usr/bin/env bash
# The compile matrix: the headers as C99 and C++17 under -Wall -Wextra
# -pedantic -Werror, two translation units linked (one holds the
# implementation), C and C++ mixed, and KVX_STATIC. Prints one line per build
# and "N passed, M failed".
set -u
cd "$(dirname "$0")/../.."
defs=${KVX_BACKEND_DEFS:--DKVX_UCX}
# a folder per backend set, so that two matrices can run at once
out=${KVX_COMPILE_OUT:-build/compile/$(echo $defs | sed 's/-DKVX_//g; s/ /-/g' | tr 'A-Z' 'a-z')}
mkdir -p "$out"
libs=${KVX_BACKEND_LIBS:-$(pkg-config --libs ucx) -lpthread}
W="-Wall -Wextra -pedantic -Werror"
pass=0 fail=0
try() {  # name, command...
  local name=$1; shift
  if "$@" >"$out/$name.log" 2>&1; then echo "ok compile $name"; pass=$((pass+1))
  else echo "FAIL compile $name:"; head -c 3000 "$out/$name.log" | sed 's/^/    /' ; fail=$((fail+1)); fi
}
run() { local name=$1; shift; try "$name" bash -c "$* && $out/$name.bin >/dev/null"; }
run c99 "cc -std=c99 $W $defs tests/compile/impl.c tests/compile/user.c -o $out/c99.bin $libs"
run cxx17 "c++ -std=c++17 $W $defs -x c++ tests/compile/impl.c -x c++ tests/compile/user.c -o $out/cxx17.bin $libs"
# C++20: the backend tables as designated initializers (before C++20 they are positional).
run cxx20 "c++ -std=c++20 $W $defs -x c++ tests/compile/impl.c -x c++ tests/compile/user.c -o $out/cxx20.bin $libs"
run c-impl-cxx-user "cc -std=c99 $W $defs -c tests/compile/impl.c -o $out/impl.o && c++ -std=c++17 $W -x c++ tests/compile/user.c -x none $out/impl.o -o $out/c-impl-cxx-user.bin $libs"
run cxx-impl-c-user "c++ -std=c++17 $W $defs -x c++ -c tests/compile/impl.c -o $out/implxx.o && cc -std=c99 $W -c tests/compile/user.c -o $out/user.o && c++ $out/implxx.o $out/user.o -o $out/cxx-impl-c-user.bin $libs"
run static-c99 "cc -std=c99 $W $defs tests/compile/static.c -o $out/static-c99.bin $libs"
run static-cxx17 "c++ -std=c++17 $W $defs -x c++ tests/compile/static.c -o $out/static-cxx17.bin $libs"
try header-only-c89-decls cc -std=c99 $W -fsyntax-only -x c kvx.h
# Each room by itself, C99 and C++17: it includes the contract
# (kvx_internal.h) and the rooms it uses, nothing more. Unused static
# functions are expected there: a room alone calls few of its own.
alone="kvx_internal.h kvx_auth.h kvx_wire.h kvx_verify.h kvx_local.h kvx_core.h"
case " $defs " in *" -DKVX_UCX "*) alone="$alone kvx_ucx.h kvx_ucx_get.h";; esac
case " $defs " in *" -DKVX_OFI "*) alone="$alone kvx_ofi.h";; esac
for h in $alone; do
  try "alone-c99-$h" cc -std=c99 $W -Wno-unused-function $defs -fsyntax-only -x c $h
  try "alone-cxx17-$h" c++ -std=c++17 $W -Wno-unused-function $defs -fsyntax-only -x c++ $h
done
# A partial allocator override is a compile error that says what to define.
try partial-allocator-refused bash -c "cc -std=c99 $W $defs -DKVX_FREE=free -c tests/compile/impl.c -o $out/partial.o 2>&1 | grep -q 'define all of KVX_MALLOC, KVX_REALLOC and KVX_FREE'"
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
