"""Flow-warping loss: eager reference vs fused vs ``torch.compile(reference)``.

Providers: ``reference`` (``grid_sample`` + Charbonnier + mean, eager), ``fused``
(:func:`vosgan.ops.flow_warp.flow_warp_loss`: Triton on GPU, numba on CPU), ``compile``
(``torch.compile`` of the reference, compiled afresh for each case with static shapes:
:mod:`compile_case`; each row records ``compiled_graphs``). Modes: ``fwd`` (no grad),
``fwd+bwd`` (D step: gradient w.r.t. the flow only), ``fwd+bwd_x`` (also w.r.t. the video: the
bilinear scatter).
Inputs as in training: ``x (B, 3, T, H, W)``, D's flow of a few pixels, the in-bounds weight.

- CPU (fp32): the ``cpu-small`` shape (16, 3, 16, 32, 32) and the ``paper`` shape at B=8
  (8, 3, 32, 64, 64) through pytest-benchmark.
- GPU (bf16 and fp32): B = 8, 32, 64, T = 16/32, 64x64. ``python benchmarks/bench_flow_warp.py``
  prints the markdown rows of ``benchmarks/RESULTS.md`` (perf_counter medians on CPU; on a GPU
  ``triton.testing.do_bench`` medians per call, and a second row "(GPU)" of the same calls
  replayed from CUDA graphs: GPU time without the host's dispatch), with the device and an
  effective GB/s (minimum bytes moved / time).

The fused providers are checked once against the reference on the same inputs before they are
timed (:func:`check_provider`; ``compile`` is not: inductor's own dflow differs by up to 4e-4 of
its max at the cpu-small shape).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from unittest import mock

import pytest
import torch
from compile_case import compile_case, graph_count, graphs_since, strict_recompiles
from reference_check import Tol, check, outputs, upcast

from vosgan.ops import flow_warp as fw
from vosgan.ops.flow_warp import flow_warp_loss, flow_warp_loss_reference

CPU_SHAPES = {"cpu-small": (16, 3, 16, 32, 32), "paper-b8": (8, 3, 32, 64, 64)}
GPU_SHAPES = {
    "b8-t16": (8, 3, 16, 64, 64),
    "b32-t32": (32, 3, 32, 64, 64),
    "b64-t32": (64, 3, 32, 64, 64),
}
PROVIDERS = ("reference", "fused", "compile")
#: GPU only, with the video's gradient: the fused op under the other ways of scattering it
#: (``vosgan.kernels.flow_warp.DX_MODE``), not yet timed on a GPU.
DX_PROVIDERS = {"fused-dx-1px": "loop-1px", "fused-dx-rgbvec": "rgb-vec"}
MODES = ("fwd", "fwd+bwd", "fwd+bwd_x")


def validity(flow: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T-1, H, W)``: 1 where the flow lands inside the frame (computed on the detached
    flow, as the training loss does)."""
    _, _, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device).view(h, 1)
    xs = torch.arange(w, device=flow.device).view(1, w)
    px, py = xs + flow[:, 0:1], ys + flow[:, 1:2]
    return ((px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)).to(flow.dtype)


def make_inputs(shape: tuple, device: str, dtype: torch.dtype, mode: str) -> tuple:
    """``(x, flow, weight, wrt)``: the seeded inputs of a case; ``wrt`` names the tensors its
    backward differentiates (none for ``fwd``)."""
    torch.manual_seed(0)
    b, c, t, h, w = shape
    x = torch.rand(b, c, t, h, w, device=device).to(dtype)
    flow = (torch.randn(b, 2, t - 1, h, w, device=device) * 2).to(dtype)
    weight = validity(flow)
    x.requires_grad_(mode == "fwd+bwd_x")
    flow.requires_grad_(mode != "fwd")
    wrt = {} if mode == "fwd" else {"flow": flow, **({"x": x} if mode == "fwd+bwd_x" else {})}
    return x, flow, weight, wrt


def loss_fn(provider: str, device: str) -> Callable[..., torch.Tensor]:
    """``provider``'s ``(x, flow, weight) -> loss`` (``compile``: a fresh compile, for one
    case)."""
    impl = "triton" if device == "cuda" else "numba"
    if provider == "reference":
        return flow_warp_loss_reference
    if provider == "fused":
        return partial(flow_warp_loss, impl=impl)
    if provider in DX_PROVIDERS:  # another way to scatter the video's gradient
        from vosgan.kernels import flow_warp as kernels

        setting = mock.patch.object(kernels, "DX_MODE", DX_PROVIDERS[provider])
    elif provider == "fused-alt":  # the other ONE_PASS policy, to check the default's choice
        setting = mock.patch.dict(fw.ONE_PASS, {impl: not fw.ONE_PASS[impl]})
    else:
        return compile_case(flow_warp_loss_reference)

    def fused_with_setting(*args: torch.Tensor) -> torch.Tensor:
        with setting:
            return flow_warp_loss(*args, impl=impl)

    return fused_with_setting


