/* SPDX-License-Identifier: MIT */
/*
    kvx_ucx.h -- the UCX (ucp) backend of kvx. Included by kvx.h inside its
    implementation when KVX_UCX is defined; do not include it yourself.

    Link: pkg-config --libs ucx   (-lucp -luct -lucs)

    TWO WORKERS. A context opens two UCX contexts, each with one worker:
        am    the worker peers reach: active messages only (kvx's own get,
              kvx_ucx_get.h, and notifications). No UCP_FEATURE_RMA, so UCX
              installs none of its software get/put handlers, and UCX's TCP
              transport is told not to offer its put (TCP_PUT_ENABLE=n):
              a process that reaches its port with UCX's API cannot read or
              write this process's memory (UCX's own emulation copies from
              and to any address a request names).
        rma   one-sided reads (ucp_get_nbx), over the transports that enforce
              remote keys or are reachable only from this host: shared memory
              and cma, CUDA (cuda_ipc, cuda_copy, gdr_copy), ROCm, and
              InfiniBand rc/dc (with ud, their wireup path). Never TCP:
              kvx_ucx_desc.software_rma = 1 ($KVX_UCX_SOFTWARE_RMA=1) adds
              UCX's whole transport list, TCP included, for GPU caches across
              hosts without RDMA on a trusted network, and says so loudly.
              Absent where none of those transports is there.
    Caches are registered with the rma context (their remote keys are its);
    both addresses travel in the metadata (kvx_wire.h, "XVCU"). The progress
    thread sleeps on an epoll set of both workers' event fds.

    WHERE IT LISTENS. The am worker's network devices are
    kvx_ucx_desc.net_devices, else $UCX_NET_DEVICES, else the device of this
    host's default route and the host's InfiniBand ports, else lo: never
    every interface. UCX's TCP transport listens on one port per device, on
    that device's address; shared memory (posix, sysv) is this host's. The
    rma worker opens no TCP port. kvx sets UCX's log level to "error" unless
    $UCX_LOG_LEVEL is set: UCX logs a warning and a backtrace for every
    message of a kind it has no handler for, which anyone reaching a port
    can send.

    READS. Each of a peer's caches is read one of three ways, decided at
    kvx_peer_add and said by kvx_peer_transport():
        - over the rma worker, where the two rma workers reach each other
          and the remote cache has a key there: ucp_get_nbx, "ucx:cma",
          "ucx:rc_mlx5", "ucx:cuda_ipc"; a path UCX serves in software on
          this host (shared memory without cma) is "(sw)", and for host
          memory goes by kvx's get instead (below);
        - host memory otherwise: kvx's own get over the am worker,
          "ucx:tcp (sw)", served by the owner's progress;
        - GPU memory otherwise: refused at kvx_post (KVX_ERR_UNSUPPORTED),
          saying why, unless software_rma is on.
    The path of a read over the rma worker is what UCX 1.22 says of a first
    read of that cache (ucp_request_query); before 1.22, the endpoint's
    lanes decide. A GPU cache not read over cuda_ipc is said in a warning.
    Endpoints are made with peer error handling, so a dead peer completes
    every outstanding read with an error; UCX 1.13's shared-memory transports
    cannot handle peer failure, so there a peer on this host is read over
    TCP, correct and said, never silent.

    CONNECTIONS. A reader may open several endpoints to a peer's am worker
    and send kvx's get requests on each in turn; each reply comes back on
    its request's. Over TCP between hosts one stream that waits on its
    window (or recovers from a reordered segment) stalls every read behind
    it, and several keep the link busy; on one host one is faster. By
    default a peer on another host (its host id differs) reached over TCP
    gets 4, any other 1; kvx_ucx_desc.connections ($KVX_UCX_CONNECTIONS)
    sets the number, 1 to 8. Several are opened only where both sides run
    UCX 1.22 or later (the owner's version travels in its address): a 1.13
    owner aborts when a reader of several connections dies mid-read. Where
    that or a failed connect leaves fewer than were set, the reader says
    so; kvx_peer_transport() names how many ("ucx:tcp (sw) (4 connections)").
*/
#ifndef KVX_UCX_INCLUDED
#define KVX_UCX_INCLUDED
#include "kvx_internal.h"
#include "kvx_auth.h"
#include "kvx_wire.h"

/* UCX 1.22's headers trip -Wsign-compare (UCS_MASK): kvx's own code keeps
   every warning. */
#if defined(__GNUC__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include <ucp/api/ucp.h>
#if defined(__GNUC__)
#  pragma GCC diagnostic pop
#endif
#include <dirent.h>
#include <sys/epoll.h>

/* The reader's state of one peer: its endpoint on each worker, and kvx's
   get's window to it (kvx_ucx_get.h). */
/* What UCX hands an endpoint's error callback: the peer while it lives.
   An endpoint may outlive its peer (one left in wireup stays with the worker
   until the context ends), so the callback never gets the peer itself. */
typedef struct kvx__ucx_epref {
    kvx_peer *p;                /* NULL: the peer is gone; the callback does nothing */
    struct kvx__ucx_epref *next;
} kvx__ucx_epref;

#define KVX__UCX_CONNS_MAX 8u         /* kvx_ucx_desc.connections at most */
#define KVX__UCX_CONNS_AUTO 4u        /* ... and by default to a peer on another host over TCP */
typedef struct kvx__ucx_peer {
    ucp_ep_h am, rma;           /* rma: NULL where the rma workers do not reach each other */
    kvx__ucx_epref *am_ref, *rma_ref;
    ucp_ep_h am_more[KVX__UCX_CONNS_MAX - 1];   /* more endpoints to the am worker: connections kvx's get spreads over */
    kvx__ucx_epref *am_more_ref[KVX__UCX_CONNS_MAX - 1];
    uint32_t nmore, next_conn;  /* ... how many, and which a request goes on next (0: am) */
    uint64_t asks_on[KVX__UCX_CONNS_MAX];  /* requests sent on each (the tests read it) */
    int am_unsafe;              /* no peer failure handling (UCX offers none to this peer) */
    int rma_unsafe;             /* none on the rma endpoint alone (GPU caches on this host over shared memory) */
    uint32_t asked;             /* kvx's get: requests outstanding to the peer, and their bytes */
    uint64_t asked_bytes;
    uint32_t wait_head, wait_tail;  /* its gets with parts still to ask, by index */
} kvx__ucx_peer;

#include "kvx_ucx_get.h"

#define KVX__UCX_AM_NOTIFY 0x4b
#define KVX__UCX_NO_PATH 2u             /* be_flags of a peer's GPU cache: no transport kvx may read it over */
/* Test seam (kvx.h, TEST SEAMS): read software-served peers with UCX's own
   ucp_get_nbx instead of kvx's get, to see what a UCX version does when a
   reader dies mid-read (UCX 1.13 aborts the owner). Needs software_rma on
   both sides, since only there may UCX serve a get in software. */
#if !defined(KVX_TEST_HOOK_UCX_NATIVE_GET)
#  define KVX_TEST_HOOK_UCX_NATIVE_GET 0
#endif
/* Test seam: no first read at connect, to see what a UCX version does when
   a reader dies while the owner's side is still in wireup. */
#if !defined(KVX_TEST_HOOK_UCX_NO_PROBE)
#  define KVX_TEST_HOOK_UCX_NO_PROBE 0
#endif

/* One UCX context and its worker. */
typedef struct kvx__ucx_side {
    ucp_context_h context;
    ucp_worker_h worker;
    ucp_address_t *addr;
    size_t addr_len;
    int efd;
} kvx__ucx_side;

typedef struct kvx__ucx {
    kvx__ucx_side am;           /* the worker peers reach: active messages only */
    kvx__ucx_side rma;          /* one-sided reads; context NULL where there is none */
    int epfd;                   /* both workers' event fds */
    uint64_t mem_types;         /* the memory types of the rma context */
    unsigned version;           /* of the UCX running, major << 8 | minor */
    int software_rma;
    uint32_t conns;             /* connections to each peer's am worker (kvx_ucx_desc.connections) */
    char net_devices[256];      /* the am worker's, as in effect */
    char rma_tls[256];          /* the rma worker's transports ("" : none) */
    uint8_t *addr_msg;          /* both addresses, as published (kvx_wire.h) */
    uint32_t addr_msg_len;
    ucp_mem_h scratch;          /* GPU memory UCX allocated: where a GPU cache's first read lands */
    void *scratch_addr;
    kvx__ucx_getter get;        /* kvx's own get (kvx_ucx_get.h) */
    kvx__ucx_epref *refs;       /* every endpoint's error-callback argument not yet freed */
} kvx__ucx;

#define KVX__UCX_VERSION(major, minor) ((unsigned)(major) << 8 | (unsigned)(minor))
#define KVX__UCX_SCRATCH (256u << 10)  /* bytes of a GPU cache's first read */

KVX__PRIV kvx__ucx *kvx__ucx_of(kvx_ctx *ctx) { return (kvx__ucx *)ctx->be; }
KVX__PRIV kvx__ucx_getter *kvx__ucx_getter_of(kvx_ctx *ctx) { return &kvx__ucx_of(ctx)->get; }
KVX__PRIV kvx__ucx_peer *kvx__ucx_peer_of(const kvx_peer *p) { return p ? (kvx__ucx_peer *)p->be : NULL; }

/* What a read op that UCX ended with s reports, the same whether UCX says so
   at once or in the op's callback: a dead or unreachable peer is the peer's
   failure, not kvx's or UCX's. */
KVX__PRIV kvx_status kvx__ucx_op_status(ucs_status_t s) {
    return s == UCS_OK ? KVX_OK : s == UCS_ERR_CANCELED ? KVX_ERR_CANCELED : s == UCS_ERR_NO_MEMORY ? KVX_ERR_NOMEM : KVX_ERR_PEER;
}

/* An op UCX refused at once: its status as kvx__ucx_op_status says, UCX's text. */
KVX__PRIV kvx_status kvx__ucx_op_fail(kvx_ctx *ctx, const kvx_peer *p, const char *what, ucs_status_t s) {
    return kvx__fail(ctx, kvx__ucx_op_status(s), "ucx %s: %s to %s/%d: %s", ucp_get_version_string(), what, p->name, p->rank, ucs_status_string(s));
}

