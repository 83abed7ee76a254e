/* SPDX-License-Identifier: MIT */
/*
    kvx_wire.h -- every byte that crosses a process, over one little-endian
    codec. Part of kvx's implementation, included by kvx.h; do not include it
    yourself.

    Each message type starts with a magic and a version, and a reader
    refuses another version with a message that names both. What crosses:

        metadata     magic "KVX1", version KVX_METADATA_VERSION, backend
                     kind, total length, CRC-32C; then the context (epoch,
                     secret, flags, rank, tp size, pid, name, host), the
                     backend's address and each cache: layout (with its
                     dtype), block and head (HND) or token (NHD) strides,
                     memory kind,
                     regions with their remote keys (the backend's bytes) and
                     plane bases; where signed (flag 1), an HMAC-SHA-256 tag
                     of all that as its last 32 bytes.
        notification magic "XVCN" version 2, 104 bytes: the owner's secret,
                     notify id, the reader's rank, tp size and name.
        UCX address  magic "XVCU" version 2: the UCX version the owner runs
                     (major << 8 | minor), the worker peers reach (active
                     messages only) and the worker of one-sided reads, if any.
        UCX get      kvx's own get over active messages (kvx_ucx_get.h): a
                     request and a reply header, each magic + version; both
                     carry the owner's secret, and the request's nonce.
        libfabric    (kvx_ofi.h) the address in the metadata, magic "KOF1"
                     version 2: provider name, endpoint name (fi_getname);
                     a region's remote key, magic "KVOR" version 2: flags
                     (virtual addressing, raw key), key, base, raw key.
                     Notifications are the 104 bytes above.
        CUDA         (kvx_cuda.h) the address in the metadata, magic "XVCA"
                     version 2: process token, pid, unix socket path; a
                     region's remote key, magic "XVCR" version 2: device
                     uuid and ordinal, then per allocation its kind, base,
                     size and IPC handle or pool id + export data; the
                     messages over the unix socket, magic "XVCM" version 2,
                     types export request, reply, notification (its 104 bytes).

    Every backend's bytes begin with magic (4), version (2), type (2). Their
    readers return KVX__WIRE_OK or what was wrong (kvx__wire_why): another
    magic, another version (and the version found), another type, input
    truncated, or oversized (trailing bytes, a field over its bound).

    The codec: writers never fail (a buffer too small only counts the
    length, so one pass sizes and a second writes); readers bound every
    field by what is left and by a caller's maximum, and set a sticky bad
    flag instead of reading past the end.
*/
#ifndef KVX_WIRE_INCLUDED
#define KVX_WIRE_INCLUDED
#include "kvx_internal.h"
#include "kvx_auth.h"  /* metadata is signed with its HMAC */

#define KVX__MAGIC 0x3158564Bu /* "KVX1" */
#define KVX__HDR_BYTES 16u

typedef struct kvx__wbuf { uint8_t *p; size_t len, cap; } kvx__wbuf;
typedef struct kvx__rbuf { const uint8_t *p; size_t off, len; int bad; } kvx__rbuf;

KVX__PRIV void kvx__put(kvx__wbuf *w, const void *src, size_t n) {
    if (n && w->p && w->len + n <= w->cap) memcpy(w->p + w->len, src, n);
    w->len += n;
}
KVX__PRIV void kvx__put_u(kvx__wbuf *w, uint64_t v, int bytes) {
    uint8_t b[8];
    int i;
    for (i = 0; i < bytes; i++) b[i] = (uint8_t)(v >> (8 * i));
    kvx__put(w, b, (size_t)bytes);
}
KVX__PRIV void kvx__put_blob(kvx__wbuf *w, const void *src, uint32_t n) { kvx__put_u(w, n, 4); kvx__put(w, src, n); }
KVX__PRIV void kvx__put_str(kvx__wbuf *w, const char *s) { kvx__put_blob(w, s, (uint32_t)strlen(s)); }

KVX__PRIV uint64_t kvx__get_u(kvx__rbuf *r, int bytes) {
    uint64_t v = 0;
    int i;
    if (r->bad || r->len - r->off < (size_t)bytes) { r->bad = 1; return 0; }
    for (i = 0; i < bytes; i++) v |= (uint64_t)r->p[r->off + (size_t)i] << (8 * i);
    r->off += (size_t)bytes;
    return v;
}
/* A length-prefixed field, bounded by max; returns a pointer into the blob. */
KVX__PRIV const uint8_t *kvx__get_blob(kvx__rbuf *r, uint32_t max, uint32_t *n) {
    const uint8_t *p;
    *n = (uint32_t)kvx__get_u(r, 4);
    if (r->bad || *n > max || r->len - r->off < *n) { r->bad = 1; *n = 0; return NULL; }
    p = r->p + r->off;
    r->off += *n;
    return p;
}
KVX__PRIV void kvx__get_str(kvx__rbuf *r, char *dst, uint32_t cap) {
    uint32_t n;
    const uint8_t *p = kvx__get_blob(r, cap - 1, &n);
    if (p) memcpy(dst, p, n);
    dst[n] = 0;
}

/* a * b, or UINT64_MAX where that does not fit. */
KVX__PRIV uint64_t kvx__mul_sat(uint64_t a, uint64_t b) { return a && b > UINT64_MAX / a ? UINT64_MAX : a * b; }

KVX__PRIV void kvx__put_cache(kvx__wbuf *w, const kvx__cache_info *c) {
    const kvx_layout *l = &c->lay;
    uint32_t i;
    kvx__put_u(w, c->id, 4);
    kvx__put_u(w, l->num_layers, 4); kvx__put_u(w, l->num_blocks, 4); kvx__put_u(w, l->block_tokens, 4);
    kvx__put_u(w, l->num_heads, 4); kvx__put_u(w, l->head_dim, 4); kvx__put_u(w, l->elem_bytes, 4);
    kvx__put_u(w, l->total_heads, 4);
    kvx__put_u(w, (uint64_t)l->order, 1); kvx__put_u(w, l->kv_planes, 1);
    kvx__put_u(w, (uint64_t)l->dtype, 1);
    kvx__put_u(w, (uint64_t)c->mem, 1);
    kvx__put_u(w, (c->csum_region != KVX__NO_CSUM ? 1u : 0u) | (c->gen_region != KVX__NO_CSUM ? 2u : 0u), 1);
    kvx__put_u(w, (uint64_t)(uint32_t)c->device, 4);
    kvx__put_u(w, c->block_stride, 8);
    kvx__put_u(w, l->order == KVX_ORDER_HND ? c->head_stride : c->token_stride, 8);
    kvx__put_u(w, c->nregions, 4);
    for (i = 0; i < c->nregions; i++) {
        kvx__put_u(w, c->regions[i].addr, 8);
        kvx__put_u(w, c->regions[i].len, 8);
        kvx__put_blob(w, c->regions[i].rkey, c->regions[i].rkey_len);
    }
    for (i = 0; i < c->nplanes; i++) kvx__put_u(w, c->plane_base[i], 8);
}

