/*
    test_cuda -- the CUDA part of kvx on a GPU machine: what registration
    refuses, byte-verified reads from owner processes (cuMemAlloc, VMM made of
    several allocations, pools; HND and NHD; TP splits), stream-ordered
    completion (a checking kernel behind kvx_stream_wait, also inside a CUDA
    graph replayed over 24 reads), failed reads that must release a waiting
    stream, UCX host reads completing on a stream, verify mode on GPU caches
    (sealed and checked by kernels; planted corruption, an unsealed block, a
    waiting stream), and two GPUs where there are two.

    Owners are this binary re-executed ("--serve"); every wait is bounded.
    KVX_TEST_ONLY=substring runs the cases whose name contains it. The device
    is 0 (CUDA_VISIBLE_DEVICES picks it); the two-GPU case needs two visible.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
/* Plants corruption on the GPU between a verified read's copy and its check:
   in stream order, a byte set to what the read does not bring. */
static volatile int plant_armed;
static unsigned long long plant_addr;
static unsigned char plant_value;
#define KVX_TEST_HOOK_CUDA_BEFORE_CHECK(rd, stream) \
    do { \
        if (plant_armed) { cuMemsetD8Async((CUdeviceptr)plant_addr, plant_value, 1, (CUstream)(stream)); plant_armed = 0; } \
        (void)(rd); \
    } while (0)
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include "../lib/kvx_test.h"
#include "../lib/kvx_cuda_test.h"

#define NB 64u
#define LAYERS 4u
#define HEADS 4u
#define SEED 0x5eedull

static kvx_tc_kernels K;
static int ndev;
static int dec_checksums;  /* dec_open registers its cache with checksums */
/* The backend of the reads of case_reads (owners and reader): CUDA, or UCX
   for GPU caches over a CUDA-aware UCX; and the reader's warnings. */
static kvx_backend dec_backend = KVX_BACKEND_CUDA;
static char dec_warned[2048], dec_transport[160];

static void dec_log(kvx_log_level level, const char *msg, void *user) {
    size_t n = strlen(dec_warned);
    (void)user;
    /* every warning, in order (software RMA's own comes before the path's) */
    if (level <= KVX_LOG_WARN && n + 2 < sizeof dec_warned)
        snprintf(dec_warned + n, sizeof dec_warned - n, "%s%s", n ? " | " : "", msg);
    fprintf(stderr, "kvx: %s\n", msg);
}

static kvx_layout lay_of(int tp, kvx_order order) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = LAYERS;
    l.num_blocks = NB;
    l.block_tokens = 16;
    l.total_heads = HEADS;
    l.num_heads = HEADS / (uint32_t)tp;
    l.head_dim = 64;
    l.elem_bytes = 2;
    l.order = order;
    return l;
}

static kvx_tc_owner_args owner_args(int backend, int gpu, int device, int kind, int rank, int tp, kvx_order order) {
    kvx_tc_owner_args a;
    memset(&a, 0, sizeof a);
    a.backend = backend; a.gpu = gpu; a.device = device; a.kind = kind;
    a.rank = rank; a.tp = tp; a.progress = 1; a.seed = SEED;
    a.lay = lay_of(tp, order);
    return a;
}

/* The reading side, in this process. */
typedef struct dec {
    kvx_ctx *ctx;
    kvx_ex_gpu g;
    kvx_cache *cache;
    kvx_queue *q;
} dec;

static void dec_close(dec *d) {
    if (d->ctx) kvx_ctx_destroy(d->ctx);
    if (d->g.mem) kvx_ex_gpu_free(&d->g);
    memset(d, 0, sizeof *d);
}

static int dec_open(dec *d, int device, int rank, int tp, kvx_order order, int kind, const kvx_queue_desc *qd) {
    kvx_ctx_desc cd;
    kvx_cache_desc c;
    kvx_layout l = lay_of(tp, order);
    memset(d, 0, sizeof *d);
    memset(&cd, 0, sizeof cd);
    cd.name = "decode";
    cd.tp_rank = rank;
    cd.tp_size = tp;
    cd.backend = dec_backend;
    if (dec_backend == KVX_BACKEND_UCX) { cd.progress_thread = 1; cd.log_fn = dec_log; dec_warned[0] = 0; }
    if (kvx_ex_gpu_init(device, NULL) || kvx_ex_gpu_alloc(&d->g, &l, rank, tp, device, (kvx_ex_gpu_kind)kind)) { T_FAILF("decode cache: %s", kvx_ex_gpu_err); return -1; }
    if (kvx_ctx_create(&cd, &d->ctx) != KVX_OK) { T_FAILF("kvx_ctx_create: %s", kvx_ctx_error(NULL)); dec_close(d); return -1; }
    c = kvx_ex_gpu_desc(&d->g);
    c.checksums = dec_checksums;
    if (kvx_cache_register(d->ctx, &c, &d->cache) != KVX_OK) { T_FAILF("register: %s", kvx_ctx_error(d->ctx)); dec_close(d); return -1; }
    if (kvx_queue_create(d->ctx, qd, &d->q) != KVX_OK) { T_FAILF("queue: %s", kvx_ctx_error(d->ctx)); dec_close(d); return -1; }
    return 0;
}

static kvx_read read_of(kvx_peer *p, kvx_cache *c, const uint32_t *dst, const uint32_t *src, uint32_t n) {
    kvx_read r;
    memset(&r, 0, sizeof r);
    r.peer = p; r.cache = c; r.local_blocks = dst; r.remote_blocks = src; r.num_blocks = n;
    return r;
}

/* Poison where each peer's heads of dst will land (pf, pc: those heads)
   and push the cache to the GPU. 0, or -1 after a test failure. */
static int poison_push(dec *d, kvx_peer **peers, int np, const uint32_t *dst, const uint32_t *src, uint32_t n, uint32_t *pf, uint32_t *pc) {
    int k;
    for (k = 0; k < np; k++) {
        kvx_peer_heads(peers[k], d->cache, 0, &pf[k], &pc[k]);
        kvx_ex_poison(&d->g.host, SEED, dst, src, n, 0, LAYERS, pf[k], pf[k] + pc[k]);
    }
    if (kvx_ex_gpu_push(&d->g)) { T_FAILF("push: %s", kvx_ex_gpu_err); return -1; }
    return 0;
}

/* Read n blocks from every peer into d and check every byte; notify: ask for
   a notification per read. Returns the wrong bytes, or -1 if a read failed. */
static long long read_verify(dec *d, kvx_peer **peers, int np, const uint32_t *dst, const uint32_t *src, uint32_t n, int notify) {
    uint32_t pf[8], pc[8];
    kvx_ticket t[8];
    long long bad = 0;
    int k;
    if (poison_push(d, peers, np, dst, src, n, pf, pc)) return -1;
    for (k = 0; k < np; k++) {
        kvx_read r = read_of(peers[k], d->cache, dst, src, n);
        r.notify = notify;
        r.notify_id = 1000u + (uint64_t)k;
        if (kvx_post(d->q, &r, &t[k]) != KVX_OK) { T_FAILF("kvx_post: %s", kvx_ctx_error(d->ctx)); return -1; }
    }
    for (k = 0; k < np; k++) {
        kvx_status st = kvx_wait(d->q, t[k], 30000);
        if (st != KVX_OK) { T_FAILF("kvx_wait: %s: %s", kvx_status_name(st), kvx_ctx_error(d->ctx)); return -1; }
    }
    if (kvx_ex_gpu_pull(&d->g)) { T_FAILF("pull: %s", kvx_ex_gpu_err); return -1; }
    for (k = 0; k < np; k++) {
        kvx_ex_mismatch mm;
        uint64_t b;
        memset(&mm, 0, sizeof mm);
        b = kvx_ex_verify(&d->g.host, SEED, dst, src, n, 0, LAYERS, pf[k], pf[k] + pc[k], &mm);
        if (b && !bad)
            T_FAILF("%llu wrong bytes from peer %d: layer %u plane %u block %u<-%u head %u token %u offset %llu: 0x%02x, expected 0x%02x",
                    (unsigned long long)b, k, mm.layer, mm.plane, mm.local_block, mm.remote_block, mm.head, mm.token,
                    (unsigned long long)mm.offset, mm.found, mm.expected);
        bad += (long long)b;
    }
    return bad;
}

