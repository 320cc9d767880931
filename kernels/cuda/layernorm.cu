// Layer norm over rows of width c (eps = 1e-5, two-pass mean/variance like the CPU reference), its fusion with
// the residual add, and its backward.
//
// Forward and input backward: one warp per row, 8 rows per 256-thread block; a lane reads 16-byte packs at
// lane * Pack, lane * Pack + 32 * Pack, ... (coalesced) when c is a multiple of Pack, one element at a time
// otherwise. Re-reads of the row in later passes hit L1/L2. mean and rstd are fp32 for every element type.
//
// Weight backward, deterministic two-pass (no atomics): pass 1 (`_partial`) gives each of G row groups one
// partial sum per channel (grid (ceil(c / 256), G), a thread per channel walking its group's rows in order);
// pass 2 (`_finish`) sums the G partials of each channel in group order and accumulates into dweight/dbias.
// G and the rows per group depend on n only (the launcher), so the result is the same on every run and device.
#include "common.cuh"

#define LN_BLOCK 256
#define LN_WEIGHT_BLOCK 256
#define LN_EPS 1e-5f

// Pass over a row in units of V elements: f(col, values[V]).
template <typename T, int V, typename F> __device__ __forceinline__ void row_for_each(const T* x, u32 c, F f) {
    const int lane = threadIdx.x % WARP_SIZE;
    for (u32 col = lane * V; col < c; col += WARP_SIZE * V) {
        float v[V];
        if constexpr (V == 1) {
            v[0] = to_f(x[col]);
        } else {
            Vec16<T> p = load16_rw(x + col);
#pragma unroll
            for (int k = 0; k < V; k++) v[k] = to_f(p.v[k]);
        }
        f(col, v);
    }
}

