/* SPDX-License-Identifier: MIT */
/*
    kvx_cuda.h -- the CUDA backend of kvx: GPU caches registered with it,
    reads between processes of one host over CUDA IPC by its own copy
    kernel, and verify mode and block generations on the GPU. What every
    backend shares on the GPU (the device table, the kernels' module,
    stream-ordered completion) is kvx_gpu.h's. Included by kvx.h inside its
    implementation when KVX_CUDA is defined; do not include it yourself.

    Link: -lcuda (the driver API only: no CUDA runtime, no nvcc). Build
    against /usr/local/cuda/include; where no GPU driver is installed, link
    against /usr/local/cuda/lib64/stubs, or tools/cuda_stub.sh's stand-in
    where the toolkit ships none (the program then starts, and every CUDA
    call fails cleanly).

    GPU CACHES (kvx_cache_desc.mem = KVX_MEM_CUDA, .device = the ordinal)

        Accepted, found per pointer (cuMemGetAddressRange, cuPointerGetAttributes):
        - cuMemAlloc / cudaMalloc memory: a legacy IPC handle per allocation.
        - VMM memory (cuMemCreate + cuMemMap) created with
          requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR. One
          registered range may span several physical allocations; each is
          exported on its own and a reader maps them back to back.
        - stream-ordered pool memory (cuMemAllocFromPoolAsync,
          cudaMallocFromPoolAsync) from a pool created with
          handleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR: the pool is
          exported as a file descriptor, each allocation with
          cuMemPoolExportPointer.
        Refused at kvx_cache_register, with a message that says how to
        allocate instead: managed memory, VMM memory without an exportable
        handle type, pool memory whose pool has none (the default pool of
        cudaMallocAsync), memory on another device than .device; and blocks
        with head or token strides of their own (register a packed view).
        The CUDA backend reads GPU memory into GPU memory only: host caches
        belong to UCX or libfabric, which in turn refuse GPU memory unless
        the library is CUDA-aware.

    THE CUDA BACKEND (kvx_ctx_desc.backend = KVX_BACKEND_CUDA)

        Reads between processes of one host over CUDA IPC; kvx_peer_add
        refuses a peer whose host (kvx_ctx_desc.host_id) differs, naming both.
        A context drives one GPU, in the device's primary context (the CUDA
        runtime's own): the device of the context current when it is
        created, else the first one named (a cache's .device, a queue's
        cuda.stream; device 0 where a peer, or a queue without a stream,
        comes first); a cache or stream on another device is refused. A peer
        on another GPU needs peer access (cuDeviceCanAccessPeer).
        kvx_peer_transport() says "cuda:ipc" and the link: "same-gpu",
        "nvlink" or "pcie" (native peer atomics are taken as the sign of
        NVLink), with both GPU ordinals.

        Legacy IPC handles travel in the metadata. VMM and pool handles are
        file descriptors: the reader asks the owner for them over a unix
        socket (SCM_RIGHTS), in a directory only this user can enter
        ($KVX_CUDA_SOCKET_DIR, default /tmp/kvx-cuda-UID; the peer's uid is
        checked too). The owner answers from its progress (progress thread or
        kvx_progress), as it does for notifications. Each peer allocation is
        opened once, when the peer is added, and stays mapped until the peer
        is removed; the unmapping then waits until no read of the context is
        pending, because CUDA may synchronize the device in it and a stream
        may be waiting on a read that only the host can fail. The same socket
        tells a reader that its owner died.

    THE COPY KERNEL

        One copy per block cannot move KV blocks fast (a copy call per 4 KiB
        block runs near 1 GB/s). kvx ships its own gather kernel as PTX text
        in kvx_cuda_ptx.h, generated from kernels/kvx_cuda_copy.cu by
        kernels/gen_ptx.sh: ISA .version 7.8, .target sm_80, so drivers from
        CUDA 11.8 on compile it for Ampere, Hopper and newer.
        tools/ptx_check.sh assembles it with ptxas and, where nvcc is
        installed, checks that it is what its source makes; the launch
        header's layout is asserted on both sides (kvx__cuda_rd). kvx_gpu.h
        loads it with cuModuleLoadData when the first queue of a device is
        made, and the queue launches it once with no tasks, so that the
        driver's compile does not fall on the first read.

        A read is taken whole when it is posted (the core hands the backend
        one op at a time; a per-op path costs the host more per 4 KiB block
        than the GPU needs to copy it): its merged block table is expanded
        into (local, remote) block id pairs in a pinned staging ring, followed
        by the plane bases of the read's layers on both sides; the kernel
        walks that table itself. The flush at the end of a post launches one
        kernel for all reads staged since the last launch: table and read
        headers go to the GPU, then the kernel. The warp that finishes a
        read's last task writes the read's completion word (a verified
        read's waits for its check), and with block generations checks them
        first (below, "block generations"). Nothing waits on the host, and
        no device memory is allocated on any read's path but at a queue's
        first verified read (its checks' result words) and, for a queue
        without a stream, its first read whose end the kernel marks (the
        task counts; a queue with a stream makes them at creation). A task
        is at most 16 KiB of one block (less, down to 1 KiB, for a read too
        small to give half the grid's warps a task), one warp each, 16-byte
        accesses with 4 loads in flight per lane (bytes where a layout is
        not 16-byte aligned). A batch whose headers and table fit in 4000
        bytes travels in the launch's parameters (kvx_copy_inline); of the
        rest, a batch of few tasks reads its table in place from pinned
        memory, and larger ones copy it on a second stream, so the copy
        overlaps the kernel of the batch before.

        Thread blocks: 256 threads (80 registers, 88 for kvx_copy_inline on
        sm_90: at most 3, or 2, per SM); at most
        kvx_ctx_desc.cuda.max_blocks of them (clamped to what stays resident),
        default two per multiprocessor, and one per multiprocessor for a batch
        read wholly from other GPUs: the caps that copied fastest while
        slowing compute beside them least (docs/cuda.md, "CUDA backend:
        speed").

        Reads run on kvx_queue_desc.cuda.stream (a stream of the primary
        context of the context's device; CU_STREAM_LEGACY for the legacy
        default stream) or, when it is NULL, on a stream kvx makes. A queue
        whose stream is being captured refuses posts: a read is not a graph
        node (kvx_stream_wait is). The host learns of completions from events:
        progress queries each launch's event, oldest first. Before anyone
        sleeps on the context's event fd (a progress thread, kvx_wait), the
        launches are handed to a thread per queue that sleeps in
        cuEventSynchronize on their blocking-sync events in turn and writes an
        eventfd as each completes, so nobody spins; where nobody sleeps, a
        post costs no wake-up. (A host function on a side stream,
        cuLaunchHostFunc, fires only once the queue's stream has drained, so
        the GPU idled until the next post; docs/cuda.md.)
        A read whose kernel was launched cannot be recalled: failing it (peer
        removed, deadline) first waits for that kernel, polling its event with
        sleeps up to 10 s, since CUDA has no timed wait on an event.

*/
#ifndef KVX_CUDA_INCLUDED
#define KVX_CUDA_INCLUDED
#include "kvx_internal.h"
#include "kvx_wire.h"
#include "kvx_verify.h"
#include "kvx_gpu.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#define KVX__CUDA_THREADS 256u          /* threads per block of the copy kernel: 8 warps */
#define KVX__CUDA_CHUNK (16u << 10)      /* bytes one warp copies per task, at most */
#define KVX__CUDA_CHUNK_MIN (1u << 10)   /* ... and at least, where a small read is spread over more warps */
#define KVX__CUDA_DEFAULT_BLOCKS_PER_SM 2u  /* cuda_max_blocks 0: this many per multiprocessor */
#define KVX__CUDA_PEER_BLOCKS_PER_SM 1u     /* ... and this many for batches read wholly from other GPUs */
#define KVX__CUDA_RING (8u << 20)        /* staging bytes per queue (block id pairs) */
#define KVX__CUDA_BATCHES 32u            /* launches in flight per queue */
#define KVX__CUDA_BATCH_READS 256u       /* reads per launch */
#define KVX__CUDA_SMALL 4096u            /* batches this small, with few tasks, are read from pinned memory */
/* The address, remote key and socket messages are kvx_wire.h's
   (KVX__CUDA_ADDR_*, KVX__CUDA_RKEY_*, KVX__CUDA_MSG_*), as are the kinds of
   allocation KVX__CUDA_LEGACY, KVX__CUDA_VMM, KVX__CUDA_POOL. */
enum { KVX__CUDA_FD_LISTEN = 1, KVX__CUDA_FD_WAKE = 2, KVX__CUDA_FD_OWNER = 3, KVX__CUDA_FD_PEER = 4 };

/* A compile-time check: C11's and C++11's own where the language has them
   (msg), else a typedef of an array of negative size (name: an identifier
   unique in this file, which the compiler's error shows). */
#if defined(__cplusplus) && __cplusplus >= 201103L
#  define KVX__CUDA_STATIC_ASSERT(c, name, msg) static_assert(c, msg)
#elif !defined(__cplusplus) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#  define KVX__CUDA_STATIC_ASSERT(c, name, msg) _Static_assert(c, msg)
#else
#  define KVX__CUDA_STATIC_ASSERT(c, name, msg) typedef char kvx__cuda_assert_##name[(c) ? 1 : -1]
#endif

/* What one launch knows of one read: kvx_rd of kernels/kvx_cuda_copy.cu,
   which asserts the same size and offsets from the same list as here
   (tools/ptx_check.sh compares the lists). */
typedef struct kvx__cuda_rd {
    uint64_t lplanes, rplanes, pairs;
    uint64_t lbstride, rbstride, loff, roff, piece, lpstride, rpstride, cbytes;
    uint64_t gcount, gwant, gtable, gres, gfound, gword, gticket;  /* the read's end on the device (gcount 0: the host's) */
    uint32_t plane0, nblocks, cpb, npieces;
    uint32_t ppc, task0, ntasks, pad2;
} kvx__cuda_rd;
#define KVX__CUDA_RD_BYTES 176
#define KVX__CUDA_RD_LAYOUT(X) \
    X(lplanes, 0) X(rplanes, 8) X(pairs, 16) X(lbstride, 24) X(rbstride, 32) X(loff, 40) X(roff, 48) X(piece, 56) \
    X(lpstride, 64) X(rpstride, 72) X(cbytes, 80) X(gcount, 88) X(gwant, 96) X(gtable, 104) X(gres, 112) X(gfound, 120) \
    X(gword, 128) X(gticket, 136) X(plane0, 144) X(nblocks, 148) X(cpb, 152) X(npieces, 156) X(ppc, 160) X(task0, 164) \
    X(ntasks, 168) X(pad2, 172)
#define KVX__CUDA_AT(f, off) \
    KVX__CUDA_STATIC_ASSERT(offsetof(kvx__cuda_rd, f) == off, rd_##f, "kvx__cuda_rd." #f " is not at byte " #off " as in the kernel's kvx_rd");
KVX__CUDA_RD_LAYOUT(KVX__CUDA_AT)
#undef KVX__CUDA_AT
KVX__CUDA_STATIC_ASSERT(sizeof(kvx__cuda_rd) == KVX__CUDA_RD_BYTES, rd_size, "kvx__cuda_rd is not the size of the kernel's kvx_rd");

/* A small batch travels in its launch's parameters (kvx_copy_inline; the
   kernel's kvx_inline): nreads, ntasks, then the headers and the table
   bytes, the headers' table pointers as offsets from w. */
#define KVX__CUDA_INLINE_BYTES 4000
typedef struct kvx__cuda_inline {
    uint32_t nreads, ntasks;
    uint64_t w[(KVX__CUDA_INLINE_BYTES - 8) / 8];
} kvx__cuda_inline;
KVX__CUDA_STATIC_ASSERT(sizeof(kvx__cuda_inline) == KVX__CUDA_INLINE_BYTES, inline_size, "kvx__cuda_inline is not the size of the kernel's kvx_inline");

/*--- backend state ---------------------------------------------------------*/

typedef struct kvx__cuda_fd {
    int fd, kind;
    kvx_peer *peer;             /* KVX__CUDA_FD_PEER */
} kvx__cuda_fd;

typedef struct kvx__cuda {
    int ord;                    /* device of this context; -1 until known */
    kvx__gpu_dev *d;
    uint32_t max_blocks;        /* kvx_ctx_desc.cuda_max_blocks */
    int lfd, epfd, efd;         /* listening socket, epoll set, eventfd the queues' waiter threads write */
    kvx__cuda_fd ltag, etag;
    kvx__cuda_fd **owners;      /* accepted connections of readers */
    uint32_t nowners, owners_cap;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];    /* the socket directory in effect */
    uint8_t addr[KVX__CUDA_ADDR_MAX];
    uint32_t addr_len;
    struct kvx__cuda_peer **grave;  /* removed peers whose mappings wait for a quiet moment */
    uint32_t ngrave, grave_cap;
} kvx__cuda;

/* One exported allocation of a local region. */
typedef struct kvx__cuda_alloc {
    int kind;
    uint64_t base, size;
    CUmemGenericAllocationHandle h;     /* VMM: retained */
    CUmemoryPool pool;                  /* pool */
} kvx__cuda_alloc;

typedef struct kvx__cuda_region {
    int ord;
    uint32_t n;
    kvx__cuda_alloc a[1];       /* n of them */
} kvx__cuda_region;

/* One peer allocation mapped here. */
typedef struct kvx__cuda_imp {
    int kind;
    uint64_t rbase, size, gend; /* owner's addresses; gend: end of the back-to-back mapping it is part of */
    CUdeviceptr lbase;          /* where rbase is mapped here */
    CUdeviceptr va;             /* VMM: the reservation this group owns (its first member) */
    size_t va_size;
    uint64_t pool_id;
} kvx__cuda_imp;

typedef struct kvx__cuda_peer {
    kvx__cuda_fd conn;          /* to the owner: exports, notifications, its death */
    int same_process, pord;
    kvx__cuda_imp *imp;
    uint32_t nimp, imp_cap;
    struct { uint64_t id; CUmemoryPool pool; } pools[16];
    uint32_t npools;
    uint64_t **planes;          /* per peer cache: plane bases as mapped here (NULL: not a GPU cache) */
    uint32_t ncaches;
} kvx__cuda_peer;

typedef struct kvx__cuda_batch {
    CUevent ev;
    CUevent staged;             /* its table and headers are on the GPU */
    CUevent copied;             /* its copy kernel is done: the checks of its verified reads start */
    uint32_t start, end;        /* staging ring bytes */
    uint32_t nreads, ntasks;
    kvx__read *reads[KVX__CUDA_BATCH_READS];
} kvx__cuda_batch;

typedef struct kvx__cuda_q {
    kvx__gpu_dev *d;
    CUstream s;                 /* reads */
    CUstream cs;                /* staging copies, so they overlap the kernel before them */
    int own_stream;
    uint8_t *ring;              /* pinned, mapped */
    CUdeviceptr ring_map, ring_dev;
    uint32_t head;              /* next free byte of the ring */
    kvx__cuda_rd *hdr;          /* [KVX__CUDA_BATCHES][KVX__CUDA_BATCH_READS], pinned */
    CUdeviceptr hdr_map, hdr_dev;
    kvx__cuda_batch b[KVX__CUDA_BATCHES];
    uint32_t first, inflight;   /* oldest launched batch, launched count; the open one follows them */
    uint32_t grid_max;
    uint32_t grid_peer;         /* default cap for batches read wholly from other GPUs; 0: cuda_max_blocks rules */
    int capture_checked;
    CUfunction fn;              /* the copy kernel */
    CUfunction fn_inline;       /* the same, its batch in its parameters */
    kvx__cuda_inline inl;       /* the parameters of the launch being made */
    /* The waiter: a thread that sleeps on each launched batch's event in
       turn and writes the context's eventfd when it completes. */
    pthread_t waiter;
    int waiter_on, wstop, efd;
    pthread_mutex_t wmu;
    pthread_cond_t wcv;
    CUevent wring[2 * KVX__CUDA_BATCHES];
    uint32_t whead, wtail;      /* launched events: wring[wtail .. whead) */
    uint32_t wlimit;            /* handed to the waiter up to here (kvx__cuda_hand) */
    int widle;                  /* the waiter sleeps on wcv */
    /* Verify mode: each verified read's two result words (kvx_csum_check),
       on the device and copied back here, by ticket % depth; made at the
       queue's first verified read. */
    uint32_t *vres;
    CUdeviceptr vres_dev;
    CUstream vs;                /* the checks, so the next batch's copy runs beside them */
    /* The reads' ends on the device: a task count per header slot (device,
       zeroed; the kernel leaves each at 0), made at the queue's first read
       whose end the kernel marks (kvx__cuda_counts). Block generations,
       made at the queue's first read with them: pinned and mapped, each
       read's result by ticket % depth, and the words the kernel found where
       a read failed, where the core keeps them (from rd->g0 on). */
    CUdeviceptr gcount;
    uint32_t *gres;
    uint64_t *gfound;
    CUdeviceptr gres_map, gfound_map;
} kvx__cuda_q;

KVX__PRIV kvx__cuda *kvx__cuda_of(kvx_ctx *ctx) { return (kvx__cuda *)ctx->be; }

/*--- context ---------------------------------------------------------------*/

KVX__PRIV void kvx__cuda_reap(kvx_ctx *ctx, int force);

