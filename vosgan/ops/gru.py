"""GRU trajectory encoder over a whole sequence (single layer, unidirectional, batch first).

Gate equations and weight layout are PyTorch's ``nn.GRU`` (gate order r, z, n)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

The fused op (``vosgan._C``, sources in ``csrc/``) runs the whole sequence in one call:
``torch.ops.vosgan.gru_forward`` returns the states and a workspace holding everything backward
needs; ``torch.ops.vosgan.gru_backward`` returns every gradient at once. Autograd is registered
in C++ (``csrc/gru_autograd.cpp``: the Python ``torch.library.register_autograd`` wrapper cost
0.5-2 ms a call on the CPU box) and the fake (shape) implementations here, so the ops work under
``torch.compile``.

Dtypes: float32, float16 and bfloat16 compute and accumulate in float32 (outputs and gradients in
the input dtype); float64 (CPU only) computes in float64, for ``gradcheck``.

Double backward is not supported: VOS-GAN's R1 penalty differentiates D only, and the generator
needs only first-order gradients of the GRU weights. Differentiating the backward (e.g.
``create_graph=True`` followed by another ``backward``) raises a ``RuntimeError`` instead of
returning wrong gradients; use ``impl="reference"`` if you need it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from vosgan import backend

try:
    from vosgan import _C
except ImportError as exc:  # reported by fused_impl, the backend report and a one-time warning
    _C = None
    _EXT_ERROR = f"vosgan._C not importable ({exc}); reinstall with a C++ compiler"
else:
    _EXT_ERROR = ""

_IMPLS = ("auto", "reference", "cpp", "cuda")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def gru_reference(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """Step-by-step GRU in plain PyTorch (the test oracle).

    Args:
        x: inputs ``(B, T, I)``.
        h0: initial state ``(B, H)``.
        w_ih: ``(3H, I)``; w_hh: ``(3H, H)``; b_ih, b_hh: ``(3H,)``.

    Returns:
        ``(out, h_T)``: every step's state ``(B, T, H)`` and the last one ``(B, H)``.
    """
    gi = torch.nn.functional.linear(x, w_ih, b_ih)  # all steps' input projections at once
    h = h0
    outs = []
    for t in range(x.shape[1]):
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi[:, t].chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, dim=1), h


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    if _C is None:
        return None, _EXT_ERROR
    if device.type == "cpu":
        try:
            isa = _C.gru_cpu_isa()
        except RuntimeError as exc:  # VOSGAN_GRU_ISA names a clone this CPU cannot run
            return None, str(exc)
        return "cpp", (
            "vosgan._C CPU kernel (one call per sequence, at::parallel_for over batch, "
            f"{isa} gate loops, {_C.gru_cpu_gemm()})"
        )
    if device.type == "cuda":
        if _C.cuda_compiled:
            return "cuda", "vosgan._C persistent CUDA kernel (one launch per sequence)"
        return None, (
            "vosgan._C was built without CUDA kernels (torch was CPU-only or nvcc was missing "
            "at build time); rebuild on a machine with both"
        )
    return None, f"no fused GRU for device type {device.type!r}"


def _check_args(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> None:
    if x.dim() != 3:
        raise ValueError(f"gru: x must be (B, T, I), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"gru: x has dtype {x.dtype}; supported: {', '.join(map(str, _DTYPES))}")
    B, T, n_in = x.shape
    if B == 0 or T == 0 or n_in == 0:
        raise ValueError(f"gru: x must have B, T, I > 0, got shape {tuple(x.shape)}")
    if w_hh.dim() != 2 or w_hh.shape[0] != 3 * w_hh.shape[1]:
        raise ValueError(f"gru: w_hh must be (3H, H), got shape {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    expected = {"h0": (B, H), "w_ih": (3 * H, n_in), "b_ih": (3 * H,), "b_hh": (3 * H,)}
    for name, t in (("h0", h0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)):
        if t is None:
            continue
        if name in expected and tuple(t.shape) != expected[name]:
            raise ValueError(f"gru: {name} must have shape {expected[name]}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"gru: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(
                f"gru: {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                "cast all arguments to one dtype"
            )


@torch.compiler.assume_constant_result  # decided once: a trace-time constant, no graph break
def auto_impl(device_type: str) -> str:
    """The implementation ``impl="auto"`` runs on ``device_type``; warns once on fallback."""
    choice = backend.choose("gru", device_type)
    if not choice.fused:
        backend.warn_once(f"gru-{device_type}", f"gru: reference ({choice.reason})")
    return choice.impl


def gru(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Single-layer GRU over the whole sequence with the implementation chosen by ``impl``.

    Args:
        x: inputs ``(B, T, I)``.
        h0: initial state ``(B, H)``, or ``None`` for zeros.
        w_ih: ``(3H, I)``; w_hh: ``(3H, H)``; b_ih, b_hh: ``(3H,)`` or ``None`` (no bias).
        impl: ``"auto"`` (ask :mod:`vosgan.backend`), ``"reference"``, ``"cpp"`` (CPU kernel)
            or ``"cuda"`` (CUDA kernel).

    Returns:
        ``(out, h_T)``: every step's state ``(B, T, H)`` and the last one ``(B, H)`` (a view of
        ``out``), in ``x``'s dtype.
    """
    if impl not in _IMPLS:
        raise ValueError(f"gru: unknown impl {impl!r}; use one of {_IMPLS}")
    _check_args(x, h0, w_ih, w_hh, b_ih, b_hh)
    B, H = x.shape[0], w_hh.shape[1]
    if h0 is None:
        h0 = x.new_zeros(B, H)
    if b_ih is None:
        b_ih = x.new_zeros(3 * H)
    if b_hh is None:
        b_hh = x.new_zeros(3 * H)
    if impl == "auto":
        impl = auto_impl(x.device.type)
        why = cuda_blocker(x.dtype, H, x.device.index) if impl == "cuda" else None
        if why is not None:
            backend.warn_once(f"gru-cuda-{why}", f"gru: reference ({why})")
            impl = "reference"
    if impl == "reference":
        return gru_reference(x, h0, w_ih, w_hh, b_ih, b_hh)
    if _C is None:
        raise RuntimeError(f"gru: impl={impl!r} needs the C++ extension: {_EXT_ERROR}")
    if impl != ("cuda" if x.device.type == "cuda" else "cpp"):
        raise ValueError(f"gru: impl={impl!r} does not run on {x.device.type} tensors")
    out, _ = torch.ops.vosgan.gru_forward(
        x.contiguous(),
        h0.contiguous(),
        w_ih.contiguous(),
        w_hh.contiguous(),
        b_ih.contiguous(),
        b_hh.contiguous(),
    )
    return out, out[:, -1]


