"""Spatio-temporal conv blocks: ``Conv3d | ConvTranspose3d`` + ``BatchNorm3d`` + ``(Leaky)ReLU``.

The reference block is a plain ``nn.Sequential(conv, bn, act)`` (``bn`` omitted where a stage has
no normalisation); the fused drop-in modules in :mod:`vosgan.nn` load its ``state_dict``.

The convolution stays with cuDNN (any memory format; ``channels_last_3d`` recommended with bf16).
What is fused is the rest of the block, :func:`bn_act`: BatchNorm (batch statistics in training,
running statistics in eval) + affine + optional residual add + LeakyReLU/ReLU, as the
``torch.library`` ops ``vosgan::bn_act_fwd`` / ``vosgan::bn_act_bwd`` backed by the Triton
kernels of :mod:`vosgan.kernels.bn_act` (2 passes over ``y`` forward, 2 backward; only ``y`` is
saved for backward, against ``y`` and the BN output for the eager block). Tensors of up to
``bn_act_small.SMALL_NUMEL`` elements take the single-launch kernels of
:mod:`vosgan.kernels.bn_act_small` (one launch forward, one backward). In eager mode the same
kernels run through an ``autograd.Function`` (less dispatch overhead) that also updates the
running statistics inside the statistics kernel; under ``torch.compile`` the registered ops run
and the running statistics are updated with two in-place torch ops.

Dtypes: ``y``/``residual``/output fp32, fp16 or bf16 (the output has ``y``'s dtype and memory
format); BN parameters and statistics fp32; all reductions fp32. Under autocast the conv output
arrives in the low precision, the BN parameters stay fp32, exactly as for the eager block.

Double backward (R1 penalty) works: when the backward runs with grad mode on (i.e.
``create_graph=True``) it computes the gradients with differentiable PyTorch ops (batch statistics
recomputed from ``y``), otherwise with the fused Triton kernels.

CPU: BN + activation run the reference ops; what is faster there is the conv itself for VOS-GAN's
few-channel stride-2 layers (the dense heads, D's first stage): :func:`subpixel_conv3d`, used by
``vosgan.nn.conv3d_block.SubpixelConv3d`` / ``SubpixelConvTranspose3d`` (end of this file).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vosgan import backend
from vosgan.ops.conv3d_subpixel import SUBPIXEL_MAX_CHANNELS

ACTIVATIONS = ("lrelu", "relu")


def conv3d_block_reference(
    in_channels: int,
    out_channels: int,
    *,
    transpose: bool = False,
    kernel_size: int = 4,
    stride: int = 2,
    padding: int = 1,
    norm: bool = True,
    act: str = "lrelu",
    negative_slope: float = 0.2,
) -> nn.Sequential:
    """Build the reference block ``Sequential(conv, [BatchNorm3d], act)``.

    Input ``(B, C_in, T, H, W)``; output ``(B, C_out, T', H', W')`` where each of T, H, W is halved
    (``Conv3d``, stride 2) or doubled (``ConvTranspose3d``, stride 2) with the default geometry.
    The conv has no bias when a BatchNorm follows it (the BN shift subsumes it).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    conv_cls = nn.ConvTranspose3d if transpose else nn.Conv3d
    layers: list[nn.Module] = [
        conv_cls(in_channels, out_channels, kernel_size, stride, padding, bias=not norm)
    ]
    if norm:
        layers.append(nn.BatchNorm3d(out_channels))
    layers.append(nn.LeakyReLU(negative_slope) if act == "lrelu" else nn.ReLU())
    return nn.Sequential(*layers)


_DIMS = (0, 2, 3, 4)
_CH = (1, -1, 1, 1, 1)
IMPLS = ("auto", "reference", "triton")


def bn_act_reference(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    negative_slope: float,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(BatchNorm3d(y) [+ residual])`` with PyTorch's own ops (updates running stats).

    The residual add and the activation run in place on the BN output, which no backward
    (first or second order) reads: one allocation and one write pass fewer than the
    ``nn.Sequential`` block, same values and gradients. Requires ``negative_slope >= 0``.
    """
    # CUDA's batch_norm updates running statistics that are not contiguous (column views of a
    # wider buffer, say) wrongly: on an H100 (torch 2.11) all four values of such a view ended
    # up to 0.36 away from the contiguous update, the rest of the buffer untouched. So update
    # contiguous copies and write them back.
    stats = (running_mean, running_var)
    strided = training and any(t is not None and not t.is_contiguous() for t in stats)
    if strided:
        running_mean, running_var = (t if t is None else t.contiguous() for t in stats)
    z = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    if strided:
        with torch.no_grad():
            for view, updated in zip(stats, (running_mean, running_var), strict=True):
                if view is not None and view is not updated:
                    view.copy_(updated)
    if residual is not None:
        z = z.add_(residual)
    return F.relu_(z) if negative_slope == 0 else F.leaky_relu_(z, negative_slope)


def _grads_differentiable(
    grad_out: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    slope: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The backward of :func:`bn_act` in differentiable PyTorch ops (for double backward).

    In training the batch statistics are recomputed from ``y`` so that their dependence on ``y``
    is part of the graph; in eval ``mean``/``var`` are the (constant) running statistics.
    """
    yf, go = y.float(), grad_out.float()
    if training:
        mean, var = yf.mean(_DIMS), yf.var(_DIMS, unbiased=False)
    invstd = torch.rsqrt(var + eps)
    xhat = (yf - mean.view(_CH)) * invstd.view(_CH)
    z = xhat * weight.float().view(_CH) + bias.float().view(_CH)
    if residual is not None:
        z = z + residual.float()
    g = torch.where(z > 0, go, go * slope)  # the mask is piecewise constant: no gradient
    db = g.sum(_DIMS)
    dw = (g * xhat).sum(_DIMS)
    scale = (weight.float() * invstd).view(_CH)
    if training:
        n = y.numel() // y.shape[1]
        dy = scale * (g - db.view(_CH) / n - xhat * (dw.view(_CH) / n))
    else:
        dy = scale * g
    dres = g.to(residual.dtype) if residual is not None else None
    return dy.to(y.dtype), dw.to(weight.dtype), db.to(bias.dtype), dres


def _fwd_kernels(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    stat_mean: Tensor | None,
    stat_var: Tensor | None,
    eps: float,
    negative_slope: float,
    update: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton launches of the forward; ``update`` = running stats updated in the same launch
    (contiguous: the kernels index them, and the (C,)-sized parameters, with unit stride)."""
    from vosgan.kernels import bn_act as kernels
    from vosgan.kernels import bn_act_small as small

    weight, bias = weight.contiguous(), bias.contiguous()
    if stat_mean is None or stat_var is None:
        if y.numel() <= small.SMALL_NUMEL:  # one launch instead of three
            return small.bn_act_train_forward(
                y, weight, bias, residual, eps, negative_slope, update
            )
        mean, var = kernels.bn_stats(y, update)
    else:
        mean = stat_mean.float().clone(memory_format=torch.contiguous_format)
        var = stat_var.float().clone(memory_format=torch.contiguous_format)
    out = kernels.bn_act_forward(y, mean, var, weight, bias, residual, eps, negative_slope)
    return out, mean, var


def _fwd_impl(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor],  # noqa: UP045
    stat_mean: Optional[Tensor],  # noqa: UP045
    stat_var: Optional[Tensor],  # noqa: UP045
    eps: float,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward. ``stat_mean``/``stat_var`` ``None``: batch statistics (training).

    Returns ``(out, mean, var)``: ``out`` like ``y``; ``mean``/biased ``var`` fp32 ``(C,)``.
    """
    return _fwd_kernels(y, weight, bias, residual, stat_mean, stat_var, eps, negative_slope)


_bn_act_fwd = torch.library.custom_op("vosgan::bn_act_fwd", _fwd_impl, mutates_args=())


@_bn_act_fwd.register_fake
def _(y, weight, bias, residual, stat_mean, stat_var, eps, negative_slope):
    c = y.shape[1]
    return (
        torch.empty_like(y),
        y.new_empty(c, dtype=torch.float32),
        y.new_empty(c, dtype=torch.float32),
    )


def _bwd_impl(
    grad_out: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor],  # noqa: UP045
    mean: Tensor,
    var: Tensor,
    eps: float,
    negative_slope: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: ``(dy, dweight, dbias, dresidual)``; ``dresidual`` is empty without one."""
    from vosgan.kernels import bn_act as kernels
    from vosgan.kernels import bn_act_small as small

    launcher = small if y.numel() <= small.SMALL_NUMEL else kernels  # 1 launch vs 3
    params = (t.contiguous() for t in (mean, var, weight, bias))  # (C,): unit stride in-kernel
    dy, dw, db, dres = launcher.bn_act_backward(
        grad_out, y, residual, *params, eps, negative_slope, training
    )
    return dy, dw.to(weight.dtype), db.to(bias.dtype), dres if dres is not None else y.new_empty(0)


def _bwd_op_impl(
    grad_out: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor],  # noqa: UP045
    mean: Tensor,
    var: Tensor,
    eps: float,
    negative_slope: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_bwd_impl` as an op: outputs may not alias (dweight/dbias share one buffer)."""
    dy, dw, db, dres = _bwd_impl(
        grad_out, y, weight, bias, residual, mean, var, eps, negative_slope, training
    )
    return dy, dw.clone(), db.clone(), dres


_bn_act_bwd = torch.library.custom_op("vosgan::bn_act_bwd", _bwd_op_impl, mutates_args=())


@_bn_act_bwd.register_fake
def _(grad_out, y, weight, bias, residual, mean, var, eps, negative_slope, training):
    dres = torch.empty_like(y) if residual is not None else y.new_empty(0)
    return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias), dres


def _setup_context(ctx, inputs, output, eager: bool = False) -> None:
    y, weight, bias, residual, stat_mean, _, eps, slope = inputs
    _, mean, var = output
    ctx.save_for_backward(y, weight, bias, residual, mean, var)
    ctx.training = stat_mean is None
    ctx.eps, ctx.slope, ctx.eager = eps, slope, eager
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled grads for mean/var (2 launches fewer)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # only the (non-differentiable) statistics were used
        return None, None, None, None, None, None, None, None
    y, weight, bias, residual, mean, var = ctx.saved_tensors
    args = (y, weight, bias, residual, mean, var, ctx.eps, ctx.slope, ctx.training)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        dy, dw, db, dres = _grads_differentiable(grad_out, *args)
    else:
        bwd = _bwd_impl if ctx.eager else torch.ops.vosgan.bn_act_bwd
        dy, dw, db, dres = bwd(grad_out, *args)
        dres = dres if residual is not None else None
    return dy, dw, db, dres, None, None, None, None


_bn_act_fwd.register_autograd(_backward, setup_context=_setup_context)


class _BnActFunction(torch.autograd.Function):
    """Eager fast path: ``vosgan::bn_act_fwd``'s forward and backward without the
    ``torch.library`` dispatch, whose Python overhead (hundreds of us per block on an H100 host)
    showed in the block timings; ``torch.compile`` traces the registered op instead."""

    @staticmethod
    def forward(ctx, *args):
        inputs, update = args[:8], args[8]  # update: running stats, updated in the kernel
        output = _fwd_kernels(*inputs, update=update)
        _setup_context(ctx, inputs, output, eager=True)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        return (*_backward(ctx, grad_out, grad_mean, grad_var), None)


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    if device.type == "cuda":
        mode, detail = backend.triton_mode()
        if mode == "gpu":
            return "triton", (
                f"Triton BN+act kernels, cuDNN conv; transposed convs in sub-pixel form while "
                f"cudnn.benchmark is off ({detail})"
            )
        return None, f"Triton unavailable for CUDA tensors: {detail}"
    if device.type == "cpu":
        return "subpixel", (
            f"stride-2 kernel-4 (transposed) convs with <= {SUBPIXEL_MAX_CHANNELS} channels on "
            "the narrow side run in sub-pixel form (1.2-2.1x oneDNN at cpu-small shapes on the "
            "2-core dev box); BatchNorm + activation run the reference ops (no numba kernel)"
        )
    return None, f"no fused path on {device.type}"


@torch.compiler.assume_constant_result  # a trace-time constant: no graph break in the cache
def auto_impl(device_type: str) -> str:
    """The BN + activation implementation ``impl="auto"`` runs on ``device_type``.

    ``"triton"`` on CUDA when Triton works, else ``"reference"``; warns once on fallback.
    """
    choice = backend.choose("conv3d_block", device_type)
    if choice.impl != "triton":  # BN + activation have no fused kernel off CUDA
        why = choice.reason if choice.fused else f"reference ({choice.reason})"
        backend.warn_once(f"conv3d_block-{device_type}", f"conv3d_block on {device_type}: {why}")
        return "reference"
    return "triton"


def resolve_impl(impl: str, y: Tensor) -> str:
    """``impl`` for ``y (B, C, T, H, W)``: ``"auto"`` becomes :func:`auto_impl`'s choice, and
    the reference for float64 (the kernels compute in fp32; warned once); others unchanged."""
    if impl != "auto":
        return impl
    impl = auto_impl(y.device.type)
    if impl == "triton" and y.dtype == torch.float64:
        backend.warn_once("bn_act-f64", "bn_act: float64 runs the reference (fp32 kernels)")
        return "reference"
    return impl


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def _validate(
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    momentum: float,
    eps: float,
    negative_slope: float,
    impl: str,
) -> None:
    """Shapes, dtypes and devices (metadata only: no pass over a tensor, no host sync)."""
    if y.dim() != 5 or not y.is_floating_point():
        raise ValueError(
            f"bn_act: y must be a floating (B, C, T, H, W) tensor, got {y.dtype} {y.shape}"
        )
    c = y.shape[1]
    if c < 1:
        raise ValueError(f"bn_act: y must have at least one channel, got shape {tuple(y.shape)}")
    # ATen's rule: the BN parameters and statistics share one dtype, y's or (with a fp16/bf16
    # y, the autocast case) float32
    allowed = (y.dtype, torch.float32) if y.dtype in (torch.float16, torch.bfloat16) else (y.dtype,)
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != c:  # not Size != tuple: that takes the sym_eq path
            raise ValueError(
                f"bn_act: {name} must have shape ({c},) for y {tuple(y.shape)}, "
                f"got {tuple(t.shape)}"
            )
        if t.dtype not in allowed or t.device != y.device:
            raise ValueError(
                f"bn_act: {name} must be {_dtype_names(allowed)} on {y.device} (weight, bias, "
                "running_mean, running_var share one dtype: y's, or float32 with a fp16/bf16 y), "
                f"got {t.dtype} on {t.device}"
            )
        allowed = (t.dtype,)
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_act: running_mean and running_var must be given together")
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(
                f"bn_act: residual must have y's shape {tuple(y.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        if not residual.is_floating_point() or residual.device != y.device:
            raise ValueError(
                f"bn_act: residual must be a floating tensor on y's device {y.device}, "
                f"got {residual.dtype} on {residual.device}"
            )
    if not isinstance(momentum, (int, float)):
        raise ValueError(
            "bn_act: momentum must be a float (for nn.BatchNorm's momentum=None, the cumulative "
            f"average, pass 1 / num_batches_tracked), got {momentum!r}"
        )
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"bn_act: eps must be finite and > 0, got {eps}")
    if negative_slope < 0:
        raise ValueError(
            "bn_act: negative_slope must be >= 0 (the mask is taken from the output), "
            f"got {negative_slope}"
        )
    if impl not in IMPLS:
        raise ValueError(f"bn_act: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        backend.check_triton_device("bn_act", y.device)
        if y.dtype == torch.float64:
            raise ValueError(
                "bn_act: y must be float32, float16 or bfloat16 for impl='triton' (the kernels "
                "compute in fp32), got float64; use impl='reference' or 'auto'"
            )


def bn_act(
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    negative_slope: float = 0.2,
    residual: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """``act(BatchNorm3d(y) [+ residual])``, fused where available; semantics of ``nn.BatchNorm3d``.

    Args:
        y: conv output ``(B, C, T, H, W)``, contiguous or ``channels_last_3d``.
        weight, bias: BN affine parameters ``(C,)``, or ``None`` (``affine=False``: weight 1,
            bias 0). The parameters and statistics share one dtype: ``y``'s, or float32 with a
            fp16/bf16 ``y``; all on ``y``'s device.
        running_mean, running_var: ``(C,)`` running statistics or ``None``
            (``track_running_stats=False``: batch statistics in eval too).
        training: batch statistics, and an in-place running-stat update with ``momentum``
            (unbiased variance), exactly as ``nn.BatchNorm3d``; else the running statistics.
        momentum: a float; for ``nn.BatchNorm3d``'s ``momentum=None`` (cumulative average) the
            caller passes ``1 / num_batches_tracked``, as ``nn.BatchNorm3d.forward`` does.
        eps: finite, > 0.
        negative_slope: LeakyReLU slope (``0`` for ReLU); must be >= 0.
        residual: optional ``(B, C, T, H, W)`` added after the affine, before the activation.
        impl: ``"auto"`` (see :func:`fused_impl`), ``"reference"`` or ``"triton"``.

    Returns:
        ``(B, C, T, H, W)`` with ``y``'s dtype and memory format.
    """
    _validate(
        y, weight, bias, running_mean, running_var, residual, momentum, eps, negative_slope, impl
    )
    impl = resolve_impl(impl, y)
    batch_stats = training or running_mean is None
    if batch_stats and y.numel() // y.shape[1] == 1:  # ATen's rule: an empty batch is fine
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(y.shape)}"
        )
    if impl == "reference" or y.numel() == 0:  # empty: the reference's empty output
        return bn_act_reference(
            y,
            weight,
            bias,
            running_mean,
            running_var,
            training=batch_stats,
            momentum=momentum,
            eps=eps,
            negative_slope=negative_slope,
            residual=residual,
        )
    if not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last_3d)):
        y = y.contiguous()
    if weight is None:  # affine=False, as F.batch_norm takes it (no gradient to return)
        weight = y.new_ones(y.shape[1], dtype=torch.float32)
    if bias is None:
        bias = y.new_zeros(y.shape[1], dtype=torch.float32)
    update = batch_stats and running_mean is not None and running_var is not None
    args = (
        y,
        weight,
        bias,
        residual,
        None if batch_stats else running_mean,
        None if batch_stats else running_var,
        eps,
        negative_slope,
    )
    if not torch.compiler.is_compiling():  # eager: running stats updated inside the kernels
        if not update:
            return _BnActFunction.apply(*args, None)[0]
        # the kernels index the running stats with unit stride: a strided view is updated
        # through a contiguous copy, copied back in place (nothing outside the view is written)
        stats = (running_mean.contiguous(), running_var.contiguous())
        out, _, _ = _BnActFunction.apply(*args, (*stats, momentum))
        for running, updated in zip((running_mean, running_var), stats, strict=True):
            if updated is not running:
                running.copy_(updated)
        return out
    out, mean, var = torch.ops.vosgan.bn_act_fwd(*args)
    if update:
        n = y.numel() // y.shape[1]
        with torch.no_grad():  # the formula of ATen's batch_norm update
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
    return out
