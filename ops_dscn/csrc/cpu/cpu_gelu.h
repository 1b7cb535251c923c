// Exact (erf) GELU and its derivative for the CPU kernels (conv_mlp_cpu.cpp, strip_offsets_cpu.cpp): scalar and SIMD
// versions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
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

// exp for float: Cephes' expf (2^n * a degree-6 polynomial on |r| <= ln2 / 2; relative error < 2e-7), arguments
// clamped to at most 88; below -87 the result is 0 (exp(-87) ~ 1.6e-38 is the smallest normal result). Returning
// exp(-87) there instead would keep the GELU derivative's z * pdf(z) growing with |z| (-2.2 at z = -3.4e38, where
// the derivative is 0).
template <typename V, typename IV>
DSCN_INLINE V exp_cephes(V x) {
  const V arg = x;
  x = x < V{} + 88.f ? x : V{} + 88.f;
  x = x > V{} - 87.f ? x : V{} - 87.f;
  const V t = x * 1.44269504088896341f;
  // round to nearest: convertvector truncates toward zero
  const IV n = __builtin_convertvector(t + (t >= V{} ? V{} + 0.5f : V{} - 0.5f), IV);
  const V nf = __builtin_convertvector(n, V);
  const V r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = r * p + 8.3334519073e-3f;
  p = r * p + 4.1665795894e-2f;
  p = r * p + 1.6666665459e-1f;
  p = r * p + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IV bits = (n + 127) << 23;  // 2^n as a float's bit pattern (n in [-126, 127] after the clamp)
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return arg >= V{} - 87.f ? p * scale : V{};  // NaN: 0 too; the callers' z * pdf then stays NaN
}

// The exact GELU and its derivative at once: gelu(z) = z * cdf(z), gelu'(z) = cdf(z) + z * pdf(z), with cdf and pdf
// the standard normal's. Scalar version (float64 uses std::erf / std::exp).
template <typename scalar_t>
DSCN_INLINE void gelu_and_grad_scalar(scalar_t z, scalar_t& act, scalar_t& grad) {
  constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  scalar_t cdf, pdf;
  if constexpr (std::is_same_v<scalar_t, float>) {
    cdf = 0.5f * (1.f + erf_rational(z * static_cast<float>(M_SQRT1_2)));
#if defined(__GNUC__)
    // scalar exp through the same code as the vectors. Not bit for bit the vector lanes' result when the compiler
    // contracts multiply-adds differently for scalars (AVX2 / AVX-512 builds): float loops whose tails must agree
    // with their lanes take them through gelu_and_grad_partial instead.
    using V1 = float __attribute__((vector_size(4)));
    using I1 = int32_t __attribute__((vector_size(4)));
    const V1 v = {-0.5f * z * z};
    pdf = static_cast<float>(kInvSqrt2Pi) * exp_cephes<V1, I1>(v)[0];
#else
    pdf = static_cast<float>(kInvSqrt2Pi) * std::exp(-0.5f * z * z);
#endif
  } else {
    cdf = 0.5 * (1. + std::erf(z * M_SQRT1_2));
    pdf = kInvSqrt2Pi * std::exp(-0.5 * z * z);
  }
  act = z * cdf;
  grad = cdf + z * pdf;
}

#if DSCN_HAS_VEC
// Vector version of gelu_and_grad_scalar.
template <typename scalar_t, int Bytes>
DSCN_INLINE void gelu_and_grad_vec(typename Vec<scalar_t, Bytes>::type z, typename Vec<scalar_t, Bytes>::type& act,
                                   typename Vec<scalar_t, Bytes>::type& grad) {
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const V cdf = 0.5f * (1.f + erf_rational<V>(z * static_cast<float>(M_SQRT1_2)));
    const V pdf = 0.39894228040143267794f * exp_cephes<V, typename VT::itype>(-0.5f * z * z);
    act = z * cdf;
    grad = cdf + z * pdf;
  } else {
    for (int i = 0; i < VT::size; ++i) {
      scalar_t a, g;
      gelu_and_grad_scalar<scalar_t>(z[i], a, g);
      act[i] = a;
      grad[i] = g;
    }
  }
}

// gelu_and_grad_vec over the n < lanes floats at z (the other lanes zero), results to grad and, unless nullptr, act.
// For the tails of float loops: an element's result then does not depend on whether it falls in a tail, i.e. on
// the thread count that places the tails.
template <int Bytes>
DSCN_INLINE void gelu_and_grad_partial(const float* z, int64_t n, float* act, float* grad) {
  using V = typename Vec<float, Bytes>::type;
  V zv{};
  std::memcpy(&zv, z, n * sizeof(float));
  V a, g;
  gelu_and_grad_vec<float, Bytes>(zv, a, g);
  std::memcpy(grad, &g, n * sizeof(float));
  if (act != nullptr) std::memcpy(act, &a, n * sizeof(float));
}

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
