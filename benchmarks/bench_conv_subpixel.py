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
a bf16 ``channels_last_3d`` input as in the model, ``triton.testing.do_bench`` medians),
cudnn.benchmark off unless ``VOSGAN_BENCH_CUDNN_BENCHMARK=1`` (one setting per process: see
:func:`gpu_table`). Every form's output and gradients are checked against torch's first, in fp32
(:func:`check_form`) and in the timed configuration (:func:`check_timed`). ``--layouts``: torch's
transposed conv by input and weight layout, benchmark on (:func:`layout_table`).
CPU: ``pytest benchmarks/bench_conv_subpixel.py --benchmark-only`` at the ``cpu-small`` shapes
(fp32, contiguous: the fp32 check is the timed configuration's). fwd+bwd takes the gradients of
x and the weight with ``autograd.grad`` (no ``.grad`` accumulates between rounds).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_conv3d_block import CPU_BATCH, CPU_SMALL, PAPER
from reference_check import Tol, check, no_tf32, outputs, upcast

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


def _inputs(
    case: tuple,
    batch: int,
    device: str,
    fmt: torch.memory_format,
    dtype: torch.dtype = torch.float32,
):
    """``(x, weight)``, seeded; ``x`` in ``dtype`` and ``fmt``, the weight in fp32 (a parameter:
    autocast casts it)."""
    _, transposed, _, cin, cout, thw = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cin, *thw, generator=gen).to(device, dtype, memory_format=fmt)
    shape = (cin, cout, 4, 4, 4) if transposed else (cout, cin, 4, 4, 4)
    w = (torch.randn(shape, generator=gen) * (cin * 8) ** -0.5).to(device)
    return x.requires_grad_(), w.requires_grad_()


def timed_config(device: str) -> tuple[torch.memory_format, torch.dtype, bool]:
    """``(layout, x dtype, bf16 autocast)`` that :func:`make_step` times on ``device``: CUDA as
    the fused blocks run in the model (channels_last_3d, bf16 activations, bf16 autocast), CPU
    fp32 contiguous."""
    if device == "cuda":
        return torch.channels_last_3d, torch.bfloat16, True
    return torch.contiguous_format, torch.float32, False


def make_step(
    form: str, case: tuple, batch: int, device: str, mode: str
) -> Callable[[], torch.Tensor]:
    """One ``fwd`` or ``fwd+bwd`` of ``case``'s conv in ``form``, in :func:`timed_config`."""
    fmt, dtype, amp = timed_config(device)
    x, w = _inputs(case, batch, device, fmt, dtype)
    fn = conv(form, case[1])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)
    with autocast:
        go = torch.randn_like(fn(x, w, None, 2, 1))

    def step() -> torch.Tensor:
        with autocast:
            out = fn(x, w, None, 2, 1)
        if mode == "fwd+bwd":
            torch.autograd.grad(out, (x, w), go)
        return out

    return step


def check_form(form: str, case: tuple, device: str) -> float:
    """Largest error of ``form``'s output, input gradient and weight gradient against torch's,
    relative to each one's largest magnitude; fp32 (no TF32; the flags are restored after),
    contiguous, batch 2. Raises above 1e-4."""
    results = []
    with no_tf32():
        for f in ("torch", form):
            x, w = _inputs(case, 2, device, torch.contiguous_format)
            out = conv(f, case[1])(x, w, None, 2, 1)
            go = torch.ones_like(out) + out.detach()
            results.append((out.detach(), *torch.autograd.grad(out, (x, w), go)))
    err = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(*results, strict=True)
    )
    if err > 1e-4:
        raise AssertionError(f"{case[0]} {form}: relative error {err:.2e} against torch's conv")
    return err


