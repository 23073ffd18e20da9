"""Where a training step's layer time goes: every layer of G and D, timed alone at the shapes and
with the gradients one training step gives it, times the number of calls per step.

The map answers what a profile of the whole step answers only with work: which layers hold the
time, and how near each runs to the hardware. It records one step of a provider of
``bench_train_step.py`` (eager; the step's own modules, weights and inputs). On every *layer*
(a fused conv block, or a module without children outside one: conv, linear, norm,
activation, GRU) a pre-forward hook keeps the first inputs of each distinct call, whether grad
mode was on and which parameters wanted gradients, and counts the call; a grad hook on its
outputs counts the backward passes the step runs through it (D's dense heads on a real clip
run forward only, say, until the motion pseudo-labels start). Each distinct call is then
replayed alone, forward and forward + backward. A call's share of the step is its forwards
times the forward's time plus its backwards times the backward's. The layers' sum, next to the
step's own time, leaves the rest: losses, optimiser, the models' joins (``cat``, ``tanh``).

``--narrow`` also times the narrow convs that ``fuse_modules`` swaps in (D's RGB stem and the
dense heads: at most 4 channels on one side, where tensor-core kernels want multiples of 8) in
the other forms ``VOSGAN_CUDA_CONV=narrow=pad8|subpixel`` gives them
(:func:`vosgan.ops.conv3d_forms.narrow_cuda_conv`): channels zero-padded to 8, or sub-pixel.
The table says whether either is faster, layer by layer, and what each would save per step.

GPU: ``python benchmarks/bench_layer_map.py --device cuda [--preset paper] [--narrow]`` (bf16
autocast as the trainer runs; each call's GPU kernel time from torch.profiler, as the step's
own is taken). CPU: ``--device cpu --preset cpu-small`` (``perf_counter`` medians).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from bench_train_step import _make_step, gpu_kernel_ms
from torch import Tensor, nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils.flop_counter import FlopCounterMode

from vosgan.nn.conv3d_block import _FusedBlock, _SubpixelMixin
from vosgan.ops.conv3d_forms import narrow_cuda_conv
from vosgan.ops.conv3d_subpixel import (
    memory_format_of,
)


@dataclass
class Timing:
    """One way of running a call: ms of its forward and of forward + backward (the same where
    no backward is timed), and the GFLOP of each."""

    fwd_ms: float
    full_ms: float
    fwd_gflop: float = 0.0
    full_gflop: float = 0.0

    def per_step(self, call: Call) -> float:
        """ms per step: every forward of ``call``, and its backward as often as the step runs it."""
        return call.calls * self.fwd_ms + call.backwards * (self.full_ms - self.fwd_ms)

    def gflop_per_step(self, call: Call) -> float:
        return call.calls * self.fwd_gflop + call.backwards * (self.full_gflop - self.fwd_gflop)


@dataclass
class Call:
    """One distinct call of a layer: its inputs (kept from the first such call), its flags, how
    often the step runs it forward and backward, and its timings (``""``: as the step runs it;
    else another form of the same function)."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    grad_mode: bool
    param_grads: tuple[bool, ...]
    calls: int = 0
    backwards: int = 0  # backward passes the step ran through this call's outputs
    timings: dict[str, Timing] = field(default_factory=dict)

    @property
    def grads(self) -> str:
        """The gradients a backward through this call takes: ``"dx+dw"``, ``"dx"`` (an
        input's only), ``"dw"`` (the parameters' only) or ``""`` (none possible)."""
        if not self.grad_mode:
            return ""
        dx = any(a.requires_grad for a in self.tensors())
        return "+".join(g for g, on in (("dx", dx), ("dw", any(self.param_grads))) if on)

    @property
    def per_step_ms(self) -> float:
        return self.timings[""].per_step(self)

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
        if isinstance(a, Tensor):
            return tuple(a.shape), a.dtype, a.stride(), a.requires_grad
        return tuple(a) if isinstance(a, list) else a  # output_size=[...] and the like

    named = tuple((k, sig(v)) for k, v in sorted(kwargs.items()))
    return name, tuple(map(sig, args)), named, grad_mode, flags


def _keep(a: object) -> object:
    """A tensor argument copied (values, layout, requires_grad); anything else as it is."""
    return a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a


