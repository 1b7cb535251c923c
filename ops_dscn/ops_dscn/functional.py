"""Functional DSCN API, backend selection, and the Python-side registrations of the compiled operator.

The compiled operator's schema is declared once in ``csrc/dscn.cpp`` (``torch.ops.ops_dscn.dscn`` and its private
``torch.ops.ops_dscn._dscn_backward``); its autograd formula and fake (meta) kernel are registered here with
``torch.library`` so that it works with autograd, ``torch.compile`` and ``torch.export``.
"""

import logging
import numbers
import warnings
from pathlib import Path

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._double_backward import recording_backward, twin_gradients
from .pytorch_impl import dscn_pytorch

__all__ = ["BACKENDS", "available_backends", "check_args", "check_config", "compiled_device_types", "dscn",
           "dscn_strip", "extension_available", "extension_error", "known_true", "resolve_backend"]

_logger = logging.getLogger(__name__)

def known_true(cond) -> bool:
    """Whether a condition on tensor sizes holds, for picking between kernels that compute the same thing.

    Under ``torch.compile`` / ``torch.export`` with dynamic shapes the sizes are symbolic: the condition counts as
    true only when it holds for every size they may take, and no guard is added (a guard would tie the program to
    one side of it). Plain bools (eager) are returned as they are, and traced sizes (``torch.jit.trace``) evaluated.
    """
    if isinstance(cond, torch.Tensor):  # a traced size; statically_known_true takes bools and SymBools only
        return bool(cond)
    return statically_known_true(cond)


#: Backend names accepted everywhere a ``backend`` argument is taken.
BACKENDS = ("auto", "cpp", "pytorch")

#: Device types that may have a compiled kernel; which ones actually do is read from the dispatcher.
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "meta")

_REBUILD = ("`cd ops_dscn && python setup.py install` or `pip install --no-build-isolation ./ops_dscn` (add "
            "FORCE_CUDA=1 with a CUDA toolkit to build the CUDA kernel on a machine without a visible GPU)")


def _source_tree_hint(module_file: str) -> str:
    """The hint for a load error when ``module_file`` (this module's file) lies in the source tree, else ''.

    The source tree is recognized by its setup.py beside the package folder: an install (site-packages,
    dist-packages, --prefix, --target) has none there, and its load error is a genuine one the hint would misname.
    """
    if not (Path(module_file).parents[1] / "setup.py").is_file():
        return ""
    # An editable install imports from the source tree too; there running elsewhere does not help, building does.
    return (f" (ops_dscn was imported from the source tree {module_file}; run from another directory to use the "
            "installed one, or build it in place with `python setup.py build_ext --inplace`)")


try:  # importing the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    _EXT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _EXT_ERROR = f"{type(exc).__name__}: {exc}{_source_tree_hint(__file__)}"


def _kernel_device_types() -> frozenset[str]:
    # Registrations are static (they run when _C is imported), so this is read once. Computing it here, not per
    # call, also keeps resolve_backend() free of C calls that torch.compile would have to break the graph for.
    if _EXT_ERROR is not None:
        return frozenset()
    found = set()
    for device_type in _DEVICE_TYPES:
        key = torch._C._dispatch_key_for_device(device_type)
        if torch._C._dispatch_has_kernel_for_dispatch_key("ops_dscn::dscn", key):
            found.add(device_type)
    return frozenset(found)


_KERNEL_DEVICE_TYPES = _kernel_device_types()
_warned_fallback: set[str] = set()  # device types the fallback warning was given for


def extension_available() -> bool:
    """Whether the compiled operator (``ops_dscn._C``) was built and loaded."""
    return _EXT_ERROR is None


def extension_error() -> str | None:
    """Why the compiled operator could not be loaded, or None if it was."""
    return _EXT_ERROR


def compiled_device_types() -> list[str]:
    """Device types the compiled operator has kernels for, e.g. ``['cpu', 'cuda']`` (``'meta'`` excluded)."""
    return sorted(_KERNEL_DEVICE_TYPES - {"meta"})