KVX__PRIV kvx_status kvx__ucx_fail(kvx_ctx *ctx, const char *what, ucs_status_t s) {
    return kvx__fail(ctx, KVX_ERR_BACKEND, "ucx %s: %s: %s", ucp_get_version_string(), what, ucs_status_string(s));
}

KVX__PRIV ucs_status_t kvx__ucx_am_cb(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                      const ucp_am_recv_param_t *param) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    (void)header; (void)header_length;
    /* UCX releases a rendezvous descriptor itself when this returns UCS_OK */
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) { KVX__DROP(ctx, "ucx: a notification of %zu bytes (rendezvous) dropped", length); return UCS_OK; }
    kvx__notify_arrived(ctx, (const uint8_t *)data, length);
    return UCS_OK;
}

/*--- settings: devices and transports ----------------------------------------*/

/* The network device of this host's default route (IPv4, else IPv6); 0 if none. */
KVX__PRIV int kvx__ucx_default_dev(char *dev, size_t cap) {
    char line[512], ifc[64], dst[64];
    unsigned flags;
    FILE *f = fopen("/proc/net/route", "r");
    int found = 0;
    if (f) {
        while (!found && fgets(line, sizeof line, f))
            if (sscanf(line, "%63s %63s %*s %x", ifc, dst, &flags) == 3 && !strcmp(dst, "00000000") && (flags & 1u)) found = 1;
        fclose(f);
    }
    if (!found && (f = fopen("/proc/net/ipv6_route", "r")) != NULL) {
        char d[64], dl[16];
        while (!found && fgets(line, sizeof line, f))
            if (sscanf(line, "%63s %15s %*s %*s %*s %*s %*s %*s %*s %63s", d, dl, ifc) == 3 && !strcmp(dl, "00") &&
                strspn(d, "0") == strlen(d) && strcmp(ifc, "lo")) found = 1;
        fclose(f);
    }
    if (found) kvx__strlcpy(dev, ifc, cap);
    return found;
}

/* kvx_ucx_desc.connections, else $KVX_UCX_CONNECTIONS, else 0 (by the
   peer, at connect): 1 to KVX__UCX_CONNS_MAX or "auto", anything else
   refused. */
KVX__PRIV kvx_status kvx__ucx_conns_of(kvx_ctx *ctx, const kvx_ctx_desc *desc, uint32_t *out) {
    const char *e = getenv("KVX_UCX_CONNECTIONS");
    char *end = NULL;
    unsigned long n = 1;
    *out = 0;
    if (desc->ucx.connections) n = desc->ucx.connections;
    else if (!e || !*e || !strcmp(e, "auto")) return KVX_OK;
    else {
        n = strtoul(e, &end, 10);
        if (*end || e[0] == '-') n = 0;
    }
    if (n < 1 || n > KVX__UCX_CONNS_MAX) {
        if (desc->ucx.connections)
            return kvx__fail(ctx, KVX_ERR_ARG, "ucx: kvx_ucx_desc.connections is %lu: 1 to %u", n, KVX__UCX_CONNS_MAX);
        return kvx__fail(ctx, KVX_ERR_ARG, "ucx: KVX_UCX_CONNECTIONS=%s: a number of connections, 1 to %u, or auto", e, KVX__UCX_CONNS_MAX);
    }
    *out = (uint32_t)n;
    return KVX_OK;
}

/* The am worker's devices: the desc's, $UCX_NET_DEVICES, else the default
   route's device and every InfiniBand port (UCX names them "mlx5_0:1"),
   else lo. */
KVX__PRIV void kvx__ucx_net_devices(const kvx_ctx_desc *desc, char *out, size_t cap) {
    const char *env = getenv("UCX_NET_DEVICES");
    DIR *d;
    struct dirent *e;
    size_t n;
    if (desc->ucx.net_devices && *desc->ucx.net_devices) { kvx__strlcpy(out, desc->ucx.net_devices, cap); return; }
    if (env && *env) { kvx__strlcpy(out, env, cap); return; }
    if (!kvx__ucx_default_dev(out, cap)) kvx__strlcpy(out, "lo", cap);
    if ((d = opendir("/sys/class/infiniband")) != NULL) {
        while ((e = readdir(d)) != NULL) {
            char path[300];
            DIR *pd;
            struct dirent *pe;
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "/sys/class/infiniband/%s/ports", e->d_name);
            if (!(pd = opendir(path))) continue;
            while ((pe = readdir(pd)) != NULL)
                if (pe->d_name[0] != '.' && (n = strlen(out)) + strlen(e->d_name) + strlen(pe->d_name) + 3 < cap)
                    snprintf(out + n, cap - n, ",%s:%s", e->d_name, pe->d_name);
            closedir(pd);
        }
        closedir(d);
    }
}

/* The transports the rma worker may use: those that enforce remote keys or
   reach this host alone. ud is rc's and dc's wireup path. */
static const char *const kvx__ucx_keyed[] = {
    "posix", "sysv", "cma", "knem", "xpmem", "cuda_copy", "cuda_ipc", "gdr_copy", "rocm_copy", "rocm_ipc", "rocm_gdr",
    "rc_verbs", "rc_mlx5", "dc_mlx5", "ud_verbs", "ud_mlx5", NULL};

/* Does UCX_TLS-style name w (n bytes; an alias, or a transport) name tl? */
KVX__PRIV int kvx__ucx_tl_named(const char *w, size_t n, const char *tl) {
    static const char *const alias[][2] = {
        {"sm", "posix,sysv,cma,knem,xpmem"}, {"shm", "posix,sysv,cma,knem,xpmem"}, {"mm", "posix,sysv,xpmem"},
        {"cuda", "cuda_copy,cuda_ipc,gdr_copy"}, {"rocm", "rocm_copy,rocm_ipc,rocm_gdr"},
        {"ib", "rc_verbs,rc_mlx5,dc_mlx5,ud_verbs,ud_mlx5"}, {"rc", "rc_verbs,rc_mlx5,ud_verbs,ud_mlx5"},
        {"rc_v", "rc_verbs,ud_verbs"}, {"rc_x", "rc_mlx5,ud_mlx5"}, {"dc", "dc_mlx5,ud_mlx5"}, {"dc_x", "dc_mlx5,ud_mlx5"},
        {"ud", "ud_verbs,ud_mlx5"}, {"ud_v", "ud_verbs"}, {"ud_x", "ud_mlx5"}, {"all", "*"}};
    size_t i;
    while (n && (*w == '\\' || *w == ' ')) { w++; n--; }  /* "\\tcp": a name, not an alias */
    for (i = 0; i < sizeof alias / sizeof alias[0]; i++)
        if (strlen(alias[i][0]) == n && !strncmp(w, alias[i][0], n)) {
            const char *l = alias[i][1];
            size_t k = strlen(tl);
            if (*l == '*') return 1;
            for (; *l; l += strcspn(l, ",") + (l[strcspn(l, ",")] ? 1 : 0))
                if (strcspn(l, ",") == k && !strncmp(l, tl, k)) return 1;
            return 0;
        }
    return strlen(tl) == n && !strncmp(w, tl, n);
}

/* Does the UCX_TLS value list (unset or "all": everything; "^a,b": all but) allow tl? */
KVX__PRIV int kvx__ucx_tls_allow(const char *list, const char *tl) {
    int neg = list && *list == '^', hit = 0;
    const char *w;
    if (!list || !*list) return 1;
    for (w = list + neg; *w; w += strcspn(w, ",") + (w[strcspn(w, ",")] ? 1 : 0))
        if (kvx__ucx_tl_named(w, strcspn(w, ","), tl)) hit = 1;
    return neg ? !hit : hit;
}

/* The transports a context found (ucp_context_print_info's "resource"
   lines, "... flags -- tcp/lo"), as ",tl," words in out. */
KVX__PRIV void kvx__ucx_available(ucp_context_h c, char *out, size_t cap) {
    char *text = NULL, *line, *save = NULL;
    size_t tlen = 0, used = 1;
    FILE *f = open_memstream(&text, &tlen);
    kvx__strlcpy(out, ",", cap);
    if (!f) return;
    ucp_context_print_info(c, f);
    fclose(f);
    for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *tl = strstr(line, "resource") ? strstr(line, "-- ") : NULL;
        size_t n;
        if (!tl) continue;
        tl += 3;
        n = strcspn(tl, "/ ");
        if (n && used + n + 2 < cap && !strstr(out, tl)) {
            memcpy(out + used, tl, n);
            used += n;
            out[used++] = ',';
            out[used] = 0;
        }
    }
    free(text);
}

/* The rma worker's transports: the keyed ones that $UCX_TLS allows and UCX
   has (InfiniBand's where the host has a device). "" : none. */
KVX__PRIV void kvx__ucx_rma_tls(ucp_context_h am, char *out, size_t cap) {
    char have[512], word[24];
    const char *tls = getenv("UCX_TLS");
    DIR *d = opendir("/sys/class/infiniband");
    int ib = 0;
    size_t i, used = 0;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) if (e->d_name[0] != '.') ib = 1;
        closedir(d);
    }
    kvx__ucx_available(am, have, sizeof have);
    out[0] = 0;
    for (i = 0; kvx__ucx_keyed[i]; i++) {
        const char *tl = kvx__ucx_keyed[i];
        int is_ib = tl[0] == 'r' && tl[1] == 'c' ? 1 : tl[0] == 'd' || tl[0] == 'u';
        snprintf(word, sizeof word, ",%s,", tl);
        if (!kvx__ucx_tls_allow(tls, tl) || (is_ib ? !ib : !strstr(have, word))) continue;
        if (used + strlen(tl) + 2 >= cap) break;
        used += (size_t)snprintf(out + used, cap - used, "%s%s", used ? "," : "", tl);
    }
}

/*--- open and close --------------------------------------------------------*/

KVX__PRIV void kvx__ucx_side_close(kvx__ucx_side *s) {
    if (s->addr) ucp_worker_release_address(s->worker, s->addr);
    if (s->worker) ucp_worker_destroy(s->worker);
    if (s->context) ucp_cleanup(s->context);
    memset(s, 0, sizeof *s);
    s->efd = -1;
}

