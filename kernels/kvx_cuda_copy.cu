/*
    kvx_cuda_copy.cu -- the source of the copy kernel that kvx embeds (kvx_cuda_ptx.h)
    as PTX. kvx does not need nvcc: kernels/gen_ptx.sh turns this file into
    the PTX text between the "PTX kvx_copy" markers of kvx_cuda_ptx.h (ISA
    .version lowered to 7.8, .target sm_80), and tools/ptx_check.sh checks that
    text with ptxas and, where nvcc is installed, that it is what this file
    makes. Edit here, then run kernels/gen_ptx.sh.

    One launch copies the reads of a batch. Each read is a kvx__cuda_rd (the
    same layout as in kvx_cuda.h): its merged block table expanded to
    (local, remote) block id pairs, the plane bases of both caches (the
    remote ones as mapped in this process), and the piece geometry of the
    head-range intersection. A task is (plane, block, chunk): at most 16 KiB
    of one block, one warp per task, tasks numbered across the batch. A read
    with block generations is checked by the warp that finishes its last
    task (gen_arrive), which also writes the read's completion word.

    The host fills kvx_rd and kvx_sum_lay through its own structs
    (kvx__cuda_rd, kvx__cuda_sum_lay in kvx_cuda.h): both files assert the
    same sizes and offsets, from the same KVX__CUDA_*_LAYOUT lists
    (tools/ptx_check.sh checks that the lists match), so a field moved on
    one side fails to compile instead of reading the wrong bytes.
*/
#include <stddef.h>

typedef unsigned long long u64;
typedef unsigned int u32;

struct kvx_rd {
    u64 lplanes, rplanes;       /* u64[] plane bases of the read's planes: local, remote (mapped here) */
    u64 pairs;                  /* u32[nblocks][2]: local id, remote id */
    u64 lbstride, rbstride;     /* block to block */
    u64 loff, roff;             /* first piece inside a block */
    u64 piece;                  /* bytes per piece */
    u64 lpstride, rpstride;     /* piece to piece (NHD: token to token) */
    u64 cbytes;                 /* one piece per block: bytes per chunk */
    u64 gcount;                 /* u32 count of the read's tasks done (device, left 0); 0: no arrival (no generations, no word) */
    u64 gwant, gtable;          /* u64[nblocks] expected (staged), the owner's table (mapped here; 0: no generations) */
    u64 gres, gfound;           /* host, mapped: u32 result (1 passed, 2 failed), u64[nblocks] found (written when failed) */
    u64 gword, gticket;         /* the read's completion word (0: the host writes it), its ticket << 2 */
    u32 plane0, nblocks, cpb, npieces;     /* plane0: unused (the tables start at the read's first plane) */
    u32 ppc, task0, ntasks, pad2;
};
#define KVX__CUDA_RD_BYTES 176
#define KVX__CUDA_RD_LAYOUT(X) \
    X(lplanes, 0) X(rplanes, 8) X(pairs, 16) X(lbstride, 24) X(rbstride, 32) X(loff, 40) X(roff, 48) X(piece, 56) \
    X(lpstride, 64) X(rpstride, 72) X(cbytes, 80) X(gcount, 88) X(gwant, 96) X(gtable, 104) X(gres, 112) X(gfound, 120) \
    X(gword, 128) X(gticket, 136) X(plane0, 144) X(nblocks, 148) X(cpb, 152) X(npieces, 156) X(ppc, 160) X(task0, 164) \
    X(ntasks, 168) X(pad2, 172)
#define KVX_AT(f, off) static_assert(offsetof(kvx_rd, f) == off, "kvx_rd." #f " is not at byte " #off " as in kvx_cuda.h (kvx__cuda_rd)");
KVX__CUDA_RD_LAYOUT(KVX_AT)
#undef KVX_AT
static_assert(sizeof(kvx_rd) == KVX__CUDA_RD_BYTES, "kvx_rd is not the size of kvx__cuda_rd in kvx_cuda.h");
/* kvx_copy_inline's parameter block (kvx_inline): nreads, ntasks, then
   headers and table; under the 4 KiB a launch may carry. */
