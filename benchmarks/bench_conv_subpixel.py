"""The stride-2, kernel-4 convs of VOS-GAN in two forms: torch's own (cuDNN / oneDNN) and sub-pixel.

A transposed conv (stride 2, padding 1, kernel 4) is one stride-1, kernel-2 conv with 8x the
output channels plus an interleave (:func:`vosgan.ops.conv3d_subpixel.conv_transpose3d_subpixel`);
a stride-2 conv's input gradient is such a transposed conv. Forms timed, for every conv of the
``paper`` preset's G and D (``benchmarks/bench_conv3d_block.py``'s ``PAPER`` list):

- transposed convs: ``torch`` (``F.conv_transpose3d``), ``subpixel`` (sub-pixel forward and
  backward), ``subpixel-fwd`` (sub-pixel forward, torch's backward), ``subpixel-bwd`` (torch's
  forward and input gradient, sub-pixel weight gradient);
- stride-2 convs: ``torch`` (``F.conv3d``), ``subpixel-dx`` (torch's forward and weight gradient,
  sub-pixel input gradient).

GPU: ``python benchmarks/bench_conv_subpixel.py [batch...]`` prints markdown rows (bf16 autocast,
``channels_last_3d``, ``triton.testing.do_bench`` medians), cudnn.benchmark off unless
``VOSGAN_BENCH_CUDNN_BENCHMARK=1`` (one setting per process: see :func:`gpu_table`). Every form's
output and gradients are checked against torch's in fp32 first. ``--layouts``: torch's transposed
conv by input and weight layout, benchmark on (:func:`layout_table`).
CPU: ``pytest benchmarks/bench_conv_subpixel.py --benchmark-only`` at the ``cpu-small`` shapes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_conv3d_block import CPU_BATCH, CPU_SMALL, PAPER

from vosgan.ops.conv3d_subpixel import subpixel_form_conv

FORMS = {
    True: ("torch", "subpixel", "subpixel-fwd", "subpixel-bwd"),
    False: ("torch", "subpixel-dx"),
}


def conv(form: str, transposed: bool) -> Callable:
    """``f(x, weight)``: the stride-2, padding-1, kernel-4 conv of ``form``."""
    if form == "torch":
        return F.conv_transpose3d if transposed else F.conv3d
    return lambda x, w, *args: subpixel_form_conv(x, w, None, form)


def _inputs(case: tuple, batch: int, device: str, fmt: torch.memory_format):
    _, transposed, _, cin, cout, thw = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cin, *thw, generator=gen).to(device, memory_format=fmt)
    shape = (cin, cout, 4, 4, 4) if transposed else (cout, cin, 4, 4, 4)
    w = (torch.randn(shape, generator=gen) * (cin * 8) ** -0.5).to(device)
    return x.requires_grad_(), w.requires_grad_()


def make_step(
    form: str, case: tuple, batch: int, device: str, mode: str
) -> Callable[[], torch.Tensor]:
    """One ``fwd`` or ``fwd+bwd`` of ``case``'s conv in ``form`` (bf16 autocast on CUDA)."""
    transposed = case[1]
    cuda = device == "cuda"
    fmt = torch.channels_last_3d if cuda else torch.contiguous_format
    x, w = _inputs(case, batch, device, fmt)
    fn = conv(form, transposed)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    with autocast:
        go = torch.randn_like(fn(x, w, None, 2, 1))

    def step() -> torch.Tensor:
        with autocast:
            out = fn(x, w, None, 2, 1)
        if mode == "fwd+bwd":
            out.backward(go)
        return out

    return step


