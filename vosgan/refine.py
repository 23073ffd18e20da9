"""Edge-aware refinement: averaging a per-pixel map over pixels of similar colour.

D's segmentation head works from half-resolution features and marks a rim around moving
objects, as do the motion pseudo-labels it learns from; a joint bilateral average guided by the
frame's colours snaps such a map to the object's edges (as DeepLab's CRF post-processing does for
image segmentation). :func:`refine_segmentation` applies it to D's segmentation (and, in the
evaluation, to the frame-difference baseline alike); :func:`vosgan.losses.motion_mask` can apply
it to the speed behind the pseudo-labels (``loss.motion_guide``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vosgan.config import ModelConfig


def colour_bilateral(
    values: Tensor, guide: Tensor, radius: int = 4, sigma: float = 0.1, step: int = 2
) -> Tensor:
    """Joint bilateral average of ``values`` in each frame, weighted by colour similarity in
    ``guide``: pixel ``p`` gets ``sum_q w_pq v_q / sum_q w_pq`` with
    ``w_pq = exp(-|g_p - g_q|^2 / (2 sigma^2))`` (squared distance summed over colour channels),
    ``q = p + (dy, dx)`` for ``dy, dx`` in ``-radius, -radius + step, ..., radius`` (the frame
    replicate-padded). No spatial falloff: similar colours inside the window count alike.

    ``values (B, 1, T, H, W)``, ``guide (B, C, T, H, W)`` (e.g. the video in [-1, 1]) -> float32
    ``(B, 1, T, H, W)``. A region of one colour shares one value; values do not cross colour edges.
    """
    if values.dim() != 5 or values.shape[1] != 1 or guide.dim() != 5:
        raise ValueError(
            f"values must be (B, 1, T, H, W) and guide (B, C, T, H, W), got "
            f"{tuple(values.shape)} and {tuple(guide.shape)}"
        )
    if guide.shape[0] != values.shape[0] or guide.shape[2:] != values.shape[2:]:
        raise ValueError(f"guide {tuple(guide.shape)} does not match values {tuple(values.shape)}")
    if step < 1 or radius < 0 or radius % step or not sigma > 0:
        raise ValueError(
            "need step >= 1, radius >= 0 a multiple of step (the centre is a tap), sigma > 0; "
            f"got step {step}, radius {radius}, sigma {sigma}"
        )
    b, c, t, h, w = guide.shape
    v = values.float().transpose(1, 2).reshape(b * t, 1, h, w)
    g = guide.float().transpose(1, 2).reshape(b * t, c, h, w)
    pad = (radius, radius, radius, radius)
    vp, gp = F.pad(v, pad, mode="replicate"), F.pad(g, pad, mode="replicate")
    num, den, scale = torch.zeros_like(v), torch.zeros_like(v), -0.5 / sigma**2
    taps = range(0, 2 * radius + 1, step)
    for dy in taps:
        for dx in taps:  # a Python loop over the taps: 2-3x faster than F.unfold on CPU
            dist = (gp[..., dy : dy + h, dx : dx + w] - g).square().sum(1, keepdim=True)
            weight = torch.exp(dist * scale)
            num += weight * vp[..., dy : dy + h, dx : dx + w]
            den += weight
    return (num / den).view(b, t, 1, h, w).transpose(1, 2)


def refine_segmentation(prob: Tensor, video: Tensor, cfg: ModelConfig) -> Tensor:
    """D's segmentation as evaluated: the head's foreground probability averaged over similar
    colours of each frame (:func:`colour_bilateral`, ``radius = model.seg_refine_radius``,
    ``sigma = model.seg_refine``); ``prob`` unchanged when ``model.seg_refine`` is 0.

    ``prob (B, 1, T, H, W)`` in [0, 1], ``video (B, 3, T, H, W)`` in [-1, 1] -> float32
    ``(B, 1, T, H, W)`` in [0, 1] (``prob`` itself, in its own dtype, when refinement is off).
    """
    if cfg.seg_refine <= 0:
        return prob
    return colour_bilateral(prob, video, cfg.seg_refine_radius, cfg.seg_refine)


__all__ = ["colour_bilateral", "refine_segmentation"]