#define KVX__CUDA_INLINE_BYTES 4000

/* Plain loads, not __ldg: ptxas may sink a non-coherent load (ld.global.nc)
   down to its store, which left the strided (NHD) path with about one load in
   flight per lane, 83% of a device-to-device copy on an H200 at two blocks
   per SM; plain loads with 4 in flight per lane give 92-93% on every path at
   80 registers (8 in flight took 108 registers for the same speed). Plain
   write-back stores; evict-first (.cs), L2-only (.cg) and L2::256B prefetch
   hints were no faster. */
__device__ __forceinline__ uint4 ld16(const char *p) { return *(const uint4 *)p; }
__device__ __forceinline__ void st16(char *p, uint4 v) { __stwb((uint4 *)p, v); }

/* 16-byte path. One contiguous piece (count 1): lane l takes vectors
   l, l+32, ... with 4 loads in flight before the first store. Pieces with
   strides (NHD): (p, o) walks the pieces without a division per vector, the
   stores replaying the loads' walk. */
__device__ __forceinline__ void copy16(char *dst, const char *src, u32 vpp, u32 count, u64 ds, u64 ss, u32 lane) {
    if (count == 1) {
        u32 v = lane;
        for (; v + 3u * 32u < vpp; v += 4u * 32u) {
            uint4 x[4];
            const char *s = src + (u64)v * 16u;
            char *t = dst + (u64)v * 16u;
#pragma unroll
            for (int k = 0; k < 4; k++) x[k] = ld16(s + k * 512);
#pragma unroll
            for (int k = 0; k < 4; k++) st16(t + k * 512, x[k]);
        }
        for (; v < vpp; v += 32u) st16(dst + (u64)v * 16u, ld16(src + (u64)v * 16u));
        return;
    }
    u32 total = vpp * count;
    u32 dp = 32u / vpp, dov = 32u % vpp;
    u32 p = lane / vpp, o = lane % vpp;
    u64 so = (u64)p * ss + (u64)o * 16u, dof = (u64)p * ds + (u64)o * 16u;
    u64 sstep = (u64)dp * ss + (u64)dov * 16u, dstep = (u64)dp * ds + (u64)dov * 16u;
    u64 swrap = ss - (u64)vpp * 16u, dwrap = ds - (u64)vpp * 16u;
    u32 v = lane;
#define KVX_ADV(o_, so_, do_) do { o_ += dov; so_ += sstep; do_ += dstep; if (o_ >= vpp) { o_ -= vpp; so_ += swrap; do_ += dwrap; } } while (0)
    while (v + 3u * 32u < total) {
        uint4 x[4];
        u32 o2 = o;
        u64 so2 = so, do2 = dof;
#pragma unroll
        for (int k = 0; k < 4; k++) { x[k] = ld16(src + so); KVX_ADV(o, so, dof); }
#pragma unroll
        for (int k = 0; k < 4; k++) { st16(dst + do2, x[k]); KVX_ADV(o2, so2, do2); }
        v += 4u * 32u;
    }
    while (v < total) {
        st16(dst + dof, ld16(src + so));
        KVX_ADV(o, so, dof);
        v += 32u;
    }
#undef KVX_ADV
}

/* Any alignment: bytes, one division per byte. Only for layouts whose
   head slices are not 16-byte multiples. */
__device__ __noinline__ void copy1(char *dst, const char *src, u64 len, u32 count, u64 ds, u64 ss, u32 lane) {
    u64 total = len * count, v;
    for (v = lane; v < total; v += 32u) {
        u64 p = v / len, o = v - p * len;
        dst[p * ds + o] = src[p * ss + o];
    }
}

