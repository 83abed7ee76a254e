/*
    fi_read_ref -- the raw libfabric reference for kvx_bench's LIBFABRIC rows:
    two processes on this host, plain fi_read of one message size with a
    fixed number outstanding, no kvx in between. Same endpoint type and
    capabilities as kvx (FI_EP_RDM, FI_RMA, FI_READ, FI_REMOTE_READ, FI_MSG),
    so the difference to kvx_bench at the same size and depth is kvx's cost.

        fi_read_ref [--provider P] [--size BYTES] [--outstanding N]
                    [--total BYTES] [--region BYTES] [--owner-busy] [--reader-spin]
                    [--json FILE] [--listen ADDR:PORT | --connect ADDR:PORT]

    Without --listen/--connect both processes run here (fork). On two hosts:
    the owner with --listen, the reader with --connect (a TCP socket carries
    the owner's endpoint name and key; the reader closing it ends the owner).

    The owner (a forked child) registers a region with a pattern and serves
    reads; like a kvx owner's progress thread it sleeps on its completion
    queue's wait fd, or, where the provider has none (shm), progresses every
    millisecond; --owner-busy makes it spin instead. The reader keeps
    --outstanding reads of --size bytes in flight over the region and, like
    kvx's reader, sleeps on the wait fd (or a millisecond) when nothing
    completed; --reader-spin makes it spin on fi_cq_read instead. Then it
    checks every byte of its copy.

    Build: cc -O2 -std=c99 -D_GNU_SOURCE bench/fi_read_ref.c -o build/fi_read_ref $(pkg-config --libs libfabric)
    Exit status 0 with "TEST PASSED", 1 with a wrong byte or a failed read, 2 for setup.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct res {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_cq *cq;
    struct fid_av *av;
    struct fid_ep *ep;
    int cq_fd;   /* -1: no wait object */
} res;

typedef struct opts {
    const char *provider, *json, *listen, *connect;
    size_t size, region;
    unsigned outstanding;
    unsigned long long total;
    int owner_busy, reader_spin;
} opts;

/* What the owner tells the reader. */
typedef struct hello {
    uint64_t key, addr;     /* addr: what fi_read takes as the remote address of the region's start */
    uint32_t name_len;
    uint8_t name[256];
} hello;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint8_t pattern(size_t i) { return (uint8_t)(i * 131u + (i >> 12) * 7u + 5u); }

static int die(const char *who, const char *what, int ret) {
    fprintf(stderr, "fi_read_ref %s: %s: %s\n", who, what, fi_strerror(ret < 0 ? -ret : ret));
    return 2;
}

