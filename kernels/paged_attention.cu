// Paged attention over the KV cache layout of kernels/reference.py:
// per layer [num_blocks, block_size, num_kv_heads, head_dim], 16-bit elements.
//
// One varlen kernel serves a mixed batch of prefill chunks and decodes. A
// thread block (4 warps) takes one sequence, one KV head and one tile of that
// sequence's query tokens; the query heads that share the KV head are packed
// into the rows of the tile (row r = token r / group, head r % group), so K/V
// are read once per KV head. Warps are arranged WARPS_M (query rows, 16 each)
// by WARPS_N (slices of each 64-token K/V tile): decodes use 1 x 4 so four
// warps share one query row group and split the tokens; prefill chunks use
// 4 x 1. A tile of at most 8 rows (a decode of at most 8 query heads per KV
// head) is computed transposed, S^T = K Q^T and O^T = V^T P^T, so its rows
// fill the MMAs' n8 side instead of a quarter of their m16 side (see
// AttentionShape). Q.K^T and P.V run on tensor cores (mma.sync m16n8k16, fp32
// accumulation) with an online softmax in registers (FlashAttention-2); K/V
// tiles stream into shared memory through a ring of STAGES cp.async stages,
// so STAGES - 1 tiles are in flight while one is computed. The loop is kept
// lean because prefill tiles are bound by instruction issue, not by the
// tensor cores: masks are computed only on the tiles they cut, and shared
// memory is addressed by 32-bit offsets fixed per lane. Warps that hold whole
// rows (prefill tiles) write them from their accumulators; warps that split
// a tile's keys (decodes) merge their slices through shared memory.
//
// With a sliding window (sliding_window > 0) a query at position p sees only
// the keys at p - sliding_window + 1 .. p, and a block starts its K/V stream at
// the first key its first query row sees.
//
// Long contexts split across gridDim.y thread blocks (flash-decoding): each
// sequence divides its own context (from where the window starts) into
// gridDim.y pieces, and every block writes a normalised partial output plus
// its log-sum-exp, which combine_splits_kernel merges. With one split the
// kernel writes the output.
//
// An FP8 cache (FP8_CACHE: E4M3 elements, kernels/reference.py) streams
// through the same ring as bytes (half a 16-bit tile) and is widened to fp16
// in registers as the fragments are read, so it costs no extra pass over
// shared memory; the tensor-core loop runs in fp16 (MathType): the keys'
// scale is folded into scale_log2 and the values' into the output (v_scale).
// Two orders make byte fragments cheap. Q.K^T sums over the head dimension in
// any order, so each thread's k16 fragment takes four adjacent dimensions
// (the 32-bit word ldmatrix hands it from a key row) and its queries the
// same four. P.V reads V with ldmatrix.trans over byte pairs, which hands a
// thread two tokens of two adjacent dimensions; a byte permute splits them
// into the fragments of two n8 tiles, so each accumulator tile holds every
// other dimension (fp8_accumulator_dim; transposed, the A fragments of two
// m16 tiles, transposed_output_dim). Needs sm_89+.
//
// Built by NVRTC at first use (kernels/loader.py) and by nvcc in the CPU
// tests; it includes only kernels/grid_dependency.cuh.

#include "grid_dependency.cuh"

typedef unsigned short u16;
typedef unsigned int u32;

#define PW_NEG_INF (__int_as_float(0xff800000))

struct Fp16 {
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 packed;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
        return packed;
    }
    static __device__ __forceinline__ u32 to_f16x2(u32 pair) { return pair; }
    static __device__ __forceinline__ void mma(float (&acc)[4], const u32 (&a)[4], const u32 b0, const u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

struct Bf16 {
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 packed;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
        return packed;
    }
    // A pair of bf16 values as fp16: exact from 2^-14 to 65504, the rare
    // larger magnitude saturated to +-65504 rather than made infinite.
    static __device__ __forceinline__ u32 to_f16x2(u32 pair) {
        const float lo = fminf(fmaxf(__uint_as_float(pair << 16), -65504.f), 65504.f);
        const float hi = fminf(fmaxf(__uint_as_float(pair & 0xffff0000u), -65504.f), 65504.f);
        return Fp16::pack(lo, hi);
    }
    static __device__ __forceinline__ void mma(float (&acc)[4], const u32 (&a)[4], const u32 b0, const u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};


// Four E4M3 elements (one 32-bit word, element 0 in the low byte) as four
// fp16 elements (two words, the same order); exact, one instruction a pair.
__device__ __forceinline__ uint2 widen_e4m3x4(u32 word) {
#if __CUDA_ARCH__ >= 890
    u32 lo, hi;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.rn.f16x2.e4m3x2 %0, a; cvt.rn.f16x2.e4m3x2 %1, b; }" : "=r"(lo), "=r"(hi) : "r"(word));
    return make_uint2(lo, hi);
#else
    __trap();  // cuda_ops launches FP8 caches only on sm_89 and newer
    return make_uint2(0u, 0u);
#endif
}

