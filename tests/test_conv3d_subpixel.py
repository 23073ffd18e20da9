"""CPU sub-pixel path of the few-channel stride-2, kernel-4 (transposed) convs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch import nn

from vosgan import backend
from vosgan.nn import conv3d_block as nn_block
from vosgan.nn import fuse_modules
from vosgan.nn.conv3d_block import SubpixelConv3d, SubpixelConvTranspose3d
from vosgan.ops import conv3d_forms as forms
from vosgan.ops import conv3d_subpixel as ops


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 5), (1, 7, 1, 1, 1), (3, 2, 2, 3, 1)])
def test_subpixel_transpose_matches_conv_transpose3d(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[1], 3, 4, 4, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(
        ops.conv_transpose3d_subpixel(x, w, b),
        F.conv_transpose3d(x, w, b, 2, 1),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("transposed", [True, False])
def test_subpixel_gradcheck_float64(transposed):
    x = (
        torch.randn(1, 2, 1, 3, 2, dtype=torch.float64)
        if transposed
        else torch.randn(1, 2, 2, 2, 4, dtype=torch.float64)
    )
    w = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64) * 0.3
    b = torch.randn(2, dtype=torch.float64)
    args = tuple(t.requires_grad_() for t in (x, w, b))

    def fn(x, w, b):
        return ops.subpixel_conv3d(x, w, b, transposed=transposed)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)  # R1's double backward


@pytest.mark.parametrize("cls", [nn.Conv3d, nn.ConvTranspose3d])
@pytest.mark.parametrize("bias", [False, True])
def test_subpixel_modules_match_torch(cls, bias, monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())  # the fallback warning below, every time
    calls = []  # the module's sub-pixel calls: it takes that path, not torch's own forward

    def counted(*args, **kw):
        calls.append(1)
        return ops.subpixel_conv3d(*args, **kw)

    monkeypatch.setattr(nn_block, "subpixel_conv3d", counted)
    torch.manual_seed(3)
    ref = nn.Sequential(cls(3, 4, 4, 2, 1, bias=bias), nn.LeakyReLU(0.2))
    fused = copy.deepcopy(ref)
    assert [r.split(" (")[0] for r in fuse_modules(fused)] == [
        f"0: {cls.__name__} -> Subpixel{cls.__name__}"
    ]
    assert type(fused[0]) in (SubpixelConv3d, SubpixelConvTranspose3d) and fused[0].impl == "auto"
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for shape in [(2, 3, 4, 6, 8)] + ([(2, 3, 3, 5, 1)] if cls is nn.ConvTranspose3d else []):
        x = torch.randn(shape)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        assert ops.subpixel_applies(x, fused[0])
        n_calls = len(calls)
        out_r, out_f = ref(xr), fused(xf)
        assert len(calls) == n_calls + 1
        torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
        go = torch.randn_like(out_r)
        out_r.backward(go)
        out_f.backward(go)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
        for pf, pr in zip(fused.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-5, atol=1e-4)
            pf.grad = pr.grad = None
    if cls is nn.Conv3d:  # odd sizes: the input gradient has no sub-pixel form -> parent path
        x = torch.randn(1, 3, 3, 4, 4)
        assert "odd T/H/W" in ops.subpixel_blocker(x, fused[0])
        n_calls = len(calls)
        with pytest.warns(UserWarning, match="odd T/H/W"):
            torch.testing.assert_close(fused(x), ref(x))
        assert len(calls) == n_calls


def test_subpixel_fuser_rejects_other_geometries():
    assert fuse_modules(nn.Sequential(nn.ConvTranspose3d(8, 5, 4, 2, 1))) == []  # C_out > 4
    assert fuse_modules(nn.Sequential(nn.Conv3d(5, 2, 4, 2, 1))) == []  # C_in > 4
    assert fuse_modules(nn.Sequential(nn.ConvTranspose3d(8, 3, 3, 2, 1))) == []  # kernel 3
    assert fuse_modules(nn.Sequential(nn.Conv3d(3, 8, 4, 1, 1))) == []  # stride 1
    assert (
        fuse_modules(nn.Sequential(nn.ConvTranspose3d(8, 3, 4, 2, 1, groups=1, output_padding=1)))
        == []
    )
    conv = SubpixelConvTranspose3d(8, 3, 4, 2, 1)
    assert fuse_modules(nn.Sequential(conv)) == []  # already switched
    conv.impl = "bogus"
    with pytest.raises(ValueError, match="impl"):
        conv(torch.randn(1, 8, 1, 2, 2))


# ---- the sub-pixel forms of the fused blocks' convs on CUDA (exercised here on CPU tensors) ----

CL = torch.channels_last_3d


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_differentiable_subpixel_transpose_gradcheck(fmt):
    """The sub-pixel transposed conv with its own backward (kernel-2 conv + interleave adjoint),
    to second order, in both layouts; the output keeps the input's layout."""
    x = torch.randn(1, 2, 2, 3, 2, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    w = (torch.randn(2, 3, 4, 4, 4, dtype=torch.float64) * 0.3).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = ops.conv_transpose3d_subpixel(x, w, b)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, F.conv_transpose3d(x, w, b, 2, 1), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ops.conv_transpose3d_subpixel, (x, w, b))
    assert torch.autograd.gradgradcheck(ops.conv_transpose3d_subpixel, (x, w, b))