/* The same request kvx makes, one endpoint with its queue and address vector. */
static int open_res(const opts *o, res *r, const char *who) {
    struct fi_info *h = fi_allocinfo();
    struct fi_cq_attr ca;
    struct fi_av_attr aa;
    int ret;
    memset(r, 0, sizeof *r);
    r->cq_fd = -1;
    h->caps = FI_MSG | FI_SEND | FI_RECV | FI_RMA | FI_READ | FI_REMOTE_READ;
    h->mode = FI_CONTEXT | FI_CONTEXT2;
    h->ep_attr->type = FI_EP_RDM;
    h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    if (o->provider) h->fabric_attr->prov_name = strdup(o->provider);
    ret = fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), NULL, NULL, 0, h, &r->info);
    fi_freeinfo(h);
    if (ret || !r->info) return die(who, "fi_getinfo", ret ? ret : -FI_ENODATA);
    r->info->tx_attr->msg_order &= FI_ORDER_SAS;   /* as kvx: no ordering asked for */
    r->info->rx_attr->msg_order &= FI_ORDER_SAS;
    if ((ret = fi_fabric(r->info->fabric_attr, &r->fabric, NULL))) return die(who, "fi_fabric", ret);
    if ((ret = fi_domain(r->fabric, r->info, &r->domain, NULL))) return die(who, "fi_domain", ret);
    memset(&ca, 0, sizeof ca);
    ca.format = FI_CQ_FORMAT_CONTEXT;
    ca.size = r->info->tx_attr->size + r->info->rx_attr->size;
    ca.wait_obj = FI_WAIT_FD;
    if (fi_cq_open(r->domain, &ca, &r->cq, NULL) == 0) {
        if (fi_control(&r->cq->fid, FI_GETWAIT, &r->cq_fd)) r->cq_fd = -1;
    } else {
        ca.wait_obj = FI_WAIT_NONE;
        if ((ret = fi_cq_open(r->domain, &ca, &r->cq, NULL))) return die(who, "fi_cq_open", ret);
    }
    memset(&aa, 0, sizeof aa);
    aa.type = r->info->domain_attr->av_type;
    aa.count = 4;
    if ((ret = fi_av_open(r->domain, &aa, &r->av, NULL))) return die(who, "fi_av_open", ret);
    if ((ret = fi_endpoint(r->domain, r->info, &r->ep, NULL))) return die(who, "fi_endpoint", ret);
    if ((ret = fi_ep_bind(r->ep, &r->av->fid, 0))) return die(who, "fi_ep_bind av", ret);
    if ((ret = fi_ep_bind(r->ep, &r->cq->fid, FI_TRANSMIT | FI_RECV))) return die(who, "fi_ep_bind cq", ret);
    if ((ret = fi_enable(r->ep))) return die(who, "fi_enable", ret);
    return 0;
}

static void close_res(res *r) {
    if (r->ep) fi_close(&r->ep->fid);
    if (r->av) fi_close(&r->av->fid);
    if (r->cq) fi_close(&r->cq->fid);
    if (r->domain) fi_close(&r->domain->fid);
    if (r->fabric) fi_close(&r->fabric->fid);
    if (r->info) fi_freeinfo(r->info);
}

static int reg(res *r, void *buf, size_t len, uint64_t access, uint64_t key, struct fid_mr **mr) {
    int ret = fi_mr_reg(r->domain, buf, len, access, 0, key, 0, mr, NULL);
    if (ret) return ret;
    if (r->info->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        if ((ret = fi_mr_bind(*mr, &r->ep->fid, 0)) || (ret = fi_mr_enable(*mr))) return ret;
    }
    return 0;
}