// Bytes of two words picked by a byte-permute selector (prmt.b32).
__device__ __forceinline__ u32 permute_bytes(u32 low, u32 high, u32 selector) {
    u32 result;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(result) : "r"(low), "r"(high), "r"(selector));
    return result;
}

// The head dimension of element `e` (0, 1) of accumulator tile `d` in the
// P.V loop over an FP8 cache: tiles come in fours per 32 dimensions, the
// even dimensions of the first 16 (tile 0), the odd ones (tile 1), then the
// same for the next 16 (tiles 2, 3); column c of a tile is pair c.
__device__ __forceinline__ int fp8_accumulator_dim(int d, int t, int e) {
    return (d >> 2) * 32 + ((d >> 1) & 1) * 16 + 4 * t + 2 * e + (d & 1);
}

// The tensor cores' input type: an FP8 cache widens to fp16 in one
// instruction a pair (to bf16 it would take four), so with one the queries,
// keys, probabilities and values all go through fp16 MMAs.
template <typename T, bool FP8_CACHE> struct MathType { using type = T; };
template <typename T> struct MathType<T, true> { using type = Fp16; };

__device__ __forceinline__ u32 shared_address(const void* pointer) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(pointer));
    return address;
}

// Shared memory is addressed below by 32-bit offsets in the shared window
// (shared_address), so a fragment's address is a per-thread base plus a
// constant the instruction carries, with no generic-pointer arithmetic.

// 16-byte global->shared copy; a false predicate fills zeros instead (rows past
// the context must be finite: their probabilities are 0, and 0 * NaN is NaN).
__device__ __forceinline__ void copy_async_16(u32 destination, const void* source, bool predicate) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(destination), "l"(source), "r"(predicate ? 16 : 0));
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int PENDING>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(PENDING)); }

// Four 8 x 8 matrices of 16-bit elements, rows addressed by lanes 0-7, 8-15,
// 16-23, 24-31: thread (g, t) receives row g, elements 2t and 2t + 1 of each.
__device__ __forceinline__ void load_matrix_x4(u32 (&fragment)[4], u32 row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
                 : "r"(row_address));
}

// B fragments of two adjacent n8 tiles for P.V, read from V stored [token][dim].
__device__ __forceinline__ void load_matrix_x4_transposed(u32 (&fragment)[4], u32 row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
                 : "r"(row_address));
}

// An 8 x 8 matrix of 16-bit elements transposed across the warp: thread
// (g, t) holds row g, elements 2t and 2t + 1, before and after.
__device__ __forceinline__ u32 transpose_matrix(u32 fragment) {
    u32 result;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(result) : "r"(fragment));
    return result;
}

constexpr int KV_TILE = 64;        // K/V tokens a thread block stages per iteration
constexpr int THREADS = 128;

// ROWS packed (token, head) query rows per block. Up to 8 (decodes of at
// most 8 query heads per KV head) the block computes transposed: K/V tokens
// and head dimensions take the MMAs' m16 side and the query rows their n8
// side, so no fragment carries empty rows; that halves the MMAs, the score
// and output registers of a decode, and so lets more blocks share a
// multiprocessor. More rows take the m16 side in WARPS_M groups of 16.
template <int HEAD_DIM, int ROWS, int STAGES, bool FP8_CACHE>
struct AttentionShape {
    static constexpr bool TRANSPOSED = ROWS == 8;
    static constexpr int WARPS_M = TRANSPOSED ? 1 : ROWS / 16;
    static constexpr int WARPS_N = 4 / WARPS_M;
    static constexpr int WARP_TOKENS = KV_TILE / WARPS_N;  // K/V tokens each warp takes per tile
    static constexpr int ROW_STRIDE = HEAD_DIM + 8;        // padded: conflict-free fragment loads
    // A staged tile holds the cache's bytes as they are: 16-bit rows, or
    // E4M3 rows padded by 16 bytes (conflict-free 32-bit and ldmatrix reads).
    static constexpr int ELEMENT_BYTES = FP8_CACHE ? 1 : 2;
    static constexpr int STAGED_ROW_BYTES = FP8_CACHE ? HEAD_DIM + 16 : ROW_STRIDE * 2;
    static constexpr int STAGE_BYTES = 2 * KV_TILE * STAGED_ROW_BYTES;
    static constexpr int PIPELINE_BYTES = STAGES * STAGE_BYTES;
    static constexpr int EPILOGUE_BYTES = WARPS_N * ROWS * (HEAD_DIM + 2) * 4;
    static constexpr int SHARED_BYTES = PIPELINE_BYTES > EPILOGUE_BYTES ? PIPELINE_BYTES : EPILOGUE_BYTES;
    // Each thread copies LOAD_CHUNKS 16-byte chunks of K (and as many of V)
    // per tile, all at the same offset in their rows: rows r, r + ROW_STEP, ...
    static constexpr int CHUNKS_PER_ROW = HEAD_DIM * ELEMENT_BYTES / 16;
    static constexpr int LOAD_CHUNKS = KV_TILE * CHUNKS_PER_ROW / THREADS;
    static constexpr int ROW_STEP = THREADS / CHUNKS_PER_ROW;
    // Score tiles per warp and tile: n8 tiles of keys, or transposed m16 ones.
    static constexpr int S_TILES = WARP_TOKENS / (TRANSPOSED ? 16 : 8);
    // Output tiles: n8 tiles of head dimensions, or transposed m16 ones.
    static constexpr int D_TILES = HEAD_DIM / (TRANSPOSED ? 16 : 8);
};

