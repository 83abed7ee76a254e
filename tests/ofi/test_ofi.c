/*
    test_ofi -- what only the libfabric backend has: a provider refused at
    kvx_ctx_create naming the capability it lacks, the transport names of
    tcp;ofi_rxm and shm, reads longer than max_msg_size split into several
    fi_read that report one completion, notifications exactly once with more
    in flight than send slots, mr_mode paths (local descriptors; raw keys
    where the provider implements them), GPU memory refused at registration,
    a peer removed with reads in flight. Two contexts in one process, real
    bytes.

    Runs the provider $FI_PROVIDER names (tcp or shm), else both.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
/* The test seam for the provider's mr_mode (kvx.h, TEST SEAMS). */
#include <stdint.h>
static uint64_t test_mr_mode;
#define KVX_TEST_HOOK_OFI_MR_MODE test_mr_mode
#define KVX_IMPLEMENTATION
#ifndef KVX_OFI
#define KVX_OFI
#endif
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"

#define NB 64u

static kvx_layout lay_of(uint32_t tokens, uint32_t heads, uint32_t head_dim) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = 2;
    l.num_blocks = NB;
    l.block_tokens = tokens;
    l.num_heads = heads;
    l.head_dim = head_dim;
    l.elem_bytes = 2;
    return l;
}

/* The contexts' warnings: the last one kept (for the cases that expect
   one), none printed. */
static pthread_mutex_t warn_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_warn[1024];
static void keep_warn(kvx_log_level level, const char *msg, void *user) {
    (void)user;
    if (level != KVX_LOG_WARN) return;
    pthread_mutex_lock(&warn_lock);
    snprintf(last_warn, sizeof last_warn, "%s", msg);
    pthread_mutex_unlock(&warn_lock);
}
/* The last warning, copied under the lock (a progress thread may log); the
   test's thread alone reads the copy. */
static const char *warn_seen(void) {
    static char copy[sizeof last_warn];
    pthread_mutex_lock(&warn_lock);
    memcpy(copy, last_warn, sizeof copy);
    pthread_mutex_unlock(&warn_lock);
    return copy;
}
static void warn_forget(void) {
    pthread_mutex_lock(&warn_lock);
    last_warn[0] = 0;
    pthread_mutex_unlock(&warn_lock);
}

static kvx_status mk_ctx(const char *prov, const char *name, int thread, uint64_t extra, kvx_ctx **out) {
    kvx_ctx_desc d;
    memset(&d, 0, sizeof d);
    d.name = name;
    d.ofi.provider = prov;
    d.progress_thread = thread;
    d.ofi.extra_caps = extra;
    d.log_level = KVX_LOG_WARN;
    d.log_fn = keep_warn;
    d.backend = KVX_BACKEND_OFI;
    return kvx_ctx_create(&d, out);
}

/* An owner (progress thread) and a reader with caches of lay, the owner's filled. */
typedef struct pair {
    kvx_ctx *A, *B;
    kvx_ex_cache am, bm;
    kvx_cache *ac, *bc;
    kvx_peer *peer;
    kvx_queue *q;
} pair;

static int pair_open(pair *x, const char *prov, kvx_layout lay, uint64_t seed) {
    kvx_cache_desc cd;
    uint32_t ids[NB], i;
    void *md;
    size_t len = 0;
    memset(x, 0, sizeof *x);
    if (mk_ctx(prov, "owner", 1, 0, &x->A) || mk_ctx(prov, "reader", 0, 0, &x->B)) { printf("  context: %s\n", kvx_ctx_error(NULL)); return -1; }
    if (kvx_ex_cache_alloc(&x->am, &lay, 0, 1) || kvx_ex_cache_alloc(&x->bm, &lay, 0, 1)) return -1;
    for (i = 0; i < NB; i++) ids[i] = i;
    kvx_ex_fill(&x->am, seed, ids, NB);
    cd = kvx_ex_cache_desc(&x->am);
    if (kvx_cache_register(x->A, &cd, &x->ac)) { printf("  register: %s\n", kvx_ctx_error(x->A)); return -1; }
    cd = kvx_ex_cache_desc(&x->bm);
    if (kvx_cache_register(x->B, &cd, &x->bc)) { printf("  register: %s\n", kvx_ctx_error(x->B)); return -1; }
    kvx_metadata(x->A, NULL, &len);
    md = malloc(len);
    kvx_metadata(x->A, md, &len);
    if (kvx_peer_add(x->B, md, len, &x->peer) || kvx_queue_create(x->B, NULL, &x->q)) { printf("  peer: %s\n", kvx_ctx_error(x->B)); free(md); return -1; }
    free(md);
    return 0;
}

