// The Python module `sgl_kernel._C`: importing it registers every op (each source file adds its
// own to the `sgl_kernel` torch library); the functions here report the ISA.
#include <torch/extension.h>

#include "isa.h"

namespace sgl_kernel {
void register_decode_stack(pybind11::module& m);  // decode_stack.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return sgl_kernel::isa_name(sgl_kernel::cpu_isa()); },
        "The ISA the kernels use (LMPROG_CPU_ISA may lower it): amx, avx512, avx2 or scalar.");
  m.def("detected_isa", [] { return sgl_kernel::isa_name(sgl_kernel::detected_isa()); },
        "The best ISA the CPU and OS offer.");
  m.def("has_avx512_vnni", &sgl_kernel::has_avx512_vnni);
  sgl_kernel::register_decode_stack(m);
}