def test_phase_weight_is_the_transposed_kernel_per_phase():
    """Phase s of the kernel-2 conv holds taps 3 - (2a + s) of the transposed kernel."""
    w = torch.randn(3, 2, 4, 4, 4)
    wp = ops.phase_weight(w).view(2, 2, 2, 2, 3, 2, 2, 2)  # (s_t, s_h, s_w, c_out, c_in, a..)
    for st, sh, sw, a_t, a_h, a_w in torch.cartesian_prod(*[torch.arange(2)] * 6).tolist():
        torch.testing.assert_close(
            wp[st, sh, sw, :, :, a_t, a_h, a_w],
            w[:, :, 3 - 2 * a_t - st, 3 - 2 * a_h - sh, 3 - 2 * a_w - sw].T,
        )


def test_phase_weight_grad_inverts_phase_weight():
    w = torch.randn(3, 5, 4, 4, 4)
    assert torch.equal(ops.phase_weight_grad(ops.phase_weight(w)), w)


@pytest.mark.parametrize("form", ["subpixel-fwd", "subpixel-bwd", "subpixel-dx"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_subpixel_forms_gradcheck(form, fmt):
    """Each form with a custom backward, to second order (R1), in both layouts."""
    shape = (1, 2, 2, 2, 4) if form == "subpixel-dx" else (1, 2, 2, 3, 2)
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    w = (torch.randn(2, 3, 4, 4, 4, dtype=torch.float64) * 0.3).requires_grad_()
    b = torch.randn(3 if form != "subpixel-dx" else 2, dtype=torch.float64, requires_grad=True)
    if form == "subpixel-dx":
        w = (torch.randn(2, 2, 4, 4, 4, dtype=torch.float64) * 0.3).requires_grad_()

    def fn(x, w, b):
        return ops.subpixel_form_conv(x, w, b, form)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    with pytest.raises(ValueError, match="form must be a sub-pixel form"):
        ops.subpixel_form_conv(x, w, b, "torch")


def _conv_grads(fn, x, conv, go):
    x = x.detach().clone().requires_grad_()
    conv.zero_grad()
    out = fn(x)
    out.backward(go)
    return out.detach(), x.grad, conv.weight.grad.clone(), conv.bias.grad.clone()


@pytest.mark.parametrize(
    ("cls", "form"),
    [(nn.ConvTranspose3d, f) for f in ("torch", "subpixel", "subpixel-fwd", "subpixel-bwd")]
    + [(nn.Conv3d, f) for f in ("torch", "subpixel-dx")],
)
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_conv_forms_match_torch(cls, form, autocast, monkeypatch):
    """Every form ``cuda_conv`` can take: torch's values and gradients (x, weight, bias) in
    channels_last_3d, also under (CPU) bf16 autocast, where each gradient keeps its input's
    dtype."""
    kind = "transposed" if cls is nn.ConvTranspose3d else "conv"
    monkeypatch.setitem(forms.CUDA_FORMS, kind, form)
    assert forms.cuda_form(kind) == form
    torch.manual_seed(0)
    conv = cls(6, 5, 4, 2, 1)
    # conv: not W=2 (an output width of 1): torch 2.13.0+cpu's own bf16 channels_last conv3d then
    # gives forward outputs that differ by up to 0.1 between calls after a backward
    shape = (2, 6, 2, 3, 4) if kind == "transposed" else (2, 6, 4, 6, 4)
    x = torch.randn(shape).to(memory_format=CL)
    ctx = torch.autocast("cpu", torch.bfloat16, enabled=autocast)
    with ctx:
        go = torch.randn_like(conv(x)).float()
    with ctx:
        want = _conv_grads(conv, x, conv, go)
        got = _conv_grads(lambda t: forms.cuda_conv(t, conv), x, conv, go)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)
    assert got[0].is_contiguous(memory_format=CL)


def test_cuda_form_auto_follows_cudnn_benchmark(monkeypatch):
    """``auto``: sub-pixel transposed convs while cudnn.benchmark is off (said once, with the
    remedy), cuDNN's while it is on; stride-2 convs stay torch's."""
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setitem(forms.CUDA_FORMS, "transposed", "auto")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert forms.cuda_form("transposed") == "torch"
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.warns(UserWarning, match="cudnn.benchmark is off.*VOSGAN_CUDA_CONV"):
        assert forms.cuda_form("transposed") == "subpixel"
    assert forms.cuda_form("conv") == "torch"


def test_cuda_conv_keeps_torch_for_other_geometries(monkeypatch):
    monkeypatch.setitem(forms.CUDA_FORMS, "transposed", "subpixel")
    monkeypatch.setitem(forms.CUDA_FORMS, "conv", "subpixel-dx")
    monkeypatch.setattr(forms, "subpixel_form_conv", None)  # would fail if called
    for conv, shape in [
        (nn.ConvTranspose3d(4, 3, 3, 2, 1), (1, 4, 2, 2, 2)),  # kernel 3
        (nn.Conv3d(4, 3, 4, 2, 1), (1, 4, 3, 4, 4)),  # odd T: no sub-pixel input gradient
    ]:
        x = torch.randn(shape)
        torch.testing.assert_close(forms.cuda_conv(x, conv), conv(x))


def test_cuda_conv_forms_env_spec():
    assert forms._read_cuda_forms("transposed=torch, conv=subpixel-dx, narrow=pad8") == {
        "transposed": "torch",
        "conv": "subpixel-dx",
        "narrow": "pad8",
    }
    assert forms._read_cuda_forms("") == forms.DEFAULT_CUDA_FORMS
    with pytest.raises(ValueError, match=r"VOSGAN_CUDA_CONV: 'conv=subpixel' is not one of"):
        forms._read_cuda_forms("conv=subpixel")


NARROW = {
    "stem 3->16": lambda: nn.Conv3d(3, 16, 4, 2, 1),
    "head 16->1": lambda: nn.ConvTranspose3d(16, 1, 4, 2, 1),
    "head 12->4 no bias": lambda: nn.ConvTranspose3d(12, 4, 4, 2, 1, bias=False),
    "2d 5->3": lambda: nn.ConvTranspose2d(5, 3, 4, 2, 1),
    "2d 3->10 k3": lambda: nn.Conv2d(3, 10, 3, 1, 1),
}


def _same_function(
    conv: nn.Module,
    form,
    x: torch.Tensor,
    tol: float = 1e-12,
    out_atol: float = 1e-12,
    ones: bool = False,
) -> None:
    """``form(x)`` against ``conv(x)``: values and shape (rtol ``tol``, atol ``out_atol``), and
    the gradients of x and every parameter of ``conv`` (rtol and atol ``tol``) for an output
    gradient of ``linspace(-1, 1)`` (``ones``: all ones; fp32's sums of a linspace cancel to
    rounding)."""
    outs, grads = [], []
    for fn in (conv, form):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        go = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        y.backward(torch.ones_like(y) if ones else go)
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in conv.parameters()])
        conv.zero_grad(set_to_none=True)
    assert outs[1].shape == outs[0].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=out_atol)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(NARROW))
