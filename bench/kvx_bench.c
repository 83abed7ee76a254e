/*
    kvx_bench -- the pack/spread KV transfer test. It follows an engine's own
    flow (register caches, exchange metadata, read block tables, check
    completions) and answers three questions: does every byte arrive intact,
    which transport carried it, how fast was it.

    Pack (one host; the bench starts every rank itself):
        kvx_bench --strategy pack --prefill-tp 2 --decode-tp 4 --blocks 128
    Spread (two hosts; each role starts its own TP ranks):
        host A: kvx_bench --role prefill --listen 10.0.0.1:7700 --prefill-tp 2 --decode-tp 4
        host B: kvx_bench --role decode  --connect 10.0.0.1:7700 --prefill-tp 2 --decode-tp 4

    Both sides must be given the same layout and table options. Exit status 0
    with TEST PASSED; 1 with TEST FAILED and the first wrong byte; 2 for bad
    options or a setup that could not run.

    Processes: a role launcher per host, one process per TP rank below it,
    talking to it over socketpairs with kvx_rdv frames. The prefill launcher
    collects its ranks' metadata and hands it to the decode launcher over TCP;
    the decode launcher runs every iteration as a barrier across its ranks.

    kvx's implementation is linked in from tests/lib/kvx_impl.c (make builds
    it once per configuration).
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../kvx.h"
#include "../tests/lib/kvx_host_cache.h"
#include "../examples/kvx_rdv.h"
#if defined(KVX_CUDA)
#include "../tests/lib/kvx_gpu_cache.h"
#endif

#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define MAX_TP 64
#define MAX_ITERS 10000
#define RDV_TIMEOUT_MS 60000

/* frame types */
enum { F_MD = 1, F_ALL_MD, F_RANK_MD, F_PEERS, F_READY, F_GO, F_ITER, F_RESULT, F_EXIT, F_DONE };

typedef struct opts {
    const char *strategy, *backend, *role, *listen, *connect, *json;
    uint32_t blocks, num_blocks, num_layers, block_tokens, heads, head_dim, dtype_bytes, iters, warmup;
    int random_blocks, prefill_tp, decode_tp, verbose, nhd;
    uint64_t seed;
    uint32_t max_ops;
    uint32_t verify;              /* --verify N: kvx checks one block in N against sealed checksums */
    int generations;              /* --generations: both caches keep block generations, every read carries them */
    const char *policy;           /* --transport-policy: kvx_ctx_desc.transport_policy (NULL: $KVX_TRANSPORT_POLICY) */
    /* internal: a rank process */
    int rank, ctl_fd;
} opts;

/* What a decode rank reports for one iteration. */
typedef struct iter_report {
    uint64_t bytes, descs_before, descs_after;
    double seconds;               /* first post to last completion */
    uint64_t bad_bytes;
    kvx_ex_mismatch mm;
    int32_t mm_src_rank;
    int32_t status;               /* kvx_status of the reads */
    char error[200];
} iter_report;

typedef struct rank_hello {
    int32_t rank, npeers;
    char transport[MAX_TP][96];
    int32_t peer_rank[MAX_TP];
    uint32_t head_first[MAX_TP], head_count[MAX_TP];
} rank_hello;

static void usage(void) {
    fprintf(stderr,
            "usage: kvx_bench [--strategy pack|spread] [--backends UCX|LIBFABRIC|CUDA]\n"
            "                 [--role prefill --listen ADDR:PORT | --role decode --connect ADDR:PORT]\n"
            "                 [--blocks N] [--num-blocks N] [--num-layers N] [--block-tokens N] [--heads N]\n"
            "                 [--head-dim N] [--dtype-bytes N] [--random-blocks] [--seed N] [--iters N] [--warmup N]\n"
            "                 [--prefill-tp N] [--decode-tp N] [--layout HND|NHD] [--max-ops N] [--verify N] [--generations] [--transport-policy P] [--verbose] [--json FILE]\n"
            "  --heads is the model's KV heads; each rank holds heads/tp of them (1, replicated, when fewer).\n"
            "  --warmup N: the first N of the --iters iterations are checked but not counted in the total\n"
            "  (ucx_perftest also warms up before it measures).\n");
}

static int parse_u32(const char *v, uint32_t *out, const char *name) {
    char *end;
    unsigned long x = v ? strtoul(v, &end, 10) : 0;
    if (!v || *end || x > 0xffffffffu) { fprintf(stderr, "kvx_bench: %s needs a number, got '%s'\n", name, v ? v : ""); return -1; }
    *out = (uint32_t)x;
    return 0;
}

