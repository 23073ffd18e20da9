"""VOS-GAN losses: adversarial, mask sparsity, self-supervised segmentation and flow, R1.

The flow-warping loss runs through :class:`vosgan.nn.FlowWarpLoss`, so ``fuse_modules`` on a
:class:`VosGanLoss` switches it to the fused op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vosgan.config import LossConfig
from vosgan.models import DiscOutput, Discriminator, GenOutput
from vosgan.nn import FlowWarpLoss
from vosgan.refine import colour_bilateral


def d_adversarial(real_logit: Tensor, fake_logit: Tensor, kind: str = "nonsaturating") -> Tensor:
    """Discriminator loss on logits ``(B,)``: logistic (``softplus``) or hinge."""
    if kind == "nonsaturating":
        return F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
    if kind == "hinge":
        return F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
    raise ValueError(f"loss.adversarial must be 'nonsaturating' or 'hinge', got {kind!r}")


def g_adversarial(fake_logit: Tensor, kind: str = "nonsaturating") -> Tensor:
    """Generator loss on D's logits for fakes ``(B,)``: ``softplus(-l)`` or ``-l`` (hinge)."""
    if kind == "nonsaturating":
        return F.softplus(-fake_logit).mean()
    if kind == "hinge":
        return -fake_logit.mean()
    raise ValueError(f"loss.adversarial must be 'nonsaturating' or 'hinge', got {kind!r}")


def flow_validity(flow: Tensor) -> Tensor:
    """1 where ``pixel + flow`` lands inside the frame, else 0.

    ``flow (B, 2, T-1, H, W)`` -> ``(B, 1, T-1, H, W)``.

    Pixels whose flow points out of the frame have no counterpart in the next frame (they are
    "occluded" by the border), so the photometric loss must not score them.
    """
    _, _, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    px, py = xs + flow[:, 0], ys + flow[:, 1]
    inside = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    return inside.unsqueeze(1).to(flow.dtype)


def flow_smoothness(flow: Tensor, video: Tensor, edge: float = 10.0) -> Tensor:
    """Edge-aware first-order smoothness: ``mean |du/dx| exp(-edge |dI/dx|)`` (+ the y term).

    Args:
        flow: ``(B, 2, T-1, H, W)``.
        video: ``(B, C, T, H, W)`` in [-1, 1]; frames ``0..T-2`` give the edges.
        edge: how strongly image edges switch the penalty off.
    """
    img = video[:, :, :-1].to(flow.dtype)
    wx = torch.exp(-edge * (img[..., :, 1:] - img[..., :, :-1]).abs().mean(1, keepdim=True))
    wy = torch.exp(-edge * (img[..., 1:, :] - img[..., :-1, :]).abs().mean(1, keepdim=True))
    dx = (flow[..., :, 1:] - flow[..., :, :-1]).abs()
    dy = (flow[..., 1:, :] - flow[..., :-1, :]).abs()
    return (dx * wx).mean() + (dy * wy).mean()


def binomial_blur(video: Tensor) -> Tensor:
    """3x3 binomial blur (``[1, 2, 1] / 4`` in y and x) of every frame, replicate-padded.

    ``video (B, C, T, H, W)`` -> same shape and dtype.
    """
    b, c, t, h, w = video.shape
    k = (0.25, 0.5, 0.25)  # Python scalars: no host-to-GPU copy (CUDA graphs)
    x = F.pad(video.reshape(b, c * t, h, w), (1, 1, 1, 1), mode="replicate")
    x = k[0] * x[..., :, :-2] + k[1] * x[..., :, 1:-1] + k[2] * x[..., :, 2:]
    x = k[0] * x[..., :-2, :] + k[1] * x[..., 1:-1, :] + k[2] * x[..., 2:, :]
    return x.reshape(b, c, t, h, w)


