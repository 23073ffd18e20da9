"""Discriminator: real/fake, plus self-supervised segmentation and optical flow heads.

A 3D encoder (4 stride-2 Conv3d+BN+LeakyReLU stages), a real/fake head on its output, and a
U-Net style 3D decoder back to ``T x H x W`` feeding a segmentation head. The forward flow comes
from a U-Net decoder of its own (``model.flow_decoder``), by default on an encoder of its own too
(``model.flow_encoder``), or from the segmentation decoder; the flow of frame ``t`` is read from
the decoder's frame ``t`` (the last frame's is dropped).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vosgan.config import ModelConfig, validate_model
from vosgan.ops.conv3d_block import conv3d_block_reference


class DiscOutput(NamedTuple):
    logit: Tensor  # real/fake logit (B,)
    seg_logit: Tensor | None  # foreground logit (B, 1, T, H, W); sigmoid -> probability
    flow: Tensor | None  # forward flow in pixels (B, 2, T-1, H, W)


class Discriminator(nn.Module):
    """VOS-GAN discriminator. ``D(x (B, 3, T, H, W), dense=True) -> DiscOutput``.

    T, H and W must be positive multiples of 16 (4 stride-2 stages, undone by the U-Net decoder);
    the config's ``frames x size x size`` is the clip shape it is trained on.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model(cfg, "D")
        self.cfg = cfg
        ch = [cfg.d_channels * 2**i for i in range(4)]  # e.g. 64, 128, 256, 512
        self.encoder = _encoder(ch)
        self.real_fake = nn.Conv3d(ch[3], 1, 3, 1, 1)
        # Decoder: each stage doubles T, H, W and is joined with the matching encoder output.
        self.decoder = _decoder(ch)
        # One transposed conv from the half-resolution features (joined with the first encoder
        # stage) to full resolution gives the dense heads: channel 0 segmentation, 1-2 flow.
        # (A full-resolution Conv3d head was 7x slower in fwd+bwd on CPU: its weight gradient
        # with few output channels takes PyTorch's slow path; 2-core dev box, cpu-small, B=16.)
        # With ``flow_decoder="separate"`` the flow has its own decoder and head (``flow_head``)
        # and ``dense_head`` gives the segmentation only. Why: sharing one decoder, D's flow
        # learned nothing in GAN training (cpu-small, 1000 steps: foreground EPE 1.107 px, zero
        # flow 1.114), while the same D trained on the warping loss alone reached 0.60 px.
        # Flow-only D plus the adversarial and segmentation losses against a frozen G, 300
        # steps, warping weight 20: 1.02 px shared, 0.81 px separate (see loss.flow).
        self.separate_flow = cfg.flow_decoder == "separate"
        self.dense_head = nn.ConvTranspose3d(2 * ch[0], 1 if self.separate_flow else 3, 4, 2, 1)
        flow_head = self.dense_head
        if self.separate_flow:
            self.flow_decoder = _decoder(ch)
            self.flow_head = flow_head = nn.ConvTranspose3d(2 * ch[0], 2, 4, 2, 1)
        # With ``flow_encoder="separate"`` the flow branch reads an encoder of its own
        # (``flow_encoder``), which only the flow losses train. Why: D's flow shared the encoder
        # that the adversarial and segmentation losses pull on, and learned half the sprites'
        # speed (cpu-small, 2500 GAN steps: foreground EPE 0.73 px, zero flow 1.11); the same
        # architecture trained on the warping loss alone reached 0.54 px in 1500 steps
        # (benchmarks/SEGMENTATION.md, fifteenth session).
        self.flow_encoder = _encoder(ch) if cfg.flow_encoder == "separate" else None
        with torch.no_grad():  # flow starts at exactly zero (identity warp), as flow decoders do
            flow_head.weight[:, -2:].zero_()
            flow_head.bias[-2:].zero_()

    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder features, finest first: ``(B, C1, T/2, H/2, W/2)`` ... ``(B, C4, T/16, ...)``."""
        _check_input(x)
        return _encode(self.encoder, x)

    def forward(self, x: Tensor, dense: bool = True, flow: bool = True) -> DiscOutput:
        """``x (B, 3, T, H, W)`` in [-1, 1]; ``dense=False`` skips the decoders (logit only),
        ``flow=False`` the flow (``DiscOutput.flow`` is None; with the separate flow decoder
        that skips its forward, about half of the dense work)."""
        feats = self.encode(x)
        logit = self.real_fake(feats[-1]).mean(dim=(1, 2, 3, 4))
        if not dense:
            return DiscOutput(logit, None, None)
        seg = self.dense_head(_decode(self.decoder, feats))
        if not flow:
            return DiscOutput(logit, seg[:, :1], None)
        if self.flow_encoder is not None:
            uv = self.flow_head(_decode(self.flow_decoder, _encode(self.flow_encoder, x)))
        elif self.separate_flow:
            uv = self.flow_head(_decode(self.flow_decoder, feats))
        else:
            seg, uv = seg[:, :1], seg[:, 1:]
        return DiscOutput(logit, seg, uv[:, :, :-1] * self.cfg.flow_scale)


def _check_input(x: Tensor) -> None:
    """``x`` must be ``(B, 3, T, H, W)`` with T, H, W positive multiples of 16 (metadata only)."""
    if x.dim() != 5 or x.shape[1] != 3 or any(n < 16 or n % 16 for n in x.shape[2:]):
        raise ValueError(
            "Discriminator: x must be (B, 3, T, H, W) with T, H, W positive multiples of 16 "
            f"(4 stride-2 stages; model.frames, model.size), got {tuple(x.shape)}"
        )


def _encoder(ch: list[int]) -> nn.ModuleList:
    """The 4 stride-2 encoder stages for widths ``ch`` (finest first)."""
    return nn.ModuleList(
        [
            conv3d_block_reference(3, ch[0], norm=False, act="lrelu"),
            conv3d_block_reference(ch[0], ch[1], act="lrelu"),
            conv3d_block_reference(ch[1], ch[2], act="lrelu"),
            conv3d_block_reference(ch[2], ch[3], act="lrelu"),
        ]
    )


def _encode(encoder: nn.ModuleList, x: Tensor) -> list[Tensor]:
    """Every stage's output of ``encoder`` on ``x``, finest first."""
    feats = []
    for stage in encoder:
        x = stage(x)
        feats.append(x)
    return feats


def _decoder(ch: list[int]) -> nn.ModuleList:
    """U-Net decoder stages for encoder widths ``ch`` (finest first)."""
    return nn.ModuleList(
        [
            conv3d_block_reference(ch[3], ch[2], transpose=True, act="relu"),
            conv3d_block_reference(2 * ch[2], ch[1], transpose=True, act="relu"),
            conv3d_block_reference(2 * ch[1], ch[0], transpose=True, act="relu"),
        ]
    )


def _decode(decoder: nn.ModuleList, feats: list[Tensor]) -> Tensor:
    """Run ``decoder`` from the coarsest feature, joining each stage with the matching skip."""
    h = feats[-1]
    for stage, skip in zip(decoder, reversed(feats[:-1]), strict=True):
        h = torch.cat([stage(h), skip], dim=1)
    return h
