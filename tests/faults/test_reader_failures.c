/*
    test_reader_failures -- the owner's side: readers that die, stop or
    never come, and a reader that lies. A reader killed before it reads, an
    id never posted and a read after its deadline each give exactly one
    notification; a reader killed mid-read leaves the owner serving the
    next; deregistering a cache under a stopped reader returns by the reads'
    deadlines and no read completes with the memory's next contents; forged
    requests to kvx's UCX get outside the owner's memory are refused.

    This process owns the blocks; readers are this binary re-executed
    (tests/lib/kvx_owner.h). Over the transport the environment selects
    (make test runs it over UCX TCP, where reads are served by the owner, so
    a stopped reader really leaves its replies queued).

    The implementation is in this translation unit: the forged requests are
    posted through kvx's own get (kvx__ucx_get_post).
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
/* What each UCX version does without kvx's workarounds (seams of kvx.h):
   KVX_TEST_UCX_NATIVE_GET=1 reads software-served peers with UCX's own get,
   KVX_TEST_UCX_NO_PROBE=1 skips the first read at connect. */
static int kvx_t_native_get, kvx_t_no_probe;
#define KVX_TEST_HOOK_UCX_NATIVE_GET kvx_t_native_get
#define KVX_TEST_HOOK_UCX_NO_PROBE kvx_t_no_probe
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"
#include "../lib/kvx_owner.h"


/* Reader: takes the owner's metadata, posts `count` reads with notify ids
   1..count, then stops itself before they can finish (mode 0), or waits for
   each and reports its id (mode 1), or posts after `delay_ms` (mode 2), or
   stops before posting anything (mode 3). */
static int role_decode(int mode, int count, int delay_ms, int md_fd, int rep_fd) {
    kvx_layout lay = lay_for(1);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_cache *c;
    kvx_queue *q;
    kvx_peer *p;
    kvx_ctx *ctx = kvx_t_ctx("decode", 0, 1, 0);
    uint32_t ids[NB], n, i;
    kvx_ticket t[64];
    void *md;
    int k;
    if (kvx_ex_cache_alloc(&m, &lay, 0, 1)) return 3;
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &c) || kvx_queue_create(ctx, NULL, &q)) return 4;
    if (kvx_t_read_all(md_fd, &n, 4)) return 5;
    md = malloc(n);
    if (kvx_t_read_all(md_fd, md, n) || kvx_peer_add(ctx, md, n, &p)) return 6;
    if (mode == 1) printf("    the reader in time reads over %s\n", kvx_peer_transport(p));  /* as the killed ones did */
    fflush(stdout);
    for (i = 0; i < NB; i++) ids[i] = i;
    if (mode == 3) { uint32_t go = 1; kvx_t_write_all(rep_fd, &go, 4); raise(SIGSTOP); return 0; }
    if (mode == 4) memset(m.mem, 0, m.mem_bytes);
    if (mode == 2) usleep((useconds_t)delay_ms * 1000);
    for (k = 0; k < count && k < 64; k++) {
        kvx_read rd;
        memset(&rd, 0, sizeof rd);
        rd.peer = p; rd.cache = c; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = NB;
        rd.notify = mode != 4; rd.notify_id = (uint64_t)(mode == 1 ? delay_ms : 0) + (uint64_t)k + 1;
        if (mode == 4) rd.timeout_ms = 5000;  /* still live when it resumes */
        if (kvx_post(q, &rd, &t[k])) return 7;
    }
    if (mode == 0 || mode == 4) { uint32_t go = 1; kvx_t_write_all(rep_fd, &go, 4); raise(SIGSTOP); }
    if (mode == 4) {  /* each read's status, and for one that succeeded, its wrong bytes (the owner filled with seed delay_ms) */
        for (k = 0; k < count && k < 64; k++) {
            int32_t res[2];
            res[0] = (int32_t)kvx_wait(q, t[k], 30000);
            res[1] = res[0] == KVX_OK ? (int32_t)kvx_ex_verify(&m, (uint64_t)delay_ms, ids, ids, NB, 0, lay.num_layers, 0, HEADS, NULL) : 0;
            kvx_t_write_all(rep_fd, res, sizeof res);
        }
        for (k = 0; k < 100; k++) { kvx_progress(ctx); usleep(10000); }  /* take (and drop) what the owner still sends */
        kvx_ctx_destroy(ctx);
        kvx_ex_cache_free(&m);
        free(md);
        return 0;
    }
    for (k = 0; k < count && k < 64; k++) {
        uint32_t id = (uint32_t)(mode == 1 ? delay_ms : 0) + (uint32_t)k + 1;
        if (kvx_wait(q, t[k], 20000) != KVX_OK) return 8;
        kvx_t_write_all(rep_fd, &id, 4);
    }
    /* keep progressing so the notifications leave before exit */
    for (k = 0; k < 50; k++) { kvx_progress(ctx); usleep(10000); }
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    free(md);
    return 0;
}

