// RMSNorm, residual-add + RMSNorm, and SiLU-and-mul: one pass over each row instead of torch's
// several (pow, mean, rsqrt, mul, mul; silu then mul). Rounding follows HF/torch in bf16: the
// normalized row is rounded to bf16 before the weight multiply, silu's result before the mul.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "isa.h"
#include "vec.h"

namespace sgl_kernel {
namespace {

// ---- scalar (also the reference for what the vector paths compute) ----------------------
template <typename T>
void rmsnorm_row_scalar(const T* x, const T* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += to_float(x[i]) * to_float(x[i]);
  float r = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) {
    T normed;
    from_float(to_float(x[i]) * r, &normed);
    from_float(to_float(w[i]) * to_float(normed), out + i);
  }
}

template <typename T>
void silu_mul_row_scalar(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = to_float(gate[i]);
    T s;
    from_float(g / (1.f + std::exp(-g)), &s);
    from_float(to_float(s) * to_float(up[i]), out + i);
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")
template <typename T>
void rmsnorm_row_avx512(const T* x, const T* w, T* out, int64_t n, float eps) {
  using namespace avx512;
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    __m512 v = load(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  __mmask16 tail = tail_mask(static_cast<int>(n - i));
  if (i < n) {
    __m512 v = load(x + i, tail);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / n + eps));
  for (int64_t j = 0; j < n; j += kWidth) {
    __mmask16 m = j + kWidth <= n ? 0xffff : tail;
    __m512 normed = _mm512_mul_ps(load(x + j, m), r);
    if constexpr (!std::is_same_v<T, float>) {  // round to T before the weight multiply
      T tmp[kWidth];
      store(tmp, normed);
      normed = load(tmp);
    }
    store(out + j, _mm512_mul_ps(load(w + j, m), normed), m);
  }
}

template <typename T>
void silu_mul_row_avx512(const T* gate, const T* up, T* out, int64_t n) {
  using namespace avx512;
  for (int64_t j = 0; j < n; j += kWidth) {
    __mmask16 m = j + kWidth <= n ? 0xffff : tail_mask(static_cast<int>(n - j));
    __m512 g = load(gate + j, m);
    __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), avx512::exp(_mm512_sub_ps(
                                                                        _mm512_setzero_ps(), g))));
    if constexpr (!std::is_same_v<T, float>) {
      T tmp[kWidth];
      store(tmp, s);
      s = load(tmp);
    }
    store(out + j, _mm512_mul_ps(s, load(up + j, m)), m);
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
template <typename T>
void rmsnorm_row_avx2(const T* x, const T* w, T* out, int64_t n, float eps) {
  using namespace avx2;
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    __m256 v = load(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (int64_t k = i; k < n; ++k) ss += to_float(x[k]) * to_float(x[k]);
  float rs = 1.f / std::sqrt(ss / n + eps);
  __m256 r = _mm256_set1_ps(rs);
  for (int64_t j = 0; j < i; j += kWidth) {
    __m256 normed = _mm256_mul_ps(load(x + j), r);
    if constexpr (!std::is_same_v<T, float>) {
      T tmp[kWidth];
      store(tmp, normed);
      normed = load(tmp);
    }
    store(out + j, _mm256_mul_ps(load(w + j), normed));
  }
  for (int64_t k = i; k < n; ++k) {
    T normed;
    from_float(to_float(x[k]) * rs, &normed);
    from_float(to_float(w[k]) * to_float(normed), out + k);
  }
}
#pragma GCC pop_options

template <typename T>
void rmsnorm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  Isa isa = cpu_isa();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (isa >= Isa::kAvx512) {
        rmsnorm_row_avx512(x + r * n, w, out + r * n, n, eps);
      } else if (isa >= Isa::kAvx2) {
        rmsnorm_row_avx2(x + r * n, w, out + r * n, n, eps);
      } else {
        rmsnorm_row_scalar(x + r * n, w, out + r * n, n, eps);
      }
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "weight must be [hidden]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "float32 or bfloat16 only, got ", x.scalar_type());
}

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  int64_t n = x.size(-1), rows = x.numel() / n;
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rmsnorm_rows(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                 n, static_cast<float>(eps));
  });
  return out;
}

// residual += x (rounded in their dtype); x = rmsnorm(residual) * weight. Both in place.
void fused_add_rmsnorm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                       double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() &&
                  residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous, with x's shape and dtype");
  at::Tensor w = weight.contiguous();
  int64_t n = x.size(-1), rows = x.numel() / n;
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < n; ++i) {
          from_float(to_float(rp[r * n + i]) + to_float(xp[r * n + i]), rp + r * n + i);
        }
      }
    });
    rmsnorm_rows(rp, w.data_ptr<scalar_t>(), xp, rows, n, static_cast<float>(eps));
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "float32 or bfloat16 only");
  int64_t n2 = x.size(-1), n = n2 / 2, rows = x.numel() / n2;
  TORCH_CHECK(n2 % 2 == 0, "the last dimension must be [gate | up]");
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, x.options());
  Isa isa = cpu_isa();
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * n2;
        if (isa >= Isa::kAvx512) {
          silu_mul_row_avx512(row, row + n, op + r * n, n);
        } else {
          silu_mul_row_scalar(row, row + n, op + r * n, n);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def("rmsnorm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rmsnorm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgl_kernel, CPU, m) {
  m.impl("rmsnorm", &rmsnorm);
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm);
  m.impl("silu_and_mul", &silu_and_mul);
}

}  // namespace sgl_kernel