/* A read's end on the device: this warp is done with its tasks of read d
   (task numbers w, w + nw, ... that fall in the read's; counted, not
   tracked, so the copy loop keeps its registers). Each warp's data stores
   are fenced before it counts them, so the warp that brings the count to
   the read's task total knows that every byte of the read was loaded and
   has landed. With block generations (gtable) it loads the owner's
   generation words then. It writes the completion word: bit 1 (done) or 2
   (failed: a block was retired) over the ticket, as the host would, so a
   waiting stream resumes as the read's last byte lands rather than after
   the whole launch and a memory operation behind it; then, with
   generations, the result for the host, and where a block differs every
   word it found, for the message. The count goes back to 0 for the next launch of
   the slot. The header's fields are loaded together: where a
   small batch's headers are read in place from host memory, each dependent
   load would be a round trip over the bus at the end of the read. rebase:
   what the table offsets are relative to (body). */
__device__ __noinline__ void gen_arrive(const kvx_rd *d, u32 lane, u64 rebase) {
    const u32 task0 = d->task0, nt = d->ntasks, n = d->nblocks;
    u32 *const count = (u32 *)d->gcount;
    const uint2 *const pairs = (const uint2 *)(d->pairs + rebase);
    const u64 *const want = (const u64 *)(d->gwant + rebase);
    const volatile u64 *const table = (const volatile u64 *)d->gtable;
    u32 *const res = (u32 *)d->gres;
    u64 *const found = (u64 *)d->gfound;
    volatile u64 *const word = (volatile u64 *)d->gword;
    const u64 ticket = d->gticket;
    const u32 nw = (gridDim.x * blockDim.x) >> 5, w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u32 first = w >= task0 ? w : w + (task0 - w + nw - 1u) / nw * nw, end = task0 + nt;
    u32 last = 0, bad = 0, i;
    if (first >= end) return;
    __threadfence();
    __syncwarp();
    if (!lane) {
        u32 k = (end - first + nw - 1u) / nw;
        last = atomicAdd(count, k) + k == nt;
    }
    if (!__shfl_sync(0xffffffffu, last, 0)) return;
    __threadfence();
    if (table) {
        for (i = lane; i < n; i += 32u) {
            const u32 id = pairs[i].y;
            const u64 x = want[i];  /* beside the id: both come over the bus when mapped */
            bad |= table[id] != x;
        }
        bad = __any_sync(0xffffffffu, bad);
        if (bad)  /* again, for the host's message: a retire since shows too, and fails the same */
            for (i = lane; i < n; i += 32u) found[i] = table[pairs[i].y];
    }
    if (!lane) {
        *count = 0;
        if (word) {
            __threadfence_system();
            *word = ticket | (bad ? 2u : 1u);
        }
        if (res) *res = bad ? 2u : 1u;
    }
}

/* The plane tables of a read travel with it: lplanes/rplanes point into the
   batch's staging copy, like pairs. rebase is added to those pointers (and
   gwant): 0 where the host wrote addresses, the parameter block's address
   where it wrote offsets into it (kvx_copy_inline). */
