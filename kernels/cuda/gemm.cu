// Hand-written tensor-core GEMM: C (M, N) = A (M, K) . B (N, K)^T [+ bias (N)] [-> GELU], row-major.
//
// This is the engine's fully connected layer `out = inp . W^T + b` with W (OC, C): A = inp, B = W.
// bf16 inputs, fp32 accumulation, bf16 or fp32 output (`gemm_bf16_tn_bf16` / `gemm_bf16_tn_f32`).
//
// Tiling: a 128 x 128 output tile per block of 4 warps (2 x 2), each warp owning 64 x 64 (4 x 8 tiles of
// `mma.sync.m16n8k16`, 128 fp32 accumulators per thread). K advances 32 at a time through a 4-stage
// `cp.async` ring in shared memory (16 KiB a stage, 64 KiB in all: dynamic shared memory, opted in by the
// launcher). Tiles are stored with 64-byte rows whose four 16-byte chunks are XOR-swizzled by (row / 2) % 4,
// so the eight rows read by each `ldmatrix` matrix hit eight distinct bank groups. Blocks are rasterised in
// groups of 8 block-rows so that neighbouring blocks share A and B tiles in L2.
//
// Edges: rows of A and B past M and N, and K chunks past K, are zero-filled by `cp.async` with a source
// size of 0; the epilogue stores only elements inside (M, N). The launcher requires K % 8 == 0 (16-byte
// aligned rows) and 16-byte aligned A and B.
//
// Epilogue (per element, fp32): x = acc + bias[n] (when bias != null); pre[m, n] = x (when pre != null,
// the pre-activation the GELU backward needs); x = gelu_tanh(x) (when gelu != 0); C[m, n] = x.

#include <cuda_bf16.h>

namespace gemm {

typedef __nv_bfloat16 bf16;

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4;
constexpr int WARPS_M = 2, WARPS_N = 2, THREADS = WARPS_M * WARPS_N * 32;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 64 x 64 per warp
constexpr int MT = WM / 16, NT = WN / 8;              // m16 and n8 tiles per warp
constexpr int ROW_BYTES = BK * 2;                     // 64
constexpr int TILE_A_BYTES = BM * ROW_BYTES, TILE_B_BYTES = BN * ROW_BYTES;
constexpr int STAGE_BYTES = TILE_A_BYTES + TILE_B_BYTES;
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
constexpr int GROUP_M = 8;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of chunk `c` (0..3, 16 bytes each) of tile row `r`.
__device__ __forceinline__ unsigned swz(int r, int c) { return r * ROW_BYTES + ((c ^ ((r >> 1) & 3)) << 4); }

// Per-lane ldmatrix offset for a fragment whose 8-row groups start at multiples of 8: row `lr`, chunk `lc`
// (0 or 1) at k0 = 0. For k0 = 16 the chunk index gains 2, which is an XOR of 32 on the byte offset.
__device__ __forceinline__ unsigned lane_off(int lr, int lc) { return swz(lr, lc); }

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
    const float u = k0 * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(u));
}

