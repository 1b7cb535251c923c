// Small weight tensors re-laid out for the CPU kernels (conv_mlp_cpu.cpp, strip_offsets_cpu.cpp) by plain loops.
//
// Why not ATen ops (reshape -> t -> contiguous): each call of those dispatches and allocates, 15-20 us per weight
// for copies of a few thousand values; in a compiled batch-1 DSAN-T forward the kernels' weight copies were 39 calls
// and about 4 % of the time (torch.profiler).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

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

}  // namespace ops_dscn
