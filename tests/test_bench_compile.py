"""benchmarks/compile_case.py: the ``compile`` provider of a benchmark compiles for each case and
never times dynamo's eager fallback after a recompile limit."""

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "bench_compile_case", Path(__file__).resolve().parents[1] / "benchmarks" / "compile_case.py"
)
cc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cc)


def _loss(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() * 2).square().mean()


def test_each_case_compiles_past_the_recompile_limit():
    """Three cases of one function under a recompile limit of 2: each still compiles its own
    graph; one compiled function reused for every case hits the limit, which the strict context
    turns into an error instead of eager calls."""
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in (3, 4, 5):
            start = cc.graph_count()
            fn = cc.compile_case(_loss)
            with cc.strict_recompiles():
                torch.testing.assert_close(fn(torch.ones(n)), _loss(torch.ones(n)))
            assert cc.graphs_since(start, f"case {n}") == 1
        torch._dynamo.reset()
        shared = torch.compile(_loss, dynamic=False)
        shared(torch.ones(3))
        shared(torch.ones(4))
        with pytest.raises(Exception, match="fail_on_recompile_limit_hit"):
            with cc.strict_recompiles():
                shared(torch.ones(5))
    torch._dynamo.reset()
    start = cc.graph_count()
    with pytest.raises(AssertionError, match="compiled no graph"):
        cc.graphs_since(start, "an eager case")
