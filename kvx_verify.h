/* SPDX-License-Identifier: MIT */
/*
    kvx_verify.h -- verify mode: which blocks a verified read samples, the
    checksum of one head of one block, and what a failed check says. Part of
    kvx's implementation, included by kvx.h; do not include it yourself.

    A producer seals blocks (kvx_cache_seal): a 32-bit sum per (layer, K/V,
    block, head) in a table registered with the cache and published in its
    metadata. A verified read (kvx_read.verify = N) samples one block in N,
    reads the producer's sums of the heads it takes into its own table, and
    compares them with sums of what landed. Host caches are summed and
    checked here by the CPU; GPU caches by the backend's checksum entries
    (kvx_cuda.h, the same rule as kernels).
*/
#ifndef KVX_VERIFY_INCLUDED
#define KVX_VERIFY_INCLUDED
#include "kvx_internal.h"

/* Verified reads run a second cursor, over the sampled blocks, that reads
   the producer's checksums of the heads taken into our own table. */
KVX__PRIV int kvx__sampled(const kvx__read *rd) { return (rd->v_idx + rd->ticket) % rd->verify == 0; }
/* The same rule in closed form: the first sampled block index, and how many
   of a read's nblocks (per plane) are sampled. */
KVX__PRIV uint32_t kvx__sample_first(const kvx__read *rd) { return (uint32_t)((rd->verify - rd->ticket % rd->verify) % rd->verify); }
KVX__PRIV uint32_t kvx__sample_count(const kvx__read *rd, uint32_t nblocks) {
    uint32_t first = kvx__sample_first(rd);
    return first < nblocks ? (nblocks - 1 - first) / rd->verify + 1 : 0;
}

KVX__PRIV void kvx__vcursor_next(kvx__read *rd, const kvx__run *runs, uint32_t cap) {
    rd->v_idx++;
    if (++rd->v_blk < runs[(rd->run0 + rd->v_run) % cap].n) return;
    rd->v_blk = 0;
    if (++rd->v_run < rd->nruns) return;
    rd->v_run = 0;
    rd->v_idx = 0;
    rd->v_plane++;
}

/* Index of (plane, block, head) in a checksum table. */
KVX__PRIV uint64_t kvx__csum_index(const kvx__cache_info *c, uint32_t plane, uint32_t block, uint32_t head) {
    return ((uint64_t)plane * c->lay.num_blocks + block) * c->lay.num_heads + head;
}

KVX__PRIV int kvx__vcursor_op(kvx__read *rd, const kvx__run *runs, uint32_t cap, kvx__op *op) {
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    const kvx__run *run;
    for (;;) {
        if (rd->v_plane >= rd->layer_end * lc->lay.kv_planes) return 0;
        if (kvx__sampled(rd)) break;
        kvx__vcursor_next(rd, runs, cap);
    }
    run = &runs[(rd->run0 + rd->v_run) % cap];
    op->count = 1;
    op->lstride = op->rstride = 0;
    op->lreg = lc->csum_region;
    op->rreg = rc->csum_region;
    op->laddr = lc->regions[lc->csum_region].addr + 4u * kvx__csum_index(lc, rd->v_plane, run->l + rd->v_blk, rd->h_a - rd->h_l0);
    op->raddr = rc->regions[rc->csum_region].addr + 4u * kvx__csum_index(rc, rd->v_plane, run->r + rd->v_blk, rd->h_a - rd->h_r0);
    op->len = 4u * (uint64_t)(rd->h_b - rd->h_a);
    return 1;
}

/* A checksum of one head of one block: its slices in token order (one slice
   in HND, one per token in NHD), 8 bytes at a time, never 0 (0 = unsealed). */
