/*
    py_overhead.c -- the C side of bench/py_overhead.py: each function makes
    one kvx call and returns the nanoseconds it took, so the benchmark can
    time the same call from C and from Python in one process, on one queue,
    in one run. It holds no kvx implementation: the kvx functions come as
    pointers from the library the Python package loaded (ctypes), so both
    sides call the very same code.
*/
#include <time.h>
#include "../kvx.h"

typedef kvx_status (*kvxb_post_fn)(kvx_queue *, const kvx_read *, kvx_ticket *);
typedef kvx_status (*kvxb_post_batch_fn)(kvx_queue *, const kvx_read *, uint32_t, kvx_ticket *, uint32_t *);
typedef int (*kvxb_poll_fn)(kvx_queue *, kvx_completion *, int);
typedef kvx_status (*kvxb_wait_fn)(kvx_queue *, kvx_ticket, uint32_t);
typedef kvx_status (*kvxb_stream_wait_fn)(kvx_queue *, kvx_ticket, void *);

static long long kvxb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

long long kvxb_post(kvxb_post_fn post, kvx_queue *q, const kvx_read *rd, kvx_ticket *t, int *status);
long long kvxb_post(kvxb_post_fn post, kvx_queue *q, const kvx_read *rd, kvx_ticket *t, int *status) {
    long long t0 = kvxb_now();
    *status = post(q, rd, t);
    return kvxb_now() - t0;
}

long long kvxb_poll(kvxb_poll_fn poll, kvx_queue *q, kvx_completion *out, int max, int *n);
long long kvxb_poll(kvxb_poll_fn poll, kvx_queue *q, kvx_completion *out, int max, int *n) {
    long long t0 = kvxb_now();
    *n = poll(q, out, max);
    return kvxb_now() - t0;
}

long long kvxb_wait(kvxb_wait_fn wait, kvx_queue *q, kvx_ticket t, int *status);
long long kvxb_wait(kvxb_wait_fn wait, kvx_queue *q, kvx_ticket t, int *status) {
    long long t0 = kvxb_now();
    *status = wait(q, t, 10000);
    return kvxb_now() - t0;
}

/* A CUDA read from C as an engine's C++ would post it: the post and the
   stream wait, timed together. */
long long kvxb_post_stream(kvxb_post_fn post, kvxb_stream_wait_fn sw, kvx_queue *q, const kvx_read *rd, void *stream,
                           kvx_ticket *t, int *status);
long long kvxb_post_stream(kvxb_post_fn post, kvxb_stream_wait_fn sw, kvx_queue *q, const kvx_read *rd, void *stream,
                           kvx_ticket *t, int *status) {
    long long t0 = kvxb_now();
    *status = post(q, rd, t);
    if (*status == KVX_OK) *status = sw(q, *t, stream);
    return kvxb_now() - t0;
}

long long kvxb_post_batch(kvxb_post_batch_fn post, kvx_queue *q, const kvx_read *reads, uint32_t n, kvx_ticket *t, int *status);
long long kvxb_post_batch(kvxb_post_batch_fn post, kvx_queue *q, const kvx_read *reads, uint32_t n, kvx_ticket *t, int *status) {
    uint32_t posted = 0;
    long long t0 = kvxb_now();
    *status = post(q, reads, n, t, &posted);
    return kvxb_now() - t0;
}
