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
#include "kvx_rdv.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define RDV_MD 1u
#define RDV_DONE 2u

typedef struct demo_opts {
    uint32_t blocks, num_blocks, num_layers;
    kvx_order order;
    uint64_t seed;
} demo_opts;

/* An engine's cache: one pool, K then V of layer 0, K then V of layer 1, ...
   32 KiB per block, layer and K/V. Pages never touched cost nothing. */
typedef struct demo_cache {
    kvx_cache_desc desc;
    uint8_t *pool;
    uint64_t block_bytes, bytes;
} demo_cache;

static int cache_alloc(demo_cache *c, const demo_opts *o) {
    kvx_layout *l = &c->desc.layout;
    memset(c, 0, sizeof *c);
    l->num_layers = o->num_layers;
    l->num_blocks = o->num_blocks;
    l->block_tokens = 16; l->num_heads = 8; l->head_dim = 128; l->elem_bytes = 2;
    l->order = o->order;
    c->block_bytes = (uint64_t)l->block_tokens * l->num_heads * l->head_dim * l->elem_bytes;
    c->desc.plane_stride = c->block_bytes * o->num_blocks;
    c->desc.layer_stride = 2 * c->desc.plane_stride;
    c->bytes = c->desc.layer_stride * o->num_layers;
    c->pool = (uint8_t *)mmap(NULL, c->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    c->desc.pool = c->pool;
    return c->pool == MAP_FAILED ? -1 : 0;
}

/* The producer's bytes: a function of (seed, layer, K/V, block, offset), so
   every byte that lands can be checked, and bytes of another run fail. */
static uint64_t block_word(uint64_t seed, uint32_t layer, uint32_t kv, uint32_t block) {
    uint64_t x = seed ^ ((uint64_t)layer << 40) ^ ((uint64_t)kv << 32) ^ block;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 27);
}
static uint8_t byte_of(uint64_t w, uint64_t i) { return (uint8_t)((w >> ((i & 7) * 8)) + (i >> 3) * 131u); }

/* Over blocks[] of every layer, the pattern of blocks ids[]: FILL writes it
   (the producer), POISON writes its complement before a read, so that a
   byte never written fails, CHECK counts the bytes that differ from it. */
enum { FILL, POISON, CHECK };
static uint64_t pattern(const demo_cache *c, uint64_t seed, const uint32_t *blocks, const uint32_t *ids, uint32_t n, int what) {
    uint64_t i, bad = 0;
    uint32_t b, l, kv;
    for (b = 0; b < n; b++)
        for (l = 0; l < c->desc.layout.num_layers; l++)
            for (kv = 0; kv < 2; kv++) {
                uint8_t *p = c->pool + l * c->desc.layer_stride + kv * c->desc.plane_stride + blocks[b] * c->block_bytes;
                uint64_t w = block_word(seed, l, kv, ids[b]);
                for (i = 0; i < c->block_bytes; i++) {
                    if (what == CHECK) bad += p[i] != byte_of(w, i);
                    else p[i] = what == FILL ? byte_of(w, i) : (uint8_t)~byte_of(w, i);
                }
            }
    return bad;
}

