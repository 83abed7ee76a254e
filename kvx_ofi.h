/* SPDX-License-Identifier: MIT */
/*
    kvx_ofi.h -- the libfabric backend of kvx. Included by kvx.h inside its
    implementation when KVX_OFI is defined; do not include it yourself.

    Link: pkg-config --libs libfabric   (-lfabric). Built and tested with
    libfabric 1.17 (it uses fi_tostr_r, FI_HMEM and fi_mr_regattr's iface).

    PROVIDER. kvx_ctx_desc.ofi.provider names it ("tcp", "shm", "efa", ...);
    libfabric's own $FI_PROVIDER filter applies as always; otherwise the
    first provider fi_getinfo offers wins. kvx asks for FI_EP_RDM with FI_RMA,
    FI_READ and FI_REMOTE_READ, and FI_MSG, FI_SEND, FI_RECV for
    notifications (104-byte messages: no remote CQ data is needed), plus
    kvx_ctx_desc.ofi.extra_caps. A provider without them is refused by
    kvx_ctx_create, never at the first read, and the message names the
    missing capability ("provider tcp lacks FI_MULTICAST ..."), or the
    mr_mode or mode bits kvx does not handle. Both sides must run the same
    provider: kvx_peer_add refuses a peer on another (KVX_ERR_MISMATCH).
    kvx_peer_transport() says "ofi:" and the provider opened, and "(sw)"
    where the owner's progress moves the data: "ofi:tcp;ofi_rxm (sw)",
    "ofi:shm", "ofi:efa".

    ENDPOINTS. A context opens one endpoint that peers read from: its name
    (fi_getname, with the provider's name) is the address in the metadata,
    its registrations are the remote keys, and it keeps receive buffers
    posted for notifications. For its own reads it opens one endpoint per
    peer, with its own completion queue and address vector: the unit that a
    timeout closes (below). kvx_peer_add sends the peer a zero-byte message
    and waits for it (at most the context's timeout), so a peer that is not
    there is found there, and the first read finds the connection made.

    MEMORY REGISTRATION. Every mr_mode bit a provider may ask for is handled:
        FI_MR_LOCAL      the local region's fi_mr_desc goes with every fi_read
                         (kvx passes it whether asked or not; providers that
                         do not need it ignore it), and notification buffers
                         are registered.
        FI_MR_VIRT_ADDR  remote addresses are virtual; without it they are
                         offsets from the start of the registration. The
                         owner packs which one into its remote key.
        FI_MR_ALLOCATED  kvx registers memory the engine allocated: nothing to do.
        FI_MR_PROV_KEY   keys come from fi_mr_key; otherwise kvx requests keys
                         from the kernel's random source, as wide as the
                         provider's mr_key_size (8 bytes on tcp and shm).
        FI_MR_ENDPOINT   registrations are bound to the serving endpoint and
                         enabled; with FI_MR_LOCAL (or FI_MR_HMEM) too, every
                         peer endpoint gets its own local registrations.
        FI_MR_RAW        fi_mr_raw_attr packs the raw key; the reader maps it
                         with fi_mr_map_raw and unmaps it on disconnect.
        FI_MR_HMEM       host memory is registered as FI_HMEM_SYSTEM, GPU
                         memory as FI_HMEM_CUDA, always with a descriptor.
    A remote key (kvx_wire.h) holds flags, key, base and the raw key, if
    any. tcp;ofi_rxm asks for no bit, shm for FI_MR_VIRT_ADDR.

    GPU MEMORY. A KVX_MEM_CUDA cache needs a provider that offers FI_HMEM and
    a libfabric built with CUDA. The registration itself (FI_HMEM_CUDA) is the
    trial, so a refusal comes from kvx_cache_register, KVX_ERR_UNSUPPORTED,
    naming fi_version() and the provider, never at transfer time. kvx asks
    for FI_HMEM wherever it is offered except on shm, whose FI_HMEM endpoint
    turns its CMA path off and sends host reads through bounce buffers (GPU
    caches on one host are the CUDA backend's). $KVX_OFI_HMEM=1 asks for it
    everywhere it is offered, =0 nowhere.

    EFA. What EFA asks for is met: FI_EP_RDM, provider keys, virtual
    addresses, local descriptors, FI_HMEM with FI_HMEM_CUDA registrations
    for GPU memory, FI_CONTEXT2 (each operation has its own fi_context2).
    Reads longer than ep_attr->max_msg_size are split.

    PROGRESS. The progress entry drains every completion queue. Where the
    queues have a wait fd (FI_WAIT_FD: tcp;ofi_rxm), kvx's event fd is an
    epoll set of them and arm is fi_trywait. libfabric 1.17's shm has no wait
    object: its queues refuse FI_WAIT_FD and a peer's request signals nothing
    an fd can see. There the event fd includes a timerfd that ticks every
    $KVX_OFI_TICK_US microseconds (1000 by default): a sleeping progress
    thread wakes a thousand times a second, about 3% of a core here, and
    never spins. With a wait fd the tick runs only while a post is refused
    with -FI_EAGAIN, since what frees it (rxm finishing a connection)
    signals no fd. With tcp;ofi_rxm the owner's progress serves every read.
    shm does a read itself, with process_vm_readv inside fi_read, when the
    registration uses virtual addresses, no RMA ordering is asked for (kvx
    asks for none), CMA is not turned off (FI_SHM_DISABLE_CMA, FI_HMEM) and
    the kernel lets this process read the peer's memory, which kvx checks by
    reading one byte of the peer's first region the same way; where any of it
    fails it says "(sw)", and warns once a peer with the reason (another PID
    namespace, as between two containers; ptrace rules; the settings above):
    shm then moves data through bounce buffers the owner fills, one read at
    a time a peer, each waiting for the owner's tick, about 100x slower.
    The owner still has to progress to hand back shm's command slots (1024
    reads) and to receive notifications.

    READS. One fi_read per kvx op, split into several at max_msg_size (or
    at $KVX_OFI_MAX_MSG bytes, a knob for tests), the parts of an op
    reporting one completion. Each peer endpoint has a pool of
    op and part contexts sized to its transmit queue (at most 1024, less 16
    kept for notifications), so kvx never posts more than the provider holds;
    -FI_EAGAIN, or an empty pool, is KVX_PENDING to the core, which retries
    after progress. Nothing is allocated or formatted on the success path.

    FAILURE IS FINAL. libfabric cannot cancel one RMA read: fi_cancel is
    implemented for receives only (rxm, shm), and fi_av_remove leaves
    "operations in progress" undefined. What fi_close of an endpoint is
    specified to do is discard what it holds. So disconnect closes the
    peer's own endpoint, queue and address vector and then reports every op
    it held as canceled; the next read to that peer opens a fresh endpoint
    (without the wireup wait, which would hold the context lock). Other peers
    and the serving endpoint (its address and keys) are untouched. This is
    final because the providers move data into the reader only inside the
    reader's own calls (tcp: its socket reads; shm: its process_vm_readv, or
    its copies out of bounce buffers) or by hardware bound to the closed
    queue pair (efa, verbs). A shm that let the owner write into the reader
    (process_vm_writev on the owner's side) could not be made final by kvx;
    libfabric 1.17 does not do that for the reads kvx posts.
    libfabric before 1.18 frees a partly received read response twice when a
    tcp endpoint closes (fixed upstream in 1.18), and may already have when
    the peer's connection broke. There kvx parks such an endpoint (reads out,
    or the peer failed) instead of closing it: reported as canceled all the
    same, never progressed again, it moves no data, since tcp and rxm move
    data only inside this context's own calls (no thread of theirs runs with
    manual progress); it, and its domain, stay open and unused for the life of the
    process: the memory of one endpoint (below) for each such forced close.
    Completions are counted once per operation, since that tcp can also
    report one read twice when a broken connection flushes it.
    A dead peer ends reads with KVX_ERR_PEER where the provider says so (rxm
    over tcp completes them with FI_ECANCELED, which kvx, never canceling on
    a live endpoint, takes as the connection gone; shm with FI_EIO), else
    with KVX_ERR_TIMEOUT.

    MEMORY. An endpoint costs what the provider allocates for it, once for
    the context and once per peer. rxm (1.17) fills two pools of 1024
    buffers of FI_OFI_RXM_BUFFER_SIZE bytes (16 KiB) for each: about 70 MiB
    a context and 85 MiB a peer over tcp here. kvx's own messages are 104
    bytes and reads do not use these buffers, so FI_OFI_RXM_BUFFER_SIZE=256
    brings it to about 6 MiB, where nothing else in the process relies on
    rxm's eager size. shm: about 5.5 MiB an endpoint.

    KEYS. kvx asks for keys from the kernel's random source (64 bits on tcp
    and shm), so a process without the metadata cannot guess one; tcp
    checks the key and the range of every read. shm's cma path reads (and
    its writes would write) the owner's memory with process_vm_readv and
    checks no key: any process of the same user on the host can, which the
    kernel's ptrace rules alone decide. Notifications carry the owner's
    secret (kvx.h, WHO MAY READ).

    LIMITS. shm serializes on a spinlock inside the owner's shared region: an
    owner stopped (SIGSTOP, a debugger) or killed while its progress holds it
    (a window of microseconds per pass) stalls the reader inside fi_read,
    where no kvx deadline reaches: until it resumes, or for good if it died.
    Use tcp where a dying owner must never stall a reader. One registration
    per region: a provider whose largest registration is smaller than a
    region fails at kvx_cache_register. A notification to a peer whose
    endpoint was closed is dropped; the owner's kvx_notify_expect deadline
    reports it.
*/
#ifndef KVX_OFI_INCLUDED
#define KVX_OFI_INCLUDED
#include "kvx_internal.h"
#include "kvx_auth.h"
#include "kvx_wire.h"

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef KVX_OFI_API_VERSION
#  define KVX_OFI_API_VERSION FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION)
#endif

#define KVX__OFI_CAPS (FI_MSG | FI_SEND | FI_RECV | FI_RMA | FI_READ | FI_REMOTE_READ)
#define KVX__OFI_MR_MODES (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT | FI_MR_RAW | FI_MR_HMEM)
#define KVX__OFI_NRECV 64u          /* notification receives kept posted */
#define KVX__OFI_RECV_BYTES 128u    /* more than a notification's 104, so a wrong-sized message is seen, not truncated */
#define KVX__OFI_MAX_CTX 1024u      /* op/part contexts per peer endpoint, at most */
#define KVX__OFI_IOV 16u            /* pieces of a block (NHD: tokens) per fi_readmsg, at most */
#define KVX__OFI_GROUP_BYTES (64u << 10)  /* one read's small ops (random blocks) share an fi_readmsg up to this many bytes */

/* Test seam (kvx.h, TEST SEAMS): mr_mode bits to behave as if the provider
   had asked for them (the ones that are safe to add: FI_MR_LOCAL, FI_MR_RAW). */
#if !defined(KVX_TEST_HOOK_OFI_MR_MODE)
#  define KVX_TEST_HOOK_OFI_MR_MODE 0u
#endif

/* Contexts destroyed while they held parked endpoints: their domain stays
   open for the life of the process, reachable from here. */
static struct kvx__ofi *kvx__ofi_dead;
static pthread_mutex_t kvx__ofi_dead_lock = PTHREAD_MUTEX_INITIALIZER;

enum { KVX__OFI_K_PART = 1, KVX__OFI_K_SEND = 2, KVX__OFI_K_RECV = 3 };

/* What a completion's op_context points at. The fi_context2 comes first: a
   provider in FI_CONTEXT/FI_CONTEXT2 mode owns it while the operation is out. */
typedef struct kvx__ofi_ctx {
    struct fi_context2 fc;
    uint32_t kind;
} kvx__ofi_ctx;

typedef struct kvx__ofi_op kvx__ofi_op;

/* One fi_read: an op, or a piece of an op longer than max_msg_size. */
typedef struct kvx__ofi_part {
    kvx__ofi_ctx c;
    kvx__ofi_op *op;
    struct kvx__ofi_part *next;
    int out;                    /* posted, completion not seen: a second one is ignored */
} kvx__ofi_part;

/* One kvx op: reports exactly one kvx__op_done, whatever its parts do. */
struct kvx__ofi_op {
    kvx__read *rd;
    uint64_t laddr, raddr, len, off, key;   /* raddr in the peer's addressing */
    uint64_t lstride, rstride;  /* count > 1: count pieces of len, these apart (kvx__op's gather) */
    uint32_t count, idx;        /* ... of which idx are issued, iov_max to an fi_readmsg */
    void *desc;
    uint32_t parts_out;
    int in_use, stop, queued;
    kvx_status st;
    kvx__ofi_op *next;          /* free list, or the backlog of ops with parts not yet issued */
    kvx__ofi_op *sib;           /* the next op of its group: ops that go as one fi_readmsg, one piece each */
};

