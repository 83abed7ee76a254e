/* SPDX-License-Identifier: MIT */
/*
    kvx_gpu.h -- what every backend shares on the GPU: the process-wide
    device table (primary contexts, attributes, the kernels' module) and
    stream-ordered completion. Included by kvx.h inside its implementation
    when KVX_CUDA is defined; do not include it yourself. The CUDA backend
    (kvx_cuda.h) builds on it; UCX and libfabric reads use only its
    stream-ordered completion.

    STREAM-ORDERED COMPLETION (every backend)

        kvx_stream_wait(q, ticket, stream) makes later work on stream wait
        for the read without blocking the host: cuStreamWaitValue64 on the
        completion word of the ticket's slot (ticket % queue depth), in pinned
        host memory mapped for the GPU. The word holds (ticket << 2) | state,
        state 0 pending, 1 done, 2 failed; the wait passes on 1 or 2, so a read
        that fails releases the stream. kvx_stream_status_ptr(q, ticket) gives
        the word's address for kernels: after the wait they check
        (word & 3) == 1 (and, where they know it, word >> 2 == ticket).

        Who writes the word: for CUDA reads, the copy kernel itself, as each
        read's last byte lands (complete in stream order by construction).
        UCX and libfabric reads complete on the host (progress thread or
        kvx_progress/kvx_test/kvx_wait), which writes it; reads into GPU
        memory first make the network's writes visible:
        CU_STREAM_WAIT_VALUE_FLUSH on the wait where the device reports
        CAN_FLUSH_REMOTE_WRITES (0 on H100 and H200), else
        cuFlushGPUDirectRDMAWrites before the word is written (logged once).
        Stream waits need 64-bit stream memory operations
        (CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, on by default
        since CUDA 11.7; NOR waits are not used); without them kvx_stream_wait
        fails with KVX_ERR_UNSUPPORTED. Every CUDA return code is checked: a
        wait that fails inside stream capture would otherwise silently be left
        out of the graph.

        CUDA graphs: kvx_stream_wait works on a stream under capture. The
        node waits on the SLOT's word, and every kvx_post re-arms its slot's
        word to pending with the new ticket. So a graph captured with ticket
        t waits, at each replay, for whichever read holds slot t % depth when
        the replay runs: post the read a replay needs before launching it, and
        post into the same slot (a queue of depth 1, or one graph per slot, or
        exactly depth posts per step). A wait still queued on the GPU when its
        slot is re-armed waits for the newer read.

        The words exist once a queue has a stream: made with
        kvx_queue_desc.cuda.stream set (or on the CUDA backend), else at the
        first kvx_stream_wait outside capture (a capture cannot allocate).

    DEADLOCK NOTE: stream memory waits are invisible to CUDA's scheduler. A
    wait queued before the work that releases it can hold that work back when
    both share a hardware queue. kvx launches a CUDA read at kvx_post (unless
    the queue's staging is full), before any wait on it is queued; host-side
    completions (UCX, libfabric) never depend on the GPU.
*/
#ifndef KVX_GPU_INCLUDED
#define KVX_GPU_INCLUDED
#include "kvx_internal.h"

/* cuda.h has unnamed unions, which strict C99 pedantry flags. */
#if defined(__GNUC__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wpedantic"
#endif
#include <cuda.h>
#if defined(__GNUC__)
#  pragma GCC diagnostic pop
#endif
#include "kvx_cuda_ptx.h"

#define KVX__GPU_MAX_DEVS 64

/*--- process-wide device table ---------------------------------------------*/

typedef struct kvx__gpu_dev {
    int attrs;                  /* attributes below were read */
    CUdevice dev;
    CUcontext pctx;             /* primary context, retained while refs > 0 */
    int refs;
    int sms, mem64, can_flush, flush_opts, rdma_order;
    CUuuid uuid;
    CUmodule mod;               /* the copy kernel, in pctx */
    CUfunction fn, fn_inline;       /* the copy kernel: batch in device or mapped memory, batch in its parameters */
    CUfunction fn_seal, fn_check;   /* verify mode's checksum kernels */
    int flush_logged;
} kvx__gpu_dev;