/* n distinct random block ids below num_blocks. */
static void block_table(uint32_t *out, uint32_t n, uint32_t num_blocks, uint64_t seed) {
    uint32_t *perm = (uint32_t *)malloc(num_blocks * sizeof *perm), i;
    for (i = 0; i < num_blocks; i++) perm[i] = i;
    for (i = 0; i < n; i++) {
        uint32_t j, t;
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        j = i + (uint32_t)((seed >> 33) % (num_blocks - i));
        t = perm[i]; perm[i] = perm[j]; perm[j] = t;
        out[i] = perm[i];
    }
    free(perm);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int die(const char *who, kvx_ctx *ctx, kvx_status st) {
    fprintf(stderr, "%s: %s: %s\n", who, kvx_status_name(st), ctx ? kvx_ctx_error(ctx) : kvx_ctx_error(NULL));
    return 1;
}

/* The owner: registers its cache, ships its metadata, serves reads from its
   progress thread until the reader says it is done. */
static int run_prefill(const demo_opts *o, int lfd, const uint32_t *src) {
    demo_cache mem;
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
    if (cache_alloc(&mem, o)) { fprintf(stderr, "prefill: cannot allocate the cache\n"); return 1; }
    pattern(&mem, o->seed, src, src, o->blocks, FILL);
    if ((st = kvx_cache_register(ctx, &mem.desc, &cache)) != KVX_OK) return die("prefill", ctx, st);
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
    munmap(mem.pool, mem.bytes);
    return 0;
}

static int run_decode(const demo_opts *o, int port, const uint32_t *src, const uint32_t *dst) {
    demo_cache mem;
    kvx_ctx_desc cdesc;
    kvx_read rd;
    kvx_ctx *ctx;
    kvx_cache *cache;
    kvx_peer *peer;
    kvx_queue *q;
    kvx_ticket t;
    kvx_status st;
    kvx_stats stats;
    char hp[64];
    void *md;
    uint32_t len;
    uint64_t bad, t0, t1;
    int fd;
    memset(&cdesc, 0, sizeof cdesc);
    cdesc.name = "decode";
    if ((st = kvx_ctx_create(&cdesc, &ctx)) != KVX_OK) return die("decode", NULL, st);
    if (cache_alloc(&mem, o)) { fprintf(stderr, "decode: cannot allocate the cache\n"); return 1; }
    if ((st = kvx_cache_register(ctx, &mem.desc, &cache)) != KVX_OK) return die("decode", ctx, st);
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    if ((fd = kvx_rdv_connect(hp, 30000)) < 0 || kvx_rdv_recv(fd, RDV_MD, &md, &len, 30000)) {
        fprintf(stderr, "decode: rendezvous: %s\n", kvx_rdv_error());
        return 1;
    }
    if ((st = kvx_peer_add(ctx, md, len, &peer)) != KVX_OK) return die("decode", ctx, st);
    free(md);
    if ((st = kvx_queue_create(ctx, NULL, &q)) != KVX_OK) return die("decode", ctx, st);
    pattern(&mem, o->seed, dst, src, o->blocks, POISON);

    memset(&rd, 0, sizeof rd);
    rd.peer = peer;
    rd.cache = cache;
    rd.local_blocks = dst;
    rd.remote_blocks = src;
    rd.num_blocks = o->blocks;
    t0 = now_ns();
    if ((st = kvx_post(q, &rd, &t)) != KVX_OK) return die("decode: post", ctx, st);
    if ((st = kvx_wait(q, t, 60000)) != KVX_OK) return die("decode: wait", ctx, st);
    t1 = now_ns();
    kvx_stats(ctx, &stats);

    bad = pattern(&mem, o->seed, dst, src, o->blocks, CHECK);
    kvx_rdv_send(fd, RDV_DONE, NULL, 0, 5000);
    close(fd);
    printf("transport:   %s\n", kvx_peer_transport(peer));
    printf("read:        %u blocks x %u layers x K/V, %llu bytes, %llu descriptors after merging (%llu block copies before)\n",
           o->blocks, o->num_layers, (unsigned long long)stats.bytes_read, (unsigned long long)stats.descs_posted,
           (unsigned long long)stats.blocks_posted);
    printf("time:        %.3f ms, %.3f GB/s\n", (double)(t1 - t0) / 1e6, (double)stats.bytes_read / (double)(t1 - t0));
    if (bad) printf("TEST FAILED: %llu wrong bytes\n", (unsigned long long)bad);
    else printf("TEST PASSED: every byte of %llu checked\n", (unsigned long long)stats.bytes_read);
    kvx_ctx_destroy(ctx);
    munmap(mem.pool, mem.bytes);
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
    block_table(src, o.blocks, o.num_blocks, o.seed);
    block_table(dst, o.blocks, o.num_blocks, o.seed + 1);
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
