/* SPDX-License-Identifier: MIT */
/*
    kvx_ucx_get.h -- kvx's own get over UCX active messages, a protocol of
    its own beside UCX's one-sided get: the reader's requests and replies,
    the owner's serving of them, and the wait for replies still sending when
    memory is deregistered. Part of the UCX backend (kvx_ucx.h includes it);
    do not include it yourself. Its headers on the wire are in kvx_wire.h.

    Where UCX has no one-sided get (TCP), ucp_get_nbx is served in software
    by the owner's worker, with replies kvx cannot see or wait for: memory
    deregistered and reused under a stopped reader reaches it as a read that
    succeeds (UCX 1.13 and 1.22). kvx's own get puts the owner's side in
    kvx's hands: a request names a range of the owner's registered
    memory, the owner checks it and sends the bytes back eagerly, and a
    reply that cannot go (the reader died) is just released. A request can
    name a block's pieces at a stride (the tokens of an NHD read of part of
    the heads): the owner sends them as one reply from an iov, and the
    reader puts each where it goes, one message instead of one per token.
*/
#ifndef KVX_UCX_GET_INCLUDED
#define KVX_UCX_GET_INCLUDED

#define KVX__UCX_AM_GET 0x4c            /* kvx's own get: the request */
#define KVX__UCX_AM_GET_REPLY 0x4d      /* ... and the reply with the bytes */
#define KVX__UCX_GET_PART (1u << 20)    /* bytes one request asks for: the owner sends each eagerly */
#define KVX__UCX_GET_PIECES 4096u       /* pieces one request asks for (the owner's iov for the reply) */
#define KVX__UCX_BY_KVX_GET 1u          /* be_flags of a peer's cache: read by kvx's get; of a peer: some cache is */

/* One outstanding get of kvx's own (a read op, or the connect probe). Its id
   is (gen << 32) | index, so a reply or a send completion that comes after
   the op ended (failed, canceled, timed out) finds another gen and is
   dropped: no byte lands after kvx reported the op. */
typedef struct kvx__ucx_get {
    kvx__read *rd;              /* NULL: the connect probe */
    kvx_peer *peer;
    uint64_t laddr, len;        /* len: bytes of all its pieces, in order */
    uint64_t piece, lstride;    /* piece k of piece bytes lands at laddr + k * lstride */
    uint32_t gen, parts;        /* parts: replies still to come */
    int live;
    ucs_status_t *probe;        /* the probe's result */
} kvx__ucx_get;

/* The state of kvx's own get, in the UCX backend's context. */
typedef struct kvx__ucx_msg kvx__ucx_msg;
typedef struct kvx__ucx_getter {
    kvx__ucx_get *gets;         /* outstanding gets, by index */
    uint32_t *free_gets, nfree, ngets;
    uint32_t gen;               /* the last get's generation, context-wide: ids never repeat */
    kvx__ucx_msg *replies;      /* replies in flight that send registered bytes */
} kvx__ucx_getter;

/* A header must stay valid until its send completes: each send has one. A
   reply with bytes also holds them (UCX sends large ones in place), so it
   is listed until it completes: deregistering that memory waits for it. */
struct kvx__ucx_msg {
    kvx_ctx *ctx;
    uint64_t req_id;            /* a request: its get's id */
    uint8_t hdr[KVX__GET_REQ_BYTES];    /* the header on the wire (kvx_wire.h) */
    struct kvx__ucx_msg *next, *prev;   /* kvx__ucx.replies */
    int listed;
    uint64_t addr, len;         /* the bytes it sends */
    uint64_t until_ns;          /* the reader takes none of them after this */
};

/* What it takes from the UCX backend (kvx_ucx.h): its state in the
   context, the worker, a bounded wait step and what a failed op reports. */
KVX__PRIV kvx__ucx_getter *kvx__ucx_getter_of(kvx_ctx *ctx);
KVX__PRIV ucp_worker_h kvx__ucx_worker(kvx_ctx *ctx);
KVX__PRIV int kvx__ucx_wait_step(kvx_ctx *ctx, uint64_t until);
KVX__PRIV kvx_status kvx__ucx_op_status(ucs_status_t s);
KVX__PRIV kvx_status kvx__ucx_op_fail(kvx_ctx *ctx, const kvx_peer *p, const char *what, ucs_status_t s);


KVX__PRIV kvx__ucx_get *kvx__ucx_get_find(kvx__ucx_getter *u, uint64_t id) {
    uint32_t i = (uint32_t)id;
    if (i >= u->ngets || !u->gets[i].live || u->gets[i].gen != (uint32_t)(id >> 32)) return NULL;
    return &u->gets[i];
}

