// AdamW with fp32 master weights and moments, the CPU reference's formula:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p)
// with bc1 = 1 - b1^step and bc2 = 1 - b2^step computed once on the host. adamw_bf16 reads bf16 gradients and
// also writes the bf16 working copy of the updated master weights. One element per thread, coalesced.
#include "common.cuh"

#define ADAMW_BLOCK 256

struct AdamWArgs {
    float lr, beta1, beta2, bc1, bc2, eps, weight_decay;
};

__device__ __forceinline__ float adamw_update(float p, float g, float* m, float* v, const AdamWArgs& a) {
    const float mn = a.beta1 * *m + (1.0f - a.beta1) * g;
    const float vn = a.beta2 * *v + (1.0f - a.beta2) * g * g;
    *m = mn;
    *v = vn;
    const float mhat = mn / a.bc1, vhat = vn / a.bc2;
    return p - a.lr * (mhat / (sqrtf(vhat) + a.eps) + a.weight_decay * p);
}

extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK)
    adamw_f32(float* params, const float* grads, float* m, float* v, u64 n, float lr, float beta1, float beta2,
              float bc1, float bc2, float eps, float weight_decay) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const AdamWArgs a{lr, beta1, beta2, bc1, bc2, eps, weight_decay};
    params[i] = adamw_update(params[i], grads[i], m + i, v + i, a);
}

extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK)
    adamw_bf16(float* master, bf16* params, const bf16* grads, float* m, float* v, u64 n, float lr, float beta1,
               float beta2, float bc1, float bc2, float eps, float weight_decay) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const AdamWArgs a{lr, beta1, beta2, bc1, bc2, eps, weight_decay};
    const float p = adamw_update(master[i], __bfloat162float(grads[i]), m + i, v + i, a);
    master[i] = p;
    params[i] = __float2bfloat16_rn(p);
}
