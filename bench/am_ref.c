/*
    am_ref -- UCX's active messages over kvx's memory: the reference for
    make bench's UCX rows that moves the same bytes between the same kind of
    memory as kvx_bench does, without kvx.

    ucx_perftest -t ucp_am_bw sends one buffer again and again, and its
    receiver (with -y) copies every message into one buffer: both stay in
    the CPU's cache. kvx's owner sends blocks from anywhere in a cache larger
    than the CPU's caches, and its reader copies each reply into a block
    anywhere in its own. am_ref streams ucp_am_send_nbx messages of --size
    bytes, eager, from random blocks of a --region of memory, --outstanding
    at a time, and its receiver copies each into a random block of its own
    region; --hot sends one block again and again and --no-copy leaves each
    message where UCX received it, as ucx_perftest does.

        am_ref --listen ADDR:PORT [options]     the sender (kvx's owner side)
        am_ref --connect ADDR:PORT [options]    the receiver (the reader side)
        options: [--size BYTES] [--region BYTES] [--outstanding N]
                 [--pass BYTES] [--iters N] [--warmup N] [--hot] [--no-copy]
                 [--json FILE]

    A TCP socket carries the two worker addresses, then the receiver's word
    that it has all. Both sides busy-poll (as ucx_perftest does) with
    endpoints that handle peer failure (its -e). The receiver times --iters
    passes of --pass bytes after --warmup passes left out, and checks each
    message: its length, and the sequence number in its header.

    Build: cc -O2 -std=c99 -D_GNU_SOURCE bench/am_ref.c -o build/am_ref -lucp -lucs
    Exit status 0 with "TEST PASSED", 1 when a message was wrong or did not
    come within 60 s, 2 for setup.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
/* UCX 1.22's headers compare signed with unsigned in a macro */
#if defined(__GNUC__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include <ucp/api/ucp.h>
#if defined(__GNUC__)
#  pragma GCC diagnostic pop
#endif
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define AM_REF_ID 17
#define DEADLINE_S 60.0

typedef struct opts {
    const char *listen, *connect, *json;
    size_t size, region, outstanding, pass;
    unsigned iters, warmup;
    int hot, no_copy;
} opts;

typedef struct state {
    const opts *o;
    uint8_t *mem;
    size_t nblocks, inflight;
    uint64_t rng;
    /* the receiver's count */
    uint64_t next_seq, bad, got;
    double t_start, t_end;
} state;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t next_rand(state *s) {  /* xorshift64: cheap beside a 4 KiB copy */
    s->rng ^= s->rng << 13;
    s->rng ^= s->rng >> 7;
    s->rng ^= s->rng << 17;
    return s->rng;
}

static size_t messages(const opts *o) { return (size_t)(o->warmup + o->iters) * (o->pass / o->size); }

static void sent(void *req, ucs_status_t status, void *user) {
    state *s = (state *)user;
    if (status != UCS_OK) { fprintf(stderr, "am_ref: a send failed: %s\n", ucs_status_string(status)); s->bad++; }
    s->inflight--;
    ucp_request_free(req);
}

static ucs_status_t on_message(void *arg, const void *header, size_t header_length, void *data, size_t length,
                               const ucp_am_recv_param_t *param) {
    state *s = (state *)arg;
    uint64_t seq = 0;
    size_t per_pass = s->o->pass / s->o->size;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || header_length != sizeof seq || length != s->o->size) {
        s->bad++;
        return UCS_OK;  /* a rendezvous descriptor is released by UCX when this returns UCS_OK */
    }
    memcpy(&seq, header, sizeof seq);
    if (seq != s->next_seq) s->bad++;
    s->next_seq = seq + 1;
    if (!s->o->no_copy) memcpy(s->mem + (next_rand(s) % s->nblocks) * s->o->size, data, length);
    s->got++;
    if (s->o->warmup && s->got == (uint64_t)s->o->warmup * per_pass) s->t_start = now_s();  /* else from the start */
    if (s->got == messages(s->o)) s->t_end = now_s();
    return UCS_OK;
}

