"""Flow-warping photometric loss: ``mean(w * rho(x_t - warp(x_{t+1}, u_t)))``.

Conventions (the fused kernels match them):
- ``u`` is forward flow in pixels, channel 0 horizontal (x, columns), channel 1 vertical (y, rows):
  pixel ``(i, j)`` of frame ``t`` moves to ``(i + u_y, j + u_x)`` in frame ``t + 1``.
- Warping samples ``x_{t+1}`` bilinearly at ``(j + u_x, i + u_y)`` with pixel centres at integer
  coordinates (``grid_sample(align_corners=True)``); samples outside the frame read 0
  (``padding_mode="zeros"``) or the nearest edge pixel (``"border"``).
- ``rho(d) = sqrt(d^2 + eps^2)`` (Charbonnier), per channel; ``reduction="mean"`` averages
  ``w * rho`` over every element of ``(B, C, T-1, H, W)``, ``w`` broadcast over channels.
- Gradients follow ``grid_sample``: at an integer sample position the derivative w.r.t. the flow
  is the one-sided difference towards the next pixel, and the fused kernels round the sample
  position exactly as ``flow_to_grid`` + ``grid_sample`` do in fp32, so they pick the same side;
  with ``"border"`` the derivative is 0 at and beyond the border; with ``W == 1`` (``H == 1``) the
  horizontal (vertical) flow gets no gradient.
- Non-finite flow: a nan flow, or a +-inf one with ``"zeros"``, makes that pixel's loss and its
  gradients (``dflow``, ``dx`` of frame ``t``) nan, as in the reference; ``"border"`` clamps
  +-inf to the border as ``grid_sample`` does. The fused kernels also propagate a nan flow with
  ``"border"``, where ``grid_sample`` clamps it in the forward (and its CPU backward crashes).
  One exception: Triton with ``deterministic=True`` accumulates ``dx`` in int64 fixed point, so
  there a nan ``dx`` of frame ``t`` is lost (the loss and ``dflow`` are still nan).
- Empty inputs: ``B = 0`` or ``C = 0`` runs the reference (a nan mean, or an empty map, as
  ``Tensor.mean``); ``H = 0`` or ``W = 0`` is refused, as ``grid_sample`` does.

Fused ops (``torch.library`` custom ops with fake implementations and registered autograd;
``"triton"`` on CUDA tensors, ``"numba"`` on CPU tensors):

- ``vosgan::flow_warp_loss_and_grad``: a mean loss that needs a gradient (the training case)
  runs in one pass: the kernel computes the loss and the fp32 gradients of the mean, and the
  backward only scales them by the incoming gradient (no input is read twice).
- ``vosgan::flow_warp_loss`` + ``vosgan::flow_warp_loss_backward``: the forward alone (no grad,
  or ``reduction="none"``), and a backward that recomputes the warp from ``x`` and ``flow``
  for any incoming gradient map.

- Gradients: ``flow`` always, ``x`` only when ``x.requires_grad``; ``weight`` is a constant (a
  fused call raises when it requires grad: pass ``weight.detach()``).
- Determinism: ``d/dflow`` is a gather (no atomics). ``d/dx`` is a bilinear scatter: fp32 atomics
  on GPU (laid out as ``vosgan.kernels.flow_warp.DX_MODE`` says), or with ``deterministic=True``
  int64 fixed-point atomics (associative: bitwise
  reproducible, 2^-50 of the largest gradient per unit at 64x64). The numba path is race-free
  (private per-frame-pair scatter buffers) and always deterministic.
- dtype/AMP policy: inputs run in their own dtypes (fp32/fp16/bf16; ``x``, ``flow``, ``weight``
  may differ); positions, Charbonnier and sums are computed in fp32. The loss has ``x.dtype``,
  ``dflow`` ``flow.dtype``, ``dx`` ``x.dtype``. Autocast does not cast the op's inputs (it is
  not on an autocast list). The numba path computes in fp32 (fp16/bf16 are upcast); float64
  inputs run the reference under ``impl="auto"`` (which warns once) and are refused by an
  explicit fused ``impl``.
- Double backward: with ``create_graph=True`` the registered backward computes the gradients
  with differentiable torch ops (:func:`warp_differentiable`: ``gather``-based bilinear warp with
  the reference's rounding and conventions), so second derivatives are exact, also where
  ``grid_sample`` has no double backward (torch < 2.12, cuDNN); otherwise the fused
  backward runs. R1 differentiates D's real/fake logit w.r.t. its input and never goes through
  this loss, so the R1 step always uses the fused path where the loss appears at all.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vosgan import backend
from vosgan.kernels._host import MAX_GRID_YZ

PADDING_MODES = ("zeros", "border")
IMPLS = ("auto", "reference", "triton", "numba")
#: Whether a mean loss that needs a gradient runs the one-pass op (loss and fp32 gradients in
#: the forward, scaled in the backward) instead of forward + recomputing backward. Measured
#: fwd+bwd speed-up of one pass: Triton 1.0-2.3x (H100, B=8 and 64, 64x64, bf16/fp32: one
#: kernel instead of two); numba 1.5x for the flow gradient (1 thread, loaded 2-core box,
#: minima: cpu-small 5.3 vs 7.7 ms, paper-b8 16.9 vs 25.2 ms), 1.3x with the video's too.
ONE_PASS = {"numba": True, "triton": True}


def flow_to_grid(flow: Tensor) -> Tensor:
    """Pixel flow ``(N, 2, H, W)`` -> ``grid_sample`` grid ``(N, H, W, 2)`` (align_corners=True)."""
    n, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    px = xs + flow[:, 0]
    py = ys + flow[:, 1]
    gx = 2 * px / max(w - 1, 1) - 1
    gy = 2 * py / max(h - 1, 1) - 1
    return torch.stack((gx, gy), dim=-1)


def warp_reference(x: Tensor, flow: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Bilinear backward warp: ``out[i, j] = x[i + flow_y, j + flow_x]``.

    Args:
        x: images ``(N, C, H, W)``.
        flow: pixel displacements ``(N, 2, H, W)``.
        padding_mode: ``"zeros"`` or ``"border"``.

    Returns:
        ``(N, C, H, W)``.
    """
    return F.grid_sample(
        x,
        flow_to_grid(flow).to(x.dtype),
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=True,
    )


