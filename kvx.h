/* SPDX-License-Identifier: MIT */
/*
    kvx.h -- move KV-cache blocks between LLM inference engines by one-sided reads.

    kvx is a header-only C library for prefill -> decode disaggregation. The
    decode side reads blocks of the prefill side's KV cache straight out of its
    memory, named by block tables, with many reads in flight, and is told when
    they are complete (by polling, by waiting, or on a CUDA stream).

    DO THIS in exactly one .c or .cpp file of your program:

        #define KVX_IMPLEMENTATION
        #define KVX_UCX            // and/or KVX_OFI, KVX_CUDA
        #include "kvx.h"

    Every other file includes kvx.h plainly (the backend defines do not matter
    there: the public API is the same for all backends).

    The implementation uses POSIX 2008 and a few GNU calls: when kvx.h is
    the first #include of that file it defines _GNU_SOURCE itself; where
    another header comes first, define _GNU_SOURCE before it (or compile
    with -D_GNU_SOURCE). Compiled as C++, the implementation needs no flag.

    BACKENDS (compile-time, any combination; the first enabled one is the
    default, a context can pick another with kvx_ctx_desc.backend):

        KVX_UCX    UCX ucp: one-sided ucp_get_nbx, or kvx's get over active messages
                                                         link: pkg-config --libs ucx
        KVX_OFI    libfabric FI_EP_RDM + fi_read         link: pkg-config --libs libfabric
        KVX_CUDA   CUDA IPC reads and stream-ordered completion   link: -lcuda
        (always)   KVX_BACKEND_LOCAL: memcpy between contexts of one process,
                   for an engine's own tests without a network (kvx_local.h)

    Always link -lpthread. Backend settings are sub-structs of the descs
    (kvx_ctx_desc.ofi, .cuda; kvx_queue_desc.cuda); kvx_ctx_query_desc()
    returns what a context runs with.

    FILES (each one room; integrators include only kvx.h):

        kvx.h          this manual, the public API and the core
        kvx_auth.h     the secret, nonces and signed metadata (random source, SipHash, HMAC-SHA-256)
        kvx_wire.h     every byte that crosses a process, one codec
        kvx_verify.h   verify mode: sampling rule, head checksums
        kvx_local.h    the local backend (memcpy), always compiled
        kvx_ucx.h      the UCX backend; kvx_ucx_get.h its own get over AM
        kvx_ofi.h      the libfabric backend
        kvx_gpu.h      device table and stream-ordered completion (KVX_CUDA)
        kvx_cuda.h     the CUDA IPC backend; kvx_cuda_ptx.h its kernels (generated)

    OVERRIDES (define before including the implementation):

        KVX_MALLOC(sz) / KVX_REALLOC(p, sz) / KVX_FREE(p)
                                       allocator (default malloc/realloc/free);
                                       all three or none
        KVX_ASSERT(c)                  internal invariants (default assert)
        KVX_STATIC                     make every function static (a private copy)
        KVX_API                        decoration of public functions

    TEST SEAMS (one form: macros defined before the implementation, absent
    by default, so they cost nothing; kvx's own tests use them):

        KVX_TEST_HOOK_BEFORE_VERIFY(rd)            before a host read is checked
        KVX_TEST_HOOK_CUDA_BEFORE_CHECK(rd, stream)  before a GPU read's check kernel
        KVX_TEST_HOOK_OFI_MR_MODE                  mr_mode bits libfabric did not ask for
        KVX_TEST_HOOK_UCX_NATIVE_GET               1: ucp_get_nbx for software-served peers
        KVX_TEST_HOOK_UCX_NO_PROBE                 1: no first read at connect
    An engine's own tests need none of them: KVX_BACKEND_LOCAL runs the whole
    API in one process without a network.

    BINDINGS

        kvx_abi_fields() lists each public struct's size and every field's
        offset and size as the build lays them out, so a binding checks its
        mirrors at load (the Python package refuses any difference, naming
        the struct and field).

    WHAT KVX DOES NOT DO

        It does not ship metadata between engines: kvx_metadata() gives you a
        byte blob, you carry it (ZMQ, HTTP, etcd, a file) and hand it to the
        other side's kvx_peer_add(). It does not allocate your KV cache, choose
        which blocks to send, or schedule requests.

    STEP BY STEP

        // prefill (owner of the blocks)
        kvx_ctx *ctx;
        kvx_ctx_create(&(kvx_ctx_desc){ .name = "prefill", .tp_rank = 0, .tp_size = 1,
                                         .progress_thread = 1 }, &ctx);
        kvx_cache *cache;
        kvx_cache_register(ctx, &(kvx_cache_desc){ .layout = lay, .bases = ptrs }, &cache);
        size_t len = 0;  kvx_metadata(ctx, NULL, &len);
        void *md = malloc(len);  kvx_metadata(ctx, md, &len);   // ship md to decode

        // decode (reader)
        kvx_peer *peer;
        kvx_peer_add(ctx, md, len, &peer);
        printf("transport: %s\n", kvx_peer_transport(peer));    // e.g. ucx:tcp
        kvx_queue *q;
        kvx_queue_create(ctx, NULL, &q);
        kvx_ticket t;
        kvx_post(q, &(kvx_read){ .peer = peer, .cache = cache,
                                 .local_blocks = dst_ids, .remote_blocks = src_ids,
                                 .num_blocks = n, .notify = 1, .notify_id = req_id }, &t);
        if (kvx_wait(q, t, 5000) != KVX_OK) fprintf(stderr, "%s\n", kvx_ctx_error(ctx));
        // or: kvx_poll(q, comps, 16); or kvx_stream_wait(q, t, stream) with KVX_CUDA

    PROGRESS

        Where the transport has no hardware RMA (UCX over TCP or over shared
        memory for ordinary memory, libfabric tcp;ofi_rxm and shm), reads are
        served by the OWNER's progress: the prefill side must either run a
        progress thread (.progress_thread = 1; it sleeps on the backend's event
        fd, never spins) or call kvx_progress(ctx) from its loop. The reader
        progresses inside kvx_test/kvx_wait/kvx_poll, or through its own
        progress thread.

    THREADS

        - kvx_ctx_create/destroy, kvx_cache_register/deregister, kvx_peer_add/
          remove, kvx_queue_create/destroy: any thread, but not concurrently
          with calls that use the same object.
        - kvx_post, kvx_test, kvx_wait, kvx_poll, kvx_stream_wait on one queue:
          one thread at a time. Different queues may be driven by different
          threads at once, and at the same time as the progress thread.
        - kvx_progress, kvx_notifications, kvx_stats: any thread.
        - kvx_ctx_error: the message of the last error of the context; read it
          on the thread that saw the error, before making more calls.
          kvx_ctx_error(NULL) is the last kvx_ctx_create failure of the
          calling thread.

    Every wait has a deadline (kvx_ctx_desc.timeout_ms, 30 s by default): a
    read that passes its deadline fails with KVX_ERR_TIMEOUT, and only after
    the transport can no longer write into its blocks.

    WHO MAY READ

        Holding a context's metadata is what entitles a process to read it;
        reaching its ports is not. The metadata carries a random secret (per
        context and epoch) that every request and notification must carry:
        anything without it is dropped unanswered and counted
        (kvx_stats.messages_dropped). kvx_ctx_rotate() cuts every holder of
        older metadata off. UCX's software get and put, which read and write
        any address for anyone who reaches a TCP port, are never enabled
        (kvx_ucx_desc.software_rma turns them on, unsafely). With a deployment
        key (kvx_ctx_desc.metadata_key, $KVX_METADATA_KEY_FILE) metadata is
        signed and checked. What a peer can make an owner hold is bounded.
        kvx encrypts nothing: ship metadata over a channel you trust. The
        model, what is left open and the settings: docs/security.md.
*/
/* The implementation needs POSIX 2008 and GNU calls; this takes effect only
   where kvx.h is the file's first #include (see the manual above). */
#if defined(KVX_IMPLEMENTATION) && !defined(KVX__IMPLEMENTED) && !defined(_GNU_SOURCE) && !defined(__cplusplus)
#  define _GNU_SOURCE 1
#endif
#ifndef KVX_INCLUDED
#define KVX_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifndef KVX_API
#  if defined(KVX_STATIC)
#    if defined(__GNUC__)
#      define KVX_API static __attribute__((unused))
#    else
#      define KVX_API static
#    endif
#  else
#    define KVX_API extern
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KVX_VERSION_MAJOR 0
#define KVX_VERSION_MINOR 2
#define KVX_METADATA_VERSION 3

typedef enum kvx_status {
    KVX_OK = 0,
    KVX_PENDING = 1,            /* not finished yet, or no room: try again */
    KVX_ERR_ARG = -1,           /* bad argument: NULL, out of range, malformed */
    KVX_ERR_NOMEM = -2,
    KVX_ERR_UNSUPPORTED = -3,   /* backend not compiled in, memory it cannot take */
    KVX_ERR_MISMATCH = -4,      /* metadata or layouts that do not fit together */
    KVX_ERR_BACKEND = -5,       /* the transport library failed; its text is in kvx_ctx_error */
    KVX_ERR_PEER = -6,          /* the peer died or closed */
    KVX_ERR_TIMEOUT = -7,       /* a deadline passed */
    KVX_ERR_CORRUPT = -8,       /* metadata checksum or verified data wrong */
    KVX_ERR_CANCELED = -9,      /* the queue or peer was destroyed with the read in flight */
    KVX_ERR_STALE = -10         /* the owner retired a block the read expected (block generations) */
} kvx_status;

typedef enum kvx_backend {
    KVX_BACKEND_DEFAULT = 0,    /* first compiled in: UCX, then OFI, then CUDA */
    KVX_BACKEND_UCX = 1,
    KVX_BACKEND_OFI = 2,
    KVX_BACKEND_CUDA = 3,
    KVX_BACKEND_LOCAL = 4       /* memcpy between contexts of one process: engines' own tests (always compiled) */
} kvx_backend;

typedef enum kvx_log_level {
    KVX_LOG_DEFAULT = 0,        /* KVX_LOG from the environment (off, error, warn, info, debug), else warn */
    KVX_LOG_OFF = 1,
    KVX_LOG_ERROR = 2,
    KVX_LOG_WARN = 3,
    KVX_LOG_INFO = 4,
    KVX_LOG_DEBUG = 5
} kvx_log_level;

typedef enum kvx_order {
    KVX_ORDER_HND = 0,          /* [head][token][dim]: a head's slice of a block is contiguous */
    KVX_ORDER_NHD = 1           /* [token][head][dim] */
} kvx_order;

typedef enum kvx_mem {
    KVX_MEM_HOST = 0,
    KVX_MEM_CUDA = 1
} kvx_mem;

/* What an element is. Part of the layout and the metadata: a reader whose
   cache holds another dtype than the owner's is refused at kvx_peer_add
   (the bytes would read as garbage), even where the sizes agree. */
typedef enum kvx_dtype {
    KVX_DTYPE_UNSPECIFIED = 0,  /* only elem_bytes is compared */
    KVX_DTYPE_F16 = 1,
    KVX_DTYPE_BF16 = 2,
    KVX_DTYPE_F32 = 3,
    KVX_DTYPE_F8_E4M3 = 4,      /* fp8 KV caches */
    KVX_DTYPE_F8_E5M2 = 5,
    KVX_DTYPE_I8 = 6,
    KVX_DTYPE_U8 = 7,
    KVX_DTYPE_F64 = 8,
    KVX_DTYPE_U16 = 9           /* raw 16-bit words (tests, bf16 handled as bits) */
} kvx_dtype;

typedef struct kvx_ctx kvx_ctx;
typedef struct kvx_cache kvx_cache;
typedef struct kvx_peer kvx_peer;
typedef struct kvx_queue kvx_queue;
typedef uint64_t kvx_ticket;    /* 0 is never a valid ticket */

typedef void (*kvx_log_fn)(kvx_log_level level, const char *msg, void *user);

/* Backend settings: one sub-struct per backend in kvx_ctx_desc, zero meaning
   the default. Environment variables are fallbacks for fields left zero. */
typedef struct kvx_ofi_desc {
    const char *provider;       /* libfabric provider ("tcp", "shm", "efa"); NULL: $FI_PROVIDER, else the first that fits */
    uint64_t extra_caps;        /* capabilities to require beyond kvx's own */
    int hmem;                   /* FI_HMEM: 1 ask, -1 do not; 0: $KVX_OFI_HMEM, else ask except on shm */
    uint64_t max_msg;           /* split reads larger than this many bytes; 0: $KVX_OFI_MAX_MSG, else the provider's */
    uint32_t tick_us;           /* progress tick where the provider has no wait fd; 0: $KVX_OFI_TICK_US, else 1000 */
} kvx_ofi_desc;

typedef struct kvx_ucx_desc {
    /* Network devices of the worker that peers reach, in UCX_NET_DEVICES
       syntax ("eth1", "mlx5_0:1,eth0", "lo"). NULL: $UCX_NET_DEVICES, else the
       device of this host's default route, else lo: never every interface. */
    const char *net_devices;
    /* 1: also enable UCX's one-sided get and put over transports UCX serves
       in software (TCP). UNSAFE: any process that can reach such a port then
       reads and writes all of this process's memory, registered or not. For
       GPU caches across hosts without RDMA on a trusted network; -1: off,
       whatever the environment says; 0 (the default): $KVX_UCX_SOFTWARE_RMA
       (1 on), else off. */
    int software_rma;
} kvx_ucx_desc;

typedef struct kvx_cuda_desc {
    uint32_t max_blocks;        /* cap on the copy kernel's thread blocks; 0: the default */
    const char *socket_dir;     /* where owners listen for readers; NULL: $KVX_CUDA_SOCKET_DIR, else /tmp/kvx-cuda-UID */
} kvx_cuda_desc;

typedef struct kvx_ctx_desc {
    const char *name;           /* engine name, e.g. "prefill"; default "kvx" */
    int tp_rank;                /* tensor-parallel rank, in [0, tp_size) */
    int tp_size;                /* 0: 1 */
    kvx_backend backend;
    uint32_t timeout_ms;        /* default deadline of a read; 0: 30000 */
    int progress_thread;        /* 1: run a progress thread that sleeps on the event fd */
    const char *host_id;        /* NULL: $KVX_HOST_ID, else hostname + boot id */
    kvx_log_level log_level;
    kvx_log_fn log_fn;          /* NULL: stderr */
    void *log_user;
    kvx_ofi_desc ofi;           /* KVX_OFI */
    kvx_cuda_desc cuda;         /* KVX_CUDA */
    /* UCX takes the rest of its settings from its own UCX_* environment variables. */
    /* Which transports kvx_peer_add accepts; NULL: $KVX_TRANSPORT_POLICY, else any.
       Comma-separated terms: "!term" refuses the transports it matches; the
       other terms are alternatives, one of which must match. A term is a
       pattern over kvx_peer_transport's text ('*' for any characters) or a
       class: "sw" (served in software by the owner's CPU), "ipc" (CUDA IPC,
       kvx's or UCX's), "nvlink", "rdma" (UCX rc/dc, libfabric verbs or efa).
       E.g. "!sw" refuses every software-served path; "ipc,rdma" demands one. */
    const char *transport_policy;
    kvx_ucx_desc ucx;           /* KVX_UCX */
    /* A deployment key: metadata this context exports is signed with it
       (HMAC-SHA-256) and metadata it imports must be, by the same key.
       NULL: the contents of the file $KVX_METADATA_KEY_FILE names, else no
       key (metadata unsigned, and signed metadata refused). 16 bytes or more. */
    const void *metadata_key;
    uint32_t metadata_key_len;
} kvx_ctx_desc;

typedef struct kvx_layout {
    uint32_t num_layers;
    uint32_t num_blocks;
    uint32_t block_tokens;
    uint32_t num_heads;         /* KV heads held by this rank */
    uint32_t head_dim;
    uint32_t elem_bytes;
    kvx_order order;
    uint32_t total_heads;       /* the model's KV heads; 0: num_heads * tp_size.
                                   Fewer than tp_size: heads are replicated, num_heads = 1 */
    uint32_t kv_planes;         /* 0: 2 (K and V); 1: one plane, MLA's latent or K and V side by side in
                                   head_dim (vLLM's [B, H, N, K|V]: a head's K and V move together) */
    kvx_dtype dtype;            /* 0: unspecified; else checked against the peer's and elem_bytes */
} kvx_layout;

typedef struct kvx_cache_desc {
    kvx_layout layout;
    kvx_mem mem;
    int device;                 /* KVX_MEM_CUDA: the CUDA device ordinal */
    /* Either one base per layer and plane, bases[layer * kv_planes + plane] ... */
    void *const *bases;
    /* ... or one pool: plane (l, p) starts at pool + l*layer_stride + p*plane_stride. */
    void *pool;
    uint64_t layer_stride;
    uint64_t plane_stride;
    uint64_t block_stride;      /* bytes from block b to b+1; 0: the block's own size */
    /* Inside a block (0: from the order, blocks packed as [head][token][dim]
       for HND, [token][head][dim] for NHD). HND: bytes from head h to h+1,
       its tokens packed; NHD: bytes from token t to t+1, its heads packed.
       With block_stride they describe views like vLLM's block-outermost
       layouts, whose per-layer view strides a block across all layers. */
    uint64_t head_stride;       /* HND only */
    uint64_t token_stride;      /* NHD only */
    int checksums;              /* 1: keep a checksum per block, layer, K/V and head (kvx_cache_seal),
                                   published to peers; needed on both sides of a verified read.
                                   GPU caches: the CUDA backend only; the table lives on the GPU */
    int generations;            /* 1: keep a generation per block (kvx_blocks_retire), published to
                                   peers; an owner's cache needs it for reads that carry generations.
                                   Host memory; with the CUDA backend the GPU, with a host shadow */
} kvx_cache_desc;

typedef struct kvx_queue_desc {
    uint32_t depth;             /* reads in flight (posted, not yet reported); 0: 256 */
    uint32_t max_ops;           /* transport operations outstanding; 0: 64 */
    uint32_t max_runs;          /* merged runs of block ids held for posting; 0: 65536 */
    struct {
        void *stream;           /* KVX_CUDA: the stream CUDA reads are issued on and completion words live for */
    } cuda;
} kvx_queue_desc;

typedef struct kvx_read {
    kvx_peer *peer;
    kvx_cache *cache;           /* local destination; NULL: the first registered */
    uint32_t remote_cache;      /* index of the cache in the peer's metadata */
    const uint32_t *local_blocks;
    const uint32_t *remote_blocks;
    uint32_t num_blocks;        /* 0, with notify: reads nothing and only notifies (a reader that
                                   found every block locally, or a rank that takes no heads of
                                   this peer, tells the owner it is done) */
    uint32_t layer_begin;
    uint32_t layer_count;       /* 0: all layers from layer_begin */
    int notify;                 /* 1: deliver notify_id to the peer when complete */
    uint64_t notify_id;
    uint64_t user_tag;          /* returned in kvx_completion */
    uint32_t timeout_ms;        /* 0: the context's */
    uint32_t verify;            /* 0: off; N: after the read, check one block in N (1: all) against
                                   the producer's sealed checksums; a mismatch is KVX_ERR_CORRUPT */
    const uint64_t *remote_generations; /* NULL: none; else one per remote block, as the owner's
                                   kvx_block_generation gave them: after the data has landed the
                                   read fetches the owner's current ones and any difference is
                                   KVX_ERR_STALE. The peer's cache needs generations. Copied at
                                   kvx_post. */
} kvx_read;

typedef struct kvx_completion {
    kvx_ticket ticket;
    uint64_t user_tag;
    kvx_status status;
    uint64_t bytes;
    const char *error;          /* a failed read: what failed, where and why (NULL if it succeeded);
                                   kvx's memory, valid until the queue's next depth posts */
} kvx_completion;

typedef struct kvx_notification {
    uint64_t id;
    kvx_status status;          /* KVX_OK: the read is done; KVX_ERR_TIMEOUT: expected, never came */
    int peer_rank;              /* the reader's tp rank; -1 for expired */
    int peer_tp_size;           /* the reader's tp size (how many ranks of its engine may come); 0 for expired */
} kvx_notification;

typedef struct kvx_stats {
    const char *backend;        /* "ucx", "ofi", "cuda" */
    uint64_t bytes_read;
    uint64_t reads_posted;
    uint64_t reads_completed;
    uint64_t reads_failed;
    uint64_t descs_posted;      /* merged descriptors (transport operations) issued */
    uint64_t descs_completed;
    uint64_t blocks_posted;     /* block-table entries, before merging, times layers and planes */
    uint64_t notifications_sent;
    uint64_t notifications_received;
    uint64_t errors;
    uint64_t messages_dropped;  /* from the network, dropped unanswered: without this context's secret,
                                   malformed, or past a bound on what a peer may make it hold */
    uint64_t notifications_dropped; /* authentic, but neither expected nor room for them (kvx_notifications) */
} kvx_stats;

/* One row of kvx_abi_fields(): a field of a public struct as this build lays it out. */
typedef struct kvx_abi_field {
    const char *type;           /* "kvx_read"; "kvx_queue_desc.cuda" for the unnamed sub-struct */
    const char *field;          /* NULL: this entry is the struct's own size */
    size_t offset;              /* offsetof within type */
    size_t size;
} kvx_abi_field;

