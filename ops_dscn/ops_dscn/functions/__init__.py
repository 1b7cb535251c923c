"""The original autograd entry point of the DSCN operator, kept for code written against the original API."""

import torch

from ..functional import dscn_strip

__all__ = ["DSCNFunction"]


class DSCNFunction:
    """Compatibility wrapper: ``DSCNFunction.apply(...)`` with the original operator's 16 arguments.

    Gradients flow through the registered autograd formula of the operator, so the result is differentiable like
    the original ``torch.autograd.Function``. ``im2col_step`` is accepted and ignored: any batch size works.
    """

    @staticmethod
    def apply(
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
        im2col_step: int,
        remove_center: int | bool,
        on_x: bool,
    ) -> torch.Tensor:
        """Runs DSCN (see :func:`ops_dscn.dscn`) on ``input`` (N, H, W, C) with ``offset`` (N, H_out, W_out, G*K').

        Returns:
            (N, H_out, W_out, C).
        """
        if isinstance(im2col_step, bool) or not isinstance(im2col_step, int) or im2col_step < 1:
            raise ValueError(f"im2col_step must be a positive int; got {im2col_step!r}")
        return dscn_strip(input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                          dilation_w, group, group_channels, offset_scale, bool(remove_center), bool(on_x))
