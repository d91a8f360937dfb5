// Rotary embedding (HF's rotate-half layout) fused with the K/V store: one pass over a step's
// fused qkv projection rotates the q and k heads and writes rotated k and plain v straight into
// the layer's pool buffers at the tokens' slots, instead of the torch path's table lookups, four
// multiply(-add)s and two indexed stores.
//
// Rounding follows lmprog's RotaryEmbedding.apply (cos/sin in the activation dtype):
//   out1 = round(round(x1 * cos) - x2 * sin),  out2 = round(round(x2 * cos) + x1 * sin)
// where torch's addcmul rounds the product x2 * sin to float32 only. The products and sums use
// the _rn intrinsics so nvcc cannot contract them into FMAs the reference does not do.
#include <cstdio>

#include "common.cuh"

namespace sgl_kernel_cuda {
namespace {

constexpr int kThreads = 128;

// One work item = VEC frequencies of one head of one token, for every head of qkv's row:
//
//   qkv row t:  [ q head 0 .. q head H-1 | k head 0 .. k head Hkv-1 | v head 0 .. v head Hkv-1 ]
//   each head:  [ x1: half values | x2: half values ]   item c covers x1[c, c+VEC), x2[c, c+VEC)
//
// q items write q[t, h]; k items write k[t, h - H] and k_buf[loc[t], h - H]; v items copy their
// values into v_buf[loc[t], h - H - Hkv].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kv_store_kernel(const T* __restrict__ qkv, const float* __restrict__ cos,
                         const float* __restrict__ sin, const int64_t* __restrict__ loc,
                         T* __restrict__ q, T* __restrict__ k, T* __restrict__ k_buf,
                         T* __restrict__ v_buf, int64_t tokens, int heads, int kv_heads,
                         int half, int64_t slots) {
  const int all_heads = heads + 2 * kv_heads;
  const int64_t items_per_head = half / VEC;
  const int64_t items_per_token = all_heads * items_per_head;
  const int64_t d = 2 * static_cast<int64_t>(half);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < tokens * items_per_token; i += stride) {
    const int64_t t = i / items_per_token;
    const int64_t rest = i - t * items_per_token;
    const int h = static_cast<int>(rest / items_per_head);
    const int64_t c = (rest - h * items_per_head) * VEC;
    const T* x = qkv + (t * all_heads + h) * d;

    int64_t slot = 0;
    if (h >= heads) {
      slot = loc[t];
      if (slot < 0 || slot >= slots) {
        if (h == heads && c == 0) {  // one message per token, not one per item
          printf("rope_kv_store: loc[%lld] = %lld is outside the pool's %lld slots\n",
                 static_cast<long long>(t), static_cast<long long>(slot),
                 static_cast<long long>(slots));
        }
        __trap();
      }
    }
    if (h >= heads + kv_heads) {
      T* dst = v_buf + (slot * kv_heads + (h - heads - kv_heads)) * d;
      store_pack<T, VEC>(dst + c, load_pack<T, VEC>(x + c));
      store_pack<T, VEC>(dst + half + c, load_pack<T, VEC>(x + half + c));
      continue;
    }

    float x1[VEC], x2[VEC], cs[VEC], sn[VEC];
    load_floats<VEC>(x + c, x1);
    load_floats<VEC>(x + half + c, x2);
    load_floats<VEC>(cos + t * half + c, cs);
    load_floats<VEC>(sin + t * half + c, sn);
    Pack<T, VEC> out1, out2;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float co = round_to<T>(cs[j]), si = round_to<T>(sn[j]);
      const float a = x1[j], b = x2[j];
      out1.v[j] = from_float<T>(__fsub_rn(round_to<T>(__fmul_rn(a, co)), __fmul_rn(b, si)));
      out2.v[j] = from_float<T>(__fadd_rn(round_to<T>(__fmul_rn(b, co)), __fmul_rn(a, si)));
    }
    T* dst = h < heads ? q + (t * heads + h) * d : k + (t * kv_heads + (h - heads)) * d;
    store_pack<T, VEC>(dst + c, out1);
    store_pack<T, VEC>(dst + half + c, out2);
    if (h >= heads) {
      T* pool = k_buf + (slot * kv_heads + (h - heads)) * d;
      store_pack<T, VEC>(pool + c, out1);
      store_pack<T, VEC>(pool + half + c, out2);
    }
  }
}

template <typename T, int VEC>
void launch_items(const T* qkv, const float* cos, const float* sin, const int64_t* loc, T* q,
                  T* k, T* k_buf, T* v_buf, int64_t tokens, int heads, int kv_heads, int half,
                  int64_t slots, cudaStream_t stream) {
  // Llama-3-8B (32 + 2 x 8 heads of 128, bf16): 384 items per token, so even a one-token decode
  // step spreads over three blocks.
  const int64_t items = tokens * (heads + 2 * kv_heads) * (half / VEC);
  rope_kv_store_kernel<T, VEC><<<grid_for(items, kThreads), kThreads, 0, stream>>>(
      qkv, cos, sin, loc, q, k, k_buf, v_buf, tokens, heads, kv_heads, half, slots);
}

}  // namespace

cudaError_t launch_rope_kv_store(const void* qkv, const float* cos, const float* sin,
                                 const int64_t* loc, void* q, void* k, void* k_buf, void* v_buf,
                                 int64_t tokens, int64_t heads, int64_t kv_heads,
                                 int64_t head_dim, int64_t slots, DType dtype,
                                 cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const int half = static_cast<int>(head_dim / 2);
  const int h = static_cast<int>(heads), hkv = static_cast<int>(kv_heads);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const T* xp = static_cast<const T*>(qkv);
    T *qp = static_cast<T*>(q), *kp = static_cast<T*>(k);
    T *kb = static_cast<T*>(k_buf), *vb = static_cast<T*>(v_buf);
    // half % V == 0 puts every head's halves (and every cos/sin row) on pack boundaries.
    if (half % V == 0 && all_aligned({qkv, q, k, k_buf, v_buf}, 16) &&
        all_aligned({cos, sin}, sizeof(Pack<float, V>))) {
      launch_items<T, V>(xp, cos, sin, loc, qp, kp, kb, vb, tokens, h, hkv, half, slots, stream);
    } else {
      launch_items<T, 1>(xp, cos, sin, loc, qp, kp, kb, vb, tokens, h, hkv, half, slots, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace sgl_kernel_cuda
