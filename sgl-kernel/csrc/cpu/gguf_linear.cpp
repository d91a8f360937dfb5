// Linear layers computed straight from GGUF's quantized blocks (Q4_0, Q4_1, Q8_0): y = x W^T + b
// where W is never dequantized to float. A GGUF file stores each weight row as K / 32 blocks of
// 32 weights, each block with its own fp16 scale d (and for Q4_1 an fp16 offset m):
//
//   Q4_0, 18 bytes: d, qs[16]   w[j] = d * (lo(qs[j]) - 8),  w[j + 16] = d * (hi(qs[j]) - 8)
//   Q4_1, 20 bytes: d, m, qs[16] w[j] = d * lo(qs[j]) + m,    w[j + 16] = d * hi(qs[j]) + m
//   Q8_0, 34 bytes: d, qs[32]   w[j] = d * qs[j]                         (qs int8)
//
// At batch 1 a decode step streams every weight once, so bytes are time: Q4 reads 0.56-0.63 bytes
// per weight, Q8_0 1.06, fp32 4.
//
// The dot products run on integers, as in int8_linear.cpp. Each row of x is quantized on the fly
// per 32-block to int8, symmetric (dx = max|x| / 127, xq = round-half-even(x / dx), an all-zero
// block gets dx = 1), keeping each block's sum sx = sum xq. With u the stored unsigned weight
// byte (a nibble for Q4, q ^ 0x80 = q + 128 for Q8_0) and dot = sum_j u[j] xq[j], exact in int32:
//
//   Q4_0: y += d dx (dot - 8 sx)    Q8_0: y += d dx (dot - 128 sx)    Q4_1: y += d dx dot + m dx sx
//
// summed over the blocks in float32. Unsigned weights are what AVX512-VNNI's vpdpbusd wants as its
// uint8 operand (64 u8 x s8 pairs into 16 int32 lanes); the offsets 8 and 128 come out through the
// activations' block sums. Every path (VNNI, AVX2, scalar) computes the same integers, so they and
// the torch reference (python/sgl_kernel/gguf.py) differ only by float rounding.
//
// Packed weights (gguf_pack): groups of 16 output rows. Each GGUF block of the 16 rows becomes
// L 64-byte lines of 16 rows x 4 bytes (one vpdpbusd operand each; L = 4 for Q4, 8 for Q8_0) and
// S bytes of scales (S = 32: d of the 16 rows; Q4_1 S = 64: d, then m). The bytes are GGUF's own,
// moved but not changed (Q8_0's are XORed with 0x80); the scales stay fp16, widened in registers
// (vcvtph2ps). Blocks go in units of U = 64 / S (2 for Q4_0 and Q8_0, 1 for Q4_1): the unit's
// blocks' lines, then one line of their scales, so that a group is one sequential read:
//
//   packed: uint8 [NG = ceil(N / 16), KB * L + ceil(KB / U), 64],  KB = K / 32
//
//   group g (rows n = 16g .. 16g+15), unit u (blocks U u .. U u + U - 1):
//     | lines of block U u | lines of block U u + 1 (U = 2) | scale line |
//   line j of block kb:
//     byte  0                  4                      60                  64
//           | qs[n0][4j..4j+3] | qs[n1][4j..4j+3] | ... | qs[n15][4j..4j+3] |
//     Q4: low nibbles are weights k = 32 kb + 4j .. +3, high nibbles k + 16 (GGUF's order), so
//         line & 0x0F and line & 0xF0 (16 x high) are two vpdpbusd operands; j < 4.
//     Q8_0: weights k = 32 kb + 4j .. +3, stored q ^ 0x80; j < 8.
//   scale line, the unit's i-th block at byte S i:
//     | d[n0..n15] fp16 (32 bytes) | m[n0..n15] fp16 (Q4_1 only) |
//   NOTE: with KB odd, the last unit of Q4_0 / Q8_0 holds one block, and half its scale line is 0.
//
// Rows >= N are zero (d = 0, so they add nothing). Groups sit one after the other, so a thread
// that owns a range of groups streams contiguous memory.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "vec.h"

