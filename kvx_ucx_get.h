/* SPDX-License-Identifier: MIT */
/*
    kvx_ucx_get.h -- kvx's own get over UCX active messages, a protocol of
    its own beside UCX's one-sided get: the reader's requests and replies,
    the owner's serving of them, and the wait for replies still sending when
    memory is deregistered. Part of the UCX backend (kvx_ucx.h includes it);
    do not include it yourself. Its headers on the wire are in kvx_wire.h.

    Where UCX has no one-sided get (TCP), kvx does not let UCX emulate one:
    UCX's emulation copies from and to any address a request names, for any
    process that reaches the port (kvx_ucx.h, "WHO MAY READ"). Host caches
    served that way are read by kvx's own get: a request names a range of
    the owner's registered memory, the owner checks it and sends the bytes
    back eagerly, and a reply that cannot go (the reader died) is just
    released. A request can name a block's pieces at a stride (the tokens of
    an NHD read of part of the heads): the owner sends them as one reply from
    an iov, and the reader puts each where it goes.

    MANY BLOCKS, ONE MESSAGE. Over TCP the cost is per message, and random
    blocks do not merge. The small ops of one read that a post issues
    together are staged (kvx__ucx_stage) and asked for in one request: the
    header names the first op's range and the data the others', and the
    owner checks each against what it registered and sends all their bytes
    in one reply. A batch holds at most the context's ask_bytes (below), so
    that a queue's ops outstanding (kvx_queue_desc.max_ops) still make a few
    requests in flight.

    REPLIES IN ONE PIECE. UCX's TCP transport receives a message into one
    segment (UCX_TCP_RX_SEG_SIZE) and hands it to kvx where it landed, and
    kvx copies it where it goes; a larger message comes as fragments that
    UCX first copies together. kvx sets 136 KiB segments on its
    active-message worker (UCX's default is 64 KiB), unless the user set
    UCX's TCP segment sizes, and no reply carries more than the reader's
    segment less 4 KiB for headers (its ask_bytes: 132 KiB, or 60 KiB with
    UCX's default): a batch holds at most that, and so does a reply of
    whole pieces (a 64 KiB block, or two). A piece larger than that, of up
    to KVX__UCX_GET_PART, is asked for in one request that names the size
    of its replies (reply_bytes), and the owner answers it in even chunks
    (kvx__get_chunk) of at most KVX__UCX_CHUNK_BYTES, each of which the
    reader takes once: in 128 KiB chunks (a 1 MiB block's 8 replies back
    to back on one connection) 6 of 17 runs of 1 MiB blocks between two
    hosts stalled for 200 ms in TCP retransmissions, against none of 18 in
    60 KiB chunks. A larger piece goes in slices of one reply each. The reader
    asks, so an owner with larger segments never sends a reader more than
    its own take. A reply goes zero-copy from the owner's cache when it is
    at most KVX__UCX_REPLY_IOV separate pieces (TCP's iov limit,
    UCX_TCP_MAX_IOV less the transport's own); with more, UCX would send it
    as 8 KiB fragments, so the owner copies the pieces into one buffer
    first (at most KVX__UCX_BOUNCE_BYTES of such buffers at once; past
    that, from the cache as before).

    WHO IS ANSWERED. A request carries the owner's secret (from its metadata)
    and a nonce of the reader's; the owner drops, unanswered and counted, any
    request without the secret, so probing for ranges tells a process without
    the metadata nothing. A reply carries the secret and repeats the nonce,
    and a reader takes it only from the endpoint the request went to: no
    process can make a read land bytes it did not ask that owner for.

    BOUNDS. A reader keeps at most KVX__UCX_WINDOW_PARTS requests (and
    KVX__UCX_WINDOW_BYTES of replies) outstanding to one peer; the rest of a
    read is asked for as replies come. An owner holds at most
    KVX__UCX_EP_REPLIES replies (KVX__UCX_EP_BYTES) queued for one endpoint
    and KVX__UCX_REPLIES in all; a request past them is dropped and counted
    (a reader within its window never meets them), and it waits for a reader
    that stopped taking replies no longer than its own timeout, whatever the
    request asked.
*/
/* Its types are kvx_ucx.h's, which includes this file where they are defined. */
#include "kvx_ucx.h"
#ifndef KVX_UCX_GET_INCLUDED
#define KVX_UCX_GET_INCLUDED

#define KVX__UCX_AM_GET 0x4c            /* kvx's own get: the request */
#define KVX__UCX_AM_GET_REPLY 0x4d      /* ... and the reply with the bytes */
#define KVX__UCX_GET_PART (1u << 20)    /* bytes one request may ask for: what an owner serves at most, eagerly */
#define KVX__UCX_GET_PIECES 4096u       /* pieces one request asks for (the owner's iov for the reply) */
#define KVX__UCX_BY_KVX_GET 1u          /* be_flags of a peer's cache: read by kvx's get; of a peer: some cache is */
#define KVX__UCX_WINDOW_PARTS 1024u     /* a reader's requests outstanding to one peer */
#define KVX__UCX_WINDOW_BYTES (256ull << 20)
#define KVX__UCX_EP_REPLIES 4096u       /* an owner's replies queued for one endpoint */
#define KVX__UCX_EP_BYTES (1ull << 30)
#define KVX__UCX_REPLIES 65536u         /* ... and for all of them */
#define KVX__UCX_NONE 0xFFFFFFFFu
#define KVX__UCX_RX_SEG (136u << 10)        /* the TCP receive segment kvx sets on its active-message worker */
#define KVX__UCX_RX_SEG_UCX (64u << 10)     /* ... UCX's own default, where the user set the segment sizes */
#define KVX__UCX_RX_SEG_MIN (KVX__GET_REPLY_MIN + KVX__UCX_SEG_HEADERS)  /* the least kvx's get works with (20 KiB) */
#define KVX__UCX_SEG_HEADERS (4u << 10)     /* of a segment, left for UCT's, UCP's and kvx's headers */
#define KVX__UCX_CHUNK_BYTES (60u << 10)    /* a piece larger than one reply: its chunks, at most */
#define KVX__UCX_REPLY_IOV 4u               /* pieces a reply sends from the cache in place, at most */
#if !defined(KVX__UCX_BOUNCE_BYTES)
#  define KVX__UCX_BOUNCE_BYTES (32u << 20) /* an owner's buffers of replies copied together, at most */
#endif
#define KVX__UCX_GET_RANGES 256u        /* ranges one request names: the header's and its data's */