@torch.compiler.assume_constant_result  # a trace-time constant: no graph break
@functools.cache
def cuda_blocker(dtype: torch.dtype, hidden: int, device_index: int | None) -> str | None:
    """Why the CUDA kernel cannot run a ``dtype`` GRU of ``hidden`` units on CUDA device
    ``device_index`` (``None``: the current one), or ``None``.

    The kernel is float32/16/bf16 only, and each of its ``ceil(H / U)`` cooperative blocks holds
    ``U`` units' rows of ``w_hh`` (``3 U H`` floats) in shared memory, ``U`` the smallest power
    of two up to 16 that gives at most one block per SM (``units_per_block`` in
    ``csrc/gru_cuda.cu``).
    """
    if dtype == torch.float64:
        return "float64 runs the reference: the CUDA kernel is float32/float16/bfloat16"
    props = torch.cuda.get_device_properties(
        torch.cuda.current_device() if device_index is None else device_index
    )
    sms = props.multi_processor_count
    units = next((u for u in (1, 2, 4, 8) if -(-hidden // u) <= sms), 16)
    smem = 12 * units * hidden
    if smem > props.shared_memory_per_block_optin:
        return (
            f"hidden size {hidden} needs {smem} bytes of shared memory per block in the CUDA "
            f"kernel, {props.name} allows {props.shared_memory_per_block_optin}"
        )
    return None


def _fake_check(x: Tensor, *others: Tensor) -> None:
    """The fake kernels' share of the C++ checks: one device and dtype (a tensor on ``meta``
    among real ones would otherwise dispatch here and return uninitialised memory)."""
    for t in others:
        torch._check(
            t.device == x.device and t.dtype == x.dtype,
            lambda t=t: (
                f"gru: every argument must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}"
            ),
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:

    @torch.library.register_fake("vosgan::gru_forward")
    def _gru_forward_fake(
        x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
    ) -> tuple[Tensor, Tensor]:
        _fake_check(x, h0, w_ih, w_hh, b_ih, b_hh)
        B, T, _ = x.shape
        H = w_hh.shape[1]
        return x.new_empty(B, T, H), x.new_empty(B, T, 5 * H, dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("vosgan::gru_backward")
    def _gru_backward_fake(
        grad_out: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, ws: Tensor
    ) -> tuple[Tensor, ...]:
        _fake_check(x, grad_out, h0, w_ih, w_hh)
        torch._check(
            ws.device == x.device and ws.dtype == _acc_dtype(x.dtype),
            lambda: f"gru_backward: ws must be {_acc_dtype(x.dtype)} on {x.device}",
        )
        H3 = w_hh.shape[0]
        return (
            x.new_empty(x.shape),
            h0.new_empty(h0.shape),
            w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(H3),
            w_hh.new_empty(H3),
        )
