"""vosgan: VOS-GAN (Spampinato et al., arXiv 1803.09092) with fused Triton, C++ and numba ops.

Layers, each depending only on the ones below it:
``vosgan.models`` -> ``vosgan.nn`` (drop-in modules) -> ``vosgan.ops`` (references, autograd,
dispatch) -> ``vosgan.kernels`` (pure Triton) and ``vosgan._C`` (C++/CUDA).
"""

__version__ = "0.1.0"