KVX_API kvx_status  kvx_ctx_create(const kvx_ctx_desc *desc, kvx_ctx **out);
KVX_API void        kvx_ctx_destroy(kvx_ctx *ctx);
KVX_API const char *kvx_ctx_error(const kvx_ctx *ctx);
KVX_API const char *kvx_status_name(kvx_status s);
/* "f16", "bf16", "f32", "f8e4m3", ...; "unspecified", "unknown". */
KVX_API const char *kvx_dtype_name(kvx_dtype d);
/* "ucx", "ofi", "cuda", "local"; "default" for KVX_BACKEND_DEFAULT, "unknown" else. */
KVX_API const char *kvx_backend_name(kvx_backend b);
/* The desc the context runs with, every default and environment fallback
   filled in: backend, name, rank, timeouts, host id, log level, and the
   backend's own settings (provider, caps, message size, ...). Strings point
   into the context and live as long as it. */
KVX_API kvx_ctx_desc kvx_ctx_query_desc(const kvx_ctx *ctx);
/* A new epoch and secret, and every cache registered again (new remote keys
   where the transport has them): metadata exported before no longer reads
   this context, so every reader that had it is cut off (its reads fail or
   time out) until it adds the metadata exported after. What it does not
   reach: CUDA IPC handles and cma, which name memory, not a registration. */
KVX_API kvx_status  kvx_ctx_rotate(kvx_ctx *ctx);

KVX_API kvx_status  kvx_cache_register(kvx_ctx *ctx, const kvx_cache_desc *desc, kvx_cache **out);
/* Once it returns the memory is the engine's again. With UCX's software-served
   transports it may wait for replies still sending from the cache, at most
   until the deadlines of the reads they serve. */
KVX_API void        kvx_cache_deregister(kvx_cache *cache);
/* Producer side, for verified reads: record the checksums of these blocks
   (every layer, K/V and head) once they hold what readers will read. A GPU
   cache is summed by a kernel on a stream of kvx's own: synchronize the
   streams that wrote the blocks first. */
KVX_API kvx_status  kvx_cache_seal(kvx_cache *cache, const uint32_t *blocks, uint32_t n);
/* Owner side, with kvx_cache_desc.generations: advance the generation of
   blocks the engine frees or gives to another request. Call it before the
   blocks are written again: a read that expected the old generation and
   has not fetched the generations yet then fails with KVX_ERR_STALE, never
   passes with the new bytes. */
KVX_API kvx_status  kvx_blocks_retire(kvx_cache *cache, const uint32_t *ids, uint32_t n);
/* A block's current generation (0 until first retired), to send with its id
   in a request; UINT64_MAX for a cache without generations or an id past it. */
KVX_API uint64_t    kvx_block_generation(const kvx_cache *cache, uint32_t id);

/* buf NULL: *len gets the size. Else *len is buf's size on entry, the blob's on exit. */
KVX_API kvx_status  kvx_metadata(kvx_ctx *ctx, void *buf, size_t *len);
KVX_API kvx_status  kvx_peer_add(kvx_ctx *ctx, const void *md, size_t len, kvx_peer **out);
KVX_API void        kvx_peer_remove(kvx_peer *peer);
KVX_API const char *kvx_peer_transport(const kvx_peer *peer);
KVX_API const char *kvx_peer_name(const kvx_peer *peer);
KVX_API int         kvx_peer_rank(const kvx_peer *peer);
/* The global heads a read of remote_cache from this peer into cache takes;
   *count 0 means this peer is not the source of any head for us. */
KVX_API kvx_status  kvx_peer_heads(const kvx_peer *peer, const kvx_cache *cache,
                                   uint32_t remote_cache, uint32_t *first, uint32_t *count);

KVX_API kvx_status  kvx_queue_create(kvx_ctx *ctx, const kvx_queue_desc *desc, kvx_queue **out);
KVX_API void        kvx_queue_destroy(kvx_queue *q);
KVX_API kvx_status  kvx_post(kvx_queue *q, const kvx_read *rd, kvx_ticket *out);
/* n reads in order, as kvx_post each, under one lock and issued together
   (the CUDA backend launches them as one kernel): out[i] is read i's
   ticket. Stops at the first read refused and returns its status (and
   kvx_ctx_error its sentence); *posted (may be NULL) says how many went. */
KVX_API kvx_status  kvx_post_batch(kvx_queue *q, const kvx_read *reads, uint32_t n, kvx_ticket *out, uint32_t *posted);
KVX_API kvx_status  kvx_test(kvx_queue *q, kvx_ticket t);
/* Waits up to timeout_ms; KVX_PENDING if the read is still within its own deadline. */
KVX_API kvx_status  kvx_wait(kvx_queue *q, kvx_ticket t, uint32_t timeout_ms);
KVX_API int         kvx_poll(kvx_queue *q, kvx_completion *out, int max);
KVX_API kvx_status  kvx_stream_wait(kvx_queue *q, kvx_ticket t, void *cuda_stream);
/* KVX_CUDA: the address (for kernels and the host) of the completion word of
   t's slot, (ticket << 2) | state with state 0 pending, 1 done, 2 failed;
   NULL without KVX_CUDA or before the queue has words. See kvx_cuda.h. */
KVX_API const volatile uint64_t *kvx_stream_status_ptr(kvx_queue *q, kvx_ticket t);

/* Owner side: declare that a notify id should arrive within timeout_ms; if it
   does not, an expired notification is delivered instead (exactly one of the two). */
KVX_API kvx_status  kvx_notify_expect(kvx_ctx *ctx, uint64_t id, uint32_t timeout_ms);
/* The same, and if it expires (the reader never said it is done), the lease's
   blocks of cache are retired (kvx_blocks_retire): a reader that comes late
   gets KVX_ERR_STALE, never the next request's bytes. */
KVX_API kvx_status  kvx_notify_expect_retire(kvx_ctx *ctx, uint64_t id, uint32_t timeout_ms,
                                             kvx_cache *cache, const uint32_t *ids, uint32_t n);
/* A lease that counts its readers: readers reads (of several decode ranks,
   say) notify id, and each notification is delivered as it comes; the lease
   ends when all of them came, or at timeout_ms, when one expired
   notification stands for every reader that did not come (and, with a
   cache, its blocks are retired). The others count one reader each
   (readers 0 is 1). A reader that comes twice counts twice. */
KVX_API kvx_status  kvx_notify_expect_readers(kvx_ctx *ctx, uint64_t id, uint32_t readers, uint32_t timeout_ms,
                                              kvx_cache *cache, const uint32_t *ids, uint32_t n);
KVX_API int         kvx_notifications(kvx_ctx *ctx, kvx_notification *out, int max);
KVX_API int         kvx_progress(kvx_ctx *ctx);
KVX_API void        kvx_stats_get(const kvx_ctx *ctx, kvx_stats *out);
#define kvx_stats(ctx, out) kvx_stats_get((ctx), (out))
/* Every field of every public struct above and each struct's size, as this
   build lays them out (a static table; *count gets its length): a binding
   compares its mirrors field by field at load, where a size check alone
   passes two fields of one size swapped. */
KVX_API const kvx_abi_field *kvx_abi_fields(uint32_t *count);

#ifdef __cplusplus
}
#endif
#endif /* KVX_INCLUDED */

/*=========================================================================*/
/* IMPLEMENTATION                                                          */
/*=========================================================================*/
#if defined(KVX_IMPLEMENTATION) && !defined(KVX__IMPLEMENTED)
#define KVX__IMPLEMENTED


#include <errno.h>
#include <fnmatch.h>
#include <poll.h>
#include <signal.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* All of the allocator or none of it: a partial set would mix allocators. */
#if defined(KVX_MALLOC) && defined(KVX_REALLOC) && defined(KVX_FREE)
#elif !defined(KVX_MALLOC) && !defined(KVX_REALLOC) && !defined(KVX_FREE)
#  define KVX_MALLOC(sz) malloc(sz)
#  define KVX_REALLOC(p, sz) realloc((p), (sz))
#  define KVX_FREE(p) free(p)
#else
#  error "kvx: define all of KVX_MALLOC, KVX_REALLOC and KVX_FREE, or none"
#endif
/* Thread-local storage, for the creation error of each thread. */
#if defined(__cplusplus)
#  define KVX__TLS thread_local
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#  define KVX__TLS _Thread_local
#else
#  define KVX__TLS __thread
#endif
#ifndef KVX_ASSERT
#  include <assert.h>
#  define KVX_ASSERT(c) assert(c)
#endif

#if defined(KVX_STATIC) && defined(__GNUC__)
#  define KVX__PRIV static __attribute__((unused))
#else
#  define KVX__PRIV static
#endif
/* Internal functions some configurations leave unused (the wire formats of
   a backend that is not compiled in). */
#if defined(__GNUC__)
#  define KVX__PRIV_MAYBE static __attribute__((unused))
#else
#  define KVX__PRIV_MAYBE static
#endif

/* Backend tables name each field (designated initializers). C++ has them
   from C++20 on, in declaration order: before that the tables are
   positional, and every table lists every field in that order. */
#if defined(__cplusplus) && __cplusplus < 202002L
#  define KVX__F(field)
#else
#  define KVX__F(field) .field =
#endif

#define KVX__DEFAULT_TIMEOUT_MS 30000u
#define KVX__MAX_CACHES 64u
#define KVX__MAX_NAME 64u
#define KVX__MAX_HOST 256u
#define KVX__MAX_ADDR 65536u
#define KVX__MAX_RKEY 4096u
#define KVX__MAX_REGIONS 4096u
#define KVX__MAX_LAYERS 65536u
#define KVX__NOTIFY_RING 4096u
#define KVX__NOTIFY_MSG_BYTES 104u     /* kvx_wire.h: a notification */
#define KVX__EPOCH_AHEAD_NS (600ull * 1000000000ull)  /* metadata this far ahead of the clock is refused */
#define KVX__EXPIRED_MEMORY 1024u
#define KVX__CANCEL_GRACE_MS 1000u
#define KVX__NO_CSUM 0xFFFFFFFFu
#define KVX__LREG_GEN 0xFFFFFFFEu  /* kvx__op.lreg: the queue's fetched-generation words */

/*--- internal types ------------------------------------------------------*/

/* Warnings about refused input: at most one line a second per limiter, the
   next line saying how many were held back (kvx__limit). */
typedef struct kvx__limiter { uint64_t last_ns, quiet; } kvx__limiter;

/* One registered (or, on a peer, remotely registered) memory range. */
typedef struct kvx__region {
    uint64_t addr, len;
    uint8_t *rkey;              /* packed remote key, as the backend writes it */
    uint32_t rkey_len;
    void *be;                   /* backend handle: local memh, or unpacked remote key */
} kvx__region;

/* What both a local cache and a peer's cache are: layout, planes, regions. */
typedef struct kvx__cache_info {
    uint32_t id;
    kvx_layout lay;             /* defaults filled in */
    kvx_mem mem;
    int device;
    uint64_t block_bytes, block_stride;
    uint64_t head_stride, token_stride; /* HND: head to head, NHD: token to token (defaults filled in) */
    uint64_t block_extent;      /* bytes from a block's first byte to past its last */
    uint32_t nplanes;
    uint64_t *plane_base;       /* nplanes */
    uint16_t *plane_region;     /* nplanes */
    uint32_t nregions;
    kvx__region *regions;
    uint32_t csum_region;       /* the checksum table's region (after the data's), or KVX__NO_CSUM */
    uint32_t *csum;             /* local host caches: the table, [layer][plane][block][head] */
    uint32_t gen_region;        /* the generation table's region (the last), or KVX__NO_CSUM */
    volatile uint64_t *gen;     /* local caches: the table, a word per block, in host memory
                                   (with gen_alloc: its host shadow, the table at gen_dev) */
    uint64_t gen_dev;
    uint64_t csum_dev;          /* local GPU caches: the same table in device memory (kvx_cuda.h) */
    /* a peer's cache: how the backend reads it, set at connect */
    uint32_t be_flags;          /* the backend's own */
    int gather;                 /* the backend takes a block's pieces as one op (kvx__op.count) */
} kvx__cache_info;

struct kvx_cache {
    kvx_ctx *ctx;
    kvx__cache_info info;
    uint64_t *seen;             /* one bit per block: duplicate ids in a read (used under ctx->lock) */
};

/* A contiguous transfer: the unit a backend posts. */
typedef struct kvx__op {
    uint64_t laddr, raddr, len;
    uint32_t lreg, rreg;        /* region indices, local cache and remote cache */
    uint32_t count;             /* pieces of len bytes, the next at +lstride here and +rstride there; */
    uint64_t lstride, rstride;  /* more than 1 only from a cache with kvx__cache_info.gather */
} kvx__op;

/* Per-block piece geometry of a read (head-range intersection). */
typedef struct kvx__geom {
    uint64_t loff, roff;        /* first piece's offset inside a block */
    uint64_t piece;             /* bytes per piece */
    uint64_t lpstride, rpstride;/* piece to piece inside a block (NHD: a token) */
    uint32_t npieces;
    int run_merge;              /* 1: a run of consecutive blocks is one contiguous piece */
} kvx__geom;

typedef struct kvx__run { uint32_t l, r, n; } kvx__run;

/* The registered region an op lands in (backends use it for its key). */
#define KVX__OP_LREGION(rd, op) ((op)->lreg == KVX__LREG_GEN ? &(rd)->q->gland_reg : &(rd)->lc->regions[(op)->lreg])

typedef struct kvx__read kvx__read;

struct kvx_peer {
    kvx_ctx *ctx;
    kvx_peer *next;
    char name[KVX__MAX_NAME];
    char host[KVX__MAX_HOST];
    int rank, tp_size;
    uint32_t pid;
    uint64_t epoch;
    uint8_t secret[16];         /* the peer's: what every request and notification to it carries */
    uint8_t *addr;              /* backend address */
    uint32_t addr_len;
    uint32_t ncaches;
    kvx__cache_info *caches;
    char transport[160];
    char why[384];              /* why the transport library chose it, where the backend can tell */
    int connected;
    int failed;                 /* the transport reported the peer dead */
    uint32_t ops_out;           /* transport operations outstanding to this peer */
    void *be;
    uint32_t be_flags;          /* the backend's own, per peer */
};

struct kvx__read {
    kvx_ticket ticket;
    kvx_queue *q;
    kvx_peer *peer;
    const kvx__cache_info *lc, *rc;
    kvx__geom g;
    uint32_t layer_begin, layer_end;
    uint32_t run0, nruns;       /* runs in the queue's ring */
    /* cursor over (plane, run, block-in-run, piece) of ops not yet issued */
    uint32_t c_plane, c_run, c_blk, c_piece;
    uint32_t p_end;             /* the data cursor's end plane: one past plane c_plane's first when planes merge */
    /* verified reads: heads taken, and a second cursor over sampled blocks */
    uint32_t verify, h_a, h_b, h_l0, h_r0;
    int gather;                 /* a block's pieces go as one op (the peer gathers; fixed at post) */
    int whole;                  /* went as one backend operation (post_read): its completion stands for all ops */
    uint32_t v_plane, v_run, v_blk, v_idx;
    /* reads with generations: phase 1 once the data has landed, then a
       cursor over runs; the expected words in the queue's ring */
    int gen, gen_phase;
    uint32_t g_run, g_idx;      /* the fetch's cursor: run, and blocks before it */
    uint32_t g0, ngen;          /* its words in the queue's rings; ngen counts a skipped tail too */
    uint64_t ops_total, ops_issued, ops_done;
    uint32_t ops_out;
    uint64_t bytes, bytes_done;
    uint64_t deadline_ns, t_post_ns;
    kvx_status status;          /* KVX_PENDING until final */
    int issuing_done;           /* cursor exhausted (or stopped by failure) */
    int done, consumed, in_use;
    int notify;
    int notify_inflight;
    uint64_t notify_id, user_tag;
    uint8_t notify_msg[KVX__NOTIFY_MSG_BYTES];
    void *be;                   /* backend per-read scratch */
    char why[224];              /* a failed read's sentence, for kvx_completion.error */
};

struct kvx_queue {
    kvx_ctx *ctx;
    kvx_queue *next;
    uint32_t depth, max_ops, max_runs;
    kvx__read *slots;
    kvx_ticket next_ticket;
    kvx_ticket run_tail;                /* oldest read still holding runs; reads not fully issued are >= it */
    kvx__run *runs;
    uint32_t run_head, run_used;        /* ring of merged runs, released in ticket order */
    /* Block generations: the words each read expects and, beside them, the
       owner's as fetched (registered: a read's own landing place, so reads
       of one block from several owners cannot mix), max_runs of each,
       taken contiguously per read and released with the runs. */
    uint64_t *gens, *gland;
    kvx__region gland_reg;
    uint32_t gen_head, gen_used;
    kvx_ticket *done_fifo;
    uint32_t done_head, done_count;
    uint32_t ops_out;
    pthread_cond_t cond;
    void *cuda_stream;
    void *be;
    void *stream;               /* kvx_cuda.h: completion words of this queue */
};

typedef struct kvx__backend kvx__backend;
/* A lease: readers notifications of id by the deadline. Arrivals wait in
   ranks until the ring has room; the lease ends once every reader's
   arrival, or its expiry, is delivered. */
typedef struct kvx__expect {
    uint64_t id, deadline_ns;
    uint32_t readers, got, delivered;
    int expired;
    int *ranks;                 /* the readers that arrived, in order: rank, tp size */
    kvx_cache *retire;          /* kvx_notify_expect_retire: its blocks, retired at expiry */
    uint32_t *ids, nids;
} kvx__expect;

struct kvx_ctx {
    char policy[256];           /* kvx_ctx_desc.transport_policy as in effect ("" : any) */
    char name[KVX__MAX_NAME];
    char host[KVX__MAX_HOST];
    int rank, tp_size;
    uint64_t epoch;
    uint8_t secret[16];         /* with the epoch: holding it is what entitles a peer to read */
    uint8_t *md_key;            /* the deployment key (kvx_ctx_desc.metadata_key), or NULL */
    uint32_t md_key_len;
    char md_key_from[160];      /* where the key came from, for messages */
    kvx__limiter lim_dropped, lim_late;   /* warnings about refused input, at most one a second */
    uint32_t timeout_ms;
    kvx_log_level log_level;
    kvx_log_fn log_fn;
    void *log_user;
    const kvx__backend *be_ops;
    void *be;
    pthread_mutex_t lock;
    kvx_cache *caches[KVX__MAX_CACHES];
    uint32_t ncaches;
    kvx_peer *peers;
    kvx_queue *queues;
    char err[512];
    /* A full queue's sentence, written into err only when kvx_ctx_error is
       called: backpressure is the fast path of a busy engine, and formatting
       costs more than the post that found no room (kvx__full). */
    int full_kind;              /* 0: err is current; else which queue resource was full */
    uint32_t full_a, full_b;
    kvx_stats st;
    /* notifications received, waiting for kvx_notifications */
    kvx_notification notes[KVX__NOTIFY_RING];
    uint32_t note_head, note_count;
    uint64_t notes_dropped;
    /* expected notify ids */
    kvx__expect *expect;
    uint32_t nexpect, expect_cap;
    uint64_t expired[KVX__EXPIRED_MEMORY];
    uint32_t expired_head;
    /* progress thread */
    int pt_on, pt_stop;
    uint64_t pt_until;          /* what the progress thread sleeps to, while it sleeps (0: awake) */
    pthread_t pt;
    int wake_pipe[2];
};

/* The backend contract: each backend (kvx_ucx.h, kvx_ofi.h, kvx_cuda.h,
   kvx_local.h) fills one table with designated initializers, and the core
   reaches it only through this table. The core calls it with ctx->lock held
   unless an entry says otherwise; the backend reports back through
   kvx__op_done(), kvx__notify_arrived(), kvx__notify_sent() and
   kvx__peer_failed(). Entries marked optional may be NULL. */
struct kvx__backend {
    const char *name;
    kvx_backend kind;
    /* Reads finish on the GPU in stream order (their completion words are
       written by the device): no host flush of network writes is needed. */
    int completes_on_gpu;
    /* One registration of GPU memory may span several device allocations
       (the CUDA backend exports each one it finds). Elsewhere a transport's
       key names one allocation, so GPU planes that merely touch (separate
       allocations can be adjacent) stay separate registrations. */
    int gpu_region_spans_allocations;
    /* A registration's remote key is what peers read it by, so registering
       the memory again (kvx_ctx_rotate) revokes what old metadata held. */
    int keys_per_registration;
    /* A posted op goes on without this context's progress (another thread
       or the device moves it, and its completion wakes the event fd): a
       post wakes a sleeping progress thread only for a deadline earlier
       than it sleeps to. Elsewhere every post wakes it. */
    int issues_without_progress;

    /*-- context */
    kvx_status (*open)(kvx_ctx *ctx, const kvx_ctx_desc *desc);   /* without the lock */
    void (*close)(kvx_ctx *ctx);                                  /* without the lock */
    /* Optional: fill out's backend sub-struct with the settings in effect. */
    void (*query)(const kvx_ctx *ctx, kvx_ctx_desc *out);
    /* The bytes a peer needs to reach this context (published in metadata). */
    kvx_status (*address)(kvx_ctx *ctx, const uint8_t **addr, uint32_t *len);

    /*-- memory */
    kvx_status (*mem_register)(kvx_ctx *ctx, const kvx__cache_info *ci, kvx__region *r);
    void (*mem_deregister)(kvx_ctx *ctx, kvx__region *r);