namespace sgl_kernel {
namespace {

constexpr int kRows = 16;   // output rows per packed group
constexpr int kLine = 64;   // bytes per packed line: kRows x 4 bytes
constexpr int kBlock = 32;  // weights per GGUF block

// ggml's type ids, as in a GGUF file's tensor info.
constexpr int64_t kQ4_0 = 2;
constexpr int64_t kQ4_1 = 3;
constexpr int64_t kQ8_0 = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Format {
  const char* name;
  int block_bytes;  // one GGUF block (32 weights) of one row
  int lines;        // packed lines per block of 16 rows
  int scale_bytes;  // packed scale bytes per block of 16 rows
};

template <int64_t Q>
constexpr Format kFormat = Q == kQ4_0   ? Format{"Q4_0", 18, 4, 32}
                           : Q == kQ4_1 ? Format{"Q4_1", 20, 4, 64}
                                        : Format{"Q8_0", 34, 8, 32};

Format format_of(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return kFormat<kQ4_0>;
    case kQ4_1: return kFormat<kQ4_1>;
    case kQ8_0: return kFormat<kQ8_0>;
    default:
      TORCH_CHECK(false, "GGUF type ", qtype, " is not supported; supported: Q4_0 (", kQ4_0,
                  "), Q4_1 (", kQ4_1, "), Q8_0 (", kQ8_0, ")");
  }
}

// Calls f(std::integral_constant<int64_t, Q>) for the run-time qtype (checked before).
template <typename F>
void dispatch_qtype(int64_t qtype, F&& f) {
  if (qtype == kQ4_0) {
    f(std::integral_constant<int64_t, kQ4_0>{});
  } else if (qtype == kQ4_1) {
    f(std::integral_constant<int64_t, kQ4_1>{});
  } else {
    f(std::integral_constant<int64_t, kQ8_0>{});
  }
}

int64_t group_lines(const Format& f, int64_t kb) {
  return kb * f.lines + ceil_div(kb * f.scale_bytes, kLine);
}

// Where block kb (of kbs) sits in a packed group: the byte offsets of its quant lines and of its
// scales (see the layout at the top).
struct BlockAt {
  int64_t lines, scales;
};

template <int64_t Q>
BlockAt block_at(int64_t kb, int64_t kbs) {
  constexpr Format f = kFormat<Q>;
  constexpr int64_t kUnit = kLine / f.scale_bytes, kQuantBytes = f.lines * kLine;
  int64_t first = kb / kUnit * kUnit, in_unit = std::min(kUnit, kbs - first);
  int64_t unit = first * kQuantBytes + first / kUnit * kLine;
  return {unit + (kb - first) * kQuantBytes,
          unit + in_unit * kQuantBytes + (kb - first) * f.scale_bytes};
}

float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// ---- activation quantization (shared math) ---------------------------------------------------
// Rows of x, quantized per 32-block: x[m, 32 b + j] ~ q[m, 32 b + j] * d[m, b].
template <typename Q>  // int8_t, or int16_t for the AVX2 path (its multiplies take int16)
struct Activations {
  std::vector<Q> q;          // [M, K]
  std::vector<float> d;      // [M, KB]
  std::vector<int32_t> sum;  // [M, KB]: sum of the block's q
};

// Every path calls these, so they agree bit for bit on q (x / d is correctly rounded everywhere).
inline float block_scale(float amax) {
  float d = amax / 127.f;
  return d == 0.f ? 1.f : d;  // an all-zero block (or one so small that d underflows to 0)
}

// NOTE: the clamp only matters when d is subnormal and x / d overshoots 127 by rounding.
inline int32_t quantize_one(float x, float d) {
  float v = std::nearbyint(x / d);
  return static_cast<int32_t>(std::min(std::max(v, -127.f), 127.f));
}

template <typename T, typename Q>
float quantize_block_scalar(const T* x, Q* q, int32_t* sum) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(to_float(x[j])));
  float d = block_scale(amax);
  int32_t s = 0;
  for (int j = 0; j < kBlock; ++j) {
    q[j] = static_cast<Q>(quantize_one(to_float(x[j]), d));
    s += q[j];
  }
  *sum = s;
  return d;
}

