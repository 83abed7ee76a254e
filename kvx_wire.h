/* SPDX-License-Identifier: MIT */
/*
    kvx_wire.h -- every byte that crosses a process, over one little-endian
    codec. Part of kvx's implementation, included by kvx.h; do not include it
    yourself.

    Each message type starts with a magic and a version, and a reader
    refuses another version with a message that names both. What crosses:

        metadata     magic "KVX1", version KVX_METADATA_VERSION, backend
                     kind, total length, CRC-32C; then the context (epoch,
                     rank, tp size, pid, name, host), the backend's address
                     and each cache: layout, memory kind, regions with their
                     remote keys (the backend's bytes) and plane bases.
        notification 16 bytes: notify id, reader's rank, magic "KVX1".
        UCX get      kvx's own get over active messages (kvx_ucx_get.h): a
                     request and a reply header, each magic + version.

    The codec: writers never fail (a buffer too small only counts the
    length, so one pass sizes and a second writes); readers bound every
    field by what is left and by a caller's maximum, and set a sticky bad
    flag instead of reading past the end.
*/
#ifndef KVX_WIRE_INCLUDED
#define KVX_WIRE_INCLUDED

#define KVX__MAGIC 0x3158564Bu /* "KVX1" */
#define KVX__HDR_BYTES 16u

typedef struct kvx__wbuf { uint8_t *p; size_t len, cap; } kvx__wbuf;
typedef struct kvx__rbuf { const uint8_t *p; size_t off, len; int bad; } kvx__rbuf;

KVX__PRIV void kvx__put(kvx__wbuf *w, const void *src, size_t n) {
    if (w->p && w->len + n <= w->cap) memcpy(w->p + w->len, src, n);
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

KVX__PRIV void kvx__put_cache(kvx__wbuf *w, const kvx__cache_info *c) {
    const kvx_layout *l = &c->lay;
    uint32_t i;
    kvx__put_u(w, c->id, 4);
    kvx__put_u(w, l->num_layers, 4); kvx__put_u(w, l->num_blocks, 4); kvx__put_u(w, l->block_tokens, 4);
    kvx__put_u(w, l->num_heads, 4); kvx__put_u(w, l->head_dim, 4); kvx__put_u(w, l->elem_bytes, 4);
    kvx__put_u(w, l->total_heads, 4);
    kvx__put_u(w, (uint64_t)l->order, 1); kvx__put_u(w, l->kv_planes, 1);
    kvx__put_u(w, (uint64_t)c->mem, 1); kvx__put_u(w, c->csum_region != KVX__NO_CSUM, 1);
    kvx__put_u(w, (uint64_t)(uint32_t)c->device, 4);
    kvx__put_u(w, c->block_stride, 8);
    kvx__put_u(w, c->nregions, 4);
    for (i = 0; i < c->nregions; i++) {
        kvx__put_u(w, c->regions[i].addr, 8);
        kvx__put_u(w, c->regions[i].len, 8);
        kvx__put_blob(w, c->regions[i].rkey, c->regions[i].rkey_len);
    }
    for (i = 0; i < c->nplanes; i++) kvx__put_u(w, c->plane_base[i], 8);
}

KVX__PRIV kvx_status kvx__get_cache(kvx_ctx *ctx, kvx__rbuf *r, kvx__cache_info *c, int tp_size, const char *who) {
    kvx_layout *l = &c->lay;
    uint32_t i, n;
    kvx_status st;
    char what[160];
    c->id = (uint32_t)kvx__get_u(r, 4);
    l->num_layers = (uint32_t)kvx__get_u(r, 4); l->num_blocks = (uint32_t)kvx__get_u(r, 4);
    l->block_tokens = (uint32_t)kvx__get_u(r, 4); l->num_heads = (uint32_t)kvx__get_u(r, 4);
    l->head_dim = (uint32_t)kvx__get_u(r, 4); l->elem_bytes = (uint32_t)kvx__get_u(r, 4);
    l->total_heads = (uint32_t)kvx__get_u(r, 4);
    l->order = (kvx_order)kvx__get_u(r, 1); l->kv_planes = (uint32_t)kvx__get_u(r, 1);
    c->mem = (kvx_mem)kvx__get_u(r, 1);
    c->csum_region = kvx__get_u(r, 1) ? 0 : KVX__NO_CSUM;  /* the last region, once the count is known */
    c->device = (int)(uint32_t)kvx__get_u(r, 4);
    c->block_stride = kvx__get_u(r, 8);
    c->nregions = (uint32_t)kvx__get_u(r, 4);
    if (r->bad) return kvx__fail(ctx, KVX_ERR_ARG, "%s: truncated in cache header", who);
    snprintf(what, sizeof what, "%s cache %u", who, c->id);
    if (!l->total_heads || !l->kv_planes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: total_heads %u and kv_planes %u must be set", what, l->total_heads, l->kv_planes);
    if ((st = kvx__layout_check(ctx, l, tp_size, what)) != KVX_OK) return st;
    if (c->mem != KVX_MEM_HOST && c->mem != KVX_MEM_CUDA)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: memory kind %d unknown", what, (int)c->mem);
    c->block_bytes = (uint64_t)l->block_tokens * l->num_heads * l->head_dim * l->elem_bytes;
    if (c->block_stride < c->block_bytes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: block_stride %llu is less than the block's %llu bytes", what,
                         (unsigned long long)c->block_stride, (unsigned long long)c->block_bytes);
    if (!c->nregions || c->nregions > KVX__MAX_REGIONS)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u regions (1 to %u allowed)", what, c->nregions, KVX__MAX_REGIONS);
    c->nplanes = l->num_layers * l->kv_planes;
    /* Bound allocations by what the blob can hold before allocating. */
    if ((uint64_t)c->nregions * 20 + (uint64_t)c->nplanes * 8 > r->len - r->off)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: truncated: %u regions and %u planes do not fit in the remaining %zu bytes",
                         what, c->nregions, c->nplanes, r->len - r->off);
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
    if (c->csum_region != KVX__NO_CSUM) {
        uint64_t need = (uint64_t)c->nplanes * l->num_blocks * l->num_heads * 4u;
        c->csum_region = c->nregions - 1;
        if (c->nregions < 2 || c->regions[c->csum_region].len < need)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: checksum table of %llu bytes where %llu are needed", what,
                             (unsigned long long)(c->nregions < 2 ? 0 : c->regions[c->csum_region].len), (unsigned long long)need);
    }
    return kvx__planes_locate(ctx, c, what);
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
    kvx__put_u(w, (uint64_t)(uint32_t)ctx->rank, 4);
    kvx__put_u(w, (uint64_t)(uint32_t)ctx->tp_size, 4);
    kvx__put_u(w, (uint64_t)(uint32_t)getpid(), 4);
    kvx__put_str(w, ctx->name);
    kvx__put_str(w, ctx->host);
    kvx__put_blob(w, addr, alen);
    kvx__put_u(w, ctx->ncaches, 4);
    for (i = 0; i < ctx->ncaches; i++) kvx__put_cache(w, &ctx->caches[i]->info);
    if (w->p && w->len <= w->cap) {
        uint8_t *p = w->p;
        for (i = 0; i < 4; i++) p[8 + i] = (uint8_t)(w->len >> (8 * i));
        crc = kvx__crc32c(0, p, w->len);
        for (i = 0; i < 4; i++) p[12 + i] = (uint8_t)(crc >> (8 * i));
    }
    return KVX_OK;
}

