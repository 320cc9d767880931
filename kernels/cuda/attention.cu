// The simple attention path's element-wise pieces; the matrix products between them are batched GEMMs (cuBLAS).
//   permute:   qkv (B, T, 3, NH, HS) -> q, k, v each (B, NH, T, HS)
//   softmax:   att[r, s] = softmax over s <= t of (scale * preatt[r, s]), 0 for s > t  (r = (b, h, t), causal)
//   unpermute: y (B, NH, T, HS) -> out (B, T, NH, HS)
// and their backwards. permute/unpermute move 16-byte packs when HS is a multiple of Pack, else elements.
// The softmaxes use one warp per row (8 rows per 256-thread block) with an online max/sum; they may run in place
// (att == preatt, dpreatt == datt): each lane reads, then writes, only its own elements.
// permute_backward accumulates (`dqkv +=`), like every backward of the CPU reference; the others overwrite.
#include "common.cuh"

#define ATTENTION_BLOCK 256

// Maps unit i of a (B, NH, T, HS) tensor (in units of V elements) to the offsets of that unit in the
// (B, NH, T, HS) layout (`bhtd`) and in the (B, T, [which,] NH, HS) layout with `parts` slices per token (`bthd`).
struct Offsets {
    u64 bhtd, bthd;
};
template <int V>
__device__ __forceinline__ Offsets permute_offsets(u64 i, u32 t, u32 nh, u32 hs, u32 parts, u32 which) {
    const u64 e = i * V;
    const u32 d = e % hs;
    const u64 r = e / hs;  // (b, h, t) flattened
    const u32 ti = r % t;
    const u32 h = (r / t) % nh;
    const u64 b = r / ((u64)t * nh);
    const u64 c = (u64)nh * hs;
    return Offsets{e, ((b * t + ti) * parts + which) * c + (u64)h * hs + d};
}

template <typename T, int V> __device__ __forceinline__ void copy_unit(T* dst, const T* src) {
    if constexpr (V == 1) {
        dst[0] = src[0];
    } else {
        store16(dst, load16(src));
    }
}
template <typename T, int V> __device__ __forceinline__ void add_unit(T* dst, const T* src) {
    if constexpr (V == 1) {
        dst[0] = from_f<T>(to_f(dst[0]) + to_f(src[0]));
    } else {
        Vec16<T> a = load16_rw(dst), b = load16(src);
#pragma unroll
        for (int k = 0; k < V; k++) a.v[k] = from_f<T>(to_f(a.v[k]) + to_f(b.v[k]));
        store16(dst, a);
    }
}

template <typename T, int V>
__device__ void permute(T* q, T* k, T* v, const T* qkv, u32 b, u32 t, u32 nh, u32 hs) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)b * nh * t * hs / V) return;
    const Offsets o0 = permute_offsets<V>(i, t, nh, hs, 3, 0);
    const u64 c = (u64)nh * hs;
    copy_unit<T, V>(q + o0.bhtd, qkv + o0.bthd);
    copy_unit<T, V>(k + o0.bhtd, qkv + o0.bthd + c);
    copy_unit<T, V>(v + o0.bhtd, qkv + o0.bthd + 2 * c);
}

template <typename T, int V>
__device__ void permute_backward(T* dqkv, const T* dq, const T* dk, const T* dv, u32 b, u32 t, u32 nh, u32 hs) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)b * nh * t * hs / V) return;
    const Offsets o0 = permute_offsets<V>(i, t, nh, hs, 3, 0);
    const u64 c = (u64)nh * hs;
    add_unit<T, V>(dqkv + o0.bthd, dq + o0.bhtd);
    add_unit<T, V>(dqkv + o0.bthd + c, dk + o0.bhtd);
    add_unit<T, V>(dqkv + o0.bthd + 2 * c, dv + o0.bhtd);
}