static kvx__gpu_dev kvx__gpu_devs[KVX__GPU_MAX_DEVS];
static pthread_mutex_t kvx__gpu_mu = PTHREAD_MUTEX_INITIALIZER;
static int kvx__gpu_inited;
static CUresult kvx__gpu_init_rc;
static uint64_t kvx__gpu_token;    /* tells a peer in this very process */

KVX__PRIV kvx_status kvx__gpu_err(kvx_ctx *ctx, CUresult rc, const char *what) {
    const char *name = NULL, *text = NULL;
    cuGetErrorName(rc, &name);
    cuGetErrorString(rc, &text);
    return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: %s: %s (%d): %s", what, name ? name : "CUDA_ERROR", (int)rc, text ? text : "");
}

KVX__PRIV kvx_status kvx__gpu_init(kvx_ctx *ctx) {
    pthread_mutex_lock(&kvx__gpu_mu);
    if (!kvx__gpu_inited) {
        kvx__gpu_init_rc = cuInit(0);
        kvx__gpu_token = kvx__now_ns() ^ ((uint64_t)getpid() << 40) ^ (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull;
        kvx__gpu_inited = 1;
    }
    pthread_mutex_unlock(&kvx__gpu_mu);
    if (kvx__gpu_init_rc != CUDA_SUCCESS)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: cuInit failed (%d): no usable GPU driver here (stub libcuda, no device, or CUDA_VISIBLE_DEVICES empty)",
                         (int)kvx__gpu_init_rc);
    return KVX_OK;
}

KVX__PRIV CUresult kvx__gpu_module(kvx__gpu_dev *d) {
    size_t n = 1, i;
    char *text, *p;
    CUresult rc;
    if (d->fn) return CUDA_SUCCESS;
    for (i = 0; kvx__cuda_ptx[i]; i++) n += strlen(kvx__cuda_ptx[i]);
    if (!(text = (char *)KVX_MALLOC(n))) return CUDA_ERROR_OUT_OF_MEMORY;
    for (p = text, i = 0; kvx__cuda_ptx[i]; i++) { size_t l = strlen(kvx__cuda_ptx[i]); memcpy(p, kvx__cuda_ptx[i], l); p += l; }
    *p = 0;
    rc = cuModuleLoadData(&d->mod, text);
    KVX_FREE(text);
    if (rc == CUDA_SUCCESS && ((rc = cuModuleGetFunction(&d->fn, d->mod, "kvx_copy")) != CUDA_SUCCESS ||
                               (rc = cuModuleGetFunction(&d->fn_inline, d->mod, "kvx_copy_inline")) != CUDA_SUCCESS ||
                               (rc = cuModuleGetFunction(&d->fn_seal, d->mod, "kvx_csum_seal")) != CUDA_SUCCESS ||
                               (rc = cuModuleGetFunction(&d->fn_check, d->mod, "kvx_csum_check")) != CUDA_SUCCESS)) {
        d->fn = NULL;
        cuModuleUnload(d->mod);
        d->mod = NULL;
    }
    return rc;
}

