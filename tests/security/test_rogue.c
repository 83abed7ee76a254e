/*
    test_rogue -- a process that can reach an owner's port but lacks its
    metadata reads nothing, writes nothing and stops nothing, and what it
    can make the owner hold is bounded. The attacks are rogue_ucx.c and
    rogue_ofi.c beside this file: raw UCX and libfabric calls, not kvx's
    API. This binary is the owner (re-executed in a role) and, in the
    parent, a real reader that reads while the rogue attacks and checks
    every byte it reads.

    What the rogue is given: the owner's transport address, which is what a
    scan of its ports yields (the UCX worker address carries its IP and port,
    the libfabric name its socket address), its pid, and the address of the
    memory it attacks (a real attacker would have to guess those; handing
    them over makes the test about keys and secrets, not luck). Never the
    secret, except in the cases that model a holder of the metadata who
    misbehaves (stops taking replies, dies mid-burst), which test bounds.

    $KVX_ROGUE names the rogue of this build's transport (make test passes
    build/rogue_ucx, build/ucx122/rogue_ucx or build/rogue_ofi); without it
    the cases skip. Over UCX_TLS=tcp and FI_PROVIDER=tcp, where the owner's
    CPU serves reads, so a flood reaches the code that serves them.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include <dirent.h>
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"
#include "../lib/kvx_owner.h"

#define CANARY "KVX-OWNER-CANARY:never-registered:0123456789"
#define CANARY_BYTES 64u
#define OWNER_TIMEOUT_MS 3000u

/* What the owner tells its parent once it is up. */
typedef struct owner_info { uint64_t canary, base, bytes; uint32_t pid; } owner_info;

static uint64_t rss_kb(void) {
    char line[256];
    uint64_t kb = 0;
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = strtoull(line + 6, NULL, 10);
    if (f) fclose(f);
    return kb;
}

/* The owner: a cache of seed, a canary it never registers, a progress
   thread, warnings on (to its log file, first on the pipe); then commands
   from the parent until the pipe closes. */
static int role_owner(uint64_t seed, int in, int out) {
    kvx_layout lay = lay_for(1);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_cache *c;
    kvx_ctx *ctx;
    kvx_ctx_desc d;
    char *canary = (char *)calloc(1, CANARY_BYTES), logpath[256];
    uint32_t ids[NB], i, n;
    owner_info oi;
    size_t len;
    void *md;
    uint8_t cmd;
    if (kvx_t_read_all(in, logpath, sizeof logpath)) return 2;
    logpath[sizeof logpath - 1] = 0;
    if (logpath[0] && !freopen(logpath, "w", stderr)) return 2;
    setvbuf(stderr, NULL, _IOLBF, 0);
    if (logpath[0]) dup2(fileno(stderr), 1);           /* UCX logs to stdout */
    strcpy(canary, CANARY);
    memset(&d, 0, sizeof d);
    d.name = "prefill"; d.tp_size = 1; d.progress_thread = 1; d.timeout_ms = OWNER_TIMEOUT_MS; d.log_level = KVX_LOG_WARN;
    if (kvx_ctx_create(&d, &ctx) != KVX_OK) { fprintf(stderr, "owner: %s\n", kvx_ctx_error(NULL)); return 3; }
    if (kvx_ex_cache_alloc(&m, &lay, 0, 1)) return 3;
    for (i = 0; i < NB; i++) ids[i] = i;
    kvx_ex_fill(&m, seed, ids, NB);
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &c)) return 4;
    md = kvx_t_metadata(ctx, &len);
    n = (uint32_t)len;
    memset(&oi, 0, sizeof oi);
    oi.canary = (uint64_t)(uintptr_t)canary; oi.base = (uint64_t)(uintptr_t)m.mem; oi.bytes = m.mem_bytes; oi.pid = (uint32_t)getpid();
    if (kvx_t_write_all(out, &n, 4) || kvx_t_write_all(out, md, len) || kvx_t_write_all(out, &oi, sizeof oi)) return 5;
    while (read(in, &cmd, 1) == 1) {
        if (cmd == 'c') {                                  /* the canary's bytes */
            if (kvx_t_write_all(out, canary, CANARY_BYTES)) break;
        } else if (cmd == 'm') {                           /* resident memory, kB */
            uint64_t kb = rss_kb();
            if (kvx_t_write_all(out, &kb, 8)) break;
        } else if (cmd == 's') {                           /* counters */
            kvx_stats s;
            uint64_t v[3];
            kvx_stats(ctx, &s);
            v[0] = s.messages_dropped; v[1] = s.notifications_received; v[2] = s.notifications_dropped;
            if (kvx_t_write_all(out, v, sizeof v)) break;
        } else if (cmd == 'e') {                           /* expect id within ms */
            uint64_t id;
            uint32_t ms;
            int32_t st;
            if (kvx_t_read_all(in, &id, 8) || kvx_t_read_all(in, &ms, 4)) break;
            st = (int32_t)kvx_notify_expect(ctx, id, ms);
            if (kvx_t_write_all(out, &st, 4)) break;
        } else if (cmd == 'n') {                           /* notifications that come within ms (at most 64) */
            kvx_notification nt[64];
            int64_t rec[64][3];
            uint32_t ms, got = 0, k;
            double t0 = kvx_t_now();
            if (kvx_t_read_all(in, &ms, 4)) break;
            while (got < 64 && kvx_t_now() - t0 < ms / 1000.0) {
                int g = kvx_notifications(ctx, nt + got, (int)(64 - got));
                got += (uint32_t)(g > 0 ? g : 0);
                if (g <= 0) usleep(5000);
            }
            for (k = 0; k < got; k++) { rec[k][0] = (int64_t)nt[k].id; rec[k][1] = nt[k].status; rec[k][2] = nt[k].peer_rank; }
            if (kvx_t_write_all(out, &got, 4) || (got && kvx_t_write_all(out, rec, got * sizeof rec[0]))) break;
        } else if (cmd == 'd') {                           /* deregister (how long it took, us) and register again */
            double t0 = kvx_t_now();
            uint64_t us;
            kvx_cache_deregister(c);
            us = (uint64_t)((kvx_t_now() - t0) * 1e6);
            cd = kvx_ex_cache_desc(&m);
            if (kvx_cache_register(ctx, &cd, &c)) return 6;
            free(md);
            md = kvx_t_metadata(ctx, &len);
            n = (uint32_t)len;
            if (kvx_t_write_all(out, &us, 8) || kvx_t_write_all(out, &n, 4) || kvx_t_write_all(out, md, len)) break;
        }
    }
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    free(md);
    free(canary);
    return 0;
}

