"""Mask compositing benchmarks: reference (eager) / fused / ``torch.compile(reference)``.

Forward (no grad) and forward+backward (``autograd.grad`` w.r.t. f, m, b) at VOS-GAN shapes.
CPU: fp32, the cpu-small and paper shapes, fused = numba. GPU (skipped without CUDA): bf16 and
fp32 at B = 8..64, T = 16..32, 64 x 64, fused = Triton; each GPU row also records the
``triton.testing.do_bench`` median, the bytes the op must move, the GB/s that gives and the
fraction of a same-size device copy's bandwidth (the achievable HBM bandwidth), per call and
replayed as a CUDA graph (GPU time only). Before timing, each fused case checks its output (and
gradients) against the reference's on the same inputs (:func:`check_provider`); each ``compile``
case compiles afresh with static shapes and records ``compiled_graphs`` (:mod:`compile_case`).
With ``--benchmark-disable`` (the GPU session's checks) nothing is timed: only the checks and
the warm-up calls run.

Run: ``pytest benchmarks/bench_composite.py --benchmark-only``. First calls (numba compile or
cache load, Triton JIT, inductor compile) happen before timing.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
from compile_case import compile_case, graph_count, graphs_since, strict_recompiles
from reference_check import Tol, check, outputs, upcast

from vosgan.ops.composite import composite, composite_reference

CUDA = torch.cuda.is_available()
CPU_SHAPES = [(16, 3, 16, 32, 32), (8, 3, 32, 64, 64)]  # cpu-small and paper presets
GPU_SHAPES = [(8, 3, 16, 64, 64), (16, 3, 32, 64, 64), (32, 3, 32, 64, 64), (64, 3, 32, 64, 64)]
PROVIDERS = ["reference", "fused", "compile"]
#: GPU only: the fused op with its backward's frames split over programs for small batches
#: (``VOSGAN_COMPOSITE_T_SPLIT=auto``; not yet the default).
GPU_PROVIDERS = [*PROVIDERS, "fused-tsplit"]


def _versions() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if CUDA else f"CPU {platform.machine()} x{os.cpu_count()}"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__}


def _fn(provider: str, device: str):
    """``provider``'s ``(f, m, b) -> v`` (``compile``: a fresh compile, for one case)."""
    if provider == "reference":
        return composite_reference
    if provider in ("fused", "fused-tsplit"):
        impl = "triton" if device == "cuda" else "numba"
        return lambda f, m, b: composite(f, m, b, impl=impl)
    return compile_case(composite_reference)


def _inputs(shape, dtype, device):
    bsz, c, t, h, w = shape
    f = torch.randn(bsz, c, t, h, w, device=device).tanh().to(dtype).requires_grad_()
    m = torch.rand(bsz, 1, t, h, w, device=device).to(dtype).requires_grad_()
    b = torch.randn(bsz, c, h, w, device=device).tanh().to(dtype).requires_grad_()
    g = torch.randn(f.shape, device=device).to(dtype)
    return f, m, b, g


def min_bytes(shape, itemsize: int, mode: str) -> int:
    """Bytes the op must move: fwd reads f, m, b, writes v; bwd reads g, f, m, b, writes
    df, dm, db (each tensor once)."""
    bsz, c, t, h, w = shape
    big, mask, bg = bsz * c * t * h * w, bsz * t * h * w, bsz * c * h * w
    fwd = 2 * big + mask + bg
    bwd = 3 * big + 2 * mask + 2 * bg
    return itemsize * (fwd + (bwd if mode == "fwd+bwd" else 0))


def _step(fn, f, m, b, g, mode):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn(f, m, b)
    else:

        def run():
            return torch.autograd.grad(fn(f, m, b), (f, m, b), g)

    return run


def _outputs(fn, args, g, mode):
    if mode == "fwd":
        with torch.no_grad():
            return outputs(fn, args)
    return outputs(fn, args, dict(zip("fmb", args, strict=True)), g)


def check_provider(provider, device, f, m, b, g, mode) -> None:
    """``provider``'s v (and df, dm, db for fwd+bwd) against the reference's on the same inputs,
    with the tolerances of tests/test_composite.py: fp32 element-wise 1e-5; bf16/fp16 at most
    2x the error of the reference run in that dtype, both against the reference in fp32."""
    if provider not in ("fused", "fused-tsplit"):  # compile: inductor's numerics
        return
    args = (f, m, b)
    want = _outputs(composite_reference, args, g, mode)
    exact = None
    if f.dtype != torch.float32:
        exact = _outputs(composite_reference, upcast(args), g.float(), mode)
    got = _outputs(_fn(provider, device), args, g, mode)
    what = f"composite {provider} {mode} {f.dtype} {tuple(f.shape)}"
    check(what, got, want, Tol(1e-5, 1e-5), exact=exact, floor=1e-6)


