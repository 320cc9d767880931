// GELU, tanh form: gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Forward overwrites `out`, backward
// accumulates `dinp += gelu'(inp) * dout` (the CPU reference's convention). One 16-byte pack per thread, then the
// n % Pack tail one element per thread.
#include "common.cuh"

#define GELU_BLOCK 256
#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_COEF 0.044715f

__device__ __forceinline__ float gelu_f(float x) {
    float u = SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}
__device__ __forceinline__ float gelu_grad_f(float x) {
    float th = tanhf(SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x));
    float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_COEF * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

template <typename T> __device__ void gelu_forward(T* out, const T* inp, u64 n) {
    constexpr int N = Pack<T>::N;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / N;
    if (i < packs) {
        Vec16<T> x = load16(inp + i * N), y;
#pragma unroll
        for (int k = 0; k < N; k++) y.v[k] = from_f<T>(gelu_f(to_f(x.v[k])));
        store16(out + i * N, y);
    } else if (packs * N + (i - packs) < n) {
        const u64 j = packs * N + (i - packs);
        out[j] = from_f<T>(gelu_f(to_f(inp[j])));
    }
}

template <typename T> __device__ void gelu_backward(T* dinp, const T* inp, const T* dout, u64 n) {
    constexpr int N = Pack<T>::N;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / N;
    if (i < packs) {
        Vec16<T> x = load16(inp + i * N), d = load16(dout + i * N), g = load16_rw(dinp + i * N);
#pragma unroll
        for (int k = 0; k < N; k++) g.v[k] = from_f<T>(to_f(g.v[k]) + gelu_grad_f(to_f(x.v[k])) * to_f(d.v[k]));
        store16(dinp + i * N, g);
    } else if (packs * N + (i - packs) < n) {
        const u64 j = packs * N + (i - packs);
        dinp[j] = from_f<T>(to_f(dinp[j]) + gelu_grad_f(to_f(inp[j])) * to_f(dout[j]));
    }
}

extern "C" __global__ void __launch_bounds__(GELU_BLOCK) gelu_forward_f32(float* out, const float* inp, u64 n) {
    gelu_forward(out, inp, n);
}
extern "C" __global__ void __launch_bounds__(GELU_BLOCK) gelu_forward_bf16(bf16* out, const bf16* inp, u64 n) {
    gelu_forward(out, inp, n);
}
extern "C" __global__ void __launch_bounds__(GELU_BLOCK)
    gelu_backward_f32(float* dinp, const float* inp, const float* dout, u64 n) {
    gelu_backward(dinp, inp, dout, n);
}
extern "C" __global__ void __launch_bounds__(GELU_BLOCK)
    gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout, u64 n) {
    gelu_backward(dinp, inp, dout, n);
}
