/* SPDX-License-Identifier: MIT */
/*
    kvx_local.h -- the local backend: reads between contexts of one process
    by memcpy. Always compiled (kvx_ctx_desc.backend = KVX_BACKEND_LOCAL);
    included by kvx.h inside its implementation; do not include it yourself.

    For an engine's own unit tests without a network, and for measuring
    kvx's own cost apart from a transport's. It keeps the whole contract, as
    a software-served transport does: a read's ops wait in the owner's queue
    until the OWNER progresses (its progress thread or kvx_progress), so a
    stalled owner makes reads time out, deadlines and abandon apply, and a
    destroyed owner fails its readers with KVX_ERR_PEER. Notifications go
    through the owner's progress too. The owner checks every range against
    the memory it registered, as kvx's UCX get does. Host memory only.
    kvx_peer_transport() says "local:memcpy".

    The contexts of the process share one registry under one mutex: the
    queues of ops and notifications, and each context's registered ranges.
    A memcpy runs under that mutex, so deregistration waits for it. A
    read's ops are staged by the reader and handed over at the end of each
    kvx_post or progress pass, under the mutex once; an owner's event fd is
    written only when its list of work goes from empty to not (it drains
    the whole list when it wakes), and so is a reader's for its completions.
*/
#ifndef KVX_LOCAL_INCLUDED
#define KVX_LOCAL_INCLUDED
#include "kvx_internal.h"
#include "kvx_wire.h"

#include <sys/eventfd.h>

#define KVX__LOCAL_FREE_OPS 1024u       /* ops kept for reuse per context: the transfer path does not allocate once warm */

typedef struct kvx__local kvx__local;

/* One op on its way: in the owner's todo list, then the reader's done list. */
typedef struct kvx__local_op {
    struct kvx__local_op *next;
    kvx__local *reader;
    kvx__read *rd;              /* NULL: a notification (msg) */
    kvx_peer *peer;             /* the reader's peer object for the owner */
    kvx__op op;
    kvx_status st;
    const char *why;
    uint8_t msg[KVX__NOTIFY_BYTES];
} kvx__local_op;

/* An op staged by its reader until the end of the post (kvx__local_flush). */
typedef struct kvx__local_staged {
    kvx__read *rd;
    kvx__op op;
    kvx_status st;              /* why it could not be handed over */
} kvx__local_staged;

struct kvx__local {
    kvx__local *next;           /* the registry */
    kvx_ctx *ctx;
    uint64_t id;
    uint8_t addr[12];           /* what peers connect by: process id, context id */
    int efd;
    kvx__local_op *todo, **todo_tail;   /* to serve, as owner, in order */
    kvx__local_op *done;                /* to report, as reader */
    kvx__local_op *spare;               /* for reuse */
    uint32_t nspare;
    uint64_t *ranges;           /* registered [a, b) pairs */
    uint32_t nranges, ranges_cap;
    kvx__local_staged *stage;   /* this reader's ops not yet handed over (under its context's lock) */
    uint32_t nstage, stage_cap;
};

static pthread_mutex_t kvx__local_mu = PTHREAD_MUTEX_INITIALIZER;
static kvx__local *kvx__local_all;
static uint64_t kvx__local_next_id;

KVX__PRIV kvx__local *kvx__local_of(const kvx_ctx *ctx) { return (kvx__local *)ctx->be; }

KVX__PRIV kvx__local *kvx__local_find(uint64_t id) {
    kvx__local *l;
    for (l = kvx__local_all; l && l->id != id; l = l->next) {}
    return l;
}

KVX__PRIV void kvx__local_wake(kvx__local *l) {
    uint64_t one = 1;
    if (write(l->efd, &one, sizeof one) < 0) {}  /* full counter: a wakeup is pending anyway */
}

