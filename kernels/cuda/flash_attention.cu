// Fused causal flash attention, forward and backward (FlashAttention-2 scheme), bf16 tensor cores.
//
// Layout: q, k, v, o, dq, dk, dv are (B, NH, T, HS) bf16, row-major; lse and delta are (B, NH, T) fp32.
// Head sizes 64 and 128 are template instantiations with unmangled `extern "C"` entry points at the end.
//
// Forward (`flash_attn_fwd_hs*`): one thread block per (64-row query block, batch*head); 4 warps, each owning
// 16 query rows. Key/value blocks of 64 rows stream through a two-stage `cp.async` pipeline into swizzled
// shared memory; S = Q K^T and O += P V run on `mma.sync.m16n8k16` (bf16 in, fp32 accumulate) with
// operands loaded by `ldmatrix`; the online softmax keeps the running row max and sum in registers and P
// never leaves registers (the accumulator fragment of S is the A fragment of P V). Writes O and the
// per-row logsumexp lse = max + log(sum) in natural-log units of the scaled scores.
//
// Backward, two kernels, both deterministic (no float atomics):
//  1. `flash_attn_bwd_dq_hs*`: one block per query block. Computes delta = rowsum(dO * O) for its rows
//     (written to `delta` for kernel 2), then walks the key blocks recomputing S, P = exp(S - lse) and
//     dP = dO V^T, and accumulates dQ = scale * dS K in registers, dS = P * (dP - delta).
//  2. `flash_attn_bwd_dkdv_hs*`: one block per 64-row key block; each warp owns 16 key rows and computes the
//     transposed tiles S^T = K Q^T and dP^T = V dO^T so that dV += P^T dO and dK += scale * dS^T Q use
//     register-resident A fragments. Walks the query blocks at or below the diagonal.
// dQ is thus computed by a separate pass that owns each query row, instead of FlashAttention-2's atomicAdd
// of per-key-block partials: every output element is written by one thread, in a fixed order, so results
// are bitwise reproducible. The cost is recomputing S and dP in the dQ pass (7 instead of 5 tile products).
//
// Causal masking makes padding safe: keys past T are always masked for valid queries, padded query rows
// (>= T) are loaded as zeros and given lse = +inf in the backward so their P is exactly 0, and nothing is
// stored for rows >= T. The launcher guarantees T >= 1 and the dynamic shared-memory size; each kernel
// traps if it was launched with less shared memory than it needs.

#include <cuda_bf16.h>

#define FA_INF __int_as_float(0x7f800000)

