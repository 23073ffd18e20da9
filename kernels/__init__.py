"""Pure Triton kernels and their host launchers (installed as ``vosgan.kernels``).

No autograd and no module state here: ``vosgan.ops`` wraps these launchers into PyTorch ops.
Set ``TRITON_INTERPRET=1`` before importing a kernel module to run it on CPU tensors.
"""