/* One outstanding get of kvx's own (a read op, or the connect probe). Its id
   is (gen << 32) | index, so a reply or a send completion that comes after
   the op ended (failed, canceled, timed out) finds another gen and is
   dropped: no byte lands after kvx reported the op. */
typedef struct kvx__ucx_get {
    kvx__read *rd;              /* NULL: the connect probe */
    kvx_peer *peer;
    uint64_t laddr, len;        /* len: bytes of all its pieces, in order */
    uint64_t piece, lstride;    /* piece k of piece bytes lands at laddr + k * lstride */
    uint64_t raddr, rstride;    /* ... and is at raddr + k * rstride there */
    uint64_t per;               /* bytes a request asks for at most (whole pieces, or a slice of one) */
    uint64_t next;              /* byte of the next part to ask for; len once all are asked */
    uint64_t nonce;             /* what its replies must repeat */
    uint64_t until_ns;          /* its deadline: what a request's ttl is counted to */
    uint64_t asked_bytes;       /* of parts asked and not answered: in the peer's window */
    uint32_t gen, parts;        /* parts: replies still to come, asked or not */
    uint32_t asked;
    uint32_t wait_next;         /* the peer's queue of gets with parts still to ask */
    int live, waiting;
    ucs_status_t *probe;        /* the probe's result */
    kvx__op *batch;             /* a batch: its ops, asked for in one request (the fields above are unused) */
    uint32_t nbatch;
    uint64_t chunk;             /* its one part comes in replies of chunk bytes (kvx__get_chunk); 0: one reply a part */
    uint64_t chunks_got;        /* ... the chunks that came, a bit each */
} kvx__ucx_get;

/* An owner's count of what it holds for one endpoint (a reader): entries
   exist while a reply to it is queued, so an endpoint UCX has let go of is
   never looked up. */
typedef struct kvx__ucx_epacct { ucp_ep_h ep; uint32_t replies; uint64_t bytes; } kvx__ucx_epacct;

/* The state of kvx's own get, in the UCX backend's context. */
typedef struct kvx__ucx_msg kvx__ucx_msg;
typedef struct kvx__ucx_getter {
    kvx__ucx_get *gets;         /* outstanding gets, by index */
    uint32_t *free_gets, nfree, ngets;
    uint32_t gen;               /* the last get's generation, context-wide: ids never repeat */
    kvx__nonces nonces;
    kvx__ucx_msg *replies;      /* replies in flight that send registered bytes */
    uint32_t nreplies;          /* replies queued, all endpoints */
    kvx__ucx_epacct *acct;      /* open addressing by endpoint, acct_cap a power of two */
    uint32_t acct_cap, acct_used;
    uint64_t bounce_bytes;      /* of replies copied together and not yet sent */
    uint64_t replies_copied, replies_iov, chunks_sent;  /* counts of an owner's replies: of many pieces (copied together,
                                                           or from an iov in place), and chunks of a larger one */
    uint64_t parts_asked;       /* ... and of a reader's requests */
    uint64_t ask_bytes;         /* the most one reply carries: of a reader, what it asks; of an owner, what it copies
                                   together (its TCP segment less headers); a batch of small ops holds at most that */
    kvx__op stage[KVX__UCX_GET_RANGES]; /* the batch being gathered in a post, of stage_rd */
    kvx__read *stage_rd;
    uint32_t nstage;
    uint64_t stage_bytes, stage_pieces;
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
    ucp_ep_h ep;                /* a reply: the endpoint it is counted to (kvx__ucx_epacct) */
    uint64_t charged;           /* ... and its bytes there */
    uint64_t addr, len;         /* the span of the bytes it sends */
    uint64_t until_ns;          /* the reader takes none of them after this */
    uint64_t bounce;            /* bytes of its own buffer, copied from the cache (after the iov) */
    /* a request of a batch: its ranges after the first (kvx__get_range), as the data */
};

/* What it takes from the UCX backend (kvx_ucx.h): its state in the
   context, the reader's state of a peer, a bounded wait step and what a
   failed op reports. */
KVX__PRIV kvx__ucx_getter *kvx__ucx_getter_of(kvx_ctx *ctx);
KVX__PRIV kvx__ucx_peer *kvx__ucx_peer_of(const kvx_peer *p);
KVX__PRIV int kvx__ucx_wait_step(kvx_ctx *ctx, uint64_t until);
KVX__PRIV kvx_status kvx__ucx_op_status(ucs_status_t s);


/* The chunks a reader asks a piece larger than one reply in: no larger than
   a reply, nor than KVX__UCX_CHUNK_BYTES (kvx_ucx_get.h, "REPLIES IN ONE
   PIECE"). */
KVX__PRIV uint64_t kvx__ucx_chunk_bytes(const kvx__ucx_getter *u) {
    return u->ask_bytes < KVX__UCX_CHUNK_BYTES ? u->ask_bytes : KVX__UCX_CHUNK_BYTES;
}

KVX__PRIV kvx__ucx_get *kvx__ucx_get_find(kvx__ucx_getter *u, uint64_t id) {
    uint32_t i = (uint32_t)id;
    if (i >= u->ngets || !u->gets[i].live || u->gets[i].gen != (uint32_t)(id >> 32)) return NULL;
    return &u->gets[i];
}

KVX__PRIV uint64_t kvx__ucx_get_id(const kvx__ucx_getter *u, const kvx__ucx_get *g) {
    return ((uint64_t)g->gen << 32) | (uint64_t)(g - u->gets);
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
    memset(g, 0, sizeof *g);
    g->live = 1;
    g->wait_next = KVX__UCX_NONE;
    g->nonce = kvx__nonce(&u->nonces);
    if (!++u->gen) u->gen = 1;  /* id 0 means none */
    g->gen = u->gen;
    return kvx__ucx_get_id(u, g);
}

