// Schema of the operators, declared once. Kernels are registered per dispatch key, one file each: cpu/, cuda/
// and autocast/; autograd and the fake (meta) kernels are registered from Python (ops_dscn/functional.py).
// _dscn_backward's output_mask says which of (grad_input, grad_offset) autograd needs; the other is not computed and
// comes back as an empty tensor.
#include <Python.h>
#include <torch/library.h>

// Importing ops_dscn._C runs the static registrations below; the module itself exports nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ops_dscn, m) {
  m.def(
      "dscn(Tensor input, Tensor offset, int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, "
      "int pad_w, int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
      "bool remove_center, bool on_x) -> Tensor");
  m.def(
      "_dscn_backward(Tensor grad_output, Tensor input, Tensor offset, int kernel_h, int kernel_w, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, "
      "float offset_scale, bool remove_center, bool on_x, bool[2] output_mask) -> (Tensor, Tensor)");
  // DSAN's convolutional MLP (fc1 -> depthwise 3x3 -> exact GELU -> fc2, + residual) fused for CPU; see
  // cpu/conv_mlp_cpu.cpp. Its backward recomputes the hidden rows from the input and returns the gradients of input,
  // fc1 weight / bias, dw weight / bias, fc2 weight / bias (the residual's is grad_output).
  m.def(
      "conv_mlp(Tensor input, Tensor fc1_weight, Tensor? fc1_bias, Tensor dw_weight, Tensor? dw_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias, Tensor? residual=None, Tensor? fc1_packed=None, "
      "Tensor? fc2_packed=None) -> Tensor");
  m.def(
      "_conv_mlp_backward(Tensor grad_output, Tensor input, Tensor fc1_weight, Tensor? fc1_bias, Tensor dw_weight, "
      "Tensor? dw_bias, Tensor fc2_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The weight gradient of a depthwise conv2d (groups = C, zero padding) on channels_last tensors, for the backward
  // of ops_dscn.DepthwiseConv2d; see cpu/dw_conv_cpu.cpp.
  // A depthwise conv2d (groups = C, zero padding) forward on channels_last tensors, for ops_dscn.DepthwiseConv2d;
  // see cpu/dw_conv_cpu.cpp.
  m.def(
      "dw_conv2d(Tensor input, Tensor weight, Tensor? bias, int stride_h, int stride_w, int pad_h, int pad_w, "
      "int dilation_h, int dilation_w) -> Tensor");
  m.def(
      "_dw_conv_weight_grad(Tensor grad_output, Tensor input, int kernel_h, int kernel_w, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w) -> Tensor");
  // A 1x1 conv with its elementwise epilogue, act(conv(x) + b) * gate + residual * residual_scale, act the exact GELU
  // (gelu) or none, fused for CPU; see cpu/pointwise_cpu.cpp.
  m.def(
      "pointwise_conv(Tensor input, Tensor weight, Tensor? bias, bool gelu=False, Tensor? gate=None, "
      "Tensor? residual=None, Tensor? residual_scale=None, Tensor? packed=None) -> Tensor");
  // A (C_out, C[, 1, 1]) float32 weight in the layout the CPU kernels' matrix products read (64-column panels padded
  // to whole vectors), for pointwise_conv's `packed` and conv_mlp's fc1_packed / fc2_packed: made once for inference
  // instead of on every call; see cpu/pointwise_cpu.cpp.
  m.def("pack_weight(Tensor weight) -> Tensor");
  // The exact (erf) GELU and its gradient (grad_output * gelu'(input)) on CPU, with the fused kernels' float
  // arithmetic; see cpu/gelu_cpu.cpp. The output keeps a dense input's strides.
  m.def("gelu(Tensor input) -> Tensor");
  m.def("_gelu_backward(Tensor grad_output, Tensor input) -> Tensor");
  // The offset branch of a DSCN layer (depthwise strip conv -> LayerNorm -> exact GELU -> Linear) fused for CPU;
  // see cpu/strip_offsets_cpu.cpp. Its backward recomputes the branch from the input and returns the gradients of
  // the conv's output (N, C, H, W; channels_last memory), ln_weight, ln_bias, lin_weight and lin_bias.
  m.def(
      "strip_offsets(Tensor input, Tensor dw_weight, Tensor? dw_bias, Tensor ln_weight, Tensor ln_bias, float eps, "
      "Tensor lin_weight, Tensor? lin_bias, bool on_x) -> Tensor");
  m.def(
      "_strip_offsets_backward(Tensor grad_output, Tensor input, Tensor dw_weight, Tensor? dw_bias, "
      "Tensor ln_weight, Tensor ln_bias, float eps, Tensor lin_weight, bool on_x) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