namespace fa {

typedef __nv_bfloat16 bf16;

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

// 16-byte global -> shared copy; zero-fills the destination when `pred` is false (no bytes are read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d += a * b for one m16n8k16 tile: a = 4 regs (16x16 bf16, row), b = 2 regs (16x8 bf16, col), d = 4 fp32.
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Element offset of (row, col) in a swizzled (rows x HS) bf16 tile: the 16-byte chunk index is XORed with
// row % 8, so the 8 rows read by one ldmatrix matrix (or written by cp.async) fall in distinct bank groups.
template <int HS>
__device__ __forceinline__ int swz(int row, int col) {
    return row * HS + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// Loads rows [row0, row0 + ROWS) of a (T, HS) matrix into a swizzled tile; rows >= T are zero-filled.
template <int ROWS, int HS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* g, int row0, int T) {
    constexpr int CHUNKS = ROWS * HS / 8;
    static_assert(CHUNKS % THREADS == 0, "tile must split evenly over the block");
#pragma unroll
    for (int it = 0; it < CHUNKS / THREADS; ++it) {
        const int i = it * THREADS + threadIdx.x;
        const int r = i / (HS / 8);
        const int c = (i % (HS / 8)) * 8;
        const bool ok = row0 + r < T;
        const bf16* src = ok ? g + (size_t)(row0 + r) * HS + c : g;
        cp_async16(tile + swz<HS>(r, c), src, ok);
    }
}

// Fragment loads by ldmatrix from swizzled tiles. A thread's address is split into a per-lane byte offset
// (`*_off`, computed once) and a per-call part: since every fragment starts at a row that is a multiple of 8
// and a column that is a multiple of 16, the swizzle reduces to XORing the column's byte offset into the
// lane offset, and the row offset adds (an immediate in the instruction). Tiles start 256-byte aligned.
template <int HS>
__device__ __forceinline__ unsigned lane_off(int row, int chunk, int lane) {
    return row * HS * 2 + ((chunk ^ (lane & 7)) << 4);
}
// A fragment rows: lane & 15, chunk lane >> 4.
template <int HS>
__device__ __forceinline__ unsigned a_off(int lane) { return lane_off<HS>(lane & 15, lane >> 4, lane); }
// B (n, k) fragment pair: rows (lane & 7) + (lane >> 4) * 8, chunk (lane >> 3) & 1.
template <int HS>
__device__ __forceinline__ unsigned bnk_off(int lane) {
    return lane_off<HS>((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1, lane);
}
// B (k, n) fragment pair (transposed load): rows (lane & 7) + ((lane >> 3) & 1) * 8, chunk lane >> 4.
template <int HS>
__device__ __forceinline__ unsigned bkn_off(int lane) {
    return lane_off<HS>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4, lane);
}

// A fragment (16 x 16 at rows r0.., cols c0..) of a swizzled row-major tile at shared address `tile`.
template <int HS>
__device__ __forceinline__ void load_a(unsigned* a, unsigned tile, unsigned off, int r0, int c0) {
    ldsm_x4(a[0], a[1], a[2], a[3], tile + (off ^ (c0 * 2)) + r0 * HS * 2);
}

// B fragments of two n8 tiles (n = rows n0..n0+15 of the tile, k = cols k0..k0+15): the tile holds B^T
// row-major, i.e. B(k, n) = tile[n][k]. b[0..1] is n-tile n0, b[2..3] is n-tile n0 + 8.
template <int HS>
__device__ __forceinline__ void load_b_nk(unsigned* b, unsigned tile, unsigned off, int n0, int k0) {
    ldsm_x4(b[0], b[1], b[2], b[3], tile + (off ^ (k0 * 2)) + n0 * HS * 2);
}

// B fragments of two n8 tiles where the tile holds B row-major: B(k, n) = tile[k][n] (k = rows k0..k0+15,
// n = cols n0..n0+15). b[0..1] is n-tile n0, b[2..3] is n-tile n0 + 8.
template <int HS>
__device__ __forceinline__ void load_b_kn(unsigned* b, unsigned tile, unsigned off, int k0, int n0) {
    ldsm_x4_t(b[0], b[1], b[2], b[3], tile + (off ^ (n0 * 2)) + k0 * HS * 2);
}

// Converts the fp32 accumulators of two adjacent n8 tiles (16 columns) into one bf16 A fragment.
__device__ __forceinline__ void acc_to_a(unsigned* a, const float* lo, const float* hi) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// Stores a warp's (16 x HS) fp32 accumulator tile, times `mul`, as bf16 rows r0.. of a (T, HS) matrix.
template <int HS>
__device__ __forceinline__ void store_rows(bf16* g, const float (*acc)[4], int r0, int T, int lane, float mul) {
    const int ra = r0 + (lane >> 2), rb = ra + 8;
#pragma unroll
    for (int nt = 0; nt < HS / 8; ++nt) {
        const int c = nt * 8 + (lane & 3) * 2;
        if (ra < T) {
            *reinterpret_cast<__nv_bfloat162*>(g + (size_t)ra * HS + c) =
                __floats2bfloat162_rn(acc[nt][0] * mul, acc[nt][1] * mul);
        }
        if (rb < T) {
            *reinterpret_cast<__nv_bfloat162*>(g + (size_t)rb * HS + c) =
                __floats2bfloat162_rn(acc[nt][2] * mul, acc[nt][3] * mul);
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------

constexpr int FWD_BR = 64;  // query rows per block (16 per warp)
constexpr int FWD_BC = 64;  // key rows per pipeline stage

template <int HS>
__device__ __forceinline__ void fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                    const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                                    int T, float scale) {
    constexpr int BR = FWD_BR, BC = FWD_BC;
    extern __shared__ __align__(128) unsigned char smem[];
    if ((smem_addr(smem) & 255) != 0 || dynamic_smem_bytes() < (unsigned)((BR + 4 * BC) * HS * 2)) __trap();
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + BR * HS;       // 2 stages
    bf16* sV = sK + 2 * BC * HS;   // 2 stages

    const int qb = gridDim.x - 1 - blockIdx.x;  // the longest (last) query blocks start first
    const size_t head = (size_t)blockIdx.y * T;
    q += head * HS;
    k += head * HS;
    v += head * HS;
    o += head * HS;
    lse += head;
    const int q0 = qb * BR;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned oa = a_off<HS>(lane), ob = bnk_off<HS>(lane), ot = bkn_off<HS>(lane);
    const int wq0 = q0 + warp * 16;  // first query row of this warp
    const float sl2 = scale * LOG2E;

    const int kv_end = min(T, q0 + BR);
    const int nkb = (kv_end + BC - 1) / BC;

    load_tile<BR, HS>(sQ, q, q0, T);
    load_tile<BC, HS>(sK, k, 0, T);
    load_tile<BC, HS>(sV, v, 0, T);
    cp_async_commit();

    unsigned qf[HS / 16][4];
    float acc[HS / 8][4];
#pragma unroll
    for (int i = 0; i < HS / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f};
    const int ra = wq0 + (lane >> 2);  // this thread's two rows: ra and ra + 8

    for (int j = 0; j < nkb; ++j) {
        const int buf = j & 1;
        if (j + 1 < nkb) {
            load_tile<BC, HS>(sK + (buf ^ 1) * BC * HS, k, (j + 1) * BC, T);
            load_tile<BC, HS>(sV + (buf ^ 1) * BC * HS, v, (j + 1) * BC, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < HS / 16; ++kk) load_a<HS>(qf[kk], smem_addr(sQ), oa, warp * 16, kk * 16);
        }
        const unsigned tK = smem_addr(sK) + buf * BC * HS * 2;
        const unsigned tV = smem_addr(sV) + buf * BC * HS * 2;
        const int k0 = j * BC;

        float s[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                unsigned b[4];
                load_b_nk<HS>(b, tK, ob, np * 16, kk * 16);
                mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
                mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
        if (k0 + BC - 1 > wq0) {  // the block crosses this warp's diagonal: mask keys after the query
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) {
                const int c = k0 + nt * 8 + (lane & 3) * 2;
                if (c > ra) s[nt][0] = -FA_INF;
                if (c + 1 > ra) s[nt][1] = -FA_INF;
                if (c > ra + 8) s[nt][2] = -FA_INF;
                if (c + 1 > ra + 8) s[nt][3] = -FA_INF;
            }
        }
        // Online softmax on the two rows; the four threads of a quad share a row.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = m[h];
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ms = mx == -FA_INF ? 0.f : mx * sl2;
            const float alpha = exp2f(m[h] * sl2 - ms);  // 0 when m was -inf
            m[h] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) {
                s[nt][2 * h] = exp2f(fmaf(s[nt][2 * h], sl2, -ms));
                s[nt][2 * h + 1] = exp2f(fmaf(s[nt][2 * h + 1], sl2, -ms));
                sum += s[nt][2 * h] + s[nt][2 * h + 1];
            }
            l[h] = l[h] * alpha + sum;  // per-thread partial sum, reduced over the quad at the end
#pragma unroll
            for (int nt = 0; nt < HS / 8; ++nt) {
                acc[nt][2 * h] *= alpha;
                acc[nt][2 * h + 1] *= alpha;
            }
        }
        // O += P V, with P taken straight from the S accumulators.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned a[4];
            acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < HS / 16; ++dp) {
                unsigned b[4];
                load_b_kn<HS>(b, tV, ot, kk * 16, dp * 16);
                mma_bf16(acc[2 * dp], a, b[0], b[1]);
                mma_bf16(acc[2 * dp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // the next iteration refills the buffer this one read
    }

    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        inv[h] = 1.f / l[h];
    }
#pragma unroll
    for (int nt = 0; nt < HS / 8; ++nt) {
        acc[nt][0] *= inv[0];
        acc[nt][1] *= inv[0];
        acc[nt][2] *= inv[1];
        acc[nt][3] *= inv[1];
    }
    store_rows<HS>(o, acc, wq0, T, lane, 1.f);
    if ((lane & 3) == 0) {
        if (ra < T) lse[ra] = (m[0] * sl2 + log2f(l[0])) * LN2;
        if (ra + 8 < T) lse[ra + 8] = (m[1] * sl2 + log2f(l[1])) * LN2;
    }
}

// ------------------------------------------------------------------------------------------------------
// Backward pass 1: delta and dQ
// ------------------------------------------------------------------------------------------------------

constexpr int DQ_BR = 64;  // query rows per block (16 per warp)
constexpr int DQ_BC = 64;  // key rows per pipeline stage

template <int HS>
__device__ __forceinline__ void bwd_dq(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const bf16* __restrict__ o,
                                       const bf16* __restrict__ dout, const float* __restrict__ lse,
                                       bf16* __restrict__ dq, float* __restrict__ delta, int T, float scale) {
    constexpr int BR = DQ_BR, BC = DQ_BC;
    extern __shared__ __align__(128) unsigned char smem[];
    if ((smem_addr(smem) & 255) != 0 || dynamic_smem_bytes() < (unsigned)((2 * BR + 4 * BC) * HS * 2 + 2 * BR * 4)) __trap();
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sdO = sQ + BR * HS;
    bf16* sK = sdO + BR * HS;      // 2 stages
    bf16* sV = sK + 2 * BC * HS;   // 2 stages
    float* sL = reinterpret_cast<float*>(sV + 2 * BC * HS);  // lse * log2(e), +inf past T
    float* sD = sL + BR;

    const int qb = gridDim.x - 1 - blockIdx.x;
    const size_t head = (size_t)blockIdx.y * T;
    q += head * HS;
    k += head * HS;
    v += head * HS;
    o += head * HS;
    dout += head * HS;
    dq += head * HS;
    lse += head;
    delta += head;
    const int q0 = qb * BR;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned oa = a_off<HS>(lane), ob = bnk_off<HS>(lane), ot = bkn_off<HS>(lane);
    const int wq0 = q0 + warp * 16;
    const float sl2 = scale * LOG2E;
    const int kv_end = min(T, q0 + BR);
    const int nkb = (kv_end + BC - 1) / BC;

    load_tile<BR, HS>(sQ, q, q0, T);
    load_tile<BR, HS>(sdO, dout, q0, T);
    load_tile<BC, HS>(sK, k, 0, T);
    load_tile<BC, HS>(sV, v, 0, T);
    cp_async_commit();

    // delta = rowsum(dO * O) in fp32, two threads per row, read straight from global memory.
    {
        static_assert(THREADS == 2 * BR, "two threads per query row");
        const int r = threadIdx.x >> 1, half = threadIdx.x & 1, row = q0 + r;
        float d = 0.f;
        if (row < T) {
            const uint4* po = reinterpret_cast<const uint4*>(o + (size_t)row * HS + half * (HS / 2));
            const uint4* pd = reinterpret_cast<const uint4*>(dout + (size_t)row * HS + half * (HS / 2));
#pragma unroll
            for (int c = 0; c < HS / 16; ++c) {
                const uint4 a = po[c], b = pd[c];
                const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
                const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 fa = __bfloat1622float2(a2[e]), fb = __bfloat1622float2(b2[e]);
                    d = fmaf(fa.x, fb.x, d);
                    d = fmaf(fa.y, fb.y, d);
                }
            }
        }
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        if (half == 0) {
            sD[r] = d;
            sL[r] = row < T ? lse[row] * LOG2E : FA_INF;
            if (row < T) delta[row] = d;
        }
    }

    float acc[HS / 8][4];
#pragma unroll
    for (int i = 0; i < HS / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int ra = wq0 + (lane >> 2);
    float lr[2], dr[2];

    for (int j = 0; j < nkb; ++j) {
        const int buf = j & 1;
        if (j + 1 < nkb) {
            load_tile<BC, HS>(sK + (buf ^ 1) * BC * HS, k, (j + 1) * BC, T);
            load_tile<BC, HS>(sV + (buf ^ 1) * BC * HS, v, (j + 1) * BC, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (j == 0) {
            lr[0] = sL[ra - q0];
            lr[1] = sL[ra + 8 - q0];
            dr[0] = sD[ra - q0];
            dr[1] = sD[ra + 8 - q0];
        }
        const unsigned tK = smem_addr(sK) + buf * BC * HS * 2;
        const unsigned tV = smem_addr(sV) + buf * BC * HS * 2;
        const int k0 = j * BC;

        float s[BC / 8][4], dp[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk) {
            unsigned aq[4], ad[4];
            load_a<HS>(aq, smem_addr(sQ), oa, warp * 16, kk * 16);
            load_a<HS>(ad, smem_addr(sdO), oa, warp * 16, kk * 16);
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                unsigned b[4];
                load_b_nk<HS>(b, tK, ob, np * 16, kk * 16);
                mma_bf16(s[2 * np], aq, b[0], b[1]);
                mma_bf16(s[2 * np + 1], aq, b[2], b[3]);
                load_b_nk<HS>(b, tV, ob, np * 16, kk * 16);
                mma_bf16(dp[2 * np], ad, b[0], b[1]);
                mma_bf16(dp[2 * np + 1], ad, b[2], b[3]);
            }
        }
        const bool diag = k0 + BC - 1 > wq0;
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
            const int c = k0 + nt * 8 + (lane & 3) * 2;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e >> 1;
                const bool masked = diag && (c + (e & 1) > ra + 8 * h);
                const float p = masked ? 0.f : exp2f(fmaf(s[nt][e], sl2, -lr[h]));
                s[nt][e] = p * (dp[nt][e] - dr[h]);  // dS
            }
        }
        // dQ += dS K
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned a[4];
            acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dpi = 0; dpi < HS / 16; ++dpi) {
                unsigned b[4];
                load_b_kn<HS>(b, tK, ot, kk * 16, dpi * 16);
                mma_bf16(acc[2 * dpi], a, b[0], b[1]);
                mma_bf16(acc[2 * dpi + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    store_rows<HS>(dq, acc, wq0, T, lane, scale);
}

// ------------------------------------------------------------------------------------------------------
// Backward pass 2: dK and dV
// ------------------------------------------------------------------------------------------------------

constexpr int DKV_BC = 64;  // key rows per block (16 per warp)

// Query rows per pipeline stage: smaller at HS = 128 so the dK and dV accumulators fit in registers.
template <int HS>
struct DkvBr {
    static constexpr int value = HS <= 64 ? 64 : 16;
};

template <int HS>
__device__ __forceinline__ void bwd_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         bf16* __restrict__ dk, bf16* __restrict__ dv, int T, float scale) {
    constexpr int BC = DKV_BC, BR = DkvBr<HS>::value;
    extern __shared__ __align__(128) unsigned char smem[];
    if ((smem_addr(smem) & 255) != 0 || dynamic_smem_bytes() < (unsigned)((2 * BC + 4 * BR) * HS * 2 + 4 * BR * 4)) __trap();
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + BC * HS;
    bf16* sQ = sV + BC * HS;       // 2 stages
    bf16* sdO = sQ + 2 * BR * HS;  // 2 stages
    float* sL = reinterpret_cast<float*>(sdO + 2 * BR * HS);  // 2 stages of lse * log2(e)
    float* sD = sL + 2 * BR;                                    // 2 stages of delta

    const int kb = blockIdx.x;  // low key blocks see the most query blocks: they start first
    const size_t head = (size_t)blockIdx.y * T;
    q += head * HS;
    k += head * HS;
    v += head * HS;
    dout += head * HS;
    dk += head * HS;
    dv += head * HS;
    lse += head;
    delta += head;
    const int k0 = kb * BC;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned oa = a_off<HS>(lane), ob = bnk_off<HS>(lane), ot = bkn_off<HS>(lane);
    const int wk0 = k0 + warp * 16;
    const float sl2 = scale * LOG2E;
    const int qb0 = k0 / BR;
    const int nqb = (T + BR - 1) / BR;

    auto load_rows = [&](int stage, int qrow0) {
        load_tile<BR, HS>(sQ + stage * BR * HS, q, qrow0, T);
        load_tile<BR, HS>(sdO + stage * BR * HS, dout, qrow0, T);
        if (threadIdx.x < BR) {
            const int row = qrow0 + threadIdx.x;
            sL[stage * BR + threadIdx.x] = row < T ? lse[row] * LOG2E : FA_INF;
            sD[stage * BR + threadIdx.x] = row < T ? delta[row] : 0.f;
        }
    };

    load_tile<BC, HS>(sK, k, k0, T);
    load_tile<BC, HS>(sV, v, k0, T);
    load_rows(0, qb0 * BR);
    cp_async_commit();

    float dka[HS / 8][4], dva[HS / 8][4];
#pragma unroll
    for (int i = 0; i < HS / 8; ++i) {
        dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = 0.f;
        dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.f;
    }
    const int kr = wk0 + (lane >> 2);  // this thread's key rows: kr and kr + 8

    for (int i = qb0; i < nqb; ++i) {
        const int buf = (i - qb0) & 1;
        if (i + 1 < nqb) {
            load_rows(buf ^ 1, (i + 1) * BR);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const unsigned tQ = smem_addr(sQ) + buf * BR * HS * 2;
        const unsigned tdO = smem_addr(sdO) + buf * BR * HS * 2;
        const float* tL = sL + buf * BR;
        const float* tD = sD + buf * BR;
        const int q0 = i * BR;

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and the BR queries.
        float s[BR / 8][4], dp[BR / 8][4];
#pragma unroll
        for (int n = 0; n < BR / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk) {
            unsigned ak[4], av[4];
            load_a<HS>(ak, smem_addr(sK), oa, warp * 16, kk * 16);
            load_a<HS>(av, smem_addr(sV), oa, warp * 16, kk * 16);
#pragma unroll
            for (int np = 0; np < BR / 16; ++np) {
                unsigned b[4];
                load_b_nk<HS>(b, tQ, ob, np * 16, kk * 16);
                mma_bf16(s[2 * np], ak, b[0], b[1]);
                mma_bf16(s[2 * np + 1], ak, b[2], b[3]);
                load_b_nk<HS>(b, tdO, ob, np * 16, kk * 16);
                mma_bf16(dp[2 * np], av, b[0], b[1]);
                mma_bf16(dp[2 * np + 1], av, b[2], b[3]);
            }
        }
        // P^T = exp(S^T - lse) (0 where the key is after the query, or past T); dS^T = P^T (dP^T - delta).
        const bool diag = q0 < wk0 + 15;
#pragma unroll
        for (int nt = 0; nt < BR / 8; ++nt) {
            const int cl = nt * 8 + (lane & 3) * 2;  // local query column
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = cl + (e & 1);
                const int key = kr + 8 * (e >> 1);
                const bool masked = diag && (key > q0 + col);
                const float p = masked ? 0.f : exp2f(fmaf(s[nt][e], sl2, -tL[col]));
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - tD[col]);
            }
        }
        // dV += P^T dO and dK += dS^T Q (scaled at the end).
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            unsigned ap[4], ad[4];
            acc_to_a(ap, s[2 * kk], s[2 * kk + 1]);
            acc_to_a(ad, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int dpi = 0; dpi < HS / 16; ++dpi) {
                unsigned b[4];
                load_b_kn<HS>(b, tdO, ot, kk * 16, dpi * 16);
                mma_bf16(dva[2 * dpi], ap, b[0], b[1]);
                mma_bf16(dva[2 * dpi + 1], ap, b[2], b[3]);
                load_b_kn<HS>(b, tQ, ot, kk * 16, dpi * 16);
                mma_bf16(dka[2 * dpi], ad, b[0], b[1]);
                mma_bf16(dka[2 * dpi + 1], ad, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    store_rows<HS>(dk, dka, wk0, T, lane, scale);
    store_rows<HS>(dv, dva, wk0, T, lane, 1.f);
}

}  // namespace fa

// ------------------------------------------------------------------------------------------------------
// Entry points. Grid: (ceil(T / 64), B * NH), block: 128 threads, dynamic shared memory as documented in
// kernels/src/cuda/flash_attention.rs. `scale` is the softmax scale, 1 / sqrt(HS) for GPT-2.
// ------------------------------------------------------------------------------------------------------

#define FA_ENTRY_POINTS(HS)                                                                                   \
    extern "C" __global__ void __launch_bounds__(fa::THREADS) flash_attn_fwd_hs##HS(                          \
        const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o, float* lse, \
        int T, float scale) {                                                                                 \
        fa::fwd<HS>(q, k, v, o, lse, T, scale);                                                               \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(fa::THREADS) flash_attn_bwd_dq_hs##HS(                       \
        const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* o,       \
        const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq, float* delta, int T, float scale) {   \
        fa::bwd_dq<HS>(q, k, v, o, dout, lse, dq, delta, T, scale);                                           \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(fa::THREADS) flash_attn_bwd_dkdv_hs##HS(                     \
        const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* dout,    \
        const float* lse, const float* delta, __nv_bfloat16* dk, __nv_bfloat16* dv, int T, float scale) {     \
        fa::bwd_dkdv<HS>(q, k, v, dout, lse, delta, dk, dv, T, scale);                                        \
    }

FA_ENTRY_POINTS(64)
FA_ENTRY_POINTS(128)
