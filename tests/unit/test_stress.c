/*
    test_stress -- load: 8 owner processes, 4 queues, about a thousand reads in
    flight, mixed sizes and layer ranges, kvx_poll draining. Every byte of
    every read is checked when it is reported; every notify id must reach its
    owner exactly once; a full queue must answer KVX_PENDING (backpressure,
    not unbounded memory); the heap must be back where it started once the
    queues and peers are gone.

    make test runs it for a bounded number of reads; make soak runs it for
    minutes (KVX_SOAK_SECONDS).
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdlib.h>
/* kvx's own allocations, counted through its allocator override. */
static long kvx_live_allocs;
static long long kvx_live_bytes;
static void *count_malloc(size_t n) {
    size_t *p = (size_t *)malloc(n + 16);
    if (!p) return NULL;
    p[0] = n;
    __atomic_add_fetch(&kvx_live_allocs, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&kvx_live_bytes, (long long)n, __ATOMIC_RELAXED);
    return (char *)p + 16;
}
static void count_free(void *q) {
    size_t *p;
    if (!q) return;
    p = (size_t *)((char *)q - 16);
    __atomic_sub_fetch(&kvx_live_allocs, 1, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&kvx_live_bytes, (long long)p[0], __ATOMIC_RELAXED);
    free(p);
}
static void *count_realloc(void *q, size_t n) {
    size_t *p = q ? (size_t *)((char *)q - 16) : NULL, old = p ? p[0] : 0;
    if (!(p = (size_t *)realloc(p, n + 16))) return NULL;
    p[0] = n;
    if (!q) __atomic_add_fetch(&kvx_live_allocs, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&kvx_live_bytes, (long long)n - (long long)old, __ATOMIC_RELAXED);
    return (char *)p + 16;
}
#define KVX_MALLOC(sz) count_malloc(sz)
#define KVX_REALLOC(p, sz) count_realloc((p), (sz))
#define KVX_FREE(p) count_free(p)
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"

#include <malloc.h>
#include <signal.h>
#include <sys/wait.h>

#define NPEERS 8
#define NQ 4
#define QDEPTH 256
#define LBLOCKS 16384u    /* local blocks: a read owns its destination until reported */
#define RBLOCKS 1024u
#define MAXN 32u

static kvx_layout lay_of(uint32_t nb) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = 3; l.num_blocks = nb; l.block_tokens = 4; l.num_heads = 2; l.head_dim = 64; l.elem_bytes = 2; /* 1 KiB blocks */
    return l;
}

/* Owner: fills every block with its own seed, serves, and at the end reports
   every notify id it received (u32 count, then u64 ids). */
static int owner(int idx, int md_fd, int ctl_fd) {
    kvx_layout lay = lay_of(RBLOCKS);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_cache *c;
    kvx_ctx_desc d;
    kvx_ctx *ctx;
    uint32_t i, ids[RBLOCKS], n = 0, cap = 1 << 16;
    uint64_t *got = (uint64_t *)malloc(cap * sizeof *got);
    kvx_notification nt[256];
    char name[32];
    size_t len = 0;
    void *md;
    memset(&d, 0, sizeof d);
    snprintf(name, sizeof name, "prefill-%d", idx);
    d.name = name; d.progress_thread = 1; d.log_level = KVX_LOG_OFF;
    if (kvx_ctx_create(&d, &ctx) || kvx_ex_cache_alloc(&m, &lay, 0, 1)) return 3;
    for (i = 0; i < RBLOCKS; i++) ids[i] = i;
    kvx_ex_fill(&m, 1000 + (uint64_t)idx, ids, RBLOCKS);
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &c)) return 4;
    kvx_metadata(ctx, NULL, &len);
    md = malloc(len);
    kvx_metadata(ctx, md, &len);
    i = (uint32_t)len;
    if (write(md_fd, &i, 4) != 4 || write(md_fd, md, len) != (ssize_t)len) return 5;
    for (;;) {
        struct pollfd pf;
        int k, got_n = kvx_notifications(ctx, nt, 256);
        for (k = 0; k < got_n; k++) {
            if (n == cap) { cap *= 2; got = (uint64_t *)realloc(got, cap * sizeof *got); }
            got[n++] = nt[k].id;
        }
        pf.fd = ctl_fd; pf.events = POLLIN; pf.revents = 0;
        if (poll(&pf, 1, got_n ? 0 : 5) > 0) { char b; if (read(ctl_fd, &b, 1) <= 0) break; }
    }
    { int k, got_n; for (k = 0; k < 50; k++) { got_n = kvx_notifications(ctx, nt, 256); while (got_n-- > 0) { if (n == cap) { cap *= 2; got = (uint64_t *)realloc(got, cap * sizeof *got); } got[n++] = nt[got_n].id; } usleep(2000); } }
    if (write(md_fd, &n, 4) != 4 || (n && write(md_fd, got, n * sizeof *got) != (ssize_t)(n * sizeof *got))) return 6;
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    free(md); free(got);
    return 0;
}