// Where element e (0-3) of a thread's score or output accumulator tile sits:
// which of the thread's two query rows it belongs to, and for a score, which
// key of the tile; m16 x n8 accumulators hold (g, 2t), (g, 2t+1), (g+8, 2t),
// (g+8, 2t+1), with query rows on the m side or (transposed) the n side.
template <bool TRANSPOSED>
__device__ __forceinline__ int accumulator_row(int e) { return TRANSPOSED ? e & 1 : e >> 1; }
template <bool TRANSPOSED>
__device__ __forceinline__ int accumulator_key(int n, int e, int g, int t) {
    return TRANSPOSED ? n * 16 + g + 8 * (e >> 1) : n * 8 + 2 * t + (e & 1);
}

// The head dimension of transposed output tile d's element pair `upper`
// (elements 0, 1 or 2, 3) at lane row g. A 16-bit cache: tile d holds
// dimensions 16d + g and 16d + 8 + g. An FP8 cache (see the top): tiles
// come in pairs per 32 dimensions, even dimensions (tile 2j) and odd ones
// (2j + 1), the first 16 in the lower pair and the next 16 in the upper.
template <bool FP8_CACHE>
__device__ __forceinline__ int transposed_output_dim(int d, int upper, int g) {
    return FP8_CACHE ? (d >> 1) * 32 + upper * 16 + 2 * g + (d & 1) : d * 16 + upper * 8 + g;
}

