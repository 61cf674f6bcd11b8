// A grammar's token bitmask applied to a step's float32 logits, in place
// (services/engine/executor/grammar.py: apply_token_bitmask is the torch
// reference): bit t of a mask row (int32 words, bit t % 32 of word t / 32)
// set when token t may come next; every other token of the logits row the
// mask belongs to becomes -inf, ids past the mask's words included (a model
// vocabulary padded beyond the tokenizer's). Mask row i belongs to logits row
// logits_rows[i], or to row i when logits_rows is null (the masked rows are
// the step's first, in order, as when every row is constrained: no index list
// to copy to the device). A mask row that allows none of the vocabulary
// leaves its logits as they are: its grammar has ended and the engine ends
// the sequence.
//
// Grid: (mask rows, slices of BITMASK_TOKENS tokens). Each block first ORs
// its whole mask row (a few KiB, read by every slice from L2) to learn
// whether it allows anything, then covers its slice with consecutive
// threads on consecutive tokens, so a warp's 32 tokens share one mask word
// and its stores of -inf are coalesced.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests; it includes only kernels/grid_dependency.cuh.

#include "grid_dependency.cuh"

constexpr int BITMASK_THREADS = 256;
constexpr int BITMASK_TOKENS = BITMASK_THREADS * 32;  // tokens per block

// The bits of word w that name tokens below vocab_size.
__device__ __forceinline__ unsigned int in_vocabulary(unsigned int word, int w, int vocab_size) {
    const int tokens = vocab_size - w * 32;
    return tokens >= 32 ? word : tokens > 0 ? word & ((1u << tokens) - 1u) : 0u;
}

extern "C" __global__ void apply_token_bitmask_kernel(
    float* __restrict__ logits, const int* __restrict__ bitmask, const long long* __restrict__ logits_rows,
    int vocab_size, int words, long long logits_stride) {
    enter_dependent_grid();
    const unsigned int* mask = reinterpret_cast<const unsigned int*>(bitmask) + (long long)blockIdx.x * words;
    unsigned int any = 0;
    for (int w = threadIdx.x; w < words; w += BITMASK_THREADS) any |= in_vocabulary(mask[w], w, vocab_size);
    if (!__syncthreads_or(any != 0)) return;
    float* row = logits + (logits_rows ? logits_rows[blockIdx.x] : (long long)blockIdx.x) * logits_stride;
    const int first = blockIdx.y * BITMASK_TOKENS;
#pragma unroll 4
    for (int k = 0; k < 32; ++k) {
        const int t = first + k * BITMASK_THREADS + threadIdx.x;
        if (t >= vocab_size) break;
        const int w = t >> 5;
        if (w >= words || !((mask[w] >> (t & 31)) & 1u)) row[t] = __int_as_float(0xff800000);  // -inf; NVRTC has no math.h
    }
}