/* A context of these features, with these settings over UCX's own (name,
   value pairs, NULL-ended), and its worker. */
KVX__PRIV kvx_status kvx__ucx_side_open(kvx_ctx *ctx, kvx__ucx_side *s, uint64_t features, const char *const *set, const char *which) {
    ucp_config_t *cfg;
    ucp_params_t prm;
    ucp_worker_params_t wp;
    ucs_status_t st;
    char what[96];
    if ((st = ucp_config_read(NULL, NULL, &cfg)) != UCS_OK) return kvx__ucx_fail(ctx, "ucp_config_read", st);
    for (; set && set[0]; set += 2)
        if ((st = ucp_config_modify(cfg, set[0], set[1])) != UCS_OK) {
            ucp_config_release(cfg);
            snprintf(what, sizeof what, "ucp_config_modify %s=%s (%s worker)", set[0], set[1], which);
            return kvx__ucx_fail(ctx, what, st);
        }
    memset(&prm, 0, sizeof prm);
    prm.field_mask = UCP_PARAM_FIELD_FEATURES;
    prm.features = features | UCP_FEATURE_WAKEUP;
    st = ucp_init(&prm, cfg, &s->context);
    ucp_config_release(cfg);
    snprintf(what, sizeof what, "ucp_init (%s worker)", which);
    if (st != UCS_OK) { s->context = NULL; return kvx__ucx_fail(ctx, what, st); }
    memset(&wp, 0, sizeof wp);
    /* kvx serializes every worker call under the context lock. */
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    if ((st = ucp_worker_create(s->context, &wp, &s->worker)) != UCS_OK) { s->worker = NULL; return kvx__ucx_fail(ctx, "ucp_worker_create", st); }
    if ((st = ucp_worker_get_address(s->worker, &s->addr, &s->addr_len)) != UCS_OK) { s->addr = NULL; return kvx__ucx_fail(ctx, "ucp_worker_get_address", st); }
    if ((st = ucp_worker_get_efd(s->worker, &s->efd)) != UCS_OK) return kvx__ucx_fail(ctx, "ucp_worker_get_efd", st);
    return KVX_OK;
}

KVX__PRIV void kvx__ucx_close(kvx_ctx *ctx) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    if (!u) return;
    if (u->scratch) ucp_mem_unmap(u->rma.context, u->scratch);
    if (u->epfd >= 0) close(u->epfd);
    kvx__ucx_side_close(&u->rma);
    kvx__ucx_side_close(&u->am);
    while (u->refs) {  /* the workers and every endpoint are gone: no callback can come */
        kvx__ucx_epref *r = u->refs;
        u->refs = r->next;
        KVX_FREE(r);
    }
    KVX_FREE(u->get.gets);
    KVX_FREE(u->get.free_gets);
    KVX_FREE(u->get.acct);
    KVX_FREE(u->addr_msg);
    KVX_FREE(u);
    ctx->be = NULL;
}

/* UCX logs a warning and a backtrace for every message of a kind it has no
   handler for (the software get/put kvx leaves out, among others): a flood
   of them would stall the process writing its log. Once per process, and
   not where the user set UCX's level. */
/* libucs exports it (1.13 to 1.22 at least); its header, ucs/config/global_opts.h,
   is not C99 in 1.22, so it is declared here. */
#ifdef __cplusplus
extern "C" {
#endif
ucs_status_t ucs_global_opts_set_value(const char *name, const char *value);
#ifdef __cplusplus
}
#endif
KVX__PRIV void kvx__ucx_quiet_once(void) {
    if (!getenv("UCX_LOG_LEVEL")) ucs_global_opts_set_value("LOG_LEVEL", "error");
}
KVX__PRIV void kvx__ucx_quiet(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, kvx__ucx_quiet_once);
}

/* A size as UCX's settings write it (bytes, or with b, k, kb, m, mb, g or
   gb after it, any case): 0 if it is not one. */
KVX__PRIV uint64_t kvx__ucx_memunits(const char *s) {
    static const char *const units[] = {"", "b", "k", "kb", "m", "mb", "g", "gb"};
    static const unsigned shift[] = {0, 0, 10, 10, 20, 20, 30, 30};
    uint64_t v = 0;
    size_t k;
    if (!s || *s < '0' || *s > '9') return 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        if (v > (UINT64_MAX >> 30) / 10) return 0;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    for (k = 0; k < sizeof units / sizeof *units; k++) {
        const char *a = s, *b = units[k];
        while (*a && *b && tolower((unsigned char)*a) == *b) { a++; b++; }
        if (!*a && !*b) return v << shift[k];
    }
    return 0;
}

/* The TCP receive segment of the am worker: kvx's own (larger than UCX's
   default, so that a reply of 132 KiB arrives whole: kvx_ucx_get.h,
   "REPLIES IN ONE PIECE"), unless the user set UCX's segment sizes, whose
   stand. What the reader asks for in one reply follows from it. */
KVX__PRIV kvx_status kvx__ucx_rx_seg(kvx_ctx *ctx, kvx__ucx *u, char *set, size_t cap) {
    const char *rx = getenv("UCX_TCP_RX_SEG_SIZE");
    uint64_t seg = KVX__UCX_RX_SEG;
    *set = 0;
    if (rx && *rx) {
        if ((seg = kvx__ucx_memunits(rx)) < KVX__UCX_RX_SEG_MIN)
            return kvx__fail(ctx, KVX_ERR_ARG, "ucx: UCX_TCP_RX_SEG_SIZE=%s: kvx's get over TCP needs a size of at least %uk (bytes, "
                             "or a number and k, m or g)", rx, KVX__UCX_RX_SEG_MIN >> 10);
    } else if (getenv("UCX_TCP_TX_SEG_SIZE")) {
        seg = KVX__UCX_RX_SEG_UCX;  /* UCX's default stands beside the user's fragments */
    } else {
        snprintf(set, cap, "%u", KVX__UCX_RX_SEG);
    }
    seg -= KVX__UCX_SEG_HEADERS;
    u->get.ask_bytes = seg < KVX__UCX_GET_PART ? seg : KVX__UCX_GET_PART;
    return KVX_OK;
}

/* The worker peers reach: active messages only (kvx's get, notifications),
   with kvx's handlers. */
KVX__PRIV kvx_status kvx__ucx_am_open(kvx_ctx *ctx, kvx__ucx *u) {
    const char *am_set[] = {"NET_DEVICES", NULL, "TCP_PUT_ENABLE", "n", NULL, NULL, NULL, NULL, NULL};
    char seg[24];
    int nset = 4;
    static const unsigned ids[3] = {KVX__UCX_AM_NOTIFY, KVX__UCX_AM_GET, KVX__UCX_AM_GET_REPLY};
    ucp_am_recv_callback_t cbs[3];
    ucp_am_handler_param_t am;
    ucp_context_attr_t attr;
    kvx_status st;
    ucs_status_t s;
    int k;
    am_set[1] = u->net_devices;
    /* Not UCX_PROTO_ENABLE=y on 1.13: its newer protocols cannot abort a
       software get (an assertion in ucp_ep_reqs_purge) when a peer fails.
       Nor on 1.22 (its default) for kvx's own get: there the newer
       protocols send a reply of 16 KiB to 256 KiB over TCP as 8 KiB
       fragments copied in, and kvx read host caches at 1.0 GB/s where the
       older ones gave 2.7-3.1 (64 and 256 KiB blocks, kvx_bench pack, this
       2-core machine). Where UCX_PROTO_ENABLE is set, or software RMA
       stages GPU caches through this worker, UCX's choice stands. */
    if (!getenv("UCX_PROTO_ENABLE") && !u->software_rma) { am_set[nset++] = "PROTO_ENABLE"; am_set[nset++] = "n"; }
    if ((st = kvx__ucx_rx_seg(ctx, u, seg, sizeof seg)) != KVX_OK) return st;
    if (*seg) { am_set[nset++] = "TCP_RX_SEG_SIZE"; am_set[nset++] = seg; }
    if ((st = kvx__ucx_side_open(ctx, &u->am, UCP_FEATURE_AM, am_set, "active message")) != KVX_OK) return st;
    cbs[0] = kvx__ucx_am_cb; cbs[1] = kvx__ucx_get_serve; cbs[2] = kvx__ucx_get_reply;
    memset(&am, 0, sizeof am);
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.arg = ctx;
    for (k = 0; k < 3; k++) {
        am.id = ids[k];
        am.cb = cbs[k];
        if ((s = ucp_worker_set_am_recv_handler(u->am.worker, &am)) != UCS_OK) return kvx__ucx_fail(ctx, "ucp_worker_set_am_recv_handler", s);
    }
    memset(&attr, 0, sizeof attr);  /* what UCX can take at all; the rma context's, if there is one, below */
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(u->am.context, &attr) == UCS_OK) u->mem_types = attr.memory_types;
    return KVX_OK;
}

/* The rma worker: keyed transports only, unless software RMA was asked
   for. None is no error: host caches are then read by kvx's own get. */
KVX__PRIV void kvx__ucx_rma_open(kvx_ctx *ctx, kvx__ucx *u, const kvx_ctx_desc *desc) {
    const char *rma_set[] = {"TLS", NULL, NULL, NULL, NULL};
    ucp_context_attr_t attr;
    if (u->software_rma) {
        const char *tls = getenv("UCX_TLS");
        kvx__strlcpy(u->rma_tls, tls && *tls ? tls : "all", sizeof u->rma_tls);
        rma_set[2] = "NET_DEVICES";
        rma_set[3] = u->net_devices;
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: software RMA is on (%s): any process that reaches this context's UCX ports (%s) can "
                 "read and write all of its memory", desc->ucx.software_rma ? "kvx_ucx_desc.software_rma" : "KVX_UCX_SOFTWARE_RMA",
                 u->net_devices);
    } else {
        kvx__ucx_rma_tls(u->am.context, u->rma_tls, sizeof u->rma_tls);
    }
    if (!u->rma_tls[0]) return;
    rma_set[1] = u->rma_tls;
    if (kvx__ucx_side_open(ctx, &u->rma, UCP_FEATURE_RMA, rma_set, "one-sided") != KVX_OK) {
        KVX__LOG(ctx, KVX_LOG_INFO, "ucx: no worker for one-sided reads over %s (%s): host caches are read by kvx's own get",
                 u->rma_tls, ctx->err);
        kvx__ucx_side_close(&u->rma);
        u->rma_tls[0] = 0;
        return;
    }
    memset(&attr, 0, sizeof attr);
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(u->rma.context, &attr) == UCS_OK) u->mem_types = attr.memory_types;
}

