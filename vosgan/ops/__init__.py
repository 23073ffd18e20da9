"""PyTorch ops: plain references (the CPU path and the test oracle), autograd and dispatch.

One op per module. Each exposes ``<op>_reference``, a dispatching ``<op>(..., impl="auto")`` and
``fused_impl(device)`` for :mod:`vosgan.backend`.
"""
