"""CPU: stride-2, kernel-4 (transposed) 3D convs with a narrow side, in sub-pixel form.

oneDNN's transposed conv (and the input gradient of a conv) is slow when one side has few
channels: D's dense heads (32 -> 3), G's heads (16 -> 4), D's first stage (3 -> 16). Each such
layer is one ordinary kernel-2 conv with 8x the channels plus an interleave; results equal torch's
to rounding (gradcheck and gradgradcheck in tests/test_conv3d_block.py). The drop-in modules are
:class:`vosgan.nn.conv3d_block.SubpixelConv3d` / ``SubpixelConvTranspose3d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Widest narrow side (C_out of a transposed conv, C_in of a conv) that takes the sub-pixel path.
#: Measured (2-core dev box, 1 thread, B=8, fp32, oneDNN vs sub-pixel transposed forward):
#: C_out 3: 1.7x, 4: 1.2-1.4x, 6: 1.4x, 8: 0.94x, 16: 0.5x; 4 is the widest measured win kept.
SUBPIXEL_MAX_CHANNELS = 4


def conv_transpose3d_subpixel(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)`` for a kernel of 4.

    Output voxel ``o = 2j + r - 1`` (phase ``r`` in {0, 1} per axis) receives ``x[j-1]``
    through kernel tap ``2 + r`` and ``x[j]`` through tap ``r``: the 8 phases are one stride-1,
    kernel-2 ``conv3d`` (padding 1) with ``8 * C_out`` output channels, interleaved
    afterwards. oneDNN's transposed conv is slow for few output channels; this form is not.

    Args:
        x: ``(B, C_in, T, H, W)``; weight: ``(C_in, C_out, 4, 4, 4)``; bias: ``(C_out,)``.

    Returns:
        ``(B, C_out, 2T, 2H, 2W)``, contiguous.
    """
    b, _, t, h, w = x.shape
    c_in, c_out = weight.shape[:2]
    # tap k = 2q + r; the kernel-2 conv's tap a = 1 - q reads x[j - q]
    wp = weight.view(c_in, c_out, 2, 2, 2, 2, 2, 2).flip(2, 4, 6)
    wp = wp.permute(3, 5, 7, 1, 0, 2, 4, 6).reshape(8 * c_out, c_in, 2, 2, 2)
    z = F.conv3d(x, wp, None if bias is None else bias.repeat(8), padding=1)  # (T+1, ...)
    z = z.view(b, 2, 2, 2, c_out, t + 1, h + 1, w + 1)
    out = x.new_empty(b, c_out, 2 * t, 2 * h, 2 * w)
    ov = out.view(b, c_out, t, 2, h, 2, w, 2)  # o = 2m + s: phase r = 1 - s, j = m + s
    for r in range(8):
        rt, rh, rw = r >> 2, (r >> 1) & 1, r & 1
        ov[:, :, :, 1 - rt, :, 1 - rh, :, 1 - rw].copy_(
            z[:, rt, rh, rw, :, 1 - rt : t + 1 - rt, 1 - rh : h + 1 - rh, 1 - rw : w + 1 - rw]
        )
    return out


def subpixel_blocker(x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d) -> str | None:
    """Why :func:`subpixel_conv3d` cannot run ``conv(x)``, or ``None`` when it can."""
    transposed = isinstance(conv, nn.ConvTranspose3d)
    narrow = conv.out_channels if transposed else conv.in_channels
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 5:
        return f"input is {x.dtype} {tuple(x.shape)} on {x.device.type} (needs 5-D fp32/fp64 CPU)"
    if (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.output_padding,
        conv.padding_mode,
    ) != ((4,) * 3, (2,) * 3, (1,) * 3, (1,) * 3, 1, (0,) * 3, "zeros"):
        return "geometry is not kernel 4, stride 2, padding 1 (no dilation, groups, output_padding)"
    if narrow > SUBPIXEL_MAX_CHANNELS:
        return f"{narrow} channels on the narrow side (> {SUBPIXEL_MAX_CHANNELS})"
    if not transposed and any(s % 2 for s in x.shape[2:]):
        return f"odd T/H/W {tuple(x.shape[2:])}: the input gradient has no sub-pixel form"
    return None


def subpixel_applies(x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d) -> bool:
    """Whether :func:`subpixel_conv3d` can run ``conv(x)`` (see :func:`subpixel_blocker`)."""
    return subpixel_blocker(x, conv) is None


class _SubpixelConvFunction(torch.autograd.Function):
    """Transposed: sub-pixel forward, oneDNN backward. Conv: oneDNN forward and weight gradient,
    sub-pixel input gradient (the adjoint of a stride-2 conv is the transposed conv). With
    grad mode on in backward (double backward) everything runs ``convolution_backward``, which
    is differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.has_bias = transposed, bias is not None
        if transposed:
            return conv_transpose3d_subpixel(x, weight, bias)
        return F.conv3d(x, weight, bias, 2, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        subpixel_dx = need_x and not ctx.transposed and not torch.is_grad_enabled()
        mask = [need_x and not subpixel_dx, need_w, need_b and ctx.has_bias]
        dx = dw = db = None
        if any(mask):  # e.g. not in G's step through a frozen D, where only dx is needed
            bias_sizes = [weight.shape[1] if ctx.transposed else weight.shape[0]]
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                bias_sizes if ctx.has_bias else None,
                [2] * 3,
                [1] * 3,
                [1] * 3,
                ctx.transposed,
                [0] * 3,
                1,
                mask,
            )
        if subpixel_dx:
            dx = conv_transpose3d_subpixel(grad.contiguous(), weight)
        return dx, dw, db, None


def subpixel_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """``conv_transpose3d`` / ``conv3d`` (stride 2, padding 1, kernel 4) through the sub-pixel
    CPU path (check :func:`subpixel_applies` first); values and gradients equal the module's
    own forward up to fp32 rounding. ``x (B, C_in, T, H, W)``; weight as in the module."""
    return _SubpixelConvFunction.apply(x, weight, bias, transposed)
