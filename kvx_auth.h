/* SPDX-License-Identifier: MIT */
/*
    kvx_auth.h -- what lets an owner tell a reader that holds its metadata
    from any process that can reach its port. Part of kvx's implementation,
    included by kvx.h; do not include it yourself.

        the OS's random source   getrandom(2): a context's secret (128 bits
                                 per context and epoch), nonce keys, libfabric keys
        constant-time compare    secrets and tags, so timing tells a prober nothing
        SipHash-2-4              a keyed function for per-request nonces: cheap
                                 (tens of ns), unpredictable without its key
        SHA-256, HMAC-SHA-256    signed metadata, with a deployment key

    Written from FIPS 180-4 (SHA-256), RFC 2104 (HMAC) and Aumasson and
    Bernstein's SipHash paper; tests/unit/test_auth.c checks them against the
    published vectors (FIPS 180-4's examples, RFC 4231, the paper's appendix).

    What this does not do: kvx encrypts nothing. The secret and the data
    cross the network in the clear; a process that can read the traffic
    learns the secret (docs/security.md).
*/
#ifndef KVX_AUTH_INCLUDED
#define KVX_AUTH_INCLUDED
#include "kvx_internal.h"

#include <fcntl.h>
#include <sys/syscall.h>

#define KVX__SECRET_BYTES 16u
#define KVX__TAG_BYTES 32u

