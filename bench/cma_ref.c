/*
    cma_ref -- the floor of kvx_bench's shared-memory row (UCX_TLS=sm, where
    UCX reads with cma): plain process_vm_readv of the same random blocks,
    no UCX and no kvx in between. ucx_perftest's ucp_get reads one buffer
    again and again, whose pages stay pinned-hot in the caches and the TLB;
    kvx reads blocks scattered over a cache many times larger, as an engine
    does, and this program does the same.

        cma_ref [--size BYTES] [--region BYTES] [--total BYTES] [--per-call N]
                [--iters N] [--json FILE]

    A forked child writes --region bytes (default 64 MiB) of a pattern; the
    parent reads --total bytes (default 32 MiB) of it per iteration in
    blocks of --size bytes at random block offsets (one seed, as kvx_bench's
    --random-blocks), --per-call blocks per process_vm_readv (default 1, as
    UCX's cma transport does one get per call), into a region of its own at
    the same offsets, --iters times (default 5) after one pass untimed (the
    first pass over the blocks ran at a third of the speed of the next ones
    here, where kvx_bench's first iteration runs at the speed of its
    others), then checks every byte.
    GB/s counts bytes read over all iterations, as kvx_bench's does.

    Build: cc -O2 -std=c99 -D_GNU_SOURCE bench/cma_ref.c -o build/cma_ref
    Exit status 0 with "TEST PASSED", 1 with a wrong byte or a failed read,
    2 for setup.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PER_CALL 1024  /* IOV_MAX */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint8_t pattern(size_t off) { return (uint8_t)((off * 2654435761u) >> 13); }

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

static int usage(void) {
    fprintf(stderr, "usage: cma_ref [--size BYTES] [--region BYTES] [--total BYTES] [--per-call N] [--iters N] [--json FILE]\n");
    return 2;
}

int main(int argc, char **argv) {
    size_t size = 16384, region = 64u << 20, total = 32u << 20, nb, n, i, k;
    int per_call = 1, iters = 5, it, hold[2], rdy[2];
    const char *json = NULL;
    uint8_t *src, *dst;
    uint32_t *ids;
    struct iovec l[MAX_PER_CALL], r[MAX_PER_CALL];
    double *gbps, secs = 0;
    long long bad = 0;
    pid_t child;
    for (i = 1; i < (size_t)argc; i++) {
        const char *a = argv[i], *v = i + 1 < (size_t)argc ? argv[i + 1] : NULL;
        if (!v) return usage();
        if (!strcmp(a, "--size")) size = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--region")) region = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--total")) total = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--per-call")) per_call = atoi(v);
        else if (!strcmp(a, "--iters")) iters = atoi(v);
        else if (!strcmp(a, "--json")) json = v;
        else return usage();
        i++;
    }
    if (!size || region < size || !total || per_call < 1 || per_call > MAX_PER_CALL || iters < 1 || iters > 1000) return usage();
    nb = region / size;
    n = (total + size - 1) / size;
    src = (uint8_t *)mmap(NULL, region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    dst = (uint8_t *)malloc(region);
    ids = (uint32_t *)malloc(n * sizeof *ids);
    gbps = (double *)malloc((size_t)iters * sizeof *gbps);
    if (src == MAP_FAILED || !dst || !ids || !gbps || pipe(hold) || pipe(rdy)) { perror("cma_ref: setup"); return 2; }
    memset(dst, 0, region);
    if ((child = fork()) < 0) { perror("cma_ref: fork"); return 2; }
    if (!child) {  /* the owner: writes its region (its own pages, as an owner's cache), says so, holds it until the reader closes the pipe */
        char x = 1;
        close(hold[1]);
        for (i = 0; i < region; i++) src[i] = pattern(i);
        if (write(rdy[1], &x, 1) != 1) _exit(2);
        while (read(hold[0], &x, 1) < 0 && errno == EINTR) {}
        _exit(0);
    }
    close(hold[0]);
    {
        char x;
        while (read(rdy[0], &x, 1) < 0 && errno == EINTR) {}
    }
    srand(77);
    for (i = 0; i < n; i++) ids[i] = (uint32_t)((size_t)rand() % nb);
    for (it = -1; it < iters; it++) {
        double t0 = now_s();
        for (i = 0; i < n; i += (size_t)per_call) {
            size_t m = n - i < (size_t)per_call ? n - i : (size_t)per_call;
            ssize_t got;
            for (k = 0; k < m; k++) {
                size_t off = (size_t)ids[i + k] * size;
                l[k].iov_base = dst + off; l[k].iov_len = size;
                r[k].iov_base = src + off; r[k].iov_len = size;
            }
            if ((got = process_vm_readv(child, l, (unsigned long)m, r, (unsigned long)m, 0)) != (ssize_t)(m * size)) {
                fprintf(stderr, "cma_ref: process_vm_readv read %zd of %zu bytes: %s\n", got, m * size, strerror(errno));
                close(hold[1]); waitpid(child, NULL, 0);
                return 1;
            }
        }
        t0 = now_s() - t0;
        if (it < 0) continue;
        secs += t0;
        gbps[it] = (double)(n * size) / t0 / 1e9;
        printf("iter %d: %zu blocks of %zu bytes, %d per call: %.3f GB/s\n", it, n, size, per_call, gbps[it]);
    }
    close(hold[1]);
    waitpid(child, NULL, 0);
    for (i = 0; i < n; i++) {
        size_t off = (size_t)ids[i] * size;
        for (k = 0; k < size; k++) bad += dst[off + k] != pattern(off + k);
    }
    qsort(gbps, (size_t)iters, sizeof *gbps, cmp_d);
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) { perror(json); return 2; }
        fprintf(f, "{\"size\":%zu,\"per_call\":%d,\"blocks\":%zu,\"gbps\":%.4f,\"wrong\":%lld}\n", size, per_call, n, (double)(n * size) * iters / secs / 1e9, bad);
        fclose(f);
    }
    if (bad) { printf("TEST FAILED: %lld wrong bytes\n", bad); return 1; }
    printf("TEST PASSED: every byte of %zu blocks checked; %.3f GB/s over all iterations (median %.3f)\n", n, (double)(n * size) * iters / secs / 1e9, gbps[iters / 2]);
    return 0;
}
