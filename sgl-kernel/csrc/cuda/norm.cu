// RMSNorm and residual-add + RMSNorm, one block per row (a token's hidden vector).
//
// Rounding follows lmprog's RMSNorm torch path (HF's LlamaRMSNorm): the sum of squares is taken
// in float32, the normalized value is rounded to the input dtype before the weight multiply, and
// the fused variant rounds residual + x to the dtype first (torch's `residual.add_(x)`), then
// normalizes that rounded sum.
#include "common.cuh"

namespace sgl_kernel_cuda {
namespace {

constexpr int kMaxThreads = 1024;

// Pass 1 sums the squares of the row (for kAdd, of round(residual + x), stored back into
// `residual`); pass 2 re-reads the row, still hot in L1, and writes weight * round(row * rstd).
// Each thread touches the same elements in both passes, so it reads back its own stores and
// `out` may alias `x` (it does for kAdd: the op writes the normalized row over x).
template <typename T, int VEC, bool kAdd>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_kernel(const T* x, T* residual, const T* __restrict__ weight, T* out, int64_t n,
                   float eps) {
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * n;
  const T* row = (kAdd ? residual : x) + offset;  // the values normalized
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  float sum_sq = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
    float v[VEC];
    load_floats<VEC>(x + offset + j, v);
    if constexpr (kAdd) {
      float r[VEC];
      load_floats<VEC>(residual + offset + j, r);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = round_to<T>(r[i] + v[i]);
      store_floats<VEC>(residual + offset + j, v);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += v[i] * v[i];
  }
  const float rstd = rsqrtf(block_sum(sum_sq) / static_cast<float>(n) + eps);

  for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
    float v[VEC], w[VEC];
    load_floats<VEC>(row + j, v);
    load_floats<VEC>(weight + j, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = w[i] * round_to<T>(v[i] * rstd);
    store_floats<VEC>(out + offset + j, v);
  }
}

template <typename T, int VEC, bool kAdd>
void launch_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t n,
                 float eps, cudaStream_t stream) {
  // Enough warps that each thread handles about one pack of a typical row (4096 bf16 values:
  // 512 threads), capped at the block limit; wider rows loop.
  const int64_t packs = n / VEC;
  const int threads = static_cast<int>(
      packs >= kMaxThreads ? kMaxThreads : (packs < 32 ? 32 : ceil_div(packs, 32) * 32));
  rmsnorm_kernel<T, VEC, kAdd>
      <<<static_cast<unsigned>(rows), threads, 0, stream>>>(x, residual, weight, out, n, eps);
}

template <bool kAdd>
cudaError_t launch(const void* x, void* residual, const void* weight, void* out, int64_t rows,
                   int64_t n, float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const T* xp = static_cast<const T*>(x);
    T* rp = static_cast<T*>(residual);
    const T* wp = static_cast<const T*>(weight);
    T* op = static_cast<T*>(out);
    if (n % V == 0 && all_aligned({x, residual, weight, out}, 16)) {
      launch_rows<T, V, kAdd>(xp, rp, wp, op, rows, n, eps, stream);
    } else {
      launch_rows<T, 1, kAdd>(xp, rp, wp, op, rows, n, eps, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_rmsnorm(const void* x, const void* weight, void* out, int64_t rows, int64_t n,
                           float eps, DType dtype, cudaStream_t stream) {
  return launch<false>(x, nullptr, weight, out, rows, n, eps, dtype, stream);
}

cudaError_t launch_fused_add_rmsnorm(void* x, void* residual, const void* weight, int64_t rows,
                                     int64_t n, float eps, DType dtype, cudaStream_t stream) {
  return launch<true>(x, residual, weight, x, rows, n, eps, dtype, stream);
}

}  // namespace sgl_kernel_cuda