def _outputs(fn: Callable[..., torch.Tensor], args: list, wrt: dict) -> dict[str, torch.Tensor]:
    with torch.set_grad_enabled(bool(wrt)):
        return outputs(fn, args, wrt)


def check_provider(provider: str, shape: tuple, device: str, dtype: torch.dtype, mode: str) -> None:
    """``provider``'s loss (and dflow, dx where the mode times them) against the reference's on
    the same inputs, with the tolerances of tests/test_flow_warp.py at these sizes
    (test_gpu_matches_reference): fp32 loss 1e-5, gradients 1e-4 of their max (sums of ~10^5
    terms: summation order); bf16 at most 2x the error of the reference run in bf16 (+ 1e-3 of
    the max), both against the reference in fp32."""
    if not provider.startswith("fused"):  # compile: inductor's numerics, not this repo's kernels
        return
    x, flow, weight, wrt = make_inputs(shape, device, dtype, mode)
    args = [x, flow, weight]
    want = _outputs(flow_warp_loss_reference, args, wrt)
    exact = None
    if dtype != torch.float32:
        args32 = upcast(args)
        wrt32 = {k: args32[1 if k == "flow" else 0] for k in wrt}
        exact = _outputs(flow_warp_loss_reference, args32, wrt32)
    got = _outputs(loss_fn(provider, device), args, wrt)
    what = f"flow_warp_loss {provider} {mode} {dtype} {shape}"
    check(what, got, want, Tol(1e-5, 1e-6), grad_tol=Tol(0, 1e-4, scaled=True), exact=exact)


def make_step(
    provider: str, shape: tuple, device: str, dtype: torch.dtype, mode: str, sync: bool = True
) -> Callable[[], None]:
    """One call of the loss (and its backward) for ``provider``, checked against the reference
    once before it is returned (``compile``: checked to have compiled). ``sync``: end each call
    with ``torch.cuda.synchronize()`` (for wall-clock timers; ``do_bench`` times with CUDA events
    and needs none)."""
    check_provider(provider, shape, device, dtype, mode)
    x, flow, weight, wrt = make_inputs(shape, device, dtype, mode)
    start = graph_count()
    fn = loss_fn(provider, device)
    inputs = list(wrt.values())
    wait = torch.cuda.synchronize if device == "cuda" and sync else (lambda: None)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(x, flow, weight)
        else:
            torch.autograd.grad(fn(x, flow, weight), inputs)
        wait()

    with strict_recompiles():
        step()  # numba / inductor compile, Triton autotune and launch caches
    if provider == "compile":
        graphs_since(start, f"flow_warp_loss compile {mode} {dtype} {shape}")
    return step


def min_bytes(shape: tuple, dtype: torch.dtype, mode: str) -> int:
    """Bytes a perfect implementation moves: read x, flow, weight; write dflow (and dx)."""
    # The floor for any implementation, and what the GB/s column divides: each input read once,
    # each gradient written once, in ``dtype``: 0.13 GB for fwd+bwd at B=64, T=32, 64x64, bf16
    # (0.18 GB with dx). The one-pass fused op moves more by construction: its forward also
    # writes the unit dflow in fp32 (+65 MB), its backward reads it and writes dflow (+98 MB):
    # 0.26 GB (0.39 GB counting the eager rescale's fp32 temporary). A two-pass op re-reading
    # x, flow and weight moves 0.23 GB. notes/performance.md's ">= ~0.55 GB" matches none of
    # these (all of the two-pass in fp32 is 0.46 GB): 0.13 GB is the minimum to quote.
    b, c, t, h, w = shape
    e = torch.finfo(dtype).bits // 8
    pix = b * (t - 1) * h * w
    n = b * c * t * h * w + pix * 3  # x, flow (2), weight (1)
    if mode != "fwd":
        n += 2 * pix  # dflow
    if mode == "fwd+bwd_x":
        n += b * c * t * h * w  # dx
    return n * e


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _extra(
    benchmark,
    provider: str,
    name: str,
    shape: tuple,
    mode: str,
    device: str,
    dtype: torch.dtype,
    start: int,
) -> None:
    """The row's ``extra_info``; ``start``: :func:`graph_count` before the case was built."""
    import triton

    benchmark.group = f"flow_warp {device} {name} {mode}"
    benchmark.extra_info.update(
        {
            "device": _device_name(device),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""),
            "provider": provider,
            "mode": mode,
            "min_bytes": min_bytes(shape, dtype, mode),
        }
    )
    if provider == "compile":
        what = f"flow_warp_loss compile {mode} {dtype} {shape}"
        benchmark.extra_info["compiled_graphs"] = graphs_since(start, what)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", sorted(CPU_SHAPES))
