/* SPDX-License-Identifier: MIT */
/*
    kvx_core.h -- the core: the public calls' implementation (names and
    errors, layouts and tensor-parallel head ranges, metadata, contexts,
    caches, peers, queues and reads, deadlines, notifications, progress).
    It reaches backends only through the kvx__backend table. kvx.h includes
    it in its implementation part, after the rooms and the list of enabled
    backends. Do not include it yourself.
*/
#ifndef KVX_CORE_INCLUDED
#define KVX_CORE_INCLUDED
#define KVX__IN_CORE  /* the core defines what kvx_internal.h declares */
#include "kvx_internal.h"
#include "kvx_auth.h"
#include "kvx_wire.h"
#include "kvx_verify.h"
#if !defined(KVX__IMPLEMENTED)
/* Compiled by itself (tests/compile/matrix.sh): kvx.h's list of backends is
   not there, so none is. */
KVX__PRIV const kvx__backend_fill kvx__backend_fills[] = { NULL };
KVX__PRIV const kvx__stream_service *kvx__stream = NULL;
#endif


/* kvx_ctx_create has no context to hold its error: kvx_ctx_error(NULL) reads
   this thread's. */
static KVX__TLS char kvx__create_err[512];

KVX_API const char *kvx_status_name(kvx_status s) {
    switch (s) {
    case KVX_OK: return "KVX_OK";
    case KVX_PENDING: return "KVX_PENDING";
    case KVX_ERR_ARG: return "KVX_ERR_ARG";
    case KVX_ERR_NOMEM: return "KVX_ERR_NOMEM";
    case KVX_ERR_UNSUPPORTED: return "KVX_ERR_UNSUPPORTED";
    case KVX_ERR_MISMATCH: return "KVX_ERR_MISMATCH";
    case KVX_ERR_BACKEND: return "KVX_ERR_BACKEND";
    case KVX_ERR_PEER: return "KVX_ERR_PEER";
    case KVX_ERR_TIMEOUT: return "KVX_ERR_TIMEOUT";
    case KVX_ERR_CORRUPT: return "KVX_ERR_CORRUPT";
    case KVX_ERR_CANCELED: return "KVX_ERR_CANCELED";
    case KVX_ERR_STALE: return "KVX_ERR_STALE";
    }
    return "KVX_ERR_UNKNOWN";
}

KVX_API const char *kvx_backend_name(kvx_backend b) {
    switch (b) {
    case KVX_BACKEND_DEFAULT: return "default";
    case KVX_BACKEND_UCX: return "ucx";
    case KVX_BACKEND_OFI: return "ofi";
    case KVX_BACKEND_CUDA: return "cuda";
    case KVX_BACKEND_LOCAL: return "local";
    }
    return "unknown";
}

/* The enabled backends' tables, filled once from kvx.h's list. */
static kvx__backend kvx__backend_tabs[8];
static pthread_once_t kvx__backend_once = PTHREAD_ONCE_INIT;

static void kvx__backends_fill(void) {
    size_t i;
    for (i = 0; kvx__backend_fills[i] && i < sizeof kvx__backend_tabs / sizeof kvx__backend_tabs[0]; i++) kvx__backend_fills[i](&kvx__backend_tabs[i]);
}

/* The table of backend b; KVX_BACKEND_DEFAULT: the first but local. NULL
   where it is not compiled in. */
KVX__PRIV const kvx__backend *kvx__backend_find(kvx_backend b) {
    size_t i;
    pthread_once(&kvx__backend_once, kvx__backends_fill);
    for (i = 0; i < sizeof kvx__backend_tabs / sizeof kvx__backend_tabs[0] && kvx__backend_tabs[i].name; i++)
        if (b == KVX_BACKEND_DEFAULT ? kvx__backend_tabs[i].kind != KVX_BACKEND_LOCAL : kvx__backend_tabs[i].kind == b) return &kvx__backend_tabs[i];
    return NULL;
}

/* The define that compiles backend b in: KVX_ and its name in capitals. */
KVX__PRIV void kvx__backend_define(kvx_backend b, char *out, size_t cap) {
    size_t i;
    snprintf(out, cap, "KVX_%s", kvx_backend_name(b));
    for (i = 4; out[i]; i++) out[i] = (char)toupper((unsigned char)out[i]);
}

KVX__PRIV uint32_t kvx__dtype_bytes(kvx_dtype d) {
    switch (d) {
    case KVX_DTYPE_F16: case KVX_DTYPE_BF16: case KVX_DTYPE_U16: return 2;
    case KVX_DTYPE_F32: return 4;
    case KVX_DTYPE_F8_E4M3: case KVX_DTYPE_F8_E5M2: case KVX_DTYPE_I8: case KVX_DTYPE_U8: return 1;
    case KVX_DTYPE_F64: return 8;
    case KVX_DTYPE_UNSPECIFIED: return 0;
    }
    return 0;
}

KVX_API const char *kvx_dtype_name(kvx_dtype d) {
    switch (d) {
    case KVX_DTYPE_UNSPECIFIED: return "unspecified";
    case KVX_DTYPE_F16: return "f16";
    case KVX_DTYPE_BF16: return "bf16";
    case KVX_DTYPE_F32: return "f32";
    case KVX_DTYPE_F8_E4M3: return "f8e4m3";
    case KVX_DTYPE_F8_E5M2: return "f8e5m2";
    case KVX_DTYPE_I8: return "i8";
    case KVX_DTYPE_U8: return "u8";
    case KVX_DTYPE_F64: return "f64";
    case KVX_DTYPE_U16: return "u16";
    }
    return "unknown";
}

/* A post found the queue full: the status says it; the sentence waits
   until kvx_ctx_error asks (a later failure's sentence replaces it). */
enum { KVX__FULL_SLOTS = 1, KVX__FULL_RUNS, KVX__FULL_GENS };
KVX__PRIV kvx_status kvx__full(kvx_ctx *ctx, int kind, uint32_t a, uint32_t b) {
    ctx->full_a = a;
    ctx->full_b = b;
    __atomic_store_n(&ctx->full_kind, kind, __ATOMIC_RELEASE);  /* kvx_ctx_error looks at it without the lock */
    return KVX_PENDING;
}

KVX_API const char *kvx_ctx_error(const kvx_ctx *ctx) {
    kvx_ctx *c = (kvx_ctx *)(uintptr_t)ctx;  /* the deferred sentence is written once, on the first ask */
    if (!ctx) return kvx__create_err;
    if (!__atomic_load_n(&c->full_kind, __ATOMIC_ACQUIRE)) return c->err;
    /* Under the lock, as every other writer of err: the progress thread
       may be failing something of its own meanwhile. */
    pthread_mutex_lock(&c->lock);
    switch (c->full_kind) {
    case KVX__FULL_SLOTS:
        snprintf(c->err, sizeof c->err, "kvx_post: queue full: %u reads not yet reported (kvx_poll, kvx_test or kvx_wait them)", c->full_a);
        break;
    case KVX__FULL_RUNS:
        snprintf(c->err, sizeof c->err, "kvx_post: queue full: %u of %u run slots held by reads in flight", c->full_a, c->full_b);
        break;
    case KVX__FULL_GENS:
        snprintf(c->err, sizeof c->err, "kvx_post: queue full: %u of %u generation slots held by reads in flight", c->full_a, c->full_b);
        break;
    default:
        break;
    }
    c->full_kind = 0;
    pthread_mutex_unlock(&c->lock);
    return c->err;
}

/* The table of kvx_abi_fields: each struct's size, then its fields in
   declaration order. */
#define KVX__ABI_SIZE_OF(name, sz) { name, NULL, 0, sz }
#define KVX__ABI_SIZE(T) KVX__ABI_SIZE_OF(#T, sizeof(T))
#define KVX__ABI(T, f) { #T, #f, offsetof(T, f), sizeof(((T *)0)->f) }

static const kvx_abi_field kvx__abi_table[] = {
    KVX__ABI_SIZE(kvx_ofi_desc),
    KVX__ABI(kvx_ofi_desc, provider), KVX__ABI(kvx_ofi_desc, extra_caps), KVX__ABI(kvx_ofi_desc, hmem),
    KVX__ABI(kvx_ofi_desc, max_msg), KVX__ABI(kvx_ofi_desc, tick_us),
    KVX__ABI_SIZE(kvx_ucx_desc),
    KVX__ABI(kvx_ucx_desc, net_devices), KVX__ABI(kvx_ucx_desc, software_rma), KVX__ABI(kvx_ucx_desc, connections),
    KVX__ABI_SIZE(kvx_cuda_desc),
    KVX__ABI(kvx_cuda_desc, max_blocks), KVX__ABI(kvx_cuda_desc, socket_dir),
    KVX__ABI_SIZE(kvx_ctx_desc),
    KVX__ABI(kvx_ctx_desc, name), KVX__ABI(kvx_ctx_desc, tp_rank), KVX__ABI(kvx_ctx_desc, tp_size),
    KVX__ABI(kvx_ctx_desc, backend), KVX__ABI(kvx_ctx_desc, timeout_ms), KVX__ABI(kvx_ctx_desc, progress_thread),
    KVX__ABI(kvx_ctx_desc, host_id), KVX__ABI(kvx_ctx_desc, log_level), KVX__ABI(kvx_ctx_desc, log_fn),
    KVX__ABI(kvx_ctx_desc, log_user), KVX__ABI(kvx_ctx_desc, ofi), KVX__ABI(kvx_ctx_desc, cuda),
    KVX__ABI(kvx_ctx_desc, transport_policy), KVX__ABI(kvx_ctx_desc, ucx), KVX__ABI(kvx_ctx_desc, metadata_key),
    KVX__ABI(kvx_ctx_desc, metadata_key_len),
    KVX__ABI_SIZE(kvx_layout),
    KVX__ABI(kvx_layout, num_layers), KVX__ABI(kvx_layout, num_blocks), KVX__ABI(kvx_layout, block_tokens),
    KVX__ABI(kvx_layout, num_heads), KVX__ABI(kvx_layout, head_dim), KVX__ABI(kvx_layout, elem_bytes),
    KVX__ABI(kvx_layout, order), KVX__ABI(kvx_layout, total_heads), KVX__ABI(kvx_layout, kv_planes),
    KVX__ABI(kvx_layout, dtype),
    KVX__ABI_SIZE(kvx_cache_desc),
    KVX__ABI(kvx_cache_desc, layout), KVX__ABI(kvx_cache_desc, mem), KVX__ABI(kvx_cache_desc, device),
    KVX__ABI(kvx_cache_desc, bases), KVX__ABI(kvx_cache_desc, pool), KVX__ABI(kvx_cache_desc, layer_stride),
    KVX__ABI(kvx_cache_desc, plane_stride), KVX__ABI(kvx_cache_desc, block_stride),
    KVX__ABI(kvx_cache_desc, head_stride), KVX__ABI(kvx_cache_desc, token_stride),
    KVX__ABI(kvx_cache_desc, checksums), KVX__ABI(kvx_cache_desc, generations),
    KVX__ABI_SIZE(kvx_queue_desc),
    KVX__ABI(kvx_queue_desc, depth), KVX__ABI(kvx_queue_desc, max_ops), KVX__ABI(kvx_queue_desc, max_runs),
    KVX__ABI(kvx_queue_desc, cuda),
    /* the unnamed struct of kvx_queue_desc.cuda: offsets within it */
    KVX__ABI_SIZE_OF("kvx_queue_desc.cuda", sizeof(((kvx_queue_desc *)0)->cuda)),
    { "kvx_queue_desc.cuda", "stream", offsetof(kvx_queue_desc, cuda.stream) - offsetof(kvx_queue_desc, cuda),
      sizeof(((kvx_queue_desc *)0)->cuda.stream) },
    KVX__ABI_SIZE(kvx_read),
    KVX__ABI(kvx_read, peer), KVX__ABI(kvx_read, cache), KVX__ABI(kvx_read, remote_cache),
    KVX__ABI(kvx_read, local_blocks), KVX__ABI(kvx_read, remote_blocks), KVX__ABI(kvx_read, num_blocks),
    KVX__ABI(kvx_read, layer_begin), KVX__ABI(kvx_read, layer_count), KVX__ABI(kvx_read, notify),
    KVX__ABI(kvx_read, notify_id), KVX__ABI(kvx_read, user_tag), KVX__ABI(kvx_read, timeout_ms),
    KVX__ABI(kvx_read, verify), KVX__ABI(kvx_read, remote_generations),
    KVX__ABI_SIZE(kvx_completion),
    KVX__ABI(kvx_completion, ticket), KVX__ABI(kvx_completion, user_tag), KVX__ABI(kvx_completion, status),
    KVX__ABI(kvx_completion, bytes), KVX__ABI(kvx_completion, error),
    KVX__ABI_SIZE(kvx_notification),
    KVX__ABI(kvx_notification, id), KVX__ABI(kvx_notification, status), KVX__ABI(kvx_notification, peer_rank),
    KVX__ABI(kvx_notification, peer_tp_size),
    KVX__ABI_SIZE(kvx_stats),
    KVX__ABI(kvx_stats, backend), KVX__ABI(kvx_stats, bytes_read), KVX__ABI(kvx_stats, reads_posted),
    KVX__ABI(kvx_stats, reads_completed), KVX__ABI(kvx_stats, reads_failed), KVX__ABI(kvx_stats, descs_posted),
    KVX__ABI(kvx_stats, descs_completed), KVX__ABI(kvx_stats, blocks_posted),
    KVX__ABI(kvx_stats, notifications_sent), KVX__ABI(kvx_stats, notifications_received),
    KVX__ABI(kvx_stats, errors), KVX__ABI(kvx_stats, messages_dropped),
    KVX__ABI(kvx_stats, notifications_dropped),
    KVX__ABI_SIZE(kvx_abi_field),
    KVX__ABI(kvx_abi_field, type), KVX__ABI(kvx_abi_field, field), KVX__ABI(kvx_abi_field, offset),
    KVX__ABI(kvx_abi_field, size),
};

KVX_API const kvx_abi_field *kvx_abi_fields(uint32_t *count) {
    if (count) *count = (uint32_t)(sizeof kvx__abi_table / sizeof kvx__abi_table[0]);
    return kvx__abi_table;
}

/*--- layouts and tensor-parallel head ranges -----------------------------*/

KVX__PRIV uint32_t kvx__planes(const kvx_layout *l) { return l->kv_planes ? l->kv_planes : 2u; }

