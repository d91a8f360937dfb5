// bfloat16 linear layers on weights packed for dot products of bf16 pairs.
//
// Why: decoding reads every weight once per step, so a bf16 model should stream half of fp32's
// bytes; oneDNN's bf16 matmul at one row ran at 6-15 GB/s here, no faster than fp32 per
// output. Packed so that one AVX512-BF16 `vdpbf16ps` takes a 64-byte line, 16 output rows x a
// pair of k, against the activations' matching pair broadcast:
//
//   packed[b][p] = rows 16b .. 16b+15, columns 2p and 2p+1, row by row  (bf16 [nb, kp, 32])
//   y[m, n] = sum_p  w[n, 2p] x[m, 2p] + w[n, 2p+1] x[m, 2p+1]   (fp32 accumulators)
//
// Paths: AVX512-BF16; AVX-512 without it (the pair split into two fp32 vectors by shifts, then
// FMAs: the same products, summed in another order); scalar. Products of bf16 values are exact in
// fp32, so paths differ only in summation order. Activations are bf16 (float32 ones are rounded
// to bf16 first, as the torch path's matmul in bf16 would see them); the output is x's dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "isa.h"
#include "vec.h"

namespace sgl_kernel {
namespace {

constexpr int kRows = 16;  // output rows per line
constexpr int kNB = 4;     // blocks of 16 rows per tile (64 outputs)
constexpr int kMR = 4;     // activation rows per tile

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Path { kScalar, kAvx512, kAvx512Bf16 };

// LMPROG_BF16_DOT=0 keeps AVX512-BF16's dot product out (to test the AVX-512 path on CPUs
// that have it); LMPROG_CPU_ISA lowers the rest as for every kernel.
bool bf16_dot_allowed() {
  const char* env = std::getenv("LMPROG_BF16_DOT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

Path choose_path() {
  static const bool dot = bf16_dot_allowed();
  if (dot && has_avx512_bf16()) return Path::kAvx512Bf16;
  if (cpu_isa() >= Isa::kAvx512) return Path::kAvx512;
  return Path::kScalar;
}

struct Problem {
  int64_t m, n, k, kp, nb;
  const uint16_t* w;  // packed
  const float* bias;  // or nullptr
};

// acc[r][j * 16 + i] = dot(x row r, weight row (16 (b0 + j) + i)) for r < mr, j < nbt.
void tile_scalar(const uint16_t* x, int64_t ldx, int mr, const Problem& p, int64_t b0, int nbt,
                 float* acc) {
  auto f = [](uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  };
  for (int r = 0; r < mr; ++r) {
    for (int j = 0; j < nbt; ++j) {
      const uint16_t* block = p.w + (b0 + j) * p.kp * 32;
      for (int i = 0; i < kRows; ++i) {
        float s = 0.f;
        for (int64_t q = 0; q < p.kp; ++q) {
          s += f(block[q * 32 + 2 * i]) * f(x[r * ldx + 2 * q]);
          s += f(block[q * 32 + 2 * i + 1]) * f(x[r * ldx + 2 * q + 1]);
        }
        acc[r * kNB * kRows + j * kRows + i] = s;
      }
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
template <int MR, int NBT>
void tile_bf16(const uint16_t* x, int64_t ldx, const Problem& p, int64_t b0, float* acc) {
  __m512 c[MR][NBT];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NBT; ++j) c[r][j] = _mm512_setzero_ps();
  const uint16_t* w = p.w + b0 * p.kp * 32;
  const int64_t stride = p.kp * 32;
  for (int64_t q = 0; q < p.kp; ++q) {
    __m512i wl[NBT];
    for (int j = 0; j < NBT; ++j) wl[j] = _mm512_loadu_si512(w + j * stride + q * 32);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * q, sizeof(pair));
      __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int j = 0; j < NBT; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], (__m512bh)wl[j], xb);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NBT; ++j) _mm512_storeu_ps(acc + r * kNB * kRows + j * kRows, c[r][j]);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
template <int MR, int NBT>
void tile_avx512(const uint16_t* x, int64_t ldx, const Problem& p, int64_t b0, float* acc) {
  __m512 c[MR][NBT];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NBT; ++j) c[r][j] = _mm512_setzero_ps();
  const uint16_t* w = p.w + b0 * p.kp * 32;
  const int64_t stride = p.kp * 32;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t q = 0; q < p.kp; ++q) {
    __m512 even[NBT], odd[NBT];
    for (int j = 0; j < NBT; ++j) {
      __m512i line = _mm512_loadu_si512(w + j * stride + q * 32);
      even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(line, 16));
      odd[j] = _mm512_castsi512_ps(_mm512_and_si512(line, high));
    }
    for (int r = 0; r < MR; ++r) {
      const uint16_t* xr = x + r * ldx + 2 * q;
      __m512 x0 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(uint32_t{xr[0]} << 16)));
      __m512 x1 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(uint32_t{xr[1]} << 16)));
      for (int j = 0; j < NBT; ++j) {
        c[r][j] = _mm512_fmadd_ps(even[j], x0, c[r][j]);
        c[r][j] = _mm512_fmadd_ps(odd[j], x1, c[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NBT; ++j) _mm512_storeu_ps(acc + r * kNB * kRows + j * kRows, c[r][j]);
}
#pragma GCC pop_options

// The tile functions for every (rows, blocks) pair, so the loops above unroll fully.
using TileFn = void (*)(const uint16_t*, int64_t, const Problem&, int64_t, float*);

template <int MR, int NBT>
struct Bf16Tile {
  static void run(const uint16_t* x, int64_t ldx, const Problem& p, int64_t b0, float* acc) {
    tile_bf16<MR, NBT>(x, ldx, p, b0, acc);
  }
};
template <int MR, int NBT>
struct Avx512Tile {
  static void run(const uint16_t* x, int64_t ldx, const Problem& p, int64_t b0, float* acc) {
    tile_avx512<MR, NBT>(x, ldx, p, b0, acc);
  }
};

template <template <int, int> class T>
TileFn tile_fn(int mr, int nbt) {
  static const TileFn table[kMR][kNB] = {
      {T<1, 1>::run, T<1, 2>::run, T<1, 3>::run, T<1, 4>::run},
      {T<2, 1>::run, T<2, 2>::run, T<2, 3>::run, T<2, 4>::run},
      {T<3, 1>::run, T<3, 2>::run, T<3, 3>::run, T<3, 4>::run},
      {T<4, 1>::run, T<4, 2>::run, T<4, 3>::run, T<4, 4>::run},
  };
  return table[mr - 1][nbt - 1];
}

template <typename T>
void run(const uint16_t* x, int64_t ldx, const Problem& p, T* out, Path path) {
  const int64_t groups = ceil_div(p.nb, kNB), row_tiles = ceil_div(p.m, kMR);
  // Threads split the output columns (each reads a disjoint part of the weights once); rows
  // are looped inside, so a tile of weights is reused from cache for every row.
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    float acc[kMR * kNB * kRows];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * kNB;
      const int nbt = static_cast<int>(std::min<int64_t>(kNB, p.nb - b0));
      for (int64_t t = 0; t < row_tiles; ++t) {
        const int64_t m0 = t * kMR;
        const int mr = static_cast<int>(std::min<int64_t>(kMR, p.m - m0));
        const uint16_t* xt = x + m0 * ldx;
        if (path == Path::kAvx512Bf16) {
          tile_fn<Bf16Tile>(mr, nbt)(xt, ldx, p, b0, acc);
        } else if (path == Path::kAvx512) {
          tile_fn<Avx512Tile>(mr, nbt)(xt, ldx, p, b0, acc);
        } else {
          tile_scalar(xt, ldx, mr, p, b0, nbt, acc);
        }
        for (int r = 0; r < mr; ++r) {
          for (int64_t n = b0 * kRows; n < std::min<int64_t>(p.n, (b0 + nbt) * kRows); ++n) {
            float y = acc[r * kNB * kRows + (n - b0 * kRows)];
            if (p.bias != nullptr) y += p.bias[n];
            from_float(y, out + (m0 + r) * p.n + n);
          }
        }
      }
    }
  });
}