/* With kvx__local_mu held. */
KVX__PRIV kvx__local_op *kvx__local_op_new(kvx__local *l) {
    kvx__local_op *o = l->spare;
    if (o) { l->spare = o->next; l->nspare--; }
    else if (!(o = (kvx__local_op *)KVX_MALLOC(sizeof *o))) return NULL;
    memset(o, 0, sizeof *o);
    return o;
}
KVX__PRIV void kvx__local_op_free(kvx__local *l, kvx__local_op *o) {
    if (l->nspare < KVX__LOCAL_FREE_OPS) { o->next = l->spare; l->spare = o; l->nspare++; }
    else KVX_FREE(o);
}

/* Hand an op to its reader's done list (with kvx__local_mu held); the
   reader takes the whole list, so only the first one wakes it. */
KVX__PRIV void kvx__local_finish(kvx__local_op *o, kvx_status st, const char *why) {
    int was_empty = o->reader->done == NULL;
    o->st = st;
    o->why = why;
    o->next = o->reader->done;
    o->reader->done = o;
    if (was_empty) kvx__local_wake(o->reader);
}

/* Append to an owner's work (with kvx__local_mu held); it drains the whole
   list once woken, so only the first one wakes it. */
KVX__PRIV void kvx__local_give(kvx__local *owner, kvx__local_op *o) {
    int was_empty = owner->todo == NULL;
    o->next = NULL;
    *owner->todo_tail = o;
    owner->todo_tail = &o->next;
    if (was_empty) kvx__local_wake(owner);
}

KVX__PRIV int kvx__local_owned(const kvx__local *l, uint64_t a, uint64_t len) {
    uint32_t i;
    for (i = 0; i < l->nranges; i++)
        if (a >= l->ranges[2 * i] && len <= l->ranges[2 * i + 1] - l->ranges[2 * i] && a - l->ranges[2 * i] <= l->ranges[2 * i + 1] - l->ranges[2 * i] - len) return 1;
    return 0;
}

/*--- context ----------------------------------------------------------------*/

KVX__PRIV void kvx__local_close(kvx_ctx *ctx) {
    kvx__local *l = kvx__local_of(ctx), **pp, *r;
    kvx__local_op *o;
    if (!l) return;
    pthread_mutex_lock(&kvx__local_mu);
    for (pp = &kvx__local_all; *pp; pp = &(*pp)->next)
        if (*pp == l) { *pp = l->next; break; }
    /* Reads still waiting on this owner fail: their readers learn it. */
    while ((o = l->todo) != NULL) {
        l->todo = o->next;
        if (o->rd) kvx__local_finish(o, KVX_ERR_PEER, "the owner's context was destroyed");
        else kvx__local_op_free(o->reader, o);
    }
    /* Completions for this reader that it never took, and ops others still
       hold for it, can no longer be reported: drop them. */
    while ((o = l->done) != NULL) { l->done = o->next; KVX_FREE(o); }
    for (r = kvx__local_all; r; r = r->next) {
        kvx__local_op **op = &r->todo, *n;
        while (*op) {
            n = *op;
            if (n->reader == l) { *op = n->next; KVX_FREE(n); }
            else op = &n->next;
        }
        for (r->todo_tail = &r->todo; *r->todo_tail; r->todo_tail = &(*r->todo_tail)->next) {}
    }
    pthread_mutex_unlock(&kvx__local_mu);
    while ((o = l->spare) != NULL) { l->spare = o->next; KVX_FREE(o); }
    if (l->efd >= 0) close(l->efd);
    KVX_FREE(l->stage);
    KVX_FREE(l->ranges);
    KVX_FREE(l);
    ctx->be = NULL;
}

