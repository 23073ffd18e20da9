"""Spatio-temporal conv blocks: ``Conv3d | ConvTranspose3d`` + ``BatchNorm3d`` + ``(Leaky)ReLU``.

The reference block is a plain ``nn.Sequential(conv, bn, act)`` (``bn`` omitted where a stage has
no normalisation); the fused drop-in modules in :mod:`vosgan.nn` load its ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

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


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    return None, "no fused conv3d block kernels yet (issue #5)"