/* The regions of a cache's entry (address, length, remote key) and its
   plane table, into c (nregions and nplanes checked against the blob). */
KVX__PRIV kvx_status kvx__get_regions(kvx_ctx *ctx, kvx__rbuf *r, kvx__cache_info *c, const char *what) {
    uint32_t i, n;
    c->regions = (kvx__region *)kvx__calloc(c->nregions, sizeof *c->regions);
    c->plane_base = (uint64_t *)kvx__calloc(c->nplanes, sizeof *c->plane_base);
    c->plane_region = (uint16_t *)kvx__calloc(c->nplanes, sizeof *c->plane_region);
    if (!c->regions || !c->plane_base || !c->plane_region) return kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", what);
    for (i = 0; i < c->nregions; i++) {
        const uint8_t *k;
        c->regions[i].addr = kvx__get_u(r, 8);
        c->regions[i].len = kvx__get_u(r, 8);
        k = kvx__get_blob(r, KVX__MAX_RKEY, &n);
        if (r->bad) return kvx__fail(ctx, KVX_ERR_ARG, "%s: truncated or oversized remote key of region %u", what, i);
        if (c->regions[i].addr + c->regions[i].len < c->regions[i].addr)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: region %u wraps the address space", what, i);
        c->regions[i].rkey = (uint8_t *)KVX_MALLOC(n ? n : 1);
        if (!c->regions[i].rkey) return kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", what);
        if (n) memcpy(c->regions[i].rkey, k, n);
        c->regions[i].rkey_len = n;
    }
    for (i = 0; i < c->nplanes; i++) c->plane_base[i] = kvx__get_u(r, 8);
    if (r->bad) return kvx__fail(ctx, KVX_ERR_ARG, "%s: truncated in plane table", what);
    return KVX_OK;
}

/* The tables a cache's entry says it has (bit 0: checksums, bit 1:
   generations) are its last regions, each large enough; then where each
   plane lies. */
KVX__PRIV kvx_status kvx__cache_tables(kvx_ctx *ctx, kvx__cache_info *c, uint32_t tables, const char *what) {
    const kvx_layout *l = &c->lay;
    uint32_t n;
    if (tables & ~3u) return kvx__fail(ctx, KVX_ERR_ARG, "%s: unknown table flags 0x%x", what, tables);
    n = c->nregions;
    if (n < 1u + (tables & 1u) + (tables >> 1))
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u regions cannot hold the data and its %s", what, n,
                         tables == 3 ? "checksum and generation tables" : tables == 1 ? "checksum table" : "generation table");
    if (tables & 2u) {
        uint64_t need = (uint64_t)l->num_blocks * 8u;
        c->gen_region = --n;
        if (c->regions[c->gen_region].len < need)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: generation table of %llu bytes where %llu are needed", what,
                             (unsigned long long)c->regions[c->gen_region].len, (unsigned long long)need);
    }
    if (tables & 1u) {
        uint64_t need = kvx__mul_sat(kvx__mul_sat((uint64_t)c->nplanes * l->num_blocks, l->num_heads), 4u);  /* saturates: no wrap to a small size */
        c->csum_region = --n;
        if (c->regions[c->csum_region].len < need)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: checksum table of %llu bytes where %llu are needed", what,
                             (unsigned long long)c->regions[c->csum_region].len, (unsigned long long)need);
    }
    return kvx__planes_locate(ctx, c, what);
}

KVX__PRIV kvx_status kvx__get_cache(kvx_ctx *ctx, kvx__rbuf *r, kvx__cache_info *c, int tp_size, const char *who) {
    kvx_layout *l = &c->lay;
    uint32_t tables;
    uint64_t inner;
    kvx_status st;
    char what[160];
    c->id = (uint32_t)kvx__get_u(r, 4);
    l->num_layers = (uint32_t)kvx__get_u(r, 4); l->num_blocks = (uint32_t)kvx__get_u(r, 4);
    l->block_tokens = (uint32_t)kvx__get_u(r, 4); l->num_heads = (uint32_t)kvx__get_u(r, 4);
    l->head_dim = (uint32_t)kvx__get_u(r, 4); l->elem_bytes = (uint32_t)kvx__get_u(r, 4);
    l->total_heads = (uint32_t)kvx__get_u(r, 4);
    l->order = (kvx_order)kvx__get_u(r, 1); l->kv_planes = (uint32_t)kvx__get_u(r, 1);
    l->dtype = (kvx_dtype)kvx__get_u(r, 1);
    c->mem = (kvx_mem)kvx__get_u(r, 1);
    tables = (uint32_t)kvx__get_u(r, 1);  /* bit 0: checksums, bit 1: generations; the last regions */
    c->csum_region = c->gen_region = KVX__NO_CSUM;
    c->device = (int)(uint32_t)kvx__get_u(r, 4);
    c->block_stride = kvx__get_u(r, 8);
    inner = kvx__get_u(r, 8);  /* HND: head to head; NHD: token to token */
    c->nregions = (uint32_t)kvx__get_u(r, 4);
    if (r->bad) return kvx__fail(ctx, KVX_ERR_ARG, "%s: truncated in cache header", who);
    snprintf(what, sizeof what, "%s cache %u", who, c->id);
    if (!l->total_heads || !l->kv_planes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: total_heads %u and kv_planes %u must be set", what, l->total_heads, l->kv_planes);
    if ((st = kvx__layout_check(ctx, l, tp_size, what)) != KVX_OK) return st;
    if (c->mem != KVX_MEM_HOST && c->mem != KVX_MEM_CUDA)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: memory kind %d unknown", what, (int)c->mem);
    if (!c->block_stride || !inner) return kvx__fail(ctx, KVX_ERR_ARG, "%s: a block or %s stride of 0", what, l->order == KVX_ORDER_HND ? "head" : "token");
    if (l->order == KVX_ORDER_HND) c->head_stride = inner; else c->token_stride = inner;
    if ((st = kvx__strides_check(ctx, c, what)) != KVX_OK) return st;
    if (!c->nregions || c->nregions > KVX__MAX_REGIONS)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u regions (1 to %u allowed)", what, c->nregions, KVX__MAX_REGIONS);
    c->nplanes = l->num_layers * l->kv_planes;
    /* Bound allocations by what the blob can hold before allocating. */
    if ((uint64_t)c->nregions * 20 + (uint64_t)c->nplanes * 8 > r->len - r->off)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: truncated: %u regions and %u planes do not fit in the remaining %zu bytes",
                         what, c->nregions, c->nplanes, r->len - r->off);
    if ((st = kvx__get_regions(ctx, r, c, what)) != KVX_OK) return st;
    return kvx__cache_tables(ctx, c, tables, what);
}

#define KVX__MD_SIGNED 1u
/* The tag of a signed blob of len bytes: HMAC-SHA-256 of all of it but the
   tag (its last 32 bytes), with the checksum field as zeros. */
