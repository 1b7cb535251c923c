// CPU kernel of ops_dscn::pointwise_conv: a 1x1 convolution (a matrix product on channels_last memory) with the
// elementwise operations that follow it in a DSAN block fused into its output pass:
//
//     y = act(x @ W^T + b) * gate + residual * residual_scale
//
// act is the exact GELU or the identity; gate, residual and residual_scale are optional. In DSAN's attention these
// are proj_1 -> GELU, the gating unit's conv -> * u, and proj_2 -> + shortcut (times the folded layer scale).
//
// Why: run as separate operators, the bias (addmm copies it into the output first), the GELU, the gate product and
// the residual sum are one more pass over the output each, and each pass a dispatched operator. On one image that
// overhead was most of their cost. Here threads take blocks of rows (pixels); each block's product goes into the
// output by ATen's BLAS (at::mm_out), or, with a weight packed before (ops_dscn::pack_weight, float32 on AVX-512), by
// cpu_small_gemm.h's register-blocked kernel, and the epilogue runs over the block while it is still in cache.
//
// Numerics: the same operations in the same precision as the unfused operators; only the product's summation order
// (BLAS blocking) and the float erf (cpu_gelu.h) differ, so results agree with them to float rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_gelu.h"
#include "cpu_simd.h"
#include "cpu_small_gemm.h"
#include "cpu_weights.h"

namespace ops_dscn {
namespace {

// Rows of a block are chosen so that its output (rows * C_out values) takes about this many bytes and stays in L2.
constexpr int64_t kBlockBytes = 256 * 1024;
constexpr int64_t kMinRows = 64;

// The epilogue's optional operands, per row of the output (nullptr when absent).
template <typename scalar_t>
struct Epilogue {
  const scalar_t* bias;   // (Co,), zeros when the conv has none
  bool gelu;              // exact GELU after the bias
  const scalar_t* gate;   // (M, Co) rows: multiplies the activation
  const scalar_t* res;    // (M, Co) rows: added last
  const scalar_t* scale;  // (Co,): multiplies the residual; nullptr: 1
};

// y[i, c] = act(y[i, c] + bias[c]) (* gate[i, c]) (+ res[i, c] (* scale[c])), for the rows [r0, r1) and the columns
// [c0, c1) of (M, Co) matrices. y holds the product on entry.
template <int Bytes, typename scalar_t>
DSCN_INLINE void epilogue_rows_body(const Epilogue<scalar_t>& e, scalar_t* y, int64_t Co, int64_t r0, int64_t r1,
                                    int64_t c0, int64_t c1) {
  const auto one = [&](int64_t i) DSCN_LAMBDA_INLINE {
    scalar_t z = y[i] + e.bias[i % Co];
    if (e.gelu) z = gelu_scalar(z);
    if (e.gate != nullptr) z *= e.gate[i];
    if (e.res != nullptr) z += e.scale != nullptr ? e.res[i] * e.scale[i % Co] : e.res[i];
    y[i] = z;
  };
  // The fields in locals: read through `e` inside the loop, they were loaded again for every vector (the stores to
  // y may alias them as far as the compiler knows), about half of the epilogue's time in a DSAN-T forward.
  const scalar_t* const bias = e.bias;
  const scalar_t* const gate = e.gate;
  const scalar_t* const res = e.res;
  const scalar_t* const scale = e.scale;
  const bool gelu = e.gelu;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = r * Co;
    int64_t c = c0;
#if DSCN_HAS_VEC
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      using VT = Vec<scalar_t, Bytes>;
      using V = typename VT::type;
      constexpr int64_t L = VT::size;
      for (; c + L <= c1; c += L) {
        V z = VT::load(y + row + c) + VT::load(bias + c);
        if (gelu) z = gelu_vec<scalar_t, Bytes>(z);
        if (gate != nullptr) z *= VT::load(gate + row + c);
        if (res != nullptr) {
          const V r_v = VT::load(res + row + c);
          z += scale != nullptr ? r_v * VT::load(scale + c) : r_v;
        }
        VT::store(y + row + c, z);
      }
    }
#endif
    for (; c < c1; ++c) one(row + c);
  }
}

