"""CPU sub-pixel path of the few-channel stride-2, kernel-4 (transposed) convs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vosgan import backend
from vosgan.nn import conv3d_block as nn_block
from vosgan.nn import fuse_modules
from vosgan.nn.conv3d_block import SubpixelConv3d, SubpixelConvTranspose3d
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