/* One fd to sleep on for both workers, and the address peers get. */
KVX__PRIV kvx_status kvx__ucx_fd_and_address(kvx_ctx *ctx, kvx__ucx *u) {
    struct epoll_event ev;
    kvx__ucx_addr_msg msg;
    if ((u->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) return kvx__fail(ctx, KVX_ERR_BACKEND, "ucx: epoll_create1: %s", strerror(errno));
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    if (epoll_ctl(u->epfd, EPOLL_CTL_ADD, u->am.efd, &ev) != 0 ||
        (u->rma.context && epoll_ctl(u->epfd, EPOLL_CTL_ADD, u->rma.efd, &ev) != 0))
        return kvx__fail(ctx, KVX_ERR_BACKEND, "ucx: epoll_ctl: %s", strerror(errno));
    msg.ucx_version = u->version;
    msg.am = (const uint8_t *)u->am.addr; msg.am_len = (uint32_t)u->am.addr_len;
    msg.rma = (const uint8_t *)u->rma.addr; msg.rma_len = u->rma.context ? (uint32_t)u->rma.addr_len : 0;
    u->addr_msg_len = (uint32_t)kvx__ucx_addr_write(NULL, 0, &msg);
    if (!(u->addr_msg = (uint8_t *)KVX_MALLOC(u->addr_msg_len))) return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory");
    kvx__ucx_addr_write(u->addr_msg, u->addr_msg_len, &msg);
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__ucx_open(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    const char *sw = getenv("KVX_UCX_SOFTWARE_RMA");
    kvx_status st;
    unsigned major, minor, release;
    kvx__ucx *u = (kvx__ucx *)kvx__calloc(1, sizeof *u);
    if (!u) return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory");
    ctx->be = u;
    u->am.efd = u->rma.efd = u->epfd = -1;
    ucp_get_version(&major, &minor, &release);  /* the library loaded, which may not be the headers' */
    u->version = KVX__UCX_VERSION(major, minor);
    u->software_rma = desc->ucx.software_rma ? desc->ucx.software_rma > 0 : sw && *sw && strcmp(sw, "0") != 0;
    if ((st = kvx__ucx_conns_of(ctx, desc, &u->conns)) != KVX_OK) goto fail;
    kvx__ucx_quiet();
    if (kvx__nonces_init(&u->get.nonces) != 0) { st = kvx__fail(ctx, KVX_ERR_BACKEND, "ucx: no random bytes from the kernel"); goto fail; }
    kvx__ucx_net_devices(desc, u->net_devices, sizeof u->net_devices);
    if ((st = kvx__ucx_am_open(ctx, u)) != KVX_OK) goto fail;
    kvx__ucx_rma_open(ctx, u, desc);
    if ((st = kvx__ucx_fd_and_address(ctx, u)) != KVX_OK) goto fail;
    KVX__LOG(ctx, KVX_LOG_INFO, "ucx %s: active messages on %s; one-sided reads over %s", ucp_get_version_string(), u->net_devices,
             u->rma_tls[0] ? u->rma_tls : "nothing (no transport that enforces keys)");
    return KVX_OK;
fail:
    kvx__ucx_close(ctx);
    return st;
}

KVX__PRIV void kvx__ucx_query(const kvx_ctx *ctx, kvx_ctx_desc *out) {
    const kvx__ucx *u = (const kvx__ucx *)ctx->be;
    out->ucx.net_devices = u->net_devices;
    out->ucx.software_rma = u->software_rma;
    out->ucx.connections = u->conns;
}

/*--- memory ------------------------------------------------------------------*/

/* Mapped in the rma context, whose keys peers read it by; with no rma
   context a host region has no key (kvx's get reads it) and a GPU region
   no way to be read. */
KVX__PRIV kvx_status kvx__ucx_mem_register(kvx_ctx *ctx, const kvx__cache_info *ci, kvx__region *r) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    ucp_mem_map_params_t mp;
    ucp_mem_h memh;
    void *buf;
    size_t len;
    ucs_status_t s;
    if (ci->mem == KVX_MEM_CUDA && !(u->mem_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)))
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "ucx %s takes no GPU memory (ucp_context_query lists no cuda memory type: UCX was "
                         "built without CUDA support, or its CUDA module found no driver): install a CUDA-enabled UCX (PyPI's "
                         "libucx-cu12 or libucx-cu13, or UCX configured --with-cuda) or use the CUDA backend",
                         ucp_get_version_string());
    if (ci->mem == KVX_MEM_CUDA && !u->rma.context)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "ucx %s: GPU memory is read one-sided, and UCX offers kvx no transport here that "
                         "enforces remote keys for it (cuda_ipc, rc or dc with GPUDirect; UCX_TLS=%s): use the CUDA backend on one host, "
                         "or kvx_ucx_desc.software_rma = 1 on a trusted network", ucp_get_version_string(),
                         getenv("UCX_TLS") ? getenv("UCX_TLS") : "unset");
    r->be = NULL;
    r->rkey = NULL;
    r->rkey_len = 0;
    if (!u->rma.context) return KVX_OK;
    memset(&mp, 0, sizeof mp);
    /* No memory type given: UCX detects it. UCX 1.22 told "cuda" fails to
       register GPU memory (rcache: "failed to insert region [0x0..0x0]"). */
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = (void *)(uintptr_t)r->addr;
    mp.length = (size_t)r->len;
    if ((s = ucp_mem_map(u->rma.context, &mp, &memh)) != UCS_OK) return kvx__ucx_fail(ctx, "ucp_mem_map", s);
    if ((s = ucp_rkey_pack(u->rma.context, memh, &buf, &len)) != UCS_OK) {
        ucp_mem_unmap(u->rma.context, memh);
        return kvx__ucx_fail(ctx, "ucp_rkey_pack", s);
    }
    r->rkey = (uint8_t *)KVX_MALLOC(len ? len : 1);
    if (!r->rkey) {
        ucp_rkey_buffer_release(buf);
        ucp_mem_unmap(u->rma.context, memh);
        return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory");
    }
    memcpy(r->rkey, buf, len);
    r->rkey_len = (uint32_t)len;
    ucp_rkey_buffer_release(buf);
    r->be = memh;
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__ucx_address(kvx_ctx *ctx, const uint8_t **addr, uint32_t *len) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    *addr = u->addr_msg;
    *len = u->addr_msg_len;
    return KVX_OK;
}

/*--- waiting ----------------------------------------------------------------*/

KVX__PRIV unsigned kvx__ucx_progress_both(kvx__ucx *u) {
    unsigned n = ucp_worker_progress(u->am.worker);
    if (u->rma.worker) n += ucp_worker_progress(u->rma.worker);
    return n;
}

/* Both workers armed: KVX_OK, safe to sleep on the epoll set; else progress again. */
KVX__PRIV kvx_status kvx__ucx_arm(kvx_ctx *ctx) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    if (ucp_worker_arm(u->am.worker) != UCS_OK) return KVX_PENDING;
    if (u->rma.worker && ucp_worker_arm(u->rma.worker) != UCS_OK) return KVX_PENDING;
    return KVX_OK;
}

/* One step of a bounded wait: progress, or sleep on the event fds (at most
   100 ms). 0 once until has passed. */
KVX__PRIV int kvx__ucx_wait_step(kvx_ctx *ctx, uint64_t until) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    uint64_t now = kvx__now_ns();
    struct pollfd pf;
    if (now >= until) return 0;
    if (kvx__ucx_progress_both(u)) return 1;
    if (kvx__ucx_arm(ctx) != KVX_OK) return 1;
    pf.fd = u->epfd; pf.events = POLLIN; pf.revents = 0;
    kvx__wait_poll(ctx, &pf, 1, (int)((until - now) / 1000000u > 100 ? 100 : (until - now) / 1000000u + 1));
    return 1;
}

KVX__PRIV void kvx__ucx_mem_deregister(kvx_ctx *ctx, kvx__region *r) {
    kvx__ucx_replies_drain(ctx, r->addr, r->len);
    if (r->be) ucp_mem_unmap(kvx__ucx_of(ctx)->rma.context, (ucp_mem_h)r->be);
    r->be = NULL;
}

/* Wait for a request, progressing and sleeping on the event fds, until done
   or the context's timeout. */
KVX__PRIV ucs_status_t kvx__ucx_wait_req(kvx_ctx *ctx, ucs_status_ptr_t req) {
    ucs_status_t s;
    uint64_t until = kvx__now_ns() + (uint64_t)ctx->timeout_ms * 1000000ull;
    if (req == NULL) return UCS_OK;
    if (UCS_PTR_IS_ERR(req)) return UCS_PTR_STATUS(req);
    while ((s = ucp_request_check_status(req)) == UCS_INPROGRESS)
        if (!kvx__ucx_wait_step(ctx, until)) { ucp_request_free(req); return UCS_ERR_TIMED_OUT; }
    ucp_request_free(req);
    return s;
}

/*--- endpoints ----------------------------------------------------------------*/

/* UCX says "Endpoint timeout" for a connection the peer reset (its process
   ended) as well as for one that went quiet: kvx says which it can tell. */
KVX__PRIV void kvx__ucx_ep_err(void *arg, ucp_ep_h ep, ucs_status_t status) {
    kvx__ucx_epref *ref = (kvx__ucx_epref *)arg;
    char why[160];
    (void)ep;
    if (!ref->p) return;  /* an endpoint left behind by a peer that is gone */
    snprintf(why, sizeof why, "%s%s", status == UCS_ERR_ENDPOINT_TIMEOUT || status == UCS_ERR_CONNECTION_RESET
             ? "the connection was reset or went quiet; UCX: " : "UCX: ", ucs_status_string(status));
    kvx__peer_failed(ref->p, why);
}

