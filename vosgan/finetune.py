"""Action recognition with the discriminator's features: a linear head on D's encoder.

``python -m vosgan.finetune --checkpoint CKPT --data UCF_ROOT [--mode frozen|finetune]
[--split 1] [--epochs E] --out DIR``

The classifier is D's 3D encoder (:meth:`vosgan.models.Discriminator.encode`), global average
pooling over ``T x H x W`` of the last stage (``--features all``: of every stage, concatenated),
a BatchNorm without affine parameters (feature standardisation, as in linear probing) and a
linear layer. ``frozen``: D is fixed (eval mode, no gradients); features of every clip are
computed once and only the head trains. ``finetune``: encoder and head train together (encoder
learning rate ``--encoder-lr``). Clips have the checkpoint's frame count and resolution.

Data: UCF-101 layout (``ROOT/<Class>/*.avi``) with its split files (``classInd.txt``,
``trainlistNN.txt``, ``testlistNN.txt``, ``NN = --split``, in ROOT or ``ROOT/ucfTrainTestlist``),
read by :mod:`vosgan.data.build` (one labelling for both lists: ``classInd.txt``, else the train
list's ids, else the sorted class folders); the head trains on the train list only and top-1
accuracy is measured on the test list only, ``--test-clips`` clips per test video with their
logits averaged.
Clip sampling follows the checkpoint's ``data`` config, overridable with ``--data.key=value``
(``--data.stride=2``, ``--data.fps=12.5``, ``--data.flip=true`` for training clips, ...).
Writes ``DIR/result.json`` (accuracy and protocol),
``DIR/predictions.csv`` (one row per test video) and ``DIR/head.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vosgan import checkpoint, cli
from vosgan import config as config_mod
from vosgan.config import Config, ConfigError
from vosgan.evaluate import d_weights, load_models
from vosgan.finetune_model import (
    ActionClassifier,
    embed_all,
    predict_videos,
    stage_out_channels,
    train_finetune,
    train_frozen,
)
from vosgan.train import amp_dtype


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--data", required=True, help="UCF-101 layout root (class folders + lists)")
    p.add_argument("--out", required=True, type=cli.out_dir, help="output folder")
    p.add_argument(
        "--mode",
        default="frozen",
        choices=("frozen", "finetune"),
        help="frozen: train the head on fixed D features (default); finetune: encoder too",
    )
    p.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="UCF-101 split")
    p.add_argument(
        "--features",
        default="last",
        choices=("last", "all"),
        help="pool the last encoder stage (default) or every stage, concatenated",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 30 (frozen: cheap, features are cached) / 5 (finetune)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="clips per step (16)")
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (AdamW)")
    p.add_argument("--encoder-lr", type=float, default=1e-4, help="finetune mode only")
    p.add_argument(
        "--weight-decay", type=cli.finite_float(0), default=1e-4, help="AdamW weight decay"
    )
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the linear layer")
    p.add_argument("--train-clips", type=int, default=1, help="clips per train video (per epoch)")
    p.add_argument("--test-clips", type=int, default=1, help="clips per test video, averaged")
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "off", "bf16", "fp16"),
        help="as train.amp: auto = bf16 on CUDA, off on CPU; fp16 needs CUDA",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="head initialisation, dropout and batch order"
    )
    cli.add_device(p)
    args, rest = p.parse_known_args(argv)
    args.overrides = config_mod.parse_overrides(rest)
    bad = [k for k in args.overrides if not k.startswith("data.")]
    if bad:
        raise ConfigError(f"only --data.* overrides apply here (clip sampling), got {bad}")
    if args.epochs is None:
        args.epochs = 30 if args.mode == "frozen" else 5
    for flag, value, low in (
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 2),
        ("--train-clips", args.train_clips, 1),
        ("--test-clips", args.test_clips, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--lr", args.lr), ("--encoder-lr", args.encoder_lr)):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if not 0 <= args.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.amp == "fp16" and args.device.type != "cuda":
        raise ConfigError(f"--amp fp16 needs a CUDA device, got --device {args.device}")
    return args


def class_names(root: str, num_labels: int, split_list: str = "auto") -> list[str]:
    """Names (lower-cased) of labels ``0 .. max(num_labels, classes) - 1``, by the one labelling
    of every split, :func:`vosgan.data.build.class_index` (``classInd.txt``, else the train
    list's ids, else the sorted class folders that hold videos); a label without a class is
    named by its number."""
    from vosgan.data.build import class_index

    index = {k: c for c, k in class_index(root, split_list).items()}
    return [index.get(k, str(k)) for k in range(max(num_labels, max(index, default=-1) + 1))]


def check_classes(root: str, split: int, train: list[int], test: list[int]) -> list[str]:
    """The class names of ``root`` (:func:`class_names`) once the train and test video labels of
    split ``split`` can be learnt and scored: every video has a label, the train videos span at
    least 2 classes and every test class has train videos. Errors name ``--data`` and the split.
    """
    for name, labels in (("train", train), ("test", test)):
        if not labels or min(labels) < 0:
            raise ValueError(
                f"--data {root}: the {name} videos of split {split} have no class labels "
                "(expected one folder per class, or labels in the split list)"
            )
    names = class_names(root, max(train + test) + 1, str(split))
    classes = sorted({names[k] for k in train})
    if len(classes) < 2:
        raise ValueError(
            f"--data {root}: the train videos of split {split} are all of class {classes}; "
            "action recognition needs videos of at least 2 classes"
        )
    missing = sorted(set(test) - set(train))
    if missing:
        raise ValueError(
            f"--data {root}: test classes {[names[k] for k in missing][:5]} of split {split} "
            "have no training video"
        )
    return names


def clip_datasets(
    cfg: Config, root: str, split: int, train_clips: int, test_clips: int, epochs: int
) -> tuple[Any, Any, list[Any], list[str]]:
    """Train and test clip datasets of a UCF-101 layout root, with the lists of split ``split``.

    The train dataset holds ``epochs * train_clips`` clips per video (epoch ``e`` reads clips
    ``[e * N, (e + 1) * N)``: new seeded start frames, crops and flips every epoch, still a pure
    function of the index); the test dataset ``test_clips`` per video
    (:meth:`vosgan.data.video.ClipDataset.video_of` maps a clip to its video). Returns the
    datasets, the test videos (``Item``s of ``test.usable``, in that order) and the class names
    (:func:`check_classes`, checked on the split lists before any video is probed).
    """
    from vosgan.data.build import labelled_videos, layout, make_dataset

    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder (expected a UCF-101 layout root)")
    if layout(root, "--data") == "videos":  # cheap: lists and folders, no video opened
        check_classes(
            root,
            split,
            [y for _, y in labelled_videos(root, "train", str(split))],
            [y for _, y in labelled_videos(root, "test", str(split))],
        )
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, source=root, split_list=str(split))
    )
    train = make_dataset(cfg, "train", 1)
    test = make_dataset(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, flip=False)), "test", 1
    )
    # again on the videos left after probing (short=skip and unreadable files drop some)
    names = check_classes(
        root,
        split,
        [train.items[k].label for k in train.usable],
        [test.items[k].label for k in test.usable],
    )
    # every video serves once per pass over the videos: V clips per pass
    train.num_clips = epochs * train_clips * len(train.usable)
    test.num_clips = test_clips * len(test.usable)
    return train, test, [test.items[k] for k in test.usable], names


def run(args: argparse.Namespace) -> tuple[dict[str, Any], ActionClassifier]:
    """Train and test; writes the output folder and returns ``(result, model)``."""
    device = args.device
    torch.manual_seed(args.seed)
    cfg, _, D, ckpt = load_models(args.checkpoint, device)
    cfg = config_mod.apply_overrides(cfg, args.overrides)
    dtype = amp_dtype(args.amp, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    epochs_in_data = 1 if args.mode == "frozen" else args.epochs
    train, test, videos, names = clip_datasets(
        cfg, args.data, args.split, args.train_clips, args.test_clips, epochs_in_data
    )
    rows = list(test.usable)  # the videos of the predictions, as built (a read may drop one)
    model = ActionClassifier(D, len(names), args.features, args.dropout).to(device)
    t0 = time.perf_counter()
    if args.mode == "frozen":
        losses, steps = train_frozen(model, train, args, device, autocast)
    else:
        losses, steps = train_finetune(model, train, args, device, dtype)
    logits, labels = predict_videos(model, test, rows, device, args.batch_size, autocast)
    if len(test.usable) < len(videos):
        warnings.warn(
            f"{len(videos) - len(test.usable)} test video(s) failed to decode; their "
            "clips came from the next usable video (see the warnings above)",
            UserWarning,
            stacklevel=2,
        )
    pred = logits.argmax(1)
    correct = pred == labels
    top5 = (logits.topk(min(5, len(names)), 1).indices == labels[:, None]).any(1)
    per_class = {
        names[k]: float(correct[labels == k].float().mean()) for k in sorted(set(labels.tolist()))
    }
    train_videos = len(train.usable)
    result = {
        "top1": float(correct.float().mean()),
        "top5": float(top5.float().mean()) if len(names) > 5 else None,
        "mean_class_accuracy": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "train_loss": losses,
        "protocol": {
            "mode": args.mode,
            "features": args.features,
            "feature_dim": model.dim,
            "split": args.split,
            "classes": len(names),
            "train_videos": train_videos,
            "test_videos": len(videos),
            "train_steps": steps,
            "train_clips_per_video": args.train_clips,
            "test_clips_per_video": args.test_clips,
            "frames": cfg.model.frames,
            "resolution": [cfg.model.size, cfg.model.size],
            "epochs": args.epochs,
            "lr": args.lr,
            "encoder_lr": args.encoder_lr if args.mode == "finetune" else None,
            "batch_size": args.batch_size,
            "amp": str(dtype).replace("torch.", "") if dtype else "off",
            "data": args.data,
            "data_overrides": args.overrides,
            "checkpoint": ckpt["path"],
            "checkpoint_step": ckpt["step"],
            "d_weights": d_weights(ckpt),  # D's encoder from its moving average where kept
            "seed": args.seed,
            "device": str(device),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cli.write_json(out / "result.json", result)  # each file whole or not at all
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["video", "label", "predicted", "correct"])
    root = Path(args.data).resolve()
    for it, y, p in zip(videos, labels.tolist(), pred.tolist(), strict=True):
        path = Path(it.name).resolve()
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else it.name
        w.writerow([rel, names[y], names[p], int(y == p)])
    cli.write_atomic(out / "predictions.csv", table.getvalue())
    state = {
        "head": model.head.state_dict(),
        "classes": names,
        "features": args.features,
        "mode": args.mode,
        "checkpoint": ckpt["path"],
        "config": cfg.to_dict(),
    }
    if args.mode == "finetune":
        state["encoder"] = model.D.encoder.state_dict()
    checkpoint.save_atomic(state, out / "head.pt")
    return result, model


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result, _ = run(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"top-1 accuracy {result['top1']:.4f} on {result['protocol']['test_videos']} test "
        f"videos of split {result['protocol']['split']} ({result['protocol']['mode']}); "
        f"wrote {args.out / 'result.json'}"
    )
    return 0


__all__ = [
    "ActionClassifier",
    "check_classes",
    "class_names",
    "clip_datasets",
    "embed_all",
    "predict_videos",
    "run",
    "stage_out_channels",
]


if __name__ == "__main__":
    raise SystemExit(main())