KVX__PRIV kvx_status kvx__local_open(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    kvx__local *l = (kvx__local *)kvx__calloc(1, sizeof *l);
    (void)desc;
    if (!l) return kvx__fail(ctx, KVX_ERR_NOMEM, "local: out of memory");
    ctx->be = l;
    l->ctx = ctx;
    l->todo_tail = &l->todo;
    if ((l->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        kvx__local_close(ctx);
        return kvx__fail(ctx, KVX_ERR_BACKEND, "local: eventfd: %s", strerror(errno));
    }
    pthread_mutex_lock(&kvx__local_mu);
    l->id = ++kvx__local_next_id;
    l->next = kvx__local_all;
    kvx__local_all = l;
    pthread_mutex_unlock(&kvx__local_mu);
    {
        kvx__wbuf w;
        memset(&w, 0, sizeof w);
        w.p = l->addr; w.cap = sizeof l->addr;
        kvx__put_u(&w, (uint32_t)getpid(), 4);
        kvx__put_u(&w, l->id, 8);
    }
    return KVX_OK;
}

/* The address: this process and the context's id in it. */
KVX__PRIV kvx_status kvx__local_address(kvx_ctx *ctx, const uint8_t **addr, uint32_t *len) {
    *addr = kvx__local_of(ctx)->addr;
    *len = (uint32_t)sizeof kvx__local_of(ctx)->addr;
    return KVX_OK;
}

/*--- memory -----------------------------------------------------------------*/

KVX__PRIV kvx_status kvx__local_mem_register(kvx_ctx *ctx, const kvx__cache_info *ci, kvx__region *r) {
    kvx__local *l = kvx__local_of(ctx);
    kvx_status st = KVX_OK;
    if (ci->mem != KVX_MEM_HOST)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "local: the local backend copies host memory; GPU caches need KVX_CUDA (KVX_BACKEND_CUDA)");
    pthread_mutex_lock(&kvx__local_mu);
    if (l->nranges == l->ranges_cap) {
        uint32_t cap = l->ranges_cap ? 2 * l->ranges_cap : 16;
        uint64_t *n = (uint64_t *)KVX_REALLOC(l->ranges, (size_t)cap * 2 * sizeof *n);
        if (!n) st = kvx__fail(ctx, KVX_ERR_NOMEM, "local: out of memory");
        else { l->ranges = n; l->ranges_cap = cap; }
    }
    if (st == KVX_OK) {
        l->ranges[2 * l->nranges] = r->addr;
        l->ranges[2 * l->nranges + 1] = r->addr + r->len;
        l->nranges++;
        r->rkey = (uint8_t *)KVX_MALLOC(1);
        r->rkey_len = 0;
        if (!r->rkey) st = kvx__fail(ctx, KVX_ERR_NOMEM, "local: out of memory");
    }
    pthread_mutex_unlock(&kvx__local_mu);
    return st;
}

/* Under the registry's mutex: no memcpy from it runs once this returns. */
KVX__PRIV void kvx__local_mem_deregister(kvx_ctx *ctx, kvx__region *r) {
    kvx__local *l = kvx__local_of(ctx);
    uint32_t i;
    pthread_mutex_lock(&kvx__local_mu);
    for (i = 0; i < l->nranges; i++)
        if (l->ranges[2 * i] == r->addr && l->ranges[2 * i + 1] == r->addr + r->len) {
            l->ranges[2 * i] = l->ranges[2 * (l->nranges - 1)];
            l->ranges[2 * i + 1] = l->ranges[2 * (l->nranges - 1) + 1];
            l->nranges--;
            break;
        }
    pthread_mutex_unlock(&kvx__local_mu);
}

/*--- peers ------------------------------------------------------------------*/

KVX__PRIV kvx_status kvx__local_connect(kvx_ctx *ctx, kvx_peer *p) {
    kvx__rbuf r;
    uint32_t pid;
    uint64_t id;
    int alive;
    memset(&r, 0, sizeof r);
    r.p = p->addr; r.len = p->addr_len;
    pid = (uint32_t)kvx__get_u(&r, 4);
    id = kvx__get_u(&r, 8);
    if (r.bad || r.off != r.len) return kvx__fail(ctx, KVX_ERR_ARG, "local: peer %s/%d: an address of %u bytes, not 12", p->name, p->rank, p->addr_len);
    if (pid != (uint32_t)getpid())
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "local: peer %s/%d lives in process %u, this is %u: the local backend reads within one process",
                         p->name, p->rank, pid, (unsigned)getpid());
    pthread_mutex_lock(&kvx__local_mu);
    alive = kvx__local_find(id) != NULL;
    pthread_mutex_unlock(&kvx__local_mu);
    if (!alive) return kvx__fail(ctx, KVX_ERR_PEER, "local: peer %s/%d: its context was destroyed", p->name, p->rank);
    p->be = (void *)(uintptr_t)id;
    kvx__strlcpy(p->transport, "local:memcpy", sizeof p->transport);
    kvx__strlcpy(p->why, "the local backend: both contexts are in this process", sizeof p->why);
    return KVX_OK;
}

