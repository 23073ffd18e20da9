"""Which form a fused conv block's stride-2, kernel-4 conv takes on CUDA: torch's (cuDNN) or one
of the sub-pixel forms of :mod:`vosgan.ops.conv3d_subpixel`; and which form the narrow convs
(:func:`narrow_cuda_conv`: D's RGB stem, the dense heads) take there.

:data:`CUDA_FORMS` holds the choice per kind of conv; :func:`cuda_conv` runs a conv in it.
``"tune"`` times the candidate forms on the first call of each input shape and keeps the fastest
(:func:`tuned_form`), the way cudnn.benchmark picks among cuDNN's own kernels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vosgan import backend
from vosgan.ops.conv3d_subpixel import geometry_blocker, subpixel_form_conv

#: The form each stride-2, kernel-4 conv of a fused block takes on CUDA by default:
#:
#: - transposed convs: ``"auto"`` (the default: ``"subpixel"`` while
#:   ``torch.backends.cudnn.benchmark`` is off, ``"torch"`` while it is on), ``"torch"`` (cuDNN),
#:   ``"subpixel"`` (sub-pixel forward and backward), ``"subpixel-fwd"`` (sub-pixel forward,
#:   cuDNN backward), ``"subpixel-bwd"`` (cuDNN forward and input gradient, sub-pixel weight
#:   gradient; not yet timed on a GPU), ``"tune"`` (the fastest of ``TUNE_CANDIDATES`` for each
#:   input, timed on its first call: :func:`tuned_form`; not yet run on a GPU);
#: - stride-2 convs: ``"torch"`` (the default), ``"subpixel-dx"`` (cuDNN forward and weight
#:   gradient, sub-pixel input gradient);
#: - narrow convs (the ``Subpixel*`` modules ``fuse_modules`` swaps in: at most 4 channels on
#:   the narrow side, which tensor-core kernels want in multiples of 8): ``"torch"`` (the
#:   default), ``"pad8"`` (:func:`padded_conv`: both channel counts zero-padded to multiples of
#:   8, the result sliced back), ``"subpixel"`` (a transposed conv in sub-pixel form, forward and
#:   backward; a stride-2 conv's input gradient in it, as ``"subpixel-dx"``). Neither other form
#:   is timed on a GPU yet: ``benchmarks/bench_layer_map.py --narrow`` times both at every such
#:   layer of the training step.
#:
#: Why ``auto`` (H100, bf16, channels_last_3d, ``benchmarks/RESULTS.md``, "conv forms"): with
#: cudnn.benchmark off, the sub-pixel form's forward + backward is 3.7-11.7x faster than cuDNN's
#: at every transposed conv of the paper preset (batch 32 and 64): cuDNN's heuristics pick slow
#: backward kernels there (3.9x and 13.1x slower than its benchmark mode's, at the two shapes
#: timed both ways). With benchmark on, cuDNN is the faster: the paper training step took
#: 37.0 ms with cuDNN's transposed convs and 40.4 ms with sub-pixel ones.
#: ``subpixel-dx`` measured 0.97-1.07x cuDNN and is not a default.
#: ``VOSGAN_CUDA_CONV="transposed=FORM,conv=FORM,narrow=FORM"`` sets the forms for a process.
DEFAULT_CUDA_FORMS = {"transposed": "auto", "conv": "torch", "narrow": "torch"}
_FORMS = {
    "transposed": ("auto", "tune", "torch", "subpixel", "subpixel-fwd", "subpixel-bwd"),
    "conv": ("torch", "subpixel-dx"),
    "narrow": ("torch", "pad8", "subpixel"),
}


def _read_cuda_forms(spec: str) -> dict[str, str]:
    """The defaults with ``spec``'s (``VOSGAN_CUDA_CONV``'s) choices over them."""
    forms = dict(DEFAULT_CUDA_FORMS)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, form = item.partition("=")
        if kind not in _FORMS or form not in _FORMS[kind]:
            raise ValueError(
                f"VOSGAN_CUDA_CONV: {item!r} is not one of "
                + ", ".join(f"{k}={'|'.join(v)}" for k, v in _FORMS.items())
            )
        forms[kind] = form
    return forms


#: The forms in use in this process (tests and benchmarks may set them).
CUDA_FORMS = _read_cuda_forms(os.environ.get("VOSGAN_CUDA_CONV", ""))


@torch.compiler.assume_constant_result  # a trace-time constant: no graph break
def cuda_form(kind: str) -> str:
    """The form :data:`CUDA_FORMS` gives ``kind`` (``"transposed"`` or ``"conv"``) now, with
    ``"auto"`` resolved against ``torch.backends.cudnn.benchmark``."""
    form = CUDA_FORMS[kind]
    return _auto() if form == "auto" else form


@torch.compiler.assume_constant_result  # read once per trace, like cuda_form
def _auto() -> str:
    """``"auto"``'s transposed-conv form: cuDNN's with cudnn.benchmark on, else sub-pixel."""
    if torch.backends.cudnn.benchmark:
        return "torch"
    backend.warn_once(
        "cuda-subpixel",
        "fused conv blocks on CUDA: transposed convs run in sub-pixel form because "
        "torch.backends.cudnn.benchmark is off (then 3.7-11.7x faster than cuDNN's at "
        "VOS-GAN's shapes on an H100); with benchmark on cuDNN's own runs, or set "
        "VOSGAN_CUDA_CONV=transposed=torch",
    )
    return "subpixel"


def cuda_conv(x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d) -> Tensor:
    """``conv(x)`` for a CUDA ``x`` (``(B, C_in, T, H, W)``), in the form :func:`cuda_form`
    gives ``conv``'s kind where its geometry allows (else torch's own). Same values and
    gradients as ``conv(x)`` up to rounding; differentiable to any order."""
    transposed = isinstance(conv, nn.ConvTranspose3d)
    form = cuda_form("transposed" if transposed else "conv")
    if form == "torch" or geometry_blocker(x, conv) is not None:
        return conv(x)
    if form == "tune":
        # torch.compile traces one graph for every input: there, "tune" is "auto"
        form = _auto() if torch.compiler.is_compiling() else tuned_form(x, conv)
        if form == "torch":
            return conv(x)
    return subpixel_form_conv(x, conv.weight, conv.bias, form)


def _pad_to_8(n: int) -> int:
    return -(-n // 8) * 8


def padded_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)`` for an ``nn.Conv2d/3d`` or ``nn.ConvTranspose2d/3d`` (groups 1), with its input
    and output channels zero-padded to multiples of 8 and the output sliced back: the same
    values, and the unpadded conv's gradients (the padding's weights are zero, built from the
    parameters by ``F.pad``, and take no gradient). ``x (B, C_in, *spatial)`` in any layout; the
    padded input keeps it (a test checks)."""
    if conv.groups != 1:
        raise ValueError(f"padded_conv: groups must be 1, got {conv.groups}")
    cin, cout = conv.in_channels, conv.out_channels
    pin, pout = _pad_to_8(cin) - cin, _pad_to_8(cout) - cout
    nd = x.dim() - 2
    transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    # weight: (C_out, C_in, k...) for a conv, (C_in, C_out, k...) transposed; F.pad: last dim first
    dim1, dim0 = (pout, pin) if transposed else (pin, pout)
    w = F.pad(conv.weight, [0, 0] * nd + [0, dim1, 0, dim0])
    if pin:
        x = F.pad(x, [0, 0] * nd + [0, pin])  # keeps x's layout (channels-last stays so)
    bias = F.pad(conv.bias, [0, pout]) if conv.bias is not None and pout else conv.bias
    if transposed:
        run = F.conv_transpose3d if nd == 3 else F.conv_transpose2d
        y = run(x, w, bias, conv.stride, conv.padding, conv.output_padding, 1, conv.dilation)
    else:
        y = conv._conv_forward(x, w, bias)
    return y[:, :cout] if pout else y