// STAGES K/V tiles in flight (cp.async ring); the block-table entries a tile
// needs are read one tile before its copies are issued, so a page walk never
// waits on its own lookup. single_tile: every sequence's query rows fit in
// one tile (decode steps), so tile_index is the sequence.
template <typename T, int HEAD_DIM, int ROWS, int STAGES, bool FP8_CACHE>
__global__ void __launch_bounds__(THREADS) paged_attention_kernel(
    u16* __restrict__ out,              // [num_tokens, num_heads, HEAD_DIM], written when gridDim.y == 1
    float* __restrict__ partial_out,    // [gridDim.y, num_tokens, num_heads, HEAD_DIM]
    float* __restrict__ partial_lse,    // [gridDim.y, num_tokens, num_heads], log2 domain
    const u16* __restrict__ query, long long query_token_stride, long long query_head_stride,
    const void* __restrict__ key_cache, const void* __restrict__ value_cache,  // u16, or E4M3 bytes with FP8_CACHE
    const int* __restrict__ block_tables, int block_table_stride,
    const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int num_seqs, int num_tokens, int num_kv_heads, int group, int block_size_log2, int sliding_window,
    int single_tile,
    float scale_log2,  // times k_scale for an FP8 cache
    float v_scale) {   // 1 for a 16-bit cache
    enter_dependent_grid();
    using Shape = AttentionShape<HEAD_DIM, ROWS, STAGES, FP8_CACHE>;
    using M = typename MathType<T, FP8_CACHE>::type;
    constexpr bool TRANSPOSED = Shape::TRANSPOSED;
    constexpr int WARPS_M = Shape::WARPS_M;
    constexpr int WARPS_N = Shape::WARPS_N;
    constexpr int WARP_TOKENS = Shape::WARP_TOKENS;
    constexpr int S_TILES = Shape::S_TILES;
    constexpr int D_TILES = Shape::D_TILES;
    constexpr int PV_STEPS = WARP_TOKENS / 16;
    constexpr int QK_STEPS = HEAD_DIM / 16;
    // k16 steps of key fragments per ldmatrix.x4. Its four 8 x 16-byte
    // matrices cover two 16-byte column groups of keys 0-15 (transposed) or
    // four of keys 0-7; a k16 step is 32 bytes of 16-bit keys, 16 of E4M3.
    constexpr int KEY_STEPS = (TRANSPOSED ? 1 : 2) * (FP8_CACHE ? 2 : 1);
    constexpr int LOAD_CHUNKS = Shape::LOAD_CHUNKS;
    static_assert(STAGES >= 2, "the ring needs a stage in flight beside the one computed");

    extern __shared__ uint4 shared_raw[];
    unsigned char* shared = reinterpret_cast<unsigned char*>(shared_raw);

    const int num_heads = num_kv_heads * group;
    const int tile_tokens = ROWS / group;  // query tokens per block
    // KV heads vary fastest along x: the blocks of one tile's heads run
    // side by side and together read whole cache slots (every head of a
    // token is adjacent), not one head's slice of each.
    const int kv_head = blockIdx.x % num_kv_heads;
    const int tile_index = blockIdx.x / num_kv_heads;
    const int split = blockIdx.y;
    const int num_splits = gridDim.y;

    // Otherwise tile_index covers tile (tile_index - first_tile(s)) of the
    // sequence s whose first_tile(s) = query_start_loc[s] / tile_tokens + s
    // is the last <= tile_index; this bounds the tiles by
    // num_tokens / tile_tokens + num_seqs.
    int seq = tile_index;
    if (!single_tile) {
        int lo = 0, hi = num_seqs - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (query_start_loc[mid] / tile_tokens + mid <= tile_index) lo = mid; else hi = mid - 1;
        }
        seq = lo;
    }
    const int query_start = query_start_loc[seq];
    const int query_len = query_start_loc[seq + 1] - query_start;
    const int context_len = seq_lens[seq];
    const int first_token = single_tile ? 0 : (tile_index - (query_start / tile_tokens + seq)) * tile_tokens;
    if (first_token >= query_len) return;
    const int tokens_here = min(tile_tokens, query_len - first_token);
    const int first_position = context_len - query_len + first_token;
    const int kv_end = first_position + tokens_here;  // the last query row attends up to here
    const int kv_first = sliding_window > 0 ? max(0, first_position - sliding_window + 1) : 0;  // the first row's window
    const int piece = ((kv_end - kv_first + num_splits - 1) / num_splits + KV_TILE - 1) / KV_TILE * KV_TILE;
    const int kv_begin = kv_first + split * piece;
    const int kv_stop = min(kv_begin + piece, kv_end);
    const int num_tiles = kv_stop > kv_begin ? (kv_stop - kv_begin + KV_TILE - 1) / KV_TILE : 0;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = warp % WARPS_M, warp_n = warp / WARPS_M;
    const int g = lane >> 2, t = lane & 3;

    // The K/V copy: this thread's chunks sit in rows first_row + i * ROW_STEP
    // of a tile, at byte offset chunk_byte of the row.
    const int* block_table = block_tables + (long long)seq * block_table_stride;
    const long long slot_bytes = (long long)num_kv_heads * HEAD_DIM * Shape::ELEMENT_BYTES;
    const int first_row = threadIdx.x / Shape::CHUNKS_PER_ROW;
    const int chunk_byte = threadIdx.x % Shape::CHUNKS_PER_ROW * 16;
    const long long head_byte = (long long)kv_head * HEAD_DIM * Shape::ELEMENT_BYTES + chunk_byte;
    const int block_mask = (1 << block_size_log2) - 1;

    // The cache block of each of this thread's rows of the tile at tile_start (-1 past the split).
    auto look_up_blocks = [&](int (&blocks)[LOAD_CHUNKS], int tile_start) {
#pragma unroll
        for (int i = 0; i < LOAD_CHUNKS; ++i) {
            const int token = tile_start + first_row + i * Shape::ROW_STEP;
            blocks[i] = token < kv_stop ? block_table[token >> block_size_log2] : -1;
        }
    };
    const u32 ring = shared_address(shared);
    const u32 copy_destination = ring + first_row * Shape::STAGED_ROW_BYTES + chunk_byte;
    auto copy_tile = [&](int stage, int tile_start, const int (&blocks)[LOAD_CHUNKS]) {
        const u32 key_stage = copy_destination + stage * Shape::STAGE_BYTES;
#pragma unroll
        for (int i = 0; i < LOAD_CHUNKS; ++i) {
            const int row = first_row + i * Shape::ROW_STEP;
            const bool inside = blocks[i] >= 0;
            const long long offset =
                inside ? (((long long)blocks[i] << block_size_log2) + ((tile_start + row) & block_mask)) * slot_bytes + head_byte : 0;
            const u32 destination = key_stage + i * Shape::ROW_STEP * Shape::STAGED_ROW_BYTES;
            copy_async_16(destination, static_cast<const unsigned char*>(key_cache) + offset, inside);
            copy_async_16(destination + KV_TILE * Shape::STAGED_ROW_BYTES, static_cast<const unsigned char*>(value_cache) + offset, inside);
        }
    };

    // Each lane's offset in a warp's K and V tiles for its ldmatrix row
    // address. Keys: transposed, rows 0-15 (lanes 0-15) of two 16-byte
    // column groups (lanes 16-31); otherwise rows 0-7 of four groups. Values
    // (ldmatrix.trans): rows 0-15 of two groups, except transposed 16-bit
    // ones, whose matrices are the A fragment of V^T: keys 0-7 of the first
    // and second group, then keys 8-15 of both.
    const int row_stride = Shape::STAGED_ROW_BYTES;
    const u32 key_lane = TRANSPOSED ? ((lane & 7) + (lane & 8)) * row_stride + (lane >> 4) * 16 : (lane & 7) * row_stride + (lane >> 3) * 16;
    const u32 value_lane = !TRANSPOSED  ? (lane & 15) * row_stride + (lane >> 4) * 16
                           : FP8_CACHE ? ((lane & 7) + (lane & 8)) * row_stride + (lane >> 4) * 16
                                       : ((lane & 7) + (lane >> 4) * 8) * row_stride + (lane & 8) * 2;

    // Prologue: the first STAGES - 1 tiles in flight (one commit group per
    // tile, empty past the end, so the wait below counts uniformly), then the
    // blocks of the next tile to copy.
    int blocks[LOAD_CHUNKS];
    {
        int first_blocks[STAGES - 1][LOAD_CHUNKS];
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < num_tiles) look_up_blocks(first_blocks[s], kv_begin + s * KV_TILE);
        }
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < num_tiles) copy_tile(s, kv_begin + s * KV_TILE, first_blocks[s]);
            copy_async_commit();
        }
        if (STAGES - 1 < num_tiles) look_up_blocks(blocks, kv_begin + (STAGES - 1) * KV_TILE);
    }

    // The two query rows of this thread's accumulators (fragment rows g and
    // g + 8, or transposed columns 2t and 2t + 1) and the first key each
    // sees; and the query fragments, read while the first tiles are in
    // flight: A fragments (rows g and g + 8), or transposed B fragments
    // (row g alone), of dimensions 2t, 2t+1 and 2t+8, 2t+9 of each k16 step;
    // for an FP8 cache 4t, 4t+1 and 4t+2, 4t+3, as its key fragments hold.
    auto accumulator_query_row = [&](int half) { return TRANSPOSED ? 2 * t + half : warp_m * 16 + g + half * 8; };
    // A row's keys spread over the lanes of one g (t = 0-3: xor masks 1, 2),
    // or transposed over those of one t (g = 0-7: masks 4, 8, 16).
    constexpr int ROW_LANE_MASK_FIRST = TRANSPOSED ? 4 : 1, ROW_LANE_MASK_END = TRANSPOSED ? 32 : 4;
    auto row_position = [&](int half) {
        const int token = accumulator_query_row(half) / group;
        return token < tokens_here ? first_position + token : -1;  // -1 masks every key
    };
    constexpr int Q_HALVES = TRANSPOSED ? 1 : 2;
    u32 q_fragment[QK_STEPS][2 * Q_HALVES];
