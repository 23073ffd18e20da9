"""A moving average of D's weights: the discriminator that evaluation, samples and exports use.

Training never reads the average (``train.d_ema``); it follows D's weights step by step:

    avg <- avg + (1 - d_t) * (w - avg),    d_t = min(decay, (1 + t) / (10 + t))

for every parameter and floating-point buffer (BatchNorm's running statistics too, so that the
averaged weights are normalised by statistics of similar weights), where ``t`` is the training
step just completed; integer buffers (BatchNorm's batch counter) are copied. The warm-up
``(1 + t) / (10 + t)`` keeps the initial weights from lingering in the average of a short run.
Because ``d_t`` depends only on ``t``, a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_decay(decay: float, step: int) -> float:
    """The decay applied after training step ``step`` (1-based):
    ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """An exponential moving average of a module's weights, kept in a frozen copy of it.

    Args:
        model: the module to average (its current weights start the average).
        decay: in (0, 1); each update keeps this fraction of the average (after the warm-up).

    ``module`` is the copy, in eval mode, with ``requires_grad`` off: call it like ``model``.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"WeightAverage: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average toward ``model``'s weights after training step ``step`` (1-based).

        ``model`` must have the average's structure (the module it was made from)."""
        # state_dict() tensors are detached views of the parameters and buffers: in-place updates
        # of ``mine`` change the copy's weights.
        mine, theirs = self.module.state_dict(), model.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError("WeightAverage.update: the model's state_dict keys differ")
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        weight = 1.0 - ema_decay(self.decay, step)
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], weight)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed as ``model.state_dict()``."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore averaged weights (or start the average from a model's ``state_dict``)."""
        self.module.load_state_dict(state)