    /*-- peers */
    /* Make the peer usable: endpoint, remote keys, p->transport. */
    kvx_status (*connect)(kvx_ctx *ctx, kvx_peer *p);
    /* Close by force: when it returns, no operation to p can write any more,
       and every outstanding one has been reported to kvx__op_done. */
    void (*disconnect)(kvx_ctx *ctx, kvx_peer *p);
    /* Optional: can this backend read remote cache rc of p into local cache
       lc? Asked at kvx_post, before anything is issued; NULL: always. */
    kvx_status (*can_read)(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc);

    /*-- queues */
    kvx_status (*queue_open)(kvx_queue *q);   /* optional: per-queue state in q->be */
    void (*queue_close)(kvx_queue *q);        /* optional, without the lock; also after a failed queue_open */

    /*-- reads */
    /* One op. KVX_OK: issued (completion comes through kvx__op_done);
       KVX_PENDING: no room now, try after progress; an error: nothing was
       issued. NULL only where post_read takes every read. */
    kvx_status (*post)(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op);
    /* Optional: the whole read as one operation (its merged runs of block
       ids, q->runs from rd->run0), instead of post per op; same returns.
       Its one completion through kvx__op_done stands for all of the read's
       ops. */
    kvx_status (*post_read)(kvx_ctx *ctx, kvx__read *rd);
    /* Optional: called after kvx__pump issued ops of a queue, so a backend
       that batches (the CUDA copy kernel) can launch the batch. */
    void (*flush)(kvx_ctx *ctx, kvx_queue *q);
    /* Optional: end a read's outstanding ops without closing its peer,
       where the backend can promise none of their bytes lands after (kvx's
       own UCX get: their ids die); each is reported to kvx__op_done. */
    void (*abandon)(kvx_ctx *ctx, kvx__read *rd);
    /* Send rd->notify_msg to rd->peer; completion clears rd->notify_inflight
       through kvx__notify_sent. */
    kvx_status (*notify)(kvx_ctx *ctx, kvx__read *rd);

    /*-- progress */
    int (*progress)(kvx_ctx *ctx);
    int (*event_fd)(kvx_ctx *ctx);
    /* KVX_OK: nothing pending, safe to sleep on event_fd; KVX_PENDING: progress again. */
    kvx_status (*arm)(kvx_ctx *ctx);
    void (*signal)(kvx_ctx *ctx);                 /* optional: wake a sleeper on event_fd */

    /*-- checksums of memory the host cannot read (optional; verify mode on
         such caches is refused without them) */
    kvx_status (*csum_alloc)(kvx_ctx *ctx, kvx__cache_info *ci, uint64_t bytes);
    void (*csum_free)(kvx__cache_info *ci);
    kvx_status (*csum_seal)(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *blocks, uint32_t n);
    kvx_status (*csum_verify)(kvx__read *rd);

    /*-- block generations in memory the transport reads as the cache's kind
       (optional; NULL: a host table that the backend reads with its ops) */
    /* Allocate the table (bytes, zeroed) in the cache's memory: ci->gen_dev. */
    kvx_status (*gen_alloc)(kvx_ctx *ctx, kvx__cache_info *ci, uint64_t bytes);
    void (*gen_free)(kvx__cache_info *ci);
    /* Copy words [first, first + n) of the host shadow ci->gen to the table. */
    kvx_status (*gen_store)(kvx_ctx *ctx, const kvx__cache_info *ci, uint32_t first, uint32_t n);
    /* Once a read's data has landed: the owner's words of its remote blocks,
       read after the data by the backend itself, into the read's words of
       the queue's landing ring (q->gland + rd->g0). */
    kvx_status (*gen_fetch)(kvx__read *rd);
};

/* Stream-ordered completion: a service beside every backend (kvx_gpu.h,
   with KVX_CUDA). The core tells it when a queue is made or destroyed and
   when a read is posted or becomes final; absent, kvx_stream_wait refuses. */
typedef struct kvx__stream_service {
    kvx_status (*queue_init)(kvx_queue *q);       /* with the lock, after the backend's queue_open */
    void (*queue_fini)(kvx_queue *q);             /* without the lock, after the backend's queue_close */
    void (*read_posted)(kvx__read *rd);           /* re-arm the slot's word before anything can complete */
    void (*read_final)(kvx__read *rd);
    kvx_status (*wait)(kvx_queue *q, kvx_ticket t, void *stream);
    const volatile uint64_t *(*status_ptr)(kvx_queue *q, kvx_ticket t);
} kvx__stream_service;

KVX__PRIV void kvx__op_done(kvx__read *rd, kvx_status st, const char *why);
KVX__PRIV kvx_status kvx__layout_check(kvx_ctx *ctx, kvx_layout *l, int tp_size, const char *who);
KVX__PRIV kvx_status kvx__strides_check(kvx_ctx *ctx, kvx__cache_info *c, const char *who);
KVX__PRIV kvx_status kvx__planes_locate(kvx_ctx *ctx, kvx__cache_info *c, const char *who);
KVX__PRIV void kvx__notify_arrived(kvx_ctx *ctx, const uint8_t *msg, size_t len);
KVX__PRIV void kvx__notify_sent(kvx__read *rd);
KVX__PRIV void kvx__peer_failed(kvx_peer *p, const char *why);
KVX__PRIV kvx_status kvx__fail(kvx_ctx *ctx, kvx_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
KVX__PRIV void kvx__log(kvx_ctx *ctx, kvx_log_level lvl, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* One branch when the level is off: nothing is formatted. */
#define KVX__LOG(ctx, lvl, ...) do { if ((int)(lvl) <= (int)(ctx)->log_level) kvx__log((ctx), (lvl), __VA_ARGS__); } while (0)
KVX__PRIV void kvx__log_held(kvx_ctx *ctx, uint64_t held, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* A message from the network dropped unanswered: counted, and said at most
   once a second (the line after a quiet spell says how many were held back),
   so that a flood costs a counter, not a log; KVX__WARN_HELD says refused
   input the same way without counting it. Called with ctx->lock held. */
#define KVX__WARN_HELD(ctx, ...) do { uint64_t held_; \
    if ((int)KVX_LOG_WARN <= (int)(ctx)->log_level && kvx__limit(&(ctx)->lim_dropped, kvx__now_ns(), &held_)) \
        kvx__log_held((ctx), held_, __VA_ARGS__); } while (0)
#define KVX__DROP(ctx, ...) do { (ctx)->st.messages_dropped++; KVX__WARN_HELD(ctx, __VA_ARGS__); } while (0)

/*--- small utilities -----------------------------------------------------*/

KVX__PRIV uint64_t kvx__now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* 1: log now, *quiet lines were held back since the last; 0: hold this one back. */
KVX__PRIV int kvx__limit(kvx__limiter *l, uint64_t now_ns, uint64_t *quiet) {
    if (l->last_ns && now_ns - l->last_ns < 1000000000ull) { l->quiet++; return 0; }
    l->last_ns = now_ns ? now_ns : 1;
    *quiet = l->quiet;
    l->quiet = 0;
    return 1;
}

KVX__PRIV void *kvx__calloc(size_t n, size_t sz) {
    void *p;
    if (sz && n > SIZE_MAX / sz) return NULL;
    p = KVX_MALLOC(n * sz > 0 ? n * sz : 1);
    if (p) memset(p, 0, n * sz);
    return p;
}

KVX__PRIV void kvx__strlcpy(char *dst, const char *src, size_t cap) {
    size_t n = src ? strlen(src) : 0;
    if (n >= cap) n = cap - 1;
    if (n) memcpy(dst, src, n);
    dst[n] = 0;
}

/* CRC-32C (Castagnoli), bitwise: metadata blobs are small. */
KVX__PRIV uint32_t kvx__crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    size_t i;
    int k;
    crc = ~crc;
    for (i = 0; i < n; i++) {
        crc ^= p[i];
        for (k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

KVX__PRIV void kvx__log(kvx_ctx *ctx, kvx_log_level lvl, const char *fmt, ...) {
    static const char *names[] = {"", "", "error", "warn", "info", "debug"};
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ctx->log_fn) ctx->log_fn(lvl, msg, ctx->log_user);
    else fprintf(stderr, "kvx[%s/%d] %s: %s\n", ctx->name, ctx->rank, names[lvl], msg);
}

KVX__PRIV void kvx__log_held(kvx_ctx *ctx, uint64_t held, const char *fmt, ...) {
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (held) kvx__log(ctx, KVX_LOG_WARN, "%s (and %llu more like it dropped since the last such line)", msg, (unsigned long long)held);
    else kvx__log(ctx, KVX_LOG_WARN, "%s", msg);
}

KVX__PRIV kvx_status kvx__fail(kvx_ctx *ctx, kvx_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    va_end(ap);
    ctx->full_kind = 0;  /* this sentence replaces a deferred one */
    if (st == KVX_PENDING) return st;  /* backpressure, not an error */
    ctx->st.errors++;
    /* The caller has it (the status, and kvx_ctx_error's sentence): said
       again only where asked for. What nobody is handed is logged where it
       happens, at KVX_LOG_WARN or KVX_LOG_ERROR. */
    KVX__LOG(ctx, KVX_LOG_INFO, "%s: %s", kvx_status_name(st), ctx->err);
    return st;
}

/* kvx_ctx_create has no context to hold its error: kvx_ctx_error(NULL) reads
   this thread's. */
static KVX__TLS char kvx__create_err[512];

KVX_API const char *kvx_status_name(kvx_status s) {
    switch (s) {
    case KVX_OK: return "KVX_OK";
    case KVX_PENDING: return "KVX_PENDING";
    case KVX_ERR_ARG: return "KVX_ERR_ARG";
    case KVX_ERR_NOMEM: return "KVX_ERR_NOMEM";
    case KVX_ERR_UNSUPPORTED: return "KVX_ERR_UNSUPPORTED";
    case KVX_ERR_MISMATCH: return "KVX_ERR_MISMATCH";
    case KVX_ERR_BACKEND: return "KVX_ERR_BACKEND";
    case KVX_ERR_PEER: return "KVX_ERR_PEER";
    case KVX_ERR_TIMEOUT: return "KVX_ERR_TIMEOUT";
    case KVX_ERR_CORRUPT: return "KVX_ERR_CORRUPT";
    case KVX_ERR_CANCELED: return "KVX_ERR_CANCELED";
    case KVX_ERR_STALE: return "KVX_ERR_STALE";
    }
    return "KVX_ERR_UNKNOWN";
}

KVX_API const char *kvx_backend_name(kvx_backend b) {
    switch (b) {
    case KVX_BACKEND_DEFAULT: return "default";
    case KVX_BACKEND_UCX: return "ucx";
    case KVX_BACKEND_OFI: return "ofi";
    case KVX_BACKEND_CUDA: return "cuda";
    case KVX_BACKEND_LOCAL: return "local";
    }
    return "unknown";
}

KVX__PRIV uint32_t kvx__dtype_bytes(kvx_dtype d) {
    switch (d) {
    case KVX_DTYPE_F16: case KVX_DTYPE_BF16: case KVX_DTYPE_U16: return 2;
    case KVX_DTYPE_F32: return 4;
    case KVX_DTYPE_F8_E4M3: case KVX_DTYPE_F8_E5M2: case KVX_DTYPE_I8: case KVX_DTYPE_U8: return 1;
    case KVX_DTYPE_F64: return 8;
    case KVX_DTYPE_UNSPECIFIED: return 0;
    }
    return 0;
}

KVX_API const char *kvx_dtype_name(kvx_dtype d) {
    switch (d) {
    case KVX_DTYPE_UNSPECIFIED: return "unspecified";
    case KVX_DTYPE_F16: return "f16";
    case KVX_DTYPE_BF16: return "bf16";
    case KVX_DTYPE_F32: return "f32";
    case KVX_DTYPE_F8_E4M3: return "f8e4m3";
    case KVX_DTYPE_F8_E5M2: return "f8e5m2";
    case KVX_DTYPE_I8: return "i8";
    case KVX_DTYPE_U8: return "u8";
    case KVX_DTYPE_F64: return "f64";
    case KVX_DTYPE_U16: return "u16";
    }
    return "unknown";
}

/* A post found the queue full: the status says it; the sentence waits
   until kvx_ctx_error asks (a later failure's sentence replaces it). */
enum { KVX__FULL_SLOTS = 1, KVX__FULL_RUNS, KVX__FULL_GENS };
KVX__PRIV kvx_status kvx__full(kvx_ctx *ctx, int kind, uint32_t a, uint32_t b) {
    ctx->full_kind = kind;
    ctx->full_a = a;
    ctx->full_b = b;
    return KVX_PENDING;
}

KVX_API const char *kvx_ctx_error(const kvx_ctx *ctx) {
    kvx_ctx *c = (kvx_ctx *)(uintptr_t)ctx;  /* the deferred sentence is written once, on the first ask */
    if (!ctx) return kvx__create_err;
    switch (c->full_kind) {
    case KVX__FULL_SLOTS:
        snprintf(c->err, sizeof c->err, "kvx_post: queue full: %u reads not yet reported (kvx_poll, kvx_test or kvx_wait them)", c->full_a);
        break;
    case KVX__FULL_RUNS:
        snprintf(c->err, sizeof c->err, "kvx_post: queue full: %u of %u run slots held by reads in flight", c->full_a, c->full_b);
        break;
    case KVX__FULL_GENS:
        snprintf(c->err, sizeof c->err, "kvx_post: queue full: %u of %u generation slots held by reads in flight", c->full_a, c->full_b);
        break;
    default:
        break;
    }
    c->full_kind = 0;
    return c->err;
}

/* The table of kvx_abi_fields: each struct's size, then its fields in
   declaration order. */
#define KVX__ABI_SIZE_OF(name, sz) { name, NULL, 0, sz }
#define KVX__ABI_SIZE(T) KVX__ABI_SIZE_OF(#T, sizeof(T))
#define KVX__ABI(T, f) { #T, #f, offsetof(T, f), sizeof(((T *)0)->f) }

KVX_API const kvx_abi_field *kvx_abi_fields(uint32_t *count) {
    static const kvx_abi_field table[] = {
        KVX__ABI_SIZE(kvx_ofi_desc),
        KVX__ABI(kvx_ofi_desc, provider), KVX__ABI(kvx_ofi_desc, extra_caps), KVX__ABI(kvx_ofi_desc, hmem),
        KVX__ABI(kvx_ofi_desc, max_msg), KVX__ABI(kvx_ofi_desc, tick_us),
        KVX__ABI_SIZE(kvx_ucx_desc),
        KVX__ABI(kvx_ucx_desc, net_devices), KVX__ABI(kvx_ucx_desc, software_rma),
        KVX__ABI_SIZE(kvx_cuda_desc),
        KVX__ABI(kvx_cuda_desc, max_blocks), KVX__ABI(kvx_cuda_desc, socket_dir),
        KVX__ABI_SIZE(kvx_ctx_desc),
        KVX__ABI(kvx_ctx_desc, name), KVX__ABI(kvx_ctx_desc, tp_rank), KVX__ABI(kvx_ctx_desc, tp_size),
        KVX__ABI(kvx_ctx_desc, backend), KVX__ABI(kvx_ctx_desc, timeout_ms), KVX__ABI(kvx_ctx_desc, progress_thread),
        KVX__ABI(kvx_ctx_desc, host_id), KVX__ABI(kvx_ctx_desc, log_level), KVX__ABI(kvx_ctx_desc, log_fn),
        KVX__ABI(kvx_ctx_desc, log_user), KVX__ABI(kvx_ctx_desc, ofi), KVX__ABI(kvx_ctx_desc, cuda),
        KVX__ABI(kvx_ctx_desc, transport_policy), KVX__ABI(kvx_ctx_desc, ucx), KVX__ABI(kvx_ctx_desc, metadata_key),
        KVX__ABI(kvx_ctx_desc, metadata_key_len),
        KVX__ABI_SIZE(kvx_layout),
        KVX__ABI(kvx_layout, num_layers), KVX__ABI(kvx_layout, num_blocks), KVX__ABI(kvx_layout, block_tokens),
        KVX__ABI(kvx_layout, num_heads), KVX__ABI(kvx_layout, head_dim), KVX__ABI(kvx_layout, elem_bytes),
        KVX__ABI(kvx_layout, order), KVX__ABI(kvx_layout, total_heads), KVX__ABI(kvx_layout, kv_planes),
        KVX__ABI(kvx_layout, dtype),
        KVX__ABI_SIZE(kvx_cache_desc),
        KVX__ABI(kvx_cache_desc, layout), KVX__ABI(kvx_cache_desc, mem), KVX__ABI(kvx_cache_desc, device),
        KVX__ABI(kvx_cache_desc, bases), KVX__ABI(kvx_cache_desc, pool), KVX__ABI(kvx_cache_desc, layer_stride),
        KVX__ABI(kvx_cache_desc, plane_stride), KVX__ABI(kvx_cache_desc, block_stride),
        KVX__ABI(kvx_cache_desc, head_stride), KVX__ABI(kvx_cache_desc, token_stride),
        KVX__ABI(kvx_cache_desc, checksums), KVX__ABI(kvx_cache_desc, generations),
        KVX__ABI_SIZE(kvx_queue_desc),
        KVX__ABI(kvx_queue_desc, depth), KVX__ABI(kvx_queue_desc, max_ops), KVX__ABI(kvx_queue_desc, max_runs),
        KVX__ABI(kvx_queue_desc, cuda),
        /* the unnamed struct of kvx_queue_desc.cuda: offsets within it */
        KVX__ABI_SIZE_OF("kvx_queue_desc.cuda", sizeof(((kvx_queue_desc *)0)->cuda)),
        { "kvx_queue_desc.cuda", "stream", offsetof(kvx_queue_desc, cuda.stream) - offsetof(kvx_queue_desc, cuda),
          sizeof(((kvx_queue_desc *)0)->cuda.stream) },
        KVX__ABI_SIZE(kvx_read),
        KVX__ABI(kvx_read, peer), KVX__ABI(kvx_read, cache), KVX__ABI(kvx_read, remote_cache),
        KVX__ABI(kvx_read, local_blocks), KVX__ABI(kvx_read, remote_blocks), KVX__ABI(kvx_read, num_blocks),
        KVX__ABI(kvx_read, layer_begin), KVX__ABI(kvx_read, layer_count), KVX__ABI(kvx_read, notify),
        KVX__ABI(kvx_read, notify_id), KVX__ABI(kvx_read, user_tag), KVX__ABI(kvx_read, timeout_ms),
        KVX__ABI(kvx_read, verify), KVX__ABI(kvx_read, remote_generations),
        KVX__ABI_SIZE(kvx_completion),
        KVX__ABI(kvx_completion, ticket), KVX__ABI(kvx_completion, user_tag), KVX__ABI(kvx_completion, status),
        KVX__ABI(kvx_completion, bytes), KVX__ABI(kvx_completion, error),
        KVX__ABI_SIZE(kvx_notification),
        KVX__ABI(kvx_notification, id), KVX__ABI(kvx_notification, status), KVX__ABI(kvx_notification, peer_rank),
        KVX__ABI(kvx_notification, peer_tp_size),
        KVX__ABI_SIZE(kvx_stats),
        KVX__ABI(kvx_stats, backend), KVX__ABI(kvx_stats, bytes_read), KVX__ABI(kvx_stats, reads_posted),
        KVX__ABI(kvx_stats, reads_completed), KVX__ABI(kvx_stats, reads_failed), KVX__ABI(kvx_stats, descs_posted),
        KVX__ABI(kvx_stats, descs_completed), KVX__ABI(kvx_stats, blocks_posted),
        KVX__ABI(kvx_stats, notifications_sent), KVX__ABI(kvx_stats, notifications_received),
        KVX__ABI(kvx_stats, errors), KVX__ABI(kvx_stats, messages_dropped),
        KVX__ABI(kvx_stats, notifications_dropped),
        KVX__ABI_SIZE(kvx_abi_field),
        KVX__ABI(kvx_abi_field, type), KVX__ABI(kvx_abi_field, field), KVX__ABI(kvx_abi_field, offset),
        KVX__ABI(kvx_abi_field, size),
    };
    if (count)
        *count = (uint32_t)(sizeof table / sizeof table[0]);
    return table;
}

#include "kvx_auth.h"
#include "kvx_wire.h"
#include "kvx_verify.h"

/* The enabled backends and services: each backend adds one kvx__backend,
   so adding one is one file and one line in each list here. kvx_gpu.h (the
   device table and stream-ordered completion) serves every backend. */
#if defined(KVX_CUDA)
#  include "kvx_gpu.h"
#  define KVX__STREAM_SERVICE (&kvx__gpu_streams)
#endif
#if defined(KVX_UCX)
#  include "kvx_ucx.h"
#endif
#if defined(KVX_OFI)
#  include "kvx_ofi.h"
#endif
#if defined(KVX_CUDA)
#  include "kvx_cuda.h"
#endif
#include "kvx_local.h"

/* KVX_BACKEND_DEFAULT takes the first network backend here; local only when asked for. */
KVX__PRIV const kvx__backend *kvx__backends[] = {
#if defined(KVX_UCX)
    &kvx__ucx_backend,
#endif
#if defined(KVX_OFI)
    &kvx__ofi_backend,
#endif
#if defined(KVX_CUDA)
    &kvx__cuda_backend,
#endif
    &kvx__local_backend,
    NULL
};
#if !defined(KVX__STREAM_SERVICE)
#  define KVX__STREAM_SERVICE NULL
#endif
/* Not const: C++ would flag a test of a constant address. */
KVX__PRIV const kvx__stream_service *kvx__stream = KVX__STREAM_SERVICE;

/*--- layouts and tensor-parallel head ranges -----------------------------*/

KVX__PRIV uint32_t kvx__planes(const kvx_layout *l) { return l->kv_planes ? l->kv_planes : 2u; }

/* Fill defaults and check that the layout is usable at this tp rank/size. */
KVX__PRIV kvx_status kvx__layout_check(kvx_ctx *ctx, kvx_layout *l, int tp_size, const char *who) {
    uint64_t bb;
    if (!l->num_layers || !l->num_blocks || !l->block_tokens || !l->num_heads || !l->head_dim || !l->elem_bytes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: layout needs num_layers, num_blocks, block_tokens, num_heads, head_dim and elem_bytes, all non-zero (got %u, %u, %u, %u, %u, %u)",
                         who, l->num_layers, l->num_blocks, l->block_tokens, l->num_heads, l->head_dim, l->elem_bytes);
    if (l->num_layers > KVX__MAX_LAYERS)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u layers, at most %u", who, l->num_layers, KVX__MAX_LAYERS);
    if (l->order != KVX_ORDER_HND && l->order != KVX_ORDER_NHD)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: order %d is neither HND nor NHD", who, (int)l->order);
    if (l->kv_planes > 2) return kvx__fail(ctx, KVX_ERR_ARG, "%s: kv_planes %u, must be 1 or 2", who, l->kv_planes);
    if (l->dtype != KVX_DTYPE_UNSPECIFIED && kvx__dtype_bytes(l->dtype) != l->elem_bytes)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: dtype %s (%d) is %u bytes, elem_bytes says %u", who, kvx_dtype_name(l->dtype), (int)l->dtype,
                         kvx__dtype_bytes(l->dtype), l->elem_bytes);
    l->kv_planes = kvx__planes(l);
    if (!l->total_heads) l->total_heads = l->num_heads * (uint32_t)tp_size;
    if (l->total_heads >= (uint32_t)tp_size) {
        if (l->total_heads % (uint32_t)tp_size || l->num_heads != l->total_heads / (uint32_t)tp_size)
            return kvx__fail(ctx, KVX_ERR_MISMATCH, "%s: %u KV heads do not divide over tp_size %d into %u heads per rank",
                             who, l->total_heads, tp_size, l->num_heads);
    } else if ((uint32_t)tp_size % l->total_heads || l->num_heads != 1) {
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "%s: %u KV heads replicated over tp_size %d need tp_size a multiple of the heads and num_heads 1 (got %u)",
                         who, l->total_heads, tp_size, l->num_heads);
    }
    bb = (uint64_t)l->block_tokens * l->num_heads * l->head_dim * l->elem_bytes;
    if (bb > (1ull << 40)) return kvx__fail(ctx, KVX_ERR_ARG, "%s: block of %llu bytes is too large", who, (unsigned long long)bb);
    return KVX_OK;
}

/* The strides inside a block (0: from the order), and the bytes a block
   spans. Heads (HND) or tokens (NHD) may be spaced, but never overlap; and
   blocks either do not overlap, or (HND) nest between a head's and the
   next's, as in a [layer][head][block][token][dim] pool. */
KVX__PRIV kvx_status kvx__strides_check(kvx_ctx *ctx, kvx__cache_info *c, const char *who) {
    const kvx_layout *l = &c->lay;
    uint64_t hb = (uint64_t)l->head_dim * l->elem_bytes, run, n;
    int hnd = l->order == KVX_ORDER_HND;
    c->block_bytes = (uint64_t)l->block_tokens * l->num_heads * hb;
    if (!c->block_stride) c->block_stride = c->block_bytes;
    if (!c->head_stride) c->head_stride = hnd ? hb * l->block_tokens : hb;
    if (!c->token_stride) c->token_stride = hnd ? hb : hb * l->num_heads;
    if (hnd ? c->token_stride != hb : c->head_stride != hb)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: %s with a %s stride of %llu bytes, not the %llu of one %s: kvx reads %s", who,
                         hnd ? "HND" : "NHD", hnd ? "token" : "head", (unsigned long long)(hnd ? c->token_stride : c->head_stride),
                         (unsigned long long)hb, hnd ? "token's head_dim" : "head's head_dim",
                         hnd ? "a head's tokens packed" : "a token's heads packed");
    run = hnd ? hb * l->block_tokens : hb * l->num_heads;   /* a head's tokens, or a token's heads */
    n = hnd ? l->num_heads : l->block_tokens;               /* how many such runs in a block */
    if ((hnd ? c->head_stride : c->token_stride) < run)
        return kvx__fail(ctx, KVX_ERR_ARG, "%s: a %s stride of %llu bytes overlaps the %llu bytes of each %s", who, hnd ? "head" : "token",
                         (unsigned long long)(hnd ? c->head_stride : c->token_stride), (unsigned long long)run, hnd ? "head" : "token");
    c->block_extent = kvx__mul_sat(n - 1, hnd ? c->head_stride : c->token_stride) + run;
    if (c->block_extent < run) c->block_extent = UINT64_MAX;
    if (c->block_stride >= c->block_extent) return KVX_OK;
    if (hnd && l->num_heads > 1 && c->block_stride >= run && c->head_stride >= kvx__mul_sat(l->num_blocks, c->block_stride))
        return KVX_OK;  /* blocks between a head and the next: [head][block][token][dim] */
    return kvx__fail(ctx, KVX_ERR_ARG, "%s: block_stride %llu is less than the %llu bytes a block spans (%s stride %llu): blocks would overlap",
                     who, (unsigned long long)c->block_stride, (unsigned long long)c->block_extent, hnd ? "head" : "token",
                     (unsigned long long)(hnd ? c->head_stride : c->token_stride));
}

