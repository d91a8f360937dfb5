// What the CPU and the OS allow, detected once at run time. Kernels dispatch on it.
#pragma once

#include <string>

namespace sgl_kernel {

// Ordered: a kernel built for one level runs on every higher one.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// The best level this process may use: the CPU's, lowered by LMPROG_CPU_ISA
// (scalar | avx2 | avx512 | amx) when that names a lower one. AMX counts only after the kernel
// granted this process the tile state (arch_prctl); without it AMX instructions die with SIGILL.
Isa cpu_isa();
std::string isa_name(Isa isa);
// What the hardware offers, whatever LMPROG_CPU_ISA says (for reports).
Isa detected_isa();
bool has_avx512_vnni();
bool has_avx512_bf16();

}  // namespace sgl_kernel
