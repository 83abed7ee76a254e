/*
    kvx_gpu_cache.h -- GPU caches for the tests and benchmarks (KVX_CUDA).

    A kvx_ex_gpu is a kvx_ex_cache in host memory (the staging copy, where
    kvx_host_cache.h fills, poisons and verifies) plus the same bytes in GPU
    memory, allocated one of the ways kvx accepts (cuMemAlloc, VMM made of
    several physical allocations, an exportable pool) or one it must refuse
    (VMM without an exportable handle type, the default pool). Push and pull
    copy the whole cache between the two.

    Driver API only. kvx_ex_gpu_init() makes the device's primary context
    current on the calling thread.
*/
#ifndef KVX_GPU_CACHE_H
#define KVX_GPU_CACHE_H

#if defined(__GNUC__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wpedantic"
#endif
#include <cuda.h>
#if defined(__GNUC__)
#  pragma GCC diagnostic pop
#endif
#include "kvx_host_cache.h"

typedef enum kvx_ex_gpu_kind {
    KVX_EX_CUMEMALLOC = 0,      /* cuMemAlloc: legacy IPC */
    KVX_EX_VMM = 1,             /* cuMemCreate, POSIX fd handles, up to 3 physical allocations back to back */
    KVX_EX_POOL = 2,            /* cuMemAllocFromPoolAsync from a pool with POSIX fd handles */
    KVX_EX_VMM_NOEXPORT = 3,    /* cuMemCreate without a handle type: kvx refuses it */
    KVX_EX_POOL_DEFAULT = 4     /* cuMemAllocAsync from the default pool: kvx refuses it */
} kvx_ex_gpu_kind;

typedef struct kvx_ex_gpu {
    kvx_ex_cache host;          /* staging copy; host.bases point into host memory */
    int device;
    kvx_ex_gpu_kind kind;
    CUdeviceptr mem;            /* the cache's first byte */
    size_t bytes;               /* host.mem_bytes */
    CUdeviceptr va;             /* VMM: the reserved range; the cache starts inside it */
    size_t reserved;
    CUmemGenericAllocationHandle h[3];
    size_t hsize[3];
    int nh;
    CUmemoryPool pool;
    CUstream s;
    void **bases;               /* device plane bases */
} kvx_ex_gpu;

static char kvx_ex_gpu_err[512];

static inline int kvx_ex_cu(CUresult rc, const char *what) {
    const char *n = NULL;
    if (rc == CUDA_SUCCESS) return 0;
    cuGetErrorName(rc, &n);
    snprintf(kvx_ex_gpu_err, sizeof kvx_ex_gpu_err, "%s: %s (%d)", what, n ? n : "?", (int)rc);
    return -1;
}

/* cuInit, and the primary context of device current on this thread. */
static inline int kvx_ex_gpu_init(int device, CUcontext *out) {
    CUdevice dev;
    CUcontext c;
    if (kvx_ex_cu(cuInit(0), "cuInit") || kvx_ex_cu(cuDeviceGet(&dev, device), "cuDeviceGet") ||
        kvx_ex_cu(cuDevicePrimaryCtxRetain(&c, dev), "cuDevicePrimaryCtxRetain") || kvx_ex_cu(cuCtxSetCurrent(c), "cuCtxSetCurrent"))
        return -1;
    if (out) *out = c;
    return 0;
}

static inline const char *kvx_ex_gpu_kind_name(kvx_ex_gpu_kind k) {
    return k == KVX_EX_CUMEMALLOC ? "cuMemAlloc" : k == KVX_EX_VMM ? "VMM" : k == KVX_EX_POOL ? "pool"
         : k == KVX_EX_VMM_NOEXPORT ? "VMM without handle type" : "default pool";
}

/* "malloc", "vmm", "pool" (for an environment variable); -1 if unknown. */
static inline int kvx_ex_gpu_kind_parse(const char *s) {
    if (!s || !*s || !strcmp(s, "malloc")) return KVX_EX_CUMEMALLOC;
    if (!strcmp(s, "vmm")) return KVX_EX_VMM;
    if (!strcmp(s, "pool")) return KVX_EX_POOL;
    return -1;
}

static inline void kvx_ex_gpu_free(kvx_ex_gpu *g) {
    int i;
    if (g->mem) {
        if (g->kind == KVX_EX_CUMEMALLOC) cuMemFree(g->mem);
        else if (g->kind == KVX_EX_POOL || g->kind == KVX_EX_POOL_DEFAULT) { cuMemFreeAsync(g->mem, g->s); cuStreamSynchronize(g->s); }
    }
    if (g->va) {
        size_t off = 0;
        for (i = 0; i < g->nh; i++) { cuMemUnmap(g->va + off, g->hsize[i]); off += g->hsize[i]; }
        cuMemAddressFree(g->va, g->reserved);
    }
    for (i = 0; i < g->nh; i++) cuMemRelease(g->h[i]);
    if (g->pool) cuMemPoolDestroy(g->pool);
    if (g->s) cuStreamDestroy(g->s);
    free(g->bases);
    kvx_ex_cache_free(&g->host);
    memset(g, 0, sizeof *g);
}

/* A cache of lay for rank of tp on device, of the given kind; -1 with
   kvx_ex_gpu_err on failure. The current context must be device's. */
