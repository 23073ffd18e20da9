"""The correctness check a benchmark case runs once before timing: a provider's outputs, and its
gradients where the case times backward, against the reference provider's on the same inputs,
so that a wrong fast kernel fails its case instead of being timed and reported as a speed-up.

Tolerances are those of the op's tests in ``tests/``: fp32 compares element-wise
(:class:`Tol`); bf16/fp16 use the tests' 2x-error rule against an fp32 oracle (``exact``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tol:
    """``|got - want| <= atol + rtol * |want|``; ``scaled``: ``atol`` times max ``|want|`` of the
    tensor (the tests' relative-to-max rule, for sums over many terms)."""

    rtol: float
    atol: float
    scaled: bool = False


def outputs(
    fn: Callable[..., Tensor],
    args: Sequence[Any],
    wrt: Mapping[str, Tensor] | None = None,
    grad_out: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{"out": fn(*args)}`` plus, for each tensor of ``wrt``, ``"d" + name``: the gradient of
    the output (times ``grad_out``; ``None`` for a scalar) w.r.t. it. The caller sets the grad
    mode the benchmark's step runs under."""
    out = fn(*args)
    res = {"out": out}
    if wrt:
        grads = torch.autograd.grad(out, list(wrt.values()), grad_out)
        res |= {f"d{k}": g for k, g in zip(wrt, grads, strict=True)}
    return {k: v.detach() for k, v in res.items()}


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """cuDNN convs/RNNs and cuBLAS matmuls in full fp32 (no TF32) inside, the flags as they were
    outside: the settings of the fp32 oracle, and of timing a kernel that computes in plain fp32
    against cuDNN/cuBLAS."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        with cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        ):
            yield
    finally:
        matmul.allow_tf32 = before


def upcast(args: Sequence[Any]) -> list[Any]:
    """``args`` with each floating tensor as a detached fp32 copy (requiring grad where the
    original does): the inputs of the fp32 oracle of a low-precision case."""
    return [
        a.detach().float().requires_grad_(a.requires_grad)
        if isinstance(a, Tensor) and a.is_floating_point()
        else a
        for a in args
    ]


def check(
    what: str,
    got: Mapping[str, Tensor],
    want: Mapping[str, Tensor],
    tol: Tol,
    grad_tol: Tol | None = None,
    exact: Mapping[str, Tensor] | None = None,
    floor: float = 1e-3,
) -> None:
    """Raise ``AssertionError`` naming ``what`` and the tensor unless ``got`` (the provider's
    tensors) matches ``want`` (the reference provider's): same names, shapes and dtypes, and

    - without ``exact``: within ``tol`` (``grad_tol``, if given, for every tensor but ``"out"``:
      the gradients of :func:`outputs`);
    - with ``exact`` (fp32 oracle of a low-precision case): max error of ``got`` against it at
      most twice that of ``want`` plus ``floor`` times max ``|exact|``.
    """
    assert got.keys() == want.keys(), f"{what}: {sorted(got)} vs {sorted(want)}"
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, (
            f"{what}: {name} is {g.dtype} {tuple(g.shape)}, the reference {w.dtype} "
            f"{tuple(w.shape)}"
        )
        if exact is not None:
            e = exact[name].float()
            err = (g.float() - e).abs().max().item()
            ref = (w.float() - e).abs().max().item()
            bound = 2 * ref + floor * e.abs().max().item()
            assert err <= bound, (
                f"{what}: {name} max error {err:.3g} against the fp32 oracle, more than 2x the "
                f"reference's {ref:.3g} (+ floor: {bound:.3g})"
            )
            continue
        t = tol if name == "out" or grad_tol is None else grad_tol
        atol = t.atol * w.abs().max().item() if t.scaled and w.numel() else t.atol
        torch.testing.assert_close(
            g, w, rtol=t.rtol, atol=atol, msg=lambda m, n=name: f"{what}: {n} differs. {m}"
        )