typedef struct kvx__ofi_send {  /* a notification on its way (registered memory) */
    kvx__ofi_ctx c;
    uint8_t msg[KVX__NOTIFY_MSG_BYTES];
    int busy;
    kvx_queue *q;
    kvx_ticket ticket;
} kvx__ofi_send;

typedef struct kvx__ofi_note { kvx_queue *q; kvx_ticket ticket; uint8_t msg[KVX__NOTIFY_MSG_BYTES]; } kvx__ofi_note;

typedef struct kvx__ofi_recv {  /* a posted notification receive (registered memory) */
    kvx__ofi_ctx c;
    uint8_t buf[KVX__OFI_RECV_BYTES];
    int posted;
} kvx__ofi_recv;

typedef struct kvx__ofi_lmr {   /* kvx__region.be of a local region */
    struct fid_mr *mr;
    void *desc;
    uint32_t slot;
    uint64_t addr, len;
    int cuda, device;
} kvx__ofi_lmr;

typedef struct kvx__ofi_rkey {  /* kvx__region.be of a peer's region, while connected */
    uint64_t key, adj;          /* remote address = virtual address - adj */
    int mapped;                 /* FI_MR_RAW: fi_mr_map_raw'd */
} kvx__ofi_rkey;

/* Our endpoint to one peer: what a forced close takes down. */
typedef struct kvx__ofi_pep {
    kvx_peer *peer;
    struct kvx__ofi_pep *next;
    struct fid_ep *ep;
    struct fid_cq *cq;
    struct fid_av *av;
    fi_addr_t dest;
    int cq_fd;
    uint32_t nctx, nsend;
    kvx__ofi_op *ops, *op_free, *backlog, *backlog_tail;
    kvx__ofi_op *group, *group_tail;  /* staged ops of one read, not yet issued (kvx__ofi_group_issue) */
    uint32_t group_n;
    uint64_t group_bytes;
    kvx__ofi_part *parts, *part_free;
    kvx__ofi_send *sends;
    struct fid_mr *send_mr;
    void *send_desc;
    kvx__ofi_note *notes;       /* notifications waiting for a send slot */
    uint32_t note_head, note_count, note_cap;
    kvx__ofi_rkey *rkeys;
    uint32_t nrkeys;
    struct fid_mr **lmr;        /* FI_MR_ENDPOINT + FI_MR_LOCAL: our regions bound here, by slot */
    void **ldesc;
    uint32_t nl;
    int parked;                 /* left open, never progressed again (see kvx__ofi_pep_free) */
    char err[400];
} kvx__ofi_pep;

typedef struct kvx__ofi {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    int wait_fd;                /* 1: queues have FI_WAIT_FD; 0: the tick stands in */
    int epfd, evfd, tfd, cq_fd;
    int ticking, blocked;       /* the tick is armed; a post met -FI_EAGAIN since the last progress */
    uint64_t tick_ns;
    uint64_t mr_mode, max_msg, key_mask;
    uint32_t iov_max;           /* pieces per fi_readmsg: the provider's iov and rma_iov limits, at most KVX__OFI_IOV; below 2: no gather */
    uint64_t fabric_reads;      /* fi_read and fi_readmsg calls that took (the tests count them) */
    kvx__nonces keys;
    size_t tx_size;
    int hmem, sw, shm;
    uint64_t extra_caps;        /* kvx_ctx_desc.ofi.extra_caps */
    char prov[64];
    uint8_t *addr;
    uint32_t addr_len;
    kvx__ofi_recv *recvs;
    struct fid_mr *recv_mr;
    void *recv_desc;
    uint32_t recv_unposted;
    kvx__ofi_pep *peps;
    kvx__ofi_pep *parked;       /* endpoints given up on but not closed */
    int park;                   /* libfabric < 1.18 with tcp: park rather than close */
    struct kvx__ofi *next_dead; /* the process-wide list of contexts that keep parked endpoints */
    struct fid **wfids;         /* every completion queue, for fi_trywait */
    uint32_t nwfids, wfcap;
    kvx__ofi_lmr **slots;       /* local registrations by slot */
    uint32_t nslots;
} kvx__ofi;

KVX__PRIV kvx__ofi *kvx__ofi_of(kvx_ctx *ctx) { return (kvx__ofi *)ctx->be; }

KVX__PRIV kvx_status kvx__ofi_fail(kvx_ctx *ctx, kvx_status st, const char *what, int ret) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    uint32_t v = fi_version();
    return kvx__fail(ctx, st, "libfabric %u.%u%s%s: %s: %s", FI_MAJOR(v), FI_MINOR(v), o && o->prov[0] ? " provider " : "",
                     o ? o->prov : "", what, fi_strerror(ret < 0 ? -ret : ret));
}

KVX__PRIV void kvx__ofi_fid_close(struct fid *f) {
    if (f) fi_close(f);
}

KVX__PRIV char *kvx__ofi_strdup(const char *s) {
    /* fi_freeinfo frees hint strings with free(): allocate them with malloc */
    size_t n = strlen(s) + 1;
    char *d = (char *)malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* Provider status to kvx status: a broken connection means the peer is gone.
   kvx never cancels an operation on a live endpoint (a forced close reports
   its ops itself), so FI_ECANCELED is the provider tearing the connection
   down: how rxm over tcp reports a peer that died. */
KVX__PRIV kvx_status kvx__ofi_status_of(int err) {
    switch (err) {
    case FI_EACCES: case FI_EINVAL: case FI_EFAULT: case FI_ETRUNC: case FI_EMSGSIZE:
    case FI_ENOKEY: case FI_EKEYREJECTED: case FI_EBADFLAGS: case FI_EOPNOTSUPP: case FI_ENOSYS:
        return KVX_ERR_BACKEND;
    default: return KVX_ERR_PEER;
    }
}

/*--- registration ----------------------------------------------------------*/

/* A key kvx chooses (the provider lets it, without FI_MR_PROV_KEY): from
   the kernel's random source, as wide as the provider's keys, so that a
   process without the metadata cannot guess one (a pid and a counter, once,
   took 902 guesses). 0 is never used. */
KVX__PRIV uint64_t kvx__ofi_new_key(kvx__ofi *o) {
    uint64_t k = 0;
    while (!k) {
        if (kvx__random(&k, sizeof k) != 0) k = kvx__nonce(&o->keys);  /* no kernel source: the nonce stream, seeded once */
        k &= o->key_mask;
    }
    return k;
}

/* Register [addr, addr+len); FI_MR_ENDPOINT: bind to ep and enable. */
KVX__PRIV int kvx__ofi_reg(kvx__ofi *o, uint64_t addr, uint64_t len, uint64_t access, struct fid_ep *ep,
                           int cuda, int device, struct fid_mr **mr) {
    struct fi_mr_attr a;
    struct iovec iov;
    int ret, tries;
    memset(&a, 0, sizeof a);
    iov.iov_base = (void *)(uintptr_t)addr;
    iov.iov_len = (size_t)len;
    a.mr_iov = &iov;
    a.iov_count = 1;
    a.access = access;
    a.requested_key = (o->mr_mode & FI_MR_PROV_KEY) ? 0 : kvx__ofi_new_key(o);
    a.iface = cuda ? FI_HMEM_CUDA : FI_HMEM_SYSTEM;
    if (cuda) a.device.cuda = device;
    *mr = NULL;
    /* a random key that happens to be taken: another */
    for (tries = 0; (ret = fi_mr_regattr(o->domain, &a, 0, mr)) == -FI_ENOKEY && !(o->mr_mode & FI_MR_PROV_KEY) && tries < 8; tries++)
        a.requested_key = kvx__ofi_new_key(o);
    if (ret != 0) { *mr = NULL; return ret; }
    if (o->mr_mode & FI_MR_ENDPOINT) {
        if ((ret = fi_mr_bind(*mr, &ep->fid, 0)) != 0 || (ret = fi_mr_enable(*mr)) != 0) {
            fi_close(&(*mr)->fid);
            *mr = NULL;
            return ret;
        }
    }
    return 0;
}

/* FI_MR_ENDPOINT + FI_MR_LOCAL: a local descriptor is only good on the
   endpoint its registration is bound to, so each peer endpoint has its own. */
KVX__PRIV int kvx__ofi_per_ep_local(const kvx__ofi *o) {
    return (o->mr_mode & FI_MR_ENDPOINT) && (o->mr_mode & (FI_MR_LOCAL | FI_MR_HMEM));
}

KVX__PRIV int kvx__ofi_pep_lmr(kvx__ofi *o, kvx__ofi_pep *pe, uint32_t slot) {
    const kvx__ofi_lmr *lm = o->slots[slot];
    int ret;
    if (slot >= pe->nl) {
        uint32_t cap = o->nslots > slot + 1 ? o->nslots : slot + 1, i;
        struct fid_mr **m = (struct fid_mr **)kvx__calloc(cap, sizeof *m);
        void **d = (void **)kvx__calloc(cap, sizeof *d);
        if (!m || !d) { KVX_FREE(m); KVX_FREE(d); return -FI_ENOMEM; }
        for (i = 0; i < pe->nl; i++) { m[i] = pe->lmr[i]; d[i] = pe->ldesc[i]; }
        KVX_FREE(pe->lmr); KVX_FREE(pe->ldesc);
        pe->lmr = m; pe->ldesc = d; pe->nl = cap;
    }
    if ((ret = kvx__ofi_reg(o, lm->addr, lm->len, FI_READ, pe->ep, lm->cuda, lm->device, &pe->lmr[slot])) != 0) return ret;
    pe->ldesc[slot] = fi_mr_desc(pe->lmr[slot]);
    return 0;
}

KVX__PRIV void kvx__ofi_pep_lmr_drop(kvx__ofi_pep *pe, uint32_t slot) {
    if (slot < pe->nl && pe->lmr[slot]) { fi_close(&pe->lmr[slot]->fid); pe->lmr[slot] = NULL; pe->ldesc[slot] = NULL; }
}

/* GPU memory refused: said at kvx_cache_register, far from the cause, so
   the message names fi_version, the provider and what to install. */
KVX__PRIV kvx_status kvx__ofi_no_hmem(kvx_ctx *ctx) {
    const kvx__ofi *o = kvx__ofi_of(ctx);
    uint32_t v = fi_version();
    return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric %u.%u provider %s: this endpoint has no FI_HMEM (%s), so it cannot read GPU memory: "
                     "install a libfabric built with CUDA (configure --with-cuda, or the EFA installer's) and use a provider that offers FI_HMEM "
                     "(efa, verbs;ofi_rxm), or use the CUDA backend (KVX_CUDA) for GPU caches on one host",
                     FI_MAJOR(v), FI_MINOR(v), o->prov,
                     o->shm ? "kvx does not ask shm for it, since it turns shm's CMA path off; KVX_OFI_HMEM=1 asks anyway" : "the provider does not offer it");
}

/* A cache region's registration refused: for GPU memory the registration
   is the only trial of a libfabric built with CUDA, so say so. */
KVX__PRIV kvx_status kvx__ofi_reg_refused(kvx_ctx *ctx, const kvx__cache_info *ci, int ret) {
    if (ci->mem == KVX_MEM_CUDA) {
        uint32_t v = fi_version();
        return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric %u.%u provider %s refused to register CUDA memory (device %d, FI_HMEM_CUDA): %s: "
                         "install a libfabric built with CUDA support (configure --with-cuda, or the EFA installer's) or use the CUDA backend (KVX_CUDA)",
                         FI_MAJOR(v), FI_MINOR(v), kvx__ofi_of(ctx)->prov, ci->device, fi_strerror(-ret));
    }
    return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_mr_regattr of a cache region", ret);
}

/* A free slot for a new local registration, the table doubled when full:
   the slot names the region on every peer endpoint too (kvx__ofi_pep_lmr). */
KVX__PRIV kvx_status kvx__ofi_slot_new(kvx_ctx *ctx, uint32_t *slot) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    uint32_t n, i;
    for (n = 0; n < o->nslots && o->slots[n]; n++) {}
    if (n == o->nslots) {
        uint32_t cap = o->nslots ? o->nslots * 2 : 16;
        kvx__ofi_lmr **s = (kvx__ofi_lmr **)kvx__calloc(cap, sizeof *s);
        if (!s) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
        for (i = 0; i < o->nslots; i++) s[i] = o->slots[i];
        KVX_FREE(o->slots);
        o->slots = s;
        o->nslots = cap;
    }
    *slot = n;
    return KVX_OK;
}