// One block of the output y (M, Co): rows [r0, r1), columns [c0, c1) (c1 - c0 = Co, or whole panels of wp). The
// product of the input rows x (M, C) and the weight, by cpu_small_gemm.h's kernel from the packed weight wp where it
// runs, else by the BLAS from wt, the (C, Co) view of the weight; then the epilogue while the block is in cache.
template <int Bytes, typename scalar_t>
DSCN_INLINE void block_rows_body(const Epilogue<scalar_t>& e, const PanelMatrix<scalar_t>& wp, const at::Tensor& wt,
                                 const scalar_t* x, scalar_t* y, int64_t C, int64_t Co, int64_t r0, int64_t r1,
                                 int64_t c0, int64_t c1, const at::TensorOptions& opts) {
  constexpr int64_t kPanel = PanelMatrix<scalar_t>::kPanel;
  if (!panel_gemm<Bytes>(x + r0 * C, C, wp, y + r0 * Co, Co, r1 - r0, c0 / kPanel, (c1 + kPanel - 1) / kPanel)) {
    // Matrices over the block's NHWC memory, made here: views of the output would be inference tensors under
    // inference mode, which the worker threads (outside its guard) may not write.
    at::Tensor yb = at::from_blob(y + r0 * Co + c0, {r1 - r0, c1 - c0}, {Co, 1}, opts);
    at::mm_out(yb, at::from_blob(const_cast<scalar_t*>(x) + r0 * C, {r1 - r0, C}, opts),
               c1 - c0 == Co ? wt : wt.narrow(1, c0, c1 - c0));
  }
  epilogue_rows_body<Bytes>(e, y, Co, r0, r1, c0, c1);
}

DSCN_DEFINE_ISA_DISPATCH(block_rows)

// An (N, C, H, W) operand of the epilogue in channels_last memory, checked against the output's shape.
at::Tensor operand(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t->sizes() == shape, "pointwise_conv: ", name, " must have the output's shape ", shape, "; got ",
                    t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == dtype, "pointwise_conv: ", name, " dtype must equal input dtype ",
                    dtype_name(dtype), "; got ", dtype_name(t->scalar_type()));
  TORCH_CHECK(t->device().is_cpu(), "pointwise_conv: ", name, " must be on the CPU; got ", t->device());
  return t->contiguous(at::MemoryFormat::ChannelsLast);
}

