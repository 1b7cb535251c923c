// Autocast kernels of ops_dscn::dscn (torchvision's pattern for its custom ops), so that every caller under
// torch.autocast gets the same behaviour, torch.ops.ops_dscn.dscn included.
//
// Policy: "promote", as autocast's cat/stack. Under autocast the input and the offsets come from different
// producers (a Linear runs in the autocast dtype, a LayerNorm in float32, ...), so their dtypes may differ; the op
// runs in the wider of the two and returns that dtype. Nothing is narrowed: sampling positions stay as precise as
// the offsets that were handed over. The casts are recorded by autograd like any other autocast cast.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace ops_dscn {
namespace {

template <c10::DeviceType device_type>
at::Tensor dscn_autocast(const at::Tensor& input, const at::Tensor& offset, int64_t kernel_h, int64_t kernel_w,
                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                         int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
                         bool remove_center, bool on_x) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ops_dscn::dscn", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, bool, bool)>();
  at::Tensor x = input;
  at::Tensor off = offset;
  // Only floating-point tensors are cast (cached_cast leaves others alone), so a bad dtype still reaches the
  // kernel's check and its message.
  if (input.defined() && offset.defined() && input.is_floating_point() && offset.is_floating_point() &&
      input.scalar_type() != offset.scalar_type()) {
    const at::ScalarType wide = at::promote_types(input.scalar_type(), offset.scalar_type());
    x = at::autocast::cached_cast(wide, input, device_type);
    off = at::autocast::cached_cast(wide, offset, device_type);
  }
  return op.call(x, off, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                 group_channels, offset_scale, remove_center, on_x);
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, AutocastCPU, m) {
  m.impl("dscn", &dscn_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(ops_dscn, AutocastCUDA, m) {
  m.impl("dscn", &dscn_autocast<c10::DeviceType::CUDA>);
}

}  // namespace ops_dscn
