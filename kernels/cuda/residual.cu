// Residual add `out = a + b` and the element-wise helpers of the backend: `dst += src`, `buf *= alpha`.
// One 16-byte pack per thread, then the n % Pack tail one element per thread.
#include "common.cuh"

#define ELEMENTWISE_BLOCK 256

template <typename T> __device__ void residual_forward(T* out, const T* a, const T* b, u64 n) {
    constexpr int N = Pack<T>::N;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / N;
    if (i < packs) {
        Vec16<T> x = load16(a + i * N), y = load16(b + i * N), o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(to_f(x.v[k]) + to_f(y.v[k]));
        store16(out + i * N, o);
    } else if (packs * N + (i - packs) < n) {
        const u64 j = packs * N + (i - packs);
        out[j] = from_f<T>(to_f(a[j]) + to_f(b[j]));
    }
}

template <typename T> __device__ void add_assign(T* dst, const T* src, u64 n) {
    constexpr int N = Pack<T>::N;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / N;
    if (i < packs) {
        Vec16<T> x = load16_rw(dst + i * N), y = load16(src + i * N);
#pragma unroll
        for (int k = 0; k < N; k++) x.v[k] = from_f<T>(to_f(x.v[k]) + to_f(y.v[k]));
        store16(dst + i * N, x);
    } else if (packs * N + (i - packs) < n) {
        const u64 j = packs * N + (i - packs);
        dst[j] = from_f<T>(to_f(dst[j]) + to_f(src[j]));
    }
}

template <typename T> __device__ void scale(T* buf, float alpha, u64 n) {
    constexpr int N = Pack<T>::N;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / N;
    if (i < packs) {
        Vec16<T> x = load16_rw(buf + i * N);
#pragma unroll
        for (int k = 0; k < N; k++) x.v[k] = from_f<T>(to_f(x.v[k]) * alpha);
        store16(buf + i * N, x);
    } else if (packs * N + (i - packs) < n) {
        const u64 j = packs * N + (i - packs);
        buf[j] = from_f<T>(to_f(buf[j]) * alpha);
    }
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK)
    residual_forward_f32(float* out, const float* a, const float* b, u64 n) {
    residual_forward(out, a, b, n);
}
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK)
    residual_forward_bf16(bf16* out, const bf16* a, const bf16* b, u64 n) {
    residual_forward(out, a, b, n);
}
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK) add_assign_f32(float* dst, const float* src, u64 n) {
    add_assign(dst, src, n);
}
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK) add_assign_bf16(bf16* dst, const bf16* src, u64 n) {
    add_assign(dst, src, n);
}
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK) scale_f32(float* buf, float alpha, u64 n) {
    scale(buf, alpha, n);
}
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK) scale_bf16(bf16* buf, float alpha, u64 n) {
    scale(buf, alpha, n);
}

// Test helper (the copy-ordering race test): spins for `cycles` SM clock cycles, then writes `value` to every
// element (grid-stride). A consumer that does not wait for it reads the buffer's old contents.
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK)
    slow_fill_f32(float* buf, float value, u64 n, u64 cycles) {
    const long long start = clock64();
    while ((u64)(clock64() - start) < cycles) {
    }
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) buf[i] = value;
}
