// Weight-only int8 linear layers: y = x W^T + b with W kept as int8 per output channel
// (W[n, k] ~ q[n, k] * scales[n]), a quarter of fp32's bytes. At batch 1 a decode step streams
// every weight once, so bytes are time: SmolLM2-135M reads 540 MB per token in fp32, 135 in int8.
//
// The dot products run on integers. Each row of x is quantized on the fly to uint8 with its own
// scale and zero point (asymmetric: 256 levels over [min(x, 0), max(x, 0)], twice finer than
// symmetric int8 for one-sided rows such as SiLU outputs), and AVX512-VNNI's vpdpbusd multiplies
// 64 uint8 x int8 pairs into 16 int32 lanes in one instruction, 4x the multiply-adds of an fp32
// FMA. The zero point comes out afterwards through the weight rows' sums, computed at packing:
//
//   y[m, n] = float(sum_k xq[m, k] q[n, k] - zp[m] * wsum[n]) * (sx[m] * scales[n]) + b[n]
//
// The integer sum is exact, so every path (VNNI, AVX2, scalar) computes the same numbers as the
// torch reference (python/sgl_kernel/quant.py) up to float rounding in that last line.
//
// Why not dequantize int8 -> fp32 and FMA (no activation rounding at all)? At M = 1 both only
// stream the weights, and VNNI still measured 7-15% faster (Xeon Cascade Lake, one thread,
// weights cold, same packed layout; K x N = 576x576, 576x3072, 1536x576, 576x49152:
// VNNI 38 / 189 / 100 / 2834 us, dequant+FMA 43 / 224 / 113 / 3026 us); from M = 2 on, VNNI
// does 4x the multiply-adds per instruction. Software prefetch measured no better than the
// hardware's: each thread reads its blocks as 4 sequential streams.
//
// Packed weights (int8_pack): blocks of 16 output rows, interleaved by 4 K-bytes so that one
// 64-byte line is exactly one vpdpbusd operand (16 rows x 4 bytes), plus one line of row sums:
//
//   packed: int8 [NB = ceil(N / 16), KG + 1, 64],  KG = ceil(K / 4)
//
//   block b, line g < KG  (rows n = 16b .. 16b+15, columns k = 4g .. 4g+3):
//     byte  0       4       8             60      64
//           | q[n0][4g..4g+3] | q[n1][4g..4g+3] | ... | q[n15][4g..4g+3] |
//   block b, line KG: wsum[n0..n15] as 16 native-endian int32 (sum_k q[n][k])
//
// Rows >= N and columns >= K are zero, so padding adds nothing to any sum. Blocks sit one after
// the other, so a thread that owns a range of blocks streams contiguous memory.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "vec.h"

namespace sgl_kernel {
namespace {

constexpr int kRows = 16;     // output rows per packed block
constexpr int kLine = 64;     // bytes per packed line: kRows x 4 K-bytes
constexpr int64_t kMaxK = 65536;  // 255 * 127 * K must fit an int32 accumulator

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- activation quantization (shared math) ---------------------------------------------------
struct RowQuant {
  float scale;  // x ~ (xq - zp) * scale
  float inv;    // 1 / scale: x is multiplied by it, as the reference does
  int32_t zp;
};

// From the row's min and max. Every path calls this, so they agree bit for bit on xq.
RowQuant row_params(float lo, float hi) {
  lo = std::min(lo, 0.f);
  hi = std::max(hi, 0.f);
  float scale = (hi - lo) / 255.f;
  if (scale == 0.f) scale = 1.f;  // an all-zero row
  float inv = 1.f / scale;
  float zp = std::nearbyint(-lo * inv);
  return {scale, inv, static_cast<int32_t>(std::min(std::max(zp, 0.f), 255.f))};
}

inline int32_t quantize_one(float x, const RowQuant& q) {
  int32_t v = static_cast<int32_t>(std::nearbyint(x * q.inv)) + q.zp;
  return std::min(std::max(v, 0), 255);
}

template <typename T>
RowQuant quantize_row_scalar(const T* x, int64_t k, uint8_t* out, int64_t kp) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, to_float(x[i]));
    hi = std::max(hi, to_float(x[i]));
  }
  RowQuant q = row_params(lo, hi);
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<uint8_t>(quantize_one(to_float(x[i]), q));
  std::fill(out + k, out + kp, 0);
  return q;
}