/* The remote key peers read lm with (kvx_wire.h), into r->rkey: the raw
   key with FI_MR_RAW, else fi_mr_key, and whether addresses are virtual.
   0 or a negative libfabric error; the raw key's copy is freed either way. */
KVX__PRIV int kvx__ofi_rkey_make(const kvx__ofi *o, const kvx__ofi_lmr *lm, kvx__region *r) {
    kvx__ofi_rkey_msg km;
    uint64_t base = r->addr, key = 0;
    uint8_t *raw = NULL;
    size_t rawlen = 0;
    int ret = 0;
    if (o->mr_mode & FI_MR_RAW) {
        ret = fi_mr_raw_attr(lm->mr, &base, NULL, &rawlen, 0);
        if (ret != -FI_ETOOSMALL && ret != 0) goto out;
        if (rawlen > KVX__MAX_RKEY - KVX__OFI_RKEY_BYTES || !(raw = (uint8_t *)KVX_MALLOC(rawlen ? rawlen : 1))) { ret = -FI_ENOMEM; goto out; }
        if ((ret = fi_mr_raw_attr(lm->mr, &base, raw, &rawlen, 0)) != 0) goto out;
    } else {
        key = fi_mr_key(lm->mr);
        if (key == FI_KEY_NOTAVAIL) { ret = -FI_ENOKEY; goto out; }
    }
    memset(&km, 0, sizeof km);
    km.flags = ((o->mr_mode & FI_MR_VIRT_ADDR) ? KVX__OFI_RKEY_VIRT : 0) | ((o->mr_mode & FI_MR_RAW) ? KVX__OFI_RKEY_RAW : 0);
    km.key = key;
    km.base = base;
    km.raw = raw;
    km.raw_len = (uint32_t)rawlen;
    r->rkey_len = (uint32_t)kvx__ofi_rkey_write(NULL, 0, &km);
    r->rkey = (uint8_t *)KVX_MALLOC(r->rkey_len);
    if (!r->rkey) { r->rkey_len = 0; ret = -FI_ENOMEM; goto out; }
    kvx__ofi_rkey_write(r->rkey, r->rkey_len, &km);
out:
    KVX_FREE(raw);
    return ret;
}

/* FI_MR_ENDPOINT + FI_MR_LOCAL: a new region registered on every peer
   endpoint too. Where one refuses, those done are dropped again, so the
   caller has only its own registration to undo. */
KVX__PRIV int kvx__ofi_lmr_peps(kvx__ofi *o, uint32_t slot) {
    kvx__ofi_pep *pe, *q;
    int ret;
    for (pe = o->peps; pe; pe = pe->next)
        if ((ret = kvx__ofi_pep_lmr(o, pe, slot)) != 0) {
            for (q = o->peps; q != pe; q = q->next) kvx__ofi_pep_lmr_drop(q, slot);
            return ret;
        }
    return 0;
}

KVX__PRIV kvx_status kvx__ofi_mem_register(kvx_ctx *ctx, const kvx__cache_info *ci, kvx__region *r) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_lmr *lm;
    uint32_t slot = 0;
    int ret, cuda = ci->mem == KVX_MEM_CUDA, published = 0;
    kvx_status st;
    if (cuda && !o->hmem) return kvx__ofi_no_hmem(ctx);
    if ((st = kvx__ofi_slot_new(ctx, &slot)) != KVX_OK) return st;
    lm = (kvx__ofi_lmr *)kvx__calloc(1, sizeof *lm);
    if (!lm) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    lm->slot = slot; lm->addr = r->addr; lm->len = r->len; lm->cuda = cuda; lm->device = ci->device;
    if ((ret = kvx__ofi_reg(o, r->addr, r->len, FI_READ | FI_REMOTE_READ, o->ep, cuda, ci->device, &lm->mr)) != 0) {
        st = kvx__ofi_reg_refused(ctx, ci, ret);
        goto fail;
    }
    lm->desc = fi_mr_desc(lm->mr);
    if ((ret = kvx__ofi_rkey_make(o, lm, r)) != 0) {
        st = kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "remote key of a cache region (fi_mr_key / fi_mr_raw_attr)", ret);
        goto fail;
    }
    o->slots[slot] = lm;
    r->be = lm;
    published = 1;
    if (kvx__ofi_per_ep_local(o) && (ret = kvx__ofi_lmr_peps(o, slot)) != 0) {
        st = kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_mr_regattr of a cache region on a peer endpoint (FI_MR_ENDPOINT)", ret);
        goto fail;
    }
    return KVX_OK;
fail:
    /* Undone newest first, each step only where it was done (kvx__ofi_reg
       leaves lm->mr NULL when it fails). */
    if (published) {
        o->slots[slot] = NULL;
        r->be = NULL;
        KVX_FREE(r->rkey);
        r->rkey = NULL;
        r->rkey_len = 0;
    }
    if (lm->mr) fi_close(&lm->mr->fid);
    KVX_FREE(lm);
    return st;
}

KVX__PRIV void kvx__ofi_mem_deregister(kvx_ctx *ctx, kvx__region *r) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_lmr *lm = (kvx__ofi_lmr *)r->be;
    kvx__ofi_pep *pe;
    if (!lm) return;
    for (pe = o->peps; pe; pe = pe->next) kvx__ofi_pep_lmr_drop(pe, lm->slot);
    o->slots[lm->slot] = NULL;
    fi_close(&lm->mr->fid);
    KVX_FREE(lm);
    r->be = NULL;
}

/*--- endpoints ---------------------------------------------------------------*/

/* fi_trywait needs every queue at once. Sized to fit, so that memory goes
   back to where it was when peers go (a smaller array is only kept when
   there is no memory for a new one). */
KVX__PRIV kvx_status kvx__ofi_wait_rebuild(kvx__ofi *o) {
    kvx__ofi_pep *pe;
    uint32_t n = 1;
    for (pe = o->peps; pe; pe = pe->next) n++;
    if (n != o->wfcap) {
        struct fid **f = (struct fid **)kvx__calloc(n, sizeof *f);
        if (!f && n > o->wfcap) return KVX_ERR_NOMEM;
        if (f) {
            KVX_FREE(o->wfids);
            o->wfids = f;
            o->wfcap = n;
        }
    }
    n = 0;
    o->wfids[n++] = &o->cq->fid;
    for (pe = o->peps; pe; pe = pe->next) o->wfids[n++] = &pe->cq->fid;
    o->nwfids = n;
    return KVX_OK;
}

/* An endpoint with its own queue and address vector, enabled. */
KVX__PRIV int kvx__ofi_ep_open(kvx__ofi *o, size_t av_count, struct fid_ep **ep, struct fid_cq **cq, struct fid_av **av, int *fd) {
    struct fi_cq_attr ca;
    struct fi_av_attr aa;
    int ret;
    size_t sz = o->info->tx_attr->size + o->info->rx_attr->size;
    *ep = NULL; *cq = NULL; *av = NULL; *fd = -1;
    memset(&ca, 0, sizeof ca);
    ca.format = FI_CQ_FORMAT_MSG;
    ca.size = sz;   /* room for every operation either queue can hold */
    ca.wait_obj = o->wait_fd ? FI_WAIT_FD : FI_WAIT_NONE;
    if ((ret = fi_cq_open(o->domain, &ca, cq, NULL)) != 0) return ret;
    if (o->wait_fd && (ret = fi_control(&(*cq)->fid, FI_GETWAIT, fd)) != 0) return ret;
    memset(&aa, 0, sizeof aa);
    aa.type = o->info->domain_attr->av_type;
    aa.count = av_count;
    if ((ret = fi_av_open(o->domain, &aa, av, NULL)) != 0) return ret;
    if ((ret = fi_endpoint(o->domain, o->info, ep, NULL)) != 0) return ret;
    if ((ret = fi_ep_bind(*ep, &(*av)->fid, 0)) != 0) return ret;
    if ((ret = fi_ep_bind(*ep, &(*cq)->fid, FI_TRANSMIT | FI_RECV)) != 0) return ret;
    return fi_enable(*ep);
}

KVX__PRIV void kvx__ofi_epoll(kvx__ofi *o, int fd, int add) {
    struct epoll_event e;
    if (fd < 0 || o->epfd < 0) return;
    memset(&e, 0, sizeof e);
    e.events = EPOLLIN;
    e.data.fd = fd;
    epoll_ctl(o->epfd, add ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, fd, &e);
}

/* The tick: always on without a wait object; with one, only while a post is
   blocked on -FI_EAGAIN, since what unblocks it (rxm finishing a connection)
   does not always signal the queue's fd. */
KVX__PRIV void kvx__ofi_tick(kvx__ofi *o, int on) {
    struct itimerspec its;
    if (on == o->ticking) return;
    memset(&its, 0, sizeof its);
    if (on) {
        its.it_interval.tv_sec = (time_t)(o->tick_ns / 1000000000u);
        its.it_interval.tv_nsec = (long)(o->tick_ns % 1000000000u);
        its.it_value = its.it_interval;
    }
    timerfd_settime(o->tfd, 0, &its, NULL);
    o->ticking = on;
}

/* The notification receives: posted once, reposted after each completion. */
KVX__PRIV void kvx__ofi_repost(kvx__ofi *o) {
    uint32_t i;
    if (!o->recv_unposted) return;
    for (i = 0; i < KVX__OFI_NRECV; i++) {
        kvx__ofi_recv *rv = &o->recvs[i];
        ssize_t ret;
        if (rv->posted) continue;
        ret = fi_recv(o->ep, rv->buf, sizeof rv->buf, o->recv_desc, FI_ADDR_UNSPEC, &rv->c);
        if (ret) break;   /* -FI_EAGAIN: again at the next progress */
        rv->posted = 1;
        o->recv_unposted--;
    }
}

KVX__PRIV void kvx__ofi_close(kvx_ctx *ctx);
KVX__PRIV void kvx__ofi_pep_free(kvx_ctx *ctx, kvx__ofi_pep *pe, const char *why);

/* Which required capabilities no provider (of the one named) has, in words. */
KVX__PRIV kvx_status kvx__ofi_refuse(kvx_ctx *ctx, const struct fi_info *hints, uint64_t extra) {
    static const uint64_t all_mr = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_MMU_NOTIFY |
                                   FI_MR_RMA_EVENT | FI_MR_ENDPOINT | FI_MR_HMEM | FI_MR_RAW | FI_MR_COLLECTIVE;
    struct fi_info *h = fi_dupinfo(hints), *fi = NULL;
    uint64_t need = hints->caps, bit, missing = 0;
    const char *pn = hints->fabric_attr && hints->fabric_attr->prov_name ? hints->fabric_attr->prov_name : NULL;
    const char *env = getenv("FI_PROVIDER");
    char who[160], a[400], b[400];
    uint32_t v = fi_version();
    kvx_status st = KVX_ERR_UNSUPPORTED;
    if (!h) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    if (pn) snprintf(who, sizeof who, "provider %s%s%s%s", pn, env ? " (with FI_PROVIDER=" : "", env ? env : "", env ? ")" : "");
    else snprintf(who, sizeof who, "no provider%s%s%s", env ? " (FI_PROVIDER=" : "", env ? env : "", env ? ")" : "");
    h->caps = 0;
    h->mode = ~0ull;
    h->domain_attr->mr_mode = (int)all_mr;
    h->domain_attr->threading = FI_THREAD_UNSPEC;
    if (fi_getinfo(KVX_OFI_API_VERSION, NULL, NULL, 0, h, &fi) != 0 || !fi) {
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric %u.%u: %s %s FI_EP_RDM endpoints here (fi_info -t FI_EP_RDM lists the providers that do)",
                       FI_MAJOR(v), FI_MINOR(v), who, pn ? "offers no" : "offers");
        goto out;
    }
    fi_freeinfo(fi);
    fi = NULL;
    for (bit = 1; bit; bit <<= 1) {
        struct fi_info *one = NULL;
        if (!(need & bit)) continue;
        h->caps = bit;
        if (fi_getinfo(KVX_OFI_API_VERSION, NULL, NULL, 0, h, &one) != 0 || !one) missing |= bit;
        fi_freeinfo(one);
    }
    if (missing) {
        fi_tostr_r(a, sizeof a, &missing, FI_TYPE_CAPS);
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric %u.%u: %s %s %s with FI_EP_RDM endpoints, which %s",
                       FI_MAJOR(v), FI_MINOR(v), who, pn ? "lacks" : "offers", a,
                       (missing & extra) == missing ? "kvx_ctx_desc.ofi.extra_caps asks for"
                                                    : "kvx needs (FI_RMA, FI_READ, FI_REMOTE_READ for reads; FI_MSG, FI_SEND, FI_RECV for notifications)");
        goto out;
    }
    h->caps = need;
    if (fi_getinfo(KVX_OFI_API_VERSION, NULL, NULL, 0, h, &fi) != 0 || !fi) {
        fi_tostr_r(a, sizeof a, &need, FI_TYPE_CAPS);
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric %u.%u: %s %s the capabilities %s together with FI_EP_RDM endpoints (each one alone, yes)",
                       FI_MAJOR(v), FI_MINOR(v), who, pn ? "lacks" : "offers", a);
        goto out;
    }
    {
        uint64_t mr = (uint64_t)fi->domain_attr->mr_mode, mode = fi->mode;
        fi_tostr_r(a, sizeof a, &mr, FI_TYPE_MR_MODE);
        fi_tostr_r(b, sizeof b, &mode, FI_TYPE_MODE);
        st = kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric %u.%u: provider %s has the capabilities but asks for mr_mode [%s] and mode [%s]; "
                       "kvx handles mr_mode FI_MR_LOCAL, FI_MR_VIRT_ADDR, FI_MR_ALLOCATED, FI_MR_PROV_KEY, FI_MR_ENDPOINT, FI_MR_RAW, FI_MR_HMEM "
                       "and mode FI_CONTEXT, FI_CONTEXT2", FI_MAJOR(v), FI_MINOR(v), fi->fabric_attr->prov_name, a, b);
    }