/* Device ord's attributes (no context needed); NULL if it does not exist. */
KVX__PRIV kvx__gpu_dev *kvx__gpu_attrs(kvx_ctx *ctx, int ord) {
    kvx__gpu_dev *d;
    CUresult rc = CUDA_SUCCESS;
    int n = 0;
    if (kvx__gpu_init(ctx) != KVX_OK) return NULL;
    if (cuDeviceGetCount(&n) != CUDA_SUCCESS || ord < 0 || ord >= n || ord >= KVX__GPU_MAX_DEVS) {
        kvx__fail(ctx, KVX_ERR_ARG, "cuda: device %d does not exist here (%d visible)", ord, n);
        return NULL;
    }
    pthread_mutex_lock(&kvx__gpu_mu);
    d = &kvx__gpu_devs[ord];
    if (!d->attrs && (rc = cuDeviceGet(&d->dev, ord)) == CUDA_SUCCESS && (rc = cuDeviceGetUuid(&d->uuid, d->dev)) == CUDA_SUCCESS) {
        int v = 0;
        if (cuDeviceGetAttribute(&d->sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, d->dev) != CUDA_SUCCESS || d->sms < 1) d->sms = 1;
        d->mem64 = cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, d->dev) == CUDA_SUCCESS && v;
        v = 0;
        d->can_flush = cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_CAN_FLUSH_REMOTE_WRITES, d->dev) == CUDA_SUCCESS && v;
        if (cuDeviceGetAttribute(&d->flush_opts, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS, d->dev) != CUDA_SUCCESS) d->flush_opts = 0;
        if (cuDeviceGetAttribute(&d->rdma_order, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING, d->dev) != CUDA_SUCCESS) d->rdma_order = 0;
        d->attrs = 1;
    }
    pthread_mutex_unlock(&kvx__gpu_mu);
    if (rc != CUDA_SUCCESS) { kvx__gpu_err(ctx, rc, "cuDeviceGet/cuDeviceGetUuid"); return NULL; }
    return d;
}

/* Retain device ord's primary context; with_module loads the copy kernel
   too. Paired with kvx__gpu_dev_put. */
KVX__PRIV kvx_status kvx__gpu_dev_get(kvx_ctx *ctx, int ord, int with_module, kvx__gpu_dev **out) {
    kvx__gpu_dev *d = kvx__gpu_attrs(ctx, ord);
    CUresult rc = CUDA_SUCCESS;
    const char *what = "";
    if (!d) return KVX_ERR_ARG;
    pthread_mutex_lock(&kvx__gpu_mu);
    if (!d->refs && (rc = cuDevicePrimaryCtxRetain(&d->pctx, d->dev)) != CUDA_SUCCESS) { what = "cuDevicePrimaryCtxRetain"; goto out; }
    d->refs++;
    if (with_module && !d->fn) {
        CUcontext prev;
        if ((rc = cuCtxPushCurrent(d->pctx)) == CUDA_SUCCESS) {
            rc = kvx__gpu_module(d);
            cuCtxPopCurrent(&prev);
        }
        if (rc != CUDA_SUCCESS) {
            what = "cuModuleLoadData (the copy kernel's PTX)";
            if (!--d->refs) { cuDevicePrimaryCtxRelease(d->dev); d->pctx = NULL; }
        }
    }
out:
    pthread_mutex_unlock(&kvx__gpu_mu);
    if (rc != CUDA_SUCCESS) {
        char w[96];
        snprintf(w, sizeof w, "%s on device %d", what, ord);
        return kvx__gpu_err(ctx, rc, w);
    }
    *out = d;
    return KVX_OK;
}

KVX__PRIV void kvx__gpu_dev_put(kvx__gpu_dev *d) {
    if (!d) return;
    pthread_mutex_lock(&kvx__gpu_mu);
    if (d->refs > 0 && --d->refs == 0) {
        if (d->mod) {
            CUcontext prev;
            if (cuCtxPushCurrent(d->pctx) == CUDA_SUCCESS) { cuModuleUnload(d->mod); cuCtxPopCurrent(&prev); }
            d->mod = NULL;
            d->fn = NULL;
        }
        cuDevicePrimaryCtxRelease(d->dev);
        d->pctx = NULL;
    }
    pthread_mutex_unlock(&kvx__gpu_mu);
}

/* The device ordinal a context (or stream) runs on. */
KVX__PRIV CUresult kvx__gpu_ctx_ordinal(CUcontext c, int *ord) {
    CUcontext prev;
    CUdevice dev;
    CUresult rc = cuCtxPushCurrent(c);
    if (rc != CUDA_SUCCESS) return rc;
    rc = cuCtxGetDevice(&dev);
    cuCtxPopCurrent(&prev);
    if (rc == CUDA_SUCCESS) *ord = (int)dev;  /* a CUdevice is its ordinal */
    return rc;
}

