// Paged attention over lmprog's KV pool, read in place: decode (one query per request, the
// context split across threads as in flash-decoding, so one long stream uses every core), its
// cascade form (requests that share a prefix read it once, all their queries together), and
// extend (a request's new tokens over its cached prefix and themselves, causal). Softmax is
// online, in fp32, so memory stays bounded for any context length.
//
// The kernels themselves are in attention_impl.inc and cascade_impl.inc, written once over a
// vector type and compiled per ISA below; D and Dv must be multiples of the vector width for a
// vector path (the scalar one takes any).
#include "attention.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "decode_plan.h"
#include "isa.h"
#include "vec.h"

namespace sgl_kernel {
namespace {

constexpr int kMaxGroup = 16;  // query heads per kv head (GQA group) the kernels take

struct Shape {
  int group;          // query heads per kv head
  int d, dv;          // head dims of K and V
  int64_t k_stride;   // floats between two slots' K: Hkv * D
  int64_t v_stride;   // Hkv * Dv
  float scale;
};

// The cascade's unit of work: `rows` query rows -- each member of a shared-prefix group times the
// GQA heads of kv head `h` -- against positions [lo, hi) of the group's prefix.
template <typename T>
struct PrefixChunk {
  const T* const* q;     // [rows] -> the row's D query values
  float* const* out;     // [rows] -> the row's partial record: m, l, acc[Dv]
  int64_t rows;
  const int64_t* slots;  // the group's slots: any member's row of req_to_token
  int64_t lo, hi, h;
};
constexpr int kKeys = 32;      // keys per block of a chunk: a multiple of every vector width
constexpr int kRowBlock = 64;  // rows whose q and accumulators stay in L1/L2 over a chunk's keys

// Floats of scratch prefix_chunk needs for a chunk of `len` positions: K transposed per block of
// kKeys, V, and one row block's scaled queries.
int64_t chunk_scratch(int64_t len, const Shape& s) {
  if (len == 0) return 0;
  return (len + kKeys - 1) / kKeys * kKeys * s.d + len * s.dv + kRowBlock * s.d;
}

namespace scalar {
struct V {
  static constexpr int kWidth = 1;
  using reg = float;
  static reg zero() { return 0.f; }
  static reg set1(float x) { return x; }
  static reg iota() { return 0.f; }
  template <typename T>
  static reg load(const T* p) { return to_float(*p); }
  static void store(float* p, reg v) { *p = v; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg max(reg a, reg b) { return std::max(a, b); }
  static float reduce_add(reg a) { return a; }
  static float reduce_max(reg a) { return a; }
  static void transpose(reg*) {}  // a 1 x 1 block
  static reg exp(reg a) { return std::exp(a); }
  static reg mask_below(reg x, reg lanes, float t) { return lanes < t ? -INFINITY : x; }
};
#include "attention_impl.inc"
#include "cascade_impl.inc"
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")
namespace avx512v {
struct V {
  static constexpr int kWidth = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg iota() {
    return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const at::BFloat16* p) { return avx512::load(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static float reduce_add(reg a) { return _mm512_reduce_add_ps(a); }
  static float reduce_max(reg a) { return _mm512_reduce_max_ps(a); }
  static void transpose(reg* r) { avx512::transpose(r); }  // kWidth x kWidth rows
  static reg exp(reg a) { return avx512::exp(a); }
  static reg mask_below(reg x, reg lanes, float t) {
    __mmask16 below = _mm512_cmp_ps_mask(lanes, _mm512_set1_ps(t), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(x, below, _mm512_set1_ps(-INFINITY));
  }
};
#include "attention_impl.inc"
#include "cascade_impl.inc"
}  // namespace avx512v
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2v {
struct V {
  static constexpr int kWidth = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg iota() { return _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const at::BFloat16* p) { return avx2::load(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static float reduce_add(reg a) { return avx2::hsum(a); }
  static float reduce_max(reg a) { return avx2::hmax(a); }
  static void transpose(reg* r) { avx2::transpose(r); }
  static reg exp(reg a) { return avx2::exp(a); }
  static reg mask_below(reg x, reg lanes, float t) {
    __m256 below = _mm256_cmp_ps(lanes, _mm256_set1_ps(t), _CMP_LT_OQ);
    return _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), below);
  }
};
#include "attention_impl.inc"
#include "cascade_impl.inc"
}  // namespace avx2v
#pragma GCC pop_options

Isa kernel_isa(const Shape& s) {
  Isa isa = cpu_isa();
  if (isa >= Isa::kAvx512 && s.d % 16 == 0 && s.dv % 16 == 0) return Isa::kAvx512;
  if (isa >= Isa::kAvx2 && s.d % 8 == 0 && s.dv % 8 == 0) return Isa::kAvx2;
  return Isa::kScalar;
}

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0, heads, " query heads are not a multiple of ", kv_heads);
  TORCH_CHECK(heads / kv_heads <= kMaxGroup, "at most ", kMaxGroup, " query heads per kv head");
  TORCH_CHECK(q.size(2) == k.size(2), "q and k head dims differ");
  return Shape{static_cast<int>(heads / kv_heads), static_cast<int>(k.size(2)),
               static_cast<int>(v.size(2)), kv_heads * k.size(2), kv_heads * v.size(2),
               static_cast<float>(scale)};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& req_to_token) {
  for (const at::Tensor* t : {&q, &k, &v, &out, &req_to_token}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "contiguous CPU tensors only");
  }
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "q, the KV buffers and out must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "float32 or bfloat16 only");
  TORCH_CHECK(req_to_token.scalar_type() == at::kLong, "req_to_token must be int64");
}

// Runs task(t, scratch) for t in [0, n) on every thread, each thread taking the next task when
// it finishes one: chunk tasks (many rows) and part tasks (one request) differ a lot in size.
// Scratch is made once per thread.
template <typename Scratch, typename MakeScratch, typename Task>
void run_tasks(int64_t n, MakeScratch make, Task task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch = make();
    for (int64_t t = next++; t < n; t = next++) task(t, scratch);
  });
}

// out[b, head] from its records, by log-sum-exp (records with l == 0 are empty parts).
template <typename T>
void merge_records(const std::vector<float>& partial, const DecodePlan& plan, int64_t B,
                   int64_t H, const Shape& s, T* op) {
  const int64_t rec = s.dv + 2;
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(s.dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, n = plan.pieces[b];
      const float* r = partial.data() + plan.record(b, bh % H, 0) * rec;
      float m = -INFINITY;
      for (int64_t p = 0; p < n; ++p) m = std::max(m, r[p * rec]);
      float l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t p = 0; p < n; ++p) {
        if (r[p * rec + 1] == 0.f) continue;  // an empty part
        const float w = std::exp(r[p * rec] - m);
        l += w * r[p * rec + 1];
        for (int d = 0; d < s.dv; ++d) o[d] += w * r[p * rec + 2 + d];
      }
      for (int d = 0; d < s.dv; ++d) from_float(o[d] / l, op + bh * s.dv + d);
    }
  });
}

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& vb, at::Tensor& out,
                 const at::Tensor& req_to_token, const at::Tensor& pool_idx,
                 const at::Tensor& seq_lens, const DecodePlan& plan, const Shape& s) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = H / s.group, parts = plan.parts;
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* rows = pool_idx.data_ptr<int64_t>();
  const int64_t rec = s.dv + 2;
  std::vector<float> partial(plan.records() * rec);
  const T* qp = q.data_ptr<T>();
  const T* kp = kb.data_ptr<T>();
  const T* vp = vb.data_ptr<T>();
  const int64_t* r2t = req_to_token.data_ptr<int64_t>();
  const int64_t ctx = req_to_token.size(1);
  const Isa isa = kernel_isa(s);
  struct Scratch {
    std::vector<float> qf, m, l, acc, chunk;
    std::vector<const T*> q_rows;
    std::vector<float*> out_rows;
  };
  auto make = [&] {
    return Scratch{std::vector<float>(s.group * s.d), std::vector<float>(s.group),
                   std::vector<float>(s.group), std::vector<float>(s.group * s.dv),
                   std::vector<float>(chunk_scratch(plan.longest_chunk, s)),
                   std::vector<const T*>(plan.most_rows), std::vector<float*>(plan.most_rows)};
  };
  const int64_t n_chunks = plan.chunks.size();
  auto chunk_task = [&](const DecodePlan::Chunk& c, Scratch& sc) {
    const int64_t* members = plan.members.data() + plan.member_start[c.group];
    const int64_t n = plan.member_start[c.group + 1] - plan.member_start[c.group];
    for (int64_t i = 0; i < n * s.group; ++i) {
      const int64_t b = members[i / s.group], head = c.h * s.group + i % s.group;
      sc.q_rows[i] = qp + (b * H + head) * s.d;
      sc.out_rows[i] = partial.data() + plan.record(b, head, c.piece) * rec;
    }
    const PrefixChunk<T> pc{sc.q_rows.data(), sc.out_rows.data(), n * s.group,
                            r2t + rows[members[0]] * ctx, c.lo, c.hi, c.h};
    if (isa == Isa::kAvx512) {
      avx512v::prefix_chunk(pc, kp, vp, s, sc.chunk.data());
    } else if (isa == Isa::kAvx2) {
      avx2v::prefix_chunk(pc, kp, vp, s, sc.chunk.data());
    } else {
      scalar::prefix_chunk(pc, kp, vp, s, sc.chunk.data());
    }
  };
  auto part_task = [&](int64_t t, Scratch& sc) {
    const int64_t b = t / (Hkv * parts), h = (t / parts) % Hkv, part = t % parts;
    const int64_t own = lens[b] - plan.start[b], step = (own + parts - 1) / parts;
    const int64_t lo = plan.start[b] + std::min(own, part * step);
    const int64_t hi = std::min(lens[b], lo + step);
    for (int g = 0; g < s.group; ++g) {
      for (int d = 0; d < s.d; ++d) sc.qf[g * s.d + d] = to_float(qp[(b * H + h * s.group + g) * s.d + d]);
    }
    const int64_t* slots = r2t + rows[b] * ctx;
    float *qf = sc.qf.data(), *m = sc.m.data(), *l = sc.l.data(), *acc = sc.acc.data();
    if (isa == Isa::kAvx512) {
      avx512v::decode_part(qf, kp, vp, slots, lo, hi, s, h, m, l, acc);
    } else if (isa == Isa::kAvx2) {
      avx2v::decode_part(qf, kp, vp, slots, lo, hi, s, h, m, l, acc);
    } else {
      scalar::decode_part(qf, kp, vp, slots, lo, hi, s, h, m, l, acc);
    }
    for (int g = 0; g < s.group; ++g) {
      const int64_t head = h * s.group + g;
      float* r = partial.data() + plan.record(b, head, plan.pieces[b] - parts + part) * rec;
      r[0] = m[g], r[1] = l[g];
      std::copy(acc + g * s.dv, acc + (g + 1) * s.dv, r + 2);
    }
  };
  run_tasks<Scratch>(n_chunks + B * Hkv * parts, make, [&](int64_t t, Scratch& sc) {
    if (t < n_chunks) {
      chunk_task(plan.chunks[t], sc);
    } else {
      part_task(t - n_chunks, sc);
    }
  });
  merge_records(partial, plan, B, H, s, out.data_ptr<T>());
}

