"""Unsupervised video object segmentation with D's segmentation head.

``python -m vosgan.segment --checkpoint CKPT --input VIDEO|FRAMES_DIR|DAVIS_ROOT --out DIR``

Protocol (:func:`segment_frames`):

1. Frames are resized (bilinear, antialiased) so the short side is the model size ``S``, as in
   training (short-side resize, then a square crop), and covered by ``S x S`` tiles along the
   long side (start stride ``S/2``, the last tile flush with the edge), so every pixel is seen
   at the scale the model was trained at (``fit="squash"`` instead resizes the whole frame to
   ``S x S``, aspect ratio not kept).
2. Windows of ``T`` frames (``T`` = the model's clip length) start every ``T/2`` frames, the last
   one flush with the final frame. D (in eval mode) gives per-pixel foreground probabilities
   for each window and tile; overlapping predictions are averaged (uniform weights).
3. The averaged map is upsampled (bilinear) to the frame size; ``> threshold`` is foreground.

Sequences shorter than ``T`` are padded by repeating their last frame; the padded frames'
predictions are dropped. Outputs per sequence: ``DIR/<seq>/masks/<frame stem>.png`` (0/255) and
``DIR/<seq>/overlay.mp4`` + ``overlay.gif`` (mask tinted red over the frames; the GIF is
downscaled to 320 pixels on its long side), each file written atomically. A DAVIS-layout root is
processed sequence by sequence (one sub-folder each).

A sequence folder whose ``masks/`` already holds PNG files (an earlier run) is refused before
any work, since masks of frames this run does not have would stay beside the new ones;
``--overwrite`` first deletes that run's outputs (``masks/*.png``, and ``overlay.mp4`` /
``overlay.gif`` with ``--no-video``) and nothing else.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from vosgan import cli
from vosgan.evaluate import load_models, predict
from vosgan.models import Discriminator
from vosgan.viz import write_video

FITS = ("tiles", "squash")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def window_starts(n: int, length: int, stride: int) -> list[int]:
    """Starts of windows of ``length`` over ``n`` items, every ``stride``, the last flush with
    the end (``[0]`` when ``n <= length``)."""
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be >= 1, got {length}, {stride}")
    if n <= length:
        return [0]
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] != n - length:
        starts.append(n - length)
    return starts


def working_size(height: int, width: int, size: int, fit: str = "tiles") -> tuple[int, int]:
    """``(h, w)`` the frames are resized to: short side ``size`` (tiles) or ``size x size``."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "squash":
        return size, size
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def resize_frames(frames: np.ndarray, hw: tuple[int, int], chunk: int = 16) -> Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(3, N, h, w)`` in [-1, 1] (bilinear, antialiased)."""
    out = torch.empty(3, frames.shape[0], *hw)
    for i in range(0, frames.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + chunk])).permute(0, 3, 1, 2)
        x = F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False, antialias=True)
        out[:, i : i + chunk] = (x / 127.5 - 1.0).clamp(-1, 1).transpose(0, 1)
    return out


def upsample(prob: Tensor, hw: tuple[int, int], chunk: int = 16) -> np.ndarray:
    """``(N, h, w)`` probabilities -> float32 numpy ``(N, H, W)`` (bilinear)."""
    out = np.empty((prob.shape[0], *hw), np.float32)
    for i in range(0, prob.shape[0], chunk):
        up = F.interpolate(
            prob[i : i + chunk, None].float(), size=hw, mode="bilinear", align_corners=False
        )
        out[i : i + chunk] = up[:, 0].clamp(0, 1).cpu().numpy()
    return out


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (N, H, W, 3) with N >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


@torch.no_grad()
def segment_frames(
    D: Discriminator,
    frames: np.ndarray,
    frames_per_window: int,
    size: int,
    stride: int | None = None,
    fit: str = "tiles",
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """Foreground probability per pixel and frame from D's segmentation head.

    Args:
        D: the discriminator; run in eval mode (its mode is restored), on its own device.
        frames: uint8 ``(N, H, W, 3)`` RGB, any ``N >= 1`` (short sequences: module docstring).
        frames_per_window: ``T``, the clip length D was trained on (``cfg.model.frames``).
        size: ``S``, the model resolution (``cfg.model.size``).
        stride: window start stride (default ``T // 2``).
        fit: ``"tiles"`` or ``"squash"`` (module docstring).
        batch_size: clips per D forward.
        progress: show a tqdm bar over the D forwards.

    Returns:
        float32 ``(N, H, W)`` in [0, 1].
    """
    frames = _check_frames(frames)
    cfg = getattr(D, "cfg", None)
    if cfg is not None and (cfg.size, cfg.frames) != (size, frames_per_window):
        raise ValueError(
            f"the discriminator was built for {cfg.frames} frames of "
            f"{cfg.size}x{cfg.size} (model.frames, model.size), but size={size}, "
            f"frames_per_window={frames_per_window} were requested"
        )
    t = frames_per_window
    stride = max(1, t // 2) if stride is None else stride
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, height, width = frames.shape[:3]
    hw = working_size(height, width, size, fit)
    video = resize_frames(frames, hw)  # (3, N, h, w) on the CPU
    device = next(D.parameters()).device
    acc = torch.zeros(n, *hw, device=device)
    cnt = torch.zeros(n, *hw, device=device)
    jobs = [
        (s, y, x)
        for s in window_starts(n, t, stride)
        for y in window_starts(hw[0], size, size // 2)
        for x in window_starts(hw[1], size, size // 2)
    ]
    was_training = D.training
    D.eval()
    try:
        bar = tqdm(
            total=len(jobs),
            desc="segment",
            unit="clip",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i : i + batch_size]
            idx = [torch.arange(s, s + t).clamp_(max=n - 1) for s, _, _ in batch]
            clips = torch.stack(
                [
                    video[:, ix, y : y + size, x : x + size]
                    for ix, (_, y, x) in zip(idx, batch, strict=True)
                ]
            )
            seg = predict(D, clips.to(device), flow=False)["seg"][:, 0]  # (B, T, S, S)
            for k, (s, y, x) in enumerate(batch):
                keep = min(t, n - s)  # drop the predictions of padded frames
                acc[s : s + keep, y : y + size, x : x + size] += seg[k, :keep]
                cnt[s : s + keep, y : y + size, x : x + size] += 1
            bar.update(len(batch))
        bar.close()
    finally:
        D.train(was_training)
    return upsample(acc / cnt, (height, width))


def overlay(frames: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Tint ``masks`` (bool ``(N, H, W)``) red over ``frames`` (uint8 ``(N, H, W, 3)``)."""
    out = frames.astype(np.float32)
    red = np.array([255.0, 0.0, 0.0], np.float32)
    out[masks] = (1 - alpha) * out[masks] + alpha * red
    return (out + 0.5).astype(np.uint8)


def _downscale(frames: np.ndarray, longest: int) -> np.ndarray:
    h, w = frames.shape[1:3]
    scale = longest / max(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


def earlier_outputs(out_dir: Path) -> list[Path]:
    """The files an earlier run left in the sequence folder ``out_dir``: ``masks/*.png`` and
    ``overlay.mp4`` / ``overlay.gif`` (what :func:`write_outputs` writes, nothing else)."""
    owned = [out_dir / "overlay.mp4", out_dir / "overlay.gif"]
    return sorted((out_dir / "masks").glob("*.png")) + [p for p in owned if p.is_file()]


def write_outputs(
    out_dir: Path,
    frames: np.ndarray,
    masks: np.ndarray,
    stems: list[str],
    fps: int = 8,
    videos: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``masks/<stem>.png`` (0/255) per frame and ``overlay.mp4`` / ``overlay.gif``, each
    file atomically (:func:`vosgan.cli.write_atomic`).

    Args:
        out_dir: the sequence's folder (created).
        frames: uint8 ``(N, H, W, 3)``; masks: bool ``(N, H, W)``; stems: ``N`` file stems.
        overwrite: delete an earlier run's outputs first (:func:`earlier_outputs`); without it
            a ``masks/`` folder holding PNG files is an error (its stale masks would stay).

    Raises:
        FileExistsError: ``masks/`` holds PNG files and ``overwrite`` is False (named).
    """
    mask_dir = out_dir / "masks"
    earlier = earlier_outputs(out_dir)
    if any(p.parent == mask_dir for p in earlier) and not overwrite:
        raise FileExistsError(
            f"{mask_dir} already holds masks of an earlier run; pass --overwrite to replace "
            "them, or choose another --out"
        )
    for path in earlier if overwrite else []:
        path.unlink()
    mask_dir.mkdir(parents=True, exist_ok=True)
    for stem, m in zip(stems, masks, strict=True):
        png = io.BytesIO()
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(png, format="PNG")
        cli.write_atomic(mask_dir / f"{stem}.png", png.getvalue(), fsync=False)  # one a frame
    written = [mask_dir]
    if videos:
        tinted = overlay(frames, masks)
        write_video(out_dir / "overlay.mp4", tinted, fps=fps)
        write_video(out_dir / "overlay.gif", _downscale(tinted, 320), fps=fps)
        written += [out_dir / "overlay.mp4", out_dir / "overlay.gif"]
    return written


Loader = Callable[[], tuple[np.ndarray, list[str]]]


def find_inputs(path: str | Path) -> list[tuple[str, Loader]]:
    """``(name, load)`` per sequence of ``path`` (a video file, a frame folder, or a DAVIS-layout
    root read by :mod:`vosgan.data`); ``load()`` reads its frames, uint8 ``(N, H, W, 3)``, and
    their stems. The names come first, so outputs can be checked before any frame is read."""
    from vosgan.data.decode import read_video
    from vosgan.data.frames import find_sequences, load_frames

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(
                f"--input {path}: not a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder"
            )

        def load_video() -> tuple[np.ndarray, list[str]]:
            frames = read_video(path)
            return frames, [f"{i:05d}" for i in range(len(frames))]

        return [(path.stem, load_video)]
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    seqs = find_sequences(path, incomplete_masks="warn")  # segmenting reads frames only
    return [(s.name, lambda s=s: (load_frames(s), [p.stem for p in s.frames])) for s in seqs]


def iter_inputs(path: str | Path) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """``(name, frames uint8 (N, H, W, 3), frame stems)`` per sequence (:func:`find_inputs`)."""
    for name, load in find_inputs(path):
        yield name, *load()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.segment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--input", required=True, help="video file, frame folder or DAVIS root")
    p.add_argument(
        "--out", required=True, type=cli.out_dir, help="output folder (one sub-folder per sequence)"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="foreground if prob > this")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="model resolution; must equal the checkpoint's model.size (default)",
    )
    p.add_argument(
        "--stride", type=cli.int_at_least(1), default=None, help="window stride (default T/2)"
    )
    p.add_argument(
        "--fit",
        choices=FITS,
        default="tiles",
        help="tiles: short side to the model size, S x S tiles (default); squash: whole frame "
        "resized to S x S",
    )
    p.add_argument(
        "--batch-size", type=cli.int_at_least(1), default=8, help="clips per D forward (8)"
    )
    p.add_argument(
        "--fps", type=cli.int_at_least(1), default=8, help="overlay video frame rate (8)"
    )
    p.add_argument("--no-video", action="store_true", help="write the PNG masks only")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's outputs in --out (its masks/*.png and overlays); without "
        "it a sequence folder already holding masks is an error",
    )
    cli.add_device(p)
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold < 1.0:
        print(f"error: --threshold must be in [0, 1), got {args.threshold}", file=sys.stderr)
        return 2
    try:
        cfg, _, D, _ = load_models(args.checkpoint, args.device)
        size = cfg.model.size
        if args.size is not None and args.size != size:
            raise ValueError(
                f"--size {args.size} differs from the checkpoint's resolution "
                f"(model.size={size}); omit --size to use it"
            )
        inputs = find_inputs(args.input)
        taken = [
            str(args.out / name / "masks")
            for name, _ in inputs
            if any((args.out / name / "masks").glob("*.png"))
        ]
        if taken and not args.overwrite:
            raise FileExistsError(
                f"--out: {', '.join(taken)} already hold{'s' if len(taken) == 1 else ''} masks "
                "of an earlier run (stale ones would stay beside the new); pass --overwrite to "
                "replace them, or choose another --out"
            )
        bar = tqdm(inputs, desc="sequences", unit="seq", dynamic_ncols=True)
        for name, load in bar:
            bar.set_postfix_str(name)
            frames, stems = load()
            prob = segment_frames(
                D,
                frames,
                cfg.model.frames,
                size,
                stride=args.stride,
                fit=args.fit,
                batch_size=args.batch_size,
                progress=True,
            )
            write_outputs(
                args.out / name,
                frames,
                prob > args.threshold,
                stems,
                fps=args.fps,
                videos=not args.no_video,
                overwrite=args.overwrite,
            )
            tqdm.write(f"{name}: {len(stems)} frames -> {args.out / name}")
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