def recording_aten() -> bool:
    """Whether a tracer or exporter is recording the model for others to read (``torch.jit.trace``: FLOP counters,
    the TorchScript ONNX exporter; ``torch.onnx.export(dynamo=True)``).

    The fused CPU kernels step aside then, for the aten operators they fuse: a FLOP counter must count those, and an
    ONNX file must hold operators that every runtime has. ``torch.export`` and ``torch.compile`` keep the kernels.
    """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Concrete backends usable in this process: ``'cpp'`` (if built) and ``'pytorch'``.

    Args:
        device: if given, only the backends that can run on tensors of this device (``'cpp'`` needs a compiled
            kernel for its type: a build without CUDA has none for ``'cuda'``).
    """
    if device is None:
        has_cpp = extension_available()
    else:
        has_cpp = torch.device(device).type in _KERNEL_DEVICE_TYPES
    return (["cpp"] if has_cpp else []) + ["pytorch"]


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Maps a backend name to the concrete backend that will run on ``device``.

    Args:
        backend: ``'auto'`` (the compiled op when it has a kernel for the device, else the pure-PyTorch op with one
            warning per device type saying how to rebuild), ``'cpp'`` (the compiled op; an error if it is not built,
            or built without a kernel for the device) or ``'pytorch'``.
        device: device of the tensors; None checks only that the extension is built.

    Returns:
        ``'cpp'`` or ``'pytorch'``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "pytorch":
        return "pytorch"
    if _EXT_ERROR is not None:
        reason = f"the compiled DSCN operator is not available ({_EXT_ERROR})"
        device_type = None if device is None else torch.device(device).type
    elif device is None or torch.device(device).type in _KERNEL_DEVICE_TYPES or torch.device(device).type == "meta":
        return "cpp"  # meta tensors (shapes only) run the registered fake kernel
    else:
        device_type = torch.device(device).type
        built = ", ".join(compiled_device_types()) or "none"
        reason = (f"ops_dscn was built without a {device_type.upper()} kernel (it has kernels for: {built}); "
                  f"rebuild it where the {device_type.upper()} toolkit is installed")
    if backend == "cpp":
        on = "" if device_type is None else f" for a {device_type} tensor"
        raise RuntimeError(f"backend='cpp' was requested{on} but {reason}. Build it with {_REBUILD}, or use "
                           "backend='pytorch'.")
    key = device_type or "any"
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(f"ops_dscn: {reason}; using the pure-PyTorch implementation, which is much slower. Build it "
                      f"with {_REBUILD}.", RuntimeWarning, stacklevel=3)
    return "pytorch"


def _out_len(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    # Floor division, as strip_out_len() in csrc/common/dscn_params.h.
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: torch.Tensor) -> str:
    # Formatted as the C++ checks print sizes, so both give the same message.
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_config(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                 offset_scale, remove_center, on_x) -> None:
    """Checks the non-tensor arguments of a DSCN call (also used by the modules at construction).

    The checks and messages are those of ``make_params`` in ``csrc/common/dscn_params.h``, which is what the
    compiled op runs; a test compares the two on every rejected case.

    Raises:
        TypeError: an integer argument is not an int.
        ValueError: a value is out of range; the message names the argument, the expected and the actual value.
    """
    ints = (("kernel_h", kernel_h, 1), ("kernel_w", kernel_w, 1), ("stride_h", stride_h, 1),
            ("stride_w", stride_w, 1), ("dilation_h", dilation_h, 1), ("dilation_w", dilation_w, 1),
            ("group", group, 1), ("group_channels", group_channels, 1), ("pad_h", pad_h, 0), ("pad_w", pad_w, 0))
    for name, value, minimum in ints:
        # Any integer (numpy's too), as the compiled op's int64 arguments take them; bools are not sizes.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"dscn: {name} must be an int; got {type(value).__name__} {value!r}")
        if value < minimum:
            raise ValueError(f"dscn: {name} must be >= {minimum}; got {value}")
        if value >= 2**31:  # as the C++ check, which keeps int64 products of two arguments from overflowing
            raise ValueError(f"dscn: {name} must be < 2^31; got {value}")
    if isinstance(offset_scale, bool) or not isinstance(offset_scale, numbers.Real):
        raise TypeError(f"dscn: offset_scale must be a float; got {type(offset_scale).__name__} {offset_scale!r}")
    # x - x == 0 exactly when x is finite; unlike math.isfinite it also traces (torch.compile with dynamic=True makes
    # the value a SymFloat).
    if not offset_scale - offset_scale == 0:
        raise ValueError(f"dscn: offset_scale must be finite; got {offset_scale}")
    if on_x and kernel_h != 1:
        raise ValueError(f"dscn: an x-strip (on_x=True) needs kernel_h == 1; got {kernel_h}")
    if not on_x and kernel_w != 1:
        raise ValueError(f"dscn: a y-strip (on_x=False) needs kernel_w == 1; got {kernel_w}")
    k = kernel_w if on_x else kernel_h
    if remove_center and k % 2 == 0:
        raise ValueError(f"dscn: remove_center needs an odd kernel size; got {k}")
    if remove_center and k == 1:
        raise ValueError(f"dscn: remove_center needs a kernel size >= 3; got {k}")


def check_args(input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, remove_center, on_x) -> tuple[int, int]:
    """Validates a whole DSCN call as the compiled op does (the pure-PyTorch op and the fake kernel run this).

    Returns:
        (H_out, W_out).

    Raises:
        TypeError, ValueError: as :func:`check_config`, and for the tensors' rank, device, dtype and shapes.
    """
    for name, t in (("input", input), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dscn: {name} must be a torch.Tensor; got {type(t).__name__}")
    if input.dim() != 4:
        raise ValueError(f"dscn: input must be 4-D (N, H, W, C) channels-last; got {input.dim()}-D with shape "
                         f"{_shape(input)}")
    if input.shape[1] < 1 or input.shape[2] < 1:
        # An empty image has no pixels to pad (as for torch's convolutions): only the batch may be empty.
        raise ValueError(f"dscn: input must have H >= 1 and W >= 1 (only N may be 0); got shape {_shape(input)}")
    if offset.dim() != 4:
        raise ValueError(f"dscn: offset must be 4-D (N, H_out, W_out, group * K'); got {offset.dim()}-D with shape "
                         f"{_shape(offset)}")
    if input.device != offset.device:
        raise ValueError(f"dscn: input and offset must be on the same device; got input on {input.device} and "
                         f"offset on {offset.device}")
    if input.dtype not in _DTYPES:
        raise ValueError("dscn: input dtype must be one of float64, float32, float16, bfloat16; got "
                         f"{_dtype_name(input.dtype)}")
    if offset.dtype != input.dtype:
        raise ValueError(f"dscn: offset dtype must equal input dtype {_dtype_name(input.dtype)}; got "
                         f"{_dtype_name(offset.dtype)}")
    check_config(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                 offset_scale, remove_center, on_x)
    n, h, w, c = input.shape
    if c != group * group_channels:
        raise ValueError(f"dscn: input channels must equal group * group_channels = {group} * {group_channels} = "
                         f"{group * group_channels}; got {c}")
    taps = (kernel_w if on_x else kernel_h) - int(bool(remove_center))
    h_out = _out_len(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = _out_len(w, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"dscn: the output must be at least 1x1; got (H_out, W_out) = ({h_out}, {w_out}) from input "
                         f"(H, W) = ({h}, {w}) with kernel ({kernel_h}, {kernel_w}), stride ({stride_h}, {stride_w}), "
                         f"pad ({pad_h}, {pad_w}), dilation ({dilation_h}, {dilation_w})")
    if tuple(offset.shape) != (n, h_out, w_out, group * taps):
        raise ValueError(f"dscn: offset must have shape (N, H_out, W_out, group * K') = ({n}, {h_out}, {w_out}, "
                         f"{group * taps}); got {_shape(offset)}")
    # As the C++ check: sample positions in float32 are exact integers only up to 2^24.
    padded_axis = w + 2 * pad_w if on_x else h + 2 * pad_h
    if input.dtype != torch.float64 and padded_axis > 2**24:
        raise ValueError(f"dscn: the sampled axis plus its padding must be at most 2^24 = 16777216 for "
                         f"{_dtype_name(input.dtype)} (sample positions are float32; float64 has no such limit); got "
                         f"{padded_axis}")
    return h_out, w_out


def dscn_strip(
    input: torch.Tensor,
    offset: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    on_x: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """DSCN with the original operator's full argument list (see :func:`dscn` for the semantics).

    Args:
        input: (N, H, W, C) channels-last, C = group * group_channels.
        offset: (N, H_out, W_out, group * K'), K' = K - remove_center, taps in kernel order.
        kernel_h, kernel_w: kernel extent; the one across the strip must be 1 (kernel_h for ``on_x``).
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w: geometry per axis.
        group: number of offset groups; group_channels: channels per group.
        offset_scale: multiplies the learned offsets and the tap spacing around the kernel centre.
        remove_center: skip the centre tap (odd kernels only).
        on_x: sample along W (x-strip) if True, along H (y-strip) if False.
        backend: ``'auto'``, ``'cpp'`` or ``'pytorch'`` (see :func:`resolve_backend`).

    Returns:
        (N, H_out, W_out, C), in the dtype of ``input``.
    """
    for name, t in (("input", input), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dscn: {name} must be a torch.Tensor; got {type(t).__name__}")
    args = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
            offset_scale, bool(remove_center), bool(on_x))
    # An ONNX export records the pure-PyTorch op (gathers, multiplies and adds), which any ONNX runtime can run; a
    # jit trace alone keeps the compiled op (FLOP counters count it as 0, as the paper's figures do).
    if resolve_backend(backend, input.device) == "cpp" and not torch.onnx.is_in_onnx_export():
        # The compiled op checks its arguments itself (csrc/common/dscn_params.h) and has its own autocast kernel.
        return torch.ops.ops_dscn.dscn(input, offset, *args)
    if input.dtype != offset.dtype and torch.is_autocast_enabled(input.device.type):
        # The compiled op's autocast policy ("promote"; csrc/autocast/dscn_autocast.cpp), for the twin.
        dtype = torch.promote_types(input.dtype, offset.dtype)
        input, offset = input.to(dtype), offset.to(dtype)
    check_args(input, offset, *args)
    return dscn_pytorch(input, offset, *args)


def dscn(
    input: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    pad: int = 0,
    dilation: int = 1,
    group: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    axis: str = "x",
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable strip convolution: a sum of K linearly interpolated samples along one axis.

    For the x-strip (``axis='x'``; the y-strip swaps the roles of H and W), with c = dilation * (K - 1) // 2 and
    s = offset_scale, tap k of output pixel (n, h, w_out) and group g samples row h at

        loc = w_out * stride - pad + c + s * (k * dilation - c + offset[n, h, w_out, g * K' + k])

    and ``out[n, h, w_out, g * gc + j] = sum_k value_k`` with ``value = (1 - l) * x[floor(loc)] + l * x[floor(loc)
    + 1]``, l = loc - floor(loc), where a neighbour outside the image reads as 0. A tap contributes only if
    -1 < loc < W; NaN, +-Inf and huge offsets therefore make the tap contribute 0 (and receive a 0 gradient) —
    nothing outside the input is ever read. With zero offsets the op is a zero-padded box filter of K taps.

    Args:
        input: (N, H, W, C) channels-last (NHWC), C = group * group_channels. Non-contiguous tensors are copied.
        offset: (N, H_out, W_out, group * K'), K' = K - remove_center, taps ordered left→right (x) or top→bottom (y).
        kernel_size: K, taps along the axis.
        stride: stride along the axis (the other axis is not strided).
        pad: zero padding along the axis.
        dilation: spacing of the taps along the axis.
        group: number of offset groups (channels of a group share the offsets).
        offset_scale: s above.
        remove_center: skip tap K // 2 (odd K only).
        axis: ``'x'`` (along W) or ``'y'`` (along H).
        backend: ``'auto'`` (the compiled op when it has a kernel for the input's device, else pure PyTorch with one
            warning), ``'cpp'`` or ``'pytorch'`` (see :func:`resolve_backend`).

    Returns:
        (N, H_out, W_out, C) channels-last, in the dtype of ``input``: H_out = H for the x-strip and
        W_out = (W + 2 * pad - (dilation * (K - 1) + 1)) // stride + 1 (and symmetrically for y).

    Example:
        >>> x = torch.randn(2, 8, 8, 16)
        >>> off = torch.zeros(2, 8, 8, 4 * 3)
        >>> dscn(x, off, kernel_size=3, pad=1, group=4).shape
        torch.Size([2, 8, 8, 16])
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y'; got {axis!r}")
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError("dscn: input must be 4-D (N, H, W, C) channels-last; got "
                         + (f"{input.dim()}-D with shape {_shape(input)}" if isinstance(input, torch.Tensor)
                            else type(input).__name__))
    if isinstance(group, bool) or not isinstance(group, numbers.Integral) or group < 1:
        raise ValueError(f"dscn: group must be a positive int; got {group!r}")
    if input.shape[-1] == 0:
        raise ValueError(f"dscn: input must have at least one channel (N, H, W, C); got shape {_shape(input)}")
    if input.shape[-1] % group != 0:
        raise ValueError(f"dscn: input channels must be divisible by group; got C = {input.shape[-1]}, group = {group}")
    gc = input.shape[-1] // group
    if axis == "x":
        return dscn_strip(input, offset, 1, kernel_size, 1, stride, 0, pad, 1, dilation, group, gc, offset_scale,
                          remove_center, True, backend)
    return dscn_strip(input, offset, kernel_size, 1, stride, 1, pad, 0, dilation, 1, group, gc, offset_scale,
                      remove_center, False, backend)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registrations of the compiled operator (only when it is built)

if extension_available():

    @torch.library.register_fake("ops_dscn::dscn")
    def _dscn_fake(input, offset, *args):
        # The compiled op's checks, so that compiled and eager code reject the same calls; the kernels return
        # contiguous (N, H_out, W_out, C) tensors.
        h_out, w_out = check_args(input, offset, *args)
        return input.new_empty((input.shape[0], h_out, w_out, input.shape[3]))

    @torch.library.register_fake("ops_dscn::_dscn_backward")
    def _dscn_backward_fake(grad_output, input, offset, *args):
        *args, output_mask = args
        check_args(input, offset, *args)
        # Contiguous, as the kernels return them (empty_like would keep a permuted input's strides); a gradient that
        # is not asked for is an empty tensor.
        grad_input = input.new_empty(input.shape if output_mask[0] else (0,))
        grad_offset = offset.new_empty(offset.shape if output_mask[1] else (0,))
        return grad_input, grad_offset

    def _setup_context(ctx, inputs, output):
        input, offset, *args = inputs
        ctx.save_for_backward(input, offset)
        ctx.args = args

    def _backward(ctx, grad_output):
        input, offset = ctx.saved_tensors
        if recording_backward():  # create_graph=True: gradients that can be differentiated again
            grads = twin_gradients(lambda i, o: dscn_pytorch(i, o, *ctx.args), (input, offset), grad_output,
                                   ctx.needs_input_grad[:2])
            return (*grads, *(None,) * len(ctx.args))
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
        grad_input, grad_offset = torch.ops.ops_dscn._dscn_backward(grad_output.contiguous(), input, offset,
                                                                    *ctx.args, mask)
        return (grad_input if mask[0] else None, grad_offset if mask[1] else None) + (None,) * len(ctx.args)

    torch.library.register_autograd("ops_dscn::dscn", _backward, setup_context=_setup_context)
    _logger.debug("ops_dscn: compiled operator loaded (kernels for %s)", compiled_device_types())