static int parse(int argc, char **argv, opts *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->strategy = "pack"; o->backend = "UCX";
    o->blocks = 10; o->num_blocks = 100; o->num_layers = 2;
    o->block_tokens = 16; o->heads = 8; o->head_dim = 128; o->dtype_bytes = 2;
    o->iters = 5; o->prefill_tp = 1; o->decode_tp = 1; o->seed = 42; o->rank = -1; o->ctl_fd = -1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        uint32_t x;
        int used = 1;
        if (!strcmp(a, "--random-blocks")) { o->random_blocks = 1; used = 0; }
        else if (!strcmp(a, "--verbose")) { o->verbose = 1; used = 0; }
        else if (!strcmp(a, "--generations")) { o->generations = 1; used = 0; }
        else if (!strcmp(a, "--strategy")) o->strategy = v;
        else if (!strcmp(a, "--backends")) o->backend = v;
        else if (!strcmp(a, "--role")) o->role = v;
        else if (!strcmp(a, "--listen")) o->listen = v;
        else if (!strcmp(a, "--connect")) o->connect = v;
        else if (!strcmp(a, "--json")) o->json = v;
        else if (!strcmp(a, "--transport-policy")) o->policy = v;
        else if (!strcmp(a, "--layout")) {
            if (!v || (strcmp(v, "HND") && strcmp(v, "NHD"))) { fprintf(stderr, "kvx_bench: --layout is HND or NHD\n"); return -1; }
            o->nhd = !strcmp(v, "NHD");
        }
        else if (!strcmp(a, "--blocks")) { if (parse_u32(v, &o->blocks, a)) return -1; }
        else if (!strcmp(a, "--num-blocks")) { if (parse_u32(v, &o->num_blocks, a)) return -1; }
        else if (!strcmp(a, "--num-layers")) { if (parse_u32(v, &o->num_layers, a)) return -1; }
        else if (!strcmp(a, "--block-tokens")) { if (parse_u32(v, &o->block_tokens, a)) return -1; }
        else if (!strcmp(a, "--heads")) { if (parse_u32(v, &o->heads, a)) return -1; }
        else if (!strcmp(a, "--head-dim")) { if (parse_u32(v, &o->head_dim, a)) return -1; }
        else if (!strcmp(a, "--dtype-bytes")) { if (parse_u32(v, &o->dtype_bytes, a)) return -1; }
        else if (!strcmp(a, "--iters")) { if (parse_u32(v, &o->iters, a)) return -1; }
        else if (!strcmp(a, "--warmup")) { if (parse_u32(v, &o->warmup, a)) return -1; }
        else if (!strcmp(a, "--max-ops")) { if (parse_u32(v, &o->max_ops, a)) return -1; }
        else if (!strcmp(a, "--verify")) { if (parse_u32(v, &o->verify, a)) return -1; }
        else if (!strcmp(a, "--seed")) { if (parse_u32(v, &x, a)) return -1; o->seed = x; }
        else if (!strcmp(a, "--prefill-tp")) { if (parse_u32(v, &x, a)) return -1; o->prefill_tp = (int)x; }
        else if (!strcmp(a, "--decode-tp")) { if (parse_u32(v, &x, a)) return -1; o->decode_tp = (int)x; }
        else if (!strcmp(a, "--rank")) { if (parse_u32(v, &x, a)) return -1; o->rank = (int)x; }
        else if (!strcmp(a, "--ctl-fd")) { if (parse_u32(v, &x, a)) return -1; o->ctl_fd = (int)x; }
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); exit(0); }
        else { fprintf(stderr, "kvx_bench: unknown option '%s'\n", a); usage(); return -1; }
        if (used) {
            if (!v) { fprintf(stderr, "kvx_bench: %s needs a value\n", a); return -1; }
            i++;
        }
    }
    if (strcmp(o->strategy, "pack") && strcmp(o->strategy, "spread")) { fprintf(stderr, "kvx_bench: --strategy is pack or spread\n"); return -1; }
    if (o->prefill_tp < 1 || o->prefill_tp > MAX_TP || o->decode_tp < 1 || o->decode_tp > MAX_TP) {
        fprintf(stderr, "kvx_bench: --prefill-tp and --decode-tp must be in [1, %d]\n", MAX_TP);
        return -1;
    }
    if (!o->blocks || o->blocks > o->num_blocks) { fprintf(stderr, "kvx_bench: --blocks must be in [1, --num-blocks %u]\n", o->num_blocks); return -1; }
    if (!o->iters || o->iters > MAX_ITERS) { fprintf(stderr, "kvx_bench: --iters must be in [1, %d]\n", MAX_ITERS); return -1; }
    if (o->warmup >= o->iters) { fprintf(stderr, "kvx_bench: --warmup must be below --iters %u\n", o->iters); return -1; }
    if (!o->num_layers || !o->block_tokens || !o->heads || !o->head_dim || !o->dtype_bytes) {
        fprintf(stderr, "kvx_bench: layout sizes must be non-zero\n");
        return -1;
    }
    {
        int tps[2] = {o->prefill_tp, o->decode_tp}, k;
        for (k = 0; k < 2; k++)
            if (o->heads >= (uint32_t)tps[k] ? o->heads % (uint32_t)tps[k] != 0 : (uint32_t)tps[k] % o->heads != 0) {
                fprintf(stderr, "kvx_bench: %u KV heads do not divide over TP %d (heads must be a multiple of TP, or TP a multiple of heads)\n",
                        o->heads, tps[k]);
                return -1;
            }
    }
    return 0;
}

static kvx_backend backend_of(const char *name) {
    if (!strcmp(name, "UCX")) return KVX_BACKEND_UCX;
    if (!strcmp(name, "LIBFABRIC")) return KVX_BACKEND_OFI;
    if (!strcmp(name, "CUDA")) return KVX_BACKEND_CUDA;
    return (kvx_backend)-1;
}

static kvx_layout layout_of(const opts *o, int tp) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = o->num_layers;
    l.num_blocks = o->num_blocks;
    l.block_tokens = o->block_tokens;
    l.total_heads = o->heads;
    l.num_heads = o->heads >= (uint32_t)tp ? o->heads / (uint32_t)tp : 1;
    l.head_dim = o->head_dim;
    l.elem_bytes = o->dtype_bytes;
    l.order = o->nhd ? KVX_ORDER_NHD : KVX_ORDER_HND;
    return l;
}