KVX__PRIV uint64_t kvx__ucx_get_new(kvx_ctx *ctx) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__ucx_get *g;
    uint32_t i;
    if (!u->nfree) {
        uint32_t n = u->ngets ? 2 * u->ngets : 256, k;
        kvx__ucx_get *ng = (kvx__ucx_get *)KVX_REALLOC(u->gets, (size_t)n * sizeof *ng);
        uint32_t *nf;
        if (!ng) return 0;
        u->gets = ng;
        if (!(nf = (uint32_t *)KVX_REALLOC(u->free_gets, (size_t)n * sizeof *nf))) return 0;
        u->free_gets = nf;
        memset(u->gets + u->ngets, 0, (size_t)(n - u->ngets) * sizeof *ng);
        for (k = n; k > u->ngets; k--) u->free_gets[u->nfree++] = k - 1;
        u->ngets = n;
    }
    i = u->free_gets[--u->nfree];
    g = &u->gets[i];
    g->live = 1;
    if (!++u->gen) u->gen = 1;  /* id 0 means none */
    g->gen = u->gen;
    return ((uint64_t)g->gen << 32) | i;
}

/* End a get once: the op completes (or the probe learns), the id dies. */
KVX__PRIV void kvx__ucx_get_end(kvx_ctx *ctx, kvx__ucx_get *g, kvx_status st, ucs_status_t us, const char *why) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__read *rd = g->rd;
    ucs_status_t *probe = g->probe;
    g->live = 0;
    g->rd = NULL;
    g->probe = NULL;
    u->free_gets[u->nfree++] = (uint32_t)(g - u->gets);
    if (u->nfree == u->ngets) {  /* idle: give the table back (generations go on) */
        KVX_FREE(u->gets);
        KVX_FREE(u->free_gets);
        u->gets = NULL;
        u->free_gets = NULL;
        u->nfree = u->ngets = 0;
    }
    if (rd) kvx__op_done(rd, st, why);
    if (probe) *probe = us;
}

KVX__PRIV void kvx__ucx_msg_sent(void *req, ucs_status_t status, void *user) {
    kvx__ucx_msg *m = (kvx__ucx_msg *)user;
    kvx_ctx *ctx = m->ctx;
    if (status != UCS_OK && m->req_id) {  /* a request that never left */
        kvx__ucx_get *g = kvx__ucx_get_find(kvx__ucx_getter_of(ctx), m->req_id);
        if (g) kvx__ucx_get_end(ctx, g, kvx__ucx_op_status(status), status, ucs_status_string(status));
    }
    KVX_FREE(m);
    ucp_request_free(req);
}

KVX__PRIV void kvx__ucx_reply_unlink(kvx__ucx_msg *m) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(m->ctx);
    if (!m->listed) return;
    if (m->prev) m->prev->next = m->next; else u->replies = m->next;
    if (m->next) m->next->prev = m->prev;
    m->listed = 0;
}

KVX__PRIV void kvx__ucx_reply_sent(void *req, ucs_status_t status, void *user) {
    (void)status;  /* a reader that died: nothing to do but let go */
    kvx__ucx_reply_unlink((kvx__ucx_msg *)user);
    KVX_FREE(user);
    ucp_request_free(req);
}

/* The bytes a part starting at byte off of an op's pieces (of len) covers:
   per (whole pieces), or a slice of one piece larger than per. */
KVX__PRIV uint64_t kvx__ucx_part_bytes(uint64_t off, uint64_t len, uint64_t per) {
    return len > per && len - off % len < per ? len - off % len : per;
}

/* Ask for one op's bytes (count pieces of len), in parts of at most
   KVX__UCX_GET_PART: whole pieces where they fit, else slices of one. */
