/*
    kvx_host_cache.h -- what the tests and benchmarks share: host KV
    caches laid out like an engine's, a fill pattern that every byte can be
    checked against, and block tables.

    The pattern of a byte is a function of (seed, layer, plane, block, global
    head, token, byte offset), so a reader can check any byte it received from
    any prefill rank, whichever TP split produced it. The seed changes per run,
    so stale bytes from an earlier run never pass.
*/
#ifndef KVX_HOST_CACHE_H
#define KVX_HOST_CACHE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "../../kvx.h"

typedef struct kvx_ex_cache {
    kvx_layout lay;             /* defaults filled in */
    int rank, tp;
    uint32_t head_first;        /* first global head this rank holds */
    uint64_t block_bytes, block_stride, plane_bytes;
    uint64_t head_stride, token_stride;  /* inside a block: HND head to head, NHD token to token */
    int form;                   /* KVX_EX_*: how the blocks lie */
    uint8_t *mem;               /* one mapping: planes one after another */
    size_t mem_bytes;
    void **bases;               /* one per layer and plane */
} kvx_ex_cache;

typedef struct kvx_ex_mismatch {
    uint32_t layer, plane, local_block, remote_block, head, token;
    uint64_t offset;            /* byte offset inside the local block */
    uint8_t expected, found;
} kvx_ex_mismatch;

static inline uint64_t kvx_ex_mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline uint64_t kvx_ex_word(uint64_t seed, uint32_t layer, uint32_t plane, uint32_t block, uint32_t head, uint32_t token) {
    uint64_t h = kvx_ex_mix(seed ^ ((uint64_t)layer << 40) ^ ((uint64_t)plane << 38) ^ block);
    return kvx_ex_mix(h ^ ((uint64_t)head << 24) ^ token);
}

static inline uint8_t kvx_ex_byte(uint64_t w, uint64_t b) { return (uint8_t)((w >> ((b & 7) << 3)) + (b >> 3) * 131u); }

/* How the blocks of every layer and plane lie in one buffer, as vLLM's
   layouts name them (L: layer and plane, B: block, H: head, N: token, C:
   head_dim): each layer's planes one after another, blocks packed (LBHNC,
   LBNHC, the default); block-outermost (BLHNC, BLNHC); heads outside the
   layers (BHLNC); blocks inside each head (LHBNC). */
enum { KVX_EX_PACKED = 0, KVX_EX_BLOCK_OUTER, KVX_EX_HEAD_OUTER, KVX_EX_BLOCK_INNER };

static inline int kvx_ex_cache_alloc_form(kvx_ex_cache *c, const kvx_layout *lay, int rank, int tp, int form);

/* Allocate a cache of lay for rank of tp. Untouched pages cost nothing, so a
   1.5 GB cache whose few transferred blocks are filled stays cheap. */
static inline int kvx_ex_cache_alloc(kvx_ex_cache *c, const kvx_layout *lay, int rank, int tp) {
    return kvx_ex_cache_alloc_form(c, lay, rank, tp, KVX_EX_PACKED);
}

