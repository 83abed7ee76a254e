#!/usr/bin/env bash
# make install into a staging root (DESTDIR), then a program an integrator
# would write, built only against what was installed (pkg-config kvx, and
# ucx for the UCX backend; #include <kvx.h>), run on the local backend and
# on UCX; then make uninstall, which must leave no file behind.
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
prefix=/opt/kvx-staged
make -s -C "$here" install DESTDIR="$root" PREFIX="$prefix" || { echo "FAIL: make install"; exit 1; }
pc() { PKG_CONFIG_PATH="$root$prefix/lib/pkgconfig" pkg-config --define-variable=prefix="$root$prefix" "$@"; }
cat > "$root/app.c" <<'C'
#define KVX_IMPLEMENTATION
#include <kvx.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    kvx_ctx_desc d;
    kvx_ctx *ctx = NULL;
    memset(&d, 0, sizeof d);
    d.name = "installed";
    d.backend = argc > 1 && !strcmp(argv[1], "ucx") ? KVX_BACKEND_UCX : KVX_BACKEND_LOCAL;
    if (kvx_ctx_create(&d, &ctx) != KVX_OK) { printf("kvx_ctx_create: %s\n", kvx_ctx_error(NULL)); return 1; }
    printf("a context on %s\n", kvx_backend_name(kvx_ctx_query_desc(ctx).backend));
    kvx_ctx_destroy(ctx);
    return 0;
}
C
fail=0
# shellcheck disable=SC2046
cc -std=c99 -Wall -Wextra -pedantic -Werror "$root/app.c" -o "$root/app_local" $(pc --cflags --libs kvx) &&
  "$root/app_local" || { echo "FAIL: the local backend, from the installed headers"; fail=1; }
cc -std=c99 -Wall -Wextra -pedantic -Werror -DKVX_UCX "$root/app.c" -o "$root/app_ucx" $(pc --cflags --libs kvx ucx) &&
  UCX_TLS=tcp UCX_NET_DEVICES=lo "$root/app_ucx" ucx || { echo "FAIL: the UCX backend, from the installed headers"; fail=1; }
n=$(find "$root$prefix" -type f | wc -l)
echo "installed: $n files under $prefix"
make -s -C "$here" uninstall DESTDIR="$root" PREFIX="$prefix" || { echo "FAIL: make uninstall"; fail=1; }
left=$(find "$root$prefix" -type f)
[ -z "$left" ] || { echo "FAIL: make uninstall left:"; echo "$left"; fail=1; }
[ $fail = 0 ] && echo "ok: installed, built against, run, and uninstalled without a trace"
exit $fail
