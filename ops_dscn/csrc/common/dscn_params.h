// Argument checking and canonical geometry of a DSCN call, shared by the CPU and CUDA entry points (host only).
//
// These checks are the operator's definition of a valid call. The pure-PyTorch twin and the fake (meta) kernel run
// the same checks from Python (ops_dscn/functional.py, check_args) with the same messages, and a test feeds every
// rejected case to all three and compares the messages, so the two copies cannot drift apart.
#pragma once

#include <ATen/ATen.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <string>

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

// Output length of a strided, padded, dilated window along one axis: floor((len + 2 pad - span) / stride) + 1,
// with floor division (as Python's //), so a window longer than the padded input gives a length <= 0, which the
// caller rejects, never a truncated 1.
inline int64_t strip_out_len(int64_t len, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t num = len + 2 * pad - (dilation * (kernel - 1) + 1);
  const int64_t q = num / stride;
  return (num % stride != 0 && num < 0 ? q - 1 : q) + 1;
}

// PyTorch's Python name of a dtype (torch.float32 -> "float32"), so messages read the same from C++ and Python.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: {
      std::string name = c10::toString(t);  // e.g. Float8_e4m3fn -> float8_e4m3fn
      for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return name;
    }
  }
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Validates the arguments of ops_dscn::dscn / ops_dscn::_dscn_backward and returns the canonical geometry. Every
// message names the argument and gives the expected and the actual value; argument errors raise ValueError.
inline DSCNParams make_params(const at::Tensor& input, const at::Tensor& offset, int64_t kernel_h, int64_t kernel_w,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                              int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
                              bool remove_center, bool on_x) {
  TORCH_CHECK_VALUE(input.dim() == 4, "dscn: input must be 4-D (N, H, W, C) channels-last; got ", input.dim(),
                    "-D with shape ", input.sizes());
  // An empty image has no pixels to pad (as for torch's convolutions): only the batch may be empty.
  TORCH_CHECK_VALUE(input.size(1) >= 1 && input.size(2) >= 1,
                    "dscn: input must have H >= 1 and W >= 1 (only N may be 0); got shape ", input.sizes());
  TORCH_CHECK_VALUE(offset.dim() == 4, "dscn: offset must be 4-D (N, H_out, W_out, group * K'); got ", offset.dim(),
                    "-D with shape ", offset.sizes());
  TORCH_CHECK_VALUE(input.device() == offset.device(),
                    "dscn: input and offset must be on the same device; got input on ", input.device(),
                    " and offset on ", offset.device());
  TORCH_CHECK_VALUE(supported_dtype(input.scalar_type()),
                    "dscn: input dtype must be one of float64, float32, float16, bfloat16; got ",
                    dtype_name(input.scalar_type()));
  TORCH_CHECK_VALUE(input.scalar_type() == offset.scalar_type(),
                    "dscn: offset dtype must equal input dtype ", dtype_name(input.scalar_type()), "; got ",
                    dtype_name(offset.scalar_type()));
  // Each geometry argument is also bounded by 2^31, so that no product or sum of two of them below (group *
  // group_channels, dilation * (kernel - 1), 2 * pad) can overflow int64 and slip past a check.
  struct Bounded {
    const char* name;
    int64_t value, minimum;
  };
  const Bounded geometry[] = {{"kernel_h", kernel_h, 1},     {"kernel_w", kernel_w, 1},     {"stride_h", stride_h, 1},
                              {"stride_w", stride_w, 1},     {"dilation_h", dilation_h, 1}, {"dilation_w", dilation_w, 1},
                              {"group", group, 1},           {"group_channels", group_channels, 1},
                              {"pad_h", pad_h, 0},           {"pad_w", pad_w, 0}};
  for (const auto& [name, value, minimum] : geometry) {
    TORCH_CHECK_VALUE(value >= minimum, "dscn: ", name, " must be >= ", minimum, "; got ", value);
    TORCH_CHECK_VALUE(value < (int64_t(1) << 31), "dscn: ", name, " must be < 2^31; got ", value);
  }
  TORCH_CHECK_VALUE(std::isfinite(offset_scale), "dscn: offset_scale must be finite; got ", offset_scale);
  // A strip samples along one axis only: the other kernel extent must be 1.
  if (on_x) {
    TORCH_CHECK_VALUE(kernel_h == 1, "dscn: an x-strip (on_x=True) needs kernel_h == 1; got ", kernel_h);
  } else {
    TORCH_CHECK_VALUE(kernel_w == 1, "dscn: a y-strip (on_x=False) needs kernel_w == 1; got ", kernel_w);
  }
  const int64_t K = on_x ? kernel_w : kernel_h;
  TORCH_CHECK_VALUE(!remove_center || K % 2 == 1, "dscn: remove_center needs an odd kernel size; got ", K);
  TORCH_CHECK_VALUE(!remove_center || K > 1, "dscn: remove_center needs a kernel size >= 3; got ", K);
  const int64_t taps = K - (remove_center ? 1 : 0);
  TORCH_CHECK_VALUE(input.size(3) == group * group_channels,
                    "dscn: input channels must equal group * group_channels = ", group, " * ", group_channels, " = ",
                    group * group_channels, "; got ", input.size(3));

  DSCNParams p;
  p.N = input.size(0);
  p.H = input.size(1);
  p.W = input.size(2);
  p.C = input.size(3);
  p.group = group;
  p.group_channels = group_channels;
  p.Ho = strip_out_len(p.H, kernel_h, stride_h, pad_h, dilation_h);
  p.Wo = strip_out_len(p.W, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK_VALUE(p.Ho >= 1 && p.Wo >= 1,
                    "dscn: the output must be at least 1x1; got (H_out, W_out) = (", p.Ho, ", ", p.Wo,
                    ") from input (H, W) = (", p.H, ", ", p.W, ") with kernel (", kernel_h, ", ", kernel_w,
                    "), stride (", stride_h, ", ", stride_w, "), pad (", pad_h, ", ", pad_w, "), dilation (",
                    dilation_h, ", ", dilation_w, ")");
  TORCH_CHECK_VALUE(offset.size(0) == p.N && offset.size(1) == p.Ho && offset.size(2) == p.Wo &&
                        offset.size(3) == group * taps,
                    "dscn: offset must have shape (N, H_out, W_out, group * K') = (", p.N, ", ", p.Ho, ", ", p.Wo,
                    ", ", group * taps, "); got ", offset.sizes());
  // The CPU SIMD path computes sample indices in 32-bit lanes.
  TORCH_CHECK_VALUE((on_x ? p.W : p.H) < (int64_t(1) << 31),
                    "dscn: the sampled axis must be shorter than 2^31; got ", on_x ? p.W : p.H);
  // Sample positions are computed in the accumulation type, float for float32, float16 and bfloat16, which holds
  // every integer only up to 2^24: a longer (padded) axis would sample rounded positions, silently.
  const int64_t padded_axis = on_x ? p.W + 2 * pad_w : p.H + 2 * pad_h;
  TORCH_CHECK_VALUE(input.scalar_type() == at::kDouble || padded_axis <= (int64_t(1) << 24),
                    "dscn: the sampled axis plus its padding must be at most 2^24 = 16777216 for ",
                    dtype_name(input.scalar_type()), " (sample positions are float32; float64 has no such limit); got ",
                    padded_axis);
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

// Checks of the backward's extra arguments, shared by both backends.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const DSCNParams& p) {
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({p.N, p.Ho, p.Wo, p.C}),
                    "dscn backward: grad_output must have shape (N, H_out, W_out, C) = (", p.N, ", ", p.Ho, ", ",
                    p.Wo, ", ", p.C, "); got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == input.device(), "dscn backward: grad_output must be on ", input.device(),
                    "; got ", grad_output.device());
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type(), "dscn backward: grad_output dtype must be ",
                    dtype_name(input.scalar_type()), "; got ", dtype_name(grad_output.scalar_type()));
}

}  // namespace ops_dscn
