/*
    test_owner_failures -- the process that holds the blocks fails under a
    reader: it stops answering, is killed mid-read, restarts, or the reader
    drops it (kvx_peer_remove, kvx_queue_destroy) with reads in flight.
    Errors come within the deadline, never a hang; no byte of a failed read
    lands after the failure was reported (a canary written over the
    destination survives the owner waking up); the reader's context goes on
    serving other and new owners.

    Owners are this binary re-executed (tests/lib/kvx_owner.h). Runs over the
    transport UCX_TLS (UCX) or FI_PROVIDER (libfabric) selects.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../../kvx.h"
#include <pthread.h>
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"
#include "../lib/kvx_owner.h"

#define LONG_NB 256u    /* blocks of the long-read layout */

/* 16 KiB blocks: a read of every block is 32 MiB, long enough to stop or
   kill its owner in the middle. */
static kvx_layout long_layout(void) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = 4;
    l.num_blocks = LONG_NB;
    l.block_tokens = 16;
    l.num_heads = 8;
    l.head_dim = 64;
    l.elem_bytes = 2;
    return l;
}

typedef struct prefill_proc { kvx_t_child ch; pid_t pid; void *md; uint32_t md_len; } prefill_proc;

/* An owner of the long-read layout. */
static int spawn_prefill(prefill_proc *pp, uint64_t seed) {
    kvx_layout lay = long_layout();
    pp->md = kvx_t_owner_spawn(&pp->ch, &lay, 0, 1, seed, &pp->md_len);
    pp->pid = pp->ch.pid;
    return pp->md ? 0 : -1;
}

static void reap(prefill_proc *pp) {
    kvx_t_finish(&pp->ch);
    free(pp->md);
}

/* An owner of the TP layout as rank of tp: its metadata. */
static void *spawn_owner(kvx_t_child *ch, int rank, int tp, uint64_t seed, uint32_t *len) {
    kvx_layout lay = lay_for(tp);
    return kvx_t_owner_spawn(ch, &lay, rank, tp, seed, len);
}

/* Whether p's owner serves our reads itself (in software): only then does
   stopping it stop them. A one-sided transport reads a stopped owner. */
static int owner_serves(const kvx_peer *p) { return strstr(kvx_peer_transport(p), "(sw)") != NULL; }

/* Whether an owner of the TP layout serves D's reads itself. */
static int owner_serves_here(kvx_ctx *D) {
    kvx_t_child ch;
    kvx_peer *p = NULL;
    uint32_t len;
    void *md = spawn_owner(&ch, 0, 1, 1, &len);
    int sw = md && kvx_peer_add(D, md, len, &p) == KVX_OK && owner_serves(p);
    if (p) kvx_peer_remove(p);
    kvx_t_finish(&ch);
    free(md);
    return sw;
}

/* Every byte of the cache still v. */
static int canary_intact(const kvx_ex_cache *m, uint8_t v) {
    size_t i;
    for (i = 0; i < m->mem_bytes; i++) if (m->mem[i] != v) return 0;
    return 1;
}

/* Progress ctx for ms, sleeping between. */
static void idle(kvx_ctx *ctx, int ms) {
    double t0 = kvx_t_now();
    while (kvx_t_now() - t0 < ms / 1000.0) { kvx_progress(ctx); usleep(5000); }
}

/* kvx_peer_add on another thread, for a read to run beside it. */
typedef struct adder { kvx_ctx *ctx; void *md; uint32_t len; kvx_peer *peer; kvx_status st; double took; volatile int done; } adder;