KVX__PRIV void kvx__cuda_close(kvx_ctx *ctx) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    uint32_t i;
    if (!c) return;
    kvx__cuda_reap(ctx, 1);
    KVX_FREE(c->grave);
    for (i = 0; i < c->nowners; i++) { close(c->owners[i]->fd); KVX_FREE(c->owners[i]); }
    KVX_FREE(c->owners);
    if (c->lfd >= 0) { close(c->lfd); unlink(c->path); }
    if (c->efd >= 0) close(c->efd);
    if (c->epfd >= 0) close(c->epfd);
    kvx__gpu_dev_put(c->d);
    KVX_FREE(c);
    ctx->be = NULL;
}

KVX__PRIV int kvx__cuda_watch(kvx__cuda *c, kvx__cuda_fd *f) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = f;
    return epoll_ctl(c->epfd, EPOLL_CTL_ADD, f->fd, &ev);
}

KVX__PRIV void kvx__cuda_query(const kvx_ctx *ctx, kvx_ctx_desc *out) {
    const kvx__cuda *c = (const kvx__cuda *)ctx->be;
    out->cuda.max_blocks = c->max_blocks;
    out->cuda.socket_dir = c->dir;
}

/* The unix socket peers ask for this process's GPU memory on, in a private
   directory (only this user reaches it), and the fds the progress sleeps on. */
KVX__PRIV kvx_status kvx__cuda_listen(kvx_ctx *ctx, kvx__cuda *c, const kvx_ctx_desc *desc) {
    struct sockaddr_un sa;
    const char *dir = desc->cuda.socket_dir && *desc->cuda.socket_dir ? desc->cuda.socket_dir : getenv("KVX_CUDA_SOCKET_DIR");
    char dbuf[64];
    struct stat stt;
    if (!dir || !*dir) { snprintf(dbuf, sizeof dbuf, "/tmp/kvx-cuda-%u", (unsigned)getuid()); dir = dbuf; }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: mkdir %s: %s", dir, strerror(errno));
    if (stat(dir, &stt) != 0 || stt.st_uid != getuid() || (stt.st_mode & 077))
        return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: %s must be a directory of this user with mode 0700 (set KVX_CUDA_SOCKET_DIR)", dir);
    kvx__strlcpy(c->dir, dir, sizeof c->dir);
    if ((size_t)snprintf(c->path, sizeof c->path, "%s/%u-%llx.sock", dir, (unsigned)getpid(), (unsigned long long)ctx->epoch) >= sizeof c->path)
        return kvx__fail(ctx, KVX_ERR_ARG, "cuda: socket directory %s is too long", dir);
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, c->path, strlen(c->path));
    unlink(c->path);
    if ((c->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0 ||
        bind(c->lfd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(c->lfd, 128) != 0)
        return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: unix socket %s: %s", c->path, strerror(errno));
    if ((c->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0 || (c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
        return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: epoll/eventfd: %s", strerror(errno));
    c->ltag.fd = c->lfd; c->ltag.kind = KVX__CUDA_FD_LISTEN;
    c->etag.fd = c->efd; c->etag.kind = KVX__CUDA_FD_WAKE;
    if (kvx__cuda_watch(c, &c->ltag) || kvx__cuda_watch(c, &c->etag))
        return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: epoll_ctl: %s", strerror(errno));
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__cuda_open(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    kvx__cuda *c = (kvx__cuda *)kvx__calloc(1, sizeof *c);
    kvx__cuda_addr_msg am;
    kvx_status st;
    CUcontext cur = NULL;
    if (!c) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
    ctx->be = c;
    c->ord = -1;
    c->lfd = c->epfd = c->efd = -1;
    c->max_blocks = desc->cuda.max_blocks;
    if ((st = kvx__gpu_init(ctx)) != KVX_OK) goto fail;
    /* The device: the current context's, if any; else the first cache's. */
    if (cuCtxGetCurrent(&cur) == CUDA_SUCCESS && cur) {
        int ord;
        if (kvx__gpu_ctx_ordinal(cur, &ord) == CUDA_SUCCESS) c->ord = ord;
    }
    if (c->ord >= 0 && (st = kvx__gpu_dev_get(ctx, c->ord, 0, &c->d)) != KVX_OK) goto fail;
    if ((st = kvx__cuda_listen(ctx, c, desc)) != KVX_OK) goto fail;
    /* address (kvx_wire.h): process token, pid, path */
    memset(&am, 0, sizeof am);
    am.token = kvx__gpu_token;
    am.pid = (uint32_t)getpid();
    kvx__strlcpy(am.path, c->path, sizeof am.path);
    c->addr_len = (uint32_t)kvx__cuda_addr_write(c->addr, sizeof c->addr, &am);
    KVX__LOG(ctx, KVX_LOG_INFO, "cuda: socket %s, device %d", c->path, c->ord);
    return KVX_OK;
fail:
    kvx__cuda_close(ctx);  /* after the sentence: closing writes none */
    return st;
}

/* A context works on one GPU: the first one named decides. */
KVX__PRIV kvx_status kvx__cuda_bind(kvx_ctx *ctx, int ord, const char *who) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    if (c->ord >= 0 && c->d) {
        if (ord >= 0 && ord != c->ord)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: device %d, but this context works on device %d: a kvx context drives one GPU", who, ord, c->ord);
        return KVX_OK;
    }
    if (ord < 0) ord = 0;
    c->ord = ord;
    return kvx__gpu_dev_get(ctx, ord, 0, &c->d);
}

KVX__PRIV kvx_status kvx__cuda_address(kvx_ctx *ctx, const uint8_t **addr, uint32_t *len) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    *addr = c->addr;
    *len = c->addr_len;
    return KVX_OK;
}

/*--- registration: find and export each allocation --------------------------*/

KVX__PRIV void kvx__cuda_mem_deregister(kvx_ctx *ctx, kvx__region *r) {
    kvx__cuda_region *g = (kvx__cuda_region *)r->be;
    kvx__cuda *c = kvx__cuda_of(ctx);
    uint32_t i;
    CUcontext prev;
    if (!g) return;
    if (c->d && cuCtxPushCurrent(c->d->pctx) == CUDA_SUCCESS) {
        for (i = 0; i < g->n; i++)
            if (g->a[i].kind == KVX__CUDA_VMM && g->a[i].h) cuMemRelease(g->a[i].h);
        cuCtxPopCurrent(&prev);
    }
    KVX_FREE(g);
    r->be = NULL;
}

/* Pool memory: its pool exports, and the allocation is named by its start. */
KVX__PRIV kvx_status kvx__cuda_classify_pool(kvx_ctx *ctx, CUmemoryPool pool, uint64_t ptr, uint64_t end, kvx__cuda_alloc *a) {
    int fd = -1;
    CUmemPoolPtrExportData pd;
    CUdeviceptr base = (CUdeviceptr)a->base;
    size_t size = a->size;
    CUresult rc;
    a->kind = KVX__CUDA_POOL;
    a->pool = pool;
    if ((rc = cuMemPoolExportToShareableHandle(&fd, pool, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)) != CUDA_SUCCESS)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: 0x%llx comes from a memory pool that cannot be exported (%d): create the pool with "
                         "cuMemPoolCreate/cudaMemPoolCreate and handleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR and allocate with "
                         "cuMemAllocFromPoolAsync/cudaMallocFromPoolAsync (the default pool of cudaMallocAsync has no handle type), or use cudaMalloc",
                         (unsigned long long)ptr, (int)rc);
    close(fd);
    /* The export names an allocation by its start: the range's own start
       where it is one (the reported range may be the pool's segment),
       else the reported base. */
    if (cuMemPoolExportPointer(&pd, (CUdeviceptr)ptr) == CUDA_SUCCESS) {
        a->base = ptr;
        a->size = base + size > ptr && base + size - ptr < end - ptr ? base + size - ptr : end - ptr;
    } else if ((rc = cuMemPoolExportPointer(&pd, base)) != CUDA_SUCCESS) {
        return kvx__gpu_err(ctx, rc, "cuMemPoolExportPointer");
    }
    return KVX_OK;
}

/* VMM memory: exportable only with a POSIX file descriptor handle type; a
   holds the retained handle. */
KVX__PRIV kvx_status kvx__cuda_classify_vmm(kvx_ctx *ctx, uint64_t ptr, kvx__cuda_alloc *a) {
    CUmemGenericAllocationHandle h;
    CUmemAllocationProp prop;
    CUresult rc;
    if ((rc = cuMemRetainAllocationHandle(&h, (void *)(uintptr_t)a->base)) != CUDA_SUCCESS)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: 0x%llx is device memory of an unknown kind (neither cuMemAlloc, VMM nor pool: %d)",
                         (unsigned long long)ptr, (int)rc);
    memset(&prop, 0, sizeof prop);
    rc = cuMemGetAllocationPropertiesFromHandle(&prop, h);
    if (rc != CUDA_SUCCESS || !(prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)) {
        cuMemRelease(h);
        if (rc != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuMemGetAllocationPropertiesFromHandle");
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: 0x%llx is VMM memory (cuMemCreate) without an exportable handle type: create it with "
                         "CUmemAllocationProp.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (PyTorch's expandable segments: "
                         "use cudaMalloc or an exportable allocator for the KV cache), or use cudaMalloc", (unsigned long long)ptr);
    }
    a->kind = KVX__CUDA_VMM;
    a->h = h;
    return KVX_OK;
}

/* Classify the allocation at ptr and fill a; refusals say how to allocate. */
KVX__PRIV kvx_status kvx__cuda_classify(kvx_ctx *ctx, int device, uint64_t ptr, uint64_t end, kvx__cuda_alloc *a) {
    CUpointer_attribute at[5] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_IS_MANAGED,
                                 CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE};
    unsigned int mtype = 0, managed = 0, legacy = 0;
    int ord = -1;
    CUmemoryPool pool = NULL;
    void *data[5];
    CUdeviceptr base = 0;
    size_t size = 0;
    CUresult rc;
    data[0] = &mtype; data[1] = &ord; data[2] = &managed; data[3] = &pool; data[4] = &legacy;
    memset(a, 0, sizeof *a);
    if ((rc = cuPointerGetAttributes(5, at, data, (CUdeviceptr)ptr)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuPointerGetAttributes");
    if (mtype != CU_MEMORYTYPE_DEVICE || managed)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: 0x%llx is %s, not device memory: GPU caches are cuMemAlloc/cudaMalloc, "
                         "VMM (cuMemCreate with a POSIX file descriptor handle type) or pool memory (a pool with POSIX file descriptor handles)",
                         (unsigned long long)ptr, managed ? "managed memory" : mtype == CU_MEMORYTYPE_HOST ? "host memory" : "unknown to CUDA");
    if (ord != device)
        return kvx__fail(ctx, KVX_ERR_ARG, "cuda: 0x%llx lies on device %d, the cache says device %d", (unsigned long long)ptr, ord, device);
    if ((rc = cuMemGetAddressRange(&base, &size, (CUdeviceptr)ptr)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuMemGetAddressRange");
    a->base = base;
    a->size = size;
    if (pool) return kvx__cuda_classify_pool(ctx, pool, ptr, end, a);
    if (legacy) { a->kind = KVX__CUDA_LEGACY; return KVX_OK; }
    return kvx__cuda_classify_vmm(ctx, ptr, a);
}

/* The allocations that make up the range r, in order, each classified (VMM
   ones hold a retained handle). *out holds what was found even where this
   fails part way, for the caller to release. */
KVX__PRIV kvx_status kvx__cuda_region_find(kvx_ctx *ctx, const kvx__cache_info *ci, const kvx__region *r, kvx__cuda_region **out) {
    kvx__cuda_region *g;
    kvx__cuda_alloc a;
    uint64_t cur, end = r->addr + r->len;
    uint32_t cap = 8;
    kvx_status st;
    *out = g = (kvx__cuda_region *)kvx__calloc(1, sizeof *g + cap * sizeof g->a[0]);
    if (!g) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
    g->ord = ci->device;
    for (cur = r->addr; cur < end; cur = a.base + a.size) {
        if ((st = kvx__cuda_classify(ctx, ci->device, cur, end, &a)) != KVX_OK) return st;
        if (a.base + a.size <= cur) {
            if (a.h) cuMemRelease(a.h);  /* classified, not kept */
            return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: no allocation reported at 0x%llx", (unsigned long long)cur);
        }
        if (g->n == cap) {
            kvx__cuda_region *ng = (kvx__cuda_region *)kvx__calloc(1, sizeof *g + 2 * cap * sizeof g->a[0]);
            if (!ng) { if (a.h) cuMemRelease(a.h); return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory"); }
            memcpy(ng, g, sizeof *g + cap * sizeof g->a[0]);
            KVX_FREE(g);
            *out = g = ng;
            cap *= 2;
        }
        g->a[g->n++] = a;
    }
    return KVX_OK;
}

/* The region's remote key (kvx_wire.h), in *key (KVX_MALLOC'd): device
   uuid, ordinal; then per allocation kind, base, size and what a reader
   needs to open it (a legacy IPC handle, a pool's export data). */
KVX__PRIV kvx_status kvx__cuda_rkey_make(kvx_ctx *ctx, const kvx__cache_info *ci, const kvx__region *r, const kvx__cuda_region *g, uint8_t **key,
                                         size_t *key_len) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_rkey_msg km;
    kvx__cuda_rkey_entry *ents;
    uint32_t n = g->n, i;
    size_t klen;
    kvx_status st = KVX_OK;
    CUresult rc;
    uint8_t *k;
    if (!(ents = (kvx__cuda_rkey_entry *)kvx__calloc(n ? n : 1, sizeof *ents))) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
    memset(&km, 0, sizeof km);
    memcpy(km.uuid, c->d->uuid.bytes, 16);
    km.device = ci->device;
    km.count = n;
    for (i = 0; i < n; i++) {
        ents[i].kind = (uint32_t)g->a[i].kind;
        ents[i].base = g->a[i].base;
        ents[i].size = g->a[i].size;
    }
    klen = kvx__cuda_rkey_write(NULL, 0, &km, ents);
    if (klen > KVX__MAX_RKEY) {
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: the range 0x%llx+%llu spans %u allocations, more than one registration carries (%zu bytes of %u): "
                       "allocate the KV cache in fewer, larger allocations", (unsigned long long)r->addr, (unsigned long long)r->len, n, klen, KVX__MAX_RKEY);
        goto out;
    }
    for (i = 0; i < n; i++) {
        const kvx__cuda_alloc *e = &g->a[i];
        if (e->kind == KVX__CUDA_LEGACY) {
            CUipcMemHandle ih;
            if ((rc = cuIpcGetMemHandle(&ih, (CUdeviceptr)e->base)) != CUDA_SUCCESS) { st = kvx__gpu_err(ctx, rc, "cuIpcGetMemHandle"); goto out; }
            memcpy(ents[i].handle, ih.reserved, KVX__CUDA_HANDLE);
        } else if (e->kind == KVX__CUDA_POOL) {
            CUmemPoolPtrExportData pd;
            if ((rc = cuMemPoolExportPointer(&pd, (CUdeviceptr)e->base)) != CUDA_SUCCESS) { st = kvx__gpu_err(ctx, rc, "cuMemPoolExportPointer"); goto out; }
            ents[i].pool = (uint64_t)(uintptr_t)e->pool;
            memcpy(ents[i].handle, pd.reserved, KVX__CUDA_HANDLE);
        }
    }
    if (!(k = (uint8_t *)KVX_MALLOC(klen))) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory"); goto out; }
    kvx__cuda_rkey_write(k, klen, &km, ents);
    *key = k;
    *key_len = klen;
out:
    KVX_FREE(ents);
    return st;
}

KVX__PRIV kvx_status kvx__cuda_mem_register(kvx_ctx *ctx, const kvx__cache_info *ci, kvx__region *r) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_region *g = NULL;
    uint8_t *k = NULL;
    size_t klen = 0;
    kvx_status st;
    CUcontext prev;
    CUresult rc;
    /* Strided blocks (vLLM's block-outermost views) are the core's and the
       host backends'; the copy and checksum kernels take packed blocks. */
    if (ci->block_extent != ci->block_bytes || ci->block_stride < ci->block_bytes)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: cache blocks with head or token strides of their own (a block spans %llu bytes "
                         "for %llu of data, block_stride %llu): not on the CUDA backend yet; register a packed view",
                         (unsigned long long)ci->block_extent, (unsigned long long)ci->block_bytes, (unsigned long long)ci->block_stride);
    if (ci->mem != KVX_MEM_CUDA)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: the CUDA backend moves GPU memory (kvx_cache_desc.mem = KVX_MEM_CUDA); "
                         "register host caches with the UCX or libfabric backend");
    if ((st = kvx__cuda_bind(ctx, ci->device, "kvx_cache_register")) != KVX_OK) return st;
    if ((rc = cuCtxPushCurrent(c->d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent");
    if ((st = kvx__cuda_region_find(ctx, ci, r, &g)) != KVX_OK || (st = kvx__cuda_rkey_make(ctx, ci, r, g, &k, &klen)) != KVX_OK) goto fail;
    cuCtxPopCurrent(&prev);
    r->rkey = k;
    r->rkey_len = (uint32_t)klen;
    r->be = g;
    KVX__LOG(ctx, KVX_LOG_DEBUG, "cuda: region 0x%llx+%llu: %u allocation(s), first %s", (unsigned long long)r->addr, (unsigned long long)r->len, g->n,
             g->a[0].kind == KVX__CUDA_LEGACY ? "cuMemAlloc" : g->a[0].kind == KVX__CUDA_VMM ? "VMM" : "pool");
    return KVX_OK;
fail:
    cuCtxPopCurrent(&prev);
    if (g) { r->be = g; kvx__cuda_mem_deregister(ctx, r); }
    return st;
}

/*--- the owner's socket: exports and notifications --------------------------*/

/* The messages are kvx_wire.h's kvx__cuda_msg. */
KVX__PRIV int kvx__cuda_send(int fd, const kvx__cuda_msg *m, int pass_fd) {
    struct msghdr mh;
    struct iovec iov;
    union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } cb;
    uint8_t buf[KVX__CUDA_MSG_MAX];
    size_t len = kvx__cuda_msg_write(buf, m);
    memset(&mh, 0, sizeof mh);
    iov.iov_base = buf;
    iov.iov_len = len;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (pass_fd >= 0) {
        struct cmsghdr *h;
        memset(&cb, 0, sizeof cb);
        mh.msg_control = cb.b;
        mh.msg_controllen = sizeof cb.b;
        h = CMSG_FIRSTHDR(&mh);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &pass_fd, sizeof(int));
    }
    return len && sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) == (ssize_t)len ? 0 : -1;
}

