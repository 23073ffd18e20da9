"""numba CPU kernels for mask compositing ``v = m * f + (1 - m) * b`` and its backward.

Arrays are C-contiguous numpy views of the torch tensors, ``float32`` or ``float64`` (the caller,
:mod:`vosgan.ops.composite`, upcasts fp16/bf16 and copies non-contiguous inputs), with the plane
flattened: ``f, v, g, df (B, C, T, N)``, ``m, dm (B, T, N)``, ``b, db (B, C, N)``, ``N = H * W``.

Each kernel is one pass over its big tensors. The forward parallelises over ``(batch, frame)``
pairs; the backward over ``(batch, plane chunk)`` pairs so that each thread owns its slice of
``db`` (the sum over T) and no two threads write the same element: no atomics, no reduction
buffer. Inner loops run over the contiguous plane so LLVM vectorises them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

#: The ``workqueue`` threading layer (numba's fallback when neither TBB nor OpenMP loads) aborts
#: when two Python threads launch parallel kernels at once: launches are serialised by this lock.
LAUNCH_LOCK = threading.Lock()

#: Below this many elements of ``f`` a kernel runs on the calling thread only: waking the pool
#: costs more than the work (torch's ``at::internal::GRAIN_SIZE`` is the same 32768). On this
#: 2-core box, loaded by other processes, a 2-thread launch of a 96-element forward took 12 ms
#: against 2 us on one thread.
GRAIN = 1 << 15

#: Plane chunk of the backward: 1024 fp32 = 4 KiB per row, so the ``b`` and ``db`` chunks of all
#: channels stay in L1 while the thread walks the frames.
_CHUNK = 1024


@njit(parallel=True, cache=True)
def composite_fwd_kernel(f: np.ndarray, m: np.ndarray, b: np.ndarray, v: np.ndarray) -> None:
    """``v[i, c, t] = m[i, t] * f[i, c, t] + (1 - m[i, t]) * b[i, c]`` (all arrays preallocated)."""
    nb, nc, nt, n = f.shape
    for job in prange(nb * nt):
        i = job // nt
        t = job % nt
        mt = m[i, t]
        for c in range(nc):
            fr = f[i, c, t]
            br = b[i, c]
            vr = v[i, c, t]
            for k in range(n):
                vr[k] = br[k] + mt[k] * (fr[k] - br[k])  # no float64 literal: stays fp32


@njit(parallel=True, cache=True)
def composite_bwd_kernel(
    g: np.ndarray, f: np.ndarray, m: np.ndarray, b: np.ndarray,
    df: np.ndarray, dm: np.ndarray, db: np.ndarray,
) -> None:
    """``df = g * m``, ``dm = sum_c g * (f - b)``, ``db = sum_t g * (1 - m)`` in one pass.

    Accumulation is in the arrays' dtype (fp32 or fp64), in a per-chunk buffer of that dtype.
    """
    nb, nc, nt, n = f.shape
    nchunk = (n + _CHUNK - 1) // _CHUNK
    for job in prange(nb * nchunk):
        i = job // nchunk
        lo = (job % nchunk) * _CHUNK
        hi = min(lo + _CHUNK, n)
        acc = np.zeros((nc, hi - lo), dtype=db.dtype)
        dmt = np.empty(hi - lo, dtype=dm.dtype)
        for t in range(nt):
            mt = m[i, t, lo:hi]
            dmt[:] = 0.0
            for c in range(nc):
                gr = g[i, c, t, lo:hi]
                fr = f[i, c, t, lo:hi]
                br = b[i, c, lo:hi]
                dfr = df[i, c, t, lo:hi]
                ac = acc[c]
                for k in range(hi - lo):
                    gk = gr[k]
                    gm = gk * mt[k]
                    dfr[k] = gm
                    dmt[k] += gk * (fr[k] - br[k])
                    ac[k] += gk - gm  # g * (1 - m) without a float64 literal
            dm[i, t, lo:hi] = dmt
        for c in range(nc):
            db[i, c, lo:hi] = acc[c]


def launch(kernel: Callable[..., None], *arrays: np.ndarray) -> None:
    """Run ``kernel(*arrays)``: serialised across Python threads, single-threaded when small."""
    with LAUNCH_LOCK:
        if arrays[0].size >= GRAIN:
            kernel(*arrays)
            return
        threads = numba.get_num_threads()
        numba.set_num_threads(1)  # thread-local in numba: other threads keep their setting
        try:
            kernel(*arrays)
        finally:
            numba.set_num_threads(threads)
