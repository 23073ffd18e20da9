"""How every numba kernel of :mod:`vosgan.ops` is launched: serialised, and on one thread when
the work is small."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numba

#: The ``workqueue`` threading layer (numba's fallback when neither TBB nor OpenMP loads) aborts
#: when two Python threads launch parallel kernels at once: launches are serialised by this lock.
LAUNCH_LOCK = threading.Lock()

#: Below this many elements of the first array a kernel runs on the calling thread only: waking
#: the pool costs more than the work (torch's ``at::internal::GRAIN_SIZE`` is the same 32768). On
#: this 2-core box, loaded by other processes, a 2-thread launch of a 96-element composite forward
#: took 12 ms against 2 us on one thread.
GRAIN = 1 << 15


def launch(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` (the first argument a numpy array that sizes the work), serialised
    across Python threads and single-threaded below :data:`GRAIN` elements; returns its result."""
    with LAUNCH_LOCK:
        if args[0].size >= GRAIN:
            return kernel(*args)
        threads = numba.get_num_threads()
        numba.set_num_threads(1)  # thread-local in numba: other threads keep their setting
        try:
            return kernel(*args)
        finally:
            numba.set_num_threads(threads)