KVX__PRIV uint32_t kvx__head_sum(const kvx__cache_info *c, const uint8_t *block, uint32_t head) {
    const kvx_layout *l = &c->lay;
    uint64_t hb = (uint64_t)l->head_dim * l->elem_bytes, h = 0x243F6A8885A308D3ull, i;
    uint32_t t, nt = l->order == KVX_ORDER_HND ? 1u : l->block_tokens;
    uint64_t len = l->order == KVX_ORDER_HND ? hb * l->block_tokens : hb;
    for (t = 0; t < nt; t++) {
        const uint8_t *p = block + (l->order == KVX_ORDER_HND ? (uint64_t)head * c->head_stride : (uint64_t)t * c->token_stride + (uint64_t)head * hb);
        for (i = 0; i + 8 <= len; i += 8) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            h = (h ^ w) * 0x9E3779B97F4A7C15ull;
            h ^= h >> 29;
        }
        for (; i < len; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    }
    h ^= h >> 32;
    return (uint32_t)h | 1u;
}

/* The host side of kvx_cache_seal: the CPU sums each head of each block. */
KVX__PRIV void kvx__seal_host(kvx__cache_info *ci, const uint32_t *blocks, uint32_t n) {
    uint32_t i, p, h;
    for (p = 0; p < ci->nplanes; p++)
        for (i = 0; i < n; i++) {
            const uint8_t *b = (const uint8_t *)(uintptr_t)(ci->plane_base[p] + (uint64_t)blocks[i] * ci->block_stride);
            for (h = 0; h < ci->lay.num_heads; h++) ci->csum[kvx__csum_index(ci, p, blocks[i], h)] = kvx__head_sum(ci, b, h);
        }
}

/* What a failed check says, for host and GPU caches alike. */
KVX__PRIV kvx_status kvx__verify_unsealed(const kvx__read *rd, uint32_t plane, uint32_t rblock) {
    const kvx__cache_info *lc = rd->lc;
    return kvx__fail(rd->q->ctx, KVX_ERR_ARG, "read %llu from %s/%d: block %u (layer %u, %s) was never sealed by the producer (kvx_cache_seal)",
                     (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rblock,
                     plane / lc->lay.kv_planes, plane % lc->lay.kv_planes ? "V" : "K");
}

KVX__PRIV kvx_status kvx__verify_mismatch(const kvx__read *rd, uint32_t plane, uint32_t rblock, uint32_t lblock, uint32_t head, uint32_t got, uint32_t want) {
    const kvx__cache_info *lc = rd->lc;
    return kvx__fail(rd->q->ctx, KVX_ERR_CORRUPT, "read %llu from %s/%d over %s: layer %u %s block %u (local %u) head %u: checksum 0x%08x, the producer sealed 0x%08x",
                     (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rd->peer->transport,
                     plane / lc->lay.kv_planes, plane % lc->lay.kv_planes ? "V" : "K", rblock, lblock, head, got, want);
}

/* After a verified read into host memory: the producer's checksums now sit
   in our table at the sampled blocks; compare them with what landed. */
KVX__PRIV kvx_status kvx__verify_host(kvx__read *rd) {
    const kvx__cache_info *lc = rd->lc;
    kvx_queue *q = rd->q;
    uint32_t p, r, b, idx, h;
    for (p = rd->layer_begin * lc->lay.kv_planes; p < rd->layer_end * lc->lay.kv_planes; p++)
        for (idx = 0, r = 0; r < rd->nruns; r++) {
            const kvx__run *run = &q->runs[(rd->run0 + r) % q->max_runs];
            for (b = 0; b < run->n; b++, idx++) {
                const uint8_t *blk;
                if ((idx + rd->ticket) % rd->verify) continue;
                blk = (const uint8_t *)(uintptr_t)(lc->plane_base[p] + (uint64_t)(run->l + b) * lc->block_stride);
                for (h = rd->h_a; h < rd->h_b; h++) {
                    uint32_t want = lc->csum[kvx__csum_index(lc, p, run->l + b, h - rd->h_l0)];
                    uint32_t got = kvx__head_sum(lc, blk, h - rd->h_l0);
                    if (!want) return kvx__verify_unsealed(rd, p, run->r + b);
                    if (want != got) return kvx__verify_mismatch(rd, p, run->r + b, run->l + b, h, got, want);
                }
            }
        }
    return KVX_OK;
}

#endif /* KVX_VERIFY_INCLUDED */