/* First global head held by rank; heads are replicated when fewer than tp. */
KVX__PRIV uint32_t kvx__head_first(const kvx_layout *l, int rank, int tp) {
    if (l->total_heads >= (uint32_t)tp) return (uint32_t)rank * (l->total_heads / (uint32_t)tp);
    return (uint32_t)rank / ((uint32_t)tp / l->total_heads);
}

/* Heads [*a, *b) that local rank lr (of ltp) takes from remote rank rr (of
   rtp). Where the remote side replicates a head, exactly one of its holders is
   the source for a given reader: holder (lr mod replicas), spreading readers. */
KVX__PRIV void kvx__head_range(const kvx_layout *ll, int lr, int ltp, const kvx_layout *rl, int rr, int rtp,
                               uint32_t *a, uint32_t *b) {
    uint32_t l0 = kvx__head_first(ll, lr, ltp), l1 = l0 + ll->num_heads;
    uint32_t r0 = kvx__head_first(rl, rr, rtp), r1 = r0 + rl->num_heads;
    uint32_t lo = l0 > r0 ? l0 : r0, hi = l1 < r1 ? l1 : r1;
    if (lo >= hi) { *a = *b = 0; return; }
    if (rl->total_heads < (uint32_t)rtp) {
        uint32_t reps = (uint32_t)rtp / rl->total_heads;
        if ((uint32_t)rr != r0 * reps + (uint32_t)lr % reps) { *a = *b = 0; return; }
    }
    *a = lo; *b = hi;
}

/* A block of one head with its tokens packed is the same bytes in either
   order (vLLM gives such a rank's view either name): it reads from, and
   is read into, a cache of the other order. */
KVX__PRIV int kvx__order_free(const kvx__cache_info *c) {
    return c->lay.num_heads == 1 && c->token_stride == (uint64_t)c->lay.head_dim * c->lay.elem_bytes;
}

/* Piece geometry of one block for heads [a, b): HND gives one contiguous
   slice per block; NHD one slice per token, unless all heads are taken on both
   sides, when the slices tile the block and collapse into one. Where one
   side is order-free, the other side's order sets the pieces. */
KVX__PRIV void kvx__geom_make(const kvx__cache_info *lc, uint32_t l0, const kvx__cache_info *rc, uint32_t r0,
                              uint32_t a, uint32_t b, kvx__geom *g) {
    const kvx_layout *ll = &lc->lay;
    uint64_t hb = (uint64_t)ll->head_dim * ll->elem_bytes;  /* one head, one token */
    uint64_t T = ll->block_tokens;
    kvx_order order = ll->order != rc->lay.order && kvx__order_free(lc) ? rc->lay.order : ll->order;
    memset(g, 0, sizeof *g);
    if (order == KVX_ORDER_HND) {  /* a piece per head (its tokens packed), heads head_stride apart */
        g->loff = (uint64_t)(a - l0) * lc->head_stride;
        g->roff = (uint64_t)(a - r0) * rc->head_stride;
        g->piece = T * hb;
        g->lpstride = lc->head_stride;
        g->rpstride = rc->head_stride;
        g->npieces = b - a;
    } else {                           /* a piece per token (its heads a to b), tokens token_stride apart */
        g->loff = (uint64_t)(a - l0) * hb;
        g->roff = (uint64_t)(a - r0) * hb;
        g->piece = (uint64_t)(b - a) * hb;
        g->lpstride = lc->token_stride;
        g->rpstride = rc->token_stride;
        g->npieces = (uint32_t)T;
    }
    if (g->npieces > 1 && g->piece == g->lpstride && g->piece == g->rpstride) {  /* the pieces tile: one */
        g->piece *= g->npieces;
        g->npieces = 1;
        g->lpstride = g->rpstride = 0;
    }
    if (g->npieces == 1) g->lpstride = g->rpstride = 0;
    g->run_merge = g->npieces == 1 && g->piece == lc->block_stride && g->piece == rc->block_stride;
}

/*--- metadata: its format is in kvx_wire.h -------------------------------*/

KVX__PRIV void kvx__cache_info_free(kvx_ctx *ctx, kvx__cache_info *c) {
    uint32_t i;
    if (c->regions)
        for (i = 0; i < c->nregions; i++) KVX_FREE(c->regions[i].rkey);
    KVX_FREE(c->regions);
    KVX_FREE(c->plane_base);
    KVX_FREE(c->plane_region);
    KVX_FREE(c->csum);
    KVX_FREE((void *)(uintptr_t)c->gen);
    if (c->csum_dev) ctx->be_ops->csum_free(c);
    if (c->gen_dev) ctx->be_ops->gen_free(c);
    memset(c, 0, sizeof *c);
}

/* Each plane must lie inside one region; remember which. */
KVX__PRIV kvx_status kvx__planes_locate(kvx_ctx *ctx, kvx__cache_info *c, const char *who) {
    uint64_t span = kvx__mul_sat(c->lay.num_blocks - 1, c->block_stride) + c->block_extent;
    uint32_t p, i;
    for (p = 0; p < c->nplanes; p++) {
        uint64_t b = c->plane_base[p];
        for (i = 0; i < c->nregions; i++)
            if (b >= c->regions[i].addr && b - c->regions[i].addr <= c->regions[i].len &&
                span <= c->regions[i].len - (b - c->regions[i].addr)) break;
        if (i == c->nregions)
            return kvx__fail(ctx, KVX_ERR_MISMATCH, "%s: plane %u (layer %u) at 0x%llx, %llu bytes, lies in no registered region",
                             who, p, p / c->lay.kv_planes, (unsigned long long)b, (unsigned long long)span);
        c->plane_region[p] = (uint16_t)i;
    }
    return KVX_OK;
}

KVX_API kvx_status kvx_metadata(kvx_ctx *ctx, void *buf, size_t *len) {
    kvx__wbuf w;
    kvx_status st;
    if (!ctx || !len) return KVX_ERR_ARG;
    memset(&w, 0, sizeof w);
    w.p = (uint8_t *)buf;
    w.cap = buf ? *len : 0;
    pthread_mutex_lock(&ctx->lock);
    st = kvx__md_write(ctx, &w);
    pthread_mutex_unlock(&ctx->lock);
    if (st != KVX_OK) return st;
    if (buf && w.len > *len) {
        size_t need = w.len;
        *len = need;
        return kvx__fail(ctx, KVX_ERR_ARG, "metadata needs %zu bytes, buffer has %zu", need, w.cap);
    }
    *len = w.len;
    return KVX_OK;
}

/* Can a read of rc (theirs) into lc (ours) be done? Names field and both values. */
KVX__PRIV kvx_status kvx__compat(kvx_ctx *ctx, const kvx__cache_info *lc, const kvx_peer *p, const kvx__cache_info *rc) {
    const kvx_layout *a = &lc->lay, *b = &rc->lay;
#define KVX__SAME(f) \
    if (a->f != b->f) \
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "peer %s/%d cache %u: " #f " %u, ours (cache %u) %u", p->name, p->rank, rc->id, (unsigned)b->f, lc->id, (unsigned)a->f)
    KVX__SAME(num_layers);
    KVX__SAME(block_tokens);
    KVX__SAME(head_dim);
    KVX__SAME(elem_bytes);
    KVX__SAME(total_heads);
    KVX__SAME(kv_planes);
#undef KVX__SAME
    if (a->dtype && b->dtype && a->dtype != b->dtype)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "peer %s/%d cache %u: dtype %s, ours (cache %u) %s: the bytes would read as another type",
                         p->name, p->rank, rc->id, kvx_dtype_name(b->dtype), lc->id, kvx_dtype_name(a->dtype));
    if (a->order != b->order && !kvx__order_free(lc) && !kvx__order_free(rc))
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "peer %s/%d cache %u: order %s, ours (cache %u) %s", p->name, p->rank, rc->id,
                         b->order == KVX_ORDER_HND ? "HND" : "NHD", lc->id, a->order == KVX_ORDER_HND ? "HND" : "NHD");
    return KVX_OK;
}

/*--- context -------------------------------------------------------------*/


KVX__PRIV void kvx__host_identity(char *out, size_t cap, const char *given) {
    char host[128] = "unknown", boot[64] = "noboot";
    const char *env = getenv("KVX_HOST_ID");
    FILE *f;
    if (given && *given) { kvx__strlcpy(out, given, cap); return; }
    if (env && *env) { kvx__strlcpy(out, env, cap); return; }
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = 0;
    if ((f = fopen("/proc/sys/kernel/random/boot_id", "r")) != NULL) {
        if (fgets(boot, sizeof boot, f)) boot[strcspn(boot, "\r\n")] = 0;
        fclose(f);
    }
    snprintf(out, cap, "%s/%s", host, boot);
}

/* $KVX_LOG: off (or none, 0), error, warn, info, debug; unset or unknown: warn. */
KVX__PRIV kvx_log_level kvx__env_log_level(void) {
    const char *e = getenv("KVX_LOG");
    if (!e || !*e) return KVX_LOG_WARN;  /* errors, and warnings: a fallback is never silent */
    if (!strcmp(e, "off") || !strcmp(e, "none") || !strcmp(e, "0")) return KVX_LOG_OFF;
    if (!strcmp(e, "error")) return KVX_LOG_ERROR;
    if (!strcmp(e, "warn") || !strcmp(e, "warning")) return KVX_LOG_WARN;
    if (!strcmp(e, "info")) return KVX_LOG_INFO;
    if (!strcmp(e, "debug")) return KVX_LOG_DEBUG;
    return KVX_LOG_WARN;
}

/* Epochs grow across restarts (wall clock) and within a process. */
KVX__PRIV uint64_t kvx__new_epoch(void) {
    static uint64_t last;
    static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    struct timespec ts;
    uint64_t e;
    clock_gettime(CLOCK_REALTIME, &ts);
    e = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    pthread_mutex_lock(&m);
    if (e <= last) e = last + 1;
    last = e;
    pthread_mutex_unlock(&m);
    return e;
}

/* The deployment key: the desc's bytes, else the file $KVX_METADATA_KEY_FILE
   names (its trailing newline left out), else none. */
KVX__PRIV kvx_status kvx__md_key_load(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    const char *path = getenv("KVX_METADATA_KEY_FILE");
    uint8_t buf[1025];
    size_t n = 0;
    if (desc->metadata_key) {
        if (desc->metadata_key_len < 16)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_ctx_desc.metadata_key: %u bytes, at least 16 are needed", desc->metadata_key_len);
        n = desc->metadata_key_len;
        snprintf(ctx->md_key_from, sizeof ctx->md_key_from, "kvx_ctx_desc.metadata_key, %zu bytes", n);
    } else if (path && *path) {
        FILE *f = fopen(path, "rb");
        if (!f) return kvx__fail(ctx, KVX_ERR_ARG, "KVX_METADATA_KEY_FILE=%s: %s", path, strerror(errno));
        n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
        if (n < 16 || n > 1024)
            return kvx__fail(ctx, KVX_ERR_ARG, "KVX_METADATA_KEY_FILE=%s: %zu bytes of key, 16 to 1024 are needed", path, n);
        snprintf(ctx->md_key_from, sizeof ctx->md_key_from, "the file %.100s, %zu bytes", path, n);
    } else {
        return KVX_OK;
    }
    if (!(ctx->md_key = (uint8_t *)KVX_MALLOC(n))) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_ctx_create: out of memory");
    memcpy(ctx->md_key, desc->metadata_key ? (const uint8_t *)desc->metadata_key : buf, n);
    ctx->md_key_len = (uint32_t)n;
    memset(buf, 0, sizeof buf);
    return KVX_OK;
}

KVX__PRIV void *kvx__progress_main(void *arg);
KVX__PRIV void kvx__queue_teardown(kvx_queue *q);
KVX__PRIV void kvx__peer_free(kvx_peer *p);

KVX_API kvx_status kvx_ctx_create(const kvx_ctx_desc *desc_in, kvx_ctx **out) {
    kvx_ctx_desc desc;
    kvx_ctx *ctx;
    kvx_status st;
    int i;
    if (!out) { kvx__strlcpy(kvx__create_err, "kvx_ctx_create: out is NULL", sizeof kvx__create_err); return KVX_ERR_ARG; }
    *out = NULL;
    memset(&desc, 0, sizeof desc);
    if (desc_in) desc = *desc_in;
    ctx = (kvx_ctx *)kvx__calloc(1, sizeof *ctx);
    if (!ctx) { kvx__strlcpy(kvx__create_err, "kvx_ctx_create: out of memory", sizeof kvx__create_err); return KVX_ERR_NOMEM; }
    ctx->wake_pipe[0] = ctx->wake_pipe[1] = -1;
    kvx__strlcpy(ctx->name, desc.name && *desc.name ? desc.name : "kvx", sizeof ctx->name);
    ctx->rank = desc.tp_rank;
    ctx->tp_size = desc.tp_size ? desc.tp_size : 1;
    ctx->timeout_ms = desc.timeout_ms ? desc.timeout_ms : KVX__DEFAULT_TIMEOUT_MS;
    ctx->log_level = desc.log_level != KVX_LOG_DEFAULT ? desc.log_level : kvx__env_log_level();
    ctx->log_fn = desc.log_fn;
    ctx->log_user = desc.log_user;
    ctx->epoch = kvx__new_epoch();
    kvx__host_identity(ctx->host, sizeof ctx->host, desc.host_id);
    kvx__strlcpy(ctx->policy, desc.transport_policy ? desc.transport_policy
                              : getenv("KVX_TRANSPORT_POLICY") ? getenv("KVX_TRANSPORT_POLICY") : "", sizeof ctx->policy);
    pthread_mutex_init(&ctx->lock, NULL);
    st = KVX_OK;
    if (kvx__random(ctx->secret, sizeof ctx->secret) != 0)
        st = kvx__fail(ctx, KVX_ERR_BACKEND, "kvx_ctx_create: no random bytes from the kernel (getrandom, /dev/urandom): %s", strerror(errno));
    else if ((st = kvx__md_key_load(ctx, &desc)) != KVX_OK) {}
    else if (ctx->tp_size < 1 || ctx->tp_size > 65536)
        st = kvx__fail(ctx, KVX_ERR_ARG, "tp_size %d must be in [1, 65536]", ctx->tp_size);
    else if (ctx->rank < 0 || ctx->rank >= ctx->tp_size)
        st = kvx__fail(ctx, KVX_ERR_ARG, "tp_rank %d is outside [0, tp_size %d)", ctx->rank, ctx->tp_size);
    if (st == KVX_OK) {
        for (i = 0; kvx__backends[i]; i++)
            if (desc.backend == KVX_BACKEND_DEFAULT ? kvx__backends[i]->kind != KVX_BACKEND_LOCAL : kvx__backends[i]->kind == desc.backend) break;
        if (!kvx__backends[i])
            st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "backend %d (%s) is not compiled in: define %s when compiling KVX_IMPLEMENTATION",
                           (int)desc.backend, kvx_backend_name(desc.backend), desc.backend == KVX_BACKEND_UCX ? "KVX_UCX" : desc.backend == KVX_BACKEND_OFI ? "KVX_OFI" :
                           desc.backend == KVX_BACKEND_CUDA ? "KVX_CUDA" : "KVX_UCX, KVX_OFI or KVX_CUDA");
        else ctx->be_ops = kvx__backends[i];
    }
    if (st == KVX_OK) {
        ctx->st.backend = ctx->be_ops->name;
        st = ctx->be_ops->open(ctx, &desc);
        if (st != KVX_OK) ctx->be_ops = NULL;
    }
    if (st == KVX_OK && desc.progress_thread) {
        if (pipe(ctx->wake_pipe) != 0) st = kvx__fail(ctx, KVX_ERR_BACKEND, "pipe: %s", strerror(errno));
        else if (pthread_create(&ctx->pt, NULL, kvx__progress_main, ctx) != 0)
            st = kvx__fail(ctx, KVX_ERR_BACKEND, "cannot start the progress thread");
        else ctx->pt_on = 1;
    }
    if (st != KVX_OK) {
        kvx__strlcpy(kvx__create_err, ctx->err, sizeof kvx__create_err);
        kvx_ctx_destroy(ctx);
        return st;
    }
    KVX__LOG(ctx, KVX_LOG_INFO, "context %s rank %d of %d on %s, backend %s, timeout %u ms%s", ctx->name, ctx->rank,
             ctx->tp_size, ctx->host, ctx->be_ops->name, ctx->timeout_ms, ctx->pt_on ? ", progress thread" : "");
    *out = ctx;
    return KVX_OK;
}