static int full_io(int fd, void *buf, size_t n, int out) {
    uint8_t *p = (uint8_t *)buf;
    while (n) {
        ssize_t k = out ? write(fd, p, n) : read(fd, p, n);
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int split(const char *hp, struct sockaddr_in *sa) {
    char host[64];
    const char *c = strrchr(hp, ':');
    if (!c || (size_t)(c - hp) >= sizeof host) return -1;
    memcpy(host, hp, (size_t)(c - hp));
    host[c - hp] = 0;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)atoi(c + 1));
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

/* The other side's TCP socket: accepted (--listen) or connected (--connect, 10 s of tries). */
static int rendezvous(const opts *o) {
    struct sockaddr_in sa;
    int fd, i, one = 1;
    if (split(o->listen ? o->listen : o->connect, &sa)) { fprintf(stderr, "am_ref: want ADDR:PORT\n"); return -1; }
    if (o->listen) {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct pollfd pf;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 1)) { perror("am_ref: listen"); return -1; }
        pf.fd = l; pf.events = POLLIN; pf.revents = 0;
        fd = poll(&pf, 1, 30000) == 1 ? accept(l, NULL, NULL) : -1;  /* a receiver within 30 s */
        if (fd < 0) fprintf(stderr, "am_ref: no receiver came to %s\n", o->listen);
        close(l);
        return fd;
    }
    for (i = 0; i < 200; i++) {
        if ((fd = socket(AF_INET, SOCK_STREAM, 0)) < 0) return -1;
        if (!connect(fd, (struct sockaddr *)&sa, sizeof sa)) return fd;
        close(fd);
        usleep(50000);
    }
    fprintf(stderr, "am_ref: cannot connect to %s\n", o->connect);
    return -1;
}

