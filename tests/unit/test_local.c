/*
    test_local.c -- the local backend (KVX_BACKEND_LOCAL): contexts of one
    process reading each other's host caches by memcpy, with the whole
    contract: every byte checked, TP splits, notifications and expiry, a
    stalled owner's deadline (nothing lands after it), a destroyed owner,
    verify mode, block generations and leases that retire, a peer in another
    process refused, and the settings query.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"

static kvx_ctx *local_ctx(const char *name, int rank, int tp, int thread) {
    kvx_ctx_desc d;
    kvx_ctx *c = NULL;
    memset(&d, 0, sizeof d);
    d.name = name; d.tp_rank = rank; d.tp_size = tp; d.progress_thread = thread;
    d.log_level = KVX_LOG_OFF; d.backend = KVX_BACKEND_LOCAL; d.timeout_ms = 2000;
    if (kvx_ctx_create(&d, &c) != KVX_OK) { printf("cannot create a local context: %s\n", kvx_ctx_error(NULL)); exit(3); }
    return c;
}

static kvx_peer *add(kvx_ctx *reader, kvx_ctx *owner) {
    size_t len;
    void *md = kvx_t_metadata(owner, &len);
    kvx_peer *p = NULL;
    if (kvx_peer_add(reader, md, len, &p) != KVX_OK) printf("  peer_add: %s\n", kvx_ctx_error(reader));
    free(md);
    return p;
}

static kvx_status read_blocks(kvx_queue *q, kvx_peer *p, kvx_cache *c, const uint32_t *dst, const uint32_t *src, uint32_t n,
                              uint32_t verify, uint64_t notify_id, uint32_t timeout_ms, kvx_ticket *t) {
    kvx_read rd;
    memset(&rd, 0, sizeof rd);
    rd.peer = p; rd.cache = c; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = n; rd.verify = verify;
    rd.notify = notify_id != 0; rd.notify_id = notify_id; rd.timeout_ms = timeout_ms;
    return kvx_post(q, &rd, t);
}

static void layout(kvx_layout *l, kvx_order order, uint32_t heads) {
    memset(l, 0, sizeof *l);
    l->num_layers = 3; l->num_blocks = 128; l->block_tokens = 8; l->num_heads = heads; l->head_dim = 16; l->elem_bytes = 2; l->order = order;
}

/* An owner P's cache, its blocks ids[0..n) filled from seed, and a reader
   D's, both HND with 2 heads and registered; D's peer for P. */
static kvx_peer *pair(kvx_ctx *P, kvx_ctx *D, kvx_ex_cache *pm, kvx_ex_cache *dm, uint64_t seed, const uint32_t *ids, uint32_t n,
                      kvx_cache **dc) {
    kvx_layout l;
    kvx_cache_desc cd;
    kvx_cache *pc;
    layout(&l, KVX_ORDER_HND, 2);
    kvx_ex_cache_alloc(pm, &l, 0, 1);
    kvx_ex_fill(pm, seed, ids, n);
    cd = kvx_ex_cache_desc(pm);
    T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
    kvx_ex_cache_alloc(dm, &l, 0, 1);
    cd = kvx_ex_cache_desc(dm);
    T_ST(kvx_cache_register(D, &cd, dc), KVX_OK);
    return add(D, P);
}