/* Out of its peer's queue of gets waiting to ask (the queue is short: a
   peer's gets with parts still to ask are few, most fit the window at once). */
KVX__PRIV void kvx__ucx_wait_unlink(kvx__ucx_getter *u, kvx__ucx_peer *pp, kvx__ucx_get *g) {
    uint32_t me = (uint32_t)(g - u->gets), *at = &pp->wait_head, prev = KVX__UCX_NONE;
    if (!g->waiting) return;
    while (*at != KVX__UCX_NONE && *at != me) { prev = *at; at = &u->gets[*at].wait_next; }
    if (*at == me) {
        *at = g->wait_next;
        if (pp->wait_tail == me) pp->wait_tail = prev;
    }
    g->waiting = 0;
    g->wait_next = KVX__UCX_NONE;
}

/* End a get once: the op completes (or the probe learns), the id dies, and
   what it held of its peer's window is given back (a reply still coming for
   it is dropped: its id is dead). */
KVX__PRIV void kvx__ucx_get_end(kvx_ctx *ctx, kvx__ucx_get *g, kvx_status st, ucs_status_t us, const char *why) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(g->peer);
    kvx__read *rd = g->rd;
    ucs_status_t *probe = g->probe;
    uint32_t ops = g->nbatch ? g->nbatch : 1u;
    KVX_FREE(g->batch);
    g->batch = NULL;
    if (pp) {
        kvx__ucx_wait_unlink(u, pp, g);
        pp->asked -= g->asked;
        pp->asked_bytes -= g->asked_bytes;
    }
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
    while (rd && ops--) kvx__op_done(rd, st, why);  /* each op of a batch: the read counts them */
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

/* The bytes a part starting at byte off of an op's pieces (of len) covers:
   per (whole pieces), or a slice of one piece larger than per. */
KVX__PRIV uint64_t kvx__ucx_part_bytes(uint64_t off, uint64_t len, uint64_t per) {
    return len > per && len - off % len < per ? len - off % len : per;
}

/* The connection a peer's next request goes on: each in turn. */
KVX__PRIV ucp_ep_h kvx__ucx_conn_next(kvx__ucx_peer *pp) {
    uint32_t k = pp->next_conn;
    pp->next_conn = k >= pp->nmore ? 0 : k + 1;
    pp->asks_on[k]++;
    return k ? pp->am_more[k - 1] : pp->am;
}

/* Is h one of the reader's endpoints to the peer (a reply comes back on
   its request's)? */
KVX__PRIV int kvx__ucx_conn_of(const kvx__ucx_peer *pp, ucp_ep_h h) {
    uint32_t k;
    if (h == pp->am) return 1;
    for (k = 0; k < pp->nmore; k++)
        if (h == pp->am_more[k]) return 1;
    return 0;
}

/* The part of g at g->next: its request on the wire. 0, or the UCX status of
   a send that failed at once (the get is then ended). */
KVX__PRIV ucs_status_t kvx__ucx_ask(kvx_ctx *ctx, kvx__ucx_peer *pp, kvx__ucx_get *g) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint64_t off = g->next, len = g->piece, total = g->len, k = len ? off / len : 0, in = len ? off % len : 0;
    uint64_t now = kvx__now_ns(), id = kvx__ucx_get_id(u, g), part;
    size_t more = g->nbatch > 1 ? (size_t)(g->nbatch - 1) * KVX__GET_RANGE_BYTES : 0;  /* a batch's ranges after the first */
    kvx__ucx_msg *m = (kvx__ucx_msg *)KVX_MALLOC(sizeof *m + more);
    kvx__get_req rq;
    ucp_request_param_t prm;
    ucs_status_ptr_t sp;
    uint32_t i;
    if (!m) return UCS_ERR_NO_MEMORY;
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    m->req_id = id;
    memset(&rq, 0, sizeof rq);
    memcpy(rq.secret, g->peer->secret, KVX__SECRET_BYTES);
    rq.id = id; rq.nonce = g->nonce; rq.off = off;
    rq.ttl_ns = g->until_ns > now ? g->until_ns - now : 0;
    rq.reply_bytes = g->chunk ? kvx__ucx_chunk_bytes(u) : 0;
    rq.raddr = g->raddr + k * g->rstride + in;
    if (g->nbatch) {     /* every op of the batch, in one part: the first in the header */
        for (i = 0; i < g->nbatch; i++) {
            const kvx__op *o = &g->batch[i];
            kvx__get_range r;
            r.raddr = o->raddr; r.len = o->len; r.count = o->count; r.rstride = o->count > 1 ? o->rstride : 0;
            if (!i) { rq.raddr = r.raddr; rq.len = r.len; rq.count = r.count; rq.rstride = r.rstride; }
            else kvx__get_range_write((uint8_t *)(m + 1) + (size_t)(i - 1) * KVX__GET_RANGE_BYTES, &r);
        }
        part = total;
    } else if (len > g->per) {  /* a slice of one large piece */
        rq.len = part = kvx__ucx_part_bytes(off, len, g->per);
        rq.count = 1;
    } else {             /* whole pieces */
        rq.len = len;
        rq.count = !len ? 1u : (total - off) / len < g->per / len ? (total - off) / len : g->per / len;
        rq.rstride = g->rstride;
        part = rq.len * rq.count;
    }
    kvx__get_req_write(m->hdr, &rq);
    g->next = off + (part ? part : 1);
    g->asked++; g->asked_bytes += part;
    u->parts_asked++;
    pp->asked++; pp->asked_bytes += part;
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    prm.cb.send = kvx__ucx_msg_sent;
    prm.user_data = m;
    prm.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
    sp = ucp_am_send_nbx(kvx__ucx_conn_next(pp), KVX__UCX_AM_GET, m->hdr, KVX__GET_REQ_BYTES, more ? (void *)(m + 1) : NULL, more, &prm);
    if (sp == NULL) KVX_FREE(m);
    if (UCS_PTR_IS_ERR(sp)) {
        KVX_FREE(m);
        return UCS_PTR_STATUS(sp);
    }
    return UCS_OK;
}

