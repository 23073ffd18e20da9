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
import dataclasses
import functools
import json
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vosgan import checkpoint, cli, distributed
from vosgan import config as config_mod
from vosgan.config import Config, ConfigError
from vosgan.distributed import DistEnv
from vosgan.evaluate import write_samples
from vosgan.train_data import Evaluator, batch_indices, batches, describe, make_dataset
from vosgan.train_graph import GraphedTrainStep
from vosgan.train_run import (
    Run,
    amp_dtype,
    build_run,
    configure_backends,
    resolve_device,
    say,
    wrap_models,
)

__all__ = [
    "Run",
    "amp_dtype",
    "autocast_for",
    "batch_indices",
    "build_run",
    "configure_backends",
    "main",
    "make_dataset",
    "make_step",
    "motion_seg_due",
    "r1_due",
    "resolve_device",
    "StepPhase",
    "step_phase",
    "train",
    "train_step",
    "wrap_models",
]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the message names the step and the loss."""


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


def r1_due(run: Run) -> bool:
    """Whether this step adds the lazy R1 penalty (every ``loss.r1_every`` steps)."""
    return run.cfg.loss.r1 > 0 and run.step % run.cfg.loss.r1_every == 0


def motion_seg_due(run: Run) -> bool:
    """Whether this step trains D's segmentation of real clips on its own flow (``loss.motion_seg``
    from step ``loss.motion_seg_start``)."""
    return run.cfg.loss.motion_seg > 0 and run.step >= run.cfg.loss.motion_seg_start


class StepPhase(NamedTuple):
    """What makes one training step's work differ from another's (:func:`step_phase`);
    :class:`GraphedTrainStep` keeps one CUDA graph per phase."""

    r1: bool
    motion_seg: bool


def step_phase(run: Run) -> StepPhase:
    """This step's :class:`StepPhase`: :func:`r1_due` and :func:`motion_seg_due`."""
    return StepPhase(r1_due(run), motion_seg_due(run))


def make_step(
    run: Run, autocast: contextlib.AbstractContextManager
) -> Callable[[Tensor], dict[str, Tensor]]:
    """``step(real)``: :func:`train_step` on ``run``, replayed from CUDA graphs with
    ``train.cuda_graph`` (:class:`vosgan.train_graph.GraphedTrainStep`; ``autocast`` then needs
    ``cache_enabled=False``, as :func:`autocast_for` makes it)."""
    if run.cuda_graph:
        return GraphedTrainStep(run, train_step, step_phase, autocast)
    return functools.partial(train_step, run, autocast=autocast)


def autocast_for(run: Run) -> contextlib.AbstractContextManager:
    """The training step's autocast context for ``train.amp`` on the run's device (a null
    context when off); without autocast's cast cache under ``train.cuda_graph``."""
    dtype = amp_dtype(run.cfg.train.amp, run.device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=dtype, cache_enabled=not run.cuda_graph)


def train_step(
    run: Run, real: Tensor, autocast: contextlib.AbstractContextManager
) -> dict[str, Tensor]:
    """One D update then one G update; returns the detached loss parts (no host sync).

    ``real`` is this rank's share of the step's batch. With ``train.grad_accum = k`` it is split
    into ``k`` equal micro-batches whose losses, divided by ``k``, are backpropagated one after
    another: the gradient of the batch mean, except that BatchNorm normalises per micro-batch.
    """
    cfg, k = run.cfg, run.cfg.train.grad_accum
    if run.channels_last:
        real = real.contiguous(memory_format=torch.channels_last_3d)
    r1_step, motion_seg = step_phase(run)
    parts: dict[str, Tensor] = {}
    # Discriminator: real/fake, segmentation of fakes (G's masks) and, with loss.motion_seg, of
    # real clips (what D's own flow says moves), flow on both.
    run.opt_d.zero_grad(set_to_none=True)
    micro = zip(real.chunk(k), *(x.chunk(k) for x in run.latents()), strict=True)
    for i, (real_i, *latents) in enumerate(micro):
        with _sync(run.d_train, i == k - 1):
            with torch.no_grad(), autocast:
                fake = run.g_train(*latents)
            with autocast:
                d_real = run.d_train(real_i)
                d_fake = run.d_train(fake.video, flow=run.loss.reads_fake_flow)
                loss_d, p = run.loss.discriminator(real_i, d_real, fake, d_fake, motion_seg)
            p["d_total"] = loss_d
            if run.idle_dense:  # DDP reduces every D parameter: keep the dense heads in the graph
                loss_d = loss_d + 0.0 * (d_real.seg_logit.float().sum() + d_real.flow.float().sum())
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
                    d_out = run.d_frozen(fake.video, dense=cfg.loss.consistency > 0, flow=False)
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


