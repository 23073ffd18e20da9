"""``torch.compile`` of a reference provider, one benchmark case at a time.

Dynamo keeps one cache per function, of at most ``torch._dynamo.config.recompile_limit`` (8)
entries; a function that has used them up runs eager from then on, with a warning at most. A
benchmark that compiled the same reference for case after case (shapes, dtypes, modes) timed
eager calls under the ``compile`` label after its eighth case. So each case compiles from an
empty cache with static shapes (:func:`compile_case`), warms up with a recompile-limit hit made
an error (:func:`strict_recompiles`, where the installed torch has the option), and checks, and
records, that dynamo compiled at least one graph for it (:func:`graph_count`,
:func:`graphs_since`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def compile_case(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)`` after ``torch._dynamo.reset()``: a graph specialised
    to this case's shapes, not a dynamic-shape graph left by an earlier case's recompile."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


@contextlib.contextmanager
def strict_recompiles() -> Iterator[None]:
    """Make dynamo raise instead of falling back to eager when a function hits its recompile
    limit (``fail_on_recompile_limit_hit``: torch 2.11 on the GPU box and 2.13 here have it; an
    older torch without it is still covered by :func:`graphs_since`)."""
    cfg = torch._dynamo.config
    if not hasattr(cfg, "fail_on_recompile_limit_hit"):
        yield
        return
    with cfg.patch(fail_on_recompile_limit_hit=True):
        yield


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (``reset()`` does not clear it)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def graphs_since(start: int, what: str) -> int:
    """Graphs compiled since ``start`` (a :func:`graph_count`); raises ``AssertionError`` naming
    ``what`` when there are none: the ``compile`` provider would time eager calls."""
    n = graph_count() - start
    assert n >= 1, f"{what}: torch.compile compiled no graph, the case would time eager calls"
    return n