/* Fill defaults and check that the layout is usable at this tp rank/size. */
KVX__PRIV kvx_status kvx__layout_check(kvx_ctx *ctx, kvx_layout *l, int tp_size, const char *who) {
    uint64_t bb;
    if (!l->num_layers || !l->num_blocks || !l->block_tokens || !l->num_heads || !l->head_dim || !l->elem_bytes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: layout needs num_layers, num_blocks, block_tokens, num_heads, head_dim and elem_bytes, all non-zero (got %u, %u, %u, %u, %u, %u)",
                         who, l->num_layers, l->num_blocks, l->block_tokens, l->num_heads, l->head_dim, l->elem_bytes);
    if (l->num_layers > KVX__MAX_LAYERS)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u layers, at most %u", who, l->num_layers, KVX__MAX_LAYERS);
    if (l->order != KVX_ORDER_HND && l->order != KVX_ORDER_NHD)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: order %d is neither HND nor NHD", who, (int)l->order);
    if (l->kv_planes > 2) return kvx__fail(ctx, KVX_ERR_ARG, "%s: kv_planes %u, must be 1 or 2", who, l->kv_planes);
    if (l->dtype != KVX_DTYPE_UNSPECIFIED && kvx__dtype_bytes(l->dtype) != l->elem_bytes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: dtype %s (%d) is %u bytes, elem_bytes says %u", who, kvx_dtype_name(l->dtype), (int)l->dtype,
                         kvx__dtype_bytes(l->dtype), l->elem_bytes);
    l->kv_planes = kvx__planes(l);
    if (!l->total_heads) l->total_heads = l->num_heads * (uint32_t)tp_size;
    if (l->total_heads >= (uint32_t)tp_size) {
        if (l->total_heads % (uint32_t)tp_size || l->num_heads != l->total_heads / (uint32_t)tp_size)
            return kvx__fail(ctx, KVX_ERR_MISMATCH, "%s: %u KV heads do not divide over tp_size %d into %u heads per rank",
                             who, l->total_heads, tp_size, l->num_heads);
    } else if ((uint32_t)tp_size % l->total_heads || l->num_heads != 1) {
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "%s: %u KV heads replicated over tp_size %d need tp_size a multiple of the heads and num_heads 1 (got %u)",
                         who, l->total_heads, tp_size, l->num_heads);
    }
    bb = (uint64_t)l->block_tokens * l->num_heads * l->head_dim * l->elem_bytes;
    if (bb > (1ull << 40)) return kvx__fail(ctx, KVX_ERR_ARG, "%s: block of %llu bytes is too large", who, (unsigned long long)bb);
    return KVX_OK;
}

/* The strides inside a block (0: from the order), and the bytes a block
   spans. Heads (HND) or tokens (NHD) may be spaced, but never overlap; and
   blocks either do not overlap, or (HND) nest between a head's and the
   next's, as in a [layer][head][block][token][dim] pool. */
KVX__PRIV kvx_status kvx__strides_check(kvx_ctx *ctx, kvx__cache_info *c, const char *who) {
    const kvx_layout *l = &c->lay;
    uint64_t hb = (uint64_t)l->head_dim * l->elem_bytes, run, n;
    int hnd = l->order == KVX_ORDER_HND;
    c->block_bytes = (uint64_t)l->block_tokens * l->num_heads * hb;
    if (!c->block_stride) c->block_stride = c->block_bytes;
    if (!c->head_stride) c->head_stride = hnd ? hb * l->block_tokens : hb;
    if (!c->token_stride) c->token_stride = hnd ? hb : hb * l->num_heads;
    if (hnd ? c->token_stride != hb : c->head_stride != hb)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %s with a %s stride of %llu bytes, not the %llu of one %s: kvx reads %s", who,
                         hnd ? "HND" : "NHD", hnd ? "token" : "head", (unsigned long long)(hnd ? c->token_stride : c->head_stride),
                         (unsigned long long)hb, hnd ? "token's head_dim" : "head's head_dim",
                         hnd ? "a head's tokens packed" : "a token's heads packed");
    run = hnd ? hb * l->block_tokens : hb * l->num_heads;   /* a head's tokens, or a token's heads */
    n = hnd ? l->num_heads : l->block_tokens;               /* how many such runs in a block */
    if ((hnd ? c->head_stride : c->token_stride) < run)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: a %s stride of %llu bytes overlaps the %llu bytes of each %s", who, hnd ? "head" : "token",
                         (unsigned long long)(hnd ? c->head_stride : c->token_stride), (unsigned long long)run, hnd ? "head" : "token");
    c->block_extent = kvx__mul_sat(n - 1, hnd ? c->head_stride : c->token_stride) + run;
    if (c->block_extent < run) c->block_extent = UINT64_MAX;
    if (c->block_stride >= c->block_extent) return KVX_OK;
    if (hnd && l->num_heads > 1 && c->block_stride >= run && c->head_stride >= kvx__mul_sat(l->num_blocks, c->block_stride))
        return KVX_OK;  /* blocks between a head and the next: [head][block][token][dim] */
    return kvx__fail(ctx, KVX_ERR_ARG, "%s: block_stride %llu is less than the %llu bytes a block spans (%s stride %llu): blocks would overlap",
                     who, (unsigned long long)c->block_stride, (unsigned long long)c->block_extent, hnd ? "head" : "token",
                     (unsigned long long)(hnd ? c->head_stride : c->token_stride));
}

/* First global head held by rank; heads are replicated when fewer than tp. */
KVX__PRIV uint32_t kvx__head_first(const kvx_layout *l, int rank, int tp) {
    if (l->total_heads >= (uint32_t)tp) return (uint32_t)rank * (l->total_heads / (uint32_t)tp);
    return (uint32_t)rank / ((uint32_t)tp / l->total_heads);
}

/* Heads [*a, *b) that local rank lr (of ltp) takes from remote rank rr (of
   rtp). Where the remote side replicates a head, exactly one of its holders is
   the source for a given reader: holder (lr mod replicas), spreading readers. */
KVX__PRIV void kvx__head_range(const kvx_layout *ll, int lr, int ltp, const kvx_layout *rl, int rr, int rtp,
                               uint32_t *a, uint32_t *b) {
    uint32_t l0 = kvx__head_first(ll, lr, ltp), l1 = l0 + ll->num_heads;
    uint32_t r0 = kvx__head_first(rl, rr, rtp), r1 = r0 + rl->num_heads;
    uint32_t lo = l0 > r0 ? l0 : r0, hi = l1 < r1 ? l1 : r1;
    if (lo >= hi) { *a = *b = 0; return; }
    if (rl->total_heads < (uint32_t)rtp) {
        uint32_t reps = (uint32_t)rtp / rl->total_heads;
        if ((uint32_t)rr != r0 * reps + (uint32_t)lr % reps) { *a = *b = 0; return; }
    }
    *a = lo; *b = hi;
}

/* A block of one head with its tokens packed is the same bytes in either
   order (vLLM gives such a rank's view either name): it reads from, and
   is read into, a cache of the other order. */
KVX__PRIV int kvx__order_free(const kvx__cache_info *c) {
    return c->lay.num_heads == 1 && c->token_stride == (uint64_t)c->lay.head_dim * c->lay.elem_bytes;
}

/* Piece geometry of one block for heads [a, b): HND gives one contiguous
   slice per block; NHD one slice per token, unless all heads are taken on both
   sides, when the slices tile the block and collapse into one. Where one
   side is order-free, the other side's order sets the pieces. */
KVX__PRIV void kvx__geom_make(const kvx__cache_info *lc, uint32_t l0, const kvx__cache_info *rc, uint32_t r0,
                              uint32_t a, uint32_t b, kvx__geom *g) {
    const kvx_layout *ll = &lc->lay;
    uint64_t hb = (uint64_t)ll->head_dim * ll->elem_bytes;  /* one head, one token */
    uint64_t T = ll->block_tokens;
    kvx_order order = ll->order != rc->lay.order && kvx__order_free(lc) ? rc->lay.order : ll->order;
    memset(g, 0, sizeof *g);
    if (order == KVX_ORDER_HND) {  /* a piece per head (its tokens packed), heads head_stride apart */
        g->loff = (uint64_t)(a - l0) * lc->head_stride;
        g->roff = (uint64_t)(a - r0) * rc->head_stride;
        g->piece = T * hb;
        g->lpstride = lc->head_stride;
        g->rpstride = rc->head_stride;
        g->npieces = b - a;
    } else {                           /* a piece per token (its heads a to b), tokens token_stride apart */
        g->loff = (uint64_t)(a - l0) * hb;
        g->roff = (uint64_t)(a - r0) * hb;
        g->piece = (uint64_t)(b - a) * hb;
        g->lpstride = lc->token_stride;
        g->rpstride = rc->token_stride;
        g->npieces = (uint32_t)T;
    }
    if (g->npieces > 1 && g->piece == g->lpstride && g->piece == g->rpstride) {  /* the pieces tile: one */
        g->piece *= g->npieces;
        g->npieces = 1;
        g->lpstride = g->rpstride = 0;
    }
    if (g->npieces == 1) g->lpstride = g->rpstride = 0;
    g->run_merge = g->npieces == 1 && g->piece == lc->block_stride && g->piece == rc->block_stride;
}

/*--- metadata: its format is in kvx_wire.h -------------------------------*/

KVX__PRIV void kvx__cache_info_free(kvx_ctx *ctx, kvx__cache_info *c) {
    uint32_t i;
    if (c->regions)
        for (i = 0; i < c->nregions; i++) KVX_FREE(c->regions[i].rkey);
    KVX_FREE(c->regions);
    KVX_FREE(c->plane_base);
    KVX_FREE(c->plane_region);
    KVX_FREE(c->csum);
    KVX_FREE((void *)(uintptr_t)c->gen);
    if (c->csum_dev) ctx->be_ops->csum_free(c);
    if (c->gen_dev) ctx->be_ops->gen_free(c);
    memset(c, 0, sizeof *c);
}

/* Each plane must lie inside one region; remember which. */
KVX__PRIV kvx_status kvx__planes_locate(kvx_ctx *ctx, kvx__cache_info *c, const char *who) {
    uint64_t span = kvx__mul_sat(c->lay.num_blocks - 1, c->block_stride) + c->block_extent;
    uint32_t p, i;
    for (p = 0; p < c->nplanes; p++) {
        uint64_t b = c->plane_base[p];
        for (i = 0; i < c->nregions; i++)
            if (b >= c->regions[i].addr && b - c->regions[i].addr <= c->regions[i].len &&
                span <= c->regions[i].len - (b - c->regions[i].addr)) break;
        if (i == c->nregions)
            return kvx__fail(ctx, KVX_ERR_MISMATCH, "%s: plane %u (layer %u) at 0x%llx, %llu bytes, lies in no registered region",
                             who, p, p / c->lay.kv_planes, (unsigned long long)b, (unsigned long long)span);
        c->plane_region[p] = (uint16_t)i;
    }
    return KVX_OK;
}

KVX_API kvx_status kvx_metadata(kvx_ctx *ctx, void *buf, size_t *len) {
    kvx__wbuf w;
    kvx_status st;
    if (!ctx || !len) return KVX_ERR_ARG;
    memset(&w, 0, sizeof w);
    w.p = (uint8_t *)buf;
    w.cap = buf ? *len : 0;
    pthread_mutex_lock(&ctx->lock);
    st = kvx__md_write(ctx, &w);
    pthread_mutex_unlock(&ctx->lock);
    if (st != KVX_OK) return st;
    if (buf && w.len > *len) {
        size_t need = w.len;
        *len = need;
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata needs %zu bytes, buffer has %zu", need, w.cap);
    }
    *len = w.len;
    return KVX_OK;
}

/* Can a read of rc (theirs) into lc (ours) be done? Names field and both values. */
KVX__PRIV kvx_status kvx__compat(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc) {
    const kvx_layout *a = &lc->lay, *b = &rc->lay;
#define KVX__SAME(f) \
    if (a->f != b->f) \
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "peer %s/%d cache %u: " #f " %u, ours (cache %u) %u", p->name, p->rank, rc->id, (unsigned)b->f, lc->id, (unsigned)a->f)
    KVX__SAME(num_layers);
    KVX__SAME(block_tokens);
    KVX__SAME(head_dim);
    KVX__SAME(elem_bytes);
    KVX__SAME(total_heads);
    KVX__SAME(kv_planes);
#undef KVX__SAME
    if (a->dtype && b->dtype && a->dtype != b->dtype)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "peer %s/%d cache %u: dtype %s, ours (cache %u) %s: the bytes would read as another type",
                         p->name, p->rank, rc->id, kvx_dtype_name(b->dtype), lc->id, kvx_dtype_name(a->dtype));
    if (a->order != b->order && !kvx__order_free(lc) && !kvx__order_free(rc))
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "peer %s/%d cache %u: order %s, ours (cache %u) %s", p->name, p->rank, rc->id,
                         b->order == KVX_ORDER_HND ? "HND" : "NHD", lc->id, a->order == KVX_ORDER_HND ? "HND" : "NHD");
    return KVX_OK;
}

/*--- context -------------------------------------------------------------*/


KVX__PRIV void kvx__host_identity(char *out, size_t cap, const char *given) {
    char host[128] = "unknown", boot[64] = "noboot";
    const char *env = getenv("KVX_HOST_ID");
    FILE *f;
    if (given && *given) { kvx__strlcpy(out, given, cap); return; }
    if (env && *env) { kvx__strlcpy(out, env, cap); return; }
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = 0;
    if ((f = fopen("/proc/sys/kernel/random/boot_id", "r")) != NULL) {
        if (fgets(boot, sizeof boot, f)) boot[strcspn(boot, "\r\n")] = 0;
        fclose(f);
    }
    snprintf(out, cap, "%s/%s", host, boot);
}

/* $KVX_LOG: off (or none, 0), error, warn, info, debug; unset or unknown: warn. */
KVX__PRIV kvx_log_level kvx__env_log_level(void) {
    const char *e = getenv("KVX_LOG");
    if (!e || !*e) return KVX_LOG_WARN;  /* errors, and warnings: a fallback is never silent */
    if (!strcmp(e, "off") || !strcmp(e, "none") || !strcmp(e, "0")) return KVX_LOG_OFF;
    if (!strcmp(e, "error")) return KVX_LOG_ERROR;
    if (!strcmp(e, "warn") || !strcmp(e, "warning")) return KVX_LOG_WARN;
    if (!strcmp(e, "info")) return KVX_LOG_INFO;
    if (!strcmp(e, "debug")) return KVX_LOG_DEBUG;
    return KVX_LOG_WARN;
}

/* Epochs grow across restarts (wall clock) and within a process. */
KVX__PRIV uint64_t kvx__new_epoch(void) {
    static uint64_t last;
    static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    struct timespec ts;
    uint64_t e;
    clock_gettime(CLOCK_REALTIME, &ts);
    e = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    pthread_mutex_lock(&m);
    if (e <= last) e = last + 1;
    last = e;
    pthread_mutex_unlock(&m);
    return e;
}

/* The deployment key: the desc's bytes, else the file $KVX_METADATA_KEY_FILE
   names (its trailing newline left out), else none. */
KVX__PRIV kvx_status kvx__md_key_load(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    const char *path = getenv("KVX_METADATA_KEY_FILE");
    uint8_t buf[1025];
    size_t n = 0;
    if (desc->metadata_key) {
        if (desc->metadata_key_len < 16)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_ctx_desc.metadata_key: %u bytes, at least 16 are needed", desc->metadata_key_len);
        n = desc->metadata_key_len;
        snprintf(ctx->md_key_from, sizeof ctx->md_key_from, "kvx_ctx_desc.metadata_key, %zu bytes", n);
    } else if (path && *path) {
        FILE *f = fopen(path, "rb");
        if (!f) return kvx__fail(ctx, KVX_ERR_ARG, "KVX_METADATA_KEY_FILE=%s: %s", path, strerror(errno));
        n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
        if (n < 16 || n > 1024)
            return kvx__fail(ctx, KVX_ERR_ARG, "KVX_METADATA_KEY_FILE=%s: %zu bytes of key, 16 to 1024 are needed", path, n);
        snprintf(ctx->md_key_from, sizeof ctx->md_key_from, "the file %.100s, %zu bytes", path, n);
    } else {
        return KVX_OK;
    }
    if (!(ctx->md_key = (uint8_t *)KVX_MALLOC(n))) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_ctx_create: out of memory");
    memcpy(ctx->md_key, desc->metadata_key ? (const uint8_t *)desc->metadata_key : buf, n);
    ctx->md_key_len = (uint32_t)n;
    memset(buf, 0, sizeof buf);
    return KVX_OK;
}

KVX__PRIV void *kvx__progress_main(void *arg);
KVX__PRIV void kvx__queue_teardown(kvx_queue *q);
KVX__PRIV void kvx__peer_free(kvx_peer *p);

