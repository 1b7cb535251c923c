// CUDA kernels of ops_dscn::dscn and ops_dscn::_dscn_backward. The sampling arithmetic is the shared
// common/dscn_sampling.h, which the CPU kernel also runs for half/bfloat16 and for the tails of its SIMD loops; its
// float/double SIMD path mirrors the same formulas lane by lane. Results are not bit-identical across devices:
// nvcc contracts a * b + c into FMAs and the summation order differs, so the CUDA tests compare against the float64
// reference with tolerances (ops_dscn/tests/test_dscn.py, run by ops_dscn/selfcheck_cuda.sh).
//
// Forward: one thread per output element (pixel, channel); threads of one group share the offset load, and
// consecutive threads read consecutive channels (coalesced, channels-last).
// Backward: the input gradient is scattered with atomics (one thread per output element, accumulated in the
// op-math type, float for half/bfloat16), so its summation order varies from run to run: the backward reports itself
// through alertNotDeterministic when the input gradient is asked for. The offset gradient is a per-(pixel, group,
// tap) reduction over the group's channels, written by exactly one thread, so it is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "../common/dscn_params.h"
#include "../common/dscn_sampling.h"

namespace ops_dscn {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t n) {
  // Grid-stride loops cover the rest; cap the grid so huge tensors do not exceed launch limits.
  return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
}

// Device-side view of DSCNParams (plain integers, passed by value).
struct Geo {
  StripGeometry g;
  int64_t Ho, Wo, C, group_channels, G;
  int64_t in_axis, in_orth, in_batch;
  int64_t orth_len, orth_stride, orth_pad;
  bool on_x;
};

Geo make_geo(const DSCNParams& p) {
  Geo q;
  q.g = p.geom;
  q.Ho = p.Ho;
  q.Wo = p.Wo;
  q.C = p.C;
  q.group_channels = p.group_channels;
  q.G = p.group;
  q.in_batch = p.H * p.W * p.C;
  q.in_axis = p.on_x ? p.C : p.W * p.C;
  q.in_orth = p.on_x ? p.W * p.C : p.C;
  q.orth_len = p.orth_len;
  q.orth_stride = p.orth_stride;
  q.orth_pad = p.orth_pad;
  q.on_x = p.on_x;
  return q;
}

// Splits a pixel index (n, h_out, w_out) into the image, the position along the axis and the input line base.
// Returns -1 as line base when the strip's line lies in the padding.
__device__ __forceinline__ int64_t line_base(const Geo& q, int64_t pix, int64_t* o_axis) {
  const int64_t wo = pix % q.Wo;
  const int64_t ho = (pix / q.Wo) % q.Ho;
  const int64_t n = pix / (q.Wo * q.Ho);
  const int64_t oo = q.on_x ? ho : wo;
  *o_axis = q.on_x ? wo : ho;
  const int64_t line = oo * q.orth_stride - q.orth_pad;
  if (line < 0 || line >= q.orth_len) {
    return -1;
  }
  return n * q.in_batch + line * q.in_orth;
}

