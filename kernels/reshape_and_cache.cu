// Writes this step's key/value rows into the paged cache through the slot
// mapping (kernels/reference.py: reshape_and_cache). One thread block per
// token copies its [num_kv_heads, head_dim] row in 16-byte pieces, whatever
// the element type; slot -1 marks a padding row and is skipped. An FP8 cache
// has its own kernel below.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests; it includes only kernels/grid_dependency.cuh.

#include "grid_dependency.cuh"

extern "C" __global__ void reshape_and_cache_kernel(
    const uint4* __restrict__ key, const uint4* __restrict__ value,
    uint4* __restrict__ key_cache, uint4* __restrict__ value_cache,
    const long long* __restrict__ slot_mapping,
    long long key_token_stride, long long value_token_stride,  // in 16-byte pieces
    int row_pieces) {                                          // 16-byte pieces per cache slot
    enter_dependent_grid();
    const long long slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    const uint4* key_row = key + blockIdx.x * key_token_stride;
    const uint4* value_row = value + blockIdx.x * value_token_stride;
    uint4* key_slot = key_cache + slot * row_pieces;
    uint4* value_slot = value_cache + slot * row_pieces;
    for (int piece = threadIdx.x; piece < row_pieces; piece += blockDim.x) {
        key_slot[piece] = key_row[piece];
        value_slot[piece] = value_row[piece];
    }
}

// The same write into an FP8 (E4M3) cache: each element divided by the
// layer's scale and rounded to the nearest E4M3 value, saturated to +-448
// (kernels/reference.py: to_cache_dtype). One thread converts 8 elements:
// 16 bytes of 16-bit input to 8 bytes of cache. Needs sm_89 or newer.

struct Bf16 {
    static __device__ __forceinline__ float2 unpack(unsigned int pair) {
        return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));
    }
};

struct Fp16 {
    static __device__ __forceinline__ float2 unpack(unsigned int pair) {
        float lo, hi;
        asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(lo), "=f"(hi) : "r"(pair));
        return make_float2(lo, hi);
    }
};

// Two 16-bit elements (one 32-bit word) divided by scale, as two E4M3 bytes.
template <typename T>
__device__ __forceinline__ unsigned int to_e4m3x2(unsigned int pair, float scale) {
#if __CUDA_ARCH__ >= 890
    const float2 x = T::unpack(pair);
    unsigned short packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(x.y / scale), "f"(x.x / scale));
    return packed;
#else
    __trap();  // cuda_ops launches FP8 caches only on sm_89 and newer
    return 0;
#endif
}

template <typename T>
__device__ __forceinline__ uint2 to_e4m3x8(uint4 piece, float scale) {
    return make_uint2(to_e4m3x2<T>(piece.x, scale) | (to_e4m3x2<T>(piece.y, scale) << 16),
                      to_e4m3x2<T>(piece.z, scale) | (to_e4m3x2<T>(piece.w, scale) << 16));
}

template <typename T>
__global__ void reshape_and_cache_fp8_kernel(
    const uint4* __restrict__ key, const uint4* __restrict__ value,
    uint2* __restrict__ key_cache, uint2* __restrict__ value_cache,
    const long long* __restrict__ slot_mapping,
    long long key_token_stride, long long value_token_stride,  // in 8-element pieces
    int row_pieces,                                            // 8-element pieces per cache slot
    float k_scale, float v_scale) {
    enter_dependent_grid();
    const long long slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    const uint4* key_row = key + blockIdx.x * key_token_stride;
    const uint4* value_row = value + blockIdx.x * value_token_stride;
    uint2* key_slot = key_cache + slot * row_pieces;
    uint2* value_slot = value_cache + slot * row_pieces;
    for (int piece = threadIdx.x; piece < row_pieces; piece += blockDim.x) {
        key_slot[piece] = to_e4m3x8<T>(key_row[piece], k_scale);
        value_slot[piece] = to_e4m3x8<T>(value_row[piece], v_scale);
    }
}
