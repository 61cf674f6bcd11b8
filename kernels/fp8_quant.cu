// Per-token FP8 (E4M3) quantization of a linear layer's activations, ahead of
// torch._scaled_mm with row-wise scales (kernels/reference.py: quantize_rows):
// for each row of x, scale = max(absmax(row) * inverse_max, min_scale) and
// q = e4m3(x / scale), saturated to +-448. torch runs this as five small
// kernels per projection (abs, amax, divide, clamp, cast); this is one. It
// reads the row twice, the second time from L1/L2 (a row is at most a few
// tens of KB), and writes q once.
//
// Bit-exact with the reference as torch computes it on the GPU:
// - the absmax is taken on the 16-bit patterns with the sign bit cleared: for
//   non-negative floats the unsigned order is the numeric order, and every NaN
//   pattern sorts above infinity, so a NaN propagates as in torch's amax;
// - torch divides a tensor by a Python scalar as a product with the float
//   reciprocal, hence `* inverse_max`; the floor leaves a NaN as clamp does;
// - x / scale is torch's IEEE division: __fdiv_rn, which --use_fast_math
//   leaves correctly rounded;
// - cvt.rn.satfinite rounds to nearest even as torch's cast does, and turns
//   anything beyond +-448 (infinities too) into +-448 as the clamp before that
//   cast does; a NaN stays NaN.
// Flushing subnormals to zero (--use_fast_math) changes no result: the scale
// is at least min_scale (1e-12), so a quotient with a subnormal x or a
// subnormal quotient lies far below E4M3's smallest step (2^-9) and rounds
// to a zero of the same sign either way, and an absmax whose product with
// inverse_max is subnormal is floored to min_scale either way.
//
// Work split (kernels/cuda_fp8_quant.py: launch_config): a row of at most
// four accesses per lane of a warp (hidden <= 1024 with 16-byte accesses)
// takes one warp, QUANT_WARPS rows to a block, so its absmax is a single
// __reduce_max_sync with no block barrier and a narrow row leaves no threads
// of a block idle. Wider rows (4096, 14336) take a block each, so the few
// rows of a decode step still spread over many multiprocessors. Rows whose
// width, stride and start are multiples of 8 elements are read 16 bytes at a
// time and written 8 bytes at a time (VEC = 8); others one element at a time.
//
// Needs sm_89+ (cvt to e4m3). Built by NVRTC at first use (kernels/loader.py)
// and by nvcc in the CPU tests; it includes only kernels/dtypes.cuh and
// kernels/grid_dependency.cuh.

#include "dtypes.cuh"
#include "grid_dependency.cuh"

typedef unsigned int u32;

constexpr int QUANT_WARPS = 8;     // rows per block when a warp takes a row
constexpr u32 ABS_MASK = 0x7fffu;  // all but the sign bit of a bf16 or fp16

// VEC consecutive 16-bit patterns of a row, each in the low half of a word.
template <int VEC>
__device__ __forceinline__ void load_patterns(const u16* p, u32 (&bits)[VEC]) {
    if constexpr (VEC == 8) {
        const uint4 packed = *reinterpret_cast<const uint4*>(p);
        const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            bits[2 * j] = words[j] & 0xffffu;  // little-endian: the lower address in the low half
            bits[2 * j + 1] = words[j] >> 16;
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) bits[j] = p[j];
    }
}

// Two floats as E4M3 bytes, `low` in the low byte (as cuda_fp8.h's
// __nv_cvt_float2_to_fp8x2 with __NV_SATFINITE): cvt puts its first source
// in the high byte.
__device__ __forceinline__ u32 to_e4m3x2(float low, float high) {
    u16 pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(high), "f"(low));
    return pair;
}

template <int VEC>
__device__ __forceinline__ void store_e4m3(unsigned char* p, const float (&values)[VEC]) {
    if constexpr (VEC == 8) {
        uint2 packed;
        packed.x = to_e4m3x2(values[0], values[1]) | (to_e4m3x2(values[2], values[3]) << 16);
        packed.y = to_e4m3x2(values[4], values[5]) | (to_e4m3x2(values[6], values[7]) << 16);
        *reinterpret_cast<uint2*>(p) = packed;
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) p[j] = (unsigned char)to_e4m3x2(values[j], 0.0f);
    }
}

// q [rows, hidden] E4M3 (contiguous), scale [rows] float32, x [rows, hidden]
// bf16 or fp16 with row stride x_stride. Grid: one block per row, or with
// WARP_PER_ROW one per QUANT_WARPS rows (blockDim.x = QUANT_WARPS * 32).
template <typename T, int VEC, bool WARP_PER_ROW>
__global__ void quantize_rows_kernel(
    unsigned char* __restrict__ q, float* __restrict__ scale, const u16* __restrict__ x,
    int rows, int hidden, long long x_stride, float inverse_max, float min_scale) {
    enter_dependent_grid();
    static_assert(VEC == 1 || VEC == 8, "16-byte accesses or single elements");
    const int lane = threadIdx.x % 32;
    const int row = WARP_PER_ROW ? blockIdx.x * QUANT_WARPS + threadIdx.x / 32 : blockIdx.x;
    // A row belongs to a whole warp (or the whole block), so the warps that
    // leave here leave together and every shuffle and barrier below is full.
    if (row >= rows) return;
    const int first = (WARP_PER_ROW ? lane : threadIdx.x) * VEC;
    const int step = (WARP_PER_ROW ? 32 : blockDim.x) * VEC;
    const u16* x_row = x + row * x_stride;

    u32 amax = 0;
    for (int i = first; i < hidden; i += step) {
        u32 bits[VEC];
        load_patterns<VEC>(x_row + i, bits);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const u32 magnitude = bits[j] & ABS_MASK;
            amax = magnitude > amax ? magnitude : amax;
        }
    }
    amax = __reduce_max_sync(0xffffffffu, amax);
    if (!WARP_PER_ROW) {
        __shared__ u32 warp_max[32];
        if (lane == 0) warp_max[threadIdx.x / 32] = amax;
        __syncthreads();
        // Every warp reduces the partials itself: no second barrier.
        amax = lane < blockDim.x / 32 ? warp_max[lane] : 0u;
        amax = __reduce_max_sync(0xffffffffu, amax);
    }
    float row_scale = T::to_float((u16)amax) * inverse_max;
    row_scale = row_scale < min_scale ? min_scale : row_scale;  // a NaN stays NaN, as in torch's clamp
    if ((WARP_PER_ROW ? lane : threadIdx.x) == 0) scale[row] = row_scale;

    unsigned char* q_row = q + (long long)row * hidden;
    for (int i = first; i < hidden; i += step) {
        u32 bits[VEC];
        load_patterns<VEC>(x_row + i, bits);
        float values[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) values[j] = __fdiv_rn(T::to_float((u16)bits[j]), row_scale);
        store_e4m3<VEC>(q_row + i, values);
    }
}