template <typename scalar_t>
__global__ void dscn_forward_kernel(const Geo q, const scalar_t* __restrict__ input,
                                    const scalar_t* __restrict__ offset, scalar_t* __restrict__ output,
                                    const at::opmath_type<scalar_t> scale, const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KK = q.g.taps;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = idx % q.C;
    const int64_t pix = idx / q.C;
    const int64_t grp = c / q.group_channels;
    int64_t oa = 0;
    const int64_t base = line_base(q, pix, &oa);
    acc_t acc = 0;
    if (base >= 0) {
      const scalar_t* off_px = offset + pix * q.G * KK + grp * KK;
      const scalar_t* x = input + base + c;
      const acc_t origin = strip_origin<acc_t>(q.g, oa, scale);
      for (int64_t j = 0; j < KK; ++j) {
        const acc_t tap_pos = static_cast<acc_t>(tap_index(j, q.g.center) * q.g.dilation);
        const acc_t loc = tap_location<acc_t>(origin, tap_pos, static_cast<acc_t>(off_px[j]), scale);
        const LinearTap<acc_t> t = resolve_tap<acc_t>(loc, q.g.axis_len);
        if (t.use0) acc += t.w0 * static_cast<acc_t>(x[t.i0 * q.in_axis]);
        if (t.use1) acc += t.w1 * static_cast<acc_t>(x[t.i1 * q.in_axis]);
      }
    }
    output[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void dscn_grad_input_kernel(const Geo q, const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ offset,
                                       at::opmath_type<scalar_t>* __restrict__ grad_input,
                                       const at::opmath_type<scalar_t> scale, const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KK = q.g.taps;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = idx % q.C;
    const int64_t pix = idx / q.C;
    const int64_t grp = c / q.group_channels;
    int64_t oa = 0;
    const int64_t base = line_base(q, pix, &oa);
    if (base < 0) continue;
    const acc_t g = static_cast<acc_t>(grad_out[idx]);
    const scalar_t* off_px = offset + pix * q.G * KK + grp * KK;
    acc_t* gx = grad_input + base + c;
    const acc_t origin = strip_origin<acc_t>(q.g, oa, scale);
    for (int64_t j = 0; j < KK; ++j) {
      const acc_t tap_pos = static_cast<acc_t>(tap_index(j, q.g.center) * q.g.dilation);
      const acc_t loc = tap_location<acc_t>(origin, tap_pos, static_cast<acc_t>(off_px[j]), scale);
      const LinearTap<acc_t> t = resolve_tap<acc_t>(loc, q.g.axis_len);
      if (t.use0) gpuAtomicAdd(gx + t.i0 * q.in_axis, t.w0 * g);
      if (t.use1) gpuAtomicAdd(gx + t.i1 * q.in_axis, t.w1 * g);
    }
  }
}

template <typename scalar_t>
__global__ void dscn_grad_offset_kernel(const Geo q, const scalar_t* __restrict__ grad_out,
                                        const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                                        scalar_t* __restrict__ grad_offset, const at::opmath_type<scalar_t> scale,
                                        const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KK = q.g.taps;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    // idx enumerates (pixel, group, tap), the layout of offset itself.
    const int64_t j = idx % KK;
    const int64_t grp = (idx / KK) % q.G;
    const int64_t pix = idx / (KK * q.G);
    int64_t oa = 0;
    const int64_t base = line_base(q, pix, &oa);
    acc_t dot = 0;
    if (base >= 0) {
      const acc_t tap_pos = static_cast<acc_t>(tap_index(j, q.g.center) * q.g.dilation);
      const acc_t loc = tap_location<acc_t>(strip_origin<acc_t>(q.g, oa, scale), tap_pos,
                                            static_cast<acc_t>(offset[idx]), scale);
      const LinearTap<acc_t> t = resolve_tap<acc_t>(loc, q.g.axis_len);
      const int64_t c0 = grp * q.group_channels;
      const scalar_t* g = grad_out + pix * q.C + c0;
      const scalar_t* x0 = input + base + c0 + t.i0 * q.in_axis;
      const scalar_t* x1 = input + base + c0 + t.i1 * q.in_axis;
      // d value / d loc = x[i1] - x[i0], each term only where that neighbour is read; a tap outside the window
      // gets 0, whatever grad_output holds (an Inf there would make 0 * Inf = NaN).
      for (int64_t c = 0; c < q.group_channels && (t.use0 || t.use1); ++c) {
        acc_t d = 0;
        if (t.use1) d += static_cast<acc_t>(x1[c]);
        if (t.use0) d -= static_cast<acc_t>(x0[c]);
        dot += static_cast<acc_t>(g[c]) * d;
      }
    }
    grad_offset[idx] = static_cast<scalar_t>(scale * dot);
  }
}

at::Tensor dscn_forward_cuda(const at::Tensor& input_, const at::Tensor& offset_, int64_t kernel_h,
                             int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                             int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                             double offset_scale, bool remove_center, bool on_x) {
  const DSCNParams p = make_params(input_, offset_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w, group, group_channels, offset_scale, remove_center, on_x);
  TORCH_CHECK(input_.is_cuda(), "dscn: input must be a CUDA tensor for the CUDA kernel; got ", input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty({p.N, p.Ho, p.Wo, p.C}, input.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const Geo q = make_geo(p);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dscn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dscn_forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        q, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
        static_cast<acc_t>(offset_scale), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

// Returns (grad_input, grad_offset); a gradient whose output_mask entry is false is not computed and comes back as
// an empty tensor. Both are contiguous, as the fake kernel declares.
std::tuple<at::Tensor, at::Tensor> dscn_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                                      const at::Tensor& offset_, int64_t kernel_h, int64_t kernel_w,
                                                      int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                                      int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                                                      int64_t group, int64_t group_channels, double offset_scale,
                                                      bool remove_center, bool on_x, std::array<bool, 2> output_mask) {
  const DSCNParams p = make_params(input_, offset_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w, group, group_channels, offset_scale, remove_center, on_x);
  check_grad_output(grad_output_, input_, p);
  TORCH_CHECK(input_.is_cuda(), "dscn: input must be a CUDA tensor for the CUDA kernel; got ", input_.device());
  if (output_mask[0]) {
    // The input gradient is scattered with float atomics.
    at::globalContext().alertNotDeterministic("dscn_backward_cuda (input gradient)");
  }
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor grad_input = output_mask[0] ? at::zeros(input.sizes(), input.options().dtype(acc_type))
                                         : at::empty({0}, input.options());
  // Every element of grad_offset is written by its kernel.
  at::Tensor grad_offset = at::empty(output_mask[1] ? offset.sizes() : at::IntArrayRef({0}), offset.options());
  const int64_t total = grad_output.numel();
  if (total > 0 && (output_mask[0] || output_mask[1])) {
    const Geo q = make_geo(p);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dscn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t scale = static_cast<acc_t>(offset_scale);
      if (output_mask[0]) {
        dscn_grad_input_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
            q, grad_output.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<acc_t>(), scale, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[1]) {
        const int64_t total_off = offset.numel();
        dscn_grad_offset_kernel<scalar_t><<<num_blocks(total_off), kThreads, 0, stream>>>(
            q, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
            offset.const_data_ptr<scalar_t>(), grad_offset.mutable_data_ptr<scalar_t>(), scale, total_off);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {output_mask[0] ? grad_input.to(input.scalar_type()) : grad_input, grad_offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CUDA, m) {
  m.impl("dscn", &dscn_forward_cuda);
  m.impl("_dscn_backward", &dscn_backward_cuda);
}

}  // namespace ops_dscn