/* Move from *list to *taken the ops of reader me to p: of read rd, or of
   any read (rd NULL). */
KVX__PRIV void kvx__local_take(kvx__local_op **list, const kvx__local *me, const kvx_peer *p, const kvx__read *rd, kvx__local_op **taken) {
    kvx__local_op *o;
    while ((o = *list) != NULL) {
        if (o->reader == me && o->peer == p && o->rd && (!rd || o->rd == rd)) { *list = o->next; o->next = *taken; *taken = o; }
        else list = &o->next;
    }
}

/* Report a detached list of ops to their reads, then keep the ops for reuse.
   Outside the registry's mutex: a read that finishes may notify, which
   takes it. */
KVX__PRIV int kvx__local_report(kvx__local *me, kvx__local_op *list) {
    kvx__local_op *o, *n;
    int k = 0;
    for (o = list; o; o = o->next, k++) kvx__op_done(o->rd, o->st, o->why);
    pthread_mutex_lock(&kvx__local_mu);
    for (o = list; o; o = n) { n = o->next; kvx__local_op_free(me, o); }
    pthread_mutex_unlock(&kvx__local_mu);
    return k;
}

/* Take back every op of this reader to p (of rd, or of any read) that is
   not done yet, and every completion not yet reported; report them all now
   with st. */
KVX__PRIV void kvx__local_recall(kvx_ctx *ctx, kvx_peer *p, kvx__read *rd, kvx_status st, const char *why) {
    kvx__local *me = kvx__local_of(ctx), *owner;
    kvx__local_op *taken = NULL, *o;
    pthread_mutex_lock(&kvx__local_mu);
    if ((owner = kvx__local_find((uint64_t)(uintptr_t)p->be)) != NULL) {
        kvx__local_take(&owner->todo, me, p, rd, &taken);
        for (owner->todo_tail = &owner->todo; *owner->todo_tail; owner->todo_tail = &(*owner->todo_tail)->next) {}
    }
    kvx__local_take(&me->done, me, p, rd, &taken);
    pthread_mutex_unlock(&kvx__local_mu);
    for (o = taken; o; o = o->next) { o->st = st; o->why = why; }
    kvx__local_report(me, taken);
}

KVX__PRIV void kvx__local_disconnect(kvx_ctx *ctx, kvx_peer *p) {
    if (!p->be) return;
    kvx__local_recall(ctx, p, NULL, KVX_ERR_CANCELED, "canceled");
    p->be = NULL;
}

/* A read past its deadline: its ops not yet copied are taken back. */
KVX__PRIV void kvx__local_abandon(kvx_ctx *ctx, kvx__read *rd) {
    if (rd->peer->be) kvx__local_recall(ctx, rd->peer, rd, KVX_ERR_TIMEOUT, "timed out");
}

/*--- reads and notifications --------------------------------------------------*/

/* Queue an op of rd (or, rd NULL, a notification msg) for the owner of p;
   KVX_ERR_PEER if the owner is gone. */