template <typename T>
void extend_impl(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& vb, at::Tensor& out,
                 const at::Tensor& req_to_token, const at::Tensor& pool_idx,
                 const at::Tensor& seq_lens, const at::Tensor& prefix_lens, const Shape& s,
                 Isa isa, int width) {
  const int64_t B = seq_lens.size(0), H = q.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* prefix = prefix_lens.data_ptr<int64_t>();
  const int64_t* rows = pool_idx.data_ptr<int64_t>();
  // Tasks: (request, head, block of `width` new tokens); block_start[b] numbers them.
  std::vector<int64_t> block_start(B + 1, 0), token_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ext = lens[b] - prefix[b];
    token_start[b + 1] = token_start[b] + ext;
    block_start[b + 1] = block_start[b] + (ext + width - 1) / width;
  }
  TORCH_CHECK(token_start[B] == q.size(0), "q has ", q.size(0), " tokens; the batch extends ",
              token_start[B]);
  const T* qp = q.data_ptr<T>();
  const T* kp = kb.data_ptr<T>();
  const T* vp = vb.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* r2t = req_to_token.data_ptr<int64_t>();
  const int64_t ctx = req_to_token.size(1);
  at::parallel_for(0, block_start[B] * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(s.d * width), acct(s.dv * width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t / H, head = t % H;
      const int64_t b = std::upper_bound(block_start.begin(), block_start.end(), blk) -
                        block_start.begin() - 1;
      const int64_t j0 = (blk - block_start[b]) * width;
      const int64_t ext = lens[b] - prefix[b];
      const int nq = static_cast<int>(std::min<int64_t>(width, ext - j0));
      const T* qb = qp + token_start[b] * H * s.d;
      T* ob = op + token_start[b] * H * s.dv;
      const int64_t* slots = r2t + rows[b] * ctx;
      if (isa == Isa::kAvx512) {
        avx512v::extend_block(qb, H * s.d, kp, vp, slots, prefix[b], j0, nq, s, head, ob,
                              H * s.dv, qt.data(), acct.data());
      } else if (isa == Isa::kAvx2) {
        avx2v::extend_block(qb, H * s.d, kp, vp, slots, prefix[b], j0, nq, s, head, ob,
                            H * s.dv, qt.data(), acct.data());
      } else {
        scalar::extend_block(qb, H * s.d, kp, vp, slots, prefix[b], j0, nq, s, head, ob,
                             H * s.dv, qt.data(), acct.data());
      }
    }
  });
}

