"""Stride-2, kernel-4 (transposed) 3D convs in sub-pixel form.

A transposed conv of that geometry is one ordinary stride-1, kernel-2 conv with 8x the output
channels plus an interleave (:func:`conv_transpose3d_subpixel`); the input gradient of a stride-2
conv is such a transposed conv. Results equal torch's to rounding (gradcheck and gradgradcheck in
tests/test_conv3d_subpixel.py).

- CPU: oneDNN's transposed conv (and a conv's input gradient) is slow when one side has few
  channels: D's dense heads (32 -> 3), G's heads (16 -> 4), D's first stage (3 -> 16). The
  drop-in modules are :class:`vosgan.nn.conv3d_block.SubpixelConv3d` /
  ``SubpixelConvTranspose3d``.
- CUDA: the fused conv blocks' transposed convs, while cudnn.benchmark is off
  (:mod:`vosgan.ops.conv3d_forms`); cuDNN's heuristic choice for their backward is slow at
  VOS-GAN's shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Widest narrow side (C_out of a transposed conv, C_in of a conv) that takes the sub-pixel path.
#: Measured (2-core dev box, 1 thread, B=8, fp32, oneDNN vs sub-pixel transposed forward):
#: C_out 3: 1.7x, 4: 1.2-1.4x, 6: 1.4x, 8: 0.94x, 16: 0.5x; 4 is the widest measured win kept.
SUBPIXEL_MAX_CHANNELS = 4


def phase_weight(weight: Tensor) -> Tensor:
    """The kernel-2 conv weight of the sub-pixel form of a stride-2, padding-1, kernel-4
    transposed conv.

    Output voxel ``o = 2m + s`` (phase ``s`` in {0, 1} per axis) is
    ``sum_a x_pad[m + s + a] * weight[3 - (2a + s)]`` (``x_pad``: ``x`` padded by 1): with the
    kernel flipped, tap ``2a + s`` belongs to phase ``s``, tap ``a`` of a kernel-2 conv.

    Args:
        weight: ``(C_in, C_out, 4, 4, 4)``, a ``ConvTranspose3d`` weight.

    Returns:
        ``(8 * C_out, C_in, 2, 2, 2)``: output channel ``(4 s_t + 2 s_h + s_w) * C_out + c``.
        Differentiable (flip, view, permute).
    """
    c_in, c_out = weight.shape[:2]
    wp = weight.flip(2, 3, 4).reshape(c_in, c_out, 2, 2, 2, 2, 2, 2)  # (.., a_t, s_t, ..)
    return wp.permute(3, 5, 7, 1, 0, 2, 4, 6).reshape(8 * c_out, c_in, 2, 2, 2)


def _phases(z: Tensor, c_out: int) -> Tensor:
    """``(B, C_out, T, 2, H, 2, W, 2)`` view of the kernel-2 conv's output ``z``
    ``(B, 8 * C_out, T + 1, H + 1, W + 1)`` (any strides): element ``[b, c, m, s_t, ...]`` is
    ``z[b, (4 s_t + 2 s_h + s_w) * C_out + c, m + s_t, ...]``, the output voxel ``2m + s_t``."""
    b, _, t1, h1, w1 = z.shape
    sb, sc, st, sh, sw = z.stride()
    return z.as_strided(
        (b, c_out, t1 - 1, 2, h1 - 1, 2, w1 - 1, 2),
        (sb, sc, st, 4 * c_out * sc + st, sh, 2 * c_out * sc + sh, sw, c_out * sc + sw),
    )  # storage offset: z's


def _split(out: Tensor) -> Tensor:
    """``(B, C, 2T, 2H, 2W)`` -> its ``(B, C, T, 2, H, 2, W, 2)`` view (any strides)."""
    b, c, t2, h2, w2 = out.shape
    return out.unflatten(4, (w2 // 2, 2)).unflatten(3, (h2 // 2, 2)).unflatten(2, (t2 // 2, 2))


def _interleave(z: Tensor, c_out: int, fmt: torch.memory_format) -> Tensor:
    """The transposed conv's output ``(B, C_out, 2T, 2H, 2W)`` in memory format ``fmt`` from
    the phases in ``z``: one strided copy."""
    b, _, t1, h1, w1 = z.shape
    size = (b, c_out, 2 * t1 - 2, 2 * h1 - 2, 2 * w1 - 2)
    out = torch.empty(size, dtype=z.dtype, device=z.device, memory_format=fmt)
    _split(out).copy_(_phases(z, c_out))
    return out


def _deinterleave(out: Tensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """The adjoint of :func:`_interleave`: ``out``'s voxels back to their phases, in a new
    tensor of the given shape and strides (``z``'s); the positions no output voxel reads stay 0."""
    z = out.new_empty_strided(shape, stride).zero_()
    _phases(z, out.shape[1]).copy_(_split(out))
    return z


def memory_format_of(t: Tensor) -> torch.memory_format:
    """``channels_last_3d`` (5-D) or ``channels_last`` (4-D) for a tensor laid out so and not
    also contiguous, else ``contiguous_format``."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if cl is not None and not t.is_contiguous() and t.is_contiguous(memory_format=cl):
        return cl
    return torch.contiguous_format


class _Interleave(torch.autograd.Function):
    """:func:`_interleave` with :func:`_deinterleave` as its backward, and the other way round:
    both are linear, so derivatives of any order work."""

    @staticmethod
    def forward(ctx, z: Tensor, c_out: int, fmt: torch.memory_format) -> Tensor:
        ctx.layout = (tuple(z.shape), z.stride())
        return _interleave(z, c_out, fmt)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Deinterleave.apply(grad, *ctx.layout), None, None


class _Deinterleave(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
        ctx.c_out = out.shape[1]
        ctx.fmt = memory_format_of(out)
        return _deinterleave(out, shape, stride)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Interleave.apply(grad, ctx.c_out, ctx.fmt), None, None


def conv_transpose3d_subpixel(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)`` for a kernel of 4, as one
    stride-1, kernel-2 ``conv3d`` (padding 1) with ``8 * C_out`` output channels (the 8 phases
    of :func:`phase_weight`) and one interleaving copy.

    Differentiable to any order: the backward is the kernel-2 conv's (its input gradient and
    weight gradient, both stride 1) behind the interleave's adjoint. oneDNN's transposed conv
    is slow for few output channels; cuDNN's transposed conv (a strided dgrad) and its weight
    gradient are slow at VOS-GAN's shapes (``benchmarks/bench_conv_subpixel.py``).

    Args:
        x: ``(B, C_in, T, H, W)``; weight: ``(C_in, C_out, 4, 4, 4)``; bias: ``(C_out,)``.

    Returns:
        ``(B, C_out, 2T, 2H, 2W)``, channels_last_3d if ``x`` is, else contiguous.
    """
    c_out = weight.shape[1]
    z = F.conv3d(x, phase_weight(weight), None if bias is None else bias.repeat(8), padding=1)
    return _Interleave.apply(z, c_out, memory_format_of(x))


def geometry_blocker(x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d) -> str | None:
    """Why the sub-pixel form does not apply to ``conv``'s geometry and ``x``'s shape."""
    if x.dim() != 5:
        return f"input is {tuple(x.shape)} (needs 5-D)"
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
    if not isinstance(conv, nn.ConvTranspose3d) and any(s % 2 for s in x.shape[2:]):
        return f"odd T/H/W {tuple(x.shape[2:])}: the input gradient has no sub-pixel form"
    return None


def subpixel_blocker(x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d) -> str | None:
    """Why :func:`subpixel_conv3d` cannot run ``conv(x)`` on CPU, or ``None`` when it can."""
    narrow = conv.out_channels if isinstance(conv, nn.ConvTranspose3d) else conv.in_channels
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 5:
        return f"input is {x.dtype} {tuple(x.shape)} on {x.device.type} (needs 5-D fp32/fp64 CPU)"
    geometry = geometry_blocker(x, conv)
    if geometry is not None:
        return geometry
    if narrow > SUBPIXEL_MAX_CHANNELS:
        return f"{narrow} channels on the narrow side (> {SUBPIXEL_MAX_CHANNELS})"
    return None


def subpixel_applies(x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d) -> bool:
    """Whether :func:`subpixel_conv3d` can run ``conv(x)`` (see :func:`subpixel_blocker`)."""
    return subpixel_blocker(x, conv) is None


def phase_weight_grad(grad: Tensor) -> Tensor:
    """The adjoint of :func:`phase_weight` (also its inverse: it only moves entries):
    ``(8 * C_out, C_in, 2, 2, 2)`` -> ``(C_in, C_out, 4, 4, 4)``."""
    c_out, c_in = grad.shape[0] // 8, grad.shape[1]
    g = grad.reshape(2, 2, 2, c_out, c_in, 2, 2, 2).permute(4, 3, 5, 0, 6, 1, 7, 2)
    return g.reshape(c_in, c_out, 4, 4, 4).flip(2, 3, 4)


def _subpixel_weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The weight gradient of ``conv_transpose3d(x, weight, stride=2, padding=1)`` for the output
    gradient ``grad`` ``(B, C_out, 2T, 2H, 2W)``: the kernel-2 conv's weight gradient (stride 1)
    against ``grad``'s phases, mapped back to the ``(C_in, C_out, 4, 4, 4)`` kernel."""
    b, c_out, t2, h2, w2 = grad.shape
    shape = (b, 8 * c_out, t2 // 2 + 1, h2 // 2 + 1, w2 // 2 + 1)
    stride = torch.empty(shape, device="meta", memory_format=memory_format_of(grad)).stride()
    gz = _deinterleave(grad, shape, stride)
    wp = phase_weight(weight)
    dwp = torch.ops.aten.convolution_backward(
        gz, x, wp, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, [False, True, False]
    )[1]
    return phase_weight_grad(dwp)


class _SubpixelConvFunction(torch.autograd.Function):
    """A stride-2, kernel-4 conv with one part in sub-pixel form, by ``form``:

    - ``"subpixel-fwd"`` (transposed): sub-pixel forward, torch's backward;
    - ``"subpixel-bwd"`` (transposed): torch's forward and input gradient (a stride-2 conv),
      sub-pixel weight gradient (:func:`_subpixel_weight_grad`);
    - ``"subpixel-dx"`` (conv): torch's forward and weight gradient, sub-pixel input gradient
      (the adjoint of a stride-2 conv is the transposed conv).

    With grad mode on in backward (double backward) everything runs ``convolution_backward``,
    which is differentiable. Under autocast the inputs are cast once, here, and the backward runs
    in the cast dtype (autograd casts each gradient back to its input's dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, form: str) -> Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as autocast casts a conv: float32 only
            dtype = torch.get_autocast_dtype(device)

            def cast(t: Tensor) -> Tensor:
                return t.to(dtype) if t.dtype == torch.float32 else t

            x, weight = cast(x), cast(weight)
            bias = None if bias is None else cast(bias)
        ctx.save_for_backward(x, weight)
        ctx.form, ctx.has_bias = form, bias is not None
        with torch.autocast(device, enabled=False):
            if form == "subpixel-fwd":
                return conv_transpose3d_subpixel(x, weight, bias)
            if form == "subpixel-bwd":
                return F.conv_transpose3d(x, weight, bias, 2, 1)
            return F.conv3d(x, weight, bias, 2, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        transposed = ctx.form != "subpixel-dx"
        own = not torch.is_grad_enabled() and ctx.form != "subpixel-fwd"  # the sub-pixel part
        own_x, own_w = own and need_x and not transposed, own and need_w and transposed
        mask = [need_x and not own_x, need_w and not own_w, need_b and ctx.has_bias]
        dx = dw = db = None
        if own and transposed:  # torch's dx and db without its weight gradient
            dx = F.conv3d(grad, weight, None, 2, 1) if need_x else None
            db = grad.sum((0, 2, 3, 4)) if mask[2] else None
        elif any(mask):  # e.g. not in G's step through a frozen D, where only dx is needed
            bias_sizes = [weight.shape[1] if transposed else weight.shape[0]]
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                bias_sizes if ctx.has_bias else None,
                [2] * 3,
                [1] * 3,
                [1] * 3,
                transposed,
                [0] * 3,
                1,
                mask,
            )
        if own_x:
            dx = conv_transpose3d_subpixel(grad, weight)
        if own_w:
            dw = _subpixel_weight_grad(grad, x, weight)
        return dx, dw, db, None


def subpixel_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """``conv_transpose3d`` / ``conv3d`` (stride 2, padding 1, kernel 4) through the sub-pixel
    CPU path (check :func:`subpixel_applies` first); values and gradients equal the module's
    own forward up to fp32 rounding. ``x (B, C_in, T, H, W)``; weight as in the module."""
    _check_input(x, weight, transposed)
    return _SubpixelConvFunction.apply(
        x, weight, bias, "subpixel-fwd" if transposed else "subpixel-dx"
    )


def subpixel_form_conv(x: Tensor, weight: Tensor, bias: Tensor | None, form: str) -> Tensor:
    """``conv_transpose3d`` / ``conv3d`` (stride 2, padding 1, kernel 4) in one of the forms of
    :data:`vosgan.ops.conv3d_forms.CUDA_FORMS` that run here (``"subpixel"``, ``"subpixel-fwd"``,
    ``"subpixel-bwd"``, ``"subpixel-dx"``), on any device; values and
    gradients equal torch's up to rounding. ``x (B, C_in, T, H, W)``; weight as in the module."""
    if form not in ("subpixel", "subpixel-fwd", "subpixel-bwd", "subpixel-dx"):
        raise ValueError(f"form must be a sub-pixel form, got {form!r}")
    _check_input(x, weight, transposed=form != "subpixel-dx")
    if form == "subpixel":
        return conv_transpose3d_subpixel(x, weight, bias)
    return _SubpixelConvFunction.apply(x, weight, bias, form)


def _check_input(x: Tensor, weight: Tensor, transposed: bool) -> None:
    """``x (B, C_in, T, H, W)`` with ``weight``'s input channels; even T, H, W for a conv (its
    input gradient is a sub-pixel transposed conv only then)."""
    c_in = weight.shape[0] if transposed else weight.shape[1]
    if x.dim() != 5 or x.shape[1] != c_in:
        raise ValueError(
            f"x must be (B, {c_in}, T, H, W) for weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    if not transposed and any(s % 2 for s in x.shape[2:]):
        raise ValueError(
            f"x has odd T/H/W {tuple(x.shape[2:])}: a stride-2 conv's input gradient has a "
            "sub-pixel form only for even sizes"
        )
