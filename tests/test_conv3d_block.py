"""Fused Conv3d/ConvTranspose3d + BatchNorm3d + (Leaky)ReLU blocks vs the plain PyTorch block.

Kernels run in the Triton interpreter on CPU (tiny odd shapes: C not a power of two, T=1 and
T=3, odd H and W), both memory layouts, fp32 and fp16; GPU-only cases are skipped without CUDA.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, requires_cuda
from torch import nn
from vosgan.kernels import bn_act_small

from vosgan import aot, backend
from vosgan.nn import FusedConv3dBlock, FusedConvTranspose3dBlock, fuse_modules
from vosgan.nn import conv3d_block as nn_block_mod
from vosgan.ops import conv3d_block as ops
from vosgan.ops.conv3d_block import bn_act, bn_act_reference, conv3d_block_reference

DEV = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(2, 5, 1, 5, 3), (3, 6, 3, 7, 5)]  # (B, C, T, H, W)
CL = torch.channels_last_3d


def _inputs(shape, dtype, layout, residual):
    y = (torch.randn(shape, device=DEV) * 2 + 0.5).to(dtype)
    if layout == "cl":
        y = y.to(memory_format=CL)
    c = shape[1]
    w = torch.randn(c, device=DEV) * 0.5 + 1
    b = torch.randn(c, device=DEV) * 0.3
    r = torch.randn(shape, device=DEV).to(dtype) if residual else None
    return y, w, b, r


def _run(fn, y, w, b, r, go, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (y, w, b)]
    res = r.detach().clone().requires_grad_() if r is not None else None
    out = fn(*leaves, None, None, training=True, momentum=0.1, eps=1e-5, residual=res, **kw)
    out.backward(go)
    grads = [t.grad for t in leaves] + ([res.grad] if res is not None else [])
    return out.detach(), grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["split", "single"])
def test_kernels_match_reference(shape, layout, dtype, path, monkeypatch):
    """Training-mode forward and every gradient, against PyTorch in fp32 (2x-error rule).

    ``split``: statistics/merge/apply kernels; ``single``: the one-launch small-tensor kernels.
    """
    monkeypatch.setattr(bn_act_small, "SMALL_NUMEL", 0 if path == "split" else 1 << 30)
    residual = shape[2] == 3
    slope = 0.2 if layout == "cl" else 0.0
    y, w, b, r = _inputs(shape, dtype, layout, residual)
    go = torch.randn(shape, device=DEV).to(dtype)
    kw = {"negative_slope": slope}
    out, grads = _run(lambda *a, **k: bn_act(*a, impl="triton", **k), y, w, b, r, go, **kw)
    f32 = [t.float() if t is not None else None for t in (y, w, b, r)]
    ref32, gref32 = _run(bn_act_reference, *f32, go.float(), **kw)
    assert out.dtype == dtype and out.stride() == y.stride()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
        for g, gr in zip(grads, gref32, strict=True):
            torch.testing.assert_close(g.float(), gr, rtol=1e-4, atol=1e-4)
        return
    # low precision: error vs the fp32 oracle at most 2x PyTorch's own fp16 error (+ a floor)
    ref16, gref16 = _run(bn_act_reference, y, w, b, r, go, **kw)
    for mine, low, exact in zip([out, *grads], [ref16, *gref16], [ref32, *gref32], strict=True):
        err = (mine.float() - exact).abs().max().item()
        ref_err = (low.float() - exact).abs().max().item()
        assert err <= 2 * ref_err + 2e-3 * exact.abs().max().item(), (err, ref_err)


def _block(transpose, act="lrelu"):
    return conv3d_block_reference(
        4, 6, transpose=transpose, act=act, kernel_size=3, stride=1, padding=1
    ).to(DEV)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("path", ["split", "single"])
def test_module_train_eval_running_stats(transpose, path, monkeypatch):
    monkeypatch.setattr(bn_act_small, "SMALL_NUMEL", 0 if path == "split" else 1 << 30)
    ref = _block(transpose, "relu" if transpose else "lrelu")
    ref[1].momentum = None if transpose else 0.3  # cumulative average on one of the two
    cls = FusedConvTranspose3dBlock if transpose else FusedConv3dBlock
    fused = cls.from_sequential(copy.deepcopy(ref), impl="triton")
    x = torch.randn(2, 4, 3, 5, 3, device=DEV)
    for _ in range(2):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(fused[1], name), getattr(ref[1], name), rtol=1e-6, atol=1e-7
        )
    ref.eval()
    fused.eval()
    xe = torch.randn(2, 4, 1, 5, 3, device=DEV, requires_grad=True)
    xe2 = xe.detach().clone().requires_grad_()
    out_r, out_f = ref(xe), fused(xe2)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out_r)
    out_r.backward(go)
    out_f.backward(go)
    torch.testing.assert_close(xe2.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for p_f, p_r in zip(fused.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_r.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("path", ["split", "single"])
def test_statistics_of_a_large_mean_with_a_small_spread(layout, path, monkeypatch):
    """Shifted data: y = 1e4 + 1e-3 noise (one fp32 ulp of the mean is about the spread). The
    kernels' batch mean and variance match float64 statistics of the same fp32 values; unshifted
    tile means are off by a whole spread there."""
    monkeypatch.setattr(bn_act_small, "SMALL_NUMEL", 0 if path == "split" else 1 << 30)
    g = torch.Generator(device=DEV).manual_seed(3)
    shape = (3, 5, 2, 9, 7)
    y = 1e4 + 1e-3 * torch.randn(shape, device=DEV, generator=g)
    y[:, :, 1] += 2e-3  # a drift between frames: the tiles' means differ
    if layout == "cl":
        y = y.to(memory_format=CL)
    w, b = torch.ones(5, device=DEV), torch.zeros(5, device=DEV)
    rm, rv = torch.zeros(5, device=DEV), torch.ones(5, device=DEV)
    bn_act(y, w, b, rm, rv, training=True, momentum=1.0, impl="triton")  # running := batch
    y64 = y.double().transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(rm.double(), y64.mean(1), rtol=0, atol=1e-3)  # an fp32 ulp
    torch.testing.assert_close(rv.double(), y64.var(1), rtol=1e-3, atol=0)


def test_module_without_running_stats():
    """``track_running_stats=False``: batch statistics in train and eval, nothing updated."""
    ref = _block(False)
    ref[1] = nn.BatchNorm3d(6, track_running_stats=False).to(DEV)
    fused = FusedConv3dBlock.from_sequential(copy.deepcopy(ref), impl="triton")
    x = torch.randn(2, 4, 1, 5, 3, device=DEV)
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fused[1].running_mean is None and fused[1].num_batches_tracked is None


def test_state_dict_compatible():
    ref = _block(False)
    fused = FusedConv3dBlock(4, 6, 3, 1, 1).to(DEV)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())


@pytest.mark.parametrize("training", [True, False])
@torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
def test_double_backward(training):
    """R1-style: grad w.r.t. the input with create_graph=True, then backprop through it."""
    ref = _block(False)
    ref.train(training)
    if not training:
        ref[1].running_mean.uniform_(-0.2, 0.2)
        ref[1].running_var.uniform_(0.5, 2.0)
    fused = FusedConv3dBlock.from_sequential(copy.deepcopy(ref), impl="triton")
    x = torch.randn(2, 4, 3, 5, 3, device=DEV)
    results = []
    for block in (ref, fused):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(block(xi).square().sum(), xi, create_graph=True)
        second = torch.autograd.grad(gx.square().sum(), [xi, *block.parameters()])
        results.append((gx.detach(), *second))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


class _R3DStyle(nn.Module):
    """A small torchvision ``r3d_18``-style net (not from this project)."""

    class Conv3DSimple(nn.Conv3d):
        def __init__(self, cin, cout, stride=1):
            super().__init__(cin, cout, (3, 3, 3), stride, 1, bias=False)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 6, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False),
            nn.BatchNorm3d(6),
            nn.ReLU(inplace=True),
        )
        self.conv1 = nn.Sequential(self.Conv3DSimple(6, 6), nn.BatchNorm3d(6), nn.ReLU(True))
        self.conv2 = nn.Sequential(self.Conv3DSimple(6, 6), nn.BatchNorm3d(6))  # not a match
        self.up = nn.Sequential(
            nn.ConvTranspose3d(6, 5, 4, 2, 1, bias=False), nn.BatchNorm3d(5), nn.LeakyReLU(0.1)
        )
        self.head = nn.Sequential(nn.Conv3d(5, 2, 1), nn.LeakyReLU(0.2))  # no BN: not a match

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(self.conv2(self.conv1(h)) + h)
        return self.head(self.up(h))


@torch.backends.cudnn.flags(enabled=True, allow_tf32=False)  # TF32 convs would blur the match
def test_fuse_modules_foreign_model():
    torch.manual_seed(1)
    ref = _R3DStyle().to(DEV)
    fused = copy.deepcopy(ref)
    replaced = fuse_modules(fused)
    assert [r.split(":")[0] for r in replaced] == ["stem", "conv1", "up"], replaced
    assert type(fused.up) is FusedConvTranspose3dBlock and type(fused.conv2) is nn.Sequential
    assert fuse_modules(fused) == []  # already-fused blocks are left alone
    for m in fused.modules():
        if isinstance(m, (FusedConv3dBlock, FusedConvTranspose3dBlock)):
            m.impl = "triton"
    x = torch.randn(2, 3, 3, 9, 7, device=DEV)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out_r)
    out_r.backward(go)
    out_f.backward(go)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (n, pf), pr in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_fuse_keeps_names_hooks_mode_and_sharing():
    """A named block keeps its state_dict keys; hooks and eval mode carry over; a block used in
    two places becomes one fused block in both."""
    from collections import OrderedDict

    def named():
        conv = nn.Conv3d(4, 6, 3, 1, 1, bias=False)
        return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm3d(6), act=nn.ReLU()))

    shared = named()
    model = nn.Sequential(named(), shared, nn.Identity(), shared).to(DEV).eval()
    model[0][1].running_mean.uniform_(-0.5, 0.5)
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append("block"))
    hooked = nn.Sequential(named(), named())
    hooked[1].bn.register_forward_hook(lambda *_: calls.append("bn"))
    x4 = torch.randn(2, 4, 2, 5, 3, device=DEV)
    want, want_shared, keys = model[0](x4), model[1](x4), model.state_dict().keys()
    replaced = fuse_modules(model)
    assert [r.split(":")[0] for r in replaced] == ["0", "1"], replaced
    assert model.state_dict().keys() == keys
    assert type(model[3]) is FusedConv3dBlock and model[3] is model[1]
    assert not model[0].training and model[0].bn is model[0][1]
    calls.clear()
    torch.testing.assert_close(model[0](x4), want)
    assert calls == ["block"]
    torch.testing.assert_close(model[3](x4), want_shared)
    # a hook on the BatchNorm would never run inside the fused op: that block stays unfused
    skipped = []
    assert [r.split(":")[0] for r in fuse_modules(hooked, skipped=skipped)] == ["0"]
    assert skipped == ["1: Sequential not fused (conv3d_block): BatchNorm3d has hooks"]


def test_child_swapped_after_fusing_runs_unfused(monkeypatch):
    """convert_sync_batchnorm after fuse_modules (or any swapped child): the block runs the
    children's own forwards, says so once, and refuses a residual."""
    from vosgan import backend

    monkeypatch.setattr(backend, "_warned", set())
    block = FusedConv3dBlock(4, 6, 3, 1, 1).to(DEV)
    x = torch.randn(2, 4, 2, 5, 3, device=DEV)
    block[2] = nn.GELU()
    want = nn.Sequential(*block)(x)
    with pytest.warns(UserWarning, match="were set after fusing"):
        torch.testing.assert_close(block(x), want)
    with pytest.raises(TypeError, match="residual needs child 1"):
        block(x, residual=want)


