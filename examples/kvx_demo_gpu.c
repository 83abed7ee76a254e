/*
    kvx_demo_gpu -- a read between two processes on one GPU with the CUDA
    backend (CUDA IPC): the prefill process owns a cache in cuMemAlloc
    memory, the decode process reads a random block table of every layer
    into its own, makes its compute stream wait for the read with
    kvx_stream_wait (the host does not block), copies the blocks back behind
    that wait on the same stream and checks every byte.

        build/gpu/kvx_demo_gpu [--blocks N] [--num-layers N] [--device N] [--seed N]

    Build: -DKVX_CUDA -isystem /usr/local/cuda/include ... -lcuda -lpthread
    (tests/gpu/build.sh). TEST PASSED (exit 0) or TEST FAILED (exit 1).
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../kvx.h"
#include "kvx_rdv.h"

/* cuda.h has unnamed unions, which strict C99 pedantry flags. */
#if defined(__GNUC__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wpedantic"
#endif
#include <cuda.h>
#if defined(__GNUC__)
#  pragma GCC diagnostic pop
#endif
#include <signal.h>
#include <sys/wait.h>

#define RDV_MD 1u
#define RDV_DONE 2u
#define NUM_BLOCKS 1000u

typedef struct demo_opts { uint32_t blocks, num_layers; int device; uint64_t seed; } demo_opts;

static int cu_ok(CUresult rc, const char *what) {
    const char *name = NULL;
    if (rc == CUDA_SUCCESS) return 1;
    cuGetErrorName(rc, &name);
    fprintf(stderr, "%s: %s (%d)\n", what, name ? name : "?", (int)rc);
    return 0;
}
#define CU(call) cu_ok((call), #call)

static int die(const char *who, kvx_ctx *ctx, kvx_status st) {
    fprintf(stderr, "%s: %s: %s\n", who, kvx_status_name(st), ctx ? kvx_ctx_error(ctx) : kvx_ctx_error(NULL));
    return 1;
}

/* A GPU cache: one cuMemAlloc pool, K then V of layer 0, K then V of layer
   1, ...; 32 KiB per block, layer and K/V. */
typedef struct gpu_cache { kvx_cache_desc desc; CUdeviceptr pool; uint64_t block_bytes; } gpu_cache;

static int cache_alloc(gpu_cache *c, const demo_opts *o) {
    kvx_layout *l = &c->desc.layout;
    memset(c, 0, sizeof *c);
    l->num_layers = o->num_layers;
    l->num_blocks = NUM_BLOCKS;
    l->block_tokens = 16; l->num_heads = 8; l->head_dim = 128; l->elem_bytes = 2;
    c->block_bytes = (uint64_t)l->block_tokens * l->num_heads * l->head_dim * l->elem_bytes;
    c->desc.plane_stride = c->block_bytes * NUM_BLOCKS;
    c->desc.layer_stride = 2 * c->desc.plane_stride;
    c->desc.mem = KVX_MEM_CUDA;
    c->desc.device = o->device;
    if (!CU(cuMemAlloc(&c->pool, c->desc.layer_stride * o->num_layers))) return -1;
    c->desc.pool = (void *)(uintptr_t)c->pool;
    return 0;
}

static CUdeviceptr block_at(const gpu_cache *c, uint32_t layer, uint32_t kv, uint32_t block) {
    return c->pool + layer * c->desc.layer_stride + kv * c->desc.plane_stride + block * c->block_bytes;
}

/* The producer's bytes: a function of (seed, layer, K/V, block, offset),
   each xor flip. */
static void pattern(uint8_t *out, uint64_t bytes, uint64_t seed, uint32_t layer, uint32_t kv, uint32_t block, uint8_t flip) {
    uint64_t x = seed ^ ((uint64_t)layer << 40) ^ ((uint64_t)kv << 32) ^ block, i;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    for (i = 0; i < bytes; i++) out[i] = (uint8_t)(((x >> ((i & 7) * 8)) + (i >> 3) * 131u) ^ flip);
}

/* Write the pattern of blocks ids[] into blocks[] of every layer on the GPU:
   flip 0 on the producer; 0xFF, its complement, where a read will land, so
   that a byte never written fails. */
