"""Evaluate a checkpoint on synthetic clips, or on DAVIS-style real video with J&F.

``python -m vosgan.evaluate --checkpoint CKPT [--clips N] [--json FILE]``: on held-out synthetic
clips, IoU of D's segmentation against the ground-truth masks and the end-point error of D's
flow against the ground-truth flow, next to a frame-difference baseline (segmentation) and zero
flow, computed by the same metric code.

Both modes score the moving average of D's weights that training keeps (``train.d_ema``,
``D_ema`` in the checkpoint) when the checkpoint holds one; ``--trained-weights`` scores D's
weights as trained.

``python -m vosgan.evaluate --davis ROOT [--checkpoint CKPT] --out DIR``: unsupervised video
object segmentation on DAVIS-style real video, J&F next to three baselines
(:mod:`vosgan.davis_eval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vosgan import checkpoint, cli
from vosgan.config import Config
from vosgan.data import SyntheticVideos
from vosgan.metrics import EvalResult, evaluate_predictions
from vosgan.models import Discriminator, Generator, GenOutput
from vosgan.refine import refine_segmentation
from vosgan.viz import sample_grid, write_video

SAMPLE_SEED = 1234  # samples draw from their own generator: the training RNG stays untouched


@torch.no_grad()
def predict(D: Discriminator, video: Tensor, flow: bool = True) -> dict[str, Tensor]:
    """D's dense predictions on ``video (B, 3, T, H, W)``: ``{"seg": (B,1,T,H,W) probability,
    "seg_head": (B,1,T,H,W), "flow": (B,2,T-1,H,W) pixels}``. ``seg`` is D's segmentation as
    evaluated (:func:`vosgan.refine.refine_segmentation` of the head's, per ``model.seg_refine``),
    ``seg_head`` the head's own; with ``flow=False`` no ``flow`` (D skips its flow branch)."""
    out = D(video, flow=flow)
    head = torch.sigmoid(out.seg_logit.float())
    seg = {"seg": refine_segmentation(head, video, D.cfg), "seg_head": head}
    return seg | {"flow": out.flow.float()} if flow else seg


@torch.no_grad()
def evaluate_model(
    D: Discriminator,
    cfg: Config,
    device: torch.device,
    num_clips: int,
    batch_size: int | None = None,
) -> EvalResult:
    """Score D (in eval mode; its mode is restored) on the first ``num_clips`` validation clips."""
    data = SyntheticVideos(
        cfg.data.val_clips, cfg.model.frames, cfg.model.size, seed=cfg.data.seed, split="val"
    )
    num_clips = min(num_clips, len(data))
    bs = batch_size or cfg.data.batch_size
    was_training = D.training
    D.eval()
    try:

        def pairs():
            for start in range(0, num_clips, bs):
                batch = data.batch(range(start, min(start + bs, num_clips)))
                yield batch, {k: v.cpu() for k, v in predict(D, batch["video"].to(device)).items()}

        return evaluate_predictions(pairs(), lambda seg, v: refine_segmentation(seg, v, D.cfg))
    finally:
        D.train(was_training)


@torch.no_grad()
def sample_videos(
    G: Generator, num: int, seed: int, batch_size: int | None = None
) -> Iterator[GenOutput]:
    """G's outputs for ``num`` latents, ``batch_size`` at a time (default: all at once).

    The latents (``z_c (num, Zc)``, ``anchors (num, K, Dm)``) are drawn together from a generator
    seeded with ``seed`` on G's device, so sample ``i`` is the same whatever ``batch_size``; G
    runs in whatever mode it is in (eval mode: batch-independent BatchNorm). Yields
    :class:`~vosgan.models.GenOutput` batches of ``min(batch_size, num - start)`` samples.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(G.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    z_c, anchors = G.sample_latents(num, device, generator=gen)
    bs = batch_size or num
    for start in range(0, num, bs):
        yield G(z_c[start : start + bs], anchors[start : start + bs])


#: The most rows (samples) :func:`write_samples` puts in one grid video: at 32 the grid is
#: 2128 x 398 pixels at 32x32 (shown at 2x) and at 64x64 alike; more samples go to a .pt file.
MAX_GRID_ROWS = 32


@torch.no_grad()
def write_samples(
    G: Generator,
    D: Discriminator,
    stem: str | Path,
    num: int = 4,
    seed: int = SAMPLE_SEED,
    formats: tuple[str, ...] = (".mp4", ".gif"),
    batch_size: int | None = None,
) -> list[Path]:
    """Write a sample grid (video | fg | mask | bg | D seg | D flow), one row for each of the
    ``num`` samples (at most :data:`MAX_GRID_ROWS`), as ``stem.<format>`` files (the format is
    appended: a dot in ``stem`` stays, ``out/r.sh`` gives ``out/r.sh.mp4``).

    G and D run in eval mode (their modes are restored) on ``batch_size`` samples at a time
    (default: all); latents come from :func:`sample_videos` seeded with ``seed``, so samples at
    different steps show the same latents and training RNG is untouched.
    """
    if not 1 <= num <= MAX_GRID_ROWS:
        raise ValueError(f"num must be in [1, {MAX_GRID_ROWS}] (one grid row each), got {num}")
    modes = G.training, D.training
    G.eval()
    D.eval()
    cols: list[list[Tensor]] = [[] for _ in range(6)]  # video, fg, mask, bg, seg, flow
    try:
        for out in sample_videos(G, num, seed, batch_size):
            pred = predict(D, out.video)
            for col, x in zip(cols, (*out, pred["seg"], pred["flow"]), strict=True):
                col.append(x.float().cpu())
    finally:
        G.train(modes[0])
        D.train(modes[1])
    grid = sample_grid(*(torch.cat(col) for col in cols), max_rows=num)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + fmt) for fmt in formats]
    for path in paths:
        write_video(path, np.ascontiguousarray(grid))
    return paths


def d_weights(ckpt: dict[str, Any], average: bool = True) -> str:
    """Which of the checkpoint's D weights :func:`load_models` loads: ``"D_ema"`` (the moving
    average, ``train.d_ema``) when it holds one and ``average``, else ``"D"``."""
    return "D_ema" if average and "D_ema" in ckpt else "D"


def load_models(
    ckpt_path: str | Path, device: torch.device, refine: bool = True, average: bool = True
) -> tuple[Config, Generator, Discriminator, dict]:
    """Rebuild G and D from a checkpoint (its own config decides the architecture);
    ``refine=False`` turns ``model.seg_refine`` off (D's segmentation as its head gives it);
    D gets the moving average of its weights when the checkpoint has one, unless ``average`` is
    False (:func:`d_weights`).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a readable vosgan checkpoint, or one without its config or weights, or
            weights that do not fit its config; the message names the file.
    """
    ckpt = checkpoint.load_checkpoint(ckpt_path, map_location=device)
    for key in ("config", "G", "D"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {ckpt['path']} has no {key!r} entry (damaged file?)")
    cfg = checkpoint.checkpoint_config(ckpt)
    if not refine:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seg_refine=0.0))
    G, D = Generator(cfg.model).to(device), Discriminator(cfg.model).to(device)
    try:
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt[d_weights(ckpt, average)])
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {ckpt['path']}: the weights do not fit its config ({exc})"
        ) from exc
    return cfg, G, D, ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="checkpoint file or run folder")
    p.add_argument(
        "--clips",
        type=cli.int_at_least(1),
        default=None,
        help="held-out clips (default: train.eval_clips)",
    )
    p.add_argument(
        "--unrefined",
        action="store_true",
        help="score D's segmentation as its head gives it, without model.seg_refine (the "
        "frame-difference baseline alike)",
    )
    p.add_argument(
        "--trained-weights",
        action="store_true",
        help="score D's weights as trained, not their moving average (train.d_ema) that the "
        "checkpoint also holds",
    )
    cli.add_device(p)
    cli.add_json(p, "the result")
    from vosgan import davis_eval  # it imports this module

    davis = davis_eval.add_arguments(p)
    args = p.parse_args(argv)
    # Flags of the other mode would be ignored silently: refuse them instead.
    given = [
        a.option_strings[0] for a in davis._group_actions if getattr(args, a.dest) != a.default
    ]
    if args.davis and (args.clips is not None or args.json is not None):
        p.error("--clips and --json are for --checkpoint alone; --davis writes to --out")
    if not args.davis and given:
        p.error(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --davis")
    if args.davis:
        if args.out is None:
            try:
                args.out = cli.out_dir(davis_eval.DEFAULT_OUT)
            except argparse.ArgumentTypeError as exc:
                p.error(f"argument --out: {exc}")
        try:
            return davis_eval.run(args)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not args.checkpoint:
        print(
            "error: give --checkpoint (held-out clips of its data) or --davis ROOT", file=sys.stderr
        )
        return 2
    try:
        cfg, _, D, ckpt = load_models(
            args.checkpoint, args.device, not args.unrefined, not args.trained_weights
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clips = args.clips if args.clips is not None else cfg.train.eval_clips
    from vosgan.train_data import Evaluator  # it imports this module

    try:  # the checkpoint's own validation data: synthetic clips, or its real-data folder
        result = Evaluator(cfg, args.device, clips)(D)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update(
        step=ckpt["step"],
        checkpoint=ckpt["path"],
        d_weights=d_weights(ckpt, not args.trained_weights),
    )
    print(json.dumps(result, indent=2))
    cli.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
