"""Generator: static background from a content latent, moving masked foreground from a trajectory.

``G(z_c, anchors) -> (v, f, m, b)`` with ``v = m * f + (1 - m) * b``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vosgan.config import ModelConfig, validate_model
from vosgan.nn import MaskComposite
from vosgan.ops.conv3d_block import conv3d_block_reference


class GenOutput(NamedTuple):
    video: Tensor  # v (B, 3, T, H, W) in [-1, 1]
    fg: Tensor  # f (B, 3, T, H, W) in [-1, 1]
    mask: Tensor  # m (B, 1, T, H, W) in [0, 1]
    bg: Tensor  # b (B, 3, H, W) in [-1, 1]


def interpolate_trajectory(anchors: Tensor, steps: int, mode: str = "linear") -> Tensor:
    """A ``steps``-point path through ``anchors`` in order.

    Args:
        anchors: ``(B, K, D)`` points in the motion latent space, K >= 2.
        steps: T, the number of points on the path (the first and last are the end anchors).
        mode: ``"linear"`` (piecewise linear) or ``"slerp"`` (spherical, radius interpolated).

    Returns:
        ``(B, T, D)``.
    """
    b, k, _ = anchors.shape
    pos = torch.linspace(0, k - 1, steps, device=anchors.device, dtype=anchors.dtype)
    seg = pos.floor().clamp(max=k - 2).long()  # segment index of each step
    w = (pos - seg.to(pos.dtype)).view(1, steps, 1)
    p0, p1 = anchors[:, seg], anchors[:, seg + 1]  # (B, T, D)
    if mode == "linear":
        return p0 + w * (p1 - p0)
    if mode != "slerp":
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    r0, r1 = p0.norm(dim=-1, keepdim=True), p1.norm(dim=-1, keepdim=True)
    u0, u1 = p0 / r0.clamp_min(1e-8), p1 / r1.clamp_min(1e-8)
    omega = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6))
    so = torch.sin(omega)
    direction = (torch.sin((1 - w) * omega) * u0 + torch.sin(w * omega) * u1) / so
    return direction * (r0 + w * (r1 - r0))


class Generator(nn.Module):
    """VOS-GAN generator (VGAN-sized two-stream design; see README "Method").

    Background: ``z_c (B, Zc)`` -> 2D transposed convs -> ``b (B, 3, H, W)``.
    Foreground: anchors ``(B, K, Dm)`` -> trajectory ``(B, T, Dm)`` -> GRU ``(B, T, Hg)``, then
    (``cfg.fg_stream``):

    - ``"conv3d"`` [paper]: the states pooled to ``T0 = T / 2**stages`` steps, projected to
      ``C0 x 4 x 4`` maps, joined with a projection of ``z_c`` -> 3D transposed convs ->
      ``f (B, 3, T, H, W)`` and ``m (B, 1, T, H, W)``.
    - ``"sprite"`` [ours]: :class:`SpriteForeground`, one 2D sprite moved along a path read from
      the states.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model(cfg, "G")
        self.cfg = cfg
        n = cfg.up_stages
        ch = [cfg.g_channels // 2**i for i in range(n)]  # e.g. 512, 256, 128, 64

        # Background stream (2D): 1x1 -> 4x4 -> ... -> size.
        bg: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.z_content, ch[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch[0]),
            nn.ReLU(),
        ]
        for i in range(n - 1):
            bg += [
                nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch[i + 1]),
                nn.ReLU(),
            ]
        bg += [nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1), nn.Tanh()]
        self.background = nn.Sequential(*bg)

        # Motion: trajectory encoder (the op the C++ extension fuses).
        self.gru = nn.GRU(cfg.z_motion, cfg.gru_hidden, batch_first=True)
        self.composite = MaskComposite(impl="reference")
        if cfg.fg_stream == "sprite":
            self.sprite = SpriteForeground(cfg, ch)
            return
        self.motion_proj = nn.Linear(cfg.gru_hidden, ch[0] * 16)
        self.content_proj = nn.Linear(cfg.z_content, ch[0] * 16)
        self.fg_in = nn.Sequential(nn.BatchNorm3d(2 * ch[0]), nn.ReLU())

        # Foreground stream (3D): (2*C0, T0, 4, 4) -> (C_last, T/2, H/2, W/2), then the two heads.
        blocks = []
        c_in = 2 * ch[0]
        for i in range(n - 1):
            blocks.append(conv3d_block_reference(c_in, ch[i + 1], transpose=True, act="relu"))
            c_in = ch[i + 1]
        self.foreground = nn.Sequential(*blocks)
        # Both heads in one transposed conv: channels 0-2 -> f (tanh), channel 3 -> m (sigmoid).
        self.heads = nn.ConvTranspose3d(c_in, 4, 4, 2, 1)
        with torch.no_grad():  # start mostly background (m = sigmoid(mask_bias)) [ours]
            self.heads.bias[3] = cfg.mask_bias

    def sample_latents(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(z_c (B, Zc), anchors (B, K, Dm))`` from N(0, I)."""
        device = device or next(self.parameters()).device
        z_c = torch.randn(batch, self.cfg.z_content, device=device, generator=generator)
        anchors = torch.randn(
            batch, self.cfg.anchors, self.cfg.z_motion, device=device, generator=generator
        )
        return z_c, anchors

    def forward(self, z_c: Tensor, anchors: Tensor) -> GenOutput:
        """``z_c (B, Zc)``, ``anchors (B, K, Dm)`` with ``K >= 2`` -> :class:`GenOutput`."""
        cfg = self.cfg
        if z_c.dim() != 2 or z_c.shape[1] != cfg.z_content:
            raise ValueError(
                f"Generator: z_c must be (B, {cfg.z_content}) (model.z_content), "
                f"got {tuple(z_c.shape)}"
            )
        if anchors.dim() != 3 or anchors.shape[1] < 2 or anchors.shape[2] != cfg.z_motion:
            raise ValueError(
                f"Generator: anchors must be (B, K >= 2, {cfg.z_motion}) (model.z_motion), "
                f"got {tuple(anchors.shape)}"
            )
        bsz = z_c.shape[0]
        if anchors.shape[0] != bsz:
            raise ValueError(
                f"Generator: z_c has batch {bsz} but anchors has batch {anchors.shape[0]}"
            )
        c0 = cfg.g_channels
        b = self.background(z_c.view(bsz, cfg.z_content, 1, 1))

        traj = interpolate_trajectory(anchors, cfg.frames, cfg.interpolation)
        states, _ = self.gru(traj)  # (B, T, Hg)
        if cfg.fg_stream == "sprite":
            f, m = self.sprite(z_c, anchors[:, 0], states)
            return GenOutput(self.composite(f, m, b), f, m, b)
        pooled = nn.functional.adaptive_avg_pool1d(states.transpose(1, 2), cfg.first_frames)
        motion = self.motion_proj(pooled.transpose(1, 2))  # (B, T0, C0*16)
        motion = motion.view(bsz, cfg.first_frames, c0, 4, 4).permute(0, 2, 1, 3, 4)
        content = (
            self.content_proj(z_c).view(bsz, c0, 1, 4, 4).expand(-1, -1, cfg.first_frames, -1, -1)
        )
        heads = self.heads(self.foreground(self.fg_in(torch.cat([motion, content], dim=1))))
        f, m = torch.tanh(heads[:, :3]), torch.sigmoid(heads[:, 3:])
        return GenOutput(self.composite(f, m, b), f, m, b)


class SpriteForeground(nn.Module):
    """One 2D sprite moved along a path read from the trajectory encoder [ours].

    An object-layer alternative to the paper's 3D foreground stream, so that a fake's foreground
    is a compact object that translates, as moving objects in a static-camera video do:

    - sprite: ``(z_c, a_0)`` -> 2D stages (``1 -> 4`` transposed conv, then nearest-neighbour
      x2 upsampling + 3x3 conv, which cannot make the transposed conv's checkerboard) -> colour
      (tanh) and alpha (sigmoid) at ``(H, W)``; the alpha is windowed by a soft disc of radius
      ``0.2 * H`` around the centre, so the sprite stays compact;
    - path: ``tanh(Linear(state_t)) * 0.4 * H``, the sprite's offset in pixels at frame t; the
      sprite is moved there by bilinear resampling (zeros outside the frame).

    ``ch``: the stages' channels, as :class:`Generator`'s background stream uses them.
    ``cfg.mask_bias`` is not applied: with the window, the initial mask (alpha about 0.5 inside
    the disc) already averages about 0.06 over the frame, and the measured runs started so.
    """

    def __init__(self, cfg: ModelConfig, ch: list[int]) -> None:
        super().__init__()
        size = cfg.size
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.z_content + cfg.z_motion, ch[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch[0]),
            nn.ReLU(),
        ]
        for i in range(len(ch) - 1):
            layers += [*_upsample_conv(ch[i], ch[i + 1], bias=False), nn.BatchNorm2d(ch[i + 1])]
            layers.append(nn.ReLU())
        layers += _upsample_conv(ch[-1], 4, bias=True)
        self.net = nn.Sequential(*layers)
        self.path = nn.Linear(cfg.gru_hidden, 2)
        r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        radius = (r.view(size, 1) ** 2 + r.view(1, size) ** 2).sqrt()
        self.register_buffer("window", torch.sigmoid(0.2 * size - radius), persistent=False)
        self.reach = 0.4 * size

    def forward(self, z_c: Tensor, anchor: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
        """``z_c (B, Zc)``, ``anchor (B, Dm)``, ``states (B, T, Hg)`` -> ``f (B, 3, T, H, W)``,
        ``m (B, 1, T, H, W)``."""
        bsz, t = states.shape[:2]
        out = self.net(torch.cat([z_c, anchor], 1)[..., None, None])  # (B, 4, H, W)
        h, w = out.shape[-2:]
        layer = torch.cat([torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:]) * self.window], 1)
        offset = torch.tanh(self.path(states)) * self.reach  # (B, T, 2) pixels, (x, y)
        # Output pixel p samples the sprite at p - offset; grid units are 2 / size per pixel.
        # All T frames sample the one sprite: the grid stacks them along its height, so the
        # sprite is never copied T times.
        # (B, T, 2), divided by Python scalars: a host tensor would be a copy to the GPU on
        # every call, which a CUDA graph cannot capture
        twice = 2 * offset.to(layer.dtype)
        shift = torch.stack((twice[..., 0] / w, twice[..., 1] / h), -1)
        xs = (2 * torch.arange(w, device=out.device, dtype=layer.dtype) + 1) / w - 1
        ys = (2 * torch.arange(h, device=out.device, dtype=layer.dtype) + 1) / h - 1
        base = torch.stack(torch.broadcast_tensors(xs.view(1, w), ys.view(h, 1)), -1)  # (H, W, 2)
        grid = (base - shift.view(bsz, t, 1, 1, 2)).view(bsz, t * h, w, 2)
        moved = nn.functional.grid_sample(layer, grid, padding_mode="zeros", align_corners=False)
        moved = moved.view(bsz, 4, t, h, w)  # (B, 4, T, H, W)
        return moved[:, :3].contiguous(), moved[:, 3:].contiguous()


def _upsample_conv(c_in: int, c_out: int, bias: bool) -> list[nn.Module]:
    """x2 nearest-neighbour upsampling then a 3x3 conv (2D)."""
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias)]