int main(void) {
    uint32_t src[32], dst[32];
    kvx_ticket t;
    int o;

    kvx_ex_block_table(src, 32, 128, 1, 5, 0);
    kvx_ex_block_table(dst, 32, 128, 1, 6, 0);

    for (o = 0; o < 2; o++) {
        char name[128];
        snprintf(name, sizeof name, "local %s: TP 1->2, both decode ranks take their half, every byte", o ? "NHD" : "HND");
        T_CASE(name) {
            kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D[2];
            kvx_ex_cache pm, dm[2];
            kvx_layout lp, ld;
            kvx_cache_desc cd;
            kvx_cache *pc, *dc[2];
            int r;
            layout(&lp, o ? KVX_ORDER_NHD : KVX_ORDER_HND, 4);
            layout(&ld, o ? KVX_ORDER_NHD : KVX_ORDER_HND, 2);
            kvx_ex_cache_alloc(&pm, &lp, 0, 1);
            kvx_ex_fill(&pm, 11, src, 32);
            cd = kvx_ex_cache_desc(&pm);
            T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
            for (r = 0; r < 2; r++) {
                kvx_peer *p;
                kvx_queue *q;
                uint32_t a = 0, n = 0;
                D[r] = local_ctx("decode", r, 2, 0);
                kvx_ex_cache_alloc(&dm[r], &ld, r, 2);
                cd = kvx_ex_cache_desc(&dm[r]);
                T_ST(kvx_cache_register(D[r], &cd, &dc[r]), KVX_OK);
                T_CHECK((p = add(D[r], P)) != NULL);
                if (!p) break;
                T_HAS(kvx_peer_transport(p), "local:memcpy");
                T_ST(kvx_queue_create(D[r], NULL, &q), KVX_OK);
                T_ST(read_blocks(q, p, dc[r], dst, src, 32, 0, 0, 0, &t), KVX_OK);
                T_ST(kvx_wait(q, t, 5000), KVX_OK);
                T_ST(kvx_peer_heads(p, dc[r], 0, &a, &n), KVX_OK);
                T_EQ(n, 2);
                T_EQ(kvx_ex_verify(&dm[r], 11, dst, src, 32, 0, 3, a, a + n, NULL), 0);
                kvx_queue_destroy(q);
                kvx_peer_remove(p);
            }
            for (r = 0; r < 2; r++) { kvx_cache_deregister(dc[r]); kvx_ctx_destroy(D[r]); kvx_ex_cache_free(&dm[r]); }
            kvx_cache_deregister(pc);
            kvx_ctx_destroy(P);
            kvx_ex_cache_free(&pm);
        }
    }

    T_CASE("local: vLLM's layouts (one plane with K|V side by side; block-outermost, head-outer, block-inner views), between one another, TP 1->2 and 2->1, every byte") {
        static const char *names[] = {"LBHNC", "BLHNC", "BHLNC", "LHBNC", "LBNHC", "BLNHC"};
        static const int forms[] = {KVX_EX_PACKED, KVX_EX_BLOCK_OUTER, KVX_EX_HEAD_OUTER, KVX_EX_BLOCK_INNER, KVX_EX_PACKED, KVX_EX_BLOCK_OUTER};
        int o, w, tp, bad = 0, runs = 0;
        for (o = 0; o < 6; o++)
            for (w = 0; w < 6; w++) {
                int nhd_o = o >= 4, nhd_w = w >= 4;
                if (nhd_o != nhd_w) continue;  /* HND and NHD do not read each other */
                for (tp = 0; tp < 2; tp++) {
                    int ptp = tp ? 2 : 1, dtp = tp ? 1 : 2, pr, dr;
                    kvx_ex_cache pm[2], dm[2];
                    kvx_ctx *P[2], *D[2];
                    kvx_cache *pc[2], *dc[2];
                    kvx_layout lp, ld;
                    kvx_cache_desc cd;
                    layout(&lp, nhd_o ? KVX_ORDER_NHD : KVX_ORDER_HND, 4 / (uint32_t)ptp);
                    layout(&ld, nhd_o ? KVX_ORDER_NHD : KVX_ORDER_HND, 4 / (uint32_t)dtp);
                    lp.kv_planes = ld.kv_planes = 1;            /* K and V side by side in head_dim */
                    lp.head_dim = ld.head_dim = 32;
                    for (pr = 0; pr < ptp; pr++) {
                        P[pr] = local_ctx("prefill", pr, ptp, 1);
                        T_CHECK(kvx_ex_cache_alloc_form(&pm[pr], &lp, pr, ptp, forms[o]) == 0);
                        kvx_ex_fill(&pm[pr], 40 + (uint64_t)o, src, 32);
                        cd = kvx_ex_cache_desc(&pm[pr]);
                        T_ST(kvx_cache_register(P[pr], &cd, &pc[pr]), KVX_OK);
                    }
                    for (dr = 0; dr < dtp; dr++) {
                        kvx_queue *q;
                        D[dr] = local_ctx("decode", dr, dtp, 0);
                        T_CHECK(kvx_ex_cache_alloc_form(&dm[dr], &ld, dr, dtp, forms[w]) == 0);
                        cd = kvx_ex_cache_desc(&dm[dr]);
                        T_ST(kvx_cache_register(D[dr], &cd, &dc[dr]), KVX_OK);
                        T_ST(kvx_queue_create(D[dr], NULL, &q), KVX_OK);
                        kvx_ex_poison(&dm[dr], 40 + (uint64_t)o, dst, src, 32, 0, ld.num_layers, dm[dr].head_first, dm[dr].head_first + ld.num_heads);
                        for (pr = 0; pr < ptp; pr++) {
                            kvx_peer *p = add(D[dr], P[pr]);
                            uint32_t a, n;
                            T_ST(kvx_peer_heads(p, dc[dr], 0, &a, &n), KVX_OK);
                            if (!n) continue;
                            T_ST(read_blocks(q, p, dc[dr], dst, src, 32, 0, 0, 0, &t), KVX_OK);
                            T_ST(kvx_wait(q, t, 5000), KVX_OK);
                        }
                        if (kvx_ex_verify(&dm[dr], 40 + (uint64_t)o, dst, src, 32, 0, ld.num_layers, dm[dr].head_first,
                                          dm[dr].head_first + ld.num_heads, NULL)) {
                            bad++;
                            printf("  wrong bytes: owner %s -> reader %s, TP %d->%d, decode rank %d\n", names[o], names[w], ptp, dtp, dr);
                        }
                        runs++;
                        kvx_ctx_destroy(D[dr]);
                        kvx_ex_cache_free(&dm[dr]);
                    }
                    for (pr = 0; pr < ptp; pr++) { kvx_ctx_destroy(P[pr]); kvx_ex_cache_free(&pm[pr]); }
                }
            }
        printf("  %d reads between %s, every byte checked\n", runs, "LBHNC, BLHNC, BHLNC, LHBNC (HND) and LBNHC, BLNHC (NHD)");
        T_EQ(bad, 0);
        T_EQ(runs, (16 + 4) * 3);                        /* 16 HND and 4 NHD pairs, 2 + 1 decode ranks each */
    }

    T_CASE("local: block-outermost caches (BLHNC) move a run of blocks with every layer in one operation; a layer range in one per block; beside a packed cache, one per layer") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm, km;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc, *kc;
        kvx_peer *p;
        kvx_queue *q;
        kvx_read rd;
        kvx_stats s0, s1;
        uint32_t i, nruns = 0;
        for (i = 0; i < 32; i++) nruns += !i || dst[i] != dst[i - 1] + 1 || src[i] != src[i - 1] + 1;
        layout(&l, KVX_ORDER_HND, 2);
        T_CHECK(kvx_ex_cache_alloc_form(&pm, &l, 0, 1, KVX_EX_BLOCK_OUTER) == 0);
        T_CHECK(kvx_ex_cache_alloc_form(&dm, &l, 0, 1, KVX_EX_BLOCK_OUTER) == 0);
        kvx_ex_cache_alloc(&km, &l, 0, 1);
        kvx_ex_fill(&pm, 21, src, 32);
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        cd = kvx_ex_cache_desc(&km); T_ST(kvx_cache_register(D, &cd, &kc), KVX_OK);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        kvx_stats(D, &s0);
        T_ST(read_blocks(q, p, dc, dst, src, 32, 0, 0, 0, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        kvx_stats(D, &s1);
        T_EQ(kvx_ex_verify(&dm, 21, dst, src, 32, 0, 3, 0, 2, NULL), 0);
        T_EQ(s1.descs_posted - s0.descs_posted, nruns);          /* 3 layers x K, V: one op per run */
        T_EQ(s1.blocks_posted - s0.blocks_posted, 32 * 6);       /* still counted per layer and plane */
        memset(&rd, 0, sizeof rd);                               /* layers 1..2 of 3: a block's 4 planes, one op each block */
        rd.peer = p; rd.cache = dc; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = 32;
        rd.layer_begin = 1; rd.layer_count = 2;
        kvx_ex_poison(&dm, 21, dst, src, 32, 0, 3, 0, 2);
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        kvx_stats(D, &s0);
        T_EQ(s0.descs_posted - s1.descs_posted, 32);
        T_EQ(kvx_ex_verify(&dm, 21, dst, src, 32, 1, 3, 0, 2, NULL), 0);
        rd.cache = kc; rd.layer_begin = 0; rd.layer_count = 0;   /* into a packed cache: one op per layer, plane and run */
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        kvx_stats(D, &s1);
        T_EQ(s1.descs_posted - s0.descs_posted, 6 * nruns);
        T_EQ(kvx_ex_verify(&km, 21, dst, src, 32, 0, 3, 0, 2, NULL), 0);
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(dc); kvx_cache_deregister(kc); kvx_cache_deregister(pc);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm); kvx_ex_cache_free(&km);
    }

    T_CASE("local: kvx_post_batch posts reads in order under one lock; it stops at the first refused, says why and how many went, and those complete, every byte") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 1);
        kvx_ex_cache pm, dm;
        kvx_cache *dc = NULL;
        kvx_peer *p = pair(P, D, &pm, &dm, 21, src, 32, &dc);
        kvx_queue *q;
        kvx_read rd[4];
        kvx_ticket tk[4];
        uint32_t bad = 128, posted = 99, i;
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        memset(rd, 0, sizeof rd);
        for (i = 0; i < 4; i++) {
            rd[i].peer = p; rd[i].cache = dc; rd[i].num_blocks = 8;
            rd[i].local_blocks = dst + 8 * i; rd[i].remote_blocks = src + 8 * i;
        }
        rd[2].remote_blocks = &bad; rd[2].num_blocks = 1;   /* past the owner's 128 blocks */
        T_ST(kvx_post_batch(q, rd, 4, tk, &posted), KVX_ERR_ARG);
        T_EQ(posted, 2);
        T_HAS(kvx_ctx_error(D), "remote block id 128 at index 0 is past");
        T_CHECK(tk[0] && tk[1] == tk[0] + 1 && tk[2] == 0);
        for (i = 0; i < 2; i++) T_ST(kvx_wait(q, tk[i], 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 21, dst, src, 16, 0, 3, 0, 2, NULL), 0);
        rd[2].remote_blocks = src + 16; rd[2].num_blocks = 8;   /* the rest, in a second batch */
        T_ST(kvx_post_batch(q, rd + 2, 2, tk + 2, &posted), KVX_OK);
        T_EQ(posted, 2);
        for (i = 2; i < 4; i++) T_ST(kvx_wait(q, tk[i], 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 21, dst, src, 32, 0, 3, 0, 2, NULL), 0);
        T_ST(kvx_post_batch(q, rd, 0, NULL, &posted), KVX_OK);
        T_EQ(posted, 0);
        kvx_queue_destroy(q);
        kvx_ctx_destroy(D);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        kvx_ex_cache_free(&dm);
    }

    T_CASE("local: a full queue is KVX_PENDING, and kvx_ctx_error says which resource is full; a later refusal's sentence replaces it") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm;
        kvx_queue_desc qd;
        kvx_cache *dc = NULL;
        kvx_peer *p = pair(P, D, &pm, &dm, 22, src, 8, &dc);
        kvx_queue *q;
        kvx_read rd;
        kvx_ticket tk[3];
        uint32_t bad = 128, i;
        memset(&qd, 0, sizeof qd);
        qd.depth = 2;
        T_ST(kvx_queue_create(D, &qd, &q), KVX_OK);
        memset(&rd, 0, sizeof rd);
        rd.peer = p; rd.cache = dc; rd.num_blocks = 4;
        rd.local_blocks = dst; rd.remote_blocks = src;
        T_ST(kvx_post(q, &rd, &tk[0]), KVX_OK);
        rd.local_blocks = dst + 4; rd.remote_blocks = src + 4;
        T_ST(kvx_post(q, &rd, &tk[1]), KVX_OK);
        T_ST(kvx_post(q, &rd, &tk[2]), KVX_PENDING);     /* neither read reported yet */
        T_HAS(kvx_ctx_error(D), "queue full: 2 reads not yet reported");
        T_ST(kvx_post(q, &rd, &tk[2]), KVX_PENDING);
        rd.remote_blocks = &bad; rd.num_blocks = 1;
        T_ST(kvx_post(q, &rd, &tk[2]), KVX_ERR_ARG);     /* checked before the slots: its own sentence */
        T_HAS(kvx_ctx_error(D), "remote block id 128");
        for (i = 0; i < 2; i++) T_ST(kvx_wait(q, tk[i], 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 22, dst, src, 8, 0, 3, 0, 2, NULL), 0);
        kvx_queue_destroy(q);
        kvx_ctx_destroy(D);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
        kvx_ex_cache_free(&dm);
    }

    T_CASE("local: notifications arrive once, after the data; an expected id that never comes expires") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 1);
        kvx_ex_cache pm, dm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc;
        kvx_peer *p;
        kvx_queue *q;
        kvx_notification n[8];
        int got = 0, expired = 0, k, i;
        double t0 = kvx_t_now();
        layout(&l, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &l, 0, 1); kvx_ex_cache_alloc(&dm, &l, 0, 1);
        kvx_ex_fill(&pm, 3, src, 32);
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        T_ST(kvx_notify_expect(P, 41, 5000), KVX_OK);
        T_ST(kvx_notify_expect(P, 42, 300), KVX_OK);
        T_ST(read_blocks(q, p, dc, dst, src, 32, 0, 41, 0, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 3, dst, src, 32, 0, 3, 0, 2, NULL), 0);
        while ((got < 1 || expired < 1) && kvx_t_now() - t0 < 5) {
            k = kvx_notifications(P, n, 8);
            for (i = 0; i < k; i++) {
                if (n[i].id == 41 && n[i].status == KVX_OK) got++;
                else if (n[i].id == 42 && n[i].status == KVX_ERR_TIMEOUT) expired++;
                else T_FAILF("notification %llu status %s", (unsigned long long)n[i].id, kvx_status_name(n[i].status));
            }
            if (!k) usleep(10000);
        }
        usleep(100000);
        T_EQ(kvx_notifications(P, n, 8), 0);
        T_EQ(got, 1);
        T_EQ(expired, 1);
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(dc); kvx_cache_deregister(pc);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: a lease of two readers: both notifications come, each as it arrives; a reader that never comes makes one expired notification") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D[2];
        kvx_ex_cache pm, dm[2];
        kvx_layout lp, ld;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc[2];
        kvx_peer *p[2];
        kvx_queue *q[2];
        kvx_notification n[8];
        int r, k, i, ok = 0, expired = 0, ranks = 0;
        double t0;
        layout(&lp, KVX_ORDER_HND, 4);
        layout(&ld, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &lp, 0, 1);
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        T_ST(kvx_notify_expect_readers(P, 7, 2, 5000, NULL, NULL, 0), KVX_OK);     /* both decode ranks read request 7 */
        T_ST(kvx_notify_expect_readers(P, 8, 2, 500, NULL, NULL, 0), KVX_OK);     /* only rank 0 will read request 8 */
        for (r = 0; r < 2; r++) {
            D[r] = local_ctx("decode", r, 2, 0);
            kvx_ex_cache_alloc(&dm[r], &ld, r, 2);
            cd = kvx_ex_cache_desc(&dm[r]); T_ST(kvx_cache_register(D[r], &cd, &dc[r]), KVX_OK);
            p[r] = add(D[r], P);
            T_ST(kvx_queue_create(D[r], NULL, &q[r]), KVX_OK);
            T_ST(read_blocks(q[r], p[r], dc[r], dst, src, 4, 0, 7, 0, &t), KVX_OK);
            T_ST(kvx_wait(q[r], t, 5000), KVX_OK);
        }
        T_ST(read_blocks(q[0], p[0], dc[0], dst, src, 4, 0, 8, 0, &t), KVX_OK);
        T_ST(kvx_wait(q[0], t, 5000), KVX_OK);
        t0 = kvx_t_now();
        while ((ok < 3 || expired < 1) && kvx_t_now() - t0 < 5) {
            for (r = 0; r < 2; r++) kvx_progress(D[r]);
            k = kvx_notifications(P, n, 8);
            for (i = 0; i < k; i++) {
                if (n[i].status == KVX_OK && (n[i].id == 7 || n[i].id == 8)) { ok++; ranks |= n[i].id == 7 ? 1 << n[i].peer_rank : 0; }
                else if (n[i].id == 8 && n[i].status == KVX_ERR_TIMEOUT) expired++;
                else T_FAILF("notification %llu status %s", (unsigned long long)n[i].id, kvx_status_name(n[i].status));
            }
            if (!k) usleep(10000);
        }
        T_EQ(ok, 3);          /* 7 from ranks 0 and 1, 8 from rank 0 */
        T_EQ(ranks, 3);
        T_EQ(expired, 1);     /* rank 1 never read 8: one expired notification stands for it */
        usleep(100000);
        T_EQ(kvx_notifications(P, n, 8), 0);
        for (r = 0; r < 2; r++) { kvx_queue_destroy(q[r]); kvx_peer_remove(p[r]); kvx_cache_deregister(dc[r]); kvx_ctx_destroy(D[r]); kvx_ex_cache_free(&dm[r]); }
        kvx_cache_deregister(pc); kvx_ctx_destroy(P); kvx_ex_cache_free(&pm);
    }

    T_CASE("local: a read of no blocks only notifies, also a rank that shares no heads with the owner; notifications carry the reader's rank and TP size") {
        kvx_ctx *P[2], *D = local_ctx("decode", 1, 4, 0);
        kvx_ex_cache pm[2], dm;
        kvx_layout lp, ld;
        kvx_cache_desc cd;
        kvx_cache *pc[2], *dc;
        kvx_peer *p[2];
        kvx_queue *q;
        kvx_read rd;
        kvx_notification n[8];
        uint32_t a, hn;
        uint64_t gen = 0;
        int r, k, i, seen[2] = {0, 0};
        double t0;
        layout(&lp, KVX_ORDER_HND, 2);               /* 4 heads: owner ranks of TP 2 hold 2 each */
        layout(&ld, KVX_ORDER_HND, 1);               /* reader rank 1 of TP 4 takes head 1: owner rank 0's */
        kvx_ex_cache_alloc(&dm, &ld, 1, 4);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        for (r = 0; r < 2; r++) {
            P[r] = local_ctx("prefill", r, 2, 1);
            kvx_ex_cache_alloc(&pm[r], &lp, r, 2);
            kvx_ex_fill(&pm[r], 60, src, 4);
            cd = kvx_ex_cache_desc(&pm[r]); T_ST(kvx_cache_register(P[r], &cd, &pc[r]), KVX_OK);
            T_CHECK((p[r] = add(D, P[r])) != NULL);
        }
        T_ST(kvx_peer_heads(p[1], dc, 0, &a, &hn), KVX_OK);
        T_EQ(hn, 0);                                 /* owner rank 1 is no source for reader rank 1 */
        T_ST(read_blocks(q, p[1], dc, dst, src, 4, 0, 5, 0, &t), KVX_ERR_ARG);       /* a read of blocks from it is refused */
        T_HAS(kvx_ctx_error(D), "not the source of any head");
        T_ST(read_blocks(q, p[1], dc, NULL, NULL, 0, 0, 0, 0, &t), KVX_ERR_ARG);     /* no blocks and no notification: nothing to do */
        T_HAS(kvx_ctx_error(D), "must notify");
        T_ST(read_blocks(q, p[1], dc, NULL, NULL, 0, 1, 5, 0, &t), KVX_ERR_ARG);     /* nothing to verify */
        memset(&rd, 0, sizeof rd);
        rd.peer = p[1]; rd.cache = dc; rd.notify = 1; rd.notify_id = 5; rd.remote_generations = &gen;
        T_ST(kvx_post(q, &rd, &t), KVX_ERR_ARG);                                      /* nor generations to check */
        T_ST(read_blocks(q, p[0], dc, dst, src, 4, 0, 5, 0, &t), KVX_OK);            /* the source: read and notify */
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 60, dst, src, 4, 0, 3, 1, 2, NULL), 0);
        T_ST(read_blocks(q, p[1], dc, NULL, NULL, 0, 0, 5, 0, &t), KVX_OK);          /* the other: only notify */
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        t0 = kvx_t_now();
        while ((!seen[0] || !seen[1]) && kvx_t_now() - t0 < 5) {
            for (r = 0; r < 2; r++) {
                k = kvx_notifications(P[r], n, 8);
                for (i = 0; i < k; i++) {
                    T_EQ(n[i].id, 5); T_ST(n[i].status, KVX_OK);
                    T_EQ(n[i].peer_rank, 1); T_EQ(n[i].peer_tp_size, 4);
                    seen[r]++;
                }
            }
            usleep(5000);
        }
        T_EQ(seen[0], 1);
        T_EQ(seen[1], 1);
        kvx_queue_destroy(q);
        for (r = 0; r < 2; r++) { kvx_peer_remove(p[r]); kvx_cache_deregister(pc[r]); kvx_ctx_destroy(P[r]); kvx_ex_cache_free(&pm[r]); }
        kvx_cache_deregister(dc); kvx_ctx_destroy(D); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: a full notification ring keeps leases: what arrives or expires while it is full comes once there is room; the rest is dropped and counted") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc;
        kvx_peer *p;
        kvx_queue *q;
        kvx_notification n[256];
        kvx_stats st;
        uint32_t i, extra = 10, full = KVX__NOTIFY_RING;
        int k, got = 0, expired = 0, others = 0;
        double t0;
        layout(&l, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &l, 0, 1); kvx_ex_cache_alloc(&dm, &l, 0, 1);
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        for (i = 0; i < full + extra; i++) {                   /* nobody expects these: they fill the ring, then are dropped */
            T_ST(read_blocks(q, p, dc, dst, src, 1, 0, 1000 + i, 0, &t), KVX_OK);
            T_ST(kvx_wait(q, t, 5000), KVX_OK);
        }
        t0 = kvx_t_now();
        do { kvx_progress(D); kvx_stats(P, &st); if (st.notifications_received < full + extra) usleep(2000); }
        while (st.notifications_received < full + extra && kvx_t_now() - t0 < 10);
        T_EQ(st.notifications_dropped, extra);
        T_ST(kvx_notify_expect(P, 1, 30000), KVX_OK);          /* leases made once the ring is full: */
        T_ST(kvx_notify_expect(P, 2, 400), KVX_OK);            /* this one expires while it is */
        T_ST(read_blocks(q, p, dc, dst, src, 1, 0, 1, 0, &t), KVX_OK);   /* lease 1 comes while the ring is full */
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        t0 = kvx_t_now();
        do { kvx_progress(D); kvx_stats(P, &st); usleep(2000); } while (st.notifications_received < full + extra + 1 && kvx_t_now() - t0 < 10);
        usleep(600000);                                        /* lease 2's deadline passes, the ring still full */
        kvx_stats(P, &st);
        T_EQ(st.notifications_dropped, extra);                 /* neither lease was dropped */
        t0 = kvx_t_now();
        while ((got < 1 || expired < 1) && kvx_t_now() - t0 < 10) {
            k = kvx_notifications(P, n, 256);
            for (i = 0; i < (uint32_t)k; i++) {
                if (n[i].id == 1) { got++; T_ST(n[i].status, KVX_OK); T_EQ(n[i].peer_rank, 0); }
                else if (n[i].id == 2) { expired++; T_ST(n[i].status, KVX_ERR_TIMEOUT); }
                else others++;
            }
            if (!k) usleep(5000);
        }
        T_EQ(got, 1);
        T_EQ(expired, 1);
        T_EQ(others, full);
        usleep(50000);
        T_EQ(kvx_notifications(P, n, 256), 0);
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(dc); kvx_cache_deregister(pc);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: an owner that never progresses: KVX_ERR_TIMEOUT at the deadline, and nothing lands after") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 0), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc;
        kvx_peer *p;
        kvx_queue *q;
        uint8_t canary;
        double t0;
        layout(&l, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &l, 0, 1); kvx_ex_cache_alloc(&dm, &l, 0, 1);
        kvx_ex_fill(&pm, 4, src, 32);
        memset(kvx_ex_block(&dm, 0, 0, dst[0]), 0x5a, 16);
        canary = kvx_ex_block(&dm, 0, 0, dst[0])[0];
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        t0 = kvx_t_now();
        T_ST(read_blocks(q, p, dc, dst, src, 8, 0, 0, 400, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 3000), KVX_ERR_TIMEOUT);
        T_CHECK(kvx_t_now() - t0 >= 0.39 && kvx_t_now() - t0 < 2.5);
        T_HAS(kvx_ctx_error(D), "timed out");
        kvx_progress(P);                                   /* the owner wakes: nothing of the read is left to serve */
        kvx_progress(D);
        T_EQ(kvx_ex_block(&dm, 0, 0, dst[0])[0], canary);
        /* the peer still works for a read in time */
        T_ST(read_blocks(q, p, dc, dst, src, 8, 0, 0, 0, &t), KVX_OK);
        {
            kvx_status st = KVX_PENDING;
            int i;
            for (i = 0; i < 2000 && st == KVX_PENDING; i++) { kvx_progress(P); st = kvx_test(q, t); if (st == KVX_PENDING) usleep(1000); }
            T_ST(st, KVX_OK);
        }
        T_EQ(kvx_ex_verify(&dm, 4, dst, src, 8, 0, 3, 0, 2, NULL), 0);
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(dc); kvx_cache_deregister(pc);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: an owner destroyed with reads waiting: KVX_ERR_PEER, and a new post is refused") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 0), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc;
        kvx_peer *p;
        kvx_queue *q;
        layout(&l, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &l, 0, 1); kvx_ex_cache_alloc(&dm, &l, 0, 1);
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        T_ST(read_blocks(q, p, dc, dst, src, 8, 0, 0, 0, &t), KVX_OK);
        kvx_cache_deregister(pc);
        kvx_ctx_destroy(P);
        T_ST(kvx_wait(q, t, 2000), KVX_ERR_PEER);
        T_HAS(kvx_ctx_error(D), "destroyed");
        {
            kvx_status st = read_blocks(q, p, dc, dst, src, 8, 0, 0, 0, &t);
            if (st == KVX_OK) st = kvx_wait(q, t, 2000);
            T_ST(st, KVX_ERR_PEER);
        }
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(dc);
        kvx_ctx_destroy(D);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: verify mode: sealed blocks pass, a changed byte at the owner is KVX_ERR_CORRUPT") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc;
        kvx_peer *p;
        kvx_queue *q;
        layout(&l, KVX_ORDER_NHD, 4);
        kvx_ex_cache_alloc(&pm, &l, 0, 1); kvx_ex_cache_alloc(&dm, &l, 0, 1);
        kvx_ex_fill(&pm, 8, src, 32);
        cd = kvx_ex_cache_desc(&pm); cd.checksums = 1; T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); cd.checksums = 1; T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        T_ST(kvx_cache_seal(pc, src, 32), KVX_OK);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        T_ST(read_blocks(q, p, dc, dst, src, 32, 1, 0, 0, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        kvx_ex_block(&pm, 1, 1, src[3])[5] ^= 0x40;          /* after sealing: what lands no longer matches */
        T_ST(read_blocks(q, p, dc, dst, src, 32, 1, 0, 0, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_ERR_CORRUPT);
        T_HAS(kvx_ctx_error(D), "layer 1 V block");
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(dc); kvx_cache_deregister(pc);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: block generations: current ones pass; a retire before or during the read is KVX_ERR_STALE, never the new bytes; leases retire at expiry") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D = local_ctx("decode", 0, 1, 0);
        kvx_ex_cache pm, dm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc, *dc, *plain;
        kvx_peer *p;
        kvx_queue *q;
        kvx_read rd;
        kvx_notification n[4];
        uint64_t gens[32], old[32];
        uint32_t canary = 127, i, bad = 200;
        int expired = 0, k;
        kvx_completion comp[1];
        char want[160];
        double t0;
        layout(&l, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &l, 0, 1); kvx_ex_cache_alloc(&dm, &l, 0, 1);
        kvx_ex_fill(&pm, 3, src, 32);
        cd = kvx_ex_cache_desc(&pm); cd.generations = 1; T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        cd = kvx_ex_cache_desc(&dm); cd.generations = 1; T_ST(kvx_cache_register(D, &cd, &dc), KVX_OK);
        for (i = 0; i < 32; i++)
            if (dst[i] == canary) { canary--; i = (uint32_t)-1; }   /* a block no read here touches */
        memset(kvx_ex_block(&dm, 0, 0, canary), 0x5C, (size_t)dm.block_bytes);
        p = add(D, P);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        memset(&rd, 0, sizeof rd);
        rd.peer = p; rd.cache = dc; rd.local_blocks = dst; rd.remote_blocks = src; rd.num_blocks = 32;
        T_ST(kvx_blocks_retire(pc, src + 8, 4), KVX_OK);    /* some blocks retired once before the request */
        for (i = 0; i < 32; i++) gens[i] = old[i] = kvx_block_generation(pc, src[i]);
        T_EQ(gens[8], 1); T_EQ(gens[0], 0);
        rd.remote_generations = gens;
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 3, dst, src, 32, 0, 3, 0, 2, NULL), 0);
        /* During: the data lands inside kvx_post (a memcpy); the generations
           are fetched at the reader's next progress, after this retire. */
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_blocks_retire(pc, src + 5, 1), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_ERR_STALE);
        T_HAS(kvx_ctx_error(D), "remote block");
        T_HAS(kvx_ctx_error(D), "generation 0 expected, 1 found");
        /* Reported by kvx_poll, the failure keeps its own sentence, also after
           a later error took the context's. */
        for (i = 0; i < 32; i++) gens[i] = kvx_block_generation(pc, src[i]);
        snprintf(want, sizeof want, "remote block %u (local %u, layers 0-2): generation %llu expected, %llu found", src[6], dst[6],
                 (unsigned long long)gens[6], (unsigned long long)gens[6] + 1);
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_blocks_retire(pc, src + 6, 1), KVX_OK);
        t0 = kvx_t_now();
        while ((k = kvx_poll(q, comp, 1)) == 0 && kvx_t_now() - t0 < 5) usleep(1000);
        T_EQ(k, 1);
        T_ST(kvx_blocks_retire(pc, &bad, 1), KVX_ERR_ARG);         /* the context's error is now another */
        T_ST(comp[0].status, KVX_ERR_STALE);
        T_CHECK(comp[0].error != NULL);
        if (comp[0].error) T_HAS(comp[0].error, want);
        /* Before, then reused with new bytes: stale, never a pass with them. */
        T_ST(kvx_blocks_retire(pc, src, 32), KVX_OK);
        kvx_ex_fill(&pm, 9, src, 32);
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_ERR_STALE);
        for (i = 0; i < 32; i++) gens[i] = kvx_block_generation(pc, src[i]);   /* the new request's */
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        T_EQ(kvx_ex_verify(&dm, 9, dst, src, 32, 0, 3, 0, 2, NULL), 0);
        for (i = 0; i < dm.block_bytes; i++)
            if (kvx_ex_block(&dm, 0, 0, canary)[i] != 0x5C) { T_FAILF("canary block changed at byte %u", i); break; }
        /* A lease that expires retires its blocks: the late reader is stale. */
        for (i = 0; i < 32; i++) old[i] = gens[i];
        T_ST(kvx_notify_expect_retire(P, 77, 200, pc, src, 32), KVX_OK);
        t0 = kvx_t_now();
        while (!expired && kvx_t_now() - t0 < 5) {
            int k = kvx_notifications(P, n, 4), j;
            for (j = 0; j < k; j++) expired += n[j].id == 77 && n[j].status == KVX_ERR_TIMEOUT;
            if (!expired) usleep(10000);
        }
        T_EQ(expired, 1);
        T_EQ(kvx_block_generation(pc, src[0]), old[0] + 1);
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_ERR_STALE);
        /* Refusals, each with a message, nothing posted or retired. */
        T_ST(kvx_blocks_retire(pc, &bad, 1), KVX_ERR_ARG);
        T_HAS(kvx_ctx_error(P), "past the cache's 128 blocks");
        T_EQ(kvx_block_generation(pc, 128), UINT64_MAX);
        T_ST(kvx_notify_expect_retire(P, 78, 200, pc, &bad, 1), KVX_ERR_ARG);
        /* the reader's cache needs no table of its own */
        for (i = 0; i < 32; i++) gens[i] = kvx_block_generation(pc, src[i]);
        cd = kvx_ex_cache_desc(&dm); T_ST(kvx_cache_register(D, &cd, &plain), KVX_OK);
        rd.cache = plain;
        T_ST(kvx_post(q, &rd, &t), KVX_OK);
        T_ST(kvx_wait(q, t, 5000), KVX_OK);
        T_ST(kvx_blocks_retire(plain, src, 1), KVX_ERR_ARG);
        T_EQ(kvx_block_generation(plain, 0), UINT64_MAX);
        {   /* an owner's cache without a table: refused at post */
            kvx_ctx *P2 = local_ctx("prefill2", 0, 1, 1);
            kvx_cache *pc2;
            kvx_peer *p2;
            cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P2, &cd, &pc2), KVX_OK);
            p2 = add(D, P2);
            rd.peer = p2;
            T_ST(kvx_post(q, &rd, &t), KVX_ERR_ARG);
            T_HAS(kvx_ctx_error(D), "keeps none");
            kvx_peer_remove(p2);
            kvx_cache_deregister(pc2);
            kvx_ctx_destroy(P2);
        }
        kvx_queue_destroy(q); kvx_peer_remove(p);
        kvx_cache_deregister(plain); kvx_cache_deregister(dc); kvx_cache_deregister(pc);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm); kvx_ex_cache_free(&dm);
    }

    T_CASE("local: a transport policy refuses a peer at kvx_peer_add, saying what was chosen, what was required and why") {
        static const char *const refuse[] = {"!local:*", "!local:memcpy", "sw", "ipc,rdma", "!sw, cuda:*"};
        static const char *const accept[] = {"", "!sw", "local:*", "!sw,local:memcpy", "ipc,local:*"};
        kvx_ctx *P = local_ctx("prefill", 0, 1, 1), *D;
        kvx_ex_cache pm;
        kvx_layout l;
        kvx_cache_desc cd;
        kvx_cache *pc;
        kvx_peer *p;
        kvx_ctx_desc d, got;
        size_t len;
        void *md;
        unsigned i;
        layout(&l, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &l, 0, 1);
        cd = kvx_ex_cache_desc(&pm); T_ST(kvx_cache_register(P, &cd, &pc), KVX_OK);
        md = kvx_t_metadata(P, &len);
        for (i = 0; i < 10; i++) {
            const char *pol = i < 5 ? refuse[i] : accept[i - 5];
            memset(&d, 0, sizeof d);
            d.name = "decode"; d.backend = KVX_BACKEND_LOCAL; d.log_level = KVX_LOG_OFF; d.transport_policy = pol;
            T_ST(kvx_ctx_create(&d, &D), KVX_OK);
            got = kvx_ctx_query_desc(D);
            T_HAS(got.transport_policy, pol);
            p = NULL;
            T_ST(kvx_peer_add(D, md, len, &p), i < 5 ? KVX_ERR_UNSUPPORTED : KVX_OK);
            if (i < 5) {
                T_CHECK(p == NULL);
                T_HAS(kvx_ctx_error(D), "local:memcpy");
                T_HAS(kvx_ctx_error(D), pol);
                T_HAS(kvx_ctx_error(D), "why that transport");
            }
            kvx_ctx_destroy(D);
        }
        setenv("KVX_TRANSPORT_POLICY", "!local:*", 1);  /* the environment, where the desc says nothing */
        memset(&d, 0, sizeof d);
        d.name = "decode"; d.backend = KVX_BACKEND_LOCAL; d.log_level = KVX_LOG_OFF;
        T_ST(kvx_ctx_create(&d, &D), KVX_OK);
        unsetenv("KVX_TRANSPORT_POLICY");
        T_ST(kvx_peer_add(D, md, len, &p), KVX_ERR_UNSUPPORTED);
        kvx_ctx_destroy(D);
        free(md);
        kvx_cache_deregister(pc);
        kvx_ctx_destroy(P);
        kvx_ex_cache_free(&pm);
    }

    T_CASE("local: a peer of another process is refused; the settings in effect are reported") {
        kvx_ctx *P = local_ctx("prefill", 0, 1, 0), *D = local_ctx("decode", 0, 1, 0);
        kvx_ctx_desc q = kvx_ctx_query_desc(D);
        size_t len;
        uint8_t *md;
        kvx_peer *p = NULL;
        kvx_ex_cache pm;
        kvx_layout lp;
        kvx_cache_desc pd;
        kvx_cache *pc;
        layout(&lp, KVX_ORDER_HND, 2);
        kvx_ex_cache_alloc(&pm, &lp, 0, 1);
        pd = kvx_ex_cache_desc(&pm);
        T_ST(kvx_cache_register(P, &pd, &pc), KVX_OK);
        md = (uint8_t *)kvx_t_metadata(P, &len);
        T_EQ(q.backend, KVX_BACKEND_LOCAL);
        T_EQ(q.timeout_ms, 2000);
        T_HAS(q.name, "decode");
        T_CHECK(q.host_id && *q.host_id);
        T_HAS(kvx_backend_name(q.backend), "local");
        /* The same blob, as if from another process (its process id changed,
           the checksum made anew): the local backend says why not. */
        {
            kvx_ctx *E = local_ctx("other", 0, 1, 0);
            uint32_t hl, off, crc;
            uint8_t zero[4] = {0, 0, 0, 0};
            off = 16 + 8 + 16 + 4 + 4 + 4 + 4 + 4 + 7;         /* header, epoch, secret, flags, rank, tp, pid, "prefill" */
            memcpy(&hl, md + off, 4);                          /* the host string's length (little-endian here) */
            off += 4 + hl + 4;                                 /* the backend address: process id first */
            md[off] ^= 0xff;
            crc = kvx__crc32c(kvx__crc32c(kvx__crc32c(0, md, 12), zero, 4), md + 16, len - 16);
            memcpy(md + 12, &crc, 4);
            T_ST(kvx_peer_add(E, md, len, &p), KVX_ERR_UNSUPPORTED);
            T_HAS(kvx_ctx_error(E), "reads within one process");
            kvx_ctx_destroy(E);
        }
        free(md);
        kvx_cache_deregister(pc);
        kvx_ex_cache_free(&pm);
        kvx_ctx_destroy(D); kvx_ctx_destroy(P);
    }

    return kvx_t_summary();
}