// ---- scalar ------------------------------------------------------------------------------------
// The integer dot products of one row of x with one block of 16 rows (what one vpdpbusd chain
// computes), in the packed layout.
template <int64_t Q>
void dot_block_scalar(const int8_t* x, const uint8_t* lines, int32_t* dot) {
  std::fill(dot, dot + kRows, 0);
  for (int j = 0; j < kFormat<Q>.lines; ++j) {
    const uint8_t* line = lines + j * kLine;
    for (int r = 0; r < kRows; ++r) {
      for (int t = 0; t < 4; ++t) {
        uint8_t u = line[4 * r + t];
        if constexpr (Q == kQ8_0) {
          dot[r] += u * x[4 * j + t];
        } else {
          dot[r] += (u & 0xF) * x[4 * j + t] + (u >> 4) * x[16 + 4 * j + t];
        }
      }
    }
  }
}

// y += the block's term (see the top of the file) for 16 rows of W and one row of x.
template <int64_t Q>
void add_block_scalar(const int32_t* dot, const uint8_t* scales, float dx, int32_t sx, float* y) {
  for (int r = 0; r < kRows; ++r) {
    float dw = half_to_float(scales + 2 * r) * dx;
    if constexpr (Q == kQ4_1) {
      y[r] += dw * static_cast<float>(dot[r]) + half_to_float(scales + 32 + 2 * r) * (dx * sx);
    } else {
      y[r] += dw * static_cast<float>(dot[r] - (Q == kQ4_0 ? 8 : 128) * sx);
    }
  }
}

// ---- AVX2: vpmaddwd on int16 ------------------------------------------------------------------
// As in int8_linear.cpp: vpmaddubsw would saturate its int16 pair sums (255 * 127 * 2 > 32767),
// so both sides widen to int16 and vpmaddwd keeps the integer math exact. F16C (vcvtph2ps) comes
// with every CPU that has AVX2 and FMA.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
template <typename T>
float quantize_block_avx2(const T* x, int16_t* q, int32_t* sum) {
  using namespace avx2;
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load(x + i * kWidth);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float d = block_scale(_mm_cvtss_f32(m4));
  __m256 vd = _mm256_set1_ps(d);
  __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127), s = _mm256_setzero_si256();
  for (int i = 0; i < 4; i += 2) {
    __m256i a = _mm256_cvtps_epi32(_mm256_div_ps(v[i], vd));
    __m256i b = _mm256_cvtps_epi32(_mm256_div_ps(v[i + 1], vd));
    a = _mm256_min_epi32(_mm256_max_epi32(a, lo), hi);
    b = _mm256_min_epi32(_mm256_max_epi32(b, lo), hi);
    s = _mm256_add_epi32(s, _mm256_add_epi32(a, b));
    // packs works per 128-bit lane; the permute puts the 16 values back in order.
    __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kWidth), ab);
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  s4 = _mm_hadd_epi32(s4, s4);
  *sum = _mm_cvtsi128_si32(s4);
  return d;
}

inline __m256i broadcast4(const int16_t* x) {
  int64_t four;
  std::memcpy(&four, x, sizeof(four));
  return _mm256_set1_epi64x(four);
}