KVX_API kvx_status kvx_ctx_create(const kvx_ctx_desc *desc_in, kvx_ctx **out) {
    kvx_ctx_desc desc;
    kvx_ctx *ctx;
    kvx_status st;
    if (!out) { kvx__strlcpy(kvx__create_err, "kvx_ctx_create: out is NULL", sizeof kvx__create_err); return KVX_ERR_ARG; }
    *out = NULL;
    memset(&desc, 0, sizeof desc);
    if (desc_in) desc = *desc_in;
    ctx = (kvx_ctx *)kvx__calloc(1, sizeof *ctx);
    if (!ctx) { kvx__strlcpy(kvx__create_err, "kvx_ctx_create: out of memory", sizeof kvx__create_err); return KVX_ERR_NOMEM; }
    ctx->wake_pipe[0] = ctx->wake_pipe[1] = -1;
    kvx__strlcpy(ctx->name, desc.name && *desc.name ? desc.name : "kvx", sizeof ctx->name);
    ctx->rank = desc.tp_rank;
    ctx->tp_size = desc.tp_size ? desc.tp_size : 1;
    ctx->timeout_ms = desc.timeout_ms ? desc.timeout_ms : KVX__DEFAULT_TIMEOUT_MS;
    ctx->log_level = desc.log_level != KVX_LOG_DEFAULT ? desc.log_level : kvx__env_log_level();
    ctx->log_fn = desc.log_fn;
    ctx->log_user = desc.log_user;
    ctx->epoch = kvx__new_epoch();
    kvx__host_identity(ctx->host, sizeof ctx->host, desc.host_id);
    kvx__strlcpy(ctx->policy, desc.transport_policy ? desc.transport_policy
                              : getenv("KVX_TRANSPORT_POLICY") ? getenv("KVX_TRANSPORT_POLICY") : "", sizeof ctx->policy);
    pthread_mutex_init(&ctx->lock, NULL);
    pthread_cond_init(&ctx->add_done, NULL);
    st = KVX_OK;
    if (kvx__random(ctx->secret, sizeof ctx->secret) != 0)
        st = kvx__fail(ctx, KVX_ERR_BACKEND, "kvx_ctx_create: no random bytes from the kernel (getrandom, /dev/urandom): %s", strerror(errno));
    else if ((st = kvx__md_key_load(ctx, &desc)) != KVX_OK) {}
    else if (ctx->tp_size < 1 || ctx->tp_size > 65536)
        st = kvx__fail(ctx, KVX_ERR_ARG, "tp_size %d must be in [1, 65536]", ctx->tp_size);
    else if (ctx->rank < 0 || ctx->rank >= ctx->tp_size)
        st = kvx__fail(ctx, KVX_ERR_ARG, "tp_rank %d is outside [0, tp_size %d)", ctx->rank, ctx->tp_size);
    if (st == KVX_OK && !(ctx->be_ops = kvx__backend_find(desc.backend))) {
        char def[32] = "KVX_UCX, KVX_OFI or KVX_CUDA";
        if (desc.backend != KVX_BACKEND_DEFAULT && strcmp(kvx_backend_name(desc.backend), "unknown")) kvx__backend_define(desc.backend, def, sizeof def);
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "backend %d (%s) is not compiled in: define %s when compiling KVX_IMPLEMENTATION",
                       (int)desc.backend, kvx_backend_name(desc.backend), def);
    }
    if (st == KVX_OK) {
        ctx->st.backend = ctx->be_ops->name;
        st = ctx->be_ops->open(ctx, &desc);
        if (st != KVX_OK) ctx->be_ops = NULL;
    }
    if (st == KVX_OK && desc.progress_thread) {
        if (pipe(ctx->wake_pipe) != 0) st = kvx__fail(ctx, KVX_ERR_BACKEND, "pipe: %s", strerror(errno));
        else if (pthread_create(&ctx->pt, NULL, kvx__progress_main, ctx) != 0)
            st = kvx__fail(ctx, KVX_ERR_BACKEND, "cannot start the progress thread");
        else ctx->pt_on = 1;
    }
    if (st != KVX_OK) {
        kvx__strlcpy(kvx__create_err, ctx->err, sizeof kvx__create_err);
        kvx_ctx_destroy(ctx);
        return st;
    }
    KVX__LOG(ctx, KVX_LOG_INFO, "context %s rank %d of %d on %s, backend %s, timeout %u ms%s", ctx->name, ctx->rank,
             ctx->tp_size, ctx->host, ctx->be_ops->name, ctx->timeout_ms, ctx->pt_on ? ", progress thread" : "");
    *out = ctx;
    return KVX_OK;
}

KVX_API kvx_ctx_desc kvx_ctx_query_desc(const kvx_ctx *ctx) {
    kvx_ctx_desc d;
    memset(&d, 0, sizeof d);
    if (!ctx) return d;
    d.name = ctx->name;
    d.tp_rank = ctx->rank;
    d.tp_size = ctx->tp_size;
    d.backend = ctx->be_ops->kind;
    d.timeout_ms = ctx->timeout_ms;
    d.progress_thread = ctx->pt_on;
    d.host_id = ctx->host;
    d.transport_policy = ctx->policy;
    d.log_level = ctx->log_level;
    d.log_fn = ctx->log_fn;
    d.log_user = ctx->log_user;
    d.metadata_key = ctx->md_key;
    d.metadata_key_len = ctx->md_key_len;
    if (ctx->be_ops->query) ctx->be_ops->query(ctx, &d);
    return d;
}

KVX_API void kvx_ctx_destroy(kvx_ctx *ctx) {
    if (!ctx) return;
    if (ctx->pt_on) {
        char c = 1;
        pthread_mutex_lock(&ctx->lock);
        ctx->pt_stop = 1;
        pthread_mutex_unlock(&ctx->lock);
        if (write(ctx->wake_pipe[1], &c, 1) < 0) { /* the thread also wakes by its poll timeout */ }
        pthread_join(ctx->pt, NULL);
        ctx->pt_on = 0;
    }
    while (ctx->queues) kvx_queue_destroy(ctx->queues);
    while (ctx->peers) kvx_peer_remove(ctx->peers);
    while (ctx->ncaches) kvx_cache_deregister(ctx->caches[ctx->ncaches - 1]);
    if (ctx->be_ops) ctx->be_ops->close(ctx);
    if (ctx->wake_pipe[0] >= 0) { close(ctx->wake_pipe[0]); close(ctx->wake_pipe[1]); }
    pthread_mutex_destroy(&ctx->lock);
    pthread_cond_destroy(&ctx->add_done);
    if (ctx->md_key) { memset(ctx->md_key, 0, ctx->md_key_len); KVX_FREE(ctx->md_key); }
    while (ctx->nexpect) { KVX_FREE(ctx->expect[ctx->nexpect - 1].ids); KVX_FREE(ctx->expect[--ctx->nexpect].ranks); }
    KVX_FREE(ctx->expect);
    KVX_FREE(ctx);
}

/*--- caches --------------------------------------------------------------*/

typedef struct kvx__span { uint64_t a, b; } kvx__span;

KVX__PRIV int kvx__span_cmp(const void *x, const void *y) {
    const kvx__span *p = (const kvx__span *)x, *q = (const kvx__span *)y;
    return p->a < q->a ? -1 : p->a > q->a;
}

/* A table of a cache (checksums, generations) at ci->regions[n].addr, len
   bytes: registered as table says (its memory kind), published as region n,
   the cache's last so far; *index records which. */
KVX__PRIV kvx_status kvx__table_publish(kvx_ctx *ctx, kvx__cache_info *ci, const kvx__cache_info *table, uint32_t n, uint64_t len, uint32_t *index) {
    kvx_status st;
    ci->regions[n].len = len;
    if ((st = ctx->be_ops->mem_register(ctx, table, &ci->regions[n])) != KVX_OK) return st;
    ci->nregions = n + 1;
    *index = n;
    return KVX_OK;
}

/* The checksum table of a cache with checksums: host memory for a host
   cache (the CPU seals and checks it), the backend's for others (the CUDA
   backend's kernels do). Registered like the cache, in its memory kind, so a
   reader can read it, and published as the cache's last region, n. */
KVX__PRIV kvx_status kvx__csum_table_add(kvx_ctx *ctx, kvx__cache_info *ci, uint32_t n) {
    uint64_t tb = (uint64_t)ci->nplanes * ci->lay.num_blocks * ci->lay.num_heads * 4u;
    kvx__cache_info table = *ci;
    kvx_status st;
    if (ci->mem != KVX_MEM_HOST) {
        if (!ctx->be_ops->csum_alloc)
            return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_cache_register: checksums of a GPU cache are kept and checked on the GPU by the CUDA backend; "
                             "this context uses %s (use KVX_BACKEND_CUDA, or turn checksums off)", ctx->be_ops->name);
        if ((st = ctx->be_ops->csum_alloc(ctx, ci, tb)) != KVX_OK) return st;
        ci->regions[n].addr = ci->csum_dev;
    } else {
        if (!(ci->csum = (uint32_t *)kvx__calloc((size_t)(tb / 4u), 4u)))
            return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: no memory for a %llu-byte checksum table", (unsigned long long)tb);
        ci->regions[n].addr = (uint64_t)(uintptr_t)ci->csum;
    }
    return kvx__table_publish(ctx, ci, &table, n, tb, &ci->csum_region);
}

/* The generation table of a cache with generations: a word per block, the
   owner's CPU advancing it and a reader's transport fetching it. In host
   memory, registered as such, where the backend reads host memory; else
   (the CUDA backend) in the cache's memory with a host shadow. Published as
   the cache's last region, n. */
KVX__PRIV kvx_status kvx__gen_table_add(kvx_ctx *ctx, kvx__cache_info *ci, uint32_t n) {
    uint64_t tb = (uint64_t)ci->lay.num_blocks * 8u;
    kvx__cache_info table = *ci;
    kvx_status st;
    if (!(ci->gen = (volatile uint64_t *)kvx__calloc(ci->lay.num_blocks, 8u)))
        return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: no memory for a %llu-byte generation table", (unsigned long long)tb);
    if (ctx->be_ops->gen_alloc) {
        if ((st = ctx->be_ops->gen_alloc(ctx, ci, tb)) != KVX_OK) return st;
        ci->regions[n].addr = ci->gen_dev;
    } else {
        table.mem = KVX_MEM_HOST;
        ci->regions[n].addr = (uint64_t)(uintptr_t)ci->gen;
    }
    return kvx__table_publish(ctx, ci, &table, n, tb, &ci->gen_region);
}

/* A cache's desc against the context: kind, bases or pool, the strides its
   order takes; ci gets the layout's defaults and the strides. */
KVX__PRIV kvx_status kvx__cache_desc_check(kvx_ctx *ctx, const kvx_cache_desc *d, kvx__cache_info *ci) {
    kvx_status st = kvx__layout_check(ctx, &ci->lay, ctx->tp_size, "kvx_cache_register");
    int hnd;
    if (st != KVX_OK) return st;
    if (ctx->ncaches >= KVX__MAX_CACHES) return kvx__fail(ctx, KVX_ERR_ARG, "at most %u caches per context", KVX__MAX_CACHES);
    if (d->mem != KVX_MEM_HOST && d->mem != KVX_MEM_CUDA) return kvx__fail(ctx, KVX_ERR_ARG, "memory kind %d unknown", (int)d->mem);
    if (!d->bases == !d->pool)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: give either bases (one per layer and plane) or pool, not %s", d->bases ? "both" : "neither");
    hnd = ci->lay.order == KVX_ORDER_HND;
    ci->block_stride = d->block_stride;
    ci->head_stride = hnd ? d->head_stride : 0;
    ci->token_stride = !hnd ? d->token_stride : 0;
    if ((hnd ? d->token_stride : d->head_stride) != 0)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: a %s layout takes %s, not %s", hnd ? "HND" : "NHD",
                         hnd ? "head_stride" : "token_stride", hnd ? "token_stride" : "head_stride");
    return kvx__strides_check(ctx, ci, "kvx_cache_register");
}

/* Each plane's base, and the ranges to register (*n of sp): few and large,
   planes that overlap share one, and so do planes that touch, unless they
   are GPU memory a transport registers per allocation (see
   gpu_region_spans_allocations). */
KVX__PRIV kvx_status kvx__cache_spans(kvx_ctx *ctx, const kvx_cache_desc *d, kvx__cache_info *ci, kvx__span *sp, uint32_t *n) {
    uint64_t span = kvx__mul_sat(ci->lay.num_blocks - 1, ci->block_stride) + ci->block_extent;
    uint32_t p, k;
    int touch;
    for (p = 0; p < ci->nplanes; p++) {
        uint64_t b = d->bases ? (uint64_t)(uintptr_t)d->bases[p]
                              : (uint64_t)(uintptr_t)d->pool + (p / ci->lay.kv_planes) * d->layer_stride + (p % ci->lay.kv_planes) * d->plane_stride;
        if (!b) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: base of layer %u plane %u is NULL", p / ci->lay.kv_planes, p % ci->lay.kv_planes);
        ci->plane_base[p] = b;
        sp[p].a = b;
        sp[p].b = b + span;
    }
    touch = ci->mem == KVX_MEM_HOST || ctx->be_ops->gpu_region_spans_allocations;
    qsort(sp, ci->nplanes, sizeof *sp, kvx__span_cmp);
    for (k = 0, p = 0; p < ci->nplanes; p++) {
        if (k && (sp[p].a < sp[k - 1].b || (touch && sp[p].a == sp[k - 1].b))) { if (sp[p].b > sp[k - 1].b) sp[k - 1].b = sp[p].b; }
        else sp[k++] = sp[p];
    }
    if (k > KVX__MAX_REGIONS) return kvx__fail(ctx, KVX_ERR_ARG, "cache spans %u separate ranges, at most %u", k, KVX__MAX_REGIONS);
    *n = k;
    return KVX_OK;
}

KVX_API kvx_status kvx_cache_register(kvx_ctx *ctx, const kvx_cache_desc *d, kvx_cache **out) {
    kvx_cache *c;
    kvx__cache_info *ci;
    kvx__span *sp = NULL;
    kvx_status st;
    uint32_t n = 0, i;
    if (!ctx) return KVX_ERR_ARG;
    if (!d || !out) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: desc and out must not be NULL");
    *out = NULL;
    c = (kvx_cache *)kvx__calloc(1, sizeof *c);
    if (!c) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: out of memory");
    c->ctx = ctx;
    ci = &c->info;
    ci->lay = d->layout;
    ci->mem = d->mem;
    ci->device = d->device;
    pthread_mutex_lock(&ctx->lock);
    if ((st = kvx__cache_desc_check(ctx, d, ci)) != KVX_OK) goto fail;
    ci->id = ctx->ncaches;
    c->seen = (uint64_t *)kvx__calloc((ci->lay.num_blocks + 63u) / 64u, sizeof *c->seen);
    ci->nplanes = ci->lay.num_layers * ci->lay.kv_planes;
    ci->plane_base = (uint64_t *)kvx__calloc(ci->nplanes, sizeof *ci->plane_base);
    ci->plane_region = (uint16_t *)kvx__calloc(ci->nplanes, sizeof *ci->plane_region);
    sp = (kvx__span *)kvx__calloc(ci->nplanes, sizeof *sp);
    if (!ci->plane_base || !ci->plane_region || !sp || !c->seen) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: out of memory"); goto fail; }
    if ((st = kvx__cache_spans(ctx, d, ci, sp, &n)) != KVX_OK) goto fail;
    ci->csum_region = ci->gen_region = KVX__NO_CSUM;
    ci->regions = (kvx__region *)kvx__calloc(n + (d->checksums ? 1u : 0u) + (d->generations ? 1u : 0u), sizeof *ci->regions);
    if (!ci->regions) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: out of memory"); goto fail; }
    for (i = 0; i < n; i++) {
        ci->regions[i].addr = sp[i].a;
        ci->regions[i].len = sp[i].b - sp[i].a;
        st = ctx->be_ops->mem_register(ctx, ci, &ci->regions[i]);
        if (st != KVX_OK) goto fail;
        ci->nregions = i + 1;
    }
    if (d->checksums && (st = kvx__csum_table_add(ctx, ci, n)) != KVX_OK) goto fail;
    if (d->generations && (st = kvx__gen_table_add(ctx, ci, ci->nregions)) != KVX_OK) goto fail;
    if ((st = kvx__planes_locate(ctx, ci, "kvx_cache_register")) != KVX_OK) goto fail;
    ctx->caches[ctx->ncaches++] = c;
    KVX__LOG(ctx, KVX_LOG_INFO, "cache %u: %u layers x %u planes x %u blocks of %llu bytes, %u registration(s)", ci->id,
             ci->lay.num_layers, ci->lay.kv_planes, ci->lay.num_blocks, (unsigned long long)ci->block_bytes, ci->nregions);
    pthread_mutex_unlock(&ctx->lock);
    KVX_FREE(sp);
    *out = c;
    return KVX_OK;
fail:
    for (i = 0; i < ci->nregions; i++) ctx->be_ops->mem_deregister(ctx, &ci->regions[i]);
    pthread_mutex_unlock(&ctx->lock);
    kvx__cache_info_free(ctx, ci);
    KVX_FREE(sp);
    KVX_FREE(c->seen);
    KVX_FREE(c);
    return st;
}