/* Ask for the parts of p's waiting gets, oldest first, while its window has
   room (and always one, so a get larger than the window moves). */
KVX__PRIV void kvx__ucx_asks(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(p);
    while (pp && pp->am && pp->wait_head != KVX__UCX_NONE) {
        kvx__ucx_get *g = &u->gets[pp->wait_head];
        uint64_t id = kvx__ucx_get_id(u, g);
        ucs_status_t s;
        if (pp->asked && (pp->asked >= KVX__UCX_WINDOW_PARTS || pp->asked_bytes + g->per > KVX__UCX_WINDOW_BYTES)) return;
        s = kvx__ucx_ask(ctx, pp, g);
        if (!(g = kvx__ucx_get_find(u, id))) continue;  /* ended during the send */
        if (s != UCS_OK) { kvx__ucx_get_end(ctx, g, kvx__ucx_op_status(s), s, ucs_status_string(s)); continue; }
        if (g->next >= g->len) kvx__ucx_wait_unlink(u, pp, g);
    }
}

/* A new get on its peer's queue of gets waiting to ask; asked for as the
   window allows. */
KVX__PRIV void kvx__ucx_get_queue(kvx_ctx *ctx, kvx_peer *p, uint64_t id) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(p);
    u->gets[(uint32_t)id].waiting = 1;
    if (pp->wait_tail == KVX__UCX_NONE) pp->wait_head = (uint32_t)id;
    else u->gets[pp->wait_tail].wait_next = (uint32_t)id;
    pp->wait_tail = (uint32_t)id;
    kvx__ucx_asks(ctx, p);
}

/* Ask for one op's bytes (count pieces of len), in parts: whole pieces up
   to the context's ask_bytes; one piece of up to KVX__UCX_GET_PART in one part
   that the owner answers in chunks; else slices of a piece, each one reply.
   The parts are asked for as the peer's window allows; the op completes
   through kvx__op_done (the probe through *probe). */
KVX__PRIV kvx_status kvx__ucx_get_post(kvx_ctx *ctx, kvx__read *rd, kvx_peer *p, const kvx__op *op, ucs_status_t *probe) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__ucx_peer *pp = kvx__ucx_peer_of(p);
    uint64_t id, off, len = op->len, count = op->count ? op->count : 1u;
    kvx__ucx_get *g;
    if (!pp || !pp->am) return kvx__fail(ctx, KVX_ERR_PEER, "ucx: peer %s/%d is disconnected", p->name, p->rank);
    if (!(id = kvx__ucx_get_new(ctx))) return kvx__fail(ctx, KVX_ERR_NOMEM, "ucx: out of memory for a get");
    g = &u->gets[(uint32_t)id];
    g->rd = rd; g->peer = p; g->laddr = op->laddr; g->len = len * count; g->probe = probe;
    g->piece = len; g->lstride = count > 1 ? op->lstride : 0;
    g->raddr = op->raddr; g->rstride = count > 1 ? op->rstride : 0;
    g->until_ns = rd ? rd->deadline_ns : kvx__now_ns() + (uint64_t)ctx->timeout_ms * 1000000ull;
    if (len <= u->ask_bytes) {  /* whole pieces per part */
        g->per = len ? u->ask_bytes / len * len : u->ask_bytes;
    } else if (count == 1 && len <= KVX__UCX_GET_PART) {  /* one request, answered in chunks */
        g->per = len;
        g->chunk = kvx__get_chunk(len, kvx__ucx_chunk_bytes(u));
    } else {  /* slices of a piece, each one reply */
        g->per = kvx__get_chunk(len, kvx__ucx_chunk_bytes(u));
    }
    if (len && g->per / len > KVX__UCX_GET_PIECES) g->per = (uint64_t)KVX__UCX_GET_PIECES * len;
    for (off = 0; off == 0 || off < g->len; off += kvx__ucx_part_bytes(off, len, g->per)) g->parts++;
    kvx__ucx_get_queue(ctx, p, id);
    return KVX_OK;
}

/* The staged batch goes: one op as any other, several as one get of one
   part. An op that cannot go fails as a completion: its post returned OK. */
KVX__PRIV void kvx__ucx_stage_send(kvx_ctx *ctx) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__read *rd = u->stage_rd;
    uint32_t n = u->nstage;
    uint64_t bytes = u->stage_bytes, id;
    kvx_status st = KVX_OK;
    kvx__op *ops;
    if (!n) return;
    u->nstage = 0; u->stage_rd = NULL; u->stage_bytes = u->stage_pieces = 0;
    if (n == 1) st = kvx__ucx_get_post(ctx, rd, rd->peer, &u->stage[0], NULL);
    else if (!kvx__ucx_peer_of(rd->peer) || !kvx__ucx_peer_of(rd->peer)->am) st = KVX_ERR_PEER;
    else if (!(ops = (kvx__op *)KVX_MALLOC((size_t)n * sizeof *ops))) st = KVX_ERR_NOMEM;
    else if (!(id = kvx__ucx_get_new(ctx))) { KVX_FREE(ops); st = KVX_ERR_NOMEM; }
    else {
        kvx__ucx_get *g = &u->gets[(uint32_t)id];
        memcpy(ops, u->stage, (size_t)n * sizeof *ops);
        g->batch = ops; g->nbatch = n;
        g->rd = rd; g->peer = rd->peer; g->len = g->per = bytes; g->parts = 1;
        g->until_ns = rd->deadline_ns;
        kvx__ucx_get_queue(ctx, rd->peer, id);
    }
    while (st != KVX_OK && n--) kvx__op_done(rd, st, st == KVX_ERR_PEER ? "the peer is disconnected" : "out of memory for a get");
}

/* An op of at most the context's ask_bytes into the batch of its read; a
   batch of another read, or one this op would overfill, goes first. A
   batch is one read's, so that one failure fails only that read. */
KVX__PRIV kvx_status kvx__ucx_stage(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint64_t count = op->count ? op->count : 1u, bytes = op->len * count;
    if (u->nstage && (u->stage_rd != rd || u->stage_bytes + bytes > u->ask_bytes ||
                      u->stage_pieces + count > KVX__UCX_GET_PIECES || u->nstage == KVX__UCX_GET_RANGES))
        kvx__ucx_stage_send(ctx);
    u->stage[u->nstage] = *op;
    u->stage[u->nstage].count = (uint32_t)count;
    u->nstage++;
    u->stage_rd = rd;
    u->stage_bytes += bytes;
    u->stage_pieces += count;
    return KVX_OK;
}