// MR rows of x against one group of 16 rows, all KB blocks; y: float [MR][16].
// A line's 16 bytes at 16c (rows 4c .. 4c+3 x 4 k) widen to 16 int16; vpmaddwd with x's 4 values
// broadcast gives [r0 k01, r0 k23, r1 k01, r1 k23 | r2 .., r3 ..]. Rows go in halves of 8 so that
// a hadd of two such accumulators gives 8 rows' dot products.
template <int64_t Q, int MR>
void dot_group_avx2(const Activations<int16_t>& a, int64_t m, int64_t k, int64_t kbs,
                    const uint8_t* w, float* y) {
  constexpr Format f = kFormat<Q>;
  const __m256i low4 = _mm256_set1_epi16(0xF);
  std::fill(y, y + MR * kRows, 0.f);
  for (int64_t kb = 0; kb < kbs; ++kb) {
    BlockAt at = block_at<Q>(kb, kbs);
    const uint8_t *lines = w + at.lines, *s = w + at.scales;
    const int16_t* x = a.q.data() + m * k + kb * kBlock;
    for (int h = 0; h < 2; ++h) {
      __m256i c[MR][2];
      for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_si256();
      for (int j = 0; j < f.lines; ++j) {
        for (int t = 0; t < 2; ++t) {
          __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(
              reinterpret_cast<const __m128i*>(lines + j * kLine + 16 * (2 * h + t))));
          for (int i = 0; i < MR; ++i) {
            const int16_t* xi = x + i * k;
            if constexpr (Q == kQ8_0) {
              c[i][t] = _mm256_add_epi32(c[i][t], _mm256_madd_epi16(u, broadcast4(xi + 4 * j)));
            } else {
              __m256i lo = _mm256_madd_epi16(_mm256_and_si256(u, low4), broadcast4(xi + 4 * j));
              __m256i hi = _mm256_madd_epi16(_mm256_srli_epi16(u, 4), broadcast4(xi + 16 + 4 * j));
              c[i][t] = _mm256_add_epi32(c[i][t], _mm256_add_epi32(lo, hi));
            }
          }
        }
      }
      __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * h)));
      for (int i = 0; i < MR; ++i) {
        // hadd gives [r0 r1 r4 r5 | r2 r3 r6 r7]; the permute orders them.
        __m256i dot = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[i][0], c[i][1]), 0xD8);
        float dx = a.d[(m + i) * kbs + kb];
        int32_t sx = a.sum[(m + i) * kbs + kb];
        float* yi = y + i * kRows + 8 * h;
        __m256 acc = _mm256_loadu_ps(yi);
        __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
        if constexpr (Q == kQ4_1) {
          __m256 mw = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32 + 16 * h)));
          acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc);
          acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(dx * sx), acc);
        } else {
          __m256i off = _mm256_set1_epi32((Q == kQ4_0 ? 8 : 128) * sx);
          acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, off)), acc);
        }
        _mm256_storeu_ps(yi, acc);
      }
    }
  }
}
#pragma GCC pop_options

// ---- AVX-512 VNNI -----------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2,f16c")
template <typename T>
float quantize_block_vnni(const T* x, int8_t* q, int32_t* sum) {
  using namespace avx512;
  __m512 v0 = load(x), v1 = load(x + kWidth);
  float d = block_scale(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))));
  __m512 vd = _mm512_set1_ps(d);
  __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  auto quantize = [&](__m512 v) {
    return _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_div_ps(v, vd)), lo), hi);
  };
  __m512i q0 = quantize(v0), q1 = quantize(v1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + kWidth), _mm512_cvtepi32_epi8(q1));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  return d;
}

inline __m512i broadcast4(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof(four));
  return _mm512_set1_epi32(four);
}

// MR rows of x against NB consecutive groups of 16 rows (ldw bytes apart), all KB blocks;
// y: float [MR][NB][16]. Per block, int32 accumulators (one zmm each: 16 rows) take the block's
// vpdpbusd chain, then are scaled into MR x NB float accumulators; each weight line is loaded
// (and for Q4 split into its nibble operands) once and used MR times.
//
// Q4's high nibbles are taken in place, as 16 x hi (line & 0xF0), into accumulators of their
// own, divided by 16 (exactly) at the end of the block: one logic op per operand instead of a
// shift and an and, since shifts and vpdpbusd compete for the same port.
//
// Unlike int8_linear (whose hardware prefetch measured as good as software's), each line is
// prefetched kPrefetchBytes ahead in its group: Q4 does ~3x int8's work per weight byte, so fewer
// bytes are in flight from the out-of-order window alone. Measured at M = 1, 2 threads, LM head
// 576 x 49152 from memory: Q4_1 13-16 GB/s without, 17-18 with 512 bytes, 16-17 with 256 (int8:
// 19-20); Q8_0 15-17 -> 18-19.
constexpr int kPrefetchBytes = 512;

