/*
    kvx_rdv.h -- a small TCP rendezvous for the examples, tests and kvx_bench.

    kvx does not choose a control plane: engines ship metadata blobs over what
    they already have. The examples need something, so this is it: length-
    prefixed frames over TCP, every call bounded by a timeout, every frame
    checked (magic, type, size limit) before its payload is trusted.

    Frame: u32 magic "KVXR", u32 type, u32 length, payload. Little-endian.
    Functions return 0 on success, -1 on failure with a sentence in
    kvx_rdv_error().
*/
#ifndef KVX_RDV_H
#define KVX_RDV_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KVX_RDV_MAGIC 0x5256584Bu /* "KVXR" */
#define KVX_RDV_MAX_FRAME (64u << 20)

static char kvx_rdv__err[256];

static inline const char *kvx_rdv_error(void) { return kvx_rdv__err; }

static inline int kvx_rdv__fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(kvx_rdv__err, sizeof kvx_rdv__err, fmt, ap);
    va_end(ap);
    return -1;
}

static inline uint64_t kvx_rdv__ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* "host:port" -> sockaddr; host may be empty or "*" for any. */
static inline int kvx_rdv__addr(const char *hp, struct sockaddr_in *sa) {
    char host[128];
    const char *colon = strrchr(hp, ':');
    size_t n;
    long port;
    char *end;
    if (!colon) return kvx_rdv__fail("address '%s' is not HOST:PORT", hp);
    n = (size_t)(colon - hp);
    if (n >= sizeof host) return kvx_rdv__fail("host in '%s' is too long", hp);
    memcpy(host, hp, n);
    host[n] = 0;
    port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535) return kvx_rdv__fail("port in '%s' is not a number in [0, 65535]", hp);
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    if (!n || !strcmp(host, "*")) sa->sin_addr.s_addr = htonl(INADDR_ANY);
    else if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) {
        struct addrinfo hints, *res = NULL;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_INET;
        if (getaddrinfo(host, NULL, &hints, &res) || !res) return kvx_rdv__fail("cannot resolve host '%s'", host);
        sa->sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
        freeaddrinfo(res);
    }
    return 0;
}

/* Listen on "host:port" (port 0: any); *port_out gets the port bound. */
static inline int kvx_rdv_listen(const char *hp, int *port_out) {
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    int fd, one = 1;
    if (kvx_rdv__addr(hp, &sa)) return -1;
    if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) return kvx_rdv__fail("socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 64)) {
        int e = errno;
        close(fd);
        return kvx_rdv__fail("cannot listen on %s: %s", hp, strerror(e));
    }
    if (port_out && !getsockname(fd, (struct sockaddr *)&sa, &sl)) *port_out = ntohs(sa.sin_port);
    return fd;
}

static inline int kvx_rdv_accept(int lfd, int timeout_ms) {
    struct pollfd pf;
    int fd, one = 1;
    pf.fd = lfd;
    pf.events = POLLIN;
    pf.revents = 0;
    if (poll(&pf, 1, timeout_ms) <= 0) return kvx_rdv__fail("no peer connected within %d ms", timeout_ms);
    if ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) < 0) return kvx_rdv__fail("accept: %s", strerror(errno));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Connect, retrying while the other side is not up yet, until timeout_ms. */
static inline int kvx_rdv_connect(const char *hp, int timeout_ms) {
    struct sockaddr_in sa;
    uint64_t until = kvx_rdv__ms() + (uint64_t)timeout_ms;
    int one = 1, e = 0;
    if (kvx_rdv__addr(hp, &sa)) return -1;
    do {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return kvx_rdv__fail("socket: %s", strerror(errno));
        if (!connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            return fd;
        }
        e = errno;
        close(fd);
        usleep(50 * 1000);
    } while (kvx_rdv__ms() < until);
    return kvx_rdv__fail("cannot connect to %s within %d ms: %s", hp, timeout_ms, strerror(e));
}

static inline int kvx_rdv__io(int fd, void *buf, size_t len, int wr, uint64_t until) {
    uint8_t *p = (uint8_t *)buf;
    while (len) {
        struct pollfd pf;
        uint64_t now = kvx_rdv__ms();
        ssize_t n;
        pf.fd = fd;
        pf.events = wr ? POLLOUT : POLLIN;
        pf.revents = 0;
        if (now >= until || poll(&pf, 1, (int)(until - now)) <= 0)
            return kvx_rdv__fail("peer did not %s within the deadline", wr ? "take data" : "answer");
        n = wr ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
        if (n == 0) return kvx_rdv__fail("peer closed the connection");
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return kvx_rdv__fail("%s: %s", wr ? "send" : "recv", strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static inline void kvx_rdv__le32(uint8_t *b, uint32_t v) { b[0] = (uint8_t)v; b[1] = (uint8_t)(v >> 8); b[2] = (uint8_t)(v >> 16); b[3] = (uint8_t)(v >> 24); }
static inline uint32_t kvx_rdv__rd32(const uint8_t *b) { return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24; }

static inline int kvx_rdv_send(int fd, uint32_t type, const void *buf, uint32_t len, int timeout_ms) {
    uint8_t h[12];
    uint64_t until = kvx_rdv__ms() + (uint64_t)timeout_ms;
    kvx_rdv__le32(h, KVX_RDV_MAGIC);
    kvx_rdv__le32(h + 4, type);
    kvx_rdv__le32(h + 8, len);
    if (kvx_rdv__io(fd, h, sizeof h, 1, until)) return -1;
    return len ? kvx_rdv__io(fd, (void *)(uintptr_t)buf, len, 1, until) : 0;
}

/* Receive one frame of the expected type; *buf is malloc'd (free it). */
static inline int kvx_rdv_recv(int fd, uint32_t want_type, void **buf, uint32_t *len, int timeout_ms) {
    uint8_t h[12];
    uint32_t magic, type, n;
    uint64_t until = kvx_rdv__ms() + (uint64_t)timeout_ms;
    *buf = NULL;
    *len = 0;
    if (kvx_rdv__io(fd, h, sizeof h, 0, until)) return -1;
    magic = kvx_rdv__rd32(h);
    type = kvx_rdv__rd32(h + 4);
    n = kvx_rdv__rd32(h + 8);
    if (magic != KVX_RDV_MAGIC) return kvx_rdv__fail("malformed frame: magic 0x%08x, expected 0x%08x", magic, KVX_RDV_MAGIC);
    if (type != want_type) return kvx_rdv__fail("malformed frame: type %u, expected %u", type, want_type);
    if (n > KVX_RDV_MAX_FRAME) return kvx_rdv__fail("malformed frame: %u bytes, at most %u", n, KVX_RDV_MAX_FRAME);
    if (!(*buf = malloc(n ? n : 1))) return kvx_rdv__fail("out of memory for a %u-byte frame", n);
    if (n && kvx_rdv__io(fd, *buf, n, 0, until)) { free(*buf); *buf = NULL; return -1; }
    *len = n;
    return 0;
}

#endif