static void *add_peer(void *arg) {
    adder *a = (adder *)arg;
    double t0 = kvx_t_now();
    a->st = kvx_peer_add(a->ctx, a->md, a->len, &a->peer);
    a->took = kvx_t_now() - t0;
    __atomic_store_n(&a->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* A reader of the long-read layout: owners that stop answering or die, then
   a new one. */
static void long_reads(void) {
    kvx_layout lay = long_layout();
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx *ctx = kvx_t_ctx("decode", 0, 1, 0);
    kvx_cache *cache;
    kvx_queue *q;
    uint32_t ids[LONG_NB], i;
    const char *tls = getenv("UCX_TLS");

    for (i = 0; i < LONG_NB; i++) ids[i] = i;
    if (kvx_ex_cache_alloc(&m, &lay, 0, 1)) exit(1);
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &cache) || kvx_queue_create(ctx, NULL, &q)) exit(1);
    printf("  transport set: UCX_TLS=%s, FI_PROVIDER=%s\n", tls ? tls : "(default)", getenv("FI_PROVIDER") ? getenv("FI_PROVIDER") : "(default)");

    /* Where the owner serves reads in software ("(sw)": TCP), a stopped
       owner never answers. A one-sided transport needs no help from the
       owner: there the stopped peer is still read, which is checked too. */
    T_CASE("a peer that never answers: KVX_ERR_TIMEOUT within its deadline; no byte after") {
        prefill_proc pp;
        kvx_peer *peer;
        kvx_read rd;
        kvx_ticket t;
        kvx_status st;
        double t0, el;
        int served_by_owner;
        if (spawn_prefill(&pp, 11) != 0) { T_FAILF("the owner process did not start"); continue; }
        T_ST(kvx_peer_add(ctx, pp.md, pp.md_len, &peer), KVX_OK);
        printf("  peer transport: %s\n", kvx_peer_transport(peer));
        served_by_owner = owner_serves(peer);
        kill(pp.pid, SIGSTOP);
        memset(&rd, 0, sizeof rd);
        rd.peer = peer; rd.cache = cache; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = LONG_NB;
        rd.timeout_ms = 1500;
        t0 = kvx_t_now();
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        st = kvx_wait(q, t, 10000);
        el = kvx_t_now() - t0;
        if (served_by_owner) {
            T_ST(st, KVX_ERR_TIMEOUT);
            T_HAS(kvx_ctx_error(ctx), "timed out after 1500 ms");
            T_HAS(kvx_ctx_error(ctx), "descriptors done");
            T_CHECK(el >= 1.4 && el < 3.0);
            printf("  timeout reported after %.3f s: %s\n", el, kvx_ctx_error(ctx));
            /* The engine reuses the blocks at once: a canary must survive the
               peer waking up and answering the old requests. */
            memset(m.mem, 0xC5, m.mem_bytes);
            kill(pp.pid, SIGCONT);
            t0 = kvx_t_now();
            while (kvx_t_now() - t0 < 1.5) { kvx_progress(ctx); usleep(10000); }
            T_CHECK(canary_intact(&m, 0xC5));
            /* ... and the peer is reconnected on demand. */
            kvx_ex_poison(&m, 11, ids, ids, 8, 0, lay.num_layers, 0, lay.num_heads);
            rd.num_blocks = 8;
            T_ST(kvx_post(q, &rd, &t), KVX_OK);
            T_ST(kvx_wait(q, t, 10000), KVX_OK);
            T_EQ(kvx_ex_verify(&m, 11, ids, ids, 8, 0, lay.num_layers, 0, lay.num_heads, NULL), 0);
        } else {
            printf("  stopped peer read over %s in %.3f s: %s\n", kvx_peer_transport(peer), el, kvx_status_name(st));
            T_ST(st, KVX_OK);
            T_EQ(kvx_ex_verify(&m, 11, ids, ids, LONG_NB, 0, lay.num_layers, 0, lay.num_heads, NULL), 0);
            kill(pp.pid, SIGCONT);
        }
        kvx_peer_remove(peer);
        reap(&pp);
    }

    T_CASE("a peer killed mid-read: KVX_ERR_PEER or KVX_ERR_TIMEOUT within the deadline") {
        prefill_proc pp;
        kvx_peer *peer;
        kvx_read rd;
        kvx_ticket t[8];
        kvx_status st;
        double t0, el;
        int k, failed = 0;
        if (spawn_prefill(&pp, 12) != 0) { T_FAILF("the owner process did not start"); continue; }
        T_ST(kvx_peer_add(ctx, pp.md, pp.md_len, &peer), KVX_OK);
        memset(&rd, 0, sizeof rd);
        rd.peer = peer; rd.cache = cache; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = LONG_NB;
        rd.timeout_ms = 3000;
        t0 = kvx_t_now();
        for (k = 0; k < 8; k++) T_ST(kvx_post(q, &rd, &t[k]), KVX_OK);
        kvx_progress(ctx);
        kill(pp.pid, SIGKILL);
        for (k = 0; k < 8; k++) {
            st = kvx_wait(q, t[k], 10000);
            T_CHECK(st == KVX_OK || st == KVX_ERR_PEER || st == KVX_ERR_TIMEOUT);
            if (st != KVX_OK) failed++;
        }
        el = kvx_t_now() - t0;
        printf("  %d of 8 reads failed, last reported after %.3f s: %s\n", failed, el, kvx_ctx_error(ctx));
        /* A one-sided transport may finish every read before the kill (shm
           copies inside fi_read); the read after the kill checks its error. */
        if (strstr(kvx_peer_transport(peer), "(sw)")) T_CHECK(failed > 0);
        T_CHECK(el < 4.5);
        /* the context goes on: a new read to the dead peer fails at once
           (dead: kill returns before it is, and a transport that reads the
           peer's memory itself could still read a dying process) */
        {
            siginfo_t si;
            waitid(P_PID, (id_t)pp.pid, &si, WEXITED | WNOWAIT);
        }
        rd.num_blocks = 1;
        st = kvx_post(q, &rd, &t[0]);
        if (st == KVX_OK) st = kvx_wait(q, t[0], 10000);
        printf("  a read after the kill: %s after %.3f s: %s\n", kvx_status_name(st), kvx_t_now() - t0, kvx_ctx_error(ctx));
        T_CHECK(st == KVX_ERR_PEER || st == KVX_ERR_TIMEOUT);
        kvx_peer_remove(peer);
        reap(&pp);
    }

    T_CASE("an owner stopped before it answers the connection: kvx_peer_add fails at its deadline; killed then, what is left of the connection says nothing, and the context goes on") {
        prefill_proc pp, next;
        kvx_ctx_desc d;
        kvx_ctx *c2 = NULL;
        kvx_peer *peer = NULL;
        kvx_status st;
        double t0;
        memset(&d, 0, sizeof d);
        d.name = "decode2"; d.tp_size = 1; d.log_level = KVX_LOG_OFF; d.timeout_ms = 3000;
        if (kvx_ctx_create(&d, &c2) != KVX_OK) { T_FAILF("context: %s", kvx_ctx_error(NULL)); continue; }
        if (spawn_prefill(&pp, 14) != 0) { T_FAILF("the owner process did not start"); kvx_ctx_destroy(c2); continue; }
        kill(pp.pid, SIGSTOP);
        t0 = kvx_t_now();
        st = kvx_peer_add(c2, pp.md, pp.md_len, &peer);
        printf("  kvx_peer_add to a stopped owner: %s after %.1f s: %s\n", kvx_status_name(st), kvx_t_now() - t0,
               st == KVX_OK ? kvx_peer_transport(peer) : kvx_ctx_error(c2));
        if (st == KVX_OK) kvx_peer_remove(peer);       /* a transport that connects without the owner's help */
        else T_ST(st, KVX_ERR_TIMEOUT);
        kill(pp.pid, SIGKILL);                          /* its end of the half-made connection closes now */
        idle(c2, 1500);
        reap(&pp);
        if (spawn_prefill(&next, 15) == 0) {
            peer = NULL;
            T_ST(kvx_peer_add(c2, next.md, next.md_len, &peer), KVX_OK);
            if (peer) kvx_peer_remove(peer);
            reap(&next);
        }
        kvx_ctx_destroy(c2);
    }

    /* kvx_peer_add waits for a new peer to answer; it must not hold the
       context meanwhile: another peer's read posts and completes while the
       add still waits, well before the add gives up. A second add at the
       same time waits for the first rather than taking its waits for its
       own (and the first then holding the context through its wait), and
       connects after it. */
    T_CASE("a peer that never answers kvx_peer_add stalls no other read, with a second add at once: a live owner's read completes while both wait, then the second connects") {
        kvx_layout lay1 = lay_for(1), lay4 = lay_for(4);
        kvx_t_child live, stopped, late;
        void *live_md = NULL, *stopped_md = NULL, *late_md = NULL;
        uint32_t live_len = 0, stopped_len = 0, late_len = 0, hf = 0, hc = 0;
        kvx_ctx_desc d;
        kvx_ctx *c2 = NULL;
        kvx_ex_cache m2;
        kvx_cache_desc cd2;
        kvx_cache *c2cache = NULL;
        kvx_queue *q2 = NULL;
        kvx_peer *lp = NULL;
        kvx_read rd;
        kvx_ticket t;
        pthread_t th1, th2;
        adder a1, a2;
        uint32_t few[8];
        int done1 = 1, done2 = 1, started = 0;
        for (i = 0; i < 8; i++) few[i] = (i * 29u + 3u) % NB;
        memset(&d, 0, sizeof d);
        d.name = "decode4"; d.tp_size = 1; d.log_level = KVX_LOG_OFF; d.timeout_ms = 3000;
        if (kvx_ctx_create(&d, &c2) != KVX_OK) { T_FAILF("context: %s", kvx_ctx_error(NULL)); continue; }
        if (kvx_ex_cache_alloc(&m2, &lay1, 0, 1)) { T_FAILF("cache"); kvx_ctx_destroy(c2); continue; }
        cd2 = kvx_ex_cache_desc(&m2);
        /* Ranks 0, 1 and 2 of one prefill group of 4: 0 added first, 1
           stopped, 2 added while the add of 1 waits. */
        if (kvx_cache_register(c2, &cd2, &c2cache) || kvx_queue_create(c2, NULL, &q2)) T_FAILF("register: %s", kvx_ctx_error(c2));
        else if (!(live_md = kvx_t_owner_spawn(&live, &lay4, 0, 4, 31, &live_len)) ||
                 !(stopped_md = kvx_t_owner_spawn(&stopped, &lay4, 1, 4, 32, &stopped_len)) ||
                 !(late_md = kvx_t_owner_spawn(&late, &lay4, 2, 4, 33, &late_len)))
            T_FAILF("an owner process did not start");
        else if (kvx_peer_add(c2, live_md, live_len, &lp) != KVX_OK)
            T_FAILF("the live owner: %s", kvx_ctx_error(c2));
        else {
            kill(stopped.pid, SIGSTOP);
            memset(&a1, 0, sizeof a1);
            memset(&a2, 0, sizeof a2);
            a1.ctx = a2.ctx = c2;
            a1.md = stopped_md; a1.len = stopped_len;
            a2.md = late_md; a2.len = late_len;
            if (pthread_create(&th1, NULL, add_peer, &a1) != 0) T_FAILF("pthread_create");
            else {
                started = 1;
                usleep(300000);  /* the first add is waiting for the stopped owner by now */
                if (pthread_create(&th2, NULL, add_peer, &a2) != 0) { T_FAILF("pthread_create"); started = 0; }
                usleep(300000);
                kvx_peer_heads(lp, c2cache, 0, &hf, &hc);
                kvx_ex_poison(&m2, 31, few, few, 8, 0, lay1.num_layers, hf, hf + hc);
                memset(&rd, 0, sizeof rd);
                rd.peer = lp; rd.cache = c2cache; rd.local_blocks = few; rd.remote_blocks = few; rd.num_blocks = 8;
                T_ST(kvx_post(q2, &rd, &t), KVX_OK);
                T_ST(kvx_wait(q2, t, 10000), KVX_OK);
                done1 = __atomic_load_n(&a1.done, __ATOMIC_ACQUIRE);
                done2 = started ? __atomic_load_n(&a2.done, __ATOMIC_ACQUIRE) : 1;
                T_EQ(kvx_ex_verify(&m2, 31, few, few, 8, 0, lay1.num_layers, hf, hf + hc, NULL), 0);
                pthread_join(th1, NULL);
                if (started) pthread_join(th2, NULL);
                printf("  the stopped owner's add: %s after %.1f s; the second add: %s after %.1f s; the read completed with %s\n",
                       kvx_status_name(a1.st), a1.took, kvx_status_name(a2.st), a2.took,
                       done1 || done2 ? "an add returned" : "both adds still waiting");
                if (a1.st == KVX_ERR_TIMEOUT) {   /* else the transport connected without the owner's help */
                    T_CHECK(!done1 && !done2);
                    T_CHECK(a2.took > a1.took - 0.6);  /* it waited for the first */
                }
                T_ST(a2.st, KVX_OK);
                if (a2.st == KVX_OK) {            /* and reads */
                    kvx_peer_heads(a2.peer, c2cache, 0, &hf, &hc);
                    kvx_ex_poison(&m2, 33, few, few, 8, 0, lay1.num_layers, hf, hf + hc);
                    rd.peer = a2.peer;
                    T_ST(kvx_post(q2, &rd, &t), KVX_OK);
                    T_ST(kvx_wait(q2, t, 10000), KVX_OK);
                    T_EQ(kvx_ex_verify(&m2, 33, few, few, 8, 0, lay1.num_layers, hf, hf + hc, NULL), 0);
                    kvx_peer_remove(a2.peer);
                }
                if (a1.st == KVX_OK) kvx_peer_remove(a1.peer);
            }
            kvx_peer_remove(lp);
            kill(stopped.pid, SIGKILL);
        }
        if (late_md) kvx_t_finish(&late);
        if (stopped_md) kvx_t_finish(&stopped);
        if (live_md) kvx_t_finish(&live);
        free(late_md);
        free(stopped_md);
        free(live_md);
        if (q2) kvx_queue_destroy(q2);
        if (c2cache) kvx_cache_deregister(c2cache);
        kvx_ctx_destroy(c2);
        kvx_ex_cache_free(&m2);
    }

    T_CASE("the context serves a new peer after the failures") {
        prefill_proc pp;
        kvx_peer *peer;
        kvx_read rd;
        kvx_ticket t;
        if (spawn_prefill(&pp, 13) != 0) { T_FAILF("the owner process did not start"); continue; }
        T_ST(kvx_peer_add(ctx, pp.md, pp.md_len, &peer), KVX_OK);
        kvx_ex_poison(&m, 13, ids, ids, LONG_NB, 0, lay.num_layers, 0, lay.num_heads);
        memset(&rd, 0, sizeof rd);
        rd.peer = peer; rd.cache = cache; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = LONG_NB;
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 20000), KVX_OK);
        T_EQ(kvx_ex_verify(&m, 13, ids, ids, LONG_NB, 0, lay.num_layers, 0, lay.num_heads, NULL), 0);
        kvx_peer_remove(peer);
        reap(&pp);
    }

    kvx_queue_destroy(q);
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
}

