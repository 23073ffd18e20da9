"""Swap fused drop-in modules into any model: :func:`fuse_modules`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

#: A fuser takes a module and returns its fused replacement (or the module itself, switched to its
#: fused implementation), or ``None`` when it does not apply.
Fuser = Callable[[nn.Module], "nn.Module | None"]
_FUSERS: list[tuple[str, Fuser]] = []


def register_fuser(op: str) -> Callable[[Fuser], Fuser]:
    """Decorator: register a fuser for ``op`` (an op name of :mod:`vosgan.backend`)."""

    def deco(fn: Fuser) -> Fuser:
        _FUSERS.append((op, fn))
        return fn

    return deco


def fuse_modules(model: nn.Module, ops: set[str] | None = None) -> list[str]:
    """Replace every fusable sub-module of ``model`` in place.

    Args:
        model: any ``nn.Module``; its parameters and buffers are carried over unchanged.
        ops: restrict to these op names (default: every registered fuser).

    Returns:
        One line per replacement: ``"<qualified name>: <old type> -> <new type>"``.
    """
    replaced: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}.{name}" if prefix else name
            for op, fuser in _FUSERS:
                if ops is not None and op not in ops:
                    continue
                new = fuser(child)
                if new is not None:
                    if new is not child:
                        setattr(parent, name, new)
                    replaced.append(
                        f"{qual}: {type(child).__name__} -> {type(new).__name__} ({op})"
                    )
                    child = new
                    break
            visit(child, qual)

    visit(model, "")
    return replaced