static kvx_peer *add_peer(kvx_ctx *ctx, const void *md, uint32_t len) {
    kvx_peer *p = NULL;
    if (kvx_peer_add(ctx, md, len, &p) != KVX_OK) T_FAILF("kvx_peer_add: %s", kvx_ctx_error(ctx));
    return p;
}

/*--- refusals -------------------------------------------------------------*/

static void case_refuse_host(void) {
    dec d;
    kvx_ex_cache h;
    kvx_cache_desc c;
    kvx_cache *cache;
    kvx_queue_desc qd;
    kvx_layout l = lay_of(1, KVX_ORDER_HND);
    memset(&qd, 0, sizeof qd);
    if (dec_open(&d, 0, 0, 1, KVX_ORDER_HND, KVX_EX_CUMEMALLOC, &qd)) return;
    if (kvx_ex_cache_alloc(&h, &l, 0, 1)) { T_FAILF("host alloc"); dec_close(&d); return; }
    c = kvx_ex_cache_desc(&h);
    T_ST(kvx_cache_register(d.ctx, &c, &cache), KVX_ERR_UNSUPPORTED);
    T_HAS(kvx_ctx_error(d.ctx), "UCX or libfabric");
    c.mem = KVX_MEM_CUDA;  /* host memory that claims to be GPU memory */
    T_ST(kvx_cache_register(d.ctx, &c, &cache), KVX_ERR_UNSUPPORTED);
    T_HAS(kvx_ctx_error(d.ctx), "not device memory");
    kvx_ex_cache_free(&h);
    dec_close(&d);
}

static void case_refuse_kind(int kind, const char *needle) {
    dec d;
    kvx_ex_gpu g;
    kvx_cache_desc c;
    kvx_cache *cache;
    kvx_queue_desc qd;
    kvx_layout l = lay_of(1, KVX_ORDER_HND);
    memset(&qd, 0, sizeof qd);
    if (dec_open(&d, 0, 0, 1, KVX_ORDER_HND, KVX_EX_CUMEMALLOC, &qd)) return;
    if (kvx_ex_gpu_alloc(&g, &l, 0, 1, 0, (kvx_ex_gpu_kind)kind)) { T_FAILF("alloc %s: %s", kvx_ex_gpu_kind_name((kvx_ex_gpu_kind)kind), kvx_ex_gpu_err); dec_close(&d); return; }
    c = kvx_ex_gpu_desc(&g);
    T_ST(kvx_cache_register(d.ctx, &c, &cache), KVX_ERR_UNSUPPORTED);
    T_HAS(kvx_ctx_error(d.ctx), needle);
    printf("    refused: %.200s\n", kvx_ctx_error(d.ctx));
    kvx_ex_gpu_free(&g);
    dec_close(&d);
}

static void case_refuse_other_host(void) {
    kvx_ctx_desc cd;
    kvx_ctx *a = NULL, *b = NULL;
    kvx_ex_gpu g;
    kvx_cache_desc c;
    kvx_cache *cache;
    kvx_peer *p;
    kvx_layout l = lay_of(1, KVX_ORDER_HND);
    size_t len = 0;
    void *md;
    memset(&cd, 0, sizeof cd);
    cd.backend = KVX_BACKEND_CUDA;
    cd.name = "prefill"; cd.host_id = "host-a";
    if (kvx_ctx_create(&cd, &a) != KVX_OK) { T_FAILF("ctx: %s", kvx_ctx_error(NULL)); return; }
    cd.name = "decode"; cd.host_id = "host-b";
    if (kvx_ctx_create(&cd, &b) != KVX_OK) { T_FAILF("ctx: %s", kvx_ctx_error(NULL)); kvx_ctx_destroy(a); return; }
    if (kvx_ex_gpu_alloc(&g, &l, 0, 1, 0, KVX_EX_CUMEMALLOC)) { T_FAILF("alloc: %s", kvx_ex_gpu_err); goto out; }
    c = kvx_ex_gpu_desc(&g);
    if (kvx_cache_register(a, &c, &cache) != KVX_OK) { T_FAILF("register: %s", kvx_ctx_error(a)); goto out; }
    kvx_metadata(a, NULL, &len);
    md = malloc(len);
    kvx_metadata(a, md, &len);
    T_ST(kvx_peer_add(b, md, len, &p), KVX_ERR_UNSUPPORTED);
    T_HAS(kvx_ctx_error(b), "is on host \"host-a\"");
    T_HAS(kvx_ctx_error(b), "within one host");
    free(md);
out:
    kvx_ctx_destroy(b);
    kvx_ctx_destroy(a);
    if (g.mem) kvx_ex_gpu_free(&g);
}

#if defined(KVX_UCX)
/* Does this UCX take GPU memory (built with CUDA)? 1 yes, 0 no (refused as
   kvx refuses a UCX without CUDA), -1 failed otherwise (the case fails). */
static int ucx_takes_gpu(kvx_ctx *u) {
    kvx_status st = kvx_tc_try_gpu_cache(u, 0);
    if (st == KVX_OK) return 1;
    if (st != KVX_ERR_NOMEM && strstr(kvx_ctx_error(u), "without CUDA support")) return 0;
    T_FAILF("a GPU cache over UCX: %s", st == KVX_ERR_NOMEM ? kvx_ex_gpu_err : kvx_ctx_error(u));
    return -1;
}

static void case_ucx_gpu(void) {
    kvx_ctx_desc cd;
    kvx_ctx *u = NULL;
    kvx_status st;
    memset(&cd, 0, sizeof cd);
    cd.backend = KVX_BACKEND_UCX;
    if (kvx_ctx_create(&cd, &u) != KVX_OK) { T_FAILF("ctx: %s", kvx_ctx_error(NULL)); return; }
    st = kvx_tc_try_gpu_cache(u, 0);
    if (st == KVX_OK) printf("    this UCX takes GPU memory (built with CUDA): nothing to refuse\n");
    else if (st == KVX_ERR_NOMEM) T_FAILF("alloc: %s", kvx_ex_gpu_err);
    else {
        T_EQ(st, KVX_ERR_UNSUPPORTED);
        T_HAS(kvx_ctx_error(u), "without CUDA support");
        printf("    refused: %.200s\n", kvx_ctx_error(u));
    }
    kvx_ctx_destroy(u);
}
#endif

/*--- reads ----------------------------------------------------------------*/

static int out_read(CUdeviceptr out, uint64_t v[2]);

/* One read from every peer, then on stream s2 a kvx_stream_wait for each and
   a kernel that compares the whole cache with the image it must hold: a
   missing or early wait shows as wrong words. Returns 0 when all matched. */