/* Is [addr, addr + len) inside one region of host memory this context
   registered? kvx's get serves host caches alone (a reader reads a GPU cache
   another way), and the owner's CPU copies from them. */
KVX__PRIV int kvx__ucx_owned(kvx_ctx *ctx, uint64_t addr, uint64_t len) {
    uint32_t c, i;
    for (c = 0; c < ctx->ncaches; c++) {
        const kvx__cache_info *ci = &ctx->caches[c]->info;
        if (ci->mem != KVX_MEM_HOST) continue;
        for (i = 0; i < ci->nregions; i++) {
            const kvx__region *r = &ci->regions[i];
            if (addr >= r->addr && len <= r->len && addr - r->addr <= r->len - len) return 1;
        }
    }
    return 0;
}

/* Range i of a request: the header's first, then its data's. */
KVX__PRIV int kvx__ucx_range_at(const kvx__get_req *rq, const uint8_t *data, size_t dlen, size_t i, kvx__get_range *r) {
    if (i) return kvx__get_range_read(data, dlen, i - 1, r);
    r->raddr = rq->raddr; r->len = rq->len; r->count = rq->count; r->rstride = rq->rstride;
    return KVX__WIRE_OK;
}

/* Owner: the ranges of a request, each inside memory this context
   registered and all within one part's bounds: how many pieces (iov
   entries at most), their bytes, and the span [lo, hi) they lie in. 0:
   refused; -1: not whole ranges or too many. */
KVX__PRIV int kvx__ucx_serve_ranges(kvx_ctx *ctx, const kvx__get_req *rq, const uint8_t *data, size_t dlen,
                                    uint64_t *bytes, uint64_t *lo, uint64_t *hi) {
    size_t i, nr;
    uint64_t pieces = 0, span;
    if (dlen % KVX__GET_RANGE_BYTES || dlen / KVX__GET_RANGE_BYTES >= KVX__UCX_GET_RANGES) return -1;
    nr = 1 + dlen / KVX__GET_RANGE_BYTES;
    *bytes = 0; *lo = UINT64_MAX; *hi = 0;
    for (i = 0; i < nr; i++) {
        kvx__get_range r;
        if (kvx__ucx_range_at(rq, data, dlen, i, &r) != KVX__WIRE_OK) return -1;
        if (r.count < 1 || r.count > KVX__UCX_GET_PIECES - pieces || r.len > KVX__UCX_GET_PART ||
            r.len * r.count > KVX__UCX_GET_PART - *bytes || (r.count > 1 && r.rstride >= (1ull << 40)))
            return 0;
        span = (r.count - 1) * (r.count > 1 ? r.rstride : 0) + r.len;
        if (!kvx__ucx_owned(ctx, r.raddr, span)) return 0;
        pieces += r.count;
        *bytes += r.len * r.count;
        if (r.raddr < *lo) *lo = r.raddr;
        if (r.raddr + span > *hi) *hi = r.raddr + span;
    }
    return (int)pieces;
}

/* Owner: the iov of a request kvx__ucx_serve_ranges passed, pieces that
   touch merged; how many entries (at most its pieces). */
KVX__PRIV size_t kvx__ucx_serve_iov(const kvx__get_req *rq, const uint8_t *data, size_t dlen, ucp_dt_iov_t *iov) {
    size_t i, n = 0, nr = 1 + dlen / KVX__GET_RANGE_BYTES;
    uint64_t k, at;
    for (i = 0; i < nr; i++) {
        kvx__get_range r;
        if (kvx__ucx_range_at(rq, data, dlen, i, &r) != KVX__WIRE_OK) break;  /* checked before: never */
        for (k = 0; k < r.count; k++) {
            at = r.raddr + k * (r.count > 1 ? r.rstride : 0);
            if (n && (uint64_t)(uintptr_t)iov[n - 1].buffer + iov[n - 1].length == at) iov[n - 1].length += (size_t)r.len;
            else { iov[n].buffer = (void *)(uintptr_t)at; iov[n].length = (size_t)r.len; n++; }
        }
    }
    return n;
}

/*--- an owner's count of replies, per endpoint -------------------------------*/

KVX__PRIV kvx__ucx_epacct *kvx__ucx_acct_find(kvx__ucx_getter *u, ucp_ep_h ep, int add) {
    uint32_t i, mask;
    uintptr_t h = (uintptr_t)ep;
    if (!u->acct_cap || (add && 2 * (u->acct_used + 1) > u->acct_cap)) {
        uint32_t cap = u->acct_cap ? 2 * u->acct_cap : 64, k;
        kvx__ucx_epacct *old = u->acct, *t;
        if (!add) return NULL;
        if (!(t = (kvx__ucx_epacct *)kvx__calloc(cap, sizeof *t))) return NULL;
        u->acct = t;
        u->acct_cap = cap;
        u->acct_used = 0;
        for (k = 0; old && k < cap / 2; k++)
            if (old[k].ep) *kvx__ucx_acct_find(u, old[k].ep, 1) = old[k];
        KVX_FREE(old);
    }
    mask = u->acct_cap - 1;
    h ^= h >> 17;
    for (i = (uint32_t)(h * 0x9E3779B97F4A7C15ull >> 40) & mask;; i = (i + 1) & mask) {
        if (u->acct[i].ep == ep) return &u->acct[i];
        if (!u->acct[i].ep) {
            if (!add) return NULL;
            u->acct[i].ep = ep;
            u->acct_used++;
            return &u->acct[i];
        }
    }
}

/* An endpoint that holds nothing leaves the table (backward-shift deletion
   keeps the probes of the others whole). */