static int put_blocks(const gpu_cache *c, const uint32_t *blocks, const uint32_t *ids, uint32_t n, uint64_t seed, uint8_t flip) {
    uint8_t *host = (uint8_t *)malloc(c->block_bytes);
    uint32_t b, l, kv;
    int ok = host != NULL;
    for (b = 0; ok && b < n; b++)
        for (l = 0; ok && l < c->desc.layout.num_layers; l++)
            for (kv = 0; ok && kv < 2; kv++) {
                pattern(host, c->block_bytes, seed, l, kv, ids[b], flip);
                ok = CU(cuMemcpyHtoD(block_at(c, l, kv, blocks[b]), host, c->block_bytes));
            }
    free(host);
    return ok && CU(cuCtxSynchronize()) ? 0 : -1;   /* copies from pageable memory have landed */
}

/* n distinct random block ids below NUM_BLOCKS. */
static void block_table(uint32_t *out, uint32_t n, uint64_t seed) {
    uint32_t perm[NUM_BLOCKS], i;
    for (i = 0; i < NUM_BLOCKS; i++) perm[i] = i;
    for (i = 0; i < n; i++) {
        uint32_t j, t;
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        j = i + (uint32_t)((seed >> 33) % (NUM_BLOCKS - i));
        t = perm[i]; perm[i] = perm[j]; perm[j] = t;
        out[i] = perm[i];
    }
}

/* The device's primary context (the one kvx uses), current on this thread. */
static int gpu_init(int device) {
    CUdevice dev;
    CUcontext ctx;
    return CU(cuInit(0)) && CU(cuDeviceGet(&dev, device)) && CU(cuDevicePrimaryCtxRetain(&ctx, dev)) && CU(cuCtxSetCurrent(ctx)) ? 0 : -1;
}

/* The owner: fills the blocks it will be read from, ships its metadata,
   serves from its progress thread until the reader says it is done. */
static int run_prefill(const demo_opts *o, int lfd, const uint32_t *src) {
    gpu_cache mem;
    kvx_ctx_desc cd;
    kvx_ctx *ctx;
    kvx_cache *cache;
    kvx_status st;
    void *md, *done;
    size_t len = 0;
    uint32_t dlen;
    int fd;
    if (gpu_init(o->device) || cache_alloc(&mem, o) || put_blocks(&mem, src, src, o->blocks, o->seed, 0)) return 1;
    memset(&cd, 0, sizeof cd);
    cd.name = "prefill";
    cd.backend = KVX_BACKEND_CUDA;
    cd.progress_thread = 1;
    if ((st = kvx_ctx_create(&cd, &ctx)) != KVX_OK) return die("prefill", NULL, st);
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
    cuMemFree(mem.pool);
    return 0;
}

