"""How every numba kernel of :mod:`vosgan.ops` is launched: serialised, and on one thread when
the work is small."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numba

#: The ``workqueue`` threading layer (numba's fallback when neither TBB nor OpenMP loads) aborts
#: when two Python threads launch parallel kernels at once: launches are serialised by this lock.
LAUNCH_LOCK = threading.Lock()

#: numba's threading layer once a kernel has run in this process (inherited by a fork).
_layer: str | None = None
#: Why the kernels cannot run in this process (set in a child forked after the parent ran them
#: on the OpenMP layer), or ``None``.
_blocked: str | None = None


def fork_blocker() -> str | None:
    """Why numba kernels cannot run in this process, or ``None``: a process forked after its
    parent ran them on numba's ``omp`` layer (GNU OpenMP is not fork-safe; numba would terminate
    the child at its first parallel launch)."""
    return _blocked


def _after_fork_in_child() -> None:
    global LAUNCH_LOCK, _blocked
    LAUNCH_LOCK = threading.Lock()  # a lock held by another thread at the fork stays held
    if _layer == "omp":
        _blocked = (
            "this process was forked after its parent ran numba kernels on the OpenMP "
            "threading layer, which is not fork-safe (use the 'spawn' start method, or set "
            "NUMBA_THREADING_LAYER=workqueue or tbb)"
        )
        from vosgan import backend

        backend.forget_choices()  # auto re-decides: the reference, with the reason


os.register_at_fork(after_in_child=_after_fork_in_child)

#: Below this many elements of the first array a kernel runs on the calling thread only: waking
#: the pool costs more than the work (torch's ``at::internal::GRAIN_SIZE`` is the same 32768). On
#: this 2-core box, loaded by other processes, a 2-thread launch of a 96-element composite forward
#: took 12 ms against 2 us on one thread.
GRAIN = 1 << 15


def launch(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` (the first argument a numpy array that sizes the work), serialised
    across Python threads and single-threaded below :data:`GRAIN` elements; returns its result.

    Raises:
        RuntimeError: :func:`fork_blocker` says the kernels cannot run in this process.
    """
    global _layer
    if _blocked is not None:
        raise RuntimeError(f"numba kernels unavailable: {_blocked}")
    with LAUNCH_LOCK:
        try:
            if args[0].size >= GRAIN:
                return kernel(*args)
            threads = numba.get_num_threads()
            numba.set_num_threads(1)  # thread-local in numba: other threads keep their setting
            try:
                return kernel(*args)
            finally:
                numba.set_num_threads(threads)
        finally:
            if _layer is None:
                try:
                    _layer = numba.threading_layer()
                except ValueError:  # no parallel region has run yet
                    pass