KVX__PRIV kvx_status kvx__local_send(kvx_ctx *ctx, kvx_peer *p, kvx__read *rd, const kvx__op *op, const uint8_t *msg) {
    kvx__local *me = kvx__local_of(ctx), *owner;
    kvx__local_op *o;
    kvx_status st = KVX_OK;
    pthread_mutex_lock(&kvx__local_mu);
    if (!(owner = kvx__local_find((uint64_t)(uintptr_t)p->be))) st = KVX_ERR_PEER;
    else if (!(o = kvx__local_op_new(me))) st = KVX_ERR_NOMEM;
    else {
        o->reader = me;
        o->rd = rd;
        o->peer = p;
        if (op) o->op = *op;
        else memcpy(o->msg, msg, sizeof o->msg);
        kvx__local_give(owner, o);
    }
    pthread_mutex_unlock(&kvx__local_mu);
    if (st == KVX_ERR_PEER) return kvx__fail(ctx, st, "local: peer %s/%d: its context was destroyed", p->name, p->rank);
    if (st == KVX_ERR_NOMEM) return kvx__fail(ctx, st, "local: out of memory");
    return KVX_OK;
}

/* Staged: the ops of a post go to their owners together (kvx__local_flush). */
KVX__PRIV kvx_status kvx__local_post(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    kvx__local *me = kvx__local_of(ctx);
    if (me->nstage == me->stage_cap) {
        uint32_t cap = me->stage_cap ? 2 * me->stage_cap : 64u;
        kvx__local_staged *n = (kvx__local_staged *)KVX_REALLOC(me->stage, (size_t)cap * sizeof *n);
        if (!n) return kvx__fail(ctx, KVX_ERR_NOMEM, "local: out of memory");
        me->stage = n;
        me->stage_cap = cap;
    }
    me->stage[me->nstage].rd = rd;
    me->stage[me->nstage].op = *op;
    me->nstage++;
    return KVX_OK;
}

/* The staged ops to their owners, under the registry's mutex once. An op
   whose owner is gone, or that finds no memory, fails as a completion. */
KVX__PRIV void kvx__local_flush(kvx_ctx *ctx, kvx_queue *q) {
    kvx__local *me = kvx__local_of(ctx), *owner = NULL;
    const kvx_peer *last = NULL;
    uint32_t i, nfail = 0;
    (void)q;
    if (!me->nstage) return;
    pthread_mutex_lock(&kvx__local_mu);
    for (i = 0; i < me->nstage; i++) {
        kvx__local_staged *e = &me->stage[i];
        kvx__local_op *o;
        if (e->rd->peer != last) { last = e->rd->peer; owner = kvx__local_find((uint64_t)(uintptr_t)last->be); }
        if (!owner || !(o = kvx__local_op_new(me))) {
            e->st = owner ? KVX_ERR_NOMEM : KVX_ERR_PEER;
            me->stage[nfail++] = *e;
            continue;
        }
        o->reader = me;
        o->rd = e->rd;
        o->peer = e->rd->peer;
        o->op = e->op;
        kvx__local_give(owner, o);
    }
    pthread_mutex_unlock(&kvx__local_mu);
    me->nstage = 0;
    for (i = 0; i < nfail; i++)
        kvx__op_done(me->stage[i].rd, me->stage[i].st,
                     me->stage[i].st == KVX_ERR_PEER ? "the owner's context was destroyed" : "local: out of memory");
}

/* A notification is sent once it is queued for the owner. */
KVX__PRIV kvx_status kvx__local_notify(kvx_ctx *ctx, kvx__read *rd) {
    kvx_status st = kvx__local_send(ctx, rd->peer, NULL, NULL, rd->notify_msg);
    if (st == KVX_OK) kvx__notify_sent(rd);
    return st;
}

