// Token + position embedding: out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:].
//
// Backward, deterministic (no float atomics): the launcher sorts the n = B*T positions into buckets by token on the
// host (a stable counting sort, so each bucket lists its positions in ascending order), then
//  - embedding_backward_wte: one block row per bucket (grid.x = buckets, grid.y covers the channels), each thread
//    owns one channel of the bucket's token and sums dout over the bucket's positions in ascending order, then adds
//    the sum to dwte once. No two threads ever write the same element.
//  - embedding_backward_wpe: one thread per (t, channel), summing dout over the batch in order b = 0, 1, ...
// Both accumulate (`+=`) into the gradient, as the CPU reference does.
#include "common.cuh"

#define EMBEDDING_BLOCK 256

template <typename T, int V>
__device__ void embedding_forward(T* out, const u32* tokens, const T* wte, const T* wpe, u32 n, u32 t, u32 c) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;  // unit of V elements
    const u64 units_per_row = c / V;
    if (i >= (u64)n * units_per_row) return;
    const u64 row = i / units_per_row, col = (i % units_per_row) * V;
    const u64 tok = tokens[row], pos = row % t;
    const T* we = wte + tok * c + col;
    const T* pe = wpe + pos * c + col;
    T* o = out + row * c + col;
    if constexpr (V == 1) {
        o[0] = from_f<T>(to_f(we[0]) + to_f(pe[0]));
    } else {
        Vec16<T> a = load16(we), b = load16(pe), r;
#pragma unroll
        for (int k = 0; k < V; k++) r.v[k] = from_f<T>(to_f(a.v[k]) + to_f(b.v[k]));
        store16(o, r);
    }
}

template <typename T>
__device__ void embedding_backward_wte(T* dwte, const T* dout, const u32* bucket_positions, const u32* bucket_starts,
                                       const u32* bucket_tokens, u32 c) {
    const u32 bucket = blockIdx.x;
    const u32 ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    const u32 begin = bucket_starts[bucket], end = bucket_starts[bucket + 1];
    float acc = 0.0f;
    for (u32 j = begin; j < end; j++) acc += to_f(dout[(u64)bucket_positions[j] * c + ch]);
    T* g = dwte + (u64)bucket_tokens[bucket] * c + ch;
    *g = from_f<T>(to_f(*g) + acc);
}

template <typename T> __device__ void embedding_backward_wpe(T* dwpe, const T* dout, u32 b, u32 t, u32 c) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t * c) return;
    float acc = 0.0f;
    for (u32 bi = 0; bi < b; bi++) acc += to_f(dout[(u64)bi * t * c + i]);
    dwpe[i] = from_f<T>(to_f(dwpe[i]) + acc);
}

// The vector path needs c to be a multiple of 16 bytes of elements (then every row starts 16-byte aligned).
#define EMBEDDING_FORWARD(NAME, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(EMBEDDING_BLOCK)                                               \
        NAME(T* out, const u32* tokens, const T* wte, const T* wpe, u32 n, u32 t, u32 c) {                      \
        if (c % Pack<T>::N == 0)                                                                                \
            embedding_forward<T, Pack<T>::N>(out, tokens, wte, wpe, n, t, c);                                   \
        else                                                                                                    \
            embedding_forward<T, 1>(out, tokens, wte, wpe, n, t, c);                                            \
    }
EMBEDDING_FORWARD(embedding_forward_f32, float)
EMBEDDING_FORWARD(embedding_forward_bf16, bf16)

extern "C" __global__ void __launch_bounds__(EMBEDDING_BLOCK)
    embedding_backward_wte_f32(float* dwte, const float* dout, const u32* bucket_positions, const u32* bucket_starts,
                               const u32* bucket_tokens, u32 c) {
    embedding_backward_wte(dwte, dout, bucket_positions, bucket_starts, bucket_tokens, c);
}
extern "C" __global__ void __launch_bounds__(EMBEDDING_BLOCK)
    embedding_backward_wte_bf16(bf16* dwte, const bf16* dout, const u32* bucket_positions, const u32* bucket_starts,
                                const u32* bucket_tokens, u32 c) {
    embedding_backward_wte(dwte, dout, bucket_positions, bucket_starts, bucket_tokens, c);
}
extern "C" __global__ void __launch_bounds__(EMBEDDING_BLOCK)
    embedding_backward_wpe_f32(float* dwpe, const float* dout, u32 b, u32 t, u32 c) {
    embedding_backward_wpe(dwpe, dout, b, t, c);
}
extern "C" __global__ void __launch_bounds__(EMBEDDING_BLOCK)
    embedding_backward_wpe_bf16(bf16* dwpe, const bf16* dout, u32 b, u32 t, u32 c) {
    embedding_backward_wpe(dwpe, dout, b, t, c);
}
