/*
    bench_gpu -- the CUDA backend's numbers, between two processes:

    1. Throughput: random blocks of 4, 16, 64 and 256 KiB over 32 layers (K and
       V), 1 GiB per read, HND (TP 1 -> 1) and NHD (TP 1 -> 2: a piece per
       token), 16 reads with four in flight, timed from the first kvx_post to
       the last completion on the host; beside one large device-to-device copy of the
       same bytes in the same run on the same GPU (cuMemcpyDtoDAsync, or
       cuMemcpyPeerAsync with --two-gpu), and a cuMemcpyDtoDAsync per block
       for contrast. GB/s counts bytes copied (not read plus written).
    2. Latency: kvx_post to the waiting stream resuming (a stream write after
       kvx_stream_wait, seen by the host), one block of every layer, for the
       CUDA backend and for a UCX read of host memory.
    3. The thread-block cap (kvx_ctx_desc.cuda.max_blocks) against copy speed.
    4. How much a stream of arithmetic kernels that fill the GPU slows down
       while copies run beside it, per cap, and what the copies get.
    5. What verify mode costs (kvx_read.verify): the same reads unverified,
       checking one block in 64, and checking every block.
    6. What block generations cost (kvx_read.remote_generations): reads of
       64 random blocks with and without them, alternating, in throughput
       (as in 1) and in latency (as in 2).
    7. Where a post's time goes: kvx_post of 128 random blocks and
       kvx_stream_wait, one read at a time, each driver, lock and system
       call they make timed on the posting thread (tests/gpu/build.sh links
       this program with -Wl,--wrap for them: step_wraps below), the rest
       being kvx's own work; beside each driver call timed alone.

    Usage: bench_gpu [--two-gpu] [--quick] [--only N]   (--two-gpu: owner on
    GPU 0, reader on GPU 1; --only N: section N alone). Every read of the
    table is byte-checked once at the end of its row (blocks the owner
    filled). kvx's implementation is linked in from tests/lib/kvx_impl.c
    (tests/gpu/build.sh).
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../kvx.h"
#include "../tests/lib/kvx_cuda_test.h"
#include <pthread.h>
#include <time.h>

#define LAYERS 32u
#define SEED 77u
#define FILLED 16u

static kvx_tc_kernels K;
static int dev_own, dev_dec, quick, ucx_gpu;
static int side_checksums;     /* the reader's cache keeps checksums (section 5) */
static uint32_t read_verify;   /* kvx_read.verify of every post */
static const uint64_t *read_generations;  /* kvx_read.remote_generations of every post (section 6) */
static int owner_generations;  /* spawn_owner: the owner keeps generations and retires every block once (section 6) */
static CUcontext ctx_dec, ctx_own;

static kvx_layout layout(uint32_t heads, int tp, uint32_t nb, kvx_order order) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = LAYERS;
    l.num_blocks = nb;
    l.block_tokens = 16;
    l.total_heads = heads;
    l.num_heads = heads >= (uint32_t)tp ? heads / (uint32_t)tp : 1;
    l.head_dim = 128;
    l.elem_bytes = 2;
    l.order = order;
    return l;
}

static void die(const char *what) {
    printf("bench_gpu: %s\n", what);
    exit(1);
}

/* The reader: a context on dev_dec with its cache and one peer. */
typedef struct side {
    kvx_ctx *ctx;
    kvx_ex_gpu g;
    kvx_ex_cache h;
    kvx_cache *cache;
    kvx_queue *q;
    kvx_peer *peer;
} side;

static void side_close(side *d) {
    if (d->ctx) kvx_ctx_destroy(d->ctx);
    if (d->g.mem) kvx_ex_gpu_free(&d->g);
    if (d->h.mem) { cuMemHostUnregister(d->h.mem); kvx_ex_cache_free(&d->h); }
    memset(d, 0, sizeof *d);
}

