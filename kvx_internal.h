/* SPDX-License-Identifier: MIT */
/*
    kvx_internal.h -- the contract every room of kvx compiles against: the
    implementation's system headers and overridable macros (allocator,
    assert, KVX__PRIV), limits, the internal types (regions, caches, peers,
    reads, queues, contexts), the backend table (kvx__backend) and the stream
    service, and the core's functions a backend may call (kvx__fail, logging,
    kvx__op_done, ...). kvx.h includes it in its implementation part; every
    internal header includes it first, so each compiles by itself. Do not
    include it yourself.
*/
#ifndef KVX_INTERNAL_INCLUDED
#define KVX_INTERNAL_INCLUDED
#if !defined(_GNU_SOURCE) && !defined(__cplusplus)
#  define _GNU_SOURCE 1
#endif
#include "kvx.h"



#include <errno.h>
#include <ctype.h>
#include <fnmatch.h>
#include <poll.h>
#include <signal.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* All of the allocator or none of it: a partial set would mix allocators. */
#if defined(KVX_MALLOC) && defined(KVX_REALLOC) && defined(KVX_FREE)
#elif !defined(KVX_MALLOC) && !defined(KVX_REALLOC) && !defined(KVX_FREE)
#  define KVX_MALLOC(sz) malloc(sz)
#  define KVX_REALLOC(p, sz) realloc((p), (sz))
#  define KVX_FREE(p) free(p)
#else
#  error "kvx: define all of KVX_MALLOC, KVX_REALLOC and KVX_FREE, or none"
#endif
/* Thread-local storage, for the creation error of each thread. */
#if defined(__cplusplus)
#  define KVX__TLS thread_local
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#  define KVX__TLS _Thread_local
#else
#  define KVX__TLS __thread
#endif
#ifndef KVX_ASSERT
#  include <assert.h>
#  define KVX_ASSERT(c) assert(c)
#endif

#if defined(KVX_STATIC) && defined(__GNUC__)
#  define KVX__PRIV static __attribute__((unused))
#else
#  define KVX__PRIV static
#endif
/* Internal functions some configurations leave unused (the wire formats of
   a backend that is not compiled in). */
#if defined(__GNUC__)
#  define KVX__PRIV_MAYBE static __attribute__((unused))
#else
#  define KVX__PRIV_MAYBE static
#endif

/* The stream service's table names each field (designated initializers).
   C++ has them from C++20 on, in declaration order: before that the table
   is positional, and it lists every field in that order. Backend tables
   are functions instead (kvx__backend_fill), which name only what they
   implement in every language. */
#if defined(__cplusplus) && __cplusplus < 202002L
#  define KVX__F(field)
#else
#  define KVX__F(field) .field =
#endif

#define KVX__DEFAULT_TIMEOUT_MS 30000u
#define KVX__MAX_CACHES 64u
#define KVX__MAX_NAME 64u
#define KVX__MAX_HOST 256u
#define KVX__MAX_ADDR 65536u
#define KVX__MAX_RKEY 4096u
#define KVX__MAX_REGIONS 4096u
#define KVX__MAX_LAYERS 65536u
#define KVX__NOTIFY_RING 4096u
#define KVX__NOTIFY_MSG_BYTES 104u     /* kvx_wire.h: a notification */
#define KVX__EPOCH_AHEAD_NS (600ull * 1000000000ull)  /* metadata this far ahead of the clock is refused */
#define KVX__EXPIRED_MEMORY 1024u
#define KVX__CANCEL_GRACE_MS 1000u
#define KVX__NO_CSUM 0xFFFFFFFFu
#define KVX__LREG_GEN 0xFFFFFFFEu  /* kvx__op.lreg: the queue's fetched-generation words */

/*--- internal types ------------------------------------------------------*/

/* Warnings about refused input: at most one line a second per limiter, the
   next line saying how many were held back (kvx__limit). */
typedef struct kvx__limiter { uint64_t last_ns, quiet; } kvx__limiter;

/* One registered (or, on a peer, remotely registered) memory range. */
typedef struct kvx__region {
    uint64_t addr, len;
    uint8_t *rkey;              /* packed remote key, as the backend writes it */
    uint32_t rkey_len;
    void *be;                   /* backend handle: local memh, or unpacked remote key */
} kvx__region;