def test_fuser_rejects_non_matches():
    fuser = ops_fuser()
    seq = _block(False)
    assert fuser(nn.Sequential(seq[0], nn.BatchNorm3d(6, affine=False), seq[2])) is None
    assert fuser(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU())) is None
    assert fuser(nn.Sequential(seq[0], nn.BatchNorm3d(5), seq[2])) is None
    assert fuser(nn.Sequential(seq[0], seq[1], nn.LeakyReLU(-0.1))) is None
    assert fuser(nn.Sequential(seq[0], seq[1], nn.GELU())) is None
    assert fuser(conv3d_block_reference(3, 8, norm=False)) is None  # D's first stage
    assert fuser(FusedConv3dBlock(4, 6)) is None
    fused = fuser(seq)
    assert isinstance(fused, FusedConv3dBlock) and fused[0] is seq[0] and fused[1] is seq[1]


def ops_fuser():
    from vosgan.nn.conv3d_block import _fuse

    return _fuse


def test_validation_messages():
    y, w, b, _ = _inputs((2, 5, 1, 3, 3), torch.float32, "ncdhw", False)
    with pytest.raises(ValueError, match="weight"):
        bn_act(y, w[:4], b)
    with pytest.raises(ValueError, match="residual"):
        bn_act(y, w, b, residual=y[:, :4])
    with pytest.raises(ValueError, match="negative_slope"):
        bn_act(y, w, b, negative_slope=-1.0)
    with pytest.raises(ValueError, match="impl"):
        bn_act(y, w, b, impl="cuda")
    with pytest.raises(ValueError, match="y must be"):
        bn_act(y[0], w, b)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn_act(y[:1, :, :, :1, :1], w, b, impl="reference")