KVX__PRIV kvx_status kvx__ucx_get_post(kvx_ctx *ctx, kvx__read *rd, kvx_peer *p, const kvx__op *op, ucs_status_t *probe) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint64_t id = kvx__ucx_get_new(ctx), off, now = kvx__now_ns(), len = op->len, count = op->count ? op->count : 1u, total = len * count;
    uint64_t ttl = !rd ? (uint64_t)ctx->timeout_ms * 1000000ull : rd->deadline_ns > now ? rd->deadline_ns - now : 0;
    uint64_t per = len && len <= KVX__UCX_GET_PART ? KVX__UCX_GET_PART / len * len : KVX__UCX_GET_PART;  /* bytes per part */
    if (len && per / len > KVX__UCX_GET_PIECES) per = (uint64_t)KVX__UCX_GET_PIECES * len;
    kvx__ucx_get *g;
    kvx__get_req rq;
    if (!id) return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory for a get");
    g = &u->gets[(uint32_t)id];
    g->rd = rd; g->peer = p; g->laddr = op->laddr; g->len = total; g->probe = probe;
    g->piece = len; g->lstride = count > 1 ? op->lstride : 0;
    g->parts = 0;
    for (off = 0; off == 0 || off < total; off += kvx__ucx_part_bytes(off, len, per)) g->parts++;
    for (off = 0; off == 0 || off < total;) {
        uint64_t k = len ? off / len : 0, in = len ? off % len : 0;  /* piece k, from byte in */
        kvx__ucx_msg *m = (kvx__ucx_msg *)KVX_MALLOC(sizeof *m);
        ucp_request_param_t prm;
        ucs_status_ptr_t sp;
        if (!m) sp = UCS_STATUS_PTR(UCS_ERR_NO_MEMORY);
        else {
            memset(m, 0, sizeof *m);
            m->ctx = ctx;
            memset(&rq, 0, sizeof rq);
            rq.id = m->req_id = id; rq.off = off; rq.ttl_ns = ttl;
            rq.raddr = op->raddr + k * op->rstride + in;
            if (len > per) {  /* a slice of one large piece */
                rq.len = kvx__ucx_part_bytes(off, len, per);
                rq.count = 1;
            } else {          /* whole pieces */
                rq.len = len;
                rq.count = !len ? 1u : (total - off) / len < per / len ? (total - off) / len : per / len;
                rq.rstride = op->rstride;
            }
            kvx__get_req_write(m->hdr, &rq);
            memset(&prm, 0, sizeof prm);
            prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
            prm.cb.send = kvx__ucx_msg_sent;
            prm.user_data = m;
            prm.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
            sp = ucp_am_send_nbx((ucp_ep_h)p->be, KVX__UCX_AM_GET, m->hdr, KVX__GET_REQ_BYTES, NULL, 0, &prm);
            if (sp == NULL) KVX_FREE(m);
        }
        if (UCS_PTR_IS_ERR(sp)) {
            ucs_status_t e = UCS_PTR_STATUS(sp);
            KVX_FREE(m);
            if (!(g = kvx__ucx_get_find(u, id))) return KVX_OK;  /* ended already */
            if (off == 0) {  /* nothing went: the caller sees the error, the op never counted */
                g->rd = NULL; g->probe = NULL;
                kvx__ucx_get_end(ctx, g, KVX_OK, e, NULL);
                return kvx__ucx_op_fail(ctx, p, "ucp_am_send_nbx (get request)", e);
            }
            kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, e, ucs_status_string(e));
            return KVX_OK;
        }
        if (!kvx__ucx_get_find(u, id)) return KVX_OK;  /* ended during the send */
        off += kvx__ucx_part_bytes(off, len, per);
    }
    return KVX_OK;
}

/* Is [addr, addr + len) inside one region this context registered? */
KVX__PRIV int kvx__ucx_owned(kvx_ctx *ctx, uint64_t addr, uint64_t len) {
    uint32_t c, i;
    for (c = 0; c < ctx->ncaches; c++) {
        const kvx__cache_info *ci = &ctx->caches[c]->info;
        for (i = 0; i < ci->nregions; i++) {
            const kvx__region *r = &ci->regions[i];
            if (addr >= r->addr && len <= r->len && addr - r->addr <= r->len - len) return 1;
        }
    }
    return 0;
}

