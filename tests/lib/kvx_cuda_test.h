/*
    kvx_cuda_test.h -- what the CUDA tests and the GPU benchmark share: their
    device code as PTX (from tests/gpu/kvx_cuda_test.cu, so they build without
    nvcc), owner processes that serve a GPU (or host) cache, and the image a
    destination cache must hold after a read.
*/
#ifndef KVX_CUDA_TEST_H
#define KVX_CUDA_TEST_H

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include "kvx_gpu_cache.h"
#include "../../examples/kvx_rdv.h"

static const char *const kvx_tc_ptx[] = {
/* PTX kvx_test BEGIN */
    ".version 7.8\n",
    ".target sm_80\n",
    ".address_size 64\n",
    ".visible .entry kvx_t_check(\n",
    " .param .u64 kvx_t_check_param_0,\n",
    " .param .u64 kvx_t_check_param_1,\n",
    " .param .u64 kvx_t_check_param_2,\n",
    " .param .u64 kvx_t_check_param_3,\n",
    " .param .u64 kvx_t_check_param_4\n",
    ")\n",
    "{\n",
    " .reg .pred  %p<15>;\n",
    " .reg .b32  %r<33>;\n",
    " .reg .b64  %rd<25>;\n",
    " ld.param.u64  %rd9, [kvx_t_check_param_0];\n",
    " ld.param.u64  %rd10, [kvx_t_check_param_1];\n",
    " ld.param.u64  %rd11, [kvx_t_check_param_2];\n",
    " ld.param.u64  %rd12, [kvx_t_check_param_3];\n",
    " ld.param.u64  %rd13, [kvx_t_check_param_4];\n",
    " cvta.to.global.u64  %rd1, %rd13;\n",
    " mov.u32  %r6, %ctaid.x;\n",
    " mov.u32  %r7, %ntid.x;\n",
    " cvt.u64.u32  %rd2, %r7;\n",
    " mul.wide.u32  %rd14, %r6, %r7;\n",
    " mov.u32  %r1, %tid.x;\n",
    " cvt.u64.u32  %rd15, %r1;\n",
    " add.s64  %rd24, %rd14, %rd15;\n",
    " setp.ne.s64  %p1, %rd24, 0;\n",
    " setp.eq.s64  %p2, %rd12, 0;\n",
    " or.pred   %p3, %p1, %p2;\n",
    " @%p3 bra  $L__BB0_2;\n",
    " cvta.to.global.u64  %rd16, %rd12;\n",
    " ld.volatile.global.u64  %rd17, [%rd16];\n",
    " st.global.u64  [%rd1+8], %rd17;\n",
    "$L__BB0_2:\n",
    " setp.ge.u64  %p4, %rd24, %rd11;\n",
    " mov.u32  %r32, 0;\n",
    " @%p4 bra  $L__BB0_5;\n",
    " cvta.to.global.u64  %rd4, %rd10;\n",
    " cvta.to.global.u64  %rd5, %rd9;\n",
    " mov.u32  %r10, %nctaid.x;\n",
    " cvt.u64.u32  %rd18, %r10;\n",
    " mul.lo.s64  %rd6, %rd18, %rd2;\n",
    " mov.u32  %r32, 0;\n",
    "$L__BB0_4:\n",
    " shl.b64  %rd19, %rd24, 2;\n",
    " add.s64  %rd20, %rd4, %rd19;\n",
    " ld.global.u32  %r11, [%rd20];\n",
    " add.s64  %rd21, %rd5, %rd19;\n",
    " ld.global.u32  %r12, [%rd21];\n",
    " setp.ne.s32  %p5, %r12, %r11;\n",
    " selp.u32  %r13, 1, 0, %p5;\n",
    " add.s32  %r32, %r32, %r13;\n",
    " add.s64  %rd24, %rd24, %rd6;\n",
    " setp.lt.u64  %p6, %rd24, %rd11;\n",
    " @%p6 bra  $L__BB0_4;\n",
    "$L__BB0_5:\n",
    " mov.u32  %r14, 2;\n",
    " mov.u32  %r15, 31;\n",
    " mov.u32  %r16, 16;\n",
    " mov.u32  %r17, -1;\n",
    " shfl.sync.down.b32  %r18|%p7, %r32, %r16, %r15, %r17;\n",
    " add.s32  %r19, %r18, %r32;\n",
    " mov.u32  %r20, 8;\n",
    " shfl.sync.down.b32  %r21|%p8, %r19, %r20, %r15, %r17;\n",
    " add.s32  %r22, %r21, %r19;\n",
    " mov.u32  %r23, 4;\n",
    " shfl.sync.down.b32  %r24|%p9, %r22, %r23, %r15, %r17;\n",
    " add.s32  %r25, %r24, %r22;\n",
    " shfl.sync.down.b32  %r26|%p10, %r25, %r14, %r15, %r17;\n",
    " add.s32  %r27, %r26, %r25;\n",
    " mov.u32  %r28, 1;\n",
    " shfl.sync.down.b32  %r29|%p11, %r27, %r28, %r15, %r17;\n",
    " add.s32  %r5, %r29, %r27;\n",
    " and.b32   %r30, %r1, 31;\n",
    " setp.ne.s32  %p12, %r30, 0;\n",
    " setp.eq.s32  %p13, %r5, 0;\n",
    " or.pred   %p14, %p12, %p13;\n",
    " @%p14 bra  $L__BB0_7;\n",
    " cvt.u64.u32  %rd22, %r5;\n",
    " atom.global.add.u64  %rd23, [%rd1], %rd22;\n",
    "$L__BB0_7:\n",
    " ret;\n",
    "}\n",
    ".visible .entry kvx_t_fma(\n",
    " .param .u64 kvx_t_fma_param_0,\n",
    " .param .u32 kvx_t_fma_param_1\n",
    ")\n",
    "{\n",
    " .reg .pred  %p<7>;\n",
    " .reg .f32  %f<83>;\n",
    " .reg .b32  %r<15>;\n",
    " .reg .b64  %rd<5>;\n",
    " ld.param.u64  %rd1, [kvx_t_fma_param_0];\n",
    " ld.param.u32  %r9, [kvx_t_fma_param_1];\n",
    " mov.u32  %r1, %tid.x;\n",
    " cvt.rn.f32.u32  %f33, %r1;\n",
    " mul.f32  %f81, %f33, 0f3A83126F;\n",
    " mov.u32  %r2, %ctaid.x;\n",
    " cvt.rn.f32.u32  %f34, %r2;\n",
    " mul.f32  %f82, %f34, 0f38D1B717;\n",
    " setp.eq.s32  %p1, %r9, 0;\n",
    " mov.f32  %f80, 0f3F800347;\n",
    " mov.f32  %f79, 0f3F7FBE77;\n",
    " @%p1 bra  $L__BB1_6;\n",
    " add.s32  %r10, %r9, -1;\n",
    " and.b32   %r14, %r9, 3;\n",
    " setp.lt.u32  %p2, %r10, 3;\n",
    " mov.f32  %f79, 0f3F7FBE77;\n",
    " mov.f32  %f80, 0f3F800347;\n",
    " @%p2 bra  $L__BB1_4;\n",
    " sub.s32  %r13, %r9, %r14;\n",
    " mov.f32  %f79, 0f3F7FBE77;\n",
    " mov.f32  %f38, 0f3F800347;\n",
    " mov.f32  %f80, %f38;\n",
    "$L__BB1_3:\n",
    " mov.f32  %f40, 0fB3D6BF95;\n",
    " fma.rn.f32  %f42, %f79, %f38, %f40;\n",
    " mov.f32  %f43, 0f33D6BF95;\n",
    " mov.f32  %f44, 0f3F7FF972;\n",
    " fma.rn.f32  %f45, %f80, %f44, %f43;\n",
    " fma.rn.f32  %f46, %f81, %f80, %f79;\n",
    " fma.rn.f32  %f47, %f46, %f45, %f42;\n",
    " fma.rn.f32  %f48, %f82, %f79, %f80;\n",
    " fma.rn.f32  %f49, %f48, %f42, %f45;\n",
    " fma.rn.f32  %f50, %f45, %f44, %f43;\n",
    " fma.rn.f32  %f51, %f42, %f38, %f40;\n",
    " fma.rn.f32  %f52, %f47, %f50, %f51;\n",
    " fma.rn.f32  %f53, %f49, %f51, %f50;\n",
    " fma.rn.f32  %f54, %f50, %f44, %f43;\n",
    " fma.rn.f32  %f55, %f51, %f38, %f40;\n",
    " fma.rn.f32  %f81, %f52, %f54, %f55;\n",
    " fma.rn.f32  %f82, %f53, %f55, %f54;\n",
    " fma.rn.f32  %f80, %f54, %f44, %f43;\n",
    " fma.rn.f32  %f79, %f55, %f38, %f40;\n",
    " add.s32  %r13, %r13, -4;\n",
    " setp.ne.s32  %p3, %r13, 0;\n",
    " @%p3 bra  $L__BB1_3;\n",
    "$L__BB1_4:\n",
    " setp.eq.s32  %p4, %r14, 0;\n",
    " @%p4 bra  $L__BB1_6;\n",
    "$L__BB1_5:\n",
    " .pragma \"nounroll\";\n",
    " fma.rn.f32  %f81, %f81, %f80, %f79;\n",
    " fma.rn.f32  %f82, %f82, %f79, %f80;\n",
    " mov.f32  %f56, 0f33D6BF95;\n",
    " mov.f32  %f57, 0f3F7FF972;\n",
    " fma.rn.f32  %f80, %f80, %f57, %f56;\n",
    " mov.f32  %f58, 0fB3D6BF95;\n",
    " mov.f32  %f59, 0f3F800347;\n",
    " fma.rn.f32  %f79, %f79, %f59, %f58;\n",
    " add.s32  %r14, %r14, -1;\n",
    " setp.ne.s32  %p5, %r14, 0;\n",
    " @%p5 bra  $L__BB1_5;\n",
    "$L__BB1_6:\n",
    " add.f32  %f60, %f80, %f81;\n",
    " add.f32  %f61, %f79, %f60;\n",
    " add.f32  %f62, %f82, %f61;\n",
    " setp.neu.f32  %p6, %f62, 0f4640E400;\n",
    " @%p6 bra  $L__BB1_8;\n",
    " mov.u32  %r11, %ntid.x;\n",
    " mad.lo.s32  %r12, %r2, %r11, %r1;\n",
    " cvta.to.global.u64  %rd2, %rd1;\n",
    " mul.wide.u32  %rd3, %r12, 4;\n",
    " add.s64  %rd4, %rd2, %rd3;\n",
    " st.global.f32  [%rd4], %f81;\n",
    "$L__BB1_8:\n",
    " ret;\n",
    "}\n",
    ".visible .entry kvx_t_params(\n",
    " .param .align 8 .b8 kvx_t_params_param_0[4000],\n",
    " .param .u64 kvx_t_params_param_1\n",
    ")\n",
    "{\n",
    " .reg .pred  %p<4>;\n",
    " .reg .b32  %r<2>;\n",
    " .reg .b64  %rd<7>;\n",
    " mov.b64  %rd3, kvx_t_params_param_0;\n",
    " ld.param.u64  %rd2, [kvx_t_params_param_1];\n",
    " ld.param.u64  %rd4, [kvx_t_params_param_0];\n",
    " setp.ne.s64  %p1, %rd4, 12345;\n",
    " mov.u32  %r1, %tid.x;\n",
    " setp.ne.s32  %p2, %r1, 0;\n",
    " or.pred   %p3, %p2, %p1;\n",
    " @%p3 bra  $L__BB2_2;\n",
    " cvta.to.global.u64  %rd5, %rd2;\n",
    " ld.param.u64  %rd6, [%rd3+8];\n",
    " st.global.u64  [%rd5], %rd6;\n",
    "$L__BB2_2:\n",
    " ret;\n",
    "}\n",
/* PTX kvx_test END */
    NULL
};