KVX__PRIV void kvx__md_tag(const uint8_t *key, uint32_t klen, const uint8_t *blob, size_t len, uint8_t tag[32]) {
    uint8_t head[KVX__HDR_BYTES];
    memcpy(head, blob, KVX__HDR_BYTES);
    memset(head + 12, 0, 4);
    kvx__hmac_sha256(key, klen, head, KVX__HDR_BYTES, blob + KVX__HDR_BYTES, len - KVX__HDR_BYTES - KVX__TAG_BYTES, tag);
}

KVX__PRIV kvx_status kvx__md_write(kvx_ctx *ctx, kvx__wbuf *w) {
    const uint8_t *addr = NULL;
    uint32_t alen = 0, i, crc;
    kvx_status st = ctx->be_ops->address(ctx, &addr, &alen);
    if (st != KVX_OK) return st;
    kvx__put_u(w, KVX__MAGIC, 4);
    kvx__put_u(w, KVX_METADATA_VERSION, 2);
    kvx__put_u(w, (uint64_t)ctx->be_ops->kind, 2);
    kvx__put_u(w, 0, 4); /* total length, patched */
    kvx__put_u(w, 0, 4); /* checksum, patched */
    kvx__put_u(w, ctx->epoch, 8);
    kvx__put(w, ctx->secret, KVX__SECRET_BYTES);
    kvx__put_u(w, ctx->md_key ? KVX__MD_SIGNED : 0u, 4);
    kvx__put_u(w, (uint64_t)(uint32_t)ctx->rank, 4);
    kvx__put_u(w, (uint64_t)(uint32_t)ctx->tp_size, 4);
    kvx__put_u(w, (uint64_t)(uint32_t)getpid(), 4);
    kvx__put_str(w, ctx->name);
    kvx__put_str(w, ctx->host);
    kvx__put_blob(w, addr, alen);
    kvx__put_u(w, ctx->ncaches, 4);
    for (i = 0; i < ctx->ncaches; i++) kvx__put_cache(w, &ctx->caches[i]->info);
    if (ctx->md_key) {
        uint8_t zero[KVX__TAG_BYTES];
        memset(zero, 0, sizeof zero);
        kvx__put(w, zero, KVX__TAG_BYTES);  /* the tag, written below */
    }
    if (w->p && w->len <= w->cap) {
        uint8_t *p = w->p;
        for (i = 0; i < 4; i++) p[8 + i] = (uint8_t)(w->len >> (8 * i));
        if (ctx->md_key) kvx__md_tag(ctx->md_key, ctx->md_key_len, p, w->len, p + w->len - KVX__TAG_BYTES);
        crc = kvx__crc32c(0, p, w->len);
        for (i = 0; i < 4; i++) p[12 + i] = (uint8_t)(crc >> (8 * i));
    }
    return KVX_OK;
}

/* Signed or not as this context requires, the tag right, the epoch not far
   ahead of this host's clock (a forged epoch would lock the real owner's
   restarts out). Before any field past the flags is believed. */
KVX__PRIV kvx_status kvx__md_auth(kvx_ctx *ctx, const uint8_t *md, size_t len, uint32_t flags, uint64_t epoch) {
    struct timespec ts;
    uint64_t now;
    if (flags & ~KVX__MD_SIGNED) return kvx__fail(ctx, KVX_ERR_ARG, "metadata: unknown flags 0x%x", flags);
    if (ctx->md_key && !(flags & KVX__MD_SIGNED))
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata: unsigned, and this context takes only metadata signed with its deployment key (%s)",
                         ctx->md_key_from);
    if (!ctx->md_key && (flags & KVX__MD_SIGNED))
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata: signed with a deployment key, and this context has none to check it "
                         "(set kvx_ctx_desc.metadata_key or $KVX_METADATA_KEY_FILE to the key its peers use)");
    if (flags & KVX__MD_SIGNED) {
        uint8_t tag[KVX__TAG_BYTES];
        if (len < KVX__HDR_BYTES + 8u + KVX__SECRET_BYTES + 4u + KVX__TAG_BYTES)
            return kvx__fail(ctx, KVX_ERR_ARG, "metadata: signed, but %zu bytes cannot hold a tag", len);
        kvx__md_tag(ctx->md_key, ctx->md_key_len, md, len, tag);
        if (!kvx__ct_equal(tag, md + len - KVX__TAG_BYTES, KVX__TAG_BYTES))
            return kvx__fail(ctx, KVX_ERR_CORRUPT, "metadata: the signature does not match: signed with another deployment key, "
                             "or changed after signing (this context's key: %s)", ctx->md_key_from);
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    if (epoch > now + KVX__EPOCH_AHEAD_NS)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata: epoch %llu is %.0f s ahead of this host's clock (at most %llu s allowed): "
                         "a forged blob, or clocks far apart", (unsigned long long)epoch, (double)(epoch - now) / 1e9,
                         (unsigned long long)(KVX__EPOCH_AHEAD_NS / 1000000000ull));
    return KVX_OK;
}

/* A blob's first 16 bytes: magic, version, backend, its length and checksum,
   each checked; rb is left after them. */
KVX__PRIV kvx_status kvx__md_envelope(kvx_ctx *ctx, const uint8_t *md, size_t len, kvx__rbuf *rb) {
    uint32_t magic, ver, kind, total, crc, want;
    uint8_t zero[4] = {0, 0, 0, 0};
    memset(rb, 0, sizeof *rb);
    rb->p = md; rb->len = len;
    if (len < KVX__HDR_BYTES)
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata: truncated: %zu bytes, the header alone is %u", len, KVX__HDR_BYTES);
    magic = (uint32_t)kvx__get_u(rb, 4);
    ver = (uint32_t)kvx__get_u(rb, 2);
    kind = (uint32_t)kvx__get_u(rb, 2);
    total = (uint32_t)kvx__get_u(rb, 4);
    crc = (uint32_t)kvx__get_u(rb, 4);
    if (magic != KVX__MAGIC) return kvx__fail(ctx, KVX_ERR_ARG, "metadata: magic 0x%08x is not kvx's 0x%08x", magic, KVX__MAGIC);
    if (ver != KVX_METADATA_VERSION)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata: version %u, this kvx reads version %u", ver, KVX_METADATA_VERSION);
    if (total != len)
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata: %s: the blob says %u bytes, %zu were given",
                         total > len ? "truncated" : "trailing bytes", total, len);
    want = kvx__crc32c(0, md, 12);
    want = kvx__crc32c(want, zero, 4);
    want = kvx__crc32c(want, md + 16, len - 16);
    if (want != crc)
        return kvx__fail(ctx, KVX_ERR_CORRUPT, "metadata: checksum 0x%08x, computed 0x%08x: the blob was corrupted", crc, want);
    if (kind != (uint32_t)ctx->be_ops->kind)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata: backend %u (%s), this context runs %u (%s)", kind,
                         kvx_backend_name((kvx_backend)kind),
                         (unsigned)ctx->be_ops->kind, ctx->be_ops->name);
    return KVX_OK;
}

