// What the CUDA kernels share: float <-> storage-type conversions that round like torch,
// 16-byte packed loads and stores, a block-wide sum, and the dtype dispatch of the launchers.
//
// Kernels compute in float32 and round to the storage type wherever lmprog's torch path writes a
// tensor of that type, so bf16/fp16 results match the reference rounding for rounding.
// Conversions are spelled out (__float2bfloat16_rn, ...): torch builds with the implicit
// half/bfloat16 conversions and operators switched off.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "launch.h"

namespace sgl_kernel_cuda {

// ---- conversions (round to nearest even, as torch) -----------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: where the torch path materializes an intermediate tensor of type T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// ---- packed memory access --------------------------------------------------------------------
// Elements per 16-byte access: 4 floats, 8 halves or bfloat16s.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// N consecutive elements, aligned to their total size, so one access moves them all (for float
// with N = 8, two 16-byte accesses: Hopper's widest load is 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The machine word a pack moves in: the pack itself up to 16 bytes, 16-byte words beyond.
template <int kBytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

template <typename T, int N>
using PackWord = typename Word<(sizeof(T) * N < 16 ? sizeof(T) * N : 16)>::type;

// Global memory -> pack, word by word.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* src) {
  using W = PackWord<T, N>;
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(pack) / sizeof(W)); ++i) {
    reinterpret_cast<W*>(&pack)[i] = reinterpret_cast<const W*>(src)[i];
  }
  return pack;
}

// Pack -> global memory, word by word. Through __stwb (a plain write-back store): with a
// plain assignment nvcc splits some 16-byte stores into four.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, N>& pack) {
  using W = PackWord<T, N>;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(pack) / sizeof(W)); ++i) {
    __stwb(reinterpret_cast<W*>(dst) + i, reinterpret_cast<const W*>(&pack)[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = load_pack<T, N>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  store_pack<T, N>(p, pack);
}

// Whether every pointer is aligned to `bytes` (a null pointer counts as aligned).
inline bool all_aligned(std::initializer_list<const void*> ptrs, uintptr_t bytes) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  }
  return true;
}

// ---- reductions ------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of `v` over the block, returned to every thread. blockDim.x must be a multiple of 32;
// at most one call per kernel (its shared scratch is not reset for a second one).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_totals[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  // Every warp adds up the warp totals itself: no second barrier to broadcast the result.
  v = lane < static_cast<int>(blockDim.x / 32) ? warp_totals[lane] : 0.f;
  return warp_sum(v);
}

// ---- launch helpers --------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the element type `dtype` names and returns its result.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `items`: one item per thread up to a cap past which
// threads loop (far more blocks than any GPU runs at once).
inline unsigned grid_for(int64_t items, int threads) {
  const int64_t cap = int64_t{1} << 20;
  const int64_t blocks = ceil_div(items, threads);
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace sgl_kernel_cuda