typedef struct owner { kvx_t_child ch; owner_info oi; void *md; uint32_t len; char log[256]; } owner;

static int owner_start(owner *o, uint64_t seed, const char *dir, int k) {
    memset(o, 0, sizeof *o);
    snprintf(o->log, sizeof o->log, "%s/owner%d.log", dir, k);
    o->ch = kvx_t_spawn("owner", 0, 1, seed);
    if (kvx_t_write_all(o->ch.wr, o->log, sizeof o->log) || kvx_t_read_all(o->ch.rd, &o->len, 4)) return -1;
    o->md = malloc(o->len);
    return kvx_t_read_all(o->ch.rd, o->md, o->len) || kvx_t_read_all(o->ch.rd, &o->oi, sizeof o->oi) ? -1 : 0;
}

/* Done with the owner: it must end by itself with status 0 (a crash, or
   valgrind's errors, show there). */
static void owner_finish(owner *o) {
    int st = 0;
    close(o->ch.wr); close(o->ch.rd);
    if (waitpid(o->ch.pid, &st, 0) != o->ch.pid) return;
    if (WIFSIGNALED(st)) kvx_t_died((long)o->ch.pid, WTERMSIG(st), strsignal(WTERMSIG(st)));
    else if (WEXITSTATUS(st)) {
        char line[512];
        FILE *f = fopen(o->log, "r");
        T_FAILF("the owner exited with status %d; its log:", WEXITSTATUS(st));
        while (f && fgets(line, sizeof line, f)) printf("  | %s", line);
        if (f) fclose(f);
    }
}

/* The owner's canary as it is now; "" if the owner no longer answers. */
static void owner_canary(owner *o, char *buf) {
    uint8_t c = 'c';
    memset(buf, 0, CANARY_BYTES + 1);
    if (kvx_t_write_all(o->ch.wr, &c, 1) || kvx_t_read_all(o->ch.rd, buf, CANARY_BYTES)) buf[0] = 0;
}

static uint64_t owner_rss(owner *o) {
    uint8_t c = 'm';
    uint64_t kb = 0;
    if (kvx_t_write_all(o->ch.wr, &c, 1) || kvx_t_read_all(o->ch.rd, &kb, 8)) return 0;
    return kb;
}

/* [messages_dropped, notifications_received, notifications_dropped] */
static int owner_stats(owner *o, uint64_t v[3]) {
    uint8_t c = 's';
    memset(v, 0, 3 * sizeof *v);
    return kvx_t_write_all(o->ch.wr, &c, 1) || kvx_t_read_all(o->ch.rd, v, 3 * sizeof *v) ? -1 : 0;
}