/* Owner: serve a request. A range outside what kvx registered is refused. */
KVX__PRIV ucs_status_t kvx__ucx_get_serve(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                         const ucp_am_recv_param_t *param) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    kvx__get_req rq;
    kvx__get_rep rp;
    kvx__ucx_msg *m;
    uint32_t ver = 0;
    int e;
    ucp_request_param_t prm;
    ucs_status_ptr_t sp;
    int ok;
    size_t n, i;
    (void)length;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ucp_am_data_release(kvx__ucx_worker(ctx), data);  /* a request carries no data */
    if ((e = kvx__get_req_read((const uint8_t *)header, header_length, &rq, &ver)) != KVX__WIRE_OK || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) {
        if (e == KVX__WIRE_VERSION) KVX__LOG(ctx, KVX_LOG_WARN, "ucx: a get request of version %u dropped: this kvx speaks version %u (upgrade both sides)", ver, KVX__GET_VERSION);
        else KVX__LOG(ctx, KVX_LOG_WARN, "ucx: a get request dropped (%zu-byte header: %s)", header_length, e ? kvx__wire_why(e) : "no reply endpoint");
        return UCS_OK;
    }
    /* Every piece inside one registered region: the span from the first to the end of the last is. */
    ok = rq.count >= 1 && rq.count <= KVX__UCX_GET_PIECES && rq.len <= KVX__UCX_GET_PART && rq.len * rq.count <= KVX__UCX_GET_PART &&
         (rq.count == 1 || rq.rstride < (1ull << 40)) && kvx__ucx_owned(ctx, rq.raddr, (rq.count - 1) * (rq.count > 1 ? rq.rstride : 0) + rq.len);
    if (!ok)
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: refused a get of %llu x %llu bytes at 0x%llx: not inside memory this context registered",
                 (unsigned long long)rq.count, (unsigned long long)rq.len, (unsigned long long)rq.raddr);
    n = ok && rq.count > 1 ? (size_t)rq.count : 0;  /* pieces apart: sent as one, from an iov */
    if (!(m = (kvx__ucx_msg *)KVX_MALLOC(sizeof *m + n * sizeof(ucp_dt_iov_t)))) return UCS_OK;  /* the reader's deadline ends it */
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    rp.id = rq.id; rp.off = rq.off; rp.len = ok ? rq.len * rq.count : 0; rp.status = ok ? 0u : 1u;
    kvx__get_rep_write(m->hdr, &rp);
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    prm.cb.send = kvx__ucx_reply_sent;
    prm.user_data = m;
    prm.flags = UCP_AM_SEND_FLAG_EAGER;
    if (n) {
        ucp_dt_iov_t *iov = (ucp_dt_iov_t *)(m + 1);
        for (i = 0; i < n; i++) { iov[i].buffer = (void *)(uintptr_t)(rq.raddr + i * rq.rstride); iov[i].length = (size_t)rq.len; }
        prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
        prm.datatype = ucp_dt_make_iov();
        sp = ucp_am_send_nbx(param->reply_ep, KVX__UCX_AM_GET_REPLY, m->hdr, KVX__GET_REP_BYTES, iov, n, &prm);
    } else {
        sp = ucp_am_send_nbx(param->reply_ep, KVX__UCX_AM_GET_REPLY, m->hdr, KVX__GET_REP_BYTES,
                             ok ? (void *)(uintptr_t)rq.raddr : NULL, ok ? (size_t)rq.len : 0, &prm);
    }
    if (sp == NULL || UCS_PTR_IS_ERR(sp)) KVX_FREE(m);
    else if (ok && rq.len) {  /* still sending from the cache: listed until it completes */
        kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
        m->addr = rq.raddr; m->len = (rq.count - 1) * (rq.count > 1 ? rq.rstride : 0) + rq.len;
        m->until_ns = kvx__now_ns() + (rq.ttl_ns < 3600000000000ull ? rq.ttl_ns : 3600000000000ull);
        m->prev = NULL; m->next = u->replies;
        if (u->replies) u->replies->prev = m;
        u->replies = m;
        m->listed = 1;
    }
    return UCS_OK;
}