/* What both a local cache and a peer's cache are: layout, planes, regions. */
typedef struct kvx__cache_info {
    uint32_t id;
    kvx_layout lay;             /* defaults filled in */
    kvx_mem mem;
    int device;
    uint64_t block_bytes, block_stride;
    uint64_t head_stride, token_stride; /* HND: head to head, NHD: token to token (defaults filled in) */
    uint64_t block_extent;      /* bytes from a block's first byte to past its last */
    uint32_t nplanes;
    uint64_t *plane_base;       /* nplanes */
    uint16_t *plane_region;     /* nplanes */
    uint32_t nregions;
    kvx__region *regions;
    uint32_t csum_region;       /* the checksum table's region (after the data's), or KVX__NO_CSUM */
    uint32_t *csum;             /* local host caches: the table, [layer][plane][block][head] */
    uint32_t gen_region;        /* the generation table's region (the last), or KVX__NO_CSUM */
    volatile uint64_t *gen;     /* local caches: the table, a word per block, in host memory
                                   (with gen_alloc: its host shadow, the table at gen_dev) */
    uint64_t gen_dev;
    uint64_t csum_dev;          /* local GPU caches: the same table in device memory (kvx_cuda.h) */
    /* a peer's cache: how the backend reads it, set at connect */
    uint32_t be_flags;          /* the backend's own */
    int gather;                 /* the backend takes a block's pieces as one op (kvx__op.count) */
} kvx__cache_info;

struct kvx_cache {
    kvx_ctx *ctx;
    kvx__cache_info info;
    uint64_t *seen;             /* one bit per block: duplicate ids in a read (used under ctx->lock) */
};

/* A contiguous transfer: the unit a backend posts. */
typedef struct kvx__op {
    uint64_t laddr, raddr, len;
    uint32_t lreg, rreg;        /* region indices, local cache and remote cache */
    uint32_t count;             /* pieces of len bytes, the next at +lstride here and +rstride there; */
    uint64_t lstride, rstride;  /* more than 1 only from a cache with kvx__cache_info.gather */
} kvx__op;

/* Per-block piece geometry of a read (head-range intersection). */
typedef struct kvx__geom {
    uint64_t loff, roff;        /* first piece's offset inside a block */
    uint64_t piece;             /* bytes per piece */
    uint64_t lpstride, rpstride;/* piece to piece inside a block (NHD: a token) */
    uint32_t npieces;
    int run_merge;              /* 1: a run of consecutive blocks is one contiguous piece */
} kvx__geom;

typedef struct kvx__run { uint32_t l, r, n; } kvx__run;

/* The registered region an op lands in (backends use it for its key). */
#define KVX__OP_LREGION(rd, op) ((op)->lreg == KVX__LREG_GEN ? &(rd)->q->gland_reg : &(rd)->lc->regions[(op)->lreg])

typedef struct kvx__read kvx__read;

struct kvx_peer {
    kvx_ctx *ctx;
    kvx_peer *next;
    char name[KVX__MAX_NAME];
    char host[KVX__MAX_HOST];
    int rank, tp_size;
    uint32_t pid;
    uint64_t epoch;
    uint8_t secret[16];         /* the peer's: what every request and notification to it carries */
    uint8_t *addr;              /* backend address */
    uint32_t addr_len;
    uint32_t ncaches;
    kvx__cache_info *caches;
    char transport[160];
    char why[384];              /* why the transport library chose it, where the backend can tell */
    int connected;
    int failed;                 /* the transport reported the peer dead */
    uint32_t ops_out;           /* transport operations outstanding to this peer */
    void *be;
    uint32_t be_flags;          /* the backend's own, per peer */
};

