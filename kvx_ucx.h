/* SPDX-License-Identifier: MIT */
/*
    kvx_ucx.h -- the UCX (ucp) backend of kvx. Included by kvx.h inside its
    implementation when KVX_UCX is defined; do not include it yourself.

    Link: pkg-config --libs ucx   (-lucp -luct -lucs)

    Reads are ucp_get_nbx on an endpoint per peer, created with peer error
    handling so a dead peer completes every outstanding read with an error.
    Notifications are 16-byte active messages. The progress thread sleeps on
    the worker's event fd (ucp_worker_get_efd + ucp_worker_arm).

    Over TCP UCX has no one-sided get: the owner serves reads in software, so
    the owner must progress, and kvx_peer_transport() says "(sw)". Host caches
    served that way are read by kvx's own get over active messages
    (kvx_ucx_get.h), not ucp_get_nbx, whose replies kvx cannot see: a cache
    deregistered under a stopped reader would hand it the memory's next bytes
    (UCX 1.13 and 1.22 alike). GPU caches, where UCX is built with CUDA, are
    read with ucp_get_nbx over whatever path UCX takes (cuda_ipc, or staged
    through the host), and a path that is not cuda_ipc is said in a warning.
    From UCX 1.22 each cache's path is what UCX says of a first read of it
    (ucp_request_query); before, the endpoint's lanes decide for every cache.
*/
#ifndef KVX_UCX_INCLUDED
#define KVX_UCX_INCLUDED

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
#include "kvx_ucx_get.h"

#define KVX__UCX_AM_NOTIFY 0x4b
/* Test seam (kvx.h, TEST SEAMS): read software-served peers with UCX's own
   ucp_get_nbx instead of kvx's get, to see what a UCX version does when a
   reader dies mid-read (UCX 1.13 aborts the owner). */
#if !defined(KVX_TEST_HOOK_UCX_NATIVE_GET)
#  define KVX_TEST_HOOK_UCX_NATIVE_GET 0
#endif
/* Test seam: no first read at connect, to see what a UCX version does when
   a reader dies while the owner's side is still in wireup. */
#if !defined(KVX_TEST_HOOK_UCX_NO_PROBE)
#  define KVX_TEST_HOOK_UCX_NO_PROBE 0
#endif

typedef struct kvx__ucx {
    ucp_context_h context;
    ucp_worker_h worker;
    ucp_address_t *addr;
    size_t addr_len;
    int efd;
    uint64_t mem_types;
    unsigned version;           /* of the UCX running, major << 8 | minor */
    ucp_mem_h scratch;          /* GPU memory UCX allocated: where a GPU cache's first read lands */
    void *scratch_addr;
    kvx__ucx_getter get;        /* kvx's own get (kvx_ucx_get.h) */
} kvx__ucx;

#define KVX__UCX_VERSION(major, minor) ((unsigned)(major) << 8 | (unsigned)(minor))
#define KVX__UCX_SCRATCH (256u << 10)  /* bytes of a GPU cache's first read */

KVX__PRIV kvx__ucx *kvx__ucx_of(kvx_ctx *ctx) { return (kvx__ucx *)ctx->be; }
KVX__PRIV kvx__ucx_getter *kvx__ucx_getter_of(kvx_ctx *ctx) { return &kvx__ucx_of(ctx)->get; }
KVX__PRIV ucp_worker_h kvx__ucx_worker(kvx_ctx *ctx) { return kvx__ucx_of(ctx)->worker; }

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
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: oversized notification dropped");
        return UCS_OK;
    }
    kvx__notify_arrived(ctx, (const uint8_t *)data, length);
    return UCS_OK;
}

KVX__PRIV void kvx__ucx_close(kvx_ctx *ctx) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    if (!u) return;
    if (u->scratch) ucp_mem_unmap(u->context, u->scratch);
    if (u->addr) ucp_worker_release_address(u->worker, u->addr);
    if (u->worker) ucp_worker_destroy(u->worker);
    if (u->context) ucp_cleanup(u->context);
    KVX_FREE(u->get.gets);
    KVX_FREE(u->get.free_gets);
    KVX_FREE(u);
    ctx->be = NULL;
}

