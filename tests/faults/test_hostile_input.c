/*
    test_hostile_input -- what a careless or hostile caller or peer can hand
    kvx: arguments out of range (duplicate ids, layer ranges past the end,
    ids past the cache, NULLs, zero and huge counts, a queue too deep) give
    an error each with nothing posted, and a full queue answers KVX_PENDING;
    metadata of another version and garbage are refused, saying why; a
    rendezvous nobody listens on, that never answers or answers garbage
    fails within its deadline.

    Owners are this binary re-executed (tests/lib/kvx_owner.h). Over the
    transport the environment selects.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../../kvx.h"
#include "../lib/kvx_host_cache.h"
#include "../lib/kvx_test.h"
#include "../lib/kvx_owner.h"
#include "../../examples/kvx_rdv.h"


/* An owner as rank of tp: its metadata. */
static void *spawn_owner(kvx_t_child *ch, int rank, int tp, uint64_t seed, uint32_t *len) {
    kvx_layout lay = lay_for(tp);
    return kvx_t_owner_spawn(ch, &lay, rank, tp, seed, len);
}

/* CRC-32C, as kvx's metadata carries it: how a peer that lies re-seals a
   blob it changed. */
static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    size_t i;
    int k;
    crc = ~crc;
    for (i = 0; i < n; i++) {
        crc ^= p[i];
        for (k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

int main(int argc, char **argv) {
    kvx_layout lay1 = lay_for(1);
    kvx_ex_cache m;
    kvx_cache_desc cd;
    kvx_ctx *D;
    kvx_cache *dc;
    uint32_t ids[NB], i;

    if (kvx_t_is_child(argc, argv, "owner")) return kvx_t_owner_main(argv);
    signal(SIGPIPE, SIG_IGN);
    for (i = 0; i < NB; i++) ids[i] = i;
    D = kvx_t_ctx("decode", 0, 1, 0);
    if (kvx_ex_cache_alloc(&m, &lay1, 0, 1)) return 1;
    cd = kvx_ex_cache_desc(&m);
    if (kvx_cache_register(D, &cd, &dc)) return 1;

    T_CASE("hostile arguments: an error each, nothing posted") {
        kvx_t_child p;
        uint32_t l;
        void *md = spawn_owner(&p, 0, 1, 71, &l);
        kvx_peer *a = NULL;
        kvx_queue *q;
        kvx_queue_desc qd;
        kvx_read r;
        kvx_ticket t = 5;
        kvx_stats s0, s1;
        memset(&s0, 0, sizeof s0); memset(&s1, 0, sizeof s1);
        uint32_t dup[3] = {4, 9, 4}, big = 0xFFFFFFFFu, *many;
        T_ST(kvx_peer_add(D, md, l, &a), KVX_OK);
        T_ST(kvx_queue_create(D, NULL, &q), KVX_OK);
        kvx_stats(D, &s0);
        r = kvx_t_read(a, dc, dup, 3, 0);
        r.remote_blocks = ids;
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        T_HAS(kvx_ctx_error(D), "local block id 4 appears twice");
        T_EQ(t, 0);
        r = kvx_t_read(a, dc, ids, 4, 0);
        r.layer_begin = 2; r.layer_count = 3;
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        r.layer_begin = 0xFFFFFFFFu; r.layer_count = 0;
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        r = kvx_t_read(a, dc, &big, 1, 0);
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        r = kvx_t_read(a, dc, ids, 0, 0);
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        r = kvx_t_read(a, dc, NULL, 4, 0);
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        /* a table of 200,000 distinct runs, more than the queue holds: refused, not truncated */
        many = (uint32_t *)malloc(200000 * sizeof *many);
        for (i = 0; i < 200000; i++) many[i] = (i * 2) % NB;
        r = kvx_t_read(a, dc, many, 200000, 0);
        T_ST(kvx_post(q, &r, &t), KVX_ERR_ARG);
        free(many);
        memset(&qd, 0, sizeof qd);
        qd.depth = 0x7FFFFFFFu;
        { kvx_queue *qq = NULL; T_ST(kvx_queue_create(D, &qd, &qq), KVX_ERR_ARG); T_CHECK(qq == NULL); }
        T_EQ(kvx_poll(q, NULL, 0x7FFFFFFF), 0);
        T_EQ(kvx_notifications(D, NULL, 5), 0);
        { kvx_peer *x; T_ST(kvx_peer_add(D, md, 0, &x), KVX_ERR_ARG); }
        T_ST(kvx_metadata(D, md, NULL), KVX_ERR_ARG);
        { size_t small = 3; T_ST(kvx_metadata(D, md, &small), KVX_ERR_ARG); T_HAS(kvx_ctx_error(D), "buffer has 3"); }
        kvx_stats(D, &s1);
        T_EQ(s1.reads_posted, s0.reads_posted);
        T_EQ(s1.descs_posted, s0.descs_posted);
        /* a queue that is full answers KVX_PENDING, and recovers once reported */
        {
            kvx_queue *qs;
            kvx_ticket tt[3];
            memset(&qd, 0, sizeof qd);
            qd.depth = 2;
            T_ST(kvx_queue_create(D, &qd, &qs), KVX_OK);
            r = kvx_t_read(a, dc, ids, 2, 0);
            T_ST(kvx_post(qs, &r, &tt[0]), KVX_OK);
            T_ST(kvx_post(qs, &r, &tt[1]), KVX_OK);
            T_ST(kvx_post(qs, &r, &tt[2]), KVX_PENDING);
            T_HAS(kvx_ctx_error(D), "queue full");
            T_ST(kvx_wait(qs, tt[0], 10000), KVX_OK);
            T_ST(kvx_post(qs, &r, &tt[2]), KVX_OK);
            T_ST(kvx_wait(qs, tt[1], 10000), KVX_OK);
            T_ST(kvx_wait(qs, tt[2], 10000), KVX_OK);
            kvx_queue_destroy(qs);
        }
        kvx_queue_destroy(q);
        kvx_peer_remove(a);
        kvx_t_finish(&p);
        free(md);
    }

    T_CASE("metadata of another kvx version and garbage: refused, saying why") {
        kvx_t_child p;
        uint32_t l, k;
        uint8_t *md = (uint8_t *)spawn_owner(&p, 0, 1, 81, &l), junk[300];
        kvx_peer *a = NULL;
        uint8_t zero[4] = {0, 0, 0, 0};
        uint32_t crc;
        char want[64];
        md[4] = KVX_METADATA_VERSION + 1;
        crc = crc32c(crc32c(crc32c(0, md, 12), zero, 4), md + 16, l - 16);
        for (k = 0; k < 4; k++) md[12 + k] = (uint8_t)(crc >> (8 * k));
        T_ST(kvx_peer_add(D, md, l, &a), KVX_ERR_MISMATCH);
        snprintf(want, sizeof want, "version %d, this kvx reads version %d", KVX_METADATA_VERSION + 1, KVX_METADATA_VERSION);
        T_HAS(kvx_ctx_error(D), want);
        for (k = 0; k < sizeof junk; k++) junk[k] = (uint8_t)(k * 37 + 11);
        T_CHECK(kvx_peer_add(D, junk, sizeof junk, &a) != KVX_OK);
        T_CHECK(strlen(kvx_ctx_error(D)) > 10);
        kvx_t_finish(&p);
        free(md);
    }

    T_CASE("rendezvous: nobody listening, nobody answering, garbage: errors within their deadlines") {
        int lfd, port = 0, fd, fd2;
        double st;
        void *buf;
        uint32_t len;
        char hp[64];
        lfd = kvx_rdv_listen("127.0.0.1:0", &port);
        T_CHECK(lfd >= 0);
        snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
        close(lfd);                                   /* nobody listens there now */
        st = kvx_t_now();
        T_CHECK(kvx_rdv_connect(hp, 400) < 0);
        T_CHECK(kvx_t_now() - st < 1.5);
        T_HAS(kvx_rdv_error(), "cannot connect");
        lfd = kvx_rdv_listen("127.0.0.1:0", &port);
        snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
        fd = kvx_rdv_connect(hp, 1000);
        fd2 = kvx_rdv_accept(lfd, 1000);
        st = kvx_t_now();
        T_CHECK(kvx_rdv_recv(fd, 1, &buf, &len, 300) < 0);   /* accepted, never answers */
        T_CHECK(kvx_t_now() - st < 1.0);
        T_HAS(kvx_rdv_error(), "did not answer");
        T_CHECK(write(fd2, "GARBAGE-GARBAGE!", 16) == 16);
        T_CHECK(kvx_rdv_recv(fd, 1, &buf, &len, 1000) < 0);
        T_HAS(kvx_rdv_error(), "malformed frame");
        close(fd); close(fd2); close(lfd);
    }

    kvx_ctx_destroy(D);
    kvx_ex_cache_free(&m);
    return kvx_t_summary();
}