def check_timed(form: str, case: tuple, device: str, batch: int = 2, amp: bool | None = None):
    """``form``'s output and gradients (x, weight) against torch's conv in the configuration
    :func:`make_step` times (:func:`timed_config`: on CUDA a bf16 channels_last_3d input under
    bf16 autocast) at ``batch``: the same dtypes, and each error against torch's conv in fp32
    without TF32 at most 2x torch's own in the timed configuration, plus 2e-3 of the max
    (benchmarks/reference_check.py's low-precision rule). ``amp``: force bf16 autocast on or off
    (a CPU test of the rule); the fp32 case compares element-wise (1e-4 of the max)."""
    fmt, dtype, timed_amp = timed_config(device)
    amp = timed_amp if amp is None else amp
    x, w = _inputs(case, batch, device, fmt, torch.bfloat16 if amp else dtype)

    def run(f: str, amp: bool = amp) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        fn = conv(f, case[1])

        def call(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                return fn(x, w, None, 2, 1)

        return call

    with torch.no_grad():
        out = run("torch")(x, w)
    gen = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=gen).to(out)
    wrt = {"x": x, "w": w}
    want, got = (outputs(run(f), [x, w], wrt, go) for f in ("torch", form))
    exact = None
    if amp:
        x32, w32 = upcast([x, w])
        with no_tf32():
            exact = outputs(run("torch", amp=False), [x32, w32], {"x": x32, "w": w32}, go.float())
    what = f"{case[0]} {form} timed configuration B={batch} {device} (autocast={amp})"
    tol = Tol(0, 1e-4, scaled=True)
    check(what, got, want, tol, exact=exact, floor=2e-3)


CPU_CASES = [(c, f) for c in CPU_SMALL for f in FORMS[c[1]]]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("case", "provider"), CPU_CASES, ids=[f"{c[0]}-{f}" for c, f in CPU_CASES])
def test_cpu_conv(benchmark, case, provider, mode):
    import triton

    check_form(provider, case, "cpu")  # fp32 contiguous: also the timed configuration
    step = make_step(provider, case, CPU_BATCH, "cpu", mode)
    benchmark.extra_info.update(
        {
            "provider": provider,
            "block": case[0],
            "shape": [CPU_BATCH, case[3], *case[5]],
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
    )
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


def gpu_table(batches: list[int]) -> str:
    """Markdown rows: median ms of each form and the speed-up of the best sub-pixel form over
    torch's conv (torch's median / the best form's: above 1 is faster), with cudnn.benchmark as
    ``VOSGAN_BENCH_CUDNN_BENCHMARK`` says (default off). Each form is checked first in fp32 and
    in the timed configuration (:func:`check_timed`, at batch 2).

    One setting per process: PyTorch caches the cuDNN plan of each conv shape the first time it
    runs, under a key without the benchmark flag, so a plan picked by the heuristics (benchmark
    off) is reused after benchmark is turned on in the same process.
    """
    from triton.testing import do_bench

    bench_flag = os.environ.get("VOSGAN_BENCH_CUDNN_BENCHMARK") == "1"
    torch.backends.cudnn.benchmark = bench_flag
    name = torch.cuda.get_device_name()
    rows = [
        f"| conv | B | mode | torch ms | sub-pixel forms ms | speed-up (torch/best) | ({name}, "
        f"torch {torch.__version__}, bf16 autocast, bf16 channels_last_3d input, "
        f"cudnn.benchmark={bench_flag})",
        "|---|---|---|---|---|---|",
    ]
    for case in PAPER:
        errs = ", ".join(f"{f} {check_form(f, case, 'cuda'):.1e}" for f in FORMS[case[1]][1:])
        for f in FORMS[case[1]][1:]:
            check_timed(f, case, "cuda")
        print(f"{case[0]}: checked against torch (fp32: {errs}; bf16 CL3d: ok)", flush=True)
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
    forward + weight gradient (median ms; bf16 input, as in the model)."""
    from triton.testing import do_bench

    torch.backends.cudnn.benchmark = True
    cl, cf = torch.channels_last_3d, torch.contiguous_format
    rows = [
        "| conv | B | x | weight | fwd | fwd+bwd | fwd+dx | fwd+dw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in [c for c in PAPER if c[0] in ("G.foreground.1", "D.decoder.2")]:
        for x_fmt, w_fmt in [(cl, cl), (cl, cf), (cf, cf)]:
            x, w = _inputs(case, batch, "cuda", x_fmt, torch.bfloat16)
            w = w.detach().to(memory_format=w_fmt).requires_grad_()
            with torch.autocast("cuda", torch.bfloat16):
                go = torch.randn_like(F.conv_transpose3d(x, w, None, 2, 1))

            def step(mode: int, x=x, w=w, go=go) -> None:
                with torch.autocast("cuda", torch.bfloat16):
                    y = F.conv_transpose3d(x, w, None, 2, 1)
                if mode == 1:
                    torch.autograd.grad(y, (x, w), go)
                elif mode > 1:
                    torch.autograd.grad(y, x if mode == 2 else w, go)

            ms = [
                do_bench(lambda m=m: step(m), warmup=10, rep=40, return_mode="median")
                for m in range(4)
            ]
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