static inline double kvx_tc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct kvx_tc_kernels { CUmodule mod; CUfunction check, fma, params; } kvx_tc_kernels;

static inline int kvx_tc_load(kvx_tc_kernels *k) {
    size_t n = 1, i;
    char *text, *p;
    int rc;
    for (i = 0; kvx_tc_ptx[i]; i++) n += strlen(kvx_tc_ptx[i]);
    if (!(text = (char *)malloc(n))) return -1;
    for (p = text, i = 0; kvx_tc_ptx[i]; i++) { size_t l = strlen(kvx_tc_ptx[i]); memcpy(p, kvx_tc_ptx[i], l); p += l; }
    *p = 0;
    rc = kvx_ex_cu(cuModuleLoadData(&k->mod, text), "cuModuleLoadData (test kernels)") ||
         kvx_ex_cu(cuModuleGetFunction(&k->check, k->mod, "kvx_t_check"), "cuModuleGetFunction") ||
         kvx_ex_cu(cuModuleGetFunction(&k->fma, k->mod, "kvx_t_fma"), "cuModuleGetFunction") ||
         kvx_ex_cu(cuModuleGetFunction(&k->params, k->mod, "kvx_t_params"), "cuModuleGetFunction");
    free(text);
    return rc ? -1 : 0;
}

