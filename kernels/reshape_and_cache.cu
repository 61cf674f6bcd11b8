// Writes this step's key/value rows into the paged cache through the slot
// mapping (kernels/reference.py: reshape_and_cache). One thread block per
// token copies its [num_kv_heads, head_dim] row in 16-byte pieces, whatever
// the element type; slot -1 marks a padding row and is skipped.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests, so it includes no headers.

extern "C" __global__ void reshape_and_cache_kernel(
    const uint4* __restrict__ key, const uint4* __restrict__ value,
    uint4* __restrict__ key_cache, uint4* __restrict__ value_cache,
    const long long* __restrict__ slot_mapping,
    long long key_token_stride, long long value_token_stride,  // in 16-byte pieces
    int row_pieces) {                                          // 16-byte pieces per cache slot
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