/* Notifications of P until want arrived or secs passed: how many. */
static int collect(kvx_ctx *P, kvx_notification *nt, int cap, int want, double secs) {
    int got = 0;
    double st = kvx_t_now();
    while (kvx_t_now() - st < secs && got < want && got < cap) {
        int n = kvx_notifications(P, nt + got, cap - got);
        got += n;
        if (!n) usleep(10000);
    }
    return got;
}

/* After a failure on the owner P: a new reader of ids 11 and 12 gets its
   reads done, and P a done notification for each. */
static void reader_in_time(kvx_ctx *P, const void *md, size_t len) {
    uint32_t n32 = (uint32_t)len;
    kvx_notification nt[8];
    kvx_t_child r;
    int got, k;
    kvx_notify_expect(P, 11, 10000);
    kvx_notify_expect(P, 12, 10000);
    r = kvx_t_spawn("decode", 1, 2, 10);   /* ids 11 and 12 */
    kvx_t_write_all(r.wr, &n32, 4); kvx_t_write_all(r.wr, md, len);
    got = collect(P, nt, 8, 2, 8.0);
    T_EQ(got, 2);
    for (k = 0; k < got; k++) T_ST(nt[k].status, KVX_OK);
    kvx_t_finish(&r);
}

/* An owner in this process: a context with a progress thread, and one cache
   filled with seed and registered; *md its metadata (free it). */
static kvx_ctx *owner_here(uint64_t seed, kvx_ex_cache *m, kvx_cache **c, void **md, size_t *len) {
    kvx_layout l = lay_for(1);
    kvx_ctx *P = kvx_t_ctx("prefill", 0, 1, 1);
    kvx_cache_desc cd;
    uint32_t ids[NB], i;
    for (i = 0; i < NB; i++) ids[i] = i;
    if (kvx_ex_cache_alloc(m, &l, 0, 1)) { printf("owner: out of memory\n"); exit(3); }
    kvx_ex_fill(m, seed, ids, NB);
    cd = kvx_ex_cache_desc(m);
    if (kvx_cache_register(P, &cd, c) != KVX_OK) { printf("owner: %s\n", kvx_ctx_error(P)); exit(3); }
    *md = kvx_t_metadata(P, len);
    return P;
}

