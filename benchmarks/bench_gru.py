"""Fused GRU benchmarks: ``nn.GRU`` / ``FusedGRU`` / a ``GRUCell`` loop, forward and fwd+bwd.

Shapes: the trajectory encoder's, B in {16, 64}, T in {16, 32}, H in {128, 256}, input size
d_m = 32 (the trajectory latent). CPU: fp32, fused = the C++ kernel (``impl="cpp"``), nn.GRU =
ATen's CPU GRU. GPU (skipped without CUDA): fp32, fused = the persistent CUDA kernel, nn.GRU =
cuDNN. Forward runs under ``no_grad``; fwd+bwd backpropagates a fixed gradient of the output
into the input and every parameter (``autograd.grad``: no ``.grad`` accumulates between rounds).
GPU timings synchronise inside the timed function. Before timing, the fused GRU's output and
gradients are checked once against nn.GRU's with the same weights and input
(:func:`check_provider`). The check and the timing both run without TF32 (cuDNN and cuBLAS,
:func:`reference_check.no_tf32`): the fused CUDA GRU computes in plain fp32, so cuDNN is timed
doing the same work it was checked doing (``extra_info["tf32"]``).

Run: ``pytest benchmarks/bench_gru.py --benchmark-only`` (about 1-2 min on a 2-core CPU).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
from reference_check import Tol, check, no_tf32, outputs
from torch import nn

from vosgan.nn import FusedGRU
from vosgan.ops import gru as gru_ops

CUDA = torch.cuda.is_available()
D_M = 32  # trajectory latent size (generator default)
SHAPES = [(b, t, h) for b in (16, 64) for t in (16, 32) for h in (128, 256)]
PROVIDERS = ["nn_gru", "fused", "grucell_loop"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _versions(device: str) -> dict:
    import triton

    if device == "cuda":
        dev = torch.cuda.get_device_name()
    else:
        dev = f"CPU {platform.machine()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__}


class _CellLoop(nn.Module):
    """The step-by-step baseline: one ``nn.GRUCell`` call per time step."""

    def __init__(self, gru: nn.GRU) -> None:
        super().__init__()
        self.cell = nn.GRUCell(gru.input_size, gru.hidden_size)
        self.cell.load_state_dict({k.removesuffix("_l0"): v for k, v in gru.state_dict().items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1), h.unsqueeze(0)


def _module(provider: str, gru: nn.GRU, device: str) -> nn.Module:
    """``provider``'s module with ``gru``'s weights."""
    if provider == "nn_gru":
        return gru
    if provider == "fused":
        return FusedGRU.from_gru(gru, impl="cuda" if device == "cuda" else "cpp")
    return _CellLoop(gru).to(device)


def _outputs(module: nn.Module, x: torch.Tensor, g: torch.Tensor, mode: str) -> dict:
    if mode == "fwd":
        with torch.no_grad():
            return outputs(lambda x: module(x)[0], [x])
    names = ("w_ih", "w_hh", "b_ih", "b_hh")  # nn.GRU's and GRUCell's parameter order
    wrt = {"x": x, **dict(zip(names, module.parameters(), strict=True))}
    return outputs(lambda x: module(x)[0], [x], wrt, g)


def check_provider(provider: str, gru: nn.GRU, x: torch.Tensor, g: torch.Tensor, mode: str):
    """``provider``'s output (and, for fwd_bwd, the gradients of x and of every parameter)
    against nn.GRU's with the same weights and input, with the tolerances of tests/test_gru.py:
    CPU atol 2e-5, rtol 1e-4; CUDA atol 1e-4, rtol 1e-3 against cuDNN without TF32."""
    if provider != "fused":  # grucell_loop: torch's own cell, a baseline like nn.GRU
        return
    with no_tf32():
        want = _outputs(gru, x, g, mode)
    got = _outputs(_module(provider, gru, x.device.type), x, g, mode)
    tol = Tol(1e-3, 1e-4) if x.is_cuda else Tol(1e-4, 2e-5)
    check(f"gru {provider} {mode} {tuple(x.shape)} H={gru.hidden_size}", got, want, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}".format(*s))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gru(benchmark, provider: str, shape: tuple[int, int, int], mode: str, device: str):
    if provider == "fused" and gru_ops.fused_impl(torch.device(device))[0] is None:
        pytest.skip(gru_ops.fused_impl(torch.device(device))[1])
    B, T, H = shape
    gru = nn.GRU(D_M, H, batch_first=True).to(device)
    x = torch.randn(B, T, D_M, device=device, requires_grad=mode == "fwd_bwd")
    g = torch.randn(B, T, H, device=device)
    check_provider(provider, gru, x, g, mode)  # once, before timing
    module = _module(provider, gru, device)
    wrt = [x, *module.parameters()]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                module(x)
        else:
            out, _ = module(x)
            torch.autograd.grad(out, wrt, g)
        sync()

    benchmark.extra_info.update(
        _versions(device),
        provider=provider,
        mode=mode,
        B=B,
        T=T,
        H=H,
        I=D_M,
        dtype="float32",
        tf32=False,
    )
    rounds = 200 if device == "cuda" else max(3, int(2e6 // (B * T * H)))
    with no_tf32():  # as checked: cuDNN's GRU in fp32, like the fused kernel
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2 if device == "cpu" else 10)
