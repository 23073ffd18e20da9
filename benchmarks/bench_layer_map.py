"""Where a training step's layer time goes: every layer of G and D, timed alone at the shapes and
with the gradients one training step gives it, times the number of calls per step.

The map answers what a profile of the whole step answers only with work: which layers hold the
time, and how near each runs to the hardware. It records one step of a provider of
``bench_train_step.py`` (eager; the step's own modules, weights and inputs): a pre-forward hook
on every *layer* (a fused conv block, or a module without children outside one: conv, linear,
norm, activation, GRU) keeps the first inputs of each distinct call, whether grad mode was on,
and which parameters wanted gradients. Each distinct call is then replayed alone: forward, and
forward + backward where the step runs its backward (grad mode on, and an input or a parameter
that wants a gradient). A layer's share of the step is its calls times its time. The layers'
sum, next to the step's own GPU kernel time, leaves the rest: losses, optimiser, the models'
joins (``cat``, ``tanh``) and whatever else runs between layers.

``--narrow`` also times every conv whose input or output channels are not a multiple of 8 (the
stem on RGB input, the heads) in other forms of the same function (:func:`alternatives`): with
those channels zero-padded to 8 (:func:`vosgan.ops.conv3d_forms.padded_conv`), channel counts
that tensor-core kernels take; and a stride-2, kernel-4 transposed conv also in sub-pixel form
(:func:`vosgan.ops.conv3d_subpixel.conv_transpose3d_subpixel`: a stride-1 conv with 8x the
output channels). The table says whether either is faster, layer by layer, and what each would
save per step; ``VOSGAN_CUDA_CONV=narrow=pad8|subpixel`` runs the model's narrow convs so on
CUDA (:func:`vosgan.ops.conv3d_forms.narrow_cuda_conv`; torch's own by default).

GPU: ``python benchmarks/bench_layer_map.py --device cuda [--preset paper] [--narrow]`` (bf16
autocast as the trainer runs; ``triton.testing.do_bench`` medians). CPU: ``--device cpu
--preset cpu-small`` (``perf_counter`` medians).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from bench_train_step import _make_step, gpu_kernel_ms
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vosgan.nn.conv3d_block import _FusedBlock
from vosgan.ops.conv3d_forms import padded_conv
from vosgan.ops.conv3d_subpixel import (
    conv_transpose3d_subpixel,
    geometry_blocker,
    memory_format_of,
)

_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Call:
    """One distinct call of a layer: its inputs (kept from the first such call) and flags."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    grad_mode: bool
    param_grads: tuple[bool, ...]
    calls: int = 0
    fwd_ms: float = float("nan")
    step_ms: float = float("nan")  # forward, or forward + backward where the step runs it
    gflop: float = 0.0  # of what step_ms times
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def grads(self) -> str:
        """The gradients the step's backward takes through this call: ``"dx+dw"``, ``"dx"``
        (an input's only), ``"dw"`` (the parameters' only) or ``""`` (no backward)."""
        if not self.grad_mode:
            return ""
        dx = any(a.requires_grad for a in self.tensors())
        return "+".join(g for g, on in (("dx", dx), ("dw", any(self.param_grads))) if on)

    @property
    def backward(self) -> bool:
        """Does the step run this call's backward?"""
        return bool(self.grads)

    def tensors(self) -> list[Tensor]:
        """The call's tensor inputs, positional then keyword."""
        return [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, Tensor)]

    def shapes(self) -> str:
        """The tensor inputs' shapes, ``CL`` after a channels-last one."""
        return " ".join(
            "x".join(map(str, a.shape))
            + (" CL" if memory_format_of(a) != torch.contiguous_format else "")
            for a in self.tensors()
        )


