/*
    kvx_demo -- a pack transfer on this host: a prefill process and a decode
    process; the decode side reads a random block table across all layers
    from the prefill side and checks every byte it received.

        build/kvx_demo [--blocks N] [--num-blocks N] [--num-layers N] [--layout HND|NHD] [--seed N]

    Prints the transport kvx chose, the bytes, the GB/s, and TEST PASSED (exit
    0) or TEST FAILED (exit 1). The TCP rendezvous on 127.0.0.1 carries the
    metadata blob: kvx itself does not choose a control plane.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../kvx.h"
#include "../tests/lib/kvx_host_cache.h"
#include "kvx_rdv.h"

#include <sys/wait.h>

#define RDV_MD 1u
#define RDV_DONE 2u

typedef struct demo_opts {
    uint32_t blocks, num_blocks, num_layers;
    kvx_order order;
    uint64_t seed;
} demo_opts;

static kvx_layout demo_layout(const demo_opts *o) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = o->num_layers;
    l.num_blocks = o->num_blocks;
    l.block_tokens = 16;
    l.num_heads = 8;
    l.head_dim = 128;
    l.elem_bytes = 2;          /* 32 KiB per block, layer and K/V */
    l.order = o->order;
    return l;
}

static int die(const char *who, kvx_ctx *ctx, kvx_status st) {
    fprintf(stderr, "%s: %s: %s\n", who, kvx_status_name(st), ctx ? kvx_ctx_error(ctx) : kvx_ctx_error(NULL));
    return 1;
}

/* The owner: registers its cache, ships its metadata, serves reads from its
   progress thread until the reader says it is done. */
static int run_prefill(const demo_opts *o, int lfd, const uint32_t *src) {
    kvx_layout lay = demo_layout(o);
    kvx_ex_cache mem;
    kvx_cache_desc cd;
    kvx_ctx_desc cdesc;
    kvx_ctx *ctx;
    kvx_cache *cache;
    kvx_status st;
    void *md, *done;
    size_t len = 0;
    uint32_t dlen;
    int fd;
    memset(&cdesc, 0, sizeof cdesc);
    cdesc.name = "prefill";
    cdesc.progress_thread = 1;
    if ((st = kvx_ctx_create(&cdesc, &ctx)) != KVX_OK) return die("prefill", NULL, st);
    if (kvx_ex_cache_alloc(&mem, &lay, 0, 1)) { fprintf(stderr, "prefill: cannot allocate the cache\n"); return 1; }
    kvx_ex_fill(&mem, o->seed, src, o->blocks);
    cd = kvx_ex_cache_desc(&mem);
    if ((st = kvx_cache_register(ctx, &cd, &cache)) != KVX_OK) return die("prefill", ctx, st);
    kvx_metadata(ctx, NULL, &len);
    md = malloc(len);
    if ((st = kvx_metadata(ctx, md, &len)) != KVX_OK) return die("prefill", ctx, st);
    if ((fd = kvx_rdv_accept(lfd, 30000)) < 0 || kvx_rdv_send(fd, RDV_MD, md, (uint32_t)len, 30000) ||
        kvx_rdv_recv(fd, RDV_DONE, &done, &dlen, 300000)) {
        fprintf(stderr, "prefill: rendezvous: %s\n", kvx_rdv_error());
        return 1;
    }
    free(done);
    free(md);
    close(fd);
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&mem);
    return 0;
}

