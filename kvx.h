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

        kvx.h          this manual and the public API; its implementation
                       part includes the rooms below
        kvx_internal.h the contract every room compiles against: internal
                       types, the backend table, what a backend may call
        kvx_core.h     the core: layouts, metadata, contexts, caches, peers,
                       queues, deadlines, notifications, progress
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
        - kvx_peer_add waits for a new peer to answer without holding the
          context: reads of other peers go on meanwhile. kvx_peer_add calls
          on one context may come from several threads; they connect one
          after another.
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
    /* Connections kvx's get spreads a peer's requests over (1 to 8), each
       reply coming back on its request's: over TCP between hosts several
       keep reads moving while one stream waits; on one host one is faster.
       Several only where both sides run UCX 1.22 or later (else one; a
       number set here is then warned about). 0: $KVX_UCX_CONNECTIONS, else
       by the peer: 4 to a peer on another host over TCP, 1 to any other. */
    uint32_t connections;
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

/* The implementation, room by room: the contract they all compile against,
   the wire formats and services, the enabled backends and their list, then
   the core, which reaches backends only through that list. */
#include "kvx_internal.h"

#include "kvx_auth.h"
#include "kvx_wire.h"
#include "kvx_verify.h"

/* The enabled backends and services: a backend is its file, included here,
   and its table's function in the list below (kvx__backend_fill), besides
   its value and name in the public kvx_backend. kvx_gpu.h (the device table
   and stream-ordered completion) serves every backend. */
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
KVX__PRIV const kvx__backend_fill kvx__backend_fills[] = {
#if defined(KVX_UCX)
    kvx__ucx_fill,
#endif
#if defined(KVX_OFI)
    kvx__ofi_fill,
#endif
#if defined(KVX_CUDA)
    kvx__cuda_fill,
#endif
    kvx__local_fill,
    NULL
};
#if !defined(KVX__STREAM_SERVICE)
#  define KVX__STREAM_SERVICE NULL
#endif
/* Not const: C++ would flag a test of a constant address. */
KVX__PRIV const kvx__stream_service *kvx__stream = KVX__STREAM_SERVICE;

#include "kvx_core.h"

#endif /* KVX_IMPLEMENTATION */
