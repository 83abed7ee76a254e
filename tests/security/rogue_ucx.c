/* SPDX-License-Identifier: MIT */
/*
    rogue_ucx -- a hostile process against a kvx owner (or reader) over UCX.

    It is written against UCX's public ucp_* API only: it neither includes nor
    links kvx. The bytes it sends in kvx's formats (get request and reply,
    notification) are written here by hand, as an attacker who read kvx's
    documentation would write them. A test harness starts a kvx process,
    hands this program only that process's UCX worker address (never its
    secret, unless a mode below takes one), runs one mode, and then checks
    the target's memory, liveness and counters itself: this program only
    prints what it did and saw, one line per finding, and a last line
    "rogue: done".

        rogue_ucx MODE ADDR_FILE [args...]

    ADDR_FILE holds the raw bytes of the target's UCX worker address
    (ucp_address_t). UCX's environment is used as given (the harness sets
    UCX_TLS=tcp UCX_NET_DEVICES=lo). Every wait is bounded in time: the
    connection's flush 5 s; modes that send many messages keep at most 1000
    in flight and stop sending when none completes for 5 s; a request still
    in flight at the end is left alone and the program _exits without UCX's
    cleanup.

    Modes:
      rma CANARY_HEX LEN
          UCX's one-sided ops with a remote key packed from the rogue's own
          memory (never one of the target's): a get of LEN bytes at
          CANARY_HEX, a put of "ROGUE-WROTE-THIS" (at most LEN bytes) there
          followed by a flush, and an 8-byte get at 0x1000; 3 s each.
          Prints "get: STATUS" (and "get returned: "TEXT"" if it succeeded),
          "put: STATUS", "get 0x1000: STATUS".
      probe BASE_HEX SPAN COUNT
          COUNT get requests (AM 0x4c) with a wrong (random) secret for 64
          bytes each, stepping through [BASE, BASE+SPAN); then 2 s more of
          progress. Prints "probe: sent N, replies R".
      notify COUNT ID0
          COUNT notifications (AM 0x4b) with a wrong secret, ids ID0.., then
          10 malformed ones (wrong magic, 16 bytes, 200 bytes); waits up to
          5 s for the sends. Prints "notify: sent N".
      notify-secret SECRET_HEX ID RANK TP NAME
          One well-formed notification with the given secret (a holder of
          the metadata), sent and flushed within 5 s. Prints
          "notify-secret: sent STATUS".
      replies COUNT
          COUNT forged get replies (AM 0x4d) at a reader: ids (gen << 32) |
          idx for gen 1..64, a random secret and nonce, 64 bytes of 0xEE, a
          quarter of them with status 1; waits up to 5 s for the sends.
          Prints "replies: sent N".
      stall SECRET_HEX RADDR_HEX LEN COUNT SECONDS
          A holder of the secret that stops taking replies: COUNT valid
          requests with a ttl of an hour, progress only until they are sent
          (10 s at most), "stall: sent N", then SECONDS of sleep without
          progress and _exit(0).
      rndv BYTES
          One active message of BYTES (>= 1 MiB; flag RNDV, never EAGER, so
          UCX sends it by rendezvous) to each of ids
          0x4b, 0x4c (with a wrong-secret request header) and 0x4d (with a
          reply header); 5 s each. Prints "rndv 0xID: STATUS".
      burst SECRET_HEX RADDR_HEX REGION_LEN
          A holder of the secret that dies mid-read: 100 requests outside
          the region, 16 of 1 MiB within it and 4 gathers of 4096 pieces of
          64 bytes, ~50 ms of progress, "burst: sent N", then _exit(0) with
          no cleanup.
      conns N SECONDS [SECRET_HEX RADDR_HEX REGION_LEN]
          N endpoints (2..8) to the target's worker, each connected, then
          get requests on each in turn for SECONDS (or until the harness
          kills it): a reader that dies while it holds several
          connections. Without a secret they carry a wrong one; with it,
          they ask for up to 1 MiB within the region, so the owner is
          sending replies when the reader dies. Prints "conns: N
          connected" once all are, then "conns: sent S".
      ranges SECRET_HEX RADDR_HEX REGION_LEN CANARY_HEX
          A holder of the secret that asks for many ranges in one request:
          three 64-byte ranges within the region; a range within it and one
          at CANARY_HEX; one within and one that wraps the address space;
          4097 pieces in two ranges; ranges data of 33 bytes; 256 ranges
          of data. Each sent with its own id; then 2 s of progress. Prints
          "ranges: sent N", "ranges: replies with data D (B bytes),
          refused R, rendezvous V, malformed M".
      chunks SECRET_HEX RADDR_HEX LEN
          A holder of the secret that names the size of its replies
          (reply_bytes): LEN bytes (at most 1 MiB) in replies of 16 KiB,
          the most chunks a request can make; 64 KiB in replies of at most
          20000 bytes; 4 KiB with reply_bytes 2^64-1; 4 pieces of 64 bytes
          with 16 KiB (several pieces: one reply); and reply_bytes 1 and
          16383, below the least an owner takes. Then 2 s of progress.
          Prints "chunks: sent N", "chunks: replies with data D (B bytes),
          refused R, malformed M, largest L".

    Wire formats (little-endian):
      get request, AM 0x4c, as the header (96 bytes), flags REPLY | EAGER:
        u32 0x47435658, u16 4, u16 1, secret[16], u64 id, nonce, raddr,
        len, off, ttl_ns, count, rstride, reply_bytes (0: one reply; else
        at least 16 KiB: one range comes in even chunks of at most that,
        in 64-byte steps); as data, more ranges: u64 raddr, len, count,
        rstride each, whose bytes follow in the one reply.
      get reply, AM 0x4d, header (64 bytes): u32 0x47435658, u16 4, u16 2,
        secret[16], u64 id, nonce, off, len, u32 status, u32 0; len bytes of
        data.
      notification, AM 0x4b, no header, data (104 bytes): u32 0x4e435658,
        u16 2, u16 0, secret[16], u64 id, u32 rank, u32 tp_size, name[64]
        (byte 0 the length n in 1..63, n printable bytes, zeros).

    Exit status: 0 once a mode ran (whatever it saw), 2 on bad usage, 3 if it
    could not set up (address file, ucp_init, worker) or connect.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* UCX 1.22's headers trip -Wsign-compare: this file keeps every warning. */