def narrow_cuda_conv(
    x: Tensor, conv: nn.Conv3d | nn.ConvTranspose3d, form: str | None = None
) -> Tensor:
    """``conv(x)`` for a narrow conv on CUDA in ``form`` (by default the one
    ``CUDA_FORMS["narrow"]`` names, see :data:`DEFAULT_CUDA_FORMS`); torch's own forward where
    that form does not apply to ``conv``'s geometry (said once). Same values and gradients up
    to rounding. ``x (B, C_in, T, H, W)``."""
    transposed = isinstance(conv, nn.ConvTranspose3d)
    form = cuda_form("narrow") if form is None else form
    if form == "pad8":
        return padded_conv(conv, x)
    if form == "subpixel":
        why = geometry_blocker(x, conv)
        if why is None:
            return subpixel_form_conv(
                x, conv.weight, conv.bias, "subpixel" if transposed else "subpixel-dx"
            )
        backend.warn_once(
            f"narrow-subpixel-{why}",
            f"VOSGAN_CUDA_CONV narrow=subpixel: {why}; that conv runs torch's own forward",
        )
    parent = nn.ConvTranspose3d if transposed else nn.Conv3d
    return parent.forward(conv, x)


#: The transposed-conv forms ``"tune"`` times.
TUNE_CANDIDATES = ("torch", "subpixel", "subpixel-bwd")
#: The form ``"tune"`` picked for each input (:func:`_tune_key`), for this process.
TUNED: dict[tuple, str] = {}