/* 1: a message (and *got_fd, -1 if none; type 0 when it was not one of
   ours, dropped with a warning); 0: nothing now; -1: closed or broken. */
KVX__PRIV int kvx__cuda_recv(kvx_ctx *ctx, int fd, kvx__cuda_msg *m, int *got_fd) {
    struct msghdr mh;
    struct iovec iov;
    union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } cb;
    struct cmsghdr *h;
    uint8_t buf[2 * KVX__CUDA_MSG_MAX];  /* more than any message, so a wrong-sized one is seen, not truncated */
    uint32_t ver;
    ssize_t n;
    int e;
    *got_fd = -1;
    memset(&mh, 0, sizeof mh);
    iov.iov_base = buf;
    iov.iov_len = sizeof buf;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cb.b;
    mh.msg_controllen = sizeof cb.b;
    n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
    for (h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h))
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS && h->cmsg_len >= CMSG_LEN(sizeof(int))) memcpy(got_fd, CMSG_DATA(h), sizeof(int));
    if (n == 0) return -1;
    if ((e = kvx__cuda_msg_read(buf, (size_t)n, m, &ver)) != KVX__WIRE_OK) {
        if (*got_fd >= 0) { close(*got_fd); *got_fd = -1; }
        m->type = 0;  /* ignored */
        if (e == KVX__WIRE_VERSION)
            KVX__LOG(ctx, KVX_LOG_WARN, "cuda: a socket message dropped: version %u, this kvx speaks version %u", ver, KVX__CUDA_MSG_VERSION);
        else
            KVX__LOG(ctx, KVX_LOG_WARN, "cuda: a socket message of %zd bytes dropped (%s)", n, kvx__wire_why(e));
    }
    return 1;
}

/* A reader asks for the file descriptor of one of our VMM allocations or pools. */
KVX__PRIV void kvx__cuda_serve(kvx_ctx *ctx, int fd, const kvx__cuda_msg *m) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_msg rep;
    kvx__cuda_alloc *a = NULL;
    int out = -1;
    uint32_t i;
    memset(&rep, 0, sizeof rep);
    rep.type = KVX__CUDA_MSG_REPLY;
    rep.status = -1;
    for (i = 0; i < ctx->ncaches; i++) {
        kvx__cache_info *ci = &ctx->caches[i]->info;
        kvx__cuda_region *g;
        if (ci->id != m->cache || m->region >= ci->nregions) continue;
        g = (kvx__cuda_region *)ci->regions[m->region].be;
        if (g && m->alloc < g->n) a = &g->a[m->alloc];
    }
    if (a && c->d) {
        CUcontext prev;
        CUresult rc = cuCtxPushCurrent(c->d->pctx);
        if (rc == CUDA_SUCCESS) {
            if (a->kind == KVX__CUDA_VMM) rc = cuMemExportToShareableHandle(&out, a->h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
            else if (a->kind == KVX__CUDA_POOL) rc = cuMemPoolExportToShareableHandle(&out, a->pool, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
            else rc = CUDA_ERROR_INVALID_VALUE;
            cuCtxPopCurrent(&prev);
        }
        rep.status = rc == CUDA_SUCCESS ? 0 : (int32_t)rc;
        if (rc != CUDA_SUCCESS) out = -1;
    }
    if (kvx__cuda_send(fd, &rep, out) != 0) KVX__LOG(ctx, KVX_LOG_WARN, "cuda: cannot answer an export request: %s", strerror(errno));
    if (out >= 0) close(out);
}

KVX__PRIV void kvx__cuda_owner_drop(kvx_ctx *ctx, kvx__cuda_fd *f) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    uint32_t i;
    epoll_ctl(c->epfd, EPOLL_CTL_DEL, f->fd, NULL);
    close(f->fd);
    for (i = 0; i < c->nowners; i++)
        if (c->owners[i] == f) { c->owners[i] = c->owners[--c->nowners]; break; }
    KVX_FREE(f);
}

KVX__PRIV void kvx__cuda_accept(kvx_ctx *ctx) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    int fd;
    while ((fd = accept4(c->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
        struct ucred cr;
        socklen_t cl = sizeof cr;
        kvx__cuda_fd *f;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) != 0 || cr.uid != getuid()) {
            KVX__LOG(ctx, KVX_LOG_WARN, "cuda: refused a connection from uid %d", (int)cr.uid);
            close(fd);
            continue;
        }
        if (c->nowners == c->owners_cap) {
            uint32_t cap = c->owners_cap ? 2 * c->owners_cap : 16;
            kvx__cuda_fd **n = (kvx__cuda_fd **)kvx__calloc(cap, sizeof *n);
            if (!n) { close(fd); continue; }
            if (c->nowners) memcpy(n, c->owners, c->nowners * sizeof *n);
            KVX_FREE(c->owners);
            c->owners = n;
            c->owners_cap = cap;
        }
        if (!(f = (kvx__cuda_fd *)kvx__calloc(1, sizeof *f))) { close(fd); continue; }
        f->fd = fd;
        f->kind = KVX__CUDA_FD_OWNER;
        if (kvx__cuda_watch(c, f)) { close(fd); KVX_FREE(f); continue; }
        c->owners[c->nowners++] = f;
    }
}

/*--- peers: map the owner's allocations ----------------------------------*/

/* Unmap what a peer mapped here. CUDA may synchronize the device in these
   calls, so they run only where no read of this context is pending (a stream
   could be waiting on one): at once when a connection fails, else later
   (kvx__cuda_reap). */
/* Close one opened allocation of a peer (in the device's context); its
   address reservation, where it has one, is freed by the caller after the
   other members of its run are unmapped. */
KVX__PRIV void kvx__cuda_imp_unmap(const kvx__cuda_peer *cp, const kvx__cuda_imp *m) {
    if (cp->same_process) return;  /* the owner's own addresses */
    if (m->kind == KVX__CUDA_LEGACY) cuIpcCloseMemHandle(m->lbase);
    else if (m->kind == KVX__CUDA_POOL) cuMemFree(m->lbase);
    else if (m->kind == KVX__CUDA_VMM) cuMemUnmap(m->lbase, m->size);
}

KVX__PRIV void kvx__cuda_release(kvx_ctx *ctx, kvx__cuda_peer *cp) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    uint32_t i;
    CUcontext prev;
    if (c->d && cuCtxPushCurrent(c->d->pctx) == CUDA_SUCCESS) {
        for (i = 0; i < cp->nimp; i++) kvx__cuda_imp_unmap(cp, &cp->imp[i]);
        for (i = 0; i < cp->nimp; i++)
            if (cp->imp[i].va) cuMemAddressFree(cp->imp[i].va, cp->imp[i].va_size);
        for (i = 0; i < cp->npools; i++) cuMemPoolDestroy(cp->pools[i].pool);
        cuCtxPopCurrent(&prev);
    }
    if (cp->planes)
        for (i = 0; i < cp->ncaches; i++) KVX_FREE(cp->planes[i]);
    KVX_FREE(cp->planes);
    KVX_FREE(cp->imp);
    KVX_FREE(cp);
}

/* Close the connection to a peer; its mappings are released now (later:
   defer) or at the next quiet moment. */
KVX__PRIV void kvx__cuda_peer_unmap(kvx_ctx *ctx, kvx_peer *p, int defer) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_peer *cp = (kvx__cuda_peer *)p->be;
    if (!cp) return;
    if (cp->conn.fd >= 0) {
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, cp->conn.fd, NULL);
        close(cp->conn.fd);
        cp->conn.fd = -1;
    }
    p->be = NULL;
    if (defer && c->ngrave == c->grave_cap) {
        uint32_t cap = c->grave_cap ? 2 * c->grave_cap : 8;
        kvx__cuda_peer **n = (kvx__cuda_peer **)kvx__calloc(cap, sizeof *n);
        if (n) {
            if (c->ngrave) memcpy(n, c->grave, c->ngrave * sizeof *n);
            KVX_FREE(c->grave);
            c->grave = n;
            c->grave_cap = cap;
        }
    }
    if (defer && c->ngrave < c->grave_cap) c->grave[c->ngrave++] = cp;
    else kvx__cuda_release(ctx, cp);
}

/* Release removed peers' mappings once no read of this context is pending. */
KVX__PRIV void kvx__cuda_reap(kvx_ctx *ctx, int force) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx_queue *q;
    uint32_t i;
    if (!c->ngrave) return;
    if (!force)
        for (q = ctx->queues; q; q = q->next) {
            if (q->ops_out) return;
            for (i = 0; i < q->depth; i++)
                if (q->slots[i].in_use && !q->slots[i].done) return;
        }
    for (i = 0; i < c->ngrave; i++) kvx__cuda_release(ctx, c->grave[i]);
    c->ngrave = 0;
}

/* Ask the owner for the descriptor of (cache, region, alloc); waits for the
   answer up to the context's timeout (the owner answers from its progress). */
KVX__PRIV kvx_status kvx__cuda_fetch_fd(kvx_ctx *ctx, kvx_peer *p, uint32_t cache, uint32_t region, uint32_t alloc, int *out) {
    kvx__cuda_peer *cp = (kvx__cuda_peer *)p->be;
    kvx__cuda_msg m;
    uint64_t until = kvx__now_ns() + (uint64_t)ctx->timeout_ms * 1000000ull;
    int fd = -1, r;
    memset(&m, 0, sizeof m);
    m.type = KVX__CUDA_MSG_EXPORT;
    m.cache = cache; m.region = region; m.alloc = alloc;
    if (kvx__cuda_send(cp->conn.fd, &m, -1) != 0)
        return kvx__fail(ctx, KVX_ERR_PEER, "cuda: asking %s/%d for an allocation handle: %s", p->name, p->rank, strerror(errno));
    for (;;) {
        struct pollfd pf;
        uint64_t now = kvx__now_ns();
        r = kvx__cuda_recv(ctx, cp->conn.fd, &m, &fd);
        if (r < 0) return kvx__fail(ctx, KVX_ERR_PEER, "cuda: %s/%d closed the connection while exporting an allocation", p->name, p->rank);
        if (r > 0 && m.type == KVX__CUDA_MSG_REPLY) break;
        if (r > 0) { if (fd >= 0) close(fd); continue; }
        if (now >= until)
            return kvx__fail(ctx, KVX_ERR_TIMEOUT, "cuda: %s/%d (pid %u) did not export its allocation within %u ms: does it progress "
                             "(progress thread or kvx_progress)?", p->name, p->rank, p->pid, ctx->timeout_ms);
        pf.fd = cp->conn.fd; pf.events = POLLIN; pf.revents = 0;
        poll(&pf, 1, (int)((until - now) / 1000000u) + 1);
    }
    if (m.status != 0 || fd < 0) {
        if (fd >= 0) close(fd);
        return kvx__fail(ctx, KVX_ERR_PEER, "cuda: %s/%d could not export cache %u region %u allocation %u (CUDA error %d)", p->name, p->rank,
                         cache, region, alloc, (int)m.status);
    }
    *out = fd;
    return KVX_OK;
}

KVX__PRIV kvx__cuda_imp *kvx__cuda_imp_find(kvx__cuda_peer *cp, uint64_t raddr) {
    uint32_t i;
    for (i = 0; i < cp->nimp; i++)
        if (raddr >= cp->imp[i].rbase && raddr - cp->imp[i].rbase < cp->imp[i].size) return &cp->imp[i];
    return NULL;
}

/* One region of a peer cache being opened: what its steps share. */
typedef struct kvx__cuda_import {
    kvx_peer *p;
    uint32_t cache, region;     /* the cache's id and the region's index, for the owner's exports */
    uint32_t n;                 /* allocations in the key */
    int pord;                   /* the GPU they live on, as an ordinal here */
    const char *what;           /* "peer NAME/RANK cache ID region N", for messages */
} kvx__cuda_import;

/* The key names its GPU by uuid: it must be visible here, the same for
   every cache of the peer, and reachable from ours; a peer in this process
   needs peer access enabled, since its addresses are used as they are. */
KVX__PRIV kvx_status kvx__cuda_import_gpu(kvx_ctx *ctx, kvx__cuda_import *im, const kvx__cuda_rkey_msg *km) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_peer *cp = (kvx__cuda_peer *)im->p->be;
    const char *what = im->what;
    int pord = kvx__gpu_ordinal_of_uuid(km->uuid);
    CUresult rc;
    if (pord < 0)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: %s: its GPU (device %d there) is not visible in this process (CUDA_VISIBLE_DEVICES?)",
                         what, (int)km->device);
    if (cp->pord < 0) cp->pord = pord;
    else if (cp->pord != pord) return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: %s: caches on two GPUs (%d and %d) in one peer", what, cp->pord, pord);
    im->pord = pord;
    if (pord != c->ord) {
        int can = 0;
        if (cuDeviceCanAccessPeer(&can, c->d->dev, (CUdevice)pord) != CUDA_SUCCESS || !can)
            return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: %s lives on GPU %d, which GPU %d cannot access (no peer access between them)", what, pord, c->ord);
        if (cp->same_process) {  /* its addresses are used as they are: enable peer access for them */
            CUcontext pc;
            if ((rc = cuDevicePrimaryCtxRetain(&pc, (CUdevice)pord)) == CUDA_SUCCESS) {
                rc = cuCtxEnablePeerAccess(pc, 0);
                cuDevicePrimaryCtxRelease((CUdevice)pord);
            }
            if (rc != CUDA_SUCCESS && rc != CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) return kvx__gpu_err(ctx, rc, "cuCtxEnablePeerAccess");
        }
    }
    return KVX_OK;
}

/* Every allocation of the key (rb: at its first) checked before any is
   opened: the key comes from the network, and a bad one must leave
   nothing half mapped. */
KVX__PRIV kvx_status kvx__cuda_import_check(kvx_ctx *ctx, const kvx__cuda_import *im, kvx__rbuf rb, uint32_t rkey_len) {
    kvx__cuda_rkey_entry ke;
    uint32_t i;
    int e;
    for (i = 0; i < im->n; i++) {
        if ((e = kvx__cuda_rkey_entry_read(&rb, &ke)) == KVX__WIRE_FIELD)
            return kvx__fail(ctx, KVX_ERR_ARG, "cuda: %s: allocation %u of unknown kind %d", im->what, i, (int)ke.kind);
        if (e != KVX__WIRE_OK) return kvx__fail(ctx, KVX_ERR_ARG, "cuda: %s: remote key truncated at allocation %u", im->what, i);
        if (!ke.size || ke.base + ke.size < ke.base) return kvx__fail(ctx, KVX_ERR_ARG, "cuda: %s: allocation %u is empty or wraps", im->what, i);
    }
    if (kvx__wire_end(&rb, 0) != KVX__WIRE_OK)
        return kvx__fail(ctx, KVX_ERR_ARG, "cuda: %s: remote key of %u bytes is oversized (%zu bytes after its %u allocations)", im->what, rkey_len,
                         rb.len - rb.off, im->n);
    return KVX_OK;
}

/* A pool allocation (the key's i-th, ke): its pool is imported once per
   peer, by the owner's id for it, and opened to this GPU where it lives on
   another; then the allocation, from its export data. */