template <typename T, int V>
__device__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias,
                                  T* resid_out, const T* resid_b, u32 n, u32 c) {
    const u64 row = (u64)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const T* x = inp + row * c;
    if (resid_out != nullptr) {
        // x = inp + resid_b, stored (rounded to T) and normalised from the stored value.
        T* r = resid_out + row * c;
        const T* b = resid_b + row * c;
        for (u32 col = lane * V; col < c; col += WARP_SIZE * V) {
            if constexpr (V == 1) {
                r[col] = from_f<T>(to_f(x[col]) + to_f(b[col]));
            } else {
                Vec16<T> a = load16(x + col), bb = load16(b + col), s;
#pragma unroll
                for (int k = 0; k < V; k++) s.v[k] = from_f<T>(to_f(a.v[k]) + to_f(bb.v[k]));
                store16(r + col, s);
            }
        }
        x = r;  // the same lane reads back what it wrote
    }
    float sum = 0.0f;
    row_for_each<T, V>(x, c, [&](u32, const float* v) {
#pragma unroll
        for (int k = 0; k < V; k++) sum += v[k];
    });
    const float m = warp_sum(sum) / (float)c;
    float ss = 0.0f;
    row_for_each<T, V>(x, c, [&](u32, const float* v) {
#pragma unroll
        for (int k = 0; k < V; k++) ss += (v[k] - m) * (v[k] - m);
    });
    const float r = 1.0f / sqrtf(warp_sum(ss) / (float)c + LN_EPS);
    T* o = out + row * c;
    row_for_each<T, V>(x, c, [&](u32 col, const float* v) {
        if constexpr (V == 1) {
            o[col] = from_f<T>((v[0] - m) * r * to_f(weight[col]) + to_f(bias[col]));
        } else {
            Vec16<T> w = load16(weight + col), b = load16(bias + col), y;
#pragma unroll
            for (int k = 0; k < V; k++) y.v[k] = from_f<T>((v[k] - m) * r * to_f(w.v[k]) + to_f(b.v[k]));
            store16(o + col, y);
        }
    });
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

template <typename T, int V>
__device__ void layernorm_backward_input(T* dinp, const T* dout, const T* inp, const T* weight, const float* mean,
                                         const float* rstd, u32 n, u32 c) {
    const u64 row = (u64)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const T* x = inp + row * c;
    const T* d = dout + row * c;
    T* di = dinp + row * c;
    const float m = mean[row], r = rstd[row];
    float g_sum = 0.0f, gx_sum = 0.0f;
    for (u32 col = lane * V; col < c; col += WARP_SIZE * V) {
        float xv[V], dv[V], wv[V];
        if constexpr (V == 1) {
            xv[0] = to_f(x[col]);
            dv[0] = to_f(d[col]);
            wv[0] = to_f(weight[col]);
        } else {
            Vec16<T> a = load16(x + col), b = load16(d + col), w = load16(weight + col);
#pragma unroll
            for (int k = 0; k < V; k++) {
                xv[k] = to_f(a.v[k]);
                dv[k] = to_f(b.v[k]);
                wv[k] = to_f(w.v[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < V; k++) {
            const float g = dv[k] * wv[k];
            g_sum += g;
            gx_sum += g * (xv[k] - m) * r;
        }
    }
    const float g_mean = warp_sum(g_sum) / (float)c, gx_mean = warp_sum(gx_sum) / (float)c;
    for (u32 col = lane * V; col < c; col += WARP_SIZE * V) {
        if constexpr (V == 1) {
            const float xh = (to_f(x[col]) - m) * r;
            const float delta = (to_f(d[col]) * to_f(weight[col]) - g_mean - xh * gx_mean) * r;
            di[col] = from_f<T>(to_f(di[col]) + delta);
        } else {
            Vec16<T> a = load16(x + col), b = load16(d + col), w = load16(weight + col), o = load16_rw(di + col);
#pragma unroll
            for (int k = 0; k < V; k++) {
                const float xh = (to_f(a.v[k]) - m) * r;
                const float delta = (to_f(b.v[k]) * to_f(w.v[k]) - g_mean - xh * gx_mean) * r;
                o.v[k] = from_f<T>(to_f(o.v[k]) + delta);
            }
            store16(di + col, o);
        }
    }
}

// partial: [groups][2][c] fp32 (dweight partials, then dbias partials).
template <typename T>
__device__ void layernorm_backward_weight_partial(float* partial, const T* dout, const T* inp, const float* mean,
                                                  const float* rstd, u32 n, u32 c, u32 rows_per_group) {
    const u32 ch = blockIdx.x * blockDim.x + threadIdx.x, group = blockIdx.y;
    if (ch >= c) return;
    const u64 begin = (u64)group * rows_per_group;
    const u64 end = min((u64)n, begin + rows_per_group);
    float dw = 0.0f, db = 0.0f;
    for (u64 row = begin; row < end; row++) {
        const float d = to_f(dout[row * c + ch]);
        dw += d * (to_f(inp[row * c + ch]) - mean[row]) * rstd[row];
        db += d;
    }
    partial[(u64)group * 2 * c + ch] = dw;
    partial[(u64)group * 2 * c + c + ch] = db;
}

template <typename T>
__device__ void layernorm_backward_weight_finish(T* dweight, T* dbias, const float* partial, u32 groups, u32 c) {
    const u32 ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float dw = 0.0f, db = 0.0f;
    for (u32 g = 0; g < groups; g++) {
        dw += partial[(u64)g * 2 * c + ch];
        db += partial[(u64)g * 2 * c + c + ch];
    }
    dweight[ch] = from_f<T>(to_f(dweight[ch]) + dw);
    dbias[ch] = from_f<T>(to_f(dbias[ch]) + db);
}

#define LN_DISPATCH(T, CALL_V, CALL_1) \
    if (c % Pack<T>::N == 0)           \
        CALL_V;                        \
    else                               \
        CALL_1;

#define LN_FORWARD(NAME, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK) NAME(T* out, float* mean, float* rstd, const T* inp,      \
                                                                const T* weight, const T* bias, u32 n, u32 c) {      \
        LN_DISPATCH(T,                                                                                               \
                    (layernorm_forward<T, Pack<T>::N>(out, mean, rstd, inp, weight, bias, nullptr, nullptr, n, c)),  \
                    (layernorm_forward<T, 1>(out, mean, rstd, inp, weight, bias, nullptr, nullptr, n, c)))           \
    }
LN_FORWARD(layernorm_forward_f32, float)
LN_FORWARD(layernorm_forward_bf16, bf16)

// resid_out = a + b; out = layernorm(resid_out).
#define RESIDUAL_LN_FORWARD(NAME, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK)                                                           \
        NAME(T* resid_out, T* out, float* mean, float* rstd, const T* a, const T* b, const T* weight, const T* bias, \
             u32 n, u32 c) {                                                                                         \
        LN_DISPATCH(T, (layernorm_forward<T, Pack<T>::N>(out, mean, rstd, a, weight, bias, resid_out, b, n, c)),     \
                    (layernorm_forward<T, 1>(out, mean, rstd, a, weight, bias, resid_out, b, n, c)))                 \
    }
RESIDUAL_LN_FORWARD(residual_layernorm_forward_f32, float)
RESIDUAL_LN_FORWARD(residual_layernorm_forward_bf16, bf16)

#define LN_BACKWARD_INPUT(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK) NAME(T* dinp, const T* dout, const T* inp,               \
                                                                const T* weight, const float* mean,                 \
                                                                const float* rstd, u32 n, u32 c) {                  \
        LN_DISPATCH(T, (layernorm_backward_input<T, Pack<T>::N>(dinp, dout, inp, weight, mean, rstd, n, c)),         \
                    (layernorm_backward_input<T, 1>(dinp, dout, inp, weight, mean, rstd, n, c)))                     \
    }
LN_BACKWARD_INPUT(layernorm_backward_input_f32, float)
LN_BACKWARD_INPUT(layernorm_backward_input_bf16, bf16)

extern "C" __global__ void __launch_bounds__(LN_WEIGHT_BLOCK)
    layernorm_backward_weight_partial_f32(float* partial, const float* dout, const float* inp, const float* mean,
                                          const float* rstd, u32 n, u32 c, u32 rows_per_group) {
    layernorm_backward_weight_partial(partial, dout, inp, mean, rstd, n, c, rows_per_group);
}
extern "C" __global__ void __launch_bounds__(LN_WEIGHT_BLOCK)
    layernorm_backward_weight_partial_bf16(float* partial, const bf16* dout, const bf16* inp, const float* mean,
                                           const float* rstd, u32 n, u32 c, u32 rows_per_group) {
    layernorm_backward_weight_partial(partial, dout, inp, mean, rstd, n, c, rows_per_group);
}
extern "C" __global__ void __launch_bounds__(LN_WEIGHT_BLOCK)
    layernorm_backward_weight_finish_f32(float* dweight, float* dbias, const float* partial, u32 groups, u32 c) {
    layernorm_backward_weight_finish(dweight, dbias, partial, groups, c);
}
extern "C" __global__ void __launch_bounds__(LN_WEIGHT_BLOCK)
    layernorm_backward_weight_finish_bf16(bf16* dweight, bf16* dbias, const float* partial, u32 groups, u32 c) {
    layernorm_backward_weight_finish(dweight, dbias, partial, groups, c);
}