KVX_API void kvx_cache_deregister(kvx_cache *c) {
    kvx_ctx *ctx;
    uint32_t i, j;
    if (!c) return;
    ctx = c->ctx;
    pthread_mutex_lock(&ctx->lock);
    /* Out of the list first: a backend that waits for replies from this
       memory while deregistering it serves no new request for it meanwhile. */
    for (i = 0; i < ctx->ncaches; i++)
        if (ctx->caches[i] == c) {
            for (j = i + 1; j < ctx->ncaches; j++) ctx->caches[j - 1] = ctx->caches[j];
            ctx->ncaches--;
            break;
        }
    for (i = 0; i < ctx->nexpect; i++)  /* leases on its blocks expire without retiring them */
        if (ctx->expect[i].retire == c) ctx->expect[i].retire = NULL;
    for (i = 0; i < c->info.nregions; i++) ctx->be_ops->mem_deregister(ctx, &c->info.regions[i]);
    pthread_mutex_unlock(&ctx->lock);
    kvx__cache_info_free(ctx, &c->info);
    KVX_FREE(c->seen);
    KVX_FREE(c);
}

/* A new epoch and secret first (from then on every message under the old
   secret is dropped), then each region registered anew before its old
   registration goes, so a failure half-way leaves every region readable. */
KVX_API kvx_status kvx_ctx_rotate(kvx_ctx *ctx) {
    uint8_t secret[KVX__SECRET_BYTES];
    char why[sizeof ctx->err];
    kvx_status st = KVX_OK;
    uint32_t c, i = 0;
    if (!ctx) return KVX_ERR_ARG;
    if (kvx__random(secret, sizeof secret) != 0)
        return kvx__fail(ctx, KVX_ERR_BACKEND, "kvx_ctx_rotate: no random bytes from the kernel: %s", strerror(errno));
    pthread_mutex_lock(&ctx->lock);
    ctx->epoch = kvx__new_epoch();
    memcpy(ctx->secret, secret, sizeof secret);
    for (c = 0; c < ctx->ncaches && ctx->be_ops->keys_per_registration; c++) {
        kvx__cache_info *ci = &ctx->caches[c]->info;
        for (i = 0; i < ci->nregions; i++) {
            kvx__cache_info kind = *ci;
            kvx__region fresh;
            if (i == ci->gen_region && !ctx->be_ops->gen_alloc) kind.mem = KVX_MEM_HOST;  /* as kvx__gen_table_add registered it */
            memset(&fresh, 0, sizeof fresh);
            fresh.addr = ci->regions[i].addr;
            fresh.len = ci->regions[i].len;
            if ((st = ctx->be_ops->mem_register(ctx, &kind, &fresh)) != KVX_OK) break;
            ctx->be_ops->mem_deregister(ctx, &ci->regions[i]);
            KVX_FREE(ci->regions[i].rkey);
            ci->regions[i] = fresh;
        }
        if (st != KVX_OK) break;
    }
    if (st == KVX_OK) KVX__LOG(ctx, KVX_LOG_INFO, "rotated: epoch %llu; metadata exported before reads nothing here", (unsigned long long)ctx->epoch);
    else {
        kvx__strlcpy(why, ctx->err, sizeof why);
        kvx__fail(ctx, st, "kvx_ctx_rotate: the new epoch and secret hold, but cache %u region %u kept its old registration: %s", c, i, why);
    }
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

/*--- peers ---------------------------------------------------------------*/

KVX__PRIV kvx_status kvx__policy_check(kvx_ctx *ctx, const kvx_peer *p);

/* A process of this host's pid namespace that can still serve: it exists
   (signal 0 sends nothing) and is neither a zombie nor stopped (a stopped
   one, hung in a debugger or by SIGSTOP, is what a restart replaces). */
KVX__PRIV int kvx__pid_alive(uint32_t pid) {
    char path[40], buf[512], *rp;
    FILE *f;
    size_t n;
    if (!pid || (kill((pid_t)pid, 0) != 0 && errno != EPERM)) return 0;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    if (!(f = fopen(path, "r"))) return 1;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!(rp = strrchr(buf, ')')) || rp[1] != ' ') return 1;  /* "pid (comm) S ...": comm may hold anything */
    return !strchr("ZXTt", rp[2]);
}

/* Whether p may join: no live process of this host already holds its
   rank, and no peer of its rank has its epoch or a newer one; an older
   epoch is a restarted peer, failed here. */
KVX__PRIV kvx_status kvx__peer_admit(kvx_ctx *ctx, kvx_peer *p) {
    kvx_peer *q;
    kvx_status st;
    for (q = ctx->peers; q; q = q->next) {
        if (strcmp(q->name, p->name) || q->rank != p->rank) continue;
        /* Two live processes of one host claiming one rank is a rank set
           wrong, not a restart: refused, whichever metadata came first.
           (Across hosts, or within one process, kvx cannot tell; there a
           newer epoch is taken for a restart.) */
        if (!q->failed && q->pid != p->pid && !strcmp(q->host, ctx->host) && !strcmp(p->host, ctx->host) &&
            kvx__pid_alive(q->pid) && kvx__pid_alive(p->pid)) {
            st = kvx__fail(ctx, KVX_ERR_MISMATCH, "two live processes claim rank %d of %s on this host: pid %u (added) and pid %u (this "
                           "metadata); a tp_rank set wrong? (a restarted peer's old process would be gone)", p->rank, p->name, q->pid, p->pid);
            return st;
        }
        if (p->epoch < q->epoch) {
            st = kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata of %s/%d has epoch %llu, older than the %llu already added: a restarted peer's stale keys",
                           p->name, p->rank, (unsigned long long)p->epoch, (unsigned long long)q->epoch);
            return st;
        }
        if (p->epoch == q->epoch) {
            st = kvx__fail(ctx, KVX_ERR_ARG, "peer %s/%d (epoch %llu) is already added", p->name, p->rank, (unsigned long long)p->epoch);
            return st;
        }
        /* A newer epoch: the old process is gone; its reads end with KVX_ERR_PEER. */
        if (!q->failed) kvx__peer_failed(q, "the peer restarted (newer metadata was added)");
    }
    return KVX_OK;
}

KVX_API kvx_status kvx_peer_add(kvx_ctx *ctx, const void *md, size_t len, kvx_peer **out) {
    kvx_peer *p;
    kvx_status st;
    uint32_t i;
    if (!ctx) return KVX_ERR_ARG;
    if (!md || !out) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_peer_add: metadata and out must not be NULL");
    *out = NULL;
    p = (kvx_peer *)kvx__calloc(1, sizeof *p);
    if (!p) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_peer_add: out of memory");
    p->ctx = ctx;
    pthread_mutex_lock(&ctx->lock);
    /* One kvx_peer_add connects at a time: the one connecting lets the lock
       go while it waits, and a second would take those waits for its own
       (and hold the lock through the first's). */
    while (ctx->adding) pthread_cond_wait(&ctx->add_done, &ctx->lock);
    st = kvx__md_parse(ctx, (const uint8_t *)md, len, p);
    if (st != KVX_OK) goto fail;
    if (!strcmp(p->name, ctx->name) && p->rank == ctx->rank) {
        st = p->epoch == ctx->epoch
                 ? kvx__fail(ctx, KVX_ERR_ARG, "metadata is this context's own (%s/%d)", p->name, p->rank)
                 : kvx__fail(ctx, KVX_ERR_MISMATCH, "another context (pid %u on %s) claims rank %d of %s, which this context holds",
                             p->pid, p->host, p->rank, p->name);
        goto fail;
    }
    if ((st = kvx__peer_admit(ctx, p)) != KVX_OK) goto fail;
    for (i = 0; i < p->ncaches && i < ctx->ncaches; i++)
        if ((st = kvx__compat(ctx, &ctx->caches[i]->info, p, &p->caches[i])) != KVX_OK) goto fail;
    /* The backend's waits for the peer let the lock go (kvx__wait_poll):
       what changed meanwhile is checked again after. */
    ctx->adding = 1;
    ctx->adder = pthread_self();
    st = ctx->be_ops->connect(ctx, p);
    ctx->adding = 0;
    pthread_cond_broadcast(&ctx->add_done);
    if (st != KVX_OK) goto fail;
    if ((st = kvx__peer_admit(ctx, p)) != KVX_OK || (st = kvx__policy_check(ctx, p)) != KVX_OK) {
        ctx->be_ops->disconnect(ctx, p);
        goto fail;
    }
    p->connected = 1;
    p->next = ctx->peers;
    ctx->peers = p;
    KVX__LOG(ctx, KVX_LOG_INFO, "peer %s/%d of %d (pid %u, host %s): %s", p->name, p->rank, p->tp_size, p->pid, p->host, p->transport);
    pthread_mutex_unlock(&ctx->lock);
    *out = p;
    return KVX_OK;
fail:
    pthread_mutex_unlock(&ctx->lock);
    kvx__peer_free(p);
    return st;
}

/* Does transport t match one policy term (n bytes at term)? A class
   matches the patterns the core gives it and those the backend names
   (kvx__backend.policy_classes); anything else is a pattern itself. */
KVX__PRIV int kvx__policy_term(const kvx__backend *be, const char *term, size_t n, const char *t) {
    static const char *const known[] = {"sw", "ipc", "nvlink", "rdma", NULL};
    static const char *const core[] = {"sw=*(sw)*", "nvlink=*nvlink*", NULL};
    const char *const *lists[2];
    char pat[128];
    size_t i, j;
    if (!n || n >= sizeof pat) return 0;
    memcpy(pat, term, n);
    pat[n] = 0;
    for (i = 0; known[i] && strcmp(pat, known[i]); i++) {}
    if (!known[i]) return !fnmatch(pat, t, 0);
    lists[0] = core;
    lists[1] = be ? be->policy_classes : NULL;
    for (i = 0; i < 2; i++)
        for (j = 0; lists[i] && lists[i][j]; j++) {
            const char *eq = strchr(lists[i][j], '=');
            if (eq && (size_t)(eq - lists[i][j]) == n && !memcmp(lists[i][j], pat, n) && !fnmatch(eq + 1, t, 0)) return 1;
        }
    return 0;
}

/* KVX_OK, or KVX_ERR_UNSUPPORTED saying what was chosen, what the policy
   asks and why the transport library chose what it did. */
KVX__PRIV kvx_status kvx__policy_check(kvx_ctx *ctx, const kvx_peer *p) {
    const char *s = ctx->policy, *e;
    int wanted = 0, matched = 0;
    if (!*s) return KVX_OK;
    for (; *s; s = *e ? e + 1 : e) {
        size_t n;
        int refuse;
        while (*s == ' ') s++;
        e = strchr(s, ',');
        if (!e) e = s + strlen(s);
        n = (size_t)(e - s);
        while (n && s[n - 1] == ' ') n--;
        refuse = n && *s == '!';
        if (refuse) {
            if (kvx__policy_term(ctx->be_ops, s + 1, n - 1, p->transport))
                return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_peer_add: %s/%d would be read over %s, which the transport policy \"%s\" refuses "
                                 "(\"%.*s\"); why that transport: %s", p->name, p->rank, p->transport, ctx->policy, (int)n, s,
                                 p->why[0] ? p->why : "the transport library chose it");
        } else if (n) {
            wanted = 1;
            matched |= kvx__policy_term(ctx->be_ops, s, n, p->transport);
        }
    }
    if (wanted && !matched)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_peer_add: %s/%d would be read over %s, and the transport policy \"%s\" requires "
                         "one of its other terms; why that transport: %s", p->name, p->rank, p->transport, ctx->policy,
                         p->why[0] ? p->why : "the transport library chose it");
    return KVX_OK;
}

KVX__PRIV void kvx__peer_free(kvx_peer *p) {
    uint32_t i;
    if (p->caches)
        for (i = 0; i < p->ncaches; i++) kvx__cache_info_free(p->ctx, &p->caches[i]);
    KVX_FREE(p->caches);
    KVX_FREE(p->addr);
    KVX_FREE(p);
}

KVX__PRIV void kvx__read_finish(kvx__read *rd);
KVX__PRIV void kvx__runs_release(kvx_queue *q);
KVX__PRIV kvx_status kvx__verify(kvx__read *rd);
KVX__PRIV kvx_status kvx__gen_check(kvx__read *rd);

/* A failed read keeps the sentence of its failure (the context's error,
   which the next failure overwrites), for its completion. */
KVX__PRIV void kvx__read_why(kvx__read *rd) {
    if (rd->status != KVX_PENDING && rd->status != KVX_OK && !rd->why[0])
        kvx__strlcpy(rd->why, rd->q->ctx->err[0] ? rd->q->ctx->err : kvx_status_name(rd->status), sizeof rd->why);
}

/* Fail every read of peer p that is still live, after closing p by force.
   Returns how many reads the transport still holds (0 unless it broke its
   promise to complete everything on a forced close). */
KVX__PRIV uint32_t kvx__peer_close(kvx_peer *p, kvx_status why) {
    kvx_ctx *ctx = p->ctx;
    kvx_queue *q;
    uint32_t i, stuck = 0;
    for (q = ctx->queues; q; q = q->next)
        for (i = 0; i < q->depth; i++) {
            kvx__read *rd = &q->slots[i];
            if (!rd->in_use || rd->done || rd->peer != p) continue;
            if (rd->status == KVX_PENDING) rd->status = why;
            kvx__read_why(rd);
            rd->issuing_done = 1;
        }
    if (p->connected) ctx->be_ops->disconnect(ctx, p);
    p->connected = 0;
    for (q = ctx->queues; q; q = q->next) {
        kvx__runs_release(q);
        for (i = 0; i < q->depth; i++) {
            kvx__read *rd = &q->slots[i];
            if (!rd->in_use || rd->done || rd->peer != p) continue;
            kvx__read_finish(rd);
            if (!rd->done) stuck++;
        }
    }
    return stuck;
}