static void pair_close(pair *x) {
    if (x->q) kvx_queue_destroy(x->q);
    if (x->B) kvx_ctx_destroy(x->B);
    if (x->A) kvx_ctx_destroy(x->A);
    kvx_ex_cache_free(&x->am);
    kvx_ex_cache_free(&x->bm);
}

/* Read src -> dst (all layers) and check every byte. */
static void read_check(pair *x, uint64_t seed, const uint32_t *dst, const uint32_t *src, uint32_t n) {
    kvx_read rd;
    kvx_ticket t;
    kvx_ex_mismatch mm;
    uint64_t bad;
    kvx_ex_poison(&x->bm, seed, dst, src, n, 0, x->bm.lay.num_layers, 0, x->bm.lay.num_heads);
    memset(&rd, 0, sizeof rd);
    rd.peer = x->peer; rd.cache = x->bc; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = n;
    T_ST(kvx_post(x->q, &rd, &t), KVX_OK);
    T_ST(kvx_wait(x->q, t, 20000), KVX_OK);
    bad = kvx_ex_verify(&x->bm, seed, dst, src, n, 0, x->bm.lay.num_layers, 0, x->bm.lay.num_heads, &mm);
    if (bad) T_FAILF("%llu wrong bytes; first: layer %u plane %u block %u offset %llu: 0x%02x, expected 0x%02x", (unsigned long long)bad,
                     mm.layer, mm.plane, mm.local_block, (unsigned long long)mm.offset, mm.found, mm.expected);
}