KVX__PRIV void kvx__ucx_acct_forget(kvx__ucx_getter *u, kvx__ucx_epacct *a) {
    uint32_t mask, i, j;
    if (a->replies) return;
    mask = u->acct_cap - 1;
    i = (uint32_t)(a - u->acct);
    memset(a, 0, sizeof *a);
    u->acct_used--;
    for (j = (i + 1) & mask; u->acct[j].ep; j = (j + 1) & mask) {
        kvx__ucx_epacct e = u->acct[j];
        memset(&u->acct[j], 0, sizeof e);
        u->acct_used--;
        *kvx__ucx_acct_find(u, e.ep, 1) = e;
    }
}

/* A reply to m->ep left (or failed): its count goes. */
KVX__PRIV void kvx__ucx_acct_drop(kvx__ucx_getter *u, kvx__ucx_msg *m) {
    kvx__ucx_epacct *a = m->ep ? kvx__ucx_acct_find(u, m->ep, 0) : NULL;
    if (!a) return;
    a->replies--;
    a->bytes -= m->charged;
    u->nreplies--;
    m->ep = NULL;
    kvx__ucx_acct_forget(u, a);
}

KVX__PRIV void kvx__ucx_reply_unlink(kvx__ucx_msg *m) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(m->ctx);
    kvx__ucx_acct_drop(u, m);
    if (!m->listed) return;
    if (m->prev) m->prev->next = m->next; else u->replies = m->next;
    if (m->next) m->next->prev = m->prev;
    m->listed = 0;
}

/* A reply's own memory goes: its header, its iov, its copy of the bytes. */
KVX__PRIV void kvx__ucx_reply_free(kvx__ucx_msg *m) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(m->ctx);
    kvx__ucx_reply_unlink(m);
    u->bounce_bytes -= m->bounce;
    KVX_FREE(m);
}

KVX__PRIV void kvx__ucx_reply_sent(void *req, ucs_status_t status, void *user) {
    (void)status;  /* a reader that died: nothing to do but let go */
    kvx__ucx_reply_free((kvx__ucx_msg *)user);
    ucp_request_free(req);
}

/* Owner: a request's header, read and checked for this context's secret;
   0 where it is dropped unanswered (counted). */
KVX__PRIV int kvx__ucx_req_take(kvx_ctx *ctx, const void *header, size_t header_length, const ucp_am_recv_param_t *param, kvx__get_req *rq) {
    uint32_t ver = 0;
    int e;
    /* A rendezvous descriptor is UCX's to release when this returns UCS_OK
       (ucp_am_rndv_process_rts): a request's data is a few ranges, eager. */
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) { KVX__DROP(ctx, "ucx: a get request with a rendezvous payload dropped"); return 0; }
    if ((e = kvx__get_req_read((const uint8_t *)header, header_length, rq, &ver)) != KVX__WIRE_OK || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) {
        if (e == KVX__WIRE_VERSION) KVX__DROP(ctx, "ucx: a get request of version %u dropped: this kvx speaks version %u (upgrade both sides)", ver, KVX__GET_VERSION);
        else KVX__DROP(ctx, "ucx: a get request dropped (%zu-byte header: %s)", header_length, e ? kvx__wire_why(e) : "no reply endpoint");
        return 0;
    }
    if (!kvx__ct_equal(rq->secret, ctx->secret, KVX__SECRET_BYTES)) {
        KVX__DROP(ctx, "ucx: a get request without this context's secret dropped: a process without its current metadata, or of an "
                  "epoch before kvx_ctx_rotate");
        return 0;
    }
    return 1;
}

/* Owner: a reply's header and bytes on the wire (to m->ep): one piece from
   the cache, several from an iov, or many copied into m's own buffer. */
KVX__PRIV ucs_status_ptr_t kvx__ucx_reply_send(kvx__ucx_msg *m, const kvx__get_req *rq, const void *data, size_t length,
                                               int np, uint64_t bytes) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(m->ctx);
    ucp_dt_iov_t *iov = (ucp_dt_iov_t *)(m + 1);
    ucp_request_param_t prm;
    size_t n, k;
    memset(&prm, 0, sizeof prm);
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    prm.cb.send = kvx__ucx_reply_sent;
    prm.user_data = m;
    /* REPLY: the reader learns which endpoint it came from, and takes it only from the one it asked */
    prm.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_REPLY;
    if (np <= 1)
        return ucp_am_send_nbx(m->ep, KVX__UCX_AM_GET_REPLY, m->hdr, KVX__GET_REP_BYTES, np ? (void *)(uintptr_t)rq->raddr : NULL,
                               np ? (size_t)bytes : 0, &prm);
    n = kvx__ucx_serve_iov(rq, (const uint8_t *)data, length, iov);
    if (n <= KVX__UCX_REPLY_IOV) {  /* few once merged: in place after all */
        u->bounce_bytes -= m->bounce;
        m->bounce = 0;
    }
    if (m->bounce) {
        uint8_t *b = (uint8_t *)(iov + np), *at = b;
        u->replies_copied++;
        for (k = 0; k < n; k++) {
            memcpy(at, iov[k].buffer, iov[k].length);
            at += iov[k].length;
        }
        return ucp_am_send_nbx(m->ep, KVX__UCX_AM_GET_REPLY, m->hdr, KVX__GET_REP_BYTES, b, (size_t)m->bounce, &prm);
    }
    u->replies_iov++;
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    prm.datatype = ucp_dt_make_iov();
    return ucp_am_send_nbx(m->ep, KVX__UCX_AM_GET_REPLY, m->hdr, KVX__GET_REP_BYTES, iov, n, &prm);
}

/* Owner: the reply to a request that passed (np pieces of bytes in [lo, hi)
   when np > 0; a refusal when 0), counted to its endpoint's entry a. Bytes
   asked within the ttl the owner allows (its own timeout at most) are held
   for deregistration, unless they were copied. */