struct kvx__read {
    kvx_ticket ticket;
    kvx_queue *q;
    kvx_peer *peer;
    const kvx__cache_info *lc, *rc;
    kvx__geom g;
    uint32_t layer_begin, layer_end;
    uint32_t run0, nruns;       /* runs in the queue's ring */
    /* cursor over (plane, run, block-in-run, piece) of ops not yet issued */
    uint32_t c_plane, c_run, c_blk, c_piece;
    uint32_t p_end;             /* the data cursor's end plane: one past plane c_plane's first when planes merge */
    /* verified reads: heads taken, and a second cursor over sampled blocks */
    uint32_t verify, h_a, h_b, h_l0, h_r0;
    int gather;                 /* a block's pieces go as one op (the peer gathers; fixed at post) */
    int whole;                  /* went as one backend operation (post_read): its completion stands for all ops */
    uint32_t v_plane, v_run, v_blk, v_idx;
    /* reads with generations: phase 1 once the data has landed, then a
       cursor over runs; the expected words in the queue's ring */
    int gen, gen_phase;
    uint32_t g_run, g_idx;      /* the fetch's cursor: run, and blocks before it */
    uint32_t g0, ngen;          /* its words in the queue's rings; ngen counts a skipped tail too */
    uint64_t ops_total, ops_issued, ops_done;
    uint32_t ops_out;
    uint64_t bytes, bytes_done;
    uint64_t deadline_ns, t_post_ns;
    kvx_status status;          /* KVX_PENDING until final */
    int issuing_done;           /* cursor exhausted (or stopped by failure) */
    int done, consumed, in_use;
    int notify;
    int notify_inflight;
    uint64_t notify_id, user_tag;
    uint8_t notify_msg[KVX__NOTIFY_MSG_BYTES];
    void *be;                   /* backend per-read scratch */
    char why[224];              /* a failed read's sentence, for kvx_completion.error */
};

struct kvx_queue {
    kvx_ctx *ctx;
    kvx_queue *next;
    uint32_t depth, max_ops, max_runs;
    kvx__read *slots;
    kvx_ticket next_ticket;
    kvx_ticket run_tail;                /* oldest read still holding runs; reads not fully issued are >= it */
    kvx__run *runs;
    uint32_t run_head, run_used;        /* ring of merged runs, released in ticket order */
    /* Block generations: the words each read expects and, beside them, the
       owner's as fetched (registered: a read's own landing place, so reads
       of one block from several owners cannot mix), max_runs of each,
       taken contiguously per read and released with the runs. */
    uint64_t *gens, *gland;
    kvx__region gland_reg;
    uint32_t gen_head, gen_used;
    kvx_ticket *done_fifo;
    uint32_t done_head, done_count;
    uint32_t ops_out;
    pthread_cond_t cond;
    void *cuda_stream;
    void *be;
    void *stream;               /* kvx_cuda.h: completion words of this queue */
};

typedef struct kvx__backend kvx__backend;
/* A lease: readers notifications of id by the deadline. Arrivals wait in
   ranks until the ring has room; the lease ends once every reader's
   arrival, or its expiry, is delivered. */
typedef struct kvx__expect {
    uint64_t id, deadline_ns;
    uint32_t readers, got, delivered;
    int expired;
    int *ranks;                 /* the readers that arrived, in order: rank, tp size */
    kvx_cache *retire;          /* kvx_notify_expect_retire: its blocks, retired at expiry */
    uint32_t *ids, nids;
} kvx__expect;

struct kvx_ctx {
    char policy[256];           /* kvx_ctx_desc.transport_policy as in effect ("" : any) */
    char name[KVX__MAX_NAME];
    char host[KVX__MAX_HOST];
    int rank, tp_size;
    uint64_t epoch;
    uint8_t secret[16];         /* with the epoch: holding it is what entitles a peer to read */
    uint8_t *md_key;            /* the deployment key (kvx_ctx_desc.metadata_key), or NULL */
    uint32_t md_key_len;
    char md_key_from[160];      /* where the key came from, for messages */
    kvx__limiter lim_dropped, lim_late;   /* warnings about refused input, at most one a second */
    uint32_t timeout_ms;
    kvx_log_level log_level;
    kvx_log_fn log_fn;
    void *log_user;
    const kvx__backend *be_ops;
    void *be;
    pthread_mutex_t lock;
    /* kvx_peer_add's thread while its backend connects: its waits let the
       lock go (kvx__wait_poll). One at a time: another kvx_peer_add waits
       on add_done. */
    int adding;
    pthread_t adder;
    pthread_cond_t add_done;
    kvx_cache *caches[KVX__MAX_CACHES];
    uint32_t ncaches;
    kvx_peer *peers;
    kvx_queue *queues;
    char err[512];
    /* A full queue's sentence, written into err only when kvx_ctx_error is
       called: backpressure is the fast path of a busy engine, and formatting
       costs more than the post that found no room (kvx__full). */
    int full_kind;              /* 0: err is current; else which queue resource was full */
    uint32_t full_a, full_b;
    kvx_stats st;
    /* notifications received, waiting for kvx_notifications */
    kvx_notification notes[KVX__NOTIFY_RING];
    uint32_t note_head, note_count;
    uint64_t notes_dropped;
    /* expected notify ids */
    kvx__expect *expect;
    uint32_t nexpect, expect_cap;
    uint64_t expired[KVX__EXPIRED_MEMORY];
    uint32_t expired_head;
    /* progress thread */
    int pt_on, pt_stop;
    uint64_t pt_until;          /* what the progress thread sleeps to, while it sleeps (0: awake) */
    pthread_t pt;
    int wake_pipe[2];
};

