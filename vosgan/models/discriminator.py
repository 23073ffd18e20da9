"""Discriminator: real/fake, plus self-supervised segmentation and optical flow heads.

A shared 3D encoder (4 stride-2 Conv3d+BN+LeakyReLU stages), a real/fake head on its output, and a
U-Net style 3D decoder back to ``T x H x W`` feeding a segmentation head and a forward-flow head
(the flow of frame ``t`` is read from the decoder's frame ``t``; the last frame's is dropped).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vosgan.config import ModelConfig
from vosgan.ops.conv3d_block import conv3d_block_reference


class DiscOutput(NamedTuple):
    logit: Tensor  # real/fake logit (B,)
    seg_logit: Tensor | None  # foreground logit (B, 1, T, H, W); sigmoid -> probability
    flow: Tensor | None  # forward flow in pixels (B, 2, T-1, H, W)


class Discriminator(nn.Module):
    """VOS-GAN discriminator. ``D(x (B, 3, T, H, W), dense=True) -> DiscOutput``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = [cfg.d_channels * 2**i for i in range(4)]  # e.g. 64, 128, 256, 512
        self.encoder = nn.ModuleList(
            [
                conv3d_block_reference(3, ch[0], norm=False, act="lrelu"),
                conv3d_block_reference(ch[0], ch[1], act="lrelu"),
                conv3d_block_reference(ch[1], ch[2], act="lrelu"),
                conv3d_block_reference(ch[2], ch[3], act="lrelu"),
            ]
        )
        self.real_fake = nn.Conv3d(ch[3], 1, 3, 1, 1)
        # Decoder: each stage doubles T, H, W and is joined with the matching encoder output.
        self.decoder = nn.ModuleList(
            [
                conv3d_block_reference(ch[3], ch[2], transpose=True, act="relu"),
                conv3d_block_reference(2 * ch[2], ch[1], transpose=True, act="relu"),
                conv3d_block_reference(2 * ch[1], ch[0], transpose=True, act="relu"),
            ]
        )
        # One transposed conv from the half-resolution features (joined with the first encoder
        # stage) to full resolution gives both dense heads: channel 0 segmentation, 1-2 flow.
        # (A full-resolution Conv3d head was 7x slower in fwd+bwd on CPU: its weight gradient
        # with few output channels takes PyTorch's slow path; 2-core dev box, cpu-small, B=16.)
        self.dense_head = nn.ConvTranspose3d(2 * ch[0], 3, 4, 2, 1)
        with torch.no_grad():  # flow starts at exactly zero (identity warp), as flow decoders do
            self.dense_head.weight[:, 1:].zero_()
            self.dense_head.bias[1:].zero_()

    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder features, finest first: ``(B, C1, T/2, H/2, W/2)`` ... ``(B, C4, T/16, ...)``."""
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: Tensor, dense: bool = True) -> DiscOutput:
        """``x (B, 3, T, H, W)`` in [-1, 1]; ``dense=False`` skips the decoder (logit only)."""
        feats = self.encode(x)
        logit = self.real_fake(feats[-1]).mean(dim=(1, 2, 3, 4))
        if not dense:
            return DiscOutput(logit, None, None)
        h = feats[-1]
        for stage, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            h = torch.cat([stage(h), skip], dim=1)
        dense = self.dense_head(h)
        seg, flow = dense[:, :1], dense[:, 1:, :-1] * self.cfg.flow_scale
        return DiscOutput(logit, seg, flow)