def test_flow_warp_cpu(benchmark, name: str, provider: str, mode: str) -> None:
    shape = CPU_SHAPES[name]
    start = graph_count()
    step = make_step(provider, shape, "cpu", torch.float32, mode)
    _extra(benchmark, provider, name, shape, mode, "cpu", torch.float32, start)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", [*PROVIDERS, *DX_PROVIDERS])
@pytest.mark.parametrize("name", sorted(GPU_SHAPES))
def test_flow_warp_gpu(benchmark, name: str, provider: str, mode: str, dtype: torch.dtype) -> None:
    if provider in DX_PROVIDERS and mode != "fwd+bwd_x":
        pytest.skip("the dx scatter runs only with the video's gradient")
    shape = GPU_SHAPES[name]
    start = graph_count()
    step = make_step(provider, shape, "cuda", dtype, mode)
    _extra(benchmark, provider, name, shape, mode, "cuda", dtype, start)
    benchmark.pedantic(step, rounds=20, iterations=5, warmup_rounds=2)


def _median_ms(step: Callable[[], None], device: str) -> tuple[float, float | None]:
    """``(per call, GPU)`` medians in ms. Per call: ``do_bench`` on a GPU (CUDA events around
    calls queued back to back: the larger of host and GPU time), wall clock on CPU. GPU: the
    call replayed from a CUDA graph (``do_bench_cudagraph``: no host dispatch or autograd), None
    on CPU or where the call cannot be captured (the reason is printed)."""
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        try:
            graph = triton.testing.do_bench_cudagraph(step, rep=200, return_mode="median")
        except RuntimeError as exc:
            print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:160]})")
            graph = None
        return ms, graph
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def main(device: str, shapes: list[str], dtypes: list[torch.dtype]) -> None:
    """Print one markdown row per shape, dtype and mode: median ms per call for each provider and
    the ratios (``alt ms``: the fused op under the other ``ONE_PASS`` policy); on a GPU a second
    row gives the same from CUDA-graph replays (GPU time alone)."""
    import triton

    print(f"device: {_device_name(device)}; torch {torch.__version__}, triton {triton.__version__}")
    print(
        "| shape (B,C,T,H,W) | dtype | mode | reference ms | compile ms | fused ms | alt ms | "
        "speed-up (ref/fused) | speed-up (compile/fused) | fused GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    all_shapes = {**GPU_SHAPES, **CPU_SHAPES}
    for name in shapes:
        shape = all_shapes[name]
        for dtype in dtypes:
            for mode in MODES:
                provs = (*PROVIDERS, "fused-alt") if mode != "fwd" else PROVIDERS
                if mode == "fwd+bwd_x" and device == "cuda":
                    provs = (*provs, *DX_PROVIDERS)
                both = {
                    p: _median_ms(make_step(p, shape, device, dtype, mode, sync=False), device)
                    for p in provs
                }
                for timing, col in (("", 0), (" (GPU)", 1)):
                    ms = {p: t[col] for p, t in both.items()}
                    if None in ms.values():
                        continue
                    dx = ", ".join(f"{p} {ms[p]:.3f}" for p in DX_PROVIDERS if p in ms)
                    gbs = min_bytes(shape, dtype, mode) / ms["fused"] / 1e6
                    alt = f"{ms['fused-alt']:.3f}" if "fused-alt" in ms else "-"
                    print(
                        f"| {shape} | {str(dtype)[6:]} | {mode}{timing} | {ms['reference']:.3f} "
                        f"| {ms['compile']:.3f} | {ms['fused']:.3f} | {alt} | "
                        f"{ms['reference'] / ms['fused']:.2f}x | "
                        f"{ms['compile'] / ms['fused']:.2f}x | {gbs:.1f} |"
                        + (f" ms: {dx}" if dx else ""),
                        flush=True,
                    )


if __name__ == "__main__":
    # python benchmarks/bench_flow_warp.py [shape names...] [--fp32-only | --bf16-only]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(
        GPU_SHAPES if dev == "cuda" else CPU_SHAPES
    )
    dtypes = [torch.bfloat16, torch.float32] if dev == "cuda" else [torch.float32]
    if "--fp32-only" in sys.argv or "--bf16-only" in sys.argv:
        dtypes = [torch.float32 if "--fp32-only" in sys.argv else torch.bfloat16]
    main(dev, names, dtypes)
