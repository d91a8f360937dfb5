// Paged attention over lmprog's KV pool, for C++ callers (Python reaches the same functions as
// torch.ops.sgl_kernel.*). All tensors are contiguous CPU tensors; q, the KV buffers and out are
// float32 or bfloat16 (one dtype), index tensors int64:
//
//   slots of request b = req_to_token[req_pool_indices[b], :seq_lens[b]]
//   k_buffer [num_slots, kv_heads, D], v_buffer [num_slots, kv_heads, Dv]  (one layer's pool)
#pragma once

#include <ATen/ATen.h>

namespace sgl_kernel {

// out[b] = softmax(q[b] . K_b^T * scale) V_b, for q [B, H, D] and out [B, H, Dv]: one query
// token per request, over its whole context (the new token's K/V already in the pool).
void decode_attention(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer,
                      at::Tensor& out, const at::Tensor& req_to_token,
                      const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                      double scale);

// decode_attention's result, with requests that share a prefix reading it once. group_of [B]:
// request b's shared-prefix group in [0, G), or -1 for none; group_prefix_lens [G]: P_g, with
// the caller's guarantee that every member of group g has the same first P_g slots, and
// P_g < seq_lens[b] for each member (checked). Each group's prefix is attended for all its
// members' queries at once; each member's own positions [P_g, seq_len), and all of an
// ungrouped request's, as in decode_attention; the pieces merge by log-sum-exp.
void cascade_decode_attention(const at::Tensor& q, const at::Tensor& k_buffer,
                              const at::Tensor& v_buffer, at::Tensor& out,
                              const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                              const at::Tensor& seq_lens, const at::Tensor& group_of,
                              const at::Tensor& group_prefix_lens, double scale);

// Causal attention of each request's new tokens (q [T, H, D], requests back to back) over its
// cached prefix (extend_prefix_lens[b] tokens) and themselves; their K/V already in the pool.
void extend_attention(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer,
                      at::Tensor& out, const at::Tensor& req_to_token,
                      const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                      const at::Tensor& extend_prefix_lens, double scale);

}  // namespace sgl_kernel