/* On s: out[0] += words of a that differ from b; out[1] = *status (if status). */
static inline int kvx_tc_check(const kvx_tc_kernels *k, CUstream s, CUdeviceptr a, CUdeviceptr b, uint64_t nwords, CUdeviceptr status, CUdeviceptr out) {
    void *args[5];
    args[0] = &a; args[1] = &b; args[2] = &nwords; args[3] = &status; args[4] = &out;
    return kvx_ex_cu(cuLaunchKernel(k->check, 264, 1, 1, 256, 1, 1, 0, s, args, NULL), "cuLaunchKernel (check)");
}

static inline int kvx_tc_fma(const kvx_tc_kernels *k, CUstream s, CUdeviceptr out, uint32_t grid, uint32_t iters) {
    void *args[2];
    args[0] = &out; args[1] = &iters;
    return kvx_ex_cu(cuLaunchKernel(k->fma, grid, 1, 1, 256, 1, 1, 0, s, args, NULL), "cuLaunchKernel (fma)");
}

/* One block of kvx_t_params on s: 4000 bytes of parameters (block). */
static inline int kvx_tc_params(const kvx_tc_kernels *k, CUstream s, const uint64_t block[500], CUdeviceptr out) {
    void *args[2];
    args[0] = (void *)block; args[1] = &out;
    return kvx_ex_cu(cuLaunchKernel(k->params, 1, 1, 1, 256, 1, 1, 0, s, args, NULL), "cuLaunchKernel (params)");
}