def check_inputs(x: Tensor, flow: Tensor, weight: Tensor | None, padding_mode: str) -> None:
    """Validate shapes, dtypes, devices and options; messages name the offending argument."""
    for name, ten in (("x", x), ("flow", flow), ("weight", weight)):
        if ten is not None and not isinstance(ten, Tensor):
            raise TypeError(f"flow_warp_loss: {name} must be a Tensor, got {type(ten).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
    b, _, t, h, w = x.shape
    if t < 2:
        raise ValueError(f"x needs at least 2 frames (T >= 2), got T={t}")
    if h == 0 or w == 0:  # grid_sample refuses them too; an empty batch (B or C = 0) is fine
        raise ValueError(f"x frames must be non-empty, got H={h}, W={w}")
    if tuple(flow.shape) != (b, 2, t - 1, h, w):
        raise ValueError(
            f"flow must be {(b, 2, t - 1, h, w)} for x {tuple(x.shape)}, got {tuple(flow.shape)}"
        )
    if weight is not None and tuple(weight.shape) != (b, 1, t - 1, h, w):
        raise ValueError(f"weight must be {(b, 1, t - 1, h, w)}, got {tuple(weight.shape)}")
    for name, ten in (("x", x), ("flow", flow), ("weight", weight)):
        if ten is None:
            continue
        if not ten.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {ten.dtype}")
        if ten.device != x.device:
            raise ValueError(f"{name} is on {ten.device} but x is on {x.device}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def flow_warp_loss_reference(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-3,
    padding_mode: str = "zeros",
    reduction: str = "mean",
) -> Tensor:
    """Charbonnier photometric loss between each frame and the next frame warped back by the flow.

    Args:
        x: video ``(B, C, T, H, W)``.
        flow: forward flow in pixels ``(B, 2, T-1, H, W)``.
        weight: optional per-pixel weight ``(B, 1, T-1, H, W)`` (e.g. validity/occlusion).
        eps: Charbonnier epsilon.
        padding_mode: ``"zeros"`` or ``"border"``.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (the weighted map ``(B, C, T-1, H, W)``).
    """
    check_inputs(x, flow, weight, padding_mode)
    b, c, t, h, w = x.shape
    nxt = x[:, :, 1:].transpose(1, 2).reshape(b * (t - 1), c, h, w)
    fl = flow.transpose(1, 2).reshape(b * (t - 1), 2, h, w)
    warped = warp_reference(nxt, fl, padding_mode).reshape(b, t - 1, c, h, w).transpose(1, 2)
    rho = torch.sqrt((x[:, :, :-1] - warped) ** 2 + eps * eps)
    if weight is not None:
        rho = rho * weight
    if reduction == "mean":
        return rho.mean()
    if reduction == "none":
        return rho
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    if device.type == "cuda":
        mode, detail = backend.triton_mode()
        if mode == "gpu":
            return "triton", f"Triton kernels ({detail})"
        return None, f"Triton unavailable on CUDA: {detail}"
    if device.type == "cpu":
        try:
            import vosgan.ops._numba.flow_warp  # noqa: F401
        except ImportError as exc:
            return None, f"numba kernels not importable ({exc})"
        from vosgan.ops._numba.launch import fork_blocker

        if (why := fork_blocker()) is not None:
            return None, why
        return "numba", "numba CPU kernels (fp32; float64 inputs run the reference)"
    return None, f"no fused flow-warp loss for device type {device.type!r}"


def _resolve(impl: str, device: torch.device) -> str:
    """Check that the fused ``impl`` can run on ``device`` (raises with the reason otherwise)."""
    if impl == "numba" and device.type != "cpu":
        raise ValueError(f"flow_warp_loss: impl='numba' runs on CPU tensors, got {device.type}")
    if impl == "triton":
        backend.check_triton_device("flow_warp_loss", device)
    if impl not in ("triton", "numba"):
        raise ValueError(f"flow_warp_loss: unknown impl {impl!r}; use one of {IMPLS}")
    return impl


def _fused_grads(
    grad: Tensor,
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
    deterministic: bool,
    impl: str,
    fp32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dflow, dx or empty, sum of w * rho as a 0-dim fp32 tensor)`` from one fused pass;
    gradients in fp32 when ``fp32``, else in the dtypes of ``flow`` and ``x``."""
    if _resolve(impl, x.device) == "numba":
        from vosgan.ops._numba.flow_warp import launch_bwd

        dflow, dx, total = launch_bwd(grad, x, flow, weight, eps, border, grad_x)
        loss = torch.tensor(total, dtype=torch.float32)
        if not fp32:
            dflow = dflow.to(flow.dtype)
            dx = dx.to(x.dtype) if dx is not None else None
    else:
        from vosgan.kernels.flow_warp import flow_warp_loss_bwd

        dflow, dx, partial = flow_warp_loss_bwd(
            grad,
            x,
            flow,
            weight,
            eps,
            border,
            grad_x,
            deterministic,
            with_loss=fp32,
            fp32_grads=fp32,
        )
        loss = partial.sum() if partial is not None else grad.new_zeros(())
    empty = x.new_empty(0, dtype=torch.float32 if fp32 else x.dtype)
    return dflow, dx if dx is not None else empty, loss


@torch.library.custom_op("vosgan::flow_warp_loss", mutates_args=())
def flow_warp_loss_op(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    mean: bool,
    deterministic: bool,
    impl: str,
) -> Tensor:
    """Fused forward: the mean (0-dim) or the map ``(B, C, T-1, H, W)``, in ``x.dtype``."""
    if _resolve(impl, x.device) == "numba":
        from vosgan.ops._numba.flow_warp import launch_fwd

        return launch_fwd(x, flow, weight, eps, border, mean)
    from vosgan.kernels.flow_warp import flow_warp_loss_fwd

    out = flow_warp_loss_fwd(x, flow, weight, eps, border, reduce=mean)
    if mean:
        b, c, t, h, w = x.shape
        return (out.sum() / (b * c * (t - 1) * h * w)).to(x.dtype)
    return out


@flow_warp_loss_op.register_fake
def _(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    mean: bool,
    deterministic: bool,
    impl: str,
) -> Tensor:
    b, c, t, h, w = x.shape
    return x.new_empty(() if mean else (b, c, t - 1, h, w))


@torch.library.custom_op("vosgan::flow_warp_loss_backward", mutates_args=())
def flow_warp_loss_backward_op(
    grad: Tensor,
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
    deterministic: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """Fused backward: ``(dflow, dx)``; ``grad`` is ``d loss / d (w * rho)`` (one element, or the
    map); ``dx`` is an empty tensor when ``grad_x`` is False."""
    dflow, dx, _ = _fused_grads(
        grad, x, flow, weight, eps, border, grad_x, deterministic, impl, fp32=False
    )
    return dflow, dx


@flow_warp_loss_backward_op.register_fake
def _(
    grad: Tensor,
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
    deterministic: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    return flow.new_empty(flow.shape), x.new_empty(x.shape if grad_x else (0,))


def warp_differentiable(x: Tensor, flow: Tensor, padding_mode: str = "zeros") -> Tensor:
    """:func:`warp_reference` from ``gather`` and arithmetic: the same values and first
    derivatives (same rounding of the sample position, same one-sided convention, border
    gradient 0 at and past the border), and a double backward on every torch version and device
    (``grid_sample``'s has none before torch 2.12 or under cuDNN). ``x (N, C, H, W)``."""
    n, c, h, w = x.shape
    grid = flow_to_grid(flow).to(x.dtype)
    ix = (grid[..., 0] + 1) * ((w - 1) / 2)
    iy = (grid[..., 1] + 1) * ((h - 1) / 2)
    if padding_mode == "border":
        ix = torch.where((ix > 0) & (ix < w - 1), ix, ix.detach().clamp(0, w - 1))
        iy = torch.where((iy > 0) & (iy < h - 1), iy, iy.detach().clamp(0, h - 1))
    x0, y0 = ix.detach().floor(), iy.detach().floor()
    flat = x.reshape(n, c, h * w)
    out = x.new_zeros(x.shape)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        wgt = (ix - x0 if dx else x0 + 1 - ix) * (iy - y0 if dy else y0 + 1 - iy)
        valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().view(n, 1, h * w)
        vals = flat.gather(2, idx.expand(n, c, h * w)).view(n, c, h, w)
        out = out + vals * (wgt * valid).unsqueeze(1)
    return out


def _differentiable_grads(
    grad: Tensor,
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    mean: bool,
    inputs: list[Tensor],
) -> list[Tensor]:
    """Gradients as differentiable graphs (the ``create_graph=True`` path), through
    :func:`warp_differentiable`."""
    b, c, t, h, w = x.shape
    nxt = x[:, :, 1:].transpose(1, 2).reshape(b * (t - 1), c, h, w)
    fl = flow.transpose(1, 2).reshape(b * (t - 1), 2, h, w)
    warped = warp_differentiable(nxt, fl, "border" if border else "zeros")
    warped = warped.reshape(b, t - 1, c, h, w).transpose(1, 2)
    rho = torch.sqrt((x[:, :, :-1] - warped) ** 2 + eps * eps)
    rho = rho * weight if weight is not None else rho
    return list(torch.autograd.grad(rho.mean() if mean else rho, inputs, grad, create_graph=True))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:  # noqa: ANN001 - torch's ctx
    x, flow, weight, eps, border, mean, deterministic, impl = inputs
    ctx.save_for_backward(x, flow, weight)
    ctx.cfg = (eps, border, mean, deterministic, impl)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    x, flow, weight = ctx.saved_tensors
    eps, border, mean, deterministic, impl = ctx.cfg
    need_flow, need_x = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
    dflow = dx = None
    if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops
        inputs = [t for t, need in ((flow, need_flow), (x, need_x)) if need]
        grads = _differentiable_grads(grad, x, flow, weight, eps, border, mean, inputs)
        dflow = grads.pop(0) if need_flow else None
        dx = grads.pop(0) if need_x else None
    elif need_flow or need_x:
        b, c, t, h, w = x.shape
        g = (grad.float() / (b * c * (t - 1) * h * w)).reshape(1) if mean else grad.contiguous()
        dflow, dx = flow_warp_loss_backward_op(
            g, x, flow, weight, eps, border, need_x, deterministic, impl
        )
        dflow = dflow if need_flow else None
        dx = dx if need_x else None
    return dx, dflow, None, None, None, None, None, None


flow_warp_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vosgan::flow_warp_loss_and_grad", mutates_args=())
def flow_warp_loss_and_grad_op(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
    deterministic: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass for a mean loss and its gradient: ``(loss in x.dtype, d mean / d flow (fp32),
    d mean / d x (fp32, empty unless grad_x))``. The autograd formula scales the saved
    gradients by the incoming one, so the backward reads no input again."""
    b, c, t, h, w = x.shape
    n = b * c * (t - 1) * h * w
    g = torch.full((1,), 1.0 / n, device=x.device, dtype=torch.float32)
    dflow, dx, total = _fused_grads(
        g, x, flow, weight, eps, border, grad_x, deterministic, impl, fp32=True
    )
    return (total / n).to(x.dtype), dflow, dx


@flow_warp_loss_and_grad_op.register_fake
def _(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
    deterministic: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    f32 = torch.float32
    return (
        x.new_empty(()),
        flow.new_empty(flow.shape, dtype=f32),
        x.new_empty(x.shape if grad_x else (0,), dtype=f32),
    )


def _setup_context_one_pass(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    x, flow, weight, eps, border, grad_x, deterministic, impl = inputs
    _, dflow, dx = output
    ctx.mark_non_differentiable(dflow, dx)
    ctx.save_for_backward(x, flow, weight, dflow, dx)
    ctx.cfg = (eps, border)
    # no zero-filled gradients for the two non-differentiable outputs (the size of flow and x:
    # two allocations and fills per backward, 0.3 ms at cpu-small on one CPU thread)
    ctx.set_materialize_grads(False)


def _backward_one_pass(
    ctx,  # noqa: ANN001
    grad: Tensor,
    _gd: Tensor,
    _gx: Tensor,
) -> tuple[Tensor | None, ...]:
    x, flow, weight, dflow_unit, dx_unit = ctx.saved_tensors
    need_flow, need_x = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
    if grad is None:  # the loss got no gradient (grads are not materialised)
        return None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops
        eps, border = ctx.cfg
        inputs = [t for t, need in ((flow, need_flow), (x, need_x)) if need]
        grads = _differentiable_grads(grad, x, flow, weight, eps, border, True, inputs)
        dflow = grads.pop(0) if need_flow else None
        dx = grads.pop(0) if need_x else None
    else:
        if need_x and dx_unit.numel() == 0:
            raise RuntimeError(
                "flow_warp_loss_and_grad: x requires grad but the op ran with "
                "grad_x=False (flow_warp_loss sets it from x.requires_grad)"
            )
        g = grad.float()
        dflow = (dflow_unit * g).to(flow.dtype) if need_flow else None
        dx = (dx_unit * g).to(x.dtype) if need_x else None
    return dx, dflow, None, None, None, None, None, None


flow_warp_loss_and_grad_op.register_autograd(
    _backward_one_pass, setup_context=_setup_context_one_pass
)


def flow_warp_loss(
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-3,
    padding_mode: str = "zeros",
    reduction: str = "mean",
    impl: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """Flow-warping loss with the implementation chosen by ``impl``.

    Arguments and shapes as in :func:`flow_warp_loss_reference`, plus:

    Args:
        impl: ``"auto"`` (asks :mod:`vosgan.backend`; warns once when it falls back to the
            reference), ``"reference"``, ``"triton"`` (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"numba"`` (CPU tensors).
        deterministic: make ``d loss / d x`` bitwise reproducible on GPU (fixed-point atomics);
            the other outputs are deterministic anyway. On whenever
            ``torch.use_deterministic_algorithms(True)`` is.

    Returns:
        ``reduction="mean"``: a 0-dim tensor in ``x.dtype``; ``"none"``: ``(B, C, T-1, H, W)``.
    """
    check_inputs(x, flow, weight, padding_mode)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not 0 < eps < math.inf:
        raise ValueError(
            f"eps must be finite and > 0 (the Charbonnier gradient needs it), got {eps}"
        )
    if impl == "auto":
        choice = backend.choose("flow_warp_loss", x.device)
        impl = choice.impl
        if not choice.fused:
            backend.warn_once(
                f"flow_warp-{x.device.type}", f"flow_warp_loss: reference ({choice.reason})"
            )
        elif torch.float64 in (x.dtype, flow.dtype):
            backend.warn_once(
                "flow_warp-f64",
                f"flow_warp_loss: float64 inputs run the reference (the {impl} kernels are fp32)",
            )
            impl = "reference"
        elif impl == "triton" and x.shape[0] * (x.shape[2] - 1) > MAX_GRID_YZ:
            backend.warn_once(
                "flow_warp-pairs",
                f"flow_warp_loss: more than {MAX_GRID_YZ} frame pairs (B * (T-1)) run the "
                "reference (the kernels' grid holds one frame pair per row)",
            )
            impl = "reference"
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if impl == "reference":
        return flow_warp_loss_reference(x, flow, weight, eps, padding_mode, reduction)
    if torch.float64 in (x.dtype, flow.dtype):
        raise ValueError(
            f"flow_warp_loss: impl={impl!r} computes in float32, but x is {x.dtype} and flow is "
            f"{flow.dtype}; use impl='reference' (or 'auto') for float64"
        )
    _resolve(impl, x.device)
    if x.numel() == 0:  # B or C = 0: the reference's NaN mean or empty map, and empty grads
        return flow_warp_loss_reference(x, flow, weight, eps, padding_mode, reduction)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "flow_warp_loss: weight requires grad, but the fused op treats it as a "
            "constant; pass weight.detach() or impl='reference'"
        )

    def plane(t: Tensor) -> Tensor:  # the kernels need contiguous (H, W) planes
        return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()

    x, flow = plane(x), plane(flow)
    weight = None if weight is None else plane(weight)
    border = padding_mode == "border"
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or flow.requires_grad)
    if reduction == "mean" and wants_grad and ONE_PASS[impl]:
        return flow_warp_loss_and_grad_op(
            x, flow, weight, float(eps), border, x.requires_grad, deterministic, impl
        )[0]
    return flow_warp_loss_op(
        x, flow, weight, float(eps), border, reduction == "mean", deterministic, impl
    )