KVX__PRIV void kvx__ucx_reply(kvx_ctx *ctx, kvx__ucx_epacct *a, ucp_ep_h ep, const kvx__get_req *rq, const void *data, size_t length,
                              int np, uint64_t bytes, uint64_t lo, uint64_t hi) {
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    uint64_t ttl, max_ttl = (uint64_t)ctx->timeout_ms * 1000000ull;
    size_t n = np > 1 ? (size_t)np : 0;  /* iov entries at most */
    uint64_t bounce = n > KVX__UCX_REPLY_IOV && bytes <= u->ask_bytes &&
                      u->bounce_bytes + bytes <= KVX__UCX_BOUNCE_BYTES ? bytes : 0;  /* many pieces: copied together */
    kvx__get_rep rp;
    kvx__ucx_msg *m;
    ucs_status_ptr_t sp;
    if (!(m = (kvx__ucx_msg *)KVX_MALLOC(sizeof *m + n * sizeof(ucp_dt_iov_t) + (size_t)bounce))) {  /* the reader's deadline ends it */
        kvx__ucx_acct_forget(u, a);
        return;
    }
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    m->ep = ep;
    m->bounce = bounce;
    u->bounce_bytes += bounce;
    m->charged = np ? bytes : 0;
    a->replies++;
    a->bytes += m->charged;
    u->nreplies++;
    memcpy(rp.secret, ctx->secret, KVX__SECRET_BYTES);
    rp.id = rq->id; rp.nonce = rq->nonce; rp.off = rq->off; rp.len = np ? bytes : 0; rp.status = np ? 0u : 1u;
    kvx__get_rep_write(m->hdr, &rp);
    sp = kvx__ucx_reply_send(m, rq, data, length, np, bytes);
    if (sp == NULL || UCS_PTR_IS_ERR(sp)) {
        kvx__ucx_reply_free(m);
    } else if (np && bytes && !m->bounce) {  /* still sending from the cache: listed until it completes */
        ttl = rq->ttl_ns < max_ttl ? rq->ttl_ns : max_ttl;  /* what the reader says, within what this owner allows */
        m->addr = lo; m->len = hi - lo;
        m->until_ns = kvx__now_ns() + ttl;
        m->prev = NULL; m->next = u->replies;
        if (u->replies) u->replies->prev = m;
        u->replies = m;
        m->listed = 1;
    }
}

/* Owner: serve a request. Without this context's secret it is dropped
   unanswered; a range outside what kvx registered is refused (an answer:
   the reader holds the metadata); past the owner's bounds on what it holds
   for readers, dropped. */
KVX__PRIV ucs_status_t kvx__ucx_get_serve(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                         const ucp_am_recv_param_t *param) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__get_req rq;
    kvx__ucx_epacct *a;
    uint64_t bytes, lo, hi, chunk, o;
    uint32_t n;
    int np;
    if (!kvx__ucx_req_take(ctx, header, header_length, param, &rq)) return UCS_OK;
    if ((np = kvx__ucx_serve_ranges(ctx, &rq, (const uint8_t *)data, length, &bytes, &lo, &hi)) < 0) {
        KVX__DROP(ctx, "ucx: a get request dropped (%zu bytes of ranges: not whole ranges, or more than %u)", length, KVX__UCX_GET_RANGES);
        return UCS_OK;
    }
    chunk = np == 1 ? kvx__get_chunk(bytes, rq.reply_bytes) : bytes;  /* one range: in the chunks the reader asked for */
    n = np == 1 && bytes > chunk ? (uint32_t)((bytes + chunk - 1) / chunk) : 1u;
    a = kvx__ucx_acct_find(u, param->reply_ep, 1);
    if (!a || u->nreplies + n > KVX__UCX_REPLIES || a->replies + n > KVX__UCX_EP_REPLIES ||
        (np && a->bytes + bytes > KVX__UCX_EP_BYTES)) {
        if (a) kvx__ucx_acct_forget(u, a);  /* an entry made for this request alone goes again */
        KVX__DROP(ctx, "ucx: a get request dropped: %s", !a ? "out of memory" : u->nreplies + n > KVX__UCX_REPLIES ?
                  "the owner holds its most replies in all" : "the owner holds its most replies for that reader, which is not taking them");
        return UCS_OK;
    }
    if (!np)
        KVX__WARN_HELD(ctx, "ucx: refused a get of %llu x %llu bytes at 0x%llx%s: not inside memory this context registered, or past "
                       "a request's bounds", (unsigned long long)rq.count, (unsigned long long)rq.len, (unsigned long long)rq.raddr,
                       length ? " and more ranges" : "");
    if (n == 1) {
        kvx__ucx_reply(ctx, a, param->reply_ep, &rq, data, length, np, bytes, lo, hi);
        return UCS_OK;
    }
    for (o = 0; o < bytes; o += chunk) {  /* each chunk its own reply at its own off */
        kvx__get_req part = rq;
        part.raddr = rq.raddr + o; part.off = rq.off + o; part.len = bytes - o < chunk ? bytes - o : chunk;
        /* found again: a reply that completed at once may have let the entry go */
        if (!(a = kvx__ucx_acct_find(u, param->reply_ep, 1))) break;
        u->chunks_sent++;
        kvx__ucx_reply(ctx, a, param->reply_ep, &part, NULL, 0, 1, part.len, part.raddr, part.raddr + part.len);
    }
    return UCS_OK;
}

/* Reader: a get whose one part comes in chunks: every chunk's bit, and is
   a reply at off of len the next of them (where one starts, its length, not
   come before)? At most 64 chunks: KVX__UCX_GET_PART over the least
   ask_bytes, KVX__GET_REPLY_MIN (a segment of KVX__UCX_RX_SEG_MIN). */
typedef char kvx__ucx_chunks_fit[(KVX__UCX_GET_PART + KVX__GET_REPLY_MIN - 1) / KVX__GET_REPLY_MIN <= 64 ? 1 : -1];
KVX__PRIV uint64_t kvx__ucx_chunks_all(const kvx__ucx_get *g) {
    uint64_t n = (g->len + g->chunk - 1) / g->chunk;
    return n >= 64 ? ~0ull : (1ull << n) - 1;
}
KVX__PRIV int kvx__ucx_chunk_ok(const kvx__ucx_get *g, uint64_t off, uint64_t len) {
    uint64_t want = g->len - off < g->chunk ? g->len - off : g->chunk;
    return off % g->chunk == 0 && off < g->len && len == want && !(g->chunks_got >> (off / g->chunk) & 1);
}

/* Reader: the bytes of one part, or the owner's refusal; taken only with the
   owner's secret and the request's nonce, from the endpoint it was sent on. */