/* Parse and validate a blob into p (fields, caches). Nothing trusted. */
KVX__PRIV kvx_status kvx__md_parse(kvx_ctx *ctx, const uint8_t *md, size_t len, kvx_peer *p) {
    kvx__rbuf r;
    uint32_t i, alen, flags;
    const uint8_t *addr;
    kvx_status st;
    if ((st = kvx__md_envelope(ctx, md, len, &r)) != KVX_OK) return st;
    p->epoch = kvx__get_u(&r, 8);
    if (r.len - r.off >= KVX__SECRET_BYTES) { memcpy(p->secret, md + r.off, KVX__SECRET_BYTES); r.off += KVX__SECRET_BYTES; }
    else r.bad = 1;
    flags = (uint32_t)kvx__get_u(&r, 4);
    if (!r.bad && (st = kvx__md_auth(ctx, md, len, flags, p->epoch)) != KVX_OK) return st;
    if (flags & KVX__MD_SIGNED) r.len -= KVX__TAG_BYTES;  /* the tag is not fields */
    p->rank = (int)(uint32_t)kvx__get_u(&r, 4);
    p->tp_size = (int)(uint32_t)kvx__get_u(&r, 4);
    p->pid = (uint32_t)kvx__get_u(&r, 4);
    kvx__get_str(&r, p->name, sizeof p->name);
    kvx__get_str(&r, p->host, sizeof p->host);
    addr = kvx__get_blob(&r, KVX__MAX_ADDR, &alen);
    p->ncaches = (uint32_t)kvx__get_u(&r, 4);
    if (r.bad) return kvx__fail(ctx, KVX_ERR_ARG, "metadata: truncated or oversized field in the header");
    if (p->tp_size < 1 || p->tp_size > 65536 || p->rank < 0 || p->rank >= p->tp_size)
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata from %s: rank %d outside [0, tp_size %d)", p->name, p->rank, p->tp_size);
    if (p->ncaches > KVX__MAX_CACHES)
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata from %s/%d: %u caches, at most %u", p->name, p->rank, p->ncaches, KVX__MAX_CACHES);
    p->addr = (uint8_t *)KVX_MALLOC(alen ? alen : 1);
    p->caches = (kvx__cache_info *)kvx__calloc(p->ncaches ? p->ncaches : 1, sizeof *p->caches);
    if (!p->addr || !p->caches) return kvx__fail(ctx, KVX_ERR_NOMEM, "metadata: out of memory");
    if (alen) memcpy(p->addr, addr, alen);
    p->addr_len = alen;
    for (i = 0; i < p->ncaches; i++) {
        char who[128];
        snprintf(who, sizeof who, "metadata from %s/%d", p->name, p->rank);
        if ((st = kvx__get_cache(ctx, &r, &p->caches[i], p->tp_size, who)) != KVX_OK) return st;
    }
    if (r.off != r.len) return kvx__fail(ctx, KVX_ERR_ARG, "metadata from %s/%d: %zu bytes left over", p->name, p->rank, r.len - r.off);
    return KVX_OK;
}


/*--- message headers: magic, version, type ----------------------------------*/

/* What a reader found wrong; kvx__wire_why names it. */
#define KVX__WIRE_OK 0
#define KVX__WIRE_MAGIC 1       /* not this message (another magic) */
#define KVX__WIRE_VERSION 2     /* another version: *ver holds it */
#define KVX__WIRE_TYPE 3        /* another type under this magic */
#define KVX__WIRE_TRUNCATED 4
#define KVX__WIRE_OVERSIZED 5   /* trailing bytes, or a field over its bound */
#define KVX__WIRE_FIELD 6       /* a field out of range (the backend says which) */
#define KVX__WIRE_HDR_BYTES 8u  /* magic 4, version 2, type 2 */

KVX__PRIV_MAYBE const char *kvx__wire_why(int e) {
    switch (e) {
    case KVX__WIRE_OK: return "ok";
    case KVX__WIRE_MAGIC: return "another magic";
    case KVX__WIRE_VERSION: return "another version";
    case KVX__WIRE_TYPE: return "another type";
    case KVX__WIRE_TRUNCATED: return "truncated";
    case KVX__WIRE_OVERSIZED: return "oversized";
    default: return "a field out of range";
    }
}

KVX__PRIV_MAYBE void kvx__wire_hdr_write(kvx__wbuf *w, uint8_t *buf, size_t cap, uint32_t magic, uint32_t ver, uint32_t type) {
    memset(w, 0, sizeof *w);
    w->p = buf; w->cap = cap;
    kvx__put_u(w, magic, 4);
    kvx__put_u(w, ver, 2);
    kvx__put_u(w, type, 2);
}
/* The header: KVX__WIRE_OK when magic and version match (*type the type
   found); *ver the version found where the magic matched, 0 else. */
KVX__PRIV_MAYBE int kvx__wire_hdr_read(kvx__rbuf *r, const uint8_t *buf, size_t len, uint32_t magic, uint32_t want_ver, uint32_t *ver, uint32_t *type) {
    uint32_t m, v;
    memset(r, 0, sizeof *r);
    r->p = buf; r->len = buf ? len : 0;
    *ver = 0; *type = 0;
    m = (uint32_t)kvx__get_u(r, 4);
    if (r->bad) return KVX__WIRE_TRUNCATED;
    if (m != magic) return KVX__WIRE_MAGIC;
    v = (uint32_t)kvx__get_u(r, 2);
    *type = (uint32_t)kvx__get_u(r, 2);
    *ver = v;
    if (r->bad) return KVX__WIRE_TRUNCATED;
    return v == want_ver ? KVX__WIRE_OK : KVX__WIRE_VERSION;
}
/* A length-prefixed field of at most max bytes; *e set on a refusal. */
KVX__PRIV_MAYBE const uint8_t *kvx__wire_blob(kvx__rbuf *r, uint32_t max, uint32_t *n, int *e) {
    const uint8_t *p;
    if (!r->bad && r->len - r->off >= 4) {
        uint32_t want = (uint32_t)r->p[r->off] | (uint32_t)r->p[r->off + 1] << 8 | (uint32_t)r->p[r->off + 2] << 16 | (uint32_t)r->p[r->off + 3] << 24;
        if (want > max) { r->bad = 1; *n = 0; if (!*e) *e = KVX__WIRE_OVERSIZED; return NULL; }
    }
    p = kvx__get_blob(r, max, n);
    if (r->bad && !*e) *e = KVX__WIRE_TRUNCATED;
    return p;
}
/* A length-prefixed string of 1 to cap - 1 bytes into dst, with its 0; a
   string that is empty or holds a 0 byte is KVX__WIRE_FIELD. */
KVX__PRIV_MAYBE void kvx__wire_str(kvx__rbuf *r, char *dst, uint32_t cap, int *e) {
    uint32_t n = 0;
    const uint8_t *p = kvx__wire_blob(r, cap - 1, &n, e);
    if (p) memcpy(dst, p, n);
    dst[n] = 0;
    if (p && !*e && (!n || memchr(dst, 0, n))) *e = KVX__WIRE_FIELD;
}

