"""Activation checkpointing of whole blocks, applied from outside the model definitions.

:func:`checkpoint_blocks` makes each given module recompute its forward during backward
(``torch.utils.checkpoint``, non-reentrant) instead of keeping its internal activations: a
Conv3d+BN+act block then stores only its input, not the conv and BN outputs (about 2/3 of its
activation memory). Only the instance's ``forward`` is replaced, so parameter names,
``state_dict`` and ``fuse_modules`` (run it first) are unaffected.

BatchNorm in a recomputed block: the recomputation runs in training mode with the same batch, so
it normalises with the same batch statistics (same output, same gradients), but it must not
update the running statistics a second time: they are restored after the recomputation (turning
``track_running_stats`` off instead would change what BN saves for backward, which checkpointing
rejects).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Batch statistics still normalise; running statistics and counters are put back after."""
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    saved = [
        [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)] for bn in bns
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, (mean, var, count) in zip(bns, saved, strict=True):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)


class _CheckpointedForward:
    """The instance-level ``forward`` that :func:`checkpoint_blocks` installs.

    A plain object holding its module, not a closure: ``copy.deepcopy`` maps ``module`` to the
    copy (so an EMA copy runs its own weights) and the module pickles.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        calls = 0
        module = self.module
        forward = type(module).forward

        def body(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:  # the real forward
                return forward(module, *a, **kw)
            with _frozen_running_stats(module):  # the recomputation during backward
                return forward(module, *a, **kw)

        # No RNG inside these blocks: skip stashing and restoring the RNG state.
        return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Recompute each block's forward in backward instead of storing its activations.

    Args:
        blocks: modules to checkpoint (e.g. ``[*D.encoder, *D.decoder, *G.foreground]``); each
            must take and return tensors and use its class's ``forward`` (a block whose instance
            already has its own ``forward`` attribute is refused). Blocks already checkpointed
            are skipped.

    Returns:
        The number of blocks newly checkpointed. Outside autograd (``no_grad``, eval) the
        checkpoint is a plain forward. Copies (``copy.deepcopy``) stay checkpointed and run their
        own parameters; checkpointed modules pickle (``torch.save(module)``).
    """
    n = 0
    for block in blocks:
        if not isinstance(block, nn.Module):
            raise TypeError(f"checkpoint_blocks: expected nn.Module, got {type(block).__name__}")
        if is_checkpointed(block):
            continue
        if "forward" in vars(block):
            raise ValueError(
                f"checkpoint_blocks: this {type(block).__name__} already has an instance-level "
                "forward; only a class's own forward can be checkpointed"
            )
        block.forward = _CheckpointedForward(block)
        n += 1
    return n


def is_checkpointed(block: nn.Module) -> bool:
    """Whether :func:`checkpoint_blocks` was applied to ``block``."""
    return isinstance(vars(block).get("forward"), _CheckpointedForward)