/* An endpoint to p; with failure handling, *ref is its callback's argument
   (the caller keeps it: kvx__ucx_ep_close frees it, kvx__ucx_ep_orphan
   leaves it to the context's end). */
KVX__PRIV ucs_status_t kvx__ucx_ep(kvx_ctx *ctx, kvx__ucx_side *side, kvx_peer *p, const uint8_t *addr, ucp_err_handling_mode_t mode,
                                   ucp_ep_h *h, kvx__ucx_epref **ref) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    ucp_ep_params_t ep;
    ucs_status_t s;
    *ref = NULL;
    memset(&ep, 0, sizeof ep);
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = (const ucp_address_t *)addr;
    ep.err_mode = mode;
    if (mode == UCP_ERR_HANDLING_MODE_PEER) {
        if (!(*ref = (kvx__ucx_epref *)kvx__calloc(1, sizeof **ref))) return UCS_ERR_NO_MEMORY;
        (*ref)->p = p;
        ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.err_handler.cb = kvx__ucx_ep_err;
        ep.err_handler.arg = *ref;
    }
    if ((s = ucp_ep_create(side->worker, &ep, h)) != UCS_OK) {
        KVX_FREE(*ref);
        *ref = NULL;
        return s;
    }
    if (*ref) { (*ref)->next = u->refs; u->refs = *ref; }
    return UCS_OK;
}

/* An endpoint that stays with its worker after its peer is gone (one still
   in wireup, which UCX 1.13 can abort on when it is closed by force): its
   callback, if UCX calls it, does nothing. */
KVX__PRIV void kvx__ucx_ep_orphan(kvx__ucx_epref *ref) {
    if (ref) ref->p = NULL;
}

KVX__PRIV void kvx__ucx_ep_close(kvx_ctx *ctx, ucp_ep_h h, kvx__ucx_epref *ref) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    ucp_request_param_t prm;
    ucs_status_ptr_t req;
    uint64_t until = kvx__now_ns() + 10000000000ull;
    int done = 1;
    kvx__ucx_ep_orphan(ref);
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
    req = ucp_ep_close_nbx(h, &prm);
    if (UCS_PTR_IS_PTR(req)) {
        while (ucp_request_check_status(req) == UCS_INPROGRESS && kvx__now_ns() < until) kvx__ucx_progress_both(u);
        done = ucp_request_check_status(req) != UCS_INPROGRESS;
        ucp_request_free(req);
    }
    if (ref && done) {  /* closed: UCX calls it no more */
        kvx__ucx_epref **at;
        for (at = &u->refs; *at && *at != ref; at = &(*at)->next) {}
        if (*at) *at = ref->next;
        KVX_FREE(ref);
    }
}

/* Flush a new endpoint so its wireup is over before any read is posted. */
KVX__PRIV ucs_status_t kvx__ucx_wireup(kvx_ctx *ctx, ucp_ep_h h) {
    ucp_request_param_t prm;
    memset(&prm, 0, sizeof prm);
    return kvx__ucx_wait_req(ctx, ucp_ep_flush_nbx(h, &prm));
}

KVX__PRIV void kvx__ucx_rkeys_drop(kvx_peer *p) {
    uint32_t c, i;
    for (c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++)
            if (p->caches[c].regions[i].be) {
                ucp_rkey_destroy((ucp_rkey_h)p->caches[c].regions[i].be);
                p->caches[c].regions[i].be = NULL;
            }
}

/* A forced close completes every outstanding get (canceled) before the close
   request itself completes; kvx checks that it did. */
KVX__PRIV void kvx__ucx_disconnect(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(p);
    uint64_t until = kvx__now_ns() + 10000000000ull;
    if (!pp) return;
    if (pp->rma) kvx__ucx_ep_close(ctx, pp->rma, pp->rma_ref);
    if (pp->am) kvx__ucx_ep_close(ctx, pp->am, pp->am_ref);
    while (pp->nmore) { pp->nmore--; kvx__ucx_ep_close(ctx, pp->am_more[pp->nmore], pp->am_more_ref[pp->nmore]); }
    kvx__ucx_get_cancel(ctx, p);  /* kvx's own gets hold no UCX request to cancel */
    while (p->ops_out && kvx__now_ns() < until) kvx__ucx_progress_both(u);
    if (p->ops_out) KVX__LOG(ctx, KVX_LOG_ERROR, "ucx: %u operations to %s/%d still outstanding after a forced close", p->ops_out, p->name, p->rank);
    kvx__ucx_rkeys_drop(p);
    p->be = NULL;
    KVX_FREE(pp);
}

/*--- which transport reads each cache -------------------------------------------*/

/* Transports that move a get without the owner's CPU. */
KVX__PRIV int kvx__ucx_one_sided(const char *tl) {
    static const char *const hw[] = {"rc", "dc", "ud", "srd", "cma", "knem", "xpmem", "cuda_ipc", "gdr", "rocm"};
    size_t i;
    for (i = 0; i < sizeof hw / sizeof hw[0]; i++)
        if (!strncmp(tl, hw[i], strlen(hw[i]))) return 1;
    return 0;
}

/* Why UCX's choice is what it is, for kvx_peer_add's policy refusals. */
KVX__PRIV void kvx__ucx_why(kvx_ctx *ctx, kvx_peer *p, int one_sided) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    const char *tls = getenv("UCX_TLS");
    if (one_sided)
        snprintf(p->why, sizeof p->why, "UCX %s picked a one-sided lane to this peer among %.80s (UCX_TLS=%.40s)",
                 ucp_get_version_string(), u->rma_tls, tls ? tls : "unset");
    else
        snprintf(p->why, sizeof p->why, "UCX %s has no one-sided transport that enforces keys to this peer (%.40s; UCX_TLS=%.24s; "
                 "on one host kvx leaves out shared memory where it cannot handle peer failure): kvx's own get, served by the "
                 "owner's CPU", ucp_get_version_string(), u->rma_tls[0] ? u->rma_tls : "none here", tls ? tls : "unset");
}

#if defined(UCP_API_VERSION) && UCP_API_VERSION >= UCP_VERSION(1, 14)
#define KVX__UCX_MAX_TLS 16u
/* UCX 1.14 and later say which transports an endpoint uses: how many, in tl
   (KVX__UCX_MAX_TLS entries); 0 if UCX did not say. */
KVX__PRIV unsigned kvx__ucx_ep_transports(ucp_ep_h ep, ucp_transport_entry_t *tl) {
    ucp_ep_attr_t attr;
    memset(&attr, 0, sizeof attr);
    memset(tl, 0, KVX__UCX_MAX_TLS * sizeof *tl);
    attr.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
    attr.transports.entries = tl;
    attr.transports.num_entries = KVX__UCX_MAX_TLS;
    attr.transports.entry_size = sizeof *tl;
    if (ucp_ep_query(ep, &attr) != UCS_OK) return 0;
    return attr.transports.num_entries < KVX__UCX_MAX_TLS ? attr.transports.num_entries : KVX__UCX_MAX_TLS;
}

KVX__PRIV int kvx__ucx_ep_has(ucp_ep_h ep, const char *name) {
    ucp_transport_entry_t tl[KVX__UCX_MAX_TLS];
    unsigned i, n = ep ? kvx__ucx_ep_transports(ep, tl) : 0;
    for (i = 0; i < n; i++)
        if (tl[i].transport_name && !strcmp(tl[i].transport_name, name)) return 1;
    return 0;
}

/* An endpoint's lanes: its rma transport (one-sided preferred; "" if UCX
   does not say) and its first transport, which carries its messages. */
KVX__PRIV void kvx__ucx_lanes(ucp_ep_h ep, char *rma, char *am, size_t cap) {
    ucp_transport_entry_t tl[KVX__UCX_MAX_TLS];
    unsigned i, n = kvx__ucx_ep_transports(ep, tl);
    rma[0] = 0;
    kvx__strlcpy(am, n && tl[0].transport_name ? tl[0].transport_name : "unknown", cap);
    for (i = 0; i < n; i++)
        if (tl[i].transport_name && kvx__ucx_one_sided(tl[i].transport_name)) { kvx__strlcpy(rma, tl[i].transport_name, cap); break; }
}
#else
/* Before 1.14 no endpoint says its transports (only ucp_ep_print_info). */
KVX__PRIV int kvx__ucx_ep_has(ucp_ep_h ep, const char *name) { (void)ep; (void)name; return 0; }

/* UCX 1.13 has no transport query: ucp_ep_print_info lists each lane as
   "N:tl/dev ... rma_bw#k ...", read from an open_memstream. A lane list with
   no rma lane means gets are emulated over active messages. */
KVX__PRIV void kvx__ucx_lanes(ucp_ep_h ep, char *rma, char *am, size_t cap) {
    char *text = NULL, *line, *save = NULL;
    size_t tlen = 0;
    FILE *f = open_memstream(&text, &tlen);
    rma[0] = 0;
    kvx__strlcpy(am, "unknown", cap);
    if (!f) return;
    ucp_ep_print_info(ep, f);
    fclose(f);
    for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *lane = strstr(line, "lane["), *tl, *slash;
        char name[48];
        size_t n;
        if (!lane || !(tl = strchr(lane, ':'))) continue;
        tl++;
        while (*tl == ' ') tl++;
        while (*tl >= '0' && *tl <= '9') tl++;  /* resource index */
        if (*tl != ':') continue;
        tl++;
        if (!(slash = strchr(tl, '/'))) continue;
        n = (size_t)(slash - tl) < sizeof name - 1 ? (size_t)(slash - tl) : sizeof name - 1;
        memcpy(name, tl, n);
        name[n] = 0;
        if (strstr(line, " rma") && !rma[0]) kvx__strlcpy(rma, name, cap);
        if (strstr(line, " am") && !strcmp(am, "unknown")) kvx__strlcpy(am, name, cap);
    }
    free(text);
}
#endif

/* The transports named in UCX's description of a request (1.22: "get into
   host memory length 65536 zero-copy cma/memory ..." or "... software
   emulation tcp/lo"): each "tl/device" word after the length, joined by '+'; *one_sided when
   one of them moves a get without the owner's CPU. 0 if none is named. */