/* The end of a message: truncated if a field ran past it, oversized if bytes are left. */
KVX__PRIV_MAYBE int kvx__wire_end(const kvx__rbuf *r, int e) {
    if (e) return e;
    if (r->bad) return KVX__WIRE_TRUNCATED;
    return r->off != r->len ? KVX__WIRE_OVERSIZED : KVX__WIRE_OK;
}

/* A notification, from a reader to the owner of the blocks it read: the
   owner's secret (without it the owner drops it unanswered), the notify id,
   and who read: rank of tp_size, name (a length byte, then up to 63 bytes,
   zero-padded to 64). Fixed size, so one receive buffer takes any. */
#define KVX__NOTIFY_MAGIC 0x4e435658u  /* "XVCN" */
#define KVX__NOTIFY_VERSION 2u
#define KVX__NOTIFY_BYTES KVX__NOTIFY_MSG_BYTES  /* header 8, secret 16, id 8, rank 4, tp size 4, name 64 */
typedef struct kvx__notify_msg {
    uint8_t secret[KVX__SECRET_BYTES];
    uint64_t id;
    uint32_t rank, tp_size;
    char name[KVX__MAX_NAME];
} kvx__notify_msg;

KVX__PRIV void kvx__notify_msg_write(uint8_t *buf, const kvx__notify_msg *m) {
    kvx__wbuf w;
    uint8_t name[KVX__MAX_NAME];
    size_t n = strlen(m->name);
    if (n > KVX__MAX_NAME - 1) n = KVX__MAX_NAME - 1;
    memset(name, 0, sizeof name);
    name[0] = (uint8_t)n;
    memcpy(name + 1, m->name, n);
    kvx__wire_hdr_write(&w, buf, KVX__NOTIFY_BYTES, KVX__NOTIFY_MAGIC, KVX__NOTIFY_VERSION, 0);
    kvx__put(&w, m->secret, KVX__SECRET_BYTES);
    kvx__put_u(&w, m->id, 8);
    kvx__put_u(&w, m->rank, 4);
    kvx__put_u(&w, m->tp_size, 4);
    kvx__put(&w, name, KVX__MAX_NAME);
}
/* KVX__WIRE_FIELD: a rank outside [0, tp_size), a tp size past 65536, or a
   name that is empty, too long or not printable. */
KVX__PRIV int kvx__notify_msg_read(const uint8_t *buf, size_t len, kvx__notify_msg *m, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type, i, n;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__NOTIFY_MAGIC, KVX__NOTIFY_VERSION, ver, &type);
    memset(m, 0, sizeof *m);
    if (e) return e;
    if (type != 0) return KVX__WIRE_TYPE;
    if (len != KVX__NOTIFY_BYTES) return len < KVX__NOTIFY_BYTES ? KVX__WIRE_TRUNCATED : KVX__WIRE_OVERSIZED;
    memcpy(m->secret, buf + r.off, KVX__SECRET_BYTES);
    r.off += KVX__SECRET_BYTES;
    m->id = kvx__get_u(&r, 8);
    m->rank = (uint32_t)kvx__get_u(&r, 4);
    m->tp_size = (uint32_t)kvx__get_u(&r, 4);
    n = buf[r.off];
    if (!m->tp_size || m->tp_size > 65536u || m->rank >= m->tp_size || !n || n > KVX__MAX_NAME - 1) return KVX__WIRE_FIELD;
    for (i = 0; i < n; i++) {
        uint8_t c = buf[r.off + 1 + i];
        if (c < 0x20 || c > 0x7e) return KVX__WIRE_FIELD;
        m->name[i] = (char)c;
    }
    for (i = n + 1; i < KVX__MAX_NAME; i++)
        if (buf[r.off + i]) return KVX__WIRE_FIELD;
    return KVX__WIRE_OK;
}

/* kvx's own get (kvx_ucx_get.h). A request asks for count pieces of len
   bytes, at raddr and every rstride after (the owner sends them as one), at
   byte off of the op's pieces in order; wanted within ttl_ns (what is left
   of the read's deadline: the reader takes no byte after it). Its data, if
   any, names more ranges of the same form (kvx__get_range, 32 bytes each),
   whose bytes follow the header's in the one reply: many small blocks go
   in one request and one reply. The reply carries them, or status != 0
   when the owner refused. Both carry the owner's secret, and the request's
   nonce, which the reply repeats: a reader takes a reply only with both,
   from the endpoint it asked. A request of one range (count 1) larger than
   its reply_bytes (not 0) is answered in chunks of kvx__get_chunk bytes
   (the last shorter), each a reply with its own off and len; reply_bytes
   is at least KVX__GET_REPLY_MIN. Version 3 added the ranges in the data;
   version 4, reply_bytes. */
#define KVX__GET_MAGIC 0x47435658u     /* "XVCG" */
#define KVX__GET_VERSION 4u
#define KVX__GET_REQ 1u
#define KVX__GET_REP 2u
#define KVX__GET_REQ_BYTES 96u          /* header 8, secret 16, then 9 x 8 */
#define KVX__GET_REP_BYTES 64u          /* header 8, secret 16, then 4 x 8, status 4, 4 zero */
#define KVX__GET_REPLY_MIN (16u << 10)  /* the smallest reply_bytes an owner splits a reply for */
typedef struct kvx__get_req { uint8_t secret[KVX__SECRET_BYTES]; uint64_t id, nonce, raddr, len, off, ttl_ns, count, rstride, reply_bytes; } kvx__get_req;

/* The bytes of each chunk of a reply of len bytes asked for in replies of
   at most reply_bytes: as even as 64-byte steps make them (len itself when
   it fits one). Reader and owner both count chunks by it. */
KVX__PRIV_MAYBE uint64_t kvx__get_chunk(uint64_t len, uint64_t reply_bytes) {
    uint64_t n;
    if (!reply_bytes || len <= reply_bytes) return len;
    n = (len + reply_bytes - 1) / reply_bytes;
    return ((len + n - 1) / n + 63) & ~(uint64_t)63;
}
typedef struct kvx__get_rep { uint8_t secret[KVX__SECRET_BYTES]; uint64_t id, nonce, off, len; uint32_t status; } kvx__get_rep;