__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(bf16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store1(float* p, float a) { *p = a; }
__device__ __forceinline__ void store1(bf16* p, float a) { *p = __float2bfloat16(a); }

// Issues the cp.async copies of K-tile `kt` (columns kt*BK..) of A and B into the shared stage at `stage`.
__device__ __forceinline__ void load_stage(unsigned stage, const bf16* A, const bf16* B, int m0, int n0, int kt, int M,
                                           int N, int K) {
    const int k0 = kt * BK;
    constexpr int CHUNKS_A = BM * BK / 8, CHUNKS_B = BN * BK / 8;
    static_assert(CHUNKS_A % THREADS == 0 && CHUNKS_B % THREADS == 0, "tiles split evenly over the block");
#pragma unroll
    for (int it = 0; it < CHUNKS_A / THREADS; ++it) {
        const int i = it * THREADS + threadIdx.x;
        const int r = i / (BK / 8), c = i % (BK / 8);
        const bool ok = m0 + r < M && k0 + c * 8 < K;
        cp_async16(stage + swz(r, c), ok ? A + (size_t)(m0 + r) * K + k0 + c * 8 : A, ok);
    }
#pragma unroll
    for (int it = 0; it < CHUNKS_B / THREADS; ++it) {
        const int i = it * THREADS + threadIdx.x;
        const int r = i / (BK / 8), c = i % (BK / 8);
        const bool ok = n0 + r < N && k0 + c * 8 < K;
        cp_async16(stage + TILE_A_BYTES + swz(r, c), ok ? B + (size_t)(n0 + r) * K + k0 + c * 8 : B, ok);
    }
}

template <typename OutT>
__device__ __forceinline__ void gemm_tn(const bf16* __restrict__ A, const bf16* __restrict__ B,
                                        const bf16* __restrict__ bias, OutT* __restrict__ C, OutT* __restrict__ pre,
                                        int M, int N, int K, int gelu) {
    extern __shared__ __align__(128) unsigned char smem[];
    if ((smem_addr(smem) & 127) != 0 || dynamic_smem_bytes() < (unsigned)SMEM_BYTES) __trap();

    // Grouped rasterisation over a 1-D grid.
    const int grid_m = (M + BM - 1) / BM, grid_n = (N + BN - 1) / BN;
    const int pid = blockIdx.x;
    const int per_group = GROUP_M * grid_n;
    const int first_m = (pid / per_group) * GROUP_M;
    const int group_rows = min(grid_m - first_m, GROUP_M);
    const int bm = first_m + (pid % per_group) % group_rows;
    const int bn = (pid % per_group) / group_rows;
    const int m0 = bm * BM, n0 = bn * BN;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const unsigned base = smem_addr(smem);
    // A fragment: rows lane & 15, chunk lane >> 4. B (n, k) pair: rows (lane & 7) + (lane >> 4) * 8, chunk
    // (lane >> 3) & 1.
    const unsigned off_a = lane_off(lane & 15, lane >> 4);
    const unsigned off_b = lane_off((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage(base + s * STAGE_BYTES, A, B, m0, n0, s, M, N, K);
        cp_async_commit();  // empty groups keep the group count uniform
    }

    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt is visible to all; every warp is done with tile kt - 1
        const int pf = kt + STAGES - 1;
        if (pf < ktiles) load_stage(base + (pf % STAGES) * STAGE_BYTES, A, B, m0, n0, pf, M, N, K);
        cp_async_commit();

        const unsigned sa = base + (kt % STAGES) * STAGE_BYTES;
        const unsigned sb = sa + TILE_A_BYTES;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned af[MT][4], bfr[NT / 2][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) ldsm_x4(af[i], sa + (off_a ^ (kk * 32)) + (wm * WM + i * 16) * ROW_BYTES);
#pragma unroll
            for (int j = 0; j < NT / 2; ++j) ldsm_x4(bfr[j], sb + (off_b ^ (kk * 32)) + (wn * WN + j * 16) * ROW_BYTES);
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_bf16(acc[i][j], af[i], bfr[j / 2][(j % 2) * 2], bfr[j / 2][(j % 2) * 2 + 1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue straight from registers: each thread holds pairs of adjacent columns.
    const bool pairs = (N % 2) == 0;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm * WM + i * 16 + (lane >> 2) + h * 8;
            if (row >= M) continue;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int col = n0 + wn * WN + j * 8 + (lane & 3) * 2;
                if (col >= N) continue;
                const bool two = col + 1 < N;
                float x0 = acc[i][j][2 * h], x1 = acc[i][j][2 * h + 1];
                if (bias != nullptr) {
                    x0 += __bfloat162float(bias[col]);
                    if (two) x1 += __bfloat162float(bias[col + 1]);
                }
                const size_t at = (size_t)row * N + col;
                if (pre != nullptr) {
                    if (two && pairs) {
                        store2(pre + at, x0, x1);
                    } else {
                        store1(pre + at, x0);
                        if (two) store1(pre + at + 1, x1);
                    }
                }
                if (gelu) {
                    x0 = gelu_tanh(x0);
                    x1 = gelu_tanh(x1);
                }
                if (two && pairs) {
                    store2(C + at, x0, x1);
                } else {
                    store1(C + at, x0);
                    if (two) store1(C + at + 1, x1);
                }
            }
        }
    }
}

}  // namespace gemm

// Grid: (ceil(M / 128) * ceil(N / 128)), block: 128 threads, dynamic shared memory 65536 bytes.
extern "C" __global__ void __launch_bounds__(gemm::THREADS) gemm_bf16_tn_bf16(const __nv_bfloat16* A,
                                                                             const __nv_bfloat16* B,
                                                                             const __nv_bfloat16* bias,
                                                                             __nv_bfloat16* C, __nv_bfloat16* pre,
                                                                             int M, int N, int K, int gelu) {
    gemm::gemm_tn<__nv_bfloat16>(A, B, bias, C, pre, M, N, K, gelu);
}

extern "C" __global__ void __launch_bounds__(gemm::THREADS) gemm_bf16_tn_f32(const __nv_bfloat16* A,
                                                                            const __nv_bfloat16* B,
                                                                            const __nv_bfloat16* bias, float* C,
                                                                            float* pre, int M, int N, int K,
                                                                            int gelu) {
    gemm::gemm_tn<float>(A, B, bias, C, pre, M, N, K, gelu);
}