KVX__PRIV int kvx__ucx_info_tls(const char *info, char *tls, size_t cap, int *one_sided) {
    const char *w = strstr(info, " length ");  /* what comes before names the memory ("into cuda/GPU0") */
    size_t used = 0;
    w = w ? w + 8 : info;
    *one_sided = 0;
    tls[0] = 0;
    while (*w) {
        const char *e = w, *slash;
        size_t n;
        while (*e && *e != ' ' && *e != ',') e++;
        slash = (const char *)memchr(w, '/', (size_t)(e - w));
        n = slash ? (size_t)(slash - w) : 0;
        if (n && n < 24 && w[0] >= 'a' && w[0] <= 'z' && strncmp(w, "MB/", 3)) {
            char tl[24];
            memcpy(tl, w, n);
            tl[n] = 0;
            if (kvx__ucx_one_sided(tl)) *one_sided = 1;
            if (!strstr(tls, tl) && used + n + 2 < cap) {
                if (used) tls[used++] = '+';
                memcpy(tls + used, tl, n + 1);
                used += n;
            }
        }
        w = *e ? e + 1 : e;
    }
    if (strstr(info, "emulation")) *one_sided = 0;
    return used != 0;
}

/* A UCX yes/no setting from the environment, set to yes. */
KVX__PRIV int kvx__ucx_env_on(const char *name) {
    const char *v = getenv(name);
    return v && (!strcmp(v, "y") || !strcmp(v, "yes") || !strcmp(v, "on") || !strcmp(v, "1"));
}

/* GPU memory of UCX's own, where a GPU cache's first read lands (so UCX
   picks the path a GPU-to-GPU read takes). NULL where UCX cannot allocate it. */
KVX__PRIV void *kvx__ucx_scratch(kvx_ctx *ctx) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    ucp_mem_map_params_t mp;
    ucp_mem_attr_t ma;
    if (u->scratch_addr || !(u->mem_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA))) return u->scratch_addr;
    memset(&mp, 0, sizeof mp);
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS |
                    UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    mp.length = KVX__UCX_SCRATCH;
    mp.flags = UCP_MEM_MAP_ALLOCATE;
    mp.memory_type = UCS_MEMORY_TYPE_CUDA;
    if (ucp_mem_map(u->rma.context, &mp, &u->scratch) != UCS_OK) { u->scratch = NULL; return NULL; }
    memset(&ma, 0, sizeof ma);
    ma.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS;
    if (ucp_mem_query(u->scratch, &ma) != UCS_OK) { ucp_mem_unmap(u->rma.context, u->scratch); u->scratch = NULL; return NULL; }
    u->scratch_addr = ma.address;
    return u->scratch_addr;
}

/* The path UCX 1.22 and later takes for a cache over the rma endpoint, from
   its own description of a first read of up to one block (into host memory
   for a host cache, GPU memory for a GPU cache). */
KVX__PRIV ucs_status_t kvx__ucx_first_read(kvx_ctx *ctx, kvx_peer *p, kvx__cache_info *rc, char *tls, size_t cap, int *one_sided, char *info, size_t icap) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    const kvx__region *r = &rc->regions[0];
    size_t len = rc->block_bytes < KVX__UCX_SCRATCH ? (size_t)rc->block_bytes : KVX__UCX_SCRATCH;
    void *buf = rc->mem == KVX_MEM_CUDA ? kvx__ucx_scratch(ctx) : NULL, *host = NULL;
    ucp_request_param_t prm;
    ucp_request_attr_t ra;
    ucs_status_ptr_t req;
    ucs_status_t s;
    if (len > r->len) len = (size_t)r->len;
    if (!len) len = 1;
    info[0] = 0;
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    if (buf) { prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH; prm.memh = u->scratch; }
    else if (!(buf = host = KVX_MALLOC(len))) return UCS_ERR_NO_MEMORY;
    req = ucp_get_nbx(kvx__ucx_peer_of(p)->rma, buf, len, r->addr, (ucp_rkey_h)r->be, &prm);
    if (UCS_PTR_IS_PTR(req)) {
        memset(&ra, 0, sizeof ra);
        ra.field_mask = UCP_REQUEST_ATTR_FIELD_INFO_STRING | UCP_REQUEST_ATTR_FIELD_INFO_STRING_SIZE;
        ra.debug_string = info;
        ra.debug_string_size = icap;
        if (ucp_request_query(req, &ra) != UCS_OK) info[0] = 0;
    }
    s = kvx__ucx_wait_req(ctx, req);
    KVX_FREE(host);
    if (s != UCS_OK) return s;
    if (!kvx__ucx_info_tls(info, tls, cap, one_sided)) { kvx__strlcpy(tls, "unknown", cap); *one_sided = 0; }
    return UCS_OK;
}

/* A GPU cache read over something other than cuda_ipc: said in the peer's
   why and warned, with the likely cause and what UCX said. */
KVX__PRIV void kvx__ucx_not_ipc(kvx_ctx *ctx, kvx_peer *p, uint32_t c, const char *path, const char *info) {
    /* the likely cause: briefly for the peer's why, in full for the log */
    static const char *const brief[3] = {
        "no cuda_ipc to this peer", "cuda_ipc could not map this memory",
        "UCX turns cuda_ipc gets off without NVLink; UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y turns them on"};
    static const char *const full[3] = {
        "no cuda_ipc to this peer (another host, a GPU it cannot map, or UCX_TLS)",
        "this endpoint has cuda_ipc with gets on, but UCX's cuda_ipc could not map this memory "
        "(VMM or pool memory it cannot export, as PyTorch's expandable segments make); kvx's CUDA backend reads it",
        "this endpoint has cuda_ipc, but UCX did not take it for this read: UCX turns cuda_ipc gets off "
        "where it sees no NVLink (UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y turns them on), and cannot map memory "
        "it cannot export (VMM or some pools); kvx's CUDA backend reads both"};
    int k = !kvx__ucx_ep_has(kvx__ucx_peer_of(p)->rma, "cuda_ipc") ? 0 : kvx__ucx_env_on("UCX_CUDA_IPC_ENABLE_GET_ZCOPY") ? 1 : 2;
    snprintf(p->why, sizeof p->why, "UCX %s read GPU cache %u over %s, not cuda_ipc (%s)", ucp_get_version_string(), c, path, brief[k]);
    KVX__LOG(ctx, KVX_LOG_WARN, "ucx %s: GPU cache %u of %s/%d is read over %s, not cuda_ipc: %s; UCX: \"%s\"",
             ucp_get_version_string(), c, p->name, p->rank, path, full[k], info);
}

/* How each of a peer's caches is read (see the top of this file), and the
   transport string: cache 0's path and each other cache's that differs. */
KVX__PRIV ucs_status_t kvx__ucx_paths(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(p);
    char first[96] = "", am_rma[48], am_tl[48], rma_tl[48] = "", rma_am[48] = "";
    uint32_t c;
    kvx__ucx_lanes(pp->am, am_rma, am_tl, sizeof am_tl);
    if (pp->rma) kvx__ucx_lanes(pp->rma, rma_tl, rma_am, sizeof rma_tl);
    p->be_flags = 0;
    for (c = 0; c < p->ncaches; c++) {
        kvx__cache_info *rc = &p->caches[c];
        char tls[48], path[96], info[320] = "";
        int one_sided = 0, keyed = pp->rma && rc->nregions && rc->regions[0].be;
        if (!rc->nregions) continue;
        if (keyed && u->version >= KVX__UCX_VERSION(1, 22)) {
            ucs_status_t s = kvx__ucx_first_read(ctx, p, rc, tls, sizeof tls, &one_sided, info, sizeof info);
            if (s != UCS_OK) return s;
        } else if (keyed) {  /* before 1.22 the endpoint's lanes decide for every cache */
            one_sided = rma_tl[0] && kvx__ucx_one_sided(rma_tl);
            kvx__strlcpy(tls, rma_tl[0] ? rma_tl : rma_am, sizeof tls);
        }
        if (keyed && (rc->mem == KVX_MEM_CUDA || (!pp->rma_unsafe && (one_sided || KVX_TEST_HOOK_UCX_NATIVE_GET)))) {
            rc->be_flags = 0;  /* ucp_get_nbx on the rma endpoint */
            snprintf(path, sizeof path, "%s%s%s", tls, one_sided ? "" : " (sw)", pp->rma_unsafe ? " (no failure handling)" : "");
        } else if (rc->mem == KVX_MEM_HOST) {
            rc->be_flags = KVX__UCX_BY_KVX_GET;
            if (pp->nmore) snprintf(path, sizeof path, "%s (sw) (%u connections)", am_tl, 1 + pp->nmore);
            else snprintf(path, sizeof path, "%s (sw)", am_tl);
        } else {
            rc->be_flags = KVX__UCX_NO_PATH;
            snprintf(path, sizeof path, "none for GPU memory");
        }
        rc->gather = (rc->be_flags & KVX__UCX_BY_KVX_GET) != 0;
        p->be_flags |= rc->be_flags;
        if (c == 0) {
            kvx__strlcpy(first, path, sizeof first);
            snprintf(p->transport, sizeof p->transport, "ucx:%s", path);
            kvx__ucx_why(ctx, p, keyed && one_sided);
        } else if (strcmp(path, first)) {
            size_t n = strlen(p->transport);
            snprintf(p->transport + n, sizeof p->transport - n, ", cache %u: %s", c, path);
        }
        if (rc->mem == KVX_MEM_CUDA && keyed && !strstr(tls, "cuda_ipc")) kvx__ucx_not_ipc(ctx, p, c, path, info);
    }
    if (!p->ncaches) snprintf(p->transport, sizeof p->transport, "ucx:%s (sw)", am_tl);
    return UCS_OK;
}

/* One small read from the peer before kvx_peer_add returns. UCX 1.13 over
   TCP aborts in the owner when a reader dies while the owner's side of the
   connection is still in wireup; a first get served by the owner completes
   that wireup in both directions while both sides are known to be alive. */