#pragma unroll
    for (int half = 0; half < Q_HALVES; ++half) {
        const int row = warp_m * 16 + g + half * 8;
        const int token = row / group;
        const bool valid = token < tokens_here;
        const u16* q_row = query + (long long)(query_start + first_token + (valid ? token : 0)) * query_token_stride +
                           (long long)(kv_head * group + row % group) * query_head_stride;
#pragma unroll
        for (int step = 0; step < QK_STEPS; ++step) {
            const int low_dim = step * 16 + (FP8_CACHE ? 4 * t : 2 * t);
            const int high_dim = step * 16 + (FP8_CACHE ? 4 * t + 2 : 8 + 2 * t);
            const u32 low = valid ? *reinterpret_cast<const u32*>(q_row + low_dim) : 0u;
            const u32 high = valid ? *reinterpret_cast<const u32*>(q_row + high_dim) : 0u;
            q_fragment[step][half] = FP8_CACHE ? T::to_f16x2(low) : low;
            q_fragment[step][half + Q_HALVES] = FP8_CACHE ? T::to_f16x2(high) : high;
        }
    }

    float acc[D_TILES][4];
#pragma unroll
    for (int d = 0; d < D_TILES; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
    float row_max[2] = {PW_NEG_INF, PW_NEG_INF};
    float row_sum[2] = {0.f, 0.f};

    for (int tile = 0; tile < num_tiles; ++tile) {
        const int tile_start = kv_begin + tile * KV_TILE;
        copy_async_wait<STAGES - 2>();  // this thread's copies of `tile` have landed
        __syncthreads();                // everyone's have, and the stage refilled next is no longer read
        const int ahead = tile + STAGES - 1;
        if (ahead < num_tiles) {
            copy_tile(ahead % STAGES, kv_begin + ahead * KV_TILE, blocks);
            if (ahead + 1 < num_tiles) look_up_blocks(blocks, kv_begin + (ahead + 1) * KV_TILE);
        }
        copy_async_commit();

        // This warp's rows of the staged K and V tiles, plus this lane's
        // row and column in the ldmatrix patterns below (key_lane, value_lane).
        const u32 keys = ring + (tile % STAGES) * Shape::STAGE_BYTES + warp_n * WARP_TOKENS * Shape::STAGED_ROW_BYTES + key_lane;
        const u32 values = ring + (tile % STAGES) * Shape::STAGE_BYTES + (KV_TILE + warp_n * WARP_TOKENS) * Shape::STAGED_ROW_BYTES + value_lane;
        const int warp_start = tile_start + warp_n * WARP_TOKENS;

        float score[S_TILES][4];
#pragma unroll
        for (int n = 0; n < S_TILES; ++n) score[n][0] = score[n][1] = score[n][2] = score[n][3] = 0.f;
        // One ldmatrix hands each thread the key fragments of KEY_STEPS k16
        // steps. Transposed, its matrices are keys 0-7 and 8-15 of two
        // 16-byte column groups (A fragments); otherwise four column groups
        // of the same eight keys (B fragments).
#pragma unroll
        for (int step = 0; step < QK_STEPS; step += KEY_STEPS) {
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) {
                u32 words[4];
                load_matrix_x4(words, keys + n * (TRANSPOSED ? 16 : 8) * Shape::STAGED_ROW_BYTES + step * 16 * Shape::ELEMENT_BYTES);
#pragma unroll
                for (int k = 0; k < KEY_STEPS; ++k) {
                    if constexpr (TRANSPOSED && FP8_CACHE) {
                        const uint2 low = widen_e4m3x4(words[2 * k]), high = widen_e4m3x4(words[2 * k + 1]);
                        const u32 key[4] = {low.x, high.x, low.y, high.y};
                        M::mma(score[n], key, q_fragment[step + k][0], q_fragment[step + k][1]);
                    } else if constexpr (TRANSPOSED) {
                        M::mma(score[n], words, q_fragment[step][0], q_fragment[step][1]);
                    } else if constexpr (FP8_CACHE) {
                        const uint2 key = widen_e4m3x4(words[k]);
                        M::mma(score[n], q_fragment[step + k], key.x, key.y);
                    } else {
                        M::mma(score[n], q_fragment[step + k], words[2 * k], words[2 * k + 1]);
                    }
                }
            }
        }

        // Causal and window mask and the end of this split, on the tiles
        // where one of them cuts (the same test for the whole block; rows
        // past its tokens then go unmasked, finite and never written), then
        // the online softmax.
        const bool masked_tile = tile_start + KV_TILE > min(kv_stop, first_position + 1) ||
                                 (sliding_window > 0 && tile_start < first_position + tokens_here - sliding_window);
        float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
        for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = accumulator_row<TRANSPOSED>(e);
                score[n][e] *= scale_log2;
                if (masked_tile) {
                    const int key_token = warp_start + accumulator_key<TRANSPOSED>(n, e, g, t);
                    const int position = row_position(half);
                    const bool allowed = key_token < kv_stop && key_token <= position && (sliding_window <= 0 || key_token > position - sliding_window);
                    if (!allowed) score[n][e] = PW_NEG_INF;
                }
                tile_max[half] = fmaxf(tile_max[half], score[n][e]);
            }
        }
        float base[2], rescale[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int mask = ROW_LANE_MASK_FIRST; mask < ROW_LANE_MASK_END; mask <<= 1) {
                tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], mask));
            }
            base[half] = tile_max[half] == PW_NEG_INF ? 0.f : tile_max[half];  // rows with nothing yet stay 0
            rescale[half] = exp2f(row_max[half] - base[half]);
            row_max[half] = tile_max[half];
            row_sum[half] *= rescale[half];
        }