/* The owner: register, say hello, serve until the reader closes the socket. */
static int owner(const opts *o, int sock) {
    res r;
    struct fid_mr *mr = NULL;
    uint8_t *buf;
    hello h;
    size_t i, nl = sizeof h.name;
    int ret;
    if ((ret = open_res(o, &r, "owner"))) return ret;
    buf = (uint8_t *)mmap(NULL, o->region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return die("owner", "mmap", -FI_ENOMEM);
    for (i = 0; i < o->region; i++) buf[i] = pattern(i);
    if ((ret = reg(&r, buf, o->region, FI_REMOTE_READ, 42, &mr))) return die("owner", "fi_mr_reg", ret);
    memset(&h, 0, sizeof h);
    h.key = fi_mr_key(mr);
    h.addr = (r.info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)buf : 0;
    if ((ret = fi_getname(&r.ep->fid, h.name, &nl))) return die("owner", "fi_getname", ret);
    h.name_len = (uint32_t)nl;
    if (write(sock, &h, sizeof h) != (ssize_t)sizeof h) return die("owner", "write hello", -FI_EIO);
    for (;;) {
        struct fi_cq_entry ev[16];
        struct pollfd pf[2];
        int nf = 0;
        char c;
        ssize_t n = fi_cq_read(r.cq, ev, 16);   /* progress: serves the reads */
        if (n > 0) continue;
        if (n == -FI_EAVAIL) {
            struct fi_cq_err_entry e;
            memset(&e, 0, sizeof e);
            fi_cq_readerr(r.cq, &e, 0);
            continue;
        }
        pf[nf].fd = sock; pf[nf].events = POLLIN; pf[nf].revents = 0; nf++;
        if (o->owner_busy) {
            if (poll(pf, 1, 0) > 0) break;
            continue;
        }
        if (r.cq_fd >= 0) {
            struct fid *f = &r.cq->fid;
            if (fi_trywait(r.fabric, &f, 1) != FI_SUCCESS) continue;
            pf[nf].fd = r.cq_fd; pf[nf].events = POLLIN; pf[nf].revents = 0; nf++;
            poll(pf, (nfds_t)nf, 1000);
        } else {
            poll(pf, 1, 1);   /* no wait object: a millisecond tick, as kvx */
        }
        if ((pf[0].revents & (POLLIN | POLLHUP)) && read(sock, &c, 1) <= 0) break;
    }
    fi_close(&mr->fid);
    close_res(&r);
    munmap(buf, o->region);
    return 0;
}

static int reader(const opts *o, int sock) {
    res r;
    struct fid_mr *mr = NULL;
    fi_addr_t peer;
    hello h;
    uint8_t *buf;
    void *desc;
    struct fi_context2 *ctxs;
    unsigned *freek, nfree;
    size_t nslots, i, next = 0, bad = 0;
    unsigned long long posted = 0, done = 0, want;
    double t0, t1;
    int ret, failed = 0;
    char prov[128];
    if ((ret = open_res(o, &r, "reader"))) return ret;
    snprintf(prov, sizeof prov, "%s", r.info->fabric_attr->prov_name);
    if (read(sock, &h, sizeof h) != (ssize_t)sizeof h) return die("reader", "the owner did not say hello", -FI_EIO);
    if (fi_av_insert(r.av, h.name, 1, &peer, 0, NULL) != 1) return die("reader", "fi_av_insert", -FI_EINVAL);
    buf = (uint8_t *)mmap(NULL, o->region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return die("reader", "mmap", -FI_ENOMEM);
    memset(buf, 0, o->region);
    if ((ret = reg(&r, buf, o->region, FI_READ, 43, &mr))) return die("reader", "fi_mr_reg", ret);
    desc = fi_mr_desc(mr);
    nslots = o->region / o->size;
    /* one fi_context2 per read in flight, handed out from a stack */
    ctxs = (struct fi_context2 *)calloc(o->outstanding, sizeof *ctxs);
    freek = (unsigned *)calloc(o->outstanding, sizeof *freek);
    for (nfree = 0; nfree < o->outstanding; nfree++) freek[nfree] = o->outstanding - 1 - nfree;
    want = o->total / o->size;
    if (want < nslots) want = nslots;   /* every byte of the region read at least once */
    {   /* one read first, untimed: it makes the connection (rxm connects on first use) */
        struct fi_cq_entry ev;
        double until = now_s() + 30;
        ssize_t n = -FI_EAGAIN;
        while ((ret = (int)fi_read(r.ep, buf, o->size, desc, peer, h.addr, h.key, &ctxs[0])) == -FI_EAGAIN && now_s() < until) fi_cq_read(r.cq, &ev, 1);
        if (ret) return die("reader", "the first fi_read", ret);
        while (now_s() < until && (n = fi_cq_read(r.cq, &ev, 1)) == -FI_EAGAIN) {}
        if (n != 1) return die("reader", "the first read's completion", n < 0 ? (int)n : -FI_EIO);
    }
    t0 = now_s();
    {
    double last = t0;   /* a read that never completes fails the run after 30 s */
    while (done < want && !failed) {
        struct fi_cq_entry ev[64];
        ssize_t n;
        unsigned long long before = posted;
        while (nfree && posted < want) {
            size_t off = (next % nslots) * o->size;
            unsigned k = freek[nfree - 1];
            ret = (int)fi_read(r.ep, buf + off, o->size, desc, peer, h.addr + off, h.key, &ctxs[k]);
            if (ret == -FI_EAGAIN) break;
            if (ret) { die("reader", "fi_read", ret); failed = 1; break; }
            nfree--;
            next++;
            posted++;
        }
        n = fi_cq_read(r.cq, ev, 64);
        if (n == -FI_EAVAIL) {
            struct fi_cq_err_entry e;
            memset(&e, 0, sizeof e);
            fi_cq_readerr(r.cq, &e, 0);
            fprintf(stderr, "fi_read_ref reader: a read failed: %s\n", fi_strerror(e.err));
            failed = 1;
        }
        for (i = 0; n > 0 && i < (size_t)n; i++) {
            freek[nfree++] = (unsigned)((struct fi_context2 *)ev[i].op_context - ctxs);
            done++;
        }
        if (n > 0) last = now_s();
        else if (now_s() - last > 30) {
            fprintf(stderr, "fi_read_ref reader: no read completed for 30 s (%llu of %llu done)\n", done, want);
            failed = 1;
        }
        if (n == -FI_EAGAIN && posted == before && !o->reader_spin) {
            /* nothing moved: sleep as kvx's reader does (a millisecond where a
               read was refused, since what frees it may signal no fd) */
            if (r.cq_fd >= 0 && !(ret == -FI_EAGAIN && nfree)) {
                struct fid *f = &r.cq->fid;
                struct pollfd pf;
                pf.fd = r.cq_fd; pf.events = POLLIN; pf.revents = 0;
                if (fi_trywait(r.fabric, &f, 1) == FI_SUCCESS) poll(&pf, 1, 1000);
            } else {
                poll(NULL, 0, 1);
            }
        }
    }
    }
    t1 = now_s();
    for (i = 0; i < nslots * o->size; i++)
        if (buf[i] != pattern(i)) { if (!bad) fprintf(stderr, "fi_read_ref: byte %zu is 0x%02x, expected 0x%02x\n", i, buf[i], pattern(i)); bad++; }
    {
        double s = t1 - t0, gbps = s > 0 ? (double)done * (double)o->size / s / 1e9 : 0;
        printf("fi_read_ref: provider %s, %zu-byte reads, %u outstanding, owner %s, reader %s\n", prov, o->size, o->outstanding,
               o->owner_busy ? "spins" : r.cq_fd >= 0 ? "sleeps on its wait fd" : "progresses every millisecond (no wait object)",
               o->reader_spin ? "spins" : "sleeps when nothing moves");
        printf("  total: %llu bytes, %llu reads, %.3f s, %.3f GB/s\n", done * (unsigned long long)o->size, done, s, gbps);
        if (o->json) {
            FILE *js = fopen(o->json, "w");
            if (js) {
                fprintf(js, "{\"tool\":\"fi_read_ref\",\"provider\":\"%s\",\"size\":%zu,\"outstanding\":%u,\"owner_busy\":%s,\"total_bytes\":%llu,"
                            "\"seconds\":%.9f,\"gbps\":%.6f,\"wrong_bytes\":%zu,\"passed\":%s}\n", prov, o->size, o->outstanding,
                        o->owner_busy ? "true" : "false", done * (unsigned long long)o->size, s, gbps, bad, !bad && !failed ? "true" : "false");
                fclose(js);
            }
        }
    }
    if (!bad && !failed) printf("TEST PASSED: every byte of %zu checked\n", nslots * o->size);
    else printf("TEST FAILED: %zu wrong bytes%s\n", bad, failed ? ", a read failed" : "");
    fi_close(&mr->fid);
    close_res(&r);
    munmap(buf, o->region);
    free(ctxs);
    free(freek);
    return bad || failed ? 1 : 0;
}

static int num(const char *v, unsigned long long *out) {
    char *end;
    unsigned long long x;
    if (!v) return -1;
    x = strtoull(v, &end, 10);
    if (*end == 'k' || *end == 'K') { x <<= 10; end++; }
    else if (*end == 'm' || *end == 'M') { x <<= 20; end++; }
    else if (*end == 'g' || *end == 'G') { x <<= 30; end++; }
    if (*end || !x) return -1;
    *out = x;
    return 0;
}

/* ADDR:PORT to a socket: listening (and accepting one) or connected. */
static int tcp_socket(const char *hp, int listening) {
    char host[256], *colon;
    struct addrinfo hints, *ai = NULL;
    int fd = -1, one = 1, tries;
    snprintf(host, sizeof host, "%s", hp);
    if (!(colon = strrchr(host, ':'))) { fprintf(stderr, "fi_read_ref: %s is not ADDR:PORT\n", hp); return -1; }
    *colon = 0;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = listening ? AI_PASSIVE : 0;
    if (getaddrinfo(host, colon + 1, &hints, &ai) || !ai) { fprintf(stderr, "fi_read_ref: cannot resolve %s\n", hp); return -1; }
    if (listening) {
        int lfd = socket(ai->ai_family, ai->ai_socktype, 0);
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (lfd < 0 || bind(lfd, ai->ai_addr, ai->ai_addrlen) || listen(lfd, 1)) { perror("fi_read_ref: listen"); freeaddrinfo(ai); return -1; }
        fd = accept(lfd, NULL, NULL);
        close(lfd);
    } else {
        for (tries = 0; tries < 100 && fd < 0; tries++) {   /* the owner may start a little later: 10 s */
            fd = socket(ai->ai_family, ai->ai_socktype, 0);
            if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen)) { close(fd); fd = -1; usleep(100000); }
        }
        if (fd < 0) perror("fi_read_ref: connect");
    }
    freeaddrinfo(ai);
    return fd;
}