KVX__PRIV ucs_status_t kvx__ucx_probe(kvx_ctx *ctx, kvx_peer *p) {
    ucp_request_param_t prm;
    uint8_t buf[8];
    uint32_t c;
    if (KVX_TEST_HOOK_UCX_NO_PROBE) return UCS_OK;
    for (c = 0; c < p->ncaches && (!p->caches[c].nregions || (p->caches[c].be_flags & KVX__UCX_NO_PATH)); c++) {}
    if (c == p->ncaches) return UCS_OK;
    if (p->caches[c].be_flags & KVX__UCX_BY_KVX_GET) {
        volatile ucs_status_t got = UCS_INPROGRESS;
        uint64_t until = kvx__now_ns() + (uint64_t)ctx->timeout_ms * 1000000ull;
        kvx__op one;
        memset(&one, 0, sizeof one);
        one.laddr = (uint64_t)(uintptr_t)buf; one.raddr = p->caches[c].regions[0].addr; one.len = 1; one.count = 1;
        if (kvx__ucx_get_post(ctx, NULL, p, &one, (ucs_status_t *)&got) != KVX_OK)
            return UCS_ERR_NO_MEMORY;
        while (got == UCS_INPROGRESS)
            if (!kvx__ucx_wait_step(ctx, until)) { kvx__ucx_get_cancel(ctx, p); return UCS_ERR_TIMED_OUT; }
        return got;
    }
    memset(&prm, 0, sizeof prm);
    return kvx__ucx_wait_req(ctx, ucp_get_nbx(kvx__ucx_peer_of(p)->rma, buf, 1, p->caches[c].regions[0].addr,
                                              (ucp_rkey_h)p->caches[c].regions[0].be, &prm));
}

/* The endpoint to the peer's rma worker, where both have one and they
   reach each other, and the peer's keys unpacked on it. With peer failure
   handling where a transport of the rma worker offers it (InfiniBand, or
   TCP under software_rma); UCX's shared memory offers none, so on one host
   the endpoint goes without it only where it is needed: UCX offers none to
   this peer at all (UCX_TLS=sm), or the peer's GPU caches have no other way
   (said in the transport, "(no failure handling)"). Host caches otherwise
   stay with kvx's get, which has it. A peer not reached is no error. */
KVX__PRIV kvx_status kvx__ucx_connect_rma(kvx_ctx *ctx, kvx_peer *p, const kvx__ucx_addr_msg *a) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(p);
    ucp_ep_h h = NULL;
    kvx__ucx_epref *ref = NULL;
    ucs_status_t s = UCS_ERR_UNREACHABLE;
    uint32_t c, i, keys = 0, gpu = 0;
    int peer_ok = u->software_rma || strstr(u->rma_tls, "rc_") || strstr(u->rma_tls, "dc_") || strstr(u->rma_tls, "ud_");
    int here = !strcmp(p->host, ctx->host);
    for (c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++)
            if (p->caches[c].regions[i].rkey_len) { keys++; gpu += p->caches[c].mem == KVX_MEM_CUDA; }
    if (!u->rma.context || !a->rma_len || !keys) return KVX_OK;
    /* No attempt UCX can only refuse: it logs each refusal as an error. */
    if (!pp->am_unsafe && peer_ok) s = kvx__ucx_ep(ctx, &u->rma, p, a->rma, UCP_ERR_HANDLING_MODE_PEER, &h, &ref);
    if (s == UCS_ERR_UNREACHABLE && (pp->am_unsafe || (gpu && here))) {
        s = kvx__ucx_ep(ctx, &u->rma, p, a->rma, UCP_ERR_HANDLING_MODE_NONE, &h, &ref);
        pp->rma_unsafe = s == UCS_OK && !pp->am_unsafe;
    }
    if (s == UCS_ERR_UNREACHABLE) return KVX_OK;
    if (s != UCS_OK) {
        KVX__LOG(ctx, KVX_LOG_INFO, "ucx: no one-sided endpoint to %s/%d over %s: %s", p->name, p->rank, u->rma_tls, ucs_status_string(s));
        return KVX_OK;
    }
    if ((s = kvx__ucx_wireup(ctx, h)) != UCS_OK) {
        /* an endpoint still in wireup is not closed by force (UCX 1.13 can abort): the worker's destruction takes it */
        if (s != UCS_ERR_TIMED_OUT) kvx__ucx_ep_close(ctx, h, ref);
        else kvx__ucx_ep_orphan(ref);
        pp->rma_unsafe = 0;
        KVX__LOG(ctx, KVX_LOG_INFO, "ucx: the one-sided endpoint to %s/%d did not connect: %s", p->name, p->rank, ucs_status_string(s));
        return KVX_OK;
    }
    pp->rma = h;
    pp->rma_ref = ref;
    for (c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++) {
            ucp_rkey_h rk;
            kvx__region *r = &p->caches[c].regions[i];
            if (!r->rkey_len) continue;
            if ((s = ucp_ep_rkey_unpack(h, r->rkey, &rk)) != UCS_OK) {
                char what[128];
                snprintf(what, sizeof what, "ucp_ep_rkey_unpack of %s/%d cache %u region %u", p->name, p->rank, c, i);
                return kvx__ucx_fail(ctx, what, s);
            }
            r->be = rk;
        }
    return KVX_OK;
}

/* Endpoint choice. kvx asks for peer failure handling, so that a dead peer
   completes every outstanding read with an error and a forced close cancels
   what is in flight. UCX 1.13's shared-memory transports (cma, posix, sysv)
   cannot handle peer failure, so UCX leaves them out and a peer on this host
   is read over TCP: correct, and reported ("ucx:tcp (sw)" and a warning),
   never silent. Only where UCX offers no transport with failure handling at
   all (UCX_TLS=sm, say) does kvx go on without it, loudly: a peer that dies
   or stops mid-read is then found by the deadline alone, and UCX cannot
   cancel the reads it holds. */
/* The endpoint to the peer's active-message worker, with peer failure
   handling where UCX offers it, its wireup finished. */
KVX__PRIV kvx_status kvx__ucx_connect_am(kvx_ctx *ctx, kvx_peer *p, const kvx__ucx_addr_msg *a, kvx__ucx_peer *pp) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    uint32_t want;
    ucp_ep_h h = NULL;
    kvx__ucx_epref *ref = NULL;
    char what[400];
    ucs_status_t s = kvx__ucx_ep(ctx, &u->am, p, a->am, UCP_ERR_HANDLING_MODE_PEER, &h, &ref);
    if (s == UCS_ERR_UNREACHABLE) {
        s = kvx__ucx_ep(ctx, &u->am, p, a->am, UCP_ERR_HANDLING_MODE_NONE, &h, &ref);
        pp->am_unsafe = s == UCS_OK;
    }
    if (s != UCS_OK) {
        snprintf(what, sizeof what, "ucp_ep_create to %s/%d", p->name, p->rank);
        return kvx__ucx_fail(ctx, what, s);
    }
    if ((s = kvx__ucx_wireup(ctx, h)) != UCS_OK) {
        /* UCX 1.13 can abort when an endpoint still in wireup is closed by
           force, so a peer that never answered keeps its endpoint until the
           context is destroyed. */
        if (s == UCS_ERR_TIMED_OUT) {
            kvx__ucx_ep_orphan(ref);
            return kvx__fail(ctx, KVX_ERR_TIMEOUT, "ucx: %s/%d (pid %u on %s) did not answer the connection within %u ms",
                             p->name, p->rank, p->pid, p->host, ctx->timeout_ms);
        }
        kvx__ucx_ep_close(ctx, h, ref);
        snprintf(what, sizeof what, "connecting to %s/%d (pid %u on %s)", p->name, p->rank, p->pid, p->host);
        kvx__ucx_fail(ctx, what, s);
        return KVX_ERR_PEER;
    }
    pp->am = h;
    pp->am_ref = ref;
    /* More connections to the same worker (see the top of this file): as
       kvx_ucx_desc.connections asks, or by default to a peer on another host
       over TCP. One that does not connect leaves the peer with those that did. */
    want = u->conns ? u->conns : strcmp(p->host, ctx->host) && kvx__ucx_ep_has(h, "tcp") ? KVX__UCX_CONNS_AUTO : 1u;
    if (want > 1 && pp->am_unsafe) {
        if (u->conns) KVX__LOG(ctx, KVX_LOG_WARN, "ucx: one connection to %s/%d, not the %u asked for: its transport has no peer "
                               "failure handling", p->name, p->rank, want);
        want = 1;
    }
    if (want > 1 && (u->version < KVX__UCX_VERSION(1, 22) || a->ucx_version < KVX__UCX_VERSION(1, 22))) {
        if (u->conns) KVX__LOG(ctx, KVX_LOG_WARN, "ucx: one connection to %s/%d, not the %u asked for: UCX before 1.22 (an owner aborts "
                               "when a reader of several connections dies mid-read); this process runs UCX %u.%u, the peer %u.%u",
                               p->name, p->rank, want, u->version >> 8, u->version & 0xffu, a->ucx_version >> 8, a->ucx_version & 0xffu);
        want = 1;
    }
    while (1 + pp->nmore < want) {
        ucp_ep_h h2 = NULL;
        kvx__ucx_epref *r2 = NULL;
        s = kvx__ucx_ep(ctx, &u->am, p, a->am, UCP_ERR_HANDLING_MODE_PEER, &h2, &r2);  /* want > 1: the first has it */
        if (s == UCS_OK && (s = kvx__ucx_wireup(ctx, h2)) != UCS_OK) {
            if (s == UCS_ERR_TIMED_OUT) kvx__ucx_ep_orphan(r2);  /* as above: not closed while in wireup */
            else kvx__ucx_ep_close(ctx, h2, r2);
        }
        if (s != UCS_OK) {
            KVX__LOG(ctx, KVX_LOG_WARN, "ucx: connection %u of %u to %s/%d did not connect (%s): reading over %u", 2 + pp->nmore, want,
                     p->name, p->rank, ucs_status_string(s), 1 + pp->nmore);
            break;
        }
        pp->am_more[pp->nmore] = h2;
        pp->am_more_ref[pp->nmore] = r2;
        pp->nmore++;
    }
    return KVX_OK;
}

