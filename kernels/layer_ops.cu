// The small per-layer operations around the GEMMs and attention, fused so a
// decoder layer launches three kernels where torch launches about thirty
// (kernels/reference.py: rms_norm, add_rms_norm, rotary_embedding,
// silu_and_mul). Each rounds to the 16-bit type wherever the reference does,
// so the engine computes what HF transformers computes, not a more exact but
// different value.
//
// One thread block per token; rows are short (a few thousand elements), so
// a block walks its row with a stride loop and reduces through shared memory.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests, so it includes no headers.

typedef unsigned short u16;

struct Bf16 {
    static __device__ __forceinline__ float to_float(u16 bits) { return __uint_as_float(((unsigned int)bits) << 16); }
    static __device__ __forceinline__ u16 from_float(float value) {
        u16 bits;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
        return bits;
    }
};

struct Fp16 {
    static __device__ __forceinline__ float to_float(u16 bits) {
        float value;
        asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
        return value;
    }
    static __device__ __forceinline__ u16 from_float(float value) {
        u16 bits;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
        return bits;
    }
};

// Rounded through the 16-bit type, as a torch op on 16-bit tensors rounds its result.
template <typename T>
__device__ __forceinline__ float round_to(float value) {
    return T::to_float(T::from_float(value));
}

__device__ __forceinline__ float block_sum(float value, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < blockDim.x / 32 ? scratch[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
        if (lane == 0) scratch[0] = value;
    }
    __syncthreads();
    return scratch[0];
}

// out = weight * T(row * rsqrt(mean(row^2) + eps)), the row normalised in fp32.
// With ADD_RESIDUAL the row is T(x + residual), written back to residual first:
// the residual stream of the next sublayer.
template <typename T, bool ADD_RESIDUAL>
__global__ void rms_norm_kernel(
    u16* __restrict__ out, u16* __restrict__ residual, const u16* __restrict__ x, const u16* __restrict__ weight,
    int hidden, long long x_stride, long long residual_stride, long long out_stride, float eps) {
    __shared__ float scratch[32];
    const u16* x_row = x + blockIdx.x * x_stride;
    u16* residual_row = residual + blockIdx.x * residual_stride;
    float sum_of_squares = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float value = T::to_float(x_row[i]);
        if (ADD_RESIDUAL) {
            const u16 summed = T::from_float(value + T::to_float(residual_row[i]));
            residual_row[i] = summed;
            value = T::to_float(summed);
        }
        sum_of_squares += value * value;
    }
    const float inverse_rms = rsqrtf(block_sum(sum_of_squares, scratch) / hidden + eps);
    // Each thread reads back only the elements it wrote above.
    const u16* row = ADD_RESIDUAL ? residual_row : x_row;
    u16* out_row = out + blockIdx.x * out_stride;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float normalised = round_to<T>(T::to_float(row[i]) * inverse_rms);
        out_row[i] = T::from_float(normalised * T::to_float(weight[i]));
    }
}

// Rotates every query and key head of one token in place by its position
// (the rotate-half layout): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, with
// cos/sin rounded to T and each product rounded before the sum, as the
// reference does. cos/sin: [max_positions, head_dim] fp32, both halves equal.
template <typename T>
__global__ void rotary_embedding_kernel(
    u16* __restrict__ query, u16* __restrict__ key, const long long* __restrict__ positions,
    const float* __restrict__ cos_table, const float* __restrict__ sin_table,
    int num_heads, int num_kv_heads, int head_dim,
    long long query_token_stride, long long query_head_stride, long long key_token_stride, long long key_head_stride) {
    const int half = head_dim / 2;
    const float* cos_row = cos_table + positions[blockIdx.x] * head_dim;
    const float* sin_row = sin_table + positions[blockIdx.x] * head_dim;
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
        const int head = pair / half, i = pair % half;
        u16* row = head < num_heads
            ? query + blockIdx.x * query_token_stride + head * query_head_stride
            : key + blockIdx.x * key_token_stride + (head - num_heads) * key_head_stride;
        const float cos_value = round_to<T>(cos_row[i]), sin_value = round_to<T>(sin_row[i]);
        const float x1 = T::to_float(row[i]), x2 = T::to_float(row[i + half]);
        row[i] = T::from_float(round_to<T>(x1 * cos_value) - round_to<T>(x2 * sin_value));
        row[i + half] = T::from_float(round_to<T>(x2 * cos_value) + round_to<T>(x1 * sin_value));
    }
}

// out = T(silu(gate)) * up, where gate_up's row is [gate | up] of 2 * width.
template <typename T>
__global__ void silu_and_mul_kernel(u16* __restrict__ out, const u16* __restrict__ gate_up, int width, long long gate_up_stride) {
    const u16* gate = gate_up + blockIdx.x * gate_up_stride;
    const u16* up = gate + width;
    u16* out_row = out + (long long)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float g = T::to_float(gate[i]);
        const float activated = round_to<T>(g / (1.0f + __expf(-g)));
        out_row[i] = T::from_float(activated * T::to_float(up[i]));
    }
}
