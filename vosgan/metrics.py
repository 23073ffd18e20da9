"""Evaluation on clips with exact ground truth: segmentation IoU, flow end-point error, and a
frame-difference baseline scored by the same code.

Conventions: masks and segmentations are ``(B, 1, T, H, W)``; flow is ``(B, 2, T-1, H, W)`` in
pixels (channel 0 = x, 1 = y), forward from frame ``t`` to ``t + 1`` (see
:mod:`vosgan.ops.flow_warp`). Foreground-only flow error uses the ground-truth mask of frame
``t`` (the pixels whose motion the flow ``t -> t+1`` describes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def _check_pair(name: str, pred: Tensor, target: Tensor, channels: int) -> None:
    if pred.dim() != 5 or pred.shape[1] != channels:
        raise ValueError(f"{name}: pred must be (B, {channels}, T, H, W), got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} differs from pred shape "
            f"{tuple(pred.shape)}"
        )


def segmentation_iou(pred: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-frame intersection over union of a thresholded prediction with a binary target.

    Args:
        pred: foreground probability ``(B, 1, T, H, W)`` in [0, 1]; foreground where
            ``pred > threshold``.
        target: ground-truth mask ``(B, 1, T, H, W)``, foreground where ``target > 0.5``.
        threshold: decision threshold on ``pred``.

    Returns:
        IoU ``(B, T)`` float32; a frame where prediction and target are both empty scores 1.0.
    """
    _check_pair("segmentation_iou", pred, target, 1)
    p = pred.detach() > threshold
    g = target.detach() > 0.5
    inter = (p & g).sum(dim=(1, 3, 4)).float()
    union = (p | g).sum(dim=(1, 3, 4)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def ranking_auc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count one half), computed exactly from ranks (Mann-Whitney U).

    Args:
        score: any shape, e.g. foreground probabilities ``(B, 1, T, H, W)``.
        positive: bool (or 0/1) of the same shape.

    Returns:
        AUC in [0, 1]; 0.5 is chance. ``nan`` when either class is empty.
    """
    if score.shape != positive.shape:
        raise ValueError(
            f"ranking_auc: positive shape {tuple(positive.shape)} differs from score "
            f"shape {tuple(score.shape)}"
        )
    s, pos = score.detach().flatten().double(), positive.detach().flatten().bool()
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    _, counts = torch.unique_consecutive(s[order], return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each tie group's last element
    mean_rank = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)
    ranks = torch.empty_like(mean_rank).scatter_(0, order, mean_rank)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def flow_epe(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean end-point error ``|pred - target|_2`` per clip.

    Args:
        pred, target: flow ``(B, 2, T-1, H, W)`` in pixels.
        mask: optional ``(B, 1, T-1, H, W)``; the mean then runs over pixels with ``mask > 0.5``
            only (a clip with no such pixel gives NaN).

    Returns:
        ``(B,)`` float32.
    """
    _check_pair("flow_epe", pred, target, 2)
    diff = pred.detach().float() - target.detach().float()
    err = torch.hypot(diff[:, 0], diff[:, 1])  # vector_norm(dim=1): 50x slower on CPU
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    b, _, t, h, w = pred.shape
    if tuple(mask.shape) != (b, 1, t, h, w):
        raise ValueError(f"flow_epe: mask must be {(b, 1, t, h, w)}, got {tuple(mask.shape)}")
    m = (mask.detach() > 0.5).squeeze(1)
    return (err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))


def frame_difference_saliency(video: Tensor) -> Tensor:
    """Motion saliency from frame differencing against a robust noise level; nothing learned.

    Definition: ``d_t = mean_c |x_{t+1} - x_t| / 2`` (in [0, 1] for ``x`` in [-1, 1]) is the
    change between consecutive frames; frame ``t`` takes the larger change to either neighbour,
    ``s_t = max(d_{t-1}, d_t)`` (the first and last frame have one neighbour: ``d_0``,
    ``d_{T-2}``). Normalisation: each clip's noise scale is ``sigma = 1.4826 * median(s)`` (the
    median absolute deviation rule: most pixels of a static-camera clip do not move), and the
    map is ``clamp(0.5 * s / (3 * sigma), 0, 1)``, so thresholding at 0.5 keeps the changes
    above three noise standard deviations (if ``sigma`` is 0, any change counts: ``s > 0``).

    How it was chosen: among {min, mean, max} of the two neighbour differences times
    {divide by the clip maximum, Otsu's threshold, 3 * MAD} on *training*-split synthetic clips
    (seed 123, 48 clips; never the evaluation clips), this is the variant with the highest IoU
    (0.30 at 16x32x32, 0.33 at 32x64x64, against 0.01-0.32 for the others; the first candidate,
    min + divide by the maximum, scored 0.02, below predicting "all foreground"): the baseline
    is not handicapped.

    Args:
        video: ``(B, C, T, H, W)`` in [-1, 1], T >= 2.

    Returns:
        ``(B, 1, T, H, W)`` float32 in [0, 1].
    """
    if video.dim() != 5 or video.shape[2] < 2:
        raise ValueError(f"video must be (B, C, T, H, W) with T >= 2, got {tuple(video.shape)}")
    x = video.detach().float()
    d = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=1, keepdim=True) / 2  # (B, 1, T-1, H, W)
    before = torch.cat((d[:, :, :1], d), dim=2)  # d_{t-1}, with d_0 for t = 0
    after = torch.cat((d, d[:, :, -1:]), dim=2)  # d_t, with d_{T-2} for t = T-1
    s = torch.maximum(before, after)
    tau = 3.0 * 1.4826 * s.flatten(1).median(dim=1).values.view(-1, 1, 1, 1, 1)
    return torch.where(tau > 0, (0.5 * s / tau.clamp_min(1e-12)).clamp(0, 1), (s > 0).float())


