// SIMD support shared by the CPU kernels (dscn_cpu.cpp, conv_mlp_cpu.cpp): vector types, the run-time ISA choice
// and the per-ISA dispatch macro.
//
// The extension is compiled for the baseline ISA (so the build stays portable); each kernel's task functions are
// also compiled for AVX2 and for AVX-512 and picked at run time from the CPU's features. (GCC 12's target_clones
// resolver was seen picking the baseline clone on AVX-512 AMD CPUs, hence the explicit dispatch.) The environment
// variable DSCN_CPU_ISA=default|avx2|avx512 overrides the choice, e.g. for tests.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define DSCN_X86_DISPATCH 1
#define DSCN_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,f16c")))
#define DSCN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,f16c")))
#else
#define DSCN_X86_DISPATCH 0
#endif

// Helpers of the hot path, lambdas included, are force-inlined into the per-ISA functions so that they are compiled
// for that ISA too: an out-of-line copy would be baseline code (measured: 15x slower when that happened).
#if defined(__GNUC__)
#define DSCN_INLINE inline __attribute__((always_inline))
#define DSCN_LAMBDA_INLINE __attribute__((always_inline))
#else
#define DSCN_INLINE inline
#define DSCN_LAMBDA_INLINE
#endif

namespace ops_dscn {

// SIMD vectors through the GCC/Clang vector extension. The dispatch below passes the ISA's full width as `Bytes`
// (64 on AVX-512, 32 on AVX2, 16 on the baseline); a kernel may use narrower vectors where GCC's code for the wide
// ones was measured slower. Used for float and double; half and bfloat16 take scalar paths.
#if defined(__GNUC__)
#define DSCN_HAS_VEC 1
template <typename T, int Bytes>
struct Vec {
  using type __attribute__((vector_size(Bytes))) = T;
  using itype __attribute__((vector_size(Bytes))) = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr int64_t size = Bytes / sizeof(T);
  static DSCN_INLINE type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static DSCN_INLINE void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  // Every lane s: lane 0 shuffled to all lanes, which GCC emits as one broadcast (or an embedded {1to16} operand).
  // (`type{} + s`, as before, is not s for s = -0.0, so GCC kept an add and its latency before each broadcast: 4 of
  // the 37 instructions of the 20-channel x-strip's tap loop; `s - type{}` and a braced list of s GCC 12 built lane
  // by lane inside the kernels, 2-7x slower.)
  static DSCN_INLINE type broadcast(T s) {
#if defined(__clang__)
    return s - type{};
#else
    return __builtin_shuffle(type{s}, itype{});
#endif
  }
};

// Sum of the lanes of v, as a tree: halves added until two lanes are left (log2(lanes) vector adds). The tree's
// order is fixed, so results do not depend on anything but the input. A lane-by-lane scalar sum costs a lane extract
// and a dependent add per lane: in the DSCN backward, which reduces one vector per tap, it was most of the time.
template <typename T, int Bytes>
DSCN_INLINE T hsum(const typename Vec<T, Bytes>::type& v) {
  if constexpr (Bytes == 2 * static_cast<int>(sizeof(T))) {
    return v[0] + v[1];
  } else {
    using H = Vec<T, Bytes / 2>;
    const auto lo = H::load(reinterpret_cast<const T*>(&v));
    const auto hi = H::load(reinterpret_cast<const T*>(&v) + H::size);
    return hsum<T, Bytes / 2>(lo + hi);
  }
}
#else
#define DSCN_HAS_VEC 0
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

// The best ISA of this CPU, or the one DSCN_CPU_ISA asks for (never one the CPU lacks). Read once per process.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kDefault;
#if DSCN_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      best = Isa::kAvx512;
    }
#endif
    const char* env = std::getenv("DSCN_CPU_ISA");
    if (env != nullptr && *env != '\0') {
      const std::string want(env);
      TORCH_CHECK(want == "default" || want == "avx2" || want == "avx512",
                  "DSCN_CPU_ISA must be one of default, avx2, avx512; got '", want, "'");
      const Isa asked = want == "avx512" ? Isa::kAvx512 : want == "avx2" ? Isa::kAvx2 : Isa::kDefault;
      TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(best), "DSCN_CPU_ISA=", want,
                  " is not supported by this CPU");
      best = asked;
    }
    return best;
  }();
  return isa;
}

}  // namespace ops_dscn

// name<scalar_t>(args...) calls name_body<Bytes, scalar_t>(args...) compiled for the selected ISA, with Bytes its
// vector width.
#if DSCN_X86_DISPATCH
#define DSCN_DEFINE_ISA_DISPATCH(name)                                 \
  template <typename scalar_t, typename... Args>                       \
  DSCN_TARGET_AVX512 void name##_avx512(Args&&... args) {              \
    name##_body<64, scalar_t>(args...);                                \
  }                                                                    \
  template <typename scalar_t, typename... Args>                       \
  DSCN_TARGET_AVX2 void name##_avx2(Args&&... args) {                  \
    name##_body<32, scalar_t>(args...);                                \
  }                                                                    \
  template <typename scalar_t, typename... Args>                       \
  void name(Args&&... args) {                                          \
    switch (::ops_dscn::cpu_isa()) {                                   \
      case ::ops_dscn::Isa::kAvx512:                                   \
        return name##_avx512<scalar_t>(args...);                       \
      case ::ops_dscn::Isa::kAvx2:                                     \
        return name##_avx2<scalar_t>(args...);                         \
      default:                                                         \
        return name##_body<16, scalar_t>(args...);                     \
    }                                                                  \
  }
#else
#define DSCN_DEFINE_ISA_DISPATCH(name)           \
  template <typename scalar_t, typename... Args> \
  void name(Args&&... args) {                    \
    name##_body<16, scalar_t>(args...);          \
  }
#endif
