"""Train VOS-GAN.

``python -m vosgan.train [--fused] [--preset P] [--data D] [--out DIR] [--resume R]``.

With no arguments: the ``cpu-small`` preset on the built-in synthetic dataset. Any config field can
be overridden with ``--section.key=value`` (see :mod:`vosgan.config`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from vosgan import backend, checkpoint
from vosgan import config as config_mod
from vosgan.config import Config, ConfigError
from vosgan.data import SyntheticVideos
from vosgan.evaluate import evaluate_model, write_samples
from vosgan.losses import VosGanLoss
from vosgan.models import Discriminator, Generator
from vosgan.nn import fuse_modules


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the message names the step and the loss."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available")
    return dev


def amp_dtype(policy: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: auto = bf16 on CUDA, off on CPU; fp16 needs CUDA."""
    if policy == "off" or (policy == "auto" and device.type != "cuda"):
        return None
    if policy in ("auto", "bf16"):
        return torch.bfloat16
    if device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (use bf16 or off on CPU)")
    return torch.float16


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


class _StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is the whole batch of training step ``s`` (so workers produce whole batches)."""

    def __init__(self, data: SyntheticVideos, batch: int, seed: int) -> None:
        self.data, self.batch, self.seed = data, batch, seed

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        return self.data.batch(batch_indices(step, self.batch, len(self.data), self.seed))


def make_dataset(cfg: Config, split: str, num_clips: int) -> SyntheticVideos:
    """The dataset named by ``data.source``."""
    if cfg.data.source != "synthetic":
        raise ConfigError(
            f"data.source={cfg.data.source!r}: training on real video is not implemented yet "
            "(issue #6); use the built-in 'synthetic' dataset"
        )
    return SyntheticVideos(
        num_clips,
        cfg.model.frames,
        cfg.model.size,
        seed=cfg.data.seed,
        split=split,
        cache=cfg.data.cache,
    )


def batches(cfg: Config, start: int, device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Training batches for steps ``start, start + 1, ...`` (pinned and prefetched with workers)."""
    data = make_dataset(cfg, "train", cfg.data.train_clips)
    loader = torch.utils.data.DataLoader(
        _StepBatches(data, cfg.data.batch_size, cfg.data.seed),
        batch_size=None,
        sampler=range(start, cfg.train.steps),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
        # Its own generator: a DataLoader otherwise draws a seed from the global RNG at every
        # iterator start, which would shift the latents after a resume.
        generator=torch.Generator().manual_seed(cfg.data.seed),
    )
    yield from loader


