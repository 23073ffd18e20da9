"""benchmarks/bench_layer_map.py: the per-layer map of a training step, and its padded convs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vosgan.nn.conv3d_block import _SubpixelMixin


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


def test_layer_map_of_a_cpu_step(lmap):
    calls, step_ms = lmap.layer_map("cpu-small", "cpu", "fused", 2, rounds=1, narrow=True)
    by_name: dict[str, list] = {}
    for c in calls:
        by_name.setdefault(c.name, []).append(c)
    # D's stem sees three clips per step: real and fake in the D step (weight gradients), fake
    # in the G step (D frozen: the input's); the step runs a backward through each
    stem = by_name["D.encoder.0.0"]
    counts: dict[str, list[int]] = {}
    for c in stem:
        got = counts.setdefault(c.grads, [0, 0])
        got[0] += c.calls
        got[1] += c.backwards
    assert counts == {"dw": [2, 2], "dx": [1, 1]}
    # G runs twice: without grad in the D step, with it (and a backward) in the G step
    heads = sorted(by_name["G.heads"], key=lambda c: c.grads)
    assert [(c.grads, c.calls, c.backwards) for c in heads] == [("", 1, 0), ("dx+dw", 1, 1)]
    # D's dense head runs on the real clip too, but before loss.motion_seg_start nothing
    # backpropagates through that call: two forwards, one backward
    assert sum(c.calls for c in by_name["D.dense_head"]) == 2
    assert sum(c.backwards for c in by_name["D.dense_head"]) == 1
    # layers inside a fused block are not listed apart from it
    assert "D.encoder.1" in by_name and not any(n.startswith("D.encoder.1.") for n in by_name)
    for c in calls:
        t = c.timings[""]
        assert 0 < t.fwd_ms <= t.full_ms < math.inf, c.name
        assert c.per_step_ms == pytest.approx(
            c.calls * t.fwd_ms + c.backwards * (t.full_ms - t.fwd_ms)
        )
        # the other forms, at the narrow convs fuse_modules swaps in only
        narrow = isinstance(c.module, _SubpixelMixin)
        assert set(c.timings) == ({"", "pad8", "subpixel"} if narrow else {""}), c.name
    assert all(c.timings[""].full_gflop > c.timings[""].fwd_gflop > 0 for c in heads[1:])
    text = lmap.table(calls, step_ms, "cpu")
    assert "| D.encoder.0.0 | 2x3x16x32x32 |" in text
    assert f"The step's wall time: {step_ms:.2f} ms" in text
    narrow = [c for c in calls if isinstance(c.module, _SubpixelMixin)]
    assert {c.name for c in narrow} == {
        "G.heads",
        "D.dense_head",
        "D.flow_head",
        "D.encoder.0.0",
        "D.flow_encoder.0.0",
    }
    gains = [c.per_step_ms - c.timings["pad8"].per_step(c) for c in narrow]
    net, best, names = lmap.form_savings(calls)["pad8"]
    assert net == pytest.approx(sum(gains))
    assert best == pytest.approx(sum(max(0, g) for g in gains))
    assert names == sorted({c.name for c in narrow})
    assert f"pad8 saves {net:.2f} ms per step at every call" in text


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
        block(x, residual=res).sum().backward()
        block(x, residual=res)  # forward only
        block(x, residual=res.detach())
    by_grads = {c.grads: c for c in calls.values()}
    assert sorted(by_grads) == ["dw", "dx+dw"]
    call = by_grads["dx+dw"]
    assert (call.calls, call.backwards, call.name) == (2, 1, "M.block")
    kept = call.kwargs["residual"]
    assert kept is not res and torch.equal(kept, res) and kept.requires_grad
    lmap.measure(call, torch.autocast("cpu", enabled=False), "cpu", rounds=1)
    assert call.timings[""].fwd_gflop > 0 and 0 < call.per_step_ms < math.inf
