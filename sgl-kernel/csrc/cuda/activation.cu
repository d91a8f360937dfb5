// SiLU-and-mul over a fused [gate | up] projection: out = silu(gate) * up, one pass instead of
// torch's two (silu into a temporary, then the multiply).
//
// Rounding follows lmprog's SiluAndMul torch path: silu(gate) is computed in float32 as
// g / (1 + exp(-g)) (torch's formula, full-precision expf) and rounded to the dtype, then the
// product is rounded again.
#include "common.cuh"

namespace sgl_kernel_cuda {
namespace {

constexpr int kThreads = 256;

// A grid-stride loop over packs of VEC outputs: row r's pack c reads gate[r, c..] and up[r, c..].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    silu_and_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t n) {
  const int64_t packs_per_row = n / VEC;
  const int64_t total = rows * packs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t r = i / packs_per_row;
    const int64_t c = (i - r * packs_per_row) * VEC;
    const T* gate = x + r * 2 * n + c;
    float g[VEC], u[VEC];
    load_floats<VEC>(gate, g);
    load_floats<VEC>(gate + n, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = round_to<T>(g[k] / (1.f + expf(-g[k]))) * u[k];
    store_floats<VEC>(out + r * n + c, g);
  }
}

template <typename T, int VEC>
void launch_packs(const T* x, T* out, int64_t rows, int64_t n, cudaStream_t stream) {
  const unsigned blocks = grid_for(rows * (n / VEC), kThreads);
  silu_and_mul_kernel<T, VEC><<<blocks, kThreads, 0, stream>>>(x, out, rows, n);
}

}  // namespace

cudaError_t launch_silu_and_mul(const void* x, void* out, int64_t rows, int64_t n, DType dtype,
                                cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    // n % V == 0 keeps every row's gate and up halves on 16-byte boundaries too.
    if (n % V == 0 && all_aligned({x, out}, 16)) {
      launch_packs<T, V>(xp, op, rows, n, stream);
    } else {
      launch_packs<T, 1>(xp, op, rows, n, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace sgl_kernel_cuda
