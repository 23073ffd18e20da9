"""Supervised ceiling of D's segmentation head: ``python -m vosgan.ceiling [--steps N] ...``.

Not the method. VOS-GAN never shows D a ground-truth mask; this diagnostic does: it trains the
discriminator's encoder, segmentation decoder and head with BCE against the **ground-truth**
masks of the synthetic training clips, nothing else, and reports the held-out IoU the training
run reports (threshold 0.5, D in eval mode). The result bounds what the unsupervised run can
reach with the same architecture, preset and number of steps: a number the self-supervised
segmentation is chasing, measured rather than guessed.

``--lr`` sets the decoder and head learning rate and ``--lr-encoder`` the encoder's (default: the
preset's ``optim.lr_d`` for both). The config fields the ceiling reads can be overridden with
``--section.key=value`` as in :mod:`vosgan.train` (:data:`USED`: D's architecture, the synthetic
data's sizes and seed, ``train.seed``, ``steps``, ``eval_every``, ``eval_clips``, ``device`` and
``amp``, Adam's betas); any other field changed is an error naming it (``data.source``: the
ceiling trains on synthetic clips only). ``train.device`` is resolved as training does (an
error when it names a CUDA device this machine lacks); ``train.amp`` autocasts D's training
forward as in training (a GradScaler for fp16); evaluation runs in float32. Prints one line per
``--eval-every`` steps and, with ``--json FILE``, writes them as a JSON list. A NaN or infinite
BCE stops the run with an error naming the step (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from vosgan import cli
from vosgan import config as config_mod
from vosgan.config import Config
from vosgan.data import SyntheticVideos
from vosgan.evaluate import evaluate_model
from vosgan.losses import segmentation_loss
from vosgan.models import Discriminator
from vosgan.train import NonFiniteLossError
from vosgan.train_data import batch_indices
from vosgan.train_run import amp_dtype, d_param_groups, resolve_device

#: The config fields :func:`train_ceiling` reads; changing another is refused (:func:`check_used`).
USED = frozenset(
    {f"model.{k}" for k in ("size", "frames", "d_channels", "flow_scale", "flow_decoder")}
    | {f"model.{k}" for k in ("flow_encoder", "seg_refine", "seg_refine_radius")}
    | {f"data.{k}" for k in ("train_clips", "val_clips", "seed", "batch_size", "cache")}
    | {f"train.{k}" for k in ("seed", "steps", "eval_every", "eval_clips", "device", "amp")}
    | {"optim.lr_d", "optim.beta1", "optim.beta2"}
)


def check_used(cfg: Config) -> None:
    """Raise :class:`~vosgan.config.ConfigError` naming every field of ``cfg`` that differs from
    its preset and that the ceiling does not read (outside :data:`USED`): such an override would
    otherwise be ignored without a word."""
    base = config_mod.PRESETS[cfg.preset]
    changed = config_mod.changed_fields(base, cfg)
    ignored = [f"{k}={new!r}" for k, (_, new) in changed.items() if k not in USED]
    if ignored:
        why = "; it trains on synthetic clips only" if cfg.data.source != base.data.source else ""
        raise config_mod.ConfigError(
            f"the ceiling does not use {', '.join(ignored)}{why}: drop "
            f"{'this override' if len(ignored) == 1 else 'these overrides'}"
        )


def train_ceiling(
    cfg: Config, steps: int, lr: float, lr_encoder: float, eval_every: int, progress: bool = True
) -> list[dict[str, Any]]:
    """Train a fresh D's segmentation on ground-truth masks; return the evaluations.

    Args:
        cfg: the config (:data:`USED`; others must keep the preset's values): D and the data
            live on ``train.device``, the training forward runs under ``train.amp``.
        steps: optimiser steps, each on ``data.batch_size`` clips ``(B, 3, T, H, W)``.
        lr: learning rate of every parameter outside the encoder (decoders, heads).
        lr_encoder: learning rate of the encoder and the real/fake head.
        eval_every: evaluate after every this many steps (and after the last).

    Returns:
        One dict per evaluation: ``step``, ``loss`` (the last step's BCE) and the
        :func:`vosgan.evaluate.evaluate_model` fields (``iou``, ``baseline_iou``, ...).

    Raises:
        NonFiniteLossError: the BCE of a step is NaN or infinite (named in the message).
        ConfigError: a field outside :data:`USED` changed (:func:`check_used`), ``train.device``
            names a device this machine lacks, or ``train.amp=fp16`` without CUDA.
    """
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got {steps} and {eval_every}")
    check_used(cfg)
    device = resolve_device(cfg.train.device)
    dtype = amp_dtype(cfg.train.amp, device)
    torch.manual_seed(cfg.train.seed)
    m, d = cfg.model, cfg.data
    D = Discriminator(m).to(device)
    opt = torch.optim.Adam(
        d_param_groups(D, lr), lr=lr_encoder, betas=(cfg.optim.beta1, cfg.optim.beta2)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    data = SyntheticVideos(
        d.train_clips, m.frames, m.size, seed=d.seed, split="train", cache=d.cache
    )
    results = []
    bar = tqdm(
        range(1, steps + 1), desc="ceiling", unit="step", disable=not progress, dynamic_ncols=True
    )
    for step in bar:
        batch = data.batch(batch_indices(step - 1, d.batch_size, len(data), d.seed))
        video, mask = (batch[k].to(device, non_blocking=True) for k in ("video", "mask"))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = segmentation_loss(D(video).seg_logit, mask)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"BCE is {loss.item()} at step {step}; stopped. Try a lower --lr or --lr-encoder."
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step % eval_every == 0 or step == steps:
            result = {
                "step": step,
                "loss": loss.item(),
                **evaluate_model(D, cfg, device, cfg.train.eval_clips).as_dict(),
            }
            results.append(result)
            tqdm.write(
                f"step {step}: BCE {result['loss']:.3f}, held-out IoU {result['iou']:.3f} "
                f"(frame-difference baseline {result['baseline_iou']:.3f})"
            )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.ceiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="cpu-small",
        choices=sorted(config_mod.PRESETS),
        help="config preset: architecture, data, batch size (default: cpu-small)",
    )
    p.add_argument(
        "--steps",
        type=cli.int_at_least(1),
        default=None,
        help="default: the preset's train.steps",
    )
    lr = cli.finite_float(0, strict=True)
    p.add_argument("--lr", type=lr, default=None, help="decoders and heads (default lr_d)")
    p.add_argument("--lr-encoder", type=lr, default=None, help="encoder (default lr_d)")
    p.add_argument(
        "--eval-every",
        type=cli.int_at_least(1),
        default=None,
        help="default: the preset's train.eval_every",
    )
    cli.add_json(p, "the evaluations")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = config_mod.load(args.preset, config_mod.parse_overrides(rest))
        lr = args.lr if args.lr is not None else cfg.optim.lr_d
        lr_enc = args.lr_encoder if args.lr_encoder is not None else cfg.optim.lr_d
        steps = args.steps if args.steps is not None else cfg.train.steps
        every = args.eval_every if args.eval_every is not None else cfg.train.eval_every
        start = time.perf_counter()
        results = train_ceiling(cfg, steps, lr, lr_enc, every)
    except (config_mod.ConfigError, ValueError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(
        f"supervised ceiling ({args.preset}, {steps} steps, lr {lr:g} / encoder "
        f"{lr_enc:g}, {seconds:.0f} s): held-out IoU {results[-1]['iou']:.3f}"
    )
    cli.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