/* Parse and validate a blob into p (fields, caches). Nothing trusted. */
KVX__PRIV kvx_status kvx__md_parse(kvx_ctx *ctx, const uint8_t *md, size_t len, kvx_peer *p) {
    kvx__rbuf r;
    uint32_t magic, ver, kind, total, crc, want, i, alen;
    const uint8_t *addr;
    uint8_t zero[4] = {0, 0, 0, 0};
    kvx_status st;
    memset(&r, 0, sizeof r);
    r.p = md; r.len = len;
    if (len < KVX__HDR_BYTES)
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata: truncated: %zu bytes, the header alone is %u", len, KVX__HDR_BYTES);
    magic = (uint32_t)kvx__get_u(&r, 4);
    ver = (uint32_t)kvx__get_u(&r, 2);
    kind = (uint32_t)kvx__get_u(&r, 2);
    total = (uint32_t)kvx__get_u(&r, 4);
    crc = (uint32_t)kvx__get_u(&r, 4);
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
    p->epoch = kvx__get_u(&r, 8);
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


/* A notification: who read, what id; the magic tells kvx's own. */
#define KVX__NOTIFY_BYTES 16u
KVX__PRIV void kvx__notify_msg_write(uint8_t *m, uint64_t id, uint32_t rank) {
    kvx__wbuf w;
    memset(&w, 0, sizeof w);
    w.p = m; w.cap = KVX__NOTIFY_BYTES;
    kvx__put_u(&w, id, 8);
    kvx__put_u(&w, rank, 4);
    kvx__put_u(&w, KVX__MAGIC, 4);
}
KVX__PRIV int kvx__notify_msg_read(const uint8_t *m, uint64_t *id, uint32_t *rank) {
    kvx__rbuf r;
    memset(&r, 0, sizeof r);
    r.p = m; r.len = KVX__NOTIFY_BYTES;
    *id = kvx__get_u(&r, 8);
    *rank = (uint32_t)kvx__get_u(&r, 4);
    return kvx__get_u(&r, 4) == KVX__MAGIC;
}

/* kvx's own get (kvx_ucx_get.h). A request asks for count pieces of len
   bytes, at raddr and every rstride after (the owner sends them as one), at
   byte off of the op's pieces in order; wanted within ttl_ns (what is left
   of the read's deadline: the reader takes no byte after it). The reply
   carries them, or status != 0 when the owner refused. */
#define KVX__GET_MAGIC 0x47435658u     /* "XVCG" */
#define KVX__GET_VERSION 1u
#define KVX__GET_REQ 1u
#define KVX__GET_REP 2u
#define KVX__GET_REQ_BYTES 64u          /* magic 4, version 2, type 2, then 7 x 8 */
#define KVX__GET_REP_BYTES 40u          /* magic 4, version 2, type 2, then 3 x 8, status 4, 4 zero */
typedef struct kvx__get_req { uint64_t id, raddr, len, off, ttl_ns, count, rstride; } kvx__get_req;
typedef struct kvx__get_rep { uint64_t id, off, len; uint32_t status; } kvx__get_rep;

KVX__PRIV_MAYBE void kvx__get_hdr_write(kvx__wbuf *w, uint8_t *buf, uint32_t cap, uint32_t type) {
    memset(w, 0, sizeof *w);
    w->p = buf; w->cap = cap;
    kvx__put_u(w, KVX__GET_MAGIC, 4);
    kvx__put_u(w, KVX__GET_VERSION, 2);
    kvx__put_u(w, type, 2);
}
/* 1: a header of this type and version; 0 else, *ver the version found
   when the magic was kvx's (0 when it was not). */
KVX__PRIV_MAYBE int kvx__get_hdr_read(kvx__rbuf *r, const uint8_t *buf, size_t len, uint32_t want_len, uint32_t type, uint32_t *ver) {
    uint32_t magic, v, t;
    memset(r, 0, sizeof *r);
    r->p = buf; r->len = len;
    magic = (uint32_t)kvx__get_u(r, 4);
    v = (uint32_t)kvx__get_u(r, 2);
    t = (uint32_t)kvx__get_u(r, 2);
    *ver = !r->bad && magic == KVX__GET_MAGIC ? v : 0;
    return !r->bad && magic == KVX__GET_MAGIC && v == KVX__GET_VERSION && t == type && len == want_len;
}
KVX__PRIV_MAYBE void kvx__get_req_write(uint8_t *buf, const kvx__get_req *q) {
    kvx__wbuf w;
    kvx__get_hdr_write(&w, buf, KVX__GET_REQ_BYTES, KVX__GET_REQ);
    kvx__put_u(&w, q->id, 8); kvx__put_u(&w, q->raddr, 8); kvx__put_u(&w, q->len, 8); kvx__put_u(&w, q->off, 8);
    kvx__put_u(&w, q->ttl_ns, 8); kvx__put_u(&w, q->count, 8); kvx__put_u(&w, q->rstride, 8);
}
KVX__PRIV_MAYBE int kvx__get_req_read(const uint8_t *buf, size_t len, kvx__get_req *q, uint32_t *ver) {
    kvx__rbuf r;
    if (!kvx__get_hdr_read(&r, buf, len, KVX__GET_REQ_BYTES, KVX__GET_REQ, ver)) return 0;
    q->id = kvx__get_u(&r, 8); q->raddr = kvx__get_u(&r, 8); q->len = kvx__get_u(&r, 8); q->off = kvx__get_u(&r, 8);
    q->ttl_ns = kvx__get_u(&r, 8); q->count = kvx__get_u(&r, 8); q->rstride = kvx__get_u(&r, 8);
    return !r.bad;
}
KVX__PRIV_MAYBE void kvx__get_rep_write(uint8_t *buf, const kvx__get_rep *p) {
    kvx__wbuf w;
    kvx__get_hdr_write(&w, buf, KVX__GET_REP_BYTES, KVX__GET_REP);
    kvx__put_u(&w, p->id, 8); kvx__put_u(&w, p->off, 8); kvx__put_u(&w, p->len, 8);
    kvx__put_u(&w, p->status, 4); kvx__put_u(&w, 0, 4);
}
KVX__PRIV_MAYBE int kvx__get_rep_read(const uint8_t *buf, size_t len, kvx__get_rep *p, uint32_t *ver) {
    kvx__rbuf r;
    if (!kvx__get_hdr_read(&r, buf, len, KVX__GET_REP_BYTES, KVX__GET_REP, ver)) return 0;
    p->id = kvx__get_u(&r, 8); p->off = kvx__get_u(&r, 8); p->len = kvx__get_u(&r, 8);
    p->status = (uint32_t)kvx__get_u(&r, 4);
    return !r.bad;
}

#endif /* KVX_WIRE_INCLUDED */