// y for one (row, block) from its 16 integer dot products; rows past N (n_valid) are skipped.
template <typename T>
void finish16_scalar(const int32_t* acc, const int32_t* wsum, const float* scales,
                     const float* bias, const RowQuant& q, T* out, int n_valid) {
  for (int r = 0; r < n_valid; ++r) {
    float y = static_cast<float>(acc[r] - q.zp * wsum[r]) * (q.scale * scales[r]);
    if (bias != nullptr) y += bias[r];
    from_float(y, out + r);
  }
}

const int32_t* block_wsum(const int8_t* block, int64_t kg) {
  return reinterpret_cast<const int32_t*>(block + kg * kLine);
}

// ---- scalar ------------------------------------------------------------------------------------
void dot_block_scalar(const uint8_t* xq, const int8_t* w, int64_t kg, int32_t* acc) {
  std::fill(acc, acc + kRows, 0);
  for (int64_t g = 0; g < kg; ++g) {
    const int8_t* line = w + g * kLine;
    for (int r = 0; r < kRows; ++r) {
      for (int t = 0; t < 4; ++t) acc[r] += xq[4 * g + t] * line[4 * r + t];
    }
  }
}

// ---- AVX2: vpmaddwd on int16 --------------------------------------------------------------
// vpmaddubsw (uint8 x int8) would be the direct analogue of vpdpbusd, but it saturates its int16
// pair sums (255 * 127 * 2 > 32767); widening both sides to int16 and using vpmaddwd keeps the
// same exact integer math. Activations are stored as int16 for this path.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
template <typename T>
RowQuant quantize_row_avx2(const T* x, int64_t k, int16_t* out, int64_t kp) {
  using namespace avx2;
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kWidth <= k; i += kWidth) {
    __m256 v = load(x + i);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float lo8[kWidth], hi8[kWidth];
  _mm256_store_ps(lo8, vlo);
  _mm256_store_ps(hi8, vhi);
  float lo = *std::min_element(lo8, lo8 + kWidth), hi = *std::max_element(hi8, hi8 + kWidth);
  for (int64_t j = i; j < k; ++j) {
    lo = std::min(lo, to_float(x[j]));
    hi = std::max(hi, to_float(x[j]));
  }
  RowQuant q = row_params(lo, hi);
  __m256 inv = _mm256_set1_ps(q.inv);
  __m256i zp = _mm256_set1_epi32(q.zp), zero = _mm256_setzero_si256();
  __m256i top = _mm256_set1_epi32(255);
  for (i = 0; i + kWidth <= k; i += kWidth) {
    __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load(x + i), inv)), zp);
    v = _mm256_min_epi32(_mm256_max_epi32(v, zero), top);
    // packus works per 128-bit lane; the permute gathers the two lanes' halves into the low one.
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(packed));
  }
  for (; i < k; ++i) out[i] = static_cast<int16_t>(quantize_one(to_float(x[i]), q));
  std::fill(out + k, out + kp, 0);
  return q;
}

// MR rows of x against one 16-row block. A line's 16 bytes (4 rows x 4 k) widen to 16 int16;
// vpmaddwd with x[4g..4g+3] broadcast gives [r0 k01, r0 k23, r1 k01, r1 k23 | r2 .., r3 ..].
// NOTE: MR <= 3 keeps the 4 MR accumulators, MR activations and one weight line in 16 ymm.
template <int MR>
void dot_block_avx2(const int16_t* xq, int64_t ldx, const int8_t* w, int64_t kg, int32_t* acc) {
  __m256i c[MR][4];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < 4; ++j) c[i][j] = _mm256_setzero_si256();
  }
  for (int64_t g = 0; g < kg; ++g) {
    __m256i a[MR];
    for (int i = 0; i < MR; ++i) {
      int64_t four;
      std::memcpy(&four, xq + i * ldx + 4 * g, sizeof(four));
      a[i] = _mm256_set1_epi64x(four);
    }
    for (int j = 0; j < 4; ++j) {
      __m256i b = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * kLine + 16 * j)));
      for (int i = 0; i < MR; ++i) c[i][j] = _mm256_add_epi32(c[i][j], _mm256_madd_epi16(b, a[i]));
    }
  }
  for (int i = 0; i < MR; ++i) {
    // hadd of rows 0-3 and 4-7 gives [r0 r1 r4 r5 | r2 r3 r6 r7]; the permute orders them.
    __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[i][0], c[i][1]), 0xD8);
    __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[i][2], c[i][3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * kRows), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * kRows + 8), hi);
  }
}
#pragma GCC pop_options

