// GEMV for decode steps of a few tokens: out[m, n] = sum_k x[m, k] * W[n, k]
// (times scale[n] for FP8 weights), W row-major [N, K], x and out bf16
// (kernels/reference.py: weight_gemv, fp8_weight_gemv).
//
// A decode step reads every weight once for a handful of tokens, so its
// projections are bound by the weights' bytes. The GEMM libraries tune for
// large M, and their kernels are ordinary launches: the device drains before
// and after each, a few microseconds a projection that a small model's step
// (llama-1b: about 0.6 ms of weights over 65 projections) feels. This kernel
// streams each weight row once with 16-byte loads, keeps the activations in
// bf16 and accumulates in float. One warp per output row; M is a template
// parameter, so the accumulators stay in registers.
//
// Weights are written once, at load, and never by a kernel, so a warp issues
// the loads of its row's first PREFETCH chunks before it waits for the kernel
// before it (programmatic dependent launch, grid_dependency.cuh): its
// blocks start while that kernel's last blocks run, and the weight stream is
// under way when the activations become readable.
//
// Two weight formats (Rows): bf16 (8 weights a 16-byte load) and float8 E4M3
// with a float32 scale per output row (16 a load, widened in registers; a
// weight-only FP8 GEMV halves the bytes of the bf16 one; needs sm_89+).
// Needs K % (weights a load) == 0 and 16-byte aligned rows.
// Built by NVRTC at first use (kernels/loader.py); it includes only
// kernels/grid_dependency.cuh.

#include "grid_dependency.cuh"

typedef unsigned short u16;
typedef unsigned int u32;

constexpr int GEMV_WARPS = 8;  // output rows per block
constexpr int PREFETCH = 8;    // 16-byte loads a lane issues before waiting

__device__ __forceinline__ float bf16_low(u32 pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_high(u32 pair) { return __uint_as_float(pair & 0xffff0000u); }

__device__ __forceinline__ float dot8(const float* w, uint4 x) {
    return w[0] * bf16_low(x.x) + w[1] * bf16_high(x.x) + w[2] * bf16_low(x.y) + w[3] * bf16_high(x.y) + w[4] * bf16_low(x.z) +
           w[5] * bf16_high(x.z) + w[6] * bf16_low(x.w) + w[7] * bf16_high(x.w);
}

struct Bf16Rows {
    static constexpr int PER_LOAD = 8;
    static constexpr bool SCALED = false;
    static __device__ __forceinline__ void widen(uint4 packed, float (&w)[PER_LOAD]) {
        const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[2 * i] = bf16_low(words[i]);
            w[2 * i + 1] = bf16_high(words[i]);
        }
    }
};

struct E4m3Rows {
    static constexpr int PER_LOAD = 16;
    static constexpr bool SCALED = true;
    // Four E4M3 weights (one word, the first in the low byte) as floats,
    // through fp16: exact, one conversion a pair.
    static __device__ __forceinline__ void widen4(u32 word, float* out) {
#if __CUDA_ARCH__ >= 890
        u32 lo, hi;
        asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.rn.f16x2.e4m3x2 %0, a; cvt.rn.f16x2.e4m3x2 %1, b; }" : "=r"(lo), "=r"(hi) : "r"(word));
        asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(out[0]), "=f"(out[1]) : "r"(lo));
        asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(out[2]), "=f"(out[3]) : "r"(hi));
#else
        __trap();  // cuda_gemv launches FP8 weights only on sm_89 and newer
#endif
    }
    static __device__ __forceinline__ void widen(uint4 packed, float (&w)[PER_LOAD]) {
        widen4(packed.x, w);
        widen4(packed.y, w + 4);
        widen4(packed.z, w + 8);
        widen4(packed.w, w + 12);
    }
};

// x's 16-byte loads that meet weight load c: PER_LOAD / 8 of them.
template <typename Rows, int M>
__device__ __forceinline__ void accumulate(float (&acc)[M], uint4 packed, const u16* __restrict__ x, int k, int c) {
    float w[Rows::PER_LOAD];
    Rows::widen(packed, w);
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * k) + c * (Rows::PER_LOAD / 8);
#pragma unroll
        for (int part = 0; part < Rows::PER_LOAD / 8; ++part) acc[m] += dot8(w + 8 * part, __ldg(xv + part));
    }
}

template <typename Rows, int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_kernel(
    u16* __restrict__ out, const u16* __restrict__ x, const uint4* __restrict__ weight, const float* __restrict__ scale, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = min(blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5), n - 1);  // spare warps re-read the last row
    const uint4* w = weight + (size_t)row * (k / Rows::PER_LOAD);
    const int chunks = k / Rows::PER_LOAD;
    uint4 first[PREFETCH];
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
        const int c = lane + 32 * i;
        first[i] = c < chunks ? __ldg(w + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    enter_dependent_grid();
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
        const int c = lane + 32 * i;
        if (c < chunks) accumulate<Rows, M>(acc, first[i], x, k, c);
    }
#pragma unroll 8
    for (int c = lane + 32 * PREFETCH; c < chunks; c += 32) accumulate<Rows, M>(acc, __ldg(w + c), x, k, c);
    if (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5) >= n) return;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float sum = acc[m];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0) {
            u16 bits;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(Rows::SCALED ? sum * scale[row] : sum));
            out[(size_t)m * n + row] = bits;
        }
    }
}
