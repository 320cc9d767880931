// Casts between fp32 and bf16 (round to nearest even). Each thread converts 8 elements: one 16-byte bf16 access
// and two 16-byte fp32 accesses, then the n % 8 tail one element per thread.
#include "common.cuh"

#define CAST_BLOCK 256

extern "C" __global__ void __launch_bounds__(CAST_BLOCK) cast_f32_to_bf16(bf16* out, const float* inp, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / 8;
    if (i < packs) {
        Vec16<float> a = load16(inp + i * 8), b = load16(inp + i * 8 + 4);
        Vec16<bf16> o;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            o.v[k] = __float2bfloat16_rn(a.v[k]);
            o.v[k + 4] = __float2bfloat16_rn(b.v[k]);
        }
        store16(out + i * 8, o);
    } else if (packs * 8 + (i - packs) < n) {
        const u64 j = packs * 8 + (i - packs);
        out[j] = __float2bfloat16_rn(inp[j]);
    }
}

extern "C" __global__ void __launch_bounds__(CAST_BLOCK) cast_bf16_to_f32(float* out, const bf16* inp, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, packs = n / 8;
    if (i < packs) {
        Vec16<bf16> x = load16(inp + i * 8);
        Vec16<float> a, b;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            a.v[k] = __bfloat162float(x.v[k]);
            b.v[k] = __bfloat162float(x.v[k + 4]);
        }
        store16(out + i * 8, a);
        store16(out + i * 8 + 4, b);
    } else if (packs * 8 + (i - packs) < n) {
        const u64 j = packs * 8 + (i - packs);
        out[j] = __bfloat162float(inp[j]);
    }
}
