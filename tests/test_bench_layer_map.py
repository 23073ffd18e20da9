"""benchmarks/bench_layer_map.py: the per-layer map of a training step, and its padded convs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def lmap():
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(bench_dir))  # it imports bench_train_step and reference_check
    spec = importlib.util.spec_from_file_location("bench_lm", bench_dir / "bench_layer_map.py")
    module = importlib.util.module_from_spec(spec)
    mp.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    mp.undo()


CONVS = {
    "stem 3->16": lambda: nn.Conv3d(3, 16, 4, 2, 1),
    "head 16->1": lambda: nn.ConvTranspose3d(16, 1, 4, 2, 1),
    "head 12->4 no bias": lambda: nn.ConvTranspose3d(12, 4, 4, 2, 1, bias=False),
    "2d 5->3": lambda: nn.ConvTranspose2d(5, 3, 4, 2, 1),
    "2d 3->10 k3": lambda: nn.Conv2d(3, 10, 3, 1, 1),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(CONVS))
def test_padded_conv_is_the_same_conv(lmap, name, channels_last):
    torch.manual_seed(0)
    conv = CONVS[name]().double()
    spatial = (4, 6, 6) if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) else (6, 6)
    x = torch.randn(2, conv.in_channels, *spatial, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        )
    assert lmap.is_narrow(conv)
    outs, grads = [], []
    for fn in (conv, lambda t: lmap.padded_conv(conv, t)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in conv.parameters()])
        conv.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    assert outs[1].shape == outs[0].shape
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padded_conv_refuses_groups(lmap):
    conv = nn.Conv3d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match="groups must be 1"):
        lmap.padded_conv(conv, torch.randn(1, 4, 3, 3, 3))


def test_layer_map_of_a_cpu_step(lmap):
    calls, step_ms = lmap.layer_map("cpu-small", "cpu", "fused", 2, rounds=1, narrow=True)
    by_name: dict[str, list] = {}
    for c in calls:
        by_name.setdefault(c.name, []).append(c)
    # D's stem sees three clips per step: real (D step), fake (D step), fake (G step, D frozen)
    stem = by_name["D.encoder.0.0"]
    per_grads: dict[str, int] = {}
    for c in stem:
        per_grads[c.grads] = per_grads.get(c.grads, 0) + c.calls
    assert per_grads == {"dw": 2, "dx": 1}
    # G runs twice: without grad in the D step, with it in the G step
    assert sorted(c.grads for c in by_name["G.heads"]) == ["", "dx+dw"]
    # layers inside a fused block are not listed apart from it
    assert "D.encoder.1" in by_name and not any(n.startswith("D.encoder.1.") for n in by_name)
    for c in calls:
        assert 0 < c.fwd_ms < math.inf and 0 < c.step_ms < math.inf, c.name
        assert ("pad8" in c.extra) == lmap.is_narrow(c.module), c.name
    assert all(c.gflop > 0 for c in by_name["D.encoder.1"])
    # the transposed heads also in sub-pixel form; the stride-2 stem has none
    assert all(set(c.extra) == {"pad8", "subpixel"} for c in by_name["G.heads"])
    assert all(set(c.extra) == {"pad8"} for c in stem)
    text = lmap.table(calls, step_ms, "cpu")
    assert "| D.encoder.0.0 | 2x3x16x32x32 |" in text
    assert f"The step's wall time: {step_ms:.2f} ms" in text
    savings = lmap.form_savings(calls)
    narrow = [c for c in calls if lmap.is_narrow(c.module)]
    assert savings["pad8"][1] == len(narrow)
    want = sum(c.calls * max(0.0, c.step_ms - c.extra["pad8"]) for c in narrow)
    assert savings["pad8"][0] == pytest.approx(want)
    assert f"pad8, used at those of its {len(narrow)} calls" in text


def test_recording_keeps_keyword_tensors(lmap):
    """A layer called with a tensor by keyword (a fused block's residual): the call is keyed,
    kept and replayed with it; its gradient counts as an input's."""
    from vosgan.nn import FusedConv3dBlock

    torch.manual_seed(0)
    block = FusedConv3dBlock(3, 8, act="relu")
    model = nn.ModuleDict({"block": block})
    x = torch.randn(2, 3, 4, 4, 4)
    res = torch.randn(2, 8, 2, 2, 2, requires_grad=True)
    with lmap.recording({"M": model}) as calls:
        for _ in range(2):
            block(x, residual=res)
        block(x, residual=res.detach())
    by_grads = {c.grads: c for c in calls.values()}
    assert sorted(by_grads) == ["dw", "dx+dw"]
    call = by_grads["dx+dw"]
    assert call.calls == 2 and call.name == "M.block"
    kept = call.kwargs["residual"]
    assert kept is not res and torch.equal(kept, res) and kept.requires_grad
    lmap.measure(call, torch.autocast("cpu", enabled=False), "cpu", rounds=1)
    assert call.gflop > 0 and 0 < call.step_ms < math.inf
