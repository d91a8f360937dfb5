// One decode step through a Llama-family decoder stack in a single call from Python.
//
// At one token per request the kernels of a layer take microseconds each, and calling them one
// by one from Python costs as much again: about 15 op calls per layer, each 3-10 us of Python
// and dispatcher, 7-8 ms of a 15 ms step on SmolLM2 (benchmarks/README.md). DecodeStack holds
// the layers' weights once and runs every layer's ops from C++, through the same registered ops
// the Python path calls (the dispatcher from C++ costs well under a microsecond), so both paths
// compute the same thing op for op:
//
//   residual = hidden (the embedding);  x = rmsnorm(hidden)
//   per layer: qkv = linear(x); q = rope + store k, v (rope_kv_store); a = decode attention;
//              h = linear(a) (o_proj); x = add + rmsnorm(h, residual);
//              h = linear(silu_and_mul(linear(x))) (gate_up, down); x = add + rmsnorm(h, residual)
//   the last add + rmsnorm uses the final norm's weight; x is returned.
//
// A linear layer is dense (float weight: oneDNN's fp32 linear, as lmprog's fast_linear, or
// at::linear), int8 (int8_linear's packed weight and scales), gguf (gguf_linear's blocks) or
// packed bf16 (bf16_linear).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace sgl_kernel {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

enum LinearKind : int64_t { kDense = 0, kDenseOneDnn = 1, kInt8 = 2, kGguf = 3, kBf16 = 4 };

struct Linear {
  int64_t kind;
  at::Tensor weight;  // dense [N, K]; int8, bf16: packed; gguf: packed blocks
  at::Tensor scales;  // int8 only
  std::optional<at::Tensor> bias;
  int64_t qtype, n, k;  // gguf; n for bf16
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
};

using Opt = std::optional<at::Tensor>;

