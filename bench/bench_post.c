/*
    bench_post -- what kvx itself costs the CPU per merged descriptor when a
    block table is posted, apart from the transport's own post calls.

    One read of 100,000 descriptors (random, non-mergeable block ids across
    K/V) is posted twice to a peer context in this process:
      1. with the backend's post replaced by a stub that completes each op at
         once: what remains is kvx's own work (checks of every id against both
         layouts, run merging, the descriptor cursor, accounting);
      2. with the real backend, each of its post calls timed.
    The first is timed inside kvx_post with every op in flight at once; in the
    second each transport post call is timed as kvx issues it, 64 in flight.
    The bytes of the real reads are checked afterwards.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../kvx.h"
#include "../tests/lib/kvx_host_cache.h"

#define NBLK 50000u   /* x K/V = 100,000 descriptors */
#define REPS 5

static kvx_status stub_post(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    (void)ctx; (void)op;
    kvx__op_done(rd, KVX_OK, NULL);
    return KVX_OK;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The real post, timed call by call (the clock read adds ~20 ns to each). */
static const kvx__backend *real_be;
static double in_post;
static uint64_t post_calls;
static kvx_status timed_post(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    double t0 = now();
    kvx_status st = real_be->post(ctx, rd, op);
    in_post += now() - t0;
    post_calls++;
    return st;
}

static double post_once(kvx_queue *q, kvx_read *rd, int wait) {
    kvx_ticket t;
    double t0 = now(), dt;
    kvx_status st = kvx_post(q, rd, &t);
    dt = now() - t0;
    if (st != KVX_OK) { fprintf(stderr, "post: %s: %s\n", kvx_status_name(st), kvx_ctx_error(q->ctx)); exit(1); }
    if (wait && (st = kvx_wait(q, t, 120000)) != KVX_OK) { fprintf(stderr, "wait: %s: %s\n", kvx_status_name(st), kvx_ctx_error(q->ctx)); exit(1); }
    if (!wait) kvx_wait(q, t, 1000);
    return dt;
}

int main(void) {
    kvx_layout lay;
    kvx_ex_cache am, bm;
    kvx_cache_desc cd;
    kvx_ctx_desc d;
    kvx_ctx *A, *B;
    kvx_cache *ac, *bc;
    kvx_peer *peer;
    kvx_queue *q;
    kvx_queue_desc qd;
    kvx__backend stub, timed;
    kvx_queue *q64;
    const kvx__backend *real;
    kvx_read rd;
    kvx_stats s0, s1;
    uint32_t *src = (uint32_t *)malloc(NBLK * sizeof *src), *dst = (uint32_t *)malloc(NBLK * sizeof *dst);
    double best_kvx = 1e9, best_all = 1e9, t;
    void *md;
    size_t len = 0;
    uint64_t ndesc, bad;
    int r;

    memset(&lay, 0, sizeof lay);
    lay.num_layers = 1; lay.num_blocks = 2 * NBLK; lay.block_tokens = 1; lay.num_heads = 1; lay.head_dim = 32; lay.elem_bytes = 2;
    memset(&d, 0, sizeof d);
    d.name = "prefill"; d.progress_thread = 1;
    if (kvx_ctx_create(&d, &A)) return 1;
    d.name = "decode"; d.progress_thread = 0;
    if (kvx_ctx_create(&d, &B)) return 1;
    kvx_ex_cache_alloc(&am, &lay, 0, 1);
    kvx_ex_cache_alloc(&bm, &lay, 0, 1);
    kvx_ex_block_table(src, NBLK, 2 * NBLK, 1, 1, 0);
    kvx_ex_block_table(dst, NBLK, 2 * NBLK, 1, 2, 0);
    kvx_ex_fill(&am, 5, src, NBLK);
    cd = kvx_ex_cache_desc(&am); kvx_cache_register(A, &cd, &ac);
    cd = kvx_ex_cache_desc(&bm); kvx_cache_register(B, &cd, &bc);
    kvx_metadata(A, NULL, &len);
    md = malloc(len);
    kvx_metadata(A, md, &len);
    if (kvx_peer_add(B, md, len, &peer)) { fprintf(stderr, "%s\n", kvx_ctx_error(B)); return 1; }
    memset(&qd, 0, sizeof qd);
    qd.max_ops = 1u << 20;
    qd.max_runs = 1u << 20;
    kvx_queue_create(B, &qd, &q);
    memset(&rd, 0, sizeof rd);
    rd.peer = peer; rd.cache = bc; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = NBLK;

    real = B->be_ops;
    stub = *real;
    stub.post = stub_post;
    kvx_stats(B, &s0);
    B->be_ops = &stub;
    for (r = 0; r < REPS; r++) if ((t = post_once(q, &rd, 0)) < best_kvx) best_kvx = t;
    B->be_ops = real;
    kvx_stats(B, &s1);
    ndesc = (s1.descs_posted - s0.descs_posted) / REPS;
    /* The real reads, as an engine posts them: the default 64 operations in
       flight, the rest issued as completions come; every UCX post call timed. */
    kvx_queue_create(B, NULL, &q64);
    real_be = real;
    timed = *real;
    timed.post = timed_post;
    B->be_ops = &timed;
    for (r = 0; r < REPS; r++) {
        double t0 = now();
        kvx_ex_poison(&bm, 5, dst, src, NBLK, 0, 1, 0, 1);
        t0 = now();
        post_once(q64, &rd, 1);
        if ((t = now() - t0) < best_all) best_all = t;
        if ((bad = kvx_ex_verify(&bm, 5, dst, src, NBLK, 0, 1, 0, 1, NULL)) != 0) { printf("TEST FAILED: %llu wrong bytes\n", (unsigned long long)bad); return 1; }
    }
    B->be_ops = real;
    printf("post cost: one read of %llu merged descriptors (%u random blocks x K/V), transport %s\n", (unsigned long long)ndesc, NBLK,
           kvx_peer_transport(peer));
    printf("  kvx alone (checks, merging, cursor, accounting): %.1f ns per descriptor (%.2f ms per read, best of %d)\n",
           best_kvx * 1e9 / (double)ndesc, best_kvx * 1e3, REPS);
    printf("  ucp_get_nbx, per call, 64 in flight:             %.1f ns (%llu calls)\n", in_post * 1e9 / (double)post_calls,
           (unsigned long long)post_calls);
    printf("  the whole read, posted to completion:            %.1f ms, %.3f GB/s\n", best_all * 1e3,
           (double)NBLK * 2 * am.block_bytes / best_all / 1e9);
    printf("  every byte of the real reads checked\n");
    kvx_queue_destroy(q64);
    kvx_queue_destroy(q);
    kvx_ctx_destroy(B);
    kvx_ctx_destroy(A);
    kvx_ex_cache_free(&am);
    kvx_ex_cache_free(&bm);
    free(md); free(src); free(dst);
    return 0;
}