#if defined(__GNUC__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include <ucp/api/ucp.h>
#if defined(__GNUC__)
#  pragma GCC diagnostic pop
#endif

#define AM_NOTIFY 0x4bu
#define AM_GET 0x4cu
#define AM_REPLY 0x4du
#define GET_MAGIC 0x47435658u       /* "XVCG" */
#define NOTIFY_MAGIC 0x4e435658u    /* "XVCN" */
#define WIRE_VERSION 4u           /* get requests and replies */
#define NOTIFY_VERSION 2u
#define REQ_BYTES 96u
#define REP_BYTES 64u
#define NOTIFY_BYTES 104u
#define NAME_FIELD 64u
#define SECRET_BYTES 16u

#define MAX_INFLIGHT 1000           /* sends outstanding at once */
#define SLOT_BYTES 256u             /* a send's own bytes (header or data) */
#define SLOT_WAIT_S 5.0             /* the longest wait for a send to finish before giving up sending */

/*--- state -----------------------------------------------------------------*/

static ucp_context_h g_ctx;
static ucp_worker_h g_wrk;
static ucp_ep_h g_ep;
static ucs_status_t g_ep_status = UCS_OK;     /* set by the error callback */
static int g_left;                            /* requests left in flight: no cleanup */
static int g_urandom = -1;
static uint64_t g_rng;

static unsigned long long g_replies, g_replies_ok, g_replies_refused, g_replies_rndv, g_replies_odd, g_reply_bytes, g_reply_max;

/* Sends of many messages: each has a slot for its bytes until it completes. */
typedef struct slot { uint8_t buf[SLOT_BYTES]; } slot;
static slot g_slots[MAX_INFLIGHT];
static int g_free[MAX_INFLIGHT], g_nfree;
static unsigned g_busy;                       /* sends in flight */
static unsigned long long g_sent, g_send_err; /* handed to UCX; failed (at once or later) */
static ucs_status_t g_last_err = UCS_OK;
static int g_stuck;                           /* a wait for a free slot timed out: the target stopped taking sends */