class DecodeStack {
 public:
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
              at::Tensor final_norm)
      : heads_(num_heads), kv_heads_(num_kv_heads), eps_(eps), scale_(scale),
        final_norm_(std::move(final_norm)) {}

  // Appends a layer; each linear is (kind, weight, scales or None, bias or None, qtype, n, k).
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, const std::vector<Linear>& linears) {
    TORCH_CHECK(linears.size() == 4, "a layer has 4 linears (qkv, o, gate_up, down)");
    layers_.push_back({std::move(input_norm), std::move(post_norm), linears[0], linears[1],
                       linears[2], linears[3]});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // hidden: [B, hidden] embeddings (overwritten: it becomes the residual stream); cos, sin:
  // float32 [B, head_dim / 2]; k_bufs, v_bufs: each layer's pool buffers. Returns [B, hidden],
  // the final-normed hidden states.
  at::Tensor forward(at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& loc, std::vector<at::Tensor> k_bufs,
                     std::vector<at::Tensor> v_bufs, const at::Tensor& req_to_token,
                     const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                     const Opt& group_of, const Opt& group_prefix_lens) const {
    const int64_t n = num_layers();
    TORCH_CHECK(n > 0, "DecodeStack has no layers");
    TORCH_CHECK(static_cast<int64_t>(k_bufs.size()) == n && static_cast<int64_t>(v_bufs.size()) == n,
                "one K and one V buffer per layer: ", n, " layers, got ", k_bufs.size(), " and ",
                v_bufs.size());
    TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous [B, H]");
    const bool cascade = group_of.has_value();
    TORCH_CHECK(cascade == group_prefix_lens.has_value(),
                "group_of and group_prefix_lens come together");
    const int64_t batch = hidden.size(0);
    at::Tensor residual = hidden;
    at::Tensor x = ops_.rmsnorm.call(hidden, layers_[0].input_norm, eps_);
    for (int64_t i = 0; i < n; ++i) {
      const Layer& layer = layers_[i];
      if (i > 0) ops_.add_rmsnorm.call(x, residual, layer.input_norm, eps_);
      at::Tensor qkv = linear(x, layer.qkv);
      auto [q, k] = ops_.rope_kv_store.call(qkv, cos, sin, loc, k_bufs[i], v_bufs[i], heads_,
                                            kv_heads_);
      at::Tensor attn = at::empty({batch, heads_, v_bufs[i].size(2)}, q.options());
      if (cascade) {
        ops_.cascade_attention.call(q, k_bufs[i], v_bufs[i], attn, req_to_token,
                                      req_pool_indices, seq_lens, *group_of, *group_prefix_lens,
                                      scale_);
      } else {
        ops_.decode_attention.call(q, k_bufs[i], v_bufs[i], attn, req_to_token, req_pool_indices,
                                   seq_lens, scale_);
      }
      at::Tensor h = linear(attn.view({batch, -1}), layer.o);
      ops_.add_rmsnorm.call(h, residual, layer.post_norm, eps_);
      x = linear(ops_.silu_and_mul.call(linear(h, layer.gate_up)), layer.down);
    }
    ops_.add_rmsnorm.call(x, residual, final_norm_, eps_);
    return x;
  }

 private:
  struct Ops {
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rmsnorm =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("sgl_kernel::rmsnorm");
    c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>
        add_rmsnorm = find_op<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>(
            "sgl_kernel::fused_add_rmsnorm");
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul =
        find_op<at::Tensor(const at::Tensor&)>("sgl_kernel::silu_and_mul");
    using RopeSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&,
                                                       at::Tensor&, at::Tensor&, int64_t, int64_t);
    c10::TypedOperatorHandle<RopeSig> rope_kv_store = find_op<RopeSig>("sgl_kernel::rope_kv_store");
    using DecodeSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
    c10::TypedOperatorHandle<DecodeSig> decode_attention =
        find_op<DecodeSig>("sgl_kernel::decode_attention");
    using CascadeSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double);
    c10::TypedOperatorHandle<CascadeSig> cascade_attention =
        find_op<CascadeSig>("sgl_kernel::cascade_decode_attention");
    using Int8Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&);
    c10::TypedOperatorHandle<Int8Sig> int8_linear = find_op<Int8Sig>("sgl_kernel::int8_linear");
    using GgufSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                               const Opt&);
    c10::TypedOperatorHandle<GgufSig> gguf_linear = find_op<GgufSig>("sgl_kernel::gguf_linear");
    using Bf16Sig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const Opt&);
    c10::TypedOperatorHandle<Bf16Sig> bf16_linear = find_op<Bf16Sig>("sgl_kernel::bf16_linear");
    // oneDNN's fp32 linear (what lmprog's fast_linear calls), through its boxed schema.
    c10::OperatorHandle onednn_linear =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  };

  at::Tensor linear(const at::Tensor& x, const Linear& l) const {
    switch (l.kind) {
      case kInt8:
        return ops_.int8_linear.call(x, l.weight, l.scales, l.bias);
      case kGguf:
        return ops_.gguf_linear.call(x, l.weight, l.qtype, l.n, l.k, l.bias);
      case kBf16:
        return ops_.bf16_linear.call(x, l.weight, l.n, l.bias);
      case kDenseOneDnn: {
        torch::jit::Stack stack{x, l.weight, l.bias, std::string("none"),
                                c10::List<std::optional<at::Scalar>>(), std::string("")};
        ops_.onednn_linear.callBoxed(&stack);
        return stack[0].toTensor();
      }
      default:
        return at::linear(x, l.weight, l.bias);
    }
  }

  int64_t heads_, kv_heads_;
  double eps_, scale_;
  at::Tensor final_norm_;
  std::vector<Layer> layers_;
  Ops ops_;
};

Linear make_linear(int64_t kind, at::Tensor weight, Opt scales, Opt bias, int64_t qtype,
                   int64_t n, int64_t k) {
  TORCH_CHECK(kind >= kDense && kind <= kBf16, "unknown linear kind ", kind);
  TORCH_CHECK(kind != kInt8 || scales.has_value(), "an int8 linear needs its scales");
  return Linear{kind, std::move(weight), scales.value_or(at::Tensor()), std::move(bias), qtype, n, k};
}

}  // namespace

void register_decode_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "StackLinear");
  m.def("stack_linear", &make_linear, py::arg("kind"), py::arg("weight"), py::arg("scales"),
        py::arg("bias"), py::arg("qtype") = 0, py::arg("n") = 0, py::arg("k") = 0,
        "A linear layer of a DecodeStack: kind 0 dense (at::linear), 1 dense through oneDNN "
        "(float32), 2 int8 (packed, scales), 3 gguf (packed blocks, qtype, n, k), 4 bf16 "
        "(packed, n).");
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, double, double, at::Tensor>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("eps"), py::arg("scale"), py::arg("final_norm"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward);
}

}  // namespace sgl_kernel