// ---- AVX-512 VNNI -----------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2")
template <typename T>
RowQuant quantize_row_vnni(const T* x, int64_t k, uint8_t* out, int64_t kp) {
  using namespace avx512;
  // Masked loads fill the tail with zeros, which the range includes anyway.
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += kWidth) {
    __mmask16 m = i + kWidth <= k ? 0xffff : tail_mask(static_cast<int>(k - i));
    __m512 v = load(x + i, m);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  RowQuant q = row_params(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi));
  __m512 inv = _mm512_set1_ps(q.inv);
  __m512i zp = _mm512_set1_epi32(q.zp), zero = _mm512_setzero_si512();
  __m512i top = _mm512_set1_epi32(255);
  for (int64_t i = 0; i < k; i += kWidth) {
    __mmask16 m = i + kWidth <= k ? 0xffff : tail_mask(static_cast<int>(k - i));
    __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load(x + i, m), inv)), zp);
    v = _mm512_min_epi32(_mm512_max_epi32(v, zero), top);
    _mm512_mask_cvtepi32_storeu_epi8(out + i, m, v);
  }
  std::fill(out + k, out + kp, 0);
  return q;
}

// MR rows of x against NB consecutive 16-row blocks (ldw bytes apart): MR x NB accumulators,
// each weight line loaded once and used MR times. MR = 6, NB = 4 fills 24 of the 32 zmm.
template <int MR, int NB>
void dot_tile_vnni(const uint8_t* xq, int64_t ldx, const int8_t* w, int64_t ldw, int64_t kg,
                   int32_t* acc) {
  __m512i c[MR][NB];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NB; ++j) c[i][j] = _mm512_setzero_si512();
  }
  for (int64_t g = 0; g < kg; ++g) {
    __m512i b[NB];
    for (int j = 0; j < NB; ++j) b[j] = _mm512_loadu_si512(w + j * ldw + g * kLine);
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, xq + i * ldx + 4 * g, sizeof(four));
      __m512i a = _mm512_set1_epi32(four);
      for (int j = 0; j < NB; ++j) c[i][j] = _mm512_dpbusd_epi32(c[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NB; ++j) _mm512_storeu_si512(acc + (i * NB + j) * kRows, c[i][j]);
  }
}

template <typename T>
void finish16_vnni(const int32_t* acc, const int32_t* wsum, const float* scales, const float* bias,
                   const RowQuant& q, T* out, int n_valid) {
  __mmask16 m = n_valid >= kRows ? 0xffff : avx512::tail_mask(n_valid);
  __m512i a = _mm512_loadu_si512(acc);
  a = _mm512_sub_epi32(a, _mm512_mullo_epi32(_mm512_set1_epi32(q.zp), _mm512_loadu_si512(wsum)));
  __m512 s = _mm512_mul_ps(_mm512_set1_ps(q.scale), _mm512_maskz_loadu_ps(m, scales));
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(a), s);
  if (bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, bias));
  avx512::store(out, y, m);
}
#pragma GCC pop_options

// ---- driver ------------------------------------------------------------------------------------
enum class Path { kScalar, kAvx2, kVnni };

// VNNI needs AVX512-VNNI on top of AVX-512 (Skylake-X has AVX-512 without it: AVX2 path there).
Path choose_path() {
  if (has_avx512_vnni()) return Path::kVnni;
  return cpu_isa() >= Isa::kAvx2 ? Path::kAvx2 : Path::kScalar;
}

struct Problem {
  int64_t m, n, k, kg, nb, ldw;  // ldw: bytes per packed block
  const int8_t* w;
  const float* scales;
  const float* bias;  // may be null
};

// Quantizes all rows of x (into xq, row stride kp = 4 KG) before any dot product.
template <typename T, typename Q, typename F>
std::vector<RowQuant> quantize_rows(const T* x, const Problem& p, Q* xq, F&& quantize_row) {
  std::vector<RowQuant> rq(p.m);
  int64_t kp = 4 * p.kg;
  int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.k, 1));
  at::parallel_for(0, p.m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rq[r] = quantize_row(x + r * p.k, p.k, xq + r * kp, kp);
  });
  return rq;
}

