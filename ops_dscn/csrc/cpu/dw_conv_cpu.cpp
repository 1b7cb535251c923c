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
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "cpu_weights.h"

namespace ops_dscn {
namespace {

struct DwDims {
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Most kernel rows a call takes (the row pointers live on the stack). DSAN's longest strip is 19 (dsan_t2's
// stage-1 Kx1 offset conv); ops_dscn/depthwise.py sends taller kernels to ATen (MAX_KERNEL_H there).
constexpr int kMaxKh = 32;

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

// ---------------------------------------------------------------------------------------------------------------
// Forward: out[n, ho, wo, c] = bias[c] + sum over (ky, kx) of x[n, ho * sh - ph + ky * dh, wo * sw - pw + kx * dw, c] *
// w[c, ky, kx], zero padding, channels_last.
//
// Why not ATen's (oneDNN's) depthwise conv: on one image it spends most of its time outside the arithmetic (DSAN-T's
// attention 5x5 convs took 58-87 us a call at batch 1 on 2 threads, 0.03-0.19 ns a multiply-add against 0.016-0.021
// at batch 32). Here threads take output rows (n, ho). The interior columns (all taps inside the input's width) are
// computed in blocks of 8 (then 4) columns by one channel vector: a kernel row's input vectors are loaded once for
// all its taps, and a tap's weight vector serves the block's columns. The border columns take the taps inside the
// width one by one. Kernel rows outside the input read `zero_row` (as in the weight gradient above).
//
// Measured against F.conv2d on channels_last tensors (2 threads, AVX-512 Xeon, DSAN-T's 5x5 shapes): 2.3-3.4x as
// fast at batch 1, 1.4-2.3x at batch 2, about even at batch 4 and 0.5-1.1x at batch 32 (slowest at 7x7, whose
// interior is too narrow for a block): ops_dscn.DepthwiseConv2d uses it up to batch 2 (see depthwise.py).

// Output rows [t0, t1) of the flattened (n, ho) range. wt: the weight tap-major ((kh * kw, C), see tap_major), for the
// channels the vectors do not cover; wpack: the same chunk by chunk (see forward_rows_body); b:
// the bias (C values, zeros without one). KH, KW > 0: the kernel size known at compile time; 0: any size.
template <int Bytes, int KH, int KW, typename scalar_t>
DSCN_INLINE void forward_block(const DwDims& d, const scalar_t* x, const scalar_t* wt, const scalar_t* wpack,
                               const scalar_t* b, const scalar_t* zero_row, scalar_t* out, int64_t t0, int64_t t1) {
  const int64_t kh = KH > 0 ? KH : d.kh, kw = KW > 0 ? KW : d.kw;
  const int64_t C = d.C;
  const int64_t w_lo = std::min(d.Wo, std::max<int64_t>(0, (d.pw + d.sw - 1) / d.sw));
  const int64_t w_hi = std::max(w_lo, std::min(d.Wo, (d.W - 1 + d.pw - (kw - 1) * d.dw) / d.sw + 1));
  const scalar_t* xr[kMaxKh];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / d.Ho, ho = t % d.Ho;
    for (int64_t ky = 0; ky < kh; ++ky) {
      const int64_t hi = ho * d.sh - d.ph + ky * d.dh;
      xr[ky] = hi >= 0 && hi < d.H ? x + (n * d.H + hi) * d.W * C : zero_row;
    }
    scalar_t* orow = out + t * d.Wo * C;
    int64_t c0 = 0;
#if DSCN_HAS_VEC
    using VT = Vec<scalar_t, Bytes>;
    using V = typename VT::type;
    constexpr int64_t L = VT::size;
    const int64_t cv = C / L * L;  // channels the vectors cover
    const int64_t taps = kh * kw;
    bool blocked = false;          // the interior columns [w_lo, w_hi) are done
    if constexpr (KH > 0 && KW > 0) {
      // Interior columns NC at a time (stride and dilation 1), all channel chunks of a block before the next block
      // (the block's input pixels are then read as whole contiguous runs): per kernel row, the KW + NC - 1 input
      // vectors a chunk reads are loaded once and each serves up to KW taps; a tap's weight vector serves NC columns.
      const auto block = [&](auto nc, int64_t wb) DSCN_LAMBDA_INLINE {
        constexpr int NC = decltype(nc)::value, NX = KW + NC - 1;
        const int64_t off = (wb - d.pw) * C;
        for (int64_t c = 0; c < cv; c += L) {
          const scalar_t* wc = wpack + c * taps;  // the chunk's taps, L values each (see forward_rows_body)
          V acc[NC];
          const V bias = VT::load(b + c);
#pragma GCC unroll 8
          for (int j = 0; j < NC; ++j) acc[j] = bias;
#pragma GCC unroll 16
          for (int ky = 0; ky < KH; ++ky) {
            V xv[NX];
            const scalar_t* p = xr[ky] + off + c;
#pragma GCC unroll 32
            for (int i = 0; i < NX; ++i) {
              xv[i] = VT::load(p);
              p += C;
              // Keeps the pointer a running sum: otherwise GCC hoists all KH * NX addresses out of the loops and
              // spills most of them (measured 3x slower).
              asm("" : "+r"(p));
            }
#pragma GCC unroll 16
            for (int kx = 0; kx < KW; ++kx) {
              const V wv = VT::load(wc + (ky * KW + kx) * L);
#pragma GCC unroll 8
              for (int j = 0; j < NC; ++j) acc[j] += xv[kx + j] * wv;
            }
          }
          scalar_t* o = orow + wb * C + c;
#pragma GCC unroll 8
          for (int j = 0; j < NC; ++j) {
            VT::store(o, acc[j]);
            o += C;
            asm("" : "+r"(o));
          }
        }
      };
      using wide = std::integral_constant<int, 8>;
      using narrow = std::integral_constant<int, 4>;
      if (d.sw == 1 && d.dw == 1 && w_hi - w_lo >= narrow::value) {
        int64_t wo = w_lo;
        for (; wo + wide::value <= w_hi; wo += wide::value) block(wide{}, wo);
        for (; wo + narrow::value <= w_hi; wo += narrow::value) block(narrow{}, wo);
        // The last few columns: a block that ends at w_hi and overlaps the one before (it recomputes the same
        // values, in the same order).
        if (wo < w_hi) block(narrow{}, w_hi - narrow::value);
        blocked = true;
      }
    }
    // One column at a time, with only the taps inside the input's width: the border columns, and every column where
    // the blocks do not apply.
    const auto column = [&](int64_t wo, int64_t c) DSCN_LAMBDA_INLINE {
      const int64_t base = wo * d.sw - d.pw;
      const int64_t kx0 = base >= 0 ? 0 : (-base + d.dw - 1) / d.dw;
      const int64_t kx1 = base > d.W - 1 ? 0 : std::min(kw, (d.W - 1 - base) / d.dw + 1);
      const scalar_t* wc = wpack + c * taps;
      V acc = VT::load(b + c);
      for (int64_t ky = 0; ky < kh; ++ky) {
        const scalar_t* p = xr[ky] + (base + kx0 * d.dw) * C + c;
        const scalar_t* wp = wc + (ky * kw + kx0) * L;
        for (int64_t kx = kx0; kx < kx1; ++kx) {
          acc += VT::load(p) * VT::load(wp);
          p += d.dw * C;
          wp += L;
        }
      }
      VT::store(orow + wo * C + c, acc);
    };
    for (int64_t wo = 0; wo < d.Wo; ++wo) {
      if (blocked && wo == w_lo) wo = w_hi;
      if (wo >= d.Wo) break;
      for (int64_t c = 0; c < cv; c += L) column(wo, c);
    }
    c0 = cv;
#endif
    for (; c0 < C; ++c0) {  // channels the vectors do not cover, scalar
      for (int64_t wo = 0; wo < d.Wo; ++wo) {
        scalar_t acc = b[c0];
        for (int64_t ky = 0; ky < kh; ++ky) {
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t wi = wo * d.sw - d.pw + kx * d.dw;
            if (wi < 0 || wi >= d.W) continue;
            acc += xr[ky][wi * C + c0] * wt[(ky * kw + kx) * C + c0];
          }
        }
        orow[wo * C + c0] = acc;
      }
    }
  }
}

template <int Bytes, typename scalar_t>
DSCN_INLINE void forward_rows_body(const DwDims& d, const scalar_t* x, const scalar_t* wt, const scalar_t* b,
                                   scalar_t* out, int64_t begin, int64_t end) {
  const std::vector<scalar_t> zero_row(d.W * d.C, scalar_t(0));
  // The weights once more, chunk by chunk: chunk c (channels [c, c + L), L the vector width) holds its taps' L values
  // one after the other, so that the blocked loop reads a tap's weights at a fixed offset from the chunk's start.
  const int64_t taps = d.kh * d.kw;
  constexpr int64_t L = DSCN_HAS_VEC ? Bytes / static_cast<int64_t>(sizeof(scalar_t)) : 1;
  std::vector<scalar_t> wpack(d.C / L * L * taps);
  for (int64_t c = 0; c + L <= d.C; c += L) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t l = 0; l < L; ++l) wpack[c * taps + t * L + l] = wt[t * d.C + c + l];
    }
  }
  const auto rows = [&](auto kh, auto kw) DSCN_LAMBDA_INLINE {
    forward_block<Bytes, decltype(kh)::value, decltype(kw)::value>(d, x, wt, wpack.data(), b, zero_row.data(), out,
                                                                   begin, end);
  };
  using std::integral_constant;
  // DSAN's forward depthwise convs outside the fused kernels: the attention's 5x5, and the MLP's 3x3 and the offset
  // branches' strips where those run unfused.
  if (d.kh == 5 && d.kw == 5) return rows(integral_constant<int, 5>{}, integral_constant<int, 5>{});
  if (d.kh == 3 && d.kw == 3) return rows(integral_constant<int, 3>{}, integral_constant<int, 3>{});
  if (d.kh == 7 && d.kw == 7) return rows(integral_constant<int, 7>{}, integral_constant<int, 7>{});
  rows(integral_constant<int, 0>{}, integral_constant<int, 0>{});
}

