"""Full training step (one D update + one G update): reference path vs ``--fused``.

CPU: the ``cpu-small`` preset at its default batch. GPU (skipped without CUDA): the ``paper``
preset, bf16 autocast. Each row records the FLOPs of one step (torch's FLOP counter) and the
achieved FLOP/s.

Run: ``pytest benchmarks/bench_train_step.py --benchmark-only``.
"""

from __future__ import annotations

import contextlib
import os
import platform

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vosgan import config
from vosgan.train import amp_dtype, build_run, train_step

CUDA = torch.cuda.is_available()
CASES = [("cpu-small", "cpu")] + ([("paper", "cuda")] if CUDA else [])


def _device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU {platform.machine()} x{os.cpu_count()}"
    )


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("preset, device", CASES, ids=[c[0] for c in CASES])
def test_train_step(benchmark, preset: str, device: str, fused: bool) -> None:
    cfg = config.load(preset)
    dev = torch.device(device)
    run = build_run(cfg, dev, fused)
    dtype = amp_dtype(cfg.train.amp, dev)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
    m = cfg.model
    real = torch.rand(cfg.data.batch_size, 3, m.frames, m.size, m.size, device=dev) * 2 - 1

    def step() -> None:
        train_step(run, real, autocast)
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up: numba/Triton compilation, cuDNN autotuning
    with FlopCounterMode(display=False) as counter:
        step()
    benchmark.pedantic(step, rounds=5 if device == "cpu" else 20, iterations=1)
    flops = counter.get_total_flops()
    benchmark.extra_info.update(
        device=_device_name(device),
        torch=torch.__version__,
        preset=preset,
        batch=cfg.data.batch_size,
        provider="fused" if fused else "reference",
        gflop_per_step=flops / 1e9,
        tflops=flops / benchmark.stats.stats.median / 1e12,
    )