KVX__PRIV kvx_status kvx__cuda_import_pool(kvx_ctx *ctx, const kvx__cuda_import *im, uint32_t i, const kvx__cuda_rkey_entry *ke, kvx__cuda_imp *m) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_peer *cp = (kvx__cuda_peer *)im->p->be;
    uint64_t pid = ke->pool;
    CUmemPoolPtrExportData pd;
    CUmemoryPool pool = NULL;
    CUresult rc;
    kvx_status st;
    uint32_t j;
    for (j = 0; j < cp->npools; j++) if (cp->pools[j].id == pid) pool = cp->pools[j].pool;
    if (!pool) {
        int fd = -1;
        if (cp->npools == sizeof cp->pools / sizeof cp->pools[0]) return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: %s: more than 16 pools", im->what);
        if ((st = kvx__cuda_fetch_fd(ctx, im->p, im->cache, im->region, i, &fd)) != KVX_OK) return st;
        rc = cuMemPoolImportFromShareableHandle(&pool, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        close(fd);
        if (rc != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuMemPoolImportFromShareableHandle");
        if (im->pord != c->ord) {
            CUmemAccessDesc ad;
            memset(&ad, 0, sizeof ad);
            ad.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
            ad.location.id = c->ord;
            ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            if ((rc = cuMemPoolSetAccess(pool, &ad, 1)) != CUDA_SUCCESS) { cuMemPoolDestroy(pool); return kvx__gpu_err(ctx, rc, "cuMemPoolSetAccess"); }
        }
        cp->pools[cp->npools].id = pid;
        cp->pools[cp->npools++].pool = pool;
    }
    memcpy(pd.reserved, ke->handle, KVX__CUDA_HANDLE);
    if ((rc = cuMemPoolImportPointer(&m->lbase, pool, &pd)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuMemPoolImportPointer");
    m->pool_id = pid;
    return KVX_OK;
}

/* A VMM allocation that starts a run: the reservation covers the
   allocations that sit back to back in the owner from here on (the key's
   i-th; rest: the key after it), so that a plane spanning several stays
   one range here too. */
KVX__PRIV CUresult kvx__cuda_vmm_reserve(kvx__cuda_imp *m, const kvx__cuda_import *im, uint32_t i, const kvx__rbuf *rest) {
    uint64_t span = m->size;
    uint32_t j;
    kvx__rbuf ahead = *rest;
    CUresult rc;
    for (j = i + 1; j < im->n; j++) {
        kvx__cuda_rkey_entry e2;
        if (kvx__cuda_rkey_entry_read(&ahead, &e2) != KVX__WIRE_OK || e2.kind != KVX__CUDA_VMM || e2.base != m->rbase + span) break;
        span += e2.size;
    }
    if ((rc = cuMemAddressReserve(&m->va, (size_t)span, 0, 0, 0)) != CUDA_SUCCESS) return rc;
    m->va_size = (size_t)span;
    m->lbase = m->va;
    m->gend = m->rbase + span;
    return CUDA_SUCCESS;
}

/* A VMM allocation (the key's i-th): imported from the owner's descriptor
   and mapped, as the next member of the run before it or at the start of a
   reservation of its own, then opened to this GPU. */
KVX__PRIV kvx_status kvx__cuda_import_vmm(kvx_ctx *ctx, const kvx__cuda_import *im, uint32_t i, const kvx__rbuf *rest, kvx__cuda_imp *m) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_peer *cp = (kvx__cuda_peer *)im->p->be;
    const kvx__cuda_imp *prev = cp->nimp ? &cp->imp[cp->nimp - 1] : NULL;
    CUmemGenericAllocationHandle hh;
    CUmemAccessDesc ad;
    const char *what;
    CUresult rc;
    kvx_status st;
    int fd = -1;
    if ((st = kvx__cuda_fetch_fd(ctx, im->p, im->cache, im->region, i, &fd)) != KVX_OK) return st;
    rc = cuMemImportFromShareableHandle(&hh, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    close(fd);
    if (rc != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuMemImportFromShareableHandle");
    if (prev && prev->kind == KVX__CUDA_VMM && prev->rbase + prev->size == m->rbase && prev->gend >= m->rbase + m->size) {
        m->lbase = prev->lbase + prev->size;  /* the next member of prev's run */
        m->gend = prev->gend;
    } else if ((rc = kvx__cuda_vmm_reserve(m, im, i, rest)) != CUDA_SUCCESS) {
        cuMemRelease(hh);
        return kvx__gpu_err(ctx, rc, "cuMemAddressReserve");
    }
    rc = cuMemMap(m->lbase, (size_t)m->size, 0, hh, 0);
    cuMemRelease(hh);  /* the mapping holds it */
    what = "cuMemMap";
    if (rc != CUDA_SUCCESS) goto free_va;
    memset(&ad, 0, sizeof ad);
    ad.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    ad.location.id = c->ord;
    ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    what = "cuMemSetAccess";
    if ((rc = cuMemSetAccess(m->lbase, (size_t)m->size, &ad, 1)) != CUDA_SUCCESS) goto unmap;
    return KVX_OK;
unmap:
    cuMemUnmap(m->lbase, (size_t)m->size);
free_va:
    if (m->va) cuMemAddressFree(m->va, m->va_size);
    return kvx__gpu_err(ctx, rc, what);
}

/* Map one allocation of the key (the i-th, ke; rest: the key after it)
   here, at m->lbase: a peer in this process is used at its own addresses,
   others are opened by kind. */
KVX__PRIV kvx_status kvx__cuda_import_alloc(kvx_ctx *ctx, const kvx__cuda_import *im, uint32_t i, const kvx__cuda_rkey_entry *ke, const kvx__rbuf *rest,
                                            kvx__cuda_imp *m) {
    const kvx__cuda_peer *cp = (const kvx__cuda_peer *)im->p->be;
    CUresult rc;
    if (cp->same_process) {
        m->lbase = (CUdeviceptr)m->rbase;  /* the owner's own addresses */
    } else if (m->kind == KVX__CUDA_LEGACY) {
        CUipcMemHandle ih;
        memcpy(ih.reserved, ke->handle, KVX__CUDA_HANDLE);
        if ((rc = cuIpcOpenMemHandle(&m->lbase, ih, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuIpcOpenMemHandle");
    } else if (m->kind == KVX__CUDA_POOL) {
        return kvx__cuda_import_pool(ctx, im, i, ke, m);
    } else {
        return kvx__cuda_import_vmm(ctx, im, i, rest, m);
    }
    return KVX_OK;
}

/* Keep an opened allocation in the peer's list, where reads and the
   release find it by the owner's address. */
KVX__PRIV kvx_status kvx__cuda_imp_add(kvx_ctx *ctx, kvx__cuda_peer *cp, const kvx__cuda_imp *m) {
    if (cp->nimp == cp->imp_cap) {
        uint32_t cap = cp->imp_cap ? 2 * cp->imp_cap : 8;
        kvx__cuda_imp *ni = (kvx__cuda_imp *)kvx__calloc(cap, sizeof *ni);
        if (!ni) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
        if (cp->nimp) memcpy(ni, cp->imp, cp->nimp * sizeof *ni);
        KVX_FREE(cp->imp);
        cp->imp = ni;
        cp->imp_cap = cap;
    }
    cp->imp[cp->nimp++] = *m;
    return KVX_OK;
}

/* Open every allocation of one region of peer cache ci (index cix). */
KVX__PRIV kvx_status kvx__cuda_import_region(kvx_ctx *ctx, kvx_peer *p, uint32_t cix, uint32_t rix) {
    kvx__cuda_peer *cp = (kvx__cuda_peer *)p->be;
    kvx__region *r = &p->caches[cix].regions[rix];
    kvx__cuda_import im;
    kvx__rbuf rb;
    kvx__cuda_rkey_msg km;
    kvx__cuda_rkey_entry ke;
    uint32_t i, ver;
    int e;
    kvx_status st;
    char what[160];
    snprintf(what, sizeof what, "peer %s/%d cache %u region %u", p->name, p->rank, p->caches[cix].id, rix);
    /* The key comes from the network: kvx_wire.h bounds every field. */
    e = kvx__cuda_rkey_read(&rb, r->rkey, r->rkey_len, &km, &ver);
    if (e == KVX__WIRE_VERSION)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "cuda: %s: CUDA remote key version %u, this kvx speaks version %u", what, ver, KVX__CUDA_RKEY_VERSION);
    if (e == KVX__WIRE_TRUNCATED) return kvx__fail(ctx, KVX_ERR_ARG, "cuda: %s: remote key of %u bytes is truncated", what, r->rkey_len);
    if (e != KVX__WIRE_OK)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "cuda: %s: not a CUDA remote key (version %u): was the peer registered by the CUDA backend?", what, ver);
    memset(&im, 0, sizeof im);
    im.p = p;
    im.cache = p->caches[cix].id;
    im.region = rix;
    im.n = km.count;
    im.what = what;
    if ((st = kvx__cuda_import_gpu(ctx, &im, &km)) != KVX_OK || (st = kvx__cuda_import_check(ctx, &im, rb, r->rkey_len)) != KVX_OK) return st;
    for (i = 0; i < im.n; i++) {  /* rb: at the first allocation */
        kvx__cuda_imp m;
        kvx__cuda_rkey_entry_read(&rb, &ke);  /* checked above */
        memset(&m, 0, sizeof m);
        m.kind = (int)ke.kind;
        m.rbase = ke.base;
        m.size = ke.size;
        m.gend = m.rbase + m.size;
        if (kvx__cuda_imp_find(cp, m.rbase)) continue;  /* opened once per peer allocation */
        if ((st = kvx__cuda_import_alloc(ctx, &im, i, &ke, &rb, &m)) != KVX_OK) return st;
        if ((st = kvx__cuda_imp_add(ctx, cp, &m)) != KVX_OK) {  /* opened but not kept: close it here, as nothing else will */
            kvx__cuda_imp_unmap(cp, &m);
            if (m.va) cuMemAddressFree(m.va, m.va_size);
            return st;
        }
    }
    if (cp->same_process)  /* one address space: allocations back to back are one range */
        for (i = cp->nimp; i-- > 1;)
            if (cp->imp[i - 1].rbase + cp->imp[i - 1].size == cp->imp[i].rbase && cp->imp[i].gend > cp->imp[i - 1].gend) cp->imp[i - 1].gend = cp->imp[i].gend;
    return KVX_OK;
}

KVX__PRIV void kvx__cuda_complete(kvx_ctx *ctx, int wait);

KVX__PRIV kvx_status kvx__cuda_launch(kvx_ctx *ctx, kvx_queue *q);
KVX__PRIV kvx_status kvx__cuda_check_prepare(kvx_queue *q, kvx__read *rd, uint32_t nblocks);
KVX__PRIV CUresult kvx__cuda_check_launch(kvx_queue *q, kvx__read *rd, const kvx__cuda_rd *h, const char **what);
KVX__PRIV kvx_status kvx__cuda_gen_prepare(kvx_queue *q, const kvx__read *rd, CUdeviceptr *table);
KVX__PRIV kvx_status kvx__cuda_counts(kvx_queue *q);

KVX__PRIV void kvx__cuda_disconnect(kvx_ctx *ctx, kvx_peer *p) {
    kvx_queue *q;
    /* Launched kernels cannot be recalled: let them finish first, and the
       reads still staged too, before the peer's memory is unmapped. */
    kvx__cuda_complete(ctx, 1);
    for (q = ctx->queues; q; q = q->next) kvx__cuda_launch(ctx, q);
    kvx__cuda_complete(ctx, 1);
    kvx__cuda_peer_unmap(ctx, p, 1);
}

/* The peer's CUDA address, parsed and checked: a peer on this host whose
   socket path fits. */
KVX__PRIV kvx_status kvx__cuda_peer_addr(kvx_ctx *ctx, const kvx_peer *p, kvx__cuda_addr_msg *am) {
    struct sockaddr_un sa;
    uint32_t ver;
    int e;
    if (strcmp(p->host, ctx->host))
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: peer %s/%d is on host \"%s\", this context on \"%s\": the CUDA backend reads over CUDA IPC "
                         "within one host; use the UCX or libfabric backend (CUDA-aware) across hosts", p->name, p->rank, p->host, ctx->host);
    e = kvx__cuda_addr_read(p->addr, p->addr_len, am, &ver);
    if (e == KVX__WIRE_VERSION)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "cuda: peer %s/%d: CUDA backend address version %u, this kvx speaks version %u",
                         p->name, p->rank, ver, KVX__CUDA_ADDR_VERSION);
    if (e == KVX__WIRE_TRUNCATED) return kvx__fail(ctx, KVX_ERR_ARG, "cuda: peer %s/%d: address of %u bytes is truncated", p->name, p->rank, p->addr_len);
    if (e != KVX__WIRE_OK || strlen(am->path) >= sizeof sa.sun_path)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "cuda: peer %s/%d: not a CUDA backend address", p->name, p->rank);
    return KVX_OK;
}

/* Import the regions of each of the peer's GPU caches and map its planes
   here (cp->planes[i]); each plane must be one contiguous mapping. In the
   device's context. */
KVX__PRIV kvx_status kvx__cuda_peer_map_caches(kvx_ctx *ctx, kvx_peer *p) {
    kvx__cuda_peer *cp = (kvx__cuda_peer *)p->be;
    kvx_status st = KVX_OK;
    uint32_t i, j;
    for (i = 0; i < p->ncaches && st == KVX_OK; i++) {
        kvx__cache_info *ci = &p->caches[i];
        uint64_t *tab, span = (uint64_t)(ci->lay.num_blocks - 1) * ci->block_stride + ci->block_bytes;
        if (ci->mem != KVX_MEM_CUDA) continue;  /* a post from it is refused */
        for (j = 0; j < ci->nregions && st == KVX_OK; j++) st = kvx__cuda_import_region(ctx, p, i, j);
        if (st != KVX_OK) break;
        if (!(tab = (uint64_t *)kvx__calloc(ci->nplanes, sizeof *tab))) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
        for (j = 0; j < ci->nplanes; j++) {
            kvx__cuda_imp *m = kvx__cuda_imp_find(cp, ci->plane_base[j]);
            if (!m || ci->plane_base[j] + span > m->gend) {
                st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "cuda: peer %s/%d cache %u plane %u (0x%llx, %llu bytes) is not one contiguous allocation",
                               p->name, p->rank, ci->id, j, (unsigned long long)ci->plane_base[j], (unsigned long long)span);
                break;
            }
            tab[j] = m->lbase + (ci->plane_base[j] - m->rbase);
        }
        if (st == KVX_OK) cp->planes[i] = tab;  /* staged with each read */
        else KVX_FREE(tab);
    }
    return st;
}

/* What the peer is read over, and why: one GPU, or two over NVLink or PCIe
   (NVLink is what gives native atomics between them). */
KVX__PRIV void kvx__cuda_transport_say(kvx__cuda *c, kvx_peer *p) {
    const kvx__cuda_peer *cp = (const kvx__cuda_peer *)p->be;
    if (cp->pord < 0 || cp->pord == c->ord) {
        snprintf(p->transport, sizeof p->transport, "cuda:ipc same-gpu (GPU %d%s)", c->ord, cp->same_process ? ", same process" : "");
        snprintf(p->why, sizeof p->why, "owner and reader use the same GPU (%d): copies within its memory", c->ord);
    } else {
        int atom = 0;
        cuDeviceGetP2PAttribute(&atom, CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED, c->d->dev, (CUdevice)cp->pord);
        snprintf(p->transport, sizeof p->transport, "cuda:ipc %s (GPU %d -> %d)", atom ? "nvlink" : "pcie", cp->pord, c->ord);
        snprintf(p->why, sizeof p->why, "the CUDA driver reports peer access from GPU %d to GPU %d %s native atomics, which only NVLink gives",
                 c->ord, cp->pord, atom ? "with" : "without");
    }
}

KVX__PRIV kvx_status kvx__cuda_connect(kvx_ctx *ctx, kvx_peer *p) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_peer *cp;
    struct sockaddr_un sa;
    kvx__cuda_addr_msg am;
    kvx_status st;
    CUcontext prev;
    CUresult rc;
    if ((st = kvx__cuda_peer_addr(ctx, p, &am)) != KVX_OK) return st;
    if ((st = kvx__cuda_bind(ctx, -1, "kvx_peer_add")) != KVX_OK) return st;
    if (!(cp = (kvx__cuda_peer *)kvx__calloc(1, sizeof *cp)) || !(cp->planes = (uint64_t **)kvx__calloc(p->ncaches ? p->ncaches : 1, sizeof *cp->planes))) {
        KVX_FREE(cp);
        return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
    }
    p->be = cp;
    cp->ncaches = p->ncaches;
    cp->pord = -1;
    cp->conn.kind = KVX__CUDA_FD_PEER;
    cp->conn.peer = p;
    cp->same_process = am.token == kvx__gpu_token;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, am.path, strlen(am.path));
    if ((cp->conn.fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0)) < 0 || connect(cp->conn.fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        int e = errno;
        kvx__cuda_peer_unmap(ctx, p, 0);
        return kvx__fail(ctx, KVX_ERR_PEER, "cuda: connecting to %s/%d (pid %u) at %s: %s", p->name, p->rank, p->pid, sa.sun_path, strerror(e));
    }
    fcntl(cp->conn.fd, F_SETFL, fcntl(cp->conn.fd, F_GETFL) | O_NONBLOCK);
    if ((rc = cuCtxPushCurrent(c->d->pctx)) != CUDA_SUCCESS) { kvx__cuda_peer_unmap(ctx, p, 0); return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent"); }
    st = kvx__cuda_peer_map_caches(ctx, p);
    cuCtxPopCurrent(&prev);
    if (st == KVX_OK && kvx__cuda_watch(c, &cp->conn) != 0) st = kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: epoll_ctl: %s", strerror(errno));
    if (st != KVX_OK) {
        kvx__cuda_peer_unmap(ctx, p, 0);
        return st;
    }
    kvx__cuda_transport_say(c, p);
    return KVX_OK;
}

/*--- queues and the copy kernel -------------------------------------------*/

KVX__PRIV kvx__cuda_q *kvx__cuda_q_of(kvx_queue *q) { return (kvx__cuda_q *)q->be; }

/* The blocks of a read: its runs' lengths. */
KVX__PRIV uint32_t kvx__cuda_read_blocks(const kvx__read *rd) {
    uint32_t i, n = 0;
    for (i = 0; i < rd->nruns; i++) n += rd->q->runs[(rd->run0 + i) % rd->q->max_runs].n;
    return n;
}

/* Hand the waiter what was launched (with wmu held): free while it is
   awake (it looks before it sleeps), a wake-up when it sleeps, which only
   a sleeper on the event fd needs (wake). */
KVX__PRIV void kvx__cuda_hand(kvx__cuda_q *cq, int wake) {
    if (cq->wlimit == cq->whead) return;
    if (!cq->widle) cq->wlimit = cq->whead;
    else if (wake) { cq->wlimit = cq->whead; pthread_cond_signal(&cq->wcv); }
}

/* The waiter thread of a queue. Events are blocking-sync, so
   cuEventSynchronize sleeps in the driver until the GPU signals. A slot's
   event may be recorded again for a newer batch before the waiter reaches
   it; it then waits for that one, which is later in the ring anyway.
   Launches are handed to it only where someone sleeps on the event fd
   (kvx__cuda_hand): a post then costs no wake-up where the engine polls,
   or waits on its streams. */