KVX_API kvx_ctx_desc kvx_ctx_query_desc(const kvx_ctx *ctx) {
    kvx_ctx_desc d;
    memset(&d, 0, sizeof d);
    if (!ctx) return d;
    d.name = ctx->name;
    d.tp_rank = ctx->rank;
    d.tp_size = ctx->tp_size;
    d.backend = ctx->be_ops->kind;
    d.timeout_ms = ctx->timeout_ms;
    d.progress_thread = ctx->pt_on;
    d.host_id = ctx->host;
    d.transport_policy = ctx->policy;
    d.log_level = ctx->log_level;
    d.log_fn = ctx->log_fn;
    d.log_user = ctx->log_user;
    d.metadata_key = ctx->md_key;
    d.metadata_key_len = ctx->md_key_len;
    if (ctx->be_ops->query) ctx->be_ops->query(ctx, &d);
    return d;
}

KVX_API void kvx_ctx_destroy(kvx_ctx *ctx) {
    if (!ctx) return;
    if (ctx->pt_on) {
        char c = 1;
        pthread_mutex_lock(&ctx->lock);
        ctx->pt_stop = 1;
        pthread_mutex_unlock(&ctx->lock);
        if (write(ctx->wake_pipe[1], &c, 1) < 0) { /* the thread also wakes by its poll timeout */ }
        pthread_join(ctx->pt, NULL);
        ctx->pt_on = 0;
    }
    while (ctx->queues) kvx_queue_destroy(ctx->queues);
    while (ctx->peers) kvx_peer_remove(ctx->peers);
    while (ctx->ncaches) kvx_cache_deregister(ctx->caches[ctx->ncaches - 1]);
    if (ctx->be_ops) ctx->be_ops->close(ctx);
    if (ctx->wake_pipe[0] >= 0) { close(ctx->wake_pipe[0]); close(ctx->wake_pipe[1]); }
    pthread_mutex_destroy(&ctx->lock);
    if (ctx->md_key) { memset(ctx->md_key, 0, ctx->md_key_len); KVX_FREE(ctx->md_key); }
    while (ctx->nexpect) { KVX_FREE(ctx->expect[ctx->nexpect - 1].ids); KVX_FREE(ctx->expect[--ctx->nexpect].ranks); }
    KVX_FREE(ctx->expect);
    KVX_FREE(ctx);
}

/*--- caches --------------------------------------------------------------*/

typedef struct kvx__span { uint64_t a, b; } kvx__span;

KVX__PRIV int kvx__span_cmp(const void *x, const void *y) {
    const kvx__span *p = (const kvx__span *)x, *q = (const kvx__span *)y;
    return p->a < q->a ? -1 : p->a > q->a;
}

/* A table of a cache (checksums, generations) at ci->regions[n].addr, len
   bytes: registered as table says (its memory kind), published as region n,
   the cache's last so far; *index records which. */
KVX__PRIV kvx_status kvx__table_publish(kvx_ctx *ctx, kvx__cache_info *ci, const kvx__cache_info *table, uint32_t n, uint64_t len, uint32_t *index) {
    kvx_status st;
    ci->regions[n].len = len;
    if ((st = ctx->be_ops->mem_register(ctx, table, &ci->regions[n])) != KVX_OK) return st;
    ci->nregions = n + 1;
    *index = n;
    return KVX_OK;
}

/* The checksum table of a cache with checksums: host memory for a host
   cache (the CPU seals and checks it), the backend's for others (the CUDA
   backend's kernels do). Registered like the cache, in its memory kind, so a
   reader can read it, and published as the cache's last region, n. */
KVX__PRIV kvx_status kvx__csum_table_add(kvx_ctx *ctx, kvx__cache_info *ci, uint32_t n) {
    uint64_t tb = (uint64_t)ci->nplanes * ci->lay.num_blocks * ci->lay.num_heads * 4u;
    kvx__cache_info table = *ci;
    kvx_status st;
    if (ci->mem != KVX_MEM_HOST) {
        if (!ctx->be_ops->csum_alloc)
            return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_cache_register: checksums of a GPU cache are kept and checked on the GPU by the CUDA backend; "
                             "this context uses %s (use KVX_BACKEND_CUDA, or turn checksums off)", ctx->be_ops->name);
        if ((st = ctx->be_ops->csum_alloc(ctx, ci, tb)) != KVX_OK) return st;
        ci->regions[n].addr = ci->csum_dev;
    } else {
        if (!(ci->csum = (uint32_t *)kvx__calloc((size_t)(tb / 4u), 4u)))
            return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: no memory for a %llu-byte checksum table", (unsigned long long)tb);
        ci->regions[n].addr = (uint64_t)(uintptr_t)ci->csum;
    }
    return kvx__table_publish(ctx, ci, &table, n, tb, &ci->csum_region);
}

/* The generation table of a cache with generations: a word per block, the
   owner's CPU advancing it and a reader's transport fetching it. In host
   memory, registered as such, where the backend reads host memory; else
   (the CUDA backend) in the cache's memory with a host shadow. Published as
   the cache's last region, n. */
KVX__PRIV kvx_status kvx__gen_table_add(kvx_ctx *ctx, kvx__cache_info *ci, uint32_t n) {
    uint64_t tb = (uint64_t)ci->lay.num_blocks * 8u;
    kvx__cache_info table = *ci;
    kvx_status st;
    if (!(ci->gen = (volatile uint64_t *)kvx__calloc(ci->lay.num_blocks, 8u)))
        return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: no memory for a %llu-byte generation table", (unsigned long long)tb);
    if (ctx->be_ops->gen_alloc) {
        if ((st = ctx->be_ops->gen_alloc(ctx, ci, tb)) != KVX_OK) return st;
        ci->regions[n].addr = ci->gen_dev;
    } else {
        table.mem = KVX_MEM_HOST;
        ci->regions[n].addr = (uint64_t)(uintptr_t)ci->gen;
    }
    return kvx__table_publish(ctx, ci, &table, n, tb, &ci->gen_region);
}

KVX_API kvx_status kvx_cache_register(kvx_ctx *ctx, const kvx_cache_desc *d, kvx_cache **out) {
    kvx_cache *c;
    kvx__cache_info *ci;
    kvx__span *sp = NULL;
    kvx_status st;
    uint64_t span;
    uint32_t p, n, i;
    int touch;
    if (!ctx) return KVX_ERR_ARG;
    if (!d || !out) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: desc and out must not be NULL");
    *out = NULL;
    c = (kvx_cache *)kvx__calloc(1, sizeof *c);
    if (!c) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: out of memory");
    c->ctx = ctx;
    ci = &c->info;
    ci->lay = d->layout;
    ci->mem = d->mem;
    ci->device = d->device;
    pthread_mutex_lock(&ctx->lock);
    st = kvx__layout_check(ctx, &ci->lay, ctx->tp_size, "kvx_cache_register");
    if (st != KVX_OK) goto fail;
    if (ctx->ncaches >= KVX__MAX_CACHES) { st = kvx__fail(ctx, KVX_ERR_ARG, "at most %u caches per context", KVX__MAX_CACHES); goto fail; }
    if (d->mem != KVX_MEM_HOST && d->mem != KVX_MEM_CUDA) { st = kvx__fail(ctx, KVX_ERR_ARG, "memory kind %d unknown", (int)d->mem); goto fail; }
    if (!d->bases == !d->pool) { st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: give either bases (one per layer and plane) or pool, not %s", d->bases ? "both" : "neither"); goto fail; }
    ci->block_stride = d->block_stride;
    ci->head_stride = ci->lay.order == KVX_ORDER_HND ? d->head_stride : 0;
    ci->token_stride = ci->lay.order == KVX_ORDER_NHD ? d->token_stride : 0;
    if ((ci->lay.order == KVX_ORDER_HND ? d->token_stride : d->head_stride) != 0) {
        st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: a %s layout takes %s, not %s", ci->lay.order == KVX_ORDER_HND ? "HND" : "NHD",
                       ci->lay.order == KVX_ORDER_HND ? "head_stride" : "token_stride", ci->lay.order == KVX_ORDER_HND ? "token_stride" : "head_stride");
        goto fail;
    }
    if ((st = kvx__strides_check(ctx, ci, "kvx_cache_register")) != KVX_OK) goto fail;
    ci->id = ctx->ncaches;
    c->seen = (uint64_t *)kvx__calloc((ci->lay.num_blocks + 63u) / 64u, sizeof *c->seen);
    ci->nplanes = ci->lay.num_layers * ci->lay.kv_planes;
    ci->plane_base = (uint64_t *)kvx__calloc(ci->nplanes, sizeof *ci->plane_base);
    ci->plane_region = (uint16_t *)kvx__calloc(ci->nplanes, sizeof *ci->plane_region);
    sp = (kvx__span *)kvx__calloc(ci->nplanes, sizeof *sp);
    if (!ci->plane_base || !ci->plane_region || !sp || !c->seen) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: out of memory"); goto fail; }
    span = kvx__mul_sat(ci->lay.num_blocks - 1, ci->block_stride) + ci->block_extent;
    for (p = 0; p < ci->nplanes; p++) {
        uint64_t b = d->bases ? (uint64_t)(uintptr_t)d->bases[p]
                              : (uint64_t)(uintptr_t)d->pool + (p / ci->lay.kv_planes) * d->layer_stride + (p % ci->lay.kv_planes) * d->plane_stride;
        if (!b) { st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_register: base of layer %u plane %u is NULL", p / ci->lay.kv_planes, p % ci->lay.kv_planes); goto fail; }
        ci->plane_base[p] = b;
        sp[p].a = b;
        sp[p].b = b + span;
    }
    /* Few, large registrations: planes that overlap share one, and so do
       planes that touch, unless they are GPU memory a transport registers
       per allocation (see gpu_region_spans_allocations). */
    touch = ci->mem == KVX_MEM_HOST || ctx->be_ops->gpu_region_spans_allocations;
    qsort(sp, ci->nplanes, sizeof *sp, kvx__span_cmp);
    for (n = 0, p = 0; p < ci->nplanes; p++) {
        if (n && (sp[p].a < sp[n - 1].b || (touch && sp[p].a == sp[n - 1].b))) { if (sp[p].b > sp[n - 1].b) sp[n - 1].b = sp[p].b; }
        else sp[n++] = sp[p];
    }
    if (n > KVX__MAX_REGIONS) { st = kvx__fail(ctx, KVX_ERR_ARG, "cache spans %u separate ranges, at most %u", n, KVX__MAX_REGIONS); goto fail; }
    ci->csum_region = ci->gen_region = KVX__NO_CSUM;
    ci->regions = (kvx__region *)kvx__calloc(n + (d->checksums ? 1u : 0u) + (d->generations ? 1u : 0u), sizeof *ci->regions);
    if (!ci->regions) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_cache_register: out of memory"); goto fail; }
    for (i = 0; i < n; i++) {
        ci->regions[i].addr = sp[i].a;
        ci->regions[i].len = sp[i].b - sp[i].a;
        st = ctx->be_ops->mem_register(ctx, ci, &ci->regions[i]);
        if (st != KVX_OK) goto fail;
        ci->nregions = i + 1;
    }
    if (d->checksums && (st = kvx__csum_table_add(ctx, ci, n)) != KVX_OK) goto fail;
    if (d->generations && (st = kvx__gen_table_add(ctx, ci, ci->nregions)) != KVX_OK) goto fail;
    if ((st = kvx__planes_locate(ctx, ci, "kvx_cache_register")) != KVX_OK) goto fail;
    ctx->caches[ctx->ncaches++] = c;
    KVX__LOG(ctx, KVX_LOG_INFO, "cache %u: %u layers x %u planes x %u blocks of %llu bytes, %u registration(s)", ci->id,
             ci->lay.num_layers, ci->lay.kv_planes, ci->lay.num_blocks, (unsigned long long)ci->block_bytes, ci->nregions);
    pthread_mutex_unlock(&ctx->lock);
    KVX_FREE(sp);
    *out = c;
    return KVX_OK;
fail:
    for (i = 0; i < ci->nregions; i++) ctx->be_ops->mem_deregister(ctx, &ci->regions[i]);
    pthread_mutex_unlock(&ctx->lock);
    kvx__cache_info_free(ctx, ci);
    KVX_FREE(sp);
    KVX_FREE(c->seen);
    KVX_FREE(c);
    return st;
}

KVX_API void kvx_cache_deregister(kvx_cache *c) {
    kvx_ctx *ctx;
    uint32_t i, j;
    if (!c) return;
    ctx = c->ctx;
    pthread_mutex_lock(&ctx->lock);
    /* Out of the list first: a backend that waits for replies from this
       memory while deregistering it serves no new request for it meanwhile. */
    for (i = 0; i < ctx->ncaches; i++)
        if (ctx->caches[i] == c) {
            for (j = i + 1; j < ctx->ncaches; j++) ctx->caches[j - 1] = ctx->caches[j];
            ctx->ncaches--;
            break;
        }
    for (i = 0; i < ctx->nexpect; i++)  /* leases on its blocks expire without retiring them */
        if (ctx->expect[i].retire == c) ctx->expect[i].retire = NULL;
    for (i = 0; i < c->info.nregions; i++) ctx->be_ops->mem_deregister(ctx, &c->info.regions[i]);
    pthread_mutex_unlock(&ctx->lock);
    kvx__cache_info_free(ctx, &c->info);
    KVX_FREE(c->seen);
    KVX_FREE(c);
}

/* A new epoch and secret first (from then on every message under the old
   secret is dropped), then each region registered anew before its old
   registration goes, so a failure half-way leaves every region readable. */
KVX_API kvx_status kvx_ctx_rotate(kvx_ctx *ctx) {
    uint8_t secret[KVX__SECRET_BYTES];
    char why[sizeof ctx->err];
    kvx_status st = KVX_OK;
    uint32_t c, i = 0;
    if (!ctx) return KVX_ERR_ARG;
    if (kvx__random(secret, sizeof secret) != 0)
        return kvx__fail(ctx, KVX_ERR_BACKEND, "kvx_ctx_rotate: no random bytes from the kernel: %s", strerror(errno));
    pthread_mutex_lock(&ctx->lock);
    ctx->epoch = kvx__new_epoch();
    memcpy(ctx->secret, secret, sizeof secret);
    for (c = 0; c < ctx->ncaches && ctx->be_ops->keys_per_registration; c++) {
        kvx__cache_info *ci = &ctx->caches[c]->info;
        for (i = 0; i < ci->nregions; i++) {
            kvx__cache_info kind = *ci;
            kvx__region fresh;
            if (i == ci->gen_region && !ctx->be_ops->gen_alloc) kind.mem = KVX_MEM_HOST;  /* as kvx__gen_table_add registered it */
            memset(&fresh, 0, sizeof fresh);
            fresh.addr = ci->regions[i].addr;
            fresh.len = ci->regions[i].len;
            if ((st = ctx->be_ops->mem_register(ctx, &kind, &fresh)) != KVX_OK) break;
            ctx->be_ops->mem_deregister(ctx, &ci->regions[i]);
            KVX_FREE(ci->regions[i].rkey);
            ci->regions[i] = fresh;
        }
        if (st != KVX_OK) break;
    }
    if (st == KVX_OK) KVX__LOG(ctx, KVX_LOG_INFO, "rotated: epoch %llu; metadata exported before reads nothing here", (unsigned long long)ctx->epoch);
    else {
        kvx__strlcpy(why, ctx->err, sizeof why);
        kvx__fail(ctx, st, "kvx_ctx_rotate: the new epoch and secret hold, but cache %u region %u kept its old registration: %s", c, i, why);
    }
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

/*--- peers ---------------------------------------------------------------*/

KVX__PRIV kvx_status kvx__policy_check(kvx_ctx *ctx, const kvx_peer *p);

/* A process of this host's pid namespace that can still serve: it exists
   (signal 0 sends nothing) and is neither a zombie nor stopped (a stopped
   one, hung in a debugger or by SIGSTOP, is what a restart replaces). */
KVX__PRIV int kvx__pid_alive(uint32_t pid) {
    char path[40], buf[512], *rp;
    FILE *f;
    size_t n;
    if (!pid || (kill((pid_t)pid, 0) != 0 && errno != EPERM)) return 0;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    if (!(f = fopen(path, "r"))) return 1;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!(rp = strrchr(buf, ')')) || rp[1] != ' ') return 1;  /* "pid (comm) S ...": comm may hold anything */
    return !strchr("ZXTt", rp[2]);
}

KVX_API kvx_status kvx_peer_add(kvx_ctx *ctx, const void *md, size_t len, kvx_peer **out) {
    kvx_peer *p, *q;
    kvx_status st;
    uint32_t i;
    if (!ctx) return KVX_ERR_ARG;
    if (!md || !out) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_peer_add: metadata and out must not be NULL");
    *out = NULL;
    p = (kvx_peer *)kvx__calloc(1, sizeof *p);
    if (!p) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_peer_add: out of memory");
    p->ctx = ctx;
    pthread_mutex_lock(&ctx->lock);
    st = kvx__md_parse(ctx, (const uint8_t *)md, len, p);
    if (st != KVX_OK) goto fail;
    if (!strcmp(p->name, ctx->name) && p->rank == ctx->rank) {
        st = p->epoch == ctx->epoch
                 ? kvx__fail(ctx, KVX_ERR_ARG, "metadata is this context's own (%s/%d)", p->name, p->rank)
                 : kvx__fail(ctx, KVX_ERR_MISMATCH, "another context (pid %u on %s) claims rank %d of %s, which this context holds",
                             p->pid, p->host, p->rank, p->name);
        goto fail;
    }
    for (q = ctx->peers; q; q = q->next) {
        if (strcmp(q->name, p->name) || q->rank != p->rank) continue;
        /* Two live processes of one host claiming one rank is a rank set
           wrong, not a restart: refused, whichever metadata came first.
           (Across hosts, or within one process, kvx cannot tell; there a
           newer epoch is taken for a restart.) */
        if (!q->failed && q->pid != p->pid && !strcmp(q->host, ctx->host) && !strcmp(p->host, ctx->host) &&
            kvx__pid_alive(q->pid) && kvx__pid_alive(p->pid)) {
            st = kvx__fail(ctx, KVX_ERR_MISMATCH, "two live processes claim rank %d of %s on this host: pid %u (added) and pid %u (this "
                           "metadata); a tp_rank set wrong? (a restarted peer's old process would be gone)", p->rank, p->name, q->pid, p->pid);
            goto fail;
        }
        if (p->epoch < q->epoch) {
            st = kvx__fail(ctx, KVX_ERR_MISMATCH, "metadata of %s/%d has epoch %llu, older than the %llu already added: a restarted peer's stale keys",
                           p->name, p->rank, (unsigned long long)p->epoch, (unsigned long long)q->epoch);
            goto fail;
        }
        if (p->epoch == q->epoch) {
            st = kvx__fail(ctx, KVX_ERR_ARG, "peer %s/%d (epoch %llu) is already added", p->name, p->rank, (unsigned long long)p->epoch);
            goto fail;
        }
        /* A newer epoch: the old process is gone; its reads end with KVX_ERR_PEER. */
        if (!q->failed) kvx__peer_failed(q, "the peer restarted (newer metadata was added)");
    }
    for (i = 0; i < p->ncaches && i < ctx->ncaches; i++)
        if ((st = kvx__compat(ctx, &ctx->caches[i]->info, p, &p->caches[i])) != KVX_OK) goto fail;
    if ((st = ctx->be_ops->connect(ctx, p)) != KVX_OK) goto fail;
    if ((st = kvx__policy_check(ctx, p)) != KVX_OK) {
        ctx->be_ops->disconnect(ctx, p);
        goto fail;
    }
    p->connected = 1;
    p->next = ctx->peers;
    ctx->peers = p;
    KVX__LOG(ctx, KVX_LOG_INFO, "peer %s/%d of %d (pid %u, host %s): %s", p->name, p->rank, p->tp_size, p->pid, p->host, p->transport);
    pthread_mutex_unlock(&ctx->lock);
    *out = p;
    return KVX_OK;
fail:
    pthread_mutex_unlock(&ctx->lock);
    kvx__peer_free(p);
    return st;
}

/* Does transport t match one policy term (n bytes at term)? */
KVX__PRIV int kvx__policy_term(const char *term, size_t n, const char *t) {
    static const char *const cls[][5] = {
        {"sw", "*(sw)*", NULL},
        {"ipc", "cuda:ipc*", "ucx:*cuda_ipc*", NULL},
        {"nvlink", "*nvlink*", NULL},
        {"rdma", "ucx:rc*", "ucx:dc*", "ofi:verbs*", "ofi:efa*"},
    };
    char pat[128];
    size_t i, j;
    if (!n || n >= sizeof pat) return 0;
    memcpy(pat, term, n);
    pat[n] = 0;
    for (i = 0; i < sizeof cls / sizeof cls[0]; i++)
        if (!strcmp(pat, cls[i][0])) {
            for (j = 1; j < 5 && cls[i][j]; j++)
                if (!fnmatch(cls[i][j], t, 0)) return 1;
            return 0;
        }
    return !fnmatch(pat, t, 0);
}

/* KVX_OK, or KVX_ERR_UNSUPPORTED saying what was chosen, what the policy
   asks and why the transport library chose what it did. */
KVX__PRIV kvx_status kvx__policy_check(kvx_ctx *ctx, const kvx_peer *p) {
    const char *s = ctx->policy, *e;
    int wanted = 0, matched = 0;
    if (!*s) return KVX_OK;
    for (; *s; s = *e ? e + 1 : e) {
        size_t n;
        int refuse;
        while (*s == ' ') s++;
        e = strchr(s, ',');
        if (!e) e = s + strlen(s);
        n = (size_t)(e - s);
        while (n && s[n - 1] == ' ') n--;
        refuse = n && *s == '!';
        if (refuse) {
            if (kvx__policy_term(s + 1, n - 1, p->transport))
                return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_peer_add: %s/%d would be read over %s, which the transport policy \"%s\" refuses "
                                 "(\"%.*s\"); why that transport: %s", p->name, p->rank, p->transport, ctx->policy, (int)n, s,
                                 p->why[0] ? p->why : "the transport library chose it");
        } else if (n) {
            wanted = 1;
            matched |= kvx__policy_term(s, n, p->transport);
        }
    }
    if (wanted && !matched)
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "kvx_peer_add: %s/%d would be read over %s, and the transport policy \"%s\" requires "
                         "one of its other terms; why that transport: %s", p->name, p->rank, p->transport, ctx->policy,
                         p->why[0] ? p->why : "the transport library chose it");
    return KVX_OK;
}