static int stream_check(dec *d, const kvx_tc_kernels *kd, kvx_peer **peers, int np, const uint32_t *dst, const uint32_t *src, uint32_t n, CUstream s2) {
    uint32_t pf[8], pc[8];
    kvx_ticket t[8];
    CUdeviceptr e = 0, out = 0;
    uint64_t v[2] = {0, 0};
    const volatile uint64_t *word;
    int k, rc = -1;
    if (poison_push(d, peers, np, dst, src, n, pf, pc)) return -1;
    for (k = 0; k < np; k++) kvx_tc_expect(&d->g.host, SEED, dst, src, n, 0, LAYERS, pf[k], pf[k] + pc[k]);
    if (kvx_ex_cu(cuMemAlloc(&e, d->g.bytes), "cuMemAlloc") || kvx_ex_cu(cuMemAlloc(&out, 16), "cuMemAlloc") ||
        kvx_ex_cu(cuMemcpyHtoD(e, d->g.host.mem, d->g.bytes), "upload the expected image") || kvx_ex_cu(cuMemsetD8(out, 0, 16), "cuMemsetD8") ||
        kvx_ex_cu(cuCtxSynchronize(), "cuCtxSynchronize")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
    for (k = 0; k < np; k++) {  /* after the synchronize: only the waits below may order the check behind the reads */
        kvx_read r = read_of(peers[k], d->cache, dst, src, n);
        if (kvx_post(d->q, &r, &t[k]) != KVX_OK) { T_FAILF("kvx_post: %s", kvx_ctx_error(d->ctx)); goto out; }
    }
    for (k = 0; k < np; k++)
        if (kvx_stream_wait(d->q, t[k], s2) != KVX_OK) { T_FAILF("kvx_stream_wait: %s", kvx_ctx_error(d->ctx)); goto out; }
    if (!(word = kvx_stream_status_ptr(d->q, t[np - 1]))) { T_FAILF("kvx_stream_status_ptr: %s", kvx_ctx_error(d->ctx)); goto out; }
    if (kvx_tc_check(kd, s2, d->g.mem, e, d->g.bytes / 4, (CUdeviceptr)(uintptr_t)word, out) || kvx_tc_sync(s2, 10000) || out_read(out, v)) {
        T_FAILF("checking kernel: %s", kvx_ex_gpu_err);
        goto out;
    }
    T_EQ(v[0], 0);                          /* every word as expected once the waits let it run */
    T_EQ(v[1], (t[np - 1] << 2) | 1u);      /* ... and it saw the last read done */
    for (k = 0; k < np; k++) T_ST(kvx_wait(d->q, t[k], 10000), KVX_OK);
    rc = v[0] == 0 ? 0 : -1;
out:
    if (e) cuMemFree(e);
    if (out) cuMemFree(out);
    return rc;
}

/* ptp owner processes (kind, on dev_owner) -> decode rank drank of dtp on
   dev_dec; random or consecutive blocks. Across GPUs, a third read is
   checked by a kernel behind kvx_stream_wait. */
static void case_reads(int kind, int dkind, kvx_order order, int ptp, int dtp, int drank, int random, int dev_owner, int dev_dec, const char *want) {
    kvx_tc_owner own[4];
    kvx_peer *peers[4], *src_peers[4];
    int used[4] = {0, 0, 0, 0};
    dec d;
    kvx_queue_desc qd;
    uint32_t src[24], dst[24], i, first, count;
    int k, np = 0, nsrc = 0, notes;
    CUstream s1 = NULL, s2 = NULL;
    static kvx_tc_kernels kdec;  /* the test kernels, loaded in the decode GPU's context */
    static int kdec_dev = -1;
    memset(&qd, 0, sizeof qd);
    for (k = 0; k < ptp; k++) own[k].pid = -1;
    if (dev_owner != dev_dec || dec_backend != KVX_BACKEND_CUDA) {  /* a third read checked behind kvx_stream_wait */
        if (kvx_ex_gpu_init(dev_dec, NULL) || kvx_ex_cu(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING), "stream") ||
            kvx_ex_cu(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING), "stream")) { T_FAILF("%s", kvx_ex_gpu_err); return; }
        if (kdec_dev != dev_dec) {
            if (kvx_tc_load(&kdec)) { T_FAILF("test kernels on GPU %d: %s", dev_dec, kvx_ex_gpu_err); return; }
            kdec_dev = dev_dec;
        }
        qd.cuda.stream = s1;
    }
    for (k = 0; k < ptp; k++) {
        kvx_tc_owner_args a = owner_args(dec_backend, 1, dev_owner, kind, k, ptp, order);
        void *md;
        uint32_t len;
        own[k] = kvx_tc_spawn(&a, &md, &len);
        if (own[k].pid < 0) { T_FAILF("owner %d did not start", k); goto out; }
        if (!np && dec_open(&d, dev_dec, drank, dtp, order, dkind, &qd)) { free(md); goto out; }
        np = 1;
        peers[k] = add_peer(d.ctx, md, len);
        free(md);
        if (!peers[k]) goto out;
        if (want) T_HAS(kvx_peer_transport(peers[k]), want);
        if (!k) snprintf(dec_transport, sizeof dec_transport, "%s", kvx_peer_transport(peers[k]));
        kvx_peer_heads(peers[k], d.cache, 0, &first, &count);
        if (count) { src_peers[nsrc++] = peers[k]; used[k] = 1; }  /* only owners of our heads */
    }
    kvx_ex_block_table(src, 24, NB, random, 11, 5);
    kvx_ex_block_table(dst, 24, NB, random, 12, 30);
    if (read_verify(&d, src_peers, nsrc, dst, src, 24, 1) != 0) goto out;
    for (i = 0; i < 24; i++) src[i] = (src[i] + 7) % NB;  /* a second read into the same blocks */
    if (read_verify(&d, src_peers, nsrc, dst, src, 24, 1) != 0) goto out;
    if (s2) {
        for (i = 0; i < 24; i++) src[i] = (src[i] + 5) % NB;
        if (stream_check(&d, &kdec, src_peers, nsrc, dst, src, 24, s2) != 0) goto out;
        printf("    checked on the GPU behind kvx_stream_wait\n");
    }
    printf("    %s -> %s, TP %d -> %d (rank %d, %d source(s)), %s %s: %s\n", kvx_ex_gpu_kind_name((kvx_ex_gpu_kind)kind), kvx_ex_gpu_kind_name((kvx_ex_gpu_kind)dkind),
           ptp, dtp, drank, nsrc, order == KVX_ORDER_HND ? "HND" : "NHD", random ? "random" : "consecutive", kvx_peer_transport(peers[0]));
out:
    if (np) dec_close(&d);
    for (k = 0; k < ptp; k++) {
        if (own[k].pid < 0) continue;
        notes = kvx_tc_stop(&own[k]);
        if (!kvx_t_case_failed && notes != (used[k] ? 2 : 0)) T_FAILF("owner %d received %d notifications, expected %d", k, notes, used[k] ? 2 : 0);
    }
    if (s1) { kvx_tc_sync(s1, 5000); cuStreamDestroy(s1); }
    if (s2) { kvx_tc_sync(s2, 5000); cuStreamDestroy(s2); }
}

#if defined(KVX_UCX)
/* GPU caches read over UCX, where UCX is built with CUDA (the libucx wheel):
   case_reads with UCX owners and reader, under UCX_TLS=tls (NULL: UCX's
   choice) and UCX_CUDA_IPC_ENABLE_GET_ZCOPY=get (NULL: UCX's default, which
   turns cuda_ipc gets off without NVLink). The transport must be cuda_ipc
   (want_ipc), or else name the path taken, with a warning that says it is
   not cuda_ipc: never silently. */
static void case_ucx_gpu_reads(const char *tls, const char *get, int kind, int dkind, kvx_order order, int ptp, int dtp, int drank, int random, int want_ipc) {
    char *old = getenv("UCX_TLS") ? strdup(getenv("UCX_TLS")) : NULL;
    kvx_ctx_desc cd;
    kvx_ctx *u = NULL;
    memset(&cd, 0, sizeof cd);
    cd.backend = KVX_BACKEND_UCX;
    if (tls) setenv("UCX_TLS", tls, 1);
    /* Staged through TCP, UCX serves the gets in software: kvx reads such a
       cache only with software RMA on (make test-gpu's kvx_bench entry checks
       the refusal without it) */
    if (tls && strstr(tls, "tcp")) setenv("KVX_UCX_SOFTWARE_RMA", "1", 1);
    if (get) setenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", get, 1);
    if (kvx_ctx_create(&cd, &u) != KVX_OK) { T_FAILF("ctx: %s", kvx_ctx_error(NULL)); goto out; }
    switch (ucx_takes_gpu(u)) {
    case 0: T_SKIP("this UCX takes no GPU memory: %s", kvx_ctx_error(u)); goto out;
    case 1: break;
    default: goto out;  /* failed, saying why */
    }
    kvx_ctx_destroy(u);
    u = NULL;
    dec_backend = KVX_BACKEND_UCX;
    dec_transport[0] = 0;
    case_reads(kind, dkind, order, ptp, dtp, drank, random, 0, 0, want_ipc ? "ucx:cuda_ipc" : NULL);
    dec_backend = KVX_BACKEND_CUDA;
    printf("    UCX_TLS=%s, UCX_CUDA_IPC_ENABLE_GET_ZCOPY=%s: %s%s%.600s\n", tls ? tls : "(UCX's choice)", get ? get : "(default)",
           dec_transport, dec_warned[0] ? "; warned: " : "", dec_warned);
    if (!kvx_t_case_failed) {
        if (strstr(dec_transport, "cuda_ipc")) T_CHECK(!dec_warned[0] || !strstr(dec_warned, "not cuda_ipc"));
        else {
            T_CHECK(!want_ipc);
            T_HAS(dec_warned, "not cuda_ipc");  /* the fallback is said */
            T_CHECK(dec_transport[0] != 0);
        }
    }
out:
    dec_backend = KVX_BACKEND_CUDA;
    if (u) kvx_ctx_destroy(u);
    if (old) { setenv("UCX_TLS", old, 1); free(old); } else unsetenv("UCX_TLS");
    unsetenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY");
    unsetenv("KVX_UCX_SOFTWARE_RMA");
}
#endif