DSCN_DEFINE_ISA_DISPATCH(forward_rows)

// The geometry checks of both entry points: positive kernel, stride and dilation, padding >= 0, all below 2^31 (so
// that no product or sum of two of them overflows int64 and slips past a check), and the output length along each
// axis by floor division (strip_out_len), so that a window longer than the padded input is rejected, not given
// one output.
inline std::pair<int64_t, int64_t> dw_output_size(const char* op, int64_t H, int64_t W, int64_t kernel_h,
                                                  int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                                  int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  const int64_t limit = int64_t(1) << 31;
  TORCH_CHECK_VALUE(kernel_h >= 1 && kernel_w >= 1 && stride_h >= 1 && stride_w >= 1 && dilation_h >= 1 &&
                        dilation_w >= 1 && pad_h >= 0 && pad_w >= 0 && kernel_w < limit && stride_h < limit &&
                        stride_w < limit && dilation_h < limit && dilation_w < limit && pad_h < limit && pad_w < limit,
                    op, ": kernel, stride and dilation must be >= 1 and padding >= 0, all below 2^31; got kernel (",
                    kernel_h, ", ", kernel_w, "), stride (", stride_h, ", ", stride_w, "), padding (", pad_h, ", ",
                    pad_w, "), dilation (", dilation_h, ", ", dilation_w, ")");
  TORCH_CHECK_VALUE(kernel_h <= kMaxKh, op, ": kernel_h must be at most ", kMaxKh, "; got ", kernel_h);
  const int64_t Ho = strip_out_len(H, kernel_h, stride_h, pad_h, dilation_h);
  const int64_t Wo = strip_out_len(W, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, op, ": the output size must be at least 1x1; got ", Ho, "x", Wo,
                    " for input ", H, "x", W, ", kernel ", kernel_h, "x", kernel_w, ", stride (", stride_h, ", ",
                    stride_w, "), padding (", pad_h, ", ", pad_w, "), dilation (", dilation_h, ", ", dilation_w, ")");
  return {Ho, Wo};
}

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
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  const std::pair<int64_t, int64_t> out_hw = dw_output_size("dw_conv_weight_grad", H, W, kernel_h, kernel_w, stride_h,
                                                            stride_w, pad_h, pad_w, dilation_h, dilation_w);
  // Plain variables, not a structured binding: clang before 17 cannot capture those in the parallel lambdas.
  const int64_t Ho = out_hw.first, Wo = out_hw.second;
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
  const int64_t slots = parallel_slots_for(N * Ho);
  at::Tensor partial = at::zeros({slots, taps, C}, input.options());
  if (N * Ho * Wo * C > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dw_conv_weight_grad_cpu", [&] {
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* part = partial.mutable_data_ptr<scalar_t>();
      // One buffer per slot of output rows (see the top and cpu_parallel.h).
      parallel_over_slots(N * Ho, slots, [&](int64_t slot, int64_t begin, int64_t end) {
        weight_grad_rows<scalar_t>(d, g, x, part + slot * taps * C, begin, end);
      });
    });
  }
  // (taps, C) -> (C, 1, kh, kw)
  return partial.sum(0).t().contiguous().view({C, 1, kernel_h, kernel_w});
}