KVX__PRIV_MAYBE void kvx__get_req_write(uint8_t *buf, const kvx__get_req *q) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, KVX__GET_REQ_BYTES, KVX__GET_MAGIC, KVX__GET_VERSION, KVX__GET_REQ);
    kvx__put(&w, q->secret, KVX__SECRET_BYTES);
    kvx__put_u(&w, q->id, 8); kvx__put_u(&w, q->nonce, 8); kvx__put_u(&w, q->raddr, 8); kvx__put_u(&w, q->len, 8); kvx__put_u(&w, q->off, 8);
    kvx__put_u(&w, q->ttl_ns, 8); kvx__put_u(&w, q->count, 8); kvx__put_u(&w, q->rstride, 8); kvx__put_u(&w, q->reply_bytes, 8);
}
KVX__PRIV_MAYBE int kvx__get_req_read(const uint8_t *buf, size_t len, kvx__get_req *q, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__GET_MAGIC, KVX__GET_VERSION, ver, &type);
    if (e) return e;
    if (type != KVX__GET_REQ) return KVX__WIRE_TYPE;
    if (len != KVX__GET_REQ_BYTES) return len < KVX__GET_REQ_BYTES ? KVX__WIRE_TRUNCATED : KVX__WIRE_OVERSIZED;
    memcpy(q->secret, buf + r.off, KVX__SECRET_BYTES);
    r.off += KVX__SECRET_BYTES;
    q->id = kvx__get_u(&r, 8); q->nonce = kvx__get_u(&r, 8); q->raddr = kvx__get_u(&r, 8); q->len = kvx__get_u(&r, 8); q->off = kvx__get_u(&r, 8);
    q->ttl_ns = kvx__get_u(&r, 8); q->count = kvx__get_u(&r, 8); q->rstride = kvx__get_u(&r, 8); q->reply_bytes = kvx__get_u(&r, 8);
    if (q->reply_bytes && q->reply_bytes < KVX__GET_REPLY_MIN) return KVX__WIRE_FIELD;
    return kvx__wire_end(&r, KVX__WIRE_OK);
}
/* One more range of a request, from its data: raddr, len, count, rstride. */
#define KVX__GET_RANGE_BYTES 32u
typedef struct kvx__get_range { uint64_t raddr, len, count, rstride; } kvx__get_range;
KVX__PRIV_MAYBE void kvx__get_range_write(uint8_t *buf, const kvx__get_range *g) {
    kvx__wbuf w;
    w.p = buf; w.cap = KVX__GET_RANGE_BYTES; w.len = 0;
    kvx__put_u(&w, g->raddr, 8); kvx__put_u(&w, g->len, 8); kvx__put_u(&w, g->count, 8); kvx__put_u(&w, g->rstride, 8);
}
/* Range i of a request's data of len bytes: KVX__WIRE_OK, or why not (a
   length that is not whole ranges is truncated). */
KVX__PRIV_MAYBE int kvx__get_range_read(const uint8_t *data, size_t len, size_t i, kvx__get_range *g) {
    kvx__rbuf r;
    if (len % KVX__GET_RANGE_BYTES) return KVX__WIRE_TRUNCATED;
    if (i >= len / KVX__GET_RANGE_BYTES) return KVX__WIRE_FIELD;
    r.p = data + i * KVX__GET_RANGE_BYTES; r.len = KVX__GET_RANGE_BYTES; r.off = 0; r.bad = 0;
    g->raddr = kvx__get_u(&r, 8); g->len = kvx__get_u(&r, 8); g->count = kvx__get_u(&r, 8); g->rstride = kvx__get_u(&r, 8);
    return KVX__WIRE_OK;
}
KVX__PRIV_MAYBE void kvx__get_rep_write(uint8_t *buf, const kvx__get_rep *p) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, KVX__GET_REP_BYTES, KVX__GET_MAGIC, KVX__GET_VERSION, KVX__GET_REP);
    kvx__put(&w, p->secret, KVX__SECRET_BYTES);
    kvx__put_u(&w, p->id, 8); kvx__put_u(&w, p->nonce, 8); kvx__put_u(&w, p->off, 8); kvx__put_u(&w, p->len, 8);
    kvx__put_u(&w, p->status, 4); kvx__put_u(&w, 0, 4);
}
KVX__PRIV_MAYBE int kvx__get_rep_read(const uint8_t *buf, size_t len, kvx__get_rep *p, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__GET_MAGIC, KVX__GET_VERSION, ver, &type);
    if (e) return e;
    if (type != KVX__GET_REP) return KVX__WIRE_TYPE;
    if (len != KVX__GET_REP_BYTES) return len < KVX__GET_REP_BYTES ? KVX__WIRE_TRUNCATED : KVX__WIRE_OVERSIZED;
    memcpy(p->secret, buf + r.off, KVX__SECRET_BYTES);
    r.off += KVX__SECRET_BYTES;
    p->id = kvx__get_u(&r, 8); p->nonce = kvx__get_u(&r, 8); p->off = kvx__get_u(&r, 8); p->len = kvx__get_u(&r, 8);
    p->status = (uint32_t)kvx__get_u(&r, 4);
    kvx__get_u(&r, 4);
    return kvx__wire_end(&r, KVX__WIRE_OK);
}

/*--- the backends' bytes ----------------------------------------------------*/

/* UCX address (kvx_ucx.h): the worker that peers reach, which takes active
   messages only (kvx's get, notifications), and the worker of one-sided
   reads over transports that enforce keys, empty where there is none. The
   blobs are UCX's worker addresses; am and rma point into the bytes read.
   ucx_version is the UCX the owner runs (major << 8 | minor): what a reader
   may ask of it depends on it (several connections, kvx_ucx.h). */
#define KVX__UCX_ADDR_MAGIC 0x55435658u /* "XVCU" */
#define KVX__UCX_ADDR_VERSION 2u
typedef struct kvx__ucx_addr_msg { const uint8_t *am, *rma; uint32_t am_len, rma_len, ucx_version; } kvx__ucx_addr_msg;

KVX__PRIV_MAYBE size_t kvx__ucx_addr_write(uint8_t *buf, size_t cap, const kvx__ucx_addr_msg *m) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, cap, KVX__UCX_ADDR_MAGIC, KVX__UCX_ADDR_VERSION, 0);
    kvx__put_u(&w, m->ucx_version, 4);
    kvx__put_blob(&w, m->am, m->am_len);
    kvx__put_blob(&w, m->rma, m->rma_len);
    return w.len;
}
KVX__PRIV_MAYBE int kvx__ucx_addr_read(const uint8_t *buf, size_t len, kvx__ucx_addr_msg *m, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__UCX_ADDR_MAGIC, KVX__UCX_ADDR_VERSION, ver, &type);
    memset(m, 0, sizeof *m);
    if (e) return e;
    if (type != 0) return KVX__WIRE_TYPE;
    m->ucx_version = (uint32_t)kvx__get_u(&r, 4);
    m->am = kvx__wire_blob(&r, KVX__MAX_ADDR, &m->am_len, &e);
    m->rma = kvx__wire_blob(&r, KVX__MAX_ADDR, &m->rma_len, &e);
    if ((e = kvx__wire_end(&r, e)) != KVX__WIRE_OK) return e;
    return m->am_len ? KVX__WIRE_OK : KVX__WIRE_FIELD;
}

/* libfabric address (kvx_ofi.h): the provider's name (both sides must run
   the same) and the serving endpoint's name (fi_getname). name points
   into the bytes read. */
#define KVX__OFI_ADDR_MAGIC 0x31464F4Bu /* "KOF1" */
#define KVX__OFI_ADDR_VERSION 2u
#define KVX__OFI_PROV_MAX 255u
typedef struct kvx__ofi_addr_msg { char prov[KVX__OFI_PROV_MAX + 1]; const uint8_t *name; uint32_t name_len; } kvx__ofi_addr_msg;

