"""Evaluate a checkpoint: ``python -m vosgan.evaluate --checkpoint CKPT [--clips N] [--json FILE]``.

On held-out synthetic clips: IoU of D's segmentation against the ground-truth masks and the
end-point error of D's flow against the ground-truth flow, next to a frame-difference baseline
(segmentation) and zero flow, computed by the same metric code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vosgan import checkpoint
from vosgan.config import Config
from vosgan.data import SyntheticVideos
from vosgan.metrics import EvalResult, evaluate_predictions
from vosgan.models import Discriminator, Generator
from vosgan.viz import sample_grid, write_video

SAMPLE_SEED = 1234  # samples draw from their own generator: the training RNG stays untouched


@torch.no_grad()
def predict(D: Discriminator, video: Tensor) -> dict[str, Tensor]:
    """D's dense predictions: ``{"seg": (B,1,T,H,W) probability, "flow": (B,2,T-1,H,W) pixels}``."""
    out = D(video)
    return {"seg": torch.sigmoid(out.seg_logit.float()), "flow": out.flow.float()}


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

        return evaluate_predictions(pairs())
    finally:
        D.train(was_training)


@torch.no_grad()
def write_samples(
    G: Generator,
    D: Discriminator,
    stem: str | Path,
    num: int = 4,
    seed: int = SAMPLE_SEED,
    formats: tuple[str, ...] = (".mp4", ".gif"),
) -> list[Path]:
    """Write a sample grid (video | fg | mask | bg | D seg | D flow) as ``stem.<format>`` files.

    G and D run in eval mode (their modes are restored); latents come from a generator seeded with
    ``seed``, so samples at different steps show the same latents and training RNG is untouched.
    """
    device = next(G.parameters()).device
    modes = G.training, D.training
    G.eval()
    D.eval()
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        out = G(*G.sample_latents(num, device, generator=gen))
        pred = predict(D, out.video)
    finally:
        G.train(modes[0])
        D.train(modes[1])
    grid = sample_grid(
        *(x.float().cpu() for x in (out.video, out.fg, out.mask, out.bg)),
        pred["seg"].cpu(),
        pred["flow"].cpu(),
    )
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(fmt) for fmt in formats]
    for path in paths:
        write_video(path, np.ascontiguousarray(grid))
    return paths


def load_models(
    ckpt_path: str | Path, device: torch.device
) -> tuple[Config, Generator, Discriminator, dict]:
    """Rebuild G and D from a checkpoint (its own config decides the architecture)."""
    ckpt = checkpoint.load_checkpoint(ckpt_path, map_location=device)
    cfg = checkpoint.checkpoint_config(ckpt)
    G, D = Generator(cfg.model).to(device), Discriminator(cfg.model).to(device)
    G.load_state_dict(ckpt["G"])
    D.load_state_dict(ckpt["D"])
    return cfg, G, D, ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vosgan.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--clips", type=int, default=None, help="held-out clips (default: train.eval_clips)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    try:
        cfg, _, D, ckpt = load_models(args.checkpoint, torch.device(args.device))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clips = args.clips or cfg.train.eval_clips
    if clips < 1:
        print(f"error: --clips must be >= 1, got {clips}", file=sys.stderr)
        return 2
    result = evaluate_model(D, cfg, torch.device(args.device), clips).as_dict()
    result.update(step=ckpt["step"], checkpoint=ckpt["path"])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