def layers(model: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """``model``'s layers: fused conv blocks, and modules without children outside them."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, _FusedBlock):
            inside.append(name)
            yield f"{prefix}.{name}", module
        elif not any(True for _ in module.children()):
            yield f"{prefix}.{name}" if name else prefix, module


def _key(name: str, args: tuple, kwargs: dict, grad_mode: bool, flags: tuple) -> tuple:
    def sig(a: object) -> object:
        return (
            (tuple(a.shape), a.dtype, a.stride(), a.requires_grad) if isinstance(a, Tensor) else a
        )

    named = tuple((k, sig(v)) for k, v in sorted(kwargs.items()))
    return name, tuple(map(sig, args)), named, grad_mode, flags


def _keep(a: object) -> object:
    """A tensor argument copied (values, layout, requires_grad); anything else as it is."""
    return a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a


@contextmanager
def recording(models: dict[str, nn.Module]) -> Iterator[dict[tuple, Call]]:
    """Record every layer call of ``models`` (prefix -> model) while the block runs."""
    calls: dict[tuple, Call] = {}
    handles = []
    for prefix, model in models.items():
        for name, module in layers(model, prefix):

            def hook(module, args, kwargs, name=name):
                flags = tuple(p.requires_grad for p in module.parameters())
                key = _key(name, args, kwargs, torch.is_grad_enabled(), flags)
                if key not in calls:
                    kept = tuple(map(_keep, args))
                    kwargs = {k: _keep(v) for k, v in kwargs.items()}
                    calls[key] = Call(name, module, kept, kwargs, torch.is_grad_enabled(), flags)
                calls[key].calls += 1

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _as_recorded(call: Call) -> Iterator[None]:
    params = list(call.module.parameters())
    before = [p.requires_grad for p in params]
    for p, flag in zip(params, call.param_grads, strict=True):
        p.requires_grad_(flag)
    try:
        with torch.set_grad_enabled(call.grad_mode):
            yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def replay(call: Call, forward: Callable[..., object], backward: bool) -> Callable[[], None]:
    """A closure running ``forward(*args, **kwargs)`` on ``call``'s kept inputs, and with
    ``backward`` the backward of its outputs into random gradients."""
    inplace = getattr(call.module, "inplace", False)
    args = call.args
    state: dict[str, list[Tensor]] = {}

    def run() -> None:
        fresh = tuple(a.clone() if inplace and isinstance(a, Tensor) else a for a in args)
        out = forward(*fresh, **call.kwargs)
        if not backward:
            return
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if "grads" not in state:
            state["grads"] = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, state["grads"])

    return run


def _time(fn: Callable[[], None], device: str, leaves: list[Tensor], rounds: int) -> float:
    """Median ms of ``fn``; the ``leaves``' gradients are reset to None before each call."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=leaves, warmup=10, rep=50, return_mode="median")
    times = []
    for _ in range(rounds + 1):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def _gflop(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure(call: Call, autocast, device: str, rounds: int, forward=None, key="") -> None:
    """Time ``call`` (forward; forward + backward where the step runs it) into its fields, or
    with ``forward`` given, into ``call.extra[key]``."""
    fwd_fn = forward or call.module
    leaves = [a for a in call.tensors() if a.requires_grad]
    leaves += [p for p in call.module.parameters()]
    with _as_recorded(call):

        def under_autocast(backward: bool) -> Callable[[], None]:
            inner = replay(call, fwd_fn, backward)

            def run() -> None:
                with autocast:
                    inner()

            return run

        fwd = under_autocast(False)
        full = under_autocast(call.backward)
        full()  # warm-up: cuDNN's autotuning, Triton's compilation
        if forward is not None:
            call.extra[key] = _time(full, device, leaves, rounds)
            return
        call.fwd_ms = _time(fwd, device, leaves, rounds)
        call.step_ms = _time(full, device, leaves, rounds) if call.backward else call.fwd_ms
        call.gflop = _gflop(full)


def is_narrow(module: nn.Module) -> bool:
    """A conv whose input or output channels are not a multiple of 8."""
    return isinstance(module, _CONVS) and (
        module.in_channels % 8 != 0 or module.out_channels % 8 != 0
    )


def alternatives(module: nn.Module, x: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """The other forms ``--narrow`` times for ``module`` (a narrow conv) on input ``x``."""
    forms = {"pad8": lambda t: padded_conv(module, t)}
    if isinstance(module, nn.ConvTranspose3d) and geometry_blocker(x, module) is None:
        forms["subpixel"] = lambda t: conv_transpose3d_subpixel(t, module.weight, module.bias)
    return forms


def layer_map(
    preset: str, device: str, provider: str, batch: int | None, rounds: int, narrow: bool
) -> tuple[list[Call], float]:
    """The recorded layer calls of one ``provider`` step, each measured, and the step's own
    time in ms: its GPU kernel time on a GPU, its wall time on CPU."""
    from vosgan.train import autocast_for

    _, step, run = _make_step(preset, device, batch, provider)
    step()  # warm-up outside the recording
    with recording({"G": run.G, "D": run.D}) as calls:
        step()
    if device == "cuda":
        busy = gpu_kernel_ms(step, 3)
    else:  # the step's wall time
        busy = _time(step, device, [], rounds)
    autocast = autocast_for(run)
    out = list(calls.values())
    for call in out:
        measure(call, autocast, device, rounds)
        if narrow and is_narrow(call.module):
            for form, fn in alternatives(call.module, call.args[0]).items():
                measure(call, autocast, device, rounds, fn, form)
    return out, busy


def table(calls: list[Call], step_ms: float, device: str) -> str:
    """Markdown: one row per distinct call, the largest share of the step first."""
    rows = sorted(calls, key=lambda c: -c.calls * c.step_ms)
    total = sum(c.calls * c.step_ms for c in rows)
    lines = [
        "| layer | input | calls | gradients | fwd ms | ms per call | ms per step | share "
        "| TFLOP/s | other forms: ms per call (speed-up) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        per_step = c.calls * c.step_ms
        rate = c.gflop / c.step_ms if c.step_ms > 0 else float("nan")
        pad = ", ".join(f"{k} {v:.3f} ({c.step_ms / v:.2f}x)" for k, v in c.extra.items())
        lines.append(
            f"| {c.name} | {c.shapes()} | {c.calls} | {c.grads or '-'} "
            f"| {c.fwd_ms:.3f} | {c.step_ms:.3f} | {per_step:.2f} | {per_step / total:.1%} "
            f"| {rate:.1f} | {pad} |"
        )
    lines.append(f"\nLayers' sum: {total:.2f} ms per step.")
    what = "GPU kernel time" if device == "cuda" else "wall time"
    lines.append(f"The step's {what}: {step_ms:.2f} ms; the rest {step_ms - total:.2f} ms.")
    for form, (saved, n) in form_savings(calls).items():
        names = sorted({c.name for c in calls if form in c.extra})
        lines.append(
            f"{form}, used at those of its {n} calls where it timed faster: {saved:.2f} ms less "
            f"per step (calls timed alone; layers: {', '.join(names)})."
        )
    return "\n".join(lines)


def form_savings(calls: list[Call]) -> dict[str, tuple[float, int]]:
    """Per other form: the ms per step it would save, run at every call that has it and is
    faster in it, and the number of distinct calls that have it."""
    out: dict[str, tuple[float, int]] = {}
    for c in calls:
        for form, ms in c.extra.items():
            saved, n = out.get(form, (0.0, 0))
            out[form] = (saved + c.calls * max(0.0, c.step_ms - ms), n + 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--provider", default="fused-cl", help="a bench_train_step.py provider, eager")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per call on CPU")
    p.add_argument("--narrow", action="store_true", help="also time narrow convs in other forms")
    args = p.parse_args()
    if args.provider.endswith("-graph"):
        p.error("--provider: the map replays layers eagerly; name the provider without -graph")
    calls, busy = layer_map(
        args.preset, args.device, args.provider, args.batch, args.rounds, args.narrow
    )
    print(f"preset {args.preset}, provider {args.provider}, device {args.device}")
    print(table(calls, busy, args.device))


if __name__ == "__main__":
    main()
