// CPU kernel of ops_dscn::_dw_conv_weight_grad: the weight gradient of a depthwise 2-D convolution (groups = C, one
// filter per channel, zero padding) on channels_last tensors.
//
// Why: ATen's (oneDNN's) depthwise weight gradient was measured at about ten times the time of the same conv's
// input gradient on channels_last tensors (12 ms against 1.3 ms for DSAN-T's stage-1 5x5 conv at batch 16, 2
// threads), and DSAN's depthwise convs (the 5x5 of each attention, the 1xK / Kx1 of each offset branch, the MLP's
// 3x3) made it a large part of a training step. Here dW[c, ky, kx] = sum over (n, ho, wo) of g[n, ho, wo, c] *
// x[n, ho * sh - ph + ky * dh, wo * sw - pw + kx * dw, c] runs as vector loops over channels: for one output row and
// one kernel row, the kernel row's taps accumulate in registers along the row, so each loaded gradient vector
// serves every tap of that kernel row.
//
// Threads take rows (n, ho) and accumulate in their own buffer; the buffers are summed in thread order at the end
// (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_simd.h"

namespace ops_dscn {
namespace {

struct DwDims {
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Most kernel rows handled with the taps' sums in registers (DSAN's longest strip is 15).
constexpr int kMaxKh = 16;

// Adds to acc ((kh, kw, C) tap-major) the contributions of the output rows [t0, t1) of the flattened (n, ho) range.
// KH, KW > 0: the kernel size known at compile time, so that a channel chunk's kh * kw tap sums stay in registers
// over all the rows (each loaded gradient vector serves every tap); 0: any size, one tap at a time. Kernel rows
// outside the input read `zero_row` (W * C zeros) instead, so every output row takes the same path; only the border
// columns, whose taps leave the input's width, check each tap (and accumulate in memory).
template <int Bytes, int KH, int KW, typename scalar_t>
DSCN_INLINE void weight_grad_block(const DwDims& d, const scalar_t* g, const scalar_t* x, const scalar_t* zero_row,
                                   scalar_t* acc, int64_t t0, int64_t t1) {
  const int64_t kh = KH > 0 ? KH : d.kh, kw = KW > 0 ? KW : d.kw;
  const int64_t C = d.C;
  // Output columns whose taps all fall inside the input: [w_lo, w_hi); the others are border columns.
  const int64_t w_lo = std::min(d.Wo, std::max<int64_t>(0, (d.pw + d.sw - 1) / d.sw));
  const int64_t w_hi = std::max(w_lo, std::min(d.Wo, (d.W - 1 + d.pw - (kw - 1) * d.dw) / d.sw + 1));
  const scalar_t* xr[kMaxKh];  // the input rows of the kernel rows of the current output row
  const auto set_rows = [&](int64_t t) DSCN_LAMBDA_INLINE {
    const int64_t n = t / d.Ho, ho = t % d.Ho;
    for (int64_t ky = 0; ky < kh; ++ky) {
      const int64_t hi = ho * d.sh - d.ph + ky * d.dh;
      xr[ky] = hi >= 0 && hi < d.H ? x + (n * d.H + hi) * d.W * C : zero_row;
    }
  };
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  for (; c0 + L <= C; c0 += L) {
    V a[KH > 0 && KW > 0 ? KH * KW : 1] = {};
    for (int64_t t = t0; t < t1; ++t) {
      set_rows(t);
      const scalar_t* grow = g + t * d.Wo * C + c0;
      if constexpr (KH > 0 && KW > 0) {
        for (int64_t wo = w_lo; wo < w_hi; ++wo) {
          const V gv = VT::load(grow + wo * C);
          const int64_t off = (wo * d.sw - d.pw) * C + c0;
#pragma GCC unroll 16
          for (int ky = 0; ky < KH; ++ky) {
#pragma GCC unroll 16
            for (int kx = 0; kx < KW; ++kx) a[ky * KW + kx] += gv * VT::load(xr[ky] + off + kx * d.dw * C);
          }
        }
      } else {
        for (int64_t ky = 0; ky < kh; ++ky) {
          for (int64_t kx = 0; kx < kw; ++kx) {
            V sum = {};
            for (int64_t wo = w_lo; wo < w_hi; ++wo) {
              sum += VT::load(grow + wo * C) * VT::load(xr[ky] + (wo * d.sw - d.pw + kx * d.dw) * C + c0);
            }
            scalar_t* ap = acc + (ky * kw + kx) * C + c0;
            VT::store(ap, VT::load(ap) + sum);
          }
        }
      }
      // Border columns: each tap checked against the input's width.
      const auto border = [&](int64_t wa, int64_t wb) DSCN_LAMBDA_INLINE {
        for (int64_t wo = wa; wo < wb; ++wo) {
          const V gv = VT::load(grow + wo * C);
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t wi = wo * d.sw - d.pw + kx * d.dw;
            if (wi < 0 || wi >= d.W) continue;
            for (int64_t ky = 0; ky < kh; ++ky) {
              scalar_t* ap = acc + (ky * kw + kx) * C + c0;
              VT::store(ap, VT::load(ap) + gv * VT::load(xr[ky] + wi * C + c0));
            }
          }
        }
      };
      border(0, w_lo);
      border(w_hi, d.Wo);
    }
    if constexpr (KH > 0 && KW > 0) {
#pragma GCC unroll 32
      for (int k = 0; k < KH * KW; ++k) VT::store(acc + k * C + c0, VT::load(acc + k * C + c0) + a[k]);
    }
  }
#endif
  for (int64_t t = t0; t < t1 && c0 < C; ++t) {  // channels the vectors do not cover: every column, scalar
    set_rows(t);
    const scalar_t* grow = g + t * d.Wo * C;
    for (int64_t wo = 0; wo < d.Wo; ++wo) {
      for (int64_t kx = 0; kx < kw; ++kx) {
        const int64_t wi = wo * d.sw - d.pw + kx * d.dw;
        if (wi < 0 || wi >= d.W) continue;
        for (int64_t ky = 0; ky < kh; ++ky) {
          for (int64_t c = c0; c < C; ++c) acc[(ky * kw + kx) * C + c] += grow[wo * C + c] * xr[ky][wi * C + c];
        }
      }
    }
  }
}

// Rows [begin, end) of the flattened (n, ho) range into acc.
template <int Bytes, typename scalar_t>
DSCN_INLINE void weight_grad_rows_body(const DwDims& d, const scalar_t* g, const scalar_t* x, scalar_t* acc,
                                       int64_t begin, int64_t end) {
  const std::vector<scalar_t> zero_row(d.W * d.C, scalar_t(0));
  const auto rows = [&](auto kh, auto kw) DSCN_LAMBDA_INLINE {
    weight_grad_block<Bytes, decltype(kh)::value, decltype(kw)::value>(d, g, x, zero_row.data(), acc, begin, end);
  };
  using std::integral_constant;
  // DSAN's kernels: 3x3 (MLP), 5x5 (attention), 1xK / Kx1 with K = 5, 7, 11, 13, 15 (offset branches).
  const auto strip = [&](auto k) DSCN_LAMBDA_INLINE {
    if (d.kh == 1 && d.kw == decltype(k)::value) return rows(integral_constant<int, 1>{}, k), true;
    if (d.kw == 1 && d.kh == decltype(k)::value) return rows(k, integral_constant<int, 1>{}), true;
    return false;
  };
  if (d.kh == 3 && d.kw == 3) return rows(integral_constant<int, 3>{}, integral_constant<int, 3>{});
  if (d.kh == 5 && d.kw == 5) return rows(integral_constant<int, 5>{}, integral_constant<int, 5>{});
  if (strip(integral_constant<int, 5>{}) || strip(integral_constant<int, 7>{}) || strip(integral_constant<int, 11>{})
      || strip(integral_constant<int, 13>{}) || strip(integral_constant<int, 15>{})) {
    return;
  }
  rows(integral_constant<int, 0>{}, integral_constant<int, 0>{});
}

DSCN_DEFINE_ISA_DISPATCH(weight_grad_rows)

// grad_output (N, C, Ho, Wo) and input (N, C, H, W), any memory format (channels_last avoids a copy) -> the weight
// gradient (C, 1, kh, kw) of conv2d(input, weight, stride, padding, dilation, groups=C).
at::Tensor dw_conv_weight_grad_cpu(const at::Tensor& grad_output_, const at::Tensor& input_, int64_t kernel_h,
                                   int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                   int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  TORCH_CHECK_VALUE(input_.dim() == 4, "dw_conv_weight_grad: input must be 4-D (N, C, H, W); got ", input_.dim(),
                    "-D with shape ", input_.sizes());
  TORCH_CHECK_VALUE(input_.scalar_type() == at::kFloat || input_.scalar_type() == at::kDouble,
                    "dw_conv_weight_grad: input dtype must be one of float32, float64; got ",
                    dtype_name(input_.scalar_type()));
  TORCH_CHECK_VALUE(kernel_h >= 1 && kernel_w >= 1 && stride_h >= 1 && stride_w >= 1 && dilation_h >= 1 &&
                        dilation_w >= 1 && pad_h >= 0 && pad_w >= 0,
                    "dw_conv_weight_grad: kernel, stride and dilation must be >= 1 and padding >= 0; got kernel (",
                    kernel_h, ", ", kernel_w, "), stride (", stride_h, ", ", stride_w, "), padding (", pad_h, ", ",
                    pad_w, "), dilation (", dilation_h, ", ", dilation_w, ")");
  TORCH_CHECK_VALUE(kernel_h <= kMaxKh, "dw_conv_weight_grad: kernel_h must be at most ", kMaxKh, "; got ", kernel_h);
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  const int64_t Ho = (H + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1;
  const int64_t Wo = (W + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1;
  const std::vector<int64_t> expected{N, C, Ho, Wo};
  TORCH_CHECK_VALUE(grad_output_.sizes() == at::IntArrayRef(expected),
                    "dw_conv_weight_grad: grad_output must have shape ", at::IntArrayRef(expected), "; got ",
                    grad_output_.sizes());
  TORCH_CHECK_VALUE(grad_output_.scalar_type() == input_.scalar_type(),
                    "dw_conv_weight_grad: grad_output dtype must equal input dtype ", dtype_name(input_.scalar_type()),
                    "; got ", dtype_name(grad_output_.scalar_type()));
  TORCH_CHECK(input_.device().is_cpu() && grad_output_.device().is_cpu(),
              "dw_conv_weight_grad: tensors must be on the CPU for the CPU kernel; got ", input_.device(), " and ",
              grad_output_.device());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor input = input_.contiguous(cl), grad = grad_output_.contiguous(cl);
  const DwDims d{N, C, H, W, Ho, Wo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w};
  const int64_t taps = kernel_h * kernel_w;
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, taps, C}, input.options());
  if (N * Ho * Wo * C > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dw_conv_weight_grad_cpu", [&] {
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* part = partial.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {  // per-thread buffers: see the top
        weight_grad_rows<scalar_t>(d, g, x, part + at::get_thread_num() * taps * C, begin, end);
      });
    });
  }
  // (taps, C) -> (C, 1, kh, kw)
  return partial.sum(0).t().contiguous().view({C, 1, kernel_h, kernel_w});
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("_dw_conv_weight_grad", &dw_conv_weight_grad_cpu);
}

}  // namespace ops_dscn
