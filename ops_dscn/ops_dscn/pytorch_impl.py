"""Pure-PyTorch implementation of DSCN (the "twin" of the compiled operator).

It computes the same function as ``torch.ops.ops_dscn.dscn`` with ordinary tensor operations (a Python loop over the
K taps only, never over pixels), so it runs on any device and dtype PyTorch supports and is differentiated by
autograd. It is the fallback where the extension is not built and an independent check of the kernels.
"""

import torch

__all__ = ["dscn_pytorch"]


def _x_strip(
    x: torch.Tensor,
    offset: torch.Tensor,
    kernel: int,
    stride: int,
    pad: int,
    dilation: int,
    orth_stride: int,
    orth_pad: int,
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> torch.Tensor:
    """DSCN along W of a channels-last tensor.

    Args:
        x: Input, (N, H, W, C) channels-last.
        offset: Offsets, (N, H_out, W_out, group * K').

    Returns:
        (N, H_out, W_out, C).
    """
    n, h, w, c = x.shape
    _, h_out, w_out, _ = offset.shape
    gc = c // group
    taps = [k for k in range(kernel) if not (remove_center and k == kernel // 2)]

    # Rows read by the strip: one per output row; rows in the padding read as zero.
    rows = torch.arange(h_out, device=x.device) * orth_stride - orth_pad
    xr = x.index_select(1, rows.clamp(0, h - 1))
    # Decided from the integers (not from tensor values) so that torch.compile sees no data-dependent branch.
    row_ok = None
    if orth_pad > 0 or (h_out - 1) * orth_stride >= h:
        row_ok = ((rows >= 0) & (rows < h)).view(1, h_out, 1, 1)
        xr = torch.where(row_ok, xr, torch.zeros((), dtype=x.dtype, device=x.device))
    xr = xr.reshape(n, h_out, w, group, gc)

    # The interpolation math runs in at least float32 (as the kernels' accumulators do).
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    off = offset.reshape(n, h_out, w_out, group, len(taps)).to(acc_dtype)
    center = (dilation * (kernel - 1)) // 2
    p0 = torch.arange(w_out, device=x.device, dtype=acc_dtype) * stride - pad + center
    p0 = (p0 - center * offset_scale).view(1, 1, w_out, 1)

    out = torch.zeros(n, h_out, w_out, group, gc, device=x.device, dtype=acc_dtype)
    for j, k in enumerate(taps):
        loc = p0 + (k * dilation + off[..., j]) * offset_scale  # (N, H_out, W_out, G)
        inside = (loc > -1) & (loc < w)  # False for NaN
        if row_ok is not None:  # a line in the padding reads nothing (its gradients too), as in the kernels
            inside = inside & row_ok
        # Out-of-window taps (and NaN/Inf) are replaced before floor() so no bad index is ever formed; their
        # weights are zeroed below, and torch.where gives them a zero gradient.
        loc = torch.where(inside, loc, torch.zeros_like(loc))
        lo = torch.floor(loc)
        frac = loc - lo
        i0 = lo.long()
        i1 = i0 + 1
        use0 = (inside & (i0 >= 0)).unsqueeze(-1)
        use1 = (inside & (i1 <= w - 1)).unsqueeze(-1)
        idx0 = i0.clamp(0, w - 1).unsqueeze(-1).expand(n, h_out, w_out, group, gc)
        idx1 = i1.clamp(0, w - 1).unsqueeze(-1).expand(n, h_out, w_out, group, gc)
        # An unused neighbour contributes nothing, selected rather than weighted by 0, so that an Inf or NaN in the
        # input (or in the output's gradient) stays out of the taps that do not read it (0 * Inf = NaN), as in the
        # kernels: its value is replaced before the product (for the gradient of the weight) and the product after
        # (for the gradient of the value).
        zero = torch.zeros((), dtype=acc_dtype, device=x.device)
        v0 = torch.where(use0, torch.gather(xr, 2, idx0).to(acc_dtype), zero)
        v1 = torch.where(use1, torch.gather(xr, 2, idx1).to(acc_dtype), zero)
        out = out + torch.where(use0, (1 - frac).unsqueeze(-1) * v0, zero)
        out = out + torch.where(use1, frac.unsqueeze(-1) * v1, zero)
    return out.reshape(n, h_out, w_out, c).to(x.dtype)


def dscn_pytorch(
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
    offset_scale: float,
    remove_center: bool,
    on_x: bool,
) -> torch.Tensor:
    """DSCN in plain PyTorch; arguments and result as ``torch.ops.ops_dscn.dscn`` (validated by the caller).

    Args:
        input: (N, H, W, C) channels-last, C = group * group_channels.
        offset: (N, H_out, W_out, group * K'), K' = K - remove_center.

    Returns:
        (N, H_out, W_out, C).
    """
    del group_channels  # implied by C and group
    if on_x:
        return _x_strip(input, offset, kernel_w, stride_w, pad_w, dilation_w, stride_h, pad_h, group, offset_scale,
                        remove_center)
    # A y-strip is an x-strip of the transposed image.
    out = _x_strip(input.transpose(1, 2), offset.transpose(1, 2), kernel_h, stride_h, pad_h, dilation_h, stride_w,
                   pad_w, group, offset_scale, remove_center)
    return out.transpose(1, 2).contiguous()
