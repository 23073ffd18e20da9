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
