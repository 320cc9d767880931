// Softmax + cross-entropy over rows of v logits, never materialising the normalised probabilities.
// One 512-thread block per row. Pass 1: every thread keeps an online (max, sum of exp(x - max)) over its
// strided elements (16-byte packs when v is a multiple of Pack), combined by a fixed warp butterfly and a fixed
// shared-memory tree; loss = log(sum) + max - x[target]. Pass 2 (gradient kernels): dlogit = scale * (exp(x - max)
// / sum - [j == target]), recomputed from the logits on the fly.
//  - cross_entropy_forward: losses[row] only.
//  - cross_entropy_backward: dlogits += gradient (separate buffers, the CPU reference's convention).
//  - classifier_fused: losses[row], and the logits are overwritten in place by the gradient (the training path:
//    one read pass + one read/write pass over the logits).
#include "common.cuh"

#define CLASSIFIER_BLOCK 512

struct RowStats {
    float max, sum;
};

template <typename T, int V> __device__ RowStats row_stats(const T* x, u32 v) {
    __shared__ float sm_max[32], sm_sum[32];
    float m = NEG_INF, s = 0.0f;
    for (u32 j = threadIdx.x * V; j < v; j += blockDim.x * V) {
        if constexpr (V == 1) {
            online_add(m, s, to_f(x[j]));
        } else {
            Vec16<T> p = load16_rw(x + j);
#pragma unroll
            for (int k = 0; k < V; k++) online_add(m, s, to_f(p.v[k]));
        }
    }
    warp_online(m, s);
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    if (lane == 0) {
        sm_max[warp] = m;
        sm_sum[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? sm_max[lane] : NEG_INF;
    s = lane < warps ? sm_sum[lane] : 0.0f;
    warp_online(m, s);
    return RowStats{m, s};
}

// mode 0: forward only; 1: dlogits += grad; 2: fused, logits overwritten with grad.
template <typename T, int V>
__device__ void classifier(T* dlogits, float* losses, const T* logits, const u32* targets, float scale, u32 n, u32 v,
                           int mode) {
    const u64 row = blockIdx.x;
    if (row >= n) return;
    const T* x = logits + row * v;
    const u32 tgt = targets[row];
    // In-place mode: every read of pass 1 (and thread 0's read of the target logit) happens before the barrier
    // inside row_stats; in pass 2 each thread reads and then writes only its own elements. So no thread can read
    // an element another thread has already overwritten.
    const float x_tgt = threadIdx.x == 0 ? to_f(x[tgt]) : 0.0f;
    const RowStats st = row_stats<T, V>(x, v);
    if (mode != 1 && threadIdx.x == 0) losses[row] = logf(st.sum) + st.max - x_tgt;
    if (mode == 0) return;
    const float inv = 1.0f / st.sum;
    T* d = dlogits + row * v;
    for (u32 j = threadIdx.x * V; j < v; j += blockDim.x * V) {
        if constexpr (V == 1) {
            const float p = expf(to_f(x[j]) - st.max) * inv;
            const float g = scale * (p - (j == tgt ? 1.0f : 0.0f));
            d[j] = from_f<T>(mode == 1 ? to_f(d[j]) + g : g);
        } else {
            Vec16<T> xs = load16_rw(x + j), o;
            if (mode == 1) o = load16_rw(d + j);
#pragma unroll
            for (int k = 0; k < V; k++) {
                const float p = expf(to_f(xs.v[k]) - st.max) * inv;
                const float g = scale * (p - (j + k == tgt ? 1.0f : 0.0f));
                o.v[k] = from_f<T>(mode == 1 ? to_f(o.v[k]) + g : g);
            }
            store16(d + j, o);
        }
    }
}

#define CLASSIFIER_DISPATCH(T, ...)                     \
    if (v % Pack<T>::N == 0)                            \
        classifier<T, Pack<T>::N>(__VA_ARGS__);         \
    else                                                \
        classifier<T, 1>(__VA_ARGS__);

extern "C" __global__ void __launch_bounds__(CLASSIFIER_BLOCK)
    cross_entropy_forward_f32(float* losses, const float* logits, const u32* targets, u32 n, u32 v) {
    CLASSIFIER_DISPATCH(float, nullptr, losses, logits, targets, 0.0f, n, v, 0)
}
extern "C" __global__ void __launch_bounds__(CLASSIFIER_BLOCK)
    cross_entropy_forward_bf16(float* losses, const bf16* logits, const u32* targets, u32 n, u32 v) {
    CLASSIFIER_DISPATCH(bf16, nullptr, losses, logits, targets, 0.0f, n, v, 0)
}
extern "C" __global__ void __launch_bounds__(CLASSIFIER_BLOCK) cross_entropy_backward_f32(
    float* dlogits, const float* logits, const u32* targets, float scale, u32 n, u32 v) {
    CLASSIFIER_DISPATCH(float, dlogits, nullptr, logits, targets, scale, n, v, 1)
}
extern "C" __global__ void __launch_bounds__(CLASSIFIER_BLOCK) cross_entropy_backward_bf16(
    bf16* dlogits, const bf16* logits, const u32* targets, float scale, u32 n, u32 v) {
    CLASSIFIER_DISPATCH(bf16, dlogits, nullptr, logits, targets, scale, n, v, 1)
}
extern "C" __global__ void __launch_bounds__(CLASSIFIER_BLOCK)
    classifier_fused_f32(float* logits, float* losses, const u32* targets, float scale, u32 n, u32 v) {
    CLASSIFIER_DISPATCH(float, logits, losses, logits, targets, scale, n, v, 2)
}
extern "C" __global__ void __launch_bounds__(CLASSIFIER_BLOCK)
    classifier_fused_bf16(bf16* logits, float* losses, const u32* targets, float scale, u32 n, u32 v) {
    CLASSIFIER_DISPATCH(bf16, logits, losses, logits, targets, scale, n, v, 2)
}