// decode_attention, or its cascade form when group_of is given (G groups of prefix lengths).
void run_decode(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer,
                at::Tensor& out, const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                const at::Tensor& seq_lens, const int64_t* group_of, const int64_t* prefix,
                int64_t G, double scale) {
  check_inputs(q, k_buffer, v_buffer, out, req_to_token);
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3, "q and out are [B, H, D]");
  const Shape s = shape_of(q, k_buffer, v_buffer, scale);
  const at::Tensor lens = seq_lens.contiguous();
  const DecodePlan plan = plan_decode(lens.data_ptr<int64_t>(), q.size(0), q.size(1) / s.group,
                                      s.group, group_of, prefix, G);
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    decode_impl<decltype(tag)>(q, k_buffer, v_buffer, out, req_to_token,
                               req_pool_indices.contiguous(), lens, plan, s);
  });
}

}  // namespace

void decode_attention(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer,
                      at::Tensor& out, const at::Tensor& req_to_token,
                      const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                      double scale) {
  run_decode(q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, nullptr,
             nullptr, 0, scale);
}

void cascade_decode_attention(const at::Tensor& q, const at::Tensor& k_buffer,
                              const at::Tensor& v_buffer, at::Tensor& out,
                              const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                              const at::Tensor& seq_lens, const at::Tensor& group_of,
                              const at::Tensor& group_prefix_lens, double scale) {
  TORCH_CHECK(group_of.scalar_type() == at::kLong && group_prefix_lens.scalar_type() == at::kLong,
              "group_of and group_prefix_lens must be int64");
  TORCH_CHECK(group_of.dim() == 1 && group_of.size(0) == q.size(0), "group_of has ",
              group_of.numel(), " entries for ", q.size(0), " requests");
  const at::Tensor groups = group_of.contiguous(), prefix = group_prefix_lens.contiguous();
  run_decode(q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens,
             groups.data_ptr<int64_t>(), prefix.data_ptr<int64_t>(), prefix.numel(), scale);
}

