"""GRU trajectory encoder over a whole sequence (single layer, unidirectional, batch first).

Gate equations and weight layout are PyTorch's ``nn.GRU`` (gate order r, z, n)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
"""

from __future__ import annotations

import torch
from torch import Tensor

from vosgan import backend


def gru_reference(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """Step-by-step GRU in plain PyTorch (the test oracle).

    Args:
        x: inputs ``(B, T, I)``.
        h0: initial state ``(B, H)``.
        w_ih: ``(3H, I)``; w_hh: ``(3H, H)``; b_ih, b_hh: ``(3H,)``.

    Returns:
        ``(out, h_T)``: every step's state ``(B, T, H)`` and the last one ``(B, H)``.
    """
    gi = torch.nn.functional.linear(x, w_ih, b_ih)  # all steps' input projections at once
    h = h0
    outs = []
    for t in range(x.shape[1]):
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi[:, t].chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, dim=1), h


def fused_impl(device: torch.device) -> tuple[str | None, str]:
    """The fused implementation ``impl="auto"`` uses on ``device`` (see :mod:`vosgan.backend`)."""
    return None, "no fused GRU extension yet (issue #3)"
