"""``FlowWarpLoss``: the flow-warping photometric loss as a module."""

from __future__ import annotations

from torch import Tensor, nn

from vosgan.nn.fuse import register_fuser
from vosgan.ops.flow_warp import PADDING_MODES, flow_warp_loss


class FlowWarpLoss(nn.Module):
    """Charbonnier loss between ``x_t`` and ``x_{t+1}`` warped back by the forward flow ``u_t``.

    Args:
        eps: Charbonnier epsilon.
        padding_mode: ``"zeros"`` or ``"border"`` for samples outside the frame.
        impl: ``"reference"`` (``grid_sample``) or ``"auto"`` (the fused op where available).

    Shapes: ``x (B, C, T, H, W)``, ``flow (B, 2, T-1, H, W)`` in pixels, optional
    ``weight (B, 1, T-1, H, W)`` -> a scalar (see :mod:`vosgan.ops.flow_warp` for conventions).
    """

    def __init__(self, eps: float = 1e-3, padding_mode: str = "zeros", impl: str = "auto") -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.eps, self.padding_mode, self.impl = eps, padding_mode, impl

    def forward(self, x: Tensor, flow: Tensor, weight: Tensor | None = None) -> Tensor:
        return flow_warp_loss(x, flow, weight, self.eps, self.padding_mode, impl=self.impl)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, padding_mode={self.padding_mode!r}, impl={self.impl!r}"


@register_fuser("flow_warp_loss")
def _fuse(module: nn.Module) -> nn.Module | None:
    if isinstance(module, FlowWarpLoss):
        module.impl = "auto"
        return module
    return None
