"""Flow-warping loss: Triton (interpreter on CPU) and numba vs the grid_sample reference."""

import re

import pytest
import torch
from conftest import HAS_CUDA, far_view, requires_cuda

from vosgan import backend
from vosgan.nn import FlowWarpLoss, fuse_modules
from vosgan.ops import flow_warp as fw
from vosgan.ops.flow_warp import (
    flow_to_grid,
    flow_warp_loss,
    flow_warp_loss_and_grad_op,
    flow_warp_loss_backward_op,
    flow_warp_loss_op,
    flow_warp_loss_reference,
    fused_impl,
    warp_differentiable,
)

# (B, C, T, H, W): T=2, B=1, H=1, H and W not multiples of any block, one 64-wide row set.
SHAPES = [(1, 3, 2, 5, 7), (2, 2, 3, 9, 13), (1, 1, 2, 1, 6), (1, 3, 2, 4, 64)]
IMPLS = ["triton", "numba"]


@pytest.fixture(autouse=True)
def _triton_on_gpu(request: pytest.FixtureRequest):
    """Tests parametrised with impl="triton" build their tensors on the GPU when there is one
    (the interpreter runs them on CPU tensors otherwise)."""
    spec = getattr(request.node, "callspec", None)
    if HAS_CUDA and spec is not None and spec.params.get("impl") == "triton":
        with torch.device("cuda"):
            yield
    else:
        yield