// Calls tile(b, nb, m, mr) over the whole output, tile (b, m) covering output rows of blocks
// b .. b+nb-1 (nb <= group) for rows m .. m+mr-1 of x (mr <= mr_max).
//
// Threads split the 16-row blocks. Each walks its blocks in groups (64 output rows: at most 64 x K
// bytes, L2-resident for K up to several thousand) and, per group, every tile of rows of x. Rows
// of x go in chunks of about kChunkBytes of quantized activations, so that a chunk stays in L2
// while all the groups pass over it; each further chunk re-reads the weights (from L3 except for
// the LM head). Measured at M = 1024, one thread, K x N = 576 x 3072: 21-22 ms in chunks, 22-36
// ms without (other SmolLM2 shapes: the same within noise).
constexpr int64_t kChunkBytes = 128 << 10;

template <typename F>
void for_each_tile(const Problem& p, int64_t x_row_bytes, int group, int mr_max, F&& tile) {
  int64_t m_chunk = std::max<int64_t>(mr_max, kChunkBytes / x_row_bytes / mr_max * mr_max);
  at::parallel_for(0, p.nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m_lo = 0; m_lo < p.m; m_lo += m_chunk) {
      int64_t m_hi = std::min(p.m, m_lo + m_chunk);
      for (int64_t b = b0; b < b1; b += group) {
        int nb = static_cast<int>(std::min<int64_t>(group, b1 - b));
        for (int64_t m = m_lo; m < m_hi; m += mr_max) {
          tile(b, nb, m, static_cast<int>(std::min<int64_t>(mr_max, m_hi - m)));
        }
      }
    }
  });
}

// Calls f(std::integral_constant<int, v>) for the run-time v in 1..kMax: a tile's rows (and
// blocks) are template parameters, so its accumulators can live in registers.
template <int kMax, typename F>
void with_const(int v, F&& f) {
  if constexpr (kMax >= 1) {
    if (v == kMax) {
      f(std::integral_constant<int, kMax>{});
    } else {
      with_const<kMax - 1>(v, f);
    }
  }
}

// Output rows [n0, n0 + 16) of one block; the last block may hold fewer than 16 real rows.
struct BlockOut {
  const int32_t* wsum;
  const float* scales;
  const float* bias;
  int n_valid;
};

BlockOut block_out(const Problem& p, int64_t b) {
  int64_t n0 = b * kRows;
  return {block_wsum(p.w + b * p.ldw, p.kg), p.scales + n0, p.bias ? p.bias + n0 : nullptr,
          static_cast<int>(std::min<int64_t>(kRows, p.n - n0))};
}

template <typename T>
void run_vnni(const T* x, const Problem& p, T* out) {
  int64_t kp = 4 * p.kg;
  std::vector<uint8_t> xq(p.m * kp);
  std::vector<RowQuant> rq = quantize_rows(x, p, xq.data(), quantize_row_vnni<T>);
  for_each_tile(p, kp, 4, 6, [&](int64_t b, int nb, int64_t m, int mr) {
    alignas(64) int32_t acc[6 * 4 * kRows];
    with_const<6>(mr, [&](auto mr_c) {
      with_const<4>(nb, [&](auto nb_c) {
        dot_tile_vnni<decltype(mr_c)::value, decltype(nb_c)::value>(
            xq.data() + m * kp, kp, p.w + b * p.ldw, p.ldw, p.kg, acc);
      });
    });
    for (int i = 0; i < mr; ++i) {
      for (int j = 0; j < nb; ++j) {
        BlockOut o = block_out(p, b + j);
        finish16_vnni(acc + (i * nb + j) * kRows, o.wsum, o.scales, o.bias, rq[m + i],
                      out + (m + i) * p.n + (b + j) * kRows, o.n_valid);
      }
    }
  });
}

template <typename T>
void run_avx2(const T* x, const Problem& p, T* out) {
  int64_t kp = 4 * p.kg;
  std::vector<int16_t> xq(p.m * kp);
  std::vector<RowQuant> rq = quantize_rows(x, p, xq.data(), quantize_row_avx2<T>);
  for_each_tile(p, 2 * kp, 1, 3, [&](int64_t b, int, int64_t m, int mr) {
    int32_t acc[3 * kRows];
    with_const<3>(mr, [&](auto mr_c) {
      dot_block_avx2<decltype(mr_c)::value>(xq.data() + m * kp, kp, p.w + b * p.ldw, p.kg, acc);
    });
    BlockOut o = block_out(p, b);
    for (int i = 0; i < mr; ++i) {
      finish16_scalar(acc + i * kRows, o.wsum, o.scales, o.bias, rq[m + i],
                      out + (m + i) * p.n + b * kRows, o.n_valid);
    }
  });
}

