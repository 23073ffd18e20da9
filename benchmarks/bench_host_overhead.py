"""Host time of the fused BN + activation op's Python path, with its Triton launches stubbed out.

On a GPU the eager fused training step is bound by the host (benchmarks/RESULTS.md, eleventh
session), so what each fused call costs the host matters as much as its kernels. This measures
vosgan's own share per call of :func:`vosgan.ops.conv3d_block.bn_act` (argument checks, tiling,
allocations, autograd), with every Triton kernel replaced by a launcher that does nothing.
Triton's own launch cost is not included. Two shapes: one on the one-launch path for small
tensors, one on the three-launch (forward) / two-launch (backward) path. Runs on CPU tensors
(the stubs need no GPU), and on CUDA tensors where there is a GPU.

Run: ``pytest benchmarks/bench_host_overhead.py --benchmark-only``.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
import triton
from vosgan.kernels import bn_act as kernels
from vosgan.kernels import bn_act_small as small

from vosgan.ops.conv3d_block import bn_act

SHAPES = {"small": (2, 8, 2, 4, 4), "large": (4, 64, 8, 32, 64)}  # numel <= / > SMALL_NUMEL
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``*_kernel`` of the BN + activation modules replaced by a no-op launcher; returns the
    list each launch appends its kernel's name to. On CPU tensors the device check wants the
    interpreter's variable (nothing runs in it)."""
    seen: list[str] = []

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(self.name)

    for mod in (kernels, small):
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__"):
                monkeypatch.setattr(mod, name, Stub(name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return seen


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_host_time(benchmark, launches, device: str, path: str, mode: str) -> None:
    shape = SHAPES[path]
    c = shape[1]
    y = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    g = torch.ones_like(y)

    def call() -> None:
        out = bn_act(y, w, b, rm, rv, training=True, impl="triton")
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (y, w, b), g)  # no .grad accumulation to time

    call()
    launches.clear()
    call()
    per_call = list(launches)
    assert per_call, "the stubs were not reached: the op took another path"
    benchmark.pedantic(call, rounds=200, iterations=10, warmup_rounds=20)
    cpu = platform.processor() or platform.machine()
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU {cpu}",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cpus": os.cpu_count(),
            "shape": "x".join(map(str, shape)),
            "launches": ", ".join(per_call),
        }
    )
