"""Flow-warping photometric loss: ``mean(w * rho(x_t - warp(x_{t+1}, u_t)))``.

Conventions (the fused kernels match them):
- ``u`` is forward flow in pixels, channel 0 horizontal (x, columns), channel 1 vertical (y, rows):
  pixel ``(i, j)`` of frame ``t`` moves to ``(i + u_y, j + u_x)`` in frame ``t + 1``.
- Warping samples ``x_{t+1}`` bilinearly at ``(j + u_x, i + u_y)`` with pixel centres at integer
  coordinates (``grid_sample(align_corners=True)``); samples outside the frame read 0
  (``padding_mode="zeros"``) or the nearest edge pixel (``"border"``).
- ``rho(d) = sqrt(d^2 + eps^2)`` (Charbonnier), per channel; ``reduction="mean"`` averages
  ``w * rho`` over every element of ``(B, C, T-1, H, W)``, ``w`` broadcast over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vosgan import backend

PADDING_MODES = ("zeros", "border")


def flow_to_grid(flow: Tensor) -> Tensor:
    """Pixel flow ``(N, 2, H, W)`` -> ``grid_sample`` grid ``(N, H, W, 2)`` (align_corners=True)."""
    n, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    px = xs + flow[:, 0]
    py = ys + flow[:, 1]
    gx = 2 * px / max(w - 1, 1) - 1
    gy = 2 * py / max(h - 1, 1) - 1
    return torch.stack((gx, gy), dim=-1)


def warp_reference(x: Tensor, flow: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Bilinear backward warp: ``out[i, j] = x[i + flow_y, j + flow_x]``.

    Args:
        x: images ``(N, C, H, W)``.
        flow: pixel displacements ``(N, 2, H, W)``.
        padding_mode: ``"zeros"`` or ``"border"``.

    Returns:
        ``(N, C, H, W)``.
    """
    return F.grid_sample(
        x, flow_to_grid(flow).to(x.dtype), mode="bilinear", padding_mode=padding_mode,
        align_corners=True,
    )


def check_inputs(x: Tensor, flow: Tensor, weight: Tensor | None, padding_mode: str) -> None:
    """Validate shapes and options; messages name the offending argument."""
    if x.dim() != 5:
        raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
    b, _, t, h, w = x.shape
    if t < 2:
        raise ValueError(f"x needs at least 2 frames (T >= 2), got T={t}")
    if tuple(flow.shape) != (b, 2, t - 1, h, w):
        raise ValueError(f"flow must be {(b, 2, t - 1, h, w)} for x {tuple(x.shape)}, got {tuple(flow.shape)}")
    if weight is not None and tuple(weight.shape) != (b, 1, t - 1, h, w):
        raise ValueError(f"weight must be {(b, 1, t - 1, h, w)}, got {tuple(weight.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def flow_warp_loss_reference(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-3,
    padding_mode: str = "zeros",
    reduction: str = "mean",
) -> Tensor:
    """Charbonnier photometric loss between each frame and the next frame warped back by the flow.

    Args:
        x: video ``(B, C, T, H, W)``.
        flow: forward flow in pixels ``(B, 2, T-1, H, W)``.
        weight: optional per-pixel weight ``(B, 1, T-1, H, W)`` (e.g. validity/occlusion).
        eps: Charbonnier epsilon.
        padding_mode: ``"zeros"`` or ``"border"``.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (the weighted map ``(B, C, T-1, H, W)``).
    """
    check_inputs(x, flow, weight, padding_mode)
    b, c, t, h, w = x.shape
    nxt = x[:, :, 1:].transpose(1, 2).reshape(b * (t - 1), c, h, w)
    fl = flow.transpose(1, 2).reshape(b * (t - 1), 2, h, w)
    warped = warp_reference(nxt, fl, padding_mode).reshape(b, t - 1, c, h, w).transpose(1, 2)
    rho = torch.sqrt((x[:, :, :-1] - warped) ** 2 + eps * eps)
    if weight is not None:
        rho = rho * weight
    if reduction == "mean":
        return rho.mean()
    if reduction == "none":
        return rho
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    return None, "no fused flow-warp loss kernel yet (issue #4)"


def flow_warp_loss(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-3,
    padding_mode: str = "zeros",
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """Flow-warping loss with the implementation chosen by ``impl`` (``"auto"`` or ``"reference"``).

    Arguments and shapes as in :func:`flow_warp_loss_reference`.
    """
    if impl == "auto":
        choice = backend.choose("flow_warp_loss", x.device)
        if not choice.fused:
            backend.warn_once(f"flow_warp-{x.device.type}", f"flow_warp_loss: reference ({choice.reason})")
        impl = choice.impl
    if impl == "reference":
        return flow_warp_loss_reference(x, flow, weight, eps, padding_mode, reduction)
    raise ValueError(f"flow_warp_loss: unknown impl {impl!r}; use 'auto' or 'reference'")