out:
    fi_freeinfo(fi);
    fi_freeinfo(h);
    return st;
}

/* Ask for FI_HMEM where the provider offers it, except shm (see the top). */
KVX__PRIV int kvx__ofi_want_hmem(const struct fi_info *fi, int hmem) {
    const char *e = getenv("KVX_OFI_HMEM");
    if (hmem) return hmem > 0;
    if (e && *e) return strcmp(e, "0") != 0;
    return strcmp(fi->fabric_attr->prov_name, "shm") != 0;
}

KVX__PRIV void kvx__ofi_query(const kvx_ctx *ctx, kvx_ctx_desc *out) {
    const kvx__ofi *o = (const kvx__ofi *)ctx->be;
    out->ofi.provider = o->prov;
    out->ofi.extra_caps = o->extra_caps;
    out->ofi.hmem = o->hmem ? 1 : -1;
    out->ofi.max_msg = o->max_msg;
    out->ofi.tick_us = (uint32_t)(o->tick_ns / 1000u);
}

/* The provider: fi_getinfo for what kvx asks, then the same provider and
   domain again with FI_HMEM where it is wanted. The hints are freed on
   every path; on success *out is fi_getinfo's list, for the caller to free. */
KVX__PRIV kvx_status kvx__ofi_getinfo(kvx_ctx *ctx, const kvx_ctx_desc *desc, struct fi_info **out) {
    struct fi_info *hints, *fi = NULL;
    kvx_status st = KVX_OK;
    *out = NULL;
    if (!(hints = fi_allocinfo())) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    hints->caps = KVX__OFI_CAPS | desc->ofi.extra_caps;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode = (int)KVX__OFI_MR_MODES;
    hints->domain_attr->threading = FI_THREAD_DOMAIN; /* kvx serializes every call under the context lock */
    if (desc->ofi.provider && *desc->ofi.provider && !(hints->fabric_attr->prov_name = kvx__ofi_strdup(desc->ofi.provider))) {
        st = kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
        goto out;
    }
    if (fi_getinfo(KVX_OFI_API_VERSION, NULL, NULL, 0, hints, &fi) != 0 || !fi) {
        st = kvx__ofi_refuse(ctx, hints, desc->ofi.extra_caps);
        goto out;
    }
    if (!(hints->caps & FI_HMEM) && kvx__ofi_want_hmem(fi, desc->ofi.hmem)) {
        /* Same provider and domain, with FI_HMEM: taken where offered. */
        struct fi_info *h2 = NULL;
        hints->caps |= FI_HMEM;
        free(hints->fabric_attr->prov_name);
        hints->fabric_attr->prov_name = kvx__ofi_strdup(fi->fabric_attr->prov_name);
        free(hints->domain_attr->name);
        hints->domain_attr->name = kvx__ofi_strdup(fi->domain_attr->name);
        if (hints->fabric_attr->prov_name && hints->domain_attr->name &&
            fi_getinfo(KVX_OFI_API_VERSION, NULL, NULL, 0, hints, &h2) == 0 && h2) {
            fi_freeinfo(fi);
            fi = h2;
        }
    }
    *out = fi;
out:
    fi_freeinfo(hints);
    return st;
}

/* What the chosen info settles before anything is opened: the provider's
   name and quirks, mr_mode and key width, how reads are split. A provider
   without RMA is refused here, with nothing of it open yet. */
KVX__PRIV kvx_status kvx__ofi_limits(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    struct fi_info *fi = o->info;
    const char *e;
    /* kvx needs no ordering, and shm does a read itself only when no RMA ordering is asked for. */
    fi->tx_attr->msg_order &= FI_ORDER_SAS;
    fi->rx_attr->msg_order &= FI_ORDER_SAS;
    kvx__strlcpy(o->prov, fi->fabric_attr->prov_name, sizeof o->prov);
    o->shm = !strcmp(o->prov, "shm");
    o->park = fi_version() < FI_VERSION(1, 18) && (!strncmp(o->prov, "tcp", 3) || !strncmp(o->prov, "net", 3));
    o->hmem = (fi->caps & FI_HMEM) != 0;
    o->mr_mode = (uint64_t)fi->domain_attr->mr_mode | ((uint64_t)(KVX_TEST_HOOK_OFI_MR_MODE) & (FI_MR_LOCAL | FI_MR_RAW));
    o->key_mask = fi->domain_attr->mr_key_size >= 8 || !fi->domain_attr->mr_key_size ? ~0ull : (1ull << (8 * fi->domain_attr->mr_key_size)) - 1;
    if (kvx__nonces_init(&o->keys) != 0) return kvx__fail(ctx, KVX_ERR_BACKEND, "ofi: no random bytes from the kernel for keys");
    o->max_msg = fi->ep_attr->max_msg_size ? (uint64_t)fi->ep_attr->max_msg_size : (1ull << 30);
    /* Reads split smaller than the provider asks (tests use it): the desc, else $KVX_OFI_MAX_MSG. */
    if (desc->ofi.max_msg && desc->ofi.max_msg < o->max_msg) o->max_msg = desc->ofi.max_msg;
    else if (!desc->ofi.max_msg && (e = getenv("KVX_OFI_MAX_MSG")) != NULL && strtoull(e, NULL, 10) > 0 && strtoull(e, NULL, 10) < o->max_msg)
        o->max_msg = strtoull(e, NULL, 10);
    o->tx_size = fi->tx_attr->size ? fi->tx_attr->size : 256;
    if (fi->tx_attr->rma_iov_limit < 1) return kvx__fail(ctx, KVX_ERR_UNSUPPORTED, "libfabric provider %s: rma_iov_limit 0: no RMA", o->prov);
    o->iov_max = (uint32_t)(fi->tx_attr->iov_limit < fi->tx_attr->rma_iov_limit ? fi->tx_attr->iov_limit : fi->tx_attr->rma_iov_limit);
    if (o->iov_max > KVX__OFI_IOV) o->iov_max = KVX__OFI_IOV;
    return KVX_OK;
}

/* The fabric, the domain and the serving endpoint. Whether queues can have
   a wait fd is tried first, on a queue opened and closed for it, since
   every queue after it is opened the same way. */
KVX__PRIV kvx_status kvx__ofi_serve_open(kvx_ctx *ctx) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    struct fi_cq_attr ca;
    struct fid_cq *t = NULL;
    int ret;
    if ((ret = fi_fabric(o->info->fabric_attr, &o->fabric, NULL)) != 0) return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_fabric", ret);
    if ((ret = fi_domain(o->fabric, o->info, &o->domain, NULL)) != 0) return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_domain", ret);
    /* A queue with a wait fd if the provider has one; shm 1.17 has none. */
    o->wait_fd = 1;
    memset(&ca, 0, sizeof ca);
    ca.format = FI_CQ_FORMAT_MSG;
    ca.wait_obj = FI_WAIT_FD;
    if (fi_cq_open(o->domain, &ca, &t, NULL) != 0) o->wait_fd = 0;
    else fi_close(&t->fid);
    if ((ret = kvx__ofi_ep_open(o, 16, &o->ep, &o->cq, &o->av, &o->cq_fd)) != 0)
        return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "opening the serving endpoint (fi_cq_open, fi_av_open, fi_endpoint, fi_enable)", ret);
    return KVX_OK;
}

/* The address peers read from, in the metadata: the serving endpoint's
   fi_getname with the provider's name beside it, since both sides must run
   the same provider. The name's copy is freed on every path. */
KVX__PRIV kvx_status kvx__ofi_addr_make(kvx_ctx *ctx) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_addr_msg am;
    uint8_t *name = NULL;
    size_t nlen = 0;
    kvx_status st = KVX_OK;
    int ret;
    ret = fi_getname(&o->ep->fid, NULL, &nlen);
    if (ret == -FI_ETOOSMALL) ret = 0;  /* the size query's usual answer */
    if (!ret && (!nlen || nlen > KVX__MAX_ADDR - 256)) ret = -FI_EINVAL;
    if (ret) { st = kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_getname", ret); goto out; }
    if (!(name = (uint8_t *)KVX_MALLOC(nlen))) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory"); goto out; }
    if ((ret = fi_getname(&o->ep->fid, name, &nlen)) != 0) { st = kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_getname", ret); goto out; }
    /* Address (kvx_wire.h): provider name, endpoint name. */
    memset(&am, 0, sizeof am);
    kvx__strlcpy(am.prov, o->prov, sizeof am.prov);
    am.name = name;
    am.name_len = (uint32_t)nlen;
    o->addr_len = (uint32_t)kvx__ofi_addr_write(NULL, 0, &am);
    if (!(o->addr = (uint8_t *)KVX_MALLOC(o->addr_len))) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory"); goto out; }
    kvx__ofi_addr_write(o->addr, o->addr_len, &am);
out:
    KVX_FREE(name);
    return st;
}

/* Notification receives, in registered memory for FI_MR_LOCAL, posted
   before any peer can send: a peer's wireup is one of them. */
KVX__PRIV kvx_status kvx__ofi_recvs_open(kvx_ctx *ctx) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    uint32_t i;
    int ret;
    o->recvs = (kvx__ofi_recv *)kvx__calloc(KVX__OFI_NRECV, sizeof *o->recvs);
    if (!o->recvs) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    if ((ret = kvx__ofi_reg(o, (uint64_t)(uintptr_t)o->recvs, KVX__OFI_NRECV * sizeof *o->recvs, FI_RECV, o->ep, 0, 0, &o->recv_mr)) != 0)
        return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_mr_regattr of the notification buffers", ret);
    o->recv_desc = fi_mr_desc(o->recv_mr);
    for (i = 0; i < KVX__OFI_NRECV; i++) o->recvs[i].c.kind = KVX__OFI_K_RECV;
    o->recv_unposted = KVX__OFI_NRECV;
    kvx__ofi_repost(o);
    return KVX_OK;
}

/* The event fd: an epoll set of the queues' wait fds (or the tick) and
   kvx's own wakeup, so that a progress thread can sleep on one fd. */
KVX__PRIV kvx_status kvx__ofi_events_open(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    const char *e;
    uint32_t tick_us = 1000;
    if (desc->ofi.tick_us) tick_us = desc->ofi.tick_us;
    else if ((e = getenv("KVX_OFI_TICK_US")) != NULL && atoi(e) > 0) tick_us = (uint32_t)atoi(e);
    o->epfd = epoll_create1(EPOLL_CLOEXEC);
    o->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    o->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (o->epfd < 0 || o->evfd < 0 || o->tfd < 0)
        return kvx__fail(ctx, KVX_ERR_BACKEND, "ofi: epoll_create1/eventfd/timerfd_create: %s", strerror(errno));
    o->tick_ns = (uint64_t)tick_us * 1000u;
    o->extra_caps = desc->ofi.extra_caps;
    kvx__ofi_epoll(o, o->evfd, 1);
    kvx__ofi_epoll(o, o->tfd, 1);
    if (o->wait_fd) kvx__ofi_epoll(o, o->cq_fd, 1);
    else kvx__ofi_tick(o, 1);
    if (kvx__ofi_wait_rebuild(o) != KVX_OK) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    return KVX_OK;
}