/* Reader: the bytes of one part, or the owner's refusal. */
KVX__PRIV ucs_status_t kvx__ucx_get_reply(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                         const ucp_am_recv_param_t *param) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    kvx__get_rep rp;
    kvx__ucx_get *g;
    uint32_t ver = 0;
    int e = kvx__get_rep_read((const uint8_t *)header, header_length, &rp, &ver), ok = e == KVX__WIRE_OK;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        /* kvx's replies are eager: this one is not kvx's, or not as sent */
        ucp_am_data_release(kvx__ucx_worker(ctx), data);
        if (ok && (g = kvx__ucx_get_find(kvx__ucx_getter_of(ctx), rp.id))) kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, UCS_ERR_MESSAGE_TRUNCATED, "a get reply of the wrong kind");
        return UCS_OK;
    }
    if (!ok) {
        if (e == KVX__WIRE_VERSION) KVX__LOG(ctx, KVX_LOG_WARN, "ucx: a get reply of version %u dropped: this kvx speaks version %u (upgrade both sides)", ver, KVX__GET_VERSION);
        else KVX__LOG(ctx, KVX_LOG_WARN, "ucx: a get reply dropped (%zu-byte header: %s)", header_length, kvx__wire_why(e));
        return UCS_OK;
    }
    if (!(g = kvx__ucx_get_find(kvx__ucx_getter_of(ctx), rp.id))) return UCS_OK;  /* the op ended: drop */
    if (rp.status) {
        kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, UCS_ERR_INVALID_ADDR, "the owner refused the range (not inside its registered memory)");
        return UCS_OK;
    }
    if (rp.len != length || rp.off > g->len || length > g->len - rp.off) {
        kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, UCS_ERR_MESSAGE_TRUNCATED, "a get reply of the wrong size");
        return UCS_OK;
    }
    if (g->rd && kvx__now_ns() >= g->rd->deadline_ns) {  /* the owner may have let the memory go by now */
        kvx__ucx_get_end(ctx, g, KVX_ERR_TIMEOUT, UCS_ERR_TIMED_OUT, "the read's deadline passed before its bytes came");
        return UCS_OK;
    }
    {  /* each piece where it goes (one piece, or pieces lstride apart) */
        uint64_t at = rp.off, left = length;
        const uint8_t *src = (const uint8_t *)data;
        while (left) {
            uint64_t in = at % g->piece, n = g->piece - in < left ? g->piece - in : left;
            memcpy((void *)(uintptr_t)(g->laddr + at / g->piece * g->lstride + in), src, (size_t)n);
            src += n; at += n; left -= n;
        }
    }
    if (--g->parts == 0) kvx__ucx_get_end(ctx, g, KVX_OK, UCS_OK, NULL);
    return UCS_OK;
}

/* A forced close: every get of p still out ends, canceled. */
KVX__PRIV void kvx__ucx_get_cancel(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint32_t i;
    for (i = 0; i < u->ngets; i++)
        if (u->gets[i].live && u->gets[i].peer == p) kvx__ucx_get_end(ctx, &u->gets[i], KVX_ERR_CANCELED, UCS_ERR_CANCELED, "canceled");
}

/* A read past its deadline, read by kvx's own get: its gets end and their
   ids die, so nothing of them lands; the endpoint stays for the peer's other
   reads, and what the owner still sends for these is dropped. (Closing it
   would reset the owner's connection under its queued replies, which UCX
   1.13's TCP transport does not always survive.) */
KVX__PRIV void kvx__ucx_abandon(kvx_ctx *ctx, kvx__read *rd) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint32_t i;
    if (!(rd->rc->be_flags & KVX__UCX_BY_KVX_GET)) return;
    for (i = 0; i < u->ngets; i++)
        if (u->gets[i].live && u->gets[i].rd == rd) kvx__ucx_get_end(ctx, &u->gets[i], KVX_ERR_TIMEOUT, UCS_ERR_TIMED_OUT, "timed out");
}

/* The engine reuses memory once it is deregistered, so no reply may still be
   sending from it while its reader would take the bytes. Replies to live
   readers leave within milliseconds. A reader that stopped taking them
   (stalled, or stopped in a debugger) is waited for until the deadlines of
   the reads they serve: after that it drops whatever comes, and the replies
   may send what the memory holds next. UCX 1.13 cannot cancel them: a forced
   close of the endpoint it made for that reader crashes its TCP progress. */
KVX__PRIV int kvx__ucx_reply_in(const kvx__ucx_msg *m, uint64_t addr, uint64_t len) { return m->addr < addr + len && addr < m->addr + m->len; }

KVX__PRIV void kvx__ucx_replies_drain(kvx_ctx *ctx, uint64_t addr, uint64_t len) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint64_t t0 = kvx__now_ns(), until = 0;
    kvx__ucx_msg *m, *n;
    uint32_t k = 0;
    for (;;) {
        uint64_t now = kvx__now_ns();
        until = 0;
        for (m = u->replies; m; m = m->next)
            if (kvx__ucx_reply_in(m, addr, len) && m->until_ns > now && m->until_ns > until) until = m->until_ns;
        if (!until || !kvx__ucx_wait_step(ctx, until)) break;
    }
    for (m = u->replies; m; m = n) {
        n = m->next;
        if (kvx__ucx_reply_in(m, addr, len)) { kvx__ucx_reply_unlink(m); k++; }
    }
    if (kvx__now_ns() - t0 > 100000000ull || k)
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: deregistering memory at 0x%llx waited %.3f s for replies a reader was not taking; %u still queued, "
                 "past their reads' deadlines (the reader drops them)", (unsigned long long)addr, (double)(kvx__now_ns() - t0) / 1e9, k);
}

#endif /* KVX_UCX_GET_INCLUDED */
