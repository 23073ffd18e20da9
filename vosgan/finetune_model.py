"""The action classifier of ``python -m vosgan.finetune`` and its training loops.

:class:`ActionClassifier` (D's 3D encoder, pooled features, a standardising BatchNorm and a
linear head); :func:`train_frozen` (features computed once, the head alone trains);
:func:`train_finetune` (encoder and head together); :func:`predict_videos` (logits averaged over
each test video's clips).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vosgan.models import Discriminator


class ActionClassifier(nn.Module):
    """D's encoder + global average pooling + BatchNorm1d(affine=False) + Linear.

    ``forward(x (B, 3, T, H, W) in [-1, 1]) -> logits (B, num_classes)``. D's decoder and heads
    are kept (so ``D`` stays whole) but unused; only ``D.encoder`` and ``head`` are trained.
    """

    def __init__(
        self, D: Discriminator, num_classes: int, features: str = "last", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if features not in ("last", "all"):
            raise ValueError(f"features must be 'last' or 'all', got {features!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.D, self.features = D, features
        widths = [stage_out_channels(s) for s in D.encoder]
        self.dim = widths[-1] if features == "last" else sum(widths)
        self.head = nn.Sequential(
            nn.BatchNorm1d(self.dim, affine=False),
            nn.Dropout(dropout),
            nn.Linear(self.dim, num_classes),
        )

    def embed(self, x: Tensor) -> Tensor:
        """Pooled encoder features ``(B, dim)``: :meth:`Discriminator.encode` + mean over THW."""
        feats = self.D.encode(x)
        if self.features == "last":
            return feats[-1].mean(dim=(2, 3, 4))
        return torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def stage_out_channels(stage: nn.Module) -> int:
    """Output channels of an encoder stage (its last Conv3d)."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv3d)]
    if not convs:
        raise ValueError(f"encoder stage {type(stage).__name__} has no Conv3d")
    return convs[-1].out_channels


def _batches(n: int, size: int, gen: torch.Generator | None) -> list[list[int]]:
    """Index batches over ``range(n)`` (shuffled with ``gen``); a last batch of 1 is merged."""
    order = torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))
    out = [order[i : i + size] for i in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1:  # BatchNorm1d in train mode needs >= 2 samples
        out[-2].extend(out.pop())
    return out


@torch.no_grad()
def embed_all(
    model: ActionClassifier,
    data: Any,
    device: torch.device,
    batch: int,
    autocast: contextlib.AbstractContextManager,
    desc: str,
) -> tuple[Tensor, Tensor]:
    """Frozen features ``(N, dim)`` float32 and labels ``(N,)`` of every clip of ``data``."""
    feats, labels = [], []
    for idx in tqdm(_batches(len(data), batch, None), desc=desc, unit="batch", dynamic_ncols=True):
        b = data.batch(idx)
        with autocast:
            feats.append(model.embed(b["video"].to(device)).float().cpu())
        labels.append(b["label"])
    return torch.cat(feats), torch.cat(labels)


def train_frozen(
    model: ActionClassifier,
    train_data: Any,
    args: argparse.Namespace,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> tuple[list[float], int]:
    """Fixed encoder: embed the train clips once, then fit the head on the features.

    Returns the mean loss per epoch and the number of optimiser steps.
    """
    for p in model.D.encoder.parameters():
        p.requires_grad_(False)
    model.D.eval()  # BatchNorm running statistics stay as trained
    feats, labels = embed_all(model, train_data, device, args.batch_size, autocast, "embed train")
    feats, labels = feats.to(device), labels.to(device)
    opt = torch.optim.AdamW(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    losses, steps = [], 0
    model.head.train()
    for _ in tqdm(range(args.epochs), desc="train head", unit="epoch", dynamic_ncols=True):
        total = 0.0
        for idx in _batches(len(labels), args.batch_size, gen):
            steps += 1
            loss = nn.functional.cross_entropy(model.head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        losses.append(float(total) / len(labels))
    return losses, steps


def train_finetune(
    model: ActionClassifier,
    train_data: Any,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[list[float], int]:
    """Encoder and head train together; the AMP policy is train.py's (GradScaler for fp16).

    ``train_data`` holds ``args.epochs`` passes of clips; epoch ``e`` reads the ``e``-th block
    (shuffled). Returns the mean loss per epoch and the number of optimiser steps.
    """
    opt = torch.optim.AdamW(
        [
            {"params": model.D.encoder.parameters(), "lr": args.encoder_lr},
            {"params": model.head.parameters(), "lr": args.lr},
        ],
        weight_decay=args.weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = len(train_data) // args.epochs
    losses, steps = [], 0
    model.train()
    bar = tqdm(
        total=args.epochs * len(_batches(per_epoch, args.batch_size, None)),
        desc="finetune",
        unit="step",
        dynamic_ncols=True,
    )
    for epoch in range(args.epochs):
        total, seen = torch.zeros((), device=device), 0
        for idx in _batches(per_epoch, args.batch_size, gen):
            b = train_data.batch([epoch * per_epoch + i for i in idx])
            video, label = b["video"].to(device), b["label"].to(device)
            with autocast:
                loss = nn.functional.cross_entropy(model(video).float(), label)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach() * len(idx)
            seen += len(idx)
            steps += 1
            bar.update(1)
        losses.append(float(total) / seen)  # one host sync per epoch
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses, steps


@torch.no_grad()
def predict_videos(
    model: ActionClassifier,
    test_data: Any,
    videos: Sequence[int],
    device: torch.device,
    batch: int,
    autocast: contextlib.AbstractContextManager,
) -> tuple[Tensor, Tensor]:
    """Per-video logits ``(V, K)`` averaged over each video's clips, and labels ``(V,)``.

    Row ``j`` is item ``videos[j]`` of ``test_data``; clip ``i`` belongs to the row of
    ``test_data.video_of(i)`` (:meth:`vosgan.data.video.ClipDataset.video_of`: a seeded
    permutation, not ``i % V``). Every clip must belong to a row and every row hold a clip.
    """
    row_of = {k: j for j, k in enumerate(videos)}
    if len(row_of) != len(videos):
        raise ValueError(f"videos must not repeat an item, got {list(videos)}")
    rows = []
    for i in range(len(test_data)):
        k = test_data.video_of(i)
        if k not in row_of:
            raise ValueError(f"clip {i} is of item {k}, which is not in videos")
        rows.append(row_of[k])
    counts = torch.bincount(torch.tensor(rows, dtype=torch.long), minlength=len(videos))
    empty = [videos[j] for j in (counts == 0).nonzero()[:, 0].tolist()]
    if empty:
        raise ValueError(f"videos {empty[:5]} have no clip (of {len(test_data)} clips)")
    model.eval()
    logits = torch.zeros(len(videos), model.head[-1].out_features)
    labels = torch.full((len(videos),), -1, dtype=torch.long)
    for idx in tqdm(
        _batches(len(test_data), batch, None), desc="test", unit="batch", dynamic_ncols=True
    ):
        b = test_data.batch(idx)
        with autocast:
            out = model(b["video"].to(device)).float().cpu()
        row = torch.tensor([rows[i] for i in idx])
        logits.index_add_(0, row, out)
        labels[row] = b["label"]
    return logits / counts[:, None], labels