KVX__PRIV void kvx__peer_free(kvx_peer *p) {
    uint32_t i;
    if (p->caches)
        for (i = 0; i < p->ncaches; i++) kvx__cache_info_free(p->ctx, &p->caches[i]);
    KVX_FREE(p->caches);
    KVX_FREE(p->addr);
    KVX_FREE(p);
}

KVX__PRIV void kvx__read_finish(kvx__read *rd);
KVX__PRIV void kvx__runs_release(kvx_queue *q);
KVX__PRIV kvx_status kvx__verify(kvx__read *rd);
KVX__PRIV kvx_status kvx__gen_check(kvx__read *rd);

/* A failed read keeps the sentence of its failure (the context's error,
   which the next failure overwrites), for its completion. */
KVX__PRIV void kvx__read_why(kvx__read *rd) {
    if (rd->status != KVX_PENDING && rd->status != KVX_OK && !rd->why[0])
        kvx__strlcpy(rd->why, rd->q->ctx->err[0] ? rd->q->ctx->err : kvx_status_name(rd->status), sizeof rd->why);
}

/* Fail every read of peer p that is still live, after closing p by force.
   Returns how many reads the transport still holds (0 unless it broke its
   promise to complete everything on a forced close). */
KVX__PRIV uint32_t kvx__peer_close(kvx_peer *p, kvx_status why) {
    kvx_ctx *ctx = p->ctx;
    kvx_queue *q;
    uint32_t i, stuck = 0;
    for (q = ctx->queues; q; q = q->next)
        for (i = 0; i < q->depth; i++) {
            kvx__read *rd = &q->slots[i];
            if (!rd->in_use || rd->done || rd->peer != p) continue;
            if (rd->status == KVX_PENDING) rd->status = why;
            kvx__read_why(rd);
            rd->issuing_done = 1;
        }
    if (p->connected) ctx->be_ops->disconnect(ctx, p);
    p->connected = 0;
    for (q = ctx->queues; q; q = q->next) {
        kvx__runs_release(q);
        for (i = 0; i < q->depth; i++) {
            kvx__read *rd = &q->slots[i];
            if (!rd->in_use || rd->done || rd->peer != p) continue;
            kvx__read_finish(rd);
            if (!rd->done) stuck++;
        }
    }
    return stuck;
}

KVX_API void kvx_peer_remove(kvx_peer *p) {
    kvx_ctx *ctx;
    kvx_peer **pp;
    uint32_t stuck;
    if (!p) return;
    ctx = p->ctx;
    pthread_mutex_lock(&ctx->lock);
    stuck = kvx__peer_close(p, KVX_ERR_CANCELED);
    for (pp = &ctx->peers; *pp; pp = &(*pp)->next)
        if (*pp == p) { *pp = p->next; break; }
    if (stuck) { /* reads still point at it: keep the memory rather than free it under them */
        kvx__fail(ctx, KVX_ERR_BACKEND, "peer %s/%d removed with %u reads the transport never completed; its memory is kept", p->name, p->rank, stuck);
        KVX__LOG(ctx, KVX_LOG_ERROR, "%s", ctx->err);  /* nobody is handed this one */
    }
    pthread_mutex_unlock(&ctx->lock);
    if (!stuck) kvx__peer_free(p);
}

KVX_API const char *kvx_peer_transport(const kvx_peer *p) { return p ? p->transport : "none"; }
KVX_API const char *kvx_peer_name(const kvx_peer *p) { return p ? p->name : ""; }
KVX_API int kvx_peer_rank(const kvx_peer *p) { return p ? p->rank : -1; }

KVX_API kvx_status kvx_peer_heads(const kvx_peer *p, const kvx_cache *c, uint32_t remote_cache, uint32_t *first, uint32_t *count) {
    uint32_t a, b;
    if (!p || !c || !first || !count || remote_cache >= p->ncaches) return KVX_ERR_ARG;
    kvx__head_range(&c->info.lay, c->ctx->rank, c->ctx->tp_size, &p->caches[remote_cache].lay, p->rank, p->tp_size, &a, &b);
    *first = a;
    *count = b - a;
    return KVX_OK;
}

/* The transport lost p. With nothing of ours in flight to it that is a
   close, not an error (an owner that ends after its readers are done):
   said at info, and the next read of it fails saying so. On this host the
   pid tells a process that is gone from a connection that broke. */
KVX__PRIV void kvx__peer_failed(kvx_peer *p, const char *why) {
    kvx_ctx *ctx = p->ctx;
    int gone = !strcmp(p->host, ctx->host) && !kvx__pid_alive(p->pid);
    if (p->failed) return;
    p->failed = 1;
    kvx__fail(ctx, KVX_ERR_PEER, "peer %s/%d (pid %u, %s) %s%s (%s)", p->name, p->rank, p->pid, p->transport,
              p->ops_out ? "was lost with reads in flight" : "closed its connection",
              gone ? ": its process has ended" : "", why);
    if (p->ops_out)
        KVX__LOG(ctx, KVX_LOG_WARN, "%s", ctx->err);
}

/*--- queues and reads ----------------------------------------------------*/

/* The backend's and the stream service's parts of a queue, in that order;
   safe on a queue whose opening failed half-way. */
KVX__PRIV void kvx__queue_close(kvx_queue *q) {
    if (q->ctx->be_ops->queue_close) q->ctx->be_ops->queue_close(q);
    if (kvx__stream) kvx__stream->queue_fini(q);
}

KVX_API kvx_status kvx_queue_create(kvx_ctx *ctx, const kvx_queue_desc *d, kvx_queue **out) {
    kvx_queue *q;
    kvx_queue_desc desc;
    pthread_condattr_t ca;
    if (!ctx) return KVX_ERR_ARG;
    if (!out) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_queue_create: out is NULL");
    *out = NULL;
    memset(&desc, 0, sizeof desc);
    if (d) desc = *d;
    q = (kvx_queue *)kvx__calloc(1, sizeof *q);
    if (!q) return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_queue_create: out of memory");
    q->ctx = ctx;
    q->depth = desc.depth ? desc.depth : 256;
    q->max_ops = desc.max_ops ? desc.max_ops : 64;
    q->max_runs = desc.max_runs ? desc.max_runs : 65536;
    q->cuda_stream = desc.cuda.stream;
    if (q->depth > (1u << 20) || q->max_runs > (1u << 26)) {
        KVX_FREE(q);
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_queue_create: depth %u (max %u) or max_runs %u (max %u) too large",
                         desc.depth, 1u << 20, desc.max_runs, 1u << 26);
    }
    q->slots = (kvx__read *)kvx__calloc(q->depth, sizeof *q->slots);
    q->runs = (kvx__run *)kvx__calloc(q->max_runs, sizeof *q->runs);
    q->done_fifo = (kvx_ticket *)kvx__calloc(q->depth, sizeof *q->done_fifo);
    if (!q->slots || !q->runs || !q->done_fifo) {
        KVX_FREE(q->slots); KVX_FREE(q->runs); KVX_FREE(q->done_fifo); KVX_FREE(q);
        return kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_queue_create: out of memory for %u reads and %u runs", desc.depth, desc.max_runs);
    }
    q->next_ticket = q->run_tail = 1;
    if (ctx->be_ops->queue_open || kvx__stream) {
        kvx_status st = KVX_OK;
        pthread_mutex_lock(&ctx->lock);
        if (ctx->be_ops->queue_open) st = ctx->be_ops->queue_open(q);
        if (st == KVX_OK && kvx__stream) st = kvx__stream->queue_init(q);
        pthread_mutex_unlock(&ctx->lock);
        if (st != KVX_OK) {
            kvx__queue_close(q);
            KVX_FREE(q->slots); KVX_FREE(q->runs); KVX_FREE(q->done_fifo); KVX_FREE(q);
            return st;
        }
    }
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_lock(&ctx->lock);
    q->next = ctx->queues;
    ctx->queues = q;
    pthread_mutex_unlock(&ctx->lock);
    *out = q;
    return KVX_OK;
}

KVX__PRIV kvx__read *kvx__slot(kvx_queue *q, kvx_ticket t) { return &q->slots[t % q->depth]; }

/* A slot is reusable once its read is final, reported, its notification sent
   and its runs handed back to the ring. */
KVX__PRIV void kvx__retire(kvx_queue *q, kvx__read *rd) {
    if (rd->in_use && rd->done && rd->consumed && !rd->notify_inflight && rd->ticket < q->run_tail) rd->in_use = 0;
}

/* Runs are released in ticket order, as soon as a read has issued everything. */
KVX__PRIV void kvx__runs_release(kvx_queue *q) {
    while (q->run_tail < q->next_ticket) {
        kvx__read *rd = kvx__slot(q, q->run_tail);
        KVX_ASSERT(rd->ticket == q->run_tail);
        /* verification and the generation check walk the runs */
        if (!rd->issuing_done || ((rd->verify || rd->gen) && !rd->done)) break;
        q->run_used -= rd->nruns;
        rd->nruns = 0;
        q->gen_used -= rd->ngen;
        rd->ngen = 0;
        q->run_tail++;
        kvx__retire(q, rd);
    }
}

KVX__PRIV void kvx__done_push(kvx_queue *q, kvx_ticket t) {
    uint32_t i, n = 0;
    if (q->done_count == q->depth) {
        /* Entries already reported by kvx_test/kvx_wait linger: drop them. */
        for (i = 0; i < q->done_count; i++) {
            kvx_ticket u = q->done_fifo[(q->done_head + i) % q->depth];
            kvx__read *rd = kvx__slot(q, u);
            if (rd->ticket == u && rd->in_use && !rd->consumed) q->done_fifo[(q->done_head + n++) % q->depth] = u;
        }
        q->done_count = n;
    }
    KVX_ASSERT(q->done_count < q->depth);
    q->done_fifo[(q->done_head + q->done_count++) % q->depth] = t;
}

KVX__PRIV void kvx__read_finish(kvx__read *rd) {
    kvx_queue *q = rd->q;
    kvx_ctx *ctx = q->ctx;
    if (rd->done || !rd->issuing_done || rd->ops_out) return;
    if (rd->gen && rd->status == KVX_PENDING) {
        /* The data has landed: only now fetch the owner's generations, so
           that a retire before or during the data's reads cannot pass. */
        if (!rd->gen_phase && !ctx->be_ops->gen_fetch) {
            rd->gen_phase = 1;  /* as ops of the read, issued by the next pump */
            rd->issuing_done = 0;
            return;
        }
        if (!rd->gen_phase) {
            rd->gen_phase = 1;
            rd->status = ctx->be_ops->gen_fetch(rd);
            if (rd->status == KVX_OK) rd->status = KVX_PENDING;
        }
        if (rd->status == KVX_PENDING) rd->status = kvx__gen_check(rd);
    }
    if (rd->status == KVX_PENDING) rd->status = rd->verify ? kvx__verify(rd) : KVX_OK;
    kvx__read_why(rd);
    rd->done = 1;
    if (rd->status == KVX_OK) {
        KVX_ASSERT(rd->ops_done == rd->ops_total);
        rd->bytes_done = rd->bytes;
        ctx->st.bytes_read += rd->bytes;
        ctx->st.reads_completed++;
        if (rd->notify) {
            kvx__notify_msg m;
            memcpy(m.secret, rd->peer->secret, KVX__SECRET_BYTES);
            m.id = rd->notify_id;
            m.rank = (uint32_t)ctx->rank;
            m.tp_size = (uint32_t)ctx->tp_size;
            kvx__strlcpy(m.name, ctx->name, sizeof m.name);
            kvx__notify_msg_write(rd->notify_msg, &m);
            rd->notify_inflight = 1;
            if (ctx->be_ops->notify(ctx, rd) != KVX_OK) rd->notify_inflight = 0;
            else ctx->st.notifications_sent++;
        }
    } else {
        ctx->st.reads_failed++;
    }
    if (kvx__stream) kvx__stream->read_final(rd);
    kvx__done_push(q, rd->ticket);
    kvx__runs_release(q);
    pthread_cond_broadcast(&q->cond);
}

KVX__PRIV void kvx__notify_sent(kvx__read *rd) {
    rd->notify_inflight = 0;
    kvx__retire(rd->q, rd);
}