void extend_attention(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer,
                      at::Tensor& out, const at::Tensor& req_to_token,
                      const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                      const at::Tensor& extend_prefix_lens, double scale) {
  check_inputs(q, k_buffer, v_buffer, out, req_to_token);
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3, "q and out are [T, H, D]");
  const Shape s = shape_of(q, k_buffer, v_buffer, scale);
  // Any ISA works for extend (it needs no head-dim multiple): the lanes are queries.
  const Isa isa = cpu_isa();
  const int width = isa >= Isa::kAvx512 ? 16 : isa >= Isa::kAvx2 ? 8 : 1;
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    extend_impl<decltype(tag)>(q, k_buffer, v_buffer, out, req_to_token,
                               req_pool_indices.contiguous(), seq_lens.contiguous(),
                               extend_prefix_lens.contiguous(), s, isa, width);
  });
}

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_buffer, Tensor v_buffer, Tensor(a!) out, "
      "Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, float scale) -> ()");
  m.def(
      "extend_attention(Tensor q, Tensor k_buffer, Tensor v_buffer, Tensor(a!) out, "
      "Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, "
      "Tensor extend_prefix_lens, float scale) -> ()");
  m.def(
      "cascade_decode_attention(Tensor q, Tensor k_buffer, Tensor v_buffer, Tensor(a!) out, "
      "Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, Tensor group_of, "
      "Tensor group_prefix_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(sgl_kernel, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("extend_attention", &extend_attention);
  m.impl("cascade_decode_attention", &cascade_decode_attention);
}

}  // namespace sgl_kernel
