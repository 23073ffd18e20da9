"""Conv3d/ConvTranspose3d + BatchNorm3d + (Leaky)ReLU blocks: eager vs fused vs torch.compile.

Providers: ``eager`` (the ``nn.Sequential`` block: cuDNN/oneDNN conv, native BN, activation),
``fused`` (:class:`vosgan.nn.FusedConv3dBlock`: fused BN + activation; the same conv, except
that on CUDA with cudnn.benchmark off a transposed conv runs in sub-pixel form, see
:mod:`vosgan.ops.conv3d_forms`), ``compile`` (``torch.compile`` of the eager block, compiled
afresh for each case with static shapes: :mod:`compile_case`). Modes: training ``fwd`` and
``fwd+bwd`` (``autograd.grad`` of the input and every parameter: no ``.grad`` accumulates
between rounds).

- GPU (bf16 autocast, ``channels_last_3d``, the input in bf16 as the previous block's output is
  in the model): every block shape of the ``paper`` preset's G and D,
  batch 16 and 64. ``python benchmarks/bench_conv3d_block.py [batch...]`` prints the markdown
  rows of ``benchmarks/RESULTS.md`` (``triton.testing.do_bench`` medians; with
  ``VOSGAN_BENCH_GRAPH=1``, ``do_bench_cudagraph``: GPU time without the host's launches).
- CPU (fp32): the ``cpu-small`` preset's shapes through pytest-benchmark.

Before a fused block is timed, its output and gradients are checked once against the eager
block's on the same input (:func:`check_provider`); each fused row records in ``extra_info``
what ran for BN + activation (``bn_act_impl``: ``triton`` on CUDA, ``reference`` on CPU) and,
on CUDA, the form of a transposed conv (``transposed_conv``). The GPU table's header says both
cudnn.benchmark and that form; one setting per process (``VOSGAN_BENCH_CUDNN_BENCHMARK``):
PyTorch caches each conv's cuDNN plan under a key without the flag.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import sys
from collections.abc import Callable

import pytest
import torch
from compile_case import compile_case, graph_count, graphs_since, strict_recompiles
from reference_check import Tol, check, no_tf32, outputs, upcast

from vosgan.nn import FusedConv3dBlock, FusedConvTranspose3dBlock
from vosgan.ops import conv3d_block as conv3d_block_ops
from vosgan.ops.conv3d_block import conv3d_block_reference
from vosgan.ops.conv3d_forms import cuda_form


def block_shape(block: torch.nn.Sequential, x: torch.Tensor) -> tuple:
    """``(transpose, act, C_in, C_out, (T, H, W) of x)`` of a conv + BN + activation block."""
    conv, act = block[0], block[2]
    return (
        isinstance(conv, torch.nn.ConvTranspose3d),
        "lrelu" if isinstance(act, torch.nn.LeakyReLU) else "relu",
        conv.in_channels,
        conv.out_channels,
        tuple(x.shape[2:]),
    )


def model_blocks(preset: str) -> list[tuple]:
    """Every distinct conv block of ``preset``'s G and D, as the models build them: ``(name,
    transpose, act, C_in, C_out, (T, H, W) of the input)``, k=4, s=2, p=1. Read from one forward
    of the models on the meta device (no memory, no FLOPs): each ``nn.Sequential(conv,
    BatchNorm3d, act)`` that :func:`vosgan.nn.fuse_modules` would swap, named by its module
    path; a shape met again (D's flow encoder and decoder repeat its own) keeps the first name."""
    from vosgan.config import PRESETS
    from vosgan.models.discriminator import Discriminator
    from vosgan.models.generator import Generator
    from vosgan.nn.conv3d_block import _match

    cfg = PRESETS[preset].model
    cases: dict[tuple, str] = {}
    with torch.device("meta"):
        models = {"G": Generator(cfg), "D": Discriminator(cfg)}
        hooks = []
        for prefix, model in models.items():
            for name, module in model.named_modules():
                if not isinstance(_match(module), type):
                    continue

                def hook(module, args, name=f"{prefix}.{name}") -> None:
                    cases.setdefault(block_shape(module, args[0]), name)

                hooks.append(module.register_forward_pre_hook(hook))
        with torch.no_grad():
            out = models["G"](*models["G"].sample_latents(1, device="meta"))
            models["D"](out.video)
        for h in hooks:
            h.remove()
    return [(name, *shape) for shape, name in cases.items()]


def block_gflop(case: tuple, batch: int = 1) -> float:
    """Forward GFLOP of ``case``'s conv at ``batch`` (2 per multiply-add)."""
    _, transpose, _, cin, cout, thw = case
    positions = math.prod(thw) if transpose else math.prod(thw) // 8  # the stride-2 side
    return 2 * batch * cin * cout * 64 * positions / 1e9


PAPER = model_blocks("paper")
CPU_SMALL = model_blocks("cpu-small")
CPU_BATCH = 8
PROVIDERS = ("eager", "fused", "compile")
_LARGEST_CPU = sorted(CPU_SMALL, key=block_gflop)[-2:]


def fused_impl(device: str) -> tuple[str, str]:
    """``(impl, resolved)``: the ``impl`` the fused block is built with, and what runs for BN +
    activation. CUDA asks for ``"triton"`` outright, so that a missing Triton raises instead of
    timing the reference under the fused label; CPU keeps ``"auto"``, which runs the reference
    BN + activation there (no CPU kernel)."""
    impl = "triton" if device == "cuda" else "auto"
    return impl, conv3d_block_ops.auto_impl(device) if impl == "auto" else impl


def _build(provider: str, case: tuple, batch: int, device: str) -> tuple:
    """``(block, x, go, autocast)`` of ``provider``: seeded, so every provider gets the same
    weights, input and output gradient. CUDA: ``x`` in bf16 (the model's activations under
    autocast), channels_last_3d."""
    _, transpose, act, cin, cout, thw = case
    torch.manual_seed(0)
    block = conv3d_block_reference(cin, cout, transpose=transpose, act=act).to(device)
    cuda = device == "cuda"
    fmt = torch.channels_last_3d if cuda else torch.contiguous_format
    block = block.to(memory_format=fmt)
    if provider == "fused":
        cls = FusedConvTranspose3dBlock if transpose else FusedConv3dBlock
        block = cls.from_sequential(copy.deepcopy(block), impl=fused_impl(device)[0])
    elif provider == "compile":
        block = compile_case(block)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(batch, cin, *thw, device=device).to(dtype, memory_format=fmt)
    x.requires_grad_()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    with autocast:
        go = torch.randn_like(block(x))
    return block, x, go, autocast


def _outputs(block: torch.nn.Module, x: torch.Tensor, go: torch.Tensor, autocast, mode: str):
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return block(x)

    wrt = {} if mode == "fwd" else {"x": x, **dict(block.named_parameters())}
    return outputs(forward, [x], wrt, go)


def check_provider(provider: str, case: tuple, batch: int, device: str, mode: str) -> None:
    """The fused block's output (and, for fwd+bwd, the gradients of x and of every parameter)
    against the eager block's on the same input, with the tolerances of
    tests/test_conv3d_block.py: fp32 output 1e-5, gradients 1e-4; bf16 autocast (CUDA) at most
    2x the error of the eager block (+ 2e-3 of the max), both against the eager block in fp32
    without TF32."""
    if provider != "fused":  # compile: inductor's numerics, not this repo's kernels
        return
    ref, x, go, autocast = _build("eager", case, batch, device)
    want = _outputs(ref, x, go, autocast, mode)
    exact = None
    if device == "cuda":
        with no_tf32():
            x32 = upcast([x])[0]
            exact = _outputs(ref, x32, go.float(), contextlib.nullcontext(), mode)
    got = _outputs(_build("fused", case, batch, device)[0], x, go, autocast, mode)
    what = f"{case[0]} fused {mode} B={batch} {device}"
    check(what, got, want, Tol(1e-5, 1e-5), grad_tol=Tol(1e-4, 1e-4), exact=exact, floor=2e-3)


def make_step(provider: str, case: tuple, batch: int, device: str, mode: str) -> Callable[[], None]:
    """One training-mode step of the block (``fwd`` or ``fwd+bwd``) for ``provider``, checked
    against the eager block once before it is returned; warmed up with one call (``compile``:
    checked to have compiled a graph)."""
    check_provider(provider, case, batch, device, mode)
    start = graph_count()  # dynamo compiles on the first call
    block, x, go, autocast = _build(provider, case, batch, device)
    wrt = [x, *block.parameters()]

    def step() -> None:
        with autocast:
            out = block(x)
        if mode == "fwd+bwd":
            torch.autograd.grad(out, wrt, go)

    with strict_recompiles():
        step()  # warm-up (and compile)
    if provider == "compile":
        graphs_since(start, f"{case[0]} compile {mode} B={batch} {device}")
    return step


def _extra(
    benchmark, provider: str, case: tuple, batch: int, mode: str, device: str, start: int
) -> None:
    """The row's ``extra_info``; ``start``: :func:`graph_count` before the case was built."""
    import triton

    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name()
            if device == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "provider": provider,
            "block": case[0],
            "shape": [batch, case[3], *case[5]],
            "c_out": case[4],
            "mode": mode,
        }
    )
    if provider == "compile":
        what = f"{case[0]} compile {mode} B={batch} {device}"
        benchmark.extra_info["compiled_graphs"] = graphs_since(start, what)
    if provider == "fused":  # what ran for BN + activation (the conv is torch's either way)
        benchmark.extra_info["bn_act_impl"] = fused_impl(device)[1]
        if device == "cuda" and case[1]:
            benchmark.extra_info["transposed_conv"] = cuda_form("transposed")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CPU_SMALL, ids=[c[0] for c in CPU_SMALL])
