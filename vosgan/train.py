"""Train VOS-GAN.

``python -m vosgan.train [--fused] [--compile] [--preset P] [--data D] [--out DIR] [--resume R]``.

With no arguments: the ``cpu-small`` preset on the built-in synthetic dataset. Any config field can
be overridden with ``--section.key=value`` (see :mod:`vosgan.config`).

Several processes: ``torchrun --nproc_per_node N -m vosgan.train ...`` trains with
DistributedDataParallel (NCCL on CUDA, gloo on CPU). ``data.batch_size`` stays the global batch:
each rank takes its slice of every step's clips and latents, so N processes see the same data as
one (and, with ``--train.sync_bn=true``, compute the same BatchNorm statistics). Rank 0 alone logs,
writes samples and checkpoints, and evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vosgan import backend, checkpoint, distributed
from vosgan import config as config_mod
from vosgan.config import Config, ConfigError
from vosgan.distributed import DistEnv
from vosgan.evaluate import write_samples
from vosgan.losses import VosGanLoss
from vosgan.models import Discriminator, Generator
from vosgan.nn import fuse_modules
from vosgan.nn.checkpointing import checkpoint_blocks
from vosgan.train_data import Evaluator, batch_indices, batches, describe, make_dataset

__all__ = ["batch_indices", "main", "make_dataset", "train", "train_step"]


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


@dataclass
class Run:
    """Everything a training run holds; what a checkpoint saves and restores.

    ``G``/``D`` are the plain modules (saved, sampled, evaluated). The training phases call them
    through wrappers set by :func:`wrap_models`: ``g_train`` and ``d_train`` (DDP under torchrun,
    then ``torch.compile`` with ``train.compile``), ``d_r1`` (DDP, never compiled: R1 needs double
    backward) and ``d_frozen`` (the plain D, maybe compiled: the G step's pass through D, whose
    parameters take no gradient then and must not trigger DDP's reduction).
    """

    cfg: Config
    device: torch.device
    G: Generator
    D: Discriminator
    loss: VosGanLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    env: DistEnv = field(default_factory=DistEnv)
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    g_train: nn.Module | None = None
    d_train: nn.Module | None = None
    d_r1: nn.Module | None = None
    d_frozen: nn.Module | None = None

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
        if self.env.enabled and self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            # Every rank's GPU generator runs in lockstep with rank 0's (cuda:0); restore that one.
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], self.device)
        self.step = ckpt["step"]
        self.history = ckpt.get("history", [])

    def latents(self) -> tuple[Tensor, Tensor]:
        """This rank's slice of the global batch's latents (every rank draws all of them)."""
        part = distributed.local_slice(self.cfg.data.batch_size, self.env)
        z_c, anchors = self.G.sample_latents(self.cfg.data.batch_size, self.device)
        return z_c[part], anchors[part]


def _say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg)


def build_run(
    cfg: Config, device: torch.device, fused: bool, env: DistEnv = distributed.SINGLE
) -> Run:
    """Models, loss and optimisers on ``device``; with ``fused``, every fused op swapped in."""
    torch.manual_seed(cfg.train.seed)
    G, D = Generator(cfg.model).to(device), Discriminator(cfg.model).to(device)
    loss = VosGanLoss(cfg.loss).to(device)
    if cfg.train.sync_bn and env.enabled:
        # Before fusing: a block whose BN is synchronized is not fused (the fused BN kernel
        # computes per-rank statistics), so the conv3d_block report below says "reference".
        n = distributed.convert_sync_batchnorm(G)[1] + distributed.convert_sync_batchnorm(D)[1]
        _say(env, f"sync_bn: {n} BatchNorm layer(s) normalise over all {env.world_size} ranks")
    if fused:
        replaced = fuse_modules(G) + fuse_modules(D) + fuse_modules(loss)
        _say(env, f"--fused: {len(replaced)} module(s) switched to fused implementations")
        for op in backend.OPS:
            choice = backend.choose(op, device)
            why = "" if choice.fused else f" ({choice.reason})"
            _say(env, f"  {op:<16} {'fused: ' + choice.impl if choice.fused else 'reference'}{why}")
    if cfg.train.checkpoint_activations:
        n = checkpoint_blocks([*G.foreground, *D.encoder, *D.decoder])
        _say(env, f"checkpoint_activations: {n} block(s) recompute their activations in backward")
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    scaler = torch.amp.GradScaler(
        device.type, enabled=amp_dtype(cfg.train.amp, device) == torch.float16
    )
    return Run(cfg, device, G, D, loss, opt_g, opt_d, scaler, env)


def wrap_models(run: Run) -> None:
    """Set the phase wrappers of :class:`Run` (after any checkpoint is loaded into G and D)."""
    g_ddp: nn.Module = run.G
    d_ddp: nn.Module = run.D
    if run.env.enabled:
        # broadcast_buffers=False: BN's running statistics play no part in training-mode forwards,
        # and rank 0's (the ones saved and evaluated) evolve the same with or without the
        # broadcast, which would cost a collective per forward (3-4 per step per model).
        # find_unused_parameters stays off: the G step uses every G parameter and the D step every
        # D parameter (its R1 pass joins the same backward), so no graph walk is needed.
        ids = [run.device.index] if run.device.type == "cuda" else None
        kw: dict[str, Any] = {"device_ids": ids}
        # torch >= 2.13 renamed the switch (it still syncs the buffers once at construction).
        new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        kw["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
        g_ddp = DistributedDataParallel(run.G, **kw)
        d_ddp = DistributedDataParallel(run.D, **kw)
    run.d_r1 = d_ddp
    if run.cfg.train.compile:
        run.g_train, run.d_train = torch.compile(g_ddp), torch.compile(d_ddp)
        run.d_frozen = torch.compile(run.D) if run.env.enabled else run.d_train
    else:
        run.g_train, run.d_train, run.d_frozen = g_ddp, d_ddp, run.D


def _sync(model: nn.Module | None, last: bool) -> contextlib.AbstractContextManager:
    """DDP gradient reduction on the last micro-batch only (earlier ones accumulate locally)."""
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if last or not isinstance(ddp, DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def _add(total: dict[str, Tensor], parts: dict[str, Tensor], k: int) -> None:
    for name, value in parts.items():
        v = value.detach().float() / k
        total[name] = total[name] + v if name in total else v


def train_step(
    run: Run, real: Tensor, autocast: contextlib.AbstractContextManager
) -> dict[str, Tensor]:
    """One D update then one G update; returns the detached loss parts (no host sync).

    ``real`` is this rank's share of the step's batch. With ``train.grad_accum = k`` it is split
    into ``k`` equal micro-batches whose losses, divided by ``k``, are backpropagated one after
    another: the gradient of the batch mean, except that BatchNorm normalises per micro-batch.
    """
    cfg, k = run.cfg, run.cfg.train.grad_accum
    r1_step = cfg.loss.r1 > 0 and run.step % cfg.loss.r1_every == 0
    parts: dict[str, Tensor] = {}
    # Discriminator: real/fake, plus segmentation of fakes (G's masks) and flow on both.
    run.opt_d.zero_grad(set_to_none=True)
    micro = zip(real.chunk(k), *(x.chunk(k) for x in run.latents()), strict=True)
    for i, (real_i, *latents) in enumerate(micro):
        with _sync(run.d_train, i == k - 1):
            with torch.no_grad(), autocast:
                fake = run.g_train(*latents)
            with autocast:
                loss_d, p = run.loss.discriminator(
                    real_i, run.d_train(real_i), fake, run.d_train(fake.video)
                )
            p["d_total"] = loss_d
            if r1_step:  # the lazy R1 pass joins this backward (DDP reduces once)
                with autocast:
                    p["d_r1"] = run.loss.r1(run.d_r1, real_i)
                loss_d = loss_d + p["d_r1"]
            run.scaler.scale(loss_d / k).backward()
        _add(parts, p, k)
    run.scaler.step(run.opt_d)
    # Generator: fool D; keep masks sparse. D's weights take no gradient here.
    run.opt_g.zero_grad(set_to_none=True)
    run.D.requires_grad_(False)
    try:
        micro = zip(*(x.chunk(k) for x in run.latents()), strict=True)
        for i, latents in enumerate(micro):
            with _sync(run.g_train, i == k - 1):
                with autocast:
                    fake = run.g_train(*latents)
                    d_out = run.d_frozen(fake.video, dense=cfg.loss.consistency > 0)
                    loss_g, p = run.loss.generator(fake, d_out)
                run.scaler.scale(loss_g / k).backward()
            p["g_total"] = loss_g
            _add(parts, p, k)
    finally:
        run.D.requires_grad_(True)
    run.scaler.step(run.opt_g)
    run.scaler.update()
    return parts


def _reduced(pending: list[tuple[int, dict[str, Tensor]]]) -> list[tuple[int, dict[str, Tensor]]]:
    """``pending`` with every loss averaged over ranks (the global batch's mean)."""
    if not pending or not torch.distributed.is_initialized():
        return pending
    keys = [(step, sorted(parts)) for step, parts in pending]
    flat = torch.stack([parts[k] for _, parts in pending for k in sorted(parts)])
    flat = iter(distributed.mean_over_ranks(flat).unbind())
    return [(step, {k: next(flat) for k in ks}) for step, ks in keys]


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
    """First Ctrl-C (or SIGTERM): finish the current step, checkpoint, stop. Second Ctrl-C: stop
    at once, except under torchrun, whose agent forwards the Ctrl-C a second time and kills the
    workers itself after its grace period."""

    def __init__(self, env: DistEnv) -> None:
        self.requested = False
        self.env = env

    def __enter__(self) -> _Interrupt:
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT and not self.env.enabled:
            raise KeyboardInterrupt
        if not self.requested and self.env.is_main:
            tqdm.write(
                "interrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)"
            )
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def train(
    cfg: Config, out: Path, fused: bool = False, resume: Path | None = None
) -> dict[str, Any]:
    """Run (or continue) training; returns the final evaluation as a dict (``{}`` on ranks > 0).

    Writes ``out/config.json``, ``out/checkpoints/last.pt``, TensorBoard scalars in ``out/tb``, the
    logged losses as JSON lines in ``out/log.jsonl`` and sample grids
    ``out/samples/step_XXXXXX.{mp4,gif}``. Under torchrun, joins the process group first and
    leaves it at the end (also after Ctrl-C or a NaN loss, which every rank sees at the same step).
    """
    env = distributed.env_from_environ()
    share = distributed.local_slice(cfg.data.batch_size, env)
    if (share.stop - share.start) % cfg.train.grad_accum:
        raise ConfigError(
            f"each of the {env.world_size} processes gets {share.stop - share.start} clips of "
            f"data.batch_size={cfg.data.batch_size}, not divisible by "
            f"train.grad_accum={cfg.train.grad_accum}"
        )
    device = distributed.rank_device(env, resolve_device(cfg.train.device))
    distributed.init(env, device)
    try:
        result = _train(cfg, out, fused, resume, env, device)
    except (SystemExit, NonFiniteLossError):
        distributed.teardown(env)  # all ranks stop at the same step: leave together
        raise
    except BaseException:
        distributed.abort(env)  # other ranks may be blocked in a collective: no barrier
        raise
    distributed.teardown(env)
    return result


def _train(
    cfg: Config, out: Path, fused: bool, resume: Path | None, env: DistEnv, device: torch.device
) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(cfg.train.amp, device)
    run = build_run(cfg, device, fused, env)
    if resume is not None:  # every rank loads the same file
        run.load(checkpoint.load_checkpoint(resume, map_location=device))
        _say(env, f"resumed from {resume} at step {run.step}")
    wrap_models(run)
    main = env.is_main
    ckpt_path = out / "checkpoints" / checkpoint.LAST
    writer = log = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
        writer = SummaryWriter(str(out / "tb"), purge_step=run.step)
        log = (out / "log.jsonl").open("a")
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    t = cfg.train
    pending: list[tuple[int, dict[str, Tensor]]] = []

    def save() -> None:
        pending[:] = _reduced(pending)  # every rank: a NaN on any rank stops them all
        check_finite(pending)  # never checkpoint a diverged model
        if main:
            checkpoint.save_atomic(run.state(), ckpt_path)

    evaluator = Evaluator(cfg, device, t.eval_clips)

    def evaluate() -> dict[str, Any]:
        result = evaluator(run.D)
        for k, v in result.items():
            if isinstance(v, int | float):
                writer.add_scalar(f"eval/{k}", v, run.step)
        run.history.append({"step": run.step, **result})
        return result

    def sample() -> None:
        write_samples(run.G, run.D, out / "samples" / f"step_{run.step:06d}", num=4)

    bar = tqdm(total=t.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not main)
    t0, n0 = time.perf_counter(), run.step
    with _Interrupt(env) as interrupt:
        for batch in batches(cfg, run.step, device, env):
            real = batch["video"].to(device, non_blocking=True)
            pending.append((run.step, train_step(run, real, autocast)))
            run.step += 1
            bar.update(1)
            stop = distributed.any_rank(interrupt.requested)
            if run.step % t.log_every == 0 or run.step == t.steps:
                pending[:] = _reduced(pending)
                check_finite(pending)
                keys = {k for _, parts in pending for k in parts}  # R1 is only on some steps
                means = {
                    k: torch.stack([p[k] for _, p in pending if k in p]).mean().item() for k in keys
                }
                speed = (run.step - n0) * cfg.data.batch_size / (time.perf_counter() - t0)
                if main:
                    for k, v in means.items():
                        writer.add_scalar(f"loss/{k}", v, run.step)
                    writer.add_scalar("perf/clips_per_s", speed, run.step)
                    row = {"step": run.step, **dict(sorted(means.items())), "clips_per_s": speed}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.set_postfix(
                    d=f"{means['d_total']:.3f}", g=f"{means['g_total']:.3f}", clips_s=f"{speed:.1f}"
                )
                pending.clear()
            if main and run.step % t.sample_every == 0 and run.step < t.steps:
                sample()
            if main and run.step % t.eval_every == 0 and run.step < t.steps:
                tqdm.write(f"step {run.step}: {describe(evaluate())}")
            if run.step % t.checkpoint_every == 0 or stop:
                save()
            if stop:
                bar.close()
                if main:
                    writer.close()
                    log.close()
                    print(
                        f"interrupted at step {run.step}; checkpoint {ckpt_path}; "
                        f"continue with --resume {out}"
                    )
                raise SystemExit(130)
    bar.close()
    save()  # the trained weights are safe before the final evaluation runs
    pending.clear()  # checked; the save below is rank 0's alone
    if not main:
        return {}
    sample()
    result = evaluate()
    save()  # again, now with the final evaluation in the history
    writer.close()
    log.close()
    (out / "metrics.json").write_text(json.dumps({"step": run.step, **result}, indent=2))
    print(f"final (step {run.step}, {result['num_clips']} held-out clips): {describe(result)}")
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
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (train.compile)")
    p.add_argument("--preset", default="cpu-small", choices=sorted(config_mod.PRESETS))
    p.add_argument("--data", default=None,
                   help="'synthetic' (default) or a path: videos, frame folders, a clip cache")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<time>)")
    p.add_argument("--resume", default=None, help="checkpoint file, run folder, or 'auto'")
    args, rest = p.parse_known_args(argv)
    overrides: dict[str, Any] = config_mod.parse_overrides(rest)
    if args.data is not None:
        overrides["data.source"] = args.data
    if args.compile:
        overrides["train.compile"] = "true"
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
    env = distributed.SINGLE
    try:
        env = distributed.env_from_environ()
        cfg, out, fused, resume = parse_args(argv)
        train(cfg, out, fused, resume)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as exc:
        where = f" (rank {env.rank} of {env.world_size})" if env.enabled else ""
        print(f"error{where}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # record: under torchrun, an unexpected error's traceback reaches the launcher's report.
    raise SystemExit(record(main)())
