"""DAVIS J&F: the ``--davis`` mode of ``python -m vosgan.evaluate``.

``python -m vosgan.evaluate --davis ROOT [--checkpoint CKPT] --out DIR``: unsupervised video
object segmentation on every sequence with masks under ``ROOT`` (layouts:
:func:`vosgan.data.frames.find_sequences`): D's segmentation (:func:`vosgan.segment.segment_frames`)
and three baselines scored by the same code (:mod:`vosgan.davis_metrics`): J and F per sequence
(mean, recall, decay) and their means, printed and written to ``DIR/davis_jf.csv``,
``DIR/davis_jf.json`` and ``DIR/davis_protocol.md`` with the protocol card. Without
``--checkpoint`` only the baselines are scored. Baselines (nothing learned, nothing tuned):

- ``frame-difference``: :func:`vosgan.metrics.frame_difference_saliency` on the whole sequence
  at the working resolution (the model's input size), refined by colour as the checkpoint's D
  segmentation is (``model.seg_refine``; ``--unrefined`` turns it off for both), upsampled,
  ``> threshold``;
- ``all-foreground``: every pixel foreground;
- ``centre-prior``: a Gaussian centred in the frame whose 0.5 level set (the mask at the default
  threshold) is the ellipse with semi-axes W/4 and H/4 (the middle half of each axis, 19.6% of
  the frame), the same for every frame.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vosgan import checkpoint, cli
from vosgan import davis_metrics as dm
from vosgan.config import ModelConfig
from vosgan.data.frames import IMAGE_SUFFIXES, Sequence, find_sequences, load_frames, load_masks
from vosgan.evaluate import d_weights, load_models
from vosgan.metrics import frame_difference_saliency
from vosgan.models import Discriminator
from vosgan.refine import refine_segmentation
from vosgan.segment import resize_frames, segment_frames, upsample, working_size

BASELINES = ("frame-difference", "all-foreground", "centre-prior")
DEFAULT_SIZE = 64  # working resolution without a checkpoint: the paper preset's
MIN_SIZE = 8  # smallest --size: working frames at least 8 px on the short side
DEFAULT_OUT = "davis_eval"


def centre_prior(height: int, width: int) -> np.ndarray:
    """``(H, W)`` float32 Gaussian; its 0.5 level set is the ellipse with semi-axes W/4, H/4."""
    s = math.sqrt(2 * math.log(2))  # exp(-r^2 / 2) = 0.5 at r = s
    y = ((np.arange(height) + 0.5) - height / 2) / (height / 4) * s
    x = ((np.arange(width) + 0.5) - width / 2) / (width / 4) * s
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 2).astype(np.float32)


def baseline_probabilities(
    method: str,
    frames: np.ndarray,
    size: int,
    fit: str = "tiles",
    refine: ModelConfig | None = None,
) -> np.ndarray:
    """A baseline's foreground probability ``(N, H, W)`` float32 for uint8 ``(N, H, W, 3)``;
    with ``refine`` (the model's config) the frame difference is refined as D's segmentation is
    (:func:`vosgan.refine.refine_segmentation`, at the working size)."""
    n, h, w = frames.shape[:3]
    if method == "all-foreground":
        return np.ones((n, h, w), np.float32)
    if method == "centre-prior":
        return np.broadcast_to(centre_prior(h, w), (n, h, w))
    if method == "frame-difference":
        if n < 2:
            raise ValueError("the frame-difference baseline needs >= 2 frames")
        video = resize_frames(frames, working_size(h, w, size, fit))[None]
        saliency = frame_difference_saliency(video)
        if refine is not None:
            saliency = refine_segmentation(saliency, video, refine)
        return upsample(saliency[0, 0], (h, w))
    raise ValueError(f"unknown baseline {method!r}; choose from {BASELINES}")


def check_sequence(seq: Sequence) -> None:
    """Missing frames are errors: a gap in the numbering, or a mask without its frame."""
    stems = [p.stem for p in seq.frames]
    if all(st.isdigit() for st in stems):
        nums = [int(st) for st in stems]
        for a, b in zip(nums, nums[1:], strict=False):
            if b != a + 1:
                raise ValueError(
                    f"sequence {seq.name!r}: frame {a + 1} is missing (frame {a} is "
                    f"followed by {b}); DAVIS sequences are numbered without gaps"
                )
    if seq.masks:
        masks = {
            p.stem for p in seq.masks[0].parent.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        }
        extra = sorted(masks - set(stems))
        if extra:
            raise ValueError(
                f"sequence {seq.name!r}: masks {extra[:3]} have no frame in "
                f"{seq.frames[0].parent} (missing frame files?)"
            )


def evaluate_davis(
    root: str | Path,
    D: Discriminator | None = None,
    size: int = DEFAULT_SIZE,
    frames_per_window: int | None = None,
    threshold: float = 0.5,
    conv: str = "davis2016",
    fit: str = "tiles",
    stride: int | None = None,
    sequences: list[str] | None = None,
    max_frames: int | None = None,
    methods: tuple[str, ...] = BASELINES,
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """J&F of D (when given; method ``"model"``) and of ``methods`` on a DAVIS-style root.

    Returns:
        ``{"convention": name, "sequences": [names], "methods": {method: {"rows":
        [SequenceScore.as_row()], "mean": summarize(...), "per_frame": {seq: {"frames", "J",
        "F"}}}}}``.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if D is not None and frames_per_window is None:
        frames_per_window = D.cfg.frames
    c = dm.convention(conv)
    seqs = [s for s in find_sequences(root) if s.masks is not None]
    if sequences:
        missing = sorted(set(sequences) - {s.name for s in seqs})
        if missing:
            raise ValueError(f"--sequences: {missing} not found with masks under {root}")
        seqs = [s for s in seqs if s.name in sequences]
    if not seqs:
        raise ValueError(f"no sequence with masks under {root}")
    names = (("model",) if D is not None else ()) + tuple(methods)
    refine = D.cfg if D is not None else None  # the frame difference is refined as D's seg is
    scores: dict[str, list[dm.SequenceScore]] = {m: [] for m in names}
    sizes: dict[str, list[int]] = {}
    for seq in seqs:
        check_sequence(seq)
    for seq in tqdm(seqs, desc="davis", unit="seq", disable=not progress, dynamic_ncols=True):
        idx = list(range(min(len(seq), max_frames or len(seq))))
        frames, gt = load_frames(seq, indices=idx), load_masks(seq, indices=idx)
        sizes[seq.name] = list(gt.shape[1:])
        for m in names:
            if m == "model" and D is not None and frames_per_window is not None:
                prob = segment_frames(D, frames, frames_per_window, size, stride, fit)
            else:
                prob = baseline_probabilities(m, frames, size, fit, refine)
            scores[m].append(
                dm.evaluate_sequence(prob > threshold, gt, seq.name, c, backend=backend)
            )
    return {
        "convention": c.name,
        "sequences": [s.name for s in seqs],
        "frame_sizes": sizes,
        "methods": {
            m: {
                "rows": [s.as_row() for s in sc],
                "mean": dm.summarize(sc),
                "per_frame": {s.name: {"frames": s.frames, "J": s.j, "F": s.f} for s in sc},
            }
            for m, sc in scores.items()
        },
    }


_COLUMNS = ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay", "JF_mean")


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """Per-sequence and mean J/F rows of every method as plain text (or a markdown table)."""
    head = ["method", "sequence", "frames", *_COLUMNS]
    body = []
    for m, res in result["methods"].items():
        for row in [*res["rows"], {"sequence": "MEAN", "frames": "", **res["mean"]}]:
            body.append(
                [m, row["sequence"], str(row["frames"]), *(f"{row[k]:.3f}" for k in _COLUMNS)]
            )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            v.rjust(w) if i > 1 else v.ljust(w)
            for i, (v, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [head, *body]
    )


def protocol_card(protocol: dict[str, Any]) -> str:
    """The protocol as markdown bullet lines."""
    return "\n".join(f"- **{k}**: {v}" for k, v in protocol.items())


def write_davis_outputs(
    out: str | Path, result: dict[str, Any], protocol: dict[str, Any]
) -> list[Path]:
    """``davis_jf.csv`` (rows + MEAN per method), ``davis_jf.json``, ``davis_protocol.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "davis_jf.csv", out / "davis_jf.json", out / "davis_protocol.md"]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["method", "sequence", "frames", *_COLUMNS, "convention"])
    for m, res in result["methods"].items():
        for row in [*res["rows"], {"sequence": "MEAN", "frames": "", **res["mean"]}]:
            writer.writerow(
                [
                    m,
                    row["sequence"],
                    row["frames"],
                    *(f"{row[k]:.6f}" for k in _COLUMNS),
                    result["convention"],
                ]
            )
    cli.write_atomic(paths[0], table.getvalue())  # each file whole or not at all
    cli.write_json(paths[1], {"protocol": protocol, **result})
    cli.write_atomic(
        paths[2],
        "# DAVIS J&F\n\n## Protocol\n\n"
        + protocol_card(protocol)
        + "\n\n## Results\n\n"
        + format_table(result, markdown=True)
        + "\n",
    )
    return paths


def davis_protocol(
    root: str | Path,
    result: dict[str, Any],
    *,
    size: int,
    fit: str,
    frames_per_window: int | None,
    stride: int | None,
    threshold: float,
    conv: str,
    backend: str,
    max_frames: int | None,
    ckpt: dict[str, Any] | None,
    cfg: ModelConfig | None = None,
    average: bool = True,
) -> dict[str, Any]:
    """The protocol card: everything a reader needs to reproduce or compare the numbers."""
    radii = ", ".join(
        sorted({f"{w}x{h}: {dm.boundary_radius(h, w)}" for h, w in result["frame_sizes"].values()})
    )
    model = "none (baselines only)"
    refine = "none"
    if ckpt is not None:
        digest = checkpoint.sha256_file(ckpt["path"])
        model = (
            f"{ckpt['path']} (sha256 {digest}, step {ckpt['step']}, "
            f"model.size={size}, model.frames={frames_per_window}; D's weights: "
            + (
                "their moving average, D_ema)"
                if d_weights(ckpt, average) == "D_ema"
                else "as trained, D)"
            )
        )
        if cfg is not None and cfg.seg_refine > 0:
            refine = (
                f"D's segmentation and the frame difference averaged over similar colours "
                f"(model.seg_refine={cfg.seg_refine}, radius {cfg.seg_refine_radius} px at the "
                "working size)"
            )
    window = (
        "n/a"
        if frames_per_window is None
        else (
            f"T={frames_per_window} frames, stride {stride or max(1, frames_per_window // 2)} "
            "(last window flush with the end; shorter sequences padded with their last frame); "
            "overlaps averaged"
        )
    )
    return {
        "data": f"{root}: {len(result['sequences'])} sequences ({', '.join(result['sequences'])})"
        + (f", first {max_frames} frames of each" if max_frames else ""),
        "frames": dm.convention(conv).describe(),
        "measures": f"J = region IoU (both empty -> 1); F = boundary F-measure, seg2bmap "
        f"boundaries, disk tolerance ceil({dm.BOUND_TH} * diagonal) px ({radii}); "
        "per sequence mean, recall (> 0.5), decay (4 bins); dataset means over "
        f"sequences; F backend {dm.resolve_backend(backend)}",
        "resolution": f"working size: short side {size} px ({fit}), predictions upsampled "
        "(bilinear) to the frame size, scored against full-size masks",
        "window": window,
        "refinement": refine,
        "threshold": f"foreground if probability > {threshold}",
        "checkpoint": model,
        "baselines": ", ".join(m for m in result["methods"] if m != "model")
        + " (definitions: vosgan.davis_eval module docstring)",
        "software": f"vosgan, torch {torch.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run(args: argparse.Namespace) -> int:
    """``python -m vosgan.evaluate --davis``: score, print, write ``args.out``; 0 on success."""
    D, ckpt, frames = None, None, None
    size = args.size or DEFAULT_SIZE
    if args.checkpoint:
        cfg, _, D, ckpt = load_models(
            args.checkpoint, args.device, not args.unrefined, not args.trained_weights
        )
        if args.size is not None and args.size != cfg.model.size:
            raise ValueError(
                f"--size {args.size} differs from the checkpoint's resolution "
                f"(model.size={cfg.model.size}); omit --size to use it"
            )
        size, frames = cfg.model.size, cfg.model.frames
    sequences = args.sequences.split(",") if args.sequences else None
    result = evaluate_davis(
        args.davis,
        D,
        size,
        frames,
        args.threshold,
        args.frames,
        args.fit,
        args.stride,
        sequences,
        args.max_frames,
        backend=args.f_backend,
    )
    protocol = davis_protocol(
        args.davis,
        result,
        size=size,
        fit=args.fit,
        frames_per_window=frames,
        stride=args.stride,
        threshold=args.threshold,
        conv=args.frames,
        backend=args.f_backend,
        max_frames=args.max_frames,
        ckpt=ckpt,
        cfg=D.cfg if D is not None else None,
        average=not args.trained_weights,
    )
    print(protocol_card(protocol))
    print(format_table(result))
    paths = write_davis_outputs(args.out, result, protocol)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``--davis`` options of ``python -m vosgan.evaluate``; returns their group."""
    davis = p.add_argument_group("DAVIS J&F (--davis)")
    davis.add_argument("--davis", help="DAVIS-style root: score J&F on its sequences")
    davis.add_argument(
        "--out",
        type=cli.out_dir,
        default=None,
        help=f"folder for the CSV/JSON/card (default: {DEFAULT_OUT})",
    )
    davis.add_argument(
        "--frames",
        choices=sorted(dm.CONVENTIONS),
        default="davis2016",
        help="frame convention (default: davis2016, first and last excluded)",
    )
    davis.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="foreground where the probability is > this, in [0, 1) (default: 0.5)",
    )
    davis.add_argument(
        "--size",
        type=cli.int_at_least(MIN_SIZE),
        default=None,
        help=f"working resolution, >= {MIN_SIZE} (default: model.size, or {DEFAULT_SIZE})",
    )
    davis.add_argument(
        "--fit",
        choices=("tiles", "squash"),
        default="tiles",
        help="tiles: short side to --size, aspect kept (default); squash: --size x --size",
    )
    davis.add_argument(
        "--stride", type=cli.int_at_least(1), default=None, help="window stride (default T/2)"
    )
    davis.add_argument("--sequences", default=None, help="comma-separated subset")
    davis.add_argument(
        "--max-frames", type=cli.int_at_least(1), default=None, help="first N frames only"
    )
    davis.add_argument(
        "--f-backend",
        choices=dm.BACKENDS,
        default="auto",
        help="implementation of F's boundary matching (default: auto, the fastest available)",
    )
    return davis
