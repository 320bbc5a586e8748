// Run-time choice of the micro-kernel: AVX2+FMA where the CPU has it, the portable kernel otherwise.
// SPAE_FAST_CPU_ISA=portable|avx2 (read once at load) or spae_fast._C.set_isa() overrides the choice.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/spae_native.h"

namespace spae {

bool cpu_supports_avx2_fma() {
#if defined(SPAE_HAVE_AVX2_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_supports_avx512_vnni() {
#if defined(SPAE_HAVE_AVX512VNNI_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_supports_avx512_bf16() {
#if defined(SPAE_HAVE_AVX512BF16_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

static Isa default_isa() {
  const bool has_avx2 = cpu_supports_avx2_fma();
  if (const char* forced = std::getenv("SPAE_FAST_CPU_ISA")) {
    if (std::strcmp(forced, "portable") == 0) return Isa::Portable;
    if (std::strcmp(forced, "avx2") == 0 && has_avx2) return Isa::Avx2Fma;
  }
  return has_avx2 ? Isa::Avx2Fma : Isa::Portable;
}

static std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(default_isa())};
  return slot;
}

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (isa == Isa::Avx2Fma && !cpu_supports_avx2_fma()) return false;
  isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* isa_name(Isa isa) { return isa == Isa::Avx2Fma ? "avx2" : "portable"; }

}  // namespace spae
