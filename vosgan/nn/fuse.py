"""Swap fused drop-in modules into any model: :func:`fuse_modules`."""

from __future__ import annotations

from collections.abc import Callable, Collection

from torch import nn

#: A fuser takes a module and returns its fused replacement (or the module itself, switched to its
#: fused implementation), or ``None`` when it does not apply.
Fuser = Callable[[nn.Module], "nn.Module | None"]
#: Why a module of the kind a fuser replaces was not fused (``None``: not such a module).
WhyNot = Callable[[nn.Module], "str | None"]
_FUSERS: list[tuple[str, Fuser, WhyNot | None]] = []


def register_fuser(op: str, why_not: WhyNot | None = None) -> Callable[[Fuser], Fuser]:
    """Decorator: register a fuser for ``op`` (an op name of :mod:`vosgan.backend`).

    ``why_not``: optional; for a module the fuser returned ``None`` for, the reason it is not
    fused if it is a candidate (e.g. an ``nn.GRU`` with ``batch_first=False``), else ``None``.
    It feeds ``fuse_modules(..., skipped=...)``.
    """

    def deco(fn: Fuser) -> Fuser:
        _FUSERS.append((op, fn, why_not))
        return fn

    return deco


def _public_state(module: nn.Module) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def fuse_modules(
    model: nn.Module, ops: Collection[str] | None = None, skipped: list[str] | None = None
) -> list[str]:
    """Replace every fusable sub-module of ``model`` in place.

    Args:
        model: any ``nn.Module``; its parameters and buffers are carried over unchanged. ``model``
            itself cannot be replaced (there is no parent to put the new module in): a fusable
            root such as a bare ``nn.GRU`` raises ``ValueError``; wrap it (``nn.Sequential``) or
            build the fused module directly (e.g. ``FusedGRU.from_gru``).
        ops: restrict to these op names (a set or list; default: every registered fuser).
        skipped: if given, one line is appended per candidate module left alone, with the
            reason: ``"<qualified name>: <type> not fused (<op>): <reason>"`` (e.g. an
            ``nn.GRU`` with ``batch_first=False``, a block whose BatchNorm has no affine
            parameters).

    Returns:
        One line per replacement: ``"<qualified name>: <old type> -> <new type> (<op>)"``.
        Modules already fused are not listed again by a second call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_modules: model must be an nn.Module, got {type(model).__name__}")
    known = sorted({op for op, _, _ in _FUSERS})
    if ops is not None:
        if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
            raise TypeError(f"fuse_modules: ops must be a set of op names, got {ops!r}")
        unknown = sorted(set(ops) - set(known))
        if unknown:
            raise ValueError(f"fuse_modules: unknown ops {unknown}; known ops: {known}")
    fusers = [entry for entry in _FUSERS if ops is None or entry[0] in ops]
    replaced: list[str] = []

    def fuse(module: nn.Module, qual: str) -> nn.Module:
        """``module`` fused (the same object when fused in place or not fused)."""
        name = qual or "(model)"
        for op, fuser, _ in fusers:
            before = _public_state(module)
            new = fuser(module)
            if new is None:
                continue
            if new is not module and module is model:
                raise ValueError(
                    f"fuse_modules: the model itself ({type(module).__name__}) would become a "
                    f"{type(new).__name__} ({op}), which cannot be done in place; wrap it "
                    "(nn.Sequential(model)) or build the fused module directly"
                )
            if new is not module or _public_state(module) != before:  # else: already fused
                replaced.append(f"{name}: {type(module).__name__} -> {type(new).__name__} ({op})")
            return new
        if skipped is not None:
            for op, _, why_not in fusers:
                reason = why_not(module) if why_not is not None else None
                if reason is not None:
                    skipped.append(f"{name}: {type(module).__name__} not fused ({op}): {reason}")
        return module

    # a module used in several places is fused once, and every place gets the same new module
    # (named_children() would list it once and leave the other places unfused); the map keeps
    # the old module alive so that its id is not reused while the walk runs
    fused: dict[int, tuple[nn.Module, nn.Module]] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            seen = id(child) in fused
            new = fused[id(child)][1] if seen else fuse(child, qual)
            fused[id(child)] = fused[id(new)] = (child, new)
            if new is not child:
                setattr(parent, name, new)
            if not seen:
                visit(new, qual)

    fuse(model, "")
    fused[id(model)] = (model, model)
    visit(model, "")
    return replaced