__device__ __forceinline__ void body(const kvx_rd *__restrict__ rds, u32 nreads, u32 ntasks, u64 rebase) {
    const u32 lane = threadIdx.x & 31u;
    const u32 nw = (gridDim.x * blockDim.x) >> 5;
    u32 g = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u32 r = 0, cur = 0xffffffffu, cur_plane = 0xffffffffu;
    /* The read's fields stay in registers while a warp's tasks are in it, and
       the plane bases while they are in one plane: a task then waits for one
       load (its block id pair) before its data loads. */
    u64 lplanes = 0, rplanes = 0, pairs = 0, lbstride = 0, rbstride = 0, loff = 0, roff = 0, piece = 0, lps = 0, rps = 0, cbytes = 0;
    u32 nblocks = 1, cpb = 1, npieces = 1, ppc = 1, task0 = 0;
    u64 lpb = 0, rpb = 0;
    for (; g < ntasks; g += nw) {
        while (r + 1 < nreads && g >= rds[r + 1].task0) r++;
        if (r != cur) {
            const kvx_rd *d = &rds[r];
            if (cur != 0xffffffffu && rds[cur].gcount) gen_arrive(&rds[cur], lane, rebase);
            lplanes = d->lplanes + rebase; rplanes = d->rplanes + rebase; pairs = d->pairs + rebase;
            lbstride = d->lbstride; rbstride = d->rbstride; loff = d->loff; roff = d->roff;
            piece = d->piece; lps = d->lpstride; rps = d->rpstride; cbytes = d->cbytes;
            nblocks = d->nblocks; cpb = d->cpb; npieces = d->npieces; ppc = d->ppc; task0 = d->task0;
            cur = r;
            cur_plane = 0xffffffffu;
        }
        u32 t = g - task0, c = 0, b, plane;
        if (cpb > 1) { c = t % cpb; t /= cpb; }
        b = t % nblocks;
        plane = t / nblocks;
        if (plane != cur_plane) {
            lpb = ((const u64 *)lplanes)[plane];
            rpb = ((const u64 *)rplanes)[plane];
            cur_plane = plane;
        }
        const uint2 pr = ((const uint2 *)pairs)[b];
        u64 lb = lpb + (u64)pr.x * lbstride + loff;
        u64 rb = rpb + (u64)pr.y * rbstride + roff;
        u64 len, ds = lps, ss = rps;
        u32 count;
        if (npieces == 1) {
            u64 off = (u64)c * cbytes;
            len = piece - off < cbytes ? piece - off : cbytes;
            lb += off; rb += off; count = 1; ds = ss = 0;
        } else {
            u32 p0 = c * ppc;
            count = npieces - p0 < ppc ? npieces - p0 : ppc;
            len = piece;
            lb += (u64)p0 * ds; rb += (u64)p0 * ss;
        }
        if (((lb | rb | len | ds | ss) & 15u) == 0)
            copy16((char *)lb, (const char *)rb, (u32)(len >> 4), count, ds, ss, lane);
        else
            copy1((char *)lb, (const char *)rb, len, count, ds, ss, lane);
    }
    if (cur != 0xffffffffu && rds[cur].gcount) gen_arrive(&rds[cur], lane, rebase);
}

/* 256 threads a block; 80 registers on sm_90, so up to 3 blocks share an SM
   (the default cap takes 2 per SM, leaving room for compute kernels; kvx
   clamps a larger cap to what stays resident). */
extern "C" __global__ void __launch_bounds__(256) kvx_copy(const kvx_rd *__restrict__ rds, u32 nreads, u32 ntasks) { body(rds, nreads, ntasks, 0); }

/* A batch small enough travels in the launch itself: headers, then the
   table bytes they point into by offset, in the kernel's parameters (at
   most 4 KiB below PTX ISA 8.1). The host then makes no copy and no event
   before the launch: a decode step's single read saved two
   cuMemcpyHtoDAsync calls and an event wait. Every warp reads the same
   header and block id at once, which the constant cache serves in one
   load. __grid_constant__ lets the warps address the block in place
   instead of each thread copying it. */
struct kvx_inline {
    u32 nreads, ntasks;
    u64 w[(KVX__CUDA_INLINE_BYTES - 8) / 8];
};
static_assert(sizeof(kvx_inline) == KVX__CUDA_INLINE_BYTES, "kvx_inline is not the size of kvx__cuda_inline in kvx_cuda.h");
extern "C" __global__ void __launch_bounds__(256) kvx_copy_inline(const __grid_constant__ kvx_inline p) {
    body((const kvx_rd *)p.w, p.nreads, p.ntasks, (u64)p.w);
}

/*--- verify mode: per-head checksums on the GPU ----------------------------*/

/* kvx__head_sum of kvx.h, bit for bit: a head's slices in token order (one
   slice in HND, one per token in NHD), 8 little-endian bytes at a time. */