template <int64_t Q>
constexpr int kAccsPerTile = Q == kQ8_0 ? 2 : 3;  // zmm per (row, group): int (lo, hi), float

// Whether an MR x NB tile keeps its accumulators, weight operands and broadcasts in 32 zmm.
template <int64_t Q, int MR, int NB>
constexpr bool kFits = MR * NB * kAccsPerTile<Q> + NB * (Q == kQ8_0 ? 1 : 2) + 3 <= 32;

template <int64_t Q, int MR, int NB>
void dot_tile_vnni(const Activations<int8_t>& a, int64_t m, int64_t k, int64_t kbs,
                   const uint8_t* w, int64_t ldw, float* y) {
  constexpr Format f = kFormat<Q>;
  constexpr bool kQ4 = Q != kQ8_0;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t kb = 0; kb < kbs; ++kb) {
    BlockAt at = block_at<Q>(kb, kbs);
    const uint8_t *lines = w + at.lines, *s = w + at.scales;
    const int8_t* x = a.q.data() + m * k + kb * kBlock;
    __m512i c[MR][NB], h[MR][NB];  // h: Q4's 16 x high-nibble sums
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NB; ++j) c[i][j] = h[i][j] = _mm512_setzero_si512();
    }
    for (int l = 0; l < f.lines; ++l) {
      __m512i lo[NB], hi[NB];
      for (int j = 0; j < NB; ++j) {
        lo[j] = _mm512_loadu_si512(lines + j * ldw + l * kLine);
        _mm_prefetch(reinterpret_cast<const char*>(lines + j * ldw + l * kLine + kPrefetchBytes),
                     _MM_HINT_T0);
        if constexpr (kQ4) {
          hi[j] = _mm512_andnot_si512(low4, lo[j]);
          lo[j] = _mm512_and_si512(lo[j], low4);
        }
      }
      for (int i = 0; i < MR; ++i) {
        __m512i xlo = broadcast4(x + i * k + 4 * l);
        for (int j = 0; j < NB; ++j) c[i][j] = _mm512_dpbusd_epi32(c[i][j], lo[j], xlo);
        if constexpr (kQ4) {
          __m512i xhi = broadcast4(x + i * k + 16 + 4 * l);
          for (int j = 0; j < NB; ++j) h[i][j] = _mm512_dpbusd_epi32(h[i][j], hi[j], xhi);
        }
      }
    }
    __m512 dw[NB], mw[NB];
    for (int j = 0; j < NB; ++j) {
      dw[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j * ldw)));
      if constexpr (Q == kQ4_1) {
        mw[j] = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j * ldw + 32)));
      }
    }
    for (int i = 0; i < MR; ++i) {
      float dx = a.d[(m + i) * kbs + kb];
      int32_t sx = a.sum[(m + i) * kbs + kb];
      __m512 vdx = _mm512_set1_ps(dx);
      for (int j = 0; j < NB; ++j) {
        __m512i dot = c[i][j];
        if constexpr (kQ4) dot = _mm512_add_epi32(dot, _mm512_srai_epi32(h[i][j], 4));
        __m512 scale = _mm512_mul_ps(dw[j], vdx);
        if constexpr (Q == kQ4_1) {
          acc[i][j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(mw[j], _mm512_set1_ps(dx * sx), acc[i][j]);
        } else {
          dot = _mm512_sub_epi32(dot, _mm512_set1_epi32((Q == kQ4_0 ? 8 : 128) * sx));
          acc[i][j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(y + (i * NB + j) * kRows, acc[i][j]);
  }
}

template <typename T>
void finish16_vnni(const float* y, const float* bias, T* out, int n_valid) {
  __mmask16 m = n_valid >= kRows ? 0xffff : avx512::tail_mask(n_valid);
  __m512 v = _mm512_loadu_ps(y);
  if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias));
  avx512::store(out, v, m);
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
  int64_t m, n, k, kb, ng, ldw;  // kb: blocks per row (K / 32); ldw: bytes per packed group
  const uint8_t* w;
  const float* bias;  // may be null
};

// Quantizes all rows of x, block by block, before any dot product.
template <typename T, typename Q, typename F>
Activations<Q> quantize_rows(const T* x, const Problem& p, F&& quantize_block) {
  Activations<Q> a{std::vector<Q>(p.m * p.k), std::vector<float>(p.m * p.kb),
                   std::vector<int32_t>(p.m * p.kb)};
  int64_t grain = std::max<int64_t>(1, 16384 / p.k);
  at::parallel_for(0, p.m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < p.kb; ++b) {
        int64_t i = r * p.kb + b;
        a.d[i] = quantize_block(x + i * kBlock, a.q.data() + i * kBlock, &a.sum[i]);
      }
    }
  });
  return a;
}

