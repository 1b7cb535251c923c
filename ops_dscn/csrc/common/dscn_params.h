// Argument checking and canonical geometry of a DSCN call, shared by the CPU and CUDA entry points (host only).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dscn_sampling.h"

namespace ops_dscn {

// Everything a kernel needs, in the canonical frame: `geom` describes the sampling axis (W for the x-strip, H for
// the y-strip); the other axis is sampled with a single tap at o * orth_stride - orth_pad.
struct DSCNParams {
  StripGeometry geom;
  int64_t N, H, W, C;
  int64_t group, group_channels;
  int64_t Ho, Wo;
  int64_t orth_len, orth_stride, orth_pad;
  double offset_scale;
  bool on_x;
};

inline int64_t strip_out_len(int64_t len, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (len + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

// Validates the arguments of ops_dscn::dscn / ops_dscn::_dscn_backward and returns the canonical geometry.
// Every message names the argument and gives the expected and the actual value.
inline DSCNParams make_params(const at::Tensor& input, const at::Tensor& offset, int64_t kernel_h, int64_t kernel_w,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                              int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
                              bool remove_center, bool on_x) {
  TORCH_CHECK(input.dim() == 4, "dscn: input must be 4-D (N, H, W, C) channels-last; got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(offset.dim() == 4, "dscn: offset must be 4-D (N, H_out, W_out, group * K); got ", offset.dim(),
              "-D with shape ", offset.sizes());
  TORCH_CHECK(input.device() == offset.device(), "dscn: input and offset must be on the same device; got input on ",
              input.device(), " and offset on ", offset.device());
  TORCH_CHECK(input.scalar_type() == offset.scalar_type(),
              "dscn: input and offset must have the same dtype; got input ", input.scalar_type(), " and offset ",
              offset.scalar_type());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "dscn: input must be a floating point tensor; got ",
              input.scalar_type());
  TORCH_CHECK(group > 0, "dscn: group must be positive; got ", group);
  TORCH_CHECK(group_channels > 0, "dscn: group_channels must be positive; got ", group_channels);
  TORCH_CHECK(input.size(3) == group * group_channels, "dscn: input channels must equal group * group_channels = ",
              group, " * ", group_channels, " = ", group * group_channels, "; got ", input.size(3));
  TORCH_CHECK(stride_h > 0 && stride_w > 0, "dscn: stride must be positive; got (stride_h, stride_w) = (", stride_h,
              ", ", stride_w, ")");
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0, "dscn: dilation must be positive; got (dilation_h, dilation_w) = (",
              dilation_h, ", ", dilation_w, ")");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "dscn: pad must be non-negative; got (pad_h, pad_w) = (", pad_h, ", ", pad_w,
              ")");
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0, "dscn: kernel size must be positive; got (kernel_h, kernel_w) = (",
              kernel_h, ", ", kernel_w, ")");
  // A strip samples along one axis only: the other kernel extent must be 1.
  if (on_x) {
    TORCH_CHECK(kernel_h == 1, "dscn: an x-strip (on_x=True) needs kernel_h == 1; got kernel_h = ", kernel_h);
  } else {
    TORCH_CHECK(kernel_w == 1, "dscn: a y-strip (on_x=False) needs kernel_w == 1; got kernel_w = ", kernel_w);
  }
  const int64_t K = on_x ? kernel_w : kernel_h;
  TORCH_CHECK(!remove_center || K % 2 == 1, "dscn: remove_center needs an odd kernel size; got ", K);
  const int64_t taps = K - (remove_center ? 1 : 0);
  TORCH_CHECK(taps > 0, "dscn: remove_center with kernel size 1 leaves no tap");

  DSCNParams p;
  p.N = input.size(0);
  p.H = input.size(1);
  p.W = input.size(2);
  p.C = input.size(3);
  p.group = group;
  p.group_channels = group_channels;
  p.Ho = strip_out_len(p.H, kernel_h, stride_h, pad_h, dilation_h);
  p.Wo = strip_out_len(p.W, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK(p.Ho > 0 && p.Wo > 0, "dscn: kernel, stride, pad and dilation give an empty output: input (H, W) = (",
              p.H, ", ", p.W, "), output (H_out, W_out) = (", p.Ho, ", ", p.Wo, ")");
  TORCH_CHECK(offset.size(0) == p.N && offset.size(1) == p.Ho && offset.size(2) == p.Wo &&
                  offset.size(3) == group * taps,
              "dscn: offset must have shape (N, H_out, W_out, group * K') = (", p.N, ", ", p.Ho, ", ", p.Wo, ", ",
              group * taps, "); got ", offset.sizes());
  // The CPU SIMD path computes sample indices in 32-bit lanes.
  TORCH_CHECK((on_x ? p.W : p.H) < (int64_t(1) << 31), "dscn: the sampled axis must be shorter than 2^31; got ",
              on_x ? p.W : p.H);
  p.on_x = on_x;
  p.offset_scale = offset_scale;
  p.geom.kernel = K;
  p.geom.taps = taps;
  p.geom.center = remove_center ? K / 2 : -1;
  if (on_x) {
    p.geom.axis_len = p.W;
    p.geom.stride = stride_w;
    p.geom.pad = pad_w;
    p.geom.dilation = dilation_w;
    p.orth_len = p.H;
    p.orth_stride = stride_h;
    p.orth_pad = pad_h;
  } else {
    p.geom.axis_len = p.H;
    p.geom.stride = stride_h;
    p.geom.pad = pad_h;
    p.geom.dilation = dilation_h;
    p.orth_len = p.W;
    p.orth_stride = stride_w;
    p.orth_pad = pad_w;
  }
  return p;
}

}  // namespace ops_dscn