#pragma unroll
        for (int d = 0; d < D_TILES; ++d) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[d][e] *= rescale[accumulator_row<TRANSPOSED>(e)];
        }
#pragma unroll
        for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                score[n][e] = exp2f(score[n][e] - base[accumulator_row<TRANSPOSED>(e)]);
                row_sum[accumulator_row<TRANSPOSED>(e)] += score[n][e];
            }
        }

#pragma unroll
        for (int step = 0; step < PV_STEPS; ++step) {
            if constexpr (TRANSPOSED) {
                // O^T += V^T P^T: the probabilities of score tile `step`
                // (keys g and g + 8, rows 2t, 2t+1) transposed into the B
                // fragment (keys 2t, 2t+1 and 2t+8, 2t+9, row g); V^T's A
                // fragments by ldmatrix.trans, matrices keys 0-7 and 8-15 of
                // two 16-byte column groups.
                const u32 p_low = transpose_matrix(M::pack(score[step][0], score[step][1]));
                const u32 p_high = transpose_matrix(M::pack(score[step][2], score[step][3]));
                if constexpr (FP8_CACHE) {
                    // A word holds keys 2t, 2t+1 of dimensions 2g, 2g+1; the
                    // even dimensions of 32 make one output tile, the odd ones the next.
#pragma unroll
                    for (int d = 0; d < D_TILES; d += 2) {
                        u32 pairs[4];
                        load_matrix_x4_transposed(pairs, values + step * 16 * Shape::STAGED_ROW_BYTES + d * 16);
#pragma unroll
                        for (int odd = 0; odd < 2; ++odd) {
                            const u32 selector = odd ? 0x7531 : 0x6420;
                            const uint2 low = widen_e4m3x4(permute_bytes(pairs[0], pairs[1], selector));
                            const uint2 high = widen_e4m3x4(permute_bytes(pairs[2], pairs[3], selector));
                            const u32 value[4] = {low.x, high.x, low.y, high.y};
                            M::mma(acc[d + odd], value, p_low, p_high);
                        }
                    }
                } else {
#pragma unroll
                    for (int d = 0; d < D_TILES; ++d) {
                        u32 value[4];
                        load_matrix_x4_transposed(value, values + step * 16 * Shape::STAGED_ROW_BYTES + d * 32);
                        M::mma(acc[d], value, p_low, p_high);
                    }
                }
            } else {
                // The score accumulators of two n8 tiles are exactly the A
                // fragment of one k16 step of P.V.
                const u32 p_fragment[4] = {
                    M::pack(score[2 * step][0], score[2 * step][1]), M::pack(score[2 * step][2], score[2 * step][3]),
                    M::pack(score[2 * step + 1][0], score[2 * step + 1][1]), M::pack(score[2 * step + 1][2], score[2 * step + 1][3])};
                if constexpr (FP8_CACHE) {
                    // Lanes 0-15 address tokens 0-15 of bytes 0-15 of a 32-dimension
                    // group, lanes 16-31 bytes 16-31; each word holds tokens 2t, 2t+1
                    // of dimensions 2g, 2g+1, split into even and odd below.
#pragma unroll
                    for (int d = 0; d < D_TILES; d += 4) {
                        u32 pairs[4];
                        load_matrix_x4_transposed(pairs, values + step * 16 * Shape::STAGED_ROW_BYTES + d * 8);
#pragma unroll
                        for (int half = 0; half < 2; ++half) {
                            const uint2 even = widen_e4m3x4(permute_bytes(pairs[2 * half], pairs[2 * half + 1], 0x6420));
                            const uint2 odd = widen_e4m3x4(permute_bytes(pairs[2 * half], pairs[2 * half + 1], 0x7531));
                            M::mma(acc[d + 2 * half], p_fragment, even.x, even.y);
                            M::mma(acc[d + 2 * half + 1], p_fragment, odd.x, odd.y);
                        }
                    }
                } else {
#pragma unroll
                    for (int d = 0; d < D_TILES; d += 2) {
                        u32 v_fragment[4];
                        load_matrix_x4_transposed(v_fragment, values + step * 16 * Shape::STAGED_ROW_BYTES + d * 16);
                        M::mma(acc[d], p_fragment, v_fragment[0], v_fragment[1]);
                        M::mma(acc[d + 1], p_fragment, v_fragment[2], v_fragment[3]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int mask = ROW_LANE_MASK_FIRST; mask < ROW_LANE_MASK_END; mask <<= 1) {
            row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], mask);
        }
    }
    // Row `row`'s output: two adjacent dimensions at a time, and with
    // several splits its log-sum-exp (total and base as in the merge below).
    auto output_row = [&](int row) {
        return (long long)(query_start + first_token + row / group) * num_heads + kv_head * group + row % group;
    };
    auto store_pair = [&](int row, int dim, float x, float y) {
        if (num_splits == 1) {
            *reinterpret_cast<u32*>(out + output_row(row) * HEAD_DIM + dim) = T::pack(x, y);
        } else {
            const long long split_row = (long long)split * num_tokens * num_heads + output_row(row);
            *reinterpret_cast<float2*>(partial_out + split_row * HEAD_DIM + dim) = make_float2(x, y);
        }
    };
    auto store_lse = [&](int row, float total, float base) {
        if (num_splits > 1) {
            partial_lse[(long long)split * num_tokens * num_heads + output_row(row)] = total > 0.f ? base + log2f(total) : PW_NEG_INF;
        }
    };

    if constexpr (WARPS_N == 1) {
        // Each warp holds whole rows: it normalises and writes them from its
        // accumulators, with no merge through shared memory and no barrier.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = accumulator_query_row(half);
            if (row / group >= tokens_here) continue;
            const float inverse = row_sum[half] > 0.f ? v_scale / row_sum[half] : 0.f;
#pragma unroll
            for (int d = 0; d < D_TILES; ++d) {
                if constexpr (FP8_CACHE) {
                    // Tiles 2j and 2j + 1 hold a dimension and the next (fp8_accumulator_dim).
                    if (d & 1) continue;
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        store_pair(row, fp8_accumulator_dim(d, t, e), acc[d][2 * half + e] * inverse, acc[d + 1][2 * half + e] * inverse);
                    }
                } else {
                    store_pair(row, d * 8 + 2 * t, acc[d][2 * half] * inverse, acc[d][2 * half + 1] * inverse);
                }
            }
            if (t == 0) store_lse(row, row_sum[half], row_max[half] == PW_NEG_INF ? 0.f : row_max[half]);
        }
        return;
    }

    copy_async_wait<0>();
    __syncthreads();  // the epilogue reuses the pipeline's shared memory

    // Epilogue: each warp leaves (max, sum, unnormalised output) per row in
    // shared memory; the block merges the WARPS_N slices of every row.
    float* merge_out = reinterpret_cast<float*>(shared_raw);                  // [WARPS_N][ROWS][HEAD_DIM]
    float* merge_max = merge_out + WARPS_N * ROWS * HEAD_DIM;             // [WARPS_N][ROWS]
    float* merge_sum = merge_max + WARPS_N * ROWS;                        // [WARPS_N][ROWS]
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = accumulator_query_row(half);
        float* out_row = merge_out + (warp_n * ROWS + row) * HEAD_DIM;
