#include "isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace sgl_kernel {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature
constexpr int kXfeatureXtiledata = 18;      // AMX tile data

struct Features {
  bool avx2 = false, avx512 = false, vnni = false, bf16 = false, amx = false;
};

unsigned long long xcr0() {
  unsigned int lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

Features probe() {
  Features f;
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  bool osxsave = c & (1u << 27), fma = c & (1u << 12);
  if (!osxsave) return f;
  unsigned long long xcr = xcr0();
  bool ymm_state = (xcr & 0x6) == 0x6;     // SSE and AVX state saved by the OS
  bool zmm_state = (xcr & 0xe6) == 0xe6;   // + opmask and the upper ZMM registers
  bool tile_state = (xcr & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = ymm_state && fma && (b & (1u << 5));
  bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512bw && avx512vl;
  f.vnni = f.avx512 && (c & (1u << 11));
  unsigned int a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  f.bf16 = f.avx512 && (a1 & (1u << 5));  // AVX512_BF16: vdpbf16ps
  bool amx_tile = d & (1u << 24), amx_bf16 = d & (1u << 22), amx_int8 = d & (1u << 25);
  if (f.avx512 && tile_state && amx_tile && amx_bf16 && amx_int8) {
    // The OS must also grant this process the tile data state before the first AMX instruction.
    f.amx = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }
  return f;
}

const Features& features() {
  static const Features f = probe();
  return f;
}

Isa forced_limit() {
  const char* env = std::getenv("LMPROG_CPU_ISA");
  if (env == nullptr || *env == '\0') return Isa::kAmx;
  if (!std::strcmp(env, "scalar") || !std::strcmp(env, "torch")) return Isa::kScalar;
  if (!std::strcmp(env, "avx2")) return Isa::kAvx2;
  if (!std::strcmp(env, "avx512")) return Isa::kAvx512;
  return Isa::kAmx;  // "amx" or anything else: no limit
}

}  // namespace

Isa detected_isa() {
  const Features& f = features();
  return f.amx ? Isa::kAmx : f.avx512 ? Isa::kAvx512 : f.avx2 ? Isa::kAvx2 : Isa::kScalar;
}

Isa cpu_isa() {
  static const Isa isa = static_cast<Isa>(
      std::min(static_cast<int>(detected_isa()), static_cast<int>(forced_limit())));
  return isa;
}

bool has_avx512_vnni() { return features().vnni && cpu_isa() >= Isa::kAvx512; }

bool has_avx512_bf16() { return features().bf16 && cpu_isa() >= Isa::kAvx512; }

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace sgl_kernel
