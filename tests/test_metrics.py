"""Evaluation metrics on hand-computed cases, and the frame-difference baseline."""

from __future__ import annotations

import math

import pytest
import torch

from vosgan.data import SyntheticVideos
from vosgan.metrics import (
    EvalResult,
    evaluate_predictions,
    flow_epe,
    frame_difference_baseline,
    frame_difference_saliency,
    segmentation_iou,
)


def _frames(*rows: list[float]) -> torch.Tensor:
    """One clip, one channel, one 1x4 row per frame: ``(1, 1, T, 1, 4)``."""
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), 1, 4)


def test_iou_hand_computed() -> None:
    pred = _frames([0.9, 0.6, 0.1, 0.0], [0.0, 0.2, 0.4, 0.0], [0.0] * 4, [0.5, 0.51, 1, 1])
    target = _frames([1, 0, 0, 0], [0] * 4, [1, 1, 0, 0], [1, 1, 1, 1])
    iou = segmentation_iou(pred, target)
    # 1 of 2 | both empty -> 1 | empty pred vs 2 pixels -> 0 | 0.5 is not > 0.5: 3 of 4
    assert iou.shape == (1, 4)
    torch.testing.assert_close(iou, torch.tensor([[0.5, 1.0, 0.0, 0.75]]))
    assert segmentation_iou(pred, target, threshold=0.05)[0, 0] == pytest.approx(1 / 3)  # 1 of 3


def test_iou_batches_are_independent() -> None:
    pred = torch.zeros(2, 1, 3, 4, 4)
    target = torch.zeros(2, 1, 3, 4, 4)
    pred[0, :, :, :2] = 1
    target[0, :, :, :1] = 1
    target[1, :, 1] = 1
    iou = segmentation_iou(pred, target)
    torch.testing.assert_close(iou, torch.tensor([[0.5] * 3, [1.0, 0.0, 1.0]]))


def test_epe_known_values() -> None:
    target = torch.randn(2, 2, 3, 4, 5)
    pred = target.clone()
    pred[:, 0] += 3.0
    pred[:, 1] -= 4.0
    torch.testing.assert_close(flow_epe(pred, target), torch.full((2,), 5.0))
    pred = target.clone()
    pred[0, 0, :, :2] += 1.0  # error 1 on 2 of 4 rows of clip 0
    mask = torch.zeros(2, 1, 3, 4, 5)
    mask[0, :, :, :3] = 1  # 2 of the 3 masked rows are wrong
    epe = flow_epe(pred, target, mask)
    assert flow_epe(pred, target)[0] == pytest.approx(0.5)
    assert epe[0] == pytest.approx(2 / 3)
    assert math.isnan(float(epe[1]))  # clip 1 has no masked pixel


def test_shape_validation() -> None:
    with pytest.raises(ValueError, match="target shape"):
        segmentation_iou(torch.zeros(1, 1, 2, 4, 4), torch.zeros(1, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="pred must be"):
        flow_epe(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="mask must be"):
        flow_epe(torch.zeros(1, 2, 2, 4, 4), torch.zeros(1, 2, 2, 4, 4), torch.zeros(1, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="T >= 2"):
        frame_difference_saliency(torch.zeros(1, 3, 1, 4, 4))


def test_saliency_definition() -> None:
    video = torch.full((1, 3, 4, 1, 4), -1.0)
    video[:, :, 1, 0, 1] = 1.0  # a flash at pixel 1 of frame 1: d_0 = d_1 = 1 there
    video[:, :, 3, 0, 3] = 0.0  # a half-step at pixel 3 of frame 3: d_2 = 0.5 there
    s = frame_difference_saliency(video)
    assert s.shape == (1, 1, 4, 1, 4)
    # noise scale: median of s is 0 -> any change counts
    expected = torch.zeros(4, 4)
    expected[0:3, 1] = 1.0  # frames 0, 1, 2 touch d_0 or d_1
    expected[2:4, 3] = 1.0
    torch.testing.assert_close(s[0, 0, :, 0], expected)
    static = frame_difference_saliency(torch.rand(2, 3, 1, 5, 5).expand(2, 3, 4, 5, 5) * 2 - 1)
    assert float(static.abs().max()) == 0.0


def test_saliency_three_sigma_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, 6, 32, 32, generator=gen) - 0.5) * 0.02  # sensor noise only
    video[:, :, 3, 8:16, 8:16] += 1.0  # a pop-up square in frame 3
    s = frame_difference_saliency(video)
    assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    fg = s > 0.5
    assert bool(fg[0, 0, 2:5, 8:16, 8:16].all())  # frames 2-4 see the change
    assert float(fg[0, 0, :, 16:].float().mean()) < 0.01  # noise rarely passes 3 sigma