/* The block tables of iteration it: remote ids (prefill) and local ids (decode). */
static void tables(const opts *o, uint32_t it, uint32_t *src, uint32_t *dst) {
    kvx_ex_block_table(src, o->blocks, o->num_blocks, o->random_blocks, o->seed * 1000003u + it * 2u, (it * o->blocks) % o->num_blocks);
    kvx_ex_block_table(dst, o->blocks, o->num_blocks, o->random_blocks, o->seed * 1000003u + it * 2u + 1u, (it * o->blocks + 7) % o->num_blocks);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static kvx_ctx *make_ctx(const opts *o, const char *name, int rank, int tp, int progress_thread) {
    kvx_ctx_desc d;
    kvx_ctx *ctx = NULL;
    kvx_status st;
    memset(&d, 0, sizeof d);
    d.name = name;
    d.tp_rank = rank;
    d.tp_size = tp;
    d.backend = backend_of(o->backend);
    d.progress_thread = progress_thread;
    d.log_level = o->verbose ? KVX_LOG_INFO : KVX_LOG_DEFAULT;
    d.transport_policy = o->policy;
    if ((st = kvx_ctx_create(&d, &ctx)) != KVX_OK) {
        fprintf(stderr, "kvx_bench: %s rank %d: %s: %s\n", name, rank, kvx_status_name(st), kvx_ctx_error(NULL));
        return NULL;
    }
    return ctx;
}

/*--- a rank's cache ---------------------------------------------------------*/

/* Host memory; with --backends CUDA, or any backend with $KVX_BENCH_CUDA_MEM
   set (UCX built with CUDA), GPU memory (device from
   $KVX_BENCH_PREFILL_GPU / $KVX_BENCH_DECODE_GPU, default 0; allocation from
   $KVX_BENCH_CUDA_MEM = malloc, vmm or pool) whose host staging copy is what
   fill, poison and verify see, pushed and pulled whole around the reads. */
typedef struct rank_mem {
    kvx_ex_cache *c;
    kvx_ex_cache host;
#if defined(KVX_CUDA)
    kvx_ex_gpu gpu;
#endif
    int gpu_on;
} rank_mem;

static int mem_alloc(rank_mem *m, const opts *o, const kvx_layout *lay, int tp, const char *role) {
    memset(m, 0, sizeof *m);
    m->c = &m->host;
    if (backend_of(o->backend) != KVX_BACKEND_CUDA && !getenv("KVX_BENCH_CUDA_MEM")) {
        if (!kvx_ex_cache_alloc(&m->host, lay, o->rank, tp)) return 0;
        fprintf(stderr, "kvx_bench: %s %d: cannot allocate %zu bytes\n", role, o->rank, m->host.mem_bytes);
        return -1;
    }
#if defined(KVX_CUDA)
    {
        /* "2" puts every rank of the role on GPU 2; "0,1,2,3" gives rank r the r-th (mod count). */
        const char *dev = getenv(!strcmp(role, "prefill") ? "KVX_BENCH_PREFILL_GPU" : "KVX_BENCH_DECODE_GPU");
        int kind = kvx_ex_gpu_kind_parse(getenv("KVX_BENCH_CUDA_MEM")), d = 0;
        if (dev && *dev) {
            int n = 1, k;
            const char *p;
            for (p = dev; *p; p++) n += *p == ',';
            for (p = dev, k = o->rank % n; k > 0; k--) p = strchr(p, ',') + 1;
            d = atoi(p);
        }
        if (kind < 0) { fprintf(stderr, "kvx_bench: KVX_BENCH_CUDA_MEM is malloc, vmm or pool\n"); return -1; }
        if (kvx_ex_gpu_init(d, NULL) || kvx_ex_gpu_alloc(&m->gpu, lay, o->rank, tp, d, (kvx_ex_gpu_kind)kind)) {
            fprintf(stderr, "kvx_bench: %s %d: GPU cache on device %d: %s\n", role, o->rank, d, kvx_ex_gpu_err);
            return -1;
        }
        m->c = &m->gpu.host;
        m->gpu_on = 1;
        return 0;
    }
#else
    (void)lay; (void)tp;
    fprintf(stderr, "kvx_bench: %s %d: GPU caches need a kvx_bench built with KVX_CUDA\n", role, o->rank);
    return -1;
#endif
}

static kvx_cache_desc mem_desc(const rank_mem *m) {
#if defined(KVX_CUDA)
    if (m->gpu_on) return kvx_ex_gpu_desc(&m->gpu);
#endif
    return kvx_ex_cache_desc(&m->host);
}

/* to_gpu 1: staging -> GPU; 0: GPU -> staging. Host caches: nothing to do. */
static int mem_sync(rank_mem *m, int to_gpu) {
#if defined(KVX_CUDA)
    if (m->gpu_on && (to_gpu ? kvx_ex_gpu_push(&m->gpu) : kvx_ex_gpu_pull(&m->gpu))) {
        fprintf(stderr, "kvx_bench: rank cache copy: %s\n", kvx_ex_gpu_err);
        return -1;
    }
#endif
    (void)m; (void)to_gpu;
    return 0;
}

static void mem_free(rank_mem *m) {
#if defined(KVX_CUDA)
    if (m->gpu_on) { kvx_ex_gpu_free(&m->gpu); return; }
#endif
    kvx_ex_cache_free(&m->host);
}

/*--- prefill rank ---------------------------------------------------------*/

static int prefill_rank(const opts *o) {
    kvx_layout lay = layout_of(o, o->prefill_tp);
    rank_mem mem;
    kvx_cache_desc cd;
    kvx_cache *cache;
    kvx_ctx *ctx;
    kvx_status st;
    uint32_t it, *src, *dst, len32;
    size_t len = 0;
    void *md, *buf;
    if (mem_alloc(&mem, o, &lay, o->prefill_tp, "prefill")) return 2;
    if (!(ctx = make_ctx(o, "prefill", o->rank, o->prefill_tp, 1))) return 2;
    src = (uint32_t *)malloc(o->blocks * sizeof *src);
    dst = (uint32_t *)malloc(o->blocks * sizeof *dst);
    for (it = 0; it < o->iters; it++) {  /* fill only the blocks that will be read */
        tables(o, it, src, dst);
        kvx_ex_fill(mem.c, o->seed, src, o->blocks);
    }
    if (mem_sync(&mem, 1)) return 2;
    cd = mem_desc(&mem);
    cd.checksums = o->verify != 0;
    cd.generations = o->generations;
    if ((st = kvx_cache_register(ctx, &cd, &cache)) != KVX_OK) {
        fprintf(stderr, "kvx_bench: prefill %d: %s: %s\n", o->rank, kvx_status_name(st), kvx_ctx_error(ctx));
        return 2;
    }
    for (it = 0; o->verify && it < o->iters; it++) {  /* the producer seals what it wrote */
        tables(o, it, src, dst);
        kvx_cache_seal(cache, src, o->blocks);
    }
    kvx_metadata(ctx, NULL, &len);
    md = malloc(len);
    kvx_metadata(ctx, md, &len);
    if (kvx_rdv_send(o->ctl_fd, F_RANK_MD, md, (uint32_t)len, RDV_TIMEOUT_MS)) { fprintf(stderr, "kvx_bench: prefill %d: %s\n", o->rank, kvx_rdv_error()); return 2; }
    /* Serve reads from the progress thread until told to exit (or the launcher goes away). */
    if (!kvx_rdv_recv(o->ctl_fd, F_EXIT, &buf, &len32, 24 * 3600 * 1000)) free(buf);
    kvx_ctx_destroy(ctx);
    mem_free(&mem);
    free(md); free(src); free(dst);
    return 0;
}

/*--- decode rank ----------------------------------------------------------*/

static int decode_rank(const opts *o) {
    kvx_layout lay = layout_of(o, o->decode_tp);
    rank_mem mem;
    kvx_cache_desc cd;
    kvx_cache *cache;
    kvx_queue *q;
    kvx_queue_desc qd;
    kvx_ctx *ctx;
    kvx_status st;
    kvx_peer *peers[MAX_TP];
    uint32_t pf[MAX_TP], pc[MAX_TP];
    int np = 0, k;
    rank_hello hello;
    uint32_t it, *src, *dst, len, off, n;
    uint64_t *gens;
    uint8_t *all;
    void *go;
    if (mem_alloc(&mem, o, &lay, o->decode_tp, "decode")) return 2;
    if (!(ctx = make_ctx(o, "decode", o->rank, o->decode_tp, 0))) return 2;
    cd = mem_desc(&mem);
    cd.checksums = o->verify != 0;
    cd.generations = o->generations;
    if ((st = kvx_cache_register(ctx, &cd, &cache)) != KVX_OK) { fprintf(stderr, "kvx_bench: decode %d: %s\n", o->rank, kvx_ctx_error(ctx)); return 2; }
    memset(&qd, 0, sizeof qd);
    qd.max_ops = o->max_ops;
    if (kvx_queue_create(ctx, &qd, &q) != KVX_OK) return 2;
    /* All prefill metadata: u32 count, then (u32 len, blob) each. */
    if (kvx_rdv_recv(o->ctl_fd, F_ALL_MD, (void **)&all, &len, RDV_TIMEOUT_MS)) { fprintf(stderr, "kvx_bench: decode %d: %s\n", o->rank, kvx_rdv_error()); return 2; }
    memset(&hello, 0, sizeof hello);
    hello.rank = o->rank;
    for (off = 4, k = 0; len >= 4 && k < (int)kvx_rdv__rd32(all); k++) {
        kvx_peer *p;
        if (off + 4 > len || (n = kvx_rdv__rd32(all + off)) > len - off - 4) { fprintf(stderr, "kvx_bench: decode %d: malformed metadata list\n", o->rank); return 2; }
        if ((st = kvx_peer_add(ctx, all + off + 4, n, &p)) != KVX_OK) {
            fprintf(stderr, "kvx_bench: decode %d: peer_add: %s: %s\n", o->rank, kvx_status_name(st), kvx_ctx_error(ctx));
            return 2;
        }
        off += 4 + n;
        kvx_peer_heads(p, cache, 0, &pf[np], &pc[np]);
        if (!pc[np]) { kvx_peer_remove(p); continue; }  /* not a source of any of our heads */
        peers[np] = p;
        snprintf(hello.transport[np], sizeof hello.transport[np], "%.*s", (int)sizeof hello.transport[np] - 1, kvx_peer_transport(p));
        hello.peer_rank[np] = kvx_peer_rank(p);
        hello.head_first[np] = pf[np];
        hello.head_count[np] = pc[np];
        np++;
    }
    free(all);
    hello.npeers = np;
    if (kvx_rdv_send(o->ctl_fd, F_READY, &hello, sizeof hello, RDV_TIMEOUT_MS)) return 2;
    src = (uint32_t *)malloc(o->blocks * sizeof *src);
    dst = (uint32_t *)malloc(o->blocks * sizeof *dst);
    gens = (uint64_t *)calloc(o->blocks ? o->blocks : 1, sizeof *gens);
    for (it = 0; it < o->iters; it++) {
        iter_report r;
        kvx_ticket t[MAX_TP];
        kvx_stats s0, s1;
        double t0;
        memset(&r, 0, sizeof r);
        r.mm_src_rank = -1;
        tables(o, it, src, dst);
        for (k = 0; k < np; k++) kvx_ex_poison(mem.c, o->seed, dst, src, o->blocks, 0, lay.num_layers, pf[k], pf[k] + pc[k]);
        if (mem_sync(&mem, 1)) return 2;
        if (kvx_rdv_recv(o->ctl_fd, F_GO, &go, &len, RDV_TIMEOUT_MS)) return 2;   /* barrier */
        free(go);
        if (len) break;  /* the launcher stops the run: a read failed */
        kvx_stats(ctx, &s0);
        t0 = now_s();
        r.status = KVX_OK;
        for (k = 0; k < np; k++) {
            kvx_read rd;
            memset(&rd, 0, sizeof rd);
            rd.peer = peers[k];
            rd.cache = cache;
            rd.local_blocks = dst;
            rd.remote_blocks = src;
            rd.num_blocks = o->blocks;
            rd.user_tag = it;
            rd.verify = o->verify;
            rd.remote_generations = o->generations ? gens : NULL;  /* the owner retires none: all 0 */
            if ((st = kvx_post(q, &rd, &t[k])) != KVX_OK) { r.status = st; t[k] = 0; }
        }
        for (k = 0; k < np; k++)
            if (t[k] && (st = kvx_wait(q, t[k], 600000)) != KVX_OK) { r.status = st; t[k] = 0; }
        r.seconds = now_s() - t0;
        kvx_stats(ctx, &s1);
        r.bytes = s1.bytes_read - s0.bytes_read;
        r.descs_before = s1.blocks_posted - s0.blocks_posted;
        r.descs_after = s1.descs_posted - s0.descs_posted;
        if (r.status != KVX_OK) snprintf(r.error, sizeof r.error, "%.*s", (int)sizeof r.error - 1, kvx_ctx_error(ctx));
        if (mem_sync(&mem, 0)) return 2;
        if (getenv("KVX_BENCH_FLIP_BYTE") && np && it == o->iters - 1) {
            /* The self-check of the checker: a planted wrong byte must fail the run. */
            kvx_ex_block(mem.c, lay.num_layers - 1, 1, dst[o->blocks - 1])[kvx_ex_offset(mem.c, pf[0] - mem.c->head_first, 0) + 3] ^= 0x40;
        }
        for (k = 0; k < np; k++) {
            kvx_ex_mismatch mm;
            uint64_t bad;
            if (!t[k]) continue;  /* a read that failed is reported as such, not as its blocks' poison */
            bad = kvx_ex_verify(mem.c, o->seed, dst, src, o->blocks, 0, lay.num_layers, pf[k], pf[k] + pc[k], &mm);
            if (bad && !r.bad_bytes) { r.mm = mm; r.mm_src_rank = hello.peer_rank[k]; }
            r.bad_bytes += bad;
        }
        if (kvx_rdv_send(o->ctl_fd, F_ITER, &r, sizeof r, RDV_TIMEOUT_MS)) return 2;
    }
    kvx_queue_destroy(q);
    kvx_ctx_destroy(ctx);
    mem_free(&mem);
    free(src); free(dst); free(gens);
    return 0;
}

/*--- launchers ------------------------------------------------------------*/

typedef struct rankproc { pid_t pid; int fd; } rankproc;

/* Start one rank: this binary again, with the same options and its rank. */
static int spawn_rank(int argc, char **argv, const char *role, int rank, rankproc *rp) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return -1;
    rp->pid = fork();
    if (rp->pid < 0) return -1;
    if (rp->pid == 0) {
        char **av = (char **)calloc((size_t)argc + 10, sizeof *av), rs[16], fs[16];
        int i, n = 0;
        close(sv[0]);
        snprintf(rs, sizeof rs, "%d", rank);
        snprintf(fs, sizeof fs, "%d", sv[1]);
        av[n++] = argv[0];
        for (i = 1; i < argc; i++) {
            /* drop the launcher's own role options; the rank gets its own */
            if (!strcmp(argv[i], "--role") || !strcmp(argv[i], "--listen") || !strcmp(argv[i], "--connect") ||
                !strcmp(argv[i], "--json") || !strcmp(argv[i], "--strategy")) { i++; continue; }
            av[n++] = argv[i];
        }
        av[n++] = (char *)"--role"; av[n++] = (char *)role;
        av[n++] = (char *)"--rank"; av[n++] = rs;
        av[n++] = (char *)"--ctl-fd"; av[n++] = fs;
        av[n] = NULL;
        /* argv[0] rather than /proc/self/exe, so that tools wrapping the
           bench (valgrind --trace-children) wrap its ranks too */
        execv(strchr(argv[0], '/') ? argv[0] : "/proc/self/exe", av);
        _exit(127);
    }
    close(sv[1]);
    rp->fd = sv[0];
    return 0;
}