/* n bytes from the kernel's random source; 0 on success. */
KVX__PRIV int kvx__random(void *out, size_t n) {
    uint8_t *p = (uint8_t *)out;
    while (n) {
        long k = -1;
#if defined(SYS_getrandom)
        k = syscall(SYS_getrandom, p, n, 0);
#endif
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {  /* no getrandom: /dev/urandom, which is the same source */
            int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
            ssize_t r;
            if (fd < 0) return -1;
            while (n && (r = read(fd, p, n)) > 0) { p += r; n -= (size_t)r; }
            close(fd);
            return n ? -1 : 0;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* 1 when a and b hold the same n bytes; the time taken does not depend on where they differ. */
KVX__PRIV int kvx__ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    uint8_t d = 0;
    size_t i;
    for (i = 0; i < n; i++) d |= (uint8_t)(a[i] ^ b[i]);
    return d == 0;
}

/*--- SipHash-2-4 ------------------------------------------------------------*/

#define KVX__ROTL64(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define KVX__SIPROUND(v0, v1, v2, v3) do { \
    v0 += v1; v1 = KVX__ROTL64(v1, 13); v1 ^= v0; v0 = KVX__ROTL64(v0, 32); \
    v2 += v3; v3 = KVX__ROTL64(v3, 16); v3 ^= v2; \
    v0 += v3; v3 = KVX__ROTL64(v3, 21); v3 ^= v0; \
    v2 += v1; v1 = KVX__ROTL64(v1, 17); v1 ^= v2; v2 = KVX__ROTL64(v2, 32); } while (0)

KVX__PRIV_MAYBE uint64_t kvx__le64(const uint8_t *p) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* SipHash-2-4 of n bytes under a 16-byte key. */
KVX__PRIV_MAYBE uint64_t kvx__siphash(const uint8_t key[16], const uint8_t *m, size_t n) {
    uint64_t k0 = kvx__le64(key), k1 = kvx__le64(key + 8);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ull, v1 = k1 ^ 0x646f72616e646f6dull;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ull, v3 = k1 ^ 0x7465646279746573ull;
    uint64_t b = (uint64_t)n << 56, mi;
    size_t i, left = n & 7u;
    uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (i = 0; i + 8 <= n; i += 8) {
        mi = kvx__le64(m + i);
        v3 ^= mi;
        KVX__SIPROUND(v0, v1, v2, v3);
        KVX__SIPROUND(v0, v1, v2, v3);
        v0 ^= mi;
    }
    if (left) memcpy(tail, m + i, left);
    b |= kvx__le64(tail);
    v3 ^= b;
    KVX__SIPROUND(v0, v1, v2, v3);
    KVX__SIPROUND(v0, v1, v2, v3);
    v0 ^= b;
    v2 ^= 0xff;
    KVX__SIPROUND(v0, v1, v2, v3);
    KVX__SIPROUND(v0, v1, v2, v3);
    KVX__SIPROUND(v0, v1, v2, v3);
    KVX__SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* Nonces: SipHash of a counter under a random key, never 0 (0 means none). */
typedef struct kvx__nonces { uint8_t key[16]; uint64_t count; } kvx__nonces;

KVX__PRIV_MAYBE int kvx__nonces_init(kvx__nonces *n) {
    n->count = 0;
    return kvx__random(n->key, sizeof n->key);
}
KVX__PRIV_MAYBE uint64_t kvx__nonce(kvx__nonces *n) {
    uint8_t c[8];
    uint64_t v;
    int i;
    do {
        uint64_t x = ++n->count;
        for (i = 0; i < 8; i++) c[i] = (uint8_t)(x >> (8 * i));
        v = kvx__siphash(n->key, c, 8);
    } while (!v);
    return v;
}

/*--- SHA-256 and HMAC-SHA-256 ------------------------------------------------*/

typedef struct kvx__sha256 { uint32_t h[8]; uint64_t bytes; uint8_t buf[64]; uint32_t used; } kvx__sha256;

#define KVX__ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

KVX__PRIV void kvx__sha256_block(kvx__sha256 *s, const uint8_t *p) {
    static const uint32_t k[64] = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
        0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
        0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
        0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
        0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
        0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
        0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};
    uint32_t w[64], a, b, c, d, e, f, g, h, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = KVX__ROTR32(w[i - 15], 7) ^ KVX__ROTR32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = KVX__ROTR32(w[i - 2], 17) ^ KVX__ROTR32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (i = 0; i < 64; i++) {
        t1 = h + (KVX__ROTR32(e, 6) ^ KVX__ROTR32(e, 11) ^ KVX__ROTR32(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
        t2 = (KVX__ROTR32(a, 2) ^ KVX__ROTR32(a, 13) ^ KVX__ROTR32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d; s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

KVX__PRIV void kvx__sha256_init(kvx__sha256 *s) {
    static const uint32_t h0[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au, 0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    memcpy(s->h, h0, sizeof h0);
    s->bytes = 0;
    s->used = 0;
}

KVX__PRIV void kvx__sha256_add(kvx__sha256 *s, const void *data, size_t n) {
    const uint8_t *p = (const uint8_t *)data;
    s->bytes += n;
    while (n) {
        size_t k = 64u - s->used < n ? 64u - s->used : n;
        memcpy(s->buf + s->used, p, k);
        s->used += (uint32_t)k;
        p += k;
        n -= k;
        if (s->used == 64) { kvx__sha256_block(s, s->buf); s->used = 0; }
    }
}

KVX__PRIV void kvx__sha256_end(kvx__sha256 *s, uint8_t out[32]) {
    uint64_t bits = s->bytes * 8u;
    uint8_t pad = 0x80, zero = 0, len[8];
    int i;
    kvx__sha256_add(s, &pad, 1);
    while (s->used != 56) kvx__sha256_add(s, &zero, 1);
    for (i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    kvx__sha256_add(s, len, 8);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24); out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8); out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

/* HMAC-SHA-256 of the n1 bytes at m1 followed by the n2 at m2 (either may be
   empty): metadata is signed with its tag field left out. */
KVX__PRIV void kvx__hmac_sha256(const uint8_t *key, size_t klen, const uint8_t *m1, size_t n1, const uint8_t *m2, size_t n2,
                                uint8_t out[32]) {
    uint8_t k[64], pad[64], inner[32];
    kvx__sha256 s;
    size_t i;
    memset(k, 0, sizeof k);
    if (klen > 64) { kvx__sha256_init(&s); kvx__sha256_add(&s, key, klen); kvx__sha256_end(&s, k); }
    else if (klen) memcpy(k, key, klen);
    for (i = 0; i < 64; i++) pad[i] = (uint8_t)(k[i] ^ 0x36);
    kvx__sha256_init(&s);
    kvx__sha256_add(&s, pad, 64);
    if (n1) kvx__sha256_add(&s, m1, n1);
    if (n2) kvx__sha256_add(&s, m2, n2);
    kvx__sha256_end(&s, inner);
    for (i = 0; i < 64; i++) pad[i] = (uint8_t)(k[i] ^ 0x5c);
    kvx__sha256_init(&s);
    kvx__sha256_add(&s, pad, 64);
    kvx__sha256_add(&s, inner, 32);
    kvx__sha256_end(&s, out);
}

#endif /* KVX_AUTH_INCLUDED */