/* Wait for s, at most ms; 0 done, -1 timed out or failed (a stream that a
   wait never releases must fail the test, not hang it). */
static inline int kvx_tc_sync(CUstream s, int ms) {
    double t0 = kvx_tc_now();
    for (;;) {
        CUresult rc = cuStreamQuery(s);
        if (rc == CUDA_SUCCESS) return 0;
        if (rc != CUDA_ERROR_NOT_READY) return kvx_ex_cu(rc, "cuStreamQuery");
        if ((kvx_tc_now() - t0) * 1000.0 > ms) { snprintf(kvx_ex_gpu_err, sizeof kvx_ex_gpu_err, "stream not done after %d ms", ms); return -1; }
        usleep(200);
    }
}

/* The bytes heads [a, b) of the read blocks must hold afterwards (the fill
   pattern of the remote blocks), written into the local staging copy c. */
static inline void kvx_tc_expect(const kvx_ex_cache *c, uint64_t seed, const uint32_t *local, const uint32_t *remote, uint32_t n,
                                 uint32_t layer_begin, uint32_t layer_end, uint32_t a, uint32_t bh) {
    kvx_ex_stamp(c, seed, local, remote, n, layer_begin, layer_end, a, bh, 0);
}

/*--- owner processes ----------------------------------------------------------*/

/* The owner side of a test: this binary re-executed with "--serve", one
   cache filled with the pattern, its metadata sent back over a socketpair;
   it serves until told to stop, then reports the notifications it received. */
typedef struct kvx_tc_owner_args {
    int backend;                /* kvx_backend */
    int gpu;                    /* 0: host memory (UCX) */
    int device, kind;           /* GPU cache: device, kvx_ex_gpu_kind */
    int rank, tp;
    int progress;               /* 1: a progress thread; 0: kvx_progress here until kvx_tc_stall */
    uint64_t seed;
    uint32_t fill_blocks;       /* blocks [0, fill_blocks) get the pattern; 0: all */
    uint32_t max_blocks;        /* kvx_ctx_desc.cuda.max_blocks */
    int checksums;              /* 1: register with checksums and seal the filled blocks */
    int generations;            /* 1: register with block generations ... */
    uint32_t retired;           /* ... and retire blocks [0, retired) once: their generation is 1 */
    kvx_layout lay;
} kvx_tc_owner_args;

typedef struct kvx_tc_owner { pid_t pid; int fd; } kvx_tc_owner;

enum { KVX_TC_MD = 101, KVX_TC_CMD, KVX_TC_NOTES };