int main(int argc, char **argv) {
    opts o;
    int i, sv[2], rc, st;
    pid_t pid;
    memset(&o, 0, sizeof o);
    o.size = 65536;
    o.outstanding = 64;
    o.total = 1ull << 30;
    o.region = 64u << 20;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        unsigned long long x = 0;
        if (!strcmp(a, "--owner-busy")) { o.owner_busy = 1; continue; }
        if (!strcmp(a, "--reader-spin")) { o.reader_spin = 1; continue; }
        if (!strcmp(a, "--provider") && v) o.provider = v;
        else if (!strcmp(a, "--listen") && v) o.listen = v;
        else if (!strcmp(a, "--connect") && v) o.connect = v;
        else if (!strcmp(a, "--json") && v) o.json = v;
        else if (!strcmp(a, "--size") && !num(v, &x)) o.size = (size_t)x;
        else if (!strcmp(a, "--outstanding") && !num(v, &x) && x <= 65536) o.outstanding = (unsigned)x;
        else if (!strcmp(a, "--total") && !num(v, &x)) o.total = x;
        else if (!strcmp(a, "--region") && !num(v, &x)) o.region = (size_t)x;
        else {
            fprintf(stderr, "usage: fi_read_ref [--provider P] [--size BYTES] [--outstanding N] [--total BYTES] [--region BYTES] [--owner-busy] [--reader-spin] [--json FILE]\n"
                            "                   [--listen ADDR:PORT | --connect ADDR:PORT]\n"
                            "  sizes take k, m, g; defaults: 64k reads, 64 outstanding, 1g in all over a 64m region\n");
            return 2;
        }
        i++;
    }
    if (o.region < o.size) o.region = o.size;
    signal(SIGPIPE, SIG_IGN);
    if (o.listen || o.connect) {   /* one role here, the other on another host */
        int fd = tcp_socket(o.listen ? o.listen : o.connect, o.listen != NULL);
        if (fd < 0) return 2;
        rc = o.listen ? owner(&o, fd) : reader(&o, fd);
        close(fd);
        return rc;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { perror("socketpair"); return 2; }
    fflush(stdout);
    if ((pid = fork()) == 0) {
        close(sv[0]);
        _exit(owner(&o, sv[1]));
    }
    close(sv[1]);
    rc = reader(&o, sv[0]);
    close(sv[0]);   /* tells the owner to finish */
    if (waitpid(pid, &st, 0) == pid && (!WIFEXITED(st) || WEXITSTATUS(st)) && !rc) rc = 2;
    return rc;
}
