"""The training step as CUDA graphs (``train.cuda_graph``; on by default with ``--fused`` on CUDA).

On an H100 the ``paper`` preset's step is bound by the host, not the GPU: the fused step's
kernels took 39.5 ms of GPU time per step (36.3 ms in channels_last_3d) while a step took 45-55
ms of wall time, with every launch (cuDNN, ATen, Triton) paid for in Python and the driver
(benchmarks/RESULTS.md, eleventh session). A CUDA graph records the step's kernels once and
replays them with one launch: the same H100 ran the fused step in 36.9 ms replayed, 40.4 ms
eager (both channels_last_3d), against 56.4 ms for the eager reference.

- One graph per phase of the step (:func:`vosgan.train.step_phase`): with and without the lazy R1
  pass (``loss.r1_every``), before and after the motion pseudo-labels start
  (``loss.motion_seg_start``).
- A phase is captured after it has run eagerly ``warmup`` times on the capture stream, so that
  cuDNN's autotuning, Triton's compilation, Adam's state allocation and the cuBLAS/cuDNN
  workspaces happen outside the capture. Those eager steps are ordinary training steps.
- The clip is copied into a static input before each replay. The latents are drawn inside the
  graph from CUDA's default generator, whose philox offset advances on every replay: each step
  gets fresh latents.
- The loss parts are packed into one tensor inside the graph and copied out after each replay.
- Autocast runs with ``cache_enabled=False`` (its cache of cast weights would outlive the
  capture), and Adam with ``capturable=True`` (step counter on the GPU; :func:`build_run`).

Not with ``torch.compile``, DDP or fp16 (GradScaler reads its inf check on the host); ``auto``
also leaves it off with activation checkpointing (:func:`vosgan.train_run.step_options`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from vosgan.config import ConfigError
from vosgan.train_run import Run

#: ``train_step(run, real, autocast) -> loss parts``
StepFn = Callable[[Run, Tensor, contextlib.AbstractContextManager], dict[str, Tensor]]


def check_graphable(run: Run) -> None:
    """Raise :class:`ConfigError` naming what keeps ``run``'s step out of a CUDA graph."""
    why = []
    if run.device.type != "cuda":
        why.append(f"a CUDA device (train.device is {run.device})")
    if run.env.enabled:
        why.append("a single process (not torchrun: DDP's reductions are not captured)")
    if run.cfg.train.compile:
        why.append("train.compile off")
    if run.scaler.is_enabled():
        why.append("no GradScaler (train.amp bf16, auto or off)")
    for name, opt in (("G", run.opt_g), ("D", run.opt_d)):
        if not all(group.get("capturable", False) for group in opt.param_groups):
            why.append(f"{name}'s Adam with capturable=True (build_run sets it)")
    if why:
        raise ConfigError("train.cuda_graph needs " + "; ".join(why))


class GraphedTrainStep:
    """``step_fn`` (:func:`vosgan.train.train_step`) captured per phase and replayed.

    Args:
        run: the run (models, optimisers); checked by :func:`check_graphable`.
        step_fn: ``step_fn(run, real, autocast)`` -> loss parts, scalars.
        phase: ``phase(run)`` -> which graph this step replays (a hashable key, e.g.
            :func:`vosgan.train.step_phase`).
        autocast: the autocast context (``cache_enabled=False``) or a null context.
        warmup: eager runs of each phase before it is captured (>= 1).

    Call with the step's clips ``real (B, 3, T, H, W)`` on the run's device; returns the loss
    parts as fresh tensors (no host sync). ``captured`` lists the phases captured so far.
    """

    def __init__(
        self,
        run: Run,
        step_fn: StepFn,
        phase: Callable[[Run], Hashable],
        autocast: contextlib.AbstractContextManager,
        warmup: int = 2,
    ) -> None:
        check_graphable(run)
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager runs before a capture), got {warmup}")
        self.run, self.step_fn, self.phase = run, step_fn, phase
        self.autocast, self.warmup = autocast, warmup
        self.stream = torch.cuda.Stream(run.device)
        self.static_real: Tensor | None = None
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Tensor, list[str]]] = {}
        self.eager_runs: dict[Hashable, int] = {}

    @property
    def captured(self) -> list[Hashable]:
        return sorted(self.graphs)

    def __call__(self, real: Tensor) -> dict[str, Tensor]:
        phase = self.phase(self.run)
        if self.static_real is not None and (
            real.shape != self.static_real.shape or real.dtype != self.static_real.dtype
        ):
            raise ValueError(
                f"train.cuda_graph: every step's clips must keep one shape and dtype, got "
                f"{real.dtype} {tuple(real.shape)} after {self.static_real.dtype} "
                f"{tuple(self.static_real.shape)}"
            )
        if phase in self.graphs:
            graph, packed, keys = self.graphs[phase]
            self.static_real.copy_(real)
            graph.replay()
            return dict(zip(keys, packed.clone().unbind(), strict=True))
        if self.eager_runs.get(phase, 0) < self.warmup:
            self.eager_runs[phase] = self.eager_runs.get(phase, 0) + 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                parts = self.step_fn(self.run, real, self.autocast)
            torch.cuda.current_stream().wait_stream(self.stream)
            return parts
        return self._capture(phase, real)

    def _capture(self, phase: Hashable, real: Tensor) -> dict[str, Tensor]:
        if self.static_real is None:
            self.static_real = torch.empty_like(real)  # keeps real's memory format
        self.static_real.copy_(real)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls of other threads (the loader's pin-memory thread) go on
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                parts = self.step_fn(self.run, self.static_real, self.autocast)
                keys = sorted(parts)
                packed = torch.stack([parts[k].float() for k in keys])
        except RuntimeError as exc:
            raise RuntimeError(
                f"train.cuda_graph: capturing the training step (phase {phase}) "
                f"failed at step {self.run.step}: {exc}. Train with --train.cuda_graph=off."
            ) from exc
        self.graphs[phase] = (graph, packed, keys)
        graph.replay()  # the capture only recorded the step: run it
        return dict(zip(keys, packed.clone().unbind(), strict=True))
