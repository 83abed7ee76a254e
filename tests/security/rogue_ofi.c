/* SPDX-License-Identifier: MIT */
/*
    rogue_ofi.c -- a hostile libfabric peer, for kvx's security tests.

    A test harness starts a kvx "owner" on libfabric (FI_PROVIDER=tcp with
    FI_TCP_IFACE=lo, which opens "tcp;ofi_rxm", or FI_PROVIDER=shm) and
    hands this program only what an outsider could know: the owner's
    endpoint name (the bytes fi_getname returned for its serving endpoint,
    in a file), an address range and the owner's pid. This program then
    attacks, and prints one line per finding; the harness checks the
    owner's memory, liveness and counters and decides pass or fail.

    It uses libfabric's public fi_* API only: it neither includes nor links
    kvx. The notification format is written here by hand (below).

    Usage: rogue_ofi MODE NAME_FILE [args...]

      read  BASE_HEX OFFSET LEN PID GUESSES
          fi_read LEN bytes of the owner's region with guessed keys: first
          the old predictable scheme, key = (PID << 24) | k for k = 1 ..
          GUESSES, then GUESSES random keys (as wide as the domain's
          mr_key_size). The remote address is BASE_HEX + OFFSET where the
          provider's mr_mode has FI_MR_VIRT_ADDR (shm), OFFSET (from the
          start of the registration) where it has not (tcp;ofi_rxm). One
          read at a time, each given 1 s. tcp;ofi_rxm: the owner drops the
          connection on a wrong key (the read ends FI_ECANCELED) and the
          next reads end FI_ENOTCONN while rxm connects again; such a key
          was not tried yet, so it is posted again within its 1 s. After 5
          keys in a row without an answer (not posted, -FI_EAGAIN, or no
          completion, for 1 s each) the mode stops: the owner is gone or
          does not answer. Prints a summary (errors by kind), then
              read: tried N keys, S succeeded
          and, if any succeeded,
              read returned: <first 16 bytes, hex> with key 0x...
      write BASE_HEX OFFSET LEN PID GUESSES
          The same with LEN bytes of "ROGUE-WROTE-THIS" repeated. On
          tcp;ofi_rxm the write is fi_writemsg with FI_DELIVERY_COMPLETE, so
          that a completion means the owner took it (a plain fi_write
          completes once sent); on shm a plain fi_write, which completes
          once the bytes are in the owner's memory (FI_DELIVERY_COMPLETE
          would turn shm's CMA path off). Prints
              write: tried N keys, S succeeded
      notify COUNT ID0
          fi_send COUNT notifications with a wrong (random) secret, notify
          ids ID0 .. ID0+COUNT-1, then 10 malformed messages (16, 100 and 120
          bytes of junk; every other one starts with a valid notification
          header, so that it is the length that must refuse it). At most 64
          messages are out at a time; -FI_EAGAIN is met by progressing the
          queue and posting again, for at most 5 s (then it stops), and the
          sends still out at the end are waited for 5 s. Prints a line with
          the details, then "notify: sent N", N the messages whose send
          completed without error (COUNT + 10 where all went out; a send
          completion says the provider sent it, not that the owner took it).
      notify-secret SECRET_HEX ID RANK TP NAME
          One notification with the given secret (32 hex characters) and
          fields, sent as given (a NAME longer than the 63 bytes that fit
          keeps its length, at most 255, in the length byte). Prints
          "notify-secret: sent ok", or "sent failed (...)", "sent timeout (...)".

    Numbers: BASE_HEX is hex (0x optional); OFFSET, LEN, ID0, ID, RANK and
    TP decimal or 0x-hex; PID, GUESSES and COUNT decimal.

    The notification (104 bytes, little-endian): u32 magic 0x4e435658
    ("XVCN"), u16 version 2, u16 type 0, 16 bytes secret, u64 notify id,
    u32 rank, u32 tp_size, a 64-byte name field (byte 0 the length n, then
    n bytes, the rest zero). "notify" sends rank 0, tp_size 1, name "rogue".

    Setup is the owner's: fi_getinfo for FI_EP_RDM with FI_MSG, FI_SEND,
    FI_RECV, FI_RMA, FI_READ, FI_WRITE, FI_REMOTE_READ, mode FI_CONTEXT |
    FI_CONTEXT2, every mr_mode bit kvx handles, FI_THREAD_DOMAIN; libfabric's
    $FI_PROVIDER picks the provider and the first answer is taken. What the
    provider asks for is honored: local buffers are registered under
    FI_MR_LOCAL (or FI_MR_HMEM), bound to the endpoint and enabled under
    FI_MR_ENDPOINT, keys are requested unless FI_MR_PROV_KEY, and a guessed
    key is mapped with fi_mr_map_raw under FI_MR_RAW. The owner's name is
    inserted into an FI_AV_TABLE address vector.

    Every wait is bounded: the completion queue is polled (fi_cq_read,
    fi_cq_readerr) with 50 us naps until a deadline. An operation that never
    completes cannot be canceled, so after one the attack moves to a fresh
    endpoint (at most 8) and a fresh buffer; the old endpoints are still
    polled, so a late completion is still counted, but never closed
    (libfabric 1.17's tcp may free a partly received read twice on close).

    What shm does (libfabric 1.17, seen with this program): where the
    kernel lets one process read another's memory (same user, ptrace
    allowed), shm's fi_read and plain fi_write are process_vm_readv/writev
    done by the initiator itself, and the owner's key is never checked: any
    key succeeds, and the summary says so ("random keys succeeded: the key
    was not checked"). Without that path (FI_SHM_DISABLE_CMA=1, or
    FI_DELIVERY_COMPLETE), a wrong key gets no answer at all: timeouts.

    Output: one line per finding, stdout flushed after each, the last line
    "rogue: done". Exit status: 0 after running a mode (whatever it found),
    2 on bad usage (arguments, an unreadable or empty NAME_FILE), 3 if
    setup fails (no provider, no endpoint, the name not accepted).

    Build: cc -O1 -g -std=c99 -D_GNU_SOURCE -Wall -Wextra -pedantic -Werror \
           tests/security/rogue_ofi.c -o rogue_ofi $(pkg-config --cflags --libs libfabric)
*/
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define API_VERSION FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION)