static void run_provider(const char *prov) {
    char name[128];
    printf("== provider %s\n", prov);

    snprintf(name, sizeof name, "%s: a provider without a capability is refused at kvx_ctx_create, naming it", prov);
    T_CASE(name) {
        kvx_ctx *c = NULL;
        T_ST(mk_ctx(prov, "x", 0, FI_MULTICAST, &c), KVX_ERR_UNSUPPORTED);
        T_CHECK(c == NULL);
        T_HAS(kvx_ctx_error(NULL), "FI_MULTICAST");
        T_HAS(kvx_ctx_error(NULL), "ofi.extra_caps");
        printf("  %s\n", kvx_ctx_error(NULL));
        T_ST(mk_ctx(prov, "x", 0, FI_TAGGED | FI_MULTICAST, &c), KVX_ERR_UNSUPPORTED);
        T_HAS(kvx_ctx_error(NULL), "FI_MULTICAST");
        T_ST(mk_ctx("no-such-provider", "x", 0, 0, &c), KVX_ERR_UNSUPPORTED);
        T_HAS(kvx_ctx_error(NULL), "no-such-provider");
        printf("  %s\n", kvx_ctx_error(NULL));
    }

    snprintf(name, sizeof name, "%s: transport name, mr_mode, address", prov);
    T_CASE(name) {
        pair x;
        warn_forget();
        if (pair_open(&x, prov, lay_of(16, 4, 64), 1) == 0) {
            const char *tr = kvx_peer_transport(x.peer);
            kvx__ofi *o = kvx__ofi_of(x.B);
            char mr[200];
            uint64_t m = o->mr_mode;
            fi_tostr_r(mr, sizeof mr, &m, FI_TYPE_MR_MODE);
            printf("  transport %s, mr_mode [%s], max_msg_size %llu, %s\n", tr, mr, (unsigned long long)o->max_msg,
                   o->wait_fd ? "FI_WAIT_FD" : "ticks");
            if (!strcmp(prov, "tcp")) {
                T_CHECK(!strcmp(tr, "ofi:tcp;ofi_rxm (sw)"));
                T_CHECK(!(o->mr_mode & FI_MR_VIRT_ADDR));   /* the offset path */
                T_CHECK(o->wait_fd);
            } else {
                T_CHECK(!strcmp(tr, "ofi:shm") || !strcmp(tr, "ofi:shm (sw)"));
                T_CHECK(o->mr_mode & FI_MR_VIRT_ADDR);       /* the virtual address path */
                /* one process reads itself: CMA runs, and nothing is said of it */
                if (!strcmp(tr, "ofi:shm")) T_CHECK(!strstr(warn_seen(), "without CMA") && !strstr(x.peer->why, "CMA"));
            }
        } else T_FAILF("setup: %s", kvx_ctx_error(NULL));
        pair_close(&x);
    }

    if (!strcmp(prov, "shm")) {
        T_CASE("shm: an FI_HMEM endpoint moves data through the owner's bounce buffers: (sw), why, and a warning") {
            pair x;
            uint32_t s[4] = {3, 4, 5, 9}, d[4] = {10, 11, 12, 40};
            setenv("KVX_OFI_HMEM", "1", 1);
            warn_forget();
            if (pair_open(&x, prov, lay_of(16, 4, 64), 2) == 0) {
                T_CHECK(kvx__ofi_of(x.B)->hmem);
                T_CHECK(!strcmp(kvx_peer_transport(x.peer), "ofi:shm (sw)"));
                T_HAS(x.peer->why, "CMA path cannot run: FI_HMEM registrations");
                T_HAS(warn_seen(), "shm reads owner/0 without CMA, since FI_HMEM");
                T_HAS(warn_seen(), "100x slower");
                printf("  %s\n", warn_seen());
                read_check(&x, 2, d, s, 4);
            } else T_FAILF("setup");
            pair_close(&x);
            unsetenv("KVX_OFI_HMEM");
        }
    }

    snprintf(name, sizeof name, "%s: reads longer than max_msg_size are split, one completion each", prov);
    T_CASE(name) {
        pair x;
        /* 16 tokens x 4 heads x 128 dim x 2 bytes: 16 KiB blocks */
        if (pair_open(&x, prov, lay_of(16, 4, 128), 3) == 0) {
            kvx__ofi *o = kvx__ofi_of(x.B);
            uint32_t s1[6] = {1, 2, 3, 17, 30, 31}, d1[6] = {5, 6, 7, 8, 50, 51}, all[NB], i;
            kvx_stats a, b;
            for (i = 0; i < NB; i++) all[i] = i;
            o->max_msg = 4096;                    /* 4 parts per block */
            kvx_stats(x.B, &a);
            read_check(&x, 3, d1, s1, 6);
            kvx_stats(x.B, &b);
            T_EQ(b.descs_posted - a.descs_posted, 3 * 2 * 2);  /* runs {1,2,3}->{5,6,7}, 17->8, {30,31}->{50,51}; 2 layers, K/V */
            T_EQ(b.descs_completed - a.descs_completed, b.descs_posted - a.descs_posted);
            o->max_msg = 1000;                    /* not a divisor: a short last part */
            read_check(&x, 3, d1, s1, 6);
            /* One op of 64 blocks (1 MiB) in 256-byte parts: 4096 parts, more
               than the endpoint's contexts, so parts wait for completions. */
            o->max_msg = 256;
            read_check(&x, 3, all, all, NB);
            kvx_stats(x.B, &b);
            printf("  %llu ops posted, %llu completed, %u part contexts per endpoint\n", (unsigned long long)b.descs_posted,
                   (unsigned long long)b.descs_completed, ((kvx__ofi_pep *)x.peer->be)->nctx);
            T_EQ(b.descs_completed, b.descs_posted);
            T_EQ(b.reads_failed, 0);
        } else T_FAILF("setup");
        pair_close(&x);
    }

    /* Random blocks are one op each (ids apart do not merge). Over tcp a
       read's ops go up to iov_max (and 64 KiB) to an fi_readmsg; over shm,
       or with KVX_OFI_GATHER=0, one fi_read each. */
    snprintf(name, sizeof name, "%s: a read's small blocks go several to an fi_readmsg%s, every byte checked", prov,
             strcmp(prov, "shm") ? "" : " (not on shm: one fi_read each)");
    T_CASE(name) {
        int off;
        for (off = 0; off < 2; off++) {
            pair x;
            if (off) setenv("KVX_OFI_GATHER", "0", 1);
            /* 16 tokens x 4 heads x 64 dim x 2 bytes: 8 KiB blocks, 8 of which fill 64 KiB (iov_max allowing) */
            if (pair_open(&x, prov, lay_of(16, 4, 64), 8) == 0) {
                kvx__ofi *o = kvx__ofi_of(x.B);
                kvx__ofi_pep *pe = (kvx__ofi_pep *)x.peer->be;
                uint32_t src[24], dst[24], i, per = o->iov_max < 8 ? o->iov_max : 8;
                int grouped = !off && strcmp(prov, "shm") != 0;
                uint64_t f0 = o->fabric_reads, ops, reads;
                kvx_stats a, b;
                for (i = 0; i < 24; i++) { src[i] = 2 * i + 1; dst[i] = 62 - 2 * i; }
                kvx_stats(x.B, &a);
                read_check(&x, 8, dst, src, 24);
                kvx_stats(x.B, &b);
                ops = b.descs_posted - a.descs_posted;
                reads = o->fabric_reads - f0;
                printf("  %s: %llu ops in %llu fabric reads (iov_max %u)\n", off ? "KVX_OFI_GATHER=0" : "default", (unsigned long long)ops,
                       (unsigned long long)reads, o->iov_max);
                T_EQ(ops, 24 * 2 * 2);     /* 24 blocks apart, 2 layers, K and V */
                T_EQ(x.peer->caches[0].gather, grouped);
                if (grouped) {
                    T_CHECK(per >= 2);
                    T_CHECK(reads >= (ops + per - 1) / per && reads <= ops / 2);
                } else {
                    T_EQ(reads, ops);
                }
                T_EQ(b.descs_completed - a.descs_completed, ops);
                /* A group stays within max_msg: at 16 KiB, two 8 KiB blocks a read at most. */
                if (grouped) {
                    uint64_t keep = o->max_msg;
                    o->max_msg = 16384;
                    f0 = o->fabric_reads;
                    read_check(&x, 8, dst, src, 24);
                    reads = o->fabric_reads - f0;
                    printf("  max_msg 16 KiB: %llu ops in %llu fabric reads\n", (unsigned long long)ops, (unsigned long long)reads);
                    T_CHECK(reads >= ops / 2 && reads < ops);
                    o->max_msg = keep;
                }
                /* The post itself issues its last group (the reader has no
                   progress thread): 3 blocks, 12 ops, 3 fabric reads. */
                if (grouped && per == 4) {
                    kvx_read rd;
                    kvx_ticket t;
                    kvx_ex_poison(&x.bm, 8, dst, src, 3, 0, 2, 0, x.bm.lay.num_heads);
                    memset(&rd, 0, sizeof rd);
                    rd.peer = x.peer; rd.cache = x.bc; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = 3;
                    f0 = o->fabric_reads;
                    T_ST(kvx_post(x.q, &rd, &t), KVX_OK);
                    T_EQ(o->fabric_reads - f0, 3);
                    T_CHECK(pe->group == NULL);
                    T_ST(kvx_wait(x.q, t, 20000), KVX_OK);
                    T_EQ(kvx_ex_verify(&x.bm, 8, dst, src, 3, 0, 2, 0, x.bm.lay.num_heads, NULL), 0);
                }
                /* No part context free at the end of the post: the group
                   waits, staged, and goes from progress once one is back. */
                if (grouped) {
                    kvx__ofi_part *held = pe->part_free;
                    kvx_read rd;
                    kvx_ticket t;
                    kvx_ex_mismatch mm;
                    uint64_t bad;
                    kvx_ex_poison(&x.bm, 8, dst, src, 8, 0, 2, 0, x.bm.lay.num_heads);
                    memset(&rd, 0, sizeof rd);
                    rd.peer = x.peer; rd.cache = x.bc; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = 8;
                    pe->part_free = NULL;
                    f0 = o->fabric_reads;
                    T_ST(kvx_post(x.q, &rd, &t), KVX_OK);
                    kvx_progress(x.B);
                    T_ST(kvx_wait(x.q, t, 50), KVX_PENDING);
                    T_CHECK(pe->group != NULL);
                    T_EQ(o->fabric_reads, f0);
                    pe->part_free = held;
                    T_ST(kvx_wait(x.q, t, 20000), KVX_OK);
                    T_CHECK(pe->group == NULL);
                    T_CHECK(o->fabric_reads > f0);
                    bad = kvx_ex_verify(&x.bm, 8, dst, src, 8, 0, 2, 0, x.bm.lay.num_heads, &mm);
                    T_EQ(bad, 0);
                }
            } else T_FAILF("setup");
            pair_close(&x);
        }
        unsetenv("KVX_OFI_GATHER");
    }

    snprintf(name, sizeof name, "%s: notifications exactly once, more than the send slots at once", prov);
    T_CASE(name) {
        pair x;
        if (pair_open(&x, prov, lay_of(16, 4, 64), 4) == 0) {
            enum { N = 100 };
            uint32_t src[N], dst[N];
            kvx_ticket t[N];
            kvx_notification nt[64];
            int seen[N], got = 0, k, done = 0;
            double t0 = kvx_t_now();
            memset(seen, 0, sizeof seen);
            for (k = 0; k < N; k++) {
                kvx_read rd;
                src[k] = (uint32_t)k % NB; dst[k] = (uint32_t)(k * 7) % NB;
                memset(&rd, 0, sizeof rd);
                rd.peer = x.peer; rd.cache = x.bc; rd.local_blocks = &dst[k]; rd.remote_blocks = &src[k]; rd.num_blocks = 1;
                rd.notify = 1; rd.notify_id = 7000 + (uint64_t)k;
                T_ST(kvx_post(x.q, &rd, &t[k]), KVX_OK);
            }
            for (k = 0; k < N; k++) if (kvx_wait(x.q, t[k], 20000) == KVX_OK) done++;
            T_EQ(done, N);
            while (got < N && kvx_t_now() - t0 < 20) {
                int n = kvx_notifications(x.A, nt, 64), i;
                for (i = 0; i < n; i++) {
                    int idx = (int)(nt[i].id - 7000);
                    T_ST(nt[i].status, KVX_OK);
                    if (idx >= 0 && idx < N) seen[idx]++;
                    else T_FAILF("unexpected notify id %llu", (unsigned long long)nt[i].id);
                    got++;
                }
                if (!n) { kvx_progress(x.B); usleep(1000); }
            }
            T_EQ(got, N);
            for (k = 0; k < N; k++) if (seen[k] != 1) { T_FAILF("notify id %d seen %d times", 7000 + k, seen[k]); break; }
            usleep(100000);
            kvx_progress(x.B);
            T_EQ(kvx_notifications(x.A, nt, 64), 0);
            printf("  %d notifications in %.3f s\n", got, kvx_t_now() - t0);
        } else T_FAILF("setup");
        pair_close(&x);
    }

    snprintf(name, sizeof name, "%s: mr_mode FI_MR_LOCAL path (local descriptors with every read and send)", prov);
    T_CASE(name) {
        pair x;
        uint32_t s[3] = {8, 9, 60}, d[3] = {1, 2, 3};
        test_mr_mode = FI_MR_LOCAL;
        if (pair_open(&x, prov, lay_of(16, 4, 64), 5) == 0) {
            T_CHECK(kvx__ofi_of(x.B)->mr_mode & FI_MR_LOCAL);
            read_check(&x, 5, d, s, 3);
        } else T_FAILF("setup");
        pair_close(&x);
        test_mr_mode = 0;
    }

    snprintf(name, sizeof name, "%s: mr_mode FI_MR_RAW path (fi_mr_raw_attr, fi_mr_map_raw)", prov);
    T_CASE(name) {
        pair x;
        uint32_t s[3] = {8, 9, 60}, d[3] = {1, 2, 3};
        test_mr_mode = FI_MR_RAW;
        if (pair_open(&x, prov, lay_of(16, 4, 64), 6) == 0) {
            read_check(&x, 6, d, s, 3);
        } else {
            /* a provider may not implement raw keys it never asks for */
            const char *why = x.A && strstr(kvx_ctx_error(x.A), "raw") ? kvx_ctx_error(x.A) : x.B ? kvx_ctx_error(x.B) : "";
            printf("  raw keys not offered by %s here: %s\n", prov, why);
            T_HAS(why, "raw");
        }
        pair_close(&x);
        test_mr_mode = 0;
    }

    snprintf(name, sizeof name, "%s: GPU memory refused at registration, naming libfabric's version and the provider", prov);
    T_CASE(name) {
        kvx_ctx *c = NULL;
        kvx_ex_cache m;
        kvx_cache_desc cd;
        kvx_cache *cc = NULL;
        kvx_layout l = lay_of(16, 4, 64);
        char want[128];
        uint32_t v = fi_version();
        int pass;
        for (pass = 0; pass < (strcmp(prov, "shm") ? 1 : 2); pass++) {
            if (pass) setenv("KVX_OFI_HMEM", "1", 1);   /* shm with FI_HMEM: the trial registration refuses */
            T_ST(mk_ctx(prov, "gpu", 0, 0, &c), KVX_OK);
            if (!c) break;
            kvx_ex_cache_alloc(&m, &l, 0, 1);
            cd = kvx_ex_cache_desc(&m);
            cd.mem = KVX_MEM_CUDA;     /* host memory said to be CUDA: no CUDA here, so it must be refused */
            T_ST(kvx_cache_register(c, &cd, &cc), KVX_ERR_UNSUPPORTED);
            snprintf(want, sizeof want, "libfabric %u.%u provider %s", FI_MAJOR(v), FI_MINOR(v), kvx__ofi_of(c)->prov);
            T_HAS(kvx_ctx_error(c), want);
            T_HAS(kvx_ctx_error(c), pass ? "FI_HMEM_CUDA" : "FI_HMEM");
            printf("  %s\n", kvx_ctx_error(c));
            kvx_ctx_destroy(c);
            kvx_ex_cache_free(&m);
            c = NULL;
        }
        unsetenv("KVX_OFI_HMEM");
    }

    snprintf(name, sizeof name, "%s: settings from the desc win over the environment; kvx_ctx_query_desc reports what is in effect", prov);
    T_CASE(name) {
        kvx_ctx_desc d, q;
        kvx_ctx *c = NULL;
        memset(&d, 0, sizeof d);
        d.name = "settings"; d.backend = KVX_BACKEND_OFI; d.log_level = KVX_LOG_OFF;
        d.ofi.provider = prov; d.ofi.max_msg = 1000; d.ofi.tick_us = 250; d.ofi.hmem = -1;
        setenv("KVX_OFI_MAX_MSG", "2000", 1);
        T_ST(kvx_ctx_create(&d, &c), KVX_OK);
        if (c) {
            q = kvx_ctx_query_desc(c);
            T_EQ(q.backend, KVX_BACKEND_OFI);
            T_HAS(q.ofi.provider, prov);
            T_EQ(q.ofi.max_msg, 1000);
            T_EQ(q.ofi.tick_us, 250);
            T_EQ(q.ofi.hmem, -1);
            T_HAS(q.name, "settings");
            kvx_ctx_destroy(c);
            c = NULL;
        }
        d.ofi.max_msg = 0;                      /* left zero: the environment's */
        T_ST(kvx_ctx_create(&d, &c), KVX_OK);
        if (c) { T_EQ(kvx_ctx_query_desc(c).ofi.max_msg, 2000); kvx_ctx_destroy(c); }
        unsetenv("KVX_OFI_MAX_MSG");
    }

    snprintf(name, sizeof name, "%s: a peer removed with reads in flight: canceled, nothing lands after", prov);
    T_CASE(name) {
        pair x;
        if (pair_open(&x, prov, lay_of(16, 8, 128), 7) == 0) {   /* 32 KiB blocks, 4 MiB a read */
            uint32_t all[NB], i;
            kvx_ticket t[8];
            kvx_read rd;
            int k, canceled = 0;
            double t0;
            for (i = 0; i < NB; i++) all[i] = i;
            kvx__ofi_of(x.B)->max_msg = 4096;   /* many parts in flight */
            memset(&rd, 0, sizeof rd);
            rd.peer = x.peer; rd.cache = x.bc; rd.local_blocks = all; rd.remote_blocks = all; rd.num_blocks = NB;
            for (k = 0; k < 8; k++) T_ST(kvx_post(x.q, &rd, &t[k]), KVX_OK);
            kvx_peer_remove(x.peer);
            x.peer = NULL;
            for (k = 0; k < 8; k++) {
                kvx_status st = kvx_wait(x.q, t[k], 5000);
                T_CHECK(st == KVX_OK || st == KVX_ERR_CANCELED);
                canceled += st == KVX_ERR_CANCELED;
            }
            printf("  %d of 8 reads canceled\n", canceled);
            memset(x.bm.mem, 0xC5, x.bm.mem_bytes);
            t0 = kvx_t_now();
            while (kvx_t_now() - t0 < 0.3) { kvx_progress(x.B); usleep(2000); }
            for (i = 0; i < x.bm.mem_bytes && x.bm.mem[i] == 0xC5; i++) {}
            T_EQ(i, x.bm.mem_bytes);
        } else T_FAILF("setup");
        pair_close(&x);
    }
}

int main(void) {
    const char *env = getenv("FI_PROVIDER");
    if (env && *env) run_provider(env);
    else {
        run_provider("tcp");
        run_provider("shm");
    }
    if (!env || !*env) {
        T_CASE("peers on different providers are refused at kvx_peer_add, naming both") {
            kvx_ctx *a = NULL, *b = NULL;
            kvx_peer *p = NULL;
            void *md;
            size_t len = 0;
            T_ST(mk_ctx("tcp", "t", 0, 0, &a), KVX_OK);
            T_ST(mk_ctx("shm", "s", 0, 0, &b), KVX_OK);
            if (a && b) {
                kvx_metadata(a, NULL, &len);
                md = malloc(len);
                kvx_metadata(a, md, &len);
                T_ST(kvx_peer_add(b, md, len, &p), KVX_ERR_MISMATCH);
                T_HAS(kvx_ctx_error(b), "tcp;ofi_rxm, this context shm");
                free(md);
            }
            kvx_ctx_destroy(a);
            kvx_ctx_destroy(b);
        }
    }
    return kvx_t_summary();
}
