/*
    fuzz_metadata -- libFuzzer target for kvx's metadata parser, the one place
    where bytes from the network are trusted least. Each input is parsed as a
    peer's blob by a context of the backend the blob names; an input whose
    first byte is odd is first re-sealed (length and checksum fixed), so the
    fuzzer gets past the checksum into the fields behind it. What parses is
    then exercised: layout compatibility, head ranges and piece geometry
    against a local cache. Nothing is connected: a blob never reaches the
    transport here. The same bytes also go to the readers of kvx's other
    messages (notifications, the UCX get's request and reply, the UCX
    address), which must bound themselves alike, and, as the ranges of a
    get request, to the owner's check of them and the iov it sends them
    from (kvx__ucx_serve_ranges, kvx__ucx_serve_iov).
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../../kvx.h"

#define FUZZ_KINDS (KVX_BACKEND_LOCAL + 1)
static kvx_ctx *fuzz_ctx[FUZZ_KINDS];
static kvx_cache *fuzz_cache[FUZZ_KINDS];
static uint8_t fuzz_mem[FUZZ_KINDS][2 * 2 * 64 * 256];

static void fuzz_fini(void) {
    int k;
    for (k = 0; k < FUZZ_KINDS; k++) kvx_ctx_destroy(fuzz_ctx[k]);
}

static void fuzz_init(void) {
    int i;
    atexit(fuzz_fini);
    for (i = 1; i < FUZZ_KINDS; i++) {  /* every backend compiled in */
        kvx_ctx_desc d;
        kvx_cache_desc cd;
        int k = i;
        if (!kvx__backend_find((kvx_backend)i)) continue;
        memset(&d, 0, sizeof d);
        d.name = "fuzz"; d.tp_rank = 1; d.tp_size = 2; d.backend = (kvx_backend)i; d.log_level = KVX_LOG_OFF;
        if (kvx_ctx_create(&d, &fuzz_ctx[k]) != KVX_OK) continue;
        memset(&cd, 0, sizeof cd);
        cd.layout.num_layers = 2; cd.layout.num_blocks = 64; cd.layout.block_tokens = 4; cd.layout.num_heads = 2;
        cd.layout.head_dim = 16; cd.layout.elem_bytes = 2;
        cd.pool = fuzz_mem[k];
        cd.layer_stride = sizeof fuzz_mem[k] / 2; cd.plane_stride = sizeof fuzz_mem[k] / 4;
        if (kvx_cache_register(fuzz_ctx[k], &cd, &fuzz_cache[k]) != KVX_OK) fuzz_cache[k] = NULL;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    uint8_t *m;
    kvx_peer *p;
    kvx_ctx *ctx;
    uint32_t kind, i;
    if (!ready) { fuzz_init(); ready = 1; }
    if (size < 1 || size > (1u << 20)) return 0;
    m = (uint8_t *)malloc(size);
    memcpy(m, data, size);
    if (size >= 16 && (m[0] & 1)) {
        uint8_t zero[4] = {0, 0, 0, 0};
        uint32_t crc;
        m[0] = 'K';
        for (i = 0; i < 4; i++) m[8 + i] = (uint8_t)(size >> (8 * i));
        crc = kvx__crc32c(0, m, 12);
        crc = kvx__crc32c(crc, zero, 4);
        crc = kvx__crc32c(crc, m + 16, size - 16);
        for (i = 0; i < 4; i++) m[12 + i] = (uint8_t)(crc >> (8 * i));
    }
    kind = size >= 8 ? (uint32_t)m[6] | (uint32_t)m[7] << 8 : 0;
    ctx = kind < FUZZ_KINDS && fuzz_ctx[kind] ? fuzz_ctx[kind] : fuzz_ctx[1] ? fuzz_ctx[1] : fuzz_ctx[2] ? fuzz_ctx[2] : fuzz_ctx[3];
    if (!ctx) { free(m); return 0; }
    p = (kvx_peer *)kvx__calloc(1, sizeof *p);
    p->ctx = ctx;
    if (kvx__md_parse(ctx, m, size, p) == KVX_OK) {
        kvx_cache *c = fuzz_cache[ctx->be_ops->kind];
        for (i = 0; c && i < p->ncaches; i++) {
            uint32_t a, b;
            kvx__geom g;
            if (kvx__compat(ctx, &c->info, p, &p->caches[i]) != KVX_OK) continue;
            kvx__head_range(&c->info.lay, ctx->rank, ctx->tp_size, &p->caches[i].lay, p->rank, p->tp_size, &a, &b);
            if (a < b)
                kvx__geom_make(&c->info, kvx__head_first(&c->info.lay, ctx->rank, ctx->tp_size), &p->caches[i],
                               kvx__head_first(&p->caches[i].lay, p->rank, p->tp_size), a, b, &g);
        }
    } else if (!ctx->err[0]) {
        abort(); /* every refusal must say why */
    }
    ctx->err[0] = 0;
    kvx__peer_free(p);
    {   /* the messages a peer sends past the metadata: each reader bounds itself */
        kvx__notify_msg n;
        kvx__get_req q;
        kvx__get_rep r;
        uint32_t ver;
        kvx__notify_msg_read(data, size, &n, &ver);
        kvx__get_req_read(data, size, &q, &ver);
        kvx__get_rep_read(data, size, &r, &ver);
#if defined(KVX_UCX)
        {
            kvx__ucx_addr_msg a;
            if (kvx__ucx_addr_read(data, size, &a, &ver) == KVX__WIRE_OK && (a.am_len > size || a.rma_len > size)) abort();
        }
        if (fuzz_ctx[KVX_BACKEND_UCX] && fuzz_cache[KVX_BACKEND_UCX] && size >= KVX__GET_RANGE_BYTES) {
            /* An owner's check of the ranges a request names: the bytes are ranges (the first as the header's),
               their addresses folded into and around the registered memory so that some pass. Whatever passes
               lies inside it, in at most as many pieces as counted, and adds up to the bytes it says. */
            static uint8_t ranges[(KVX__UCX_GET_RANGES + 1) * KVX__GET_RANGE_BYTES];
            static ucp_dt_iov_t iov[KVX__UCX_GET_PIECES];
            uint64_t base = (uint64_t)(uintptr_t)fuzz_mem[KVX_BACKEND_UCX], span = sizeof fuzz_mem[KVX_BACKEND_UCX];
            size_t n = size < sizeof ranges ? size : sizeof ranges, i;
            kvx__get_req q;
            kvx__get_range g;
            uint64_t bytes, lo, hi, sum = 0;
            int np;
            size_t ni;
            memcpy(ranges, data, n);
            for (i = 0; i + KVX__GET_RANGE_BYTES <= n; i += KVX__GET_RANGE_BYTES) {
                uint64_t at = (uint64_t)ranges[i] | (uint64_t)ranges[i + 1] << 8 | (uint64_t)ranges[i + 2] << 16;
                uint64_t addr = base - 64 + at % (span + 128);
                int b;
                for (b = 0; b < 8; b++) ranges[i + (size_t)b] = (uint8_t)(addr >> (8 * b));
            }
            kvx__get_range_read(ranges, KVX__GET_RANGE_BYTES, 0, &g);
            memset(&q, 0, sizeof q);
            q.raddr = g.raddr; q.len = g.len; q.count = g.count; q.rstride = g.rstride;
            np = kvx__ucx_serve_ranges(fuzz_ctx[KVX_BACKEND_UCX], &q, ranges + KVX__GET_RANGE_BYTES, n - KVX__GET_RANGE_BYTES, &bytes, &lo, &hi);
            if (np > 0) {
                ni = kvx__ucx_serve_iov(&q, ranges + KVX__GET_RANGE_BYTES, n - KVX__GET_RANGE_BYTES, iov);
                if (ni < 1 || ni > (size_t)np || lo < base || hi > base + span) abort();
                for (i = 0; i < ni; i++) {
                    uint64_t at = (uint64_t)(uintptr_t)iov[i].buffer;
                    if (at < lo || at + iov[i].length > hi) abort();
                    sum += iov[i].length;
                }
                if (sum != bytes) abort();
            }
        }
#endif
    }
    free(m);
    return 0;
}