def check_finite(pending: list[tuple[int, dict[str, Tensor]]], ckpt: Path) -> None:
    """Raise :class:`NonFiniteLossError` naming the first step and loss that is NaN/Inf, and
    whether the run's checkpoint ``ckpt`` (only ever written with finite losses) exists."""
    for step, parts in pending:
        for name, value in parts.items():
            if not torch.isfinite(value):
                kept = (
                    f"The last good checkpoint, {ckpt}, is kept"
                    if ckpt.exists()
                    else f"No checkpoint was written to {ckpt.parent} yet"
                )
                raise NonFiniteLossError(
                    f"loss {name} is {value.item()} at step {step + 1}; training stopped. "
                    f"{kept}; try a lower learning rate or train.amp=off."
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
    n, k = share.stop - share.start, cfg.train.grad_accum
    each = f"each of the {env.world_size} processes gets {n} clips of data.batch_size"
    if n % k:
        raise ConfigError(f"{each}={cfg.data.batch_size}, not divisible by train.grad_accum={k}")
    if n // k < 2:
        raise ConfigError(
            f"{each}={cfg.data.batch_size}, {n // k} per micro-batch with train.grad_accum={k}; "
            "BatchNorm needs at least 2"
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

    configure_backends(device)
    t = cfg.train
    run = build_run(cfg, device, fused, env)
    if resume is not None:  # every rank loads the same file
        # On the CPU: the RNG states must stay CPU ByteTensors (set_rng_state rejects others);
        # load_state_dict copies weights and optimizer state to the models' device.
        run.load(checkpoint.load_checkpoint(resume, map_location="cpu"))
        # At train.steps == its step, a checkpoint still lacking the final evaluation (Ctrl-C at
        # the last step, or a crash in the evaluation) gets it; one that has it is finished.
        evaluated = bool(run.history) and run.history[-1]["step"] == run.step
        if t.steps < run.step or (t.steps == run.step and evaluated):
            raise ConfigError(
                f"train.steps={t.steps} <= the checkpoint's step {run.step}: nothing to train "
                "(raise train.steps to train on)"
            )
        say(env, f"resumed from {resume} at step {run.step}")
    wrap_models(run)
    step = make_step(run, autocast_for(run))
    main = env.is_main
    # Open the data before writing anything: a bad data.source leaves no run folder behind.
    data = batches(cfg, run.step, device, env)
    evaluator = Evaluator(cfg, device, t.eval_clips)
    if main:
        evaluator.open()
    ckpt_path = out / "checkpoints" / checkpoint.LAST
    writer = log = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cli.write_atomic(out / "config.json", cfg.to_json())
        writer = SummaryWriter(str(out / "tb"), purge_step=run.step)
        log = _open_log(out / "log.jsonl", run.step)
    pending: list[tuple[int, dict[str, Tensor]]] = []

    def save() -> None:
        pending[:] = _reduced(pending)  # every rank: a NaN on any rank stops them all
        check_finite(pending, ckpt_path)  # never checkpoint a diverged model
        if main:
            checkpoint.save_atomic(run.state(), ckpt_path)

    def evaluate() -> dict[str, Any]:
        result = evaluator(run.d_eval)
        for k, v in result.items():
            if isinstance(v, int | float):
                writer.add_scalar(f"eval/{k}", v, run.step)
        run.history.append({"step": run.step, **result})
        return result

    def sample() -> None:
        write_samples(run.G, run.d_eval, out / "samples" / f"step_{run.step:06d}", num=4)

    bar = tqdm(
        total=t.steps,
        initial=run.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not main,
    )
    t0, n0 = time.perf_counter(), run.step
    with _Interrupt(env) as interrupt:
        for batch in data:
            real = batch["video"].to(device, non_blocking=True)
            pending.append((run.step, step(real)))
            run.step += 1
            if run.d_ema is not None:
                run.d_ema.update(run.D, run.step)
            bar.update(1)
            stop = distributed.any_rank(interrupt.requested)
            if run.step % t.log_every == 0 or run.step == t.steps:
                pending[:] = _reduced(pending)
                check_finite(pending, ckpt_path)
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
    cli.write_json(out / "metrics.json", {"step": run.step, **result})
    print(f"final (step {run.step}, {result['num_clips']} held-out clips): {describe(result)}")
    print(f"run folder: {out}")
    return result


def _open_log(path: Path, step: int) -> TextIO:
    """``log.jsonl`` for appending, cut back to the rows of steps <= ``step`` (a resumed run
    logs again what its checkpoint did not keep, as TensorBoard's ``purge_step`` does)."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a row torn by a kill: dropped
                continue
        cli.write_atomic(path, "".join(kept))
    return path.open("a")


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, bool, Path | None]:
    """CLI -> (config, run folder, fused, checkpoint to resume from)."""
    p = argparse.ArgumentParser(
        prog="python -m vosgan.train",
        description=__doc__,
        epilog=_overrides_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fused", action="store_true", help="use every fused op available here")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (train.compile)")
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(config_mod.PRESETS),
        help="the config to start from (PRESETS in vosgan/config.py; default: cpu-small; a "
        "resumed run keeps its checkpoint's)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="'synthetic' (default) or a path: videos, frame folders, a clip cache",
    )
    p.add_argument(
        "--out",
        type=cli.out_dir,
        default=None,
        help="run folder, new or empty unless resumed (default: runs/<preset>-<time>)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint file, run folder, or 'auto'; the run continues with its checkpoint's "
        "config (overrides may change only the fields in RESUMABLE, vosgan/checkpoint.py: "
        "train.steps, intervals, data reading, device, precision and speed switches)",
    )
    args, rest = p.parse_known_args(argv)
    overrides: dict[str, Any] = config_mod.parse_overrides(rest)
    if args.data is not None:
        overrides["data.source"] = args.data
    if args.compile:
        overrides["train.compile"] = "true"
    preset = args.preset or "cpu-small"
    resume = None
    if args.resume is not None:
        resume = checkpoint.find_resume(args.resume, args.out, preset)
    if resume is None:
        cfg = config_mod.load(preset, overrides)
    else:
        cfg = checkpoint.resume_config(resume, overrides)
        if args.preset not in (None, cfg.preset):
            raise ConfigError(
                f"--preset {args.preset}: {resume} was trained from preset {cfg.preset!r}"
            )
    # <run>/checkpoints/last.pt belongs to <run>; a checkpoint elsewhere has no run folder
    in_run = resume is not None and resume.parent.name == "checkpoints"
    if args.out is not None:
        out = args.out
    elif in_run:
        out = resume.parent.parent
    elif resume is not None:
        raise ConfigError(
            f"--resume {args.resume}: {resume} is not inside a run's checkpoints/ folder; "
            "pass --out for the resumed run's folder"
        )
    else:
        out = Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Never write into another run's folder: only --resume auto (which starts fresh in an --out
    # without a checkpoint) or a checkpoint inside --out may continue there.
    resuming_out = args.resume == "auto" or (
        in_run and resume.parent.parent.resolve() == out.resolve()
    )
    if not resuming_out and checkpoint.latest_in(out) is not None:
        raise ConfigError(
            f"{out} already holds a run; pass --resume auto to continue it, or choose another --out"
        )
    if not resuming_out and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out} is not empty (an earlier run that wrote no checkpoint?); choose another "
            "--out, or pass --resume auto to start this run in it"
        )
    return cfg, out, args.fused, resume


def _overrides_help() -> str:
    """The epilog of ``--help``: how to override config fields, and their names."""
    lines = [
        "config overrides:",
        "  --section.key=value sets a field of vosgan/config.py (each described there), e.g.",
        "  --train.steps=200 --data.batch_size=16. A run's full config is saved in",
        "  <out>/config.json. The fields:",
    ]
    for section in config_mod.SECTIONS:
        names = ", ".join(f.name for f in dataclasses.fields(getattr(config_mod.Config(), section)))
        lines += textwrap.wrap(
            f"{section}: {names}", width=98, initial_indent="    ", subsequent_indent="      "
        )
    return "\n".join(lines)


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