/* What was opened, in one line at KVX_LOG_INFO: the first thing to read
   when a provider behaves unlike another. */
KVX__PRIV void kvx__ofi_log_open(kvx_ctx *ctx) {
    const kvx__ofi *o = kvx__ofi_of(ctx);
    const struct fi_info *fi = o->info;
    char mr[200];
    uint64_t m = o->mr_mode;
    uint32_t v = fi_version();
    fi_tostr_r(mr, sizeof mr, &m, FI_TYPE_MR_MODE);
    kvx__log(ctx, KVX_LOG_INFO, "libfabric %u.%u provider %s, fabric %s, domain %s, mr_mode [%s], max_msg_size %llu, tx queue %zu, %s%s",
             FI_MAJOR(v), FI_MINOR(v), o->prov, fi->fabric_attr->name, fi->domain_attr->name, mr, (unsigned long long)o->max_msg,
             o->tx_size, o->wait_fd ? "sleeps on FI_WAIT_FD" : "no wait object: progress ticks", o->hmem ? ", FI_HMEM" : "");
}

KVX__PRIV kvx_status kvx__ofi_open(kvx_ctx *ctx, const kvx_ctx_desc *desc) {
    kvx__ofi *o;
    struct fi_info *fi = NULL;
    kvx_status st;
    o = (kvx__ofi *)kvx__calloc(1, sizeof *o);
    if (!o) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    ctx->be = o;
    o->epfd = o->evfd = o->tfd = o->cq_fd = -1;
    if ((st = kvx__ofi_getinfo(ctx, desc, &fi)) != KVX_OK) goto fail;
    o->info = fi_dupinfo(fi);   /* the first fits; keep it alone */
    fi_freeinfo(fi);
    if (!o->info) { st = kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory"); goto fail; }
    if ((st = kvx__ofi_limits(ctx, desc)) != KVX_OK) goto fail;
    if ((st = kvx__ofi_serve_open(ctx)) != KVX_OK) goto fail;
    if ((st = kvx__ofi_addr_make(ctx)) != KVX_OK) goto fail;
    if ((st = kvx__ofi_recvs_open(ctx)) != KVX_OK) goto fail;
    if ((st = kvx__ofi_events_open(ctx, desc)) != KVX_OK) goto fail;
    /* Reads served by the owner's progress: sockets and datagrams moved by software. */
    o->sw = o->info->domain_attr->data_progress != FI_PROGRESS_AUTO &&
            (!strncmp(o->prov, "tcp", 3) || !strncmp(o->prov, "sockets", 7) || !strncmp(o->prov, "udp", 3) ||
             !strncmp(o->prov, "net", 3) || strstr(o->prov, "ofi_rxd") != NULL);
    if (KVX_LOG_INFO <= (int)ctx->log_level) kvx__ofi_log_open(ctx);
    return KVX_OK;
fail:
    /* One way out for every step above: kvx__ofi_close takes down what was
       made (the endpoint before the buffers it may still fill, the domain
       last) and skips what was not (NULL handles, fds of -1). */
    kvx__ofi_close(ctx);
    return st;
}

KVX__PRIV void kvx__ofi_close(kvx_ctx *ctx) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    uint32_t i;
    if (!o) return;
    while (o->peps) kvx__ofi_pep_free(ctx, o->peps, "the context was destroyed");
    /* The endpoint first: after it nothing is posted to the buffers below. */
    if (o->ep) fi_close(&o->ep->fid);
    if (o->recv_mr) fi_close(&o->recv_mr->fid);
    for (i = 0; i < o->nslots; i++)
        if (o->slots[i]) { fi_close(&o->slots[i]->mr->fid); KVX_FREE(o->slots[i]); }
    if (o->cq) fi_close(&o->cq->fid);
    if (o->av) fi_close(&o->av->fid);
    if (o->epfd >= 0) close(o->epfd);
    if (o->evfd >= 0) close(o->evfd);
    if (o->tfd >= 0) close(o->tfd);
    KVX_FREE(o->recvs);
    KVX_FREE(o->addr);
    KVX_FREE(o->wfids);
    KVX_FREE(o->slots);
    ctx->be = NULL;
    if (o->parked) {
        /* Parked endpoints keep the domain open: it and they stay, unused. */
        pthread_mutex_lock(&kvx__ofi_dead_lock);
        o->next_dead = kvx__ofi_dead;
        kvx__ofi_dead = o;
        pthread_mutex_unlock(&kvx__ofi_dead_lock);
        return;
    }
    if (o->domain) fi_close(&o->domain->fid);
    if (o->fabric) fi_close(&o->fabric->fid);
    if (o->info) fi_freeinfo(o->info);
    KVX_FREE(o);
}

KVX__PRIV kvx_status kvx__ofi_address(kvx_ctx *ctx, const uint8_t **addr, uint32_t *len) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    *addr = o->addr;
    *len = o->addr_len;
    return KVX_OK;
}

/*--- peers -------------------------------------------------------------------*/

/* Can this process read the peer's memory with process_vm_readv, as shm's
   CMA path does (and its own check)? Reads one byte of the peer's first
   host region: 0 where it can, else why not: an errno, or -1 (no host cache
   to try, or not Linux). */
KVX__PRIV int kvx__ofi_cma_errno(const kvx_peer *p) {
#if defined(__linux__) && defined(_GNU_SOURCE)
    uint32_t c;
    uint8_t b;
    struct iovec l, r;
    for (c = 0; c < p->ncaches; c++) {
        if (p->caches[c].mem != KVX_MEM_HOST || !p->caches[c].nregions) continue;
        l.iov_base = &b;
        l.iov_len = 1;
        r.iov_base = (void *)(uintptr_t)p->caches[c].regions[0].addr;
        r.iov_len = 1;
        errno = 0;
        return process_vm_readv((pid_t)p->pid, &l, 1, &r, 1, 0) == 1 ? 0 : errno ? errno : -1;
    }
#else
    (void)p;
#endif
    return -1;
}

/* Drop a notification that will not be sent: release its read's slot if
   the read is still there (its queue may be gone). */
KVX__PRIV void kvx__ofi_note_release(kvx_ctx *ctx, kvx_queue *q, kvx_ticket t) {
    kvx_queue *x;
    for (x = ctx->queues; x; x = x->next)
        if (x == q) {
            kvx__read *rd = &q->slots[t % q->depth];
            if (rd->ticket == t && rd->in_use && rd->notify_inflight) kvx__notify_sent(rd);
            return;
        }
}

/* A closing endpoint's reads fail and its notifications are dropped, said. */
KVX__PRIV void kvx__ofi_pep_cancel(kvx_ctx *ctx, kvx__ofi_pep *pe, const char *why) {
    kvx_peer *p = pe->peer;
    uint32_t i, dropped = 0;
    for (i = 0; i < pe->nctx; i++)
        if (pe->ops && pe->ops[i].in_use) {
            pe->ops[i].in_use = 0;
            kvx__op_done(pe->ops[i].rd, KVX_ERR_CANCELED, why);
        }
    for (i = 0; pe->sends && i < pe->nsend; i++)
        if (pe->sends[i].busy) {
            pe->sends[i].busy = 0;
            if (!pe->sends[i].q) continue;  /* the wireup message */
            dropped++;
            kvx__ofi_note_release(ctx, pe->sends[i].q, pe->sends[i].ticket);
        }
    for (i = 0; pe->notes && i < pe->note_count; i++) {
        kvx__ofi_note *n = &pe->notes[(pe->note_head + i) % pe->note_cap];
        dropped++;
        kvx__ofi_note_release(ctx, n->q, n->ticket);
    }
    if (dropped) KVX__LOG(ctx, KVX_LOG_WARN, "ofi: %u notifications to %s/%d dropped: %s", dropped, p->name, p->rank, why);
}

KVX__PRIV void kvx__ofi_pep_free(kvx_ctx *ctx, kvx__ofi_pep *pe, const char *why) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_pep **pp;
    kvx_peer *p = pe->peer;
    uint32_t i, c, k;
    for (pp = &o->peps; *pp; pp = &(*pp)->next)
        if (*pp == pe) { *pp = pe->next; break; }
    kvx__ofi_wait_rebuild(o);
    kvx__ofi_epoll(o, pe->cq_fd, 0);
    /* libfabric before 1.18: its tcp provider frees a partly received read
       response twice when the endpoint closes (fixed upstream in 1.18, "prov/
       tcp: Suspicion of bug where RX entry is freed twice"), and may already
       have done so when the peer's connection broke. So there an endpoint
       with reads out, or to a failed peer, is parked instead: never
       progressed again it moves no data (tcp and rxm move data only inside
       our own calls: no thread of theirs runs with manual progress), and it
       stays open, unused, for the life of the process. */
    for (i = 0; o->park && pe->ep && !pe->parked && i < pe->nctx; i++)
        if ((pe->ops && pe->ops[i].in_use) || p->failed) pe->parked = 1;
    if (pe->parked) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ofi: the endpoint to %s/%d is parked, not closed: libfabric %u.%u's tcp cannot close one "
                 "with a read partly received (fixed in 1.18)", p->name, p->rank, FI_MAJOR(fi_version()), FI_MINOR(fi_version()));
    } else {
        /* Close the endpoint first: libfabric discards what it held, and
           from here on nothing of this peer can land in our memory. */
        kvx__ofi_fid_close(pe->ep ? &pe->ep->fid : NULL);
        kvx__ofi_fid_close(pe->cq ? &pe->cq->fid : NULL);
        kvx__ofi_fid_close(pe->av ? &pe->av->fid : NULL);
    }
    kvx__ofi_pep_cancel(ctx, pe, why);
    for (k = 0, c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++, k++) {
            if (pe->rkeys && k < pe->nrkeys && pe->rkeys[k].mapped && !pe->parked) fi_mr_unmap_key(o->domain, pe->rkeys[k].key);
            p->caches[c].regions[i].be = NULL;
        }
    if (p->be == pe) p->be = NULL;
    pe->peer = NULL;
    if (pe->parked) {
        /* The provider still holds our contexts and registrations: keep them. */
        pe->next = o->parked;
        o->parked = pe;
        return;
    }
    for (i = 0; i < pe->nl; i++) kvx__ofi_pep_lmr_drop(pe, i);
    kvx__ofi_fid_close(pe->send_mr ? &pe->send_mr->fid : NULL);
    KVX_FREE(pe->ops); KVX_FREE(pe->parts); KVX_FREE(pe->sends); KVX_FREE(pe->notes);
    KVX_FREE(pe->rkeys); KVX_FREE(pe->lmr); KVX_FREE(pe->ldesc);
    KVX_FREE(pe);
}

/* Close by force: the peer's endpoint goes, so nothing it held can land. */
KVX__PRIV void kvx__ofi_disconnect(kvx_ctx *ctx, kvx_peer *p) {
    if (!p->be) return;
    kvx__ofi_pep_free(ctx, (kvx__ofi_pep *)p->be, "the endpoint to the peer was closed by force (a timeout, a failure or a removal)");
}

KVX__PRIV int kvx__ofi_drain(kvx_ctx *ctx, struct fid_cq *cq, kvx__ofi_pep *pe);

/* Wireup: a zero-byte message to the peer's serving endpoint, waited for
   (sleeping on the queue's fd, or 1 ms naps without one) until the
   context's timeout. A peer that is not there is then found by
   kvx_peer_add, and the reads that follow find the connection made. */