/*--- helpers ---------------------------------------------------------------*/

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void nap_ns(long ns) {
    struct timespec ts;
    ts.tv_sec = ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

/* One step of a bounded wait: progress, and a short sleep when nothing moved. */
static void step(void) {
    if (!ucp_worker_progress(g_wrk)) nap_ns(20000);
}

static void progress_for(double seconds) {
    double end = now_s() + seconds;
    while (now_s() < end) step();
}

static int rand_bytes(void *p, size_t n) {
    uint8_t *b = (uint8_t *)p;
    if (g_urandom < 0 && (g_urandom = open("/dev/urandom", O_RDONLY | O_CLOEXEC)) < 0) return -1;
    while (n) {
        ssize_t k = read(g_urandom, b, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* splitmix64, seeded from /dev/urandom: nonces and ids need not be secret. */
static uint64_t rnd64(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { int i; for (i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { int i; for (i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* kvx get request: 96 bytes (reply_bytes 0: one reply). */
static void build_req(uint8_t *b, const uint8_t *secret, uint64_t id, uint64_t nonce, uint64_t raddr, uint64_t len,
                      uint64_t off, uint64_t ttl_ns, uint64_t count, uint64_t rstride) {
    put32(b, GET_MAGIC); put16(b + 4, WIRE_VERSION); put16(b + 6, 1);
    memcpy(b + 8, secret, SECRET_BYTES);
    put64(b + 24, id); put64(b + 32, nonce); put64(b + 40, raddr); put64(b + 48, len);
    put64(b + 56, off); put64(b + 64, ttl_ns); put64(b + 72, count); put64(b + 80, rstride); put64(b + 88, 0);
}

/* kvx get reply header: 64 bytes. */
static void build_rep(uint8_t *b, const uint8_t *secret, uint64_t id, uint64_t nonce, uint64_t off, uint64_t len, uint32_t status) {
    put32(b, GET_MAGIC); put16(b + 4, WIRE_VERSION); put16(b + 6, 2);
    memcpy(b + 8, secret, SECRET_BYTES);
    put64(b + 24, id); put64(b + 32, nonce); put64(b + 40, off); put64(b + 48, len);
    put32(b + 56, status); put32(b + 60, 0);
}

/* kvx notification: 104 bytes. */
static void build_notify(uint8_t *b, uint32_t magic, const uint8_t *secret, uint64_t id, uint32_t rank, uint32_t tp, const char *name) {
    size_t n = strlen(name);
    if (n > NAME_FIELD - 1) n = NAME_FIELD - 1;
    memset(b, 0, NOTIFY_BYTES);
    put32(b, magic); put16(b + 4, NOTIFY_VERSION); put16(b + 6, 0);
    memcpy(b + 8, secret, SECRET_BYTES);
    put64(b + 24, id); put32(b + 32, rank); put32(b + 36, tp);
    b[40] = (uint8_t)n;
    memcpy(b + 41, name, n);
}

static const char *st_str(int done, ucs_status_t s) { return done ? ucs_status_string(s) : "timed out"; }

/* Waits for one request (polled, no callback) until the deadline. Returns 1
   with its status in *st, or 0 if still in flight: then it is left alone
   (never freed) and the program exits without UCX's cleanup. */
static int wait_req(ucs_status_ptr_t r, double end, ucs_status_t *st) {
    if (r == NULL) { *st = UCS_OK; return 1; }
    if (UCS_PTR_IS_ERR(r)) { *st = UCS_PTR_STATUS(r); return 1; }
    for (;;) {
        ucs_status_t s = ucp_request_check_status(r);
        if (s != UCS_INPROGRESS) { ucp_request_free(r); *st = s; return 1; }
        if (now_s() >= end) { g_left++; *st = UCS_INPROGRESS; return 0; }
        step();
    }
}

static int flush_ep(double end, ucs_status_t *st) {
    ucp_request_param_t prm;
    memset(&prm, 0, sizeof prm);
    return wait_req(ucp_ep_flush_nbx(g_ep, &prm), end, st);
}

/*--- sends of many messages ------------------------------------------------*/

static void slots_init(void) {
    int i;
    g_nfree = 0;
    for (i = MAX_INFLIGHT; i > 0; i--) g_free[g_nfree++] = i - 1;
}

static void slot_release(int i) { g_free[g_nfree++] = i; }

static void note_err(ucs_status_t s) { g_send_err++; g_last_err = s; }

static void sent_cb(void *req, ucs_status_t status, void *user) {
    int i = (int)(intptr_t)user;
    if (status != UCS_OK) note_err(status);
    g_busy--;
    if (i >= 0) slot_release(i);
    ucp_request_free(req);
}

/* A slot for the next send, waiting for one to free up until the deadline
   (at most SLOT_WAIT_S); -1 if none did. */
static int slot_get_until(double end) {
    double most = now_s() + SLOT_WAIT_S;
    if (end > most) end = most;
    while (!g_nfree) {
        if (now_s() >= end) { g_stuck = 1; return -1; }
        step();
    }
    return g_free[--g_nfree];
}

static int slot_get(void) { return slot_get_until(now_s() + SLOT_WAIT_S); }

/* Sends an active message whose header and data stay valid until it
   completes (slot i's bytes, or static ones). Returns 0 if UCX took it. */
static int am_send(int i, unsigned id, const void *hdr, size_t hlen, const void *data, size_t dlen, uint32_t flags) {
    ucp_request_param_t prm;
    ucs_status_ptr_t r;
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    prm.cb.send = sent_cb;
    prm.user_data = (void *)(intptr_t)i;
    prm.flags = flags;
    r = ucp_am_send_nbx(g_ep, id, hdr, hlen, data, dlen, &prm);
    if (r == NULL) { if (i >= 0) slot_release(i); g_sent++; return 0; }
    if (UCS_PTR_IS_ERR(r)) { if (i >= 0) slot_release(i); note_err(UCS_PTR_STATUS(r)); return -1; }
    g_busy++;
    g_sent++;
    return 0;
}

/* Progress until every send completed or the deadline; returns those left.
   Where sending already stopped because none completed for SLOT_WAIT_S, it
   does not wait again: a mode's bound on waiting for its sends holds. */
static unsigned drain(double end) {
    while (g_busy && !g_stuck && now_s() < end) step();
    return g_busy;
}

static void print_errors(const char *mode) {
    if (g_send_err) printf("%s: send errors %llu (last: %s)\n", mode, g_send_err, ucs_status_string(g_last_err));
}

/*--- UCX: setup, handlers, teardown ----------------------------------------*/

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)arg; (void)ep;
    if (g_ep_status == UCS_OK) g_ep_status = status;
}

static ucs_status_t on_reply(void *arg, const void *header, size_t header_length, void *data, size_t length,
                             const ucp_am_recv_param_t *param) {
    const uint8_t *h = (const uint8_t *)header;
    (void)arg; (void)data; (void)length;
    g_replies++;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) { g_replies_rndv++; return UCS_OK; }
    if (header_length == REP_BYTES && get32(h) == GET_MAGIC) {
        if (get32(h + 56) == 0) {
            g_replies_ok++;
            g_reply_bytes += length;
            if (length > g_reply_max) g_reply_max = length;
        }
        else g_replies_refused++;
    } else {
        g_replies_odd++;
    }
    return UCS_OK;
}

static void done_exit(int code) {
    fflush(stdout);
    fflush(stderr);
    _exit(code);
}

/* Exits 3 with a line saying why (no UCX cleanup: something may be in flight). */
static void setup_fail(const char *what, const char *why) {
    printf("setup: %s: %s\n", what, why);
    done_exit(3);
}

static uint8_t *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    uint8_t *b;
    size_t cap = 1u << 16;
    if (!f) return NULL;
    if (!(b = (uint8_t *)malloc(cap))) { fclose(f); return NULL; }
    *n = fread(b, 1, cap, f);
    if (ferror(f) || !feof(f) || *n == 0) { fclose(f); free(b); return NULL; }
    fclose(f);
    return b;
}

static void connect_target(const char *addr_file) {
    ucp_config_t *cfg;
    ucp_params_t up;
    ucp_worker_params_t wp;
    ucp_ep_params_t ep;
    ucp_am_handler_param_t ah;
    ucs_status_t s;
    uint8_t *addr;
    size_t alen = 0;

    if (!(addr = read_file(addr_file, &alen))) setup_fail("address file", addr_file);
    if ((s = ucp_config_read(NULL, NULL, &cfg)) != UCS_OK) setup_fail("ucp_config_read", ucs_status_string(s));
    memset(&up, 0, sizeof up);
    up.field_mask = UCP_PARAM_FIELD_FEATURES;
    up.features = UCP_FEATURE_AM | UCP_FEATURE_RMA;
    s = ucp_init(&up, cfg, &g_ctx);
    ucp_config_release(cfg);
    if (s != UCS_OK) setup_fail("ucp_init", ucs_status_string(s));
    memset(&wp, 0, sizeof wp);
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    if ((s = ucp_worker_create(g_ctx, &wp, &g_wrk)) != UCS_OK) setup_fail("ucp_worker_create", ucs_status_string(s));

    memset(&ah, 0, sizeof ah);
    ah.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    ah.id = AM_REPLY;
    ah.cb = on_reply;
    ah.arg = NULL;
    if ((s = ucp_worker_set_am_recv_handler(g_wrk, &ah)) != UCS_OK) setup_fail("ucp_worker_set_am_recv_handler", ucs_status_string(s));

    memset(&ep, 0, sizeof ep);
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = (const ucp_address_t *)addr;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = on_ep_error;
    ep.err_handler.arg = NULL;
    if ((s = ucp_ep_create(g_wrk, &ep, &g_ep)) != UCS_OK) setup_fail("ucp_ep_create", ucs_status_string(s));
    free(addr);     /* UCX copies what it needs of the address */

    {
        ucs_status_t fs;
        int done = flush_ep(now_s() + 5.0, &fs);
        if (!done) setup_fail("connect (flush)", "timed out");
        if (fs != UCS_OK) setup_fail("connect (flush)", ucs_status_string(fs));
        if (g_ep_status != UCS_OK) setup_fail("connect", ucs_status_string(g_ep_status));
    }
    printf("connected\n");
    fflush(stdout);
}

/* The end of a mode that returns: what the endpoint saw, UCX's cleanup
   unless something is still in flight, and "rogue: done". */
static void finish(void) {
    if (g_ep_status != UCS_OK) printf("ep error: %s\n", ucs_status_string(g_ep_status));
    if (g_left || g_busy) {
        printf("left in flight: %u (no cleanup)\n", (unsigned)g_left + g_busy);
        printf("rogue: done\n");
        done_exit(0);
    }
    {
        ucp_request_param_t prm;
        ucs_status_t s;
        memset(&prm, 0, sizeof prm);
        prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
        prm.flags = g_ep_status != UCS_OK ? UCP_EP_CLOSE_FLAG_FORCE : 0;
        if (!wait_req(ucp_ep_close_nbx(g_ep, &prm), now_s() + 2.0, &s)) {
            printf("ep close: timed out (no cleanup)\n");
            printf("rogue: done\n");
            done_exit(0);
        }
    }
    ucp_worker_destroy(g_wrk);
    ucp_cleanup(g_ctx);
    printf("rogue: done\n");
    fflush(stdout);
}

/*--- argument parsing ------------------------------------------------------*/

static const char *g_prog = "rogue_ucx";

static void usage(const char *why) {
    fprintf(stderr, "%s: %s\n", g_prog, why);
    fprintf(stderr,
            "usage: %s MODE ADDR_FILE [args...]\n"
            "  rma CANARY_HEX LEN\n"
            "  probe BASE_HEX SPAN COUNT\n"
            "  notify COUNT ID0\n"
            "  notify-secret SECRET_HEX ID RANK TP NAME\n"
            "  replies COUNT\n"
            "  stall SECRET_HEX RADDR_HEX LEN COUNT SECONDS\n"
            "  rndv BYTES\n"
            "  burst SECRET_HEX RADDR_HEX REGION_LEN\n"
            "  ranges SECRET_HEX RADDR_HEX REGION_LEN CANARY_HEX\n"
            "  chunks SECRET_HEX RADDR_HEX LEN\n",
            g_prog);
    exit(2);
}

static uint64_t parse_u64(const char *s, int base, const char *what) {
    char *end;
    unsigned long long v;
    if (!s || !*s || *s == '-') usage(what);
    errno = 0;
    v = strtoull(s, &end, base);
    if (errno || *end) usage(what);
    return (uint64_t)v;
}

static void parse_secret(const char *s, uint8_t *out) {
    size_t i;
    if (strlen(s) != 2 * SECRET_BYTES) usage("a secret is 32 hex characters");
    for (i = 0; i < 2 * SECRET_BYTES; i++) {
        int c = s[i], v;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
        else usage("a secret is 32 hex characters");
        if (i & 1) out[i / 2] = (uint8_t)(out[i / 2] | v);
        else out[i / 2] = (uint8_t)(v << 4);
    }
}

static void need_args(int argc, int n) { if (argc != n) usage("wrong number of arguments for this mode"); }

/*--- modes -----------------------------------------------------------------*/

static void print_text(const char *label, const uint8_t *b, size_t n) {
    size_t i;
    printf("%s\"", label);
    for (i = 0; i < n; i++) putchar(b[i] >= 0x20 && b[i] < 0x7f ? b[i] : '.');
    printf("\"\n");
}

/* 1. UCX's own one-sided ops with a key of the rogue's own memory. */
static void mode_rma(uint64_t canary, uint64_t len) {
    static const char text[] = "ROGUE-WROTE-THIS";
    static uint8_t small[8];
    ucp_mem_map_params_t mp;
    ucp_mem_h memh;
    ucp_rkey_h rkey = NULL;
    void *packed = NULL;
    size_t packed_len = 0, plen;
    uint8_t *buf;
    ucp_request_param_t prm;
    ucs_status_t s;
    int done;

    if (!(buf = (uint8_t *)calloc(1, (size_t)len + 64))) setup_fail("rma", "out of memory");
    memset(&mp, 0, sizeof mp);
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = buf;
    mp.length = (size_t)len + 64;
    if ((s = ucp_mem_map(g_ctx, &mp, &memh)) != UCS_OK) {
        printf("rkey: ucp_mem_map: %s\n", ucs_status_string(s));
        finish();
        return;
    }
    s = ucp_rkey_pack(g_ctx, memh, &packed, &packed_len);
    if (s == UCS_OK) {
        s = ucp_ep_rkey_unpack(g_ep, packed, &rkey);
        ucp_rkey_buffer_release(packed);
    }
    if (s != UCS_OK) {
        printf("rkey: %s (no one-sided op sent)\n", ucs_status_string(s));
        ucp_mem_unmap(g_ctx, memh);
        finish();
        return;
    }
    printf("rkey: own key of %zu bytes unpacked on the endpoint\n", packed_len);
    fflush(stdout);

    memset(&prm, 0, sizeof prm);
    done = wait_req(ucp_get_nbx(g_ep, buf, (size_t)len, canary, rkey, &prm), now_s() + 3.0, &s);
    printf("get: %s\n", st_str(done, s));
    if (done && s == UCS_OK) print_text("get returned: ", buf, (size_t)len);
    fflush(stdout);

    plen = len < sizeof text - 1 ? (size_t)len : sizeof text - 1;
    memset(&prm, 0, sizeof prm);
    {
        double end = now_s() + 3.0;
        ucs_status_t fs = UCS_OK;
        done = wait_req(ucp_put_nbx(g_ep, text, plen, canary, rkey, &prm), end, &s);
        if (done) {
            done = flush_ep(end, &fs);
            if (s == UCS_OK) s = fs;
        }
        printf("put: %s\n", st_str(done, s));
        fflush(stdout);
    }

    memset(&prm, 0, sizeof prm);
    done = wait_req(ucp_get_nbx(g_ep, small, sizeof small, 0x1000, rkey, &prm), now_s() + 3.0, &s);
    printf("get 0x1000: %s\n", st_str(done, s));
    if (done && s == UCS_OK) print_text("get 0x1000 returned: ", small, sizeof small);
    fflush(stdout);

    if (!g_left) {
        ucp_rkey_destroy(rkey);
        ucp_mem_unmap(g_ctx, memh);
    }
    finish();
    if (!g_left) free(buf);
}

/* 2. Requests for ranges without the secret: what answers? */
static void mode_probe(uint64_t base, uint64_t span, uint64_t count) {
    uint8_t secret[SECRET_BYTES];
    uint64_t k, stepb = span / count;
    unsigned long long sent;
    if (stepb < 64) stepb = 64;
    if (rand_bytes(secret, sizeof secret)) setup_fail("probe", "/dev/urandom");
    slots_init();
    for (k = 0; k < count; k++) {
        int i = slot_get();
        uint64_t raddr = base + (k * stepb) % span;
        if (i < 0) { printf("probe: no send completed in %.0f s, stopped sending\n", SLOT_WAIT_S); break; }
        build_req(g_slots[i].buf, secret, k + 1, rnd64(), raddr, 64, 0, 1000000000ull, 1, 0);
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
        ucp_worker_progress(g_wrk);
    }
    sent = g_sent;
    progress_for(2.0);
    print_errors("probe");
    printf("probe: sent %llu, replies %llu\n", sent, g_replies);
    if (g_replies)
        printf("probe: replies with data %llu, refused %llu, rendezvous %llu, malformed %llu\n",
               g_replies_ok, g_replies_refused, g_replies_rndv, g_replies_odd);
    if (g_busy) printf("probe: %u sends not completed\n", g_busy);
    finish();
}

/* 3. Notifications without the secret, and malformed ones. */
static void mode_notify(uint64_t count, uint64_t id0) {
    uint8_t secret[SECRET_BYTES];
    uint64_t k;
    if (rand_bytes(secret, sizeof secret)) setup_fail("notify", "/dev/urandom");
    slots_init();
    for (k = 0; k < count + 10; k++) {
        int i = slot_get();
        uint8_t *b;
        size_t n = NOTIFY_BYTES;
        if (i < 0) { printf("notify: no send completed in %.0f s, stopped sending\n", SLOT_WAIT_S); break; }
        b = g_slots[i].buf;
        if (k < count) {
            build_notify(b, NOTIFY_MAGIC, secret, id0 + k, 0, 1, "rogue");
        } else {
            uint64_t m = k - count;     /* the malformed ones */
            build_notify(b, NOTIFY_MAGIC, secret, id0 + k, 0, 1, "rogue");
            if (m < 4) {
                put32(b, 0x4e435659u);                  /* wrong magic */
            } else if (m < 7) {
                n = 16;                                 /* truncated */
            } else {
                memset(b + NOTIFY_BYTES, 'A', 200 - NOTIFY_BYTES);
                n = 200;                                /* oversized */
            }
        }
        am_send(i, AM_NOTIFY, NULL, 0, b, n, 0);
        ucp_worker_progress(g_wrk);
    }
    drain(now_s() + 5.0);
    print_errors("notify");
    printf("notify: sent %llu\n", g_sent);
    if (g_busy) printf("notify: %u sends not completed in 5 s\n", g_busy);
    finish();
}

/* 4. One notification with the secret: a holder of the metadata. */
static void mode_notify_secret(const uint8_t *secret, uint64_t id, uint32_t rank, uint32_t tp, const char *name) {
    static uint8_t msg[NOTIFY_BYTES];
    ucp_request_param_t prm;
    double end = now_s() + 5.0;
    ucs_status_t s;
    int done;
    build_notify(msg, NOTIFY_MAGIC, secret, id, rank, tp, name);
    memset(&prm, 0, sizeof prm);
    done = wait_req(ucp_am_send_nbx(g_ep, AM_NOTIFY, NULL, 0, msg, sizeof msg, &prm), end, &s);
    if (done && s == UCS_OK) done = flush_ep(end, &s);     /* delivered, not just buffered */
    printf("notify-secret: sent %s\n", st_str(done, s));
    finish();
}

/* 5. Forged replies at a reader. */
static void mode_replies(uint64_t count) {
    static uint8_t data[64];
    uint64_t k;
    memset(data, 0xEE, sizeof data);
    slots_init();
    for (k = 0; k < count; k++) {
        int i = slot_get();
        uint8_t secret[SECRET_BYTES];
        uint64_t gen = 1 + k % 64, idx = k / 64, a = rnd64(), b = rnd64();
        uint32_t status = ((idx ^ k) & 3) == 3 ? 1u : 0u;   /* a quarter, spread over gens */
        if (i < 0) { printf("replies: no send completed in %.0f s, stopped sending\n", SLOT_WAIT_S); break; }
        memcpy(secret, &a, 8);
        memcpy(secret + 8, &b, 8);
        build_rep(g_slots[i].buf, secret, (gen << 32) | idx, rnd64(), 0, 64, status);
        am_send(i, AM_REPLY, g_slots[i].buf, REP_BYTES, data, sizeof data, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
        ucp_worker_progress(g_wrk);
    }
    drain(now_s() + 5.0);
    print_errors("replies");
    printf("replies: sent %llu\n", g_sent);
    if (g_busy) printf("replies: %u sends not completed in 5 s\n", g_busy);
    finish();
}

/* 6. A holder of the secret that stops taking replies. */
static void mode_stall(const uint8_t *secret, uint64_t raddr, uint64_t len, uint64_t count, uint64_t seconds) {
    double end = now_s() + 10.0;
    uint64_t k;
    slots_init();
    for (k = 0; k < count && now_s() < end; k++) {
        int i = slot_get_until(end);
        if (i < 0) break;
        build_req(g_slots[i].buf, secret, k + 1, rnd64(), raddr, len, 0, 3600ull * 1000000000ull, 1, 0);
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
    }
    drain(end);
    print_errors("stall");
    printf("stall: sent %llu\n", g_sent);
    if (g_busy) printf("stall: %u sends not completed\n", g_busy);
    printf("stall: replies taken while sending %llu; sleeping %llu s without progress\n", g_replies, (unsigned long long)seconds);
    if (g_ep_status != UCS_OK) printf("ep error: %s\n", ucs_status_string(g_ep_status));
    fflush(stdout);
    {
        uint64_t s;
        for (s = 0; s < seconds; s++) nap_ns(1000000000L);
    }
    printf("rogue: done\n");
    done_exit(0);
}

/* 7. Rendezvous-sized messages at each of kvx's ids. */
static void mode_rndv(uint64_t bytes) {
    static const unsigned ids[3] = { AM_NOTIFY, AM_GET, AM_REPLY };
    static uint8_t req[REQ_BYTES], rep[REP_BYTES];
    uint8_t secret[SECRET_BYTES];
    uint8_t *payload;
    int k;
    if (rand_bytes(secret, sizeof secret)) setup_fail("rndv", "/dev/urandom");
    if (!(payload = (uint8_t *)malloc((size_t)bytes))) setup_fail("rndv", "out of memory");
    memset(payload, 0xAB, (size_t)bytes);
    build_req(req, secret, 1, rnd64(), 0x1000, 64, 0, 1000000000ull, 1, 0);
    build_rep(rep, secret, (1ull << 32) | 0, rnd64(), 0, bytes, 0);
    for (k = 0; k < 3; k++) {
        ucp_request_param_t prm;
        const void *hdr = NULL;
        size_t hlen = 0;
        ucs_status_t s;
        int done;
        memset(&prm, 0, sizeof prm);
        prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
        prm.flags = UCP_AM_SEND_FLAG_RNDV;
        if (ids[k] == AM_GET) { hdr = req; hlen = sizeof req; prm.flags |= UCP_AM_SEND_FLAG_REPLY; }
        if (ids[k] == AM_REPLY) { hdr = rep; hlen = sizeof rep; }
        done = wait_req(ucp_am_send_nbx(g_ep, ids[k], hdr, hlen, payload, (size_t)bytes, &prm), now_s() + 5.0, &s);
        printf("rndv 0x%x: %s\n", ids[k], st_str(done, s));
        fflush(stdout);
    }
    if (g_replies) printf("rndv: replies %llu\n", g_replies);
    finish();
    if (!g_left) free(payload);
}

/* 8. A holder of the secret that dies mid-read. */
static void mode_conns(const char *addr_file, uint64_t n, uint64_t seconds, const uint8_t *holder, uint64_t raddr, uint64_t region) {
    ucp_ep_h eps[8];
    uint8_t secret[SECRET_BYTES], *addr;
    size_t alen = 0;
    uint64_t k;
    double end;
    if (!(addr = read_file(addr_file, &alen))) setup_fail("address file", addr_file);
    if (rand_bytes(secret, sizeof secret)) setup_fail("conns", "/dev/urandom");
    if (holder) memcpy(secret, holder, sizeof secret);
    eps[0] = g_ep;
    for (k = 1; k < n; k++) {
        ucp_ep_params_t ep;
        ucs_status_t s, fs;
        memset(&ep, 0, sizeof ep);
        ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.address = (const ucp_address_t *)addr;
        ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
        ep.err_handler.cb = on_ep_error;
        if ((s = ucp_ep_create(g_wrk, &ep, &eps[k])) != UCS_OK) setup_fail("ucp_ep_create", ucs_status_string(s));
        g_ep = eps[k];
        if (!flush_ep(now_s() + 5.0, &fs) || fs != UCS_OK) setup_fail("connect (flush)", "an endpoint after the first");
    }
    free(addr);
    printf("conns: %llu connected\n", (unsigned long long)n);
    fflush(stdout);
    slots_init();
    end = now_s() + (double)seconds;
    for (k = 0; now_s() < end; k++) {
        int i = slot_get();
        if (i < 0) break;
        g_ep = eps[k % n];
        if (holder) {
            uint64_t part = region < (1ull << 20) ? region : (1ull << 20);
            build_req(g_slots[i].buf, secret, k + 1, rnd64(), raddr + (k * 4096) % (region - part + 1), part, 0, 10ull * 1000000000ull, 1, 0);
        } else {
            build_req(g_slots[i].buf, secret, k + 1, rnd64(), 0x10000, 64, 0, 1000000000ull, 1, 0);
        }
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
        ucp_worker_progress(g_wrk);
    }
    g_ep = eps[0];
    printf("conns: sent %llu\n", (unsigned long long)g_sent);
    print_errors("conns");
    finish();
}

static void mode_burst(const uint8_t *secret, uint64_t raddr, uint64_t region) {
    uint64_t k, part = region < (1ull << 20) ? region : (1ull << 20), rstride = (region / 4096) & ~(uint64_t)63;
    uint64_t id = 1, room = region - part + 1;
    int i;
    slots_init();
    for (k = 0; k < 100; k++) {            /* outside the region: refused */
        uint64_t a, n = 64;
        switch (k % 5) {
        case 0: a = raddr + region + k * 64; break;                  /* past its end */
        case 1: a = raddr >= 64 * (k + 1) ? raddr - 64 * (k + 1) : 0; break; /* before it */
        case 2: a = raddr + region - 32; break;                      /* across its end */
        case 3: a = UINT64_MAX - 16; break;                          /* wraps */
        default: a = raddr; n = region + 64 * (k + 1); break;        /* longer than it */
        }
        if ((i = slot_get()) < 0) break;
        build_req(g_slots[i].buf, secret, id++, rnd64(), a, n, 0, 10ull * 1000000000ull, 1, 0);
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
    }
    for (k = 0; k < 16; k++) {             /* 1 MiB each (or the region), within it */
        uint64_t off = (k * part) % room;
        if ((i = slot_get()) < 0) break;
        build_req(g_slots[i].buf, secret, id++, rnd64(), raddr + off, part, k * part, 10ull * 1000000000ull, 1, 0);
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
    }
    if (rstride >= 64) {
        for (k = 0; k < 4; k++) {          /* gathers of 4096 pieces */
            if ((i = slot_get()) < 0) break;
            build_req(g_slots[i].buf, secret, id++, rnd64(), raddr, 64, k * 4096 * 64, 10ull * 1000000000ull, 4096, rstride);
            am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
        }
    } else {
        printf("burst: region too small for gathers (stride %llu < 64), skipped\n", (unsigned long long)rstride);
    }
    progress_for(0.05);
    print_errors("burst");
    printf("burst: sent %llu\n", g_sent);
    printf("burst: replies %llu in 50 ms; exiting without cleanup\n", g_replies);
    if (g_ep_status != UCS_OK) printf("ep error: %s\n", ucs_status_string(g_ep_status));
    printf("rogue: done\n");
    done_exit(0);
}

/* 9. Many ranges in one request: each is checked, and the request is
   answered whole or refused whole; malformed range data is dropped. */
static void put_range(uint8_t *b, uint64_t raddr, uint64_t len, uint64_t count, uint64_t rstride) {
    put64(b, raddr); put64(b + 8, len); put64(b + 16, count); put64(b + 24, rstride);
}
static void mode_ranges(const uint8_t *secret, uint64_t raddr, uint64_t region, uint64_t canary) {
    static uint8_t data[6][8192];
    static const size_t dlen[6] = { 64, 32, 32, 32, 33, 8192 };
    uint64_t ttl = 10ull * 1000000000ull, in = region > 8192 ? 4096 : region / 2;
    int i, k;
    if (region < 256) { printf("ranges: region too small (%llu bytes)\n", (unsigned long long)region); printf("rogue: done\n"); done_exit(0); }
    slots_init();
    put_range(data[0], raddr + in, 64, 1, 0);             /* valid: 3 ranges in all */
    put_range(data[0] + 32, raddr + 128, 64, 1, 0);
    put_range(data[1], canary, 44, 1, 0);                 /* the owner's memory it never registered */
    put_range(data[2], UINT64_MAX - 16, 64, 1, 0);        /* wraps */
    put_range(data[3], raddr, 1, 1, 0);                   /* one piece more than a request may hold */
    memset(data[4], 0x5a, 33);                            /* not whole ranges */
    for (k = 0; k < 256; k++) put_range(data[5] + 32 * k, raddr, 1, 1, 0);  /* more ranges than a request may name */
    for (k = 0; k < 6; k++) {
        if ((i = slot_get()) < 0) break;
        if (k == 3) build_req(g_slots[i].buf, secret, 900 + (uint64_t)k, rnd64(), raddr, 1, 0, ttl, 4096, 0);
        else build_req(g_slots[i].buf, secret, 900 + (uint64_t)k, rnd64(), raddr, 64, 0, ttl, 1, 0);
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, data[k], dlen[k], UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
    }
    progress_for(2.0);
    print_errors("ranges");
    printf("ranges: sent %llu\n", g_sent);
    printf("ranges: replies with data %llu (%llu bytes), refused %llu, rendezvous %llu, malformed %llu\n",
           g_replies_ok, g_reply_bytes, g_replies_refused, g_replies_rndv, g_replies_odd);
    finish();
}

/* 10. Replies in chunks of the size the request names: the most chunks a
   request can make, uneven sizes, and sizes below the owner's least. */
static void mode_chunks(const uint8_t *secret, uint64_t raddr, uint64_t len) {
    static const uint64_t rb[6] = { 16384, 20000, UINT64_MAX, 16384, 1, 16383 };
    uint64_t ttl = 10ull * 1000000000ull;
    int i, k;
    slots_init();
    for (k = 0; k < 6; k++) {
        if ((i = slot_get()) < 0) break;
        if (k == 0) build_req(g_slots[i].buf, secret, 950, rnd64(), raddr, len, 0, ttl, 1, 0);
        else if (k == 1) build_req(g_slots[i].buf, secret, 951, rnd64(), raddr, 65536, 0, ttl, 1, 0);
        else if (k == 3) build_req(g_slots[i].buf, secret, 953, rnd64(), raddr, 64, 0, ttl, 4, 4096);
        else build_req(g_slots[i].buf, secret, 950 + (uint64_t)k, rnd64(), raddr, 4096, 0, ttl, 1, 0);
        put64(g_slots[i].buf + 88, rb[k]);
        am_send(i, AM_GET, g_slots[i].buf, REQ_BYTES, NULL, 0, UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER);
    }
    progress_for(2.0);
    print_errors("chunks");
    printf("chunks: sent %llu\n", g_sent);
    printf("chunks: replies with data %llu (%llu bytes), refused %llu, malformed %llu, largest %llu\n",
           g_replies_ok, g_reply_bytes, g_replies_refused, g_replies_odd, g_reply_max);
    finish();
}

/*--- main ------------------------------------------------------------------*/

int main(int argc, char **argv) {
    const char *mode;
    uint8_t secret[SECRET_BYTES];
    uint64_t seed;

    if (argc > 0 && argv[0] && *argv[0]) g_prog = argv[0];
    if (argc < 3) usage("a mode and an address file are needed");
    mode = argv[1];
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Arguments first: bad usage exits 2 before any UCX work. */
    if (!strcmp(mode, "rma")) {
        need_args(argc, 5);
        parse_u64(argv[3], 16, "CANARY_HEX is a hex address");
        if (parse_u64(argv[4], 0, "LEN is a number") - 1 >= (1ull << 30)) usage("LEN is 1 .. 1 GiB");
    } else if (!strcmp(mode, "probe")) {
        need_args(argc, 6);
        parse_u64(argv[3], 16, "BASE_HEX is a hex address");
        if (!parse_u64(argv[4], 0, "SPAN is a number")) usage("SPAN must be > 0");
        if (!parse_u64(argv[5], 0, "COUNT is a number")) usage("COUNT must be > 0");
    } else if (!strcmp(mode, "notify")) {
        need_args(argc, 5);
        parse_u64(argv[3], 0, "COUNT is a number");
        parse_u64(argv[4], 0, "ID0 is a number");
    } else if (!strcmp(mode, "notify-secret")) {
        need_args(argc, 8);
        parse_secret(argv[3], secret);
        parse_u64(argv[4], 0, "ID is a number");
        if (parse_u64(argv[5], 0, "RANK is a number") > UINT32_MAX) usage("RANK is a u32");
        if (parse_u64(argv[6], 0, "TP is a number") > UINT32_MAX) usage("TP is a u32");
        if (!*argv[7] || strlen(argv[7]) > NAME_FIELD - 1) usage("NAME is 1 .. 63 bytes");
    } else if (!strcmp(mode, "replies")) {
        need_args(argc, 4);
        parse_u64(argv[3], 0, "COUNT is a number");
    } else if (!strcmp(mode, "stall")) {
        need_args(argc, 8);
        parse_secret(argv[3], secret);
        parse_u64(argv[4], 16, "RADDR_HEX is a hex address");
        parse_u64(argv[5], 0, "LEN is a number");
        parse_u64(argv[6], 0, "COUNT is a number");
        if (parse_u64(argv[7], 0, "SECONDS is a number") > 86400) usage("SECONDS is at most 86400");
    } else if (!strcmp(mode, "rndv")) {
        uint64_t b;
        need_args(argc, 4);
        b = parse_u64(argv[3], 0, "BYTES is a number");
        if (b < (1ull << 20) || b > (1ull << 30)) usage("BYTES is 1 MiB .. 1 GiB");
    } else if (!strcmp(mode, "ranges")) {
        need_args(argc, 7);
        parse_secret(argv[3], secret);
        parse_u64(argv[4], 16, "RADDR_HEX is a hex address");
        if (!parse_u64(argv[5], 0, "REGION_LEN is a number")) usage("REGION_LEN must be > 0");
        parse_u64(argv[6], 16, "CANARY_HEX is a hex address");
    } else if (!strcmp(mode, "chunks")) {
        uint64_t n;
        need_args(argc, 6);
        parse_secret(argv[3], secret);
        parse_u64(argv[4], 16, "RADDR_HEX is a hex address");
        n = parse_u64(argv[5], 0, "LEN is a number");
        if (n < 65536 || n > (1u << 20)) usage("LEN is 64 KiB .. 1 MiB");
    } else if (!strcmp(mode, "conns")) {
        uint64_t n;
        if (argc != 5 && argc != 8) usage("wrong number of arguments for this mode");
        if (argc == 8) {
            parse_secret(argv[5], secret);
            parse_u64(argv[6], 16, "RADDR_HEX is a hex address");
            if (!parse_u64(argv[7], 0, "REGION_LEN is a number")) usage("REGION_LEN must be > 0");
        }
        n = parse_u64(argv[3], 0, "N is a number");
        if (n < 2 || n > 8) usage("N is 2 .. 8");
        if (parse_u64(argv[4], 0, "SECONDS is a number") > 3600) usage("SECONDS is at most 3600");
    } else if (!strcmp(mode, "burst")) {
        need_args(argc, 6);
        parse_secret(argv[3], secret);
        parse_u64(argv[4], 16, "RADDR_HEX is a hex address");
        if (!parse_u64(argv[5], 0, "REGION_LEN is a number")) usage("REGION_LEN must be > 0");
    } else {
        usage("unknown mode");
    }

    if (rand_bytes(&seed, sizeof seed)) setup_fail("random", "cannot read /dev/urandom");
    g_rng = seed;
    connect_target(argv[2]);

    if (!strcmp(mode, "rma")) {
        mode_rma(parse_u64(argv[3], 16, ""), parse_u64(argv[4], 0, ""));
    } else if (!strcmp(mode, "probe")) {
        mode_probe(parse_u64(argv[3], 16, ""), parse_u64(argv[4], 0, ""), parse_u64(argv[5], 0, ""));
    } else if (!strcmp(mode, "notify")) {
        mode_notify(parse_u64(argv[3], 0, ""), parse_u64(argv[4], 0, ""));
    } else if (!strcmp(mode, "notify-secret")) {
        mode_notify_secret(secret, parse_u64(argv[4], 0, ""), (uint32_t)parse_u64(argv[5], 0, ""),
                           (uint32_t)parse_u64(argv[6], 0, ""), argv[7]);
    } else if (!strcmp(mode, "replies")) {
        mode_replies(parse_u64(argv[3], 0, ""));
    } else if (!strcmp(mode, "stall")) {
        mode_stall(secret, parse_u64(argv[4], 16, ""), parse_u64(argv[5], 0, ""), parse_u64(argv[6], 0, ""),
                   parse_u64(argv[7], 0, ""));
    } else if (!strcmp(mode, "rndv")) {
        mode_rndv(parse_u64(argv[3], 0, ""));
    } else if (!strcmp(mode, "ranges")) {
        mode_ranges(secret, parse_u64(argv[4], 16, ""), parse_u64(argv[5], 0, ""), parse_u64(argv[6], 16, ""));
    } else if (!strcmp(mode, "chunks")) {
        mode_chunks(secret, parse_u64(argv[4], 16, ""), parse_u64(argv[5], 0, ""));
    } else if (!strcmp(mode, "conns")) {
        mode_conns(argv[2], parse_u64(argv[3], 0, ""), parse_u64(argv[4], 0, ""), argc == 8 ? secret : NULL,
                   argc == 8 ? parse_u64(argv[6], 16, "") : 0, argc == 8 ? parse_u64(argv[7], 0, "") : 0);
    } else {
        mode_burst(secret, parse_u64(argv[4], 16, ""), parse_u64(argv[5], 0, ""));
    }
    if (g_urandom >= 0) close(g_urandom);
    return 0;
}