static inline int kvx_ex_cache_alloc_form(kvx_ex_cache *c, const kvx_layout *lay, int rank, int tp, int form) {
    uint32_t p, np;
    uint64_t hb, run;
    memset(c, 0, sizeof *c);
    c->lay = *lay;
    if (!c->lay.kv_planes) c->lay.kv_planes = 2;
    if (!c->lay.total_heads) c->lay.total_heads = c->lay.num_heads * (uint32_t)tp;
    c->rank = rank;
    c->tp = tp;
    c->form = form;
    c->head_first = c->lay.total_heads >= (uint32_t)tp ? (uint32_t)rank * (c->lay.total_heads / (uint32_t)tp)
                                                        : (uint32_t)rank / ((uint32_t)tp / c->lay.total_heads);
    c->block_bytes = (uint64_t)c->lay.block_tokens * c->lay.num_heads * c->lay.head_dim * c->lay.elem_bytes;
    c->block_stride = c->block_bytes;
    c->plane_bytes = c->block_stride * c->lay.num_blocks;
    hb = (uint64_t)c->lay.head_dim * c->lay.elem_bytes;
    run = hb * c->lay.block_tokens;  /* one head's tokens */
    c->head_stride = c->lay.order == KVX_ORDER_HND ? run : 0;
    c->token_stride = c->lay.order == KVX_ORDER_NHD ? hb * c->lay.num_heads : 0;
    np = c->lay.num_layers * c->lay.kv_planes;
    c->mem_bytes = (size_t)(c->plane_bytes * np);
    c->mem = (uint8_t *)mmap(NULL, c->mem_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c->mem == MAP_FAILED) { c->mem = NULL; return -1; }
    c->bases = (void **)calloc(np, sizeof *c->bases);
    if (!c->bases) return -1;
    if ((form == KVX_EX_HEAD_OUTER || form == KVX_EX_BLOCK_INNER) && c->lay.order != KVX_ORDER_HND) return -1;
    for (p = 0; p < np; p++) {
        size_t at = form == KVX_EX_BLOCK_OUTER ? (size_t)p * c->block_bytes          /* [B][L][block] */
                  : form == KVX_EX_HEAD_OUTER ? (size_t)p * run                      /* [B][H][L][N][C] */
                  : (size_t)p * c->plane_bytes;                                      /* [L][...]: packed, or [L][H][B][N][C] */
        c->bases[p] = c->mem + at;
    }
    if (form == KVX_EX_BLOCK_OUTER) c->block_stride = np * c->block_bytes;
    if (form == KVX_EX_HEAD_OUTER) { c->head_stride = np * run; c->block_stride = np * c->block_bytes; }
    if (form == KVX_EX_BLOCK_INNER) { c->head_stride = run * c->lay.num_blocks; c->block_stride = run; }
    return 0;
}

static inline void kvx_ex_cache_free(kvx_ex_cache *c) {
    if (c->mem) munmap(c->mem, c->mem_bytes);
    free(c->bases);
    memset(c, 0, sizeof *c);
}

static inline kvx_cache_desc kvx_ex_cache_desc(const kvx_ex_cache *c) {
    kvx_cache_desc d;
    memset(&d, 0, sizeof d);
    d.layout = c->lay;
    d.bases = c->bases;
    if (c->form != KVX_EX_PACKED) {
        d.block_stride = c->block_stride;   /* a form other than packed: say so; packed stays all defaults */
        d.head_stride = c->head_stride;
        d.token_stride = c->token_stride;
    }
    return d;
}

/* Byte offset inside a block of (local head index h, token t). */
static inline uint64_t kvx_ex_offset(const kvx_ex_cache *c, uint32_t h, uint32_t t) {
    uint64_t hb = (uint64_t)c->lay.head_dim * c->lay.elem_bytes;
    return c->lay.order == KVX_ORDER_HND ? (uint64_t)h * c->head_stride + (uint64_t)t * hb
                                         : (uint64_t)t * c->token_stride + (uint64_t)h * hb;
}

static inline uint8_t *kvx_ex_block(const kvx_ex_cache *c, uint32_t layer, uint32_t plane, uint32_t block) {
    return (uint8_t *)c->bases[layer * c->lay.kv_planes + plane] + (uint64_t)block * c->block_stride;
}

/* Write into heads [a, b) of the local blocks the pattern of the remote
   blocks they are read from, each byte xor flip. */
static inline void kvx_ex_stamp(const kvx_ex_cache *c, uint64_t seed, const uint32_t *local, const uint32_t *remote, uint32_t n,
                                uint32_t layer_begin, uint32_t layer_end, uint32_t a, uint32_t bh, uint8_t flip) {
    uint64_t hb = (uint64_t)c->lay.head_dim * c->lay.elem_bytes, b;
    uint32_t i, l, p, g, t;
    for (i = 0; i < n; i++)
        for (l = layer_begin; l < layer_end; l++)
            for (p = 0; p < c->lay.kv_planes; p++)
                for (g = a; g < bh; g++)
                    for (t = 0; t < c->lay.block_tokens; t++) {
                        uint64_t w = kvx_ex_word(seed, l, p, remote[i], g, t);
                        uint8_t *d = kvx_ex_block(c, l, p, local[i]) + kvx_ex_offset(c, g - c->head_first, t);
                        for (b = 0; b < hb; b++) d[b] = (uint8_t)(kvx_ex_byte(w, b) ^ flip);
                    }
}