KVX_API void kvx_peer_remove(kvx_peer *p) {
    kvx_ctx *ctx;
    kvx_peer **pp;
    uint32_t stuck;
    if (!p) return;
    ctx = p->ctx;
    pthread_mutex_lock(&ctx->lock);
    stuck = kvx__peer_close(p, KVX_ERR_CANCELED);
    for (pp = &ctx->peers; *pp; pp = &(*pp)->next)
        if (*pp == p) { *pp = p->next; break; }
    if (stuck) { /* reads still point at it: keep the memory rather than free it under them */
        kvx__fail(ctx, KVX_ERR_BACKEND, "peer %s/%d removed with %u reads the transport never completed; its memory is kept", p->name, p->rank, stuck);
        KVX__LOG(ctx, KVX_LOG_ERROR, "%s", ctx->err);  /* nobody is handed this one */
    }
    pthread_mutex_unlock(&ctx->lock);
    if (!stuck) kvx__peer_free(p);
}

KVX_API const char *kvx_peer_transport(const kvx_peer *p) { return p ? p->transport : "none"; }
KVX_API const char *kvx_peer_name(const kvx_peer *p) { return p ? p->name : ""; }
KVX_API int kvx_peer_rank(const kvx_peer *p) { return p ? p->rank : -1; }

KVX_API kvx_status kvx_peer_heads(const kvx_peer *p, const kvx_cache *c, uint32_t remote_cache, uint32_t *first, uint32_t *count) {
    uint32_t a, b;
    if (!p || !c || !first || !count || remote_cache >= p->ncaches) return KVX_ERR_ARG;
    kvx__head_range(&c->info.lay, c->ctx->rank, c->ctx->tp_size, &p->caches[remote_cache].lay, p->rank, p->tp_size, &a, &b);
    *first = a;
    *count = b - a;
    return KVX_OK;
}

/* A backend's wait for a peer: poll, with the context's lock let go on the
   thread in kvx_peer_add's connect (ctx->adder), so reads of other peers
   go on; held as it was everywhere else. */
KVX__PRIV_MAYBE int kvx__wait_poll(kvx_ctx *ctx, struct pollfd *fds, nfds_t n, int ms) {  /* local has no waits */
    int unlock = ctx->adding && pthread_equal(ctx->adder, pthread_self()), r;
    if (unlock) pthread_mutex_unlock(&ctx->lock);
    r = poll(fds, n, ms);
    if (unlock) pthread_mutex_lock(&ctx->lock);
    return r;
}

/* The transport lost p. With nothing of ours in flight to it that is a
   close, not an error (an owner that ends after its readers are done):
   said at info, and the next read of it fails saying so. On this host the
   pid tells a process that is gone from a connection that broke. */
KVX__PRIV void kvx__peer_failed(kvx_peer *p, const char *why) {
    kvx_ctx *ctx = p->ctx;
    int gone = !strcmp(p->host, ctx->host) && !kvx__pid_alive(p->pid);
    if (p->failed) return;
    p->failed = 1;
    kvx__fail(ctx, KVX_ERR_PEER, "peer %s/%d (pid %u, %s) %s%s (%s)", p->name, p->rank, p->pid, p->transport,
              p->ops_out ? "was lost with reads in flight" : "closed its connection",
              gone ? ": its process has ended" : "", why);
    if (p->ops_out)
        KVX__LOG(ctx, KVX_LOG_WARN, "%s", ctx->err);
}

/*--- queues and reads ----------------------------------------------------*/

/* The backend's and the stream service's parts of a queue, in that order;
   safe on a queue whose opening failed half-way. */
KVX__PRIV void kvx__queue_close(kvx_queue *q) {
    if (q->ctx->be_ops->queue_close) q->ctx->be_ops->queue_close(q);
    if (kvx__stream) kvx__stream->queue_fini(q);
}

KVX_API kvx_status kvx_queue_create(kvx_ctx *ctx, const kvx_queue_desc *d, kvx_queue **out) {
    kvx_queue *q;
    kvx_queue_desc desc;
    pthread_condattr_t ca;
    if (!ctx) return KVX_ERR_ARG;
    if (!out) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_queue_create: out is NULL");
    *out = NULL;
    memset(&desc, 0, sizeof desc);
    if (d) desc = *d;
    q = (kvx_queue *)kvx__calloc(1, sizeof *q);
    if (!q) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_queue_create: out of memory");
    q->ctx = ctx;
    q->depth = desc.depth ? desc.depth : 256;
    q->max_ops = desc.max_ops ? desc.max_ops : 64;
    q->max_runs = desc.max_runs ? desc.max_runs : 65536;
    q->cuda_stream = desc.cuda.stream;
    if (q->depth > (1u << 20) || q->max_runs > (1u << 26)) {
        KVX_FREE(q);
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_queue_create: depth %u (max %u) or max_runs %u (max %u) too large",
                         desc.depth, 1u << 20, desc.max_runs, 1u << 26);
    }
    q->slots = (kvx__read *)kvx__calloc(q->depth, sizeof *q->slots);
    q->runs = (kvx__run *)kvx__calloc(q->max_runs, sizeof *q->runs);
    q->done_fifo = (kvx_ticket *)kvx__calloc(q->depth, sizeof *q->done_fifo);
    if (!q->slots || !q->runs || !q->done_fifo) {
        KVX_FREE(q->slots); KVX_FREE(q->runs); KVX_FREE(q->done_fifo); KVX_FREE(q);
        return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_queue_create: out of memory for %u reads and %u runs", desc.depth, desc.max_runs);
    }
    q->next_ticket = q->run_tail = 1;
    if (ctx->be_ops->queue_open || kvx__stream) {
        kvx_status st = KVX_OK;
        pthread_mutex_lock(&ctx->lock);
        if (ctx->be_ops->queue_open) st = ctx->be_ops->queue_open(q);
        if (st == KVX_OK && kvx__stream) st = kvx__stream->queue_init(q);
        pthread_mutex_unlock(&ctx->lock);
        if (st != KVX_OK) {
            kvx__queue_close(q);
            KVX_FREE(q->slots); KVX_FREE(q->runs); KVX_FREE(q->done_fifo); KVX_FREE(q);
            return st;
        }
    }
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_lock(&ctx->lock);
    q->next = ctx->queues;
    ctx->queues = q;
    pthread_mutex_unlock(&ctx->lock);
    *out = q;
    return KVX_OK;
}

KVX__PRIV kvx__read *kvx__slot(kvx_queue *q, kvx_ticket t) { return &q->slots[t % q->depth]; }

/* A slot is reusable once its read is final, reported, its notification sent
   and its runs handed back to the ring. */
KVX__PRIV void kvx__retire(kvx_queue *q, kvx__read *rd) {
    if (rd->in_use && rd->done && rd->consumed && !rd->notify_inflight && rd->ticket < q->run_tail) rd->in_use = 0;
}

/* Runs are released in ticket order, as soon as a read has issued everything. */
KVX__PRIV void kvx__runs_release(kvx_queue *q) {
    while (q->run_tail < q->next_ticket) {
        kvx__read *rd = kvx__slot(q, q->run_tail);
        KVX_ASSERT(rd->ticket == q->run_tail);
        /* verification and the generation check walk the runs */
        if (!rd->issuing_done || ((rd->verify || rd->gen) && !rd->done)) break;
        q->run_used -= rd->nruns;
        rd->nruns = 0;
        q->gen_used -= rd->ngen;
        rd->ngen = 0;
        q->run_tail++;
        kvx__retire(q, rd);
    }
}

KVX__PRIV void kvx__done_push(kvx_queue *q, kvx_ticket t) {
    uint32_t i, n = 0;
    if (q->done_count == q->depth) {
        /* Entries already reported by kvx_test/kvx_wait linger: drop them. */
        for (i = 0; i < q->done_count; i++) {
            kvx_ticket u = q->done_fifo[(q->done_head + i) % q->depth];
            kvx__read *rd = kvx__slot(q, u);
            if (rd->ticket == u && rd->in_use && !rd->consumed) q->done_fifo[(q->done_head + n++) % q->depth] = u;
        }
        q->done_count = n;
    }
    KVX_ASSERT(q->done_count < q->depth);
    q->done_fifo[(q->done_head + q->done_count++) % q->depth] = t;
}

KVX__PRIV void kvx__read_finish(kvx__read *rd) {
    kvx_queue *q = rd->q;
    kvx_ctx *ctx = q->ctx;
    if (rd->done || !rd->issuing_done || rd->ops_out) return;
    if (rd->gen && rd->status == KVX_PENDING) {
        /* The data has landed: only now fetch the owner's generations, so
           that a retire before or during the data's reads cannot pass. */
        if (!rd->gen_phase && !ctx->be_ops->gen_fetch) {
            rd->gen_phase = 1;  /* as ops of the read, issued by the next pump */
            rd->issuing_done = 0;
            return;
        }
        if (!rd->gen_phase) {
            rd->gen_phase = 1;
            rd->status = ctx->be_ops->gen_fetch(rd);
            if (rd->status == KVX_OK) rd->status = KVX_PENDING;
        }
        if (rd->status == KVX_PENDING) rd->status = kvx__gen_check(rd);
    }
    if (rd->status == KVX_PENDING) rd->status = rd->verify ? kvx__verify(rd) : KVX_OK;
    kvx__read_why(rd);
    rd->done = 1;
    if (rd->status == KVX_OK) {
        KVX_ASSERT(rd->ops_done == rd->ops_total);
        rd->bytes_done = rd->bytes;
        ctx->st.bytes_read += rd->bytes;
        ctx->st.reads_completed++;
        if (rd->notify) {
            kvx__notify_msg m;
            memcpy(m.secret, rd->peer->secret, KVX__SECRET_BYTES);
            m.id = rd->notify_id;
            m.rank = (uint32_t)ctx->rank;
            m.tp_size = (uint32_t)ctx->tp_size;
            kvx__strlcpy(m.name, ctx->name, sizeof m.name);
            kvx__notify_msg_write(rd->notify_msg, &m);
            rd->notify_inflight = 1;
            if (ctx->be_ops->notify(ctx, rd) != KVX_OK) rd->notify_inflight = 0;
            else ctx->st.notifications_sent++;
        }
    } else {
        ctx->st.reads_failed++;
    }
    if (kvx__stream) kvx__stream->read_final(rd);
    kvx__done_push(q, rd->ticket);
    kvx__runs_release(q);
    pthread_cond_broadcast(&q->cond);
}

KVX__PRIV void kvx__notify_sent(kvx__read *rd) {
    rd->notify_inflight = 0;
    kvx__retire(rd->q, rd);
}