def _bench(benchmark, provider, shape, dtype, device, mode, rounds):
    from vosgan.kernels import composite as kernels

    policy = kernels.T_SPLIT
    kernels.T_SPLIT = "auto" if provider == "fused-tsplit" else policy
    try:
        _bench_case(benchmark, provider, shape, dtype, device, mode, rounds)
    finally:
        kernels.T_SPLIT = policy


def _warm(provider: str, run, what: str) -> dict:
    """Three calls of ``run`` (compile / cache load / JIT) before timing; for ``compile``, the
    ``extra_info`` entry saying how many graphs dynamo compiled for the case."""
    start = graph_count()
    with strict_recompiles():
        for _ in range(3):
            run()
    return {"compiled_graphs": graphs_since(start, what)} if provider == "compile" else {}


def _bench_case(benchmark, provider, shape, dtype, device, mode, rounds):
    f, m, b, g = _inputs(shape, dtype, device)
    check_provider(provider, device, f, m, b, g, mode)  # once, before timing
    run = _step(_fn(provider, device), f, m, b, g, mode)
    info = _warm(provider, run, f"composite {provider} {mode} {dtype} {shape}")
    if benchmark.disabled:  # --benchmark-disable: checked and warmed up, nothing to time
        return
    info |= {
        **_versions(),
        "shape": "x".join(map(str, shape)),
        "dtype": str(dtype)[6:],
        "provider": provider,
        "mode": mode,
        "min_bytes": min_bytes(shape, torch.empty((), dtype=dtype).element_size(), mode),
    }
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        x = torch.empty(info["min_bytes"] // 2, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        copy_ms = triton.testing.do_bench(
            lambda: y.copy_(x), warmup=25, rep=200, return_mode="median"
        )
        info.update(
            do_bench_ms=ms,
            gbps=info["min_bytes"] / ms / 1e6,
            copy_gbps=info["min_bytes"] / copy_ms / 1e6,
            of_copy_bw=copy_ms / ms,
        )
        # The same step replayed as a CUDA graph: GPU time without the host's dispatch and
        # autograd overhead, which dominates per-call timings at these sizes.
        try:
            gms = triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median")
            gcopy = triton.testing.do_bench_cudagraph(
                lambda: y.copy_(x), rep=200, return_mode="median"
            )
            info.update(
                graph_ms=gms, graph_gbps=info["min_bytes"] / gms / 1e6, graph_of_copy_bw=gcopy / gms
            )
        except RuntimeError as exc:  # recorded in the row, not hidden
            info.update(graph_error=f"{type(exc).__name__}: {exc}"[:200])

        def timed():
            run()
            torch.cuda.synchronize()
    else:
        timed = run
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_composite_cpu(benchmark, shape, provider, mode):
    _bench(benchmark, provider, shape, torch.float32, "cpu", mode, rounds=20)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_composite_gpu(benchmark, shape, dtype, provider, mode):
    _bench(benchmark, provider, shape, dtype, "cuda", mode, rounds=50)


def interleaved(device: str = "cpu", rounds: int = 40) -> str:
    """Providers timed round by round (one call each per round), so load from other processes
    hits them alike; a markdown table of medians and minima in ms, and the speed-ups over the
    reference (its median / the provider's: above 1 is faster)."""
    import statistics
    import time

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lines = [
        "| shape | mode | reference ms | fused ms | compile ms | speed-up (ref/fused) "
        "| speed-up (ref/compile) |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in CPU_SHAPES if device == "cpu" else GPU_SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            f, m, b, g = _inputs(shape, dtype, device)
            check_provider("fused", device, f, m, b, g, mode)
            runs = {p: _step(_fn(p, device), f, m, b, g, mode) for p in PROVIDERS}
            times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
            for p, run in runs.items():
                _warm(p, run, f"composite {p} {mode} {dtype} {shape}")
            for _ in range(rounds):
                for p, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[p].append((time.perf_counter() - t0) * 1e3)
            med = {p: statistics.median(v) for p, v in times.items()}
            low = {p: min(v) for p, v in times.items()}
            cells = [f"{med[p]:.2f} (min {low[p]:.2f})" for p in PROVIDERS]
            lines.append(
                f"| {'x'.join(map(str, shape))} | {mode} | "
                + " | ".join(cells)
                + f" | {med['reference'] / med['fused']:.1f}x"
                + f" | {med['reference'] / med['compile']:.1f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(interleaved(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
