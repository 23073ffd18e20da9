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