static int reap_ranks(rankproc *rp, int n, const char *role) {
    int k, bad = 0, st;
    for (k = 0; k < n; k++) {
        if (rp[k].fd >= 0) close(rp[k].fd);
        if (rp[k].pid > 0 && waitpid(rp[k].pid, &st, 0) == rp[k].pid && (!WIFEXITED(st) || WEXITSTATUS(st))) {
            fprintf(stderr, "kvx_bench: %s rank %d exited with status 0x%x\n", role, k, st);
            bad = 1;
        }
    }
    return bad;
}

/* Prefill launcher: start ranks, collect metadata, hand it to the decode
   side, wait for it to finish, stop the ranks. */
static int prefill_role(int argc, char **argv, const opts *o, int lfd) {
    rankproc rp[MAX_TP];
    uint8_t *all = NULL;
    uint32_t alen = 4, n;
    int k, fd, rc = 0;
    void *b;
    for (k = 0; k < o->prefill_tp; k++) rp[k].pid = -1, rp[k].fd = -1;
    for (k = 0; k < o->prefill_tp; k++)
        if (spawn_rank(argc, argv, "prefill-rank", k, &rp[k])) { fprintf(stderr, "kvx_bench: cannot start prefill rank %d\n", k); rc = 2; goto out; }
    all = (uint8_t *)malloc(4);
    kvx_rdv__le32(all, (uint32_t)o->prefill_tp);
    for (k = 0; k < o->prefill_tp; k++) {
        if (kvx_rdv_recv(rp[k].fd, F_RANK_MD, &b, &n, RDV_TIMEOUT_MS)) {
            fprintf(stderr, "kvx_bench: prefill rank %d did not report its metadata: %s\n", k, kvx_rdv_error());
            rc = 2;
            goto out;
        }
        all = (uint8_t *)realloc(all, alen + 4 + n);
        kvx_rdv__le32(all + alen, n);
        memcpy(all + alen + 4, b, n);
        alen += 4 + n;
        free(b);
    }
    if ((fd = kvx_rdv_accept(lfd, RDV_TIMEOUT_MS)) < 0 || kvx_rdv_send(fd, F_ALL_MD, all, alen, RDV_TIMEOUT_MS)) {
        fprintf(stderr, "kvx_bench: prefill: rendezvous with the decode side: %s\n", kvx_rdv_error());
        rc = 2;
        goto out;
    }
    if (kvx_rdv_recv(fd, F_DONE, &b, &n, 24 * 3600 * 1000)) {
        fprintf(stderr, "kvx_bench: prefill: the decode side went away: %s\n", kvx_rdv_error());
        rc = 2;
    } else free(b);
    close(fd);
out:
    for (k = 0; k < o->prefill_tp; k++) if (rp[k].fd >= 0) kvx_rdv_send(rp[k].fd, F_EXIT, NULL, 0, 5000);
    if (reap_ranks(rp, o->prefill_tp, "prefill") && !rc) rc = 2;
    free(all);
    return rc;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int decode_role(int argc, char **argv, const opts *o, const char *connect_to) {
    rankproc rp[MAX_TP];
    rank_hello hello[MAX_TP];
    iter_report *rep = NULL;
    double *lat = NULL, total_s = 0;
    uint64_t total_bytes = 0, total_before = 0, total_after = 0, checked_bytes = 0, bad = 0;
    int k, fd = -1, rc = 0, failed_status = 0;
    uint32_t it, n, alen, nit, nlat = 0;
    uint8_t *all = NULL;
    void *b;
    FILE *js = NULL;
    kvx_layout pl = layout_of(o, o->prefill_tp), dl = layout_of(o, o->decode_tp);
    for (k = 0; k < o->decode_tp; k++) rp[k].pid = -1, rp[k].fd = -1;
    printf("kvx_bench: strategy %s, backend %s, prefill TP %d -> decode TP %d\n", o->strategy, o->backend, o->prefill_tp, o->decode_tp);
    printf("  layout %s, %u layers x K/V, %u blocks per cache, %u tokens x %u heads (of %u) x %u dim x %u bytes = %llu bytes per block (decode rank)\n",
           o->nhd ? "NHD" : "HND", o->num_layers, o->num_blocks, o->block_tokens, dl.num_heads, o->heads, o->head_dim, o->dtype_bytes,
           (unsigned long long)o->block_tokens * dl.num_heads * o->head_dim * o->dtype_bytes);
    printf("  %u %s blocks per request, %u iterations, seed %llu, prefill rank holds %u heads\n", o->blocks,
           o->random_blocks ? "random" : "consecutive", o->iters, (unsigned long long)o->seed, pl.num_heads);
    fflush(stdout);
    if ((fd = kvx_rdv_connect(connect_to, RDV_TIMEOUT_MS)) < 0 || kvx_rdv_recv(fd, F_ALL_MD, (void **)&all, &alen, RDV_TIMEOUT_MS)) {
        fprintf(stderr, "kvx_bench: decode: rendezvous with the prefill side at %s: %s\n", connect_to, kvx_rdv_error());
        rc = 2;
        goto out;
    }
    if (alen < 4 || kvx_rdv__rd32(all) != (uint32_t)o->prefill_tp) {
        fprintf(stderr, "kvx_bench: decode: the prefill side runs %u ranks, this side was told --prefill-tp %d\n",
                alen >= 4 ? kvx_rdv__rd32(all) : 0, o->prefill_tp);
        rc = 2;
        goto out;
    }
    for (k = 0; k < o->decode_tp; k++) {
        if (spawn_rank(argc, argv, "decode-rank", k, &rp[k]) || kvx_rdv_send(rp[k].fd, F_ALL_MD, all, alen, RDV_TIMEOUT_MS)) {
            fprintf(stderr, "kvx_bench: cannot start decode rank %d\n", k);
            rc = 2;
            goto out;
        }
    }
    for (k = 0; k < o->decode_tp; k++) {
        if (kvx_rdv_recv(rp[k].fd, F_READY, &b, &n, RDV_TIMEOUT_MS) || n != sizeof hello[k]) {
            fprintf(stderr, "kvx_bench: decode rank %d did not get ready: %s\n", k, kvx_rdv_error());
            rc = 2;
            goto out;
        }
        memcpy(&hello[k], b, sizeof hello[k]);
        free(b);
    }
    for (k = 0; k < o->decode_tp; k++) {
        int j;
        for (j = 0; j < hello[k].npeers; j++)
            printf("  decode rank %d <- prefill rank %d: heads [%u, %u), transport %s\n", k, hello[k].peer_rank[j], hello[k].head_first[j],
                   hello[k].head_first[j] + hello[k].head_count[j], hello[k].transport[j]);
    }
    rep = (iter_report *)calloc((size_t)o->iters * (size_t)o->decode_tp, sizeof *rep);
    lat = (double *)calloc(o->iters, sizeof *lat);
    for (it = 0; it < o->iters; it++) {
        uint64_t bytes = 0, before = 0, after = 0;
        double worst = 0;
        for (k = 0; k < o->decode_tp; k++) kvx_rdv_send(rp[k].fd, F_GO, NULL, 0, RDV_TIMEOUT_MS);
        for (k = 0; k < o->decode_tp; k++) {
            iter_report *r = &rep[it * (uint32_t)o->decode_tp + (uint32_t)k];
            if (kvx_rdv_recv(rp[k].fd, F_ITER, &b, &n, 600000) || n != sizeof *r) {
                fprintf(stderr, "kvx_bench: decode rank %d, iteration %u: %s\n", k, it, kvx_rdv_error());
                rc = 2;
                goto out;
            }
            memcpy(r, b, sizeof *r);
            free(b);
            bytes += r->bytes; before += r->descs_before; after += r->descs_after;
            if (r->seconds > worst) worst = r->seconds;
            if (r->status != KVX_OK && !failed_status) {
                failed_status = 1;
                fprintf(stderr, "kvx_bench: decode rank %d, iteration %u: %s: %s\n", k, it, kvx_status_name((kvx_status)r->status), r->error);
            }
            if (r->bad_bytes && !bad) {
                printf("TEST FAILED: decode rank %d, iteration %u: %llu wrong bytes; first: prefill rank %d, layer %u, %s, block %u (local %u), head %u, token %u, offset %llu: expected 0x%02x, found 0x%02x\n",
                       k, it, (unsigned long long)r->bad_bytes, r->mm_src_rank, r->mm.layer, r->mm.plane ? "V" : "K", r->mm.remote_block,
                       r->mm.local_block, r->mm.head, r->mm.token, (unsigned long long)r->mm.offset, r->mm.expected, r->mm.found);
            }
            bad += r->bad_bytes;
        }
        checked_bytes += bytes;
        if (it >= o->warmup) {  /* a warm-up iteration is checked, not counted */
            lat[nlat++] = worst;
            total_bytes += bytes; total_before += before; total_after += after; total_s += worst;
        }
        printf("  iter %u: %llu bytes, %llu descriptors -> %llu after merging, %.3f ms, %.3f GB/s%s\n", it, (unsigned long long)bytes,
               (unsigned long long)before, (unsigned long long)after, worst * 1e3, worst > 0 ? (double)bytes / worst / 1e9 : 0.0,
               it < o->warmup ? " (warm-up, not counted)" : "");
        fflush(stdout);
        if (failed_status && it + 1 < o->iters) {
            /* A failed read fails the run: the rest would fail alike (a dead
               peer fails every later post), so stop the ranks now. */
            printf("  stopped after iteration %u of %u: a read failed\n", it, o->iters);
            for (k = 0; k < o->decode_tp; k++) kvx_rdv_send(rp[k].fd, F_GO, "S", 1, RDV_TIMEOUT_MS);
            it++;
            break;
        }
    }
    nit = it;
    if (nlat) qsort(lat, nlat, sizeof *lat, cmp_double);
    {
        double p50 = nlat ? lat[(nlat - 1) / 2] : 0, p99 = nlat ? lat[(size_t)((nlat - 1) * 0.99 + 0.5)] : 0;
        double gbps = total_s > 0 ? (double)total_bytes / total_s / 1e9 : 0;
        printf("  total: %llu bytes, %llu descriptors -> %llu after merging, %.3f GB/s, request latency p50 %.3f ms, p99 %.3f ms\n",
               (unsigned long long)total_bytes, (unsigned long long)total_before, (unsigned long long)total_after, gbps, p50 * 1e3, p99 * 1e3);
        if (failed_status && !bad) printf("TEST FAILED: a read failed (see above)\n");
        else if (!bad) printf("TEST PASSED: every byte of %llu checked\n", (unsigned long long)checked_bytes);
        if (o->json && (js = fopen(o->json, "w")) != NULL) {
            int j;
            fprintf(js, "{\"strategy\":\"%s\",\"backend\":\"%s\",\"prefill_tp\":%d,\"decode_tp\":%d,\"layout\":\"%s\",\"num_layers\":%u,"
                        "\"num_blocks\":%u,\"block_tokens\":%u,\"heads\":%u,\"head_dim\":%u,\"dtype_bytes\":%u,\"blocks\":%u,\"random_blocks\":%s,"
                        "\"iters\":%u,\"warmup\":%u,\"seed\":%llu,\"block_bytes\":%llu,\"transports\":[",
                    o->strategy, o->backend, o->prefill_tp, o->decode_tp, o->nhd ? "NHD" : "HND", o->num_layers, o->num_blocks, o->block_tokens,
                    o->heads, o->head_dim, o->dtype_bytes, o->blocks, o->random_blocks ? "true" : "false", o->iters, o->warmup, (unsigned long long)o->seed,
                    (unsigned long long)o->block_tokens * dl.num_heads * o->head_dim * o->dtype_bytes);
            for (k = 0; k < o->decode_tp; k++)
                for (j = 0; j < hello[k].npeers; j++)
                    fprintf(js, "%s{\"decode_rank\":%d,\"prefill_rank\":%d,\"transport\":\"%s\"}", k || j ? "," : "", k, hello[k].peer_rank[j], hello[k].transport[j]);
            fprintf(js, "],\"iterations\":[");
            for (it = 0; it < nit; it++) {
                uint64_t by = 0, bf = 0, af = 0;
                double w = 0;
                for (k = 0; k < o->decode_tp; k++) {
                    iter_report *r = &rep[it * (uint32_t)o->decode_tp + (uint32_t)k];
                    by += r->bytes; bf += r->descs_before; af += r->descs_after;
                    if (r->seconds > w) w = r->seconds;
                }
                fprintf(js, "%s{\"bytes\":%llu,\"descs_before\":%llu,\"descs_after\":%llu,\"seconds\":%.9f,\"gbps\":%.6f,\"warmup\":%s}", it ? "," : "",
                        (unsigned long long)by, (unsigned long long)bf, (unsigned long long)af, w, w > 0 ? (double)by / w / 1e9 : 0.0,
                        it < o->warmup ? "true" : "false");
            }
            fprintf(js, "],\"total_bytes\":%llu,\"descs_before\":%llu,\"descs_after\":%llu,\"gbps\":%.6f,\"latency_p50_ms\":%.6f,"
                        "\"latency_p99_ms\":%.6f,\"wrong_bytes\":%llu,\"passed\":%s}\n",
                    (unsigned long long)total_bytes, (unsigned long long)total_before, (unsigned long long)total_after, gbps, p50 * 1e3, p99 * 1e3,
                    (unsigned long long)bad, !bad && !failed_status ? "true" : "false");
            fclose(js);
        }
    }
    if (bad || failed_status) rc = 1;
out:
    if (fd >= 0) { kvx_rdv_send(fd, F_DONE, NULL, 0, 5000); close(fd); }
    if (reap_ranks(rp, o->decode_tp, "decode") && !rc) rc = 2;
    free(all); free(rep); free(lat);
    fflush(stdout);
    return rc;
}

int main(int argc, char **argv) {
    opts o;
    int lfd, port = 0, rc, st;
    pid_t pid;
    char hp[64];
    if (parse(argc, argv, &o)) return 2;
    if ((int)backend_of(o.backend) < 0) { fprintf(stderr, "kvx_bench: --backends is UCX, LIBFABRIC or CUDA, not '%s'\n", o.backend); return 2; }
    signal(SIGPIPE, SIG_IGN);
    if (o.role && !strcmp(o.role, "prefill-rank")) return prefill_rank(&o);
    if (o.role && !strcmp(o.role, "decode-rank")) return decode_rank(&o);
    if (o.role && !strcmp(o.role, "prefill")) {
        if (!o.listen) { fprintf(stderr, "kvx_bench: --role prefill needs --listen ADDR:PORT\n"); return 2; }
        if ((lfd = kvx_rdv_listen(o.listen, &port)) < 0) { fprintf(stderr, "kvx_bench: %s\n", kvx_rdv_error()); return 2; }
        printf("kvx_bench: prefill role, %d ranks, listening on %s\n", o.prefill_tp, o.listen);
        fflush(stdout);
        return prefill_role(argc, argv, &o, lfd);
    }
    if (o.role && !strcmp(o.role, "decode")) {
        if (!o.connect) { fprintf(stderr, "kvx_bench: --role decode needs --connect ADDR:PORT\n"); return 2; }
        return decode_role(argc, argv, &o, o.connect);
    }
    if (o.role) { fprintf(stderr, "kvx_bench: --role is prefill or decode\n"); return 2; }
    if (strcmp(o.strategy, "pack")) {
        fprintf(stderr, "kvx_bench: --strategy spread runs one role per host: --role prefill --listen ADDR:PORT on one, "
                        "--role decode --connect ADDR:PORT on the other (tests/lib/two_hosts.sh does both)\n");
        return 2;
    }
    /* pack: both roles on this host, over loopback */
    if ((lfd = kvx_rdv_listen("127.0.0.1:0", &port)) < 0) { fprintf(stderr, "kvx_bench: %s\n", kvx_rdv_error()); return 2; }
    fflush(stdout);
    if ((pid = fork()) == 0) _exit(prefill_role(argc, argv, &o, lfd));
    close(lfd);
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    rc = decode_role(argc, argv, &o, hp);
    if (waitpid(pid, &st, 0) == pid && (!WIFEXITED(st) || WEXITSTATUS(st)) && !rc) rc = 2;
    return rc;
}