static int run_decode(const demo_opts *o, int port, const uint32_t *src, const uint32_t *dst) {
    kvx_layout lay = demo_layout(o);
    kvx_ex_cache mem;
    kvx_cache_desc cd;
    kvx_ctx_desc cdesc;
    kvx_read rd;
    kvx_ctx *ctx;
    kvx_cache *cache;
    kvx_peer *peer;
    kvx_queue *q;
    kvx_ticket t;
    kvx_status st;
    kvx_stats stats;
    kvx_ex_mismatch mm = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    char hp[64];
    void *md;
    uint32_t len;
    uint64_t bad, t0, t1;
    int fd;
    struct timespec ts;
    memset(&cdesc, 0, sizeof cdesc);
    cdesc.name = "decode";
    if ((st = kvx_ctx_create(&cdesc, &ctx)) != KVX_OK) return die("decode", NULL, st);
    if (kvx_ex_cache_alloc(&mem, &lay, 0, 1)) { fprintf(stderr, "decode: cannot allocate the cache\n"); return 1; }
    cd = kvx_ex_cache_desc(&mem);
    if ((st = kvx_cache_register(ctx, &cd, &cache)) != KVX_OK) return die("decode", ctx, st);
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    if ((fd = kvx_rdv_connect(hp, 30000)) < 0 || kvx_rdv_recv(fd, RDV_MD, &md, &len, 30000)) {
        fprintf(stderr, "decode: rendezvous: %s\n", kvx_rdv_error());
        return 1;
    }
    if ((st = kvx_peer_add(ctx, md, len, &peer)) != KVX_OK) return die("decode", ctx, st);
    free(md);
    if ((st = kvx_queue_create(ctx, NULL, &q)) != KVX_OK) return die("decode", ctx, st);
    kvx_ex_poison(&mem, o->seed, dst, src, o->blocks, 0, lay.num_layers, 0, lay.num_heads);

    memset(&rd, 0, sizeof rd);
    rd.peer = peer;
    rd.cache = cache;
    rd.local_blocks = dst;
    rd.remote_blocks = src;
    rd.num_blocks = o->blocks;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t0 = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    if ((st = kvx_post(q, &rd, &t)) != KVX_OK) return die("decode: post", ctx, st);
    if ((st = kvx_wait(q, t, 60000)) != KVX_OK) return die("decode: wait", ctx, st);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t1 = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    kvx_stats(ctx, &stats);

    bad = kvx_ex_verify(&mem, o->seed, dst, src, o->blocks, 0, lay.num_layers, 0, lay.num_heads, &mm);
    kvx_rdv_send(fd, RDV_DONE, NULL, 0, 5000);
    close(fd);
    printf("transport:   %s\n", kvx_peer_transport(peer));
    printf("read:        %u blocks x %u layers x K/V, %llu bytes, %llu descriptors after merging (%llu block copies before)\n",
           o->blocks, lay.num_layers, (unsigned long long)stats.bytes_read, (unsigned long long)stats.descs_posted,
           (unsigned long long)stats.blocks_posted);
    printf("time:        %.3f ms, %.3f GB/s\n", (double)(t1 - t0) / 1e6, (double)stats.bytes_read / (double)(t1 - t0));
    if (bad) {
        printf("TEST FAILED: %llu wrong bytes; first at layer %u %s local block %u (remote %u) head %u token %u offset %llu: expected 0x%02x, found 0x%02x\n",
               (unsigned long long)bad, mm.layer, mm.plane ? "V" : "K", mm.local_block, mm.remote_block, mm.head, mm.token,
               (unsigned long long)mm.offset, mm.expected, mm.found);
    } else {
        printf("TEST PASSED: every byte of %llu checked\n", (unsigned long long)stats.bytes_read);
    }
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&mem);
    return bad ? 1 : 0;
}

int main(int argc, char **argv) {
    demo_opts o;
    uint32_t *src, *dst;
    int i, lfd, port = 0, rc, status = 0;
    pid_t pid;
    o.blocks = 128; o.num_blocks = 1000; o.num_layers = 32; o.order = KVX_ORDER_HND; o.seed = 42;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "usage: %s [--blocks N] [--num-blocks N] [--num-layers N] [--layout HND|NHD] [--seed N]\n", argv[0]); return 2; }
        if (!strcmp(a, "--blocks")) o.blocks = (uint32_t)atoi(v);
        else if (!strcmp(a, "--num-blocks")) o.num_blocks = (uint32_t)atoi(v);
        else if (!strcmp(a, "--num-layers")) o.num_layers = (uint32_t)atoi(v);
        else if (!strcmp(a, "--layout")) o.order = !strcmp(v, "NHD") ? KVX_ORDER_NHD : KVX_ORDER_HND;
        else if (!strcmp(a, "--seed")) o.seed = (uint64_t)atoll(v);
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
        i++;
    }
    if (!o.blocks || o.blocks > o.num_blocks) { fprintf(stderr, "--blocks must be in [1, --num-blocks]\n"); return 2; }
    src = (uint32_t *)malloc(o.blocks * sizeof *src);
    dst = (uint32_t *)malloc(o.blocks * sizeof *dst);
    kvx_ex_block_table(src, o.blocks, o.num_blocks, 1, o.seed, 0);
    kvx_ex_block_table(dst, o.blocks, o.num_blocks, 1, o.seed + 1, 0);
    printf("kvx_demo: pack, 1 prefill -> 1 decode, %u of %u blocks, %u layers, %s, seed %llu\n", o.blocks, o.num_blocks,
           o.num_layers, o.order == KVX_ORDER_HND ? "HND" : "NHD", (unsigned long long)o.seed);
    if ((lfd = kvx_rdv_listen("127.0.0.1:0", &port)) < 0) { fprintf(stderr, "%s\n", kvx_rdv_error()); return 1; }
    fflush(stdout);
    if ((pid = fork()) == 0) _exit(run_prefill(&o, lfd, src));
    close(lfd);
    rc = run_decode(&o, port, src, dst);
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) { fprintf(stderr, "prefill process failed (status 0x%x)\n", status); rc = 1; }
    free(src);
    free(dst);
    return rc;
}
