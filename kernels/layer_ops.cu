// The small per-layer operations around the GEMMs and attention, fused so a
// decoder layer launches three kernels where torch launches about thirty
// (kernels/reference.py: rms_norm, add_rms_norm, rotary_embedding,
// silu_and_mul). Each rounds to the 16-bit type wherever the reference does,
// so the engine computes what HF transformers computes, not a more exact but
// different value.
//
// Work is spread over the hidden dimension as well as over tokens, so a
// decode step of one or two tokens still fills many multiprocessors: RMSNorm
// gives a row one block wide enough to load it in a single round, rotary
// gives each thread a piece of one head, SiLU-and-mul splits each row over
// blocks.
// Rows whose width and strides are multiples of 8 elements (16 bytes) are read
// and written 8 elements at a time (VEC = 8); the rest one at a time.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests; it includes only kernels/dtypes.cuh and kernels/grid_dependency.cuh.

#include "dtypes.cuh"
#include "grid_dependency.cuh"

// Rounded through the 16-bit type, as a torch op on 16-bit tensors rounds its result.
template <typename T>
__device__ __forceinline__ float round_to(float value) {
    return T::to_float(T::from_float(value));
}

// VEC consecutive 16-bit elements, loaded or stored in one access when VEC = 8.
template <int VEC>
struct Pack {
    u16 v[VEC];
    __device__ __forceinline__ void load(const u16* p) {
        if (VEC == 8) {
            *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
        } else {
            for (int j = 0; j < VEC; ++j) v[j] = p[j];
        }
    }
    __device__ __forceinline__ void store(u16* p) const {
        if (VEC == 8) {
            *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
        } else {
            for (int j = 0; j < VEC; ++j) p[j] = v[j];
        }
    }
};

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
// the residual stream of the next sublayer. One block per row.
template <typename T, bool ADD_RESIDUAL, int VEC>
__global__ void rms_norm_kernel(
    u16* __restrict__ out, u16* __restrict__ residual, const u16* __restrict__ x, const u16* __restrict__ weight,
    int hidden, long long x_stride, long long residual_stride, long long out_stride, float eps) {
    enter_dependent_grid();
    __shared__ float scratch[32];
    const u16* x_row = x + blockIdx.x * x_stride;
    u16* residual_row = residual + blockIdx.x * residual_stride;
    float sum_of_squares = 0.0f;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        Pack<VEC> values;
        values.load(x_row + i);
        if (ADD_RESIDUAL) {
            Pack<VEC> residuals;
            residuals.load(residual_row + i);
            for (int j = 0; j < VEC; ++j) values.v[j] = T::from_float(T::to_float(values.v[j]) + T::to_float(residuals.v[j]));
            values.store(residual_row + i);
        }
        for (int j = 0; j < VEC; ++j) {
            const float value = T::to_float(values.v[j]);
            sum_of_squares += value * value;
        }
    }
    const float inverse_rms = rsqrtf(block_sum(sum_of_squares, scratch) / hidden + eps);
    // Each thread reads back only the elements it wrote above.
    const u16* row = ADD_RESIDUAL ? residual_row : x_row;
    u16* out_row = out + blockIdx.x * out_stride;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        Pack<VEC> values, weights;
        values.load(row + i);
        weights.load(weight + i);
        for (int j = 0; j < VEC; ++j) {
            const float normalised = round_to<T>(T::to_float(values.v[j]) * inverse_rms);
            values.v[j] = T::from_float(normalised * T::to_float(weights.v[j]));
        }
        values.store(out_row + i);
    }
}

// Rotates the query and key heads of one token in place by its position (the
// rotate-half layout): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, with
// cos/sin rounded to T and each product rounded before the sum, as the
// reference does. cos/sin: [max_positions, head_dim] fp32, both halves equal.
// Each thread rotates VEC elements of a head's first half with their
// partners in the second; a token's query heads then key heads are numbered
// in pieces of VEC, so a prefill chunk launches a block or a few per token
// (not one per head) and a decode step still spreads over many threads.
// Grid: (tokens, blocks a token).
template <typename T, int VEC>
__global__ void rotary_embedding_kernel(
    u16* __restrict__ query, u16* __restrict__ key, const long long* __restrict__ positions,
    const float* __restrict__ cos_table, const float* __restrict__ sin_table,
    int num_heads, int num_kv_heads, int head_dim,
    long long query_token_stride, long long query_head_stride, long long key_token_stride, long long key_head_stride) {
    enter_dependent_grid();
    const int half = head_dim / 2;
    const int pieces_per_head = half / VEC;
    const int piece = blockIdx.y * blockDim.x + threadIdx.x;
    if (piece >= (num_heads + num_kv_heads) * pieces_per_head) return;
    const int head = piece / pieces_per_head;
    const int first = piece % pieces_per_head * VEC;
    const long long token = blockIdx.x;
    const float* cos_row = cos_table + positions[token] * head_dim + first;
    const float* sin_row = sin_table + positions[token] * head_dim + first;
    u16* row = (head < num_heads ? query + token * query_token_stride + head * query_head_stride
                                 : key + token * key_token_stride + (head - num_heads) * key_head_stride) + first;
    Pack<VEC> x1, x2;
    x1.load(row);
    x2.load(row + half);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const float cos_value = round_to<T>(cos_row[j]), sin_value = round_to<T>(sin_row[j]);
        const float a = T::to_float(x1.v[j]), b = T::to_float(x2.v[j]);
        x1.v[j] = T::from_float(round_to<T>(a * cos_value) - round_to<T>(b * sin_value));
        x2.v[j] = T::from_float(round_to<T>(b * cos_value) + round_to<T>(a * sin_value));
    }
    x1.store(row);
    x2.store(row + half);
}

// out = T(silu(gate)) * up, where gate_up's row is [gate | up] of 2 * width.
// Grid: (tokens, slices of the row), each thread VEC elements.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(u16* __restrict__ out, const u16* __restrict__ gate_up, int width, long long gate_up_stride) {
    enter_dependent_grid();
    const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (i >= width) return;
    const u16* gate = gate_up + blockIdx.x * gate_up_stride;
    Pack<VEC> gates, ups;
    gates.load(gate + i);
    ups.load(gate + width + i);
    for (int j = 0; j < VEC; ++j) {
        const float g = T::to_float(gates.v[j]);
        const float activated = round_to<T>(g / (1.0f + __expf(-g)));
        gates.v[j] = T::from_float(activated * T::to_float(ups.v[j]));
    }
    gates.store(out + (long long)blockIdx.x * width + i);
}