def test_cpu_block(benchmark, case, provider, mode):
    if provider == "compile" and case not in _LARGEST_CPU:
        pytest.skip("torch.compile on CPU: the two largest blocks only (8 s per compile)")
    start = graph_count()
    step = make_step(provider, case, CPU_BATCH, "cpu", mode)
    _extra(benchmark, provider, case, CPU_BATCH, mode, "cpu", start)
    benchmark.pedantic(step, rounds=15, warmup_rounds=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", PAPER, ids=[c[0] for c in PAPER])
def test_gpu_block(benchmark, case, provider, mode, batch):
    start = graph_count()
    step = make_step(provider, case, batch, "cuda", mode)

    def synced() -> None:
        step()
        torch.cuda.synchronize()

    _extra(benchmark, provider, case, batch, mode, "cuda", start)
    benchmark.pedantic(synced, rounds=20, warmup_rounds=3)


def gpu_table(batches: list[int]) -> str:
    """Markdown rows: median ms per provider (do_bench) and the fused block's speed-ups (the
    other provider's median / the fused one's: above 1 is faster), bf16 CL3d."""
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    name = torch.cuda.get_device_name()
    # VOSGAN_BENCH_GRAPH=1: each provider's step replayed from a CUDA graph, so the rows give GPU
    # time alone (eager launches cost the host more than small blocks cost the GPU)
    graph = os.environ.get("VOSGAN_BENCH_GRAPH") == "1"

    def bench(step: Callable[[], None]) -> float:
        if graph:
            return do_bench_cudagraph(step, rep=100, return_mode="median")
        return do_bench(step, warmup=25, rep=100, return_mode="median")

    # VOSGAN_BENCH_CUDNN_BENCHMARK=1: let cuDNN time its conv algorithms (a trainer-wide flag)
    torch.backends.cudnn.benchmark = os.environ.get("VOSGAN_BENCH_CUDNN_BENCHMARK") == "1"
    providers = os.environ.get("VOSGAN_BENCH_PROVIDERS", ",".join(PROVIDERS)).split(",")
    rows = [
        f"| block | B | mode | eager ms | fused ms | compile ms | speed-up (eager/fused) | "
        f"speed-up (compile/fused) |  ({name}, torch {torch.__version__}, "
        f"triton {triton.__version__}, cudnn.benchmark={torch.backends.cudnn.benchmark}, "
        f"fused transposed convs: {cuda_form('transposed')}, "
        f"{'CUDA-graph replay' if graph else 'eager launches'})",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch in batches:
        for case in PAPER:
            for mode in ("fwd", "fwd+bwd"):
                ms = {"compile": float("nan")}
                for provider in providers:
                    step = make_step(provider, case, batch, "cuda", mode)
                    ms[provider] = bench(step)
                rows.append(
                    f"| {case[0]} {case[3]}->{case[4]} | {batch} | {mode} | "
                    f"{ms['eager']:.3f} | {ms['fused']:.3f} | {ms['compile']:.3f} | "
                    f"{ms['eager'] / ms['fused']:.2f}x | "
                    f"{ms['compile'] / ms['fused']:.2f}x |"
                )
                print(rows[-1], flush=True)
    return "\n".join(rows)


def bn_only_table(batch: int = 64) -> str:
    """BN + activation alone on the conv output ``y`` (bf16), eager vs fused, both layouts."""
    from triton.testing import do_bench

    from vosgan.ops.conv3d_block import bn_act

    rows = [
        "| y (C, T, H, W) | B | layout | mode | eager ms | fused ms | speed-up (eager/fused) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, transpose, _, _, cout, thw in PAPER:
        out_thw = tuple(d * 2 if transpose else d // 2 for d in thw)
        for fmt in (torch.channels_last_3d, torch.contiguous_format):
            y = torch.randn(batch, cout, *out_thw, device="cuda", dtype=torch.bfloat16)
            y = y.to(memory_format=fmt).requires_grad_()
            w = torch.ones(cout, device="cuda", requires_grad=True)
            b = torch.zeros(cout, device="cuda", requires_grad=True)
            go = torch.randn_like(y)
            for mode in ("fwd", "fwd+bwd"):
                ms = {}
                for impl in ("reference", "triton"):

                    def step(impl=impl, mode=mode, y=y, w=w, b=b, go=go):
                        out = bn_act(y, w, b, training=True, impl=impl)
                        if mode == "fwd+bwd":
                            torch.autograd.grad(out, (y, w, b), go)

                    ms[impl] = do_bench(step, warmup=25, rep=100, return_mode="median")
                lay = "CL3d" if fmt == torch.channels_last_3d else "NCDHW"
                rows.append(
                    f"| {(cout, *out_thw)} | {batch} | {lay} | {mode} | "
                    f"{ms['reference']:.3f} | {ms['triton']:.3f} | "
                    f"{ms['reference'] / ms['triton']:.2f}x |"
                )
                print(rows[-1], flush=True)
    return "\n".join(rows)


def cpu_table(rounds: int = 30) -> str:
    """CPU rows, eager vs fused at cpu-small shapes: providers interleaved round by round (a
    shared 2-core box drifts), median of the per-round times."""
    import statistics
    import time

    rows = [
        f"| block | B | mode | eager ms | fused ms | speed-up (eager/fused) |  (CPU "
        f"{platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "|---|---|---|---|---|---|",
    ]
    for case in CPU_SMALL:
        for mode in ("fwd", "fwd+bwd"):
            steps = {p: make_step(p, case, CPU_BATCH, "cpu", mode) for p in ("eager", "fused")}
            times: dict[str, list[float]] = {p: [] for p in steps}
            for r in range(rounds + 2):
                for p, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    if r >= 2:  # two warm-up rounds
                        times[p].append(time.perf_counter() - t0)
            ms = {p: 1e3 * statistics.median(t) for p, t in times.items()}
            rows.append(
                f"| {case[0]} {case[3]}->{case[4]} | {CPU_BATCH} | {mode} | "
                f"{ms['eager']:.2f} | {ms['fused']:.2f} | "
                f"{ms['eager'] / ms['fused']:.2f}x |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["bn"]:
        print(bn_only_table())
    elif sys.argv[1:2] == ["cpu"]:
        print(cpu_table())
    else:
        print(gpu_table([int(b) for b in sys.argv[1:]] or [16, 64]))