def frame_difference_baseline(video: Tensor) -> dict[str, Tensor]:
    """The non-learned baseline, in the discriminator's output format.

    Returns:
        ``seg``: :func:`frame_difference_saliency` ``(B, 1, T, H, W)`` (threshold at 0.5 like D's
        probabilities); ``flow``: zeros ``(B, 2, T-1, H, W)`` (frame differences carry no
        direction: "no motion" is the baseline's flow estimate).
    """
    seg = frame_difference_saliency(video)
    b, _, t, h, w = seg.shape
    return {"seg": seg, "flow": seg.new_zeros((b, 2, t - 1, h, w))}


@dataclass
class EvalResult:
    """Scores over a set of clips. IoU: mean over all frames; EPE: mean over all pixels (``epe``)
    and over ground-truth foreground pixels (``epe_fg``), pooled over clips; ``baseline_*``: the
    same numbers for :func:`frame_difference_baseline` on the same videos. ``iou`` scores the
    segmentation as refined (``model.seg_refine``), ``iou_head`` the head's own, and likewise
    ``baseline_iou`` and ``baseline_iou_head`` (equal when nothing is refined)."""

    iou: float
    epe: float
    epe_fg: float
    baseline_iou: float
    baseline_epe: float
    baseline_epe_fg: float
    num_clips: int
    iou_head: float
    baseline_iou_head: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class _Totals:
    """Running sums so that every frame and pixel weighs the same across batches."""

    def __init__(self) -> None:
        self.iou = self.frames = self.err = self.pixels = self.err_fg = self.pixels_fg = 0.0

    def add(self, seg: Tensor, flow: Tensor, mask: Tensor, gt_flow: Tensor) -> None:
        iou = segmentation_iou(seg, mask)
        self.iou += float(iou.sum())
        self.frames += iou.numel()
        err = torch.linalg.vector_norm(flow.detach().float() - gt_flow.float(), dim=1)
        fg = mask[:, 0, :-1] > 0.5
        self.err += float(err.sum())
        self.pixels += err.numel()
        self.err_fg += float((err * fg).sum())
        self.pixels_fg += float(fg.sum())

    def means(self) -> tuple[float, float, float]:
        nan = float("nan")
        return (
            self.iou / self.frames if self.frames else nan,
            self.err / self.pixels if self.pixels else nan,
            self.err_fg / self.pixels_fg if self.pixels_fg else nan,
        )


def evaluate_predictions(
    batches: Iterable[tuple[dict[str, Tensor], dict[str, Tensor]]],
    refine: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> EvalResult:
    """Score predictions against ground truth, and the frame-difference baseline alongside.

    Args:
        batches: pairs ``(batch, pred)``: ``batch`` as returned by
            :meth:`vosgan.data.SyntheticVideos.batch` (``video (B, 3, T, H, W)``, ``mask
            (B, 1, T, H, W)``, ``flow (B, 2, T-1, H, W)``) and ``pred`` with ``seg (B, 1, T, H, W)``
            probabilities and ``flow (B, 2, T-1, H, W)`` pixels (any device; moved to the CPU),
            and optionally ``seg_head``, the unrefined segmentation (scored as ``iou_head``).
        refine: ``refine(seg, video) -> seg`` applied to the baseline's segmentation as it was
            to the predictions' (:func:`vosgan.refine.refine_segmentation`), so that both are
            scored alike; None: the baseline unrefined.

    Returns:
        :class:`EvalResult` (IoU pooled over frames, EPE pooled over pixels).
    """
    model, base = _Totals(), _Totals()
    head_iou = base_head_iou = 0.0
    clips = 0
    for batch, pred in batches:
        for key in ("video", "mask", "flow"):
            if key not in batch:
                raise KeyError(f"evaluate_predictions: batch has no {key!r} (keys {list(batch)})")
        for key in ("seg", "flow"):
            if key not in pred:
                raise KeyError(f"evaluate_predictions: pred has no {key!r} (keys {list(pred)})")
        video, mask, gt = (batch[k].detach().cpu() for k in ("video", "mask", "flow"))
        seg, flow = pred["seg"].detach().cpu(), pred["flow"].detach().cpu()
        _check_pair("evaluate_predictions (pred seg vs batch mask)", seg, mask, 1)
        _check_pair("evaluate_predictions (pred flow vs batch flow)", flow, gt, 2)
        model.add(seg, flow, mask, gt)
        head = pred.get("seg_head", pred["seg"]).detach().cpu()
        _check_pair("evaluate_predictions (pred seg_head vs batch mask)", head, mask, 1)
        head_iou += float(segmentation_iou(head, mask).sum())
        baseline = frame_difference_baseline(video)
        base_head_iou += float(segmentation_iou(baseline["seg"], mask).sum())
        if refine is not None:
            baseline["seg"] = refine(baseline["seg"], video)
        base.add(baseline["seg"], baseline["flow"], mask, gt)
        clips += video.shape[0]
    if clips == 0:
        raise ValueError("evaluate_predictions: no batches")
    return EvalResult(
        *model.means(),
        *base.means(),
        num_clips=clips,
        iou_head=head_iou / model.frames,
        baseline_iou_head=base_head_iou / base.frames,
    )


__all__ = [
    "EvalResult",
    "evaluate_predictions",
    "flow_epe",
    "frame_difference_baseline",
    "frame_difference_saliency",
    "segmentation_iou",
]
