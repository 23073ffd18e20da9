"""Foreground/background mask compositing: ``v = m * f + (1 - m) * b``.

Shapes: ``f (B, C, T, H, W)``, ``m (B, 1, T, H, W)``, ``b (B, C, H, W)`` broadcast over T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vosgan import backend


def composite_reference(f: Tensor, m: Tensor, b: Tensor) -> Tensor:
    """Plain PyTorch compositing.

    Args:
        f: foreground ``(B, C, T, H, W)``.
        m: mask in [0, 1] ``(B, 1, T, H, W)``.
        b: static background ``(B, C, H, W)``, broadcast over T.

    Returns:
        ``v (B, C, T, H, W)`` in the promoted dtype of the inputs.
    """
    return m * f + (1 - m) * b.unsqueeze(2)


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    return None, "no fused compositing kernel yet (issue #4)"


def composite(f: Tensor, m: Tensor, b: Tensor, impl: str = "auto") -> Tensor:
    """Composite ``v = m * f + (1 - m) * b`` with the implementation chosen by ``impl``.

    ``impl="auto"`` asks :mod:`vosgan.backend`; ``"reference"`` forces plain PyTorch.
    Shapes as in :func:`composite_reference`.
    """
    if impl == "auto":
        choice = backend.choose("composite", f.device)
        if not choice.fused:
            backend.warn_once(f"composite-{f.device.type}", f"composite: reference ({choice.reason})")
        impl = choice.impl
    if impl == "reference":
        return composite_reference(f, m, b)
    raise ValueError(f"composite: unknown impl {impl!r}; use 'auto' or 'reference'")
