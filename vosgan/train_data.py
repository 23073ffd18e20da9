"""The training loop's data: step-indexed batches (per rank) and evaluation on any data source.

The batch of step ``s`` is a pure function of ``s`` (:func:`batch_indices`), so a resumed run
reads exactly the clips it would have read, and under torchrun every rank computes the same
global batch and loads only its slice. Evaluation scores D on held-out clips: on the synthetic
data against exact masks and flow (:func:`vosgan.evaluate.evaluate_model`); on real video by
segmentation IoU where the data has masks (DAVIS-style folders), next to the frame-difference
baseline. Real video has no ground-truth flow, so flow EPE is skipped there (and said so).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vosgan import distributed
from vosgan.config import Config, ConfigError
from vosgan.data import build
from vosgan.distributed import DistEnv
from vosgan.evaluate import evaluate_model, predict
from vosgan.metrics import frame_difference_saliency, segmentation_iou
from vosgan.models import Discriminator
from vosgan.refine import refine_segmentation

NO_FLOW = "flow EPE skipped: real video has no ground-truth flow"
NO_MASKS = "segmentation IoU skipped: the data has no masks"


def batch_indices(step: int, batch: int, num_clips: int, seed: int) -> list[int]:
    """The clip indices of training step ``step``: a pure function, so resume needs only the step.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch); the last partial batch
    of an epoch is dropped.
    """
    per_epoch = num_clips // batch
    if per_epoch == 0:
        raise ConfigError(f"data.batch_size={batch} is larger than data.train_clips={num_clips}")
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_clips, generator=gen)[k * batch : (k + 1) * batch].tolist()


def make_dataset(cfg: Config, split: str, num_clips: int, masks: bool = True) -> Any:
    """The dataset named by ``data.source`` (:func:`vosgan.data.build.make_dataset`): anything
    with ``len`` and ``batch(indices) -> {"video": (B, 3, T, H, W) in [-1, 1], ["mask"], ...}``."""
    return build.make_dataset(cfg, split, num_clips, masks)


class _StepBatches(torch.utils.data.Dataset):
    """Item ``s``: this rank's ``part`` of step ``s``'s batch (workers build whole batches)."""

    def __init__(self, data: Any, batch: int, seed: int, part: slice) -> None:
        self.data, self.batch, self.seed, self.part = data, batch, seed, part

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        indices = batch_indices(step, self.batch, len(self.data), self.seed)
        return self.data.batch(indices[self.part])


def batches(
    cfg: Config, start: int, device: torch.device, env: DistEnv = distributed.SINGLE
) -> Iterator[dict[str, Tensor]]:
    """This rank's training batches for steps ``start, start + 1, ...`` (pinned, prefetched).

    Opens the dataset now, not on the first batch, so that a bad ``data.source`` or a batch
    larger than the dataset fails before the caller writes anything.
    """
    data = make_dataset(cfg, "train", cfg.data.train_clips, masks=False)  # G's masks train D
    batch_indices(0, cfg.data.batch_size, len(data), cfg.data.seed)  # batch_size <= len(data)
    part = distributed.local_slice(cfg.data.batch_size, env)
    loader = torch.utils.data.DataLoader(
        _StepBatches(data, cfg.data.batch_size, cfg.data.seed, part),
        batch_size=None,
        sampler=range(start, cfg.train.steps),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
        # Its own generator: a DataLoader otherwise draws a seed from the global RNG at every
        # iterator start, which would shift the latents after a resume. Workers of different
        # ranks get different seeds (rank 0 keeps the single-process seed).
        generator=torch.Generator().manual_seed(cfg.data.seed + 1_000_003 * env.rank),
        worker_init_fn=_leave_interrupts_to_the_trainer,
    )
    return iter(loader)


def _leave_interrupts_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C and SIGTERM (the terminal and schedulers signal the whole
    process group): the training process finishes its step and checkpoints, then stops the
    workers. A worker that died on the signal would fail the batch the trainer is waiting for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Evaluator:
    """Scores D on the first ``num_clips`` validation clips of ``cfg.data.source``.

    Synthetic data: :class:`vosgan.metrics.EvalResult` as a dict. Real video: ``iou`` and
    ``baseline_iou`` over the clips that have masks (pooled over frames; both refined as
    ``model.seg_refine`` says, ``iou_head`` and ``baseline_iou_head`` unrefined), ``num_clips``, and
    ``skipped``, the reasons for what could not be measured. The real validation set is opened
    once, on first use (or by :meth:`open`).
    """

    def __init__(self, cfg: Config, device: torch.device, num_clips: int) -> None:
        self.cfg, self.device, self.num_clips = cfg, device, num_clips
        self._data: Any = None

    def open(self) -> None:
        """Open the real validation set now (a bad one fails here); no-op on synthetic data."""
        if self.cfg.data.source != "synthetic" and self._data is None:
            self._data = make_dataset(self.cfg, "val", self.cfg.data.val_clips)

    def __call__(self, D: Discriminator) -> dict[str, Any]:
        if self.cfg.data.source == "synthetic":
            return evaluate_model(D, self.cfg, self.device, self.num_clips).as_dict()
        self.open()
        return self._real(D)

    @torch.no_grad()
    def _real(self, D: Discriminator) -> dict[str, Any]:
        n, bs = min(self.num_clips, len(self._data)), self.cfg.data.batch_size
        sums = dict.fromkeys(("iou", "iou_head", "base", "base_head"), 0.0)
        frames = clips = 0
        was_training = D.training
        D.eval()
        try:
            for start in range(0, n, bs):
                batch = self._data.batch(range(start, min(start + bs, n)))
                clips += batch["video"].shape[0]
                if "mask" not in batch:
                    continue
                video, mask = batch["video"], batch["mask"]
                pred = predict(D, video.to(self.device), flow=False)
                fd = frame_difference_saliency(video)
                for total, seg in (
                    ("iou", pred["seg"].cpu()),
                    ("iou_head", pred["seg_head"].cpu()),
                    ("base", refine_segmentation(fd, video, D.cfg)),
                    ("base_head", fd),
                ):
                    sums[total] += float(segmentation_iou(seg, mask).sum())
                frames += video.shape[0] * video.shape[2]
        finally:
            D.train(was_training)
        if not frames:
            return {"num_clips": clips, "skipped": [NO_MASKS, NO_FLOW]}
        return {
            "iou": sums["iou"] / frames,
            "baseline_iou": sums["base"] / frames,
            "iou_head": sums["iou_head"] / frames,
            "baseline_iou_head": sums["base_head"] / frames,
            "num_clips": clips,
            "skipped": [NO_FLOW],
        }


def describe(result: dict[str, Any]) -> str:
    """One line for the log: the scores an evaluation produced and what it skipped."""
    parts = []
    if "iou" in result:
        parts.append(
            f"segmentation IoU {result['iou']:.3f} vs frame-difference baseline "
            f"{result['baseline_iou']:.3f}"
        )
        if "iou_head" in result and result["iou_head"] != result["iou"]:
            parts.append(f"unrefined {result['iou_head']:.3f} vs {result['baseline_iou_head']:.3f}")
    if "epe" in result:
        parts.append(
            f"flow EPE {result['epe']:.3f} px (foreground {result['epe_fg']:.3f}) vs "
            f"zero flow {result['baseline_epe']:.3f} ({result['baseline_epe_fg']:.3f})"
        )
    parts += result.get("skipped", [])
    return "; ".join(parts)