KVX__PRIV void kvx__op_done(kvx__read *rd, kvx_status st, const char *why) {
    kvx_queue *q = rd->q;
    kvx_ctx *ctx = q->ctx;
    KVX_ASSERT(rd->ops_out > 0);
    rd->ops_out--;
    q->ops_out--;
    rd->peer->ops_out--;
    if (st == KVX_OK) {
        uint64_t n = rd->whole ? rd->ops_total - rd->ops_done : 1u;
        rd->ops_done += n;
        ctx->st.descs_completed += n;
    } else {
        if (rd->status == KVX_PENDING) {
            rd->status = st;
            kvx__fail(ctx, st, "read %llu from %s/%d over %s failed after %llu of %llu descriptors: %s",
                      (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rd->peer->transport,
                      (unsigned long long)rd->ops_done, (unsigned long long)rd->ops_total, why ? why : kvx_status_name(st));
            kvx__read_why(rd);
        }
        rd->issuing_done = 1;
    }
    if (rd->issuing_done) kvx__read_finish(rd);
}

/* The op at the read's cursor; 0 when every op has been issued. */
/* The generation fetch: one op per run of blocks, the owner's words of the
   remote blocks into the read's own words in the queue's landing ring. */
KVX__PRIV int kvx__gcursor_op(kvx__read *rd, const kvx__run *runs, uint32_t cap, kvx__op *op) {
    const kvx__cache_info *rc = rd->rc;
    const kvx__run *run;
    if (rd->g_run >= rd->nruns) return 0;
    run = &runs[(rd->run0 + rd->g_run) % cap];
    op->count = 1;
    op->lstride = op->rstride = 0;
    op->lreg = KVX__LREG_GEN;
    op->rreg = rc->gen_region;
    op->laddr = rd->q->gland_reg.addr + 8u * (uint64_t)(rd->g0 + rd->g_idx);
    op->raddr = rc->regions[rc->gen_region].addr + 8u * (uint64_t)run->r;
    op->len = 8u * (uint64_t)run->n;
    return 1;
}

/* After the fetch: every block's fetched word against what the read expected. */
KVX__PRIV kvx_status kvx__gen_check(kvx__read *rd) {
    kvx_queue *q = rd->q;
    uint32_t r, b, idx = 0;
    for (r = 0; r < rd->nruns; r++) {
        const kvx__run *run = &q->runs[(rd->run0 + r) % q->max_runs];
        for (b = 0; b < run->n; b++, idx++) {
            uint64_t want = q->gens[rd->g0 + idx], got = q->gland[rd->g0 + idx];
            if (got != want)
                return kvx__fail(q->ctx, KVX_ERR_STALE, "read %llu from %s/%d over %s: remote block %u (local %u, layers %u-%u): generation %llu "
                                 "expected, %llu found: the owner retired it (kvx_blocks_retire) before or during the read, so what landed may be "
                                 "another request's", (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rd->peer->transport,
                                 run->r + b, run->l + b, rd->layer_begin, rd->layer_end - 1, (unsigned long long)want, (unsigned long long)got);
        }
    }
    return KVX_PENDING;
}

KVX__PRIV int kvx__cursor_op(kvx__read *rd, const kvx__run *runs, uint32_t cap, kvx__op *op) {
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    const kvx__run *run;
    uint32_t p = rd->c_plane;
    if (rd->gen_phase) return kvx__gcursor_op(rd, runs, cap, op);
    if (p >= rd->p_end) return rd->verify ? kvx__vcursor_op(rd, runs, cap, op) : 0;
    run = &runs[(rd->run0 + rd->c_run) % cap];
    op->lreg = lc->plane_region[p];
    op->rreg = rc->plane_region[p];
    op->count = 1;
    op->lstride = op->rstride = 0;
    if (rd->g.run_merge) {
        op->laddr = lc->plane_base[p] + (uint64_t)run->l * lc->block_stride + rd->g.loff;
        op->raddr = rc->plane_base[p] + (uint64_t)run->r * rc->block_stride + rd->g.roff;
        op->len = rd->g.piece * run->n;
    } else {
        op->laddr = lc->plane_base[p] + (uint64_t)(run->l + rd->c_blk) * lc->block_stride + rd->g.loff + rd->c_piece * rd->g.lpstride;
        op->raddr = rc->plane_base[p] + (uint64_t)(run->r + rd->c_blk) * rc->block_stride + rd->g.roff + rd->c_piece * rd->g.rpstride;
        op->len = rd->g.piece;
        if (rd->gather) {  /* the block's pieces (NHD: a token each) as one op */
            op->count = rd->g.npieces;
            op->lstride = rd->g.lpstride;
            op->rstride = rd->g.rpstride;
        }
    }
    return 1;
}

KVX__PRIV void kvx__cursor_next(kvx__read *rd, const kvx__run *runs, uint32_t cap) {
    if (rd->gen_phase) { rd->g_idx += runs[(rd->run0 + rd->g_run) % cap].n; rd->g_run++; return; }
    if (rd->c_plane >= rd->p_end) { kvx__vcursor_next(rd, runs, cap); return; }
    if (!rd->g.run_merge) {
        if (!rd->gather && ++rd->c_piece < rd->g.npieces) return;
        rd->c_piece = 0;
        if (++rd->c_blk < runs[(rd->run0 + rd->c_run) % cap].n) return;
        rd->c_blk = 0;
    }
    if (++rd->c_run < rd->nruns) return;
    rd->c_run = 0;
    rd->c_plane++;
}

/* A table of a cache's own block ids (seal, retire, a lease's blocks):
   every id checked before anything is done with any. */
KVX__PRIV kvx_status kvx__ids_check(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *ids, uint32_t n, const char *who) {
    uint32_t i;
    if (n && !ids) return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u blocks and a NULL table", who, n);
    for (i = 0; i < n; i++)
        if (ids[i] >= ci->lay.num_blocks)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: block id %u at index %u is past the cache's %u blocks", who, ids[i], i, ci->lay.num_blocks);
    return KVX_OK;
}

KVX_API kvx_status kvx_cache_seal(kvx_cache *cache, const uint32_t *blocks, uint32_t n) {
    kvx_ctx *ctx;
    kvx__cache_info *ci;
    kvx_status st;
    if (!cache) return KVX_ERR_ARG;
    ctx = cache->ctx;
    ci = &cache->info;
    if (!ci->csum && !ci->csum_dev) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_seal: cache %u was registered without checksums", ci->id);
    if ((st = kvx__ids_check(ctx, ci, blocks, n, "kvx_cache_seal")) != KVX_OK) return st;
    if (ci->csum_dev) return n ? ctx->be_ops->csum_seal(ctx, ci, blocks, n) : KVX_OK;
    kvx__seal_host(ci, blocks, n);
    return KVX_OK;
}

/* Every id checked before any word moves: a bad id retires nothing. */
KVX__PRIV kvx_status kvx__retire_check(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *ids, uint32_t n, const char *who) {
    if (!ci->gen) return kvx__fail(ctx, KVX_ERR_ARG, "%s: cache %u was registered without generations", who, ci->id);
    return kvx__ids_check(ctx, ci, ids, n, who);
}

KVX__PRIV kvx_status kvx__retire_blocks(kvx_ctx *ctx, kvx__cache_info *ci, const uint32_t *ids, uint32_t n) {
    uint32_t i, lo = UINT32_MAX, hi = 0;
    for (i = 0; i < n; i++) {
        ci->gen[ids[i]] = ci->gen[ids[i]] + 1u;
        if (ids[i] < lo) lo = ids[i];
        if (ids[i] > hi) hi = ids[i];
    }
    /* The new words before any write the engine makes to the blocks next:
       a table the backend keeps elsewhere gets them before this returns. */
#if defined(__GNUC__) || defined(__clang__)
    __sync_synchronize();
#endif
    return n && ci->gen_dev ? ctx->be_ops->gen_store(ctx, ci, lo, hi - lo + 1u) : KVX_OK;
}

KVX_API kvx_status kvx_blocks_retire(kvx_cache *cache, const uint32_t *ids, uint32_t n) {
    kvx_ctx *ctx;
    kvx_status st;
    if (!cache) return KVX_ERR_ARG;
    ctx = cache->ctx;
    pthread_mutex_lock(&ctx->lock);  /* one writer of the words: this and lease expiry */
    if ((st = kvx__retire_check(ctx, &cache->info, ids, n, "kvx_blocks_retire")) == KVX_OK) st = kvx__retire_blocks(ctx, &cache->info, ids, n);
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API uint64_t kvx_block_generation(const kvx_cache *cache, uint32_t id) {
    if (!cache || !cache->info.gen || id >= cache->info.lay.num_blocks) return UINT64_MAX;
    return cache->info.gen[id];
}

/* After a verified read: host caches are checked here, others by the
   backend that keeps their checksums. */
KVX__PRIV kvx_status kvx__verify(kvx__read *rd) {
#if defined(KVX_TEST_HOOK_BEFORE_VERIFY)
    KVX_TEST_HOOK_BEFORE_VERIFY(rd);
#endif
    if (rd->lc->mem == KVX_MEM_HOST) return kvx__verify_host(rd);
    return rd->q->ctx->be_ops->csum_verify(rd);
}

/* One backend call issuing op (NULL: the whole read, post_read), counted
   outstanding on read, queue and peer from before the call, since a backend
   may complete it inside; KVX_PENDING or an error leaves nothing counted. */
KVX__PRIV kvx_status kvx__issue(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    kvx_status st;
    rd->ops_out++; rd->q->ops_out++; rd->peer->ops_out++;
    st = op ? ctx->be_ops->post(ctx, rd, op) : ctx->be_ops->post_read(ctx, rd);
    if (st != KVX_OK) { rd->ops_out--; rd->q->ops_out--; rd->peer->ops_out--; }
    return st;
}

/* Before a read's ops go: its peer alive and connected, and ops to issue.
   0: the read was finished here (failed, or a read of no blocks). */
KVX__PRIV int kvx__pump_ready(kvx_ctx *ctx, kvx__read *rd) {
    if (rd->peer->failed) {
        if (rd->status == KVX_PENDING) { rd->status = KVX_ERR_PEER; kvx__fail(ctx, KVX_ERR_PEER, "read %llu: peer %s/%d failed", (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank); kvx__read_why(rd); }
        goto finish;
    }
    if (!rd->peer->connected) {
        kvx_status st = ctx->be_ops->connect(ctx, rd->peer);
        if (st != KVX_OK) {
            rd->status = st;
            kvx__read_why(rd);
            goto finish;
        }
        rd->peer->connected = 1;
    }
    if (rd->ops_total) return 1;
    /* a read of no blocks: straight to its notification */
finish:
    rd->issuing_done = 1;
    kvx__read_finish(rd);
    return 0;
}

/* A read's ops one at a time while the queue has room for them; KVX_PENDING
   where the backend has none. */
KVX__PRIV kvx_status kvx__pump_ops(kvx_ctx *ctx, kvx_queue *q, kvx__read *rd) {
    kvx__op op;
    while (!rd->issuing_done && q->ops_out < q->max_ops) {
        kvx_status st;
        if (!kvx__cursor_op(rd, q->runs, q->max_runs, &op)) { rd->issuing_done = 1; break; }
        st = kvx__issue(ctx, rd, &op);
        if (st == KVX_PENDING) return KVX_PENDING;
        if (st != KVX_OK) {
            if (rd->status == KVX_PENDING) rd->status = st;
            kvx__read_why(rd);
            rd->issuing_done = 1;
            break;
        }
        rd->ops_issued++;
        ctx->st.descs_posted++;
        kvx__cursor_next(rd, q->runs, q->max_runs);
    }
    return KVX_OK;
}

/* Issue ops of live reads, oldest first, while the queue has room. */
KVX__PRIV void kvx__pump(kvx_queue *q) {
    kvx_ctx *ctx = q->ctx;
    kvx_ticket t;
    for (t = q->run_tail; t < q->next_ticket && q->ops_out < q->max_ops; t++) {
        kvx__read *rd = kvx__slot(q, t);
        if (rd->issuing_done || !kvx__pump_ready(ctx, rd)) continue;
        if (ctx->be_ops->post_read) {  /* the backend takes the whole read */
            kvx_status st = kvx__issue(ctx, rd, NULL);
            if (st == KVX_PENDING) break;
            if (st != KVX_OK) {
                if (rd->status == KVX_PENDING) rd->status = st;
                kvx__read_why(rd);
            } else {
                rd->whole = 1;
                rd->ops_issued = rd->ops_total;
                ctx->st.descs_posted += rd->ops_total;
            }
            rd->issuing_done = 1;
        }
        if (kvx__pump_ops(ctx, q, rd) == KVX_PENDING) break;
        if (rd->issuing_done) {
            kvx__runs_release(q);
            kvx__read_finish(rd);
        }
    }
    /* what the backend staged goes now, also when it had no room for more */
    if (ctx->be_ops->flush) ctx->be_ops->flush(ctx, q);
}

/* A read's peer and caches: this context's, live, and readable one from the other. */
KVX__PRIV kvx_status kvx__post_ends(kvx_ctx *ctx, const kvx_read *r, kvx_peer **pp, kvx_cache **cp) {
    kvx_cache *cache = r->cache;
    kvx_peer *p;
    uint32_t i;
    kvx_status st;
    for (p = ctx->peers; p && p != r->peer; p = p->next) {}
    if (!r->peer || !p) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: peer is NULL or not a peer of this context");
    if (!cache) {
        if (!ctx->ncaches) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: no cache registered");
        cache = ctx->caches[0];
    }
    for (i = 0; i < ctx->ncaches && ctx->caches[i] != cache; i++) {}
    if (i == ctx->ncaches) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: cache is not registered with this context");
    if (r->remote_cache >= p->ncaches)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: remote_cache %u, peer %s/%d has %u", r->remote_cache, p->name, p->rank, p->ncaches);
    if (p->failed) return kvx__fail(ctx, KVX_ERR_PEER, "kvx_post: peer %s/%d failed or closed earlier; add its new metadata", p->name, p->rank);
    if ((st = kvx__compat(ctx, &cache->info, p, &p->caches[r->remote_cache])) != KVX_OK) return st;
    if (ctx->be_ops->can_read && (st = ctx->be_ops->can_read(ctx, &cache->info, p, &p->caches[r->remote_cache])) != KVX_OK) return st;
    *pp = p;
    *cp = cache;
    return KVX_OK;
}

/* Every block id checked against both layouts before anything is posted,
   and no local block twice; *nruns: the runs of consecutive ids. */
KVX__PRIV kvx_status kvx__post_ids(kvx_ctx *ctx, const kvx_read *r, kvx_cache *cache, const kvx_peer *p, const kvx__cache_info *rc,
                                   uint32_t *nruns) {
    const kvx__cache_info *lc = &cache->info;
    uint32_t i;
    for (*nruns = 0, i = 0; i < r->num_blocks; i++) {
        uint32_t l = r->local_blocks[i], rr = r->remote_blocks[i];
        if (l >= lc->lay.num_blocks)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: local block id %u at index %u is past the cache's %u blocks", l, i, lc->lay.num_blocks);
        if (rr >= rc->lay.num_blocks)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: remote block id %u at index %u is past peer %s/%d's %u blocks", rr, i, p->name, p->rank, rc->lay.num_blocks);
        if (!i || l != r->local_blocks[i - 1] + 1 || rr != r->remote_blocks[i - 1] + 1) (*nruns)++;
    }
    /* Two reads into one local block in the same request would race: refuse.
       A bit per block, set and then cleared, under the context lock. */
    for (i = 0; i < r->num_blocks; i++) {
        uint32_t l = r->local_blocks[i];
        uint64_t bit = 1ull << (l & 63u);
        if (cache->seen[l >> 6] & bit) {
            uint32_t j;
            for (j = 0; j < i; j++) cache->seen[r->local_blocks[j] >> 6] &= ~(1ull << (r->local_blocks[j] & 63u));
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: local block id %u appears twice (again at index %u)", l, i);
        }
        cache->seen[l >> 6] |= bit;
    }
    for (i = 0; i < r->num_blocks; i++) cache->seen[r->local_blocks[i] >> 6] &= ~(1ull << (r->local_blocks[i] & 63u));
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__post_check(kvx_queue *q, const kvx_read *r, kvx__read *rd, uint32_t *nruns_out) {
    kvx_ctx *ctx = q->ctx;
    const kvx__cache_info *lc, *rc;
    kvx_cache *cache = NULL;
    kvx_peer *p = NULL;
    uint32_t nruns, L, a, b, l0, r0;
    kvx_status st;
    if ((st = kvx__post_ends(ctx, r, &p, &cache)) != KVX_OK) return st;
    lc = &cache->info;
    rc = &p->caches[r->remote_cache];
    if (!r->num_blocks && r->notify) {  /* only a notification: no heads, blocks or layers to check */
        if (r->verify || r->remote_generations)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: a read of no blocks only notifies; it has nothing to verify or check generations of");
        memset(rd, 0, sizeof *rd);
        rd->peer = p;
        rd->lc = lc;
        rd->rc = rc;
        *nruns_out = 0;
        return KVX_OK;
    }
    if (!r->num_blocks || !r->local_blocks || !r->remote_blocks)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u blocks with local_blocks %p and remote_blocks %p%s", r->num_blocks,
                         (const void *)r->local_blocks, (const void *)r->remote_blocks,
                         r->num_blocks ? "" : " (a read of no blocks must notify)");
    L = lc->lay.num_layers;
    if (r->layer_begin >= L || r->layer_count > L - r->layer_begin)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: layers [%u, %u+%u) outside the cache's %u", r->layer_begin, r->layer_begin, r->layer_count, L);
    kvx__head_range(&lc->lay, ctx->rank, ctx->tp_size, &rc->lay, p->rank, p->tp_size, &a, &b);
    if (a == b)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: peer %s/%d (rank %d of %d) is not the source of any head of rank %d of %d",
                         p->name, p->rank, p->rank, p->tp_size, ctx->rank, ctx->tp_size);
    if ((st = kvx__post_ids(ctx, r, cache, p, rc, &nruns)) != KVX_OK) return st;
    if (nruns > q->max_runs)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u runs of block ids, the queue holds %u (kvx_queue_desc.max_runs)", nruns, q->max_runs);
    l0 = kvx__head_first(&lc->lay, ctx->rank, ctx->tp_size);
    r0 = kvx__head_first(&rc->lay, p->rank, p->tp_size);
    if (r->verify) {
        if ((!lc->csum && !lc->csum_dev) || rc->csum_region == KVX__NO_CSUM)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: a verified read needs checksums on both caches (kvx_cache_desc.checksums): ours %s, peer %s/%d's %s",
                             lc->csum || lc->csum_dev ? "on" : "off", p->name, p->rank, rc->csum_region == KVX__NO_CSUM ? "off" : "on");
    }
    if (r->remote_generations && rc->gen_region == KVX__NO_CSUM)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: the read carries generations, but peer %s/%d's cache %u keeps none "
                         "(kvx_cache_desc.generations on the owner's side)", p->name, p->rank, r->remote_cache);
    memset(rd, 0, sizeof *rd);
    rd->peer = p;
    rd->lc = lc;
    rd->rc = rc;
    rd->verify = r->verify;
    rd->gen = r->remote_generations != NULL;
    rd->h_a = a; rd->h_b = b; rd->h_l0 = l0; rd->h_r0 = r0;
    kvx__geom_make(lc, l0, rc, r0, a, b, &rd->g);
    rd->layer_begin = r->layer_begin;
    rd->layer_end = r->layer_begin + (r->layer_count ? r->layer_count : L - r->layer_begin);
    *nruns_out = nruns;
    return KVX_OK;
}

/* A queue's generation rings, at its first read with generations; the
   landing ring registered (as host memory) where the backend's ops land
   there, not where the backend fetches the words itself. */
KVX__PRIV kvx_status kvx__gen_rings(kvx_queue *q, const kvx__cache_info *lc) {
    kvx_ctx *ctx = q->ctx;
    kvx__cache_info host = *lc;
    kvx_status st;
    q->gens = (uint64_t *)kvx__calloc(q->max_runs, sizeof *q->gens);
    q->gland = (uint64_t *)kvx__calloc(q->max_runs, sizeof *q->gland);
    if (!q->gens || !q->gland) st = kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_post: no memory for the queue's generation words");
    else {
        q->gland_reg.addr = (uint64_t)(uintptr_t)q->gland;
        q->gland_reg.len = (uint64_t)q->max_runs * 8u;
        host.mem = KVX_MEM_HOST;
        st = ctx->be_ops->gen_fetch ? KVX_OK : ctx->be_ops->mem_register(ctx, &host, &q->gland_reg);
    }
    if (st != KVX_OK) {
        KVX_FREE(q->gens); KVX_FREE(q->gland); KVX_FREE(q->gland_reg.rkey);
        q->gens = q->gland = NULL;
        memset(&q->gland_reg, 0, sizeof q->gland_reg);
    }
    return st;
}

/* Block-outermost layouts (vLLM's BLHNC, BLNHC): where, on both sides, each
   plane's piece of a block ends where the next plane's begins (one
   registration), a block's planes go as one piece, and a run of blocks as one
   op where blocks follow each other too: one operation for every layer of a
   run of blocks instead of one per layer. Not where a backend takes the read
   whole (post_read) and walks the planes itself. */
KVX__PRIV int kvx__planes_merge(kvx_ctx *ctx, kvx__read *rd, uint32_t planes) {
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    uint32_t p, p0 = rd->c_plane;
    if (planes < 2 || rd->g.npieces != 1 || ctx->be_ops->post_read) return 0;
    for (p = p0; p + 1 < p0 + planes; p++)
        if (lc->plane_region[p + 1] != lc->plane_region[p] || rc->plane_region[p + 1] != rc->plane_region[p] ||
            lc->plane_base[p + 1] != lc->plane_base[p] + rd->g.piece || rc->plane_base[p + 1] != rc->plane_base[p] + rd->g.piece)
            return 0;
    rd->g.piece *= planes;
    rd->g.run_merge = rd->g.piece == lc->block_stride && rd->g.piece == rc->block_stride;
    rd->p_end = p0 + 1;
    return 1;
}

/* Room for a read of nruns runs: a slot, run slots, and (with generations)
   contiguous generation slots; *gpad: the ring's tail it skips. */
KVX__PRIV kvx_status kvx__post_room(kvx_queue *q, const kvx_read *r, const kvx__read *tmp, uint32_t nruns, uint32_t *gpad) {
    kvx_ctx *ctx = q->ctx;
    kvx_status st;
    *gpad = 0;
    if (kvx__slot(q, q->next_ticket)->in_use) return kvx__full(ctx, KVX__FULL_SLOTS, q->depth, 0);
    if (q->max_runs - q->run_used < nruns) return kvx__full(ctx, KVX__FULL_RUNS, q->run_used, q->max_runs);
    if (!tmp->gen) return KVX_OK;
    /* a read's words are contiguous: a tail too short for them is skipped */
    *gpad = q->gen_head + r->num_blocks > q->max_runs ? q->max_runs - q->gen_head : 0u;
    if (r->num_blocks > q->max_runs)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u blocks with generations, the queue holds %u (kvx_queue_desc.max_runs)", r->num_blocks, q->max_runs);
    if (!q->gens && (st = kvx__gen_rings(q, tmp->lc)) != KVX_OK) return st;  /* once per queue */
    if (q->max_runs - q->gen_used < *gpad + r->num_blocks) return kvx__full(ctx, KVX__FULL_GENS, q->gen_used, q->max_runs);
    return KVX_OK;
}

/* The read's runs of block ids, and its generations, into the queue's rings. */
KVX__PRIV void kvx__post_rings(kvx_queue *q, kvx__read *rd, const kvx_read *r, uint32_t nruns, uint32_t gpad) {
    uint32_t i, k;
    rd->run0 = q->run_head;
    rd->nruns = nruns;
    for (k = 0, i = 0; i < r->num_blocks; i++) {
        uint32_t l = r->local_blocks[i], rr = r->remote_blocks[i];
        if (i && l == r->local_blocks[i - 1] + 1 && rr == r->remote_blocks[i - 1] + 1) {
            q->runs[(rd->run0 + k - 1) % q->max_runs].n++;
        } else {
            kvx__run *run = &q->runs[(rd->run0 + k++) % q->max_runs];
            run->l = l; run->r = rr; run->n = 1;
        }
    }
    q->run_head = (q->run_head + nruns) % q->max_runs;
    q->run_used += nruns;
    if (!rd->gen) return;
    rd->g0 = gpad ? 0u : q->gen_head;
    rd->ngen = gpad + r->num_blocks;
    for (i = 0; i < r->num_blocks; i++) q->gens[rd->g0 + i] = r->remote_generations[i];
    q->gen_head = (rd->g0 + r->num_blocks) % q->max_runs;
    q->gen_used += rd->ngen;
}

/* What the read will issue: its planes, ops and bytes. */
KVX__PRIV void kvx__post_counts(kvx_ctx *ctx, kvx__read *rd, const kvx_read *r, uint32_t nruns) {
    uint32_t planes = (rd->layer_end - rd->layer_begin) * rd->lc->lay.kv_planes;
    uint64_t per_plane_ops;
    ctx->st.blocks_posted += (uint64_t)r->num_blocks * planes;
    rd->c_plane = rd->layer_begin * rd->lc->lay.kv_planes;
    rd->p_end = rd->c_plane + planes;
    if (kvx__planes_merge(ctx, rd, planes)) planes = 1;
    rd->gather = rd->rc->gather && !rd->g.run_merge && rd->g.npieces > 1;
    per_plane_ops = rd->g.run_merge ? nruns : (uint64_t)r->num_blocks * (rd->gather ? 1u : rd->g.npieces);
    rd->ops_total = per_plane_ops * planes + (rd->gen && !ctx->be_ops->gen_fetch ? nruns : 0u);
    if (rd->verify) {  /* one small read of checksums per sampled block and plane */
        rd->ops_total += (uint64_t)kvx__sample_count(rd, r->num_blocks) * planes;
        rd->v_plane = rd->layer_begin * rd->lc->lay.kv_planes;
    }
    rd->bytes = (uint64_t)r->num_blocks * rd->g.piece * (rd->g.run_merge ? 1 : rd->g.npieces) * planes;
}

/* One read's checks and bookkeeping, with the context's lock held; it is
   issued by the kvx__pump after. *early: the earliest deadline posted. */
KVX__PRIV kvx_status kvx__post_one(kvx_queue *q, const kvx_read *r, kvx_ticket *out, uint64_t *early) {
    kvx_ctx *ctx = q->ctx;
    kvx__read tmp, *rd;
    kvx_status st;
    uint32_t nruns = 0, gpad = 0;
    if ((st = kvx__post_check(q, r, &tmp, &nruns)) != KVX_OK) return st;
    if ((st = kvx__post_room(q, r, &tmp, nruns, &gpad)) != KVX_OK) return st;
    rd = kvx__slot(q, q->next_ticket);
    *rd = tmp;
    rd->q = q;
    rd->ticket = q->next_ticket++;
    kvx__post_rings(q, rd, r, nruns, gpad);
    kvx__post_counts(ctx, rd, r, nruns);
    rd->t_post_ns = kvx__now_ns();
    rd->deadline_ns = rd->t_post_ns + (uint64_t)(r->timeout_ms ? r->timeout_ms : ctx->timeout_ms) * 1000000ull;
    rd->status = KVX_PENDING;
    rd->notify = r->notify;
    rd->notify_id = r->notify_id;
    rd->user_tag = r->user_tag;
    rd->in_use = 1;
    ctx->st.reads_posted++;
    *out = rd->ticket;
    if (!*early || rd->deadline_ns < *early) *early = rd->deadline_ns;
    if (kvx__stream) kvx__stream->read_posted(rd);
    return KVX_OK;
}

/* After posting: issue, and wake the progress thread, asleep, where it must
   learn of the reads' deadlines and (where ops need this context's
   progress) of their ops; a system call and a wake-up per post otherwise
   spared. */
KVX__PRIV void kvx__post_go(kvx_queue *q, uint64_t early) {
    kvx_ctx *ctx = q->ctx;
    kvx__pump(q);
    if (ctx->pt_on && ctx->be_ops->signal && ctx->pt_until &&
        (!ctx->be_ops->issues_without_progress || early < ctx->pt_until))
        ctx->be_ops->signal(ctx);
}

KVX_API kvx_status kvx_post(kvx_queue *q, const kvx_read *r, kvx_ticket *out) {
    kvx_status st;
    uint64_t early = 0;
    if (!q) return KVX_ERR_ARG;
    if (!r || !out) return kvx__fail(q->ctx, KVX_ERR_ARG, "kvx_post: read and out must not be NULL");
    *out = 0;
    pthread_mutex_lock(&q->ctx->lock);
    if ((st = kvx__post_one(q, r, out, &early)) == KVX_OK) kvx__post_go(q, early);
    pthread_mutex_unlock(&q->ctx->lock);
    return st;
}

KVX_API kvx_status kvx_post_batch(kvx_queue *q, const kvx_read *reads, uint32_t n, kvx_ticket *out, uint32_t *posted) {
    kvx_status st = KVX_OK;
    uint64_t early = 0;
    uint32_t i;
    if (posted) *posted = 0;
    if (!q) return KVX_ERR_ARG;
    if (n && (!reads || !out)) return kvx__fail(q->ctx, KVX_ERR_ARG, "kvx_post_batch: reads and out must not be NULL");
    pthread_mutex_lock(&q->ctx->lock);
    for (i = 0; i < n; i++) {
        out[i] = 0;
        if ((st = kvx__post_one(q, &reads[i], &out[i], &early)) != KVX_OK) break;
    }
    if (i) kvx__post_go(q, early);
    pthread_mutex_unlock(&q->ctx->lock);
    if (posted) *posted = i;
    return st;
}

/* A read past its deadline fails; first its operations end, so that none of
   its bytes can land after the failure is reported: by the backend where it
   can promise that without closing the peer (the peer's other reads go on),
   else by closing the peer by force. */
KVX__PRIV void kvx__read_timeout(kvx__read *rd) {
    kvx_ctx *ctx = rd->q->ctx;
    kvx_peer *p = rd->peer;
    if (rd->status == KVX_PENDING) {
        rd->status = KVX_ERR_TIMEOUT;
        kvx__fail(ctx, KVX_ERR_TIMEOUT, "read %llu from %s/%d over %s timed out after %llu ms: %llu of %llu descriptors done, %u outstanding",
                  (unsigned long long)rd->ticket, p->name, p->rank, p->transport,
                  (unsigned long long)((rd->deadline_ns - rd->t_post_ns) / 1000000ull),
                  (unsigned long long)rd->ops_done, (unsigned long long)rd->ops_total, rd->ops_out);
        kvx__read_why(rd);
    }
    rd->issuing_done = 1;
    if (rd->ops_out && ctx->be_ops->abandon) ctx->be_ops->abandon(ctx, rd);
    if (rd->ops_out) kvx__peer_close(p, KVX_ERR_TIMEOUT);
    kvx__runs_release(rd->q);
    kvx__read_finish(rd);
}

/* 0 when the ring is full. */
KVX__PRIV int kvx__notify_push(kvx_ctx *ctx, uint64_t id, kvx_status st, int rank, int tp) {
    kvx_notification *n;
    if (ctx->note_count == KVX__NOTIFY_RING) return 0;
    n = &ctx->notes[(ctx->note_head + ctx->note_count++) % KVX__NOTIFY_RING];
    n->id = id;
    n->status = st;
    n->peer_rank = rank;
    n->peer_tp_size = tp;
    return 1;
}

/* An owner's lease outlives a full ring: its notification waits in the
   lease (found arrived) until kvx_notifications makes room. Others that
   find the ring full are dropped, counted, said once a second. */
KVX__PRIV void kvx__notify_full(kvx_ctx *ctx, uint64_t id) {
    uint64_t held;
    ctx->st.notifications_dropped++;
    if ((int)KVX_LOG_ERROR <= (int)ctx->log_level && kvx__limit(&ctx->lim_late, kvx__now_ns(), &held))
        kvx__log(ctx, KVX_LOG_ERROR, "notification %llu dropped: the ring of %u is full and nothing expects it (kvx_notify_expect); "
                 "call kvx_notifications more often (%llu more dropped since the last such line)", (unsigned long long)id,
                 KVX__NOTIFY_RING, (unsigned long long)held);
}

/* Push what a lease holds, in order, while the ring has room: its arrivals,
   then, once expired, one expired notification for the readers that never
   came. 1 once it has nothing more to deliver. */
KVX__PRIV int kvx__lease_deliver(kvx_ctx *ctx, kvx__expect *e) {
    while (e->delivered < e->got) {
        if (!kvx__notify_push(ctx, e->id, KVX_OK, e->ranks[2 * e->delivered], e->ranks[2 * e->delivered + 1])) return 0;
        e->delivered++;
    }
    if (e->delivered == e->readers) return 1;
    if (!e->expired) return 0;
    if (!kvx__notify_push(ctx, e->id, KVX_ERR_TIMEOUT, -1, 0)) return 0;
    return 1;
}

KVX__PRIV void kvx__lease_end(kvx_ctx *ctx, uint32_t i) {
    KVX_FREE(ctx->expect[i].ids);
    KVX_FREE(ctx->expect[i].ranks);
    ctx->expect[i] = ctx->expect[--ctx->nexpect];
}

/* A notification from the network: taken only with this context's secret
   (anything else is dropped unanswered and counted); rank and name as the
   reader sent them, checked for sense. */
KVX__PRIV void kvx__notify_arrived(kvx_ctx *ctx, const uint8_t *buf, size_t len) {
    kvx__notify_msg m;
    uint32_t ver = 0, i;
    int e = kvx__notify_msg_read(buf, len, &m, &ver);
    if (e != KVX__WIRE_OK) {
        if (e == KVX__WIRE_VERSION)
            KVX__DROP(ctx, "a notification of version %u dropped: this kvx speaks version %u (upgrade both sides)", ver, KVX__NOTIFY_VERSION);
        else
            KVX__DROP(ctx, "a notification of %zu bytes dropped: %s", len, kvx__wire_why(e));
        return;
    }
    if (!kvx__ct_equal(m.secret, ctx->secret, KVX__SECRET_BYTES)) {
        KVX__DROP(ctx, "a notification without this context's secret dropped (id %llu, claiming %s/%u): a process without "
                  "its current metadata, or of an epoch before kvx_ctx_rotate", (unsigned long long)m.id, m.name, m.rank);
        return;
    }
    ctx->st.notifications_received++;
    for (i = 0; i < ctx->nexpect; i++)
        if (ctx->expect[i].id == m.id && !ctx->expect[i].expired && ctx->expect[i].got < ctx->expect[i].readers) break;
    if (i < ctx->nexpect) {  /* kept in its lease until the ring has room */
        kvx__expect *e = &ctx->expect[i];
        e->ranks[2 * e->got] = (int)m.rank;
        e->ranks[2 * e->got++ + 1] = (int)m.tp_size;
        if (kvx__lease_deliver(ctx, e)) kvx__lease_end(ctx, i);
        return;
    }
    /* Not expected: unless it already expired, in which case it is late and
       the owner has had its one notification. */
    for (i = 0; i < KVX__EXPIRED_MEMORY; i++)
        if (ctx->expired[i] == m.id + 1) {
            uint64_t held;
            if ((int)KVX_LOG_WARN <= (int)ctx->log_level && kvx__limit(&ctx->lim_late, kvx__now_ns(), &held))
                kvx__log(ctx, KVX_LOG_WARN, "notify id %llu from %s/%u arrived after it expired (%llu more late since the last such line)",
                         (unsigned long long)m.id, m.name, m.rank, (unsigned long long)held);
            return;
        }
    if (!kvx__notify_push(ctx, m.id, KVX_OK, (int)m.rank, (int)m.tp_size)) kvx__notify_full(ctx, m.id);
}

KVX_API kvx_status kvx_notify_expect_readers(kvx_ctx *ctx, uint64_t id, uint32_t readers, uint32_t timeout_ms,
                                             kvx_cache *cache, const uint32_t *ids, uint32_t n) {
    const char *who = cache ? "kvx_notify_expect_retire" : "kvx_notify_expect";
    uint32_t *copy = NULL, i;
    int *ranks = NULL;
    kvx_status st = KVX_OK;
    kvx__expect *e;
    if (!ctx) return KVX_ERR_ARG;
    if (!readers) readers = 1;
    if (readers > 65536u) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_notify_expect_readers: %u readers, at most 65536", readers);
    pthread_mutex_lock(&ctx->lock);
    if (cache) {
        for (i = 0; i < ctx->ncaches && ctx->caches[i] != cache; i++) {}
        if (i == ctx->ncaches) { st = kvx__fail(ctx, KVX_ERR_ARG, "%s: cache is not registered with this context", who); goto out; }
        if ((st = kvx__retire_check(ctx, &cache->info, ids, n, who)) != KVX_OK) goto out;
        if (n && !(copy = (uint32_t *)KVX_MALLOC((size_t)n * sizeof *copy))) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", who); goto out; }
        if (n) memcpy(copy, ids, (size_t)n * sizeof *copy);
    }
    if (!(ranks = (int *)KVX_MALLOC((size_t)readers * 2u * sizeof *ranks))) { KVX_FREE(copy); st = kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", who); goto out; }
    if (ctx->nexpect == ctx->expect_cap) {
        uint32_t cap = ctx->expect_cap ? ctx->expect_cap * 2 : 64;
        void *nx = KVX_REALLOC(ctx->expect, (size_t)cap * sizeof *ctx->expect);
        if (!nx) { KVX_FREE(copy); KVX_FREE(ranks); st = kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", who); goto out; }
        ctx->expect = (kvx__expect *)nx;
        ctx->expect_cap = cap;
    }
    e = &ctx->expect[ctx->nexpect++];
    memset(e, 0, sizeof *e);
    e->id = id;
    e->deadline_ns = kvx__now_ns() + (uint64_t)(timeout_ms ? timeout_ms : ctx->timeout_ms) * 1000000ull;
    e->readers = readers;
    e->ranks = ranks;
    e->retire = cache;
    e->ids = copy;
    e->nids = cache ? n : 0;
out:
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API kvx_status kvx_notify_expect_retire(kvx_ctx *ctx, uint64_t id, uint32_t timeout_ms,
                                            kvx_cache *cache, const uint32_t *ids, uint32_t n) {
    return kvx_notify_expect_readers(ctx, id, 1, timeout_ms, cache, ids, n);
}

KVX_API kvx_status kvx_notify_expect(kvx_ctx *ctx, uint64_t id, uint32_t timeout_ms) {
    return kvx_notify_expect_readers(ctx, id, 1, timeout_ms, NULL, NULL, 0);
}

/* One pass: transport progress, failed peers, deadlines, issuing, expiries.
   Returns the earliest deadline still ahead (0: none). */
KVX__PRIV uint64_t kvx__progress_locked(kvx_ctx *ctx, int *events) {
    kvx_queue *q;
    kvx_peer *p;
    uint64_t now, next = 0;
    uint32_t i;
    int n = ctx->be_ops->progress(ctx);
    if (events) *events = n;
    for (p = ctx->peers; p; p = p->next)
        if (p->failed && p->connected) kvx__peer_close(p, KVX_ERR_PEER);
    now = kvx__now_ns();
    for (q = ctx->queues; q; q = q->next) {
        kvx_ticket t;
        for (t = q->next_ticket > q->depth ? q->next_ticket - q->depth : 1; t < q->next_ticket; t++) {
            kvx__read *rd = kvx__slot(q, t);
            if (!rd->in_use || rd->done || rd->ticket != t) continue;
            if (now >= rd->deadline_ns) kvx__read_timeout(rd);
            else if (!next || rd->deadline_ns < next) next = rd->deadline_ns;
        }
        kvx__pump(q);
    }
    for (i = 0; i < ctx->nexpect;) {
        kvx__expect *e = &ctx->expect[i];
        if (!e->expired && e->got < e->readers && now >= e->deadline_ns) {
            e->expired = 1;
            ctx->expired[ctx->expired_head++ % KVX__EXPIRED_MEMORY] = e->id + 1;
            /* before the owner hears of it, so it cannot reuse the blocks first */
            if (e->retire && kvx__retire_blocks(ctx, &e->retire->info, e->ids, e->nids) != KVX_OK)
                KVX__LOG(ctx, KVX_LOG_ERROR, "notify id %llu expired, but its blocks could not be retired: %s", (unsigned long long)e->id, ctx->err);
        }
        if (kvx__lease_deliver(ctx, e)) { kvx__lease_end(ctx, i); continue; }
        if (!e->expired && (!next || e->deadline_ns < next)) next = e->deadline_ns;
        i++;
    }
    return next;
}

KVX_API int kvx_progress(kvx_ctx *ctx) {
    int n = 0;
    if (!ctx) return 0;
    pthread_mutex_lock(&ctx->lock);
    kvx__progress_locked(ctx, &n);
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

/* Sleep on the backend's event fd (and the wake pipe) until an event or
   until_ns. Called and returns with ctx->lock held. */
KVX__PRIV void kvx__sleep(kvx_ctx *ctx, uint64_t until_ns, int with_pipe) {
    struct pollfd pf[2];
    uint64_t now;
    int ms, nf = 0, efd;
    if (ctx->be_ops->arm(ctx) != KVX_OK) return;
    now = kvx__now_ns();
    ms = until_ns <= now ? 0 : (int)((until_ns - now + 999999) / 1000000);
    if (ms > 1000) ms = 1000;
    efd = ctx->be_ops->event_fd(ctx);
    if (efd >= 0) { pf[nf].fd = efd; pf[nf].events = POLLIN; pf[nf].revents = 0; nf++; }
    if (with_pipe) { pf[nf].fd = ctx->wake_pipe[0]; pf[nf].events = POLLIN; pf[nf].revents = 0; nf++; }
    if (with_pipe) ctx->pt_until = until_ns > now ? until_ns : now + 1;
    pthread_mutex_unlock(&ctx->lock);
    poll(pf, (nfds_t)nf, ms);
    if (with_pipe && (pf[nf - 1].revents & POLLIN)) {
        char buf[64];
        if (read(ctx->wake_pipe[0], buf, sizeof buf) < 0) { /* nothing to drain */ }
    }
    pthread_mutex_lock(&ctx->lock);
    if (with_pipe) ctx->pt_until = 0;
}

KVX__PRIV void *kvx__progress_main(void *arg) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    pthread_mutex_lock(&ctx->lock);
    while (!ctx->pt_stop) {
        int n;
        uint64_t next = kvx__progress_locked(ctx, &n);
        if (n) continue;
        kvx__sleep(ctx, next ? next : kvx__now_ns() + 1000000000ull, 1);
    }
    pthread_mutex_unlock(&ctx->lock);
    return NULL;
}

KVX__PRIV kvx_status kvx__ticket_check(kvx_queue *q, kvx_ticket t, kvx__read **out) {
    kvx__read *rd;
    if (!t || t >= q->next_ticket) return kvx__fail(q->ctx, KVX_ERR_ARG, "ticket %llu was never issued by this queue", (unsigned long long)t);
    rd = kvx__slot(q, t);
    if (rd->ticket != t || !rd->in_use)
        return kvx__fail(q->ctx, KVX_ERR_ARG, "ticket %llu is no longer held: it was reported and its slot reused", (unsigned long long)t);
    *out = rd;
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__consume(kvx_queue *q, kvx__read *rd) {
    kvx_status st = rd->status;
    if (st != KVX_OK && rd->why[0]) {  /* kvx_ctx_error: this read's */
        kvx__strlcpy(q->ctx->err, rd->why, sizeof q->ctx->err);
        q->ctx->full_kind = 0;
    }
    rd->consumed = 1;
    kvx__retire(q, rd);
    return st;
}

KVX_API kvx_status kvx_test(kvx_queue *q, kvx_ticket t) {
    kvx_ctx *ctx;
    kvx__read *rd;
    kvx_status st;
    if (!q) return KVX_ERR_ARG;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    if (!ctx->pt_on) kvx__progress_locked(ctx, NULL);
    if ((st = kvx__ticket_check(q, t, &rd)) == KVX_OK) st = rd->done ? kvx__consume(q, rd) : KVX_PENDING;
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API kvx_status kvx_wait(kvx_queue *q, kvx_ticket t, uint32_t timeout_ms) {
    kvx_ctx *ctx;
    kvx__read *rd;
    kvx_status st;
    uint64_t until;
    if (!q) return KVX_ERR_ARG;
    ctx = q->ctx;
    until = kvx__now_ns() + (uint64_t)timeout_ms * 1000000ull;
    pthread_mutex_lock(&ctx->lock);
    for (;;) {
        uint64_t next = 0, now;
        if (!ctx->pt_on) next = kvx__progress_locked(ctx, NULL);
        if ((st = kvx__ticket_check(q, t, &rd)) != KVX_OK) break;
        if (rd->done) { st = kvx__consume(q, rd); break; }
        now = kvx__now_ns();
        if (now >= until) { st = KVX_PENDING; break; }
        if (ctx->pt_on) {
            struct timespec ts;
            uint64_t wake = until < rd->deadline_ns ? until : rd->deadline_ns + 1000000ull;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            wake = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + (wake > now ? wake - now : 0);
            ts.tv_sec = (time_t)(wake / 1000000000ull);
            ts.tv_nsec = (long)(wake % 1000000000ull);
            pthread_cond_timedwait(&q->cond, &ctx->lock, &ts);
        } else {
            kvx__sleep(ctx, next && next < until ? next : until, 0);
        }
    }
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API int kvx_poll(kvx_queue *q, kvx_completion *out, int max) {
    kvx_ctx *ctx;
    int n = 0;
    if (!q || !out || max <= 0) return 0;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    if (!ctx->pt_on) kvx__progress_locked(ctx, NULL);
    while (n < max && q->done_count) {
        kvx_ticket t = q->done_fifo[q->done_head];
        kvx__read *rd = kvx__slot(q, t);
        q->done_head = (q->done_head + 1) % q->depth;
        q->done_count--;
        if (rd->ticket != t || !rd->in_use || rd->consumed) continue;
        out[n].ticket = t;
        out[n].user_tag = rd->user_tag;
        out[n].bytes = rd->bytes_done;
        out[n].status = kvx__consume(q, rd);
        out[n].error = out[n].status == KVX_OK ? NULL : rd->why;
        n++;
    }
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

/* Tear down with reads in flight: stop issuing, give what is outstanding a
   short grace (operations in flight usually finish in microseconds), then
   close the peers that still hold some by force, so that nothing lands after
   kvx_queue_destroy returns. Other queues' reads to those peers fail too
   (KVX_ERR_CANCELED): the transport cannot cancel one read. */
KVX__PRIV void kvx__queue_teardown(kvx_queue *q) {
    kvx_ctx *ctx = q->ctx;
    uint64_t grace;
    uint32_t i;
    for (i = 0; i < q->depth; i++) {
        kvx__read *rd = &q->slots[i];
        if (!rd->in_use || rd->done) continue;
        if (rd->status == KVX_PENDING) {
            rd->status = KVX_ERR_CANCELED;
            snprintf(rd->why, sizeof rd->why, "read %llu from %s/%d canceled: its queue was destroyed", (unsigned long long)rd->ticket,
                     rd->peer->name, rd->peer->rank);
        }
        rd->issuing_done = 1;
        kvx__read_finish(rd);
    }
    grace = kvx__now_ns() + KVX__CANCEL_GRACE_MS * 1000000ull;
    while (q->ops_out) {
        uint64_t now = kvx__now_ns(), until = 0;
        for (i = 0; i < q->depth; i++) {
            kvx__read *rd = &q->slots[i];
            if (rd->in_use && !rd->done && rd->ops_out && (!until || rd->deadline_ns < until)) until = rd->deadline_ns;
        }
        if (until > grace) until = grace;
        if (!until || now >= until) {
            for (i = 0; i < q->depth; i++) {
                kvx__read *rd = &q->slots[i];
                if (rd->in_use && !rd->done && rd->ops_out) kvx__peer_close(rd->peer, KVX_ERR_CANCELED);
            }
            break;
        }
        if (!ctx->be_ops->progress(ctx)) kvx__sleep(ctx, until, 0);
    }
    /* Notifications still being sent point at their slots: let them finish
       within the grace, then close their peers by force, which completes
       them, before the slots are freed. */
    for (;;) {
        int inflight = 0;
        for (i = 0; i < q->depth; i++) inflight |= q->slots[i].notify_inflight;
        if (!inflight) break;
        if (kvx__now_ns() >= grace) {
            for (i = 0; i < q->depth; i++)
                if (q->slots[i].notify_inflight) {
                    kvx__peer_close(q->slots[i].peer, KVX_ERR_CANCELED);
                    q->slots[i].notify_inflight = 0;
                }
            break;
        }
        if (!ctx->be_ops->progress(ctx)) kvx__sleep(ctx, grace, 0);
    }
}

KVX_API void kvx_queue_destroy(kvx_queue *q) {
    kvx_ctx *ctx;
    kvx_queue **pp;
    if (!q) return;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    kvx__queue_teardown(q);
    for (pp = &ctx->queues; *pp; pp = &(*pp)->next)
        if (*pp == q) { *pp = q->next; break; }
    pthread_mutex_unlock(&ctx->lock);
    kvx__queue_close(q);
    if (q->gens && !ctx->be_ops->gen_fetch) ctx->be_ops->mem_deregister(ctx, &q->gland_reg);
    KVX_FREE(q->gland_reg.rkey);
    pthread_cond_destroy(&q->cond);
    KVX_FREE(q->slots);
    KVX_FREE(q->runs);
    KVX_FREE(q->gens);
    KVX_FREE(q->gland);
    KVX_FREE(q->done_fifo);
    KVX_FREE(q);
}

KVX_API int kvx_notifications(kvx_ctx *ctx, kvx_notification *out, int max) {
    int n = 0;
    if (!ctx || !out || max <= 0) return 0;
    pthread_mutex_lock(&ctx->lock);
    if (!ctx->pt_on) kvx__progress_locked(ctx, NULL);
    while (n < max && ctx->note_count) {
        uint32_t i;
        out[n++] = ctx->notes[ctx->note_head];
        ctx->note_head = (ctx->note_head + 1) % KVX__NOTIFY_RING;
        ctx->note_count--;
        for (i = 0; i < ctx->nexpect;)  /* what leases kept while the ring was full takes the room at once */
            if (ctx->expect[i].delivered < ctx->expect[i].got && kvx__lease_deliver(ctx, &ctx->expect[i])) kvx__lease_end(ctx, i);
            else i++;
    }
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

KVX_API void kvx_stats_get(const kvx_ctx *cctx, kvx_stats *out) {
    kvx_ctx *ctx = (kvx_ctx *)cctx; /* the lock is not part of the value */
    if (!out) return;
    if (!ctx) { memset(out, 0, sizeof *out); return; }
    pthread_mutex_lock(&ctx->lock);
    *out = ctx->st;
    pthread_mutex_unlock(&ctx->lock);
}

KVX_API kvx_status kvx_stream_wait(kvx_queue *q, kvx_ticket t, void *stream) {
    if (!q) return KVX_ERR_ARG;
    if (!kvx__stream) return kvx__fail(q->ctx, KVX_ERR_UNSUPPORTED, "kvx_stream_wait needs KVX_CUDA defined where KVX_IMPLEMENTATION is");
    return kvx__stream->wait(q, t, stream);
}

KVX_API const volatile uint64_t *kvx_stream_status_ptr(kvx_queue *q, kvx_ticket t) {
    if (!q) return NULL;
    if (!kvx__stream) {
        kvx__fail(q->ctx, KVX_ERR_UNSUPPORTED, "kvx_stream_status_ptr needs KVX_CUDA defined where KVX_IMPLEMENTATION is");
        return NULL;
    }
    return kvx__stream->status_ptr(q, t);
}

#endif /* KVX_CORE_INCLUDED */