/* gpu_mem: the reader's cache in GPU memory (always, on the CUDA backend). */
static void side_open_mem(side *d, int backend, int gpu_mem, const kvx_layout *l, int rank, int tp, uint32_t max_blocks, void *stream, const void *md, uint32_t len) {
    kvx_ctx_desc cd;
    kvx_cache_desc c;
    kvx_queue_desc qd;
    memset(d, 0, sizeof *d);
    memset(&cd, 0, sizeof cd);
    cd.name = "decode"; cd.tp_rank = rank; cd.tp_size = tp; cd.backend = (kvx_backend)backend;
    cd.cuda.max_blocks = max_blocks;
    cd.progress_thread = backend == KVX_BACKEND_UCX;
    cuCtxSetCurrent(ctx_dec);
    if (kvx_ctx_create(&cd, &d->ctx) != KVX_OK) die(kvx_ctx_error(NULL));
    if (backend == KVX_BACKEND_CUDA || gpu_mem) {
        if (kvx_ex_gpu_alloc(&d->g, l, rank, tp, dev_dec, KVX_EX_CUMEMALLOC)) die(kvx_ex_gpu_err);
        c = kvx_ex_gpu_desc(&d->g);
        c.checksums = side_checksums;
    } else {
        if (kvx_ex_cache_alloc(&d->h, l, rank, tp)) die("host cache");
        memset(d->h.mem, 0, d->h.mem_bytes);
        if (kvx_ex_cu(cuMemHostRegister(d->h.mem, d->h.mem_bytes, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister")) die(kvx_ex_gpu_err);
        c = kvx_ex_cache_desc(&d->h);
    }
    if (kvx_cache_register(d->ctx, &c, &d->cache) != KVX_OK) die(kvx_ctx_error(d->ctx));
    memset(&qd, 0, sizeof qd);
    qd.cuda.stream = stream;
    if (kvx_queue_create(d->ctx, &qd, &d->q) != KVX_OK) die(kvx_ctx_error(d->ctx));
    if (kvx_peer_add(d->ctx, md, len, &d->peer) != KVX_OK) die(kvx_ctx_error(d->ctx));
}

static void side_open(side *d, int backend, const kvx_layout *l, int rank, int tp, uint32_t max_blocks, void *stream, const void *md, uint32_t len) {
    side_open_mem(d, backend, 0, l, rank, tp, max_blocks, stream, md, len);
}

/* Does the UCX linked in take GPU memory (built with CUDA, as the libucx
   wheel is)? Then table 1 has kvx over UCX beside the CUDA backend. */
static int ucx_takes_gpu(void) {
#if defined(KVX_UCX)
    kvx_ctx_desc cd;
    kvx_ctx *u;
    int ok;
    memset(&cd, 0, sizeof cd);
    cd.backend = KVX_BACKEND_UCX;
    cd.log_level = KVX_LOG_ERROR;
    cuCtxSetCurrent(ctx_dec);
    if (kvx_ctx_create(&cd, &u) != KVX_OK) return 0;
    ok = kvx_tc_try_gpu_cache(u, dev_dec) == KVX_OK;
    kvx_ctx_destroy(u);
    return ok;
#else
    return 0;
#endif
}

static kvx_ticket post(side *d, const uint32_t *dst, const uint32_t *src, uint32_t n) {
    kvx_read r;
    kvx_ticket t;
    memset(&r, 0, sizeof r);
    r.peer = d->peer; r.cache = d->cache; r.local_blocks = dst; r.remote_blocks = src; r.num_blocks = n;
    r.verify = read_verify;
    r.remote_generations = read_generations;
    if (kvx_post(d->q, &r, &t) != KVX_OK) die(kvx_ctx_error(d->ctx));
    return t;
}

static void wait_ok(side *d, kvx_ticket t) {
    kvx_status st = kvx_wait(d->q, t, 60000);
    if (st != KVX_OK) { printf("read: %s: %s\n", kvx_status_name(st), kvx_ctx_error(d->ctx)); exit(1); }
}

/* The table's measure: 16 reads of n random blocks with 4 in flight (four
   block tables, in turn), timed on the host from the first kvx_post to the
   last completion, so that the first launch and the last wake-up are spread
   over 16 reads as in a stream of them: the best of three. */
#define RATE_READS 16
#define RATE_IN_FLIGHT 4
static double kvx_rate(side *d, uint32_t n, uint32_t nb, uint64_t bytes_per_read, int random) {
    uint32_t *src = (uint32_t *)malloc(4 * (size_t)n * 4), *dst = (uint32_t *)malloc(4 * (size_t)n * 4);
    kvx_ticket t[RATE_IN_FLIGHT];
    double t0, best = 0;
    int i, rep;
    for (i = 0; i < 4; i++) {
        kvx_ex_block_table(src + (size_t)i * n, n, nb, random, 1000u + (uint64_t)i, (uint32_t)i * 977u);
        kvx_ex_block_table(dst + (size_t)i * n, n, nb, random, 2000u + (uint64_t)i, (uint32_t)i * 977u + 331u);
    }
    /* Where the cache has room, reads in flight together land on different
       blocks, as an engine's do: a verified read is checked after its copy,
       and another read landing on its blocks meanwhile would fail the check. */
    if (4ull * n <= nb) kvx_ex_block_table(dst, 4 * n, nb, random, 2000u, 331u);
    for (i = 0; i < 2; i++) wait_ok(d, post(d, dst, src, n));  /* warm-up: module, first launches */
    for (rep = 0; rep < 3; rep++) {
        double r;
        int posted = 0, done = 0;
        t0 = kvx_tc_now();
        while (done < RATE_READS) {
            while (posted < RATE_READS && posted - done < RATE_IN_FLIGHT) {
                t[posted % RATE_IN_FLIGHT] = post(d, dst + (size_t)(posted % 4) * n, src + (size_t)(posted % 4) * n, n);
                posted++;
            }
            wait_ok(d, t[done % RATE_IN_FLIGHT]);
            done++;
        }
        r = (double)bytes_per_read * RATE_READS / (kvx_tc_now() - t0) / 1e9;
        if (r > best) best = r;
    }
    free(src); free(dst);
    return best;
}

static float ev_ms(CUevent a, CUevent b) {
    float ms = 0;
    cuEventSynchronize(b);
    cuEventElapsedTime(&ms, a, b);
    return ms;
}

/* One large copy of bytes, four times: GB/s (the best of three). */
static double big_copy_rate(size_t bytes, int peer) {
    CUdeviceptr a = 0, b = 0;
    CUstream s;
    CUevent e0, e1;
    double best = 0;
    int rep, i;
    cuCtxSetCurrent(peer ? ctx_own : ctx_dec);
    if (kvx_ex_cu(cuMemAlloc(&a, bytes), "cuMemAlloc (reference source)")) die(kvx_ex_gpu_err);
    cuCtxSetCurrent(ctx_dec);
    if (peer) {  /* over NVLink (or PCIe peer to peer), not staged through the host */
        CUresult e = cuCtxEnablePeerAccess(ctx_own, 0);
        if (e != CUDA_SUCCESS && e != CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) die("cuCtxEnablePeerAccess");
    }
    if (kvx_ex_cu(cuMemAlloc(&b, bytes), "cuMemAlloc (reference destination)")) die(kvx_ex_gpu_err);
    cuMemsetD8(b, 1, bytes);
    cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
    cuEventCreate(&e0, 0);
    cuEventCreate(&e1, 0);
    for (rep = 0; rep < 4; rep++) {
        double r;
        cuEventRecord(e0, s);
        for (i = 0; i < 4; i++) {
            CUresult rc = peer ? cuMemcpyPeerAsync(b, ctx_dec, a, ctx_own, bytes, s) : cuMemcpyDtoDAsync(b, a, bytes, s);
            if (kvx_ex_cu(rc, "reference copy")) die(kvx_ex_gpu_err);
        }
        cuEventRecord(e1, s);
        r = 4.0 * (double)bytes / (ev_ms(e0, e1) * 1e-3) / 1e9;
        if (rep && r > best) best = r;  /* the first is the warm-up */
    }
    cuEventDestroy(e0); cuEventDestroy(e1); cuStreamDestroy(s);
    cuMemFree(b);
    cuCtxSetCurrent(peer ? ctx_own : ctx_dec);
    cuMemFree(a);
    cuCtxSetCurrent(ctx_dec);
    return best;
}

/* A cuMemcpyDtoDAsync per block (the same block size), in this process. */
static double per_block_rate(size_t block, uint32_t nb) {
    CUdeviceptr a = 0, b = 0;
    CUstream s;
    CUevent e0, e1;
    uint32_t n = (uint32_t)((size_t)(256u << 20) / block), i, *src, *dst;
    double r;
    if (n > 8192) n = 8192;
    if (n > nb) n = nb;
    if (kvx_ex_cu(cuMemAlloc(&a, block * nb), "cuMemAlloc") || kvx_ex_cu(cuMemAlloc(&b, block * nb), "cuMemAlloc")) die(kvx_ex_gpu_err);
    src = (uint32_t *)malloc(4 * (size_t)n); dst = (uint32_t *)malloc(4 * (size_t)n);
    kvx_ex_block_table(src, n, nb, 1, 5, 0);
    kvx_ex_block_table(dst, n, nb, 1, 6, 0);
    cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
    cuEventCreate(&e0, 0);
    cuEventCreate(&e1, 0);
    for (i = 0; i < n; i++) cuMemcpyDtoDAsync(b + dst[i] * block, a + src[i] * block, block, s);  /* warm-up */
    cuEventRecord(e0, s);
    for (i = 0; i < n; i++) cuMemcpyDtoDAsync(b + dst[i] * block, a + src[i] * block, block, s);
    cuEventRecord(e1, s);
    r = (double)n * (double)block / (ev_ms(e0, e1) * 1e-3) / 1e9;
    cuEventDestroy(e0); cuEventDestroy(e1); cuStreamDestroy(s);
    cuMemFree(a); cuMemFree(b);
    free(src); free(dst);
    return r;
}

/* Check every byte of one read of the filled blocks. */
static int verify(side *d, uint32_t a_head, uint32_t b_head) {
    uint32_t src[FILLED], dst[FILLED];
    kvx_ex_mismatch mm;
    uint64_t bad;
    kvx_ex_block_table(src, FILLED, FILLED, 1, 9, 0);
    kvx_ex_block_table(dst, FILLED, d->g.host.lay.num_blocks, 1, 10, 0);
    kvx_ex_poison(&d->g.host, SEED, dst, src, FILLED, 0, LAYERS, a_head, b_head);
    if (kvx_ex_gpu_push(&d->g)) die(kvx_ex_gpu_err);
    wait_ok(d, post(d, dst, src, FILLED));
    if (kvx_ex_gpu_pull(&d->g)) die(kvx_ex_gpu_err);
    memset(&mm, 0, sizeof mm);
    bad = kvx_ex_verify(&d->g.host, SEED, dst, src, FILLED, 0, LAYERS, a_head, b_head, &mm);
    if (bad) printf("  VERIFY FAILED: %llu wrong bytes (layer %u block %u head %u token %u)\n", (unsigned long long)bad, mm.layer, mm.local_block, mm.head, mm.token);
    return bad ? -1 : 0;
}

/* checksums: every block filled and sealed, for verified reads */
static kvx_tc_owner spawn_owner(int backend, int gpu, const kvx_layout *l, int tp, uint32_t max_blocks, int checksums, void **md, uint32_t *len) {
    kvx_tc_owner_args a;
    kvx_tc_owner o;
    memset(&a, 0, sizeof a);
    a.backend = backend; a.gpu = gpu; a.device = dev_own; a.kind = KVX_EX_CUMEMALLOC;
    a.rank = 0; a.tp = tp; a.progress = 1; a.seed = SEED; a.fill_blocks = checksums ? 0 : FILLED; a.max_blocks = max_blocks;
    a.checksums = checksums;
    a.generations = owner_generations;
    a.retired = owner_generations ? l->num_blocks : 0u;
    a.lay = *l;
    o = kvx_tc_spawn(&a, md, len);
    if (o.pid < 0) die("owner process did not start");
    return o;
}


/* Section 7's step timer: the calls a post makes, wrapped at link time
   (-Wl,--wrap=NAME sends the program's and kvx's calls of NAME here), timed
   only on the thread that set step_thread while step_on is set. Built with
   KVX_BENCH_WRAP and those flags (tests/gpu/build.sh); without, section 7
   gives the totals alone. */
enum { ST_LAUNCH, ST_EVREC, ST_MEMOP, ST_WAITEV, ST_CAPT, ST_PUSHPOP, ST_HTOD, ST_EVQUERY, ST_WAITVAL, ST_STREAMCTX,
       ST_LOCK, ST_SIGNAL, ST_WRITE, ST_N };
static const char *const step_names[ST_N] = {
    "cuLaunchKernel", "cuEventRecord", "cuStreamBatchMemOp", "cuStreamWaitEvent", "cuStreamIsCapturing", "cuCtxPush/PopCurrent",
    "cuMemcpyHtoDAsync", "cuEventQuery", "cuStreamWaitValue64", "cuStreamGetCtx/cuCtxGetDevice", "pthread_mutex_lock/unlock",
    "pthread_cond_signal", "write (eventfd)"};
static volatile int step_on;
static pthread_t step_thread;
static double step_ns[ST_N];
static uint32_t step_calls[ST_N];
static double step_now_ns(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec * 1e9 + ts.tv_nsec; }
#ifdef __cplusplus
#define STEP_C extern "C"
#else
#define STEP_C
#endif
#ifdef KVX_BENCH_WRAP
static const int step_wrapped = 1;
#define STEP_WRAP(ret, name, k, params, args)                                   \
    STEP_C ret __real_##name params;                                           \
    STEP_C ret __wrap_##name params;                                           \
    STEP_C ret __wrap_##name params {                                          \
        double t0;                                                             \
        ret r;                                                                 \
        if (!step_on || !pthread_equal(pthread_self(), step_thread)) return __real_##name args; \
        t0 = step_now_ns();                                                    \
        r = __real_##name args;                                                \
        step_ns[k] += step_now_ns() - t0;                                      \
        step_calls[k]++;                                                       \
        return r;                                                              \
    }
STEP_WRAP(CUresult, cuLaunchKernel, ST_LAUNCH, (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned sh, CUstream s, void **p, void **e),
          (f, gx, gy, gz, bx, by, bz, sh, s, p, e))
STEP_WRAP(CUresult, cuEventRecord, ST_EVREC, (CUevent e, CUstream s), (e, s))
STEP_WRAP(CUresult, cuStreamBatchMemOp_v2, ST_MEMOP, (CUstream s, unsigned n, CUstreamBatchMemOpParams *p, unsigned f), (s, n, p, f))
STEP_WRAP(CUresult, cuStreamWaitEvent, ST_WAITEV, (CUstream s, CUevent e, unsigned f), (s, e, f))
STEP_WRAP(CUresult, cuStreamIsCapturing, ST_CAPT, (CUstream s, CUstreamCaptureStatus *c), (s, c))
STEP_WRAP(CUresult, cuCtxPushCurrent_v2, ST_PUSHPOP, (CUcontext c), (c))
STEP_WRAP(CUresult, cuCtxPopCurrent_v2, ST_PUSHPOP, (CUcontext *c), (c))
STEP_WRAP(CUresult, cuMemcpyHtoDAsync_v2, ST_HTOD, (CUdeviceptr d, const void *h, size_t n, CUstream s), (d, h, n, s))
STEP_WRAP(CUresult, cuEventQuery, ST_EVQUERY, (CUevent e), (e))
STEP_WRAP(CUresult, cuStreamWaitValue64_v2, ST_WAITVAL, (CUstream s, CUdeviceptr a, cuuint64_t v, unsigned f), (s, a, v, f))
STEP_WRAP(CUresult, cuStreamGetCtx, ST_STREAMCTX, (CUstream s, CUcontext *c), (s, c))
STEP_WRAP(CUresult, cuCtxGetDevice, ST_STREAMCTX, (CUdevice *d), (d))
STEP_WRAP(int, pthread_mutex_lock, ST_LOCK, (pthread_mutex_t *m), (m))
STEP_WRAP(int, pthread_mutex_unlock, ST_LOCK, (pthread_mutex_t *m), (m))
STEP_WRAP(int, pthread_cond_signal, ST_SIGNAL, (pthread_cond_t *c), (c))
STEP_WRAP(ssize_t, write, ST_WRITE, (int fd, const void *b, size_t n), (fd, b, n))
#else
static const int step_wrapped = 0;
#endif

static void step_reset(void) { memset(step_ns, 0, sizeof step_ns); memset(step_calls, 0, sizeof step_calls); }

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

/* kvx_post to the waiting stream resuming, nsamples times: p50, p99 in us. */
static void latency(side *d, uint32_t nb, int nsamples, double *p50, double *p99) {
    CUstream s2;
    uint32_t *flag;
    CUdeviceptr flag_d;
    double *lat = (double *)calloc((size_t)nsamples, sizeof *lat);
    uint32_t src, dst;
    int i;
    if (kvx_ex_cu(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING), "stream") ||
        kvx_ex_cu(cuMemHostAlloc((void **)&flag, 64, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc") ||
        kvx_ex_cu(cuMemHostGetDevicePointer(&flag_d, flag, 0), "cuMemHostGetDevicePointer")) die(kvx_ex_gpu_err);
    *(volatile uint32_t *)flag = 0;
    for (i = -20; i < nsamples; i++) {
        double t0, t1;
        kvx_ticket t;
        src = (uint32_t)(i + 20) % nb;
        dst = (uint32_t)(i + 27) % nb;
        t0 = kvx_tc_now();
        t = post(d, &dst, &src, 1);
        if (kvx_stream_wait(d->q, t, s2) != KVX_OK) die(kvx_ctx_error(d->ctx));
        if (kvx_ex_cu(cuStreamWriteValue32(s2, flag_d, (uint32_t)(i + 100), 0), "cuStreamWriteValue32")) die(kvx_ex_gpu_err);
        /* The benchmark spins to see the stream resume; bounded at 5 s. */
        while (*(volatile uint32_t *)flag != (uint32_t)(i + 100))
            if (kvx_tc_now() - t0 > 5.0) die("the waiting stream did not resume within 5 s");
        t1 = kvx_tc_now();
        wait_ok(d, t);
        if (i >= 0) lat[i] = (t1 - t0) * 1e6;
    }
    qsort(lat, (size_t)nsamples, sizeof *lat, cmp_d);
    *p50 = lat[nsamples / 2];
    *p99 = lat[(size_t)((nsamples - 1) * 0.99 + 0.5)];
    free(lat);
    kvx_tc_sync(s2, 5000);
    cuStreamDestroy(s2);
    cuMemFreeHost(flag);
}

int main(int argc, char **argv) {
    static const uint32_t kib[4] = {4, 16, 64, 256};
    char name[128] = "";
    int i, two = 0, sms = 0, ndev = 0, bad = 0, only = 0;
    CUdevice dev;
    if (argc == 4 && !strcmp(argv[1], "--serve")) return kvx_tc_serve(argv[2], atoi(argv[3]));
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--two-gpu")) two = 1;
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = atoi(argv[++i]);
        else { printf("usage: bench_gpu [--two-gpu] [--quick] [--only N]\n"); return 2; }
    }
    signal(SIGPIPE, SIG_IGN);
    if (kvx_ex_gpu_init(0, &ctx_own) || cuDeviceGetCount(&ndev) != CUDA_SUCCESS) { printf("skip: no GPU: %s\n", kvx_ex_gpu_err); return 77; }
    if (two && ndev < 2) { printf("skip: --two-gpu needs two GPUs, %d visible\n", ndev); return 77; }
    dev_own = 0;
    dev_dec = two ? 1 : 0;
    if (kvx_ex_gpu_init(dev_dec, &ctx_dec)) die(kvx_ex_gpu_err);
    if (kvx_tc_load(&K)) die(kvx_ex_gpu_err);
    cuDeviceGet(&dev, dev_dec);
    cuDeviceGetName(name, sizeof name, dev);
    cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
    printf("bench_gpu: %s, %d SMs; owner process on GPU %d, reader process on GPU %d; %u layers x K/V, random blocks, 1 GiB per read, 16 reads, 4 in flight\n",
           name, sms, dev_own, dev_dec, LAYERS);
    if (two) {
        int p2p = 0, atom = 0;
        CUdevice d0;
        cuDeviceGet(&d0, dev_own);
        cuDeviceCanAccessPeer(&p2p, dev, d0);
        cuDeviceGetP2PAttribute(&atom, CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED, dev, d0);
        printf("  peer access %d, native peer atomics %d\n", p2p, atom);
    }
    fflush(stdout);

    /* 1. throughput; where UCX takes GPU memory, kvx over UCX too (1/16 of
       the bytes per read: it posts a UCX get per piece) */
    ucx_gpu = ucx_takes_gpu();
    if (!only || only == 1) printf("\n| block | layout | kvx GB/s | one %s copy GB/s | kvx / copy | cuMemcpyAsync per block GB/s | kvx GB/s, consecutive blocks | transport |%s\n",
           two ? "cuMemcpyPeerAsync" : "D2D", ucx_gpu ? " kvx over UCX GB/s | UCX / copy | UCX transport |" : "");
    if (!only || only == 1) printf("|---|---|---|---|---|---|---|---|%s\n", ucx_gpu ? "---|---|---|" : "");
    for (i = 0; i < 8 && (!only || only == 1); i++) {
        uint32_t k = kib[i % 4], heads = k / 4u, nb;
        kvx_order order = i < 4 ? KVX_ORDER_HND : KVX_ORDER_NHD;
        int dtp = order == KVX_ORDER_HND ? 1 : 2;  /* NHD: half the heads, a piece per token */
        uint64_t block = (uint64_t)k << 10, per_read = 1ull << 30;
        uint32_t n;
        kvx_layout ol, dl;
        kvx_tc_owner o;
        side d;
        void *md;
        uint32_t len, a, b;
        double kv, ref, pb, kc;
        if (dtp == 2) heads *= 2;  /* the reader's block stays k KiB */
        nb = (uint32_t)((2ull << 30) / (2ull * LAYERS * block));
        n = (uint32_t)(per_read / (2ull * LAYERS * block));
        if (quick && i % 4 != 1) continue;
        ol = layout(heads, 1, nb, order);
        dl = layout(heads, dtp, nb, order);
        o = spawn_owner(KVX_BACKEND_CUDA, 1, &ol, 1, 0, 0, &md, &len);
        side_open(&d, KVX_BACKEND_CUDA, &dl, 0, dtp, 0, NULL, md, len);
        free(md);
        kv = kvx_rate(&d, n, nb, per_read, 1);
        kc = kvx_rate(&d, n, nb, per_read, 0);  /* the same read with consecutive ids: where random placement costs */
        ref = big_copy_rate(per_read, two);
        pb = per_block_rate(block, nb);
        kvx_peer_heads(d.peer, d.cache, 0, &a, &b);
        if (verify(&d, a, a + b)) bad = 1;
        printf("| %u KiB | %s%s | %.0f | %.0f | %.1f%% | %.1f | %.0f (%.1f%%) | %s |", k, order == KVX_ORDER_HND ? "HND" : "NHD",
               dtp == 2 ? " (TP 1->2, 256 B..16 KiB pieces)" : "", kv, ref, 100.0 * kv / ref, pb, kc, 100.0 * kc / ref, kvx_peer_transport(d.peer));
        fflush(stdout);
        side_close(&d);
        kvx_tc_stop(&o);
        if (ucx_gpu) {
            uint32_t nu = n / 16 ? n / 16 : 1;
            double ku;
            o = spawn_owner(KVX_BACKEND_UCX, 1, &ol, 1, 0, 0, &md, &len);
            side_open_mem(&d, KVX_BACKEND_UCX, 1, &dl, 0, dtp, 0, NULL, md, len);
            free(md);
            ku = kvx_rate(&d, nu, nb, (uint64_t)nu * 2ull * LAYERS * block, 1);
            kvx_peer_heads(d.peer, d.cache, 0, &a, &b);
            if (verify(&d, a, a + b)) bad = 1;
            printf(" %.1f | %.1f%% | %s |", ku, 100.0 * ku / ref, kvx_peer_transport(d.peer));
            side_close(&d);
            kvx_tc_stop(&o);
        }
        printf("\n");
        fflush(stdout);
    }

    /* 2. latency */
    if (!only || only == 2) {
        kvx_layout l = layout(4, 1, 256, KVX_ORDER_HND);  /* 16 KiB blocks */
        kvx_tc_owner o;
        side d;
        void *md;
        uint32_t len;
        double p50, p99;
        CUstream s1;
        cuCtxSetCurrent(ctx_dec);
        cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING);
        printf("\nlatency, kvx_post -> the waiting stream resumes, one 16 KiB block x %u layers x K/V (1 MiB):\n", LAYERS);
        o = spawn_owner(KVX_BACKEND_CUDA, 1, &l, 1, 0, 0, &md, &len);
        side_open(&d, KVX_BACKEND_CUDA, &l, 0, 1, 0, s1, md, len);
        free(md);
        latency(&d, 256, quick ? 200 : 1000, &p50, &p99);
        printf("  cuda  (%s): p50 %.1f us, p99 %.1f us\n", kvx_peer_transport(d.peer), p50, p99);
        side_close(&d);
        kvx_tc_stop(&o);
#if defined(KVX_UCX)
        o = spawn_owner(KVX_BACKEND_UCX, 0, &l, 1, 0, 0, &md, &len);
        side_open(&d, KVX_BACKEND_UCX, &l, 0, 1, 0, s1, md, len);
        free(md);
        latency(&d, 256, quick ? 100 : 300, &p50, &p99);
        printf("  ucx   (%s, host memory, progress threads): p50 %.1f us, p99 %.1f us\n", kvx_peer_transport(d.peer), p50, p99);
        side_close(&d);
        kvx_tc_stop(&o);
#endif
        cuStreamDestroy(s1);
    }

    /* 3. the thread-block cap: copy speed alone */
    if (!only || only == 3) {
        uint32_t caps[4], c, z;
        caps[0] = (uint32_t)sms / 4; caps[1] = (uint32_t)sms / 2; caps[2] = (uint32_t)sms; caps[3] = 0;
        printf("\nthread-block cap (kvx_ctx_desc.cuda.max_blocks, 256 threads each; at most 2 fit an SM), kvx GB/s, HND random, 1 GiB reads, 4 in flight:\n");
        printf("| block | cap %u | cap %u | cap %u | default (%u) |\n|---|---|---|---|---|\n", caps[0], caps[1], caps[2], (two ? 1u : 2u) * (uint32_t)sms);
        for (z = 0; z < 2 && !quick; z++) {
            uint32_t k = z ? 256u : 4u, nb = (uint32_t)((2ull << 30) / (2ull * LAYERS * ((uint64_t)k << 10))), n = nb / 2;
            kvx_layout l = layout(k / 4u, 1, nb, KVX_ORDER_HND);
            kvx_tc_owner o;
            void *md;
            uint32_t len;
            o = spawn_owner(KVX_BACKEND_CUDA, 1, &l, 1, 0, 0, &md, &len);
            printf("| %u KiB |", k);
            for (c = 0; c < 4; c++) {
                side d;
                side_open(&d, KVX_BACKEND_CUDA, &l, 0, 1, caps[c], NULL, md, len);
                printf(" %.0f |", kvx_rate(&d, n, nb, 1ull << 30, 1));
                fflush(stdout);
                side_close(&d);
            }
            printf("\n");
            free(md);
            kvx_tc_stop(&o);
        }
    }

    /* 4. a compute stream beside the copies: many short kernels, as a decode
       step has, so that the two share the SMs as they come free */
    if (!only || only == 4) {
        uint32_t caps[5], ncap = 0, c, fgrid = (uint32_t)sms * 8u, iters = 2000, nk = 40, j;
        kvx_layout l = layout(4, 1, 2048, KVX_ORDER_HND);  /* 16 KiB blocks */
        uint32_t n = 2048 / 2;
        uint64_t per_read = (uint64_t)n * 2u * LAYERS * (16u << 10);
        CUstream sc;
        CUevent e0, e1;
        CUdeviceptr fout;
        kvx_tc_owner o;
        void *md;
        uint32_t len;
        double alone = 0;
        caps[ncap++] = (uint32_t)sms / 4; caps[ncap++] = (uint32_t)sms / 2; caps[ncap++] = (uint32_t)sms; caps[ncap++] = 0;
        cuCtxSetCurrent(ctx_dec);
        cuStreamCreate(&sc, CU_STREAM_NON_BLOCKING);
        cuEventCreate(&e0, 0);
        cuEventCreate(&e1, 0);
        if (kvx_ex_cu(cuMemAlloc(&fout, (size_t)fgrid * 256 * 4), "cuMemAlloc")) die(kvx_ex_gpu_err);
        for (i = 0; i < 3; i++) {  /* calibrate: each kernel about 1 ms, 40 of them */
            float ms;
            cuEventRecord(e0, sc);
            for (j = 0; j < nk; j++) kvx_tc_fma(&K, sc, fout, fgrid, iters);
            cuEventRecord(e1, sc);
            ms = ev_ms(e0, e1);
            if (i < 2) iters = (uint32_t)((double)iters * 40.0 / (ms > 0.01 ? ms : 0.01));
            else alone = ms;
        }
        printf("\ncompute beside the copies: %u kernels of %u blocks x 256 threads of FMAs (%.2f ms each, %.1f ms in all alone) while 16 KiB-block reads run back to back\n",
               nk, fgrid, alone / nk, alone);
        printf("| cap | compute ms with copies beside it | compute slowdown | kvx GB/s meanwhile |\n|---|---|---|---|\n");
        o = spawn_owner(KVX_BACKEND_CUDA, 1, &l, 1, 0, 0, &md, &len);
        for (c = 0; c < ncap; c++) {
            side d;
            uint32_t *src, *dst, k2 = 0;
            double t0, moved = 0, during;
            float ms;
            kvx_ticket t[2];
            if (quick && caps[c] != 0 && caps[c] != (uint32_t)sms / 4) continue;
            side_open(&d, KVX_BACKEND_CUDA, &l, 0, 1, caps[c], NULL, md, len);
            src = (uint32_t *)malloc(4 * n); dst = (uint32_t *)malloc(4 * n);
            kvx_ex_block_table(src, n, 2048, 1, 3, 0);
            kvx_ex_block_table(dst, n, 2048, 1, 4, 0);
            wait_ok(&d, post(&d, dst, src, n));  /* warm-up */
            /* Copies first (two in flight), then the compute kernels; copies go on until they are done. */
            t0 = kvx_tc_now();
            t[0] = post(&d, dst, src, n);
            t[1] = post(&d, dst, src, n);
            cuEventRecord(e0, sc);
            for (j = 0; j < nk; j++) kvx_tc_fma(&K, sc, fout, fgrid, iters);
            cuEventRecord(e1, sc);
            while (cuEventQuery(e1) == CUDA_ERROR_NOT_READY && kvx_tc_now() - t0 < 10.0) {
                wait_ok(&d, t[k2 & 1]);
                moved += (double)per_read;
                t[k2 & 1] = post(&d, dst, src, n);
                k2++;
            }
            during = moved / (kvx_tc_now() - t0) / 1e9;
            wait_ok(&d, t[k2 & 1]);
            wait_ok(&d, t[(k2 + 1) & 1]);
            ms = ev_ms(e0, e1);
            if (caps[c]) printf("| %u |", caps[c]); else printf("| default (%d) |", (two ? 1 : 2) * sms);
            printf(" %.1f | %+.1f%% | %.0f |\n", ms, 100.0 * (ms / alone - 1.0), during);
            fflush(stdout);
            free(src); free(dst);
            side_close(&d);
        }
        free(md);
        kvx_tc_stop(&o);
        cuMemFree(fout);
        cuEventDestroy(e0); cuEventDestroy(e1); cuStreamDestroy(sc);
    }
    /* 5. verify mode: 256 MiB reads of 16 KiB blocks, unverified, one block
       in 64 checked, every block checked (all blocks sealed; the four reads
       in flight fill the reader's cache) */
    if (!only || only == 5) {
        static const uint32_t every[3] = {0, 64, 1};
        uint32_t nb = 1024, n = 256, v;
        int o2;
        printf("\nverify mode (kvx_read.verify), 16 KiB blocks, 256 MiB reads, random blocks, 16 reads, 4 in flight, kvx GB/s:\n");
        printf("| layout | unverified | 1 in 64 checked | every block checked |\n|---|---|---|---|\n");
        for (o2 = 0; o2 < 2; o2++) {
            kvx_order order = o2 ? KVX_ORDER_NHD : KVX_ORDER_HND;
            int dtp = o2 ? 2 : 1;
            kvx_layout ol = layout(o2 ? 8 : 4, 1, nb, order), dl = layout(o2 ? 8 : 4, dtp, nb, order);
            kvx_tc_owner o;
            side d;
            void *md;
            uint32_t len, a, b;
            if (quick && o2) continue;
            o = spawn_owner(KVX_BACKEND_CUDA, 1, &ol, 1, 0, 1, &md, &len);
            side_checksums = 1;
            side_open(&d, KVX_BACKEND_CUDA, &dl, 0, dtp, 0, NULL, md, len);
            side_checksums = 0;
            free(md);
            printf("| %s |", o2 ? "NHD (TP 1->2)" : "HND");
            for (v = 0; v < 3; v++) {
                read_verify = every[v];
                printf(" %.0f |", kvx_rate(&d, n, nb, (uint64_t)n * 2u * LAYERS * (16u << 10), 1));
                fflush(stdout);
            }
            kvx_peer_heads(d.peer, d.cache, 0, &a, &b);
            if (verify(&d, a, a + b)) bad = 1;  /* a verified read (every block), byte-checked too */
            read_verify = 0;
            printf("\n");
            side_close(&d);
            kvx_tc_stop(&o);
        }
    }

    /* 6. block generations: the owner keeps them and retired every block
       once (each is at 1), so every read expects 1s; 64 random 16 KiB
       blocks of 32 layers per read (64 MiB), without and with, in turn. */
    if (!only || only == 6) {
        uint32_t nb = 1024, n = 64, a, b, k;
        uint64_t *ones = (uint64_t *)malloc((size_t)nb * sizeof *ones);
        kvx_layout l = layout(4, 1, nb, KVX_ORDER_HND);
        double rate[2] = {0, 0}, p50[2] = {0, 0}, p99[2] = {0, 0};
        kvx_tc_owner o;
        side d;
        void *md;
        uint32_t len;
        for (k = 0; k < nb; k++) ones[k] = 1;
        owner_generations = 1;
        o = spawn_owner(KVX_BACKEND_CUDA, 1, &l, 1, 0, 0, &md, &len);
        owner_generations = 0;
        side_open(&d, KVX_BACKEND_CUDA, &l, 0, 1, 0, NULL, md, len);
        free(md);
        printf("\nblock generations (kvx_read.remote_generations), HND, 16 KiB blocks, 64 random blocks x 32 layers per read (64 MiB):\n");
        for (k = 0; k < (quick ? 6u : 20u); k++) {  /* without, with, in turn: the best of each */
            double r, q50, q99;
            read_generations = k % 2 ? ones : NULL;
            r = kvx_rate(&d, n, nb, (uint64_t)n * 2u * LAYERS * (16u << 10), 1);
            latency(&d, nb, quick ? 100 : 300, &q50, &q99);
            if (r > rate[k % 2]) rate[k % 2] = r;
            if (!p50[k % 2] || q50 < p50[k % 2]) { p50[k % 2] = q50; p99[k % 2] = q99; }
        }
        printf("| | without | with | with / without |\n|---|---|---|---|\n");
        printf("| throughput GB/s (16 reads, 4 in flight) | %.1f | %.1f | %.3f |\n", rate[0], rate[1], rate[1] / rate[0]);
        printf("| kvx_post to the waiting stream resuming, one block, p50 us (p99) | %.1f (%.1f) | %.1f (%.1f) | %.3f |\n",
               p50[0], p99[0], p50[1], p99[1], p50[1] / p50[0]);
        read_generations = ones;
        kvx_peer_heads(d.peer, d.cache, 0, &a, &b);
        if (verify(&d, a, a + b)) bad = 1;  /* reads with generations, byte-checked */
        read_generations = NULL;
        side_close(&d);
        kvx_tc_stop(&o);
        free(ones);
    }


    /* 7. where a post's time goes */
    if (!only || only == 7) {
        enum { NS = 400, NB7 = 128 };
        kvx_layout l = layout(4, 1, 2048, KVX_ORDER_HND);  /* 16 KiB blocks, 32 layers x K/V */
        static double tot[NS], wtot[NS], done_ns[NS], per[ST_N][NS], calls[ST_N];
        double t_setup, t_first = 0;
        uint32_t *src = (uint32_t *)malloc(NB7 * 4), *dst = (uint32_t *)malloc(NB7 * 4);
        double floor_ns[5] = {0, 0, 0, 0, 0}, own[NS];
        kvx_tc_owner o;
        side d;
        void *md;
        uint32_t len, k, j;
        CUstream s1, s2;
        int smp;
        cuCtxSetCurrent(ctx_dec);
        cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING);
        cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING);
        o = spawn_owner(KVX_BACKEND_CUDA, 1, &l, 1, 0, 0, &md, &len);
        t_setup = step_now_ns();
        side_open(&d, KVX_BACKEND_CUDA, &l, 0, 1, 0, s1, md, len);
        t_setup = step_now_ns() - t_setup;
        free(md);
        step_thread = pthread_self();
        memset(calls, 0, sizeof calls);
        srand(7);
        for (smp = -20; smp < NS; smp++) {
            double t0, t1, t2, sum = 0;
            kvx_ticket t;
            for (k = 0; k < NB7; k++) { src[k] = (uint32_t)rand() % 2048u; dst[k] = (k * 16u + (uint32_t)smp * 3u) % 2048u; }
            for (k = 0; k < NB7; k++)  /* distinct local ids */
                for (j = 0; j < k; j++) if (dst[j] == dst[k]) { dst[k] = (dst[k] + 1) % 2048u; j = (uint32_t)-1; }
            step_reset();
            step_on = 1;
            t0 = step_now_ns();
            t = post(&d, dst, src, NB7);
            t1 = step_now_ns();
            if (kvx_stream_wait(d.q, t, s2) != KVX_OK) die(kvx_ctx_error(d.ctx));
            t2 = step_now_ns();
            step_on = 0;
            wait_ok(&d, t);
            if (smp == -20) t_first = step_now_ns() - t0;
            if (smp < 0) continue;
            done_ns[smp] = step_now_ns() - t0;
            tot[smp] = t1 - t0;
            wtot[smp] = t2 - t1;
            for (k = 0; k < ST_N; k++) { per[k][smp] = step_ns[k]; calls[k] += step_calls[k]; sum += step_ns[k]; }
            own[smp] = (t2 - t0) - sum;
        }
        kvx_tc_sync(s2, 5000);
        /* Floors: each driver call alone, the median of 400. */
        {
            static double f[5][NS];
            static uint64_t block[500];
            CUevent ev;
            CUdeviceptr word;
            CUstreamBatchMemOpParams op;
            uint32_t *hw;  /* the FMA kernel's 256 outputs land here too */
            cuEventCreate(&ev, CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING);  /* as kvx's batch events: its waiter sleeps on them */
            cuMemHostAlloc((void **)&hw, 4096, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
            cuMemHostGetDevicePointer(&word, hw, 0);
            memset(&op, 0, sizeof op);
            op.writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_64;
            op.writeValue.address = word;
            for (smp = 0; smp < NS; smp++) {
                double a = step_now_ns(), b, c, e, g;
                kvx_tc_fma(&K, s1, word, 1, 1);
                b = step_now_ns();
                cuEventRecord(ev, s1);
                c = step_now_ns();
                op.writeValue.value64 = (cuuint64_t)smp;
                cuStreamBatchMemOp(s1, 1, &op, 0);
                e = step_now_ns();
                cuStreamWaitValue64(s2, word, 0, CU_STREAM_WAIT_VALUE_GEQ);
                g = step_now_ns();
                block[1] = (uint64_t)smp;
                kvx_tc_params(&K, s1, block, word);
                f[0][smp] = b - a; f[1][smp] = c - b; f[2][smp] = e - c; f[3][smp] = g - e; f[4][smp] = step_now_ns() - g;
                if (smp % 16 == 15) kvx_tc_sync(s1, 5000);
            }
            kvx_tc_sync(s1, 5000);
            kvx_tc_sync(s2, 5000);
            for (k = 0; k < 5; k++) { qsort(f[k], NS, sizeof f[k][0], cmp_d); floor_ns[k] = f[k][NS / 2]; }
            cuEventDestroy(ev);
            cuMemFreeHost(hw);
        }
        printf("\nwhere a post's time goes: kvx_post of %u random 16 KiB blocks x %u layers x K/V (CUDA backend, a queue with a stream), then kvx_stream_wait, "
               "one read at a time, %d reads, on the posting thread; medians in us:\n", NB7, LAYERS, NS);
        qsort(tot, NS, sizeof tot[0], cmp_d);
        qsort(wtot, NS, sizeof wtot[0], cmp_d);
        qsort(own, NS, sizeof own[0], cmp_d);
        printf("| step | us per read (median) | calls per read | the call alone, us |\n|---|---|---|---|\n");
        printf("| kvx_post, all of it | %.2f (p99 %.2f) | 1 | |\n", tot[NS / 2] / 1e3, tot[(NS * 99) / 100] / 1e3);
        printf("| kvx_stream_wait, all of it | %.2f (p99 %.2f) | 1 | |\n", wtot[NS / 2] / 1e3, wtot[(NS * 99) / 100] / 1e3);
        qsort(done_ns, NS, sizeof done_ns[0], cmp_d);
        printf("| the first read of the context: kvx_post to kvx_wait's return | %.1f | | (warm: %.1f; first / warm %.2f) |\n",
               t_first / 1e3, done_ns[NS / 2] / 1e3, t_first / done_ns[NS / 2]);
        printf("| setting up before it: context, cache, queue, peer | %.0f | | |\n", t_setup / 1e3);
        for (k = 0; k < ST_N; k++) {
            const char *alone = "";
            char b[64];
            if (!calls[k]) continue;
            qsort(per[k], NS, sizeof per[k][0], cmp_d);
            if (k == ST_LAUNCH) {
                snprintf(b, sizeof b, "%.2f; with 4000 bytes of parameters %.2f", floor_ns[0] / 1e3, floor_ns[4] / 1e3);
                alone = b;
            } else if (k == ST_EVREC || k == ST_MEMOP || k == ST_WAITVAL) {
                snprintf(b, sizeof b, "%.2f", floor_ns[k == ST_EVREC ? 1 : k == ST_MEMOP ? 2 : 3] / 1e3);
                alone = b;
            }
            printf("| %s | %.2f | %.1f | %s |\n", step_names[k], per[k][NS / 2] / 1e3, calls[k] / NS, alone);
        }
        if (step_wrapped) printf("| kvx's own work (the rest of both calls) | %.2f | | |\n", own[NS / 2] / 1e3);
        else printf("(built without KVX_BENCH_WRAP: no steps; tests/gpu/build.sh links them)\n");
        fflush(stdout);
        side_close(&d);
        kvx_tc_stop(&o);
        cuStreamDestroy(s1);
        cuStreamDestroy(s2);
        free(src);
        free(dst);
    }

    printf("\n%s\n", bad ? "BENCH FAILED: a verified read was wrong" : "every verified read matched");
    return bad;
}
