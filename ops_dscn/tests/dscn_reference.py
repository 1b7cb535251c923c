"""Independent float64 reference of DSCN, written straight from the definition (spec §1) with plain loops.

Deliberately shares no code with the package: loops over output pixel, group and tap; numpy vectors only over the
batch and the group's channels. Slow, for small shapes only.
"""

import math

import numpy as np


def _sample(line: np.ndarray, loc: float) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """Linear interpolation of `line` (L, B, gc) at `loc`; returns the value (B, gc) and the (index, weight) pairs."""
    length = line.shape[0]
    value = np.zeros(line.shape[1:])
    used = []
    if not (-1 < loc < length):  # NaN fails this test too
        return value, used
    w0 = math.floor(loc)
    lw = loc - w0
    if w0 >= 0:
        value = value + (1 - lw) * line[w0]
        used.append((w0, 1 - lw))
    if w0 + 1 <= length - 1:
        value = value + lw * line[w0 + 1]
        used.append((w0 + 1, lw))
    return value, used


def _geometry(kernel, stride, pad, dilation, length):
    out = (length + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    center = (dilation * (kernel - 1)) // 2
    return out, center


def dscn_reference(x, offset, kernel, stride=1, pad=0, dilation=1, group=1, offset_scale=1.0, remove_center=False,
                   axis="x", grad_out=None):
    """DSCN forward (and, given ``grad_out``, backward) in float64.

    Args:
        x: (N, H, W, C) array.
        offset: (N, H_out, W_out, group * K') array.
        grad_out: optional (N, H_out, W_out, C) array.

    Returns:
        out, or (out, grad_x, grad_offset) when grad_out is given.
    """
    x = np.asarray(x, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    if axis == "y":  # the y-strip is the x-strip of the transposed image
        res = dscn_reference(x.transpose(0, 2, 1, 3), offset.transpose(0, 2, 1, 3), kernel, stride, pad, dilation,
                             group, offset_scale, remove_center, "x",
                             None if grad_out is None else np.asarray(grad_out).transpose(0, 2, 1, 3))
        if grad_out is None:
            return res.transpose(0, 2, 1, 3)
        return tuple(r.transpose(0, 2, 1, 3) for r in res)
    n, h, w, c = x.shape
    gc = c // group
    w_out, center = _geometry(kernel, stride, pad, dilation, w)
    taps = [k for k in range(kernel) if not (remove_center and k == kernel // 2)]
    s = offset_scale
    out = np.zeros((n, h, w_out, c))
    grad_x = np.zeros_like(x)
    grad_off = np.zeros_like(offset)
    for ho in range(h):
        for wo in range(w_out):
            for g in range(group):
                ch = slice(g * gc, (g + 1) * gc)
                line = x[:, ho, :, ch].transpose(1, 0, 2)  # (W, N, gc)
                for j, k in enumerate(taps):
                    for b in range(n):
                        off = offset[b, ho, wo, g * len(taps) + j]
                        loc = wo * stride - pad + center + s * (k * dilation - center + off)
                        value, used = _sample(line[:, b : b + 1], loc)
                        out[b, ho, wo, ch] += value[0]
                        if grad_out is None:
                            continue
                        go = np.asarray(grad_out[b, ho, wo, ch], dtype=np.float64)
                        dloc = 0.0
                        for idx, weight in used:
                            grad_x[b, ho, idx, ch] += weight * go
                            # d weight / d loc is -1 for the lower neighbour and +1 for the upper one
                            sign = -1.0 if idx == math.floor(loc) else 1.0
                            dloc += sign * float(np.dot(go, line[idx, b]))
                        grad_off[b, ho, wo, g * len(taps) + j] = s * dloc
    if grad_out is None:
        return out
    return out, grad_x, grad_off


def orth_stride_case(on_x: bool, orth_stride: int, orth_pad: int, across: int):
    """A float64 case with a stride and zero padding across the strip (an x-strip's stride_h / pad_h), shared by the
    tests of the compiled kernels and of the CUDA source run on the CPU.

    Returns:
        (x (2, H, W, 6), offset, grad_out, args): ``args`` is the op's argument list after the two tensors (kernel 5,
        stride 2 and pad 2 along the strip, 2 groups of 3 channels, length 9 along the strip, `across` across it).
    """
    import torch  # the reference itself is numpy only

    k, length, group, gc, stride, pad = 5, 9, 2, 3, 2, 2
    h, w = (across, length) if on_x else (length, across)
    n_lines = (across + 2 * orth_pad - 1) // orth_stride + 1
    out_len = (length + 2 * pad - (k - 1) - 1) // stride + 1
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, h, w, group * gc, generator=g, dtype=torch.float64)
    off_shape = (2, n_lines, out_len) if on_x else (2, out_len, n_lines)
    off = torch.randn(*off_shape, group * k, generator=g, dtype=torch.float64) * 2.5 + 0.3
    grad_out = torch.randn(*off_shape, group * gc, generator=g, dtype=torch.float64)
    geometry = (1, k, orth_stride, stride, orth_pad, pad) if on_x else (k, 1, stride, orth_stride, pad, orth_pad)
    return x, off, grad_out, (*geometry, 1, 1, group, gc, 1.0, False, on_x)
