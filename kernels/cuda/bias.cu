// Bias add after a GEMM without epilogue (`out[r, o] += bias[o]`) and the bias gradient `dbias += sum over rows of
// dout`, reduced deterministically in two passes (no atomics): `_partial` gives each of G row groups one fp32 sum
// per column (grid (ceil(oc / 256), G), a thread per column walking its rows in order, coalesced across the warp),
// `_finish` sums the G partials of a column in group order. G depends on n only (chosen by the launcher).
#include "common.cuh"

#define BIAS_BLOCK 256

template <typename T, int V> __device__ void bias_forward(T* out, const T* bias, u32 n, u32 oc) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;  // unit of V elements
    const u64 units_per_row = oc / V;
    if (i >= (u64)n * units_per_row) return;
    const u64 row = i / units_per_row, col = (i % units_per_row) * V;
    T* o = out + row * oc + col;
    if constexpr (V == 1) {
        o[0] = from_f<T>(to_f(o[0]) + to_f(bias[col]));
    } else {
        Vec16<T> x = load16_rw(o), b = load16(bias + col);
#pragma unroll
        for (int k = 0; k < V; k++) x.v[k] = from_f<T>(to_f(x.v[k]) + to_f(b.v[k]));
        store16(o, x);
    }
}

template <typename T>
__device__ void bias_backward_partial(float* partial, const T* dout, u32 n, u32 oc, u32 rows_per_group) {
    const u32 col = blockIdx.x * blockDim.x + threadIdx.x, group = blockIdx.y;
    if (col >= oc) return;
    const u64 begin = (u64)group * rows_per_group;
    const u64 end = min((u64)n, begin + rows_per_group);
    float acc = 0.0f;
    for (u64 row = begin; row < end; row++) acc += to_f(dout[row * oc + col]);
    partial[(u64)group * oc + col] = acc;
}

template <typename T> __device__ void bias_backward_finish(T* dbias, const float* partial, u32 groups, u32 oc) {
    const u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= oc) return;
    float acc = 0.0f;
    for (u32 g = 0; g < groups; g++) acc += partial[(u64)g * oc + col];
    dbias[col] = from_f<T>(to_f(dbias[col]) + acc);
}

#define BIAS_FORWARD(NAME, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(BIAS_BLOCK) NAME(T* out, const T* bias, u32 n, u32 oc) {     \
        if (oc % Pack<T>::N == 0)                                                                              \
            bias_forward<T, Pack<T>::N>(out, bias, n, oc);                                                     \
        else                                                                                                   \
            bias_forward<T, 1>(out, bias, n, oc);                                                              \
    }
BIAS_FORWARD(bias_forward_f32, float)
BIAS_FORWARD(bias_forward_bf16, bf16)

extern "C" __global__ void __launch_bounds__(BIAS_BLOCK)
    bias_backward_partial_f32(float* partial, const float* dout, u32 n, u32 oc, u32 rows_per_group) {
    bias_backward_partial(partial, dout, n, oc, rows_per_group);
}
extern "C" __global__ void __launch_bounds__(BIAS_BLOCK)
    bias_backward_partial_bf16(float* partial, const bf16* dout, u32 n, u32 oc, u32 rows_per_group) {
    bias_backward_partial(partial, dout, n, oc, rows_per_group);
}
extern "C" __global__ void __launch_bounds__(BIAS_BLOCK)
    bias_backward_finish_f32(float* dbias, const float* partial, u32 groups, u32 oc) {
    bias_backward_finish(dbias, partial, groups, oc);
}
extern "C" __global__ void __launch_bounds__(BIAS_BLOCK)
    bias_backward_finish_bf16(bf16* dbias, const float* partial, u32 groups, u32 oc) {
    bias_backward_finish(dbias, partial, groups, oc);
}