/* The backend contract: each backend (kvx_ucx.h, kvx_ofi.h, kvx_cuda.h,
   kvx_local.h) fills one table with designated initializers, and the core
   reaches it only through this table. The core calls it with ctx->lock held
   unless an entry says otherwise; the backend reports back through
   kvx__op_done(), kvx__notify_arrived(), kvx__notify_sent() and
   kvx__peer_failed(). Entries marked optional may be NULL. */
struct kvx__backend {
    const char *name;           /* kvx_backend_name(kind); its define is KVX_ and the name in capitals */
    kvx_backend kind;
    /* The transports of the policy classes (kvx_ctx_desc.transport_policy)
       this backend names in p->transport: "class=pattern" (fnmatch), NULL
       last; "sw" and "nvlink" the core knows. */
    const char *const *policy_classes;
    /* Reads finish on the GPU in stream order (their completion words are
       written by the device): no host flush of network writes is needed. */
    int completes_on_gpu;
    /* One registration of GPU memory may span several device allocations
       (the CUDA backend exports each one it finds). Elsewhere a transport's
       key names one allocation, so GPU planes that merely touch (separate
       allocations can be adjacent) stay separate registrations. */
    int gpu_region_spans_allocations;
    /* A registration's remote key is what peers read it by, so registering
       the memory again (kvx_ctx_rotate) revokes what old metadata held. */
    int keys_per_registration;
    /* A posted op goes on without this context's progress (another thread
       or the device moves it, and its completion wakes the event fd): a
       post wakes a sleeping progress thread only for a deadline earlier
       than it sleeps to. Elsewhere every post wakes it. */
    int issues_without_progress;

    /*-- context */
    kvx_status (*open)(kvx_ctx *ctx, const kvx_ctx_desc *desc);   /* without the lock */
    void (*close)(kvx_ctx *ctx);                                  /* without the lock */
    /* Optional: fill out's backend sub-struct with the settings in effect. */
    void (*query)(const kvx_ctx *ctx, kvx_ctx_desc *out);
    /* The bytes a peer needs to reach this context (published in metadata). */
    kvx_status (*address)(kvx_ctx *ctx, const uint8_t **addr, uint32_t *len);

    /*-- memory */
    kvx_status (*mem_register)(kvx_ctx *ctx, const kvx__cache_info *ci, kvx__region *r);
    void (*mem_deregister)(kvx_ctx *ctx, kvx__region *r);

    /*-- peers */
    /* Make the peer usable: endpoint, remote keys, p->transport. */
    kvx_status (*connect)(kvx_ctx *ctx, kvx_peer *p);
    /* Close by force: when it returns, no operation to p can write any more,
       and every outstanding one has been reported to kvx__op_done. */
    void (*disconnect)(kvx_ctx *ctx, kvx_peer *p);
    /* Optional: can this backend read remote cache rc of p into local cache
       lc? Asked at kvx_post, before anything is issued; NULL: always. */
    kvx_status (*can_read)(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc);

    /*-- queues */
    kvx_status (*queue_open)(kvx_queue *q);   /* optional: per-queue state in q->be */
    void (*queue_close)(kvx_queue *q);        /* optional, without the lock; also after a failed queue_open */

    /*-- reads */
    /* One op. KVX_OK: issued (completion comes through kvx__op_done);
       KVX_PENDING: no room now, try after progress; an error: nothing was
       issued. NULL only where post_read takes every read. */
    kvx_status (*post)(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op);
    /* Optional: the whole read as one operation (its merged runs of block
       ids, q->runs from rd->run0), instead of post per op; same returns.
       Its one completion through kvx__op_done stands for all of the read's
       ops. */
    kvx_status (*post_read)(kvx_ctx *ctx, kvx__read *rd);
    /* Optional: called after kvx__pump issued ops of a queue, so a backend
       that batches (the CUDA copy kernel) can launch the batch. */
    void (*flush)(kvx_ctx *ctx, kvx_queue *q);
    /* Optional: end a read's outstanding ops without closing its peer,
       where the backend can promise none of their bytes lands after (kvx's
       own UCX get: their ids die); each is reported to kvx__op_done. */
    void (*abandon)(kvx_ctx *ctx, kvx__read *rd);
    /* Send rd->notify_msg to rd->peer; completion clears rd->notify_inflight
       through kvx__notify_sent. */
    kvx_status (*notify)(kvx_ctx *ctx, kvx__read *rd);