def test_padded_conv_is_the_same_conv(name, channels_last):
    torch.manual_seed(0)
    conv = NARROW[name]().double()
    spatial = (4, 6, 6) if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) else (6, 6)
    x = torch.randn(2, conv.in_channels, *spatial, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        )
    _same_function(conv, lambda t: forms.padded_conv(conv, t), x)


@pytest.mark.parametrize("name", ["stem 3->16", "2d 3->10 k3"])
def test_padded_conv_keeps_the_input_layout(name):
    """The padded input the conv sees is channels-last where x is (cuDNN's fast layout)."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (F.conv2d, F.conv3d):
                seen.append(ops.memory_format_of(args[0]))
            return func(*args, **(kwargs or {}))

    conv = NARROW[name]()
    x = torch.randn(2, 3, *((4, 6, 6) if isinstance(conv, nn.Conv3d) else (6, 6)))
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    with Spy():
        forms.padded_conv(conv, x.contiguous(memory_format=fmt))
    assert seen == [fmt]


def test_padded_conv_refuses_groups():
    with pytest.raises(ValueError, match="groups must be 1"):
        forms.padded_conv(nn.Conv3d(4, 6, 3, groups=2), torch.randn(1, 4, 3, 3, 3))


@pytest.mark.parametrize("form", ["torch", "pad8", "subpixel"])
@pytest.mark.parametrize("name", ["stem 3->16", "head 16->1", "head 12->4 no bias"])
def test_narrow_forms_are_the_same_conv(monkeypatch, name, form):
    """Every ``VOSGAN_CUDA_CONV`` narrow form computes the conv (run here on CPU tensors: the
    forms are torch ops, the device only picks them); a stride-2 conv's ``subpixel`` is its
    sub-pixel input gradient."""
    monkeypatch.setitem(forms.CUDA_FORMS, "narrow", form)
    torch.manual_seed(0)
    conv = NARROW[name]().double()
    x = torch.randn(2, conv.in_channels, 4, 6, 6, dtype=torch.float64)
    _same_function(conv, lambda t: forms.narrow_cuda_conv(t, conv), x)


def test_narrow_subpixel_says_when_the_geometry_does_not_fit(monkeypatch):
    monkeypatch.setitem(forms.CUDA_FORMS, "narrow", "subpixel")
    conv = nn.Conv3d(3, 8, 4, 2, 1).double()
    x = torch.randn(1, 3, 5, 6, 6, dtype=torch.float64)  # odd T: no sub-pixel input gradient
    with pytest.warns(UserWarning, match="narrow=subpixel: odd T/H/W"):
        torch.testing.assert_close(forms.narrow_cuda_conv(x, conv), conv(x))


def test_subpixel_transpose_compiles_fullgraph(monkeypatch):
    """The sub-pixel form traces without a graph break (``--compile``)."""
    monkeypatch.setitem(forms.CUDA_FORMS, "transposed", "subpixel")
    torch._dynamo.reset()
    conv = nn.ConvTranspose3d(4, 3, 4, 2, 1)
    x = torch.randn(1, 4, 2, 2, 3, requires_grad=True)
    compiled = torch.compile(lambda t: forms.cuda_conv(t, conv), fullgraph=True, backend="eager")
    out = compiled(x)
    torch.testing.assert_close(out, conv(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ---- "tune": the fastest form per input, timed on its first call ----


def _fake_timer(ms_by_form, calls):
    """A timer that reads each form's time from ``ms_by_form`` (the form is the name the
    candidate closure was bound to) and records which ran, after running it once for real."""

    def timer(fn, device):
        fn()
        form = fn.__defaults__[0]
        calls.append(form)
        return ms_by_form[form]

    return timer


def test_tuned_form_picks_the_fastest_once_per_input(monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(forms, "TUNED", {})
    conv = nn.ConvTranspose3d(4, 3, 4, 2, 1)
    x = torch.randn(2, 4, 2, 3, 2)
    calls = []
    timer = _fake_timer({"torch": 2.0, "subpixel": 0.5, "subpixel-bwd": 1.0}, calls)
    with pytest.warns(UserWarning, match=r"forward\+backward: torch 2.000 ms.*using subpixel"):
        assert forms.tuned_form(x, conv, timer) == "subpixel"
    assert sorted(calls) == sorted(forms.TUNE_CANDIDATES)
    assert forms.tuned_form(x, conv, timer) == "subpixel"  # remembered: not timed again
    assert len(calls) == len(forms.TUNE_CANDIDATES)
    assert conv.weight.grad is None and conv.bias.grad is None  # timing left the module alone
    with torch.no_grad():  # another key: forward only
        with pytest.warns(UserWarning, match=r"\) forward: .*using subpixel"):
            forms.tuned_form(x, conv, timer)
    x_other = torch.randn(1, 4, 2, 3, 2)  # another shape: timed again
    slow_sub = _fake_timer({"torch": 0.1, "subpixel": 0.5, "subpixel-bwd": 1.0}, calls)
    with pytest.warns(UserWarning, match="using torch"):
        assert forms.tuned_form(x_other, conv, slow_sub) == "torch"


def test_tune_runs_the_picked_form_with_torchs_results(monkeypatch):
    """``cuda_conv`` under ``tune`` (real timer, on CPU tensors): torch's values and gradients
    whichever form won."""
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(forms, "TUNED", {})
    monkeypatch.setitem(forms.CUDA_FORMS, "transposed", "tune")
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(6, 5, 4, 2, 1)
    x = torch.randn(2, 6, 2, 3, 4).to(memory_format=CL)
    go = torch.randn(2, 5, 4, 6, 8)
    with pytest.warns(UserWarning, match="transposed=tune"):
        got = _conv_grads(lambda t: forms.cuda_conv(t, conv), x, conv, go)
    want = _conv_grads(conv, x, conv, go)
    assert list(forms.TUNED.values())[0] in forms.TUNE_CANDIDATES
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cudnn_benchmark", [True, False])
def test_tune_under_compile_is_auto(monkeypatch, cudnn_benchmark):
    """``torch.compile`` cannot time inside a trace: ``tune`` compiles as ``auto`` (no graph
    break, nothing timed), whichever form that is."""
    monkeypatch.setattr(backend, "_warned", {"cuda-subpixel"})  # said before: no warning here
    monkeypatch.setattr(forms, "TUNED", {})
    monkeypatch.setitem(forms.CUDA_FORMS, "transposed", "tune")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", cudnn_benchmark)
    monkeypatch.setattr(forms, "tuned_form", None)  # would fail if called
    torch._dynamo.reset()
    conv = nn.ConvTranspose3d(4, 3, 4, 2, 1)
    x = torch.randn(1, 4, 2, 2, 3)
    compiled = torch.compile(lambda t: forms.cuda_conv(t, conv), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), conv(x))
    assert forms.TUNED == {}


@requires_cuda
@pytest.mark.parametrize("form", ["torch", "pad8", "subpixel"])
def test_gpu_narrow_modules_run_their_form(monkeypatch, form, no_tf32):
    """On CUDA the swapped-in narrow convs run ``CUDA_FORMS["narrow"]`` (a spy says which),
    with torch's values and gradients: a transposed head and D's RGB stem, channels_last_3d."""
    monkeypatch.setitem(forms.CUDA_FORMS, "narrow", form)
    calls = []
    real = forms.narrow_cuda_conv
    monkeypatch.setattr(nn_block, "narrow_cuda_conv", lambda x, c: calls.append(1) or real(x, c))
    torch.manual_seed(0)
    for plain in (nn.ConvTranspose3d(16, 1, 4, 2, 1).cuda(), nn.Conv3d(3, 16, 4, 2, 1).cuda()):
        model = nn.Sequential(plain)
        assert len(fuse_modules(model)) == 1
        swapped = model[0]  # shares plain's parameters; plain stays the plain module
        assert isinstance(swapped, (SubpixelConv3d, SubpixelConvTranspose3d))
        x = torch.randn(2, plain.in_channels, 4, 8, 8, device="cuda")
        x = x.contiguous(memory_format=torch.channels_last_3d)
        calls.clear()
        _same_function(plain, swapped, x, tol=1e-4, out_atol=1e-5, ones=True)
        assert calls == [1]


def test_entry_points_check_the_input_and_autocast_leaves_float64_alone():
    """A conv's sub-pixel input gradient needs even T/H/W: refused at the call, not in backward;
    under autocast float64 stays float64, as torch's own conv does (autocast casts fp32 only)."""
    from vosgan.ops.conv3d_subpixel import subpixel_conv3d, subpixel_form_conv

    w = torch.randn(5, 3, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"odd T/H/W \(5, 6, 2\)"):
        subpixel_form_conv(torch.randn(2, 3, 5, 6, 2, dtype=torch.float64), w, None, "subpixel-dx")
    with pytest.raises(ValueError, match=r"x must be \(B, 3, T, H, W\)"):
        subpixel_conv3d(torch.randn(2, 4, 4, 6, 2, dtype=torch.float64), w, None, False)
    x = torch.randn(2, 3, 4, 6, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = subpixel_conv3d(x, w, None, False), torch.nn.functional.conv3d(x, w, None, 2, 1)
    assert out.dtype == want.dtype == torch.float64
    torch.testing.assert_close(out, want)