/* A reader of the TP layout: an owner of two killed while the other serves,
   a restart, reads canceled by removing the owner or destroying the queue. */
static void tp_reads(void) {
    kvx_layout lay1 = lay_for(1);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx *D = kvx_t_ctx("decode", 0, 1, 0);
    kvx_cache *dc;
    uint32_t ids[NB], i;
    int sw;

    for (i = 0; i < NB; i++) ids[i] = i;
    if (kvx_ex_cache_alloc(&m, &lay1, 0, 1)) exit(1);
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(D, &cd, &dc)) exit(1);
    /* These cases stop or kill the owner a read depends on, and need one that
       serves its reads itself. A one-sided transport (libfabric shm) still
       reads a stopped owner, and an shm owner killed while it holds its
       region's lock can stall a reader inside fi_read past any deadline (a
       libfabric limit): there they are skipped. */
    sw = owner_serves_here(D);

    T_CASE("prefill killed mid-read: that peer's read fails in time, the other peer's completes") {
        if (!sw) { T_SKIP("the owner does not serve its reads itself here"); continue; }
        kvx_t_child p0, p1;
        uint32_t l0, l1;
        void *m0 = spawn_owner(&p0, 0, 2, 21, &l0), *m1 = spawn_owner(&p1, 1, 2, 21, &l1);
        kvx_peer *a = NULL, *b = NULL;
        kvx_queue *q;
        kvx_read r0, r1;
        kvx_ticket t0, t1;
        kvx_status s0, s1;
        double st, el;
        T_CHECK(m0 && m1);
        T_ST(kvx_peer_add(D, m0, l0, &a), KVX_OK);
        T_ST(kvx_peer_add(D, m1, l1, &b), KVX_OK);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        if (a && b) {
            kvx_ex_poison(&m, 21, ids, ids, NB, 0, lay1.num_layers, 2, 4);
            r0 = kvx_t_read(a, dc, ids, NB, 4000);
            r1 = kvx_t_read(b, dc, ids, NB, 4000);
            st = kvx_t_now();
            T_ST(kvx_post(q, &r0, &t0), KVX_OK);
            T_ST(kvx_post(q, &r1, &t1), KVX_OK);
            kvx_progress(D);
            kill(p0.pid, SIGKILL);
            s0 = kvx_wait(q, t0, 10000);
            el = kvx_t_now() - st;
            s1 = kvx_wait(q, t1, 10000);
            printf("  killed peer: %s after %.3f s (%s)\n", kvx_status_name(s0), el, kvx_ctx_error(D));
            T_CHECK(s0 == KVX_ERR_PEER || s0 == KVX_ERR_TIMEOUT || s0 == KVX_OK);
            T_CHECK(el < 4.6);
            T_ST(s1, KVX_OK);
            T_EQ(kvx_ex_verify(&m, 21, ids, ids, NB, 0, lay1.num_layers, 2, 4, NULL), 0);
        }
        kvx_queue_destroy(q);
        kvx_peer_remove(a);
        kvx_peer_remove(b);
        kvx_t_kill(&p0);
        kvx_t_finish(&p1);
        free(m0); free(m1);
    }

    T_CASE("peer restart: old epoch refused, new accepted, reads in flight to the old one end KVX_ERR_PEER") {
        if (!sw) { T_SKIP("the owner does not serve its reads itself here"); continue; }
        kvx_t_child p, p2;
        uint32_t l, l2;
        void *m1 = spawn_owner(&p, 0, 1, 31, &l), *m2;
        kvx_peer *a = NULL, *a2 = NULL, *x = NULL;
        kvx_queue *q;
        kvx_read r;
        kvx_ticket t;
        T_ST(kvx_peer_add(D, m1, l, &a), KVX_OK);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        kill(p.pid, SIGSTOP);  /* reads stall: the owner serves them */
        r = kvx_t_read(a, dc, ids, NB, 8000);
        T_ST(kvx_post(q, &r, &t), KVX_OK);
        m2 = spawn_owner(&p2, 0, 1, 32, &l2);   /* the restarted process */
        T_ST(kvx_peer_add(D, m2, l2, &a2), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_ERR_PEER);
        T_HAS(kvx_ctx_error(D), "restarted");
        T_ST(kvx_peer_add(D, m1, l, &x), KVX_ERR_MISMATCH);   /* stale keys */
        T_HAS(kvx_ctx_error(D), "older than");
        kvx_ex_poison(&m, 32, ids, ids, NB, 0, lay1.num_layers, 0, HEADS);
        r = kvx_t_read(a2, dc, ids, NB, 8000);
        T_ST(kvx_post(q, &r, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 10000), KVX_OK);
        T_EQ(kvx_ex_verify(&m, 32, ids, ids, NB, 0, lay1.num_layers, 0, HEADS, NULL), 0);
        kvx_queue_destroy(q);
        kvx_peer_remove(a); kvx_peer_remove(a2);
        kvx_t_kill(&p); kvx_t_finish(&p2);
        free(m1); free(m2);
    }

    T_CASE("cancel by kvx_peer_remove: reads end KVX_ERR_CANCELED, nothing lands afterwards") {
        if (!sw) { T_SKIP("the owner does not serve its reads itself here"); continue; }
        kvx_t_child p;
        uint32_t l;
        void *md = spawn_owner(&p, 0, 1, 41, &l);
        kvx_peer *a = NULL;
        kvx_queue *q;
        kvx_read r;
        kvx_ticket t[4];
        kvx_completion comp[8];
        int n, k, canceled = 0;
        double st;
        T_ST(kvx_peer_add(D, md, l, &a), KVX_OK);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        kill(p.pid, SIGSTOP);
        r = kvx_t_read(a, dc, ids, NB, 20000);
        for (k = 0; k < 4; k++) T_ST(kvx_post(q, &r, &t[k]), KVX_OK);
        kvx_progress(D);
        st = kvx_t_now();
        kvx_peer_remove(a);
        printf("  kvx_peer_remove with 4 reads in flight took %.3f s\n", kvx_t_now() - st);
        n = kvx_poll(q, comp, 8);
        for (k = 0; k < n; k++) canceled += comp[k].status == KVX_ERR_CANCELED;
        T_EQ(n, 4);
        T_EQ(canceled, 4);
        memset(m.mem, 0xA7, m.mem_bytes);
        kill(p.pid, SIGCONT);
        idle(D, 1000);
        T_EQ(kvx_poll(q, comp, 8), 0);
        T_CHECK(canary_intact(&m, 0xA7));
        kvx_queue_destroy(q);
        kvx_t_finish(&p);
        free(md);
    }

    T_CASE("cancel by kvx_queue_destroy: returns within its grace, nothing lands afterwards, peer usable") {
        if (!sw) { T_SKIP("the owner does not serve its reads itself here"); continue; }
        kvx_t_child p;
        uint32_t l;
        void *md = spawn_owner(&p, 0, 1, 51, &l);
        kvx_peer *a = NULL;
        kvx_queue *q, *q2;
        kvx_read r;
        kvx_ticket t;
        double st, el;
        int k;
        T_ST(kvx_peer_add(D, md, l, &a), KVX_OK);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        kill(p.pid, SIGSTOP);
        r = kvx_t_read(a, dc, ids, NB, 20000);
        for (k = 0; k < 4; k++) T_ST(kvx_post(q, &r, &t), KVX_OK);
        kvx_progress(D);
        st = kvx_t_now();
        kvx_queue_destroy(q);
        el = kvx_t_now() - st;
        printf("  kvx_queue_destroy with 4 reads in flight took %.3f s\n", el);
        T_CHECK(el < 2.5);
        memset(m.mem, 0xA7, m.mem_bytes);
        kill(p.pid, SIGCONT);
        idle(D, 1000);
        T_CHECK(canary_intact(&m, 0xA7));
        T_ST(kvx_queue_create(D, NULL, &q2), KVX_OK);
        kvx_ex_poison(&m, 51, ids, ids, NB, 0, lay1.num_layers, 0, HEADS);
        r = kvx_t_read(a, dc, ids, NB, 10000);
        T_ST(kvx_post(q2, &r, &t), KVX_OK);
        T_ST(kvx_wait(q2, t, 10000), KVX_OK);
        T_EQ(kvx_ex_verify(&m, 51, ids, ids, NB, 0, lay1.num_layers, 0, HEADS, NULL), 0);
        kvx_queue_destroy(q2);
        kvx_peer_remove(a);
        kvx_t_finish(&p);
        free(md);
    }

    kvx_ctx_destroy(D);
    kvx_ex_cache_free(&m);
}

int main(int argc, char **argv) {
    if (kvx_t_is_child(argc, argv, "owner")) return kvx_t_owner_main(argv);
    signal(SIGPIPE, SIG_IGN);
    long_reads();
    tp_reads();
    return kvx_t_summary();
}
