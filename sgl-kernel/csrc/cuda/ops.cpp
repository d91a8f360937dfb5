// The torch ops over the CUDA kernels, `torch.ops.sgl_kernel_cuda.*`: the same names, schemas
// and semantics as the CPU ops in `sgl_kernel` (csrc/cpu/norm.cpp, rope.cpp), for float32,
// float16 and bfloat16 CUDA tensors. This file checks the arguments and calls the launchers in
// launch.h on torch's current stream.
//
// The stream comes through c10's device-generic interface (which for CUDA answers with
// c10::cuda::getCurrentCUDAStream), so this file needs no c10/cuda headers: it compiles wherever
// torch's headers and the CUDA toolkit are, a CPU-only torch wheel included.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "launch.h"

namespace sgl_kernel_cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// `t` is a CUDA tensor on `like`'s device.
void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", the input on ",
              like.device());
}

// torch's current stream on `t`'s device: the capture stream inside torch.cuda.graph.
cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "sgl_kernel_cuda.", op, ": ", cudaGetErrorString(err));
}

// x [..., n] contiguous; weight [n] of x's dtype. Returns the number of rows.
int64_t check_rows(const at::Tensor& x, const at::Tensor& weight) {
  check_on_device(x, "x", x);
  check_on_device(weight, "weight", x);
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be contiguous with at least one dim");
  dtype_of(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight is ", weight.scalar_type(),
              ", x is ", x.scalar_type(), ": they must share a dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must be [", x.size(-1),
              "] (x's last dim), got ", weight.sizes());
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), rows, " rows: at most 2^31 - 1");
  return rows;
}

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = check_rows(x, weight);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  check_launch(launch_rmsnorm(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, x.size(-1),
                              static_cast<float>(eps), dtype_of(x, "x"), current_stream(x)),
               "rmsnorm");
  return out;
}

void fused_add_rmsnorm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                       double eps) {
  const int64_t rows = check_rows(x, weight);
  check_on_device(residual, "residual", x);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
                  residual.is_contiguous(),
              "residual must be contiguous ", x.scalar_type(), " ", x.sizes(), " like x, got ",
              residual.scalar_type(), " ", residual.sizes());
  const c10::DeviceGuard guard(x.device());
  const at::Tensor w = weight.contiguous();
  check_launch(launch_fused_add_rmsnorm(x.data_ptr(), residual.data_ptr(), w.data_ptr(), rows,
                                        x.size(-1), static_cast<float>(eps), dtype_of(x, "x"),
                                        current_stream(x)),
               "fused_add_rmsnorm");
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_on_device(x, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be contiguous with at least one dim");
  const int64_t width = x.size(-1), n = width / 2;
  TORCH_CHECK(width % 2 == 0, "x's last dim (", width, ") must be [gate | up]: an even size");
  const int64_t rows = width == 0 ? 0 : x.numel() / width;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty(sizes, x.options());
  check_launch(launch_silu_and_mul(x.data_ptr(), out.data_ptr(), rows, n, dtype_of(x, "x"),
                                   current_stream(x)),
               "silu_and_mul");
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_kv_store(const at::Tensor& qkv, const at::Tensor& cos,
                                                 const at::Tensor& sin, const at::Tensor& loc,
                                                 at::Tensor& k_buf, at::Tensor& v_buf,
                                                 int64_t num_heads, int64_t num_kv_heads) {
  check_on_device(qkv, "qkv", qkv);
  TORCH_CHECK(qkv.dim() == 2, "qkv must be [T, width], got ", qkv.sizes());
  const DType dtype = dtype_of(qkv, "qkv");
  const int64_t t = qkv.size(0);
  for (const at::Tensor* table : {&cos, &sin}) {
    check_on_device(*table, "cos/sin", qkv);
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->dim() == 2 &&
                    table->sizes() == cos.sizes() && table->size(0) == t && table->size(1) > 0,
                "cos and sin must be float32 [T, head_dim / 2] with T = ", t, ", got ",
                cos.scalar_type(), " ", cos.sizes(), " and ", sin.scalar_type(), " ",
                sin.sizes());
  }
  const int64_t half = cos.size(1), d = 2 * half;
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0, "num_heads (", num_heads, ") and num_kv_heads (",
              num_kv_heads, ") must be positive");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * d, "qkv width ", qkv.size(1),
              " is not (", num_heads, " + 2 x ", num_kv_heads, ") heads x head_dim ", d);
  check_on_device(loc, "loc", qkv);
  TORCH_CHECK(loc.dim() == 1 && loc.size(0) == t && loc.scalar_type() == at::kLong,
              "loc must be int64 [", t, "], got ", loc.scalar_type(), " ", loc.sizes());
  for (const at::Tensor* buf : {&k_buf, &v_buf}) {
    check_on_device(*buf, "k_buf/v_buf", qkv);
    TORCH_CHECK(buf->scalar_type() == qkv.scalar_type() && buf->is_contiguous() &&
                    buf->dim() == 3 && buf->size(1) == num_kv_heads && buf->size(2) == d,
                "the K/V buffers must be contiguous ", qkv.scalar_type(), " [slots, ",
                num_kv_heads, ", ", d, "], got ", buf->scalar_type(), " ", buf->sizes());
  }
  TORCH_CHECK(v_buf.size(0) == k_buf.size(0), "k_buf has ", k_buf.size(0), " slots, v_buf ",
              v_buf.size(0));
  const c10::DeviceGuard guard(qkv.device());
  const at::Tensor x = qkv.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  const at::Tensor l = loc.contiguous();
  at::Tensor q = at::empty({t, num_heads, d}, qkv.options());
  at::Tensor k = at::empty({t, num_kv_heads, d}, qkv.options());
  // loc is checked against the pool in the kernel (a bad slot traps it): checking it here
  // would copy it to the host, a synchronization per layer.
  check_launch(launch_rope_kv_store(x.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(),
                                    l.data_ptr<int64_t>(), q.data_ptr(), k.data_ptr(),
                                    k_buf.data_ptr(), v_buf.data_ptr(), t, num_heads,
                                    num_kv_heads, d, k_buf.size(0), dtype, current_stream(qkv)),
               "rope_kv_store");
  return {q, k};
}

}  // namespace

TORCH_LIBRARY(sgl_kernel_cuda, m) {
  m.def("rmsnorm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rmsnorm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def(
      "rope_kv_store(Tensor qkv, Tensor cos, Tensor sin, Tensor loc, Tensor(a!) k_buf, "
      "Tensor(b!) v_buf, int num_heads, int num_kv_heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgl_kernel_cuda, CUDA, m) {
  m.impl("rmsnorm", &rmsnorm);
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_kv_store", &rope_kv_store);
}

}  // namespace sgl_kernel_cuda
