"""``FlowWarpLoss``: the flow-warping photometric loss as a module."""

from __future__ import annotations

import math

from torch import Tensor, nn

from vosgan.nn.fuse import register_fuser
from vosgan.ops.flow_warp import IMPLS, PADDING_MODES, flow_warp_loss


class FlowWarpLoss(nn.Module):
    """Charbonnier loss between ``x_t`` and ``x_{t+1}`` warped back by the forward flow ``u_t``.

    Args:
        eps: Charbonnier epsilon (> 0).
        padding_mode: ``"zeros"`` or ``"border"`` for samples outside the frame.
        impl: ``"reference"`` (``grid_sample``), ``"auto"`` (the fused op where available:
            Triton on CUDA, numba on CPU; the reference with a one-time warning otherwise),
            ``"triton"`` or ``"numba"``.
        deterministic: bitwise-reproducible ``d loss / d x`` on GPU (int64 fixed-point atomics).

    Shapes: ``x (B, C, T, H, W)``, ``flow (B, 2, T-1, H, W)`` in pixels, optional
    ``weight (B, 1, T-1, H, W)`` (a constant: detach it) -> a scalar in ``x.dtype`` (see
    :mod:`vosgan.ops.flow_warp` for conventions, dtype policy and double backward). No
    parameters or buffers: the ``state_dict`` is empty for every ``impl``.
    """

    def __init__(
        self,
        eps: float = 1e-3,
        padding_mode: str = "zeros",
        impl: str = "auto",
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if not 0 < eps < math.inf:
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        self.eps, self.padding_mode, self.impl = eps, padding_mode, impl
        self.deterministic = deterministic

    def forward(self, x: Tensor, flow: Tensor, weight: Tensor | None = None) -> Tensor:
        return flow_warp_loss(
            x,
            flow,
            weight,
            self.eps,
            self.padding_mode,
            impl=self.impl,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return (
            f"eps={self.eps}, padding_mode={self.padding_mode!r}, impl={self.impl!r}, "
            f"deterministic={self.deterministic}"
        )


@register_fuser("flow_warp_loss")
def _fuse(module: nn.Module) -> nn.Module | None:
    if isinstance(module, FlowWarpLoss):
        module.impl = "auto"
        return module
    return None