template <typename T>
void run_scalar(const T* x, const Problem& p, T* out) {
  int64_t kp = 4 * p.kg;
  std::vector<uint8_t> xq(p.m * kp);
  std::vector<RowQuant> rq = quantize_rows(x, p, xq.data(), quantize_row_scalar<T>);
  for_each_tile(p, kp, 1, 1, [&](int64_t b, int, int64_t m, int) {
    int32_t acc[kRows];
    dot_block_scalar(xq.data() + m * kp, p.w + b * p.ldw, p.kg, acc);
    BlockOut o = block_out(p, b);
    finish16_scalar(acc, o.wsum, o.scales, o.bias, rq[m], out + m * p.n + b * kRows, o.n_valid);
  });
}

// ---- ops ---------------------------------------------------------------------------------------
at::Tensor int8_pack(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.device().is_cpu(),
              "qweight must be an int8 [N, K] CPU tensor, got ", qweight.scalar_type(), " ",
              qweight.sizes());
  at::Tensor q = qweight.contiguous();
  int64_t n = q.size(0), k = q.size(1), nb = ceil_div(n, kRows), kg = ceil_div(k, 4);
  at::Tensor packed = at::zeros({nb, kg + 1, kLine}, q.options());
  const int8_t* src = q.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int8_t* block = dst + b * (kg + 1) * kLine;
      for (int r = 0; r < kRows && b * kRows + r < n; ++r) {
        const int8_t* row = src + (b * kRows + r) * k;
        for (int64_t g = 0; g < k / 4; ++g) std::memcpy(block + g * kLine + 4 * r, row + 4 * g, 4);
        for (int64_t c = k / 4 * 4; c < k; ++c) block[(c / 4) * kLine + 4 * r + c % 4] = row[c];
        int32_t sum = 0;
        for (int64_t c = 0; c < k; ++c) sum += row[c];
        std::memcpy(block + kg * kLine + 4 * r, &sum, sizeof(sum));
      }
    }
  });
  return packed;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, "x must be a CPU tensor [..., K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat,
              "scales must be float32 [N], got ", scales.scalar_type(), " ", scales.sizes());
  int64_t k = x.size(-1), n = scales.size(0);
  TORCH_CHECK(k <= kMaxK, "K = ", k, " exceeds ", kMaxK, " (the int32 accumulators would overflow)");
  // A plain [N, K] weight is packed on every call (tests, one-offs); layers pack once at load.
  at::Tensor packed = qweight.dim() == 2 ? int8_pack(qweight) : qweight.contiguous();
  if (qweight.dim() == 2) {
    TORCH_CHECK(qweight.size(0) == n && qweight.size(1) == k, "qweight is ", qweight.sizes(),
                "; expected [", n, ", ", k, "] from scales and x");
  }
  int64_t nb = ceil_div(n, kRows), kg = ceil_div(k, 4);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(0) == nb &&
                  packed.size(1) == kg + 1 && packed.size(2) == kLine,
              "packed qweight is ", packed.sizes(), "; for N = ", n, ", K = ", k, " int8_pack gives [",
              nb, ", ", kg + 1, ", ", kLine, "]");
  at::Tensor s = scales.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [", n, "], got ",
                bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor xc = x.contiguous();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, x.options());
  int64_t m = n == 0 ? 0 : out.numel() / n;
  if (m == 0 || n == 0) return out.zero_();
  Problem p{m, n, k, kg, nb, (kg + 1) * kLine, packed.data_ptr<int8_t>(), s.data_ptr<float>(),
            b.defined() ? b.data_ptr<float>() : nullptr};
  Path path = choose_path();
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (path == Path::kVnni) {
      run_vnni(xp, p, op);
    } else if (path == Path::kAvx2) {
      run_avx2(xp, p, op);
    } else {
      run_scalar(xp, p, op);
    }
  });
  return out;
}

// Which kernel int8_linear runs in this process, for tests and benchmarks (the ISA, and with it
// the path, is fixed per process).
std::string int8_linear_path() {
  switch (choose_path()) {
    case Path::kVnni: return "avx512_vnni";
    case Path::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def("int8_linear_path() -> str", &int8_linear_path);  // no tensors: one kernel for all keys
  m.def("int8_pack(Tensor qweight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgl_kernel, CPU, m) {
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace sgl_kernel
