"""FVD / KVD (/ IS) of a checkpoint's generator against real clips, with a user-supplied extractor.

``python -m vosgan.fvd --checkpoint CKPT --extractor FILE.pt --data PATH|synthetic --num N
--out DIR``

Generates ``N`` videos with G (eval mode, latents from a generator seeded by ``--seed``), takes
``--num-real`` (default ``N``) real clips of ``--split`` from ``--data`` at the checkpoint's
resolution and frame count, runs both through the extractor and writes ``DIR/metrics.json``:
the metrics and the protocol they were measured under (clip counts, frames, resolutions, split,
extractor file and SHA-256, its input convention, checkpoint and step).

Extractor contract (a TorchScript file, ``torch.jit.load``; nothing is downloaded): it is called
as ``extractor(x, **EXTRACTOR_KWARGS)`` with ``x`` float32 ``(B, 3, T, S, S)``, where ``S`` is
``--extractor-size`` (each frame's short side resized bilinearly to S, centre-cropped) and the
values are in ``--extractor-range`` (default [-1, 1]); it returns ``(B, D)`` features (a tuple's
first element is used; extra dims are flattened). For the I3D TorchScript used by StyleGAN-V and
common FVD code (Kinetics-400, 400-d pre-softmax features): ``--extractor-size 224
--extractor-range=[-1,1] --extractor-kwargs '{"rescale": false, "resize": false,
"return_features": true}'``. T is the checkpoint's frame count (16 at cpu-small, 32 at paper).
``--classifier FILE.pt`` (same input contract, ``--classifier-kwargs``) returns class logits
(or probabilities with ``--classifier-output probs``) for IS on the generated videos.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from vosgan import cli
from vosgan.checkpoint import sha256_file
from vosgan.config import Config, ConfigError
from vosgan.data.build import make_dataset
from vosgan.data.synthetic import SPLITS
from vosgan.evaluate import load_models
from vosgan.models import Generator
from vosgan.video_metrics import (
    ExtractorError,
    frechet_distance_from_features,
    inception_score,
    kernel_distance,
    load_torchscript,
    prepare_clips,
    run_model,
)

RANGES = ("[-1,1]", "[0,1]", "[0,255]")


def real_dataset(cfg: Config, data: str, split: str, num: int) -> Any:
    """``num`` real clips of ``split`` at the checkpoint's frame count and resolution.

    ``data`` is ``"synthetic"`` or a path that :func:`vosgan.data.build.make_dataset` reads
    (video folders, UCF-101 layout with split lists, frame folders, a prepared cache); clip
    sampling (stride, fps, short-video policy, crop) follows the checkpoint's ``data`` config.
    """
    if data != "synthetic" and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {sorted(SPLITS)}, got {split!r}")
    # no augmentation of the reference clips; the synthetic cache is never worth it here
    d = dataclasses.replace(cfg.data, source=data, flip=False, cache=False)
    return make_dataset(dataclasses.replace(cfg, data=d), split, num, masks=False)  # videos only


def _real_batches(dataset: Any, num: int, batch: int) -> Iterator[Tensor]:
    for start in range(0, num, batch):
        yield dataset.batch(list(range(start, min(start + batch, num))))["video"]


@torch.no_grad()
def _fake_batches(G: Generator, num: int, batch: int, seed: int) -> Iterator[Tensor]:
    device = next(G.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, num, batch):
        yield G(*G.sample_latents(min(batch, num - start), device, generator=gen)).video


def extract(
    batches: Iterator[Tensor],
    models: dict[str, tuple[Callable[[Tensor], Tensor], str]],
    total: int,
    desc: str,
) -> dict[str, np.ndarray]:
    """Run every model on every batch; ``{name: (N, D) float64}``.

    ``models`` maps a name to ``(fn, source)``; ``source`` (e.g. ``--extractor FILE``) names the
    model when it returns NaN or Inf for these (``desc``) clips.
    """
    out: dict[str, list[Tensor]] = {k: [] for k in models}
    with tqdm(total=total, desc=desc, unit="clip", dynamic_ncols=True) as bar:
        for video in batches:
            for name, (fn, source) in models.items():
                values = fn(video)
                if not torch.isfinite(values).all():
                    raise ExtractorError(f"{source} returned NaN/Inf values for the {desc} clips")
                out[name].append(values)
            bar.update(video.shape[0])
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def _json_arg(flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} must be a JSON object, got {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.fvd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--extractor", default=None, help="TorchScript feature extractor (.pt); required"
    )
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset path")
    p.add_argument("--split", default="train", help="split of --data the real clips come from")
    p.add_argument("--num", type=int, default=2048, help="generated videos")
    p.add_argument("--num-real", type=int, default=None, help="real clips (default: --num)")
    p.add_argument("--out", required=True, type=cli.out_dir, help="output folder (metrics.json)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per forward (16)")
    p.add_argument("--seed", type=int, default=0, help="latent seed of the generated videos")
    cli.add_device(p)
    p.add_argument("--extractor-size", type=int, default=224, help="input side S; 0 = as is (224)")
    p.add_argument(
        "--extractor-range",
        default="[-1,1]",
        choices=RANGES,
        help="value range the extractor and classifier expect (default [-1,1])",
    )
    p.add_argument("--extractor-kwargs", default="{}", help="JSON keyword arguments")
    p.add_argument("--classifier", default=None, help="TorchScript classifier for IS (.pt)")
    p.add_argument("--classifier-kwargs", default="{}", help="JSON keyword arguments")
    p.add_argument(
        "--classifier-output",
        default="logits",
        choices=("logits", "probs"),
        help="what --classifier returns: logits (default) or class probabilities",
    )
    p.add_argument(
        "--is-splits", type=int, default=10, help="IS: mean and std over this many splits (10)"
    )
    p.add_argument("--kvd-subsets", type=int, default=100, help="KVD random subsets (100)")
    p.add_argument("--kvd-subset-size", type=int, default=1000, help="clips per KVD subset (1000)")
    p.add_argument("--save-features", action="store_true", help="also write DIR/features.npz")
    args = p.parse_args(argv)
    args.num_real = args.num if args.num_real is None else args.num_real
    for flag, value, low in (
        ("--num", args.num, 2),
        ("--num-real", args.num_real, 2),
        ("--batch-size", args.batch_size, 1),
        ("--extractor-size", args.extractor_size, 0),
        ("--kvd-subsets", args.kvd_subsets, 1),
        ("--kvd-subset-size", args.kvd_subset_size, 2),
        ("--is-splits", args.is_splits, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.classifier and args.num < 2 * args.is_splits:  # a split of one sample scores IS 1
        raise ConfigError(
            f"--is-splits {args.is_splits} needs --num >= {2 * args.is_splits} (at least 2 "
            f"generated videos per IS split), got --num {args.num}"
        )
    args.extractor_kwargs = _json_arg("--extractor-kwargs", args.extractor_kwargs)
    args.classifier_kwargs = _json_arg("--classifier-kwargs", args.classifier_kwargs)
    return args


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Load everything, extract features, compute the metrics; returns the result dict."""
    device = args.device
    extractor = load_torchscript(args.extractor, "--extractor", device)  # fail before G runs
    classifier = (
        load_torchscript(args.classifier, "--classifier", device) if args.classifier else None
    )
    cfg, G, _, ckpt = load_models(args.checkpoint, device)
    G.eval()
    size = args.extractor_size or None

    def wrap(model: torch.nn.Module, kwargs: dict[str, Any], flag: str) -> Callable:
        def fn(video: Tensor) -> Tensor:
            x = prepare_clips(video.to(device), size, args.extractor_range)
            return run_model(model, x, kwargs, flag)

        return fn

    feat = {
        "features": (
            wrap(extractor, args.extractor_kwargs, "--extractor"),
            f"--extractor {args.extractor}",
        )
    }
    dataset = real_dataset(cfg, args.data, args.split, args.num_real)
    num_real = len(dataset)
    # distinct real videos behind the clips (clip i comes from video i % V)
    real_videos = len(dataset.usable) if hasattr(dataset, "usable") else num_real
    t0 = time.perf_counter()
    real = extract(_real_batches(dataset, num_real, args.batch_size), feat, num_real, "real")
    fake_models = dict(feat)
    if classifier is not None:
        fake_models["logits"] = (
            wrap(classifier, args.classifier_kwargs, "--classifier"),
            f"--classifier {args.classifier}",
        )
    fake = extract(
        _fake_batches(G, args.num, args.batch_size, args.seed), fake_models, args.num, "generated"
    )
    fr, ff = real["features"], fake["features"]
    clips = min(len(fr), len(ff))
    if args.kvd_subset_size >= clips:
        warnings.warn(
            f"--kvd-subset-size {args.kvd_subset_size} >= {clips} clips (the smaller of "
            f"--num {args.num} and the {len(fr)} real clips): every KVD subset holds all of "
            "them, so kvd_std measures only the resampling of the larger set (0 when both are "
            "equal); pass a smaller --kvd-subset-size for a spread over subsets",
            UserWarning,
            stacklevel=2,
        )
    kvd, kvd_std, subset = kernel_distance(ff, fr, args.kvd_subsets, args.kvd_subset_size)
    metrics: dict[str, Any] = {
        "fvd": frechet_distance_from_features(ff, fr),
        "kvd": kvd,
        "kvd_std": kvd_std,
    }
    if classifier is not None:
        probs = args.classifier_output == "probs"
        try:
            is_mean, is_std = inception_score(fake["logits"], args.is_splits, probabilities=probs)
        except ValueError as exc:
            if not probs:
                raise
            raise ExtractorError(
                f"--classifier {args.classifier} with --classifier-output probs: {exc}; "
                "pass --classifier-output logits if it returns logits"
            ) from exc
        metrics.update(is_mean=is_mean, is_std=is_std)
    frames, res = cfg.model.frames, cfg.model.size
    protocol = {
        "num_generated": args.num,
        "num_real": num_real,
        "real_videos": real_videos,
        "frames": frames,
        "resolution": [res, res],
        "data": args.data,
        "split": args.split,
        "generator_seed": args.seed,
        "generator_mode": "eval",
        "checkpoint": ckpt["path"],
        "checkpoint_step": ckpt["step"],
        "preset": cfg.preset,
        "extractor": str(Path(args.extractor).resolve()),
        "extractor_sha256": sha256_file(args.extractor),
        "extractor_input": {
            "shape": ["B", 3, frames, size or res, size or res],
            "range": args.extractor_range,
            "resize": "short side bilinear + centre crop" if size else "none",
            "kwargs": args.extractor_kwargs,
        },
        "feature_dim": int(fr.shape[1]),
        # N <= feature_dim: singular covariance, FVD comparable only at equal N (a warning too)
        "covariance_full_rank": min(len(fr), len(ff)) > fr.shape[1],
        "kvd": {
            "kernel": "(x.y/d + 1)^3",
            "estimator": "unbiased MMD^2",
            "subsets": args.kvd_subsets,
            "subset_size": subset,
        },
        "dtype": "float32 features, float64 statistics",
        "device": str(device),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if classifier is not None:
        protocol.update(
            classifier=str(Path(args.classifier).resolve()),
            classifier_sha256=sha256_file(args.classifier),
            classifier_kwargs=args.classifier_kwargs,
            classifier_output=args.classifier_output,
            is_splits=args.is_splits,
        )
    result = {"metrics": metrics, "protocol": protocol}
    if args.save_features:  # written first: metrics.json marks a finished run
        arrays = {"real": fr, "generated": ff}
        arrays |= {"logits": fake["logits"]} if classifier is not None else {}
        cli.write_atomic(args.out / "features.npz", lambda fh: np.savez(fh, **arrays))
    cli.write_json(args.out / "metrics.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = evaluate(args)
    except (ConfigError, ExtractorError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m, pr = result["metrics"], result["protocol"]
    line = f"FVD {m['fvd']:.3f}  KVD {m['kvd']:.5f} (+-{m['kvd_std']:.5f})" + (
        f"  IS {m['is_mean']:.3f} (+-{m['is_std']:.3f})" if "is_mean" in m else ""
    )
    print(line)
    print(
        f"protocol: {pr['num_generated']} generated vs {pr['num_real']} real clips "
        f"({pr['data']}, split {pr['split']}), {pr['frames']} frames at "
        f"{pr['resolution'][0]}x{pr['resolution'][1]}, extractor input "
        f"{pr['extractor_input']['shape'][3]}px {pr['extractor_input']['range']}, "
        f"sha256 {pr['extractor_sha256'][:12]}"
    )
    print(f"wrote {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