static int run_decode(const demo_opts *o, int port, const uint32_t *src, const uint32_t *dst) {
    gpu_cache mem;
    kvx_ctx_desc cd;
    kvx_read rd;
    kvx_ctx *ctx;
    kvx_cache *cache;
    kvx_peer *peer;
    kvx_queue *q;
    kvx_ticket t;
    kvx_status st;
    CUstream compute;
    uint8_t *got, *want;
    uint64_t bb, bad = 0, i, n = (uint64_t)o->blocks * o->num_layers * 2;
    uint32_t b, l, kv, len;
    char hp[64];
    void *md;
    int fd;
    if (gpu_init(o->device) || cache_alloc(&mem, o) || !CU(cuStreamCreate(&compute, CU_STREAM_NON_BLOCKING))) return 1;
    bb = mem.block_bytes;
    if (!CU(cuMemAllocHost((void **)&got, n * bb)) || !(want = (uint8_t *)malloc(bb))) return 1;
    if (put_blocks(&mem, dst, src, o->blocks, o->seed, 0xFF)) return 1;
    memset(&cd, 0, sizeof cd);
    cd.name = "decode";
    cd.backend = KVX_BACKEND_CUDA;
    if ((st = kvx_ctx_create(&cd, &ctx)) != KVX_OK) return die("decode", NULL, st);
    if ((st = kvx_cache_register(ctx, &mem.desc, &cache)) != KVX_OK) return die("decode", ctx, st);
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    if ((fd = kvx_rdv_connect(hp, 30000)) < 0 || kvx_rdv_recv(fd, RDV_MD, &md, &len, 30000)) {
        fprintf(stderr, "decode: rendezvous: %s\n", kvx_rdv_error());
        return 1;
    }
    if ((st = kvx_peer_add(ctx, md, len, &peer)) != KVX_OK) return die("decode", ctx, st);
    free(md);
    if ((st = kvx_queue_create(ctx, NULL, &q)) != KVX_OK) return die("decode", ctx, st);

    memset(&rd, 0, sizeof rd);
    rd.peer = peer;
    rd.cache = cache;
    rd.local_blocks = dst;
    rd.remote_blocks = src;
    rd.num_blocks = o->blocks;
    if ((st = kvx_post(q, &rd, &t)) != KVX_OK) return die("decode: post", ctx, st);
    /* The engine's stream waits for the read on the GPU; what it queues
       behind the wait (here: copies of the blocks to the host) runs once
       every byte has landed. */
    if ((st = kvx_stream_wait(q, t, compute)) != KVX_OK) return die("decode: stream wait", ctx, st);
    for (b = 0, i = 0; b < o->blocks; b++)
        for (l = 0; l < o->num_layers; l++)
            for (kv = 0; kv < 2; kv++, i++)
                if (!CU(cuMemcpyDtoHAsync(got + i * bb, block_at(&mem, l, kv, dst[b]), bb, compute))) return 1;
    if (!CU(cuStreamSynchronize(compute))) return 1;
    if ((st = kvx_wait(q, t, 10000)) != KVX_OK) return die("decode: wait", ctx, st);

    for (b = 0, i = 0; b < o->blocks; b++)
        for (l = 0; l < o->num_layers; l++)
            for (kv = 0; kv < 2; kv++, i++) {
                uint64_t k;
                pattern(want, bb, o->seed, l, kv, src[b], 0);
                for (k = 0; k < bb; k++) bad += got[i * bb + k] != want[k];
            }
    kvx_rdv_send(fd, RDV_DONE, NULL, 0, 5000);
    close(fd);
    printf("transport:   %s\n", kvx_peer_transport(peer));
    printf("read:        %u blocks x %u layers x K/V, %llu bytes\n", o->blocks, o->num_layers, (unsigned long long)(n * bb));
    if (bad) printf("TEST FAILED: %llu wrong bytes\n", (unsigned long long)bad);
    else printf("TEST PASSED: every byte of %llu checked behind kvx_stream_wait\n", (unsigned long long)(n * bb));
    kvx_ctx_destroy(ctx);
    cuMemFreeHost(got);
    free(want);
    cuStreamDestroy(compute);
    cuMemFree(mem.pool);
    return bad ? 1 : 0;
}

int main(int argc, char **argv) {
    demo_opts o;
    uint32_t src[NUM_BLOCKS], dst[NUM_BLOCKS];
    int i, lfd, port = 0, rc, status = 0;
    pid_t pid;
    o.blocks = 128; o.num_layers = 32; o.device = 0; o.seed = 42;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "usage: %s [--blocks N] [--num-layers N] [--device N] [--seed N]\n", argv[0]); return 2; }
        if (!strcmp(a, "--blocks")) o.blocks = (uint32_t)atoi(v);
        else if (!strcmp(a, "--num-layers")) o.num_layers = (uint32_t)atoi(v);
        else if (!strcmp(a, "--device")) o.device = atoi(v);
        else if (!strcmp(a, "--seed")) o.seed = (uint64_t)atoll(v);
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
        i++;
    }
    if (!o.blocks || o.blocks > NUM_BLOCKS || !o.num_layers) { fprintf(stderr, "--blocks must be in [1, %u], --num-layers at least 1\n", NUM_BLOCKS); return 2; }
    block_table(src, o.blocks, o.seed);
    block_table(dst, o.blocks, o.seed + 1);
    printf("kvx_demo_gpu: CUDA IPC on GPU %d, 1 prefill -> 1 decode process, %u of %u blocks, %u layers, seed %llu\n", o.device,
           o.blocks, NUM_BLOCKS, o.num_layers, (unsigned long long)o.seed);
    if ((lfd = kvx_rdv_listen("127.0.0.1:0", &port)) < 0) { fprintf(stderr, "%s\n", kvx_rdv_error()); return 1; }
    fflush(stdout);
    /* Before any CUDA call: a process may not use CUDA initialised before its fork. */
    if ((pid = fork()) == 0) _exit(run_prefill(&o, lfd, src));
    close(lfd);
    rc = run_decode(&o, port, src, dst);
    if (rc) kill(pid, SIGTERM);   /* a prefill still waiting for the reader */
    waitpid(pid, &status, 0);
    if (!rc && (!WIFEXITED(status) || WEXITSTATUS(status))) { fprintf(stderr, "prefill process failed (status 0x%x)\n", status); rc = 1; }
    return rc;
}