typedef struct inflight {
    int used, peer;
    uint32_t n, lb, le;
    uint32_t lblk[MAXN], rblk[MAXN];
    uint64_t id;
} inflight;

static int read_all(int fd, void *p, size_t n) {
    uint8_t *b = (uint8_t *)p;
    while (n) { ssize_t k = read(fd, b, n); if (k <= 0) return -1; b += k; n -= (size_t)k; }
    return 0;
}

int main(int argc, char **argv) {
    kvx_layout lay = lay_of(LBLOCKS);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx_desc d;
    kvx_ctx *ctx;
    kvx_cache *c;
    kvx_peer *peer[NPEERS];
    kvx_queue *q[NQ];
    kvx_queue_desc qd;
    pid_t pid[NPEERS];
    int mdfd[NPEERS], ctl[NPEERS], k;
    uint32_t *freelist, nfree = 0, i;
    inflight *fl;
    uint64_t next_id = 1, posted = 0, done = 0, pending_answers = 0, bad_bytes = 0, failed = 0, target;
    uint64_t *done_ids;
    double soak = getenv("KVX_SOAK_SECONDS") ? atof(getenv("KVX_SOAK_SECONDS")) : 0, t0;
    size_t heap0, heap1;
    long allocs0;
    long long bytes0;
    uint64_t rng = 7;

    if (argc == 4 && !strcmp(argv[1], "owner")) return owner(atoi(argv[2]), atoi(argv[3]), 0 /* stdin */);
    signal(SIGPIPE, SIG_IGN);
    target = soak > 0 ? ~0ull : 20000;
    memset(&d, 0, sizeof d);
    d.name = "decode"; d.log_level = KVX_LOG_ERROR;
    if (kvx_ctx_create(&d, &ctx) || kvx_ex_cache_alloc(&m, &lay, 0, 1)) return 1;
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &c)) return 1;
    freelist = (uint32_t *)malloc(LBLOCKS * sizeof *freelist);
    for (i = 0; i < LBLOCKS; i++) freelist[nfree++] = LBLOCKS - 1 - i;
    fl = (inflight *)calloc((size_t)NQ * QDEPTH * 2, sizeof *fl);
    done_ids = (uint64_t *)calloc(1, sizeof *done_ids);

    for (k = 0; k < NPEERS; k++) {
        int a[2], b[2];
        if (pipe(a) || pipe(b)) return 1;
        pid[k] = fork();
        if (pid[k] == 0) {
            char sk[8], sf[8];
            int j;
            dup2(b[0], 0);
            close(a[0]); close(b[1]);
            for (j = 0; j < k; j++) { close(ctl[j]); close(mdfd[j]); }  /* else earlier owners never see EOF */
            snprintf(sk, sizeof sk, "%d", k); snprintf(sf, sizeof sf, "%d", a[1]);
            execl("/proc/self/exe", "test_stress", "owner", sk, sf, (char *)NULL);
            _exit(127);
        }
        close(a[1]); close(b[0]);
        mdfd[k] = a[0]; ctl[k] = b[1];
    }
    heap0 = mallinfo2().uordblks;
    allocs0 = kvx_live_allocs;
    bytes0 = kvx_live_bytes;
    T_CASE("stress: 8 peers, 4 queues, ~1000 reads in flight, every byte checked, backpressure") {
        uint32_t len;
        void *md;
        for (k = 0; k < NPEERS; k++) {
            T_CHECK(read_all(mdfd[k], &len, 4) == 0);
            md = malloc(len);
            T_CHECK(read_all(mdfd[k], md, len) == 0);
            T_ST(kvx_peer_add(ctx, md, len, &peer[k]), KVX_OK);
            free(md);
        }
        memset(&qd, 0, sizeof qd);
        qd.depth = QDEPTH;
        for (k = 0; k < NQ; k++) T_ST(kvx_queue_create(ctx, &qd, &q[k]), KVX_OK);
        t0 = kvx_t_now();
        while ((soak > 0 ? kvx_t_now() - t0 < soak : done < target) && !kvx_t_case_failed && kvx_t_now() - t0 < (soak > 0 ? soak + 60 : 300)) {
            int progressed = 0;
            /* post until backpressure on every queue */
            for (k = 0; k < NQ; k++) {
                for (;;) {
                    kvx_read rd;
                    kvx_ticket t;
                    kvx_status s;
                    inflight f;
                    uint32_t j;
                    if (posted - done >= (uint64_t)NQ * QDEPTH * 2 - 1 || (soak <= 0 && posted >= target)) break;
                    memset(&f, 0, sizeof f);
                    rng = kvx_ex_mix(rng);
                    f.n = 1 + (uint32_t)(rng % MAXN);
                    if (nfree < f.n) break;
                    f.peer = (int)((rng >> 8) % NPEERS);
                    f.lb = (uint32_t)((rng >> 16) % 3);
                    f.le = f.lb + 1 + (uint32_t)((rng >> 20) % (3 - f.lb));
                    kvx_ex_block_table(f.rblk, f.n, RBLOCKS, 1, rng, 0);
                    for (j = 0; j < f.n; j++) f.lblk[j] = freelist[--nfree];
                    f.id = next_id;
                    memset(&rd, 0, sizeof rd);
                    rd.peer = peer[f.peer]; rd.cache = c; rd.local_blocks = f.lblk; rd.remote_blocks = f.rblk; rd.num_blocks = f.n;
                    rd.layer_begin = f.lb; rd.layer_count = f.le - f.lb;
                    rd.notify = 1; rd.notify_id = f.id; rd.timeout_ms = 60000;
                    kvx_ex_poison(&m, 1000 + (uint64_t)f.peer, f.lblk, f.rblk, f.n, f.lb, f.le, 0, 2);
                    s = kvx_post(q[k], &rd, &t);
                    if (s == KVX_PENDING) {  /* backpressure: give the blocks back, drain */
                        for (j = 0; j < f.n; j++) freelist[nfree++] = f.lblk[j];
                        pending_answers++;
                        break;
                    }
                    if (s != KVX_OK) { T_FAILF("post: %s: %s", kvx_status_name(s), kvx_ctx_error(ctx)); break; }
                    f.used = 1;
                    /* a queue's tickets are consecutive: index by (queue, ticket) */
                    fl[((size_t)k * QDEPTH * 2) + (t % (QDEPTH * 2))] = f;
                    next_id++;
                    posted++;
                }
            }
            /* drain */
            for (k = 0; k < NQ; k++) {
                kvx_completion comp[64];
                int n = kvx_poll(q[k], comp, 64), j;
                progressed += n;
                for (j = 0; j < n; j++) {
                    inflight *f = &fl[((size_t)k * QDEPTH * 2) + (comp[j].ticket % (QDEPTH * 2))];
                    uint32_t b;
                    if (!f->used) { T_FAILF("completion for ticket %llu that is not in flight", (unsigned long long)comp[j].ticket); continue; }
                    if (comp[j].status != KVX_OK) { failed++; T_FAILF("read failed: %s: %s", kvx_status_name(comp[j].status), kvx_ctx_error(ctx)); }
                    else bad_bytes += kvx_ex_verify(&m, 1000 + (uint64_t)f->peer, f->lblk, f->rblk, f->n, f->lb, f->le, 0, 2, NULL);
                    if ((done & 1023) == 0) { done_ids = (uint64_t *)realloc(done_ids, (done + 1024) * sizeof *done_ids); }
                    done_ids[done] = f->id;
                    for (b = 0; b < f->n; b++) freelist[nfree++] = f->lblk[b];
                    f->used = 0;
                    done++;
                }
            }
            if (!progressed) usleep(500);
        }
        printf("  %llu reads in %.1f s, %llu answered KVX_PENDING (backpressure), %llu wrong bytes, %llu failed\n",
               (unsigned long long)done, kvx_t_now() - t0, (unsigned long long)pending_answers, (unsigned long long)bad_bytes,
               (unsigned long long)failed);
        T_CHECK(done > 0);
        T_EQ(bad_bytes, 0);
        T_CHECK(pending_answers > 0);
        T_EQ(posted, done);
    }
    T_CASE("stress: every notification delivered exactly once, memory back where it started") {
        uint8_t *seen = (uint8_t *)calloc(next_id + 1, 1);
        uint64_t dup = 0, missing = 0, total = 0;
        kvx_stats s;
        kvx_stats(ctx, &s);
        for (k = 0; k < NQ; k++) kvx_queue_destroy(q[k]);
        for (k = 0; k < NPEERS; k++) kvx_peer_remove(peer[k]);
        heap1 = mallinfo2().uordblks;
        for (k = 0; k < NPEERS; k++) {
            uint32_t n, j;
            uint64_t *ids;
            int st2;
            close(ctl[k]);
            T_CHECK(read_all(mdfd[k], &n, 4) == 0);
            ids = (uint64_t *)malloc((n ? n : 1) * sizeof *ids);
            T_CHECK(!n || read_all(mdfd[k], ids, n * sizeof *ids) == 0);
            for (j = 0; j < n; j++) {
                if (ids[j] == 0 || ids[j] >= next_id) { dup++; continue; }
                if (seen[ids[j]]++) dup++;
            }
            total += n;
            free(ids);
            waitpid(pid[k], &st2, 0);
            if (WIFSIGNALED(st2)) T_FAILF("owner process %ld died by signal %d (%s)", (long)pid[k], WTERMSIG(st2), strsignal(WTERMSIG(st2)));
        }
        for (i = 0; i < done; i++) if (!seen[done_ids[i]]) missing++;
        printf("  %llu notifications for %llu reads: %llu missing, %llu duplicated or unknown\n",
               (unsigned long long)total, (unsigned long long)done, (unsigned long long)missing, (unsigned long long)dup);
        printf("  kvx's own heap: %ld allocations / %lld bytes before the peers and queues, %ld / %lld after; "
               "the process heap (UCX's pools included) %zu -> %zu bytes\n", allocs0, bytes0, kvx_live_allocs, kvx_live_bytes, heap0, heap1);
        T_EQ(missing, 0);
        T_EQ(dup, 0);
        T_EQ(total, done);
        T_EQ(kvx_live_allocs, allocs0);
        T_EQ(kvx_live_bytes, bytes0);
        free(seen);
    }
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    free(freelist); free(fl); free(done_ids);
    return kvx_t_summary();
}