KVX__PRIV void *kvx__cuda_waiter(void *arg) {
    kvx__cuda_q *cq = (kvx__cuda_q *)arg;
    uint64_t one = 1;
    cuCtxSetCurrent(cq->d->pctx);
    pthread_mutex_lock(&cq->wmu);
    for (;;) {
        CUevent ev;
        while (cq->wlimit == cq->wtail && !cq->wstop) {
            cq->widle = 1;
            pthread_cond_wait(&cq->wcv, &cq->wmu);
            cq->widle = 0;
        }
        if (cq->wstop) break;
        ev = cq->wring[cq->wtail % (2 * KVX__CUDA_BATCHES)];
        pthread_mutex_unlock(&cq->wmu);
        cuEventSynchronize(ev);  /* an error completes the batch too: the progress side reads it from the event */
        if (write(cq->efd, &one, sizeof one) < 0) { /* the eventfd is full: already awake */ }
        pthread_mutex_lock(&cq->wmu);
        cq->wtail++;
    }
    pthread_mutex_unlock(&cq->wmu);
    return NULL;
}

/* Completions of one queue's launched batches, oldest first; wait: until all
   are done (bounded, for a forced close). Returns the number completed. */
KVX__PRIV int kvx__cuda_q_complete(kvx_ctx *ctx, kvx_queue *q, int wait) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    uint64_t until = kvx__now_ns() + 10000000000ull, nap = 20000;
    int n = 0;
    CUcontext prev;
    if (!cq || !cq->inflight) return 0;
    if (cuCtxPushCurrent(cq->d->pctx) != CUDA_SUCCESS) return 0;
    while (cq->inflight) {
        kvx__cuda_batch *b = &cq->b[cq->first];
        CUresult rc = cuEventQuery(b->ev);
        uint32_t i;
        if (rc == CUDA_ERROR_NOT_READY) {
            struct timespec ts;
            if (!wait || kvx__now_ns() >= until) {
                if (wait) KVX__LOG(ctx, KVX_LOG_ERROR, "cuda: a copy kernel still runs after 10 s of a forced close; its reads stay outstanding");
                break;
            }
            /* No timed wait on an event exists: sleep in growing steps. */
            ts.tv_sec = 0;
            ts.tv_nsec = (long)nap;
            nanosleep(&ts, NULL);
            if (nap < 1000000) nap *= 2;
            continue;
        }
        for (i = 0; i < b->nreads; i++) {
            kvx__read *rd = b->reads[i];
            if (rc == CUDA_SUCCESS) {
                kvx__op_done(rd, KVX_OK, NULL);
            } else {
                const char *name = NULL;
                cuGetErrorName(rc, &name);
                kvx__op_done(rd, KVX_ERR_BACKEND, name ? name : "the copy kernel failed");
            }
        }
        b->nreads = 0;
        b->ntasks = 0;
        cq->first = (cq->first + 1) % KVX__CUDA_BATCHES;
        cq->inflight--;
        n++;
    }
    cuCtxPopCurrent(&prev);
    return n;
}

KVX__PRIV void kvx__cuda_complete(kvx_ctx *ctx, int wait) {
    kvx_queue *q;
    for (q = ctx->queues; q; q = q->next) kvx__cuda_q_complete(ctx, q, wait);
}

KVX__PRIV kvx__cuda_batch *kvx__cuda_open_batch(kvx__cuda_q *cq) { return &cq->b[(cq->first + cq->inflight) % KVX__CUDA_BATCHES]; }

/* Whether the batch travels in its launch's parameters: it fits, and no read
   of it is verified (its check kernel reads the table from memory). */
KVX__PRIV int kvx__cuda_inline_fits(const kvx__cuda_batch *b) {
    uint32_t i;
    if ((size_t)b->nreads * sizeof(kvx__cuda_rd) + (b->end - b->start) > KVX__CUDA_INLINE_BYTES - 8u) return 0;
    for (i = 0; i < b->nreads; i++)
        if (b->reads[i]->verify) return 0;
    return 1;
}

/* Make the open batch's offsets addresses and put its table and headers
   where the kernel reads them (*hptr: the headers; *inl: they are in
   cq->inl, for kvx_copy_inline). A batch that fits goes in the launch's
   parameters: no copy, no event, and the kernel's loads of them hit the
   constant cache. Else a batch of few tasks
   reads them straight from pinned memory: one round trip over the bus
   beats a copy. With more tasks than the kernel's warps, each warp would
   pay that round trip again per task (88% of the copy's speed instead of
   92% for 64 KiB blocks on an H200), so larger ones are copied. */
KVX__PRIV CUresult kvx__cuda_stage(kvx__cuda_q *cq, uint32_t slot, CUdeviceptr *hptr, int *inl, const char **what) {
    kvx__cuda_batch *b = &cq->b[slot];
    kvx__cuda_rd *hdr = cq->hdr + (size_t)slot * KVX__CUDA_BATCH_READS;
    size_t hoff = (size_t)slot * KVX__CUDA_BATCH_READS * sizeof *hdr, hbytes = b->nreads * sizeof *hdr;
    uint32_t bytes = b->end - b->start, i;
    int mapped = bytes + hbytes <= KVX__CUDA_SMALL && b->ntasks <= cq->grid_max * (KVX__CUDA_THREADS / 32u);
    CUdeviceptr pairs;
    CUresult rc;
    if ((*inl = kvx__cuda_inline_fits(b)) != 0) {
        pairs = hbytes;  /* offsets from the block's w, which the kernel adds */
        *hptr = 0;
    } else if (mapped) {
        pairs = cq->ring_map + b->start;
        *hptr = cq->hdr_map + hoff;
    } else {
        pairs = cq->ring_dev + b->start;
        *hptr = cq->hdr_dev + hoff;
    }
    for (i = 0; i < b->nreads; i++) {  /* offsets until now */
        hdr[i].pairs += pairs; hdr[i].lplanes += pairs; hdr[i].rplanes += pairs;
        if (hdr[i].gtable) hdr[i].gwant += pairs;
    }
    if (*inl) {
        cq->inl.nreads = b->nreads;
        cq->inl.ntasks = b->ntasks;
        memcpy(cq->inl.w, hdr, hbytes);
        memcpy((uint8_t *)cq->inl.w + hbytes, cq->ring + b->start, bytes);
        return CUDA_SUCCESS;
    }
    if (mapped) return CUDA_SUCCESS;
    /* On the copy stream: they run while the kernel of an earlier batch
       does (16 us per batch on an H200 when they were in line), and the
       ring keeps this batch's bytes apart from every launched one. */
    if ((rc = cuMemcpyHtoDAsync(pairs, cq->ring + b->start, bytes, cq->cs)) != CUDA_SUCCESS) { *what = "cuMemcpyHtoDAsync (block table)"; return rc; }
    if ((rc = cuMemcpyHtoDAsync(*hptr, hdr, hbytes, cq->cs)) != CUDA_SUCCESS) { *what = "cuMemcpyHtoDAsync (read headers)"; return rc; }
    if ((rc = cuEventRecord(b->staged, cq->cs)) != CUDA_SUCCESS) { *what = "cuEventRecord (staging)"; return rc; }
    if ((rc = cuStreamWaitEvent(cq->s, b->staged, 0)) != CUDA_SUCCESS) { *what = "cuStreamWaitEvent (staging)"; return rc; }
    return CUDA_SUCCESS;
}

/* The copy kernel's grid: a warp per task up to the queue's cap, and the
   lower peer cap for a batch read wholly from other GPUs. Over NVLink the
   link, not the SMs, sets the pace: one block per SM copied as fast as two
   on H200s and slowed compute beside it by 2% instead of 12%. */
KVX__PRIV uint32_t kvx__cuda_grid(kvx_ctx *ctx, const kvx__cuda_q *cq, const kvx__cuda_batch *b) {
    uint32_t grid = (b->ntasks + KVX__CUDA_THREADS / 32u - 1) / (KVX__CUDA_THREADS / 32u), i;
    if (grid > cq->grid_max) grid = cq->grid_max;
    if (cq->grid_peer && grid > cq->grid_peer) {
        kvx__cuda *c = kvx__cuda_of(ctx);
        for (i = 0; i < b->nreads; i++) {
            const kvx__cuda_peer *cp = (const kvx__cuda_peer *)b->reads[i]->peer->be;
            if (!cp || cp->pord < 0 || cp->pord == c->ord) break;
        }
        if (i == b->nreads) grid = cq->grid_peer;
    }
    return grid ? grid : 1u;
}

/* Verified reads: their checks on the check stream, behind this copy and
   beside the next one; the batch is done when they are (*done_on). */
KVX__PRIV CUresult kvx__cuda_launch_checks(kvx_queue *q, const kvx__cuda_batch *b, const kvx__cuda_rd *hdr, CUstream *done_on, const char **what) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    uint32_t i;
    CUresult rc;
    for (i = 0; i < b->nreads && !b->reads[i]->verify; i++) {}
    if (i == b->nreads) return CUDA_SUCCESS;
    if ((rc = cuEventRecord(b->copied, cq->s)) != CUDA_SUCCESS) { *what = "cuEventRecord (copied)"; return rc; }
    if ((rc = cuStreamWaitEvent(cq->vs, b->copied, 0)) != CUDA_SUCCESS) { *what = "cuStreamWaitEvent (checks)"; return rc; }
    for (; i < b->nreads; i++)
        if (b->reads[i]->verify && (rc = kvx__cuda_check_launch(q, b->reads[i], &hdr[i], what)) != CUDA_SUCCESS) return rc;
    *done_on = cq->vs;
    return CUDA_SUCCESS;
}

/* The completion words the kernel does not write, on the queue's stream
   behind it: reads staged before the queue had its words are complete, in
   stream order, once the kernel is. A verified read's word is written once
   its check is (kvx__stream_read_final). */
KVX__PRIV CUresult kvx__cuda_write_words(kvx_queue *q, const kvx__cuda_batch *b, const kvx__cuda_rd *hdr, const char **what) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    kvx__stream_q *sq = kvx__stream_of(q);
    CUstreamBatchMemOpParams ops[64];
    uint32_t i, k = 0;
    CUresult rc;
    if (!sq || !sq->words) return CUDA_SUCCESS;
    for (i = 0; i < b->nreads; i++) {
        const kvx__read *rd = b->reads[i];
        if (!rd->verify && !hdr[i].gword) {
            memset(&ops[k], 0, sizeof ops[k]);
            ops[k].writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_64;
            ops[k].writeValue.address = sq->dwords + (rd->ticket % q->depth) * 8u;
            ops[k].writeValue.value64 = (rd->ticket << 2) | 1u;
            k++;
        }
        if (k && (k == 64 || i + 1 == b->nreads)) {
            if ((rc = cuStreamBatchMemOp(cq->s, k, ops, 0)) != CUDA_SUCCESS) { *what = "cuStreamBatchMemOp (completion words)"; return rc; }
            k = 0;
        }
    }
    return CUDA_SUCCESS;
}

/* The batch is on its way: count it, hand its event to the waiter, and open
   the next batch at the ring's head. */
KVX__PRIV void kvx__cuda_launched(kvx_ctx *ctx, kvx__cuda_q *cq, const kvx__cuda_batch *b) {
    kvx__cuda_batch *nb;
    cq->inflight++;
    pthread_mutex_lock(&cq->wmu);
    if (cq->whead - cq->wtail < 2 * KVX__CUDA_BATCHES) cq->wring[cq->whead++ % (2 * KVX__CUDA_BATCHES)] = b->ev;
    kvx__cuda_hand(cq, ctx->pt_until != 0);  /* a sleeping progress thread must hear of it */
    pthread_mutex_unlock(&cq->wmu);
    nb = kvx__cuda_open_batch(cq);
    nb->start = nb->end = cq->head;
    nb->nreads = nb->ntasks = 0;
    cq->capture_checked = 0;
}

/* A launch that failed part way: what was enqueued before the failure may
   still run, so wait for it (bounded) before the batch's reads fail, then
   take its ring bytes back. */
KVX__PRIV void kvx__cuda_launch_failed(kvx_ctx *ctx, kvx__cuda_q *cq, kvx__cuda_batch *b, CUresult rc, const char *what) {
    CUcontext prev;
    kvx_status st;
    uint32_t i;
    if (cuCtxPushCurrent(cq->d->pctx) == CUDA_SUCCESS) {
        uint64_t until = kvx__now_ns() + 10000000000ull;
        while ((cuStreamQuery(cq->s) == CUDA_ERROR_NOT_READY || (cq->vs && cuStreamQuery(cq->vs) == CUDA_ERROR_NOT_READY)) && kvx__now_ns() < until) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        cuCtxPopCurrent(&prev);
    }
    st = kvx__gpu_err(ctx, rc, what);
    for (i = 0; i < b->nreads; i++) kvx__op_done(b->reads[i], st, ctx->err);
    b->nreads = b->ntasks = 0;
    cq->head = b->start;
    b->end = b->start;
}

/* Launch the open batch: table and headers to the GPU (or read in place when
   small), the kernel, the checks of its verified reads, the completion
   words the kernel does not write, the event. */
KVX__PRIV kvx_status kvx__cuda_launch(kvx_ctx *ctx, kvx_queue *q) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    uint32_t slot, grid, nreads, ntasks;
    kvx__cuda_batch *b;
    kvx__cuda_rd *hdr;
    CUdeviceptr hptr;
    CUcontext prev;
    CUresult rc;
    CUstream done_on;
    const char *what = "";
    void *args[3];
    int inl;
    if (!cq) return KVX_OK;
    done_on = cq->s;
    slot = (cq->first + cq->inflight) % KVX__CUDA_BATCHES;
    b = &cq->b[slot];
    hdr = cq->hdr + (size_t)slot * KVX__CUDA_BATCH_READS;
    if (!b->nreads) return KVX_OK;
    if (cq->inflight >= KVX__CUDA_BATCHES - 1) return KVX_PENDING;  /* the open batch needs a slot of its own */
    if ((rc = cuCtxPushCurrent(cq->d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent");
    if ((rc = kvx__cuda_stage(cq, slot, &hptr, &inl, &what)) != CUDA_SUCCESS) goto fail;
    nreads = b->nreads;
    ntasks = b->ntasks;
    args[0] = &hptr; args[1] = &nreads; args[2] = &ntasks;
    if (inl) args[0] = &cq->inl;
    grid = kvx__cuda_grid(ctx, cq, b);
    if ((rc = cuLaunchKernel(inl ? cq->d->fn_inline : cq->fn, grid, 1, 1, KVX__CUDA_THREADS, 1, 1, 0, cq->s, args, NULL)) != CUDA_SUCCESS) { what = "cuLaunchKernel (copy kernel)"; goto fail; }
    if ((rc = kvx__cuda_launch_checks(q, b, hdr, &done_on, &what)) != CUDA_SUCCESS) goto fail;
    if ((rc = kvx__cuda_write_words(q, b, hdr, &what)) != CUDA_SUCCESS) goto fail;
    if ((rc = cuEventRecord(b->ev, done_on)) != CUDA_SUCCESS) { what = "cuEventRecord"; goto fail; }
    cuCtxPopCurrent(&prev);
    kvx__cuda_launched(ctx, cq, b);
    return KVX_OK;
fail:
    cuCtxPopCurrent(&prev);
    kvx__cuda_launch_failed(ctx, cq, b, rc, what);
    return KVX_ERR_BACKEND;
}

KVX__PRIV void kvx__cuda_flush(kvx_ctx *ctx, kvx_queue *q) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    if (cq && kvx__cuda_open_batch(cq)->nreads) kvx__cuda_launch(ctx, q);
}

/* Room for bytes of the open batch, contiguous with what it already holds.
   The ring is a FIFO: launched batches from the oldest one's start to head,
   wrapping at the end; 0 if there is no room now. */
KVX__PRIV int kvx__cuda_ring_take(kvx__cuda_q *cq, uint32_t bytes, uint32_t *off) {
    kvx__cuda_batch *ob = kvx__cuda_open_batch(cq);
    uint32_t tail;
    if (!cq->inflight && !ob->nreads) cq->head = 0;  /* empty: start over */
    if (!ob->nreads) ob->start = cq->head;
    tail = cq->inflight ? cq->b[cq->first].start : ob->start;
    if (cq->head >= tail) {
        if (cq->head + bytes <= KVX__CUDA_RING) *off = cq->head;
        else if (!ob->nreads && bytes < tail) *off = ob->start = 0;  /* wrap */
        else return 0;
    } else if (cq->head + bytes < tail) {
        *off = cq->head;
    } else {
        return 0;
    }
    cq->head = *off + bytes;
    ob->end = cq->head;
    return 1;
}

/* GPU caches into GPU caches: host caches belong to UCX or libfabric. */
KVX__PRIV kvx_status kvx__cuda_can_read(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc) {
    if (lc->mem == KVX_MEM_CUDA && rc->mem == KVX_MEM_CUDA) return KVX_OK;
    return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_post: the CUDA backend reads GPU caches into GPU caches: peer %s/%d cache %u is %s memory, ours (cache %u) %s",
                     p->name, p->rank, rc->id, rc->mem == KVX_MEM_CUDA ? "GPU" : "host", lc->id, lc->mem == KVX_MEM_CUDA ? "GPU" : "host");
}

/* Where a read's parts sit in its staging (kvx__cuda_post_read): the
   (local, remote) id pairs, both plane tables of the read's planes from
   tbytes on, then the generations it expects, if it has them. */
typedef struct kvx__cuda_shape {
    uint32_t nblocks, nplanes, p0;  /* p0: the read's first plane */
    uint32_t tbytes, bytes;         /* the pairs' bytes (16-byte aligned), the whole */
} kvx__cuda_shape;