    /*-- progress */
    int (*progress)(kvx_ctx *ctx);
    int (*event_fd)(kvx_ctx *ctx);
    /* KVX_OK: nothing pending, safe to sleep on event_fd; KVX_PENDING: progress again. */
    kvx_status (*arm)(kvx_ctx *ctx);
    void (*signal)(kvx_ctx *ctx);                 /* optional: wake a sleeper on event_fd */

    /*-- checksums of memory the host cannot read (optional; verify mode on
         such caches is refused without them) */
    kvx_status (*csum_alloc)(kvx_ctx *ctx, kvx__cache_info *ci, uint64_t bytes);
    void (*csum_free)(kvx__cache_info *ci);
    kvx_status (*csum_seal)(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *blocks, uint32_t n);
    kvx_status (*csum_verify)(kvx__read *rd);

    /*-- block generations in memory the transport reads as the cache's kind
       (optional; NULL: a host table that the backend reads with its ops) */
    /* Allocate the table (bytes, zeroed) in the cache's memory: ci->gen_dev. */
    kvx_status (*gen_alloc)(kvx_ctx *ctx, kvx__cache_info *ci, uint64_t bytes);
    void (*gen_free)(kvx__cache_info *ci);
    /* Copy words [first, first + n) of the host shadow ci->gen to the table. */
    kvx_status (*gen_store)(kvx_ctx *ctx, const kvx__cache_info *ci, uint32_t first, uint32_t n);
    /* Once a read's data has landed: the owner's words of its remote blocks,
       read after the data by the backend itself, into the read's words of
       the queue's landing ring (q->gland + rd->g0). */
    kvx_status (*gen_fetch)(kvx__read *rd);
};

/* A backend's table: a function that sets the entries it implements, the
   rest left zero (NULL: not implemented; 0: off). kvx.h lists one per
   enabled backend (kvx__backend_fills), in the order KVX_BACKEND_DEFAULT
   tries them; the core fills the tables once. */
typedef void (*kvx__backend_fill)(kvx__backend *b);

/* Stream-ordered completion: a service beside every backend (kvx_gpu.h,
   with KVX_CUDA). The core tells it when a queue is made or destroyed and
   when a read is posted or becomes final; absent, kvx_stream_wait refuses. */
typedef struct kvx__stream_service {
    kvx_status (*queue_init)(kvx_queue *q);       /* with the lock, after the backend's queue_open */
    void (*queue_fini)(kvx_queue *q);             /* without the lock, after the backend's queue_close */
    void (*read_posted)(kvx__read *rd);           /* re-arm the slot's word before anything can complete */
    void (*read_final)(kvx__read *rd);
    kvx_status (*wait)(kvx_queue *q, kvx_ticket t, void *stream);
    const volatile uint64_t *(*status_ptr)(kvx_queue *q, kvx_ticket t);
} kvx__stream_service;

/* The core's functions a room calls: static, defined in kvx_core.h. A room
   compiled by itself, with no core in its translation unit, sees them
   extern, so its calls are checked without asking for their bodies. */
#if defined(KVX__IMPLEMENTED) || defined(KVX__IN_CORE)
#  define KVX__CORE KVX__PRIV
#else
#  define KVX__CORE extern
#endif
KVX__CORE void kvx__op_done(kvx__read *rd, kvx_status st, const char *why);
KVX__CORE kvx_status kvx__layout_check(kvx_ctx *ctx, kvx_layout *l, int tp_size, const char *who);
KVX__CORE kvx_status kvx__strides_check(kvx_ctx *ctx, kvx__cache_info *c, const char *who);
KVX__CORE kvx_status kvx__planes_locate(kvx_ctx *ctx, kvx__cache_info *c, const char *who);
KVX__CORE void kvx__notify_arrived(kvx_ctx *ctx, const uint8_t *msg, size_t len);
KVX__CORE void kvx__notify_sent(kvx__read *rd);
KVX__CORE void kvx__peer_failed(kvx_peer *p, const char *why);
/* A backend's sleep (poll) inside a wait it makes with the lock held: where
   the wait is kvx_peer_add's for a new peer to answer, the lock is let go
   meanwhile, so one peer that never answers stalls no other read. */