int main(int argc, char **argv) {
    kvx_layout lay1 = lay_for(1);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx *D;
    kvx_cache *dc;
    uint32_t ids[NB], i;

    kvx_t_native_get = getenv("KVX_TEST_UCX_NATIVE_GET") && atoi(getenv("KVX_TEST_UCX_NATIVE_GET"));
    kvx_t_no_probe = getenv("KVX_TEST_UCX_NO_PROBE") && atoi(getenv("KVX_TEST_UCX_NO_PROBE"));
    if (kvx_t_is_child(argc, argv, "decode"))
        return role_decode(atoi(argv[2]), atoi(argv[3]), (int)atoll(argv[4]), atoi(argv[5]), atoi(argv[6]));
    signal(SIGPIPE, SIG_IGN);
    for (i = 0; i < NB; i++) ids[i] = i;
    D = kvx_t_ctx("decode", 0, 1, 0);
    if (kvx_ex_cache_alloc(&m, &lay1, 0, 1)) return 1;
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(D, &cd, &dc)) return 1;

    /* The owner's side: this process owns the blocks, readers are children. */
    T_CASE("stranded blocks: reader killed, read refused, read late: exactly one notification each") {
        kvx_ctx *P;
        kvx_ex_cache pm;
        kvx_cache *pc;
        void *md;
        size_t len;
        uint32_t n32;
        kvx_t_child r1, r3;
        kvx_notification nt[64];
        int got = 0, k, done = 0, expired = 0, seen[16];
        double st;
        P = owner_here(61, &pm, &pc, &md, &len);
        n32 = (uint32_t)len;
        memset(seen, 0, sizeof seen);
        /* 1. a reader that connects, is killed before it reads ids 1..4 */
        for (k = 1; k <= 4; k++) kvx_notify_expect(P, (uint64_t)k, 1500);
        r1 = kvx_t_spawn("decode", 3, 4, 0);
        kvx_t_write_all(r1.wr, &n32, 4); kvx_t_write_all(r1.wr, md, len);
        { uint32_t go; T_CHECK(kvx_t_read_all(r1.rd, &go, 4) == 0); }
        kvx_t_kill(&r1);
        /* 2. an id the reader never gets to post (a read refused at post) */
        kvx_notify_expect(P, 9, 1500);
        /* 3. a read that comes after its deadline: id 1 of a reader that waits 2.5 s */
        r3 = kvx_t_spawn("decode", 2, 1, 2500);
        kvx_t_write_all(r3.wr, &n32, 4); kvx_t_write_all(r3.wr, md, len);
        st = kvx_t_now();
        while (kvx_t_now() - st < 4.5 && got < 64) {
            int n = kvx_notifications(P, nt + got, 64 - got);
            got += n;
            if (!n) usleep(10000);
        }
        for (k = 0; k < got; k++) {
            if (nt[k].id < 16) seen[nt[k].id]++;
            if (nt[k].status == KVX_OK) done++; else expired++;
        }
        printf("  %d notifications: %d done, %d expired\n", got, done, expired);
        for (k = 1; k <= 4; k++) T_EQ(seen[k], 1);   /* expired once; the late read of id 1 is dropped */
        T_EQ(seen[9], 1);
        T_EQ(done, 0);
        T_EQ(expired, 5);
        kvx_t_finish(&r3);
        /* the owner goes on: a reader in time gives done */
        reader_in_time(P, md, len);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        free(md);
    }

    T_CASE("decode killed mid-read: the owner survives, no notification for the unfinished reads") {
        kvx_ctx *P;
        kvx_ex_cache pm;
        kvx_cache *pc;
        void *md;
        size_t len;
        uint32_t n32;
        kvx_t_child r;
        kvx_notification nt[16];
        int got, k;
        P = owner_here(62, &pm, &pc, &md, &len);
        n32 = (uint32_t)len;
        /* Over TCP the owner serves the reads in software; with UCX's own
           software get, UCX 1.13 aborted the owner here (kvx reads such
           peers with its own get over active messages). */
        for (k = 1; k <= 4; k++) kvx_notify_expect(P, (uint64_t)k, 1500);
        r = kvx_t_spawn("decode", 0, 4, 0);
        kvx_t_write_all(r.wr, &n32, 4); kvx_t_write_all(r.wr, md, len);
        { uint32_t go; T_CHECK(kvx_t_read_all(r.rd, &go, 4) == 0); }
        usleep(100000);
        kvx_t_kill(&r);
        got = collect(P, nt, 16, 16, 2.5);  /* more than the 4 expected: none may come twice */
        T_EQ(got, 4);
        for (k = 0; k < got; k++) T_ST(nt[k].status, KVX_ERR_TIMEOUT);
        /* ... and goes on serving: a new reader's reads complete */
        reader_in_time(P, md, len);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        free(md);
    }

    T_CASE("readers killed at 16 points of their reads: the owner survives each and serves the next") {
        kvx_ctx *P;
        kvx_ex_cache pm;
        kvx_cache *pc;
        void *md;
        size_t len;
        uint32_t n32;
        kvx_notification nt[64];
        int round;
        P = owner_here(65, &pm, &pc, &md, &len);
        n32 = (uint32_t)len;
        /* Readers that read without stopping (16 whole-cache reads each) and
           are killed 10 to 160 ms after they start: some while connecting,
           most while the owner's replies are going out. UCX 1.13's own
           software get aborted the owner in such a death (docs/ucx.md, "What each version needs"). */
        for (round = 0; round < 16; round++) {
            kvx_t_child r = kvx_t_spawn("decode", 1, 16, 1000);
            kvx_t_write_all(r.wr, &n32, 4); kvx_t_write_all(r.wr, md, len);
            usleep((useconds_t)(10000 + round * 10000));
            kvx_t_kill(&r);
        }
        while (collect(P, nt, 64, 64, 0.2) > 0) {}  /* the done notifications of reads that finished first */
        reader_in_time(P, md, len);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        free(md);
    }

    T_CASE("cache deregistered under a stopped reader: returns by the reads' deadlines, no byte of the memory's next use lands") {
        kvx_ctx *P;
        kvx_ex_cache pm;
        kvx_cache *pc;
        void *md, *md2;
        size_t len, len2;
        uint32_t n32;
        kvx_t_child r;
        double t0, dt;
        int k, failed = 0;
        P = owner_here(63, &pm, &pc, &md, &len);
        n32 = (uint32_t)len;
        /* 8 whole-cache reads: 64 MiB asked for, far more than the sockets
           between the two hold, so replies wait behind the stopped reader */
        r = kvx_t_spawn("decode", 4, 8, 63);
        kvx_t_write_all(r.wr, &n32, 4); kvx_t_write_all(r.wr, md, len);
        { uint32_t go; T_CHECK(kvx_t_read_all(r.rd, &go, 4) == 0); }
        usleep(300000);
        t0 = kvx_t_now();
        kvx_cache_deregister(pc);
        dt = kvx_t_now() - t0;
        memset(pm.mem, 0xA7, pm.mem_bytes);  /* the engine reuses the memory at once */
        printf("    kvx_cache_deregister returned in %.3f s\n", dt);
        T_CHECK(dt < 10.0);  /* the reads' 5 s deadlines bound it */
        kill(r.pid, SIGCONT);
        for (k = 0; k < 8; k++) {
            int32_t res[2] = {-1, -1};
            T_CHECK(kvx_t_read_all(r.rd, res, sizeof res) == 0);
            if (res[0] != KVX_OK) failed++;
            else T_EQ(res[1], 0);  /* a read that succeeded brought the producer's bytes, never the canary */
            if (k == 0 || res[0] != KVX_OK) printf("    read %d: %s, %d wrong bytes\n", k, kvx_status_name((kvx_status)res[0]), res[1]);
        }
        T_CHECK(failed > 0);  /* the reader resumed past its deadlines: it took none of what was still queued */
        kvx_t_finish(&r);
        /* the owner goes on: the memory registered again is served to a new reader */
        kvx_ex_fill(&pm, 62, ids, NB);
        cd = kvx_ex_cache_desc(&pm);
        T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        md2 = kvx_t_metadata(P, &len2);
        reader_in_time(P, md2, len2);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        free(md);
        free(md2);
    }