KVX__PRIV kvx_status kvx__ucx_open(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    ucp_config_t *cfg;
    ucp_params_t prm;
    ucp_worker_params_t wp;
    ucp_am_handler_param_t am;
    ucp_context_attr_t attr;
    ucs_status_t s;
    unsigned major, minor, release;
    kvx__ucx *u = (kvx__ucx *)kvx__calloc(1, sizeof *u);
    (void)desc;
    if (!u) return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory");
    ctx->be = u;
    u->efd = -1;
    ucp_get_version(&major, &minor, &release);  /* the library loaded, which may not be the headers' */
    u->version = KVX__UCX_VERSION(major, minor);
    if ((s = ucp_config_read(NULL, NULL, &cfg)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_config_read", s); }
    /* Not UCX_PROTO_ENABLE=y on 1.13: its newer protocols cannot abort a
       software get (an assertion in ucp_ep_reqs_purge) when a peer fails. */
    memset(&prm, 0, sizeof prm);
    prm.field_mask = UCP_PARAM_FIELD_FEATURES;
    prm.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    s = ucp_init(&prm, cfg, &u->context);
    ucp_config_release(cfg);
    if (s != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_init", s); }
    memset(&attr, 0, sizeof attr);
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(u->context, &attr) == UCS_OK) u->mem_types = attr.memory_types;
    memset(&wp, 0, sizeof wp);
    /* kvx serializes every worker call under the context lock. */
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    if ((s = ucp_worker_create(u->context, &wp, &u->worker)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_worker_create", s); }
    if ((s = ucp_worker_get_address(u->worker, &u->addr, &u->addr_len)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_worker_get_address", s); }
    if ((s = ucp_worker_get_efd(u->worker, &u->efd)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_worker_get_efd", s); }
    memset(&am, 0, sizeof am);
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = KVX__UCX_AM_NOTIFY;
    am.cb = kvx__ucx_am_cb;
    am.arg = ctx;
    if ((s = ucp_worker_set_am_recv_handler(u->worker, &am)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_worker_set_am_recv_handler", s); }
    am.id = KVX__UCX_AM_GET;
    am.cb = kvx__ucx_get_serve;
    if ((s = ucp_worker_set_am_recv_handler(u->worker, &am)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_worker_set_am_recv_handler", s); }
    am.id = KVX__UCX_AM_GET_REPLY;
    am.cb = kvx__ucx_get_reply;
    if ((s = ucp_worker_set_am_recv_handler(u->worker, &am)) != UCS_OK) { kvx__ucx_close(ctx); return kvx__ucx_fail(ctx, "ucp_worker_set_am_recv_handler", s); }
    KVX__LOG(ctx, KVX_LOG_INFO, "ucx %s, worker address %zu bytes", ucp_get_version_string(), u->addr_len);
    return KVX_OK;
}

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
    memset(&mp, 0, sizeof mp);
    /* No memory type given: UCX detects it. UCX 1.22 told "cuda" fails to
       register GPU memory (rcache: "failed to insert region [0x0..0x0]"). */
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = (void *)(uintptr_t)r->addr;
    mp.length = (size_t)r->len;
    if ((s = ucp_mem_map(u->context, &mp, &memh)) != UCS_OK) return kvx__ucx_fail(ctx, "ucp_mem_map", s);
    if ((s = ucp_rkey_pack(u->context, memh, &buf, &len)) != UCS_OK) {
        ucp_mem_unmap(u->context, memh);
        return kvx__ucx_fail(ctx, "ucp_rkey_pack", s);
    }
    r->rkey = (uint8_t *)KVX_MALLOC(len ? len : 1);
    if (!r->rkey) {
        ucp_rkey_buffer_release(buf);
        ucp_mem_unmap(u->context, memh);
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
    *addr = (const uint8_t *)u->addr;
    *len = (uint32_t)u->addr_len;
    return KVX_OK;
}

KVX__PRIV void kvx__ucx_ep_err(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)ep;
    kvx__peer_failed((kvx_peer *)arg, ucs_status_string(status));
}

/* Transports that move a get without the owner's CPU. */
KVX__PRIV int kvx__ucx_one_sided(const char *tl) {
    static const char *const hw[] = {"rc", "dc", "ud", "srd", "cma", "knem", "xpmem", "cuda_ipc", "gdr", "rocm"};
    size_t i;
    for (i = 0; i < sizeof hw / sizeof hw[0]; i++)
        if (!strncmp(tl, hw[i], strlen(hw[i]))) return 1;
    return 0;
}

/* Why UCX's choice is what it is, for kvx_peer_add's policy refusals. */
KVX__PRIV void kvx__ucx_why(kvx_peer *p, int one_sided) {
    const char *tls = getenv("UCX_TLS"), *dev = getenv("UCX_NET_DEVICES");
    if (one_sided)
        snprintf(p->why, sizeof p->why, "UCX %s picked a one-sided lane to this peer (UCX_TLS=%s, UCX_NET_DEVICES=%s)",
                 ucp_get_version_string(), tls ? tls : "unset", dev ? dev : "unset");
    else
        snprintf(p->why, sizeof p->why, "UCX %s found no one-sided transport to this peer among those it may use (UCX_TLS=%s, "
                 "UCX_NET_DEVICES=%s; on one host kvx leaves out shared memory, which cannot handle peer failure): "
                 "its gets are served by the owner's CPU", ucp_get_version_string(), tls ? tls : "unset", dev ? dev : "unset");
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
    unsigned i, n = kvx__ucx_ep_transports(ep, tl);
    for (i = 0; i < n; i++)
        if (tl[i].transport_name && !strcmp(tl[i].transport_name, name)) return 1;
    return 0;
}

/* Prefer a one-sided transport, else the first, and mark the software-served ones. */
KVX__PRIV void kvx__ucx_transport(kvx_peer *p, ucp_ep_h ep) {
    ucp_transport_entry_t tl[KVX__UCX_MAX_TLS];
    const char *pick = NULL;
    unsigned i, n = kvx__ucx_ep_transports(ep, tl);
    if (!n) {
        kvx__strlcpy(p->transport, "ucx:unknown", sizeof p->transport);
        return;
    }
    for (i = 0; i < n; i++)
        if (tl[i].transport_name && kvx__ucx_one_sided(tl[i].transport_name)) { pick = tl[i].transport_name; break; }
    if (pick) snprintf(p->transport, sizeof p->transport, "ucx:%s", pick);
    else snprintf(p->transport, sizeof p->transport, "ucx:%s (sw)", tl[0].transport_name ? tl[0].transport_name : "unknown");
    kvx__ucx_why(p, pick != NULL);
}
#else
/* Before 1.14 no endpoint says its transports (only ucp_ep_print_info). */
KVX__PRIV int kvx__ucx_ep_has(ucp_ep_h ep, const char *name) { (void)ep; (void)name; return 0; }

/* UCX 1.13 has no transport query: ucp_ep_print_info lists each lane as
   "N:tl/dev ... rma_bw#k ...", read from an open_memstream. A lane list with
   no rma lane means gets are emulated over active messages. */
KVX__PRIV void kvx__ucx_transport(kvx_peer *p, ucp_ep_h ep) {
    char *text = NULL, *line, *save = NULL;
    size_t tlen = 0;
    char rma[48] = "", am[48] = "";
    FILE *f = open_memstream(&text, &tlen);
    if (!f) { kvx__strlcpy(p->transport, "ucx:unknown", sizeof p->transport); return; }
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
        if (strstr(line, " rma") && !rma[0]) kvx__strlcpy(rma, name, sizeof rma);
        if (strstr(line, " am") && !am[0]) kvx__strlcpy(am, name, sizeof am);
    }
    free(text);
    if (rma[0] && kvx__ucx_one_sided(rma))
        snprintf(p->transport, sizeof p->transport, "ucx:%s", rma);
    else if (rma[0])  /* e.g. tcp: its get is served by the owner's progress */
        snprintf(p->transport, sizeof p->transport, "ucx:%s (sw)", rma);
    else
        snprintf(p->transport, sizeof p->transport, "ucx:%s (sw)", am[0] ? am : "unknown");
    kvx__ucx_why(p, rma[0] && kvx__ucx_one_sided(rma));
}
#endif

KVX__PRIV void kvx__ucx_rkeys_drop(kvx_peer *p) {
    uint32_t c, i;
    for (c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++)
            if (p->caches[c].regions[i].be) {
                ucp_rkey_destroy((ucp_rkey_h)p->caches[c].regions[i].be);
                p->caches[c].regions[i].be = NULL;
            }
}

KVX__PRIV void kvx__ucx_ep_close(kvx_ctx *ctx, ucp_ep_h h);

/* A forced close completes every outstanding get (canceled) before the close
   request itself completes; kvx checks that it did. */
KVX__PRIV void kvx__ucx_disconnect(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    uint64_t until = kvx__now_ns() + 10000000000ull;
    if (!p->be) return;
    kvx__ucx_ep_close(ctx, (ucp_ep_h)p->be);
    kvx__ucx_get_cancel(ctx, p);  /* kvx's own gets hold no UCX request to cancel */
    while (p->ops_out && kvx__now_ns() < until) ucp_worker_progress(u->worker);
    if (p->ops_out) KVX__LOG(ctx, KVX_LOG_ERROR, "ucx: %u operations to %s/%d still outstanding after a forced close", p->ops_out, p->name, p->rank);
    p->be = NULL;
    kvx__ucx_rkeys_drop(p);
}

KVX__PRIV ucs_status_t kvx__ucx_ep(kvx_ctx *ctx, kvx_peer *p, ucp_err_handling_mode_t mode, ucp_ep_h *h) {
    ucp_ep_params_t ep;
    memset(&ep, 0, sizeof ep);
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = (const ucp_address_t *)p->addr;
    ep.err_mode = mode;
    if (mode == UCP_ERR_HANDLING_MODE_PEER) {
        ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.err_handler.cb = kvx__ucx_ep_err;
        ep.err_handler.arg = p;
    }
    return ucp_ep_create(kvx__ucx_of(ctx)->worker, &ep, h);
}

KVX__PRIV void kvx__ucx_ep_close(kvx_ctx *ctx, ucp_ep_h h) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    ucp_request_param_t prm;
    ucs_status_ptr_t req;
    uint64_t until = kvx__now_ns() + 10000000000ull;
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
    req = ucp_ep_close_nbx(h, &prm);
    if (UCS_PTR_IS_PTR(req)) {
        while (ucp_request_check_status(req) == UCS_INPROGRESS && kvx__now_ns() < until) ucp_worker_progress(u->worker);
        ucp_request_free(req);
    }
}

/* One step of a bounded wait: progress, or sleep on the event fd (at most
   100 ms). 0 once until has passed. */
KVX__PRIV int kvx__ucx_wait_step(kvx_ctx *ctx, uint64_t until) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    uint64_t now = kvx__now_ns();
    struct pollfd pf;
    if (now >= until) return 0;
    if (ucp_worker_progress(u->worker)) return 1;
    if (ucp_worker_arm(u->worker) != UCS_OK) return 1;
    pf.fd = u->efd; pf.events = POLLIN; pf.revents = 0;
    poll(&pf, 1, (int)((until - now) / 1000000u > 100 ? 100 : (until - now) / 1000000u + 1));
    return 1;
}

KVX__PRIV void kvx__ucx_mem_deregister(kvx_ctx *ctx, kvx__region *r) {
    kvx__ucx_replies_drain(ctx, r->addr, r->len);
    if (r->be) ucp_mem_unmap(kvx__ucx_of(ctx)->context, (ucp_mem_h)r->be);
    r->be = NULL;
}

/* Wait for a request, progressing and sleeping on the event fd, until done
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

/* Flush a new endpoint so its wireup is over before any read is posted. */
KVX__PRIV ucs_status_t kvx__ucx_wireup(kvx_ctx *ctx, ucp_ep_h h) {
    ucp_request_param_t prm;
    memset(&prm, 0, sizeof prm);
    return kvx__ucx_wait_req(ctx, ucp_ep_flush_nbx(h, &prm));
}

/* One small read from the peer before kvx_peer_add returns. UCX 1.13 over
   TCP aborts in the owner when a reader dies while the owner's side of the
   connection is still in wireup; a first get served by the owner completes
   that wireup in both directions while both sides are known to be alive. */
KVX__PRIV ucs_status_t kvx__ucx_probe(kvx_ctx *ctx, kvx_peer *p) {
    ucp_request_param_t prm;
    uint8_t buf[8];
    if (!p->ncaches || !p->caches[0].nregions || KVX_TEST_HOOK_UCX_NO_PROBE) return UCS_OK;
    if (p->caches[0].be_flags & KVX__UCX_BY_KVX_GET) {
        volatile ucs_status_t got = UCS_INPROGRESS;
        uint64_t until = kvx__now_ns() + (uint64_t)ctx->timeout_ms * 1000000ull;
        kvx__op one;
        memset(&one, 0, sizeof one);
        one.laddr = (uint64_t)(uintptr_t)buf; one.raddr = p->caches[0].regions[0].addr; one.len = 1; one.count = 1;
        if (kvx__ucx_get_post(ctx, NULL, p, &one, (ucs_status_t *)&got) != KVX_OK)
            return UCS_ERR_NO_MEMORY;
        while (got == UCS_INPROGRESS)
            if (!kvx__ucx_wait_step(ctx, until)) { kvx__ucx_get_cancel(ctx, p); return UCS_ERR_TIMED_OUT; }
        return got;
    }
    memset(&prm, 0, sizeof prm);
    return kvx__ucx_wait_req(ctx, ucp_get_nbx((ucp_ep_h)p->be, buf, 1, p->caches[0].regions[0].addr,
                                              (ucp_rkey_h)p->caches[0].regions[0].be, &prm));
}

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


/* How a peer's cache is read: host memory UCX serves in software by kvx's
   own get (the owner then sends a block's pieces, NHD tokens, as one
   reply), anything else by ucp_get_nbx. */
KVX__PRIV void kvx__ucx_cache_path(kvx_peer *p, kvx__cache_info *rc, int served_in_sw) {
    rc->be_flags = served_in_sw && rc->mem == KVX_MEM_HOST && !KVX_TEST_HOOK_UCX_NATIVE_GET ? KVX__UCX_BY_KVX_GET : 0u;
    rc->gather = (rc->be_flags & KVX__UCX_BY_KVX_GET) != 0;
    p->be_flags |= rc->be_flags;
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
    if (ucp_mem_map(u->context, &mp, &u->scratch) != UCS_OK) { u->scratch = NULL; return NULL; }
    memset(&ma, 0, sizeof ma);
    ma.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS;
    if (ucp_mem_query(u->scratch, &ma) != UCS_OK) { ucp_mem_unmap(u->context, u->scratch); u->scratch = NULL; return NULL; }
    u->scratch_addr = ma.address;
    return u->scratch_addr;
}

/* How UCX reads each of a peer's caches (1.22 and later, whose requests
   describe themselves): a first read of up to one block from each, into
   host memory for a host cache and into GPU memory for a GPU cache, and
   UCX's description of it. A cache UCX reads one-sided (cma, cuda_ipc, rc,
   ...) is read with ucp_get_nbx. One it serves in software goes by kvx's own
   get if it is host memory, by UCX's get if it is GPU memory (kvx's get
   lands bytes on the host). The transport string names cache 0's path and
   each other cache's that differs; a GPU cache not read over cuda_ipc is
   said in a warning, with UCX's words. */
KVX__PRIV ucs_status_t kvx__ucx_paths(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    char first[48] = "";
    uint32_t c;
    for (c = 0; c < p->ncaches; c++) {
        kvx__cache_info *rc = &p->caches[c];
        const kvx__region *r = &rc->regions[0];
        size_t len = rc->block_bytes < KVX__UCX_SCRATCH ? (size_t)rc->block_bytes : KVX__UCX_SCRATCH;
        void *buf = rc->mem == KVX_MEM_CUDA ? kvx__ucx_scratch(ctx) : NULL, *host = NULL;
        char info[320] = "", tls[48], path[64];
        ucp_request_param_t prm;
        ucp_request_attr_t ra;
        ucs_status_ptr_t req;
        ucs_status_t s;
        int one_sided = 0;
        if (!rc->nregions) continue;
        if (len > r->len) len = (size_t)r->len;
        if (!len) len = 1;
        memset(&prm, 0, sizeof prm);
        prm.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        if (buf) { prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH; prm.memh = u->scratch; }
        else if (!(buf = host = KVX_MALLOC(len))) return UCS_ERR_NO_MEMORY;
        req = ucp_get_nbx((ucp_ep_h)p->be, buf, len, r->addr, (ucp_rkey_h)r->be, &prm);
        if (UCS_PTR_IS_PTR(req)) {
            memset(&ra, 0, sizeof ra);
            ra.field_mask = UCP_REQUEST_ATTR_FIELD_INFO_STRING | UCP_REQUEST_ATTR_FIELD_INFO_STRING_SIZE;
            ra.debug_string = info;
            ra.debug_string_size = sizeof info;
            if (ucp_request_query(req, &ra) != UCS_OK) info[0] = 0;
        }
        s = kvx__ucx_wait_req(ctx, req);
        KVX_FREE(host);
        if (s != UCS_OK) return s;
        if (!kvx__ucx_info_tls(info, tls, sizeof tls, &one_sided)) { kvx__strlcpy(tls, "unknown", sizeof tls); one_sided = 0; }
        snprintf(path, sizeof path, "%s%s", tls, one_sided ? "" : " (sw)");
        kvx__ucx_cache_path(p, rc, !one_sided);
        if (c == 0) {
            kvx__strlcpy(first, path, sizeof first);
            snprintf(p->transport, sizeof p->transport, "ucx:%s", path);
        } else if (strcmp(path, first)) {
            size_t n = strlen(p->transport);
            snprintf(p->transport + n, sizeof p->transport - n, ", cache %u: %s", c, path);
        }
        if (rc->mem == KVX_MEM_CUDA && !strstr(tls, "cuda_ipc"))
            snprintf(p->why, sizeof p->why, "UCX %s read GPU cache %u over %s, not cuda_ipc (%s)", ucp_get_version_string(), c, path,
                     !kvx__ucx_ep_has((ucp_ep_h)p->be, "cuda_ipc") ? "no cuda_ipc to this peer" :
                     kvx__ucx_env_on("UCX_CUDA_IPC_ENABLE_GET_ZCOPY") ? "cuda_ipc could not map this memory"
                     : "UCX turns cuda_ipc gets off without NVLink; UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y turns them on");
        if (rc->mem == KVX_MEM_CUDA && !strstr(tls, "cuda_ipc"))
            KVX__LOG(ctx, KVX_LOG_WARN, "ucx %s: GPU cache %u of %s/%d is read over %s, not cuda_ipc: %s; UCX: \"%s\"",
                     ucp_get_version_string(), c, p->name, p->rank, path,
                     !kvx__ucx_ep_has((ucp_ep_h)p->be, "cuda_ipc")
                         ? "no cuda_ipc to this peer (another host, a GPU it cannot map, or UCX_TLS)"
                         : kvx__ucx_env_on("UCX_CUDA_IPC_ENABLE_GET_ZCOPY")
                         ? "this endpoint has cuda_ipc with gets on, but UCX's cuda_ipc could not map this memory "
                           "(VMM or pool memory it cannot export, as PyTorch's expandable segments make); kvx's CUDA backend reads it"
                         : "this endpoint has cuda_ipc, but UCX did not take it for this read: UCX turns cuda_ipc gets off "
                           "where it sees no NVLink (UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y turns them on), and cannot map memory "
                           "it cannot export (VMM or some pools); kvx's CUDA backend reads both",
                     info);
    }
    return UCS_OK;
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
KVX__PRIV kvx_status kvx__ucx_connect(kvx_ctx *ctx, kvx_peer *p) {
    ucp_ep_h h = NULL;
    ucs_status_t s;
    uint32_t c, i;
    int unsafe = 0;
    p->be = NULL;
    s = kvx__ucx_ep(ctx, p, UCP_ERR_HANDLING_MODE_PEER, &h);
    if (s == UCS_ERR_UNREACHABLE) {
        s = kvx__ucx_ep(ctx, p, UCP_ERR_HANDLING_MODE_NONE, &h);
        unsafe = s == UCS_OK;
    }
    if (s != UCS_OK) {
        char what[128];
        snprintf(what, sizeof what, "ucp_ep_create to %s/%d", p->name, p->rank);
        return kvx__ucx_fail(ctx, what, s);
    }
    if ((s = kvx__ucx_wireup(ctx, h)) != UCS_OK) {
        /* UCX 1.13 can abort when an endpoint still in wireup is closed by
           force, so a peer that never answered keeps its endpoint until the
           context is destroyed. */
        if (s == UCS_ERR_TIMED_OUT)
            return kvx__fail(ctx, KVX_ERR_TIMEOUT, "ucx: %s/%d (pid %u on %s) did not answer the connection within %u ms",
                             p->name, p->rank, p->pid, p->host, ctx->timeout_ms);
        kvx__ucx_ep_close(ctx, h);
        {
            char what[400];
            snprintf(what, sizeof what, "connecting to %s/%d (pid %u on %s)", p->name, p->rank, p->pid, p->host);
            kvx__ucx_fail(ctx, what, s);
            return KVX_ERR_PEER;
        }
    }
    p->be = h;
    for (c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++) {
            ucp_rkey_h rk;
            kvx__region *r = &p->caches[c].regions[i];
            if ((s = ucp_ep_rkey_unpack(h, r->rkey, &rk)) != UCS_OK) {
                char what[128];
                snprintf(what, sizeof what, "ucp_ep_rkey_unpack of %s/%d cache %u region %u", p->name, p->rank, c, i);
                kvx__ucx_disconnect(ctx, p);
                return kvx__ucx_fail(ctx, what, s);
            }
            r->be = rk;
        }
    kvx__ucx_transport(p, h);
    p->be_flags = 0;
    if (kvx__ucx_of(ctx)->version >= KVX__UCX_VERSION(1, 22)) {
        s = kvx__ucx_paths(ctx, p);  /* each cache's path, from UCX's own words; no wireup abort to avoid */
    } else {
        /* Before 1.22 (and on 1.13, whose requests do not describe themselves)
           the endpoint's lanes decide for every cache: served in software
           means by kvx's own get. Then the first read completes the wireup. */
        for (c = 0; c < p->ncaches; c++) kvx__ucx_cache_path(p, &p->caches[c], strstr(p->transport, "(sw)") != NULL);
        s = kvx__ucx_probe(ctx, p);
    }
    if (s != UCS_OK) {
        kvx__ucx_disconnect(ctx, p);
        if (s == UCS_ERR_TIMED_OUT)
            return kvx__fail(ctx, KVX_ERR_TIMEOUT, "ucx: %s/%d (pid %u on %s) did not serve a first read within %u ms",
                             p->name, p->rank, p->pid, p->host, ctx->timeout_ms);
        {
            char what[400];
            snprintf(what, sizeof what, "first read from %s/%d (pid %u on %s)", p->name, p->rank, p->pid, p->host);
            kvx__ucx_fail(ctx, what, s);
            return KVX_ERR_PEER;
        }
    }
    if (unsafe) {
        kvx__strlcpy(p->transport + strlen(p->transport), " (no failure handling)", sizeof p->transport - strlen(p->transport));
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: no transport to %s/%d that UCX allows handles peer failure (UCX_TLS?): %s; "
                 "a peer that dies or stops mid-read is found by the deadline alone", p->name, p->rank, p->transport);
    } else if (!strcmp(p->host, ctx->host) && !strncmp(p->transport, "ucx:tcp", 7)) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx %s: %s/%d is on this host but is read over TCP: UCX's shared-memory transports "
                 "cannot handle peer failure, which kvx requires; use the CUDA backend for same-host GPU caches",
                 ucp_get_version_string(), p->name, p->rank);
    }
    return KVX_OK;
}

/* kvx's get lands bytes with the host's memcpy: not into a GPU cache. */
KVX__PRIV kvx_status kvx__ucx_can_read(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc) {
    if ((rc->be_flags & KVX__UCX_BY_KVX_GET) && lc->mem != KVX_MEM_HOST)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "ucx %s: GPU cache %u cannot take a read of host cache %u of %s/%d over %s: "
                         "that path is served in software by kvx's own get, which lands bytes on the host; read into a host cache",
                         ucp_get_version_string(), lc->id, rc->id, p->name, p->rank, p->transport);
    return KVX_OK;
}

KVX__PRIV void kvx__ucx_get_cb(void *req, ucs_status_t status, void *user) {
    kvx__op_done((kvx__read *)user, kvx__ucx_op_status(status),
                 ucs_status_string(status));
    ucp_request_free(req);
}

KVX__PRIV kvx_status kvx__ucx_post(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    ucp_request_param_t prm;
    ucs_status_ptr_t sp;
    /* kvx's get for software-served peers, and for an op of several pieces
       (the peer gathered when the read was posted, before a reconnect) */
    if ((rd->rc->be_flags & KVX__UCX_BY_KVX_GET) || op->count > 1) return kvx__ucx_get_post(ctx, rd, rd->peer, op, NULL);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH;
    prm.cb.send = kvx__ucx_get_cb;
    prm.user_data = rd;
    prm.memh = (ucp_mem_h)KVX__OP_LREGION(rd, op)->be;
    sp = ucp_get_nbx((ucp_ep_h)rd->peer->be, (void *)(uintptr_t)op->laddr, (size_t)op->len, op->raddr,
                     (ucp_rkey_h)rd->rc->regions[op->rreg].be, &prm);
    if (sp == NULL) {
        kvx__op_done(rd, KVX_OK, NULL);
        return KVX_OK;
    }
    if (UCS_PTR_IS_ERR(sp)) return kvx__ucx_op_fail(ctx, rd->peer, "ucp_get_nbx", UCS_PTR_STATUS(sp));
    return KVX_OK;
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
    ucp_request_param_t prm;
    ucs_status_ptr_t sp;
    if (!rd->peer->be) return kvx__fail(ctx, KVX_ERR_PEER, "notification %llu: peer %s/%d is disconnected", (unsigned long long)rd->notify_id, rd->peer->name, rd->peer->rank);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = kvx__ucx_am_sent;
    prm.user_data = rd;
    sp = ucp_am_send_nbx((ucp_ep_h)rd->peer->be, KVX__UCX_AM_NOTIFY, NULL, 0, rd->notify_msg, sizeof rd->notify_msg, &prm);
    if (sp == NULL) { kvx__notify_sent(rd); return KVX_OK; }
    if (UCS_PTR_IS_ERR(sp)) return kvx__ucx_fail(ctx, "ucp_am_send_nbx (notification)", UCS_PTR_STATUS(sp));
    return KVX_OK;
}

KVX__PRIV int kvx__ucx_progress(kvx_ctx *ctx) {
    kvx__ucx *u = kvx__ucx_of(ctx);
    int n = 0, k;
    unsigned e;
    for (k = 0; k < 1024 && (e = ucp_worker_progress(u->worker)) != 0; k++) n += (int)e;
    return n;
}

KVX__PRIV int kvx__ucx_event_fd(kvx_ctx *ctx) { return kvx__ucx_of(ctx)->efd; }

KVX__PRIV kvx_status kvx__ucx_arm(kvx_ctx *ctx) {
    ucs_status_t s = ucp_worker_arm(kvx__ucx_of(ctx)->worker);
    return s == UCS_OK ? KVX_OK : KVX_PENDING;
}

KVX__PRIV void kvx__ucx_signal(kvx_ctx *ctx) { ucp_worker_signal(kvx__ucx_of(ctx)->worker); }

KVX__PRIV const kvx__backend kvx__ucx_backend = {
    KVX__F(name) "ucx",
    KVX__F(kind) KVX_BACKEND_UCX,
    KVX__F(completes_on_gpu) 0,
    KVX__F(gpu_region_spans_allocations) 0,
    KVX__F(open) kvx__ucx_open,
    KVX__F(close) kvx__ucx_close,
    KVX__F(query) NULL,
    KVX__F(address) kvx__ucx_address,
    KVX__F(mem_register) kvx__ucx_mem_register,
    KVX__F(mem_deregister) kvx__ucx_mem_deregister,
    KVX__F(connect) kvx__ucx_connect,
    KVX__F(disconnect) kvx__ucx_disconnect,
    KVX__F(can_read) kvx__ucx_can_read,
    KVX__F(queue_open) NULL,
    KVX__F(queue_close) NULL,
    KVX__F(post) kvx__ucx_post,
    KVX__F(post_read) NULL,
    KVX__F(flush) NULL,
    KVX__F(abandon) kvx__ucx_abandon,
    KVX__F(notify) kvx__ucx_notify,
    KVX__F(progress) kvx__ucx_progress,
    KVX__F(event_fd) kvx__ucx_event_fd,
    KVX__F(arm) kvx__ucx_arm,
    KVX__F(signal) kvx__ucx_signal,
    KVX__F(csum_alloc) NULL,
    KVX__F(csum_free) NULL,
    KVX__F(csum_seal) NULL,
    KVX__F(csum_verify) NULL,
    KVX__F(gen_alloc) NULL,
    KVX__F(gen_free) NULL,
    KVX__F(gen_store) NULL,
    KVX__F(gen_fetch) NULL,
};

#endif /* KVX_UCX_INCLUDED */