#define EXIT_USAGE 2
#define EXIT_SETUP 3

#define MAX_SILENT 5u            /* read/write stop after this many keys in a row without an answer */
#define MAX_CONNS 8             /* endpoints opened, at most: a fresh one after each timeout */
#define MAX_NAME_BYTES 4096     /* an endpoint name longer than this is not one */
#define RMA_WAIT_NS 1000000000ull       /* each read or write: 1 s */
#define SEND_WAIT_NS 5000000000ull      /* a send that meets -FI_EAGAIN: 5 s */
#define DRAIN_WAIT_NS 5000000000ull     /* sends still out at the end: 5 s */
#define NAP_NS 50000l                   /* between polls: 50 us */
#define NOTIFY_WINDOW 64u       /* sends out at a time */
#define NOTIFY_BYTES 104u
#define NOTIFY_MAGIC 0x4e435658u
#define NOTIFY_VERSION 2u
#define SLOT_BYTES 128u         /* a send buffer: the largest malformed message is 120 */
#define N_MALFORMED 10u

/*--- output ------------------------------------------------------------------*/

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

static int usage(void) {
    fprintf(stderr,
            "usage: rogue_ofi MODE NAME_FILE [args...]\n"
            "  read          NAME_FILE BASE_HEX OFFSET LEN PID GUESSES\n"
            "  write         NAME_FILE BASE_HEX OFFSET LEN PID GUESSES\n"
            "  notify        NAME_FILE COUNT ID0\n"
            "  notify-secret NAME_FILE SECRET_HEX ID RANK TP NAME\n"
            "  provider: $FI_PROVIDER (tcp with FI_TCP_IFACE=lo, or shm)\n");
    return EXIT_USAGE;
}

/*--- time and randomness -----------------------------------------------------*/

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void nap(void) {
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = NAP_NS;
    nanosleep(&ts, NULL);
}

static uint64_t rng_state;

static void rng_seed(void) {
    int fd = open("/dev/urandom", O_RDONLY);
    uint64_t s = 0;
    if (fd >= 0) {
        if (read(fd, &s, sizeof s) != (ssize_t)sizeof s) s = 0;
        close(fd);
    }
    rng_state = s ^ now_ns() ^ ((uint64_t)getpid() << 32);
}

static uint64_t rng64(void) {   /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_fill(uint8_t *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) p[i] = (uint8_t)(rng64() >> 56);
}

/*--- arguments ---------------------------------------------------------------*/

static int parse_u64(const char *s, int base, uint64_t *v) {
    char *end;
    if (!s || !*s || *s == '-') return -1;
    errno = 0;
    *v = strtoull(s, &end, base);
    return errno || *end ? -1 : 0;
}