struct kvx_sum_lay {
    u64 hb;                     /* bytes of one head of one token */
    u32 hnd, num_heads, block_tokens;
    u32 aligned;                /* 1: every slice is whole 8-byte words at 8-byte addresses */
};
#define KVX__CUDA_SUM_LAY_BYTES 24
#define KVX__CUDA_SUM_LAY_LAYOUT(X) X(hb, 0) X(hnd, 8) X(num_heads, 12) X(block_tokens, 16) X(aligned, 20)
#define KVX_AT(f, off) static_assert(offsetof(kvx_sum_lay, f) == off, "kvx_sum_lay." #f " is not at byte " #off " as in kvx_cuda.h (kvx__cuda_sum_lay)");
KVX__CUDA_SUM_LAY_LAYOUT(KVX_AT)
#undef KVX_AT
static_assert(sizeof(kvx_sum_lay) == KVX__CUDA_SUM_LAY_BYTES, "kvx_sum_lay is not the size of kvx__cuda_sum_lay in kvx_cuda.h");

/* One thread on one head: when there are heads enough to fill the GPU with
   a thread each. Aligned slices go 8 words at a time, loaded before they
   are chained, so a thread waits for memory once per 64 bytes. */
__device__ __noinline__ u32 head_sum(const unsigned char *block, u32 head, const kvx_sum_lay &l) {
    u64 h = 0x243F6A8885A308D3ull, i;
    u32 t, nt = l.hnd ? 1u : l.block_tokens;
    u64 len = l.hnd ? l.hb * l.block_tokens : l.hb;
    for (t = 0; t < nt; t++) {
        const unsigned char *p = block + (l.hnd ? (u64)head * len : ((u64)t * l.num_heads + head) * l.hb);
        i = 0;
        if (l.aligned)
            for (; i + 64 <= len; i += 64) {
                u64 v[8];
                int k;
#pragma unroll
                for (k = 0; k < 8; k++) v[k] = *(const u64 *)(p + i + 8 * k);
#pragma unroll
                for (k = 0; k < 8; k++) {
                    h = (h ^ v[k]) * 0x9E3779B97F4A7C15ull;
                    h ^= h >> 29;
                }
            }
        for (; i + 8 <= len; i += 8) {
            u64 w;
            if ((((u64)(p + i)) & 7u) == 0) w = *(const u64 *)(p + i);
            else {
                int k;
                w = 0;
                for (k = 7; k >= 0; k--) w = (w << 8) | p[i + k];
            }
            h = (h ^ w) * 0x9E3779B97F4A7C15ull;
            h ^= h >> 29;
        }
        for (; i < len; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    }
    h ^= h >> 32;
    return (u32)h | 1u;
}

/* A whole warp on one head (l.aligned), every lane getting the sum: lanes
   load words 32 apart, 8 each in flight, and the chain runs over them in
   order by shuffles. For few heads (a sample), where a thread each would
   leave the GPU idle and wait on memory: a 4 KiB head takes a few us so,
   against about 100 us for one thread loading a word at a time. It costs 32
   lanes of arithmetic per head, so many heads go a thread each. */
__device__ __noinline__ u32 head_sum_warp(const unsigned char *block, u32 head, const kvx_sum_lay &l, u32 lane) {
    u64 h = 0x243F6A8885A308D3ull;
    u32 nt = l.hnd ? 1u : l.block_tokens, wps = (u32)((l.hnd ? l.hb * l.block_tokens : l.hb) / 8), total = wps * nt, w0;
    const unsigned char *base = block + (l.hnd ? (u64)head * wps * 8 : (u64)head * l.hb);
    u64 tstride = (u64)l.num_heads * l.hb;  /* NHD: from one token's slice to the next */
    for (w0 = 0; w0 < total; w0 += 256) {
        u64 v[8];
        int k;
#pragma unroll
        for (k = 0; k < 8; k++) {
            u32 w = w0 + (u32)k * 32u + lane, t = w / wps;
            v[k] = w < total ? *(const u64 *)(base + t * tstride + (u64)(w - t * wps) * 8) : 0;
        }
#pragma unroll
        for (k = 0; k < 8; k++) {
            u32 j, at = w0 + (u32)k * 32u, n = total <= at ? 0u : total - at < 32u ? total - at : 32u;
#pragma unroll 1
            for (j = 0; j < n; j++) {
                h = (h ^ __shfl_sync(0xffffffffu, v[k], (int)j)) * 0x9E3779B97F4A7C15ull;
                h ^= h >> 29;
            }
        }
    }
    h ^= h >> 32;
    return (u32)h | 1u;
}

/* Seal: table[(plane * num_blocks + id) * num_heads + head] for every plane,
   listed block and head; warp: a warp per head (head_sum_warp), else a
   thread. */
extern "C" __global__ void kvx_csum_seal(const u64 *__restrict__ planes, const u32 *__restrict__ ids, u32 n, u32 nplanes, u64 bstride,
                                         u32 num_blocks, kvx_sum_lay l, u32 warp, u32 *__restrict__ table) {
    u64 total = (u64)nplanes * n * l.num_heads, i, at = (u64)blockIdx.x * blockDim.x + threadIdx.x, step = (u64)gridDim.x * blockDim.x;
    u32 lane = warp ? threadIdx.x & 31u : 0u;
    if (warp) { at >>= 5; step >>= 5; }
    for (i = at; i < total; i += step) {
        u32 head = (u32)(i % l.num_heads);
        u64 r = i / l.num_heads;
        u32 b = (u32)(r % n), p = (u32)(r / n);
        const unsigned char *blk = (const unsigned char *)(planes[p] + (u64)ids[b] * bstride);
        u32 sum = warp ? head_sum_warp(blk, head, l, lane) : head_sum(blk, head, l);
        if (!lane) table[((u64)p * num_blocks + ids[b]) * l.num_heads + head] = sum;
    }
}

/* Check one verified read, on its stream right behind its copy. Its sampled
   blocks are every `every`-th of its (local, remote) pairs from `first` on,
   ns of them, in each of its nplanes planes (the first is plane p0; lplanes
   lists theirs from there). Every head in [h_a, h_b) of each is summed where
   it landed (warp: a warp per head, else a thread) and compared with the
   producer's table as mapped here. res[0]: the first mismatch, res[1]: the
   first head never sealed (0 in the table), as (plane * ns + sample) *
   heads + head - h_a; 0xffffffff: none. */
extern "C" __global__ void kvx_csum_check(const uint2 *__restrict__ pairs, u32 first, u32 every, u32 ns, u32 nplanes, u32 p0,
                                          const u64 *__restrict__ lplanes, u64 lbstride, kvx_sum_lay l, u32 warp, u32 h_a, u32 h_b, u32 h_l0, u32 h_r0,
                                          const u32 *__restrict__ rtable, u32 r_num_blocks, u32 r_num_heads, u32 *res) {
    u32 nh = h_b - h_a, lane = warp ? threadIdx.x & 31u : 0u;
    u64 total = (u64)nplanes * ns * nh, i, at = (u64)blockIdx.x * blockDim.x + threadIdx.x, step = (u64)gridDim.x * blockDim.x;
    if (warp) { at >>= 5; step >>= 5; }
    for (i = at; i < total; i += step) {
        u32 item = (u32)(i / nh), p = item / ns, h = h_a + (u32)(i % nh), got;
        uint2 pr = pairs[first + (u64)(item % ns) * every];
        u32 want = rtable[((u64)(p0 + p) * r_num_blocks + pr.y) * r_num_heads + (h - h_r0)];
        const unsigned char *blk = (const unsigned char *)(lplanes[p] + (u64)pr.x * lbstride);
        if (!want) { if (!lane) atomicMin(&res[1], (u32)i); continue; }
        got = warp ? head_sum_warp(blk, h - h_l0, l, lane) : head_sum(blk, h - h_l0, l);
        if (!lane && got != want) atomicMin(&res[0], (u32)i);
    }
}