def test_module_errors_are_the_eager_blocks():
    """On CPU the fused block runs BN + activation as the eager block does, its errors included
    (one value per channel); a residual of the wrong shape is still refused by name, where
    ``add_`` would broadcast it."""
    torch.manual_seed(0)
    eager = conv3d_block_reference(3, 4, act="lrelu")
    fused = FusedConv3dBlock.from_sequential(copy.deepcopy(eager))
    one_per_channel = torch.randn(1, 3, 2, 2, 2)  # conv output (1, 4, 1, 1, 1)
    for block in (eager, fused):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            block(one_per_channel)
    x = torch.randn(2, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="residual must have y's shape"):
        fused(x, residual=torch.zeros(2, 4, 1, 1, 1))


def _bn_lrelu(y, w, b, rm=None, rv=None, training=True, momentum=0.1, eps=1e-5):
    """The oracle: F.batch_norm + LeakyReLU(0.2)."""
    return F.leaky_relu(F.batch_norm(y, rm, rv, w, b, training, momentum, eps), 0.2)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_strided_weight_and_bias(impl):
    """A column view and an expanded (stride-0) parameter: values and gradients of the view."""
    torch.manual_seed(0)
    y = torch.randn(2, 4, 3, 2, 3, device=DEV)
    base = torch.stack([torch.rand(4, device=DEV) + 0.5, torch.zeros(4, device=DEV)], 1)
    base.requires_grad_()
    scalar = torch.tensor(0.3, device=DEV, requires_grad=True)
    go = torch.randn_like(y)
    out = bn_act(y, base[:, 0], scalar.expand(4), impl=impl)
    (out * go).sum().backward()
    w = base.detach()[:, 0].clone().requires_grad_()
    b = torch.full((4,), 0.3, device=DEV, requires_grad=True)
    ref = _bn_lrelu(y, w, b)
    (ref * go).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.grad[:, 0], w.grad, rtol=1e-4, atol=1e-4)
    assert base.grad[:, 1].eq(0).all()
    torch.testing.assert_close(scalar.grad, b.grad.sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("path", ["split", "single"])
def test_strided_running_stats_updated_in_place(impl, path, monkeypatch):
    """Running stats that are column views: updated as F.batch_norm does, in place, and the
    other column of their buffers untouched."""
    monkeypatch.setattr(bn_act_small, "SMALL_NUMEL", 0 if path == "split" else 1 << 30)
    torch.manual_seed(1)
    y = torch.randn(2, 4, 3, 2, 3, device=DEV)
    w, b = torch.rand(4, device=DEV) + 0.5, torch.randn(4, device=DEV)
    buf = torch.stack([torch.randn(4, device=DEV), torch.full((4,), 7.0, device=DEV)], 1)
    vbuf = torch.stack([torch.rand(4, device=DEV) + 0.5, torch.full((4,), 9.0, device=DEV)], 1)
    rm, rv = buf[:, 0], vbuf[:, 0]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = bn_act(y, w, b, rm, rv, training=True, momentum=0.3, impl=impl)
    ref = _bn_lrelu(y, w, b, rm_ref, rv_ref, momentum=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-6)
    assert buf[:, 1].eq(7.0).all() and vbuf[:, 1].eq(9.0).all()
    assert rm.data_ptr() == buf.data_ptr()  # still the caller's view
    out = bn_act(y, w, b, rm, rv, training=False, impl=impl)
    torch.testing.assert_close(out, _bn_lrelu(y, w, b, rm_ref, rv_ref, training=False))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_without_affine_parameters(impl):
    """weight/bias None (nn.BatchNorm3d(affine=False)): weight 1, bias 0, as F.batch_norm."""
    torch.manual_seed(2)
    y = torch.randn(2, 3, 1, 3, 5, device=DEV)
    go = torch.randn_like(y)
    rm, rv = torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    yi, yr = y.clone().requires_grad_(), y.clone().requires_grad_()
    out = bn_act(yi, None, None, rm, rv, impl=impl)
    ref = _bn_lrelu(yr, None, None, rm_ref, rv_ref)
    (out * go).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yi.grad, yr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((rm, rv), (rm_ref, rv_ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_validation_dtype_device_and_scalars(impl):
    """Wrong dtypes, devices and scalars are refused by name, before any kernel runs."""
    y = torch.randn(2, 4, 1, 3, 3, device=DEV)
    w, b = torch.ones(4, device=DEV), torch.zeros(4, device=DEV)
    rm, rv = torch.zeros(4, device=DEV), torch.ones(4, device=DEV)
    meta = torch.device("meta")
    cases = [
        ("weight", dict(weight=w.long())),
        ("weight", dict(weight=w.double())),
        ("bias", dict(bias=b.to(meta))),
        ("running_mean", dict(running_mean=rm.long(), running_var=rv.long())),
        ("running_var", dict(running_mean=rm, running_var=rv.to(meta))),
        ("residual", dict(residual=torch.ones_like(y, dtype=torch.bool))),
        ("residual", dict(residual=torch.ones_like(y, device=meta))),
        ("momentum", dict(running_mean=rm, running_var=rv, momentum=None)),
        ("eps", dict(eps=-1.0)),
        ("eps", dict(eps=0.0)),
        ("eps", dict(eps=float("nan"))),
    ]
    for name, kw in cases:
        args = {"weight": w, "bias": b, **kw}
        with pytest.raises(ValueError, match=f"bn_act: {name} must"):
            bn_act(y, impl=impl, **args)
    with pytest.raises(ValueError, match="at least one channel"):
        bn_act(y[:, :0], w[:0], b[:0], impl=impl)
    # one dtype for the parameters and statistics: y's, or fp32 with a fp16/bf16 y
    with pytest.raises(ValueError, match="running_mean must be bfloat16 on"):
        bn_act(y.bfloat16(), w.bfloat16(), b.bfloat16(), rm, rv, impl=impl)
    out = bn_act(y.bfloat16(), w, b, rm, rv, impl=impl)  # the autocast case
    assert out.dtype == torch.bfloat16
    f64 = (y.double(), w.double(), b.double(), rm.double(), rv.double())
    if impl == "reference":  # fp64 end to end (the reference's gradcheck dtype)
        bn_act(*f64, impl=impl)
    else:  # the kernels compute in fp32: an explicit impl refuses fp64
        with pytest.raises(ValueError, match="y must be float32, float16 or bfloat16"):
            bn_act(*f64, impl=impl)
    # an empty batch is fine in training, as in nn.BatchNorm3d (one value per channel is not)
    empty = y[:0].requires_grad_()
    out = bn_act(empty, w, b, rm, rv, training=True, impl=impl)
    out.sum().backward()
    assert out.shape == empty.shape and empty.grad.shape == empty.shape


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    # Without the interpreter, Triton cannot read CPU memory: a clear error, not Triton's own.
    y, w, b = torch.randn(2, 5, 1, 3, 3), torch.ones(5), torch.zeros(5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        bn_act(y, w, b, impl="triton")


def test_auto_dispatch_reports_and_warns(monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())  # warn_once's registry: a fresh process
    name, reason = ops.fused_impl(torch.device("cpu"))
    assert name == "subpixel" and "BatchNorm + activation run the reference ops" in reason
    if HAS_CUDA:
        assert ops.fused_impl(torch.device("cuda"))[0] == "triton"
        return
    y, w, b, _ = _inputs((2, 5, 1, 3, 3), torch.float32, "ncdhw", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = bn_act(y, w, b)  # auto on CPU -> the reference ops, with one warning saying so
        bn_act(y, w, b)  # ... only the first time
    assert [str(c.message) for c in caught if "conv3d_block on cpu" in str(c.message)] == [
        f"conv3d_block on cpu: {reason}"
    ]
    torch.testing.assert_close(
        out,
        bn_act_reference(
            y, w, b, None, None, training=True, momentum=0.1, eps=1e-5, negative_slope=0.2
        ),
    )


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    y, w, b, r = _inputs((2, 3, 1, 5, 3), torch.float32, "ncdhw", residual)
    for t in (y, w, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.vosgan.bn_act_fwd, (y, w, b, r, None, None, 1e-5, 0.2))
    rm, rv = torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    torch.library.opcheck(torch.ops.vosgan.bn_act_fwd, (y, w, b, r, rm, rv, 1e-5, 0.0))
    _, mean, var = torch.ops.vosgan.bn_act_fwd(y, w, b, r, None, None, 1e-5, 0.2)
    go = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.vosgan.bn_act_bwd,
        (go, y.detach(), w.detach(), b.detach(), r, mean, var, 1e-5, 0.2, True),
    )


def test_reference_gradcheck_float64():
    y, w, b, r = (
        t.double().requires_grad_() for t in _inputs((2, 2, 1, 2, 3), torch.float32, "ncdhw", True)
    )

    def fn(y, w, b, r):
        return bn_act_reference(
            y,
            w,
            b,
            None,
            None,
            training=True,
            momentum=0.1,
            eps=1e-5,
            negative_slope=0.2,
            residual=r,
        )

    assert torch.autograd.gradcheck(fn, (y, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (y, w, b, r))


_KSIG = {
    "C": "i32",
    "S": "i32",
    "n_sblocks": "i32",
    "stride_b": "i32",
    "stride_c": "i32",
    "stride_s": "i32",
    "eps": "fp32",
    "slope": "fp32",
    "CL": "constexpr",
    "HAS_RES": "constexpr",
    "BLOCK_C": "constexpr",
    "BLOCK_S": "constexpr",
}
_AOT = {
    "_bn_stats_partial_kernel": [
        "y_ptr:*bf16",
        "part_ptr:*fp32",
        "C",
        "S",
        "n_units:i32",
        "units_per_prog:i32",
        "n_sblocks",
        "stride_b",
        "stride_c",
        "stride_s",
        "CL",
        "BLOCK_C",
        "BLOCK_S",
    ],
    "_bn_stats_finalize_kernel": [
        "part_ptr:*fp32",
        "y_ptr:*bf16",
        "mean_ptr:*fp32",
        "var_ptr:*fp32",
        "rm_ptr:*fp32",
        "rv_ptr:*fp32",
        "C",
        "n_part:i32",
        "stride_c",
        "momentum:fp32",
        "unbias:fp32",
        "CL",
        "UPDATE:constexpr",
        "BLOCK_P:constexpr",
        "BLOCK_C",
    ],
    "_bn_act_fwd_kernel": [
        "y_ptr:*bf16",
        "r_ptr:*bf16",
        "out_ptr:*bf16",
        "mean_ptr:*fp32",
        "var_ptr:*fp32",
        "w_ptr:*fp32",
        "b_ptr:*fp32",
        "C",
        "S",
        "n_sblocks",
        "stride_b",
        "stride_c",
        "stride_s",
        "eps",
        "slope",
        "CL",
        "HAS_RES",
        "BLOCK_C",
        "BLOCK_S",
    ],
    "_bn_act_bwd_reduce_kernel": [
        "go_ptr:*bf16",
        "y_ptr:*bf16",
        "r_ptr:*bf16",
        "mean_ptr:*fp32",
        "var_ptr:*fp32",
        "w_ptr:*fp32",
        "b_ptr:*fp32",
        "part_ptr:*fp32",
        "C",
        "S",
        "n_units:i32",
        "units_per_prog:i32",
        "n_sblocks",
        "stride_b",
        "stride_c",
        "stride_s",
        "eps",
        "slope",
        "CL",
        "HAS_RES",
        "BLOCK_C",
        "BLOCK_S",
    ],
    "_bn_act_bwd_kernel": [
        "go_ptr:*bf16",
        "y_ptr:*bf16",
        "r_ptr:*bf16",
        "dy_ptr:*bf16",
        "dr_ptr:*bf16",
        "mean_ptr:*fp32",
        "var_ptr:*fp32",
        "w_ptr:*fp32",
        "b_ptr:*fp32",
        "sum_g_ptr:*fp32",
        "sum_gx_ptr:*fp32",
        "C",
        "S",
        "n_sblocks",
        "stride_b",
        "stride_c",
        "stride_s",
        "inv_n:fp32",
        "eps",
        "slope",
        "CL",
        "HAS_RES",
        "TRAINING:constexpr",
        "BLOCK_C",
        "BLOCK_S",
    ],
}


_AOT["_bn_act_fwd_small_kernel"] = [
    "y_ptr:*bf16",
    "r_ptr:*bf16",
    "out_ptr:*bf16",
    "mean_ptr:*fp32",
    "var_ptr:*fp32",
    "w_ptr:*fp32",
    "b_ptr:*fp32",
    "rm_ptr:*fp32",
    "rv_ptr:*fp32",
    "C",
    "S",
    "n_units:i32",
    "n_sblocks",
    "stride_b",
    "stride_c",
    "stride_s",
    "eps",
    "slope",
    "momentum:fp32",
    "unbias:fp32",
    "CL",
    "HAS_RES",
    "UPDATE:constexpr",
    "BLOCK_C",
    "BLOCK_S",
]
_AOT["_bn_act_bwd_small_kernel"] = [
    "go_ptr:*bf16",
    "y_ptr:*bf16",
    "r_ptr:*bf16",
    "dy_ptr:*bf16",
    "dr_ptr:*bf16",
    "mean_ptr:*fp32",
    "var_ptr:*fp32",
    "w_ptr:*fp32",
    "b_ptr:*fp32",
    "dw_ptr:*fp32",
    "db_ptr:*fp32",
    "C",
    "S",
    "n_units:i32",
    "n_sblocks",
    "stride_b",
    "stride_c",
    "stride_s",
    "inv_n:fp32",
    "eps",
    "slope",
    "CL",
    "HAS_RES",
    "TRAINING:constexpr",
    "BLOCK_C",
    "BLOCK_S",
]


def _aot_compile(kernel: str, arch: int) -> aot.AotReport:
    sig, aligned = {}, []
    for i, spec in enumerate(_AOT[kernel]):
        name, _, typ = spec.partition(":")
        sig[name] = typ or _KSIG[name]
        if sig[name].startswith("*") or name in ("C", "S", "stride_b", "stride_c", "stride_s"):
            aligned.append(i)  # what Triton's runtime specialisation sees when C % 16 == 0
    # the channels_last tilings the launchers pick for a 64-channel bf16 stage, 8 warps
    small = kernel.endswith("_small_kernel")
    consts = {
        "CL": True,
        "HAS_RES": True,
        "TRAINING": True,
        "UPDATE": True,
        "BLOCK_C": 8 if small else 64,
        "BLOCK_S": 512 if small else 64,
    }
    consts = {k: v for k, v in consts.items() if k in sig}
    if kernel == "_bn_stats_finalize_kernel":
        consts.update(BLOCK_P=64, BLOCK_C=32)
    module = "vosgan.kernels.bn_act_small" if small else "vosgan.kernels.bn_act"
    return aot.compile_kernel(
        module, kernel, sig, consts, arch=arch, aligned=tuple(aligned), num_warps=8
    )


def test_aot_compiles_without_spills():
    """Every kernel compiles for sm_80/sm_90 with no spill inside a loop (nor more than 16 bytes
    outside them); streaming ones use 128-bit loads. ptxas 12.8 (Triton 3.6) keeps one value of
    ``_bn_act_fwd_small_kernel`` in local memory across its first pass on sm_90 (8 bytes, stored
    before the loop and loaded after it); ptxas 12.9 (Triton 3.9) spills nothing."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(k, arch) for k in sorted(_AOT) for arch in (80, 90)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # one subprocess per compile
        reports = list(pool.map(lambda job: _aot_compile(*job), jobs))
    for (kernel, arch), rep in zip(jobs, reports, strict=True):
        assert rep.loop_spill_ops >= 0, "cuobjdump (bundled with Triton) did not read the SASS"
        assert rep.spills_ok(), (kernel, arch, rep.registers, rep.spill_stores, rep.loop_spill_ops)
        if kernel != "_bn_stats_finalize_kernel":
            assert rep.vector_loads > 0, (kernel, arch, rep.vector_loads)


def test_loop_local_memory_ops_counts_spills_in_loops_only():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;   /* 0x00000a0000017a02 */
        /*0010*/                   STL [R1], R0 ;           /* 0x0000000001007387 */
        /*0020*/                   LDG.E R2, [R4.64] ;      /* 0x0000000404027981 */
        /*0030*/                   STL [R1+0x4], R2 ;       /* 0x0000040201007387 */
        /*0040*/                   LDL R3, [R1+0x4] ;       /* 0x0000040001037983 */
        /*0050*/               @P0 BRA 0x20 ;               /* 0xfffffffc00f00947 */
        /*0060*/                   LDL.LU R27, [R1] ;       /* 0x00000000011b7983 */
        /*0070*/               @P1 BRA 0x90 ;               /* 0x0000000000047947 */
        /*0080*/                   STL [R1], R27 ;          /* 0x0000000001007387 */
        /*0090*/                   EXIT ;                   /* 0x000000000000794d */
    """
    assert aot.loop_local_memory_ops(sass) == 2  # 0x30 and 0x40: inside 0x20..0x50
    ok = aot.AotReport("k", 90, 40, 8, 4, 1, "", loop_spill_ops=0)
    assert ok.spills_ok() and not ok.spills_ok(outside_loops=4)
    assert not aot.AotReport("k", 90, 40, 8, 4, 1, "", loop_spill_ops=1).spills_ok()
    assert not aot.AotReport("k", 90, 40, 8, 4, 1, "", loop_spill_ops=-1).spills_ok()
    assert aot.AotReport("k", 90, 40, 0, 0, 1, "", loop_spill_ops=-1).spills_ok()


@requires_cuda
@pytest.mark.gpu
def test_gpu_bf16_channels_last_and_compile():
    block = conv3d_block_reference(64, 128).cuda().to(memory_format=CL)
    fused = FusedConv3dBlock.from_sequential(copy.deepcopy(block))
    x = torch.randn(4, 64, 8, 32, 32, device="cuda").to(memory_format=CL)
    with torch.autocast("cuda", torch.bfloat16):
        out_f, out_r = fused(x), block(x)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.autocast("cuda", torch.bfloat16):
        out_c = compiled(x)
    torch.testing.assert_close(out_c.float(), out_r.float(), rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.gpu
# not "benchmark": pytest-benchmark's plugin refuses a test argument of that name (on a GPU,
# where the test runs, it stopped the whole pytest session)
@pytest.mark.parametrize("cudnn_benchmark", [False, True])
def test_gpu_transposed_block_forms_match_eager(cudnn_benchmark, monkeypatch):
    """On CUDA the fused transposed block takes the sub-pixel form while cudnn.benchmark is off
    and cuDNN's while it is on (``cuda_form``); either way its output, input gradient and
    parameter gradients match the eager block's (bf16 autocast, channels_last_3d)."""
    from vosgan.ops import conv3d_forms, conv3d_subpixel

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", cudnn_benchmark)
    monkeypatch.setitem(conv3d_forms.CUDA_FORMS, "transposed", "auto")
    calls = []
    sub = conv3d_subpixel.conv_transpose3d_subpixel
    monkeypatch.setattr(
        conv3d_subpixel, "conv_transpose3d_subpixel", lambda *a: calls.append(1) or sub(*a)
    )
    torch.manual_seed(0)
    block = conv3d_block_reference(96, 48, transpose=True, act="relu").cuda()
    block = block.to(memory_format=CL)
    fused = FusedConvTranspose3dBlock.from_sequential(copy.deepcopy(block))
    x = torch.randn(4, 96, 4, 8, 8, device="cuda").to(memory_format=CL)
    grads = []
    for model in (block, fused):
        xr = x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            out = model(xr)
        out.float().square().mean().backward()
        grads.append([out.float(), xr.grad, *(p.grad for p in model.parameters())])
    assert len(calls) == (0 if cudnn_benchmark else 1)
    for got, want in zip(grads[1], grads[0], strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * scale)


def test_auto_resolves_float64_to_the_reference_for_the_op_and_the_module(monkeypatch):
    """One rule for bn_act and the fused block's forward: where auto would pick Triton (CUDA),
    float64 runs the reference (the kernels compute in fp32); an explicit impl is kept."""
    from vosgan import backend

    monkeypatch.setattr(ops, "auto_impl", lambda device_type: "triton")
    monkeypatch.setattr(backend, "_warned", set())
    y64, y32 = torch.zeros(2, 3, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 3, 1, 2, 2)
    with pytest.warns(UserWarning, match="float64 runs the reference"):
        assert ops.resolve_impl("auto", y64) == "reference"
    assert ops.resolve_impl("auto", y32) == "triton"
    assert ops.resolve_impl("triton", y64) == "triton"  # refused later, by name
    block = FusedConv3dBlock(3, 4, 3, 1, 1).double()
    seen = []
    monkeypatch.setattr(nn_block_mod, "bn_act_reference", lambda *a, **k: seen.append(1) or a[0])
    block(torch.randn(2, 3, 1, 4, 4, dtype=torch.float64))
    assert seen == [1]  # the module took the reference, not bn_act(impl="triton")