/* Returns the length; writes it where it fits in cap (buf NULL: sizes only). */
KVX__PRIV_MAYBE size_t kvx__ofi_addr_write(uint8_t *buf, size_t cap, const kvx__ofi_addr_msg *m) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, cap, KVX__OFI_ADDR_MAGIC, KVX__OFI_ADDR_VERSION, 0);
    kvx__put_str(&w, m->prov);
    kvx__put_blob(&w, m->name, m->name_len);
    return w.len;
}
KVX__PRIV_MAYBE int kvx__ofi_addr_read(const uint8_t *buf, size_t len, kvx__ofi_addr_msg *m, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__OFI_ADDR_MAGIC, KVX__OFI_ADDR_VERSION, ver, &type);
    memset(m, 0, sizeof *m);
    if (e) return e;
    if (type != 0) return KVX__WIRE_TYPE;
    kvx__wire_str(&r, m->prov, sizeof m->prov, &e);
    m->name = kvx__wire_blob(&r, KVX__MAX_ADDR, &m->name_len, &e);
    if ((e = kvx__wire_end(&r, e)) != KVX__WIRE_OK) return e;
    return m->name_len ? KVX__WIRE_OK : KVX__WIRE_FIELD;
}

/* libfabric remote key of one region (kvx_ofi.h): flags say whether remote
   addresses are virtual (else offsets from base) and whether raw (a raw key
   for fi_mr_map_raw, with base) replaces key. raw points into the bytes read. */
#define KVX__OFI_RKEY_MAGIC 0x524F564Bu /* "KVOR" */
#define KVX__OFI_RKEY_VERSION 2u
#define KVX__OFI_RKEY_VIRT 1u
#define KVX__OFI_RKEY_RAW 2u
#define KVX__OFI_RKEY_BYTES 32u         /* header 8, flags 4, key 8, base 8, raw length 4; then the raw key */
typedef struct kvx__ofi_rkey_msg { uint32_t flags; uint64_t key, base; const uint8_t *raw; uint32_t raw_len; } kvx__ofi_rkey_msg;

KVX__PRIV_MAYBE size_t kvx__ofi_rkey_write(uint8_t *buf, size_t cap, const kvx__ofi_rkey_msg *m) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, cap, KVX__OFI_RKEY_MAGIC, KVX__OFI_RKEY_VERSION, 0);
    kvx__put_u(&w, m->flags, 4);
    kvx__put_u(&w, m->key, 8);
    kvx__put_u(&w, m->base, 8);
    kvx__put_blob(&w, m->raw, m->raw_len);
    return w.len;
}
KVX__PRIV_MAYBE int kvx__ofi_rkey_read(const uint8_t *buf, size_t len, kvx__ofi_rkey_msg *m, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__OFI_RKEY_MAGIC, KVX__OFI_RKEY_VERSION, ver, &type);
    memset(m, 0, sizeof *m);
    if (e) return e;
    if (type != 0) return KVX__WIRE_TYPE;
    m->flags = (uint32_t)kvx__get_u(&r, 4);
    m->key = kvx__get_u(&r, 8);
    m->base = kvx__get_u(&r, 8);
    m->raw = kvx__wire_blob(&r, KVX__MAX_RKEY - KVX__OFI_RKEY_BYTES, &m->raw_len, &e);
    return kvx__wire_end(&r, e);
}

/* CUDA address (kvx_cuda.h): the process token (one per process: same
   process, same addresses), the pid and the owner's unix socket. */
#define KVX__CUDA_ADDR_MAGIC 0x41435658u /* "XVCA" */
#define KVX__CUDA_ADDR_VERSION 2u
#define KVX__CUDA_PATH_MAX 108u         /* sun_path of Linux, with its 0 */
#define KVX__CUDA_ADDR_MAX (KVX__WIRE_HDR_BYTES + 8u + 4u + 4u + KVX__CUDA_PATH_MAX)
typedef struct kvx__cuda_addr_msg { uint64_t token; uint32_t pid; char path[KVX__CUDA_PATH_MAX]; } kvx__cuda_addr_msg;

KVX__PRIV_MAYBE size_t kvx__cuda_addr_write(uint8_t *buf, size_t cap, const kvx__cuda_addr_msg *m) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, cap, KVX__CUDA_ADDR_MAGIC, KVX__CUDA_ADDR_VERSION, 0);
    kvx__put_u(&w, m->token, 8);
    kvx__put_u(&w, m->pid, 4);
    kvx__put_str(&w, m->path);
    return w.len;
}
KVX__PRIV_MAYBE int kvx__cuda_addr_read(const uint8_t *buf, size_t len, kvx__cuda_addr_msg *m, uint32_t *ver) {
    kvx__rbuf r;
    uint32_t type;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__CUDA_ADDR_MAGIC, KVX__CUDA_ADDR_VERSION, ver, &type);
    memset(m, 0, sizeof *m);
    if (e) return e;
    if (type != 0) return KVX__WIRE_TYPE;
    m->token = kvx__get_u(&r, 8);
    m->pid = (uint32_t)kvx__get_u(&r, 4);
    kvx__wire_str(&r, m->path, sizeof m->path, &e);
    return kvx__wire_end(&r, e);
}

/* CUDA remote key of one region (kvx_cuda.h): the GPU (uuid, and its
   ordinal there for messages), then per allocation its kind, base and size
   and what a reader needs to open it: a legacy IPC handle; a pool's id and
   the pointer's export data; nothing for VMM (its descriptor comes over the
   socket). Read the header with kvx__cuda_rkey_read, then each of count
   entries with kvx__cuda_rkey_entry_read, then kvx__wire_end. */
#define KVX__CUDA_RKEY_MAGIC 0x52435658u /* "XVCR" */
#define KVX__CUDA_RKEY_VERSION 2u
#define KVX__CUDA_LEGACY 1
#define KVX__CUDA_VMM 2
#define KVX__CUDA_POOL 3
#define KVX__CUDA_HANDLE 64u            /* CUipcMemHandle, CUmemPoolPtrExportData */
#define KVX__CUDA_RKEY_HDR 32u          /* header 8, uuid 16, ordinal 4, count 4 */
#define KVX__CUDA_ENTRY 17u             /* kind 1, base 8, size 8 */
typedef struct kvx__cuda_rkey_msg { uint8_t uuid[16]; int32_t device; uint32_t count; } kvx__cuda_rkey_msg;
typedef struct kvx__cuda_rkey_entry { uint32_t kind; uint64_t base, size, pool; uint8_t handle[KVX__CUDA_HANDLE]; } kvx__cuda_rkey_entry;