static void case_same_process(void) {
    kvx_ctx_desc cd;
    kvx_ctx *a = NULL;
    kvx_ex_gpu g;
    kvx_cache_desc c;
    kvx_cache *cache;
    kvx_queue_desc qd;
    kvx_peer *p;
    dec d;
    uint32_t src[16], dst[16], all[NB], i;
    size_t len = 0;
    void *md;
    kvx_layout l = lay_of(1, KVX_ORDER_NHD);
    memset(&qd, 0, sizeof qd);
    memset(&g, 0, sizeof g);
    if (dec_open(&d, 0, 0, 1, KVX_ORDER_NHD, KVX_EX_CUMEMALLOC, &qd)) return;
    memset(&cd, 0, sizeof cd);
    cd.backend = KVX_BACKEND_CUDA; cd.name = "prefill"; cd.progress_thread = 1;
    if (kvx_ctx_create(&cd, &a) != KVX_OK) { T_FAILF("ctx: %s", kvx_ctx_error(NULL)); goto out; }
    if (kvx_ex_gpu_alloc(&g, &l, 0, 1, 0, KVX_EX_VMM)) { T_FAILF("alloc: %s", kvx_ex_gpu_err); goto out; }
    for (i = 0; i < NB; i++) all[i] = i;
    kvx_ex_fill(&g.host, SEED, all, NB);
    if (kvx_ex_gpu_push(&g)) { T_FAILF("push"); goto out; }
    c = kvx_ex_gpu_desc(&g);
    if (kvx_cache_register(a, &c, &cache) != KVX_OK) { T_FAILF("register: %s", kvx_ctx_error(a)); goto out; }
    kvx_metadata(a, NULL, &len);
    md = malloc(len);
    kvx_metadata(a, md, &len);
    p = add_peer(d.ctx, md, (uint32_t)len);
    free(md);
    if (!p) goto out;
    T_HAS(kvx_peer_transport(p), "cuda:ipc same-gpu");
    T_HAS(kvx_peer_transport(p), "same process");
    kvx_ex_block_table(src, 16, NB, 1, 3, 0);
    kvx_ex_block_table(dst, 16, NB, 1, 4, 0);
    read_verify(&d, &p, 1, dst, src, 16, 0);
out:
    dec_close(&d);
    if (a) kvx_ctx_destroy(a);
    if (g.mem) kvx_ex_gpu_free(&g);
}

/*--- stream-ordered completion --------------------------------------------*/

/* Per-case GPU state of the stream tests. */
typedef struct sw {
    dec d;
    kvx_tc_owner own;
    kvx_peer *peer;
    CUstream s1, s2, s3;
    CUdeviceptr e[4], out[4];
    uint32_t *gate;
    CUdeviceptr gate_d;
} sw;

static void sw_close(sw *w) {
    int i;
    if (w->gate) { *(volatile uint32_t *)w->gate = 0x10000000u; __sync_synchronize(); }  /* open every gate (GEQ is cyclic: stay far below 2^31) */
    if (w->d.ctx) dec_close(&w->d);
    if (w->own.pid > 0) kvx_tc_stop(&w->own);
    for (i = 0; i < 4; i++) { if (w->e[i]) cuMemFree(w->e[i]); if (w->out[i]) cuMemFree(w->out[i]); }
    if (w->s1) { kvx_tc_sync(w->s1, 5000); cuStreamDestroy(w->s1); }
    if (w->s2) { kvx_tc_sync(w->s2, 5000); cuStreamDestroy(w->s2); }
    if (w->s3) { kvx_tc_sync(w->s3, 5000); cuStreamDestroy(w->s3); }
    if (w->gate) cuMemFreeHost(w->gate);
    memset(w, 0, sizeof *w);
}

