/*
    test_faults -- a peer that stops answering, a peer killed mid-read: errors
    within the deadline, never a hang, and no byte of a failed read lands after
    the failure was reported. Run over the transport UCX_TLS (UCX) or
    FI_PROVIDER (libfabric) selects.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"

#include <signal.h>
#include <sys/wait.h>

#define NB 256u

static kvx_layout test_layout(void) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = 4;
    l.num_blocks = NB;
    l.block_tokens = 16;
    l.num_heads = 8;
    l.head_dim = 64;
    l.elem_bytes = 2;   /* 16 KiB blocks: a full read is 32 MiB */
    return l;
}

typedef struct prefill_proc { pid_t pid; int ctl; void *md; uint32_t md_len; } prefill_proc;

/* The prefill role, in a fresh process (exec'd: UCX does not survive a fork
   of an initialised context): fills every block, writes its metadata to
   md_fd, serves reads from its progress thread until ctl_fd closes. */
static int prefill_main(uint64_t seed, int md_fd, int ctl_fd) {
    kvx_layout lay = test_layout();
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx_desc d;
    kvx_ctx *ctx;
    kvx_cache *c;
    size_t len = 0;
    uint32_t i, ids[NB];
    void *md;
    char b;
    memset(&d, 0, sizeof d);
    d.name = "prefill";
    d.progress_thread = 1;
    d.log_level = KVX_LOG_OFF;
    if (kvx_ctx_create(&d, &ctx) || kvx_ex_cache_alloc(&m, &lay, 0, 1)) return 3;
    for (i = 0; i < NB; i++) ids[i] = i;
    kvx_ex_fill(&m, seed, ids, NB);
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &c)) return 4;
    kvx_metadata(ctx, NULL, &len);
    md = malloc(len);
    kvx_metadata(ctx, md, &len);
    i = (uint32_t)len;
    if (write(md_fd, &i, 4) != 4 || write(md_fd, md, len) != (ssize_t)len) return 5;
    while (read(ctl_fd, &b, 1) > 0) {}
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    free(md);
    return 0;
}

static int spawn_prefill(prefill_proc *pp, uint64_t seed) {
    int mdp[2], ctl[2];
    if (pipe(mdp) || pipe(ctl)) return -1;
    pp->pid = fork();
    if (pp->pid == 0) {
        char s[32], a[16], b[16];
        close(mdp[0]); close(ctl[1]);
        snprintf(s, sizeof s, "%llu", (unsigned long long)seed);
        snprintf(a, sizeof a, "%d", mdp[1]);
        snprintf(b, sizeof b, "%d", ctl[0]);
        kvx_t_child_no_leak_check();  /* some are stopped */
        execl("/proc/self/exe", "test_faults", "prefill", s, a, b, (char *)NULL);
        _exit(127);
    }
    close(mdp[1]); close(ctl[0]);
    pp->ctl = ctl[1];
    if (read(mdp[0], &pp->md_len, 4) != 4) return -1;
    pp->md = malloc(pp->md_len);
    if (read(mdp[0], pp->md, pp->md_len) != (ssize_t)pp->md_len) return -1;
    close(mdp[0]);
    return 0;
}

static void reap(prefill_proc *pp) {
    int st;
    close(pp->ctl);
    kill(pp->pid, SIGCONT);
    waitpid(pp->pid, &st, 0);
    free(pp->md);
}

static int canary_intact(const uint8_t *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) if (p[i] != 0xC5) return 0;
    return 1;
}

int main(int argc, char **argv) {
    kvx_layout lay = test_layout();
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx_desc d;
    kvx_ctx *ctx;
    kvx_cache *cache;
    kvx_queue *q;
    uint32_t ids[NB], i;
    const char *tls = getenv("UCX_TLS");

    if (argc == 5 && !strcmp(argv[1], "prefill")) return prefill_main((uint64_t)atoll(argv[2]), atoi(argv[3]), atoi(argv[4]));
    for (i = 0; i < NB; i++) ids[i] = i;
    memset(&d, 0, sizeof d);
    d.name = "decode";
    d.log_level = KVX_LOG_OFF;
    if (kvx_ctx_create(&d, &ctx) || kvx_ex_cache_alloc(&m, &lay, 0, 1)) return 1;
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &cache) || kvx_queue_create(ctx, NULL, &q)) return 1;
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
        T_CHECK(spawn_prefill(&pp, 11) == 0);
        T_ST(kvx_peer_add(ctx, pp.md, pp.md_len, &peer), KVX_OK);
        printf("  peer transport: %s\n", kvx_peer_transport(peer));
        served_by_owner = strstr(kvx_peer_transport(peer), "(sw)") != NULL;
        kill(pp.pid, SIGSTOP);
        memset(&rd, 0, sizeof rd);
        rd.peer = peer; rd.cache = cache; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = NB;
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
            T_CHECK(canary_intact(m.mem, m.mem_bytes));
            /* ... and the peer is reconnected on demand. */
            kvx_ex_poison(&m, 11, ids, ids, 8, 0, lay.num_layers, 0, lay.num_heads);
            rd.num_blocks = 8;
            T_ST(kvx_post(q, &rd, &t), KVX_OK);
            T_ST(kvx_wait(q, t, 10000), KVX_OK);
            T_EQ(kvx_ex_verify(&m, 11, ids, ids, 8, 0, lay.num_layers, 0, lay.num_heads, NULL), 0);
        } else {
            printf("  stopped peer read over %s in %.3f s: %s\n", kvx_peer_transport(peer), el, kvx_status_name(st));
            T_ST(st, KVX_OK);
            T_EQ(kvx_ex_verify(&m, 11, ids, ids, NB, 0, lay.num_layers, 0, lay.num_heads, NULL), 0);
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
        T_CHECK(spawn_prefill(&pp, 12) == 0);
        T_ST(kvx_peer_add(ctx, pp.md, pp.md_len, &peer), KVX_OK);
        memset(&rd, 0, sizeof rd);
        rd.peer = peer; rd.cache = cache; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = NB;
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

    T_CASE("the context serves a new peer after the failures") {
        prefill_proc pp;
        kvx_peer *peer;
        kvx_read rd;
        kvx_ticket t;
        T_CHECK(spawn_prefill(&pp, 13) == 0);
        T_ST(kvx_peer_add(ctx, pp.md, pp.md_len, &peer), KVX_OK);
        kvx_ex_poison(&m, 13, ids, ids, NB, 0, lay.num_layers, 0, lay.num_heads);
        memset(&rd, 0, sizeof rd);
        rd.peer = peer; rd.cache = cache; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = NB;
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 20000), KVX_OK);
        T_EQ(kvx_ex_verify(&m, 13, ids, ids, NB, 0, lay.num_layers, 0, lay.num_heads, NULL), 0);
        kvx_peer_remove(peer);
        reap(&pp);
    }

    kvx_queue_destroy(q);
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    return kvx_t_summary();
}
