"""Module-level API of the drop-ins (``vosgan.nn``): argument checks, ``fuse_modules`` reporting,
activation checkpointing under copy and pickle."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from vosgan.nn import (
    FusedConv3dBlock,
    FusedConvTranspose3dBlock,
    FusedGRU,
    MaskComposite,
    SubpixelConvTranspose3d,
    fuse_modules,
)
from vosgan.nn.checkpointing import checkpoint_blocks, is_checkpointed


def test_checkpointed_copy_runs_its_own_weights_and_pickles():
    s = nn.Sequential(nn.Linear(2, 2))
    assert checkpoint_blocks([s]) == 1
    s2 = copy.deepcopy(s)
    with torch.no_grad():
        s2[0].weight.zero_()
        s2[0].bias.zero_()
    x = torch.ones(1, 2, requires_grad=True)
    assert is_checkpointed(s2) and s2(x).abs().max() == 0  # the copy's weights, not s's
    assert s(x).abs().max() > 0
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    s3 = torch.load(buf, weights_only=False)
    assert is_checkpointed(s3)
    torch.testing.assert_close(s3(x), s(x))
    s3(x).sum().backward()  # recomputes through s3's own forward
    assert s3[0].weight.grad is not None and s[0].weight.grad is None
    assert checkpoint_blocks([s]) == 0  # already checkpointed


def _block(conv: nn.Module, bn: int, *rest: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm3d(bn), *rest)


@pytest.mark.parametrize(
    "cls, conv",
    [
        (FusedConv3dBlock, lambda: nn.Conv3d(3, 4, 3, 1, 1)),
        (FusedConvTranspose3dBlock, lambda: nn.ConvTranspose3d(3, 4, 4, 2, 1)),
    ],
)
def test_from_sequential_takes_exactly_a_block(cls, conv):
    cls.from_sequential(_block(conv(), 4, nn.ReLU()))  # the supported form
    with pytest.raises(ValueError, match=r"exactly 3 children .* got 4"):
        cls.from_sequential(_block(conv(), 4, nn.ReLU(), nn.Conv3d(4, 2, 1)))
    with pytest.raises(ValueError, match="exactly 3 children .* got 1"):
        cls.from_sequential(nn.Sequential(conv()))
    with pytest.raises(ValueError, match="num_features=5 but child 0 .* out_channels=4"):
        cls.from_sequential(_block(conv(), 5, nn.ReLU()))
    with pytest.raises(TypeError, match="expected nn.Sequential"):
        cls.from_sequential(conv())


def test_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="MaskComposite: impl must be one of"):
        MaskComposite(impl="bogus")
    with pytest.raises(ValueError, match="FusedGRU: impl must be one of"):
        FusedGRU(3, 4, impl="bogus")
    for dropout in (2.0, -1.0):
        with pytest.raises(ValueError, match=r"FusedGRU: dropout must be in \[0, 1\]"):
            FusedGRU(3, 4, dropout=dropout)
    with pytest.raises(TypeError, match="FusedGRU: hidden_size must be an int, got float"):
        FusedGRU(3, 4.0)
    with pytest.raises(TypeError, match="FusedGRU: input_size must be an int"):
        FusedGRU(2.5, 4)
    FusedGRU(3, 4, dropout=0.5)  # accepted, no effect with one layer (as nn.GRU)


def test_fused_gru_h_n_has_its_own_storage_and_empty_batches_work():
    ref = nn.GRU(3, 4, batch_first=True)
    fused = FusedGRU.from_gru(ref, impl="cpp")
    x = torch.randn(2, 5, 3)
    out, h = fused(x)
    last = out[:, -1].clone()
    h.zero_()
    torch.testing.assert_close(out[:, -1], last)  # zeroing h_n leaves the output alone
    for hx in (None, torch.zeros(1, 0, 4)):
        out, h = fused(x[:0], hx)
        want_out, want_h = ref(x[:0], hx)
        assert out.shape == want_out.shape == (0, 5, 4) and h.shape == want_h.shape == (1, 0, 4)


def test_fuse_modules_checks_ops():
    model = nn.Sequential(nn.GRU(3, 4, batch_first=True))
    with pytest.raises(ValueError, match=r"unknown ops \['bogus'\]; known ops: .*'gru'"):
        fuse_modules(model, ops={"bogus"})
    for ops in ("gru", "g"):
        with pytest.raises(TypeError, match="ops must be a set of op names"):
            fuse_modules(model, ops=ops)
    assert fuse_modules(model, ops=["gru"]) == ["0: GRU -> FusedGRU (gru)"]


def test_fuse_modules_reports_what_it_skips():
    class MyGRU(nn.GRU):
        pass

    model = nn.Sequential(
        nn.GRU(3, 4),
        nn.GRU(3, 4, batch_first=True, num_layers=2),
        nn.GRU(3, 4, batch_first=True, bidirectional=True),
        MyGRU(3, 4, batch_first=True),
        nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4, affine=False), nn.ReLU()),
        nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.GELU()),
        nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Dropout()),
        nn.Conv3d(4, 4, 4, 2, 1, groups=2),
        nn.Conv3d(3, 8, 4, 2, 1, padding_mode="reflect"),
        nn.Conv3d(3, 8, 4, 2, 1, dilation=2),
        nn.Linear(3, 3),  # not a candidate: not listed
        nn.Conv3d(16, 8, 4, 2, 1),  # wide: not a sub-pixel candidate, not listed
    )
    skipped: list[str] = []
    assert fuse_modules(model, skipped=skipped) == []
    assert skipped == [
        "0: GRU not fused (gru): batch_first=False (FusedGRU is batch-first only)",
        "1: GRU not fused (gru): num_layers=2 (FusedGRU has one layer)",
        "2: GRU not fused (gru): bidirectional=True (FusedGRU runs one direction)",
        "3: MyGRU not fused (gru): a subclass of nn.GRU (MyGRU) may change its forward",
        "4: Sequential not fused (conv3d_block): BatchNorm3d has affine=False",
        "5: Sequential not fused (conv3d_block): activation GELU (only LeakyReLU or ReLU)",
        "6: Sequential not fused (conv3d_block): 4 children (a block is conv, BatchNorm3d, "
        "LeakyReLU|ReLU)",
        "7: Conv3d not fused (conv3d_block): groups=2 (the sub-pixel path takes kernel 4, "
        "padding 1, stride 2 only)",
        "8: Conv3d not fused (conv3d_block): padding_mode='reflect' (the sub-pixel path takes "
        "kernel 4, padding 1, stride 2 only)",
        "9: Conv3d not fused (conv3d_block): dilation=(2, 2, 2) (the sub-pixel path takes "
        "kernel 4, padding 1, stride 2 only)",
    ]


def test_fuse_modules_root_and_second_call():
    with pytest.raises(ValueError, match=r"the model itself \(GRU\) would become a FusedGRU"):
        fuse_modules(nn.GRU(3, 4, batch_first=True))
    model = nn.Sequential(
        nn.GRU(3, 4, batch_first=True),
        MaskComposite(impl="reference"),
        nn.Sequential(nn.Conv3d(3, 4, 4, 2, 1), nn.BatchNorm3d(4), nn.ReLU()),
    )
    assert [line.split(":")[0] for line in fuse_modules(model)] == ["0", "1", "2", "2.0"]
    assert fuse_modules(model) == []  # already fused: not listed again
    root = MaskComposite(impl="reference")  # switched in place: fine at the root
    assert fuse_modules(root) == ["(model): MaskComposite -> MaskComposite (composite)"]
    assert root.impl == "auto" and fuse_modules(root) == []


def test_subpixel_wrong_input_channels_names_in_channels():
    m = SubpixelConvTranspose3d(8, 3, 4, 2, 1)
    m.impl = "subpixel"
    with pytest.raises(ValueError, match=r"has 7 channels, expected in_channels=8"):
        m(torch.randn(2, 7, 2, 3, 3))
