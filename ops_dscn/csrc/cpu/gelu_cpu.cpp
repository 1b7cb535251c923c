// CPU kernels of ops_dscn::gelu and ops_dscn::_gelu_backward: the exact (erf) GELU and its gradient,
//
//     gelu(z) = z * cdf(z),    d gelu / dz = cdf(z) + z * pdf(z),
//
// with the float erf and exp of cpu_gelu.h, the same arithmetic the fused kernels (conv_mlp, pointwise_conv,
// strip_offsets) use.
//
// Why: on this project's CPUs ATen's float GELU and GELU backward ran at 2-4 ns per element on 2 threads, 5-10x a
// multiply's time: compute-bound, not memory-bound. In a DSAN-T training step (the attention's proj_1 GELU in every
// block, the unfused MLPs of stages 3-4) they were about 14 % of the step. These vectorized forms are memory-bound.
//
// Layout: any dense (non-overlapping, gap-free) input is processed as a flat array and the output keeps its strides
// (channels_last stays channels_last); other inputs are copied to their suggested memory format first. float64 uses
// std::erf / std::exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/dscn_params.h"
#include "cpu_gelu.h"
#include "cpu_simd.h"

namespace ops_dscn {
namespace {

// Elements per parallel_for grain: small tensors stay on one thread (a fork costs more than their arithmetic).
constexpr int64_t kGrain = 32768;

// y[i] = gelu(x[i]) for i in [i0, i1).
template <int Bytes, typename scalar_t>
DSCN_INLINE void gelu_range_body(const scalar_t* x, scalar_t* y, int64_t i0, int64_t i1) {
  int64_t i = i0;
#if DSCN_HAS_VEC
  if constexpr (std::is_same_v<scalar_t, float>) {
    using VT = Vec<float, Bytes>;
    constexpr int64_t L = VT::size;
    for (; i + L <= i1; i += L) VT::store(y + i, gelu_vec<float, Bytes>(VT::load(x + i)));
  }
#endif
  for (; i < i1; ++i) y[i] = gelu_scalar<scalar_t>(x[i]);
}

// dx[i] = g[i] * gelu'(x[i]) for i in [i0, i1).
template <int Bytes, typename scalar_t>
DSCN_INLINE void gelu_grad_range_body(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t i0, int64_t i1) {
  int64_t i = i0;
#if DSCN_HAS_VEC
  if constexpr (std::is_same_v<scalar_t, float>) {
    using VT = Vec<float, Bytes>;
    using V = typename VT::type;
    constexpr int64_t L = VT::size;
    for (; i + L <= i1; i += L) {
      V act, grad;
      gelu_and_grad_vec<float, Bytes>(VT::load(x + i), act, grad);
      VT::store(dx + i, VT::load(g + i) * grad);
    }
    if (i < i1) {  // the tail through the vector code: the same bits whichever chunk (thread) it falls in
      float grad[L];
      gelu_and_grad_partial<Bytes>(x + i, i1 - i, nullptr, grad);
      for (int64_t j = 0; i < i1; ++i, ++j) dx[i] = g[i] * grad[j];
    }
  }
#endif
  for (; i < i1; ++i) {
    scalar_t act, grad;
    gelu_and_grad_scalar<scalar_t>(x[i], act, grad);
    dx[i] = g[i] * grad;
  }
}

DSCN_DEFINE_ISA_DISPATCH(gelu_range)
DSCN_DEFINE_ISA_DISPATCH(gelu_grad_range)

void check_input(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": ", name,
                    " dtype must be one of float32, float64; got ", dtype_name(dtype));
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU for the CPU kernel; got ", t.device());
}

// `t` itself when it is dense (its memory a gap-free array in some dimension order), else a copy in its suggested
// memory format: the layout empty_like gives, so the fake kernel's strides are these.
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

at::Tensor gelu_cpu(const at::Tensor& input) {
  check_input(input, "gelu", "input");
  const at::Tensor x = dense(input);
  at::Tensor out = at::empty_like(x);  // the same strides: x is dense
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) { gelu_range<scalar_t>(xp, yp, i0, i1); });
  });
  return out;
}

at::Tensor gelu_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  check_input(input, "_gelu_backward", "input");
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), "_gelu_backward: grad_output must have the input's shape ",
                    input.sizes(), "; got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type(),
                    "_gelu_backward: grad_output dtype must equal input dtype ", dtype_name(input.scalar_type()),
                    "; got ", dtype_name(grad_output.scalar_type()));
  TORCH_CHECK(grad_output.device().is_cpu(), "_gelu_backward: grad_output must be on the CPU; got ",
              grad_output.device());
  // Both flat arrays in one element order: the input's when it is dense, the gradient copied into it if needed.
  at::Tensor x = dense(input);
  at::Tensor g = grad_output;
  if (g.strides() != x.strides() || !g.is_non_overlapping_and_dense()) {
    at::Tensor like = at::empty_like(x);
    like.copy_(grad_output);
    g = like;
  }
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) { gelu_grad_range<scalar_t>(gp, xp, dp, i0, i1); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("gelu", &gelu_cpu);
  m.impl("_gelu_backward", &gelu_backward_cpu);
}

}  // namespace ops_dscn