static inline kvx_tc_owner kvx_tc_spawn(const kvx_tc_owner_args *a, void **md, uint32_t *len) {
    kvx_tc_owner o;
    int sv[2];
    o.pid = -1; o.fd = -1;
    *md = NULL;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return o;
    fflush(stdout);
    o.pid = fork();
    if (o.pid == 0) {
        char hex[2 * sizeof *a + 1], fd[16];
        size_t i;
        close(sv[0]);
        for (i = 0; i < sizeof *a; i++) snprintf(hex + 2 * i, 3, "%02x", ((const uint8_t *)a)[i]);
        snprintf(fd, sizeof fd, "%d", sv[1]);
        execl("/proc/self/exe", "kvx-test-owner", "--serve", hex, fd, (char *)NULL);
        _exit(127);
    }
    close(sv[1]);
    o.fd = sv[0];
    if (o.pid < 0 || kvx_rdv_recv(o.fd, KVX_TC_MD, md, len, 120000)) {
        fprintf(stderr, "owner process: no metadata: %s\n", kvx_rdv_error());
        if (o.pid > 0) { kill(o.pid, SIGKILL); waitpid(o.pid, NULL, 0); }
        close(o.fd);
        o.pid = -1;
    }
    return o;
}

/* Stop the owner; returns the notifications it received (-1: it failed). */
static inline int kvx_tc_stop(kvx_tc_owner *o) {
    void *b = NULL;
    uint32_t n = 0;
    int notes = -1, st = 0;
    if (o->pid <= 0) return -1;
    if (!kvx_rdv_send(o->fd, KVX_TC_CMD, "Q", 1, 5000) && !kvx_rdv_recv(o->fd, KVX_TC_NOTES, &b, &n, 30000) && n == 4) memcpy(&notes, b, 4);
    free(b);
    close(o->fd);
    {   /* bounded: an owner that does not exit within 30 s is killed */
        double t0 = kvx_tc_now();
        pid_t w;
        while ((w = waitpid(o->pid, &st, WNOHANG)) == 0 && kvx_tc_now() - t0 < 30.0) usleep(2000);
        if (w == 0) { kill(o->pid, SIGKILL); waitpid(o->pid, &st, 0); notes = -1; }
        else if (w != o->pid || !WIFEXITED(st) || WEXITSTATUS(st)) notes = -1;
    }
    o->pid = -1;
    return notes;
}

/* An owner without a progress thread stops progressing: reads to it stall. */
static inline int kvx_tc_stall(kvx_tc_owner *o) { return kvx_rdv_send(o->fd, KVX_TC_CMD, "S", 1, 5000); }

static inline void kvx_tc_kill(kvx_tc_owner *o) {
    if (o->pid <= 0) return;
    kill(o->pid, SIGKILL);
    waitpid(o->pid, NULL, 0);
    close(o->fd);
    o->pid = -1;
}