#pragma unroll
        for (int d = 0; d < D_TILES; ++d) {
            if constexpr (TRANSPOSED) {
                out_row[transposed_output_dim<FP8_CACHE>(d, 0, g)] = acc[d][half];
                out_row[transposed_output_dim<FP8_CACHE>(d, 1, g)] = acc[d][2 + half];
            } else if constexpr (FP8_CACHE) {
                out_row[fp8_accumulator_dim(d, t, 0)] = acc[d][2 * half];
                out_row[fp8_accumulator_dim(d, t, 1)] = acc[d][2 * half + 1];
            } else {
                *reinterpret_cast<float2*>(out_row + d * 8 + 2 * t) = make_float2(acc[d][2 * half], acc[d][2 * half + 1]);
            }
        }
        if (TRANSPOSED ? g == 0 : t == 0) {
            merge_max[warp_n * ROWS + row] = row_max[half];
            merge_sum[warp_n * ROWS + row] = row_sum[half];
        }
    }
    __syncthreads();

    for (int index = threadIdx.x; index < ROWS * HEAD_DIM / 2; index += THREADS) {
        const int row = index / (HEAD_DIM / 2);
        const int dim = (index % (HEAD_DIM / 2)) * 2;
        const int token = row / group;
        if (token >= tokens_here) continue;
        float merged_max = PW_NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS_N; ++w) merged_max = fmaxf(merged_max, merge_max[w * ROWS + row]);
        const float base = merged_max == PW_NEG_INF ? 0.f : merged_max;
        float total = 0.f, out0 = 0.f, out1 = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS_N; ++w) {
            const float weight = exp2f(merge_max[w * ROWS + row] - base);
            total += merge_sum[w * ROWS + row] * weight;
            const float2 partial = *reinterpret_cast<const float2*>(merge_out + (w * ROWS + row) * HEAD_DIM + dim);
            out0 += partial.x * weight;
            out1 += partial.y * weight;
        }
        const float inverse = total > 0.f ? v_scale / total : 0.f;
        store_pair(row, dim, out0 * inverse, out1 * inverse);
        if (dim == 0) store_lse(row, total, base);
    }
}