// Calls tile(g, ng, m, mr) over the whole output, tile (g, m) covering output rows of groups
// g .. g+ng-1 (ng <= group) for rows m .. m+mr-1 of x (mr <= mr_max).
//
// As in int8_linear.cpp: threads split the 16-row groups; each walks its groups in runs of
// `group` and, per run, every tile of rows of x, taking rows of x in chunks of about kChunkBytes
// of quantized activations so that a chunk stays in L2 while the runs pass over it.
constexpr int64_t kChunkBytes = 128 << 10;

template <typename F>
void for_each_tile(const Problem& p, int64_t x_row_bytes, int group, int mr_max, F&& tile) {
  int64_t m_chunk = std::max<int64_t>(mr_max, kChunkBytes / x_row_bytes / mr_max * mr_max);
  at::parallel_for(0, p.ng, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t m_lo = 0; m_lo < p.m; m_lo += m_chunk) {
      int64_t m_hi = std::min(p.m, m_lo + m_chunk);
      for (int64_t g = g0; g < g1; g += group) {
        int ng = static_cast<int>(std::min<int64_t>(group, g1 - g));
        for (int64_t m = m_lo; m < m_hi; m += mr_max) {
          tile(g, ng, m, static_cast<int>(std::min<int64_t>(mr_max, m_hi - m)));
        }
      }
    }
  });
}

// Calls f(std::integral_constant<int, v>) for the run-time v in 1..kMax: a tile's rows (and
// groups) are template parameters, so its accumulators can live in registers.
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

// Writes y (float [16], rows 16g .. 16g+15) plus bias to row m of out; rows >= N are dropped.
template <typename T>
void finish16_scalar(const Problem& p, const float* y, int64_t g, int64_t m, T* out) {
  int64_t n0 = g * kRows;
  int n_valid = static_cast<int>(std::min<int64_t>(kRows, p.n - n0));
  for (int r = 0; r < n_valid; ++r) {
    from_float(p.bias ? y[r] + p.bias[n0 + r] : y[r], out + m * p.n + n0 + r);
  }
}

// Tile shapes (rows of x x groups of 16 rows). With one or two rows of x (decoding), 4 groups:
// 4 weight streams in flight, which is what matters when only bandwidth does (Q8_0 2 x 4; Q4,
// with a third accumulator per row and group, 1 x 4, one tile per row). With more rows, fewer
// groups and more rows, so that each line's load (and Q4's split) is shared by MR rows: Q8_0
// 4 x 2, Q4 3 x 2; a last single row of x again takes 4 groups.
template <int64_t Q>
constexpr int kMrMax = Q == kQ8_0 ? 4 : 3;

int nb_for(int64_t q, int mr) { return mr == 1 || (q == kQ8_0 && mr == 2) ? 4 : 2; }