KVX__PRIV kvx_status kvx__ofi_wireup(kvx_ctx *ctx, kvx__ofi_pep *pe) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_send *s = &pe->sends[0];
    kvx_peer *p = pe->peer;
    uint64_t until = kvx__now_ns() + (uint64_t)ctx->timeout_ms * 1000000ull;
    ssize_t ret = -FI_EAGAIN;
    int sent = 0;
    s->q = NULL;
    s->ticket = 0;
    for (;;) {
        uint64_t now;
        if (!sent) {
            ret = fi_send(pe->ep, s->msg, 0, pe->send_desc, pe->dest, &s->c);
            if (ret == 0) { sent = 1; s->busy = 1; }
            else if (ret != -FI_EAGAIN) break;
        }
        if (kvx__ofi_drain(ctx, pe->cq, pe)) continue;
        if (sent && !s->busy) break;
        if (p->failed) break;
        if ((now = kvx__now_ns()) >= until) break;
        if (o->wait_fd) {
            struct fid *f = &pe->cq->fid;
            struct pollfd pf;
            pf.fd = pe->cq_fd; pf.events = POLLIN; pf.revents = 0;
            /* not sent yet: rxm finishing the connection signals no fd, so 1 ms */
            int ms = !sent ? 1 : (until - now) / 1000000u > 100 ? 100 : (int)((until - now) / 1000000u) + 1;
            if (fi_trywait(o->fabric, &f, 1) == FI_SUCCESS) kvx__wait_poll(ctx, &pf, 1, ms);
        } else {
            kvx__wait_poll(ctx, NULL, 0, 1);
        }
    }
    if (sent && !s->busy && !p->failed) return KVX_OK;
    if (p->failed || (ret && ret != -FI_EAGAIN)) {
        return kvx__fail(ctx, KVX_ERR_PEER, "ofi: connecting to %s/%d (pid %u on %s): %s", p->name, p->rank, p->pid, p->host,
                         pe->err[0] ? pe->err : fi_strerror((int)-ret));
    }
    return kvx__fail(ctx, KVX_ERR_TIMEOUT, "ofi: %s/%d (pid %u on %s) did not answer the connection within %u ms over %s",
                     p->name, p->rank, p->pid, p->host, ctx->timeout_ms, o->prov);
}

/* The peer's address comes from the network: kvx_wire.h checks every
   length, and this says which way it does not fit (version, kind, form,
   provider), each with the status the core expects of it. */
KVX__PRIV kvx_status kvx__ofi_addr_check(kvx_ctx *ctx, const kvx_peer *p, kvx__ofi_addr_msg *am) {
    const kvx__ofi *o = kvx__ofi_of(ctx);
    uint32_t ver;
    int e;
    e = kvx__ofi_addr_read(p->addr, p->addr_len, am, &ver);
    if (e == KVX__WIRE_VERSION && (ver & 0xffu) == 1u) ver = 1;  /* version 1 kept it in one byte, the provider name's length beside it */
    if (e == KVX__WIRE_VERSION)
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "ofi: the address of %s/%d is libfabric address version %u, this kvx speaks version %u",
                         p->name, p->rank, ver, KVX__OFI_ADDR_VERSION);
    if (e == KVX__WIRE_MAGIC || e == KVX__WIRE_TYPE || (e == KVX__WIRE_TRUNCATED && p->addr_len < KVX__WIRE_HDR_BYTES))
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "ofi: the address of %s/%d is not a kvx libfabric address (%u bytes)", p->name, p->rank, p->addr_len);
    if (e != KVX__WIRE_OK)
        return kvx__fail(ctx, KVX_ERR_ARG, "ofi: the address of %s/%d is malformed (%s; endpoint name of %u bytes in %u)", p->name, p->rank,
                         e == KVX__WIRE_FIELD ? "an empty endpoint name or a provider name with a 0 byte" : kvx__wire_why(e), am->name_len, p->addr_len);
    if (strcmp(am->prov, o->prov))
        return kvx__fail(ctx, KVX_ERR_MISMATCH, "ofi: %s/%d runs libfabric provider %s, this context %s: give both sides the same provider "
                         "(kvx_ctx_desc.ofi.provider or FI_PROVIDER)", p->name, p->rank, am->prov, o->prov);
    return KVX_OK;
}

/* A peer endpoint's pools of op, part and send contexts, so that kvx never
   posts more than the provider holds, threaded on their free lists, and its
   remote key and notification tables. What was allocated before a failure
   is the caller's kvx__ofi_pep_free to release. */
KVX__PRIV kvx_status kvx__ofi_pep_pools(kvx_ctx *ctx, kvx__ofi_pep *pe) {
    const kvx__ofi *o = kvx__ofi_of(ctx);
    const kvx_peer *p = pe->peer;
    uint32_t i, c;
    /* Contexts sized to the transmit queue; a few of it kept for notifications. */
    pe->nsend = o->tx_size >= 64 ? 16 : (uint32_t)(o->tx_size / 4 ? o->tx_size / 4 : 1);
    pe->nctx = (uint32_t)(o->tx_size > KVX__OFI_MAX_CTX ? KVX__OFI_MAX_CTX : o->tx_size);
    pe->nctx = pe->nctx > pe->nsend ? pe->nctx - pe->nsend : 1;
    for (pe->nrkeys = 0, c = 0; c < p->ncaches; c++) pe->nrkeys += p->caches[c].nregions;
    pe->ops = (kvx__ofi_op *)kvx__calloc(pe->nctx, sizeof *pe->ops);
    pe->parts = (kvx__ofi_part *)kvx__calloc(pe->nctx, sizeof *pe->parts);
    pe->sends = (kvx__ofi_send *)kvx__calloc(pe->nsend, sizeof *pe->sends);
    pe->rkeys = (kvx__ofi_rkey *)kvx__calloc(pe->nrkeys ? pe->nrkeys : 1, sizeof *pe->rkeys);
    pe->note_cap = 64;
    pe->notes = (kvx__ofi_note *)kvx__calloc(pe->note_cap, sizeof *pe->notes);
    if (!pe->ops || !pe->parts || !pe->sends || !pe->rkeys || !pe->notes) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    for (i = 0; i < pe->nctx; i++) {
        pe->ops[i].next = i + 1 < pe->nctx ? &pe->ops[i + 1] : NULL;
        pe->parts[i].c.kind = KVX__OFI_K_PART;
        pe->parts[i].next = i + 1 < pe->nctx ? &pe->parts[i + 1] : NULL;
    }
    pe->op_free = pe->ops;
    pe->part_free = pe->parts;
    for (i = 0; i < pe->nsend; i++) pe->sends[i].c.kind = KVX__OFI_K_SEND;
    return KVX_OK;
}

/* The peer endpoint itself: endpoint, queue and address vector, watched by
   the event fd and fi_trywait, the peer's address inserted, and the
   notification send buffers registered on it. A failure leaves what was
   opened in pe, for kvx__ofi_pep_free. */
KVX__PRIV kvx_status kvx__ofi_pep_open(kvx_ctx *ctx, kvx__ofi_pep *pe, const kvx__ofi_addr_msg *am) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    const kvx_peer *p = pe->peer;
    int ret;
    if ((ret = kvx__ofi_ep_open(o, 1, &pe->ep, &pe->cq, &pe->av, &pe->cq_fd)) != 0)
        return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "opening an endpoint to a peer (fi_cq_open, fi_av_open, fi_endpoint, fi_enable)", ret);
    kvx__ofi_epoll(o, pe->cq_fd, 1);
    if (kvx__ofi_wait_rebuild(o) != KVX_OK) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    if ((ret = fi_av_insert(pe->av, am->name, 1, &pe->dest, 0, NULL)) != 1) {
        char what[400];
        snprintf(what, sizeof what, "fi_av_insert of %s/%d (pid %u on %s)", p->name, p->rank, p->pid, p->host);
        return kvx__ofi_fail(ctx, KVX_ERR_PEER, what, ret < 0 ? ret : -FI_EINVAL);
    }
    if ((ret = kvx__ofi_reg(o, (uint64_t)(uintptr_t)pe->sends, pe->nsend * sizeof *pe->sends, FI_SEND, pe->ep, 0, 0, &pe->send_mr)) != 0)
        return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_mr_regattr of the notification send buffers", ret);
    pe->send_desc = fi_mr_desc(pe->send_mr);
    return KVX_OK;
}

/* The peer's remote keys, one per region, from the network (kvx_wire.h
   checks every length), mapped with fi_mr_map_raw where raw; each region's
   be points at its key while connected. A failure leaves the keys mapped
   so far marked, for kvx__ofi_pep_free to unmap. */
KVX__PRIV kvx_status kvx__ofi_rkeys_map(kvx_ctx *ctx, kvx__ofi_pep *pe) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx_peer *p = pe->peer;
    uint32_t i, c, k, ver;
    int ret, e;
    for (k = 0, c = 0; c < p->ncaches; c++)
        for (i = 0; i < p->caches[c].nregions; i++, k++) {
            kvx__region *r = &p->caches[c].regions[i];
            kvx__ofi_rkey *rk = &pe->rkeys[k];
            kvx__ofi_rkey_msg km;
            if ((e = kvx__ofi_rkey_read(r->rkey, r->rkey_len, &km, &ver)) != KVX__WIRE_OK) {
                if (e == KVX__WIRE_VERSION)
                    return kvx__fail(ctx, KVX_ERR_MISMATCH, "ofi: remote key of %s/%d cache %u region %u: libfabric remote key version %u, this kvx speaks version %u",
                                     p->name, p->rank, c, i, ver, KVX__OFI_RKEY_VERSION);
                return kvx__fail(ctx, KVX_ERR_ARG, "ofi: remote key of %s/%d cache %u region %u is malformed (%s, %u bytes)", p->name, p->rank, c, i,
                                 kvx__wire_why(e), r->rkey_len);
            }
            rk->adj = (km.flags & KVX__OFI_RKEY_VIRT) ? 0 : r->addr;
            if (km.flags & KVX__OFI_RKEY_RAW) {
                if ((ret = fi_mr_map_raw(o->domain, km.base, r->rkey + (km.raw - r->rkey), km.raw_len, &rk->key, 0)) != 0) {
                    char what[160];
                    snprintf(what, sizeof what, "fi_mr_map_raw of %s/%d cache %u region %u", p->name, p->rank, c, i);
                    return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, what, ret);
                }
                rk->mapped = 1;
            } else {
                rk->key = km.key;
            }
            r->be = rk;
        }
    return KVX_OK;
}

/* kvx_peer_transport's words: "(sw)" where the owner's progress moves the
   data, a software provider or shm where its CMA path cannot run. shm
   without CMA is said loudly, once a peer (warn): each read there waits on
   the owner's progress tick, one at a time, about 100x slower than CMA. */
KVX__PRIV void kvx__ofi_transport_say(kvx_ctx *ctx, const kvx__ofi *o, kvx_peer *p, int warn) {
    int sw = o->sw, e = 0;
    char nocma_why[160];
    nocma_why[0] = 0;
    if (o->shm) {
        const char *nocma = getenv("FI_SHM_DISABLE_CMA");
        int cma = !nocma || !*nocma || !strchr("1tTyY", nocma[0]) || !strcmp(nocma, "0");
        if (nocma && (!strcmp(nocma, "on") || !strcmp(nocma, "ON"))) cma = 0;
        if (!cma) snprintf(nocma_why, sizeof nocma_why, "FI_SHM_DISABLE_CMA=%s turns it off", nocma);
        else if (!(o->mr_mode & FI_MR_VIRT_ADDR)) snprintf(nocma_why, sizeof nocma_why, "the registrations do not use virtual addresses");
        else if (o->hmem) snprintf(nocma_why, sizeof nocma_why, "FI_HMEM registrations (KVX_OFI_HMEM=1) turn it off");
        else if ((e = kvx__ofi_cma_errno(p)) != 0)
            snprintf(nocma_why, sizeof nocma_why, "process_vm_readv of pid %u's memory fails here (%s): another PID namespace, or "
                     "ptrace rules (kernel.yama.ptrace_scope, CAP_SYS_PTRACE)", p->pid, e > 0 ? strerror(e) : "no host cache to try");
        sw = nocma_why[0] != 0;
    }
    snprintf(p->transport, sizeof p->transport, "ofi:%s%s", o->prov, sw ? " (sw)" : "");
    snprintf(p->why, sizeof p->why, "libfabric %s is the provider %s (kvx_ofi_desc.provider or FI_PROVIDER, else the first that fits)%s%s",
             o->prov, "in use", sw ? "; it emulates RMA in software, so reads are served by the owner's progress" : "",
             nocma_why[0] ? " (shm's CMA path cannot run: " : "");
    if (nocma_why[0]) {  /* appended, not a %s above: the why may be cut short, which GCC's -Wformat-truncation refuses */
        kvx__strlcpy(p->why + strlen(p->why), nocma_why, sizeof p->why - strlen(p->why));
        kvx__strlcpy(p->why + strlen(p->why), ")", sizeof p->why - strlen(p->why));
    }
    if (warn && nocma_why[0])
        KVX__LOG(ctx, KVX_LOG_WARN, "ofi: shm reads %s/%d without CMA, since %s: each read goes through shm's bounce buffers, one at a "
                 "time, and waits for the owner's progress tick (KVX_OFI_TICK_US): about 100x slower; FI_PROVIDER=tcp is faster "
                 "between such processes", p->name, p->rank, nocma_why);
}