// Merges the splits of every (token, head): out = sum_i 2^lse_i o_i / sum_i 2^lse_i,
// in one pass with a running maximum, so each split's loads are issued together
// (unrolled) instead of the partials waiting for a first pass over the maxima.
// Grid (num_tokens, num_heads), HEAD_DIM / 2 threads, two dims each.
template <typename T, int HEAD_DIM>
__global__ void combine_splits_kernel(u16* __restrict__ out, const float* __restrict__ partial_out,
                                      const float* __restrict__ partial_lse, int num_splits, int num_tokens) {
    enter_dependent_grid();
    const long long row = (long long)blockIdx.x * gridDim.y + blockIdx.y;
    const long long split_stride = (long long)num_tokens * gridDim.y;
    const int dim = threadIdx.x * 2;
    float running_max = PW_NEG_INF, total = 0.f, out0 = 0.f, out1 = 0.f;
#pragma unroll 4
    for (int split = 0; split < num_splits; ++split) {
        const float lse = partial_lse[split * split_stride + row];
        const float2 partial = *reinterpret_cast<const float2*>(partial_out + (split * split_stride + row) * HEAD_DIM + dim);
        if (lse == PW_NEG_INF) continue;  // a split with no keys (past a short context)
        const float new_max = fmaxf(running_max, lse);
        const float rescale = exp2f(running_max - new_max);  // 0 while nothing is merged yet
        const float weight = exp2f(lse - new_max);
        total = total * rescale + weight;
        out0 = out0 * rescale + partial.x * weight;
        out1 = out1 * rescale + partial.y * weight;
        running_max = new_max;
    }
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    *reinterpret_cast<u32*>(out + row * HEAD_DIM + dim) = T::pack(out0 * inverse, out1 * inverse);
}
