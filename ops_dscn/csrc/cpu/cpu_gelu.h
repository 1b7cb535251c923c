// Exact (erf) GELU for the CPU kernels (conv_mlp_cpu.cpp, strip_offsets_cpu.cpp): scalar and SIMD versions.
#pragma once

#include <cmath>
#include <type_traits>

#include "cpu_simd.h"

namespace ops_dscn {

// erf for float: x * P(x^2) / Q(x^2) on [-4, 4] (the rational approximation used by Eigen's and XLA's fast float
// erf; |error| < 2e-7), +-1 outside, where float erf rounds to +-1 anyway. float64 uses std::erf.
template <typename V>
DSCN_INLINE V erf_rational(V x) {
  x = x < V{} + 4.f ? x : V{} + 4.f;
  x = x > V{} - 4.f ? x : V{} - 4.f;
  const V x2 = x * x;
  V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  p = x * p;
  V q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return p / q;
}

template <typename scalar_t>
DSCN_INLINE scalar_t gelu_scalar(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return 0.5f * x * (1.f + erf_rational(x * static_cast<float>(M_SQRT1_2)));
  } else {
    return 0.5 * x * (1. + std::erf(x * M_SQRT1_2));
  }
}

#if DSCN_HAS_VEC
template <typename scalar_t, int Bytes>
DSCN_INLINE typename Vec<scalar_t, Bytes>::type gelu_vec(typename Vec<scalar_t, Bytes>::type x) {
  using V = typename Vec<scalar_t, Bytes>::type;
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x * 0.5f * (1.f + erf_rational<V>(x * static_cast<float>(M_SQRT1_2)));
  } else {
    for (int i = 0; i < Vec<scalar_t, Bytes>::size; ++i) x[i] = gelu_scalar<scalar_t>(x[i]);
    return x;
  }
}
#endif

}  // namespace ops_dscn