/* The owner's main: argv[2] the hex of kvx_tc_owner_args, argv[3] the fd. */
static inline int kvx_tc_serve(const char *hex, int fd) {
    kvx_tc_owner_args a;
    kvx_ctx_desc cd;
    kvx_ctx *ctx = NULL;
    kvx_cache *cache;
    kvx_cache_desc d;
    kvx_ex_gpu g;
    kvx_ex_cache h;
    uint32_t *ids, i, len32 = 0;
    size_t len = 0, k;
    void *md, *buf = NULL;
    int notes = 0, n, stalled = 0;
    kvx_status st;
    kvx_notification nt[16];
    if (strlen(hex) != 2 * sizeof a) return 2;
    for (k = 0; k < sizeof a; k++) { unsigned v; sscanf(hex + 2 * k, "%2x", &v); ((uint8_t *)&a)[k] = (uint8_t)v; }
    memset(&g, 0, sizeof g);
    memset(&h, 0, sizeof h);
    if (a.gpu) {
        if (kvx_ex_gpu_init(a.device, NULL) || kvx_ex_gpu_alloc(&g, &a.lay, a.rank, a.tp, a.device, (kvx_ex_gpu_kind)a.kind)) {
            fprintf(stderr, "owner: %s\n", kvx_ex_gpu_err);
            return 2;
        }
    } else if (kvx_ex_cache_alloc(&h, &a.lay, a.rank, a.tp)) return 2;
    ids = (uint32_t *)malloc(a.lay.num_blocks * sizeof *ids);
    for (i = 0; i < a.lay.num_blocks; i++) ids[i] = i;
    kvx_ex_fill(a.gpu ? &g.host : &h, a.seed, ids, a.fill_blocks && a.fill_blocks < a.lay.num_blocks ? a.fill_blocks : a.lay.num_blocks);
    if (a.gpu && kvx_ex_gpu_push(&g)) return 2;
    memset(&cd, 0, sizeof cd);
    cd.name = "owner";
    cd.tp_rank = a.rank;
    cd.tp_size = a.tp;
    cd.backend = (kvx_backend)a.backend;
    cd.progress_thread = a.progress;
    cd.cuda.max_blocks = a.max_blocks;
    if ((st = kvx_ctx_create(&cd, &ctx)) != KVX_OK) { fprintf(stderr, "owner: %s\n", kvx_ctx_error(NULL)); return 2; }
    d = a.gpu ? kvx_ex_gpu_desc(&g) : kvx_ex_cache_desc(&h);
    d.checksums = a.checksums;
    d.generations = a.generations;
    if ((st = kvx_cache_register(ctx, &d, &cache)) != KVX_OK) { fprintf(stderr, "owner: register: %s\n", kvx_ctx_error(ctx)); return 2; }
    if (a.retired && (st = kvx_blocks_retire(cache, ids, a.retired < a.lay.num_blocks ? a.retired : a.lay.num_blocks)) != KVX_OK) {
        fprintf(stderr, "owner: retire: %s\n", kvx_ctx_error(ctx));
        return 2;
    }
    if (a.checksums && (st = kvx_cache_seal(cache, ids, a.fill_blocks && a.fill_blocks < a.lay.num_blocks ? a.fill_blocks : a.lay.num_blocks)) != KVX_OK) {
        fprintf(stderr, "owner: seal: %s\n", kvx_ctx_error(ctx));
        return 2;
    }
    kvx_metadata(ctx, NULL, &len);
    md = malloc(len);
    kvx_metadata(ctx, md, &len);
    if (kvx_rdv_send(fd, KVX_TC_MD, md, (uint32_t)len, 10000)) return 2;
    /* Serve until told to stop: by the progress thread, or here by
       kvx_progress until told to stall (then reads to it stall). */
    for (;;) {
        struct pollfd pf;
        char cmd = 0;
        pf.fd = fd; pf.events = POLLIN; pf.revents = 0;
        if (poll(&pf, 1, a.progress || stalled ? 50 : 2) > 0) {
            if (kvx_rdv_recv(fd, KVX_TC_CMD, &buf, &len32, 1000) || len32 != 1) return 2;
            cmd = *(char *)buf;
            free(buf);
            if (cmd == 'Q') break;
            if (cmd == 'S') stalled = 1;
        }
        if (!a.progress && !stalled) kvx_progress(ctx);
        if (!stalled) while ((n = kvx_notifications(ctx, nt, 16)) > 0) notes += n;
    }
    if (!stalled) {
        usleep(20000);
        while ((n = kvx_notifications(ctx, nt, 16)) > 0) notes += n;
    }
    kvx_rdv_send(fd, KVX_TC_NOTES, &notes, 4, 5000);
    kvx_ctx_destroy(ctx);
    if (a.gpu) kvx_ex_gpu_free(&g); else kvx_ex_cache_free(&h);
    free(md); free(ids);
    return 0;
}

/* Register, then deregister, a small cuMemAlloc cache on device dev with ctx:
   KVX_OK where its backend takes GPU memory (a UCX built with CUDA), else
   kvx's refusal (kvx_ctx_error says why); KVX_ERR_NOMEM if the GPU memory
   itself could not be had (kvx_ex_gpu_err). */
static inline kvx_status kvx_tc_try_gpu_cache(kvx_ctx *ctx, int dev) {
    kvx_layout l;
    kvx_ex_gpu g;
    kvx_cache_desc c;
    kvx_cache *cache;
    kvx_status st;
    memset(&l, 0, sizeof l);
    l.num_layers = 1; l.num_blocks = 4; l.block_tokens = 16; l.num_heads = 1; l.head_dim = 64; l.elem_bytes = 2;
    if (kvx_ex_gpu_alloc(&g, &l, 0, 1, dev, KVX_EX_CUMEMALLOC)) return KVX_ERR_NOMEM;
    c = kvx_ex_gpu_desc(&g);
    if ((st = kvx_cache_register(ctx, &c, &cache)) == KVX_OK) kvx_cache_deregister(cache);
    kvx_ex_gpu_free(&g);
    return st;
}

#endif
