// Shared by every kernel source of baton-kernels (passed to NVRTC as an in-memory header, never installed).
// Element types: `float` and `__nv_bfloat16` storage, always `float` arithmetic. Reductions use a fixed butterfly
// of warp shuffles and a fixed shared-memory tree, so every result is bitwise reproducible run to run.
#pragma once
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
// -inf without <math.h> (NVRTC has no INFINITY macro unless a header defines it).
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte access: 4 floats or 8 bf16.
template <typename T> struct Pack {
    static constexpr int N = 16 / sizeof(T);
};

// A 16-byte vector of elements, loaded and stored with one 128-bit access. `p` must be 16-byte aligned: callers
// take the vector path only when the row length is a multiple of Pack<T>::N (buffers from cuMemAlloc are
// 256-byte aligned).
template <typename T> struct alignas(16) Vec16 {
    T v[Pack<T>::N];
};

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
    Vec16<T> r;
    *reinterpret_cast<int4*>(&r) = __ldg(reinterpret_cast<const int4*>(p));
    return r;
}
// Load of memory this kernel may also write (no read-only cache path).
template <typename T> __device__ __forceinline__ Vec16<T> load16_rw(const T* p) {
    Vec16<T> r;
    *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
    return r;
}
template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& x) {
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(&x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Combines two (max, sum of exp(x - max)) pairs of an online softmax; safe when both maxima are -inf.
__device__ __forceinline__ void online_combine(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == NEG_INF) {
        m = mx;
        s = 0.0f;
        return;
    }
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}
__device__ __forceinline__ void warp_online(float& m, float& s) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        online_combine(m, s, m2, s2);
    }
}

// Sum over the block, in a fixed order; every thread gets the result. `scratch` holds >= 32 values.
// The block size must be a multiple of 32.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : A(0);
    return warp_sum(v);
}