KVX__PRIV void kvx__op_done(kvx__read *rd, kvx_status st, const char *why) {
    kvx_queue *q = rd->q;
    kvx_ctx *ctx = q->ctx;
    KVX_ASSERT(rd->ops_out > 0);
    rd->ops_out--;
    q->ops_out--;
    rd->peer->ops_out--;
    if (st == KVX_OK) {
        uint64_t n = rd->whole ? rd->ops_total - rd->ops_done : 1u;
        rd->ops_done += n;
        ctx->st.descs_completed += n;
    } else {
        if (rd->status == KVX_PENDING) {
            rd->status = st;
            kvx__fail(ctx, st, "read %llu from %s/%d over %s failed after %llu of %llu descriptors: %s",
                      (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rd->peer->transport,
                      (unsigned long long)rd->ops_done, (unsigned long long)rd->ops_total, why ? why : kvx_status_name(st));
            kvx__read_why(rd);
        }
        rd->issuing_done = 1;
    }
    if (rd->issuing_done) kvx__read_finish(rd);
}

/* The op at the read's cursor; 0 when every op has been issued. */
/* The generation fetch: one op per run of blocks, the owner's words of the
   remote blocks into the read's own words in the queue's landing ring. */
KVX__PRIV int kvx__gcursor_op(kvx__read *rd, const kvx__run *runs, uint32_t cap, kvx__op *op) {
    const kvx__cache_info *rc = rd->rc;
    const kvx__run *run;
    if (rd->g_run >= rd->nruns) return 0;
    run = &runs[(rd->run0 + rd->g_run) % cap];
    op->count = 1;
    op->lstride = op->rstride = 0;
    op->lreg = KVX__LREG_GEN;
    op->rreg = rc->gen_region;
    op->laddr = rd->q->gland_reg.addr + 8u * (uint64_t)(rd->g0 + rd->g_idx);
    op->raddr = rc->regions[rc->gen_region].addr + 8u * (uint64_t)run->r;
    op->len = 8u * (uint64_t)run->n;
    return 1;
}

/* After the fetch: every block's fetched word against what the read expected. */
KVX__PRIV kvx_status kvx__gen_check(kvx__read *rd) {
    kvx_queue *q = rd->q;
    uint32_t r, b, idx = 0;
    for (r = 0; r < rd->nruns; r++) {
        const kvx__run *run = &q->runs[(rd->run0 + r) % q->max_runs];
        for (b = 0; b < run->n; b++, idx++) {
            uint64_t want = q->gens[rd->g0 + idx], got = q->gland[rd->g0 + idx];
            if (got != want)
                return kvx__fail(q->ctx, KVX_ERR_STALE, "read %llu from %s/%d over %s: remote block %u (local %u, layers %u-%u): generation %llu "
                                 "expected, %llu found: the owner retired it (kvx_blocks_retire) before or during the read, so what landed may be "
                                 "another request's", (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank, rd->peer->transport,
                                 run->r + b, run->l + b, rd->layer_begin, rd->layer_end - 1, (unsigned long long)want, (unsigned long long)got);
        }
    }
    return KVX_PENDING;
}

KVX__PRIV int kvx__cursor_op(kvx__read *rd, const kvx__run *runs, uint32_t cap, kvx__op *op) {
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    const kvx__run *run;
    uint32_t p = rd->c_plane;
    if (rd->gen_phase) return kvx__gcursor_op(rd, runs, cap, op);
    if (p >= rd->p_end) return rd->verify ? kvx__vcursor_op(rd, runs, cap, op) : 0;
    run = &runs[(rd->run0 + rd->c_run) % cap];
    op->lreg = lc->plane_region[p];
    op->rreg = rc->plane_region[p];
    op->count = 1;
    op->lstride = op->rstride = 0;
    if (rd->g.run_merge) {
        op->laddr = lc->plane_base[p] + (uint64_t)run->l * lc->block_stride + rd->g.loff;
        op->raddr = rc->plane_base[p] + (uint64_t)run->r * rc->block_stride + rd->g.roff;
        op->len = rd->g.piece * run->n;
    } else {
        op->laddr = lc->plane_base[p] + (uint64_t)(run->l + rd->c_blk) * lc->block_stride + rd->g.loff + rd->c_piece * rd->g.lpstride;
        op->raddr = rc->plane_base[p] + (uint64_t)(run->r + rd->c_blk) * rc->block_stride + rd->g.roff + rd->c_piece * rd->g.rpstride;
        op->len = rd->g.piece;
        if (rd->gather) {  /* the block's pieces (NHD: a token each) as one op */
            op->count = rd->g.npieces;
            op->lstride = rd->g.lpstride;
            op->rstride = rd->g.rpstride;
        }
    }
    return 1;
}

KVX__PRIV void kvx__cursor_next(kvx__read *rd, const kvx__run *runs, uint32_t cap) {
    if (rd->gen_phase) { rd->g_idx += runs[(rd->run0 + rd->g_run) % cap].n; rd->g_run++; return; }
    if (rd->c_plane >= rd->p_end) { kvx__vcursor_next(rd, runs, cap); return; }
    if (!rd->g.run_merge) {
        if (!rd->gather && ++rd->c_piece < rd->g.npieces) return;
        rd->c_piece = 0;
        if (++rd->c_blk < runs[(rd->run0 + rd->c_run) % cap].n) return;
        rd->c_blk = 0;
    }
    if (++rd->c_run < rd->nruns) return;
    rd->c_run = 0;
    rd->c_plane++;
}

/* A table of a cache's own block ids (seal, retire, a lease's blocks):
   every id checked before anything is done with any. */
KVX__PRIV kvx_status kvx__ids_check(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *ids, uint32_t n, const char *who) {
    uint32_t i;
    if (n && !ids) return kvx__fail(ctx, KVX_ERR_ARG, "%s: %u blocks and a NULL table", who, n);
    for (i = 0; i < n; i++)
        if (ids[i] >= ci->lay.num_blocks)
            return kvx__fail(ctx, KVX_ERR_ARG, "%s: block id %u at index %u is past the cache's %u blocks", who, ids[i], i, ci->lay.num_blocks);
    return KVX_OK;
}

KVX_API kvx_status kvx_cache_seal(kvx_cache *cache, const uint32_t *blocks, uint32_t n) {
    kvx_ctx *ctx;
    kvx__cache_info *ci;
    kvx_status st;
    if (!cache) return KVX_ERR_ARG;
    ctx = cache->ctx;
    ci = &cache->info;
    if (!ci->csum && !ci->csum_dev) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_cache_seal: cache %u was registered without checksums", ci->id);
    if ((st = kvx__ids_check(ctx, ci, blocks, n, "kvx_cache_seal")) != KVX_OK) return st;
    if (ci->csum_dev) return n ? ctx->be_ops->csum_seal(ctx, ci, blocks, n) : KVX_OK;
    kvx__seal_host(ci, blocks, n);
    return KVX_OK;
}

/* Every id checked before any word moves: a bad id retires nothing. */
KVX__PRIV kvx_status kvx__retire_check(kvx_ctx *ctx, const kvx__cache_info *ci, const uint32_t *ids, uint32_t n, const char *who) {
    if (!ci->gen) return kvx__fail(ctx, KVX_ERR_ARG, "%s: cache %u was registered without generations", who, ci->id);
    return kvx__ids_check(ctx, ci, ids, n, who);
}

KVX__PRIV kvx_status kvx__retire_blocks(kvx_ctx *ctx, kvx__cache_info *ci, const uint32_t *ids, uint32_t n) {
    uint32_t i, lo = UINT32_MAX, hi = 0;
    for (i = 0; i < n; i++) {
        ci->gen[ids[i]] = ci->gen[ids[i]] + 1u;
        if (ids[i] < lo) lo = ids[i];
        if (ids[i] > hi) hi = ids[i];
    }
    /* The new words before any write the engine makes to the blocks next:
       a table the backend keeps elsewhere gets them before this returns. */
#if defined(__GNUC__) || defined(__clang__)
    __sync_synchronize();
#endif
    return n && ci->gen_dev ? ctx->be_ops->gen_store(ctx, ci, lo, hi - lo + 1u) : KVX_OK;
}

KVX_API kvx_status kvx_blocks_retire(kvx_cache *cache, const uint32_t *ids, uint32_t n) {
    kvx_ctx *ctx;
    kvx_status st;
    if (!cache) return KVX_ERR_ARG;
    ctx = cache->ctx;
    pthread_mutex_lock(&ctx->lock);  /* one writer of the words: this and lease expiry */
    if ((st = kvx__retire_check(ctx, &cache->info, ids, n, "kvx_blocks_retire")) == KVX_OK) st = kvx__retire_blocks(ctx, &cache->info, ids, n);
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API uint64_t kvx_block_generation(const kvx_cache *cache, uint32_t id) {
    if (!cache || !cache->info.gen || id >= cache->info.lay.num_blocks) return UINT64_MAX;
    return cache->info.gen[id];
}

/* After a verified read: host caches are checked here, others by the
   backend that keeps their checksums. */
KVX__PRIV kvx_status kvx__verify(kvx__read *rd) {
#if defined(KVX_TEST_HOOK_BEFORE_VERIFY)
    KVX_TEST_HOOK_BEFORE_VERIFY(rd);
#endif
    if (rd->lc->mem == KVX_MEM_HOST) return kvx__verify_host(rd);
    return rd->q->ctx->be_ops->csum_verify(rd);
}

/* One backend call issuing op (NULL: the whole read, post_read), counted
   outstanding on read, queue and peer from before the call, since a backend
   may complete it inside; KVX_PENDING or an error leaves nothing counted. */
KVX__PRIV kvx_status kvx__issue(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    kvx_status st;
    rd->ops_out++; rd->q->ops_out++; rd->peer->ops_out++;
    st = op ? ctx->be_ops->post(ctx, rd, op) : ctx->be_ops->post_read(ctx, rd);
    if (st != KVX_OK) { rd->ops_out--; rd->q->ops_out--; rd->peer->ops_out--; }
    return st;
}

/* Issue ops of live reads, oldest first, while the queue has room. */
KVX__PRIV void kvx__pump(kvx_queue *q) {
    kvx_ctx *ctx = q->ctx;
    kvx_ticket t;
    kvx__op op;
    for (t = q->run_tail; t < q->next_ticket && q->ops_out < q->max_ops; t++) {
        kvx__read *rd = kvx__slot(q, t);
        if (rd->issuing_done) continue;
        if (rd->peer->failed) {
            if (rd->status == KVX_PENDING) { rd->status = KVX_ERR_PEER; kvx__fail(ctx, KVX_ERR_PEER, "read %llu: peer %s/%d failed", (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank); kvx__read_why(rd); }
            rd->issuing_done = 1;
            kvx__read_finish(rd);
            continue;
        }
        if (!rd->peer->connected) {
            kvx_status st = ctx->be_ops->connect(ctx, rd->peer);
            if (st != KVX_OK) {
                rd->status = st;
                kvx__read_why(rd);
                rd->issuing_done = 1;
                kvx__read_finish(rd);
                continue;
            }
            rd->peer->connected = 1;
        }
        if (!rd->ops_total) {  /* a read of no blocks: straight to its notification */
            rd->issuing_done = 1;
            kvx__read_finish(rd);
            continue;
        }
        if (ctx->be_ops->post_read) {
            kvx_status st = kvx__issue(ctx, rd, NULL);
            if (st == KVX_PENDING) break;
            if (st != KVX_OK) {
                if (rd->status == KVX_PENDING) rd->status = st;
                kvx__read_why(rd);
            } else {
                rd->whole = 1;
                rd->ops_issued = rd->ops_total;
                ctx->st.descs_posted += rd->ops_total;
            }
            rd->issuing_done = 1;
        }
        while (!rd->issuing_done && q->ops_out < q->max_ops) {
            kvx_status st;
            if (!kvx__cursor_op(rd, q->runs, q->max_runs, &op)) { rd->issuing_done = 1; break; }
            st = kvx__issue(ctx, rd, &op);
            if (st == KVX_PENDING) goto flush;
            if (st != KVX_OK) {
                if (rd->status == KVX_PENDING) rd->status = st;
                kvx__read_why(rd);
                rd->issuing_done = 1;
                break;
            }
            rd->ops_issued++;
            ctx->st.descs_posted++;
            kvx__cursor_next(rd, q->runs, q->max_runs);
        }
        if (rd->issuing_done) {
            kvx__runs_release(q);
            kvx__read_finish(rd);
        }
    }
flush:  /* what the backend staged goes now, also when it had no room for more */
    if (ctx->be_ops->flush) ctx->be_ops->flush(ctx, q);
}

KVX__PRIV kvx_status kvx__post_check(kvx_queue *q, const kvx_read *r, kvx__read *rd, uint32_t *nruns_out) {
    kvx_ctx *ctx = q->ctx;
    const kvx__cache_info *lc, *rc;
    kvx_cache *cache = r->cache;
    kvx_peer *p;
    uint32_t i, nruns, L, a, b, l0, r0;
    kvx_status st;
    for (p = ctx->peers; p && p != r->peer; p = p->next) {}
    if (!r->peer || !p) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: peer is NULL or not a peer of this context");
    if (!cache) {
        if (!ctx->ncaches) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: no cache registered");
        cache = ctx->caches[0];
    }
    for (i = 0; i < ctx->ncaches && ctx->caches[i] != cache; i++) {}
    if (i == ctx->ncaches) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: cache is not registered with this context");
    if (r->remote_cache >= p->ncaches)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: remote_cache %u, peer %s/%d has %u", r->remote_cache, p->name, p->rank, p->ncaches);
    if (p->failed) return kvx__fail(ctx, KVX_ERR_PEER, "kvx_post: peer %s/%d failed or closed earlier; add its new metadata", p->name, p->rank);
    lc = &cache->info;
    rc = &p->caches[r->remote_cache];
    if ((st = kvx__compat(ctx, lc, p, rc)) != KVX_OK) return st;
    if (ctx->be_ops->can_read && (st = ctx->be_ops->can_read(ctx, lc, p, rc)) != KVX_OK) return st;
    if (!r->num_blocks && r->notify) {  /* only a notification: no heads, blocks or layers to check */
        if (r->verify || r->remote_generations)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: a read of no blocks only notifies; it has nothing to verify or check generations of");
        memset(rd, 0, sizeof *rd);
        rd->peer = p;
        rd->lc = lc;
        rd->rc = rc;
        *nruns_out = 0;
        return KVX_OK;
    }
    if (!r->num_blocks || !r->local_blocks || !r->remote_blocks)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u blocks with local_blocks %p and remote_blocks %p%s", r->num_blocks,
                         (const void *)r->local_blocks, (const void *)r->remote_blocks,
                         r->num_blocks ? "" : " (a read of no blocks must notify)");
    L = lc->lay.num_layers;
    if (r->layer_begin >= L || r->layer_count > L - r->layer_begin)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: layers [%u, %u+%u) outside the cache's %u", r->layer_begin, r->layer_begin, r->layer_count, L);
    kvx__head_range(&lc->lay, ctx->rank, ctx->tp_size, &rc->lay, p->rank, p->tp_size, &a, &b);
    if (a == b)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: peer %s/%d (rank %d of %d) is not the source of any head of rank %d of %d",
                         p->name, p->rank, p->rank, p->tp_size, ctx->rank, ctx->tp_size);
    /* Every id checked against both layouts before anything is posted. */
    for (nruns = 0, i = 0; i < r->num_blocks; i++) {
        uint32_t l = r->local_blocks[i], rr = r->remote_blocks[i];
        if (l >= lc->lay.num_blocks)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: local block id %u at index %u is past the cache's %u blocks", l, i, lc->lay.num_blocks);
        if (rr >= rc->lay.num_blocks)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: remote block id %u at index %u is past peer %s/%d's %u blocks", rr, i, p->name, p->rank, rc->lay.num_blocks);
        if (!i || l != r->local_blocks[i - 1] + 1 || rr != r->remote_blocks[i - 1] + 1) nruns++;
    }
    /* Two reads into one local block in the same request would race: refuse.
       A bit per block, set and then cleared, under the context lock. */
    for (i = 0; i < r->num_blocks; i++) {
        uint32_t l = r->local_blocks[i];
        uint64_t bit = 1ull << (l & 63u);
        if (cache->seen[l >> 6] & bit) {
            uint32_t j;
            for (j = 0; j < i; j++) cache->seen[r->local_blocks[j] >> 6] &= ~(1ull << (r->local_blocks[j] & 63u));
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: local block id %u appears twice (again at index %u)", l, i);
        }
        cache->seen[l >> 6] |= bit;
    }
    for (i = 0; i < r->num_blocks; i++) cache->seen[r->local_blocks[i] >> 6] &= ~(1ull << (r->local_blocks[i] & 63u));
    if (nruns > q->max_runs)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u runs of block ids, the queue holds %u (kvx_queue_desc.max_runs)", nruns, q->max_runs);
    l0 = kvx__head_first(&lc->lay, ctx->rank, ctx->tp_size);
    r0 = kvx__head_first(&rc->lay, p->rank, p->tp_size);
    if (r->verify) {
        if ((!lc->csum && !lc->csum_dev) || rc->csum_region == KVX__NO_CSUM)
            return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: a verified read needs checksums on both caches (kvx_cache_desc.checksums): ours %s, peer %s/%d's %s",
                             lc->csum || lc->csum_dev ? "on" : "off", p->name, p->rank, rc->csum_region == KVX__NO_CSUM ? "off" : "on");
    }
    if (r->remote_generations && rc->gen_region == KVX__NO_CSUM)
        return kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: the read carries generations, but peer %s/%d's cache %u keeps none "
                         "(kvx_cache_desc.generations on the owner's side)", p->name, p->rank, r->remote_cache);
    memset(rd, 0, sizeof *rd);
    rd->peer = p;
    rd->lc = lc;
    rd->rc = rc;
    rd->verify = r->verify;
    rd->gen = r->remote_generations != NULL;
    rd->h_a = a; rd->h_b = b; rd->h_l0 = l0; rd->h_r0 = r0;
    kvx__geom_make(lc, l0, rc, r0, a, b, &rd->g);
    rd->layer_begin = r->layer_begin;
    rd->layer_end = r->layer_begin + (r->layer_count ? r->layer_count : L - r->layer_begin);
    *nruns_out = nruns;
    return KVX_OK;
}

/* A queue's generation rings, at its first read with generations; the
   landing ring registered (as host memory) where the backend's ops land
   there, not where the backend fetches the words itself. */
KVX__PRIV kvx_status kvx__gen_rings(kvx_queue *q, const kvx__cache_info *lc) {
    kvx_ctx *ctx = q->ctx;
    kvx__cache_info host = *lc;
    kvx_status st;
    q->gens = (uint64_t *)kvx__calloc(q->max_runs, sizeof *q->gens);
    q->gland = (uint64_t *)kvx__calloc(q->max_runs, sizeof *q->gland);
    if (!q->gens || !q->gland) st = kvx__fail(ctx, KVX_ERR_NOMEM, "kvx_post: no memory for the queue's generation words");
    else {
        q->gland_reg.addr = (uint64_t)(uintptr_t)q->gland;
        q->gland_reg.len = (uint64_t)q->max_runs * 8u;
        host.mem = KVX_MEM_HOST;
        st = ctx->be_ops->gen_fetch ? KVX_OK : ctx->be_ops->mem_register(ctx, &host, &q->gland_reg);
    }
    if (st != KVX_OK) {
        KVX_FREE(q->gens); KVX_FREE(q->gland); KVX_FREE(q->gland_reg.rkey);
        q->gens = q->gland = NULL;
        memset(&q->gland_reg, 0, sizeof q->gland_reg);
    }
    return st;
}

/* Block-outermost layouts (vLLM's BLHNC, BLNHC): where, on both sides, each
   plane's piece of a block ends where the next plane's begins (one
   registration), a block's planes go as one piece, and a run of blocks as one
   op where blocks follow each other too: one operation for every layer of a
   run of blocks instead of one per layer. Not where a backend takes the read
   whole (post_read) and walks the planes itself. */
KVX__PRIV int kvx__planes_merge(kvx_ctx *ctx, kvx__read *rd, uint32_t planes) {
    const kvx__cache_info *lc = rd->lc, *rc = rd->rc;
    uint32_t p, p0 = rd->c_plane;
    if (planes < 2 || rd->g.npieces != 1 || ctx->be_ops->post_read) return 0;
    for (p = p0; p + 1 < p0 + planes; p++)
        if (lc->plane_region[p + 1] != lc->plane_region[p] || rc->plane_region[p + 1] != rc->plane_region[p] ||
            lc->plane_base[p + 1] != lc->plane_base[p] + rd->g.piece || rc->plane_base[p + 1] != rc->plane_base[p] + rd->g.piece)
            return 0;
    rd->g.piece *= planes;
    rd->g.run_merge = rd->g.piece == lc->block_stride && rd->g.piece == rc->block_stride;
    rd->p_end = p0 + 1;
    return 1;
}

/* One read's checks and bookkeeping, with the context's lock held; it is
   issued by the kvx__pump after. *early: the earliest deadline posted. */
KVX__PRIV kvx_status kvx__post_one(kvx_queue *q, const kvx_read *r, kvx_ticket *out, uint64_t *early) {
    kvx_ctx *ctx = q->ctx;
    kvx__read tmp, *rd;
    kvx_status st;
    uint32_t nruns = 0, i, k, planes, gpad = 0;
    uint64_t per_plane_ops;
    if ((st = kvx__post_check(q, r, &tmp, &nruns)) != KVX_OK) goto out;
    rd = kvx__slot(q, q->next_ticket);
    if (rd->in_use) {
        st = kvx__full(ctx, KVX__FULL_SLOTS, q->depth, 0);
        goto out;
    }
    if (q->max_runs - q->run_used < nruns) {
        st = kvx__full(ctx, KVX__FULL_RUNS, q->run_used, q->max_runs);
        goto out;
    }
    if (tmp.gen) {
        /* a read's words are contiguous: a tail too short for them is skipped */
        gpad = q->gen_head + r->num_blocks > q->max_runs ? q->max_runs - q->gen_head : 0u;
        if (r->num_blocks > q->max_runs) {
            st = kvx__fail(ctx, KVX_ERR_ARG, "kvx_post: %u blocks with generations, the queue holds %u (kvx_queue_desc.max_runs)", r->num_blocks, q->max_runs);
            goto out;
        }
        if (!q->gens && (st = kvx__gen_rings(q, tmp.lc)) != KVX_OK) goto out;  /* once per queue */
        if (q->max_runs - q->gen_used < gpad + r->num_blocks) {
            st = kvx__full(ctx, KVX__FULL_GENS, q->gen_used, q->max_runs);
            goto out;
        }
    }
    *rd = tmp;
    rd->q = q;
    rd->ticket = q->next_ticket++;
    rd->run0 = q->run_head;
    rd->nruns = nruns;
    for (k = 0, i = 0; i < r->num_blocks; i++) {
        uint32_t l = r->local_blocks[i], rr = r->remote_blocks[i];
        if (i && l == r->local_blocks[i - 1] + 1 && rr == r->remote_blocks[i - 1] + 1) {
            q->runs[(rd->run0 + k - 1) % q->max_runs].n++;
        } else {
            kvx__run *run = &q->runs[(rd->run0 + k++) % q->max_runs];
            run->l = l; run->r = rr; run->n = 1;
        }
    }
    q->run_head = (q->run_head + nruns) % q->max_runs;
    q->run_used += nruns;
    if (rd->gen) {
        rd->g0 = gpad ? 0u : q->gen_head;
        rd->ngen = gpad + r->num_blocks;
        for (i = 0; i < r->num_blocks; i++) q->gens[rd->g0 + i] = r->remote_generations[i];
        q->gen_head = (rd->g0 + r->num_blocks) % q->max_runs;
        q->gen_used += rd->ngen;
    }
    planes = (rd->layer_end - rd->layer_begin) * rd->lc->lay.kv_planes;
    ctx->st.blocks_posted += (uint64_t)r->num_blocks * planes;
    rd->c_plane = rd->layer_begin * rd->lc->lay.kv_planes;
    rd->p_end = rd->c_plane + planes;
    if (kvx__planes_merge(ctx, rd, planes)) planes = 1;
    rd->gather = rd->rc->gather && !rd->g.run_merge && rd->g.npieces > 1;
    per_plane_ops = rd->g.run_merge ? nruns : (uint64_t)r->num_blocks * (rd->gather ? 1u : rd->g.npieces);
    rd->ops_total = per_plane_ops * planes + (rd->gen && !ctx->be_ops->gen_fetch ? nruns : 0u);
    if (rd->verify) {  /* one small read of checksums per sampled block and plane */
        rd->ops_total += (uint64_t)kvx__sample_count(rd, r->num_blocks) * planes;
        rd->v_plane = rd->layer_begin * rd->lc->lay.kv_planes;
    }
    rd->bytes = (uint64_t)r->num_blocks * rd->g.piece * (rd->g.run_merge ? 1 : rd->g.npieces) * planes;
    rd->t_post_ns = kvx__now_ns();
    rd->deadline_ns = rd->t_post_ns + (uint64_t)(r->timeout_ms ? r->timeout_ms : ctx->timeout_ms) * 1000000ull;
    rd->status = KVX_PENDING;
    rd->notify = r->notify;
    rd->notify_id = r->notify_id;
    rd->user_tag = r->user_tag;
    rd->in_use = 1;
    ctx->st.reads_posted++;
    *out = rd->ticket;
    if (!*early || rd->deadline_ns < *early) *early = rd->deadline_ns;
    if (kvx__stream) kvx__stream->read_posted(rd);
out:
    return st;
}

/* After posting: issue, and wake the progress thread, asleep, where it must
   learn of the reads' deadlines and (where ops need this context's
   progress) of their ops; a system call and a wake-up per post otherwise
   spared. */
KVX__PRIV void kvx__post_go(kvx_queue *q, uint64_t early) {
    kvx_ctx *ctx = q->ctx;
    kvx__pump(q);
    if (ctx->pt_on && ctx->be_ops->signal && ctx->pt_until &&
        (!ctx->be_ops->issues_without_progress || early < ctx->pt_until))
        ctx->be_ops->signal(ctx);
}

KVX_API kvx_status kvx_post(kvx_queue *q, const kvx_read *r, kvx_ticket *out) {
    kvx_status st;
    uint64_t early = 0;
    if (!q) return KVX_ERR_ARG;
    if (!r || !out) return kvx__fail(q->ctx, KVX_ERR_ARG, "kvx_post: read and out must not be NULL");
    *out = 0;
    pthread_mutex_lock(&q->ctx->lock);
    if ((st = kvx__post_one(q, r, out, &early)) == KVX_OK) kvx__post_go(q, early);
    pthread_mutex_unlock(&q->ctx->lock);
    return st;
}

KVX_API kvx_status kvx_post_batch(kvx_queue *q, const kvx_read *reads, uint32_t n, kvx_ticket *out, uint32_t *posted) {
    kvx_status st = KVX_OK;
    uint64_t early = 0;
    uint32_t i;
    if (posted) *posted = 0;
    if (!q) return KVX_ERR_ARG;
    if (n && (!reads || !out)) return kvx__fail(q->ctx, KVX_ERR_ARG, "kvx_post_batch: reads and out must not be NULL");
    pthread_mutex_lock(&q->ctx->lock);
    for (i = 0; i < n; i++) {
        out[i] = 0;
        if ((st = kvx__post_one(q, &reads[i], &out[i], &early)) != KVX_OK) break;
    }
    if (i) kvx__post_go(q, early);
    pthread_mutex_unlock(&q->ctx->lock);
    if (posted) *posted = i;
    return st;
}

/* A read past its deadline fails; first its operations end, so that none of
   its bytes can land after the failure is reported: by the backend where it
   can promise that without closing the peer (the peer's other reads go on),
   else by closing the peer by force. */
KVX__PRIV void kvx__read_timeout(kvx__read *rd) {
    kvx_ctx *ctx = rd->q->ctx;
    kvx_peer *p = rd->peer;
    if (rd->status == KVX_PENDING) {
        rd->status = KVX_ERR_TIMEOUT;
        kvx__fail(ctx, KVX_ERR_TIMEOUT, "read %llu from %s/%d over %s timed out after %llu ms: %llu of %llu descriptors done, %u outstanding",
                  (unsigned long long)rd->ticket, p->name, p->rank, p->transport,
                  (unsigned long long)((rd->deadline_ns - rd->t_post_ns) / 1000000ull),
                  (unsigned long long)rd->ops_done, (unsigned long long)rd->ops_total, rd->ops_out);
        kvx__read_why(rd);
    }
    rd->issuing_done = 1;
    if (rd->ops_out && ctx->be_ops->abandon) ctx->be_ops->abandon(ctx, rd);
    if (rd->ops_out) kvx__peer_close(p, KVX_ERR_TIMEOUT);
    kvx__runs_release(rd->q);
    kvx__read_finish(rd);
}

