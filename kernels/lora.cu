// Batched LoRA on a projection's output: every token of a flattened batch
// may use another adapter (or none, slot -1), gathered from the device slots
// by the token's slot index (kernels/reference.py: lora_shrink, lora_expand).
//
//   shrink: shrunk[t, p * rank + r] = sum_k x[t, k] * A[k, p, slot(t), r]
//   expand: out[t, n] += sum_r shrunk[t, part(n) * rank + r] * B[slot(t), r, n]
//
// A [input, parts, slots, rank] and B [slots, rank, output] keep, for one
// input row k (shrink) or one rank row r (expand), the values that
// neighbouring threads read side by side, so every load is coalesced. A fused
// projection (q/k/v, gate/up) has a rank-wide column group of the shrunk row
// per part, and output column n reads its part's group. The adapter's scale is
// folded into B; smaller ranks are zero-padded to the slots' rank.
//
// Both kernels take a tile of LORA_TOKENS consecutive tokens per block, so a
// prefill chunk's tokens (one sequence, one adapter) read each A and B value
// once per tile; a tile whose tokens sit in different slots reads each token's
// value, once per run of equal slots. Sums are float32; the shrink splits the
// input dimension over blocks (a decode step of a few tokens still fills the
// device) and writes one float32 partial row per split, which the expand
// adds up while it loads the tile's rows into shared memory.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests; it includes only kernels/dtypes.cuh and kernels/grid_dependency.cuh.

#include "dtypes.cuh"
#include "grid_dependency.cuh"

constexpr int LORA_THREADS = 256;
constexpr int LORA_TOKENS = 16;  // tokens per block
constexpr int SHRINK_STAGE = 256;  // input columns of the tile's x staged in shared memory at once
// The staging buffer holds the threads' partial sums at the end.
static_assert(SHRINK_STAGE >= LORA_THREADS, "the shrink's staging buffer must hold a float per thread and token");

// The slots of the tile's tokens; -1 for tokens past the batch.
__device__ __forceinline__ void load_slots(int* slots, const long long* __restrict__ token_slots, int first, int num_tokens) {
#pragma unroll
    for (int m = 0; m < LORA_TOKENS; ++m) slots[m] = first + m < num_tokens ? (int)token_slots[first + m] : -1;
}

// acc[m] += in[m * in_stride] * weights[slot(m) * slot_stride], each weight
// read once per run of equal slots; tokens without an adapter are skipped.
template <typename T>
__device__ __forceinline__ void accumulate(
    float* acc, const int* slots, const float* in, int in_stride, const u16* __restrict__ weights, long long slot_stride) {
    int loaded = -1;
    float weight = 0.0f;
#pragma unroll
    for (int m = 0; m < LORA_TOKENS; ++m) {
        if (slots[m] < 0) continue;
        if (slots[m] != loaded) {
            loaded = slots[m];
            weight = T::to_float(weights[loaded * slot_stride]);
        }
        acc[m] += in[m * in_stride] * weight;
    }
}

