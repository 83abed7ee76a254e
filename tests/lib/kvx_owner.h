/*
    kvx_owner.h -- processes for the tests that need real ones: the test
    binary re-executed in a role (UCX does not survive a fork of an
    initialised context), talking to its parent over a pipe each way; and the
    role most of them need, an owner: a cache filled with a seed, its
    metadata sent to the parent, reads served from a progress thread until
    the parent closes its pipe.

    A test's main starts with

        if (kvx_t_is_child(argc, argv, "owner")) return kvx_t_owner_main(argv);

    and its own roles the same way; a role's arguments are argv[2..4] (a, b,
    c of kvx_t_spawn), its pipes from and to the parent argv[5] and argv[6].
*/
#ifndef KVX_OWNER_H
#define KVX_OWNER_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include "kvx_host_cache.h"
#include "kvx_test.h"

typedef struct kvx_t_child { pid_t pid; int wr, rd; } kvx_t_child;

static inline int kvx_t_write_all(int fd, const void *p, size_t n) { return write(fd, p, n) == (ssize_t)n ? 0 : -1; }

/* Bounded: a child that never writes fails the case, it does not hang it. */
static inline int kvx_t_read_all(int fd, void *p, size_t n) {
    uint8_t *b = (uint8_t *)p;
    while (n) {
        struct pollfd pf;
        ssize_t k;
        pf.fd = fd; pf.events = POLLIN; pf.revents = 0;
        if (poll(&pf, 1, 30000) <= 0) return -1;
        if ((k = read(fd, b, n)) <= 0) return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static inline int kvx_t_is_child(int argc, char **argv, const char *role) { return argc == 7 && !strcmp(argv[1], role); }

/* This binary again, as `role a b c`. */
static inline kvx_t_child kvx_t_spawn(const char *role, int a, int b, uint64_t c) {
    int in[2], out[2];
    kvx_t_child ch;
    /* close-on-exec, so no other child keeps these pipes open */
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC)) exit(3);
    ch.pid = fork();
    if (ch.pid == 0) {
        char sa[24], sb[24], sc[24], f1[16], f2[16];
        close(in[1]); close(out[0]);
        fcntl(in[0], F_SETFD, 0);
        fcntl(out[1], F_SETFD, 0);
        snprintf(sa, sizeof sa, "%d", a); snprintf(sb, sizeof sb, "%d", b);
        snprintf(sc, sizeof sc, "%llu", (unsigned long long)c);
        snprintf(f1, sizeof f1, "%d", in[0]); snprintf(f2, sizeof f2, "%d", out[1]);
        kvx_t_child_no_leak_check();  /* owners and readers of the fault tests are stopped and continued */
        {   /* this binary by its path, not /proc/self/exe, which valgrind's children would take for valgrind */
            char self[4096];
            ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
            self[n > 0 ? n : 0] = 0;
            execl(n > 0 ? self : "/proc/self/exe", program_invocation_short_name, role, sa, sb, sc, f1, f2, (char *)NULL);
        }
        _exit(127);
    }
    close(in[0]); close(out[1]);
    ch.wr = in[1]; ch.rd = out[0];
    return ch;
}

/* Done with a child: its pipes closed (an owner stops serving), woken if
   stopped, reaped. A child that died by a signal other than the SIGKILL a
   test sends (an abort, a crash) fails the test, even where the parent
   already had all it wanted from it. */
static inline void kvx_t_finish(kvx_t_child *ch) {
    int st;
    close(ch->wr); close(ch->rd);
    kill(ch->pid, SIGCONT);
    if (waitpid(ch->pid, &st, 0) == ch->pid && WIFSIGNALED(st) && WTERMSIG(st) != SIGKILL)
        kvx_t_died((long)ch->pid, WTERMSIG(st), strsignal(WTERMSIG(st)));
}

static inline void kvx_t_kill(kvx_t_child *ch) {
    int st;
    kill(ch->pid, SIGKILL);
    waitpid(ch->pid, &st, 0);
    close(ch->wr); close(ch->rd);
}

/* The fault tests' cache: 4 layers of NB blocks of 16 tokens, HEADS KV
   heads of 64 two-byte elements, split over tp ranks. */
#define NB 128u
#define HEADS 4u
static inline kvx_layout lay_for(int tp) {
    kvx_layout l;
    memset(&l, 0, sizeof l);
    l.num_layers = 4;
    l.num_blocks = NB;
    l.block_tokens = 16;
    l.total_heads = HEADS;
    l.num_heads = HEADS / (uint32_t)tp;
    l.head_dim = 64;
    l.elem_bytes = 2;
    return l;
}

/* An owner of lay as rank of tp, every block filled with seed: returns its
   metadata (free it), NULL if it did not come. */
static inline void *kvx_t_owner_spawn(kvx_t_child *ch, const kvx_layout *lay, int rank, int tp, uint64_t seed, uint32_t *len) {
    void *md;
    *ch = kvx_t_spawn("owner", rank, tp, seed);
    if (kvx_t_write_all(ch->wr, lay, sizeof *lay) || kvx_t_read_all(ch->rd, len, 4)) return NULL;
    md = malloc(*len);
    if (kvx_t_read_all(ch->rd, md, *len)) { free(md); return NULL; }
    return md;
}

/* The owner role: argv as kvx_t_spawn passed it, the layout from the parent. */
static inline int kvx_t_owner_main(char **argv) {
    int rank = atoi(argv[2]), tp = atoi(argv[3]), in = atoi(argv[5]), out = atoi(argv[6]);
    uint64_t seed = (uint64_t)atoll(argv[4]);
    kvx_layout lay;
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_cache *c;
    kvx_ctx *ctx;
    uint32_t i, *ids, n;
    size_t len;
    void *md;
    char b;
    if (kvx_t_read_all(in, &lay, sizeof lay)) return 2;
    ctx = kvx_t_ctx("prefill", rank, tp, 1);
    if (kvx_ex_cache_alloc(&m, &lay, rank, tp) || !(ids = (uint32_t *)malloc(lay.num_blocks * sizeof *ids))) return 3;
    for (i = 0; i < lay.num_blocks; i++) ids[i] = i;
    kvx_ex_fill(&m, seed, ids, lay.num_blocks);
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(ctx, &cd, &c)) return 4;
    md = kvx_t_metadata(ctx, &len);
    n = (uint32_t)len;
    if (kvx_t_write_all(out, &n, 4) || kvx_t_write_all(out, md, len)) return 5;
    while (read(in, &b, 1) > 0) {}
    kvx_ctx_destroy(ctx);
    kvx_ex_cache_free(&m);
    free(ids);
    free(md);
    if (getenv("KVX_TEST_OWNER_ABORT")) abort();  /* the runner's own check: a child that dies by a signal fails the test */
    return 0;
}

#endif
