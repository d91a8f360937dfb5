// Host launchers of sgl-kernel's CUDA kernels: raw device pointers, sizes and a stream in, the
// launch's error out. No torch types here, so the kernel files compile without torch's headers
// (seconds, not minutes); ops.cpp checks the tensors and calls these.
//
// Every launcher only enqueues work on `stream`: no host synchronization and no allocation, so
// the ops can be captured into a CUDA graph. Zero rows launch nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sgl_kernel_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// out = weight * round(x / sqrt(mean(x^2) + eps)) per row of `n` elements; x, out [rows, n].
cudaError_t launch_rmsnorm(const void* x, const void* weight, void* out, int64_t rows, int64_t n,
                           float eps, DType dtype, cudaStream_t stream);

// In place: residual = round(residual + x); x = rmsnorm(residual) (as above).
cudaError_t launch_fused_add_rmsnorm(void* x, void* residual, const void* weight, int64_t rows,
                                     int64_t n, float eps, DType dtype, cudaStream_t stream);

// out[r, i] = round(silu(x[r, i])) * x[r, n + i]; x [rows, 2n], out [rows, n].
cudaError_t launch_silu_and_mul(const void* x, void* out, int64_t rows, int64_t n, DType dtype,
                                cudaStream_t stream);

// Rotate-half RoPE of the q and k heads of `qkv` [tokens, (heads + 2 kv_heads) * head_dim] by
// cos/sin (float32 [tokens, head_dim / 2]); rotated q -> q [tokens, heads, head_dim], rotated k
// -> k [tokens, kv_heads, head_dim] and k_buf[loc[t]], plain v -> v_buf[loc[t]], where the
// buffers are [slots, kv_heads, head_dim]. A slot outside [0, slots) traps the kernel.
cudaError_t launch_rope_kv_store(const void* qkv, const float* cos, const float* sin,
                                 const int64_t* loc, void* q, void* k, void* k_buf, void* v_buf,
                                 int64_t tokens, int64_t heads, int64_t kv_heads,
                                 int64_t head_dim, int64_t slots, DType dtype,
                                 cudaStream_t stream);

}  // namespace sgl_kernel_cuda