template <int64_t Q, typename T>
void run_vnni(const T* x, const Problem& p, T* out) {
  Activations<int8_t> a = quantize_rows<T, int8_t>(x, p, quantize_block_vnni<T>);
  int mr_max = p.m <= 2 ? (Q == kQ8_0 ? 2 : 1) : kMrMax<Q>;
  for_each_tile(p, p.k + 8 * p.kb, 4, mr_max, [&](int64_t g, int ng, int64_t m, int mr) {
    int nb_max = nb_for(Q, mr);
    for (int j0 = 0; j0 < ng; j0 += nb_max) {
      int nb = std::min(nb_max, ng - j0);
      alignas(64) float y[8 * kRows];
      const uint8_t* w = p.w + (g + j0) * p.ldw;
      with_const<kMrMax<Q>>(mr, [&](auto mr_c) {
        with_const<4>(nb, [&](auto nb_c) {
          constexpr int MR = decltype(mr_c)::value, NB = decltype(nb_c)::value;
          if constexpr (kFits<Q, MR, NB>) {
            dot_tile_vnni<Q, MR, NB>(a, m, p.k, p.kb, w, p.ldw, y);
          } else {
            TORCH_CHECK(false, "no ", MR, " x ", NB, " tile (an nb_for bug)");
          }
        });
      });
      for (int i = 0; i < mr; ++i) {
        for (int j = 0; j < nb; ++j) {
          int64_t n0 = (g + j0 + j) * kRows;
          finish16_vnni(y + (i * nb + j) * kRows, p.bias ? p.bias + n0 : nullptr,
                        out + (m + i) * p.n + n0,
                        static_cast<int>(std::min<int64_t>(kRows, p.n - n0)));
        }
      }
    }
  });
}

template <int64_t Q, typename T>
void run_avx2(const T* x, const Problem& p, T* out) {
  Activations<int16_t> a = quantize_rows<T, int16_t>(x, p, quantize_block_avx2<T>);
  for_each_tile(p, 2 * p.k + 8 * p.kb, 1, 3, [&](int64_t g, int, int64_t m, int mr) {
    float y[3 * kRows];
    const uint8_t* w = p.w + g * p.ldw;
    with_const<3>(mr, [&](auto mr_c) {
      dot_group_avx2<Q, decltype(mr_c)::value>(a, m, p.k, p.kb, w, y);
    });
    for (int i = 0; i < mr; ++i) finish16_scalar(p, y + i * kRows, g, m + i, out);
  });
}

template <int64_t Q, typename T>
void run_scalar(const T* x, const Problem& p, T* out) {
  Activations<int8_t> a = quantize_rows<T, int8_t>(x, p, quantize_block_scalar<T, int8_t>);
  for_each_tile(p, p.k + 8 * p.kb, 1, 1, [&](int64_t g, int, int64_t m, int) {
    const uint8_t* w = p.w + g * p.ldw;
    float y[kRows] = {};
    int32_t dot[kRows];
    for (int64_t kb = 0; kb < p.kb; ++kb) {
      BlockAt at = block_at<Q>(kb, p.kb);
      dot_block_scalar<Q>(a.q.data() + m * p.k + kb * kBlock, w + at.lines, dot);
      add_block_scalar<Q>(dot, w + at.scales, a.d[m * p.kb + kb], a.sum[m * p.kb + kb], y);
    }
    finish16_scalar(p, y, g, m, out);
  });
}

// ---- ops ---------------------------------------------------------------------------------------
// One row's GGUF blocks into its slot r of a packed group (see the layout at the top).
template <int64_t Q>
void pack_row(const uint8_t* row, int64_t kbs, int r, uint8_t* group) {
  constexpr Format f = kFormat<Q>;
  for (int64_t kb = 0; kb < kbs; ++kb) {
    const uint8_t* block = row + kb * f.block_bytes;
    BlockAt at = block_at<Q>(kb, kbs);
    uint8_t *lines = group + at.lines, *scales = group + at.scales;
    std::memcpy(scales + 2 * r, block, 2);  // d
    if constexpr (Q == kQ4_1) std::memcpy(scales + 32 + 2 * r, block + 2, 2);  // m
    const uint8_t* qs = block + (Q == kQ4_1 ? 4 : 2);
    for (int j = 0; j < f.lines; ++j) {
      for (int t = 0; t < 4; ++t) {
        uint8_t u = qs[4 * j + t];
        lines[j * kLine + 4 * r + t] = Q == kQ8_0 ? u ^ 0x80 : u;
      }
    }
  }
}