static int owner_expect(owner *o, uint64_t id, uint32_t ms) {
    uint8_t c = 'e';
    int32_t st = -1;
    if (kvx_t_write_all(o->ch.wr, &c, 1) || kvx_t_write_all(o->ch.wr, &id, 8) || kvx_t_write_all(o->ch.wr, &ms, 4) ||
        kvx_t_read_all(o->ch.rd, &st, 4)) return -1;
    return st;
}

/* Notifications within ms: count, and each (id, status, rank) in rec. */
static int owner_notes(owner *o, uint32_t ms, int64_t rec[64][3]) {
    uint8_t c = 'n';
    uint32_t got = 0;
    if (kvx_t_write_all(o->ch.wr, &c, 1) || kvx_t_write_all(o->ch.wr, &ms, 4) || kvx_t_read_all(o->ch.rd, &got, 4)) return -1;
    if (got > 64 || (got && kvx_t_read_all(o->ch.rd, rec, got * sizeof rec[0]))) return -1;
    return (int)got;
}

/* How many lines of the owner's log hold s. */
static int log_count(const char *path, const char *s) {
    char line[2048];
    int n = 0;
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f)) n += strstr(line, s) != NULL;
    if (f) fclose(f);
    return n;
}

/*--- the rogue ----------------------------------------------------------------*/

typedef struct rogue { pid_t pid; int fd; char out[16384]; size_t n; } rogue;

/* A context of this process the rogue talks to (a reader without a progress
   thread): progressed while waiting for the rogue, so it can connect. */
static kvx_ctx *rogue_target;

