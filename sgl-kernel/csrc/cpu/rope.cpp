// Rotary embedding fused with the K/V store: one pass over a step's fused qkv projection rotates
// q and k (HF's rotate-half layout) and writes the rotated k and the plain v straight into this
// layer's pool buffers at the tokens' slots. The torch path spends about ten small ops on this
// per layer (table lookups, four multiply(-add)s, two indexed stores); at one token per step
// they cost more in dispatch than in arithmetic.
//
// Rounding follows the torch path (lmprog's RotaryEmbedding.apply) in bfloat16: cos and sin are
// rounded to the activation dtype, x1 * cos is rounded before x2 * sin is subtracted.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "vec.h"

namespace sgl_kernel {
namespace {

template <typename T>
inline float round_to(float x) {
  T t;
  from_float(x, &t);
  return to_float(t);
}

// Rotates one head: out[i] = x1 c - x2 s, out[i + half] = x2 c + x1 s.
template <typename T>
inline void rotate_head(const T* x, const float* cos, const float* sin, int64_t half, T* out) {
  for (int64_t i = 0; i < half; ++i) {
    float c = round_to<T>(cos[i]), s = round_to<T>(sin[i]);
    float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    from_float(round_to<T>(x1 * c) - x2 * s, out + i);
    from_float(round_to<T>(x2 * c) + x1 * s, out + i + half);
  }
}

std::tuple<at::Tensor, at::Tensor> rope_kv_store(const at::Tensor& qkv, const at::Tensor& cos,
                                                 const at::Tensor& sin, const at::Tensor& loc,
                                                 at::Tensor& k_buf, at::Tensor& v_buf,
                                                 int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2, "qkv must be a CPU tensor [T, width]");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  int64_t t = qkv.size(0), half = cos.size(-1), d = 2 * half;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == t,
              "cos and sin must be float32 [T, head_dim / 2] with T = ", t, ", got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * d, "qkv width ", qkv.size(1),
              " is not (", num_heads, " + 2 x ", num_kv_heads, ") heads x head_dim ", d);
  TORCH_CHECK(loc.dim() == 1 && loc.size(0) == t && loc.scalar_type() == at::kLong,
              "loc must be int64 [", t, "], got ", loc.scalar_type(), " ", loc.sizes());
  for (const at::Tensor* buf : {&k_buf, &v_buf}) {
    TORCH_CHECK(buf->scalar_type() == qkv.scalar_type() && buf->is_contiguous() &&
                    buf->dim() == 3 && buf->size(1) == num_kv_heads && buf->size(2) == d,
                "the K/V buffers must be contiguous ", qkv.scalar_type(), " [slots, ",
                num_kv_heads, ", ", d, "], got ", buf->scalar_type(), " ", buf->sizes());
  }
  at::Tensor x = qkv.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  at::Tensor l = loc.contiguous();
  at::Tensor q = at::empty({t, num_heads, d}, qkv.options());
  at::Tensor k = at::empty({t, num_kv_heads, d}, qkv.options());
  int64_t slots = k_buf.size(0), kv_width = num_kv_heads * d, width = qkv.size(1);
  const int64_t* lp = l.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(lp[i] >= 0 && lp[i] < slots, "loc[", i, "] = ", lp[i], " is outside the pool's ",
                slots, " slots");
  }
  dispatch_float_bf16(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
    T *kb = k_buf.data_ptr<T>(), *vb = v_buf.data_ptr<T>();
    const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
    int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1));
    at::parallel_for(0, t, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* row = xp + i * width;
        const float *ci = cp + i * half, *si = sp + i * half;
        for (int64_t h = 0; h < num_heads; ++h) {
          rotate_head(row + h * d, ci, si, half, qp + (i * num_heads + h) * d);
        }
        T* k_out = kp + i * kv_width;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          rotate_head(row + (num_heads + h) * d, ci, si, half, k_out + h * d);
        }
        std::copy(k_out, k_out + kv_width, kb + lp[i] * kv_width);
        const T* v = row + (num_heads + num_kv_heads) * d;
        std::copy(v, v + kv_width, vb + lp[i] * kv_width);
      }
    });
  });
  return {q, k};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def(
      "rope_kv_store(Tensor qkv, Tensor cos, Tensor sin, Tensor loc, Tensor(a!) k_buf, "
      "Tensor(b!) v_buf, int num_heads, int num_kv_heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgl_kernel, CPU, m) { m.impl("rope_kv_store", &rope_kv_store); }

}  // namespace sgl_kernel