static int parse(int argc, char **argv, opts *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->size = 256u << 10; o->region = 128u << 20; o->outstanding = 64; o->pass = 64u << 20; o->iters = 5; o->warmup = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--hot")) { o->hot = 1; continue; }
        if (!strcmp(a, "--no-copy")) { o->no_copy = 1; continue; }
        if (!v) { fprintf(stderr, "am_ref: %s needs a value\n", a); return -1; }
        i++;
        if (!strcmp(a, "--listen")) o->listen = v;
        else if (!strcmp(a, "--connect")) o->connect = v;
        else if (!strcmp(a, "--json")) o->json = v;
        else if (!strcmp(a, "--size")) o->size = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--region")) o->region = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--outstanding")) o->outstanding = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--pass")) o->pass = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--iters")) o->iters = (unsigned)strtoul(v, NULL, 0);
        else if (!strcmp(a, "--warmup")) o->warmup = (unsigned)strtoul(v, NULL, 0);
        else { fprintf(stderr, "am_ref: unknown option '%s'\n", a); return -1; }
    }
    if (!o->listen == !o->connect || !o->size || o->region < o->size || !o->outstanding || o->pass < o->size || !o->iters) {
        fprintf(stderr, "usage: am_ref --listen ADDR:PORT | --connect ADDR:PORT [--size BYTES] [--region BYTES] [--outstanding N]\n"
                        "              [--pass BYTES] [--iters N] [--warmup N] [--hot] [--no-copy] [--json FILE]\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    opts o;
    state s;
    ucp_params_t cp;
    ucp_worker_params_t wp;
    ucp_am_handler_param_t hp;
    ucp_ep_params_t ep;
    ucp_context_h ctx;
    ucp_worker_h worker;
    ucp_ep_h conn;
    ucp_address_t *addr;
    size_t addr_len;
    uint64_t len64, peer_len;
    void *peer;
    double deadline;
    int fd;
    if (parse(argc, argv, &o)) return 2;
    memset(&s, 0, sizeof s);
    s.o = &o;
    s.rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)o.size;
    s.nblocks = o.region / o.size;
    if (!(s.mem = (uint8_t *)aligned_alloc(4096, (s.nblocks * o.size + 4095) / 4096 * 4096))) { fprintf(stderr, "am_ref: out of memory\n"); return 2; }
    memset(s.mem, 0x5a, s.nblocks * o.size);  /* every page touched before the clock starts */
    memset(&cp, 0, sizeof cp);
    cp.field_mask = UCP_PARAM_FIELD_FEATURES;
    cp.features = UCP_FEATURE_AM;
    memset(&wp, 0, sizeof wp);
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    if (ucp_init(&cp, NULL, &ctx) != UCS_OK || ucp_worker_create(ctx, &wp, &worker) != UCS_OK) { fprintf(stderr, "am_ref: UCX setup failed\n"); return 2; }
    memset(&hp, 0, sizeof hp);
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = AM_REF_ID;
    hp.cb = on_message;
    hp.arg = &s;
    if (ucp_worker_set_am_recv_handler(worker, &hp) != UCS_OK || ucp_worker_get_address(worker, &addr, &addr_len) != UCS_OK) return 2;
    if ((fd = rendezvous(&o)) < 0) return 2;
    len64 = addr_len;
    if (full_io(fd, &len64, sizeof len64, 1) || full_io(fd, addr, addr_len, 1) || full_io(fd, &peer_len, sizeof peer_len, 0) ||
        peer_len > (1u << 20) || !(peer = malloc(peer_len)) || full_io(fd, peer, peer_len, 0)) {
        fprintf(stderr, "am_ref: the address exchange failed\n");
        return 2;
    }
    memset(&ep, 0, sizeof ep);
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = (const ucp_address_t *)peer;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    if (ucp_ep_create(worker, &ep, &conn) != UCS_OK) { fprintf(stderr, "am_ref: ucp_ep_create failed\n"); return 2; }
    deadline = now_s() + DEADLINE_S;
    if (o.listen) {  /* the sender */
        ucp_request_param_t rp;
        uint64_t seq, n = messages(&o), *hdr = (uint64_t *)calloc(n, sizeof *hdr);  /* each header until its send completes */
        char done;
        if (!hdr) { fprintf(stderr, "am_ref: out of memory\n"); return 2; }
        memset(&rp, 0, sizeof rp);
        rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
        rp.cb.send = sent;
        rp.user_data = &s;
        rp.flags = UCP_AM_SEND_FLAG_EAGER;  /* as kvx's replies */
        for (seq = 0; seq < n && !s.bad; seq++) {
            const uint8_t *src = s.mem + (o.hot ? 0 : next_rand(&s) % s.nblocks) * o.size;
            ucs_status_ptr_t sp;
            while (s.inflight >= o.outstanding && now_s() < deadline) ucp_worker_progress(worker);
            if (s.inflight >= o.outstanding) break;  /* the deadline: reported below */
            hdr[seq] = seq;
            sp = ucp_am_send_nbx(conn, AM_REF_ID, &hdr[seq], sizeof *hdr, src, o.size, &rp);
            if (UCS_PTR_IS_ERR(sp)) { fprintf(stderr, "am_ref: send: %s\n", ucs_status_string(UCS_PTR_STATUS(sp))); return 1; }
            if (sp) s.inflight++;
        }
        while (s.inflight && now_s() < deadline) ucp_worker_progress(worker);
        if (seq < n || s.inflight || s.bad) {
            fprintf(stderr, "am_ref: %llu of %llu messages sent, %zu of them not complete, %llu failed, after %.0f s at most\n",
                    (unsigned long long)seq, (unsigned long long)n, s.inflight, (unsigned long long)s.bad, DEADLINE_S);
            return 1;
        }
        if (full_io(fd, &done, 1, 0)) { fprintf(stderr, "am_ref: the receiver did not say it had all\n"); return 1; }
        printf("am_ref: sent %llu messages of %zu bytes\n", (unsigned long long)n, o.size);
        return 0;
    } else {  /* the receiver */
        double secs, gbps;
        uint64_t bytes = (uint64_t)o.iters * (o.pass / o.size) * o.size;
        char done = 1;
        s.t_start = now_s();
        while (!s.t_end && now_s() < deadline) ucp_worker_progress(worker);
        (void)full_io(fd, &done, 1, 1);
        if (!s.t_end) { printf("TEST FAILED: %llu of %llu messages came within %.0f s\n", (unsigned long long)s.got, (unsigned long long)messages(&o), DEADLINE_S); return 1; }
        secs = s.t_end - s.t_start;
        gbps = secs > 0 ? (double)bytes / secs / 1e9 : 0;
        printf("am_ref: %zu-byte messages from %s of %zu bytes, %s; %u passes of %zu bytes after %u: %.3f GB/s\n", o.size,
               o.hot ? "one block" : "random blocks", o.region, o.no_copy ? "left where UCX received them" : "each copied to a random block",
               o.iters, o.pass, o.warmup, gbps);
        if (o.json) {
            FILE *js = fopen(o.json, "w");
            if (js) {
                fprintf(js, "{\"tool\":\"am_ref\",\"size\":%zu,\"region\":%zu,\"outstanding\":%zu,\"hot\":%s,\"copy\":%s,\"total_bytes\":%llu,"
                            "\"seconds\":%.9f,\"gbps\":%.6f,\"wrong\":%llu}\n",
                        o.size, o.region, o.outstanding, o.hot ? "true" : "false", o.no_copy ? "false" : "true", (unsigned long long)bytes,
                        secs, gbps, (unsigned long long)s.bad);
                fclose(js);
            }
        }
        if (s.bad) { printf("TEST FAILED: %llu messages out of order or of the wrong size\n", (unsigned long long)s.bad); return 1; }
        printf("TEST PASSED: %llu messages, each of %zu bytes and in order\n", (unsigned long long)s.got, o.size);
        return 0;
    }
}