KVX__PRIV int kvx__gpu_ordinal_of_uuid(const uint8_t *uuid) {
    int n = 0, i;
    if (cuDeviceGetCount(&n) != CUDA_SUCCESS) return -1;
    for (i = 0; i < n; i++) {
        CUdevice dev;
        CUuuid u;
        if (cuDeviceGet(&dev, i) == CUDA_SUCCESS && cuDeviceGetUuid(&u, dev) == CUDA_SUCCESS && !memcmp(u.bytes, uuid, 16)) return i;
    }
    return -1;
}

/* Stream-ordered completion state of any queue (q->stream). */
typedef struct kvx__stream_q {
    kvx__gpu_dev *d;           /* the device whose primary context allocated the words */
    uint64_t *words;            /* depth words, pinned, mapped for every device */
    CUdeviceptr dwords;
} kvx__stream_q;


/*--- stream-ordered completion (every backend) -------------------------------*/

KVX__PRIV kvx__stream_q *kvx__stream_of(kvx_queue *q) { return (kvx__stream_q *)q->stream; }


KVX__PRIV kvx_status kvx__stream_alloc(kvx_queue *q, int ord) {
    kvx_ctx *ctx = q->ctx;
    kvx__stream_q *sq = kvx__stream_of(q);
    CUcontext prev;
    CUresult rc;
    uint32_t i;
    kvx_status st;
    if (!sq) {
        if (!(sq = (kvx__stream_q *)kvx__calloc(1, sizeof *sq))) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
        q->stream = sq;
    }
    if (sq->words) return KVX_OK;
    if ((st = kvx__gpu_dev_get(ctx, ord, 0, &sq->d)) != KVX_OK) return st;
    if ((rc = cuCtxPushCurrent(sq->d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent");
    rc = cuMemHostAlloc((void **)&sq->words, (size_t)q->depth * 8u, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
    if (rc == CUDA_SUCCESS && (rc = cuMemHostGetDevicePointer(&sq->dwords, sq->words, 0)) != CUDA_SUCCESS) { cuMemFreeHost(sq->words); sq->words = NULL; }
    cuCtxPopCurrent(&prev);
    if (rc != CUDA_SUCCESS) { kvx__gpu_dev_put(sq->d); sq->d = NULL; return kvx__gpu_err(ctx, rc, "cuMemHostAlloc (completion words)"); }
    /* Words of reads made before now tell their state as it is. */
    for (i = 0; i < q->depth; i++) {
        const kvx__read *rd = &q->slots[i];
        sq->words[i] = rd->ticket ? (rd->ticket << 2) | (rd->done ? (rd->status == KVX_OK ? 1u : 2u) : 0u) : 0;
    }
    return KVX_OK;
}

/* The device a stream runs on. */
KVX__PRIV kvx_status kvx__stream_ordinal(kvx_ctx *ctx, void *stream, int *ord) {
    CUcontext sc = NULL;
    CUresult rc = cuStreamGetCtx((CUstream)stream, &sc);
    if (rc == CUDA_SUCCESS) rc = kvx__gpu_ctx_ordinal(sc, ord);
    return rc == CUDA_SUCCESS ? KVX_OK : kvx__gpu_err(ctx, rc, "the stream's context (cuStreamGetCtx)");
}

/* Words now where the queue names a stream; else they come with the first
   kvx_stream_wait (or the backend made them already: the CUDA backend's
   kernels write them). */
KVX__PRIV kvx_status kvx__stream_queue_init(kvx_queue *q) {
    kvx__stream_q *sq = kvx__stream_of(q);
    kvx_status st;
    int ord = -1;
    if (!q->cuda_stream || (sq && sq->words)) return KVX_OK;
    if ((st = kvx__gpu_init(q->ctx)) == KVX_OK && (st = kvx__stream_ordinal(q->ctx, q->cuda_stream, &ord)) == KVX_OK)
        st = kvx__stream_alloc(q, ord);
    return st;
}

KVX__PRIV void kvx__stream_queue_fini(kvx_queue *q) {
    kvx__stream_q *sq = kvx__stream_of(q);
    if (!sq) return;
    if (sq->words) {
        CUcontext prev;
        if (cuCtxPushCurrent(sq->d->pctx) == CUDA_SUCCESS) { cuMemFreeHost(sq->words); cuCtxPopCurrent(&prev); }
    }
    kvx__gpu_dev_put(sq->d);
    KVX_FREE(sq);
    q->stream = NULL;
}

KVX__PRIV void kvx__stream_read_post(kvx__read *rd) {
    kvx__stream_q *sq = kvx__stream_of(rd->q);
    if (sq && sq->words) __atomic_store_n(&sq->words[rd->ticket % rd->q->depth], rd->ticket << 2, __ATOMIC_SEQ_CST);  /* re-armed: pending */
}

/* Network writes into GPU memory become visible to the GPU before the word
   says done: by the wait's flush flag where the device can, else here. */
KVX__PRIV void kvx__stream_rdma_flush(kvx_ctx *ctx, int ord) {
    kvx__gpu_dev *d;
    CUcontext prev;
    CUresult rc = CUDA_SUCCESS;
    if (kvx__gpu_dev_get(ctx, ord, 0, &d) != KVX_OK) return;
    if (!d->can_flush && (d->flush_opts & CU_FLUSH_GPU_DIRECT_RDMA_WRITES_OPTION_HOST) && cuCtxPushCurrent(d->pctx) == CUDA_SUCCESS) {
        rc = cuFlushGPUDirectRDMAWrites(CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX, CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER);
        cuCtxPopCurrent(&prev);
    }
    if (!d->flush_logged || rc != CUDA_SUCCESS) {
        d->flush_logged = 1;
        KVX__LOG(ctx, rc != CUDA_SUCCESS ? KVX_LOG_ERROR : KVX_LOG_INFO, "cuda: device %d: network writes into GPU memory are made visible %s%s", ord,
                 d->can_flush ? "by CU_STREAM_WAIT_VALUE_FLUSH on each stream wait (CAN_FLUSH_REMOTE_WRITES is 1)"
                 : (d->flush_opts & CU_FLUSH_GPU_DIRECT_RDMA_WRITES_OPTION_HOST) ? "by cuFlushGPUDirectRDMAWrites before the completion word is written"
                 : "by the device's own ordering (no flush is offered)", rc != CUDA_SUCCESS ? ", but cuFlushGPUDirectRDMAWrites failed" : "");
    }
    kvx__gpu_dev_put(d);
}

KVX__PRIV void kvx__stream_read_final(kvx__read *rd) {
    kvx_queue *q = rd->q;
    kvx__stream_q *sq = kvx__stream_of(q);
    if (!sq || !sq->words) return;
    if (rd->status == KVX_OK && !q->ctx->be_ops->completes_on_gpu && rd->lc->mem == KVX_MEM_CUDA) kvx__stream_rdma_flush(q->ctx, rd->lc->device);
    __atomic_store_n(&sq->words[rd->ticket % q->depth], (rd->ticket << 2) | (rd->status == KVX_OK ? 1u : 2u), __ATOMIC_SEQ_CST);
}

KVX__PRIV kvx_status kvx__stream_wait(kvx_queue *q, kvx_ticket t, void *stream) {
    kvx_ctx *ctx;
    kvx__stream_q *sq;
    kvx__read *rd;
    kvx__gpu_dev *d;
    CUstreamCaptureStatus cs = CU_STREAM_CAPTURE_STATUS_NONE;
    unsigned int flags = CU_STREAM_WAIT_VALUE_AND;
    kvx_status st;
    CUresult rc;
    int ord = -1;
    uint32_t i;
    if (!q) return KVX_ERR_ARG;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    if (!t || t >= q->next_ticket) { st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_stream_wait: ticket %llu was never issued by this queue", (unsigned long long)t); goto out; }
    if ((st = kvx__gpu_init(ctx)) != KVX_OK) goto out;
    if ((rc = cuStreamIsCapturing((CUstream)stream, &cs)) != CUDA_SUCCESS) { st = kvx__gpu_err(ctx, rc, "kvx_stream_wait: cuStreamIsCapturing"); goto out; }
    rd = &q->slots[t % q->depth];
    if (cs == CU_STREAM_CAPTURE_STATUS_NONE && rd->ticket != t) {
        st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_stream_wait: ticket %llu is no longer held: its slot (ticket %% depth %u) holds ticket %llu",
                       (unsigned long long)t, q->depth, (unsigned long long)rd->ticket);
        goto out;
    }
    if ((st = kvx__stream_ordinal(ctx, stream, &ord)) != KVX_OK) goto out;
    sq = kvx__stream_of(q);
    if (!sq || !sq->words) {
        if (cs != CU_STREAM_CAPTURE_STATUS_NONE) {
            st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_stream_wait: the queue has no completion words yet and a capture cannot allocate them: "
                           "create it with kvx_queue_desc.cuda.stream, or call kvx_stream_wait once before capturing");
            goto out;
        }
        if ((st = kvx__stream_alloc(q, ord)) != KVX_OK) goto out;
        sq = kvx__stream_of(q);
    }
    if (!(d = kvx__gpu_attrs(ctx, ord))) { st = KVX_ERR_BACKEND; goto out; }
    if (!d->mem64) {
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_stream_wait: device %d cannot run 64-bit stream memory operations "
                       "(CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS is 0): update the driver (CUDA 11.7 or newer)", ord);
        goto out;
    }
    if (!ctx->be_ops->completes_on_gpu && d->can_flush)
        for (i = 0; i < ctx->ncaches; i++)
            if (ctx->caches[i]->info.mem == KVX_MEM_CUDA) flags |= CU_STREAM_WAIT_VALUE_FLUSH;
    rc = cuStreamWaitValue64((CUstream)stream, sq->dwords + (t % q->depth) * 8u, 3u, flags);
    if (rc != CUDA_SUCCESS) {
        char what[160];
        snprintf(what, sizeof what, "kvx_stream_wait: cuStreamWaitValue64 for ticket %llu%s", (unsigned long long)t,
                 cs != CU_STREAM_CAPTURE_STATUS_NONE ? " (under capture: the graph would lack this wait)" : "");
        st = kvx__gpu_err(ctx, rc, what);
    }
out:
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX__PRIV const volatile uint64_t *kvx__stream_status_ptr(kvx_queue *q, kvx_ticket t) {
    kvx__stream_q *sq;
    const volatile uint64_t *p = NULL;
    if (!q) return NULL;
    pthread_mutex_lock(&q->ctx->lock);
    sq = kvx__stream_of(q);
    if (!t || t >= q->next_ticket) kvx__fail(q->ctx, KVX_ERR_ARG, "kvx_stream_status_ptr: ticket %llu was never issued by this queue", (unsigned long long)t);
    else if (!sq || !sq->words) kvx__fail(q->ctx, KVX_ERR_ARG, "kvx_stream_status_ptr: the queue has no completion words (no cuda.stream, no kvx_stream_wait yet)");
    else p = (const volatile uint64_t *)(uintptr_t)(sq->dwords + (t % q->depth) * 8u);
    pthread_mutex_unlock(&q->ctx->lock);
    return p;
}

KVX__PRIV const kvx__stream_service kvx__gpu_streams = {
    KVX__F(queue_init) kvx__stream_queue_init,
    KVX__F(queue_fini) kvx__stream_queue_fini,
    KVX__F(read_posted) kvx__stream_read_post,
    KVX__F(read_final) kvx__stream_read_final,
    KVX__F(wait) kvx__stream_wait,
    KVX__F(status_ptr) kvx__stream_status_ptr,
};

#endif /* KVX_GPU_INCLUDED */