def check_form(form: str, case: tuple, device: str) -> float:
    """Largest error of ``form``'s output, input gradient and weight gradient against torch's,
    relative to each one's largest magnitude; fp32 (no TF32), batch 2. Raises above 1e-4."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results = []
    for f in ("torch", form):
        x, w = _inputs(case, 2, device, torch.contiguous_format)
        out = conv(f, case[1])(x, w, None, 2, 1)
        out.backward(torch.ones_like(out) + out.detach())
        results.append((out.detach(), x.grad, w.grad))
    err = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(*results, strict=True)
    )
    if err > 1e-4:
        raise AssertionError(f"{case[0]} {form}: relative error {err:.2e} against torch's conv")
    torch.backends.cudnn.allow_tf32 = True
    return err


CPU_CASES = [(c, f) for c in CPU_SMALL for f in FORMS[c[1]]]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("case", "provider"), CPU_CASES, ids=[f"{c[0]}-{f}" for c, f in CPU_CASES])
def test_cpu_conv(benchmark, case, provider, mode):
    check_form(provider, case, "cpu")
    step = make_step(provider, case, CPU_BATCH, "cpu", mode)
    benchmark.extra_info.update(
        {"provider": provider, "block": case[0], "shape": [CPU_BATCH, case[3], *case[5]]}
    )
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


def gpu_table(batches: list[int]) -> str:
    """Markdown rows: median ms of each form and the speed-up of the best sub-pixel form over
    torch's conv, with cudnn.benchmark as ``VOSGAN_BENCH_CUDNN_BENCHMARK`` says (default off).

    One setting per process: PyTorch caches the cuDNN plan of each conv shape the first time it
    runs, under a key without the benchmark flag, so a plan picked by the heuristics (benchmark
    off) is reused after benchmark is turned on in the same process.
    """
    from triton.testing import do_bench

    bench_flag = os.environ.get("VOSGAN_BENCH_CUDNN_BENCHMARK") == "1"
    torch.backends.cudnn.benchmark = bench_flag
    name = torch.cuda.get_device_name()
    rows = [
        f"| conv | B | mode | torch ms | sub-pixel forms ms | best/torch | ({name}, torch "
        f"{torch.__version__}, bf16 autocast, channels_last_3d, cudnn.benchmark={bench_flag})",
        "|---|---|---|---|---|---|",
    ]
    for case in PAPER:
        errs = ", ".join(f"{f} {check_form(f, case, 'cuda'):.1e}" for f in FORMS[case[1]][1:])
        print(f"{case[0]}: checked against torch (fp32): {errs}", flush=True)
    for batch in batches:
        for case in PAPER:
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd" and not case[1]:
                    continue  # subpixel-dx: torch's forward
                # the forward of subpixel-fwd is subpixel's, that of subpixel-bwd torch's
                forms = ("torch", "subpixel") if mode == "fwd" else FORMS[case[1]]
                ms = {}
                for form in forms:
                    step = make_step(form, case, batch, "cuda", mode)
                    step()
                    ms[form] = do_bench(step, warmup=25, rep=100, return_mode="median")
                best = min((v, k) for k, v in ms.items() if k != "torch")
                subs = ", ".join(f"{k} {v:.3f}" for k, v in ms.items() if k != "torch")
                rows.append(
                    f"| {case[0]} {case[3]}->{case[4]}{' T' if case[1] else ''} | {batch} | "
                    f"{mode} | {ms['torch']:.3f} | {subs} | {ms['torch'] / best[0]:.2f}x "
                    f"({best[1]}) |"
                )
                print(rows[-1], flush=True)
    return "\n".join(rows)


def layout_table(batch: int = 32) -> str:
    """Markdown rows: torch's transposed conv at two paper shapes with cudnn.benchmark on, by
    the layouts of input and weight: forward, forward + backward, forward + input gradient,
    forward + weight gradient (median ms)."""
    from triton.testing import do_bench

    torch.backends.cudnn.benchmark = True
    cl, cf = torch.channels_last_3d, torch.contiguous_format
    rows = [
        "| conv | B | x | weight | fwd | fwd+bwd | fwd+dx | fwd+dw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in [c for c in PAPER if c[0] in ("G.foreground.1", "D.decoder.2")]:
        for x_fmt, w_fmt in [(cl, cl), (cl, cf), (cf, cf)]:
            x, w = _inputs(case, batch, "cuda", x_fmt)
            w = w.detach().to(memory_format=w_fmt).requires_grad_()
            with torch.autocast("cuda", torch.bfloat16):
                go = torch.randn_like(F.conv_transpose3d(x, w, None, 2, 1))

            def step(mode: int, x=x, w=w, go=go) -> None:
                with torch.autocast("cuda", torch.bfloat16):
                    y = F.conv_transpose3d(x, w, None, 2, 1)
                if mode == 1:
                    y.backward(go)
                elif mode > 1:
                    torch.autograd.grad(y, x if mode == 2 else w, go)

            ms = [do_bench(lambda m=m: step(m), warmup=10, rep=40) for m in range(4)]
            rows.append(
                f"| {case[0]} {case[3]}->{case[4]} T | {batch} | {_fmt(x_fmt)} | {_fmt(w_fmt)} | "
                + " | ".join(f"{v:.3f}" for v in ms)
                + " |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows)


def _fmt(fmt: torch.memory_format) -> str:
    return "channels_last_3d" if fmt == torch.channels_last_3d else "contiguous"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_conv_subpixel.py: the table needs a CUDA GPU (CPU: run it through pytest)")
    args = sys.argv[1:]
    if args[:1] == ["--layouts"]:
        print(layout_table())
    else:
        print(gpu_table([int(b) for b in args] or [32, 64]))