def test_baseline_beats_chance_on_synthetic_clips() -> None:
    ds = SyntheticVideos(12, 16, 32, seed=7, split="val")
    batch = ds.batch(range(12))
    base = frame_difference_baseline(batch["video"])
    assert base["seg"].shape == batch["mask"].shape
    assert base["flow"].shape == batch["flow"].shape and float(base["flow"].abs().max()) == 0
    iou = float(segmentation_iou(base["seg"], batch["mask"]).mean())
    everything = float(segmentation_iou(torch.ones_like(batch["mask"]), batch["mask"]).mean())
    shuffled = float(segmentation_iou(batch["mask"].roll(1, 0), batch["mask"]).mean())
    assert iou > 1.5 * max(everything, shuffled), (iou, everything, shuffled)


def test_evaluate_predictions_pools_frames_and_pixels() -> None:
    ds = SyntheticVideos(6, 5, 16, seed=1, split="val")
    b1, b2 = ds.batch([0, 1, 2, 3]), ds.batch([4, 5])
    perfect = evaluate_predictions([(b, {"seg": b["mask"], "flow": b["flow"]}) for b in (b1, b2)])
    assert isinstance(perfect, EvalResult) and perfect.num_clips == 6
    assert perfect.iou == 1.0 and perfect.epe == 0.0 and perfect.epe_fg == 0.0

    def pred(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "seg": torch.zeros_like(b["mask"]),
            "flow": b["flow"] + torch.tensor([0.6, 0.8]).view(1, 2, 1, 1, 1),
        }

    res = evaluate_predictions([(b1, pred(b1)), (b2, pred(b2))])
    assert res.epe == pytest.approx(1.0) and res.epe_fg == pytest.approx(1.0)
    frames_with_fg = sum(float((b["mask"].sum(dim=(1, 3, 4)) > 0).sum()) for b in (b1, b2))
    assert res.iou == pytest.approx(1.0 - frames_with_fg / 30)  # only empty frames score
    # the baseline is scored by the same code: zero flow -> EPE = mean GT speed
    both = ds.batch(range(6))
    speed = torch.linalg.vector_norm(both["flow"], dim=1)
    fg = both["mask"][:, 0, :-1] > 0
    assert res.baseline_epe == pytest.approx(float(speed.mean()), rel=1e-5)
    assert res.baseline_epe_fg == pytest.approx(float(speed[fg].mean()), rel=1e-5)
    seg = frame_difference_baseline(both["video"])["seg"]
    assert res.baseline_iou == pytest.approx(float(segmentation_iou(seg, both["mask"]).mean()))
    assert set(res.as_dict()) == {
        "iou",
        "epe",
        "epe_fg",
        "baseline_iou",
        "baseline_epe",
        "baseline_epe_fg",
        "num_clips",
        "iou_head",
        "baseline_iou_head",
    }
    assert res.iou_head == res.iou and res.baseline_iou_head == res.baseline_iou  # no refinement


def test_evaluate_predictions_refines_the_baseline_as_the_predictions() -> None:
    """``refine`` reaches the baseline's segmentation (scored as ``baseline_iou``; the raw one as
    ``baseline_iou_head``), and ``seg_head`` is scored as ``iou_head``."""
    ds = SyntheticVideos(4, 5, 16, seed=1, split="val")
    b = ds.batch(range(4))

    def refine(seg: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        assert torch.equal(video, b["video"])
        return (seg > 0.2).float()  # any change the scores can see

    pred = {"seg": b["mask"], "seg_head": torch.zeros_like(b["mask"]), "flow": b["flow"]}
    res = evaluate_predictions([(b, pred)], refine)
    raw = frame_difference_baseline(b["video"])["seg"]
    assert res.iou == 1.0
    assert res.iou_head == pytest.approx(
        float(segmentation_iou(pred["seg_head"], b["mask"]).mean())
    )
    assert res.baseline_iou_head == pytest.approx(float(segmentation_iou(raw, b["mask"]).mean()))
    assert res.baseline_iou == pytest.approx(
        float(segmentation_iou(refine(raw, b["video"]), b["mask"]).mean())
    )
    assert res.baseline_iou != res.baseline_iou_head


def test_evaluate_predictions_validates() -> None:
    b = SyntheticVideos(2, 4, 16).batch([0, 1])
    with pytest.raises(ValueError, match="no batches"):
        evaluate_predictions([])
    with pytest.raises(KeyError, match="seg"):
        evaluate_predictions([(b, {"flow": b["flow"]})])
    with pytest.raises(ValueError, match="pred seg"):
        evaluate_predictions([(b, {"seg": b["mask"][:, :, :-1], "flow": b["flow"]})])
