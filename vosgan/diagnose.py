"""Why does D segment real video the way it does? Calibration, ranking and G's masks, measured.

``python -m vosgan.diagnose --checkpoint CKPT [--clips N] [--fakes N] [--json FILE]``

The held-out IoU of :mod:`vosgan.evaluate` is one number at one threshold. This prints what it
is made of, on held-out synthetic clips (exact masks) and on G's own samples:

- **D on real clips** (against the ground-truth masks): mean foreground probability on
  foreground and on background pixels, the ranking AUC (the probability that a random foreground
  pixel scores above a random background one; 0.5 is chance), and IoU at several thresholds.
  A high AUC with a low IoU at 0.5 is a calibration problem; a low AUC is a ranking problem.
- **G's masks** (the targets that supervise D's segmentation): mean, the fraction above 0.5, the
  softness ``mean min(m, 1 - m)`` (0 for binary masks), and how much the video changes between
  frames inside and outside them, next to the same for real clips' ground-truth foreground.
- **D on G's fakes** against ``m > 0.5``: the same AUC and IoU. D segmenting fakes well while
  failing on real clips means it learned something about the fakes that real video lacks.
- **Motion or appearance?** The same reports on the real clips and on the fakes *frozen in
  time* (:func:`freeze`: the middle frame repeated T times), against that frame's mask. A D that
  segments what moves falls to chance (AUC 0.5) on frozen clips; a D that keeps its AUC there
  segments by appearance.

A diagnostic of a trained checkpoint; nothing here feeds back into training. The real clips are
always the built-in synthetic validation clips at the checkpoint's resolution (they have exact
masks), whatever data the checkpoint was trained on. An undefined value (an AUC or mean with no
foreground or no background pixel) prints as ``nan`` and is ``null`` in the ``--json`` file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import Tensor

from vosgan import cli
from vosgan.data import SyntheticVideos
from vosgan.evaluate import SAMPLE_SEED, load_models, predict
from vosgan.metrics import ranking_auc, segmentation_iou
from vosgan.models import Discriminator, Generator

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def segmentation_report(prob: Tensor, target: Tensor) -> dict[str, Any]:
    """Calibration and ranking of a foreground probability map against a binary target.

    Args:
        prob: ``(B, 1, T, H, W)`` foreground probability in [0, 1].
        target: ``(B, 1, T, H, W)``, foreground where ``> 0.5``.

    Returns:
        ``fg_fraction``, ``mean_prob_fg``, ``mean_prob_bg`` (``nan`` where a class is absent),
        ``auc`` (:func:`vosgan.metrics.ranking_auc`) and ``iou_at`` ``{threshold: mean IoU}``.
    """
    fg = target > 0.5
    p = prob.float()
    return {
        "fg_fraction": float(fg.float().mean()),
        "mean_prob_fg": float(p[fg].mean()) if fg.any() else float("nan"),
        "mean_prob_bg": float(p[~fg].mean()) if (~fg).any() else float("nan"),
        "auc": ranking_auc(p, fg),
        "iou_at": {str(th): float(segmentation_iou(p, fg.float(), th).mean()) for th in THRESHOLDS},
    }


def freeze(x: Tensor) -> Tensor:
    """``x (B, C, T, H, W)`` with every frame replaced by the middle one (frame ``T // 2``)."""
    t = x.shape[2] // 2
    return x[:, :, t : t + 1].expand_as(x).contiguous()


def temporal_change(video: Tensor, region: Tensor) -> dict[str, float]:
    """Mean ``|v_{t+1} - v_t|`` (channel mean) inside and outside ``region``.

    Args:
        video: ``(B, C, T, H, W)``.
        region: ``(B, 1, T, H, W)`` bool; frame ``t+1``'s region decides where a difference counts.
    """
    diff = (video[:, :, 1:] - video[:, :, :-1]).abs().float().mean(1, keepdim=True)
    inside = region[:, :, 1:]
    return {
        "inside": float(diff[inside].mean()) if inside.any() else float("nan"),
        "outside": float(diff[~inside].mean()) if (~inside).any() else float("nan"),
    }


def _segment_moving_and_frozen(
    D: Discriminator, videos: Tensor, device: torch.device, batch_size: int
) -> tuple[Tensor, Tensor]:
    """D's foreground probability ``(N, 1, T, H, W)`` on ``videos`` and on ``freeze(videos)``."""
    moving, frozen = [], []
    for v in videos.split(batch_size):
        moving.append(predict(D, v.to(device), flow=False)["seg"].cpu())
        frozen.append(predict(D, freeze(v).to(device), flow=False)["seg"].cpu())
    return torch.cat(moving), torch.cat(frozen)


@torch.no_grad()
def diagnose(
    G: Generator,
    D: Discriminator,
    clips: dict[str, Tensor],
    num_fakes: int,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The whole report for ``G`` and ``D`` (both in eval mode; their modes are restored).

    Args:
        clips: a synthetic batch, ``{"video": (N, 3, T, H, W), "mask": (N, 1, T, H, W)}``.
        num_fakes: how many samples of G to score (latents from :data:`SAMPLE_SEED`).
    """
    modes = G.training, D.training
    G.eval()
    D.eval()
    try:
        seg, seg_frozen = _segment_moving_and_frozen(D, clips["video"], device, batch_size)
        real_fg = clips["mask"] > 0.5
        gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
        videos, masks = [], []
        for start in range(0, num_fakes, batch_size):
            out = G(*G.sample_latents(min(batch_size, num_fakes - start), device, generator=gen))
            videos.append(out.video.float().cpu())
            masks.append(out.mask.float().cpu())
        video, mask = torch.cat(videos), torch.cat(masks)
        fake_seg, fake_seg_frozen = _segment_moving_and_frozen(D, video, device, batch_size)
    finally:
        G.train(modes[0])
        D.train(modes[1])
    return {
        "d_on_real": segmentation_report(seg, real_fg),
        "d_on_fakes": segmentation_report(fake_seg, mask > 0.5),
        "d_on_real_frozen": segmentation_report(seg_frozen, freeze(real_fg)),
        "d_on_fakes_frozen": segmentation_report(fake_seg_frozen, freeze(mask) > 0.5),
        "g_masks": {
            "mean": float(mask.mean()),
            "fraction_above_half": float((mask > 0.5).float().mean()),
            "softness": float(torch.minimum(mask, 1 - mask).mean()),
            "change_in_fakes": temporal_change(video, mask > 0.5),
        },
        "change_in_real": temporal_change(clips["video"], real_fg),
        "num_clips": int(clips["video"].shape[0]),
        "num_fakes": int(video.shape[0]),
    }


def _line(name: str, r: dict[str, Any]) -> str:
    ious = " ".join(f"{th}:{v:.3f}" for th, v in r["iou_at"].items())
    return (
        f"{name}: AUC {r['auc']:.3f}; mean p fg {r['mean_prob_fg']:.3f} bg "
        f"{r['mean_prob_bg']:.3f} (fg {100 * r['fg_fraction']:.1f}% of pixels); IoU at {ious}"
    )


def describe(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    g = report["g_masks"]
    cf, cr = g["change_in_fakes"], report["change_in_real"]
    return "\n".join(
        [
            _line(f"D on {report['num_clips']} held-out real clips", report["d_on_real"]),
            _line(f"D on {report['num_fakes']} fakes vs m > 0.5", report["d_on_fakes"]),
            _line("D on the real clips frozen in time", report["d_on_real_frozen"]),
            _line("D on the fakes frozen in time", report["d_on_fakes_frozen"]),
            f"G's masks: mean {g['mean']:.3f}, {100 * g['fraction_above_half']:.1f}% above 0.5, "
            f"softness {g['softness']:.3f} (0 = binary)",
            f"|v(t+1) - v(t)| inside / outside the mask: fakes {cf['inside']:.3f} / "
            f"{cf['outside']:.3f}, real clips {cr['inside']:.3f} / {cr['outside']:.3f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.diagnose",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--clips",
        type=cli.int_at_least(1),
        default=None,
        help="held-out synthetic clips (default: train.eval_clips)",
    )
    p.add_argument("--fakes", type=cli.int_at_least(1), default=64, help="samples of G to score")
    cli.add_device(p)
    cli.add_json(p, "the report")
    args = p.parse_args(argv)
    device = args.device
    try:
        cfg, G, D, _ = load_models(args.checkpoint, device)
        clips = args.clips if args.clips is not None else cfg.train.eval_clips
        data = SyntheticVideos(
            max(cfg.data.val_clips, clips),
            cfg.model.frames,
            cfg.model.size,
            seed=cfg.data.seed,
            split="val",
        )
        report = diagnose(G, D, data.batch(range(clips)), args.fakes, device, cfg.data.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(report))
    cli.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