KVX__PRIV ucs_status_t kvx__ucx_get_reply(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                         const ucp_am_recv_param_t *param) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    kvx__ucx_getter *u = kvx__ucx_getter_of(ctx);
    kvx__get_rep rp;
    kvx__ucx_get *g;
    kvx__ucx_peer *pp;
    kvx_peer *p;
    uint32_t ver = 0;
    int e = kvx__get_rep_read((const uint8_t *)header, header_length, &rp, &ver);
    if (e != KVX__WIRE_OK) {
        if (e == KVX__WIRE_VERSION) KVX__DROP(ctx, "ucx: a get reply of version %u dropped: this kvx speaks version %u (upgrade both sides)", ver, KVX__GET_VERSION);
        else KVX__DROP(ctx, "ucx: a get reply dropped (%zu-byte header: %s)", header_length, kvx__wire_why(e));
        return UCS_OK;
    }
    if (!(g = kvx__ucx_get_find(u, rp.id))) {  /* the op ended (a late reply), or never was */
        if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) KVX__DROP(ctx, "ucx: a get reply with a rendezvous payload dropped");
        return UCS_OK;
    }
    p = g->peer;
    pp = kvx__ucx_peer_of(p);
    if (rp.nonce != g->nonce || !kvx__ct_equal(rp.secret, p->secret, KVX__SECRET_BYTES) || !pp ||
        !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) || !kvx__ucx_conn_of(pp, param->reply_ep)) {
        KVX__DROP(ctx, "ucx: a get reply that is not %s/%d's answer to this read dropped (%s)", p->name, p->rank,
                  rp.nonce != g->nonce ? "another nonce" : !kvx__ct_equal(rp.secret, p->secret, KVX__SECRET_BYTES) ? "another secret"
                  : "from another endpoint");
        return UCS_OK;
    }
    /* kvx's replies are eager: a rendezvous one is not as sent (UCX releases it when this returns) */
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, UCS_ERR_MESSAGE_TRUNCATED, "a get reply of the wrong kind");
        return UCS_OK;
    }
    if (rp.status) {
        kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, UCS_ERR_INVALID_ADDR, "the owner refused the range (not inside its registered memory)");
        return UCS_OK;
    }
    if (rp.len != length || rp.off > g->len || length > g->len - rp.off || (g->nbatch && length != g->len) ||
        (g->chunk && !kvx__ucx_chunk_ok(g, rp.off, length))) {
        kvx__ucx_get_end(ctx, g, KVX_ERR_PEER, UCS_ERR_MESSAGE_TRUNCATED, "a get reply of the wrong size");
        return UCS_OK;
    }
    if (g->rd && kvx__now_ns() >= g->rd->deadline_ns) {  /* the owner may have let the memory go by now */
        kvx__ucx_get_end(ctx, g, KVX_ERR_TIMEOUT, UCS_ERR_TIMED_OUT, "the read's deadline passed before its bytes came");
        return UCS_OK;
    }
    if (g->nbatch) {  /* each op's pieces where they go, in the order asked */
        const uint8_t *src = (const uint8_t *)data;
        uint32_t i, k;
        for (i = 0; i < g->nbatch; i++) {
            const kvx__op *o = &g->batch[i];
            for (k = 0; k < o->count; k++, src += o->len) memcpy((void *)(uintptr_t)(o->laddr + k * o->lstride), src, (size_t)o->len);
        }
    } else {  /* each piece where it goes (one piece, or pieces lstride apart) */
        uint64_t at = rp.off, left = length;
        const uint8_t *src = (const uint8_t *)data;
        while (left) {
            uint64_t in = at % g->piece, n = g->piece - in < left ? g->piece - in : left;
            memcpy((void *)(uintptr_t)(g->laddr + at / g->piece * g->lstride + in), src, (size_t)n);
            src += n; at += n; left -= n;
        }
    }
    g->asked_bytes -= length; pp->asked_bytes -= length;
    if (g->chunk && (g->chunks_got |= 1ull << (rp.off / g->chunk)) != kvx__ucx_chunks_all(g)) return UCS_OK;  /* more to come */
    g->asked--; pp->asked--;
    if (--g->parts == 0) kvx__ucx_get_end(ctx, g, KVX_OK, UCS_OK, NULL);
    kvx__ucx_asks(ctx, p);
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
    kvx_peer *p = rd->peer;
    uint32_t i;
    if (!(rd->rc->be_flags & KVX__UCX_BY_KVX_GET) && !rd->gather) return;
    for (i = 0; i < u->ngets; i++)
        if (u->gets[i].live && u->gets[i].rd == rd) kvx__ucx_get_end(ctx, &u->gets[i], KVX_ERR_TIMEOUT, UCS_ERR_TIMED_OUT, "timed out");
    kvx__ucx_asks(ctx, p);  /* the window it held goes to the peer's other reads */
}

/* The engine reuses memory once it is deregistered, so no reply may still be
   sending from it while its reader would take the bytes. Replies to live
   readers leave within milliseconds. A reader that stopped taking them
   (stalled, or stopped in a debugger) is waited for until the deadlines of
   the reads they serve, and never longer than this owner's timeout: after
   that it drops whatever comes, and the replies may send what the memory
   holds next. UCX 1.13 cannot cancel them: a forced close of the endpoint
   it made for that reader crashes its TCP progress. */
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
        if (kvx__ucx_reply_in(m, addr, len)) {  /* off the list; still counted to its endpoint until UCX lets it go */
            if (m->prev) m->prev->next = m->next; else u->replies = m->next;
            if (m->next) m->next->prev = m->prev;
            m->listed = 0;
            k++;
        }
    }
    if (kvx__now_ns() - t0 > 100000000ull || k)
        KVX__LOG(ctx, KVX_LOG_WARN, "ucx: deregistering memory at 0x%llx waited %.3f s for replies a reader was not taking; %u still queued, "
                 "past their reads' deadlines (the reader drops them)", (unsigned long long)addr, (double)(kvx__now_ns() - t0) / 1e9, k);
}

#endif /* KVX_UCX_GET_INCLUDED */