// input (N, C, H, W), any memory format (channels_last avoids a copy), weight (C, 1, kh, kw), bias (C,) or none ->
// conv2d(input, weight, bias, stride, padding, dilation, groups=C), (N, C, Ho, Wo) in channels_last memory.
at::Tensor dw_conv2d_cpu(const at::Tensor& input_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                         int64_t dilation_w) {
  TORCH_CHECK_VALUE(input_.dim() == 4, "dw_conv2d: input must be 4-D (N, C, H, W); got ", input_.dim(),
                    "-D with shape ", input_.sizes());
  TORCH_CHECK_VALUE(input_.scalar_type() == at::kFloat || input_.scalar_type() == at::kDouble,
                    "dw_conv2d: input dtype must be one of float32, float64; got ", dtype_name(input_.scalar_type()));
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
                    "dw_conv2d: weight must have shape (C, 1, kh, kw) with C = ", C, " (the input's channels); got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == input_.scalar_type(), "dw_conv2d: weight dtype must equal input dtype ",
                    dtype_name(input_.scalar_type()), "; got ", dtype_name(weight.scalar_type()));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, "dw_conv2d: bias must have shape (", C, ",); got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input_.scalar_type(), "dw_conv2d: bias dtype must equal input dtype ",
                      dtype_name(input_.scalar_type()), "; got ", dtype_name(bias->scalar_type()));
  }
  const int64_t kernel_h = weight.size(2), kernel_w = weight.size(3);
  const std::pair<int64_t, int64_t> out_hw = dw_output_size("dw_conv2d", H, W, kernel_h, kernel_w, stride_h, stride_w,
                                                            pad_h, pad_w, dilation_h, dilation_w);
  // Plain variables, not a structured binding: clang before 17 cannot capture those in the parallel lambdas.
  const int64_t Ho = out_hw.first, Wo = out_hw.second;
  TORCH_CHECK(input_.device().is_cpu() && weight.device().is_cpu() && (!bias.has_value() || bias->device().is_cpu()),
              "dw_conv2d: tensors must be on the CPU for the CPU kernel; got input on ", input_.device(),
              " and weight on ", weight.device());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor input = input_.contiguous(cl);
  at::Tensor out = at::empty({N, C, Ho, Wo}, input.options().memory_format(cl));
  const DwDims d{N, C, H, W, Ho, Wo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w};
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dw_conv2d_cpu", [&] {
    std::vector<scalar_t> wt, b;
    tap_major<scalar_t>(weight, C, kernel_h * kernel_w, wt);
    values_or_zeros<scalar_t>(bias, C, b);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // About 32K multiply-adds a task at least, so that small images are not split into tasks too small to pay.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Wo * C * kernel_h * kernel_w));
    at::parallel_for(0, N * Ho, grain, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(d, x, wt.data(), b.data(), o, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("_dw_conv_weight_grad", &dw_conv_weight_grad_cpu);
  m.impl("dw_conv2d", &dw_conv2d_cpu);
}

}  // namespace ops_dscn