// forward: out (B,T,NH,HS) <- y (B,NH,T,HS); backward: dy (B,NH,T,HS) <- dout (B,T,NH,HS).
template <typename T, int V>
__device__ void unpermute(T* dst, const T* src, u32 b, u32 t, u32 nh, u32 hs, bool backward) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)b * nh * t * hs / V) return;
    const Offsets o = permute_offsets<V>(i, t, nh, hs, 1, 0);
    if (backward)
        copy_unit<T, V>(dst + o.bhtd, src + o.bthd);
    else
        copy_unit<T, V>(dst + o.bthd, src + o.bhtd);
}

template <typename T> __device__ void causal_softmax_forward(T* att, const T* preatt, float scale, u32 rows, u32 t) {
    const u64 row = (u64)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const u32 ti = row % t;
    const T* x = preatt + row * t;
    T* y = att + row * t;
    float m = NEG_INF, s = 0.0f;
    for (u32 j = lane; j <= ti; j += WARP_SIZE) online_add(m, s, scale * to_f(x[j]));
    warp_online(m, s);
    const float inv = 1.0f / s;
    for (u32 j = lane; j < t; j += WARP_SIZE) {
        y[j] = from_f<T>(j <= ti ? expf(scale * to_f(x[j]) - m) * inv : 0.0f);
    }
}

template <typename T>
__device__ void causal_softmax_backward(T* dpreatt, const T* datt, const T* att, float scale, u32 rows, u32 t) {
    const u64 row = (u64)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const u32 ti = row % t;
    const T* a = att + row * t;
    const T* da = datt + row * t;
    T* dp = dpreatt + row * t;
    float dot = 0.0f;
    for (u32 j = lane; j <= ti; j += WARP_SIZE) dot += to_f(a[j]) * to_f(da[j]);
    dot = warp_sum(dot);
    for (u32 j = lane; j < t; j += WARP_SIZE) {
        dp[j] = from_f<T>(j <= ti ? scale * to_f(a[j]) * (to_f(da[j]) - dot) : 0.0f);
    }
}

#define HS_DISPATCH(T, F, ...)              \
    if (hs % Pack<T>::N == 0)               \
        F<T, Pack<T>::N>(__VA_ARGS__);      \
    else                                    \
        F<T, 1>(__VA_ARGS__);

#define ATTENTION_ENTRIES(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(ATTENTION_BLOCK)                                                  \
        attention_permute_##SUFFIX(T* q, T* k, T* v, const T* qkv, u32 b, u32 t, u32 nh, u32 hs) {                 \
        HS_DISPATCH(T, permute, q, k, v, qkv, b, t, nh, hs)                                                        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTENTION_BLOCK) attention_permute_backward_##SUFFIX(            \
        T* dqkv, const T* dq, const T* dk, const T* dv, u32 b, u32 t, u32 nh, u32 hs) {                            \
        HS_DISPATCH(T, permute_backward, dqkv, dq, dk, dv, b, t, nh, hs)                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTENTION_BLOCK)                                                  \
        attention_unpermute_##SUFFIX(T* out, const T* y, u32 b, u32 t, u32 nh, u32 hs) {                           \
        HS_DISPATCH(T, unpermute, out, y, b, t, nh, hs, false)                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTENTION_BLOCK)                                                  \
        attention_unpermute_backward_##SUFFIX(T* dy, const T* dout, u32 b, u32 t, u32 nh, u32 hs) {                \
        HS_DISPATCH(T, unpermute, dy, dout, b, t, nh, hs, true)                                                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTENTION_BLOCK)                                                  \
        causal_softmax_forward_##SUFFIX(T* att, const T* preatt, float scale, u32 rows, u32 t) {                   \
        causal_softmax_forward(att, preatt, scale, rows, t);                                                       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTENTION_BLOCK) causal_softmax_backward_##SUFFIX(               \
        T* dpreatt, const T* datt, const T* att, float scale, u32 rows, u32 t) {                                   \
        causal_softmax_backward(dpreatt, datt, att, scale, rows, t);                                               \
    }
ATTENTION_ENTRIES(f32, float)
ATTENTION_ENTRIES(bf16, bf16)