def _outputs(out: object) -> list[Tensor]:
    """The tensors of a layer's output (a tensor or a tuple/list of them) that carry a graph."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, Tensor) and o.requires_grad]


@contextmanager
def recording(models: dict[str, nn.Module]) -> Iterator[dict[tuple, Call]]:
    """Record every layer call of ``models`` (prefix -> model) while the block runs: its inputs
    (the first time), its forward calls, and the backward passes through its outputs (a grad
    hook on them fires once per backward that reaches them)."""
    calls: dict[tuple, Call] = {}
    current: dict[int, tuple] = {}  # module id -> the key of the call in progress
    handles = []

    def before(module, args, kwargs, name):
        flags = tuple(p.requires_grad for p in module.parameters())
        key = _key(name, args, kwargs, torch.is_grad_enabled(), flags)
        if key not in calls:
            kept = tuple(map(_keep, args))
            kept_kw = {k: _keep(v) for k, v in kwargs.items()}
            calls[key] = Call(name, module, kept, kept_kw, torch.is_grad_enabled(), flags)
        calls[key].calls += 1
        current[id(module)] = key

    def after(module, args, kwargs, out):
        call = calls[current.pop(id(module))]
        outs = _outputs(out)
        if outs:

            def count(_grads, call=call) -> None:
                call.backwards += 1

            register_multi_grad_hook(outs, count, mode="any")

    for prefix, model in models.items():
        for name, module in layers(model, prefix):
            pre = functools.partial(before, name=name)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
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
        outs = _outputs(out) if backward else []
        if not outs:
            return
        if "grads" not in state:
            state["grads"] = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, state["grads"])

    return run


def _time(fn: Callable[[], None], device: str, leaves: list[Tensor], rounds: int) -> float:
    """ms of one call of ``fn``, the ``leaves``' gradients reset to None before each: on a GPU
    the kernel time of ``rounds`` calls (torch.profiler, as the step's own GPU time is taken),
    their mean; on CPU the median wall time of ``rounds`` calls."""

    def once() -> None:
        for t in leaves:
            t.grad = None
        fn()

    if device == "cuda":
        return gpu_kernel_ms(once, rounds)
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def _gflop(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure(call: Call, autocast, device: str, rounds: int, form: str = "", forward=None) -> None:
    """Time ``call`` into ``call.timings[form]``: as the step runs it (``forward`` None: the
    module), or with ``forward(*args)`` in its place. The backward is timed where the step ran
    one through this call."""
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

        fwd, full = under_autocast(False), under_autocast(call.backwards > 0)
        full()  # warm-up: cuDNN's autotuning, Triton's compilation
        fwd_ms = _time(fwd, device, leaves, rounds)
        full_ms = _time(full, device, leaves, rounds) if call.backwards else fwd_ms
        timing = Timing(fwd_ms, max(full_ms, fwd_ms), _gflop(fwd), _gflop(full))
    call.timings[form] = timing


def narrow_forms(module: nn.Module) -> dict[str, Callable[[Tensor], Tensor]]:
    """The other forms ``VOSGAN_CUDA_CONV=narrow=...`` can give ``module``: for the narrow convs
    ``fuse_modules`` swaps in (the ``Subpixel*`` modules), each form of
    :func:`vosgan.ops.conv3d_forms.narrow_cuda_conv` but torch's own; nothing for others."""
    if not isinstance(module, _SubpixelMixin):
        return {}
    return {
        form: functools.partial(narrow_cuda_conv, conv=module, form=form)
        for form in ("pad8", "subpixel")
    }


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
    busy = _time(step, device, [], rounds)
    autocast = autocast_for(run)
    out = list(calls.values())
    t0 = time.perf_counter()
    for i, call in enumerate(out, 1):
        measure(call, autocast, device, rounds)
        for form, fn in narrow_forms(call.module).items() if narrow else ():
            measure(call, autocast, device, rounds, form, fn)
        if i % 10 == 0 or i == len(out):  # progress on stderr: the table comes at the end
            print(f"{i}/{len(out)} calls timed, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out, busy


def table(calls: list[Call], step_ms: float, device: str) -> str:
    """Markdown: one row per distinct call, the largest share of the step first."""
    rows = sorted(calls, key=lambda c: -c.per_step_ms)
    total = sum(c.per_step_ms for c in rows)
    lines = [
        "| layer | input | calls | backwards | gradients | fwd ms | bwd ms | ms per step | share "
        "| TFLOP/s | narrow forms: ms per step (speed-up) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        t = c.timings[""]
        per_step = c.per_step_ms
        rate = t.gflop_per_step(c) / per_step if per_step > 0 else float("nan")
        others = ", ".join(
            f"{form} {o.per_step(c):.3f} ({per_step / o.per_step(c):.2f}x)"
            for form, o in c.timings.items()
            if form
        )
        bwd = f"{t.full_ms - t.fwd_ms:.3f}" if c.backwards else "-"
        lines.append(
            f"| {c.name} | {c.shapes()} | {c.calls} | {c.backwards} | {c.grads or '-'} "
            f"| {t.fwd_ms:.3f} | {bwd} | {per_step:.2f} | {per_step / total:.1%} "
            f"| {rate:.1f} | {others} |"
        )
    lines.append(f"\nLayers' sum: {total:.2f} ms per step.")
    what = "GPU kernel time" if device == "cuda" else "wall time"
    lines.append(f"The step's {what}: {step_ms:.2f} ms; the rest {step_ms - total:.2f} ms.")
    for form, (net, best, names) in form_savings(calls).items():
        lines.append(
            f"{form} saves {net:.2f} ms per step at every call VOSGAN_CUDA_CONV=narrow={form} "
            f"gives it ({', '.join(names)}), {best:.2f} ms where it timed faster only "
            "(calls timed alone)."
        )
    return "\n".join(lines)


def form_savings(calls: list[Call]) -> dict[str, tuple[float, float, list[str]]]:
    """Per narrow form: the ms per step it saves (negative: costs) run at every call that has
    it, as ``VOSGAN_CUDA_CONV=narrow=FORM`` runs it; the ms it saves at the calls where it timed
    faster only; and the layers it applies to."""
    out: dict[str, tuple[float, float, list[str]]] = {}
    for c in calls:
        for form, timing in c.timings.items():
            if form:
                net, best, names = out.get(form, (0.0, 0.0, []))
                gain = c.per_step_ms - timing.per_step(c)
                out[form] = (net + gain, best + max(0.0, gain), sorted({*names, c.name}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--provider", default="fused-cl", help="a bench_train_step.py provider, eager")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--narrow", action="store_true", help="also time narrow convs in other forms")
    args = p.parse_args()
    if args.provider.endswith("-graph") or args.provider == "compile":
        p.error("--provider: the map hooks and replays eager layers: not -graph or compile")
    calls, busy = layer_map(
        args.preset, args.device, args.provider, args.batch, args.rounds, args.narrow
    )
    print(f"preset {args.preset}, provider {args.provider}, device {args.device}")
    print(table(calls, busy, args.device))


if __name__ == "__main__":
    main()