@dataclass
class Run:
    """Everything a training run holds; what a checkpoint saves and restores."""

    cfg: Config
    device: torch.device
    G: Generator
    D: Discriminator
    loss: VosGanLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {
            "format": checkpoint.FORMAT,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "data_position": self.step,
            "history": self.history,
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        diff = checkpoint.model_config_diff(checkpoint.checkpoint_config(ckpt), self.cfg)
        if diff:
            raise ValueError(
                f"checkpoint {ckpt['path']} was trained with a different model config: "
                + "; ".join(diff)
            )
        self.G.load_state_dict(ckpt["G"])
        self.D.load_state_dict(ckpt["D"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.step = ckpt["step"]
        self.history = ckpt.get("history", [])


def build_run(cfg: Config, device: torch.device, fused: bool) -> Run:
    """Models, loss and optimisers on ``device``; with ``fused``, every fused op swapped in."""
    torch.manual_seed(cfg.train.seed)
    G, D = Generator(cfg.model).to(device), Discriminator(cfg.model).to(device)
    loss = VosGanLoss(cfg.loss).to(device)
    if fused:
        replaced = fuse_modules(G) + fuse_modules(D) + fuse_modules(loss)
        print(f"--fused: {len(replaced)} module(s) switched to fused implementations")
        for op in backend.OPS:
            choice = backend.choose(op, device)
            why = "" if choice.fused else f" ({choice.reason})"
            print(f"  {op:<16} {'fused: ' + choice.impl if choice.fused else 'reference'}{why}")
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    scaler = torch.amp.GradScaler(
        device.type, enabled=amp_dtype(cfg.train.amp, device) == torch.float16
    )
    return Run(cfg, device, G, D, loss, opt_g, opt_d, scaler)


def train_step(
    run: Run, real: Tensor, autocast: contextlib.AbstractContextManager
) -> dict[str, Tensor]:
    """One D update then one G update; returns the detached loss parts (no host sync)."""
    cfg, G, D, B = run.cfg, run.G, run.D, real.shape[0]
    # Discriminator: real/fake, plus segmentation of fakes (G's masks) and flow on both.
    with torch.no_grad(), autocast:
        fake = G(*G.sample_latents(B, run.device))
    with autocast:
        loss_d, parts = run.loss.discriminator(real, D(real), fake, D(fake.video))
    run.opt_d.zero_grad(set_to_none=True)
    run.scaler.scale(loss_d).backward()
    if cfg.loss.r1 > 0 and run.step % cfg.loss.r1_every == 0:
        with autocast:
            r1 = run.loss.r1(D, real)
        run.scaler.scale(r1).backward()
        parts["d_r1"] = r1
    run.scaler.step(run.opt_d)
    # Generator: fool D; keep masks sparse.
    with autocast:
        fake = G(*G.sample_latents(B, run.device))
        loss_g, g_parts = run.loss.generator(fake, D(fake.video, dense=cfg.loss.consistency > 0))
    run.opt_g.zero_grad(set_to_none=True)
    run.scaler.scale(loss_g).backward()
    run.scaler.step(run.opt_g)
    run.scaler.update()
    parts.update(g_parts, d_total=loss_d, g_total=loss_g)
    return {k: v.detach().float() for k, v in parts.items()}


def check_finite(pending: list[tuple[int, dict[str, Tensor]]]) -> None:
    """Raise :class:`NonFiniteLossError` naming the first step and loss that is NaN/Inf."""
    for step, parts in pending:
        for name, value in parts.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(
                    f"loss {name} is {value.item()} at step {step + 1}; training stopped. "
                    "The last good checkpoint is kept; try a lower learning rate or train.amp=off."
                )


class _Interrupt:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Interrupt:
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(
            "interrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)"
        )

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._old)


def train(
    cfg: Config, out: Path, fused: bool = False, resume: Path | None = None
) -> dict[str, Any]:
    """Run (or continue) training; returns the final evaluation as a dict.

    Writes ``out/config.json``, ``out/checkpoints/last.pt``, TensorBoard scalars in ``out/tb`` and
    sample grids ``out/samples/step_XXXXXX.{mp4,gif}``.
    """
    from torch.utils.tensorboard import SummaryWriter

    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(cfg.train.amp, device)
    run = build_run(cfg, device, fused)
    if resume is not None:
        run.load(checkpoint.load_checkpoint(resume, map_location=device))
        print(f"resumed from {resume} at step {run.step}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    ckpt_path = out / "checkpoints" / checkpoint.LAST
    writer = SummaryWriter(str(out / "tb"), purge_step=run.step)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    t = cfg.train
    pending: list[tuple[int, dict[str, Tensor]]] = []

    def save() -> None:
        check_finite(pending)  # never checkpoint a diverged model
        checkpoint.save_atomic(run.state(), ckpt_path)

    def evaluate() -> dict[str, Any]:
        result = evaluate_model(run.D, cfg, device, t.eval_clips).as_dict()
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, run.step)
        run.history.append({"step": run.step, **result})
        return result

    def sample() -> None:
        write_samples(run.G, run.D, out / "samples" / f"step_{run.step:06d}", num=4)

    bar = tqdm(total=t.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
    t0, n0 = time.perf_counter(), run.step
    with _Interrupt() as interrupt:
        for batch in batches(cfg, run.step, device):
            real = batch["video"].to(device, non_blocking=True)
            pending.append((run.step, train_step(run, real, autocast)))
            run.step += 1
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == t.steps:
                check_finite(pending)
                keys = {k for _, parts in pending for k in parts}  # R1 is only on some steps
                means = {
                    k: torch.stack([p[k] for _, p in pending if k in p]).mean().item() for k in keys
                }
                for k, v in means.items():
                    writer.add_scalar(f"loss/{k}", v, run.step)
                speed = (run.step - n0) * cfg.data.batch_size / (time.perf_counter() - t0)
                writer.add_scalar("perf/clips_per_s", speed, run.step)
                bar.set_postfix(
                    d=f"{means['d_total']:.3f}", g=f"{means['g_total']:.3f}", clips_s=f"{speed:.1f}"
                )
                pending.clear()
            if run.step % t.sample_every == 0 and run.step < t.steps:
                sample()
            if run.step % t.eval_every == 0 and run.step < t.steps:
                r = evaluate()
                tqdm.write(
                    f"step {run.step}: IoU {r['iou']:.3f} (baseline {r['baseline_iou']:.3f}), "
                    f"EPE {r['epe']:.3f} px (zero-flow {r['baseline_epe']:.3f})"
                )
            if run.step % t.checkpoint_every == 0 or interrupt.requested:
                save()
            if interrupt.requested:
                bar.close()
                writer.close()
                print(
                    f"interrupted at step {run.step}; checkpoint {ckpt_path}; "
                    f"continue with --resume {out}"
                )
                raise SystemExit(130)
    bar.close()
    save()  # the trained weights are safe before the final evaluation runs
    sample()
    result = evaluate()
    save()  # again, now with the final evaluation in the history
    writer.close()
    (out / "metrics.json").write_text(json.dumps({"step": run.step, **result}, indent=2))
    print(
        f"final (step {run.step}, {result['num_clips']} held-out clips): "
        f"segmentation IoU {result['iou']:.3f} vs frame-difference baseline "
        f"{result['baseline_iou']:.3f}; flow EPE {result['epe']:.3f} px "
        f"(foreground {result['epe_fg']:.3f}) vs zero flow {result['baseline_epe']:.3f} "
        f"({result['baseline_epe_fg']:.3f})"
    )
    print(f"run folder: {out}")
    return result


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, bool, Path | None]:
    """CLI -> (config, run folder, fused, checkpoint to resume from)."""
    p = argparse.ArgumentParser(
        prog="python -m vosgan.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fused", action="store_true", help="use every fused op available here")
    p.add_argument("--preset", default="cpu-small", choices=sorted(config_mod.PRESETS))
    p.add_argument("--data", default=None, help="'synthetic' (default) or a dataset path")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<time>)")
    p.add_argument("--resume", default=None, help="checkpoint file, run folder, or 'auto'")
    args, rest = p.parse_known_args(argv)
    overrides: dict[str, Any] = config_mod.parse_overrides(rest)
    if args.data is not None:
        overrides["data.source"] = args.data
    cfg = config_mod.load(args.preset, overrides)
    resume = None
    if args.resume is not None:
        resume = checkpoint.find_resume(args.resume, args.out, args.preset)
    if args.out is not None:
        out = Path(args.out)
    elif resume is not None:
        out = resume.parent.parent
    else:
        out = Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is None and checkpoint.latest_in(out) is not None:
        raise ConfigError(
            f"{out} already holds a run; pass --resume auto to continue it, or choose another --out"
        )
    return cfg, out, args.fused, resume


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, out, fused, resume = parse_args(argv)
        train(cfg, out, fused, resume)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