KVX__PRIV_MAYBE size_t kvx__cuda_rkey_write(uint8_t *buf, size_t cap, const kvx__cuda_rkey_msg *m, const kvx__cuda_rkey_entry *e) {
    kvx__wbuf w;
    uint32_t i;
    kvx__wire_hdr_write(&w, buf, cap, KVX__CUDA_RKEY_MAGIC, KVX__CUDA_RKEY_VERSION, 0);
    kvx__put(&w, m->uuid, 16);
    kvx__put_u(&w, (uint64_t)(uint32_t)m->device, 4);
    kvx__put_u(&w, m->count, 4);
    for (i = 0; i < m->count; i++) {
        kvx__put_u(&w, e[i].kind, 1);
        kvx__put_u(&w, e[i].base, 8);
        kvx__put_u(&w, e[i].size, 8);
        if (e[i].kind == KVX__CUDA_POOL) kvx__put_u(&w, e[i].pool, 8);
        if (e[i].kind != KVX__CUDA_VMM) kvx__put(&w, e[i].handle, KVX__CUDA_HANDLE);
    }
    return w.len;
}
/* The header; count is bounded by what the bytes can hold. */
KVX__PRIV_MAYBE int kvx__cuda_rkey_read(kvx__rbuf *r, const uint8_t *buf, size_t len, kvx__cuda_rkey_msg *m, uint32_t *ver) {
    uint32_t type;
    int e = kvx__wire_hdr_read(r, buf, len, KVX__CUDA_RKEY_MAGIC, KVX__CUDA_RKEY_VERSION, ver, &type);
    memset(m, 0, sizeof *m);
    if (e) return e;
    if (type != 0) return KVX__WIRE_TYPE;
    if (r->len - r->off < 16) return KVX__WIRE_TRUNCATED;
    memcpy(m->uuid, r->p + r->off, 16);
    r->off += 16;
    m->device = (int32_t)(uint32_t)kvx__get_u(r, 4);
    m->count = (uint32_t)kvx__get_u(r, 4);
    if (r->bad) return KVX__WIRE_TRUNCATED;
    if ((uint64_t)m->count * KVX__CUDA_ENTRY > r->len - r->off) return KVX__WIRE_TRUNCATED;
    return KVX__WIRE_OK;
}
/* One entry: KVX__WIRE_TRUNCATED, or KVX__WIRE_FIELD for an unknown kind (e->kind says which). */
KVX__PRIV_MAYBE int kvx__cuda_rkey_entry_read(kvx__rbuf *r, kvx__cuda_rkey_entry *e) {
    memset(e, 0, sizeof *e);
    e->kind = (uint32_t)kvx__get_u(r, 1);
    e->base = kvx__get_u(r, 8);
    e->size = kvx__get_u(r, 8);
    if (r->bad) return KVX__WIRE_TRUNCATED;
    if (e->kind != KVX__CUDA_VMM && e->kind != KVX__CUDA_LEGACY && e->kind != KVX__CUDA_POOL) return KVX__WIRE_FIELD;
    if (e->kind == KVX__CUDA_POOL) e->pool = kvx__get_u(r, 8);
    if (e->kind != KVX__CUDA_VMM) {
        if (r->bad || r->len - r->off < KVX__CUDA_HANDLE) { r->bad = 1; return KVX__WIRE_TRUNCATED; }
        memcpy(e->handle, r->p + r->off, KVX__CUDA_HANDLE);
        r->off += KVX__CUDA_HANDLE;
    }
    return KVX__WIRE_OK;
}

/* CUDA backend's unix-socket messages (kvx_cuda.h): a reader asks the owner
   for the descriptor of (cache, region, alloc); the owner replies (status 0,
   the descriptor passed with SCM_RIGHTS; else a CUDA error); a reader's
   notification carries the 16 notification bytes. Each type has its size. */
#define KVX__CUDA_MSG_MAGIC 0x4d435658u  /* "XVCM" */
#define KVX__CUDA_MSG_VERSION 2u
#define KVX__CUDA_MSG_EXPORT 1u
#define KVX__CUDA_MSG_REPLY 2u
#define KVX__CUDA_MSG_NOTIFY 3u
#define KVX__CUDA_MSG_MAX (KVX__WIRE_HDR_BYTES + KVX__NOTIFY_BYTES)  /* the largest: a notification */
typedef struct kvx__cuda_msg {
    uint32_t type, cache, region, alloc;
    int32_t status;
    uint8_t notify[KVX__NOTIFY_BYTES];
} kvx__cuda_msg;

KVX__PRIV_MAYBE size_t kvx__cuda_msg_size(uint32_t type) {
    return type == KVX__CUDA_MSG_EXPORT ? KVX__WIRE_HDR_BYTES + 12u : type == KVX__CUDA_MSG_REPLY ? KVX__WIRE_HDR_BYTES + 4u
         : type == KVX__CUDA_MSG_NOTIFY ? KVX__WIRE_HDR_BYTES + KVX__NOTIFY_BYTES : 0;
}
/* buf holds KVX__CUDA_MSG_MAX; returns the length (0: no such type). */
KVX__PRIV_MAYBE size_t kvx__cuda_msg_write(uint8_t *buf, const kvx__cuda_msg *m) {
    kvx__wbuf w;
    kvx__wire_hdr_write(&w, buf, KVX__CUDA_MSG_MAX, KVX__CUDA_MSG_MAGIC, KVX__CUDA_MSG_VERSION, m->type);
    if (m->type == KVX__CUDA_MSG_EXPORT) { kvx__put_u(&w, m->cache, 4); kvx__put_u(&w, m->region, 4); kvx__put_u(&w, m->alloc, 4); }
    else if (m->type == KVX__CUDA_MSG_REPLY) kvx__put_u(&w, (uint64_t)(uint32_t)m->status, 4);
    else if (m->type == KVX__CUDA_MSG_NOTIFY) kvx__put(&w, m->notify, KVX__NOTIFY_BYTES);
    else return 0;
    return w.len;
}
KVX__PRIV_MAYBE int kvx__cuda_msg_read(const uint8_t *buf, size_t len, kvx__cuda_msg *m, uint32_t *ver) {
    kvx__rbuf r;
    size_t want;
    int e = kvx__wire_hdr_read(&r, buf, len, KVX__CUDA_MSG_MAGIC, KVX__CUDA_MSG_VERSION, ver, &m->type);
    m->cache = m->region = m->alloc = 0;
    m->status = 0;
    memset(m->notify, 0, sizeof m->notify);
    if (e) { m->type = 0; return e; }
    if (!(want = kvx__cuda_msg_size(m->type))) { m->type = 0; return KVX__WIRE_TYPE; }
    if (len != want) { m->type = 0; return len < want ? KVX__WIRE_TRUNCATED : KVX__WIRE_OVERSIZED; }
    if (m->type == KVX__CUDA_MSG_EXPORT) {
        m->cache = (uint32_t)kvx__get_u(&r, 4); m->region = (uint32_t)kvx__get_u(&r, 4); m->alloc = (uint32_t)kvx__get_u(&r, 4);
    } else if (m->type == KVX__CUDA_MSG_REPLY) {
        m->status = (int32_t)(uint32_t)kvx__get_u(&r, 4);
    } else {
        memcpy(m->notify, r.p + r.off, KVX__NOTIFY_BYTES);
        r.off += KVX__NOTIFY_BYTES;
    }
    return kvx__wire_end(&r, 0);
}

#endif /* KVX_WIRE_INCLUDED */