/* oa: the owner's arguments; NULL: a cuMemAlloc HND cache, TP 1. */
static int sw_open(sw *w, const kvx_tc_owner_args *oa, uint32_t depth, uint32_t max_ops) {
    kvx_tc_owner_args a = oa ? *oa : owner_args(KVX_BACKEND_CUDA, 1, 0, KVX_EX_CUMEMALLOC, 0, 1, KVX_ORDER_HND);
    kvx_queue_desc qd;
    void *md;
    uint32_t len;
    int i;
    memset(w, 0, sizeof *w);
    w->own = kvx_tc_spawn(&a, &md, &len);
    if (w->own.pid < 0) { T_FAILF("owner did not start"); return -1; }
    if (kvx_ex_gpu_init(0, NULL) || kvx_ex_cu(cuStreamCreate(&w->s1, CU_STREAM_NON_BLOCKING), "stream") ||
        kvx_ex_cu(cuStreamCreate(&w->s2, CU_STREAM_NON_BLOCKING), "stream") || kvx_ex_cu(cuStreamCreate(&w->s3, CU_STREAM_NON_BLOCKING), "stream") ||
        kvx_ex_cu(cuMemHostAlloc((void **)&w->gate, 64, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc") ||
        kvx_ex_cu(cuMemHostGetDevicePointer(&w->gate_d, w->gate, 0), "cuMemHostGetDevicePointer")) {
        T_FAILF("%s", kvx_ex_gpu_err);
        free(md);
        return -1;
    }
    *w->gate = 0;
    memset(&qd, 0, sizeof qd);
    qd.depth = depth;
    qd.max_ops = max_ops;
    qd.cuda.stream = w->s1;
    if (dec_open(&w->d, 0, 0, 1, KVX_ORDER_HND, KVX_EX_CUMEMALLOC, &qd)) { free(md); return -1; }
    w->peer = add_peer(w->d.ctx, md, len);
    free(md);
    if (!w->peer) return -1;
    for (i = 0; i < 4; i++)
        if (kvx_ex_cu(cuMemAlloc(&w->e[i], w->d.g.bytes), "cuMemAlloc") || kvx_ex_cu(cuMemAlloc(&w->out[i], 16), "cuMemAlloc")) { T_FAILF("%s", kvx_ex_gpu_err); return -1; }
    return 0;
}

/* The decode cache poisoned where dst will land (pushed to the GPU), and the
   image it must hold afterwards (uploaded to e). The staging copy ends as
   that image. */
static int sw_prepare(sw *w, const uint32_t *dst, const uint32_t *src, uint32_t n, CUdeviceptr e) {
    kvx_ex_poison(&w->d.g.host, SEED, dst, src, n, 0, LAYERS, 0, HEADS);
    if (kvx_ex_gpu_push(&w->d.g)) return -1;
    kvx_tc_expect(&w->d.g.host, SEED, dst, src, n, 0, LAYERS, 0, HEADS);
    /* Pageable uploads return before they land: synchronize (kvx_ex_gpu_push). */
    return kvx_ex_cu(cuMemcpyHtoD(e, w->d.g.host.mem, w->d.g.bytes), "upload the expected image") || kvx_ex_cu(cuCtxSynchronize(), "cuCtxSynchronize");
}

static int out_read(CUdeviceptr out, uint64_t v[2]) { return kvx_ex_cu(cuMemcpyDtoH(v, out, 16), "cuMemcpyDtoH"); }

static void gate_open(sw *w, uint32_t v) { __sync_synchronize(); *(volatile uint32_t *)w->gate = v; __sync_synchronize(); }

/* Verify mode on GPU caches: the owner seals blocks [0, 32) on its GPU. */
static kvx_status verified(dec *d, kvx_peer *p, const uint32_t *dst, const uint32_t *src, uint32_t n, uint32_t verify, kvx_ticket *tk) {
    kvx_read r = read_of(p, d->cache, dst, src, n);
    kvx_ticket t;
    r.verify = verify;
    if (kvx_post(d->q, &r, &t) != KVX_OK) return KVX_ERR_ARG;
    if (tk) *tk = t;
    return kvx_wait(d->q, t, 30000);
}

/* The next verified read gets a wrong byte where the host image (pulled after
   a clean read of the same blocks) has byte *h. */
static void plant(const dec *d, const uint8_t *h) {
    plant_addr = (unsigned long long)(d->g.mem + (CUdeviceptr)(h - d->g.host.mem));
    plant_value = (unsigned char)(*h ^ 0x20);
    plant_armed = 1;
}

static void case_verify(void) {
    kvx_tc_owner_args a = owner_args(KVX_BACKEND_CUDA, 1, 0, KVX_EX_CUMEMALLOC, 0, 1, KVX_ORDER_NHD);
    kvx_tc_owner own;
    kvx_queue_desc qd;
    kvx_peer *p = NULL;
    dec d;
    void *md = NULL;
    uint32_t len, src[16], dst[16], bad_src[2] = {3, 40}, bad_dst[2] = {50, 51};
    CUstream s1 = NULL, s2 = NULL;
    CUdeviceptr out = 0, e = 0;
    kvx_ticket t;
    uint64_t v[2] = {0, 0};
    char want[96];
    memset(&d, 0, sizeof d);
    a.checksums = 1;
    a.fill_blocks = 32;
    own = kvx_tc_spawn(&a, &md, &len);
    if (own.pid < 0) { T_FAILF("owner did not start (checksums)"); return; }
    if (kvx_ex_gpu_init(0, NULL) || kvx_ex_cu(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING), "stream") ||
        kvx_ex_cu(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING), "stream") || kvx_ex_cu(cuMemAlloc(&out, 16), "cuMemAlloc")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
    memset(&qd, 0, sizeof qd);
    qd.cuda.stream = s1;
    dec_checksums = 1;
    if (dec_open(&d, 0, 1, 2, KVX_ORDER_NHD, KVX_EX_CUMEMALLOC, &qd)) { dec_checksums = 0; goto out; }  /* TP 1->2: half the heads */
    dec_checksums = 0;
    if (!(p = add_peer(d.ctx, md, len))) goto out;
    if (kvx_ex_cu(cuMemAlloc(&e, d.g.bytes), "cuMemAlloc")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
    kvx_ex_block_table(src, 16, 32, 1, 61, 0);
    kvx_ex_block_table(dst, 16, NB, 1, 62, 0);
    /* 1. clean reads pass, every head checked, and a sample; the bytes are right too */
    T_ST(verified(&d, p, dst, src, 16, 1, NULL), KVX_OK);
    T_ST(verified(&d, p, dst, src, 16, 64, NULL), KVX_OK);
    if (kvx_ex_gpu_pull(&d.g)) { T_FAILF("pull: %s", kvx_ex_gpu_err); goto out; }
    {
        uint32_t pf, pc;
        kvx_peer_heads(p, d.cache, 0, &pf, &pc);
        T_EQ(kvx_ex_verify(&d.g.host, SEED, dst, src, 16, 0, LAYERS, pf, pf + pc, NULL), 0);
    }
    /* 2. a byte changed on the GPU between the copy and the check */
    plant(&d, kvx_ex_block(&d.g.host, 1, 1, dst[5]) + 7);
    T_ST(verified(&d, p, dst, src, 16, 1, NULL), KVX_ERR_CORRUPT);
    snprintf(want, sizeof want, "layer 1 V block %u (local %u)", src[5], dst[5]);
    T_HAS(kvx_ctx_error(d.ctx), want);
    printf("    planted: %.220s\n", kvx_ctx_error(d.ctx));
    /* 3. a block the producer never sealed */
    T_ST(verified(&d, p, bad_dst, bad_src, 2, 1, NULL), KVX_ERR_ARG);
    T_HAS(kvx_ctx_error(d.ctx), "never sealed");
    snprintf(want, sizeof want, "block 40 (layer 0, K)");
    T_HAS(kvx_ctx_error(d.ctx), want);
    /* 4. a stream waiting on a corrupted read stays held until kvx has the
       check's result, then is released with the failure visible on the device */
    plant(&d, kvx_ex_block(&d.g.host, 0, 0, dst[2]));
    {
        kvx_read r = read_of(p, d.cache, dst, src, 16);
        r.verify = 1;
        if (kvx_post(d.q, &r, &t) != KVX_OK) { T_FAILF("post: %s", kvx_ctx_error(d.ctx)); goto out; }
    }
    T_ST(kvx_stream_wait(d.q, t, s2), KVX_OK);
    kvx_tc_check(&K, s2, d.g.mem, e, 1, (CUdeviceptr)(uintptr_t)kvx_stream_status_ptr(d.q, t), out);
    usleep(300000);  /* copy and check are long done; nobody has collected the result yet */
    T_EQ(cuStreamQuery(s2), CUDA_ERROR_NOT_READY);
    T_ST(kvx_wait(d.q, t, 30000), KVX_ERR_CORRUPT);
    if (kvx_tc_sync(s2, 10000) || out_read(out, v)) { T_FAILF("the waiting stream was not released: %s", kvx_ex_gpu_err); goto out; }
    T_EQ(v[1], (t << 2) | 2u);
    printf("    verified reads pass (1 and 1 in 64); a planted byte, an unsealed block and a waiting stream: as expected\n");
out:
    if (d.ctx) dec_close(&d);
    kvx_tc_stop(&own);
    free(md);
    if (out) cuMemFree(out);
    if (e) cuMemFree(e);
    if (s1) { kvx_tc_sync(s1, 5000); cuStreamDestroy(s1); }
    if (s2) { kvx_tc_sync(s2, 5000); cuStreamDestroy(s2); }
}

static void case_stream_gate(void) {
    sw w;
    uint32_t src[48], dst[48];
    kvx_ticket t;
    kvx_read r;
    uint64_t v[2];
    const volatile uint64_t *word;
    uint64_t nwords;
    if (sw_open(&w, NULL, 0, 0)) { sw_close(&w); return; }
    nwords = w.d.g.bytes / 4;
    kvx_ex_block_table(src, 48, NB, 1, 21, 0);
    kvx_ex_block_table(dst, 48, NB, 1, 22, 0);
    if (sw_prepare(&w, dst, src, 48, w.e[0])) { T_FAILF("%s", kvx_ex_gpu_err); sw_close(&w); return; }
    cuMemsetD8(w.out[0], 0, 16);
    cuMemsetD8(w.out[1], 0, 16);
    /* The copy runs on s1 behind a closed gate. */
    if (kvx_ex_cu(cuStreamWaitValue32(w.s1, w.gate_d, 1, CU_STREAM_WAIT_VALUE_GEQ), "gate")) { T_FAILF("%s", kvx_ex_gpu_err); sw_close(&w); return; }
    r = read_of(w.peer, w.d.cache, dst, src, 48);
    if (kvx_post(w.d.q, &r, &t) != KVX_OK) { T_FAILF("post: %s", kvx_ctx_error(w.d.ctx)); sw_close(&w); return; }
    word = kvx_stream_status_ptr(w.d.q, t);
    T_CHECK(word != NULL);
    T_ST(kvx_stream_wait(w.d.q, t, w.s2), KVX_OK);
    kvx_tc_check(&K, w.s2, w.d.g.mem, w.e[0], nwords, (CUdeviceptr)(uintptr_t)word, w.out[0]);
    /* The same check without the wait runs now, before the copy: it must see the poison. */
    kvx_tc_check(&K, w.s3, w.d.g.mem, w.e[0], nwords, (CUdeviceptr)(uintptr_t)word, w.out[1]);
    if (kvx_tc_sync(w.s3, 10000) || out_read(w.out[1], v)) { T_FAILF("%s", kvx_ex_gpu_err); sw_close(&w); return; }
    T_CHECK(v[0] > 0);
    T_EQ(v[1] & 3u, 0);            /* pending, as the device sees it */
    T_EQ(v[1] >> 2, t);
    T_EQ(kvx_test(w.d.q, t), KVX_PENDING);
    T_EQ(cuStreamQuery(w.s2), CUDA_ERROR_NOT_READY);
    printf("    without the wait: %llu words differ (poison); the waiting stream holds\n", (unsigned long long)v[0]);
    gate_open(&w, 1);
    if (kvx_tc_sync(w.s2, 10000) || out_read(w.out[0], v)) { T_FAILF("waiting stream: %s", kvx_ex_gpu_err); sw_close(&w); return; }
    T_EQ(v[0], 0);
    T_EQ(v[1], (t << 2) | 1u);
    T_ST(kvx_wait(w.d.q, t, 10000), KVX_OK);
    sw_close(&w);
}

/* Block generations on the GPU: the owner retired blocks [0, 8) once (their
   generation is 1). Two gated reads of the same blocks carry generations:
   the current ones, then the same but 0 for one retired block. The copy
   kernel checks each read and writes its completion word, so both waiting
   streams are released by the GPU alone, before the host looks (no progress
   thread, no kvx_test): the first stream sees every byte and state 1, the
   second state 2. Then the host reports the second KVX_ERR_STALE, naming the
   block. */
static void case_stream_generations(void) {
    kvx_tc_owner_args a = owner_args(KVX_BACKEND_CUDA, 1, 0, KVX_EX_CUMEMALLOC, 0, 1, KVX_ORDER_HND);
    sw w;
    uint32_t src[48], dst[48], i, stale = 48;
    uint64_t gens[48], v[2], nwords;
    kvx_ticket t[2];
    kvx_read r;
    int k;
    a.generations = 1;
    a.retired = 8;
    if (sw_open(&w, &a, 0, 0)) { sw_close(&w); return; }
    nwords = w.d.g.bytes / 4;
    kvx_ex_block_table(src, 48, NB, 1, 61, 0);
    kvx_ex_block_table(dst, 48, NB, 1, 62, 0);
    for (i = 0; i < 48; i++) {
        gens[i] = src[i] < 8 ? 1u : 0u;
        if (src[i] < 8 && stale == 48) stale = i;
    }
    if (stale == 48) { T_FAILF("the block table has no retired block"); sw_close(&w); return; }
    if (sw_prepare(&w, dst, src, 48, w.e[0])) { T_FAILF("%s", kvx_ex_gpu_err); sw_close(&w); return; }
    cuMemsetD8(w.out[0], 0, 16);
    cuMemsetD8(w.out[1], 0, 16);
    if (kvx_ex_cu(cuStreamWaitValue32(w.s1, w.gate_d, 1, CU_STREAM_WAIT_VALUE_GEQ), "gate")) { T_FAILF("%s", kvx_ex_gpu_err); sw_close(&w); return; }
    r = read_of(w.peer, w.d.cache, dst, src, 48);
    r.remote_generations = gens;
    for (k = 0; k < 2; k++) {  /* the second lands the same bytes: the first's check may run beside it */
        if (k) gens[stale] = 0;
        if (kvx_post(w.d.q, &r, &t[k]) != KVX_OK) { T_FAILF("post: %s", kvx_ctx_error(w.d.ctx)); sw_close(&w); return; }
        T_ST(kvx_stream_wait(w.d.q, t[k], k ? w.s3 : w.s2), KVX_OK);
        kvx_tc_check(&K, k ? w.s3 : w.s2, w.d.g.mem, w.e[0], nwords, (CUdeviceptr)(uintptr_t)kvx_stream_status_ptr(w.d.q, t[k]), w.out[k]);
    }
    T_EQ(cuStreamQuery(w.s2), CUDA_ERROR_NOT_READY);
    gate_open(&w, 1);
    if (kvx_tc_sync(w.s2, 10000) || out_read(w.out[0], v)) { T_FAILF("the first waiting stream: %s", kvx_ex_gpu_err); sw_close(&w); return; }
    T_EQ(v[0], 0);
    T_EQ(v[1], (t[0] << 2) | 1u);
    if (kvx_tc_sync(w.s3, 10000) || out_read(w.out[1], v)) { T_FAILF("the second waiting stream: %s", kvx_ex_gpu_err); sw_close(&w); return; }
    T_EQ(v[1], (t[1] << 2) | 2u);
    printf("    released by the GPU: words 0x%llx (state 1), 0x%llx (state 2)\n", (unsigned long long)((t[0] << 2) | 1u), (unsigned long long)v[1]);
    T_ST(kvx_wait(w.d.q, t[0], 10000), KVX_OK);
    T_ST(kvx_wait(w.d.q, t[1], 10000), KVX_ERR_STALE);
    {
        char want[64];
        snprintf(want, sizeof want, "remote block %u (local %u", src[stale], dst[stale]);
        T_HAS(kvx_ctx_error(w.d.ctx), want);
        T_HAS(kvx_ctx_error(w.d.ctx), "generation 0 expected, 1 found");
    }
    sw_close(&w);
}

/* depth graphs, one per slot, each captured once; 24 reads, each behind a
   closed gate, each replay checks every byte and which ticket it saw. */
static void case_graphs(uint32_t depth) {
    sw w;
    CUgraph gr[4];
    CUgraphExec ex[4];
    CUstream g = NULL;
    kvx_ticket tk[4], t;
    uint32_t src[32], dst[4][32], k, s, ok = 0;
    uint64_t nwords, v[2];
    kvx_read r;
    memset(gr, 0, sizeof gr);
    memset(ex, 0, sizeof ex);
    if (sw_open(&w, NULL, depth, 0)) { sw_close(&w); return; }
    nwords = w.d.g.bytes / 4;
    if (kvx_ex_cu(cuStreamCreate(&g, CU_STREAM_NON_BLOCKING), "stream")) { T_FAILF("%s", kvx_ex_gpu_err); sw_close(&w); return; }
    /* distinct local blocks per slot: slot s takes the blocks congruent to s mod depth */
    for (s = 0; s < depth; s++) for (k = 0; k < 32 / depth; k++) dst[s][k] = (k * depth + s) % NB;
    /* A first read per slot, so that each slot has a ticket to capture with. */
    for (s = 0; s < depth; s++) {
        kvx_ex_block_table(src, 32 / depth, NB, 1, 100 + s, 0);
        r = read_of(w.peer, w.d.cache, dst[s], src, 32 / depth);
        if (kvx_post(w.d.q, &r, &tk[s]) != KVX_OK || kvx_wait(w.d.q, tk[s], 10000) != KVX_OK) { T_FAILF("warm-up: %s", kvx_ctx_error(w.d.ctx)); goto out; }
    }
    if (kvx_ex_gpu_pull(&w.d.g)) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }  /* the staging copy follows the GPU */
    for (s = 0; s < depth; s++) {
        uint32_t slot = (uint32_t)(tk[s] % depth);
        if (kvx_ex_cu(cuStreamBeginCapture(g, CU_STREAM_CAPTURE_MODE_GLOBAL), "cuStreamBeginCapture")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
        T_ST(kvx_stream_wait(w.d.q, tk[s], g), KVX_OK);
        kvx_tc_check(&K, g, w.d.g.mem, w.e[slot], nwords, (CUdeviceptr)(uintptr_t)kvx_stream_status_ptr(w.d.q, tk[s]), w.out[slot]);
        if (kvx_ex_cu(cuStreamEndCapture(g, &gr[slot]), "cuStreamEndCapture") || kvx_ex_cu(cuGraphInstantiate(&ex[slot], gr[slot], 0), "cuGraphInstantiate")) {
            T_FAILF("%s", kvx_ex_gpu_err);
            goto out;
        }
        {
            size_t nn = 0;
            cuGraphGetNodes(gr[slot], NULL, &nn);
            if (nn < 2) T_FAILF("graph of slot %u has %zu nodes: the wait is missing", slot, nn);
        }
    }
    for (k = 0; k < 24; k++) {
        uint32_t n = 32 / depth;
        kvx_ex_block_table(src, n, NB, 1, 1000 + k, 0);
        s = (uint32_t)((tk[depth - 1] + 1 + k) % depth);  /* the slot the next ticket takes */
        if (sw_prepare(&w, dst[s], src, n, w.e[s])) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
        if (kvx_ex_cu(cuStreamWaitValue32(w.s1, w.gate_d, k + 2u, CU_STREAM_WAIT_VALUE_GEQ), "gate")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
        r = read_of(w.peer, w.d.cache, dst[s], src, n);
        if (kvx_post(w.d.q, &r, &t) != KVX_OK) { T_FAILF("post %u: %s", k, kvx_ctx_error(w.d.ctx)); goto out; }
        if (t % depth != s) { T_FAILF("ticket %llu is not in slot %u", (unsigned long long)t, s); goto out; }
        cuMemsetD32Async(w.out[s], 0, 4, g);
        if (kvx_ex_cu(cuGraphLaunch(ex[s], g), "cuGraphLaunch")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
        usleep(2000);  /* a replay without its wait would check the poison now */
        gate_open(&w, k + 2u);
        if (kvx_wait(w.d.q, t, 10000) != KVX_OK) { T_FAILF("read %u: %s", k, kvx_ctx_error(w.d.ctx)); goto out; }
        if (kvx_tc_sync(g, 10000) || out_read(w.out[s], v)) { T_FAILF("replay %u: %s", k, kvx_ex_gpu_err); goto out; }
        if (v[0] != 0 || v[1] != ((t << 2) | 1u)) {
            T_FAILF("replay %u (slot %u, ticket %llu): %llu words differ, device saw word 0x%llx (ticket %llu, state %llu)", k, s, (unsigned long long)t,
                    (unsigned long long)v[0], (unsigned long long)v[1], (unsigned long long)(v[1] >> 2), (unsigned long long)(v[1] & 3u));
            goto out;
        }
        ok++;
    }
    printf("    %u replays of %u graph(s), each waited for its own read (ticket checked on the device) and saw every byte\n", ok, depth);
out:
    for (s = 0; s < 4; s++) { if (ex[s]) cuGraphExecDestroy(ex[s]); if (gr[s]) cuGraphDestroy(gr[s]); }
    if (g) { kvx_tc_sync(g, 5000); cuStreamDestroy(g); }
    sw_close(&w);
}

/* A read that fails before it is launched: the stream waiting on it is released
   and the device sees the failure. */
static void case_fail_cuda(void) {
    sw w;
    uint32_t src[16], dst[16], src2[16], dst2[16];
    kvx_ticket ta, tb;
    kvx_read r;
    uint64_t v[2];
    kvx_status st;
    if (sw_open(&w, NULL, 0, 1)) { sw_close(&w); return; }  /* max_ops 1: a second read waits for the first */
    kvx_ex_block_table(src, 16, NB, 1, 41, 0);
    kvx_ex_block_table(dst, 16, NB, 1, 42, 0);
    kvx_ex_block_table(src2, 16, NB, 1, 43, 0);
    kvx_ex_block_table(dst2, 16, NB, 0, 0, 40);
    cuMemsetD8(w.out[0], 0, 16);
    r = read_of(w.peer, w.d.cache, dst, src, 16);
    if (kvx_post(w.d.q, &r, &ta) != KVX_OK) { T_FAILF("post: %s", kvx_ctx_error(w.d.ctx)); sw_close(&w); return; }
    r = read_of(w.peer, w.d.cache, dst2, src2, 16);
    if (kvx_post(w.d.q, &r, &tb) != KVX_OK) { T_FAILF("post: %s", kvx_ctx_error(w.d.ctx)); sw_close(&w); return; }
    T_ST(kvx_stream_wait(w.d.q, tb, w.s2), KVX_OK);
    kvx_tc_check(&K, w.s2, w.out[0], w.out[0], 0, (CUdeviceptr)(uintptr_t)kvx_stream_status_ptr(w.d.q, tb), w.out[0]);
    kvx_peer_remove(w.peer);  /* the owner's memory goes away: tb fails, never launched */
    w.peer = NULL;
    if (kvx_tc_sync(w.s2, 10000) || out_read(w.out[0], v)) { T_FAILF("the waiting stream was not released: %s", kvx_ex_gpu_err); sw_close(&w); return; }
    T_EQ(v[1], (tb << 2) | 2u);
    st = kvx_test(w.d.q, tb);
    T_EQ(st, KVX_ERR_CANCELED);
    printf("    host: %s; device: word 0x%llx (state %llu)\n", kvx_status_name(st), (unsigned long long)v[1], (unsigned long long)(v[1] & 3u));
    kvx_test(w.d.q, ta);
    sw_close(&w);
}

#if defined(KVX_UCX)
/* UCX between processes of this host, over TCP, where reads are served by the
   owner's progress: an owner that does not progress stalls them. */
static void case_ucx_stream(int fail) {
    kvx_tc_owner own;
    kvx_tc_owner_args a = owner_args(KVX_BACKEND_UCX, 0, 0, 0, 0, 1, KVX_ORDER_HND);
    kvx_ctx_desc cd;
    kvx_ctx *ctx = NULL;
    kvx_ex_cache h;
    kvx_cache_desc c;
    kvx_cache *cache;
    kvx_queue *q = NULL;
    kvx_queue_desc qd;
    kvx_peer *p;
    kvx_read r;
    kvx_ticket t;
    CUstream s1 = NULL, s2 = NULL;
    CUdeviceptr e = 0, out = 0, hd = 0;
    uint32_t src[24], dst[24];
    uint64_t v[2];
    void *md;
    uint32_t len;
    kvx_status st;
    double t0;
    kvx_layout l = lay_of(1, KVX_ORDER_HND);
    memset(&h, 0, sizeof h);
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    a.progress = !fail;
    own = kvx_tc_spawn(&a, &md, &len);
    if (own.pid < 0) { T_FAILF("owner did not start"); goto out0; }
    if (kvx_ex_cu(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING), "stream") || kvx_ex_cu(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING), "stream")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
    memset(&cd, 0, sizeof cd);
    cd.backend = KVX_BACKEND_UCX; cd.name = "decode"; cd.progress_thread = 1;
    if (kvx_ctx_create(&cd, &ctx) != KVX_OK) { T_FAILF("ctx: %s", kvx_ctx_error(NULL)); goto out; }
    if (kvx_ex_cache_alloc(&h, &l, 0, 1)) { T_FAILF("host alloc"); goto out; }
    memset(h.mem, 0xA7, h.mem_bytes);
    /* pinned and mapped, so that the checking kernel reads the destination itself */
    if (kvx_ex_cu(cuMemHostRegister(h.mem, h.mem_bytes, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP), "cuMemHostRegister") ||
        kvx_ex_cu(cuMemHostGetDevicePointer(&hd, h.mem, 0), "cuMemHostGetDevicePointer") ||
        kvx_ex_cu(cuMemAlloc(&e, h.mem_bytes), "cuMemAlloc") || kvx_ex_cu(cuMemAlloc(&out, 16), "cuMemAlloc")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
    c = kvx_ex_cache_desc(&h);
    if (kvx_cache_register(ctx, &c, &cache) != KVX_OK) { T_FAILF("register: %s", kvx_ctx_error(ctx)); goto out; }
    memset(&qd, 0, sizeof qd);
    qd.cuda.stream = s1;
    if (kvx_queue_create(ctx, &qd, &q) != KVX_OK) { T_FAILF("queue: %s", kvx_ctx_error(ctx)); goto out; }
    if (!(p = add_peer(ctx, md, len))) goto out;
    kvx_ex_block_table(src, 24, NB, 1, 51, 0);
    kvx_ex_block_table(dst, 24, NB, 1, 52, 0);
    kvx_tc_expect(&h, SEED, dst, src, 24, 0, LAYERS, 0, HEADS);
    if (kvx_ex_cu(cuMemcpyHtoD(e, h.mem, h.mem_bytes), "upload") || kvx_ex_cu(cuCtxSynchronize(), "cuCtxSynchronize")) { T_FAILF("%s", kvx_ex_gpu_err); goto out; }
    kvx_ex_poison(&h, SEED, dst, src, 24, 0, LAYERS, 0, HEADS);
    cuMemsetD8(out, 0, 16);
    r = read_of(p, cache, dst, src, 24);
    r.timeout_ms = fail ? 300 : 0;
    if (fail && (kvx_tc_stall(&own) || usleep(50000))) { T_FAILF("cannot stall the owner"); goto out; }
    t0 = kvx_tc_now();
    if (kvx_post(q, &r, &t) != KVX_OK) { T_FAILF("post: %s", kvx_ctx_error(ctx)); goto out; }
    T_ST(kvx_stream_wait(q, t, s2), KVX_OK);
    kvx_tc_check(&K, s2, hd, e, h.mem_bytes / 4, (CUdeviceptr)(uintptr_t)kvx_stream_status_ptr(q, t), out);
    /* Nothing here drives kvx: the progress thread completes the read and releases s2. */
    if (kvx_tc_sync(s2, 10000) || out_read(out, v)) { T_FAILF("the waiting stream was not released: %s", kvx_ex_gpu_err); goto out; }
    if (fail) {
        T_EQ(v[1], (t << 2) | 2u);
        T_CHECK(v[0] > 0);  /* nothing landed */
        st = kvx_wait(q, t, 5000);
        T_EQ(st, KVX_ERR_TIMEOUT);
        printf("    released after %.0f ms; host: %s; device: state %llu\n", (kvx_tc_now() - t0) * 1e3, kvx_status_name(st), (unsigned long long)(v[1] & 3u));
    } else {
        T_EQ(v[0], 0);
        T_EQ(v[1], (t << 2) | 1u);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        printf("    %s: the stream resumed %.2f ms after kvx_post, every byte seen by the device\n", kvx_peer_transport(p), (kvx_tc_now() - t0) * 1e3);
    }
out:
    if (ctx) kvx_ctx_destroy(ctx);
    if (h.mem) { cuMemHostUnregister(h.mem); kvx_ex_cache_free(&h); }
    if (e) cuMemFree(e);
    if (out) cuMemFree(out);
    if (s1) cuStreamDestroy(s1);
    if (s2) { kvx_tc_sync(s2, 5000); cuStreamDestroy(s2); }
    if (fail) kvx_tc_kill(&own); else kvx_tc_stop(&own);
    free(md);
out0:
    unsetenv("UCX_TLS");
    unsetenv("UCX_NET_DEVICES");
}
#endif

/* A case that hangs says which before the runner's timeout kills it. */
static void on_alarm(int sig) {
    char msg[300];
    int n = snprintf(msg, sizeof msg, "FAIL %s: still running after %d s (hung)\n", kvx_t_case ? kvx_t_case : "?", 120);
    (void)sig;
    if (write(1, msg, (size_t)n) < 0) { /* nothing else to do */ }
    _exit(1);
}

int main(int argc, char **argv) {
    CUcontext c0;
    if (argc == 4 && !strcmp(argv[1], "--serve")) return kvx_tc_serve(argv[2], atoi(argv[3]));
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    if (kvx_ex_gpu_init(0, &c0) || cuDeviceGetCount(&ndev) != CUDA_SUCCESS) {
        printf("skip: no GPU here: %s\n", kvx_ex_gpu_err);
        return 77;
    }
    if (kvx_tc_load(&K)) { printf("FAIL loading the test kernels: %s\n0 passed, 1 failed\n", kvx_ex_gpu_err); return 1; }
    {
        char name[128] = "";
        CUdevice d;
        cuDeviceGet(&d, 0);
        cuDeviceGetName(name, sizeof name, d);
        printf("# %d GPU(s) visible; device 0: %s\n", ndev, name);
    }

    alarm(120);
    T_CASE("refuse: host memory on the CUDA backend") case_refuse_host();
    alarm(120);
    T_CASE("refuse: VMM memory without an exportable handle type") case_refuse_kind(KVX_EX_VMM_NOEXPORT, "requestedHandleTypes");
    alarm(120);
    T_CASE("refuse: default-pool memory (cuMemAllocAsync)") case_refuse_kind(KVX_EX_POOL_DEFAULT, "handleTypes");
    alarm(120);
    T_CASE("refuse: a peer on another host") case_refuse_other_host();
#if defined(KVX_UCX)
    alarm(120);
    T_CASE("refuse: GPU memory over a UCX without CUDA") case_ucx_gpu();
#endif
    alarm(120);
    T_CASE("same process: VMM -> cuMemAlloc, NHD, transport same-gpu") case_same_process();
    alarm(120);
    T_CASE("processes: cuMemAlloc -> cuMemAlloc, HND random, notifications") case_reads(KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_HND, 1, 1, 0, 1, 0, 0, "cuda:ipc same-gpu");
    alarm(120);
    T_CASE("processes: VMM (3 allocations) -> cuMemAlloc, NHD consecutive") case_reads(KVX_EX_VMM, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 1, 1, 0, 0, 0, 0, "same-gpu");
    alarm(120);
    T_CASE("processes: pool -> VMM, HND random") case_reads(KVX_EX_POOL, KVX_EX_VMM, KVX_ORDER_HND, 1, 1, 0, 1, 0, 0, "same-gpu");
    alarm(120);
    T_CASE("processes: TP 2 -> 1, NHD random, VMM") case_reads(KVX_EX_VMM, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 2, 1, 0, 1, 0, 0, "same-gpu");
    alarm(120);
    T_CASE("processes: TP 1 -> 2 (rank 1), HND consecutive") case_reads(KVX_EX_CUMEMALLOC, KVX_EX_POOL, KVX_ORDER_HND, 1, 2, 1, 0, 0, 0, "same-gpu");
    alarm(120);
    T_CASE("processes: TP 2 -> 4 (rank 3), NHD random") case_reads(KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 2, 4, 3, 1, 0, 0, "same-gpu");
    alarm(120);
    T_CASE("stream wait: a checking kernel waits for a gated copy; without the wait it sees poison") case_stream_gate();
    T_CASE("verify mode on GPU caches: sealed and checked by kernels; a planted byte, an unsealed block, a waiting stream") case_verify();
    alarm(120);
    T_CASE("block generations: the copy kernel checks them and releases waiting streams itself; a retired block is state 2, then KVX_ERR_STALE")
        case_stream_generations();
    alarm(120);
    T_CASE("graph: one graph, depth-1 queue, 24 replays, each its own read") case_graphs(1);
    alarm(120);
    T_CASE("graph: three graphs, depth-3 queue, 24 replays, each its own read") case_graphs(3);
    alarm(120);
    T_CASE("failure: a CUDA read canceled before launch releases its waiting stream") case_fail_cuda();
#if defined(KVX_UCX)
    alarm(120);
    T_CASE("UCX: host reads complete on a stream (progress thread)") case_ucx_stream(0);
    alarm(120);
    T_CASE("failure: a stalled UCX read releases its waiting stream at its deadline") case_ucx_stream(1);
    alarm(120);
    T_CASE("UCX GPU: cuMemAlloc -> cuMemAlloc, HND random, UCX's default: cuda_ipc, or the fallback named and warned")
        case_ucx_gpu_reads(NULL, NULL, KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_HND, 1, 1, 0, 1, 0);
    alarm(120);
    T_CASE("UCX GPU: cuMemAlloc -> cuMemAlloc, HND random, cuda_ipc gets on: over cuda_ipc, checked behind kvx_stream_wait")
        case_ucx_gpu_reads(NULL, "y", KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_HND, 1, 1, 0, 1, 1);
    alarm(120);
    T_CASE("UCX GPU: TP 2 -> 1, NHD random, cuMemAlloc, cuda_ipc gets on: over cuda_ipc")
        case_ucx_gpu_reads(NULL, "y", KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 2, 1, 0, 1, 1);
    alarm(120);
    T_CASE("UCX GPU: VMM (expandable segments) -> cuMemAlloc, NHD, cuda_ipc gets on: cuda_ipc, or the fallback named and warned")
        case_ucx_gpu_reads(NULL, "y", KVX_EX_VMM, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 1, 1, 0, 1, 0);
    alarm(120);
    T_CASE("UCX GPU: pool -> VMM, HND, cuda_ipc gets on: cuda_ipc, or the fallback named and warned")
        case_ucx_gpu_reads(NULL, "y", KVX_EX_POOL, KVX_EX_VMM, KVX_ORDER_HND, 1, 1, 0, 1, 0);
    alarm(120);
    T_CASE("UCX GPU: staged as across hosts (UCX_TLS=tcp,cuda_copy, software RMA on), TP 1 -> 2 (rank 1), HND, named and warned")
        case_ucx_gpu_reads("tcp,cuda_copy", NULL, KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_HND, 1, 2, 1, 1, 0);
    alarm(120);
    T_CASE("UCX GPU: staged (UCX_TLS=tcp,cuda_copy, software RMA on), VMM -> pool, NHD consecutive")
        case_ucx_gpu_reads("tcp,cuda_copy", NULL, KVX_EX_VMM, KVX_EX_POOL, KVX_ORDER_NHD, 1, 1, 0, 0, 0);
#endif
    alarm(120);
    T_CASE("two GPUs: cuMemAlloc, VMM and pool on GPU 0 -> GPU 1, TP 1->2 and 2->1, checked behind kvx_stream_wait") {
        if (ndev < 2) T_SKIP("one GPU visible");
        else {
            case_reads(KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_HND, 1, 1, 0, 1, 0, 1, "GPU 0 -> 1");
            case_reads(KVX_EX_VMM, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 1, 2, 0, 1, 0, 1, "GPU 0 -> 1");
            case_reads(KVX_EX_CUMEMALLOC, KVX_EX_VMM, KVX_ORDER_HND, 1, 2, 1, 1, 0, 1, "GPU 0 -> 1");
            case_reads(KVX_EX_POOL, KVX_EX_VMM, KVX_ORDER_HND, 2, 1, 0, 0, 0, 1, "GPU 0 -> 1");
            case_reads(KVX_EX_CUMEMALLOC, KVX_EX_CUMEMALLOC, KVX_ORDER_NHD, 2, 1, 0, 1, 0, 1, "GPU 0 -> 1");
        }
    }
    alarm(0);
    return kvx_t_summary();
}
