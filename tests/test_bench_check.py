"""The train-step benchmark's correctness check (benchmarks/bench_train_step.py), which runs
before any fused step is timed: it passes the fused step and fails a wrong gradient."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture
def bench(monkeypatch):
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # bench_train_step imports reference_check
    spec = importlib.util.spec_from_file_location("bench_ts", bench_dir / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("factor", [None, 1.001])
def test_fused_step_check_passes_the_step_and_fails_a_wrong_gradient(bench, factor):
    _, step, run = bench._make_step("cpu-small", "cpu", 4, "fused")
    weight = run.G.gru.weight_ih_l0

    def faulty():
        parts = step()
        weight.grad.mul_(factor)  # a gradient 0.1% off, as a wrong kernel might give
        return parts

    # the tolerance of a well-conditioned gradient (G's GRU) stays tight: 1e-4 of its max
    if factor is None:
        bench.check_fused_step("cpu-small", "cpu", 4, step, run)
    else:
        with pytest.raises(AssertionError, match=r"G\.gru\.weight_ih_l0\.grad differs"):
            bench.check_fused_step("cpu-small", "cpu", 4, faulty, run)


@pytest.fixture
def subpixel(monkeypatch):
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # imports bench_conv3d_block, reference_check
    spec = importlib.util.spec_from_file_location("bench_sp", bench_dir / "bench_conv_subpixel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("transposed", [True, False])
def test_subpixel_timed_check_passes_the_forms_and_fails_a_wrong_one(
    subpixel, monkeypatch, transposed
):
    """The conv-forms benchmark's check in the timed configuration (on CUDA a bf16 input under
    bf16 autocast; here CPU autocast): every sub-pixel form passes the 2x rule, and a form 5% off
    (its weight scaled) fails it."""
    case = next(c for c in subpixel.CPU_SMALL if c[1] == transposed)
    for form in subpixel.FORMS[transposed][1:]:
        subpixel.check_timed(form, case, "cpu", batch=2, amp=True)
    wrong, conv = subpixel.FORMS[transposed][-1], subpixel.conv

    def faulty(form, t):
        fn = conv(form, t)
        return (lambda x, w, *args: fn(x, w * 1.05, *args)) if form == wrong else fn

    monkeypatch.setattr(subpixel, "conv", faulty)
    with pytest.raises(AssertionError, match="more than 2x the reference"):
        subpixel.check_timed(wrong, case, "cpu", batch=2, amp=True)