// input (N, C, H, W), any memory format (channels_last avoids a copy); weight (Co, C, 1, 1) or (Co, C); bias (Co,);
// gate, residual (N, Co, H, W); residual_scale Co values, e.g. (Co, 1, 1) -> y (N, Co, H, W) in channels_last memory.
at::Tensor pointwise_conv_cpu(const at::Tensor& input_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              bool gelu, const std::optional<at::Tensor>& gate,
                              const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& residual_scale,
                              const std::optional<at::Tensor>& packed) {
  TORCH_CHECK_VALUE(input_.dim() == 4, "pointwise_conv: input must be 4-D (N, C, H, W); got ", input_.dim(),
                    "-D with shape ", input_.sizes());
  const auto dtype = input_.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble,
                    "pointwise_conv: input dtype must be one of float32, float64; got ", dtype_name(dtype));
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  TORCH_CHECK_VALUE((weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1) || weight.dim() == 2,
                    "pointwise_conv: weight must have shape (C_out, C, 1, 1) or (C_out, C); got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == C, "pointwise_conv: weight must have C = ", C,
                    " input channels (the input's); got ", weight.size(1), " in shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == dtype, "pointwise_conv: weight dtype must equal input dtype ",
                    dtype_name(dtype), "; got ", dtype_name(weight.scalar_type()));
  const int64_t Co = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == Co, "pointwise_conv: bias must have shape (", Co,
                      ",); got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == dtype, "pointwise_conv: bias dtype must equal input dtype ",
                      dtype_name(dtype), "; got ", dtype_name(bias->scalar_type()));
  }
  if (residual_scale.has_value()) {
    TORCH_CHECK_VALUE(residual.has_value(), "pointwise_conv: residual_scale needs a residual; got none");
    TORCH_CHECK_VALUE(residual_scale->numel() == Co && (residual_scale->dim() == 1 || residual_scale->dim() == 3),
                      "pointwise_conv: residual_scale must have shape (", Co, ",) or (", Co, ", 1, 1); got ",
                      residual_scale->sizes());
    TORCH_CHECK_VALUE(residual_scale->scalar_type() == dtype,
                      "pointwise_conv: residual_scale dtype must equal input dtype ", dtype_name(dtype), "; got ",
                      dtype_name(residual_scale->scalar_type()));
  }
  TORCH_CHECK(input_.device().is_cpu() && weight.device().is_cpu() && (!bias.has_value() || bias->device().is_cpu()) &&
                  (!residual_scale.has_value() || residual_scale->device().is_cpu()),
              "pointwise_conv: tensors must be on the CPU for the CPU kernel; got input on ", input_.device(),
              " and weight on ", weight.device());
  if (packed.has_value()) check_packed(*packed, "pointwise_conv", "packed", Co, C, input_);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const std::vector<int64_t> shape{N, Co, H, W};
  const at::Tensor x = input_.contiguous(cl);
  const at::Tensor g = gate.has_value() ? operand(gate, "gate", shape, dtype) : at::Tensor();
  const at::Tensor r = residual.has_value() ? operand(residual, "residual", shape, dtype) : at::Tensor();
  at::Tensor out = at::empty(shape, x.options().memory_format(cl));
  const int64_t M = N * H * W;
  if (M * Co == 0) return out;
  // (C, Co) view of the weight, read transposed by the BLAS.
  AT_DISPATCH_FLOATING_TYPES(dtype, "pointwise_conv_cpu", [&] {
    std::vector<scalar_t> b, s;
    values_or_zeros<scalar_t>(bias, Co, b);
    if (residual_scale.has_value()) values_or_zeros<scalar_t>(residual_scale->reshape({Co}), Co, s);
    const Epilogue<scalar_t> e{b.data(), gelu, g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
                               r.defined() ? r.const_data_ptr<scalar_t>() : nullptr,
                               residual_scale.has_value() ? s.data() : nullptr};
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
    // (C, Co): the weight read transposed by the BLAS, a plain (non-inference) tensor for the same reason as below.
    const at::Tensor w_c = weight.contiguous();
    const at::Tensor wt = at::from_blob(const_cast<scalar_t*>(w_c.const_data_ptr<scalar_t>()), {Co, C}, opts).t();
    // With the weight packed before (float32 only), the products are cpu_small_gemm.h's, which reads it as it is;
    // where that kernel does not run (below AVX-512) they stay the BLAS's.
    PanelMatrix<scalar_t> wp;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (packed.has_value()) wp = PanelMatrix<scalar_t>::view(packed->const_data_ptr<scalar_t>(), Co, C);
    }
    // Blocks of rows that fit L2, one per thread at least, but of kMinRows rows at least (smaller blocks were slower
    // than one thread doing it all: DSAN-T's stage 4 at batch 1 has 49 rows).
    const int64_t threads = at::get_num_threads();
    const int64_t by_cache = std::max<int64_t>(kMinRows, kBlockBytes / static_cast<int64_t>(Co * sizeof(scalar_t)));
    // The block count is rounded up to a multiple of the thread count, so that threads get equal shares (7 blocks
    // on 2 threads left one idle an eighth of the time: DSAN-T's stage 4 at batch 32).
    int64_t blocks = (M + std::min(by_cache, (M + threads - 1) / threads) - 1) /
                     std::min(by_cache, (M + threads - 1) / threads);
    blocks = (blocks + threads - 1) / threads * threads;
    const int64_t rows = std::max<int64_t>(kMinRows, (M + blocks - 1) / blocks);
    blocks = (M + rows - 1) / rows;
    // With packed panels and fewer row blocks than threads, each block's panels are split between threads as well
    // (stage 4 at batch 1: 49 rows, 4 panels, was one thread's work).
    const int64_t panels = static_cast<int64_t>(wp.panels.size());
    const int64_t splits = std::max<int64_t>(1, std::min(panels, threads / blocks));
    const int64_t per_split = (panels + splits - 1) / std::max<int64_t>(1, splits);
    at::parallel_for(0, blocks * splits, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t blk = t / splits, sp = t % splits;
        const int64_t r0 = blk * rows, r1 = std::min(M, r0 + rows);
        const int64_t c0 = splits == 1 ? 0 : std::min(Co, sp * per_split * PanelMatrix<scalar_t>::kPanel);
        const int64_t c1 = splits == 1 ? Co : std::min(Co, (sp + 1) * per_split * PanelMatrix<scalar_t>::kPanel);
        if (c0 < c1) block_rows<scalar_t>(e, wp, wt, xp, y, C, Co, r0, r1, c0, c1, opts);
      }
    });
  });
  return out;
}

// weight (n, k, 1, 1) or (n, k), float32 -> its packed form (PanelMatrix<float>::pack), a 1-D tensor that
// pointwise_conv and conv_mlp read in place of the weight's copy they make on every call otherwise. On one image those
// copies and the BLAS's own repacking of the weight took 20-30 % of the MLP's time (DSAN-T stages 2-4 at 224).
at::Tensor pack_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK_VALUE((weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1) || weight.dim() == 2,
                    "pack_weight: weight must have shape (C_out, C, 1, 1) or (C_out, C); got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat, "pack_weight: weight dtype must be float32; got ",
                    dtype_name(weight.scalar_type()));
  TORCH_CHECK(weight.device().is_cpu(), "pack_weight: weight must be a CPU tensor; got ", weight.device());
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor w = weight.detach().reshape({n, k}).contiguous();
  at::Tensor out = at::empty({PanelMatrix<float>::packed_size(n, k)}, w.options());
  PanelMatrix<float>::pack(out.mutable_data_ptr<float>(), w.const_data_ptr<float>(), n, k);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("pointwise_conv", &pointwise_conv_cpu);
  m.impl("pack_weight", &pack_weight_cpu);
}

}  // namespace ops_dscn
