/*
    kvx_test.h -- the few macros kvx's tests share. Each test binary prints
    one line per case ("ok NAME" or "FAIL NAME: why") and a last line
    "N passed, M failed"; the runner (tests/lib/runner.sh) adds them up.
*/
#ifndef KVX_TEST_H
#define KVX_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int kvx_t_pass, kvx_t_fail, kvx_t_skip, kvx_t_case_failed, kvx_t_case_skipped, kvx_t_matched;
static const char *kvx_t_case;

/* KVX_TEST_ONLY=substring runs only the cases whose name contains it; a run
   where it selects none fails (kvx_t_summary), so a misspelt or renamed case
   cannot pass by running nothing. */
#define T_CASE(name) for (kvx_t_case = kvx_t_selected(name), kvx_t_case_failed = kvx_t_case_skipped = 0, fflush(stdout); kvx_t_case; kvx_t_end())
/* Leave the case as skipped, saying why (counted apart, never as passed);
   `continue` after it leaves the case's block at once. */
#define T_SKIP(...) do { printf("skip %s: ", kvx_t_case); printf(__VA_ARGS__); printf("\n"); kvx_t_case_skipped = 1; } while (0)

static inline const char *kvx_t_selected(const char *name) {
    const char *only = getenv("KVX_TEST_ONLY");
    if (only && !strstr(name, only)) return NULL;
    kvx_t_matched++;
    return name;
}

static inline void kvx_t_end(void) {
    if (kvx_t_case_skipped && !kvx_t_case_failed) kvx_t_skip++;
    else if (!kvx_t_case_failed) { printf("ok %s\n", kvx_t_case); kvx_t_pass++; }
    else kvx_t_fail++;
    kvx_t_case = NULL;
    fflush(stdout);
}

#define T_FAILF(...) do { if (!kvx_t_case_failed) { printf("FAIL %s: ", kvx_t_case); printf(__VA_ARGS__); printf(" (%s:%d)\n", __FILE__, __LINE__); } kvx_t_case_failed = 1; } while (0)
#define T_CHECK(c) do { if (!(c)) T_FAILF("%s", #c); } while (0)
#define T_EQ(a, b) do { long long _a = (long long)(a), _b = (long long)(b); if (_a != _b) T_FAILF("%s == %lld, expected %s == %lld", #a, _a, #b, _b); } while (0)
#define T_ST(call, want) do { kvx_status _s = (call); if (_s != (want)) T_FAILF("%s returned %s, expected %s", #call, kvx_status_name(_s), kvx_status_name(want)); } while (0)
#define T_HAS(str, sub) do { const char *_s = (str); if (!_s || !strstr(_s, (sub))) T_FAILF("message \"%s\" does not name \"%s\"", _s ? _s : "(null)", (sub)); } while (0)

/* A child process died by a signal (kvx_owner.h): the case running fails,
   or, between cases, the run. */
static inline void kvx_t_died(long pid, int sig, const char *what) {
    if (kvx_t_case) { T_FAILF("child process %ld died by signal %d (%s)", pid, sig, what); return; }
    printf("FAIL child process %ld died by signal %d (%s)\n", pid, sig, what);
    kvx_t_fail++;
}

static inline int kvx_t_summary(void) {
    const char *only = getenv("KVX_TEST_ONLY");
    if (only && !kvx_t_matched) { printf("FAIL no case matched KVX_TEST_ONLY=\"%s\"\n", only); kvx_t_fail++; }
    if (kvx_t_skip) printf("%d passed, %d failed, %d skipped\n", kvx_t_pass, kvx_t_fail, kvx_t_skip);
    else printf("%d passed, %d failed\n", kvx_t_pass, kvx_t_fail);
    return kvx_t_fail ? 1 : 0;
}

/* In a child about to exec itself in a role where it may be stopped
   (SIGSTOP) and continued: no leak check at its exit. LeakSanitizer stops
   the threads with ptrace for it, and after a job-control stop that can wait
   forever (seen under load, with or without kvx's changes), which hangs the
   parent's waitpid. The parent's own check stays on; valgrind checks every
   process of a run separately. */
static inline void kvx_t_child_no_leak_check(void) {
    char opts[512];
    const char *old = getenv("ASAN_OPTIONS");
    snprintf(opts, sizeof opts, "%s%sdetect_leaks=0", old ? old : "", old && *old ? ":" : "");
    setenv("ASAN_OPTIONS", opts, 1);
}

static inline double kvx_t_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}


#if defined(KVX_INCLUDED)
/* A context for a test: rank of tp, optional progress thread, quiet; a
   context that cannot be made ends the test binary. */
static inline kvx_ctx *kvx_t_ctx(const char *name, int rank, int tp, int thread) {
    kvx_ctx_desc d;
    kvx_ctx *c = NULL;
    memset(&d, 0, sizeof d);
    d.name = name; d.tp_rank = rank; d.tp_size = tp; d.progress_thread = thread; d.log_level = KVX_LOG_OFF;
    if (kvx_ctx_create(&d, &c) != KVX_OK) { printf("cannot create context: %s\n", kvx_ctx_error(NULL)); exit(3); }
    return c;
}

/* A read of blocks ids[0..n) of peer p into the same ids of cache c. */
static inline kvx_read kvx_t_read(kvx_peer *p, kvx_cache *c, const uint32_t *ids, uint32_t n, uint32_t timeout_ms) {
    kvx_read rd;
    memset(&rd, 0, sizeof rd);
    rd.peer = p; rd.cache = c; rd.local_blocks = ids; rd.remote_blocks = ids; rd.num_blocks = n; rd.timeout_ms = timeout_ms;
    return rd;
}

/* The context's metadata blob, malloc'd (free it). */
static inline void *kvx_t_metadata(kvx_ctx *c, size_t *len) {
    void *md;
    *len = 0;
    kvx_metadata(c, NULL, len);
    md = malloc(*len);
    kvx_metadata(c, md, len);
    return md;
}
#endif

#endif
