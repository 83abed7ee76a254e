/*
    test_verify -- verify mode: the producer seals checksums of its blocks,
    a verified read fetches them with the data and checks what landed. A byte
    flipped between the read and the check must be caught and named; an
    unsealed block must be refused; sampling must check one block in N.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
/* Plants corruption between the read and its check when armed. */
static volatile int plant_armed;
static volatile uint64_t plant_addr;
#define KVX_TEST_HOOK_BEFORE_VERIFY(rd) \
    do { if (plant_armed) { *(volatile uint8_t *)(uintptr_t)plant_addr ^= 0x20; plant_armed = 0; } (void)(rd); } while (0)
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"

static kvx_status verified_read(kvx_queue *q, kvx_peer *p, kvx_cache *c, const uint32_t *dst, const uint32_t *src, uint32_t n, uint32_t verify) {
    kvx_read rd;
    kvx_ticket t;
    kvx_status st;
    memset(&rd, 0, sizeof rd);
    rd.peer = p; rd.cache = c; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = n; rd.verify = verify;
    if ((st = kvx_post(q, &rd, &t)) != KVX_OK) return st;
    return kvx_wait(q, t, 10000);
}

int main(void) {
    kvx_layout lay;
    kvx_ex_cache am, bm, cm;
    kvx_cache_desc cd;
    kvx_ctx *A = kvx_t_ctx("prefill", 0, 1, 1), *B = kvx_t_ctx("decode", 0, 1, 0);
    kvx_cache *ac, *bc, *plain;
    kvx_peer *peer;
    kvx_queue *q;
    uint32_t src[64], dst[64], i;
    void *md;
    size_t len = 0;
    int o;

    for (o = 0; o < 2; o++) {
        char name[128];
        snprintf(name, sizeof name, "verified reads, %s: sealed blocks pass, a flipped byte is KVX_ERR_CORRUPT", o ? "NHD" : "HND");
        T_CASE(name) {
            memset(&lay, 0, sizeof lay);
            lay.num_layers = 3; lay.num_blocks = 256; lay.block_tokens = 8; lay.num_heads = 4; lay.head_dim = 32; lay.elem_bytes = 2;
            lay.order = o ? KVX_ORDER_NHD : KVX_ORDER_HND;
            kvx_ex_cache_alloc(&am, &lay, 0, 1);
            kvx_ex_cache_alloc(&bm, &lay, 0, 1);
            kvx_ex_block_table(src, 64, 256, 1, 3 + (uint64_t)o, 0);
            kvx_ex_block_table(dst, 64, 256, 1, 4 + (uint64_t)o, 0);
            kvx_ex_fill(&am, 9, src, 64);
            cd = kvx_ex_cache_desc(&am); cd.checksums = 1;
            T_ST(kvx_cache_register(A, &cd, &ac), KVX_OK);
            cd = kvx_ex_cache_desc(&bm); cd.checksums = 1;
            T_ST(kvx_cache_register(B, &cd, &bc), KVX_OK);
            T_ST(kvx_cache_seal(ac, src, 32), KVX_OK);          /* the first 32 only, for now */
            md = kvx_t_metadata(A, &len);
            T_ST(kvx_peer_add(B, md, len, &peer), KVX_OK);
            free(md);
            T_ST(kvx_queue_create(B, NULL, &q), KVX_OK);
            T_ST(verified_read(q, peer, bc, dst, src, 32, 1), KVX_OK);
            T_EQ(kvx_ex_verify(&bm, 9, dst, src, 32, 0, 3, 0, 4, NULL), 0);
            /* unsealed blocks are refused, naming the block */
            T_ST(verified_read(q, peer, bc, dst + 32, src + 32, 32, 1), KVX_ERR_ARG);
            T_HAS(kvx_ctx_error(B), "never sealed");
            T_ST(kvx_cache_seal(ac, src, 64), KVX_OK);
            /* a byte flipped after the data landed and before the check */
            plant_addr = (uint64_t)(uintptr_t)kvx_ex_block(&bm, 2, 1, dst[5]) + 77;
            plant_armed = 1;
            T_ST(verified_read(q, peer, bc, dst, src, 64, 1), KVX_ERR_CORRUPT);
            T_HAS(kvx_ctx_error(B), "layer 2 V block");
            {
                char want[64];
                snprintf(want, sizeof want, "block %u (local %u)", src[5], dst[5]);
                T_HAS(kvx_ctx_error(B), want);
            }
            printf("  %s\n", kvx_ctx_error(B));
            /* sampling 1 in 16: the checksums of 4 of the 64 blocks are read */
            {
                kvx_stats s0, s1;
                memset(&s0, 0, sizeof s0); memset(&s1, 0, sizeof s1);
                kvx_stats(B, &s0);
                T_ST(verified_read(q, peer, bc, dst, src, 64, 16), KVX_OK);
                kvx_stats(B, &s1);
                /* 64 blocks: 4 sampled x 3 layers x K/V checksum reads on top of the data */
                T_EQ((s1.descs_posted - s0.descs_posted) - (s1.blocks_posted - s0.blocks_posted), 4 * 3 * 2);
            }
            /* a read into a cache without checksums cannot be verified: said at post */
            cd = kvx_ex_cache_desc(&bm); cd.checksums = 0;
            kvx_ex_cache_alloc(&cm, &lay, 0, 1);
            cd = kvx_ex_cache_desc(&cm);
            T_ST(kvx_cache_register(B, &cd, &plain), KVX_OK);
            T_ST(verified_read(q, peer, plain, dst, src, 8, 1), KVX_ERR_ARG);
            T_HAS(kvx_ctx_error(B), "checksums on both caches");
            T_ST(verified_read(q, peer, plain, dst, src, 8, 0), KVX_OK);   /* unverified: fine */
            T_ST(kvx_cache_seal(plain, dst, 1), KVX_ERR_ARG);
            kvx_queue_destroy(q);
            kvx_peer_remove(peer);
            kvx_cache_deregister(plain);
            kvx_cache_deregister(bc);
            kvx_cache_deregister(ac);
            kvx_ex_cache_free(&am); kvx_ex_cache_free(&bm); kvx_ex_cache_free(&cm);
        }
    }
    (void)i;
    kvx_ctx_destroy(B);
    kvx_ctx_destroy(A);
    return kvx_t_summary();
}
