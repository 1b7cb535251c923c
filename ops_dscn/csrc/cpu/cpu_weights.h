// Small weight tensors re-laid out for the CPU kernels (conv_mlp_cpu.cpp, strip_offsets_cpu.cpp) by plain loops, and
// the checks of weights packed before (pack_weight in pointwise_cpu.cpp).
//
// Why not ATen ops (reshape -> t -> contiguous): each call of those dispatches and allocates, 15-20 us per weight
// for copies of a few thousand values; in a compiled batch-1 DSAN-T forward the kernels' weight copies were 39 calls
// and about 4 % of the time (torch.profiler).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_small_gemm.h"

namespace ops_dscn {

// The taps of a depthwise conv weight (C, 1, kh, kw), taps = kh * kw, into `out` as a tap-major (taps, C) array, so
// that a tap's weights are contiguous over channels as the kernels' vector loops read them.
template <typename scalar_t>
void tap_major(const at::Tensor& weight, int64_t C, int64_t taps, std::vector<scalar_t>& out) {
  const c10::MaybeOwned<at::Tensor> w = weight.expect_contiguous();
  const scalar_t* src = w->const_data_ptr<scalar_t>();
  out.resize(taps * C);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < taps; ++t) out[t * C + c] = src[c * taps + t];
  }
}

// A (n,) vector's values, or n zeros without one.
template <typename scalar_t>
void values_or_zeros(const std::optional<at::Tensor>& v, int64_t n, std::vector<scalar_t>& out) {
  out.assign(n, scalar_t(0));
  if (v.has_value()) {
    const c10::MaybeOwned<at::Tensor> c = v->expect_contiguous();
    std::copy_n(c->const_data_ptr<scalar_t>(), n, out.begin());
  }
}

// Checks `packed`, the argument `name` of `op`: the packed form (ops_dscn::pack_weight) of an (n, k) weight for a
// float32 `input`: a contiguous 1-D float32 CPU tensor of PanelMatrix<float>::packed_size(n, k) values.
inline void check_packed(const at::Tensor& packed, const char* op, const char* name, int64_t n, int64_t k,
                         const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat, op, ": ", name, " (packed weights) needs a float32 input; got ",
                    dtype_name(input.scalar_type()));
  const int64_t size = PanelMatrix<float>::packed_size(n, k);
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.numel() == size, op, ": ", name, " must have shape (", size,
                    ",), the packed form of a (", n, ", ", k, ") weight (ops_dscn.pack_weight); got ", packed.sizes());
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kFloat, op, ": ", name, " dtype must be float32; got ",
                    dtype_name(packed.scalar_type()));
  TORCH_CHECK_VALUE(packed.device().is_cpu(), op, ": ", name, " must be a CPU tensor; got ", packed.device());
  TORCH_CHECK_VALUE(packed.is_contiguous(), op, ": ", name, " must be contiguous; got strides ", packed.strides());
}

}  // namespace ops_dscn