/* A launch on a capturing stream would become a graph node, not a copy:
   the queue's stream is checked at a batch's first read. */
KVX__PRIV kvx_status kvx__cuda_capture_check(kvx_ctx *ctx, kvx__cuda_q *cq) {
    CUstreamCaptureStatus cs = CU_STREAM_CAPTURE_STATUS_NONE;
    CUresult r;
    if (kvx__cuda_open_batch(cq)->nreads || cq->capture_checked) return KVX_OK;
    r = cuStreamIsCapturing(cq->s, &cs);
    if (r != CUDA_SUCCESS) return kvx__gpu_err(ctx, r, "cuStreamIsCapturing (the queue's stream)");
    if (cs != CU_STREAM_CAPTURE_STATUS_NONE)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: the queue's stream is being captured into a graph: post reads outside capture "
                         "and capture kvx_stream_wait instead");
    cq->capture_checked = 1;
    return KVX_OK;
}

/* What a read needs besides its staging, made (at the queue's first such
   read) before anything is staged, so a failure leaves nothing behind: the
   result words of its check, the owner's generation table as mapped here
   (*gtable), or the task counts behind the completion word the kernel
   writes. */
KVX__PRIV kvx_status kvx__cuda_read_prepare(kvx_queue *q, kvx__read *rd, uint32_t nblocks, CUdeviceptr *gtable) {
    kvx__stream_q *sq = kvx__stream_of(q);
    kvx_status st;
    if (rd->verify && (st = kvx__cuda_check_prepare(q, rd, nblocks)) != KVX_OK) return st;
    if (rd->gen) return kvx__cuda_gen_prepare(q, rd, gtable);
    if (sq && sq->words && !rd->verify) return kvx__cuda_counts(q);
    return KVX_OK;
}

/* Room for the read in the open batch (*bp) and bytes of the ring for its
   staging (*off), launching the open batch first where it is full;
   KVX_PENDING until launched batches complete and free theirs. */
KVX__PRIV kvx_status kvx__cuda_room(kvx_ctx *ctx, kvx_queue *q, uint32_t bytes, uint32_t *off, kvx__cuda_batch **bp) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    kvx__cuda_batch *b = kvx__cuda_open_batch(cq);
    if (b->nreads == KVX__CUDA_BATCH_READS) {
        if (kvx__cuda_launch(ctx, q) == KVX_PENDING) return KVX_PENDING;  /* launches free up as batches complete */
        b = kvx__cuda_open_batch(cq);
    }
    if (!kvx__cuda_ring_take(cq, bytes, off)) {
        if (b->nreads) {
            if (kvx__cuda_launch(ctx, q) == KVX_PENDING) return KVX_PENDING;
            b = kvx__cuda_open_batch(cq);
        }
        if (!kvx__cuda_ring_take(cq, bytes, off)) return KVX_PENDING;
    }
    *bp = b;
    return KVX_OK;
}

/* Stage the read at ring offset off (its shape sh): the block id pairs of
   its runs, the plane bases of its planes on both sides (rplanes: the
   peer's, as mapped here), and the generations it expects. */
KVX__PRIV void kvx__cuda_stage_read(kvx__cuda_q *cq, const kvx__read *rd, const kvx__cuda_shape *sh, uint32_t off, const uint64_t *rplanes) {
    const kvx_queue *q = rd->q;
    uint32_t *pairs = (uint32_t *)(cq->ring + off), i, j;
    for (i = 0; i < rd->nruns; i++) {
        const kvx__run *run = &q->runs[(rd->run0 + i) % q->max_runs];
        for (j = 0; j < run->n; j++) { *pairs++ = run->l + j; *pairs++ = run->r + j; }
    }
    memcpy(cq->ring + off + sh->tbytes, rd->lc->plane_base + sh->p0, (size_t)sh->nplanes * 8u);
    memcpy(cq->ring + off + sh->tbytes + sh->nplanes * 8u, rplanes + sh->p0, (size_t)sh->nplanes * 8u);
    if (rd->gen) memcpy(cq->ring + off + sh->tbytes + sh->nplanes * 16u, q->gens + rd->g0, (size_t)sh->nblocks * 8u);
}

/* The header's part for the read's end on the device (kvx_copy's
   gen_arrive): the task count and the completion word it writes, but for a
   verified read, whose word waits for its check; with block generations
   the staged expected words (at batch offset at + sh->tbytes +
   sh->nplanes * 16), the owner's table, and the result and found words. */
KVX__PRIV void kvx__cuda_rd_end(kvx_queue *q, const kvx__read *rd, const kvx__cuda_shape *sh, uint32_t at, CUdeviceptr gtable, kvx__cuda_rd *h) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    kvx__stream_q *sq = kvx__stream_of(q);
    h->gcount = h->gwant = h->gtable = h->gres = h->gfound = h->gword = h->gticket = 0;
    if (sq && sq->words && !rd->verify) {
        h->gcount = cq->gcount + 4u * (uint64_t)(h - cq->hdr);
        h->gword = sq->dwords + (rd->ticket % q->depth) * 8u;
        h->gticket = rd->ticket << 2;
    }
    if (rd->gen) {
        cq->gres[rd->ticket % q->depth] = 0;  /* not checked (yet) */
        h->gcount = cq->gcount + 4u * (uint64_t)(h - cq->hdr);
        h->gwant = at + sh->tbytes + sh->nplanes * 16u;
        h->gtable = gtable;
        h->gres = cq->gres_map + 4u * (rd->ticket % q->depth);
        h->gfound = cq->gfound_map + 8u * (uint64_t)rd->g0;
        h->gticket = rd->ticket << 2;
    }
}

/* The most bytes a task of the read copies: KVX__CUDA_CHUNK, or less for a
   read too small to give half the grid's warps a task each (a decode step's
   few blocks). A warp copies 16 KiB in 8 rounds of loads and the read is
   done when its last warp is; smaller chunks spread it over more warps, down
   to 1 KiB, one round. */
KVX__PRIV uint64_t kvx__cuda_chunk(const kvx__cuda_q *cq, const kvx__read *rd, const kvx__cuda_shape *sh) {
    uint64_t chunk = KVX__CUDA_CHUNK, warps = (uint64_t)cq->grid_max * (KVX__CUDA_THREADS / 32u);
    uint64_t bytes = (uint64_t)sh->nplanes * sh->nblocks * rd->g.piece * rd->g.npieces;
    while (chunk > KVX__CUDA_CHUNK_MIN && bytes / chunk < warps / 2) chunk /= 2;
    return chunk;
}

/* The header's geometry: where the read's tables start in the batch (at:
   offsets, made addresses at launch), both caches' strides, and the piece
   geometry cut into chunks of at most chunk bytes, a task each. */
KVX__PRIV void kvx__cuda_rd_geometry(const kvx__read *rd, const kvx__cuda_shape *sh, uint32_t at, uint64_t chunk, kvx__cuda_rd *h) {
    h->pairs = at;
    h->lplanes = h->pairs + sh->tbytes;
    h->rplanes = h->lplanes + sh->nplanes * 8u;
    h->lbstride = rd->lc->block_stride;
    h->rbstride = rd->rc->block_stride;
    h->loff = rd->g.loff;
    h->roff = rd->g.roff;
    h->piece = rd->g.piece;
    h->lpstride = rd->g.lpstride;
    h->rpstride = rd->g.rpstride;
    h->plane0 = 0;
    h->nblocks = sh->nblocks;
    h->npieces = rd->g.npieces;
    if (rd->g.npieces == 1) {
        uint64_t nc = (rd->g.piece + chunk - 1) / chunk;
        h->cbytes = ((rd->g.piece + nc - 1) / nc + 15u) & ~(uint64_t)15u;
        h->cpb = (uint32_t)((rd->g.piece + h->cbytes - 1) / h->cbytes);  /* so that no chunk starts past the piece */
        h->ppc = 1;
    } else {
        h->ppc = rd->g.piece >= chunk ? 1u : (uint32_t)(chunk / rd->g.piece);
        h->cpb = (rd->g.npieces + h->ppc - 1) / h->ppc;
        h->cbytes = 0;
    }
}

/* The whole read at once: stage its merged block table for the next launch. */
KVX__PRIV kvx_status kvx__cuda_post_read(kvx_ctx *ctx, kvx__read *rd) {
    kvx_queue *q = rd->q;
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    kvx__cuda_peer *cp = (kvx__cuda_peer *)rd->peer->be;
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    kvx__cuda_region *lg = (kvx__cuda_region *)lc->regions[0].be;
    kvx__cuda_batch *b;
    kvx__cuda_rd *h;
    kvx__cuda_shape sh;
    uint32_t off;
    uint64_t tasks;
    CUdeviceptr gtable = 0;
    const uint64_t *rplanes;
    kvx_status st;
    if (!cq || !lg || !cp) return kvx__fail(ctx, KVX_ERR_BACKEND, "cuda: internal: read %llu: queue, cache or peer without the backend's state", (unsigned long long)rd->ticket);
    rplanes = cp->planes[rc - rd->peer->caches];
    if (!rplanes) return kvx__fail(ctx, KVX_ERR_PEER, "cuda: read %llu: peer %s/%d cache %u is not mapped", (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rc->id);
    if ((st = kvx__cuda_capture_check(ctx, cq)) != KVX_OK) return st;
    sh.nblocks = kvx__cuda_read_blocks(rd);
    sh.nplanes = (rd->layer_end - rd->layer_begin) * lc->lay.kv_planes;
    sh.p0 = rd->layer_begin * lc->lay.kv_planes;
    sh.tbytes = (sh.nblocks * 8u + 15u) & ~15u;
    sh.bytes = sh.tbytes + sh.nplanes * 16u + (rd->gen ? sh.nblocks * 8u : 0u);
    if ((uint64_t)sh.nblocks * 16u + 16u + (uint64_t)sh.nplanes * 16u > KVX__CUDA_RING / 2)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u blocks of %u planes in one read is more than the CUDA backend stages (%u bytes): split the read",
                         sh.nblocks, sh.nplanes, KVX__CUDA_RING / 2);
    if ((st = kvx__cuda_read_prepare(q, rd, sh.nblocks, &gtable)) != KVX_OK) return st;
    if ((st = kvx__cuda_room(ctx, q, sh.bytes, &off, &b)) != KVX_OK) return st;
    kvx__cuda_stage_read(cq, rd, &sh, off, rplanes);
    h = cq->hdr + (size_t)((b - cq->b)) * KVX__CUDA_BATCH_READS + b->nreads;
    kvx__cuda_rd_end(q, rd, &sh, off - b->start, gtable, h);
    kvx__cuda_rd_geometry(rd, &sh, off - b->start, kvx__cuda_chunk(cq, rd, &sh), h);
    tasks = (uint64_t)sh.nplanes * sh.nblocks * h->cpb;
    if (tasks + b->ntasks >= (1ull << 31)) {
        cq->head = off;
        b->end = off;
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: read %llu is too large for one launch (%llu tasks): split it", (unsigned long long)rd->ticket, (unsigned long long)tasks);
    }
    h->task0 = b->ntasks;
    h->ntasks = (uint32_t)tasks;
    b->ntasks += (uint32_t)tasks;
    /* A verified read's checksums are not copied: its check reads the
       producer's table where it is mapped (kvx__cuda_check_launch). */
    b->reads[b->nreads++] = rd;
    return KVX_OK;
}

/*--- progress, sleeping, notifications -------------------------------------*/

KVX__PRIV int kvx__cuda_progress(kvx_ctx *ctx) {
    kvx__cuda *c = kvx__cuda_of(ctx);
    struct epoll_event ev[16];
    int n = 0, k, i;
    k = epoll_wait(c->epfd, ev, 16, 0);
    for (i = 0; i < k; i++) {
        kvx__cuda_fd *f = (kvx__cuda_fd *)ev[i].data.ptr;
        kvx__cuda_msg m;
        int fd, r;
        if (f->kind == KVX__CUDA_FD_LISTEN) {
            kvx__cuda_accept(ctx);
            n++;
        } else if (f->kind == KVX__CUDA_FD_WAKE) {
            uint64_t v;
            if (read(c->efd, &v, sizeof v) < 0) { /* drained already */ }
        } else if (f->kind == KVX__CUDA_FD_OWNER) {
            /* A reader of ours: export requests and notifications. */
            while ((r = kvx__cuda_recv(ctx, f->fd, &m, &fd)) > 0) {
                if (fd >= 0) close(fd);
                if (m.type == KVX__CUDA_MSG_NOTIFY) kvx__notify_arrived(ctx, m.notify, sizeof m.notify);
                else if (m.type == KVX__CUDA_MSG_EXPORT) kvx__cuda_serve(ctx, f->fd, &m);
                n++;
            }
            if (r < 0 || (ev[i].events & (EPOLLHUP | EPOLLERR))) kvx__cuda_owner_drop(ctx, f);
        } else if (f->kind == KVX__CUDA_FD_PEER) {
            /* The owner of a peer's memory never writes first: EOF means it is gone. */
            while ((r = kvx__cuda_recv(ctx, f->fd, &m, &fd)) > 0)
                if (fd >= 0) close(fd);
            if (r < 0 || (ev[i].events & (EPOLLHUP | EPOLLERR))) kvx__peer_failed(f->peer, "its process closed the CUDA backend's socket (exited?)");
        }
    }
    {
        kvx_queue *q;
        for (q = ctx->queues; q; q = q->next) n += kvx__cuda_q_complete(ctx, q, 0);
    }
    kvx__cuda_reap(ctx, 0);
    return n;
}

KVX__PRIV int kvx__cuda_event_fd(kvx_ctx *ctx) { return kvx__cuda_of(ctx)->epfd; }

/* Before the caller sleeps on the epoll set: every launch not yet handed
   to its queue's waiter is, so that its completion writes the eventfd; the
   eventfd counts, so a completion before the sleep is not lost. */
KVX__PRIV kvx_status kvx__cuda_arm(kvx_ctx *ctx) {
    kvx_queue *q;
    for (q = ctx->queues; q; q = q->next) {
        kvx__cuda_q *cq = kvx__cuda_q_of(q);
        if (!cq || !cq->waiter_on) continue;
        pthread_mutex_lock(&cq->wmu);
        kvx__cuda_hand(cq, 1);
        pthread_mutex_unlock(&cq->wmu);
    }
    return KVX_OK;
}

KVX__PRIV void kvx__cuda_signal(kvx_ctx *ctx) {
    uint64_t one = 1;
    if (write(kvx__cuda_of(ctx)->efd, &one, sizeof one) < 0) { /* already signaled */ }
}

KVX__PRIV kvx_status kvx__cuda_notify(kvx_ctx *ctx, kvx__read *rd) {
    kvx__cuda_peer *cp = (kvx__cuda_peer *)rd->peer->be;
    kvx__cuda_msg m;
    if (!cp) return kvx__fail(ctx, KVX_ERR_PEER, "notification %llu: peer %s/%d is disconnected", (unsigned long long)rd->notify_id, rd->peer->name, rd->peer->rank);
    memset(&m, 0, sizeof m);
    m.type = KVX__CUDA_MSG_NOTIFY;
    memcpy(m.notify, rd->notify_msg, sizeof m.notify);
    if (kvx__cuda_send(cp->conn.fd, &m, -1) != 0)
        return kvx__fail(ctx, KVX_ERR_PEER, "notification %llu to %s/%d: %s", (unsigned long long)rd->notify_id, rd->peer->name, rd->peer->rank, strerror(errno));
    kvx__notify_sent(rd);
    return KVX_OK;
}


/*--- queues: the backend's part ---------------------------------------------*/

KVX__PRIV void kvx__cuda_q_fini(kvx_queue *q) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    CUcontext prev;
    uint32_t i;
    if (!cq) return;
    if (cq->waiter_on) {
        pthread_mutex_lock(&cq->wmu);
        cq->wstop = 1;
        pthread_cond_signal(&cq->wcv);
        pthread_mutex_unlock(&cq->wmu);
        if (cq->inflight) {
            /* A kernel still runs after the bounded wait of the queue's
               teardown: the waiter may sleep on it for good. Leave the
               thread and what it touches rather than hang here. */
            KVX__LOG(q->ctx, KVX_LOG_ERROR, "cuda: a copy kernel still runs as its queue is destroyed: its waiter thread and staging are left behind");
            pthread_detach(cq->waiter);
            q->be = NULL;
            return;
        }
        pthread_join(cq->waiter, NULL);
    }
    pthread_mutex_destroy(&cq->wmu);
    pthread_cond_destroy(&cq->wcv);
    if (cq->d && cuCtxPushCurrent(cq->d->pctx) == CUDA_SUCCESS) {
        if (cq->s && cq->own_stream) cuStreamDestroy(cq->s);
        if (cq->cs) cuStreamDestroy(cq->cs);
        for (i = 0; i < KVX__CUDA_BATCHES; i++) {
            if (cq->b[i].ev) cuEventDestroy(cq->b[i].ev);
            if (cq->b[i].staged) cuEventDestroy(cq->b[i].staged);
            if (cq->b[i].copied) cuEventDestroy(cq->b[i].copied);
        }
        if (cq->ring) cuMemFreeHost(cq->ring);
        if (cq->hdr) cuMemFreeHost(cq->hdr);
        if (cq->ring_dev) cuMemFree(cq->ring_dev);
        if (cq->hdr_dev) cuMemFree(cq->hdr_dev);
        if (cq->vres) cuMemFreeHost(cq->vres);
        if (cq->vres_dev) cuMemFree(cq->vres_dev);
        if (cq->vs) cuStreamDestroy(cq->vs);
        if (cq->gcount) cuMemFree(cq->gcount);
        if (cq->gres) cuMemFreeHost(cq->gres);
        if (cq->gfound) cuMemFreeHost(cq->gfound);
        cuCtxPopCurrent(&prev);
    }
    kvx__gpu_dev_put(cq->d);
    KVX_FREE(cq);
    q->be = NULL;
}