KVX__PRIV kvx_status kvx__ofi_connect(kvx_ctx *ctx, kvx_peer *p) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_pep *pe;
    kvx_peer *q;
    kvx__ofi_addr_msg am;
    uint32_t i, c;
    int ret;
    kvx_status st;
    p->be = NULL;
    if ((st = kvx__ofi_addr_check(ctx, p, &am)) != KVX_OK) return st;
    pe = (kvx__ofi_pep *)kvx__calloc(1, sizeof *pe);
    if (!pe) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory");
    pe->peer = p;
    pe->cq_fd = -1;
    if ((st = kvx__ofi_pep_pools(ctx, pe)) != KVX_OK) goto fail;
    /* Insert into the list now, so a failure below is undone by kvx__ofi_pep_free. */
    pe->next = o->peps;
    o->peps = pe;
    p->be = pe;
    if ((st = kvx__ofi_pep_open(ctx, pe, &am)) != KVX_OK) goto fail;
    if ((st = kvx__ofi_rkeys_map(ctx, pe)) != KVX_OK) goto fail;
    /* A block's pieces (NHD: one per token), and a read's small blocks, go
       in fi_readmsg's of up to iov_max ranges, where the provider takes them
       and no piece is split ($KVX_OFI_GATHER=0: one fi_read each, for
       comparison). Not on shm: 1.17 reads one remote range itself
       (process_vm_readv) but sends several as a command that the owner
       serves from its progress, on a 1 ms tick (100x slower). */
    {
        const char *g = getenv("KVX_OFI_GATHER");
        for (c = 0; c < p->ncaches; c++)
            p->caches[c].gather = o->iov_max >= 2 && o->max_msg >= (1u << 20) && !o->shm && p->caches[c].mem == KVX_MEM_HOST && !(g && !strcmp(g, "0"));
    }
    if (kvx__ofi_per_ep_local(o))
        for (i = 0; i < o->nslots; i++)
            if (o->slots[i] && (ret = kvx__ofi_pep_lmr(o, pe, i)) != 0) {
                st = kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_mr_regattr of a cache region on a peer endpoint (FI_MR_ENDPOINT)", ret);
                goto fail;
            }
    /* Wireup when the peer is added; a reconnect (the core calls connect
       again after a forced close) does not wait here, under the context
       lock: its reads make the connection and their deadlines bound it. */
    for (q = ctx->peers; q && q != p; q = q->next) {}
    if (!q && (st = kvx__ofi_wireup(ctx, pe)) != KVX_OK) goto fail;
    kvx__ofi_transport_say(ctx, o, p, !q);
    return KVX_OK;
fail:
    /* Safe at every step: a pep not yet in the list, or half open. */
    kvx__ofi_pep_free(ctx, pe, "the connection failed");
    return st;
}

/*--- reads -------------------------------------------------------------------*/

/* Issue the parts of x not yet out, as many as the pool and the provider
   take. 0: all out; 1: no part context free (completions will free one);
   -FI_EAGAIN: the provider has no room now; another error: it failed. */
/* Parts of x not yet issued? */
KVX__PRIV int kvx__ofi_more(const kvx__ofi_op *x) { return x->count > 1 ? x->idx < x->count : x->off < x->len; }

/* Ranges of one fi_readmsg, each read into its own place, in order. */
typedef struct kvx__ofi_ranges {
    struct iovec iov[KVX__OFI_IOV];
    void *descs[KVX__OFI_IOV];
    struct fi_rma_iov riov[KVX__OFI_IOV];
    uint32_t n;
} kvx__ofi_ranges;

KVX__PRIV void kvx__ofi_range_add(kvx__ofi_ranges *r, uint64_t laddr, uint64_t raddr, uint64_t len, void *desc, uint64_t key) {
    uint32_t i = r->n++;
    r->iov[i].iov_base = (void *)(uintptr_t)laddr;
    r->iov[i].iov_len = (size_t)len;
    r->descs[i] = desc;
    r->riov[i].addr = raddr;
    r->riov[i].len = (size_t)len;
    r->riov[i].key = key;
}

KVX__PRIV ssize_t kvx__ofi_readmsg(kvx__ofi_pep *pe, kvx__ofi_ranges *r, kvx__ofi_part *pt) {
    struct fi_msg_rma msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = r->iov;
    msg.desc = r->descs;
    msg.iov_count = r->n;
    msg.addr = pe->dest;
    msg.rma_iov = r->riov;
    msg.rma_iov_count = r->n;
    msg.context = &pt->c;
    return fi_readmsg(pe->ep, &msg, 0);
}

/* Post pt, the next part of x: its next max_msg bytes by fi_read, or for a
   gathered op its next iov_max pieces by fi_readmsg; *step: what it took. */
KVX__PRIV ssize_t kvx__ofi_post_part(const kvx__ofi *o, kvx__ofi_pep *pe, kvx__ofi_op *x, kvx__ofi_part *pt, uint64_t *step) {
    kvx__ofi_ranges r;
    uint32_t k = x->count - x->idx, i;
    if (x->count <= 1) {
        uint64_t n = x->len - x->off;
        *step = n = n > o->max_msg ? o->max_msg : n;
        return fi_read(pe->ep, (void *)(uintptr_t)(x->laddr + x->off), (size_t)n, x->desc, pe->dest, x->raddr + x->off, x->key, &pt->c);
    }
    if (x->len > o->max_msg) return -FI_EMSGSIZE;  /* gather is off where pieces could need splitting (kvx__ofi_connect) */
    if (k > o->iov_max) k = o->iov_max;
    for (r.n = 0, i = 0; i < k; i++)
        kvx__ofi_range_add(&r, x->laddr + (uint64_t)(x->idx + i) * x->lstride, x->raddr + (uint64_t)(x->idx + i) * x->rstride, x->len,
                           x->desc, x->key);
    *step = k;
    return kvx__ofi_readmsg(pe, &r, pt);
}

KVX__PRIV int kvx__ofi_issue(kvx__ofi *o, kvx__ofi_pep *pe, kvx__ofi_op *x) {
    while (!x->stop && kvx__ofi_more(x)) {
        kvx__ofi_part *pt = pe->part_free;
        uint64_t step = 0;
        ssize_t ret;
        if (!pt) return 1;
        pt->op = x;
        if ((ret = kvx__ofi_post_part(o, pe, x, pt, &step)) != 0) return (int)ret;
        o->fabric_reads++;
        pt->out = 1;
        pe->part_free = pt->next;
        if (x->count > 1) x->idx += (uint32_t)step;
        else x->off += step;
        x->parts_out++;
    }
    return 0;
}

KVX__PRIV void kvx__ofi_backlog_unlink(kvx__ofi_pep *pe, kvx__ofi_op *x) {
    kvx__ofi_op **pp, *prev = NULL;
    for (pp = &pe->backlog; *pp; prev = *pp, pp = &(*pp)->next)
        if (*pp == x) {
            *pp = x->next;
            if (pe->backlog_tail == x) pe->backlog_tail = prev;
            break;
        }
    x->queued = 0;
}

/* Every part is back (or stopped): the op's one completion. */
KVX__PRIV void kvx__ofi_op_finish(kvx__ofi_pep *pe, kvx__ofi_op *x) {
    kvx__read *rd = x->rd;
    kvx_status st = x->st;
    if (x->queued) kvx__ofi_backlog_unlink(pe, x);
    x->in_use = 0;
    x->next = pe->op_free;
    pe->op_free = x;
    kvx__op_done(rd, st, st == KVX_OK ? NULL : pe->err);
}

/* The staged group as one fi_readmsg: each op one piece, in order. 0:
   issued (or nothing staged); 1: no part context free; -FI_EAGAIN: no room
   now (the group stays staged). Any other failure fails the group's ops. */
KVX__PRIV int kvx__ofi_group_issue(kvx__ofi *o, kvx__ofi_pep *pe) {
    kvx__ofi_ranges r;
    kvx__ofi_part *pt = pe->part_free;
    kvx__ofi_op *x, *nx;
    ssize_t ret;
    if (!pe->group) return 0;
    if (!pt) return 1;
    for (r.n = 0, x = pe->group; x; x = x->sib) kvx__ofi_range_add(&r, x->laddr, x->raddr, x->len, x->desc, x->key);
    ret = kvx__ofi_readmsg(pe, &r, pt);
    if (ret == -FI_EAGAIN) { o->blocked = 1; return (int)ret; }
    x = pe->group;
    pe->group = pe->group_tail = NULL;
    pe->group_n = 0;
    pe->group_bytes = 0;
    if (ret) {
        snprintf(pe->err, sizeof pe->err, "fi_readmsg: %s", fi_strerror((int)-ret));
        for (; x; x = nx) {
            nx = x->sib;
            x->st = KVX_ERR_BACKEND;
            kvx__ofi_op_finish(pe, x);
        }
        return (int)ret;
    }
    o->fabric_reads++;
    pt->op = x;
    pt->out = 1;
    pe->part_free = pt->next;
    for (; x; x = x->sib) {
        x->off = x->len;
        x->parts_out = 1;
    }
    return 0;
}

/* The most bytes a group holds: KVX__OFI_GROUP_BYTES, within max_msg. */
KVX__PRIV uint64_t kvx__ofi_group_cap(const kvx__ofi *o) { return o->max_msg < KVX__OFI_GROUP_BYTES ? o->max_msg : KVX__OFI_GROUP_BYTES; }

/* x into the staged group, issuing the group first where x's read differs
   (one failure fails one read's ops only) or x would overfill it. */
KVX__PRIV kvx_status kvx__ofi_group_add(kvx__ofi *o, kvx__ofi_pep *pe, kvx__ofi_op *x) {
    if (pe->group && (pe->group->rd != x->rd || pe->group_n == o->iov_max || pe->group_bytes + x->len > kvx__ofi_group_cap(o))) {
        int ret = kvx__ofi_group_issue(o, pe);
        if (ret == 1 || ret == -FI_EAGAIN) return KVX_PENDING;
    }
    pe->op_free = x->next;
    x->in_use = 1;
    x->next = NULL;
    if (pe->group_tail) pe->group_tail->sib = x;
    else pe->group = x;
    pe->group_tail = x;
    pe->group_n++;
    pe->group_bytes += x->len;
    return KVX_OK;
}

KVX__PRIV kvx_status kvx__ofi_post(kvx_ctx *ctx, kvx__read *rd, const kvx__op *op) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_pep *pe = (kvx__ofi_pep *)rd->peer->be;
    const kvx__ofi_lmr *lm = (const kvx__ofi_lmr *)KVX__OP_LREGION(rd, op)->be;
    const kvx__ofi_rkey *rk = (const kvx__ofi_rkey *)rd->rc->regions[op->rreg].be;
    kvx__ofi_op *x;
    int ret;
    if (!pe || !rk) return kvx__fail(ctx, KVX_ERR_PEER, "ofi: read %llu: %s/%d is not connected", (unsigned long long)rd->ticket, rd->peer->name, rd->peer->rank);
    /* No context (completions will free one), or older parts wait first. */
    if (!(x = pe->op_free) || pe->backlog) return KVX_PENDING;
    x->rd = rd;
    x->laddr = op->laddr;
    x->raddr = op->raddr - rk->adj;
    x->len = op->len;
    x->off = 0;
    x->count = op->count > 1 ? op->count : 0;
    x->idx = 0;
    x->lstride = op->lstride;
    x->rstride = op->rstride;
    x->key = rk->key;
    x->desc = pe->ldesc && lm->slot < pe->nl && pe->ldesc[lm->slot] ? pe->ldesc[lm->slot] : lm->desc;
    x->parts_out = 0;
    x->stop = 0;
    x->queued = 0;
    x->st = KVX_OK;
    x->sib = NULL;
    /* A small one-piece op where the peer's cache gathers (host memory, a
       provider with iov and rma_iov limits of 2 or more) waits for others
       of its read, to go in one fi_readmsg at the end of the post. */
    if (rd->rc->gather && op->count <= 1 && op->len * 2 <= kvx__ofi_group_cap(o)) return kvx__ofi_group_add(o, pe, x);
    ret = kvx__ofi_issue(o, pe, x);
    if (ret == -FI_EAGAIN) o->blocked = 1;
    if (!x->parts_out) {
        if (ret == -FI_EAGAIN || ret == 1) return KVX_PENDING;
        return kvx__ofi_fail(ctx, KVX_ERR_BACKEND, "fi_read", ret);
    }
    pe->op_free = x->next;
    x->in_use = 1;
    x->next = NULL;
    if (ret < 0 && ret != -FI_EAGAIN) {
        /* Some parts are out: the op fails when they are back. */
        x->st = KVX_ERR_BACKEND;
        x->stop = 1;
        snprintf(pe->err, sizeof pe->err, "fi_read: %s", fi_strerror(-ret));
    } else if (kvx__ofi_more(x)) {
        x->queued = 1;
        if (pe->backlog_tail) pe->backlog_tail->next = x;
        else pe->backlog = x;
        pe->backlog_tail = x;
    }
    return KVX_OK;
}