/* What a connected peer's transport leaves without: said once, at connect. */
KVX__PRIV void kvx__ucx_connect_warn(kvx_ctx *ctx, kvx_peer *p, const kvx__ucx_peer *pp) {
    if (pp->rma_unsafe && strstr(p->transport, "(no failure handling)"))
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: GPU caches of %s/%d are read without peer failure handling (%s): UCX's shared memory, "
                 "which carries the endpoint's wireup on this host, has none, so a peer that dies or stops mid-read is found by the "
                 "deadline alone; the CUDA backend has it", p->name, p->rank, p->transport);
    if (pp->am_unsafe) {
        kvx__strlcpy(p->transport + strlen(p->transport), " (no failure handling)", sizeof p->transport - strlen(p->transport));
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: no transport to %s/%d that UCX allows handles peer failure (UCX_TLS?): %s; "
                 "a peer that dies or stops mid-read is found by the deadline alone", p->name, p->rank, p->transport);
    } else if (!strcmp(p->host, ctx->host) && !strncmp(p->transport, "ucx:tcp", 7)) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx %s: %s/%d is on this host but is read over TCP: UCX's shared-memory transports "
                 "cannot handle peer failure, which kvx requires; use the CUDA backend for same-host GPU caches",
                 ucp_get_version_string(), p->name, p->rank);
    }
}

KVX__PRIV kvx_status kvx__ucx_connect(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    kvx__ucx_addr_msg a;
    kvx__ucx_peer *pp;
    ucs_status_t s;
    kvx_status st;
    uint32_t ver = 0;
    int e = kvx__ucx_addr_read(p->addr, p->addr_len, &a, &ver);
    char what[400];
    if (e == KVX__WIRE_VERSION)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "ucx: the address of %s/%d is of version %u, this kvx reads version %u", p->name, p->rank, ver, KVX__UCX_ADDR_VERSION);
    if (e != KVX__WIRE_OK) return kvx__fail(ctx, KVX_ERR_ARG, "ucx: the address of %s/%d is malformed (%s)", p->name, p->rank, kvx__wire_why(e));
    if (!(pp = (kvx__ucx_peer *)kvx__calloc(1, sizeof *pp))) return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory");
    pp->wait_head = pp->wait_tail = KVX__UCX_NONE;
    p->be = NULL;
    if ((st = kvx__ucx_connect_am(ctx, p, &a, pp)) != KVX_OK) { KVX_FREE(pp); return st; }
    p->be = pp;
    if ((st = kvx__ucx_connect_rma(ctx, p, &a)) != KVX_OK) { kvx__ucx_disconnect(ctx, p); return st; }
    s = kvx__ucx_paths(ctx, p);
    /* Before 1.22 the first read completes the wireup (kvx__ucx_probe); from
       1.22 the paths' first reads did, and there is no abort to avoid. */
    if (s == UCS_OK && u->version < KVX__UCX_VERSION(1, 22)) s = kvx__ucx_probe(ctx, p);
    if (s != UCS_OK) {
        kvx__ucx_disconnect(ctx, p);
        if (s == UCS_ERR_TIMED_OUT)
            return kvx__fail(ctx, KVX_ERR_TIMEOUT, "ucx: %s/%d (pid %u on %s) did not serve a first read within %u ms",
                             p->name, p->rank, p->pid, p->host, ctx->timeout_ms);
        snprintf(what, sizeof what, "first read from %s/%d (pid %u on %s)", p->name, p->rank, p->pid, p->host);
        kvx__ucx_fail(ctx, what, s);
        return KVX_ERR_PEER;
    }
    kvx__ucx_connect_warn(ctx, p, pp);
    return KVX_OK;
}

/* kvx's get lands bytes with the host's memcpy: not into a GPU cache; and a
   GPU cache no transport kvx may use reaches is read by nothing. */
KVX__PRIV kvx_status kvx__ucx_can_read(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc) {
    if ((rc->be_flags & KVX__UCX_BY_KVX_GET) && lc->mem != KVX_MEM_HOST)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "ucx %s: GPU cache %u cannot take a read of host cache %u of %s/%d over %s: "
                         "that path is served in software by kvx's own get, which lands bytes on the host; read into a host cache",
                         ucp_get_version_string(), lc->id, rc->id, p->name, p->rank, p->transport);
    if (rc->be_flags & KVX__UCX_NO_PATH)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "ucx %s: GPU cache %u of %s/%d is reachable only over transports UCX serves in "
                         "software (%s), whose get and put kvx does not enable: they would let any process that reaches the port read "
                         "and write all of the owner's memory. Use cuda_ipc or RDMA, the CUDA backend on one host, or "
                         "kvx_ucx_desc.software_rma = 1 on both sides on a trusted network",
                         ucp_get_version_string(), rc->id, p->name, p->rank, p->transport);
    return KVX_OK;
}

KVX__PRIV void kvx__ucx_get_cb(void *req, ucs_status_t status, void *user) {
    kvx__op_done((kvx__read *)user, kvx__ucx_op_status(status),
                 ucs_status_string(status));
    ucp_request_free(req);
}

KVX__PRIV kvx_status kvx__ucx_post(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    kvx__ucx_peer *pp = kvx__ucx_peer_of(rd->peer);
    ucp_request_param_t prm;
    ucs_status_ptr_t sp;
    /* kvx's get for software-served peers, and for an op of several pieces
       (the peer gathered when the read was posted, before a reconnect); small
       ops are batched until the end of the post (kvx__ucx_flush) */
    if ((rd->rc->be_flags & KVX__UCX_BY_KVX_GET) || op->count > 1) {
        uint64_t bytes = op->len * (op->count ? op->count : 1u);
        if (op->len && bytes <= kvx__ucx_getter_of(ctx)->ask_bytes) return kvx__ucx_stage(ctx, rd, op);
        return kvx__ucx_get_post(ctx, rd, rd->peer, op, NULL);
    }
    if (!pp || !pp->rma || !rd->rc->regions[op->rreg].be)
        return kvx__fail(ctx, KVX_ERR_PEER, "ucx: %s/%d has no one-sided endpoint for cache %u now (reconnected over another path)",
                         rd->peer->name, rd->peer->rank, rd->rc->id);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH;
    prm.cb.send = kvx__ucx_get_cb;
    prm.user_data = rd;
    prm.memh = (ucp_mem_h)KVX__OP_LREGION(rd, op)->be;
    sp = ucp_get_nbx(pp->rma, (void *)(uintptr_t)op->laddr, (size_t)op->len, op->raddr,
                     (ucp_rkey_h)rd->rc->regions[op->rreg].be, &prm);
    if (sp == NULL) {
        kvx__op_done(rd, KVX_OK, NULL);
        return KVX_OK;
    }
    if (UCS_PTR_IS_ERR(sp)) return kvx__ucx_op_fail(ctx, rd->peer, "ucp_get_nbx", UCS_PTR_STATUS(sp));
    return KVX_OK;
}

KVX__PRIV void kvx__ucx_flush(kvx_ctx *ctx, kvx_queue *q) {
    (void)q;
    kvx__ucx_stage_send(ctx);
}

KVX__PRIV void kvx__ucx_am_sent(void *req, ucs_status_t status, void *user) {
    kvx__read *rd = (kvx__read *)user;
    if (status != UCS_OK)
        KVX__LOG(rd->q->ctx, KVX_LOG_WARN, "notification %llu to %s/%d not delivered: %s", (unsigned long long)rd->notify_id,
                 rd->peer->name, rd->peer->rank, ucs_status_string(status));
    kvx__notify_sent(rd);
    ucp_request_free(req);
}

KVX__PRIV kvx_status kvx__ucx_notify(kvx_ctx *ctx, kvx__read *rd) {
    kvx__ucx_peer *pp = kvx__ucx_peer_of(rd->peer);
    ucp_request_param_t prm;
    ucs_status_ptr_t sp;
    if (!pp || !pp->am) return kvx__fail(ctx, KVX_ERR_PEER, "notification %llu: peer %s/%d is disconnected", (unsigned long long)rd->notify_id, rd->peer->name, rd->peer->rank);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = kvx__ucx_am_sent;
    prm.user_data = rd;
    sp = ucp_am_send_nbx(pp->am, KVX__UCX_AM_NOTIFY, NULL, 0, rd->notify_msg, sizeof rd->notify_msg, &prm);
    if (sp == NULL) { kvx__notify_sent(rd); return KVX_OK; }
    if (UCS_PTR_IS_ERR(sp)) return kvx__ucx_fail(ctx, "ucp_am_send_nbx (notification)", UCS_PTR_STATUS(sp));
    return KVX_OK;
}

KVX__PRIV int kvx__ucx_progress(kvx_ctx *ctx) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    int n = 0, k;
    unsigned e;
    for (k = 0; k < 1024 && (e = kvx__ucx_progress_both(u)) != 0; k++) n += (int)e;
    return n;
}

KVX__PRIV int kvx__ucx_event_fd(kvx_ctx *ctx) { return kvx__ucx_of(ctx)->epfd; }

KVX__PRIV void kvx__ucx_signal(kvx_ctx *ctx) { ucp_worker_signal(kvx__ucx_of(ctx)->am.worker); }

/* The transports of the policy classes that ucx names (kvx__policy_term). */
static const char *const kvx__ucx_policy[] = {"ipc=ucx:*cuda_ipc*", "rdma=ucx:rc*", "rdma=ucx:dc*", NULL};

/* The ucx backend's table: the entries it implements (kvx__backend). */
KVX__PRIV void kvx__ucx_fill(kvx__backend *b) {
    b->name = "ucx";
    b->kind = KVX_BACKEND_UCX;
    b->policy_classes = kvx__ucx_policy;
    b->keys_per_registration = 1;
    b->open = kvx__ucx_open;
    b->close = kvx__ucx_close;
    b->query = kvx__ucx_query;
    b->address = kvx__ucx_address;
    b->mem_register = kvx__ucx_mem_register;
    b->mem_deregister = kvx__ucx_mem_deregister;
    b->connect = kvx__ucx_connect;
    b->disconnect = kvx__ucx_disconnect;
    b->can_read = kvx__ucx_can_read;
    b->post = kvx__ucx_post;
    b->flush = kvx__ucx_flush;
    b->abandon = kvx__ucx_abandon;
    b->notify = kvx__ucx_notify;
    b->progress = kvx__ucx_progress;
    b->event_fd = kvx__ucx_event_fd;
    b->arm = kvx__ucx_arm;
    b->signal = kvx__ucx_signal;
}

#endif /* KVX_UCX_INCLUDED */