static inline int kvx_ex_gpu_alloc(kvx_ex_gpu *g, const kvx_layout *lay, int rank, int tp, int device, kvx_ex_gpu_kind kind) {
    uint32_t p, np;
    memset(g, 0, sizeof *g);
    g->device = device;
    g->kind = kind;
    if (kvx_ex_cache_alloc(&g->host, lay, rank, tp)) { snprintf(kvx_ex_gpu_err, sizeof kvx_ex_gpu_err, "host staging of %zu bytes", g->host.mem_bytes); return -1; }
    g->bytes = g->host.mem_bytes;
    if (kind == KVX_EX_CUMEMALLOC) {
        if (kvx_ex_cu(cuMemAlloc(&g->mem, g->bytes), "cuMemAlloc")) goto fail;
    } else if (kind == KVX_EX_VMM || kind == KVX_EX_VMM_NOEXPORT) {
        CUmemAllocationProp prop;
        CUmemAccessDesc ad;
        size_t gran = 0, total, off = 0, shift;
        int i;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = device;
        prop.requestedHandleTypes = kind == KVX_EX_VMM ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
        if (kvx_ex_cu(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity")) goto fail;
        /* The cache starts off the first allocation's start and off any
           block boundary, so planes and blocks straddle physical allocations. */
        shift = kind == KVX_EX_VMM ? gran / 2 + (256u << 10) + 4096u : 0;
        total = (g->bytes + shift + gran - 1) / gran * gran;
        /* Several physical allocations mapped back to back: one registered
           range that is exported piece by piece. */
        g->nh = kind == KVX_EX_VMM ? (int)(total / gran < 3 ? total / gran : 3) : 1;
        for (i = 0; i < g->nh; i++) {
            size_t left = total - off, want = (total / (size_t)g->nh + gran - 1) / gran * gran;
            g->hsize[i] = i == g->nh - 1 || want > left ? left : want;
            off += g->hsize[i];
        }
        g->reserved = total;
        if (kvx_ex_cu(cuMemAddressReserve(&g->va, total, 0, 0, 0), "cuMemAddressReserve")) { g->va = 0; goto fail; }
        for (off = 0, i = 0; i < g->nh; i++) {
            if (kvx_ex_cu(cuMemCreate(&g->h[i], g->hsize[i], &prop, 0), "cuMemCreate")) { g->nh = i; goto fail; }
            if (kvx_ex_cu(cuMemMap(g->va + off, g->hsize[i], 0, g->h[i], 0), "cuMemMap")) { cuMemRelease(g->h[i]); g->nh = i; goto fail; }
            off += g->hsize[i];
        }
        memset(&ad, 0, sizeof ad);
        ad.location = prop.location;
        ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        if (kvx_ex_cu(cuMemSetAccess(g->va, total, &ad, 1), "cuMemSetAccess")) goto fail;
        g->mem = g->va + shift;
    } else {
        if (kvx_ex_cu(cuStreamCreate(&g->s, CU_STREAM_NON_BLOCKING), "cuStreamCreate")) goto fail;
        if (kind == KVX_EX_POOL) {
            CUmemPoolProps pp;
            memset(&pp, 0, sizeof pp);
            pp.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
            pp.handleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
            pp.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
            pp.location.id = device;
            if (kvx_ex_cu(cuMemPoolCreate(&g->pool, &pp), "cuMemPoolCreate") ||
                kvx_ex_cu(cuMemAllocFromPoolAsync(&g->mem, g->bytes, g->pool, g->s), "cuMemAllocFromPoolAsync")) { g->mem = 0; goto fail; }
        } else if (kvx_ex_cu(cuMemAllocAsync(&g->mem, g->bytes, g->s), "cuMemAllocAsync")) { g->mem = 0; goto fail; }
        if (kvx_ex_cu(cuStreamSynchronize(g->s), "cuStreamSynchronize")) goto fail;
    }
    np = g->host.lay.num_layers * g->host.lay.kv_planes;
    if (!(g->bases = (void **)calloc(np, sizeof *g->bases))) goto fail;
    for (p = 0; p < np; p++) g->bases[p] = (void *)(uintptr_t)(g->mem + (size_t)p * g->host.plane_bytes);
    return 0;
fail:
    kvx_ex_gpu_free(g);
    return -1;
}

static inline kvx_cache_desc kvx_ex_gpu_desc(const kvx_ex_gpu *g) {
    kvx_cache_desc d;
    memset(&d, 0, sizeof d);
    d.layout = g->host.lay;
    d.bases = g->bases;
    d.mem = KVX_MEM_CUDA;
    d.device = g->device;
    return d;
}

/* Staging -> GPU and back, the whole cache. */
/* cuMemcpyHtoD from pageable memory returns once the bytes are staged, not
   when they have landed (CUDA's "API synchronization behavior"), and kvx's
   copies run on non-blocking streams that do not wait for it: without the
   synchronize, the tail of the push can land after a read of the same
   blocks. */
static inline int kvx_ex_gpu_push(kvx_ex_gpu *g) {
    return kvx_ex_cu(cuMemcpyHtoD(g->mem, g->host.mem, g->bytes), "cuMemcpyHtoD") || kvx_ex_cu(cuCtxSynchronize(), "cuCtxSynchronize");
}
static inline int kvx_ex_gpu_pull(kvx_ex_gpu *g) { return kvx_ex_cu(cuMemcpyDtoH(g->host.mem, g->mem, g->bytes), "cuMemcpyDtoH"); }

#endif