def _tune_key(x: Tensor, conv: nn.Module, backward: bool) -> tuple:
    """What the speed of a form depends on: shapes, layouts, dtypes (autocast's included), the
    weight's shape, whether a backward follows, and cudnn.benchmark."""
    device = x.device.type
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (
        tuple(x.shape),
        x.stride(),
        x.dtype,
        amp,
        tuple(conv.weight.shape),
        conv.weight.dtype,
        backward,
        torch.backends.cudnn.benchmark,
    )


def _run_form(form: str, x: Tensor, conv: nn.Module, go: Tensor | None) -> Tensor:
    """One forward (and backward against ``go``) of ``conv(x)`` in ``form``, on detached copies
    of the input and parameters: the module's gradients are not touched."""
    w = conv.weight.detach().requires_grad_(conv.weight.requires_grad)
    b = None if conv.bias is None else conv.bias.detach().requires_grad_(conv.bias.requires_grad)
    xd = x.detach().requires_grad_(x.requires_grad)
    with torch.enable_grad() if go is not None else torch.no_grad():
        if form == "torch":
            out = nn.functional.conv_transpose3d(xd, w, b, 2, 1)
        else:
            out = subpixel_form_conv(xd, w, b, form)
        if go is not None:
            wrt = [t for t in (xd, w, b) if t is not None and t.requires_grad]
            torch.autograd.grad(out, wrt, go)
    return out


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after one warm-up call (CUDA events on
    a GPU, the wall clock elsewhere)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def tuned_form(x: Tensor, conv: nn.ConvTranspose3d, timer: Callable[..., float] = _time_ms) -> str:
    """The fastest of :data:`TUNE_CANDIDATES` for ``conv(x)`` (forward, and backward where grad
    mode and a ``requires_grad`` input or parameter ask for one), timed on the first call with
    this input's :func:`_tune_key` and remembered in :data:`TUNED`; each pick is said once.

    While a CUDA graph is being captured nothing can be timed: an input seen before keeps its
    pick, a new one gets ``"auto"``'s choice (said once). (``torch.compile`` does not come here:
    :func:`cuda_conv` gives it ``"auto"``'s choice.)
    """
    needs_grad = x.requires_grad or any(p.requires_grad for p in conv.parameters())
    backward = torch.is_grad_enabled() and needs_grad
    key = _tune_key(x, conv, backward)
    form = TUNED.get(key)
    if form is not None:
        return form
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        fallback = _auto()
        backend.warn_once(
            f"tune-untimed-{key}",
            f"VOSGAN_CUDA_CONV=transposed=tune: input {tuple(x.shape)} first seen inside a "
            f"CUDA-graph capture, where nothing can be timed; using {fallback}",
        )
        return fallback
    with torch.no_grad():
        y = _run_form("torch", x, conv, None)
    go = torch.ones_like(y) if backward else None  # no random numbers: the run's RNG stays put
    ms = {f: timer(lambda f=f: _run_form(f, x, conv, go), x.device) for f in TUNE_CANDIDATES}
    form = min(ms, key=ms.get)
    TUNED[key] = form
    times = ", ".join(f"{f} {v:.3f} ms" for f, v in ms.items())
    backend.warn_once(
        f"tune-{key}",
        f"VOSGAN_CUDA_CONV=transposed=tune: {tuple(x.shape)} -> {tuple(y.shape)} "
        f"{'forward+backward' if backward else 'forward'}: {times}; using {form}",
    )
    return form
