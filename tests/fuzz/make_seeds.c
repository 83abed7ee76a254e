/* Writes real metadata blobs of every compiled backend into a folder: the
   fuzzer's seed corpus. Several layouts, TP ranks and cache counts, with
   and without checksum and generation tables. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../../kvx.h"

int main(int argc, char **argv) {
    static uint8_t mem[4][1 << 16];
    int i, v, n = 0;
    if (argc != 2) { fprintf(stderr, "usage: make_seeds DIR\n"); return 2; }
    for (i = 1; i <= (int)KVX_BACKEND_LOCAL; i++)
        for (v = 0; v < 4 && kvx__backend_find((kvx_backend)i); v++) {
            kvx_ctx_desc d;
            kvx_cache_desc cd;
            kvx_ctx *ctx;
            kvx_cache *c;
            void *md;
            size_t len = 0;
            char path[512];
            FILE *f;
            int k;
            memset(&d, 0, sizeof d);
            d.name = v & 1 ? "prefill" : "decode"; d.tp_rank = v / 2; d.tp_size = 2; d.backend = (kvx_backend)i;
            d.log_level = KVX_LOG_OFF;
            if (kvx_ctx_create(&d, &ctx) != KVX_OK) continue;
            for (k = 0; k <= v % 2; k++) {
                memset(&cd, 0, sizeof cd);
                cd.layout.num_layers = 2 + (uint32_t)v; cd.layout.num_blocks = 16; cd.layout.block_tokens = 4;
                cd.layout.num_heads = v == 3 ? 1 : 2; cd.layout.total_heads = v == 3 ? 1 : 0;
                cd.layout.head_dim = 16; cd.layout.elem_bytes = 2; cd.layout.order = v & 2 ? KVX_ORDER_NHD : KVX_ORDER_HND;
                cd.pool = mem[k]; cd.layer_stride = 4096; cd.plane_stride = 2048;
                /* the tables after the data's regions: checksums, generations, both */
                cd.checksums = v == 2 || v == 3; cd.generations = v & 1;
                if (kvx_cache_register(ctx, &cd, &c) != KVX_OK) {   /* a backend without them */
                    cd.checksums = cd.generations = 0;
                    kvx_cache_register(ctx, &cd, &c);
                }
            }
            kvx_metadata(ctx, NULL, &len);
            md = malloc(len);
            kvx_metadata(ctx, md, &len);
            snprintf(path, sizeof path, "%s/%s-%d.kvxmd", argv[1], kvx_backend_name((kvx_backend)i), v);
            if ((f = fopen(path, "wb")) != NULL) { fwrite(md, 1, len, f); fclose(f); n++; }
            free(md);
            kvx_ctx_destroy(ctx);
        }
    printf("%d seed blobs in %s\n", n, argv[1]);
    return n ? 0 : 1;
}