#if defined(KVX_UCX)
    T_CASE("kvx's UCX get: requests outside the owner's registered memory are refused, pieces inside gathered") {
        kvx_ctx *P;
        kvx_ex_cache pm;
        kvx_cache *pc;
        kvx_peer *p = NULL;
        void *md;
        size_t len;
        P = owner_here(64, &pm, &pc, &md, &len);
        T_ST(kvx_peer_add(D, md, len, &p), KVX_OK);
        if (p && D->be_ops->kind == KVX_BACKEND_UCX && (p->be_flags & KVX__UCX_BY_KVX_GET)) {
            /* Forged ops, as a reader that lies about the owner's memory would
               send them: the owner checks every piece, whatever the metadata said. */
            uint64_t base = (uint64_t)(uintptr_t)pm.mem, size = pm.mem_bytes;
            static uint8_t got[1024];
            struct { uint64_t raddr, len, count, stride; int ok; const char *what; } c[4] = {
                {0, 16, 1, 0, 0, "a range past the end"}, {0, 64, 4, 0, 0, "pieces past the end"},
                {0, 64, 2, 1ull << 41, 0, "a stride past any memory"}, {0, 64, 4, 256, 1, "four pieces inside"}};
            int k;
            c[0].raddr = base + size - 8; c[1].raddr = base + size - 512; c[1].stride = 256;
            c[2].raddr = base; c[3].raddr = base + 4096;
            for (k = 0; k < 4; k++) {
                kvx__op op;
                volatile ucs_status_t st = UCS_INPROGRESS;
                uint64_t until = kvx__now_ns() + 5000000000ull;
                memset(&op, 0, sizeof op);
                memset(got, 0, sizeof got);
                op.laddr = (uint64_t)(uintptr_t)got; op.raddr = c[k].raddr; op.len = c[k].len; op.count = (uint32_t)c[k].count;
                op.rstride = c[k].stride; op.lstride = c[k].len;
                pthread_mutex_lock(&D->lock);
                if (kvx__ucx_get_post(D, NULL, p, &op, (ucs_status_t *)&st) == KVX_OK)
                    while (st == UCS_INPROGRESS && kvx__ucx_wait_step(D, until)) {}
                pthread_mutex_unlock(&D->lock);
                printf("    %s: %s\n", c[k].what, ucs_status_string(st));
                if (c[k].ok) {
                    uint32_t j;
                    T_EQ(st, UCS_OK);
                    for (j = 0; j < 4; j++) T_EQ(memcmp(got + j * 64, pm.mem + 4096 + j * 256, 64), 0);
                } else {
                    T_CHECK(st != UCS_OK && st != UCS_INPROGRESS);
                }
            }
        } else {
            T_SKIP("the peer is not read by kvx's own get here");
        }
        if (p) kvx_peer_remove(p);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        free(md);
    }
#endif

    kvx_ctx_destroy(D);
    kvx_ex_cache_free(&m);
    return kvx_t_summary();
}