def segmentation_loss(seg_logit: Tensor, mask: Tensor, balance: bool = False) -> Tensor:
    """BCE of D's segmentation logits against G's detached mask, both ``(B, 1, T, H, W)``.

    ``balance``: weight foreground terms by ``(1 - mu) / mu``, ``mu`` the mean of ``mask``
    (clamped to [0.02, 0.5]), so a small foreground counts as much as the background.
    """
    target = mask.detach().float()
    pos_weight = None
    if balance:
        mu = target.mean().clamp(0.02, 0.5)
        pos_weight = ((1 - mu) / mu).reshape(1)
    return F.binary_cross_entropy_with_logits(seg_logit.float(), target, pos_weight=pos_weight)


def otsu_threshold(values: Tensor, bins: int = 64) -> Tensor:
    """Otsu's threshold of each row of ``values (B, N)`` (non-negative) -> ``(B,)``.

    The histogram of a row has ``bins`` equal bins on ``[0, max]``; the threshold is the upper
    edge of the bin that maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` of the split
    below/above it, the class means taken at bin centres (so the result is deterministic even
    where ``scatter_add`` is not). A row of zeros gets threshold 0. Computed in float32 (exact
    counts up to 2^24 values per row); no host sync.
    """
    if values.dim() != 2 or bins < 2:
        raise ValueError(f"values must be (B, N) and bins >= 2, got {tuple(values.shape)}, {bins}")
    values = values.float()
    hi = values.amax(1, keepdim=True)
    width = hi.clamp_min(torch.finfo(values.dtype).tiny) / bins
    idx = (values / width).long().clamp_(0, bins - 1)
    counts = values.new_zeros(values.shape[0], bins).scatter_add_(1, idx, torch.ones_like(values))
    centres = torch.arange(bins, device=values.device, dtype=values.dtype) + 0.5
    w0 = counts.cumsum(1)  # pixels at or below each bin, (B, bins)
    s0 = (counts * centres).cumsum(1)
    n, total = w0[:, -1:], s0[:, -1:]
    w1 = n - w0
    between = w0 * w1 * (s0 / w0.clamp_min(1) - (total - s0) / w1.clamp_min(1)) ** 2
    return ((between.argmax(1) + 1) * width.squeeze(1)).where(hi.squeeze(1) > 0, 0.0)


def _solve3(a: Tensor, b: Tensor) -> Tensor:
    """``a^-1 b`` for symmetric positive definite ``a (N, 3, 3)``, ``b (N, 3, K)``, by the
    adjugate: elementwise arithmetic only, so no host sync (CUDA graphs) and no LAPACK call."""
    r0, r1, r2 = a.unbind(1)
    adj = torch.stack(
        [torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], 1
    )  # rows of a^-1 * det for symmetric a
    det = (r0 * adj[:, 0]).sum(-1)
    return adj @ b / det.clamp_min(1e-12)[:, None, None]