/* Start $KVX_ROGUE with these arguments (NULL-ended), its stdout to a pipe. */
static int rogue_start(rogue *r, const char *const *args) {
    const char *path = getenv("KVX_ROGUE");
    const char *argv[16];
    int p[2], i;
    memset(r, 0, sizeof *r);
    if (!path || pipe(p)) return -1;
    argv[0] = path;
    for (i = 0; args[i] && i < 14; i++) argv[i + 1] = args[i];
    argv[i + 1] = NULL;
    fflush(stdout);
    if ((r->pid = fork()) == 0) {
        dup2(p[1], 1);
        close(p[0]); close(p[1]);
        execv(path, (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    close(p[1]);
    r->fd = p[0];
    return r->pid > 0 ? 0 : -1;
}

/* Its output until it ends (at most secs; then it is killed): its exit status, -1 if killed. */
static int rogue_end(rogue *r, double secs) {
    double t0 = kvx_t_now();
    int st = 0;
    for (;;) {
        struct pollfd pf;
        ssize_t k;
        pf.fd = r->fd; pf.events = POLLIN; pf.revents = 0;
        if (kvx_t_now() - t0 > secs) { kill(r->pid, SIGKILL); waitpid(r->pid, &st, 0); close(r->fd); return -1; }
        if (rogue_target) kvx_progress(rogue_target);
        if (poll(&pf, 1, rogue_target ? 2 : 100) <= 0) continue;
        if ((k = read(r->fd, r->out + r->n, sizeof r->out - 1 - r->n)) <= 0) break;
        r->n += (size_t)k;
    }
    r->out[r->n] = 0;
    close(r->fd);
    waitpid(r->pid, &st, 0);
    printf("%s", r->out);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Its output until it has printed s (at most secs): 1 if it did. */
static int rogue_wait_for(rogue *r, const char *s, double secs) {
    double t0 = kvx_t_now();
    while (kvx_t_now() - t0 < secs) {
        struct pollfd pf;
        ssize_t k;
        r->out[r->n] = 0;
        if (strstr(r->out, s)) return 1;
        pf.fd = r->fd; pf.events = POLLIN; pf.revents = 0;
        if (poll(&pf, 1, 100) <= 0) continue;
        if ((k = read(r->fd, r->out + r->n, sizeof r->out - 1 - r->n)) <= 0) break;
        r->n += (size_t)k;
    }
    r->out[r->n] = 0;
    return strstr(r->out, s) != NULL;
}

static int rogue_run(const char *const *args, rogue *r, double secs) {
    if (rogue_start(r, args)) return -1;
    return rogue_end(r, secs);
}

static void hex(char *out, const uint8_t *b, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", b[i]);
}

/* What a holder of the secret names the owner's region by on the rogue's
   command line: SECRET_HEX, RADDR_HEX, REGION_LEN. */
static void region_args(const uint8_t secret[16], uint64_t base, uint64_t bytes, char sx[40], char rx[24], char len[24]) {
    hex(sx, secret, 16);
    snprintf(rx, 24, "%llx", (unsigned long long)base);
    snprintf(len, 24, "%llu", (unsigned long long)bytes);
}

/* The transport address a peer's metadata carries, to a file for the rogue:
   UCX's active-message worker, or libfabric's endpoint name. */
static int address_file(kvx_ctx *D, const void *md, size_t len, const char *path, uint8_t secret[16]) {
    kvx_peer *p = (kvx_peer *)kvx__calloc(1, sizeof *p);
    const uint8_t *a = NULL;
    uint32_t alen = 0, ver;
    FILE *f;
    p->ctx = D;
    if (kvx__md_parse(D, (const uint8_t *)md, len, p) != KVX_OK) { kvx__peer_free(p); return -1; }
    if (secret) memcpy(secret, p->secret, 16);
#if defined(KVX_UCX)
    if (D->be_ops->kind == KVX_BACKEND_UCX) {
        kvx__ucx_addr_msg m;
        if (kvx__ucx_addr_read(p->addr, p->addr_len, &m, &ver) == KVX__WIRE_OK) { a = m.am; alen = m.am_len; }
    }
#endif
#if defined(KVX_OFI)
    if (D->be_ops->kind == KVX_BACKEND_OFI) {
        kvx__ofi_addr_msg m;
        if (kvx__ofi_addr_read(p->addr, p->addr_len, &m, &ver) == KVX__WIRE_OK) { a = m.name; alen = m.name_len; }
    }
#endif
    (void)ver;
    f = a ? fopen(path, "wb") : NULL;
    if (f) { fwrite(a, 1, alen, f); fclose(f); }
    kvx__peer_free(p);
    return f ? 0 : -1;
}

/*--- the real reader ------------------------------------------------------------*/

typedef struct reader { kvx_ctx *ctx; kvx_ex_cache m; kvx_cache *c; kvx_queue *q; kvx_peer *p; } reader;

static int reader_open(reader *r, const owner *o) {
    kvx_layout lay = lay_for(1);
    kvx_cache_desc cd;
    memset(r, 0, sizeof *r);
    r->ctx = kvx_t_ctx("decode", 0, 1, 0);
    if (kvx_ex_cache_alloc(&r->m, &lay, 0, 1)) return -1;
    cd = kvx_ex_cache_desc(&r->m);
    if (kvx_cache_register(r->ctx, &cd, &r->c) || kvx_queue_create(r->ctx, NULL, &r->q)) return -1;
    if (kvx_peer_add(r->ctx, o->md, o->len, &r->p) != KVX_OK) { printf("  reader: %s\n", kvx_ctx_error(r->ctx)); return -1; }
    return 0;
}

static void reader_close(reader *r) {
    kvx_ctx_destroy(r->ctx);
    kvx_ex_cache_free(&r->m);
}

/* Every thread of pid stopped (state T in /proc/PID/task/TID/stat), within
   ms: kill(SIGSTOP) returns before the signal has reached them all. */
static int all_stopped(pid_t pid, int ms) {
    char path[64], line[256];
    int waited;
    for (waited = 0; waited <= ms; waited++) {
        DIR *d;
        struct dirent *e;
        int threads = 0, stopped = 0;
        snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
        if (!(d = opendir(path))) return 0;
        while ((e = readdir(d)) != NULL) {
            FILE *f;
            const char *st;
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "/proc/%d/task/%.16s/stat", (int)pid, e->d_name);
            if (!(f = fopen(path, "r"))) continue;
            threads++;
            if (fgets(line, sizeof line, f) && (st = strrchr(line, ')')) != NULL && (st[2] == 'T' || st[2] == 't')) stopped++;
            fclose(f);
        }
        closedir(d);
        if (threads && stopped == threads) return 1;
        usleep(1000);
    }
    return 0;
}

/* n reads of every block, each poisoned first and checked byte by byte
   after: how many failed or brought a wrong byte. */
static int reader_check(reader *r, uint64_t seed, int n, uint32_t timeout_ms) {
    uint32_t ids[NB], i;
    int k, bad = 0;
    for (i = 0; i < NB; i++) ids[i] = i;
    for (k = 0; k < n; k++) {
        kvx_read rd;
        kvx_ticket t;
        kvx_status st;
        kvx_ex_poison(&r->m, seed, ids, ids, NB, 0, r->m.lay.num_layers, 0, HEADS);
        rd = kvx_t_read(r->p, r->c, ids, NB, timeout_ms);
        if ((st = kvx_post(r->q, &rd, &t)) == KVX_OK) st = kvx_wait(r->q, t, timeout_ms + 5000);
        if (st != KVX_OK) { if (!bad++) printf("  a real read: %s: %s\n", kvx_status_name(st), kvx_ctx_error(r->ctx)); continue; }
        if (kvx_ex_verify(&r->m, seed, ids, ids, NB, 0, r->m.lay.num_layers, 0, HEADS, NULL)) bad++;
    }
    return bad;
}

int main(int argc, char **argv) {
    char dir[] = "/tmp/kvx-rogue-XXXXXX", addr[320], canary[CANARY_BYTES + 1], hx[64];
    int ucx, k;
    kvx_ctx *probe;

    if (kvx_t_is_child(argc, argv, "owner")) return role_owner((uint64_t)atoll(argv[4]), atoi(argv[5]), atoi(argv[6]));
    signal(SIGPIPE, SIG_IGN);
    if (!mkdtemp(dir)) return 3;
    snprintf(addr, sizeof addr, "%s/address", dir);
    probe = kvx_t_ctx("probe", 0, 1, 0);
    ucx = probe->be_ops->kind == KVX_BACKEND_UCX;
    kvx_ctx_destroy(probe);
    if (!getenv("KVX_ROGUE")) { printf("skip every case: $KVX_ROGUE names no rogue\n"); return 77; }

    T_CASE(ucx ? "UCX's own get and put of memory the owner never registered fail; the canary is unchanged, the owner lives and serves"
               : "libfabric reads and writes with guessed keys fail, the old scheme's (pid << 24 | n) and random; the owner serves a real reader") {
        owner o;
        reader r;
        rogue g;
        char pid[16], base[24], off[24];
        if (owner_start(&o, 11, dir, 0) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, NULL);
        if (ucx) {
            const char *a[] = {"rma", addr, hx, "44", NULL};
            snprintf(hx, sizeof hx, "%llx", (unsigned long long)o.oi.canary);
            T_EQ(rogue_run(a, &g, 40), 0);
            T_CHECK(!strstr(g.out, "get returned:"));
        } else {
            const char *a[] = {"read", addr, base, off, "4096", pid, "300", NULL};
            const char *w[] = {"write", addr, base, off, "4096", pid, "300", NULL};
            snprintf(base, sizeof base, "%llx", (unsigned long long)o.oi.base);
            snprintf(off, sizeof off, "%d", 8192);
            snprintf(pid, sizeof pid, "%u", o.oi.pid);
            T_EQ(rogue_run(a, &g, 120), 0);
            T_HAS(g.out, ", 0 succeeded");
            T_EQ(rogue_run(w, &g, 120), 0);
            T_HAS(g.out, ", 0 succeeded");
        }
        owner_canary(&o, canary);
        T_CHECK(!strcmp(canary, CANARY));                 /* unchanged, and the owner answered */
        T_EQ(reader_check(&r, 11, 2, 5000), 0);           /* every byte of the cache, as filled */
        reader_close(&r);
        owner_finish(&o);
        T_EQ(log_count(o.log, "not returned to mpool"), 0);
        free(o.md);
    }

    T_CASE("requests without the secret get no answer and are counted; a real reader is served byte-true meanwhile") {
        owner o;
        reader r;
        rogue g;
        uint64_t v0[3], v1[3], kb0, kb1;
        char span[24], count[16], id0[24];
        int bad;
        if (owner_start(&o, 12, dir, 1) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, NULL);
        owner_stats(&o, v0);
        kb0 = owner_rss(&o);
        if (ucx) {
            const char *a[] = {"probe", addr, hx, span, count, NULL};
            snprintf(hx, sizeof hx, "%llx", (unsigned long long)(o.oi.base > (1u << 20) ? o.oi.base - (1u << 20) : 0));
            snprintf(span, sizeof span, "%llu", (unsigned long long)o.oi.bytes + (2u << 20));
            snprintf(count, sizeof count, "%d", 20000);
            T_EQ(rogue_start(&g, a), 0);
        } else {
            const char *a[] = {"notify", addr, count, id0, NULL};
            snprintf(count, sizeof count, "%d", 5000);
            snprintf(id0, sizeof id0, "%d", 1);
            T_EQ(rogue_start(&g, a), 0);
        }
        bad = reader_check(&r, 12, 8, 10000);             /* while the rogue sends */
        T_EQ(rogue_end(&g, 60), 0);
        T_EQ(bad, 0);
        if (ucx) T_HAS(g.out, "replies 0");
        owner_stats(&o, v1);
        kb1 = owner_rss(&o);
        printf("  the owner dropped %llu messages; resident memory %llu -> %llu kB; %d warnings in its log\n",
               (unsigned long long)(v1[0] - v0[0]), (unsigned long long)kb0, (unsigned long long)kb1, log_count(o.log, "warn:"));
        T_CHECK(v1[0] - v0[0] >= 5000);
        T_CHECK(kb1 < kb0 + 65536);                        /* dropped messages hold nothing */
        T_CHECK(log_count(o.log, "warn:") <= 20);         /* one line a second, not one a message */
        T_CHECK(log_count(o.log, "more like it dropped") >= 1 || log_count(o.log, "warn:") <= 2);
        reader_close(&r);
        owner_finish(&o);
        free(o.md);
    }

    if (ucx) T_CASE("a process without the secret killed while it holds 4 connections to the owner and sends on each: the owner lives and serves byte-true") {
        owner o;
        reader r;
        rogue g;
        uint8_t secret[16];
        char sx[40], rx[24], len[24];
        const char *a[] = {"conns", addr, "4", "20", NULL, NULL, NULL, NULL};
        int round;
        if (owner_start(&o, 15, dir, 6) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, secret);
        if (getenv("KVX_ROGUE_CONNS_HOLDER")) {  /* a holder of the secret, the owner replying when it dies (not in make test) */
            region_args(secret, o.oi.base, o.oi.bytes, sx, rx, len);
            a[4] = sx; a[5] = rx; a[6] = len;
        }
        for (round = 0; round < 3; round++) {  /* killed 50, 250 and 450 ms into its sends */
            T_EQ(rogue_start(&g, a), 0);
            T_CHECK(rogue_wait_for(&g, "conns: 4 connected", 20));
            usleep(50000 + 200000 * round);
            kill(g.pid, SIGKILL);
            rogue_end(&g, 10);
        }
        usleep(500000);
        T_CHECK(kill(o.ch.pid, 0) == 0);
        T_EQ(reader_check(&r, 15, 4, 10000), 0);
        reader_close(&r);
        owner_finish(&o);  /* an owner that died by a signal fails the case */
        free(o.md);
    }

    T_CASE("forged notifications are dropped and counted: a lease resolves from its real reader alone, and a holder of the metadata is heard") {
        owner o;
        reader r;
        rogue g;
        uint64_t v0[3], v1[3];
        uint8_t secret[16];
        int64_t rec[64][3];
        char sx[40];
        int n, real = 0, others = 0;
        uint32_t ids[4] = {1, 2, 3, 4};
        kvx_read rd;
        kvx_ticket t;
        const char *a[] = {"notify", addr, "5000", "4242", NULL};
        const char *h[] = {"notify-secret", addr, sx, "777", "0", "1", "holder", NULL};
        if (owner_start(&o, 13, dir, 2) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, secret);
        hex(sx, secret, 16);
        owner_stats(&o, v0);
        T_EQ(owner_expect(&o, 4242, 20000), KVX_OK);
        T_EQ(rogue_run(a, &g, 60), 0);                      /* 5000 ids from 4242 on: the lease's among them */
        n = owner_notes(&o, 300, rec);
        T_EQ(n, 0);                                        /* nothing came of them */
        rd = kvx_t_read(r.p, r.c, ids, 4, 5000);
        rd.notify = 1; rd.notify_id = 4242;
        T_ST(kvx_post(r.q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(r.q, t, 10000), KVX_OK);
        for (k = 0; k < 20 && !real; k++) kvx_progress(r.ctx), usleep(10000);
        n = owner_notes(&o, 2000, rec);
        for (k = 0; k < n; k++) {
            if (rec[k][0] == 4242 && rec[k][1] == KVX_OK && rec[k][2] == 0) real++;
            else others++;
        }
        T_EQ(real, 1);
        T_EQ(others, 0);
        owner_stats(&o, v1);
        T_CHECK(v1[0] - v0[0] >= 5000);
        T_EQ(v1[2], v0[2]);                                /* the ring was never full */
        T_EQ(rogue_run(h, &g, 30), 0);                      /* the secret is what is checked */
        n = owner_notes(&o, 2000, rec);
        T_EQ(n, 1);
        if (n == 1) { T_EQ(rec[0][0], 777); T_EQ(rec[0][1], KVX_OK); }
        reader_close(&r);
        owner_finish(&o);
        free(o.md);
    }

    if (ucx) T_CASE("forged replies sprayed at a reader land nothing: with the owner live every read is byte-true; with it stopped every read fails") {
        owner o;
        reader r;
        rogue g;
        void *rmd;
        size_t rlen;
        const char *a[] = {"replies", addr, "200000", NULL};
        int bad, fails = 0;
        kvx_ticket t[4];
        uint32_t ids[NB], i;
        if (owner_start(&o, 14, dir, 3) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        for (i = 0; i < NB; i++) ids[i] = i;
        rmd = kvx_t_metadata(r.ctx, &rlen);                 /* the reader's own address: where the rogue aims */
        address_file(r.ctx, rmd, rlen, addr, NULL);
        rogue_target = r.ctx;
        T_EQ(rogue_start(&g, a), 0);
        bad = reader_check(&r, 14, 16, 10000);
        T_EQ(rogue_end(&g, 90), 0);
        T_EQ(bad, 0);
        kill(o.ch.pid, SIGSTOP);                           /* the owner stopped: only forgeries could answer */
        T_CHECK(all_stopped(o.ch.pid, 5000));              /* ... once every thread of it has stopped */
        kvx_ex_poison(&r.m, 14, ids, ids, NB, 0, r.m.lay.num_layers, 0, HEADS);
        T_EQ(rogue_start(&g, a), 0);
        for (k = 0; k < 4; k++) {
            kvx_read rd = kvx_t_read(r.p, r.c, ids, NB, 6000);
            T_ST(kvx_post(r.q, &rd, &t[k]), KVX_OK);
        }
        for (k = 0; k < 4; k++) {  /* waiting progresses the reader: the rogue reaches it */
            kvx_status st = kvx_wait(r.q, t[k], 15000);
            fails += st != KVX_OK;
            if (st == KVX_OK) {  /* say what landed, and whether the owner was in fact stopped */
                char path[64], line[256] = "";
                FILE *f;
                snprintf(path, sizeof path, "/proc/%d/stat", (int)o.ch.pid);
                if ((f = fopen(path, "r"))) { if (!fgets(line, sizeof line, f)) line[0] = 0; fclose(f); }
                printf("  read %d of 4 completed with the owner stopped; owner's /proc stat: %.60s\n", k, line);
            }
        }
        T_EQ(rogue_end(&g, 90), 0);
        rogue_target = NULL;
        if (fails < 4)  /* what landed: the owner's bytes, or forged ones */
            printf("  the blocks read with the owner stopped hold %s\n",
                   kvx_ex_verify(&r.m, 14, ids, ids, NB, 0, r.m.lay.num_layers, 0, HEADS, NULL) ? "bytes that are not the owner's"
                                                                                              : "the owner's bytes");
        T_EQ(fails, 4);
        kill(o.ch.pid, SIGCONT);
        T_EQ(reader_check(&r, 14, 2, 10000), 0);
        free(rmd);
        reader_close(&r);
        owner_finish(&o);
        free(o.md);
    }

    if (ucx) T_CASE("a holder of the secret that stops taking replies: the owner holds a bounded number, deregisters within its own timeout, serves others") {
        owner o;
        reader r;
        rogue g;
        uint64_t v0[3], v1[3], kb0, kb1, us = 0;
        uint8_t secret[16], c = 'd';
        char sx[40], rx[24];
        uint32_t n;
        const char *a[] = {"stall", addr, sx, rx, "1048576", "20000", "8", NULL};
        if (owner_start(&o, 15, dir, 4) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, secret);
        hex(sx, secret, 16);
        snprintf(rx, sizeof rx, "%llx", (unsigned long long)o.oi.base);
        owner_stats(&o, v0);
        kb0 = owner_rss(&o);
        T_EQ(rogue_start(&g, a), 0);
        usleep(1500000);                                   /* its requests are in, and it sleeps */
        owner_stats(&o, v1);
        kb1 = owner_rss(&o);
        printf("  20000 requests for 1 MiB each: the owner dropped %llu past its bounds; resident memory %llu -> %llu kB\n",
               (unsigned long long)(v1[0] - v0[0]), (unsigned long long)kb0, (unsigned long long)kb1);
        T_CHECK(v1[0] - v0[0] > 0);
        T_CHECK(kb1 < kb0 + 262144);
        T_CHECK(kvx_t_write_all(o.ch.wr, &c, 1) == 0 && kvx_t_read_all(o.ch.rd, &us, 8) == 0);
        T_CHECK(kvx_t_read_all(o.ch.rd, &n, 4) == 0);
        if (n < (1u << 20)) { void *md = malloc(n); kvx_t_read_all(o.ch.rd, md, n); free(md); }
        printf("  kvx_cache_deregister under it took %.3f s (the owner's timeout: %.1f s; the requests asked for an hour)\n",
               us / 1e6, OWNER_TIMEOUT_MS / 1e3);
        T_CHECK(us < (OWNER_TIMEOUT_MS + 2000) * 1000ull);
        T_EQ(reader_check(&r, 15, 2, 10000), 0);           /* others are served meanwhile */
        rogue_end(&g, 30);
        reader_close(&r);
        owner_finish(&o);
        free(o.md);
    }

    if (ucx) T_CASE("holders of the secret that send a burst of refused, large and gathered requests and die: the owner lives through 20") {
        owner o;
        reader r;
        rogue g;
        uint8_t secret[16];
        char sx[40], rx[24], len[24];
        const char *a[] = {"burst", addr, sx, rx, len, NULL};
        int alive = 1;
        if (owner_start(&o, 16, dir, 5) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, secret);
        region_args(secret, o.oi.base, o.oi.bytes, sx, rx, len);
        for (k = 0; k < 20 && alive; k++) {
            rogue_run(a, &g, 30);
            usleep(100000);
            owner_canary(&o, canary);
            alive = !strcmp(canary, CANARY);
        }
        T_CHECK(alive);
        T_EQ(reader_check(&r, 16, 2, 10000), 0);
        reader_close(&r);
        owner_finish(&o);
        T_EQ(log_count(o.log, "Assertion"), 0);
        free(o.md);
    }

    if (ucx) T_CASE("a holder of the secret asks for many ranges in one request: answered whole only where every range is the owner's; malformed lists dropped") {
        owner o;
        reader r;
        rogue g;
        uint8_t secret[16];
        uint64_t v0[3], v1[3];
        char sx[40], rx[24], len[24], cx[24];
        const char *a[] = {"ranges", addr, sx, rx, len, cx, NULL};
        if (owner_start(&o, 18, dir, 7) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, secret);
        region_args(secret, o.oi.base, o.oi.bytes, sx, rx, len);
        snprintf(cx, sizeof cx, "%llx", (unsigned long long)o.oi.canary);
        owner_stats(&o, v0);
        T_EQ(rogue_run(a, &g, 60), 0);
        owner_stats(&o, v1);
        T_HAS(g.out, "ranges: sent 6");
        /* the three ranges of the owner's (192 bytes); the canary, the wrap and 4097 pieces refused; the rest dropped */
        T_HAS(g.out, "replies with data 1 (192 bytes), refused 3, rendezvous 0, malformed 0");
        T_EQ(v1[0] - v0[0], 2);
        owner_canary(&o, canary);
        T_CHECK(!strcmp(canary, CANARY));
        T_EQ(reader_check(&r, 18, 2, 10000), 0);
        reader_close(&r);
        owner_finish(&o);
        free(o.md);
    }

    if (ucx) T_CASE("a holder of the secret names its reply size: 1 MiB in 64 chunks of 16 KiB, uneven sizes in 64-byte steps, below 16 KiB dropped") {
        owner o;
        reader r;
        rogue g;
        uint8_t secret[16];
        uint64_t v0[3], v1[3], big;
        char sx[40], rx[24], len[24], want[160];
        const char *a[] = {"chunks", addr, sx, rx, len, NULL};
        if (owner_start(&o, 19, dir, 8) || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, secret);
        hex(sx, secret, 16);
        big = o.oi.bytes < (1u << 20) ? o.oi.bytes & ~(uint64_t)16383 : (1u << 20);
        snprintf(rx, sizeof rx, "%llx", (unsigned long long)o.oi.base);
        snprintf(len, sizeof len, "%llu", (unsigned long long)big);
        owner_stats(&o, v0);
        T_EQ(rogue_run(a, &g, 60), 0);
        owner_stats(&o, v1);
        T_HAS(g.out, "chunks: sent 6");
        /* big in 16 KiB chunks; 64 KiB asked in at most 20000: 4 of 16384;
           4 KiB whole; 4 pieces of 64 in one reply; reply_bytes 1 and 16383 dropped */
        snprintf(want, sizeof want, "replies with data %llu (%llu bytes), refused 0, malformed 0, largest 16384",
                 (unsigned long long)(big / 16384 + 4 + 1 + 1), (unsigned long long)(big + 65536 + 4096 + 256));
        T_HAS(g.out, want);
        T_EQ(v1[0] - v0[0], 2);
        owner_canary(&o, canary);
        T_CHECK(!strcmp(canary, CANARY));
        T_EQ(reader_check(&r, 19, 2, 10000), 0);
        reader_close(&r);
        owner_finish(&o);
        free(o.md);
    }

    if (ucx) T_CASE("rendezvous messages to kvx's ids are dropped and released once: no descriptor left in UCX's pools") {
        owner o;
        reader r;
        rogue g;
        const char *a[] = {"rndv", addr, "2097152", NULL};
        uint64_t v0[3], v1[3];
        int started;
        setenv("UCX_LOG_LEVEL", "warn", 1);                /* UCX says what its pools still hold when a worker goes */
        started = owner_start(&o, 17, dir, 6);
        unsetenv("UCX_LOG_LEVEL");
        if (started || reader_open(&r, &o)) { T_FAILF("the owner or the reader did not start"); continue; }
        address_file(r.ctx, o.md, o.len, addr, NULL);
        owner_stats(&o, v0);
        for (k = 0; k < 3; k++) T_EQ(rogue_run(a, &g, 60), 0);
        owner_stats(&o, v1);
        T_EQ(v1[0] - v0[0], 9);
        T_EQ(reader_check(&r, 17, 2, 10000), 0);
        reader_close(&r);
        owner_finish(&o);                               /* UCX checks its pools as the owner's worker goes */
        T_EQ(log_count(o.log, "not returned to mpool"), 0);
        free(o.md);
    }

    {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        if (system(cmd)) {}
    }
    return kvx_t_summary();
}