def make_flow(kind: str, b: int, t: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """Flows that stress the sampler: random, zero, out of the frame, large, integer."""
    shape = (b, 2, t - 1, h, w)
    if kind == "random":
        return torch.randn(shape) * 2.5
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "out":  # mostly pointing past the borders, some straddling them
        return torch.randn(shape) * 0.5 + torch.tensor([1.1 * w, -1.1 * h]).view(1, 2, 1, 1, 1)
    if kind == "large":
        return torch.randn(shape) * 4 * max(h, w)
    if kind == "integer":  # exact integer sample positions, in and out of the frame
        return torch.randint(-3, 4, shape).float()
    raise ValueError(kind)


def grads(loss: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs, g))


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = b.abs().max().clamp_min(1e-6)
    err = (a.float() - b.float()).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err:.3g} of max |ref| {scale:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("kind", ["random", "zero", "out", "large", "integer"])
def test_matches_reference_fp32(impl: str, padding: str, kind: str) -> None:
    for i, (b, c, t, h, w) in enumerate(SHAPES):
        reduction = "mean" if i % 2 == 0 else "none"
        x = torch.randn(b, c, t, h, w, requires_grad=True)
        flow = make_flow(kind, b, t, h, w).requires_grad_()
        weight = torch.rand(b, 1, t - 1, h, w) if i != 1 else None
        ref = flow_warp_loss_reference(x, flow, weight, 1e-2, padding, reduction)
        out = flow_warp_loss(x, flow, weight, 1e-2, padding, reduction, impl=impl)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(ref)
        for name, got, want in zip(
            ("dx", "dflow"), grads(out, [x, flow], g), grads(ref, [x, flow], g), strict=True
        ):
            assert_close_rel(got, want, 2e-5, f"{impl} {padding} {kind} {(b, c, t, h, w)} {name}")


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nonfinite_flow_propagates(impl: str, padding: str, reduction: str) -> None:
    """A nan flow, or +-inf with zeros padding, makes that pixel's loss and its gradients (flow,
    and x_t: nothing is scattered into x_{t+1}) nan, as in the reference; border padding clamps
    +-inf like grid_sample. numba used to segfault here, Triton to return finite values."""
    for val in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, 2, 3, 4, 5, requires_grad=True)
        flow = make_flow("random", 1, 3, 4, 5)
        flow[0, 1 if val < 0 else 0, 1, 1, 2] = val
        flow.requires_grad_()
        nan_border = padding == "border" and val != val
        if nan_border and impl == "reference":
            continue  # grid_sample clamps a nan position to the border; its CPU backward crashes
        out = flow_warp_loss(x, flow, None, 1e-2, padding, reduction, impl=impl)
        g = torch.rand_like(out)
        dx, dflow = grads(out, [x, flow], g)
        bad_map = torch.zeros(1, 2, 2, 4, 5, dtype=torch.bool)  # the map's, dflow's and x_t's
        bad_map[0, :, 1, 1, 2] = padding == "zeros" or nan_border
        bad_x = torch.cat((bad_map, torch.zeros_like(bad_map[:, :, :1])), dim=2)
        want_loss = bad_map if reduction == "none" else bad_map.any()
        assert torch.equal(out.isnan(), want_loss), f"{impl} {val} loss"
        for name, got, bad in (("dx", dx, bad_x), ("dflow", dflow, bad_map)):
            assert got.isnan().equal(bad) and got.isfinite().equal(~bad), f"{impl} {val} {name}"
        if nan_border:
            continue
        # The reference on CPU tensors: CUDA's grid_sample backward scatters a nan position's
        # gradient into pixels (0, 0) and (0, 1) of x_{t+1}, and a zero dflow to a +-inf component
        # (seen on an H100, torch 2.11).
        xc, fc = (v.detach().cpu().requires_grad_() for v in (x, flow))
        ref = flow_warp_loss_reference(xc, fc, None, 1e-2, padding, reduction)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        wants = grads(ref, [xc, fc], g.cpu())
        for name, got, want in zip(("dx", "dflow"), (dx, dflow), wants, strict=True):
            torch.testing.assert_close(
                got.cpu(), want, rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"{impl} {val} {name}"
            )


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_empty_inputs(impl: str) -> None:
    """An empty batch (B or C = 0) gives the reference's NaN mean or empty map and zero-size
    gradients (the fused paths divided by zero); empty frames are refused by name."""
    x = torch.randn(2, 3, 2, 4, 5)
    flow = torch.randn(2, 2, 1, 4, 5)
    for xs, fs in ((x[:0], flow[:0]), (x[:, :0], flow)):
        for reduction in ("mean", "none"):
            xs, fs = xs.detach().requires_grad_(), fs.detach().requires_grad_()
            out = flow_warp_loss(xs, fs, reduction=reduction, impl=impl)
            ref = flow_warp_loss_reference(xs, fs, reduction=reduction)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            torch.testing.assert_close(out, ref, equal_nan=True)
            dx, dflow = grads(out, [xs, fs], torch.ones_like(out))
            assert dx.shape == xs.shape and dflow.shape == fs.shape
    for xs, fs in ((x[:, :, :, :0], flow[:, :, :, :0]), (x[..., :0], flow[..., :0])):
        with pytest.raises(ValueError, match="x frames must be non-empty"):
            flow_warp_loss(xs, fs, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_positions_pick_grid_sample_side(impl: str) -> None:
    """At zero flow the sample sits on a pixel centre; grid_sample's fp32 round trip puts some
    positions a hair below the integer, so its derivative there is the backward difference.
    The kernels must reproduce that choice, not the mathematically 'clean' forward difference."""
    b, c, t, h, w = 1, 2, 2, 3, 64
    xs = torch.arange(w, dtype=torch.float32)
    ix = (flow_to_grid(torch.zeros(1, 2, h, w))[0, 0, :, 0] + 1) * ((w - 1) / 2)
    assert (ix < xs).any() and (ix == xs).any(), "the case must exercise both sides"
    x = torch.randn(b, c, t, h, w) ** 3  # curvature: left and right differences differ
    flow = torch.zeros(b, 2, t - 1, h, w, requires_grad=True)
    want = torch.autograd.grad(flow_warp_loss_reference(x, flow), flow)[0]
    got = torch.autograd.grad(flow_warp_loss(x, flow, impl=impl), flow)[0]
    assert_close_rel(got, want, 1e-5, f"{impl} dflow at integer positions")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(impl: str, dtype: torch.dtype, reduction: str) -> None:
    """Error vs the fp32 reference at most 2x that of the reference run in the same dtype;
    ``mean`` with gradients runs the one-pass op (the training path), ``none`` the two-pass."""
    if impl == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 arithmetic is not supported by the Triton interpreter (GPU test below)")
    b, c, t, h, w = 2, 3, 3, 6, 11
    x = torch.randn(b, c, t, h, w).to(dtype).requires_grad_()
    flow = make_flow("random", b, t, h, w).to(dtype).requires_grad_()
    weight = torch.rand(b, 1, t - 1, h, w).to(dtype)
    x32, f32 = x.detach().float().requires_grad_(), flow.detach().float().requires_grad_()
    ref32 = flow_warp_loss_reference(x32, f32, weight.float(), reduction=reduction)
    g = torch.randn_like(ref32)
    want = [ref32, *grads(ref32, [x32, f32], g)]
    ref_lp = flow_warp_loss_reference(x, flow, weight, reduction=reduction)
    base = [ref_lp, *grads(ref_lp, [x, flow], g.to(dtype))]
    out = flow_warp_loss(x, flow, weight, reduction=reduction, impl=impl)
    got = [out, *grads(out, [x, flow], g.to(dtype))]
    for name, a, r, w32 in zip(("loss", "dx", "dflow"), got, base, want, strict=True):
        assert a.dtype == r.dtype, name
        err = (a.float() - w32).abs().max()
        err_ref = (r.float() - w32).abs().max()
        assert err <= 2 * err_ref + 1e-3 * w32.abs().max(), f"{name}: {err} vs ref {err_ref}"


@pytest.mark.parametrize("impl", ["triton"])
def test_deterministic_fixed_point_dx(impl: str) -> None:
    """The int64 fixed-point scatter matches the reference and repeats bit for bit."""
    b, c, t, h, w = 1, 3, 3, 5, 9
    x = torch.randn(b, c, t, h, w, requires_grad=True)
    flow = (torch.randn(b, 2, t - 1, h, w) * 0.4).requires_grad_()  # many shared targets
    weight = torch.rand(b, 1, t - 1, h, w)
    want = grads(flow_warp_loss_reference(x, flow, weight), [x, flow], torch.tensor(3.0))
    runs = [
        grads(
            flow_warp_loss(x, flow, weight, impl=impl, deterministic=True),
            [x, flow],
            torch.tensor(3.0),
        )
        for _ in range(2)
    ]
    for name, got, ref in zip(("dx", "dflow"), runs[0], want, strict=True):
        assert_close_rel(got, ref, 2e-5, f"deterministic {name}")
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _spy_fused_grads(monkeypatch: pytest.MonkeyPatch, arg: int) -> list:
    """The list that gets positional argument ``arg`` of every ``_fused_grads`` call."""
    real, seen = fw._fused_grads, []

    def spy(*args, **kw):
        seen.append(args[arg])
        return real(*args, **kw)

    monkeypatch.setattr(fw, "_fused_grads", spy)
    return seen


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_only_when_requested(impl: str, monkeypatch) -> None:
    """The fused pass computes dx only when x requires grad (spied on its grad_x argument)."""
    grad_x = _spy_fused_grads(monkeypatch, 6)
    b, c, t, h, w = 1, 2, 3, 4, 5
    x = torch.randn(b, c, t, h, w)
    flow = make_flow("random", b, t, h, w).requires_grad_()
    loss = flow_warp_loss(x, flow, impl=impl)
    (dflow,) = torch.autograd.grad(loss, [flow])
    assert grad_x == [False] and dflow.shape == flow.shape
    assert_close_rel(
        dflow,
        torch.autograd.grad(flow_warp_loss_reference(x, flow), [flow])[0],
        2e-5,
        "dflow only",
    )
    # x only (flow detached) also works
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(flow_warp_loss(xg, flow.detach(), impl=impl), [xg])
    assert grad_x == [False, True]
    assert_close_rel(
        dx,
        torch.autograd.grad(flow_warp_loss_reference(xg, flow.detach()), [xg])[0],
        2e-5,
        "dx only",
    )


def _grid_sample_has_double_backward() -> bool:
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(1, 2, 2, 2, dtype=torch.float64) - 0.5).requires_grad_()
    out = torch.nn.functional.grid_sample(x, grid, align_corners=True)
    (g,) = torch.autograd.grad(out.sum(), grid, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), x)
    except RuntimeError:  # "derivative for aten::grid_sampler_2d_backward is not implemented"
        return False
    return True


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_double_backward(impl: str, padding: str) -> None:
    """create_graph=True: first derivatives equal the reference's (integer positions and
    borders included) and second derivatives equal grid_sample's where it has them."""
    b, c, t, h, w = 1, 2, 3, 5, 6
    x = torch.randn(b, c, t, h, w, requires_grad=True)
    flow = make_flow("random", b, t, h, w)
    flow[..., ::2] = make_flow("integer", b, t, h, w)[..., ::2]
    flow.requires_grad_()
    weight = torch.rand(b, 1, t - 1, h, w)
    outs = []
    for fused in (True, False):
        loss = (
            flow_warp_loss(x, flow, weight, padding_mode=padding, impl=impl)
            if fused
            else flow_warp_loss_reference(x, flow, weight, padding_mode=padding)
        )
        first = torch.autograd.grad(loss, [x, flow], create_graph=True)
        outs.append(first)
        if fused or _grid_sample_has_double_backward():
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN's sampler: no 2nd order
                outs.append(torch.autograd.grad(sum((g * g).sum() for g in first), [x, flow]))
    for a, r in zip(outs[0], outs[2], strict=True):
        assert_close_rel(a, r, 2e-5, f"{impl} {padding} first order with create_graph")
    if len(outs) == 4:
        for a, r in zip(outs[1], outs[3], strict=True):
            # both sides sum many terms; on CUDA the reference's atomics reorder them
            assert_close_rel(a, r, 1e-4 if x.is_cuda else 2e-5, f"{impl} {padding} 2nd order")


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_gradgradcheck_differentiable_warp(padding: str) -> None:
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    flow = (torch.rand(1, 2, 4, 5, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, f: warp_differentiable(a, f, padding), (x, flow))


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl: str) -> None:
    b, c, t, h, w = 1, 2, 3, 4, 5
    x = torch.randn(b, c, t, h, w, requires_grad=True)
    flow = make_flow("random", b, t, h, w).requires_grad_()
    weight = torch.rand(b, 1, t - 1, h, w)
    for mean in (True, False):
        torch.library.opcheck(flow_warp_loss_op, (x, flow, weight, 1e-3, False, mean, False, impl))
    g = torch.full((1,), 0.1)
    torch.library.opcheck(
        flow_warp_loss_backward_op,
        (g, x.detach(), flow.detach(), None, 1e-3, True, True, False, impl),
    )
    for grad_x in (True, False):
        torch.library.opcheck(
            flow_warp_loss_and_grad_op,
            (x if grad_x else x.detach(), flow, weight, 1e-3, False, grad_x, False, impl),
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("one_pass", [True, False])
def test_one_pass_and_two_pass_paths(
    impl: str, one_pass: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mean loss needing gradients runs either the one-pass op (forward computes the fp32
    gradients, backward scales them) or forward + recomputing backward: both match."""
    monkeypatch.setitem(fw.ONE_PASS, impl, one_pass)
    b, c, t, h, w = 2, 3, 3, 6, 9
    x = torch.randn(b, c, t, h, w, requires_grad=True)
    flow = make_flow("random", b, t, h, w).requires_grad_()
    weight = torch.rand(b, 1, t - 1, h, w)
    for inputs in ([x, flow], [flow]):
        out = flow_warp_loss(x, flow, weight, padding_mode="border", impl=impl)
        ref = flow_warp_loss_reference(x, flow, weight, padding_mode="border")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.tensor(-2.5)
        for got, want in zip(grads(out, inputs, g), grads(ref, inputs, g), strict=True):
            assert_close_rel(got, want, 2e-5, f"{impl} one_pass={one_pass}")


class _LaunchSpy:
    """Stands in for a Triton kernel and records each launch's ``RGB_VEC``."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.rgb_vec = kernel, []

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        launch = self.kernel[grid]

        def run(*args: object, **kwargs: object) -> object:
            self.rgb_vec.append(kwargs["RGB_VEC"])
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize("impl", ["triton"])
@pytest.mark.parametrize("dx_mode", ["loop", "loop-1px", "rgb-vec"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_dx_modes_match_reference(
    impl: str, dx_mode: str, padding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way of scattering d loss / d x (``DX_MODE``) gives the reference's gradients, for
    RGB (where ``rgb-vec`` takes its own path) and other channel counts, through the one-pass
    op (a mean) and the recomputing backward (a map), with flows in and out of the frame."""
    from vosgan.kernels import flow_warp as kernels

    monkeypatch.setattr(kernels, "DX_MODE", dx_mode)
    spy = _LaunchSpy(kernels._bwd_kernel)
    monkeypatch.setattr(kernels, "_bwd_kernel", spy)
    for c, kind, reduction in ((3, "random", "mean"), (3, "out", "none"), (2, "random", "mean")):
        b, t, h, w = 2, 3, 6, 9
        x = torch.randn(b, c, t, h, w, requires_grad=True)
        flow = make_flow(kind, b, t, h, w).requires_grad_()
        weight = torch.rand(b, 1, t - 1, h, w)
        out = flow_warp_loss(x, flow, weight, padding_mode=padding, reduction=reduction, impl=impl)
        ref = flow_warp_loss_reference(x, flow, weight, padding_mode=padding, reduction=reduction)
        g = torch.randn_like(ref)
        for name, got, want in zip(
            ("dx", "dflow"), grads(out, [x, flow], g), grads(ref, [x, flow], g), strict=True
        ):
            assert_close_rel(got, want, 2e-5, f"{dx_mode} C={c} {kind} {reduction} {name}")
    vector_atomics = not x.is_cuda or torch.cuda.get_device_capability()[0] >= 9
    assert spy.rgb_vec == [dx_mode == "rgb-vec" and vector_atomics] * 2 + [False]


def test_dx_mode_from_the_environment_is_checked() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "VOSGAN_FLOW_WARP_DX": "vector"}
    code = "import vosgan.kernels.flow_warp"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "VOSGAN_FLOW_WARP_DX must be one of ('loop', 'loop-1px', 'rgb-vec'), got 'vector'" in (
        run.stderr
    )


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_gradcheck_reference_float64(padding: str) -> None:
    b, c, t, h, w = 1, 2, 3, 4, 5
    x = torch.randn(b, c, t, h, w, dtype=torch.float64, requires_grad=True)
    flow = (torch.rand(b, 2, t - 1, h, w, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    weight = torch.rand(b, 1, t - 1, h, w, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, f: flow_warp_loss_reference(a, f, weight, 1e-2, padding, "none"), (x, flow)
    )


def test_validation_messages() -> None:
    x = torch.randn(1, 3, 3, 4, 5)
    flow = torch.zeros(1, 2, 2, 4, 5)
    with pytest.raises(ValueError, match="flow must be"):
        flow_warp_loss(x, flow[:, :, :1], impl="numba")
    with pytest.raises(ValueError, match="weight must be"):
        flow_warp_loss(x, flow, torch.ones(1, 1, 3, 4, 5), impl="numba")
    with pytest.raises(ValueError, match="weight requires grad"):
        flow_warp_loss(x, flow, torch.ones(1, 1, 2, 4, 5, requires_grad=True), impl="numba")
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        flow_warp_loss(x, flow, eps=0.0, impl="numba")
    with pytest.raises(ValueError, match="reduction"):
        flow_warp_loss(x, flow, reduction="sum", impl="numba")
    with pytest.raises(ValueError, match="padding_mode"):
        flow_warp_loss(x, flow, padding_mode="reflection", impl="numba")
    with pytest.raises(ValueError, match="unknown impl"):
        flow_warp_loss(x, flow, impl="cuda")
    with pytest.raises(TypeError, match="flow must be a floating-point"):
        flow_warp_loss(x, flow.long(), impl="numba")
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        flow_warp_loss(x, flow, eps=float("inf"), impl="numba")
    with pytest.raises(TypeError, match="x must be a Tensor, got ndarray"):
        flow_warp_loss(x.numpy(), flow, impl="numba")
    with pytest.raises(TypeError, match="flow must be a Tensor, got list"):
        flow_warp_loss(x, flow.tolist(), impl="numba")
    with pytest.raises(TypeError, match="weight must be a Tensor, got float"):
        flow_warp_loss(x, flow, 1.0, impl="numba")
    with pytest.raises(ValueError, match="impl='numba' computes in float32, but x is torch.f"):
        flow_warp_loss(x.double(), flow.double(), impl="numba")


def test_numba_frame_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames beyond the numba kernels' exact float32 pixel indexing are refused by name, in the
    forward and in the one-pass backward."""
    from vosgan.ops._numba import flow_warp as nb_flow_warp

    monkeypatch.setattr(nb_flow_warp, "MAX_PIXELS", 19)
    x = torch.randn(1, 1, 2, 4, 5)
    flow = torch.zeros(1, 2, 1, 4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="4x5 exceed 19 pixels"):
        flow_warp_loss(x, flow.detach(), impl="numba")
    with pytest.raises(ValueError, match="4x5 exceed 19 pixels"):
        flow_warp_loss(x, flow, impl="numba")
    monkeypatch.setattr(nb_flow_warp, "MAX_PIXELS", 20)
    flow_warp_loss(x, flow, impl="numba").backward()


def test_auto_dispatch_and_module() -> None:
    assert fused_impl(torch.device("cpu"))[0] == "numba"
    assert backend.choose("flow_warp_loss", "cpu").impl in ("numba", "reference")
    b, c, t, h, w = 1, 3, 3, 5, 6
    x = torch.randn(b, c, t, h, w)
    flow = make_flow("random", b, t, h, w)
    model = torch.nn.Sequential(FlowWarpLoss(eps=1e-2, padding_mode="border", impl="reference"))
    assert any("FlowWarpLoss" in line for line in fuse_modules(model))
    assert model[0].impl == "auto" and len(model.state_dict()) == 0
    with pytest.raises(ValueError, match="impl must be"):
        FlowWarpLoss(impl="cuda")
    for eps in (0.0, float("inf")):
        with pytest.raises(ValueError, match="eps must be finite and > 0"):
            FlowWarpLoss(eps=eps)
    torch.testing.assert_close(
        model[0](x, flow), flow_warp_loss_reference(x, flow, None, 1e-2, "border")
    )


_I32 = "i32"
# Shape and input-stride arguments both kernels take, in their signature order.
_SHAPE_AND_INPUT_STRIDES = "C Tm1 H W HW x_sb x_sc x_st f_sb f_sc f_st w_sb w_st".split()
_FWD_SIG = {
    "x_ptr": "*bf16",
    "flow_ptr": "*bf16",
    "w_ptr": "*bf16",
    "out_ptr": "*fp32",
    **{k: _I32 for k in [*_SHAPE_AND_INPUT_STRIDES, "o_sb", "o_sc", "o_st"]},
    **{k: "fp32" for k in ("half_wm1", "half_hm1", "wm1", "hm1", "eps2")},
    **{k: "constexpr" for k in ("HAS_W", "BORDER", "REDUCE", "RECIP", "BLOCK")},
}
_BWD_SIG = {
    "x_ptr": "*bf16",
    "flow_ptr": "*bf16",
    "w_ptr": "*bf16",
    "g_ptr": "*fp32",
    "dflow_ptr": "*bf16",
    "dx_ptr": "*fp32",
    "qscale_ptr": "*fp32",
    "loss_ptr": "*fp32",
    **{
        k: _I32
        for k in [
            *_SHAPE_AND_INPUT_STRIDES,
            *"g_sb g_sc g_st df_sb df_sc df_st dx_sb dx_sc dx_st".split(),
        ]
    },
    **{k: "fp32" for k in ("half_wm1", "half_hm1", "wm1", "hm1", "eps2", "gx_scale", "gy_scale")},
    **{
        k: "constexpr"
        for k in (
            "HAS_W",
            "BORDER",
            "G_SCALAR",
            "GRAD_X",
            "FIXED_POINT",
            "WITH_LOSS",
            "RECIP",
            "RGB_VEC",
            "BLOCK",
        )
    },
}
# The launch configurations the GPU path uses (BLOCK=512, 4 warps), both accumulation modes.
AOT_CASES = {
    "fwd-sum": ("_fwd_kernel", _FWD_SIG, {"HAS_W": True, "BORDER": False, "REDUCE": True}),
    "bwd-atomic": (
        "_bwd_kernel",
        _BWD_SIG,
        {
            "HAS_W": True,
            "BORDER": True,
            "G_SCALAR": True,
            "GRAD_X": True,
            "FIXED_POINT": False,
            "WITH_LOSS": True,
            "RGB_VEC": False,
        },
    ),
    "bwd-fixed": (
        "_bwd_kernel",
        {**_BWD_SIG, "dx_ptr": "*i64", "g_ptr": "*bf16"},
        {
            "HAS_W": True,
            "BORDER": False,
            "G_SCALAR": False,
            "GRAD_X": True,
            "FIXED_POINT": True,
            "WITH_LOSS": False,
            "RGB_VEC": False,
        },
    ),
}
_BWD_ATOMIC = AOT_CASES["bwd-atomic"][2]
# The one-pixel-per-thread launches of DX_MODE "loop-1px" and "rgb-vec" (256 pixels, 8 warps)
AOT_CASES["bwd-atomic-1px"] = ("_bwd_kernel", _BWD_SIG, _BWD_ATOMIC)
AOT_CASES["bwd-rgb-vec"] = ("_bwd_kernel", _BWD_SIG, {**_BWD_ATOMIC, "RGB_VEC": True})
_ONE_PIXEL_PER_THREAD = {"bwd-atomic-1px", "bwd-rgb-vec"}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", sorted(AOT_CASES))
def test_aot_compile_no_spills(case: str, arch: int) -> None:
    from vosgan import aot

    kernel, sig, constexprs = AOT_CASES[case]
    # Pointers, the plane size and the strides are multiples of 16 at VOS-GAN shapes (32x32,
    # 64x64), as Triton's launch-time specialisation would see them; C, T, H, W are generic.
    names = list(sig)
    generic = {"C", "Tm1", "H", "W"}
    aligned = tuple(
        i
        for i, n in enumerate(names)
        if sig[n].startswith("*") or (sig[n] == _I32 and n not in generic)
    )
    one_px = case in _ONE_PIXEL_PER_THREAD
    block, warps = (256, 8) if one_px else (512, 4)
    consts = {**constexprs, "BLOCK": block, "RECIP": True}
    rep = aot.compile_kernel(
        "vosgan.kernels.flow_warp", kernel, sig, consts, arch=arch, aligned=aligned, num_warps=warps
    )
    assert rep.registers > 0, "ptxas reported no register count"
    assert rep.spill_stores == 0 and rep.spill_loads == 0, (
        f"{case} sm_{arch}: {rep.spill_stores} B spill stores, {rep.spill_loads} B spill loads"
    )
    if not one_px:
        # The per-pixel streams (x_t, flow, weight) are contiguous and vectorised (4 bf16 per
        # thread at BLOCK=512: 64-bit loads); the four bilinear corner loads are gathers.
        assert re.search(r"ld\.global(?:\.\w+)*\.v[24]", rep.ptx), (
            f"{case} sm_{arch}: no vector loads"
        )
        return
    if case == "bwd-rgb-vec" and arch < 90:  # sm_80 has no f32 vector atomics: not launched
        return
    # One pixel per thread: the atomics take the loads' layout, so no value goes through shared
    # memory except the loss partial sum's reduction over warps: one store with Triton 3.9, two
    # with 3.6. At 4 pixels per thread ("loop"), layout conversions around the atomics make 25.
    shared = len(re.findall(r"st\.shared", rep.ptx))
    assert shared <= 2, f"{case} sm_{arch}: {shared} shared-memory stores (layout conversions)"
    atomics = re.findall(r"(?:red|atom)\.global[\w.]*\.f32", rep.ptx)
    if case == "bwd-rgb-vec" and arch == 90:  # Hopper's f32 vector reductions: RGB + 0 at once
        assert len(atomics) == 5 and all(".v4." in a for a in atomics), atomics


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dx_mode", ["loop", "loop-1px", "rgb-vec"])
def test_gpu_matches_reference(
    dtype: torch.dtype, deterministic: bool, dx_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vosgan.kernels import flow_warp as kernels

    monkeypatch.setattr(kernels, "DX_MODE", dx_mode)
    b, c, t, h, w = 4, 3, 9, 64, 61
    x = torch.randn(b, c, t, h, w, device="cuda").to(dtype).requires_grad_()
    flow = (torch.randn(b, 2, t - 1, h, w, device="cuda") * 3).to(dtype).requires_grad_()
    weight = torch.rand(b, 1, t - 1, h, w, device="cuda").to(dtype)
    x32, f32 = x.detach().float().requires_grad_(), flow.detach().float().requires_grad_()
    ref32 = flow_warp_loss_reference(x32, f32, weight.float())
    want = [ref32, *grads(ref32, [x32, f32], torch.tensor(1.0, device="cuda"))]
    ref_lp = flow_warp_loss_reference(x, flow, weight)
    base = [ref_lp, *grads(ref_lp, [x, flow], torch.tensor(1.0, device="cuda", dtype=dtype))]
    out = flow_warp_loss(x, flow, weight, impl="triton", deterministic=deterministic)
    got = [out, *grads(out, [x, flow], torch.tensor(1.0, device="cuda", dtype=dtype))]
    for name, a, r, w32 in zip(("loss", "dx", "dflow"), got, base, want, strict=True):
        err = (a.float() - w32).abs().max()
        err_ref = (r.float() - w32).abs().max()
        # fp32: dx and dflow sum ~10^5 terms that largely cancel; 1e-4 of the max covers the
        # summation-order differences (the reference's own atomics included).
        tol = 2 * err_ref + (1e-4 if dtype == torch.float32 else 1e-3) * w32.abs().max()
        assert err <= tol, f"{name} {dtype}: {err} vs ref {err_ref}"


@requires_cuda
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph() -> None:
    b, c, t, h, w = 2, 3, 5, 32, 32
    x = torch.randn(b, c, t, h, w, device="cuda", requires_grad=True)
    flow = (torch.randn(b, 2, t - 1, h, w, device="cuda") * 2).requires_grad_()
    fn = torch.compile(lambda a, f: flow_warp_loss(a, f, impl="triton"), fullgraph=True)
    out = fn(x, flow)
    ref = flow_warp_loss_reference(x, flow)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    got, want = torch.autograd.grad(out, [x, flow]), torch.autograd.grad(ref, [x, flow])
    for a, r in zip(got, want, strict=True):
        assert_close_rel(a, r, 1e-4, "compiled grads")


@pytest.mark.parametrize("impl", ["triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_offsets_past_2_31_elements(impl: str, reduction: str) -> None:
    """A channel-major view whose channel stride times c passes 2**31 elements: the kernels'
    64-bit channel offsets read and write the right planes (32-bit ones wrapped)."""
    b, c, t, h, w = 1, 3, 2, 8, 8
    stride_c = 2**30 + 64
    x = far_view((b, c, t, h, w), (64 * t, stride_c, h * w, w, 1), "cuda" if HAS_CUDA else "cpu")
    x.requires_grad_()
    flow = make_flow("random", b, t, h, w).to(x.device, torch.float16).requires_grad_()
    ref = flow_warp_loss_reference(x, flow, reduction=reduction)
    g = torch.randn_like(ref)
    out = flow_warp_loss(x, flow, reduction=reduction, impl=impl)
    got, want = [out, *grads(out, [x, flow], g)], [ref, *grads(ref, [x, flow], g)]
    for name, a, r in zip(("loss", "dx", "dflow"), got, want, strict=True):
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("impl", ["triton"])
def test_torch_deterministic_mode_selects_the_deterministic_scatter(impl: str, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the fused dx takes the fixed-point
    scatter, as if deterministic=True were passed (float atomics are not reproducible)."""
    seen = _spy_fused_grads(monkeypatch, 7)
    b, c, t, h, w = 1, 2, 3, 4, 5
    x = torch.randn(b, c, t, h, w, requires_grad=True)
    flow = make_flow("random", b, t, h, w).requires_grad_()
    torch.autograd.grad(flow_warp_loss(x, flow, impl=impl), [x, flow])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    torch.autograd.grad(flow_warp_loss(x, flow, impl=impl), [x, flow])
    assert seen == [False, True]


def test_frame_pairs_beyond_one_grid_are_refused(monkeypatch):
    """B * (T-1) frame pairs sit on the grid's y axis (at most 65535 on CUDA): more is refused
    by name before any launch."""
    from vosgan.kernels import flow_warp as kernels

    kernels.check_frame_pairs(65535, 2)
    with pytest.raises(ValueError, match=r"B \* \(T-1\) = 2 \* 32768 frame pairs exceed the 65535"):
        kernels.check_frame_pairs(2, 32769)
    monkeypatch.setattr(kernels, "MAX_GRID_YZ", 3)
    x, flow = torch.randn(2, 1, 3, 4, 4), torch.zeros(2, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="2 \\* 2 frame pairs exceed the 3"):
        flow_warp_loss(x, flow, impl="triton")