at::Tensor bf16_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
              "weight must be a bfloat16 [N, K] CPU tensor, got ", weight.scalar_type(), " ",
              weight.sizes());
  at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), nb = ceil_div(n, kRows), kp = ceil_div(k, 2);
  at::Tensor packed = at::zeros({nb, kp, 2 * kRows}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int i = 0; i < kRows && b * kRows + i < n; ++i) {
        const uint16_t* row = src + (b * kRows + i) * k;
        for (int64_t c = 0; c < k; ++c) dst[(b * kp + c / 2) * 32 + 2 * i + c % 2] = row[c];
      }
    }
  });
  return packed;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, "x must be a CPU tensor [..., K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t k = x.size(-1), nb = ceil_div(n, kRows), kp = ceil_div(k, 2);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 && packed.size(0) == nb &&
                  packed.size(1) == kp && packed.size(2) == 2 * kRows && packed.is_contiguous(),
              "packed weight is ", packed.scalar_type(), " ", packed.sizes(), "; for N = ", n,
              ", K = ", k, " bf16_pack gives bfloat16 [", nb, ", ", kp, ", ", 2 * kRows, "]");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [", n, "], got ",
                bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, x.options());
  const int64_t m = n == 0 ? 0 : out.numel() / n;
  if (m == 0) return out;
  // bf16 activations, each row padded to an even length (the last pair's second value 0).
  at::Tensor xb = x.reshape({m, k}).to(at::kBFloat16);
  if (k % 2 != 0) xb = at::constant_pad_nd(xb, {0, 1});
  xb = xb.contiguous();
  Problem p{m, n, k, kp, nb, reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
            b.defined() ? b.data_ptr<float>() : nullptr};
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  const Path path = choose_path();
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run(xp, xb.size(1), p, out.data_ptr<T>(), path);
  });
  return out;
}

std::string bf16_linear_path() {
  switch (choose_path()) {
    case Path::kAvx512Bf16: return "avx512_bf16";
    case Path::kAvx512: return "avx512";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def("bf16_linear_path() -> str", &bf16_linear_path);
  m.def("bf16_pack(Tensor weight) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgl_kernel, CPU, m) {
  m.impl("bf16_pack", &bf16_pack);
  m.impl("bf16_linear", &bf16_linear);
}

}  // namespace sgl_kernel