/* 0 when the ring is full. */
KVX__PRIV int kvx__notify_push(kvx_ctx *ctx, uint64_t id, kvx_status st, int rank, int tp) {
    kvx_notification *n;
    if (ctx->note_count == KVX__NOTIFY_RING) return 0;
    n = &ctx->notes[(ctx->note_head + ctx->note_count++) % KVX__NOTIFY_RING];
    n->id = id;
    n->status = st;
    n->peer_rank = rank;
    n->peer_tp_size = tp;
    return 1;
}

/* An owner's lease outlives a full ring: its notification waits in the
   lease (found arrived) until kvx_notifications makes room. Others that
   find the ring full are dropped, counted, said once a second. */
KVX__PRIV void kvx__notify_full(kvx_ctx *ctx, uint64_t id) {
    uint64_t held;
    ctx->st.notifications_dropped++;
    if ((int)KVX_LOG_ERROR <= (int)ctx->log_level && kvx__limit(&ctx->lim_late, kvx__now_ns(), &held))
        kvx__log(ctx, KVX_LOG_ERROR, "notification %llu dropped: the ring of %u is full and nothing expects it (kvx_notify_expect); "
                 "call kvx_notifications more often (%llu more dropped since the last such line)", (unsigned long long)id,
                 KVX__NOTIFY_RING, (unsigned long long)held);
}

/* Push what a lease holds, in order, while the ring has room: its arrivals,
   then, once expired, one expired notification for the readers that never
   came. 1 once it has nothing more to deliver. */
KVX__PRIV int kvx__lease_deliver(kvx_ctx *ctx, kvx__expect *e) {
    while (e->delivered < e->got) {
        if (!kvx__notify_push(ctx, e->id, KVX_OK, e->ranks[2 * e->delivered], e->ranks[2 * e->delivered + 1])) return 0;
        e->delivered++;
    }
    if (e->delivered == e->readers) return 1;
    if (!e->expired) return 0;
    if (!kvx__notify_push(ctx, e->id, KVX_ERR_TIMEOUT, -1, 0)) return 0;
    return 1;
}

KVX__PRIV void kvx__lease_end(kvx_ctx *ctx, uint32_t i) {
    KVX_FREE(ctx->expect[i].ids);
    KVX_FREE(ctx->expect[i].ranks);
    ctx->expect[i] = ctx->expect[--ctx->nexpect];
}

/* A notification from the network: taken only with this context's secret
   (anything else is dropped unanswered and counted); rank and name as the
   reader sent them, checked for sense. */
KVX__PRIV void kvx__notify_arrived(kvx_ctx *ctx, const uint8_t *buf, size_t len) {
    kvx__notify_msg m;
    uint32_t ver = 0, i;
    int e = kvx__notify_msg_read(buf, len, &m, &ver);
    if (e != KVX__WIRE_OK) {
        if (e == KVX__WIRE_VERSION)
            KVX__DROP(ctx, "a notification of version %u dropped: this kvx speaks version %u (upgrade both sides)", ver, KVX__NOTIFY_VERSION);
        else
            KVX__DROP(ctx, "a notification of %zu bytes dropped: %s", len, kvx__wire_why(e));
        return;
    }
    if (!kvx__ct_equal(m.secret, ctx->secret, KVX__SECRET_BYTES)) {
        KVX__DROP(ctx, "a notification without this context's secret dropped (id %llu, claiming %s/%u): a process without "
                  "its current metadata, or of an epoch before kvx_ctx_rotate", (unsigned long long)m.id, m.name, m.rank);
        return;
    }
    ctx->st.notifications_received++;
    for (i = 0; i < ctx->nexpect; i++)
        if (ctx->expect[i].id == m.id && !ctx->expect[i].expired && ctx->expect[i].got < ctx->expect[i].readers) break;
    if (i < ctx->nexpect) {  /* kept in its lease until the ring has room */
        kvx__expect *e = &ctx->expect[i];
        e->ranks[2 * e->got] = (int)m.rank;
        e->ranks[2 * e->got++ + 1] = (int)m.tp_size;
        if (kvx__lease_deliver(ctx, e)) kvx__lease_end(ctx, i);
        return;
    }
    /* Not expected: unless it already expired, in which case it is late and
       the owner has had its one notification. */
    for (i = 0; i < KVX__EXPIRED_MEMORY; i++)
        if (ctx->expired[i] == m.id + 1) {
            uint64_t held;
            if ((int)KVX_LOG_WARN <= (int)ctx->log_level && kvx__limit(&ctx->lim_late, kvx__now_ns(), &held))
                kvx__log(ctx, KVX_LOG_WARN, "notify id %llu from %s/%u arrived after it expired (%llu more late since the last such line)",
                         (unsigned long long)m.id, m.name, m.rank, (unsigned long long)held);
            return;
        }
    if (!kvx__notify_push(ctx, m.id, KVX_OK, (int)m.rank, (int)m.tp_size)) kvx__notify_full(ctx, m.id);
}

KVX_API kvx_status kvx_notify_expect_readers(kvx_ctx *ctx, uint64_t id, uint32_t readers, uint32_t timeout_ms,
                                             kvx_cache *cache, const uint32_t *ids, uint32_t n) {
    const char *who = cache ? "kvx_notify_expect_retire" : "kvx_notify_expect";
    uint32_t *copy = NULL, i;
    int *ranks = NULL;
    kvx_status st = KVX_OK;
    kvx__expect *e;
    if (!ctx) return KVX_ERR_ARG;
    if (!readers) readers = 1;
    if (readers > 65536u) return kvx__fail(ctx, KVX_ERR_ARG, "kvx_notify_expect_readers: %u readers, at most 65536", readers);
    pthread_mutex_lock(&ctx->lock);
    if (cache) {
        for (i = 0; i < ctx->ncaches && ctx->caches[i] != cache; i++) {}
        if (i == ctx->ncaches) { st = kvx__fail(ctx, KVX_ERR_ARG, "%s: cache is not registered with this context", who); goto out; }
        if ((st = kvx__retire_check(ctx, &cache->info, ids, n, who)) != KVX_OK) goto out;
        if (n && !(copy = (uint32_t *)KVX_MALLOC((size_t)n * sizeof *copy))) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", who); goto out; }
        if (n) memcpy(copy, ids, (size_t)n * sizeof *copy);
    }
    if (!(ranks = (int *)KVX_MALLOC((size_t)readers * 2u * sizeof *ranks))) { KVX_FREE(copy); st = kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", who); goto out; }
    if (ctx->nexpect == ctx->expect_cap) {
        uint32_t cap = ctx->expect_cap ? ctx->expect_cap * 2 : 64;
        void *nx = KVX_REALLOC(ctx->expect, (size_t)cap * sizeof *ctx->expect);
        if (!nx) { KVX_FREE(copy); KVX_FREE(ranks); st = kvx__fail(ctx, KVX_ERR_NOMEM, "%s: out of memory", who); goto out; }
        ctx->expect = (kvx__expect *)nx;
        ctx->expect_cap = cap;
    }
    e = &ctx->expect[ctx->nexpect++];
    memset(e, 0, sizeof *e);
    e->id = id;
    e->deadline_ns = kvx__now_ns() + (uint64_t)(timeout_ms ? timeout_ms : ctx->timeout_ms) * 1000000ull;
    e->readers = readers;
    e->ranks = ranks;
    e->retire = cache;
    e->ids = copy;
    e->nids = cache ? n : 0;
out:
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API kvx_status kvx_notify_expect_retire(kvx_ctx *ctx, uint64_t id, uint32_t timeout_ms,
                                            kvx_cache *cache, const uint32_t *ids, uint32_t n) {
    return kvx_notify_expect_readers(ctx, id, 1, timeout_ms, cache, ids, n);
}

KVX_API kvx_status kvx_notify_expect(kvx_ctx *ctx, uint64_t id, uint32_t timeout_ms) {
    return kvx_notify_expect_readers(ctx, id, 1, timeout_ms, NULL, NULL, 0);
}

/* One pass: transport progress, failed peers, deadlines, issuing, expiries.
   Returns the earliest deadline still ahead (0: none). */
KVX__PRIV uint64_t kvx__progress_locked(kvx_ctx *ctx, int *events) {
    kvx_queue *q;
    kvx_peer *p;
    uint64_t now, next = 0;
    uint32_t i;
    int n = ctx->be_ops->progress(ctx);
    if (events) *events = n;
    for (p = ctx->peers; p; p = p->next)
        if (p->failed && p->connected) kvx__peer_close(p, KVX_ERR_PEER);
    now = kvx__now_ns();
    for (q = ctx->queues; q; q = q->next) {
        kvx_ticket t;
        for (t = q->next_ticket > q->depth ? q->next_ticket - q->depth : 1; t < q->next_ticket; t++) {
            kvx__read *rd = kvx__slot(q, t);
            if (!rd->in_use || rd->done || rd->ticket != t) continue;
            if (now >= rd->deadline_ns) kvx__read_timeout(rd);
            else if (!next || rd->deadline_ns < next) next = rd->deadline_ns;
        }
        kvx__pump(q);
    }
    for (i = 0; i < ctx->nexpect;) {
        kvx__expect *e = &ctx->expect[i];
        if (!e->expired && e->got < e->readers && now >= e->deadline_ns) {
            e->expired = 1;
            ctx->expired[ctx->expired_head++ % KVX__EXPIRED_MEMORY] = e->id + 1;
            /* before the owner hears of it, so it cannot reuse the blocks first */
            if (e->retire && kvx__retire_blocks(ctx, &e->retire->info, e->ids, e->nids) != KVX_OK)
                KVX__LOG(ctx, KVX_LOG_ERROR, "notify id %llu expired, but its blocks could not be retired: %s", (unsigned long long)e->id, ctx->err);
        }
        if (kvx__lease_deliver(ctx, e)) { kvx__lease_end(ctx, i); continue; }
        if (!e->expired && (!next || e->deadline_ns < next)) next = e->deadline_ns;
        i++;
    }
    return next;
}

KVX_API int kvx_progress(kvx_ctx *ctx) {
    int n = 0;
    if (!ctx) return 0;
    pthread_mutex_lock(&ctx->lock);
    kvx__progress_locked(ctx, &n);
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

/* Sleep on the backend's event fd (and the wake pipe) until an event or
   until_ns. Called and returns with ctx->lock held. */
KVX__PRIV void kvx__sleep(kvx_ctx *ctx, uint64_t until_ns, int with_pipe) {
    struct pollfd pf[2];
    uint64_t now;
    int ms, nf = 0, efd;
    if (ctx->be_ops->arm(ctx) != KVX_OK) return;
    now = kvx__now_ns();
    ms = until_ns <= now ? 0 : (int)((until_ns - now + 999999) / 1000000);
    if (ms > 1000) ms = 1000;
    efd = ctx->be_ops->event_fd(ctx);
    if (efd >= 0) { pf[nf].fd = efd; pf[nf].events = POLLIN; pf[nf].revents = 0; nf++; }
    if (with_pipe) { pf[nf].fd = ctx->wake_pipe[0]; pf[nf].events = POLLIN; pf[nf].revents = 0; nf++; }
    if (with_pipe) ctx->pt_until = until_ns > now ? until_ns : now + 1;
    pthread_mutex_unlock(&ctx->lock);
    poll(pf, (nfds_t)nf, ms);
    if (with_pipe && (pf[nf - 1].revents & POLLIN)) {
        char buf[64];
        if (read(ctx->wake_pipe[0], buf, sizeof buf) < 0) { /* nothing to drain */ }
    }
    pthread_mutex_lock(&ctx->lock);
    if (with_pipe) ctx->pt_until = 0;
}

KVX__PRIV void *kvx__progress_main(void *arg) {
    kvx_ctx *ctx = (kvx_ctx *)arg;
    pthread_mutex_lock(&ctx->lock);
    while (!ctx->pt_stop) {
        int n;
        uint64_t next = kvx__progress_locked(ctx, &n);
        if (n) continue;
        kvx__sleep(ctx, next ? next : kvx__now_ns() + 1000000000ull, 1);
    }
    pthread_mutex_unlock(&ctx->lock);
    return NULL;
}

KVX__PRIV kvx_status kvx__ticket_check(kvx_queue *q, kvx_ticket t, kvx__read **out) {
    kvx__read *rd;
    if (!t || t >= q->next_ticket) return kvx__fail(q->ctx, KVX_ERR_ARG, "ticket %llu was never issued by this queue", (unsigned long long)t);
    rd = kvx__slot(q, t);
    if (rd->ticket != t || !rd->in_use)
        return kvx__fail(q->ctx, KVX_ERR_ARG, "ticket %llu is no longer held: it was reported and its slot reused", (unsigned long long)t);
    *out = rd;
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__consume(kvx_queue *q, kvx__read *rd) {
    kvx_status st = rd->status;
    if (st != KVX_OK && rd->why[0]) {  /* kvx_ctx_error: this read's */
        kvx__strlcpy(q->ctx->err, rd->why, sizeof q->ctx->err);
        q->ctx->full_kind = 0;
    }
    rd->consumed = 1;
    kvx__retire(q, rd);
    return st;
}

KVX_API kvx_status kvx_test(kvx_queue *q, kvx_ticket t) {
    kvx_ctx *ctx;
    kvx__read *rd;
    kvx_status st;
    if (!q) return KVX_ERR_ARG;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    if (!ctx->pt_on) kvx__progress_locked(ctx, NULL);
    if ((st = kvx__ticket_check(q, t, &rd)) == KVX_OK) st = rd->done ? kvx__consume(q, rd) : KVX_PENDING;
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API kvx_status kvx_wait(kvx_queue *q, kvx_ticket t, uint32_t timeout_ms) {
    kvx_ctx *ctx;
    kvx__read *rd;
    kvx_status st;
    uint64_t until;
    if (!q) return KVX_ERR_ARG;
    ctx = q->ctx;
    until = kvx__now_ns() + (uint64_t)timeout_ms * 1000000ull;
    pthread_mutex_lock(&ctx->lock);
    for (;;) {
        uint64_t next = 0, now;
        if (!ctx->pt_on) next = kvx__progress_locked(ctx, NULL);
        if ((st = kvx__ticket_check(q, t, &rd)) != KVX_OK) break;
        if (rd->done) { st = kvx__consume(q, rd); break; }
        now = kvx__now_ns();
        if (now >= until) { st = KVX_PENDING; break; }
        if (ctx->pt_on) {
            struct timespec ts;
            uint64_t wake = until < rd->deadline_ns ? until : rd->deadline_ns + 1000000ull;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            wake = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + (wake > now ? wake - now : 0);
            ts.tv_sec = (time_t)(wake / 1000000000ull);
            ts.tv_nsec = (long)(wake % 1000000000ull);
            pthread_cond_timedwait(&q->cond, &ctx->lock, &ts);
        } else {
            kvx__sleep(ctx, next && next < until ? next : until, 0);
        }
    }
    pthread_mutex_unlock(&ctx->lock);
    return st;
}

KVX_API int kvx_poll(kvx_queue *q, kvx_completion *out, int max) {
    kvx_ctx *ctx;
    int n = 0;
    if (!q || !out || max <= 0) return 0;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    if (!ctx->pt_on) kvx__progress_locked(ctx, NULL);
    while (n < max && q->done_count) {
        kvx_ticket t = q->done_fifo[q->done_head];
        kvx__read *rd = kvx__slot(q, t);
        q->done_head = (q->done_head + 1) % q->depth;
        q->done_count--;
        if (rd->ticket != t || !rd->in_use || rd->consumed) continue;
        out[n].ticket = t;
        out[n].user_tag = rd->user_tag;
        out[n].bytes = rd->bytes_done;
        out[n].status = kvx__consume(q, rd);
        out[n].error = out[n].status == KVX_OK ? NULL : rd->why;
        n++;
    }
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

/* Tear down with reads in flight: stop issuing, give what is outstanding a
   short grace (operations in flight usually finish in microseconds), then
   close the peers that still hold some by force, so that nothing lands after
   kvx_queue_destroy returns. Other queues' reads to those peers fail too
   (KVX_ERR_CANCELED): the transport cannot cancel one read. */
KVX__PRIV void kvx__queue_teardown(kvx_queue *q) {
    kvx_ctx *ctx = q->ctx;
    uint64_t grace;
    uint32_t i;
    for (i = 0; i < q->depth; i++) {
        kvx__read *rd = &q->slots[i];
        if (!rd->in_use || rd->done) continue;
        if (rd->status == KVX_PENDING) {
            rd->status = KVX_ERR_CANCELED;
            snprintf(rd->why, sizeof rd->why, "read %llu from %s/%d canceled: its queue was destroyed", (unsigned long long)rd->ticket,
                     rd->peer->name, rd->peer->rank);
        }
        rd->issuing_done = 1;
        kvx__read_finish(rd);
    }
    grace = kvx__now_ns() + KVX__CANCEL_GRACE_MS * 1000000ull;
    while (q->ops_out) {
        uint64_t now = kvx__now_ns(), until = 0;
        for (i = 0; i < q->depth; i++) {
            kvx__read *rd = &q->slots[i];
            if (rd->in_use && !rd->done && rd->ops_out && (!until || rd->deadline_ns < until)) until = rd->deadline_ns;
        }
        if (until > grace) until = grace;
        if (!until || now >= until) {
            for (i = 0; i < q->depth; i++) {
                kvx__read *rd = &q->slots[i];
                if (rd->in_use && !rd->done && rd->ops_out) kvx__peer_close(rd->peer, KVX_ERR_CANCELED);
            }
            break;
        }
        if (!ctx->be_ops->progress(ctx)) kvx__sleep(ctx, until, 0);
    }
    /* Notifications still being sent point at their slots: let them finish
       within the grace, then close their peers by force, which completes
       them, before the slots are freed. */
    for (;;) {
        int inflight = 0;
        for (i = 0; i < q->depth; i++) inflight |= q->slots[i].notify_inflight;
        if (!inflight) break;
        if (kvx__now_ns() >= grace) {
            for (i = 0; i < q->depth; i++)
                if (q->slots[i].notify_inflight) {
                    kvx__peer_close(q->slots[i].peer, KVX_ERR_CANCELED);
                    q->slots[i].notify_inflight = 0;
                }
            break;
        }
        if (!ctx->be_ops->progress(ctx)) kvx__sleep(ctx, grace, 0);
    }
}

KVX_API void kvx_queue_destroy(kvx_queue *q) {
    kvx_ctx *ctx;
    kvx_queue **pp;
    if (!q) return;
    ctx = q->ctx;
    pthread_mutex_lock(&ctx->lock);
    kvx__queue_teardown(q);
    for (pp = &ctx->queues; *pp; pp = &(*pp)->next)
        if (*pp == q) { *pp = q->next; break; }
    pthread_mutex_unlock(&ctx->lock);
    kvx__queue_close(q);
    if (q->gens && !ctx->be_ops->gen_fetch) ctx->be_ops->mem_deregister(ctx, &q->gland_reg);
    KVX_FREE(q->gland_reg.rkey);
    pthread_cond_destroy(&q->cond);
    KVX_FREE(q->slots);
    KVX_FREE(q->runs);
    KVX_FREE(q->gens);
    KVX_FREE(q->gland);
    KVX_FREE(q->done_fifo);
    KVX_FREE(q);
}

KVX_API int kvx_notifications(kvx_ctx *ctx, kvx_notification *out, int max) {
    int n = 0;
    if (!ctx || !out || max <= 0) return 0;
    pthread_mutex_lock(&ctx->lock);
    if (!ctx->pt_on) kvx__progress_locked(ctx, NULL);
    while (n < max && ctx->note_count) {
        uint32_t i;
        out[n++] = ctx->notes[ctx->note_head];
        ctx->note_head = (ctx->note_head + 1) % KVX__NOTIFY_RING;
        ctx->note_count--;
        for (i = 0; i < ctx->nexpect;)  /* what leases kept while the ring was full takes the room at once */
            if (ctx->expect[i].delivered < ctx->expect[i].got && kvx__lease_deliver(ctx, &ctx->expect[i])) kvx__lease_end(ctx, i);
            else i++;
    }
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

KVX_API void kvx_stats_get(const kvx_ctx *cctx, kvx_stats *out) {
    kvx_ctx *ctx = (kvx_ctx *)cctx; /* the lock is not part of the value */
    if (!out) return;
    if (!ctx) { memset(out, 0, sizeof *out); return; }
    pthread_mutex_lock(&ctx->lock);
    *out = ctx->st;
    pthread_mutex_unlock(&ctx->lock);
}

KVX_API kvx_status kvx_stream_wait(kvx_queue *q, kvx_ticket t, void *stream) {
    if (!q) return KVX_ERR_ARG;
    if (!kvx__stream) return kvx__fail(q->ctx, KVX_ERR_UNSUPPORTED, "kvx_stream_wait needs KVX_CUDA defined where KVX_IMPLEMENTATION is");
    return kvx__stream->wait(q, t, stream);
}

KVX_API const volatile uint64_t *kvx_stream_status_ptr(kvx_queue *q, kvx_ticket t) {
    if (!q) return NULL;
    if (!kvx__stream) {
        kvx__fail(q->ctx, KVX_ERR_UNSUPPORTED, "kvx_stream_status_ptr needs KVX_CUDA defined where KVX_IMPLEMENTATION is");
        return NULL;
    }
    return kvx__stream->status_ptr(q, t);
}

#endif /* KVX_IMPLEMENTATION */