static int parse_u32(const char *s, int base, uint32_t *v) {
    uint64_t x;
    if (parse_u64(s, base, &x) || x > 0xffffffffull) return -1;
    *v = (uint32_t)x;
    return 0;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int parse_secret(const char *s, uint8_t out[16]) {
    size_t i;
    if (strlen(s) != 32) return -1;
    for (i = 0; i < 16; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

/* The owner's name: the raw bytes fi_getname returned. */
static int read_name(const char *path, uint8_t **name, size_t *len) {
    FILE *f = fopen(path, "rb");
    uint8_t *b;
    size_t n;
    if (!f) { fprintf(stderr, "rogue: %s: %s\n", path, strerror(errno)); return -1; }
    b = (uint8_t *)malloc(MAX_NAME_BYTES + 1);
    if (!b) { fclose(f); return -1; }
    n = fread(b, 1, MAX_NAME_BYTES + 1, f);
    fclose(f);
    if (n == 0 || n > MAX_NAME_BYTES) {
        fprintf(stderr, "rogue: %s: %zu bytes is not an endpoint name\n", path, n);
        free(b);
        return -1;
    }
    *name = b;
    *len = n;
    return 0;
}

enum { M_READ, M_WRITE, M_NOTIFY, M_NOTIFY_SECRET };

static struct {
    int mode;
    uint64_t base, off, len, pid, guesses;      /* read, write */
    uint64_t count, id;                         /* notify (id: ID0), notify-secret */
    uint8_t secret[16];
    uint32_t rank, tp;
    const char *name;
} args;

/* Everything checked before any fabric is opened: bad usage is exit 2. */
static int parse_args(int argc, char **argv) {
    const char *m;
    char **a = argv + 3;
    int n = argc - 3;
    if (argc < 3) return -1;
    m = argv[1];
    if (!strcmp(m, "read") || !strcmp(m, "write")) {
        args.mode = !strcmp(m, "read") ? M_READ : M_WRITE;
        return n != 5 || parse_u64(a[0], 16, &args.base) || parse_u64(a[1], 0, &args.off) || parse_u64(a[2], 0, &args.len) ||
               parse_u64(a[3], 10, &args.pid) || parse_u64(a[4], 10, &args.guesses) || args.len == 0 || args.len > (1ull << 30) ||
               args.guesses > (1ull << 20) || args.pid > 0xffffffffull ? -1 : 0;
    }
    if (!strcmp(m, "notify")) {
        args.mode = M_NOTIFY;
        return n != 2 || parse_u64(a[0], 10, &args.count) || parse_u64(a[1], 0, &args.id) ? -1 : 0;
    }
    if (!strcmp(m, "notify-secret")) {
        args.mode = M_NOTIFY_SECRET;
        args.name = n == 5 ? a[4] : NULL;
        return n != 5 || parse_secret(a[0], args.secret) || parse_u64(a[1], 0, &args.id) || parse_u32(a[2], 0, &args.rank) ||
               parse_u32(a[3], 0, &args.tp) ? -1 : 0;
    }
    return -1;
}

static void hex(char *out, const uint8_t *p, size_t n) {
    static const char d[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < n; i++) { out[2 * i] = d[p[i] >> 4]; out[2 * i + 1] = d[p[i] & 15]; }
    out[2 * n] = 0;
}

/*--- the fabric ----------------------------------------------------------------*/

/* One endpoint to the owner, with its own queue and address vector. */
typedef struct conn {
    struct fid_ep *ep;
    struct fid_cq *cq;
    struct fid_av *av;
    fi_addr_t dest;
} conn;

static struct fi_info *info;
static struct fid_fabric *fabric;
static struct fid_domain *domain;
static uint64_t mr_mode, key_mask;
static conn conns[MAX_CONNS];
static unsigned nconns;
static uint8_t *owner_name;
static size_t owner_name_len;

/* What a completion's context points at: fi_context2 first, the provider's
   while the operation is out (FI_CONTEXT / FI_CONTEXT2 mode). */
typedef struct op {
    struct fi_context2 fc;
    int out;                    /* posted, no completion seen yet (a second one is ignored) */
    int state;                  /* 0 not finished, 1 completed, 2 completed with an error */
    int err;                    /* FI_E* of an error completion */
    char errstr[200];
    uint64_t key;
    unsigned buf;               /* which local buffer (read: the bytes that came back) */
} op;

static const char *prov_name(void) { return info->fabric_attr->prov_name; }

/* A local registration, where the provider asks for one. */
static int reg_local(conn *c, void *p, size_t len, uint64_t access, struct fid_mr **mr, void **desc) {
    struct fi_mr_attr a;
    struct iovec iov;
    int ret, tries;
    *mr = NULL;
    *desc = NULL;
    if (!(mr_mode & (FI_MR_LOCAL | FI_MR_HMEM))) return 0;
    memset(&a, 0, sizeof a);
    iov.iov_base = p;
    iov.iov_len = len;
    a.mr_iov = &iov;
    a.iov_count = 1;
    a.access = access;
    a.iface = FI_HMEM_SYSTEM;
    for (tries = 0;; tries++) {
        a.requested_key = (mr_mode & FI_MR_PROV_KEY) ? 0 : (rng64() & key_mask) | 1u;
        ret = fi_mr_regattr(domain, &a, 0, mr);
        if (ret != -FI_ENOKEY || (mr_mode & FI_MR_PROV_KEY) || tries >= 8) break;
    }
    if (ret) { *mr = NULL; return ret; }
    if (mr_mode & FI_MR_ENDPOINT) {
        if ((ret = fi_mr_bind(*mr, &c->ep->fid, 0)) != 0 || (ret = fi_mr_enable(*mr)) != 0) {
            fi_close(&(*mr)->fid);
            *mr = NULL;
            return ret;
        }
    }
    *desc = fi_mr_desc(*mr);
    return 0;
}

static int setup(void) {
    struct fi_info *hints = fi_allocinfo(), *fi = NULL;
    const char *env = getenv("FI_PROVIDER");
    char mrs[256];
    int ret, m;
    uint32_t v = fi_version();
    if (!hints) return -FI_ENOMEM;
    hints->caps = FI_MSG | FI_SEND | FI_RECV | FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT | FI_MR_RAW | FI_MR_HMEM;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    ret = fi_getinfo(API_VERSION, NULL, NULL, 0, hints, &fi);
    fi_freeinfo(hints);
    if (ret || !fi) {
        say("rogue: setup: fi_getinfo found no FI_EP_RDM provider with FI_RMA (FI_PROVIDER=%s): %s",
            env ? env : "(unset)", fi_strerror(ret < 0 ? -ret : FI_ENODATA));
        return ret ? ret : -FI_ENODATA;
    }
    info = fi_dupinfo(fi);      /* the first answer, as the owner takes it */
    fi_freeinfo(fi);
    if (!info) return -FI_ENOMEM;
    /* the owner's reader asks for no ordering (shm reads by itself only then) */
    info->tx_attr->msg_order &= FI_ORDER_SAS;
    info->rx_attr->msg_order &= FI_ORDER_SAS;
    mr_mode = (uint64_t)info->domain_attr->mr_mode;
    key_mask = info->domain_attr->mr_key_size >= 8 || !info->domain_attr->mr_key_size
                   ? ~0ull : (1ull << (8 * info->domain_attr->mr_key_size)) - 1;
    m = info->domain_attr->mr_mode;
    fi_tostr_r(mrs, sizeof mrs, &m, FI_TYPE_MR_MODE);
    say("rogue: libfabric %u.%u, provider %s, fabric %s, domain %s, mr_mode [%s], mr_key_size %zu, max_msg_size %zu, remote addresses are %s",
        FI_MAJOR(v), FI_MINOR(v), prov_name(), info->fabric_attr->name, info->domain_attr->name, mrs,
        info->domain_attr->mr_key_size, info->ep_attr->max_msg_size,
        (mr_mode & FI_MR_VIRT_ADDR) ? "virtual (FI_MR_VIRT_ADDR)" : "offsets into the registration");
    if ((ret = fi_fabric(info->fabric_attr, &fabric, NULL)) != 0) { say("rogue: setup: fi_fabric: %s", fi_strerror(-ret)); return ret; }
    if ((ret = fi_domain(fabric, info, &domain, NULL)) != 0) { say("rogue: setup: fi_domain: %s", fi_strerror(-ret)); return ret; }
    return 0;
}

/* A fresh endpoint to the owner; its index, or -1. */
static int conn_open(void) {
    struct fi_cq_attr ca;
    struct fi_av_attr aa;
    conn *c;
    const char *what = "fi_cq_open";
    int ret;
    if (nconns >= MAX_CONNS) return -1;
    c = &conns[nconns];
    memset(c, 0, sizeof *c);
    memset(&ca, 0, sizeof ca);
    ca.format = FI_CQ_FORMAT_CONTEXT;
    ca.size = info->tx_attr->size + info->rx_attr->size;
    ca.wait_obj = FI_WAIT_NONE;
    if ((ret = fi_cq_open(domain, &ca, &c->cq, NULL)) != 0) goto fail;
    memset(&aa, 0, sizeof aa);
    aa.type = FI_AV_TABLE;
    aa.count = 4;
    what = "fi_av_open";
    if ((ret = fi_av_open(domain, &aa, &c->av, NULL)) != 0) goto fail;
    what = "fi_endpoint";
    if ((ret = fi_endpoint(domain, info, &c->ep, NULL)) != 0) goto fail;
    what = "fi_ep_bind (av)";
    if ((ret = fi_ep_bind(c->ep, &c->av->fid, 0)) != 0) goto fail;
    what = "fi_ep_bind (cq)";
    if ((ret = fi_ep_bind(c->ep, &c->cq->fid, FI_TRANSMIT | FI_RECV)) != 0) goto fail;
    what = "fi_enable";
    if ((ret = fi_enable(c->ep)) != 0) goto fail;
    what = "fi_av_insert of the owner's name";
    ret = fi_av_insert(c->av, owner_name, 1, &c->dest, 0, NULL);
    if (ret != 1) { ret = ret < 0 ? ret : -FI_EADDRNOTAVAIL; goto fail; }
    return (int)nconns++;
fail:
    say("rogue: setup: endpoint %u: %s: %s", nconns, what, fi_strerror(ret < 0 ? -ret : ret));
    /* left open: nothing was posted on it, and closing it gains nothing here */
    return -1;
}

/* Reap completions from every endpoint's queue; how many. Bounded. */
static int progress(void) {
    unsigned i;
    int n = 0, round;
    for (i = 0; i < nconns; i++) {
        struct fid_cq *cq = conns[i].cq;
        for (round = 0; round < 64; round++) {
            struct fi_cq_entry ev[16];
            ssize_t k = fi_cq_read(cq, ev, 16), j;
            if (k == -FI_EAVAIL) {
                struct fi_cq_err_entry e;
                char ps[128];
                memset(&e, 0, sizeof e);
                if (fi_cq_readerr(cq, &e, 0) < 1) break;
                n++;
                if (e.op_context) {
                    op *o = (op *)e.op_context;
                    if (!o->out) continue;
                    o->out = 0;
                    o->state = 2;
                    o->err = e.err;
                    ps[0] = 0;
                    fi_cq_strerror(cq, e.prov_errno, e.err_data, ps, sizeof ps);
                    snprintf(o->errstr, sizeof o->errstr, "%s (%s)", fi_strerror(e.err), ps);
                }
                continue;
            }
            if (k <= 0) break;
            for (j = 0; j < k; j++) {
                op *o = (op *)ev[j].op_context;
                if (!o || !o->out) continue;
                o->out = 0;
                o->state = 1;
            }
            n += (int)k;
            if (k < 16) break;
        }
    }
    return n;
}

/*--- read / write ----------------------------------------------------------------*/

/* A local buffer, on the endpoint it was registered for. */
typedef struct lbuf {
    uint8_t *p;
    struct fid_mr *mr;
    void *desc;
    unsigned conn;
} lbuf;

static void pattern(uint8_t *p, size_t n) {
    static const char pat[] = "ROGUE-WROTE-THIS";
    size_t i;
    for (i = 0; i < n; i++) p[i] = (uint8_t)pat[i % 16];
}

static int lbuf_new(lbuf *b, unsigned ci, size_t len, int write) {
    int ret;
    b->conn = ci;
    b->p = (uint8_t *)malloc(len);
    if (!b->p) return -FI_ENOMEM;
    if (write) pattern(b->p, len);
    else memset(b->p, 0, len);
    ret = reg_local(&conns[ci], b->p, len, write ? FI_WRITE : FI_READ, &b->mr, &b->desc);
    if (ret) say("rogue: local registration for endpoint %u: %s", ci, fi_strerror(-ret));
    return ret;
}

/* A write should complete only where the owner took it. tcp;ofi_rxm
   completes a plain fi_write once sent, whatever the owner then does, so it
   is asked for FI_DELIVERY_COMPLETE (which it answers after the owner
   checked the key). shm's plain fi_write completes once the bytes are in
   the owner's memory (its own process_vm_writev, or the owner's copy), and
   FI_DELIVERY_COMPLETE would turn its CMA path off: plain there. Set in rma(). */
static int write_dc = 1, write_fallback;

static ssize_t post_write(conn *c, lbuf *b, size_t len, uint64_t raddr, uint64_t rkey, void *ctx) {
    struct fi_msg_rma m;
    struct iovec iov;
    struct fi_rma_iov riov;
    void *desc = b->desc;
    ssize_t ret;
    if (!write_dc) return fi_write(c->ep, b->p, len, b->desc, c->dest, raddr, rkey, ctx);
    iov.iov_base = b->p;
    iov.iov_len = len;
    riov.addr = raddr;
    riov.len = len;
    riov.key = rkey;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.desc = &desc;
    m.iov_count = 1;
    m.addr = c->dest;
    m.rma_iov = &riov;
    m.rma_iov_count = 1;
    m.context = ctx;
    ret = fi_writemsg(c->ep, &m, FI_COMPLETION | FI_DELIVERY_COMPLETE);
    if (ret == -FI_EBADFLAGS || ret == -FI_EOPNOTSUPP || ret == -FI_ENOSYS || ret == -FI_EINVAL) {
        say("write: fi_writemsg with FI_DELIVERY_COMPLETE: %s; plain fi_write from here: a completion may only say it was sent",
            fi_strerror((int)-ret));
        write_dc = 0;
        write_fallback = 1;
        return fi_write(c->ep, b->p, len, b->desc, c->dest, raddr, rkey, ctx);
    }
    return ret;
}

/* Errors seen, by code: the summary's breakdown. */
typedef struct errcount {
    int code;                   /* FI_E* */
    int post;                   /* refused by fi_read/fi_write, not on the queue */
    uint64_t n;
} errcount;

#define MAX_ERRKINDS 8

/* Count one; 1 the first time this kind is seen (worth a line of its own). */
static int err_count(errcount *e, unsigned *ne, int code, int post) {
    unsigned i;
    for (i = 0; i < *ne; i++)
        if (e[i].code == code && e[i].post == post) { e[i].n++; return 0; }
    if (*ne < MAX_ERRKINDS) {
        e[*ne].code = code;
        e[*ne].post = post;
        e[*ne].n = 1;
        (*ne)++;
    }
    return 1;
}

static int rma(int write) {
    const char *mode = write ? "write" : "read";
    uint64_t guesses = args.guesses, raddr, n, i;
    uint64_t tried = 0, ok = 0, ok_random = 0, refused = 0, post_failed = 0, timed_out = 0, still = 0, reposts = 0;
    op *ops;
    lbuf bufs[MAX_CONNS];
    unsigned nbufs = 0, cur = 0, ne = 0, k, accepted = 0, silent = 0;
    errcount errs[MAX_ERRKINDS];
    int first_ok = -1, rawmap = (mr_mode & FI_MR_RAW) != 0;
    size_t len = (size_t)args.len;
    uint64_t t0;
    char hx[40], breakdown[600];

    if (info->ep_attr->max_msg_size && len > info->ep_attr->max_msg_size) {
        say("%s: LEN %zu is past the provider's max_msg_size %zu: %zu bytes each", mode, len, info->ep_attr->max_msg_size,
            info->ep_attr->max_msg_size);
        len = info->ep_attr->max_msg_size;
    }
    raddr = (mr_mode & FI_MR_VIRT_ADDR) ? args.base + args.off : args.off;
    write_dc = write && strncmp(prov_name(), "shm", 3) != 0;
    n = 2 * guesses;
    ops = (op *)calloc(n ? n : 1, sizeof *ops);
    if (!ops) { say("%s: out of memory", mode); return EXIT_SETUP; }
    if (conn_open() < 0) return EXIT_SETUP;
    if (lbuf_new(&bufs[0], 0, len, write) != 0) return EXIT_SETUP;
    nbufs = 1;
    say("%s: %zu bytes at remote address 0x%" PRIx64 " (%s), keys (%" PRIu64 " << 24) | 1..%" PRIu64 ", then %" PRIu64
        " random keys of %zu bytes; one at a time, 1 s each%s",
        mode, len, raddr, (mr_mode & FI_MR_VIRT_ADDR) ? "virtual: BASE + OFFSET" : "OFFSET into the registration",
        args.pid, guesses, guesses, info->domain_attr->mr_key_size ? info->domain_attr->mr_key_size : (size_t)8,
        rawmap ? "; keys mapped with fi_mr_map_raw (FI_MR_RAW)" : "");
    if (write) say("write: %s", write_dc ? "fi_writemsg with FI_DELIVERY_COMPLETE: a completion means the owner took it"
                                          : "plain fi_write: shm completes it once the bytes are in the owner's memory");
    t0 = now_ns();
    for (i = 0; i < n && silent < MAX_SILENT; i++) {
        op *o = &ops[i];
        lbuf *b = &bufs[cur];
        conn *c = &conns[b->conn];
        uint64_t key = i < guesses ? ((args.pid << 24) | (i + 1)) & key_mask : rng64() & key_mask, rkey = key;
        uint64_t until = now_ns() + RMA_WAIT_NS;
        ssize_t ret;
        int mapped = 0;
        o->key = key;
        o->buf = cur;
        tried++;
        if (rawmap) {
            uint8_t raw[64];
            size_t ks = info->domain_attr->mr_key_size, j;
            int r;
            if (ks == 0 || ks > sizeof raw) ks = 8;
            rng_fill(raw, sizeof raw);
            for (j = 0; j < 8 && j < ks; j++) raw[j] = (uint8_t)(key >> (8 * j));
            if ((r = fi_mr_map_raw(domain, raddr, raw, ks, &rkey, 0)) != 0) {
                post_failed++;
                if (err_count(errs, &ne, r < 0 ? -r : r, 1)) say("%s: key 0x%" PRIx64 ": fi_mr_map_raw: %s", mode, key, fi_strerror(r < 0 ? -r : r));
                continue;
            }
            mapped = 1;
        }
    again:
        for (;;) {
            o->out = 1;
            o->state = 0;
            ret = write ? post_write(c, b, len, raddr, rkey, &o->fc)
                        : fi_read(c->ep, b->p, len, b->desc, c->dest, raddr, rkey, &o->fc);
            if (ret == 0) break;
            o->out = 0;
            if ((ret != -FI_EAGAIN && ret != -FI_ENOTCONN) || now_ns() >= until) break;
            progress();
            nap();
        }
        if (ret != 0) {
            post_failed++;
            silent = ret == -FI_EAGAIN || ret == -FI_ENOTCONN ? silent + 1 : 0;
            if (err_count(errs, &ne, (int)-ret, 1))
                say("%s: key 0x%" PRIx64 ": fi_%s: %s%s", mode, key, mode, fi_strerror((int)-ret), ret == -FI_EAGAIN ? " for 1 s" : "");
            if (mapped) fi_mr_unmap_key(domain, rkey);
            continue;
        }
        while (o->out && now_ns() < until) {
            if (!progress()) nap();
        }
        if (o->out) {
            /* never completed, and cannot be canceled: go on on a fresh endpoint and buffer */
            timed_out++;
            silent++;
            if (timed_out <= 4) say("%s: key 0x%" PRIx64 ": no completion within 1 s", mode, key);
            if (nbufs < MAX_CONNS) {
                int ci = conn_open();
                if (ci >= 0 && lbuf_new(&bufs[nbufs], (unsigned)ci, len, write) == 0) {
                    cur = nbufs++;
                    if (timed_out <= 4) say("%s: going on on a fresh endpoint (%d)", mode, ci);
                }
            }
            continue;       /* a mapped raw key stays mapped while its op is out */
        }
        /* Not connected (rxm: the owner dropped the connection after the
           last refusal, and it is being made again): this key was not
           tried yet. Again, within its 1 s. */
        if (o->state == 2 && o->err == FI_ENOTCONN && now_ns() < until) {
            reposts++;
            progress();
            nap();
            goto again;
        }
        silent = o->state == 2 && o->err == FI_ENOTCONN ? silent + 1 : 0;   /* not connected for all of its 1 s */
        if (mapped) fi_mr_unmap_key(domain, rkey);
        if (o->state == 2 && err_count(errs, &ne, o->err, 0)) say("%s: key 0x%" PRIx64 " refused: %s", mode, key, o->errstr);
        if (o->state == 1 && ++accepted <= 4) say("%s: key 0x%" PRIx64 " accepted%s", mode, key, accepted == 4 ? " (no more of these lines)" : "");
    }
    if (silent >= MAX_SILENT && i < n)
        say("%s: stopped after %" PRIu64 " keys: %u in a row had no answer within their 1 s (the owner gone, or not answering)",
            mode, tried, MAX_SILENT);
    /* late completions of operations that timed out, briefly */
    if (timed_out) {
        uint64_t until = now_ns() + 200000000ull;
        while (now_ns() < until) if (!progress()) nap();
    }
    for (i = 0; i < n; i++) {
        if (ops[i].state == 1) {
            ok++;
            ok_random += i >= guesses;
            if (first_ok < 0) first_ok = (int)i;
        } else if (ops[i].state == 2) {
            refused++;
        }
        still += ops[i].out ? 1 : 0;
    }
    breakdown[0] = 0;
    for (k = 0; k < ne; k++) {
        size_t at = strlen(breakdown);
        snprintf(breakdown + at, sizeof breakdown - at, "%s%s%s x%" PRIu64, k ? ", " : "", errs[k].post ? "not posted: " : "",
                 fi_strerror(errs[k].code), errs[k].n);
    }
    say("%s: %" PRIu64 " completed with an error, %" PRIu64 " not posted, %" PRIu64 " timed out (%" PRIu64 " still out)%s%s%s; "
        "%" PRIu64 " posted again after FI_ENOTCONN; %.3f s",
        mode, refused, post_failed, timed_out, still, ne ? " [" : "", breakdown, ne ? "]" : "", reposts, (double)(now_ns() - t0) / 1e9);
    if (ok_random) say("%s: %" PRIu64 " of %" PRIu64 " random keys succeeded: the key was not checked", mode, ok_random, guesses);
    say("%s: tried %" PRIu64 " keys, %" PRIu64 " succeeded", mode, tried, ok);
    if (first_ok >= 0) {
        if (!write) {
            size_t m = len < 16 ? len : 16;
            hex(hx, bufs[ops[first_ok].buf].p, m);
            say("read returned: %s with key 0x%" PRIx64, hx, ops[first_ok].key);
        } else {
            say("write: first accepted with key 0x%" PRIx64 "%s", ops[first_ok].key,
                write_dc ? " (FI_DELIVERY_COMPLETE: the owner took it)"
                     : write_fallback ? " (plain fi_write: the completion may only mean it was sent)"
                                      : " (shm: completed once in the owner's memory)");
        }
    }
    return 0;
}

/*--- notifications ---------------------------------------------------------------*/

typedef struct slot {
    op o;
    uint8_t buf[SLOT_BYTES];
} slot;

static void put_le(uint8_t *p, uint64_t v, int n) {
    int i;
    for (i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* 104 bytes; name: length byte (as given, at most 255), then what fits of it */
static void notify_write(uint8_t *m, const uint8_t secret[16], uint64_t id, uint32_t rank, uint32_t tp, const char *name) {
    size_t n = strlen(name);
    memset(m, 0, NOTIFY_BYTES);
    put_le(m, NOTIFY_MAGIC, 4);
    put_le(m + 4, NOTIFY_VERSION, 2);
    put_le(m + 6, 0, 2);
    memcpy(m + 8, secret, 16);
    put_le(m + 24, id, 8);
    put_le(m + 32, rank, 4);
    put_le(m + 36, tp, 4);
    m[40] = (uint8_t)(n > 255 ? 255 : n);
    memcpy(m + 41, name, n > 63 ? 63 : n);
}

typedef struct sender {
    slot *slots;
    unsigned nslots;
    struct fid_mr *mr;
    void *desc;
    conn *c;
    uint64_t posted, ok, failed;
    int nerr;
    int stalled;
} sender;

static int sender_init(sender *s, unsigned nslots) {
    int ci, ret;
    memset(s, 0, sizeof *s);
    if ((ci = conn_open()) < 0) return -1;
    s->c = &conns[ci];
    s->nslots = nslots;
    s->slots = (slot *)calloc(nslots, sizeof *s->slots);
    if (!s->slots) return -1;
    ret = reg_local(s->c, s->slots, nslots * sizeof *s->slots, FI_SEND, &s->mr, &s->desc);
    if (ret) { say("rogue: local registration of the send buffers: %s", fi_strerror(-ret)); return -1; }
    return 0;
}

static void sender_reap(sender *s, const char *mode) {
    unsigned i;
    progress();
    for (i = 0; i < s->nslots; i++) {
        op *o = &s->slots[i].o;
        if (o->state == 1) { s->ok++; o->state = 0; }
        else if (o->state == 2) {
            s->failed++;
            if (s->nerr++ < 4) say("%s: a send completed with an error: %s", mode, o->errstr);
            o->state = 0;
        }
    }
}

/* Post one message (copied into a free slot): 0 posted, 1 refused by
   fi_send, -1 the 5 s ran out (-FI_EAGAIN, or no slot freed). */
static int sender_post(sender *s, const char *mode, const uint8_t *msg, size_t len) {
    uint64_t until = now_ns() + SEND_WAIT_NS;
    unsigned i;
    for (;;) {
        slot *sl = NULL;
        for (i = 0; i < s->nslots; i++)
            if (!s->slots[i].o.out) { sl = &s->slots[i]; break; }
        if (sl) {
            ssize_t ret;
            memcpy(sl->buf, msg, len);
            sl->o.out = 1;
            sl->o.state = 0;
            ret = fi_send(s->c->ep, sl->buf, len, s->desc, s->c->dest, &sl->o.fc);
            if (ret == 0) { s->posted++; return 0; }
            sl->o.out = 0;
            if (ret != -FI_EAGAIN) {
                s->failed++;
                if (s->nerr++ < 4) say("%s: fi_send of %zu bytes: %s", mode, len, fi_strerror((int)-ret));
                snprintf(sl->o.errstr, sizeof sl->o.errstr, "fi_send: %s", fi_strerror((int)-ret));
                return 1;
            }
        }
        if (now_ns() >= until) { s->stalled = 1; return -1; }
        sender_reap(s, mode);
        nap();
    }
}

static uint64_t sender_drain(sender *s, const char *mode) {
    uint64_t until = now_ns() + DRAIN_WAIT_NS, out = 0;
    unsigned i;
    for (;;) {
        sender_reap(s, mode);
        out = 0;
        for (i = 0; i < s->nslots; i++) out += s->slots[i].o.out ? 1 : 0;
        if (!out || now_ns() >= until) break;
        nap();
    }
    return out;
}

static int notify(void) {
    uint64_t count = args.count, id0 = args.id, i, out;
    sender s;
    uint8_t msg[SLOT_BYTES], secret[16];
    static const size_t sizes[3] = {16, 100, 120};
    uint64_t t0, sent_good = 0, sent_bad = 0;
    if (sender_init(&s, NOTIFY_WINDOW) != 0) return EXIT_SETUP;
    say("notify: %" PRIu64 " notifications with random wrong secrets, ids %" PRIu64 "..%" PRIu64 ", then %u malformed; at most %u out at a time",
        count, id0, count ? id0 + count - 1 : id0, N_MALFORMED, NOTIFY_WINDOW);
    t0 = now_ns();
    for (i = 0; i < count && !s.stalled; i++) {
        rng_fill(secret, sizeof secret);
        notify_write(msg, secret, id0 + i, 0, 1, "rogue");
        if (sender_post(&s, "notify", msg, NOTIFY_BYTES) == 0) sent_good++;
    }
    for (i = 0; i < N_MALFORMED && !s.stalled; i++) {
        size_t len = sizes[i % 3];
        rng_fill(msg, sizeof msg);
        if (i & 1) {            /* a valid header: only the length is wrong */
            put_le(msg, NOTIFY_MAGIC, 4);
            put_le(msg + 4, NOTIFY_VERSION, 2);
            put_le(msg + 6, 0, 2);
        }
        if (sender_post(&s, "notify", msg, len) == 0) sent_bad++;
    }
    if (s.stalled)
        say("notify: stopped after %" PRIu64 " posted: a send could not be posted for 5 s (-FI_EAGAIN, or %u sends out that did not complete)",
            s.posted, NOTIFY_WINDOW);
    out = sender_drain(&s, "notify");
    say("notify: posted %" PRIu64 " (%" PRIu64 " wrong-secret notifications, %" PRIu64 " malformed), %" PRIu64 " completed, "
        "%" PRIu64 " failed, %" PRIu64 " never completed, in %.3f s",
        s.posted, sent_good, sent_bad, s.ok, s.failed, out, (double)(now_ns() - t0) / 1e9);
    say("notify: sent %" PRIu64, s.ok);
    return 0;
}

static int notify_secret(void) {
    uint8_t msg[SLOT_BYTES];
    uint64_t out;
    size_t nlen = strlen(args.name);
    sender s;
    if (sender_init(&s, 1) != 0) return EXIT_SETUP;
    if (nlen > 63) say("notify-secret: NAME is %zu bytes, past the 63 that fit: the length byte says %zu", nlen, nlen > 255 ? (size_t)255 : nlen);
    notify_write(msg, args.secret, args.id, args.rank, args.tp, args.name);
    say("notify-secret: id %" PRIu64 ", rank %u of tp size %u, name \"%.63s\"", args.id, args.rank, args.tp, args.name);
    sender_post(&s, "notify-secret", msg, NOTIFY_BYTES);
    out = sender_drain(&s, "notify-secret");
    if (s.ok) say("notify-secret: sent ok");
    else if (s.failed) say("notify-secret: sent failed (%s)", s.slots[0].o.errstr[0] ? s.slots[0].o.errstr : "fi_send refused it");
    else say("notify-secret: sent timeout (%s)", s.stalled ? "never posted: -FI_EAGAIN for 5 s" : out ? "no completion within 5 s" : "not posted");
    return 0;
}

/*--- main ------------------------------------------------------------------------*/

int main(int argc, char **argv) {
    int rc;
    if (parse_args(argc, argv) != 0) return usage();
    if (read_name(argv[2], &owner_name, &owner_name_len) != 0) return EXIT_USAGE;
    rng_seed();
    if (setup() != 0) return EXIT_SETUP;
    say("rogue: mode %s, owner name %zu bytes from %s", argv[1], owner_name_len, argv[2]);
    switch (args.mode) {
    case M_READ: rc = rma(0); break;
    case M_WRITE: rc = rma(1); break;
    case M_NOTIFY: rc = notify(); break;
    default: rc = notify_secret(); break;
    }
    if (rc == 0) say("rogue: done");
    /* Nothing is closed: an operation may still be out (see above), and the
       process is about to end. */
    return rc;
}
