"""numba CPU kernels (``@njit(parallel=True, cache=True)``): the fused CPU paths of vosgan.ops."""