/* The queue's staging stream, staging ring and read headers (pinned and
   mapped, and their device copies), and its batches' events. */
KVX__PRIV CUresult kvx__cuda_q_alloc(kvx__cuda_q *cq, const char **what) {
    size_t hbytes = (size_t)KVX__CUDA_BATCHES * KVX__CUDA_BATCH_READS * sizeof(kvx__cuda_rd);
    CUresult rc;
    uint32_t i;
#define KVX__CUDA_TRY(call, name) if ((rc = (call)) != CUDA_SUCCESS) { *what = name; return rc; }
    KVX__CUDA_TRY(cuStreamCreate(&cq->cs, CU_STREAM_NON_BLOCKING), "cuStreamCreate (staging copies)")
    KVX__CUDA_TRY(cuMemHostAlloc((void **)&cq->ring, KVX__CUDA_RING, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc (staging ring)")
    KVX__CUDA_TRY(cuMemHostGetDevicePointer(&cq->ring_map, cq->ring, 0), "cuMemHostGetDevicePointer")
    KVX__CUDA_TRY(cuMemHostAlloc((void **)&cq->hdr, hbytes, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc (read headers)")
    KVX__CUDA_TRY(cuMemHostGetDevicePointer(&cq->hdr_map, cq->hdr, 0), "cuMemHostGetDevicePointer")
    KVX__CUDA_TRY(cuMemAlloc(&cq->ring_dev, KVX__CUDA_RING), "cuMemAlloc (staging ring)")
    KVX__CUDA_TRY(cuMemAlloc(&cq->hdr_dev, hbytes), "cuMemAlloc (read headers)")
    for (i = 0; i < KVX__CUDA_BATCHES; i++) {
        KVX__CUDA_TRY(cuEventCreate(&cq->b[i].ev, CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        KVX__CUDA_TRY(cuEventCreate(&cq->b[i].staged, CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        KVX__CUDA_TRY(cuEventCreate(&cq->b[i].copied, CU_EVENT_DISABLE_TIMING), "cuEventCreate")
    }
#undef KVX__CUDA_TRY
    return CUDA_SUCCESS;
}

/* *fit: copy blocks of both kernels that stay resident on an SM at once
   (the smaller: 88 registers against 80 on sm_90 is 2 blocks, not 3). Then
   one launch of each with no tasks on the staging stream (ours, never under
   capture), waited for: the driver compiles and loads a kernel at its first
   launch (lazy loading, PTX), which a queue's first read paid before
   (about 0.3 s on an H200, measured earlier). */
KVX__PRIV CUresult kvx__cuda_q_warm(kvx__cuda_q *cq, int *fit, const char **what) {
    uint32_t zero = 0;
    void *args[3], *iargs[1];
    int fit_inline = 0;
    CUresult rc;
    if ((rc = cuOccupancyMaxActiveBlocksPerMultiprocessor(fit, cq->fn, (int)KVX__CUDA_THREADS, 0)) != CUDA_SUCCESS ||
        (rc = cuOccupancyMaxActiveBlocksPerMultiprocessor(&fit_inline, cq->d->fn_inline, (int)KVX__CUDA_THREADS, 0)) != CUDA_SUCCESS) {
        *what = "cuOccupancyMaxActiveBlocksPerMultiprocessor";
        return rc;
    }
    if (fit_inline < *fit) *fit = fit_inline;
    args[0] = &cq->hdr_dev; args[1] = &zero; args[2] = &zero;
    iargs[0] = &cq->inl;  /* no reads, no tasks */
    if ((rc = cuLaunchKernel(cq->fn, 1, 1, 1, KVX__CUDA_THREADS, 1, 1, 0, cq->cs, args, NULL)) != CUDA_SUCCESS ||
        (rc = cuLaunchKernel(cq->d->fn_inline, 1, 1, 1, KVX__CUDA_THREADS, 1, 1, 0, cq->cs, iargs, NULL)) != CUDA_SUCCESS) {
        *what = "cuLaunchKernel (warm-up)";
        return rc;
    }
    if ((rc = cuStreamSynchronize(cq->cs)) != CUDA_SUCCESS) *what = "cuStreamSynchronize (warm-up)";
    return rc;
}

KVX__PRIV kvx_status kvx__cuda_q_init(kvx_queue *q) {
    kvx_ctx *ctx = q->ctx;
    kvx__cuda *c = kvx__cuda_of(ctx);
    kvx__cuda_q *cq = (kvx__cuda_q *)kvx__calloc(1, sizeof *cq);
    CUcontext prev, sctx = NULL;
    CUresult rc;
    const char *what = "";
    kvx_status st;
    int fit = 0;
    if (!cq) return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: out of memory");
    q->be = cq;
    pthread_mutex_init(&cq->wmu, NULL);
    pthread_cond_init(&cq->wcv, NULL);
    cq->efd = c->efd;
    if ((st = kvx__gpu_dev_get(ctx, c->ord, 1, &cq->d)) != KVX_OK) { KVX_FREE(cq); q->be = NULL; return st; }
    if ((rc = cuCtxPushCurrent(cq->d->pctx)) != CUDA_SUCCESS) { kvx__cuda_q_fini(q); return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent"); }
    cq->fn = cq->d->fn;
    if (q->cuda_stream) {
        cq->s = (CUstream)q->cuda_stream;
        if ((rc = cuStreamGetCtx(cq->s, &sctx)) != CUDA_SUCCESS) what = "cuStreamGetCtx (kvx_queue_desc.cuda.stream)";
        else if (sctx != cq->d->pctx) {
            cuCtxPopCurrent(&prev);
            kvx__cuda_q_fini(q);
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_queue_create: cuda.stream belongs to another context than the primary context of device %d, "
                             "where this context's copies run", c->ord);
        }
    } else if ((rc = cuStreamCreate(&cq->s, CU_STREAM_NON_BLOCKING)) != CUDA_SUCCESS) what = "cuStreamCreate";
    else cq->own_stream = 1;
    if (rc == CUDA_SUCCESS) rc = kvx__cuda_q_alloc(cq, &what);
    if (rc == CUDA_SUCCESS) rc = kvx__cuda_q_warm(cq, &fit, &what);
    cuCtxPopCurrent(&prev);
    if (rc != CUDA_SUCCESS) { kvx__cuda_q_fini(q); return kvx__gpu_err(ctx, rc, what); }
    if (pthread_create(&cq->waiter, NULL, kvx__cuda_waiter, cq) != 0) {
        kvx__cuda_q_fini(q);
        return kvx__fail(ctx, KVX_ERR_NOMEM, "cuda: cannot start the completion waiter thread of a queue");
    }
    cq->waiter_on = 1;
    /* A queue with a stream has its completion words now, so its reads'
       ends are marked by the kernel: their task counts too, here rather
       than at the first read, which paid for them. */
    if (q->cuda_stream && (st = kvx__cuda_counts(q)) != KVX_OK) { kvx__cuda_q_fini(q); return st; }
    /* A cap past what stays resident would leave blocks for a second wave,
       with their share of tasks still to do after the first: clamp it. */
    cq->grid_max = c->max_blocks ? c->max_blocks : KVX__CUDA_DEFAULT_BLOCKS_PER_SM * (uint32_t)cq->d->sms;
    cq->grid_peer = c->max_blocks ? 0u : KVX__CUDA_PEER_BLOCKS_PER_SM * (uint32_t)cq->d->sms;
    if (fit > 0 && cq->grid_max > (uint32_t)fit * (uint32_t)cq->d->sms) {
        KVX__LOG(ctx, KVX_LOG_INFO, "cuda: cuda.max_blocks %u is more than the %d x %d copy blocks that fit device %d at once: using %d",
                 cq->grid_max, fit, cq->d->sms, c->ord, fit * cq->d->sms);
        cq->grid_max = (uint32_t)fit * (uint32_t)cq->d->sms;
    }
    return KVX_OK;
}

/*--- verify mode: checksums of GPU caches -----------------------------------
   The table of a GPU cache lives on its device and is exported with the
   cache, so a CUDA-backend reader checks against the producer's table where
   it is mapped, with no copy. Sealing and checking are kernels (kvx_csum_*
   in kernels/kvx_cuda_copy.cu) computing kvx__head_sum bit for bit. A seal
   runs on a stream of its own and waits for its kernel; a read's check runs
   on the queue's check stream right behind its copy (an event between them),
   beside the next batch's copy, and the batch's event follows the checks:
   verifying adds GPU work but no round trip through the host. */

/* The layout block the checksum kernels take by value (struct kvx_sum_lay,
   asserted there from the same list). */
typedef struct kvx__cuda_sum_lay { uint64_t hb; uint32_t hnd, num_heads, block_tokens, aligned; } kvx__cuda_sum_lay;
#define KVX__CUDA_SUM_LAY_BYTES 24
#define KVX__CUDA_SUM_LAY_LAYOUT(X) X(hb, 0) X(hnd, 8) X(num_heads, 12) X(block_tokens, 16) X(aligned, 20)
#define KVX__CUDA_AT(f, off) \
    KVX__CUDA_STATIC_ASSERT(offsetof(kvx__cuda_sum_lay, f) == off, sum_lay_##f, "kvx__cuda_sum_lay." #f " is not at byte " #off " as in the kernel's kvx_sum_lay");
KVX__CUDA_SUM_LAY_LAYOUT(KVX__CUDA_AT)
#undef KVX__CUDA_AT
KVX__CUDA_STATIC_ASSERT(sizeof(kvx__cuda_sum_lay) == KVX__CUDA_SUM_LAY_BYTES, sum_lay_size, "kvx__cuda_sum_lay is not the size of the kernel's kvx_sum_lay");

KVX__PRIV kvx__cuda_sum_lay kvx__cuda_sum_lay_of(const kvx__cache_info *ci) {
    kvx__cuda_sum_lay l;
    uint32_t p;
    memset(&l, 0, sizeof l);
    l.hb = (uint64_t)ci->lay.head_dim * ci->lay.elem_bytes;
    l.hnd = ci->lay.order == KVX_ORDER_HND;
    l.num_heads = ci->lay.num_heads;
    l.block_tokens = ci->lay.block_tokens;
    l.aligned = l.hb % 8u == 0 && ci->block_stride % 8u == 0;  /* whole words: loaded 8 at a time, or by a warp */
    for (p = 0; p < ci->nplanes; p++) l.aligned &= ci->plane_base[p] % 8u == 0;
    return l;
}

/* How a checksum kernel spreads its heads: a warp each while they are fewer
   than the warps the device holds at once (a sample), else a thread each. */
KVX__PRIV unsigned kvx__cuda_sum_grid(const kvx__gpu_dev *d, const kvx__cuda_sum_lay *l, uint64_t heads, uint32_t *warp) {
    uint64_t g;
    *warp = l->aligned && heads <= 64u * (uint64_t)d->sms;
    g = (heads + (*warp ? 7u : 255u)) / (*warp ? 8u : 256u);  /* 256 threads, 8 warps, a block */
    if (g > 8u * (uint64_t)d->sms) g = 8u * (uint64_t)d->sms;
    return g ? (unsigned)g : 1u;
}

/* A zeroed table on the cache's device (checksums, block generations); it
   holds the device's reference until kvx__cuda_table_free. */
KVX__PRIV kvx_status kvx__cuda_table_alloc(kvx_ctx *ctx, const kvx__cache_info *ci, uint64_t bytes, uint64_t *out, const char *what) {
    kvx__gpu_dev *d;
    CUdeviceptr p = 0;
    CUcontext prev;
    CUresult rc;
    kvx_status st;
    if ((st = kvx__gpu_init(ctx)) != KVX_OK || (st = kvx__gpu_dev_get(ctx, ci->device, 0, &d)) != KVX_OK) return st;
    if ((rc = cuCtxPushCurrent(d->pctx)) != CUDA_SUCCESS) { kvx__gpu_dev_put(d); return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent"); }
    if ((rc = cuMemAlloc(&p, (size_t)bytes)) == CUDA_SUCCESS && (rc = cuMemsetD8(p, 0, (size_t)bytes)) == CUDA_SUCCESS) rc = cuCtxSynchronize();
    if (rc != CUDA_SUCCESS && p) cuMemFree(p);
    cuCtxPopCurrent(&prev);
    if (rc != CUDA_SUCCESS) { kvx__gpu_dev_put(d); return kvx__gpu_err(ctx, rc, what); }
    *out = (uint64_t)p;
    return KVX_OK;
}

KVX__PRIV void kvx__cuda_table_free(const kvx__cache_info *ci, uint64_t *table) {
    kvx__gpu_dev *d = &kvx__gpu_devs[ci->device];
    CUcontext prev;
    if (cuCtxPushCurrent(d->pctx) == CUDA_SUCCESS) {
        cuMemFree((CUdeviceptr)*table);
        cuCtxPopCurrent(&prev);
    }
    *table = 0;
    kvx__gpu_dev_put(d);
}

KVX__PRIV kvx_status kvx__cuda_csum_alloc(kvx_ctx *ctx, kvx__cache_info *ci, uint64_t bytes) {
    return kvx__cuda_table_alloc(ctx, ci, bytes, &ci->csum_dev, "cuMemAlloc (checksum table)");
}
KVX__PRIV void kvx__cuda_csum_free(kvx__cache_info *ci) { kvx__cuda_table_free(ci, &ci->csum_dev); }

/*--- block generations of GPU caches ----------------------------------------
   The table lives on the cache's GPU, exported like the cache, so a reader
   maps it over CUDA IPC; its host shadow (ci->gen) is what the owner's CPU
   advances. A retire copies the changed words over and waits for them. A
   read with generations is checked inside its copy kernel: the warp that
   finishes the read's last task loads the owner's words (kvx_copy's
   gen_arrive), compares them with the staged expected ones, and writes the
   read's completion word and its result, and where a block differs the
   words it found, for the core to name it (kvx__gen_check). No round trip
   through the host: a stream waiting on the read is released as soon as it
   is checked. */
KVX__PRIV kvx_status kvx__cuda_gen_alloc(kvx_ctx *ctx, kvx__cache_info *ci, uint64_t bytes) {
    return kvx__cuda_table_alloc(ctx, ci, bytes, &ci->gen_dev, "cuMemAlloc (generation table)");
}
KVX__PRIV void kvx__cuda_gen_free(kvx__cache_info *ci) { kvx__cuda_table_free(ci, &ci->gen_dev); }

KVX__PRIV kvx_status kvx__cuda_gen_store(kvx_ctx *ctx, const kvx__cache_info *ci, uint32_t first, uint32_t n) {
    kvx__gpu_dev *d = &kvx__gpu_devs[ci->device];
    CUcontext prev;
    CUstream s = NULL;
    CUresult rc;
    if ((rc = cuCtxPushCurrent(d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "kvx_blocks_retire: cuCtxPushCurrent");
    /* a stream of its own: the legacy stream would wait for the engine's */
    if ((rc = cuStreamCreate(&s, CU_STREAM_NON_BLOCKING)) == CUDA_SUCCESS &&
        (rc = cuMemcpyHtoDAsync((CUdeviceptr)(ci->gen_dev + 8u * (uint64_t)first), (const void *)(uintptr_t)(ci->gen + first), (size_t)n * 8u, s)) == CUDA_SUCCESS)
        rc = cuStreamSynchronize(s);
    if (s) cuStreamDestroy(s);
    cuCtxPopCurrent(&prev);
    return rc == CUDA_SUCCESS ? KVX_OK : kvx__gpu_err(ctx, rc, "kvx_blocks_retire: copying the generations to the GPU");
}

/* The queue's task count per header slot (device memory, zeroed; the
   kernel leaves each at 0), made at the first read whose end the kernel
   marks: one with generations, or with a completion word to write. */
KVX__PRIV kvx_status kvx__cuda_counts(kvx_queue *q) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    CUcontext prev;
    CUresult r;
    if (cq->gcount) return KVX_OK;
    if ((r = cuCtxPushCurrent(cq->d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(q->ctx, r, "task counts: cuCtxPushCurrent");
    if ((r = cuMemAlloc(&cq->gcount, (size_t)KVX__CUDA_BATCHES * KVX__CUDA_BATCH_READS * 4u)) == CUDA_SUCCESS &&
        (r = cuMemsetD32Async(cq->gcount, 0, (size_t)KVX__CUDA_BATCHES * KVX__CUDA_BATCH_READS, cq->s)) != CUDA_SUCCESS) {  /* before any launch that counts */
        cuMemFree(cq->gcount);
        cq->gcount = 0;
    }
    cuCtxPopCurrent(&prev);
    return r == CUDA_SUCCESS ? KVX_OK : kvx__gpu_err(q->ctx, r, "the queue's task counts (cuMemAlloc)");
}

/* At post: the owner's table as mapped here, and the queue's task counts,
   result and found words (at its first read with generations), or a clear
   error before anything is staged. */
KVX__PRIV kvx_status kvx__cuda_gen_prepare(kvx_queue *q, const kvx__read *rd, CUdeviceptr *table) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    const kvx__cache_info *rc = rd->rc;
    kvx__cuda_peer *cp = (kvx__cuda_peer *)rd->peer->be;
    uint64_t raddr = rc->regions[rc->gen_region].addr;
    kvx__cuda_imp *m = kvx__cuda_imp_find(cp, raddr);
    CUcontext prev;
    CUresult r;
    kvx_status st;
    if (!m)
        return kvx__fail(q->ctx, KVX_ERR_PEER, "read %llu: the generation table of %s/%d cache %u is not mapped here", (unsigned long long)rd->ticket,
                         rd->peer->name, rd->peer->rank, rc->id);
    *table = m->lbase + (raddr - m->rbase);
    if (cq->gres) return KVX_OK;
    if ((st = kvx__cuda_counts(q)) != KVX_OK) return st;
    if ((r = cuCtxPushCurrent(cq->d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(q->ctx, r, "generations: cuCtxPushCurrent");
    if ((r = cuMemHostAlloc((void **)&cq->gres, (size_t)q->depth * 4u, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP)) == CUDA_SUCCESS &&
        (r = cuMemHostGetDevicePointer(&cq->gres_map, cq->gres, 0)) == CUDA_SUCCESS &&
        (r = cuMemHostAlloc((void **)&cq->gfound, (size_t)q->max_runs * 8u, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP)) == CUDA_SUCCESS)
        r = cuMemHostGetDevicePointer(&cq->gfound_map, cq->gfound, 0);
    if (r != CUDA_SUCCESS) {
        if (cq->gfound) cuMemFreeHost(cq->gfound);
        if (cq->gres) cuMemFreeHost(cq->gres);
        cq->gfound = NULL;
        cq->gres = NULL;
    }
    cuCtxPopCurrent(&prev);
    return r == CUDA_SUCCESS ? KVX_OK : kvx__gpu_err(q->ctx, r, "generations: the queue's result and found words");
}

/* Once the read's batch is done, for the core's check: the expected words
   where its kernel found them all current, else the words it found. */
KVX__PRIV kvx_status kvx__cuda_gen_fetch(kvx__read *rd) {
    kvx_queue *q = rd->q;
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    uint32_t res;
    if (!cq || !cq->gres) return kvx__fail(q->ctx, KVX_ERR_BACKEND, "read %llu: generations: internal: no result", (unsigned long long)rd->ticket);
    res = cq->gres[rd->ticket % q->depth];
    if (res != 1u && res != 2u)
        return kvx__fail(q->ctx, KVX_ERR_BACKEND, "read %llu from %s/%d: the copy kernel did not check its block generations (result %u)",
                         (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, res);
    memcpy(q->gland + rd->g0, (res == 1u ? q->gens : cq->gfound) + rd->g0, (size_t)kvx__cuda_read_blocks(rd) * 8u);
    return KVX_OK;
}

/* Seal: blocks' checksums into the cache's table, by a kernel on a stream of
   its own (not the legacy stream, which would wait for every other stream
   of the device), fed the plane bases and ids from stream-ordered scratch. */
KVX__PRIV kvx_status kvx__cuda_seal(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *blocks, uint32_t n) {
    size_t pb = (size_t)ci->nplanes * 8u, bytes = pb + (size_t)n * 4u;
    uint8_t *data = (uint8_t *)KVX_MALLOC(bytes);
    CUdeviceptr buf = 0, planes = 0, ids = 0;
    uint32_t nplanes = ci->nplanes, nb = ci->lay.num_blocks;
    uint64_t bstride = ci->block_stride, table = ci->csum_dev;
    kvx__cuda_sum_lay l = kvx__cuda_sum_lay_of(ci);
    uint32_t warp;
    unsigned grid;
    kvx__gpu_dev *d;
    CUcontext prev;
    CUstream s = NULL;
    CUresult rc;
    const char *what = "cuStreamCreate";
    void *args[9];
    kvx_status st;
    args[0] = &planes; args[1] = &ids; args[2] = &n; args[3] = &nplanes; args[4] = &bstride; args[5] = &nb; args[6] = &l; args[7] = &warp; args[8] = &table;
    if (!data) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_seal: out of memory");
    memcpy(data, ci->plane_base, pb);
    memcpy(data + pb, blocks, (size_t)n * 4u);
    if ((st = kvx__gpu_dev_get(ctx, ci->device, 1, &d)) != KVX_OK) { KVX_FREE(data); return st; }
    grid = kvx__cuda_sum_grid(d, &l, (uint64_t)nplanes * n * ci->lay.num_heads, &warp);
    if ((rc = cuCtxPushCurrent(d->pctx)) != CUDA_SUCCESS) { KVX_FREE(data); kvx__gpu_dev_put(d); return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent"); }
    if ((rc = cuStreamCreate(&s, CU_STREAM_NON_BLOCKING)) == CUDA_SUCCESS) {
        what = "cuMemAllocAsync (seal)";
        if ((rc = cuMemAllocAsync(&buf, bytes, s)) == CUDA_SUCCESS) {
            planes = buf;
            ids = buf + pb;
            what = "cuMemcpyHtoDAsync (seal)";
            if ((rc = cuMemcpyHtoDAsync(buf, data, bytes, s)) == CUDA_SUCCESS) {
                what = "cuLaunchKernel (checksum seal)";
                rc = cuLaunchKernel(d->fn_seal, grid, 1, 1, 256, 1, 1, 0, s, args, NULL);
            }
            cuMemFreeAsync(buf, s);
            if (rc == CUDA_SUCCESS && (rc = cuStreamSynchronize(s)) != CUDA_SUCCESS) what = "cuStreamSynchronize (seal)";
        }
        cuStreamDestroy(s);
    }
    cuCtxPopCurrent(&prev);
    kvx__gpu_dev_put(d);
    KVX_FREE(data);
    return rc == CUDA_SUCCESS ? KVX_OK : kvx__gpu_err(ctx, rc, what);
}

/* The producer's checksum table as mapped here, or 0. */
KVX__PRIV CUdeviceptr kvx__cuda_check_table(const kvx__read *rd) {
    const kvx__cache_info *rc = rd->rc;
    kvx__cuda_peer *cp = (kvx__cuda_peer *)rd->peer->be;
    kvx__cuda_imp *m;
    uint64_t raddr;
    if (rc->mem != KVX_MEM_CUDA || !cp || rc->csum_region == KVX__NO_CSUM) return 0;
    raddr = rc->regions[rc->csum_region].addr;
    return (m = kvx__cuda_imp_find(cp, raddr)) ? m->lbase + (raddr - m->rbase) : 0;
}

/* At post: what a verified read's check needs is there, or a clear error
   before anything is staged. */
KVX__PRIV kvx_status kvx__cuda_check_prepare(kvx_queue *q, kvx__read *rd, uint32_t nblocks) {
    kvx_ctx *ctx = q->ctx;
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    uint64_t items = (uint64_t)kvx__sample_count(rd, nblocks) * ((rd->layer_end - rd->layer_begin) * rd->lc->lay.kv_planes) * (rd->h_b - rd->h_a);
    CUcontext prev;
    CUresult rc = CUDA_SUCCESS;
    if (!kvx__cuda_check_table(rd))
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "read %llu: a GPU cache is verified against the producer's checksum table on its GPU; peer %s/%d's cache %u has none mapped here",
                         (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rd->rc->id);
    if (items >= 0xffffffffull)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: read %llu checks %llu heads, more than one check handles: verify a sample (kvx_read.verify > 1) or split the read",
                         (unsigned long long)rd->ticket, (unsigned long long)items);
    if (cq->vres) return KVX_OK;
    if ((rc = cuCtxPushCurrent(cq->d->pctx)) != CUDA_SUCCESS) return kvx__gpu_err(ctx, rc, "cuCtxPushCurrent");
    if ((rc = cuMemHostAlloc((void **)&cq->vres, (size_t)q->depth * 8u, CU_MEMHOSTALLOC_PORTABLE)) == CUDA_SUCCESS &&
        ((rc = cuMemAlloc(&cq->vres_dev, (size_t)q->depth * 8u)) != CUDA_SUCCESS || (rc = cuStreamCreate(&cq->vs, CU_STREAM_NON_BLOCKING)) != CUDA_SUCCESS)) {
        if (cq->vres_dev) cuMemFree(cq->vres_dev);
        cuMemFreeHost(cq->vres);
        cq->vres = NULL;
        cq->vres_dev = 0;
    }
    cuCtxPopCurrent(&prev);
    return rc == CUDA_SUCCESS ? KVX_OK : kvx__gpu_err(ctx, rc, "verify mode's result words");
}

/* At launch, on the check stream behind the read's copy (h: its launch
   header, addresses made): reset its result words, check, copy them back. */
KVX__PRIV CUresult kvx__cuda_check_launch(kvx_queue *q, kvx__read *rd, const kvx__cuda_rd *h, const char **what) {
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    kvx__cuda_sum_lay l = kvx__cuda_sum_lay_of(lc);
    uint32_t slot = (uint32_t)(rd->ticket % q->depth), first = kvx__sample_first(rd), every = rd->verify, ns = kvx__sample_count(rd, h->nblocks);
    uint32_t nplanes = (rd->layer_end - rd->layer_begin) * lc->lay.kv_planes, p0 = rd->layer_begin * lc->lay.kv_planes;
    uint32_t h_a = rd->h_a, h_b = rd->h_b, h_l0 = rd->h_l0, h_r0 = rd->h_r0, rnb = rc->lay.num_blocks, rnh = rc->lay.num_heads;
    uint64_t lbstride = lc->block_stride, total = (uint64_t)ns * nplanes * (h_b - h_a);
    uint32_t warp;
    unsigned grid = kvx__cuda_sum_grid(cq->d, &l, total, &warp);
    CUdeviceptr pairs = h->pairs, lplanes = h->lplanes, rtable = kvx__cuda_check_table(rd), res = cq->vres_dev + slot * 8u;
    CUresult r;
    void *args[18];
    cq->vres[2 * slot] = cq->vres[2 * slot + 1] = 0xffffffffu;
    if (!total) return CUDA_SUCCESS;
    if (!rtable) { *what = "verify: the producer's checksum table is no longer mapped"; return CUDA_ERROR_INVALID_VALUE; }
#if defined(KVX_TEST_HOOK_CUDA_BEFORE_CHECK)
    KVX_TEST_HOOK_CUDA_BEFORE_CHECK(rd, cq->vs);  /* tests plant a wrong byte between copy and check here */
#endif
    args[0] = &pairs; args[1] = &first; args[2] = &every; args[3] = &ns; args[4] = &nplanes; args[5] = &p0; args[6] = &lplanes; args[7] = &lbstride;
    args[8] = &l; args[9] = &warp; args[10] = &h_a; args[11] = &h_b; args[12] = &h_l0; args[13] = &h_r0; args[14] = &rtable; args[15] = &rnb; args[16] = &rnh; args[17] = &res;
    *what = "cuMemsetD32Async (check result)";
    if ((r = cuMemsetD32Async(res, 0xffffffffu, 2, cq->vs)) != CUDA_SUCCESS) return r;
    *what = "cuLaunchKernel (checksum check)";
    if ((r = cuLaunchKernel(cq->d->fn_check, grid, 1, 1, 256, 1, 1, 0, cq->vs, args, NULL)) != CUDA_SUCCESS) return r;
    *what = "cuMemcpyDtoHAsync (check result)";
    return cuMemcpyDtoHAsync(cq->vres + 2 * slot, res, 8, cq->vs);
}

/* The idx-th (local, remote) pair of a read, in run order. */
KVX__PRIV void kvx__cuda_pair(const kvx__read *rd, uint32_t idx, uint32_t *l, uint32_t *r) {
    const kvx_queue *q = rd->q;
    uint32_t i;
    *l = *r = 0;
    for (i = 0; i < rd->nruns; i++) {
        const kvx__run *run = &q->runs[(rd->run0 + i) % q->max_runs];
        if (idx < run->n) { *l = run->l + idx; *r = run->r + idx; return; }
        idx -= run->n;
    }
}

/* A verified read of a GPU cache, once its batch is done: what its check
   found. A mismatch is recomputed on the host to name what was found. */
KVX__PRIV kvx_status kvx__cuda_verify(kvx__read *rd) {
    kvx_queue *q = rd->q;
    kvx__cuda_q *cq = kvx__cuda_q_of(q);
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    uint32_t slot = (uint32_t)(rd->ticket % q->depth), nh = rd->h_b - rd->h_a, nplanes = (rd->layer_end - rd->layer_begin) * lc->lay.kv_planes;
    uint32_t nblocks = 0, ns, res0, res1, item, plane, lb, rb, h, want = 0, got = 0;
    uint8_t *blk;
    kvx__gpu_dev *d;
    CUcontext prev;
    CUstream s;
    if (!cq || !cq->vres) return kvx__fail(q->ctx, KVX_ERR_BACKEND, "read %llu: verify: internal: no check result", (unsigned long long)rd->ticket);
    nblocks = kvx__cuda_read_blocks(rd);
    ns = kvx__sample_count(rd, nblocks);
    res0 = cq->vres[2 * slot];
    res1 = cq->vres[2 * slot + 1];
    if (res0 == 0xffffffffu && res1 == 0xffffffffu) return KVX_OK;
    item = (res1 != 0xffffffffu ? res1 : res0) / nh;
    if (item >= ns * nplanes) return kvx__fail(q->ctx, KVX_ERR_BACKEND, "read %llu: verify: internal: check result %u out of range", (unsigned long long)rd->ticket, item);
    plane = rd->layer_begin * lc->lay.kv_planes + item / ns;
    kvx__cuda_pair(rd, kvx__sample_first(rd) + (item % ns) * rd->verify, &lb, &rb);
    if (res1 != 0xffffffffu) return kvx__verify_unsealed(rd, plane, rb);
    h = rd->h_a + res0 % nh;
    blk = (uint8_t *)KVX_MALLOC((size_t)lc->block_bytes);
    if (blk && kvx__gpu_dev_get(q->ctx, lc->device, 0, &d) == KVX_OK) {
        if (cuCtxPushCurrent(d->pctx) == CUDA_SUCCESS) {
            if (cuStreamCreate(&s, CU_STREAM_NON_BLOCKING) == CUDA_SUCCESS) {  /* not the legacy stream: it would wait for streams held on this read */
                if (cuMemcpyDtoHAsync(blk, (CUdeviceptr)(lc->plane_base[plane] + (uint64_t)lb * lc->block_stride), (size_t)lc->block_bytes, s) == CUDA_SUCCESS &&
                    cuMemcpyDtoHAsync(&want, kvx__cuda_check_table(rd) + 4u * kvx__csum_index(rc, plane, rb, h - rd->h_r0), 4, s) == CUDA_SUCCESS &&
                    cuStreamSynchronize(s) == CUDA_SUCCESS)
                    got = kvx__head_sum(lc, blk, h - rd->h_l0);
                cuStreamDestroy(s);
            }
            cuCtxPopCurrent(&prev);
        }
        kvx__gpu_dev_put(d);
    }
    KVX_FREE(blk);
    return kvx__verify_mismatch(rd, plane, rb, lb, h, got, want);
}

/*--- the backend's table ----------------------------------------------------*/

/* A queue of the CUDA backend: its device (from cuda_stream, else the
   context's), the completion words its kernels write, its own state. */
KVX__PRIV kvx_status kvx__cuda_queue_open(kvx_queue *q) {
    kvx_ctx *ctx = q->ctx;
    kvx_status st;
    int ord = -1;
    if ((st = kvx__gpu_init(ctx)) == KVX_OK && q->cuda_stream) st = kvx__stream_ordinal(ctx, q->cuda_stream, &ord);
    if (st == KVX_OK) st = kvx__cuda_bind(ctx, ord, "kvx_queue_create (cuda.stream)");
    if (st == KVX_OK) st = kvx__stream_alloc(q, kvx__cuda_of(ctx)->ord);
    if (st == KVX_OK) st = kvx__cuda_q_init(q);
    return st;
}

/* The transports of the policy classes that cuda names (kvx__policy_term). */
static const char *const kvx__cuda_policy[] = {"ipc=cuda:ipc*", NULL};

/* The cuda backend's table: the entries it implements (kvx__backend). */
KVX__PRIV void kvx__cuda_fill(kvx__backend *b) {
    b->name = "cuda";
    b->kind = KVX_BACKEND_CUDA;
    b->policy_classes = kvx__cuda_policy;
    b->completes_on_gpu = 1;
    b->gpu_region_spans_allocations = 1;
    b->issues_without_progress = 1;
    b->open = kvx__cuda_open;
    b->close = kvx__cuda_close;
    b->query = kvx__cuda_query;
    b->address = kvx__cuda_address;
    b->mem_register = kvx__cuda_mem_register;
    b->mem_deregister = kvx__cuda_mem_deregister;
    b->connect = kvx__cuda_connect;
    b->disconnect = kvx__cuda_disconnect;
    b->can_read = kvx__cuda_can_read;
    b->queue_open = kvx__cuda_queue_open;
    b->queue_close = kvx__cuda_q_fini;
    b->post_read = kvx__cuda_post_read;
    b->flush = kvx__cuda_flush;
    b->notify = kvx__cuda_notify;
    b->progress = kvx__cuda_progress;
    b->event_fd = kvx__cuda_event_fd;
    b->arm = kvx__cuda_arm;
    b->signal = kvx__cuda_signal;
    b->csum_alloc = kvx__cuda_csum_alloc;
    b->csum_free = kvx__cuda_csum_free;
    b->csum_seal = kvx__cuda_seal;
    b->csum_verify = kvx__cuda_verify;
    b->gen_alloc = kvx__cuda_gen_alloc;
    b->gen_free = kvx__cuda_gen_free;
    b->gen_store = kvx__cuda_gen_store;
    b->gen_fetch = kvx__cuda_gen_fetch;
}

#endif /* KVX_CUDA_INCLUDED */
