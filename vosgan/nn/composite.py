"""``MaskComposite``: the compositing op as a module."""

from __future__ import annotations

from torch import Tensor, nn

from vosgan.nn.fuse import register_fuser
from vosgan.ops.composite import IMPLS, composite


class MaskComposite(nn.Module):
    """``v = m * f + (1 - m) * b`` with ``b`` broadcast over time.

    Args:
        impl: ``"reference"`` (plain PyTorch), ``"auto"`` (the fused op where available:
            Triton on CUDA, numba on CPU; see :func:`vosgan.ops.composite.composite`), or
            ``"triton"`` / ``"numba"`` explicitly.

    Shapes: ``f (B, C, T, H, W)``, ``m (B, 1, T, H, W)``, ``b (B, C, H, W)`` -> ``(B, C, T, H, W)``
    in ``torch.result_type(f, m, b)``. No parameters or buffers: the ``state_dict`` is empty, as
    for the plain expression it replaces. Works under ``torch.compile(fullgraph=True)``.
    """

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"MaskComposite: impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(self, f: Tensor, m: Tensor, b: Tensor) -> Tensor:
        return composite(f, m, b, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


@register_fuser("composite")
def _fuse(module: nn.Module) -> nn.Module | None:
    if isinstance(module, MaskComposite):
        module.impl = "auto"
        return module
    return None
