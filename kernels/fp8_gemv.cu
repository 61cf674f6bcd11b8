// Weight-only FP8 GEMV for decode steps of a few tokens: out[m, n] =
// scale[n] * sum_k x[m, k] * W[n, k], with W float8 E4M3 [N, K] row-major,
// x and out bf16 (kernels/reference.py: fp8_weight_gemv).
//
// A decode step reads every weight once for a handful of tokens, so its GEMMs
// are bound by the bytes of the weights: FP8 halves them. torch._scaled_mm
// also quantizes the activations (several small kernels per projection) and
// is tuned for large M; this kernel streams each weight row once with 16-byte
// loads, eight in flight per lane, widens E4M3 to float in registers and
// keeps the activations in bf16, so at M <= 8 it runs at the bandwidth of the
// weight read. One warp per output row; M is a template parameter, so the
// accumulators stay in registers.
//
// Needs K % 16 == 0, 16-byte aligned rows and sm_89+ (cvt from e4m3).
// Built by NVRTC at first use (kernels/loader.py); it includes only
// kernels/grid_dependency.cuh.

#include "grid_dependency.cuh"

typedef unsigned short u16;
typedef unsigned int u32;

constexpr int GEMV_WARPS = 8;  // output rows per block

__device__ __forceinline__ float bf16_low(u32 pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_high(u32 pair) { return __uint_as_float(pair & 0xffff0000u); }

__device__ __forceinline__ void widen_e4m3x4(u32 word, float* out) {
    u32 lo, hi;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.rn.f16x2.e4m3x2 %0, a; cvt.rn.f16x2.e4m3x2 %1, b; }" : "=r"(lo), "=r"(hi) : "r"(word));
    asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(out[0]), "=f"(out[1]) : "r"(lo));
    asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(out[2]), "=f"(out[3]) : "r"(hi));
}

__device__ __forceinline__ float dot8(const float* w, uint4 x) {
    return w[0] * bf16_low(x.x) + w[1] * bf16_high(x.x) + w[2] * bf16_low(x.y) + w[3] * bf16_high(x.y) + w[4] * bf16_low(x.z) +
           w[5] * bf16_high(x.z) + w[6] * bf16_low(x.w) + w[7] * bf16_high(x.w);
}

template <int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32) fp8_gemv_kernel(
    u16* __restrict__ out, const u16* __restrict__ x, const unsigned char* __restrict__ weight, const float* __restrict__ scale, int n, int k) {
    enter_dependent_grid();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4* w = reinterpret_cast<const uint4*>(weight + (size_t)row * k);
    const int chunks = k / 16;  // 16 weights per 16-byte load
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll 8
    for (int c = lane; c < chunks; c += 32) {
        const uint4 packed = __ldg(w + c);
        float wf[16];
        widen_e4m3x4(packed.x, wf);
        widen_e4m3x4(packed.y, wf + 4);
        widen_e4m3x4(packed.z, wf + 8);
        widen_e4m3x4(packed.w, wf + 12);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * k) + 2 * c;
            acc[m] += dot8(wf, __ldg(xv)) + dot8(wf + 8, __ldg(xv + 1));
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float sum = acc[m];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0) {
            u16 bits;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(sum * scale[row]));
            out[(size_t)m * n + row] = bits;
        }
    }
}