/* As owner: copy what readers asked for, inside memory registered here. */
KVX__PRIV int kvx__local_serve(kvx_ctx *ctx) {
    kvx__local *l = kvx__local_of(ctx);
    kvx__local_op *o;
    uint8_t notes[16][KVX__NOTIFY_BYTES];
    int n = 0, k, nn;
    do {
        nn = 0;
        pthread_mutex_lock(&kvx__local_mu);
        while ((o = l->todo) != NULL && nn < 16) {
            l->todo = o->next;
            if (!l->todo) l->todo_tail = &l->todo;
            n++;
            if (!o->rd) {  /* a notification: delivered below, outside the registry's mutex */
                memcpy(notes[nn++], o->msg, KVX__NOTIFY_BYTES);
                kvx__local_op_free(o->reader, o);
                continue;
            }
            {
                const kvx__op *op = &o->op;
                uint32_t c, count = op->count ? op->count : 1u;
                uint64_t span = (uint64_t)(count - 1) * (count > 1 ? op->rstride : 0) + op->len;
                if ((count > 1 && op->rstride >= (1ull << 40)) || !kvx__local_owned(l, op->raddr, span)) {
                    KVX__LOG(ctx, KVX_LOG_WARN, "local: refused a read of %u x %llu bytes at 0x%llx: not inside memory this context registered",
                             count, (unsigned long long)op->len, (unsigned long long)op->raddr);
                    kvx__local_finish(o, KVX_ERR_PEER, "the owner refused the range (not inside its registered memory)");
                    continue;
                }
                for (c = 0; c < count; c++)
                    memcpy((void *)(uintptr_t)(op->laddr + c * op->lstride), (const void *)(uintptr_t)(op->raddr + c * op->rstride), (size_t)op->len);
                kvx__local_finish(o, KVX_OK, NULL);
            }
        }
        pthread_mutex_unlock(&kvx__local_mu);
        for (k = 0; k < nn; k++) kvx__notify_arrived(ctx, notes[k], KVX__NOTIFY_BYTES);
    } while (nn == 16);
    return n;
}

/* As reader: report what owners finished. */
KVX__PRIV int kvx__local_reap(kvx_ctx *ctx) {
    kvx__local *l = kvx__local_of(ctx);
    kvx__local_op *list;
    pthread_mutex_lock(&kvx__local_mu);
    list = l->done;
    l->done = NULL;
    pthread_mutex_unlock(&kvx__local_mu);
    return kvx__local_report(l, list);
}

/*--- progress -----------------------------------------------------------------*/

KVX__PRIV int kvx__local_progress(kvx_ctx *ctx) {
    uint64_t v;
    if (read(kvx__local_of(ctx)->efd, &v, sizeof v) < 0) {}  /* drained: EAGAIN when nothing came */
    return kvx__local_serve(ctx) + kvx__local_reap(ctx);
}

KVX__PRIV int kvx__local_event_fd(kvx_ctx *ctx) { return kvx__local_of(ctx)->efd; }

KVX__PRIV kvx_status kvx__local_arm(kvx_ctx *ctx) {
    kvx__local *l = kvx__local_of(ctx);
    int busy;
    pthread_mutex_lock(&kvx__local_mu);
    busy = l->todo || l->done;
    pthread_mutex_unlock(&kvx__local_mu);
    return busy ? KVX_PENDING : KVX_OK;
}

KVX__PRIV void kvx__local_signal(kvx_ctx *ctx) { kvx__local_wake(kvx__local_of(ctx)); }

/* The local backend's table: the entries it implements (kvx__backend). */
KVX__PRIV void kvx__local_fill(kvx__backend *b) {
    b->name = "local";
    b->kind = KVX_BACKEND_LOCAL;
    b->issues_without_progress = 1;
    b->open = kvx__local_open;
    b->close = kvx__local_close;
    b->address = kvx__local_address;
    b->mem_register = kvx__local_mem_register;
    b->mem_deregister = kvx__local_mem_deregister;
    b->connect = kvx__local_connect;
    b->disconnect = kvx__local_disconnect;
    b->post = kvx__local_post;
    b->flush = kvx__local_flush;
    b->abandon = kvx__local_abandon;
    b->notify = kvx__local_notify;
    b->progress = kvx__local_progress;
    b->event_fd = kvx__local_event_fd;
    b->arm = kvx__local_arm;
    b->signal = kvx__local_signal;
}

#endif /* KVX_LOCAL_INCLUDED */