// Grid: (token tiles, input splits, column groups of columns_per_block). A
// block's threads are LORA_THREADS / columns_per_block groups of
// columns_per_block, one thread per shrunk column in each group; the groups
// take interleaved input rows of the block's split, then add up their sums.
// partial: [splits, num_tokens, width] with width = parts * rank; a token
// without an adapter gets zeros.
template <typename T>
__global__ void __launch_bounds__(LORA_THREADS) lora_shrink_kernel(
    float* __restrict__ partial, const u16* __restrict__ x, const u16* __restrict__ lora_a, const long long* __restrict__ token_slots,
    int num_tokens, long long x_stride, int input_size, int num_parts, int num_slots, int rank, int k_per_split, int columns_per_block) {
    enter_dependent_grid();
    __shared__ float staged[SHRINK_STAGE * LORA_TOKENS];  // x of the tile: [k][token]; at the end, partial sums: [token][thread]
    const int width = num_parts * rank;
    const int first = blockIdx.x * LORA_TOKENS;
    const int groups = LORA_THREADS / columns_per_block;
    const int local = threadIdx.x % columns_per_block, group = threadIdx.x / columns_per_block;
    const int column = blockIdx.z * columns_per_block + local;
    const bool active = group < groups && column < width;
    int slots[LORA_TOKENS];
    load_slots(slots, token_slots, first, num_tokens);
    float acc[LORA_TOKENS];
#pragma unroll
    for (int m = 0; m < LORA_TOKENS; ++m) acc[m] = 0.0f;
    // A[k, p, s, r] sits at k * row + p * slots * rank + s * rank + r.
    const long long row = (long long)width * num_slots;
    const u16* a = lora_a + (active ? (long long)(column / rank) * num_slots * rank + column % rank : 0);
    const int k_begin = blockIdx.y * k_per_split;
    const int k_end = min(input_size, k_begin + k_per_split);
    for (int k0 = k_begin; k0 < k_end; k0 += SHRINK_STAGE) {
        const int stage = min(SHRINK_STAGE, k_end - k0);
        __syncthreads();  // every thread is done with the previous stage
        for (int e = threadIdx.x; e < SHRINK_STAGE * LORA_TOKENS; e += LORA_THREADS) {
            const int m = e % LORA_TOKENS, k = e / LORA_TOKENS;
            staged[e] = first + m < num_tokens && k < stage ? T::to_float(x[(first + m) * x_stride + k0 + k]) : 0.0f;
        }
        __syncthreads();
        if (active) {
            for (int k = group; k < stage; k += groups) {
                accumulate<T>(acc, slots, staged + k * LORA_TOKENS, 1, a + (k0 + k) * row, rank);
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < LORA_TOKENS; ++m) staged[m * LORA_THREADS + threadIdx.x] = acc[m];
    __syncthreads();
    if (group != 0 || column >= width) return;
    float* out = partial + (long long)blockIdx.y * num_tokens * width + column;
    for (int m = 0; m < LORA_TOKENS && first + m < num_tokens; ++m) {
        float sum = 0.0f;
        for (int g = 0; g < groups; ++g) sum += staged[m * LORA_THREADS + g * columns_per_block + local];
        out[(long long)(first + m) * width] = sum;
    }
}

// Grid: (token tiles, output column blocks of LORA_THREADS). Dynamic shared
// memory: LORA_TOKENS * width floats, the tile's shrunk rows (the splits'
// partial rows added up). Output column n belongs to part
// (n >= part1_start) + (n >= part2_start); a part that is absent starts at
// output_size. Tokens without an adapter keep their output untouched.
template <typename T>
__global__ void __launch_bounds__(LORA_THREADS) lora_expand_kernel(
    u16* __restrict__ out, const float* __restrict__ partial, const u16* __restrict__ lora_b, const long long* __restrict__ token_slots,
    int num_tokens, long long out_stride, int output_size, int num_splits, int rank, int width, int part1_start, int part2_start) {
    enter_dependent_grid();
    extern __shared__ float shrunk[];  // [LORA_TOKENS][width]
    const int first = blockIdx.x * LORA_TOKENS;
    for (int e = threadIdx.x; e < LORA_TOKENS * width; e += LORA_THREADS) {
        const int token = first + e / width;
        float sum = 0.0f;
        if (token < num_tokens) {
            for (int split = 0; split < num_splits; ++split) sum += partial[((long long)split * num_tokens + token) * width + e % width];
        }
        shrunk[e] = sum;
    }
    __syncthreads();
    const int column = blockIdx.y * LORA_THREADS + threadIdx.x;
    if (column >= output_size) return;
    int slots[LORA_TOKENS];
    load_slots(slots, token_slots, first, num_tokens);
    float acc[LORA_TOKENS];
#pragma unroll
    for (int m = 0; m < LORA_TOKENS; ++m) acc[m] = 0.0f;
    const float* rows = shrunk + ((column >= part1_start) + (column >= part2_start)) * rank;
    // B[s, r, n] sits at (s * rank + r) * output_size + n.
    const long long slot_stride = (long long)rank * output_size;
    for (int r = 0; r < rank; ++r) {
        accumulate<T>(acc, slots, rows + r, width, lora_b + (long long)r * output_size + column, slot_stride);
    }
#pragma unroll
    for (int m = 0; m < LORA_TOKENS; ++m) {
        if (slots[m] < 0) continue;
        u16* target = out + (first + m) * out_stride + column;
        *target = T::from_float(T::to_float(*target) + acc[m]);
    }
}