/* Parts of split ops that did not fit earlier, oldest first. */
KVX__PRIV int kvx__ofi_backlog_run(kvx__ofi_pep *pe, kvx__ofi *o) {
    int n = 0;
    if (pe->group) {   /* a group that found no room at the end of its post */
        int ret = kvx__ofi_group_issue(o, pe);
        if (ret == 1 || ret == -FI_EAGAIN) return 0;
        n++;
    }
    while (pe->backlog) {
        kvx__ofi_op *x = pe->backlog;
        if (!x->stop) {
            uint32_t before = x->parts_out;
            int ret = kvx__ofi_issue(o, pe, x);
            n += (int)(x->parts_out - before);
            if (ret == -FI_EAGAIN) { o->blocked = 1; break; }
            if (ret == 1) break;
            if (ret) {
                x->st = KVX_ERR_BACKEND;
                x->stop = 1;
                snprintf(pe->err, sizeof pe->err, "fi_read: %s", fi_strerror(-ret));
            }
        }
        kvx__ofi_backlog_unlink(pe, x);
        if (x->stop && !x->parts_out) kvx__ofi_op_finish(pe, x);
    }
    return n;
}

/* A part is back: its op's, or each op of its group. */
KVX__PRIV void kvx__ofi_part_done(kvx__ofi_pep *pe, kvx__ofi_part *pt, kvx_status st) {
    kvx__ofi_op *x, *nx;
    pt->next = pe->part_free;
    pe->part_free = pt;
    for (x = pt->op; x; x = nx) {
        nx = x->sib;
        x->parts_out--;
        if (st != KVX_OK && x->st == KVX_OK) { x->st = st; x->stop = 1; }
        if (x->parts_out || (kvx__ofi_more(x) && !x->stop)) continue;
        kvx__ofi_op_finish(pe, x);
    }
}

/* The end of a post: each peer's staged group goes. */
KVX__PRIV void kvx__ofi_flush(kvx_ctx *ctx, kvx_queue *q) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_pep *pe;
    (void)q;
    for (pe = o->peps; pe; pe = pe->next) kvx__ofi_group_issue(o, pe);
}

/*--- notifications -----------------------------------------------------------*/

/* 0: sent or dropped for good; -FI_EAGAIN: no room now. */
KVX__PRIV int kvx__ofi_send_note(kvx_ctx *ctx, kvx__ofi_pep *pe, kvx_queue *q, kvx_ticket t, const uint8_t *msg) {
    kvx__ofi_send *s = NULL;
    ssize_t ret;
    uint32_t i;
    for (i = 0; i < pe->nsend; i++)
        if (!pe->sends[i].busy) { s = &pe->sends[i]; break; }
    if (!s) return -FI_EAGAIN;
    memcpy(s->msg, msg, sizeof s->msg);
    ret = fi_send(pe->ep, s->msg, sizeof s->msg, pe->send_desc, pe->dest, &s->c);
    if (ret == -FI_EAGAIN) { kvx__ofi_of(ctx)->blocked = 1; return -FI_EAGAIN; }
    if (ret) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ofi: notification to %s/%d not sent: fi_send: %s", pe->peer->name, pe->peer->rank, fi_strerror((int)-ret));
        kvx__ofi_note_release(ctx, q, t);
        return 0;
    }
    s->busy = 1;
    s->q = q;
    s->ticket = t;
    return 0;
}

KVX__PRIV kvx_status kvx__ofi_notify(kvx_ctx *ctx, kvx__read *rd) {
    kvx__ofi_pep *pe = (kvx__ofi_pep *)rd->peer->be;
    kvx__ofi_note *n;
    if (!pe) return kvx__fail(ctx, KVX_ERR_PEER, "notification %llu: peer %s/%d is disconnected", (unsigned long long)rd->notify_id, rd->peer->name, rd->peer->rank);
    if (!pe->note_count && kvx__ofi_send_note(ctx, pe, rd->q, rd->ticket, rd->notify_msg) == 0) return KVX_OK;
    /* No room now: queued with its own copy of the message, sent from progress. */
    if (pe->note_count == pe->note_cap) {
        uint32_t cap = pe->note_cap * 2, i;
        kvx__ofi_note *m = (kvx__ofi_note *)kvx__calloc(cap, sizeof *m);
        if (!m) return kvx__fail(ctx, KVX_ERR_NOMEM, "ofi: out of memory for a notification");
        for (i = 0; i < pe->note_count; i++) m[i] = pe->notes[(pe->note_head + i) % pe->note_cap];
        KVX_FREE(pe->notes);
        pe->notes = m;
        pe->note_cap = cap;
        pe->note_head = 0;
    }
    n = &pe->notes[(pe->note_head + pe->note_count++) % pe->note_cap];
    n->q = rd->q;
    n->ticket = rd->ticket;
    memcpy(n->msg, rd->notify_msg, sizeof n->msg);
    return KVX_OK;
}

KVX__PRIV int kvx__ofi_notes_run(kvx_ctx *ctx, kvx__ofi_pep *pe) {
    int n = 0;
    while (pe->note_count) {
        kvx__ofi_note *m = &pe->notes[pe->note_head];
        if (kvx__ofi_send_note(ctx, pe, m->q, m->ticket, m->msg) != 0) break;
        pe->note_head = (pe->note_head + 1) % pe->note_cap;
        pe->note_count--;
        n++;
    }
    return n;
}

/*--- progress ----------------------------------------------------------------*/

KVX__PRIV void kvx__ofi_complete(kvx_ctx *ctx, kvx__ofi_pep *pe, kvx__ofi_ctx *c, kvx_status st, size_t len) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    if (!c) return;
    switch (c->kind) {
    case KVX__OFI_K_PART:
        /* libfabric 1.17's tcp can complete one read twice when a broken
           connection flushes it (see kvx__ofi_pep_free): count it once. */
        if (pe && ((kvx__ofi_part *)c)->out) {
            ((kvx__ofi_part *)c)->out = 0;
            kvx__ofi_part_done(pe, (kvx__ofi_part *)c, st);
        }
        break;
    case KVX__OFI_K_SEND: {
        kvx__ofi_send *s = (kvx__ofi_send *)c;
        if (!pe || !s->busy) break;
        s->busy = 0;
        if (st != KVX_OK)
            KVX__LOG(ctx, KVX_LOG_WARN, "ofi: notification to %s/%d not delivered: %s", pe->peer->name, pe->peer->rank, pe->err);
        kvx__ofi_note_release(ctx, s->q, s->ticket);
        break;
    }
    case KVX__OFI_K_RECV: {
        kvx__ofi_recv *rv = (kvx__ofi_recv *)c;
        if (!rv->posted) break;
        if (st == KVX_OK && len) kvx__notify_arrived(ctx, rv->buf, len);  /* 0 bytes: a peer's wireup */
        rv->posted = 0;
        o->recv_unposted++;
        break;
    }
    default:
        break;
    }
}

KVX__PRIV void kvx__ofi_cq_error(kvx_ctx *ctx, struct fid_cq *cq, kvx__ofi_pep *pe) {
    struct fi_cq_err_entry e;
    char prov[256];
    kvx_status st;
    memset(&e, 0, sizeof e);
    if (fi_cq_readerr(cq, &e, 0) < 1) return;
    prov[0] = 0;
    fi_cq_strerror(cq, e.prov_errno, e.err_data, prov, sizeof prov);
    st = kvx__ofi_status_of(e.err);
    if (pe) {
        snprintf(pe->err, sizeof pe->err, "libfabric %s: %s (%s)", kvx__ofi_of(ctx)->prov, fi_strerror(e.err), prov);
        if (st == KVX_ERR_PEER) kvx__peer_failed(pe->peer, pe->err);
    } else if (e.err != FI_ECANCELED) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ofi: receive failed: %s (%s)", fi_strerror(e.err), prov);
    }
    if (!e.op_context) {
        KVX__LOG(ctx, KVX_LOG_WARN, "ofi: an error completion without a context: %s (%s)", fi_strerror(e.err), prov);
        return;
    }
    kvx__ofi_complete(ctx, pe, (kvx__ofi_ctx *)e.op_context, st == KVX_OK ? KVX_ERR_BACKEND : st, 0);
}

/* Bounded: a busy queue cannot keep progress from returning. */
KVX__PRIV int kvx__ofi_drain(kvx_ctx *ctx, struct fid_cq *cq, kvx__ofi_pep *pe) {
    struct fi_cq_msg_entry ev[32];
    int n = 0, round;
    for (round = 0; round < 64; round++) {
        ssize_t k = fi_cq_read(cq, ev, 32), i;
        if (k == -FI_EAVAIL) { kvx__ofi_cq_error(ctx, cq, pe); n++; continue; }
        if (k <= 0) {
            if (k != -FI_EAGAIN && k != 0) KVX__LOG(ctx, KVX_LOG_WARN, "ofi: fi_cq_read: %s", fi_strerror((int)-k));
            break;
        }
        for (i = 0; i < k; i++) kvx__ofi_complete(ctx, pe, (kvx__ofi_ctx *)ev[i].op_context, KVX_OK, ev[i].len);
        n += (int)k;
        if (k < 32) break;
    }
    return n;
}

KVX__PRIV int kvx__ofi_progress(kvx_ctx *ctx) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    kvx__ofi_pep *pe;
    int n;
    o->blocked = 0;   /* set again by whatever still meets -FI_EAGAIN */
    n = kvx__ofi_drain(ctx, o->cq, NULL);
    kvx__ofi_repost(o);
    for (pe = o->peps; pe; pe = pe->next) {
        n += kvx__ofi_drain(ctx, pe->cq, pe);
        n += kvx__ofi_backlog_run(pe, o);
        n += kvx__ofi_notes_run(ctx, pe);
    }
    return n;
}

KVX__PRIV int kvx__ofi_event_fd(kvx_ctx *ctx) { return kvx__ofi_of(ctx)->epfd; }

KVX__PRIV kvx_status kvx__ofi_arm(kvx_ctx *ctx) {
    kvx__ofi *o = kvx__ofi_of(ctx);
    uint64_t v;
    /* Level-triggered fds: drain what woke us, or poll would not sleep. */
    if (read(o->evfd, &v, sizeof v) < 0) { /* nothing signaled */ }
    if (read(o->tfd, &v, sizeof v) < 0) { /* no tick yet */ }
    /* No wait object: look at the queues once more, since what was posted
       after the last pass may have completed inside fi_read (shm). */
    if (!o->wait_fd) return kvx__ofi_progress(ctx) > 0 ? KVX_PENDING : KVX_OK;
    kvx__ofi_tick(o, o->blocked);
    return fi_trywait(o->fabric, o->wfids, (int)o->nwfids) == FI_SUCCESS ? KVX_OK : KVX_PENDING;
}

KVX__PRIV void kvx__ofi_signal(kvx_ctx *ctx) {
    uint64_t one = 1;
    if (write(kvx__ofi_of(ctx)->evfd, &one, sizeof one) < 0) { /* already signaled */ }
}

/* The transports of the policy classes that ofi names (kvx__policy_term). */
static const char *const kvx__ofi_policy[] = {"rdma=ofi:verbs*", "rdma=ofi:efa*", NULL};

/* The ofi backend's table: the entries it implements (kvx__backend). */
KVX__PRIV void kvx__ofi_fill(kvx__backend *b) {
    b->name = "ofi";
    b->kind = KVX_BACKEND_OFI;
    b->policy_classes = kvx__ofi_policy;
    b->keys_per_registration = 1;
    b->open = kvx__ofi_open;
    b->close = kvx__ofi_close;
    b->query = kvx__ofi_query;
    b->address = kvx__ofi_address;
    b->mem_register = kvx__ofi_mem_register;
    b->mem_deregister = kvx__ofi_mem_deregister;
    b->connect = kvx__ofi_connect;
    b->disconnect = kvx__ofi_disconnect;
    b->post = kvx__ofi_post;
    b->flush = kvx__ofi_flush;
    b->notify = kvx__ofi_notify;
    b->progress = kvx__ofi_progress;
    b->event_fd = kvx__ofi_event_fd;
    b->arm = kvx__ofi_arm;
    b->signal = kvx__ofi_signal;
}

#endif /* KVX_OFI_INCLUDED */