/* Write the pattern into the given blocks (prefill side), all layers. */
static inline void kvx_ex_fill(const kvx_ex_cache *c, uint64_t seed, const uint32_t *blocks, uint32_t n) {
    kvx_ex_stamp(c, seed, blocks, blocks, n, 0, c->lay.num_layers, c->head_first, c->head_first + c->lay.num_heads, 0);
}

/* Before a read: fill the destination heads [a, b) with the complement of
   what should arrive, so that a byte never written cannot pass. */
static inline void kvx_ex_poison(const kvx_ex_cache *c, uint64_t seed, const uint32_t *local, const uint32_t *remote, uint32_t n,
                          uint32_t layer_begin, uint32_t layer_end, uint32_t a, uint32_t bh) {
    kvx_ex_stamp(c, seed, local, remote, n, layer_begin, layer_end, a, bh, 0xFF);
}

/* Check every byte of heads [a, b) of the read blocks; 0 if all match, else
   the number of wrong bytes and the first one in *mm. */
static inline uint64_t kvx_ex_verify(const kvx_ex_cache *c, uint64_t seed, const uint32_t *local, const uint32_t *remote, uint32_t n,
                              uint32_t layer_begin, uint32_t layer_end, uint32_t a, uint32_t bh, kvx_ex_mismatch *mm) {
    uint64_t hb = (uint64_t)c->lay.head_dim * c->lay.elem_bytes, b, bad = 0;
    uint32_t i, l, p, g, t;
    for (i = 0; i < n; i++)
        for (l = layer_begin; l < layer_end; l++)
            for (p = 0; p < c->lay.kv_planes; p++)
                for (g = a; g < bh; g++)
                    for (t = 0; t < c->lay.block_tokens; t++) {
                        uint64_t w = kvx_ex_word(seed, l, p, remote[i], g, t), off = kvx_ex_offset(c, g - c->head_first, t);
                        const uint8_t *d = kvx_ex_block(c, l, p, local[i]) + off;
                        for (b = 0; b < hb; b++) {
                            uint8_t e = kvx_ex_byte(w, b);
                            if (d[b] == e) continue;
                            if (!bad++ && mm) {
                                mm->layer = l; mm->plane = p; mm->local_block = local[i]; mm->remote_block = remote[i];
                                mm->head = g; mm->token = t; mm->offset = off + b; mm->expected = e; mm->found = d[b];
                            }
                        }
                    }
    return bad;
}

/* n distinct block ids in [0, num_blocks): random (seeded) or consecutive from start. */
static inline void kvx_ex_block_table(uint32_t *out, uint32_t n, uint32_t num_blocks, int random, uint64_t seed, uint32_t start) {
    uint32_t i;
    if (!random) {
        for (i = 0; i < n; i++) out[i] = (start + i) % num_blocks;
        return;
    }
    {
        /* partial Fisher-Yates over a virtual identity permutation */
        uint32_t *perm = (uint32_t *)malloc((size_t)num_blocks * sizeof *perm);
        uint64_t s = seed;
        if (!perm) { for (i = 0; i < n; i++) out[i] = i; return; }
        for (i = 0; i < num_blocks; i++) perm[i] = i;
        for (i = 0; i < n && i < num_blocks; i++) {
            uint32_t j = i + (uint32_t)((s = kvx_ex_mix(s)) % (num_blocks - i)), tmp = perm[i];
            perm[i] = perm[j];
            perm[j] = tmp;
            out[i] = perm[i];
        }
        free(perm);
    }
}

#endif