at::Tensor gguf_pack(const at::Tensor& raw, int64_t qtype) {
  Format f = format_of(qtype);
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.device().is_cpu(),
              "raw must be a uint8 [N, row_bytes] CPU tensor, got ", raw.scalar_type(), " ",
              raw.sizes());
  int64_t n = raw.size(0), row_bytes = raw.size(1);
  TORCH_CHECK(row_bytes % f.block_bytes == 0, "a ", f.name, " row is whole blocks of ",
              f.block_bytes, " bytes; got rows of ", row_bytes, " bytes");
  at::Tensor src = raw.contiguous();
  int64_t kbs = row_bytes / f.block_bytes, ng = ceil_div(n, kRows), lines = group_lines(f, kbs);
  at::Tensor packed = at::zeros({ng, lines, kLine}, src.options());
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  dispatch_qtype(qtype, [&](auto q) {
    at::parallel_for(0, ng, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        for (int r = 0; r < kRows && g * kRows + r < n; ++r) {
          pack_row<decltype(q)::value>(in + (g * kRows + r) * row_bytes, kbs, r,
                                       dst + g * lines * kLine);
        }
      }
    });
  });
  return packed;
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& weight, int64_t qtype, int64_t n,
                       int64_t k, const std::optional<at::Tensor>& bias) {
  Format f = format_of(qtype);
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, "x must be a CPU tensor [..., K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(k > 0 && k % kBlock == 0, "K = ", k, " is not a positive multiple of ", kBlock,
              " (the GGUF block size)");
  TORCH_CHECK(n >= 0, "N = ", n, " is negative");
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features; the weight has K = ", k);
  int64_t kbs = k / kBlock, ng = ceil_div(n, kRows), lines = group_lines(f, kbs);
  // A raw [N, row_bytes] weight is packed on every call (tests, one-offs); layers pack once.
  at::Tensor packed = weight;
  if (weight.dim() == 2) {
    TORCH_CHECK(weight.size(0) == n && weight.size(1) == kbs * f.block_bytes, "raw ", f.name,
                " weight is ", weight.sizes(), "; for N = ", n, ", K = ", k, " expected [", n, ", ",
                kbs * f.block_bytes, "]");
    packed = gguf_pack(weight, qtype);
  }
  packed = packed.contiguous();
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(0) == ng &&
                  packed.size(1) == lines && packed.size(2) == kLine,
              "packed ", f.name, " weight is ", packed.scalar_type(), " ", packed.sizes(),
              "; for N = ", n, ", K = ", k, " gguf_pack gives uint8 [", ng, ", ", lines, ", ",
              kLine, "]");
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
  if (m == 0 || n == 0) return out;
  Problem p{m, n, k, kbs, ng, lines * kLine, packed.data_ptr<uint8_t>(),
            b.defined() ? b.data_ptr<float>() : nullptr};
  Path path = choose_path();
  dispatch_qtype(qtype, [&](auto q) {
    constexpr int64_t Q = decltype(q)::value;
    dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      if (path == Path::kVnni) {
        run_vnni<Q>(xp, p, op);
      } else if (path == Path::kAvx2) {
        run_avx2<Q>(xp, p, op);
      } else {
        run_scalar<Q>(xp, p, op);
      }
    });
  });
  return out;
}

// Which kernel gguf_linear runs in this process, for tests and benchmarks (the ISA, and with it
// the path, is fixed per process).
std::string gguf_linear_path() {
  switch (choose_path()) {
    case Path::kVnni: return "avx512_vnni";
    case Path::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def("gguf_linear_path() -> str", &gguf_linear_path);  // no tensors: one kernel for all keys
  m.def("gguf_pack(Tensor raw, int qtype) -> Tensor");
  m.def(
      "gguf_linear(Tensor x, Tensor packed, int qtype, int n, int k, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgl_kernel, CPU, m) {
  m.impl("gguf_pack", &gguf_pack);
  m.impl("gguf_linear", &gguf_linear);
}

}  // namespace sgl_kernel