def camera_motion(flow: Tensor, keep: float = 0.7, refits: int = 2) -> Tensor:
    """The camera's share of a flow field: per clip and frame pair, the affine field
    ``a + b x + c y`` (for each flow component) that fits ``flow`` best by least squares, fitted
    again ``refits`` times on the ``keep`` fraction of pixels the last fit explained best. An
    object moving against the camera is explained worst and drops out of the fit.

    ``flow (B, 2, P, H, W)`` (pixels) -> the fitted field, float32, same shape. A still camera
    fits to about zero; pans, tilts, zooms and in-plane rotations are affine.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    b, _, p, h, w = flow.shape
    f = flow.float().transpose(1, 2).reshape(b * p, 2, h * w).contiguous()
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=flow.device),
        torch.linspace(-1, 1, w, device=flow.device),
        indexing="ij",
    )
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    # the normal equations' matrix from six weighted moments: 1, x, y, xx, xy, yy
    moments = torch.stack([torch.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], 1)
    basis = moments[:, :3]  # (HW, 3): 1, x, y
    weight = f.new_ones(b * p, 1, h * w)
    kept = int(keep * (h * w - 1)) + 1  # the pixels up to the keep-quantile of the residuals
    for fit_round in range(refits + 1):
        m = weight[:, 0] @ moments  # (BP, 6)
        # column picks, not an index tensor: no host-to-device copy (CUDA graph capture)
        gram = torch.stack([m[:, i] for i in (0, 1, 2, 1, 3, 4, 2, 4, 5)], 1).view(-1, 3, 3)
        rhs = ((f * weight).view(b * p * 2, h * w) @ basis).view(b * p, 2, 3)
        c = _solve3(gram, rhs.transpose(1, 2)).transpose(1, 2).unsqueeze(-1)  # (BP, 2, 3, 1)
        fit = c[:, :, 0] + c[:, :, 1] * xs + c[:, :, 2] * ys  # (BP, 2, HW)
        if fit_round < refits:
            residual = (f - fit).square().sum(1)  # squared: the same order, no square root
            cut = residual.kthvalue(kept, dim=1, keepdim=True).values
            weight = (residual <= cut).unsqueeze(1).float()
    return fit.view(b, p, 2, h, w).transpose(1, 2)


def motion_mask(
    flow: Tensor,
    span: int = 0,
    guide: Tensor | None = None,
    radius: int = 4,
    sigma: float = 0.1,
    camera: bool = False,
) -> Tensor:
    """What moves, by a flow field alone: ``|u|`` above each clip's :func:`otsu_threshold`.

    ``flow (B, 2, T-1, H, W)`` (pixels) -> binary ``(B, 1, T, H, W)`` in ``flow``'s dtype. With
    ``span = 0`` frame ``t < T-1`` reads the flow leaving it (where the object is at ``t``), the
    last frame the flow into it. With ``span = k > 0`` frame ``t`` reads the smallest speed over
    the ``2k`` frame pairs between frames ``t-k`` and ``t+k`` (clamped at the clip's ends), and
    the threshold is Otsu's on that: a pixel moves when its motion persists over those frames.
    A learned flow bleeds past a moving object's edges; the bleed ahead of the object and behind
    it is transient, so the minimum drops it, at the cost of thinning the mask along the motion. A
    clip with no motion at all gets an empty mask.

    With ``guide`` (the video, ``(B, C, T, H, W)``) the speed is first averaged over similar
    colours of each frame (:func:`colour_bilateral` with ``radius`` and ``sigma``): the bleed
    sideways of an object, which the minimum keeps, takes the still background's speed, and
    the object's inside its own.

    With ``camera`` the speed is that of ``flow`` minus :func:`camera_motion` (what moves
    against a moving camera): in real video the background sweeps past whenever the camera
    pans.
    """
    if span < 0:
        raise ValueError(f"span must be >= 0, got {span}")
    if camera:
        flow = flow - camera_motion(flow)
    speed = torch.hypot(flow[:, 0], flow[:, 1])  # norm(dim=1) took 50 ms to its 0.7 (CPU, B=8)
    pairs = speed.shape[1]
    # pair index read by frame t at each offset: (T, 2k), or (T, 1) = min(t, T-2) when k = 0
    frames = torch.arange(pairs + 1, device=flow.device).unsqueeze(1)
    offsets = torch.arange(-span, max(span, 1), device=flow.device)
    speed = speed[:, (frames + offsets).clamp(0, pairs - 1)].amin(2).unsqueeze(1)  # (B,1,T,H,W)
    if guide is not None:
        speed = colour_bilateral(speed, guide, radius, sigma)
    threshold = otsu_threshold(speed.flatten(1))
    return (speed > threshold.view(-1, 1, 1, 1, 1)).to(flow.dtype)


def r1_penalty(logit: Tensor, inputs: Tensor) -> Tensor:
    """``mean_b ||d logit_b / d x_b||^2`` (needs double backward through D)."""
    (grad,) = torch.autograd.grad(logit.sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


class VosGanLoss(nn.Module):
    """All VOS-GAN objectives; weights from :class:`vosgan.config.LossConfig`."""

    def __init__(self, cfg: LossConfig, real_video: bool = False) -> None:
        """``real_video``: training reads real clips (``data.source`` a path), which switches
        camera-motion compensation of the pseudo-labels on under ``loss.motion_camera=auto``."""
        super().__init__()
        self.cfg = cfg
        self.camera = cfg.motion_camera == "affine" or (cfg.motion_camera == "auto" and real_video)
        self.warp = FlowWarpLoss(eps=cfg.charbonnier_eps, impl="reference")

    @property
    def reads_fake_flow(self) -> bool:
        """Whether :meth:`discriminator` reads D's flow of the fakes (``loss.flow_fake > 0`` with
        a flow or smoothness term): when not, D's flow of the fakes need not be computed."""
        c = self.cfg
        return c.flow_fake > 0 and (c.flow > 0 or c.flow_smoothness > 0)

    def motion(self, video: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        """(photometric warping loss, smoothness) of D's ``flow`` on ``video``."""
        flow = flow.float()
        weight = flow_validity(flow.detach())
        target = binomial_blur(video.float()) if self.cfg.photometric_blur else video.float()
        return self.warp(target, flow, weight), flow_smoothness(
            flow, video, self.cfg.smoothness_edge
        )

    def discriminator(
        self,
        real: Tensor,
        d_real: DiscOutput,
        fake: GenOutput,
        d_fake: DiscOutput,
        motion_seg: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """D's total loss and its parts (real/fake adversarial, segmentation, flow, smoothness;
        with ``motion_seg`` and ``loss.motion_seg > 0`` also the segmentation of ``real`` against
        :func:`motion_mask` of D's own detached flow on it). ``d_fake.flow`` may be None unless
        :attr:`reads_fake_flow`."""
        c = self.cfg
        parts = {"d_adv": d_adversarial(d_real.logit.float(), d_fake.logit.float(), c.adversarial)}
        total = parts["d_adv"]
        if c.segmentation > 0:
            parts["d_seg"] = segmentation_loss(d_fake.seg_logit, fake.mask, c.seg_balance)
            total = total + c.segmentation * parts["d_seg"]
        if motion_seg and c.motion_seg > 0:
            guide = real if c.motion_guide > 0 else None
            flow = d_real.flow.detach().float()
            moving = motion_mask(
                flow, c.motion_span, guide, c.motion_guide_radius, c.motion_guide, self.camera
            )
            parts["d_motion_seg"] = segmentation_loss(d_real.seg_logit, moving, c.seg_balance)
            total = total + c.motion_seg * parts["d_motion_seg"]
        if c.flow > 0 or c.flow_smoothness > 0:
            warp, smooth = self.motion(real, d_real.flow)
            if self.reads_fake_flow:
                warp_f, smooth_f = self.motion(fake.video.detach(), d_fake.flow)
                warp, smooth = warp + c.flow_fake * warp_f, smooth + c.flow_fake * smooth_f
            parts["d_flow"], parts["d_smooth"] = warp, smooth
            total = total + c.flow * warp + c.flow_smoothness * smooth
        return total, parts

    def generator(self, fake: GenOutput, d_fake: DiscOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """G's total loss and its parts (adversarial, mask sparsity, optional consistency)."""
        c = self.cfg
        parts = {
            "g_adv": g_adversarial(d_fake.logit.float(), c.adversarial),
            "g_mask": fake.mask.float().abs().mean(),
        }
        total = parts["g_adv"] + c.mask_sparsity * parts["g_mask"]
        if c.consistency > 0:
            # binary_cross_entropy refuses to run under CUDA autocast, whatever its inputs' dtype
            with torch.autocast(fake.mask.device.type, enabled=False):
                parts["g_consistency"] = F.binary_cross_entropy(
                    fake.mask.float(), torch.sigmoid(d_fake.seg_logit.float()).detach()
                )
            total = total + c.consistency * parts["g_consistency"]
        return total, parts

    def r1(self, disc: Discriminator, real: Tensor) -> Tensor:
        """The R1 penalty on real videos, weighted and scaled by the lazy interval."""
        real = real.detach().requires_grad_(True)
        return (
            0.5 * self.cfg.r1 * self.cfg.r1_every * r1_penalty(disc(real, dense=False).logit, real)
        )