KVX__CORE int kvx__wait_poll(kvx_ctx *ctx, struct pollfd *fds, nfds_t n, int ms);
KVX__PRIV kvx_status kvx__fail(kvx_ctx *ctx, kvx_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
KVX__PRIV void kvx__log(kvx_ctx *ctx, kvx_log_level lvl, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* One branch when the level is off: nothing is formatted. */
#define KVX__LOG(ctx, lvl, ...) do { if ((int)(lvl) <= (int)(ctx)->log_level) kvx__log((ctx), (lvl), __VA_ARGS__); } while (0)
KVX__PRIV void kvx__log_held(kvx_ctx *ctx, uint64_t held, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* A message from the network dropped unanswered: counted, and said at most
   once a second (the line after a quiet spell says how many were held back),
   so that a flood costs a counter, not a log; KVX__WARN_HELD says refused
   input the same way without counting it. Called with ctx->lock held. */
#define KVX__WARN_HELD(ctx, ...) do { uint64_t held_; \
    if ((int)KVX_LOG_WARN <= (int)(ctx)->log_level && kvx__limit(&(ctx)->lim_dropped, kvx__now_ns(), &held_)) \
        kvx__log_held((ctx), held_, __VA_ARGS__); } while (0)
#define KVX__DROP(ctx, ...) do { (ctx)->st.messages_dropped++; KVX__WARN_HELD(ctx, __VA_ARGS__); } while (0)

/*--- small utilities -----------------------------------------------------*/

KVX__PRIV uint64_t kvx__now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* 1: log now, *quiet lines were held back since the last; 0: hold this one back. */
KVX__PRIV int kvx__limit(kvx__limiter *l, uint64_t now_ns, uint64_t *quiet) {
    if (l->last_ns && now_ns - l->last_ns < 1000000000ull) { l->quiet++; return 0; }
    l->last_ns = now_ns ? now_ns : 1;
    *quiet = l->quiet;
    l->quiet = 0;
    return 1;
}

KVX__PRIV void *kvx__calloc(size_t n, size_t sz) {
    void *p;
    if (sz && n > SIZE_MAX / sz) return NULL;
    p = KVX_MALLOC(n * sz > 0 ? n * sz : 1);
    if (p) memset(p, 0, n * sz);
    return p;
}

KVX__PRIV void kvx__strlcpy(char *dst, const char *src, size_t cap) {
    size_t n = src ? strlen(src) : 0;
    if (n >= cap) n = cap - 1;
    if (n) memcpy(dst, src, n);
    dst[n] = 0;
}

/* CRC-32C (Castagnoli), bitwise: metadata blobs are small. */
KVX__PRIV uint32_t kvx__crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    size_t i;
    int k;
    crc = ~crc;
    for (i = 0; i < n; i++) {
        crc ^= p[i];
        for (k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

KVX__PRIV void kvx__log(kvx_ctx *ctx, kvx_log_level lvl, const char *fmt, ...) {
    static const char *names[] = {"", "", "error", "warn", "info", "debug"};
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ctx->log_fn) ctx->log_fn(lvl, msg, ctx->log_user);
    else fprintf(stderr, "kvx[%s/%d] %s: %s\n", ctx->name, ctx->rank, names[lvl], msg);
}

KVX__PRIV void kvx__log_held(kvx_ctx *ctx, uint64_t held, const char *fmt, ...) {
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (held) kvx__log(ctx, KVX_LOG_WARN, "%s (and %llu more like it dropped since the last such line)", msg, (unsigned long long)held);
    else kvx__log(ctx, KVX_LOG_WARN, "%s", msg);
}

KVX__PRIV kvx_status kvx__fail(kvx_ctx *ctx, kvx_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    va_end(ap);
    ctx->full_kind = 0;  /* this sentence replaces a deferred one */
    if (st == KVX_PENDING) return st;  /* backpressure, not an error */
    ctx->st.errors++;
    /* The caller has it (the status, and kvx_ctx_error's sentence): said
       again only where asked for. What nobody is handed is logged where it
       happens, at KVX_LOG_WARN or KVX_LOG_ERROR. */
    KVX__LOG(ctx, KVX_LOG_INFO, "%s: %s", kvx_status_name(st), ctx->err);
    return st;
}

#endif /* KVX_INTERNAL_INCLUDED */
