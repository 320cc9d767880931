// Deterministic two-pass sums in fp64 (the CPU backend sums in f64 too), for the global gradient norm and
// `Backend::sum`/`sum_squares`:
//   pass 1 (`*_partial`): exactly NORM_BLOCKS blocks of NORM_THREADS threads (the launcher asserts it); thread
//     (block, tid) sums elements block * NORM_THREADS + tid + k * NORM_BLOCKS * NORM_THREADS in order of k, the
//     block reduces with a fixed butterfly + tree, and writes partial[block];
//   pass 2 (`sum_finish`): one block of NORM_THREADS sums the NORM_BLOCKS partials with the same fixed tree and
//     writes out[0].
// The assignment of elements to threads and the reduction order depend on n only: bitwise the same on every run
// and every device.
#include "common.cuh"

#define NORM_BLOCKS 512
#define NORM_THREADS 512

template <typename T, bool SQUARE> __device__ void sum_partial(double* partial, const T* x, u64 n) {
    __shared__ double scratch[32];
    const u64 stride = (u64)NORM_BLOCKS * NORM_THREADS;
    double acc = 0.0;
    for (u64 i = (u64)blockIdx.x * NORM_THREADS + threadIdx.x; i < n; i += stride) {
        const double v = (double)to_f(x[i]);
        acc += SQUARE ? v * v : v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    sum_squares_partial_f32(double* partial, const float* x, u64 n) {
    sum_partial<float, true>(partial, x, n);
}
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    sum_squares_partial_bf16(double* partial, const bf16* x, u64 n) {
    sum_partial<bf16, true>(partial, x, n);
}
extern "C" __global__ void __launch_bounds__(NORM_THREADS) sum_partial_f32(double* partial, const float* x, u64 n) {
    sum_partial<float, false>(partial, x, n);
}
extern "C" __global__ void __launch_bounds__(NORM_THREADS) sum_partial_bf16(double* partial, const bf16* x, u64 n) {
    sum_partial<bf16, false>(partial, x, n);
}
extern "C" __global__ void __launch_bounds__(NORM_THREADS) sum_finish(double* out, const double* partial) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (u32 i = threadIdx.x; i < NORM_BLOCKS; i += NORM_THREADS) acc += partial[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}
