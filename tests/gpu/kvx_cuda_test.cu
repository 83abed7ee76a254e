/*
    kvx_cuda_test.cu -- the device code of the CUDA tests and benchmark, the
    source of the PTX text in tests/lib/kvx_cuda_test.h (kernels/gen_ptx.sh
    writes it there; the tests build without nvcc).
*/
typedef unsigned long long u64;
typedef unsigned int u32;

/* Compare n 32-bit words of a and b: mismatches are added to out[0]. The
   first thread also copies the completion word *status (if given) to out[1],
   so a test sees what the device saw after its stream wait. */
extern "C" __global__ void kvx_t_check(const u32 *a, const u32 *b, u64 n, const volatile u64 *status, u64 *out) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    u32 bad = 0;
    if (i == 0 && status) out[1] = *status;
    for (; i < n; i += stride) bad += a[i] != b[i];
    for (int o = 16; o; o >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31u) == 0 && bad) atomicAdd(&out[0], (u64)bad);
}

/* Arithmetic that keeps every SM busy for a while: the compute kernel whose
   slowdown the benchmark reports while copies run beside it. */
extern "C" __global__ void kvx_t_fma(float *out, u32 iters) {
    float a = (float)threadIdx.x * 1e-3f, b = 1.0001f, c = 0.999f, d = (float)blockIdx.x * 1e-4f;
    for (u32 i = 0; i < iters; i++) {
        a = fmaf(a, b, c); d = fmaf(d, c, b);
        b = fmaf(b, 0.9999f, 1e-7f); c = fmaf(c, 1.0001f, -1e-7f);
    }
    if (a + b + c + d == 12345.f) out[blockIdx.x * blockDim.x + threadIdx.x] = a;
}

/* A launch of 4000 bytes of parameters, as the copy kernel's kvx_copy_inline
   takes: the benchmark times it beside a launch of few (kvx_t_fma), the
   floor of a post whose batch travels in its launch. */
struct kvx_t_block { u64 w[500]; };
extern "C" __global__ void kvx_t_params(const __grid_constant__ kvx_t_block p, u64 *out) {
    if (p.w[0] == 12345u && !threadIdx.x) out[0] = p.w[1];
}
