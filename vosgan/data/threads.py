"""Reading on threads: :func:`thread_map` runs a batch's reads (PyAV files, frame-folder clips,
``prepare``'s videos) on a small per-process pool; PyAV and PIL decode without the GIL."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")

_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)
_LOCAL = threading.local()  # on a pool thread: codec_threads, the FFmpeg threads of one decode


def codec_threads() -> int:
    """FFmpeg threads for one decode on the calling thread. On :func:`thread_map`'s threads, the
    cores shared among the reads running at once; elsewhere ``torch.get_num_threads()``: one in
    a DataLoader worker (torch gives each one), so neither many workers nor a pool of reads
    oversubscribe a many-core machine."""
    import torch

    return getattr(_LOCAL, "codec_threads", 0) or torch.get_num_threads()


def thread_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(x) for x in items]`` on up to ``torch.get_num_threads()`` threads: PyAV and PIL
    decode without the GIL. A DataLoader worker runs one thread (torch gives each worker one),
    so workers do not oversubscribe the cores; one item, or a call from one of the pool's own
    threads, runs inline. Each decode gets its share of the cores (:func:`codec_threads`).

    Results come in ``items`` order. The first exception in that order propagates; unlike the
    loop, items already running when it is raised finish in the background (items not yet
    started are cancelled)."""
    global _POOL
    import torch

    pool_size = torch.get_num_threads()
    threads = min(pool_size, len(items))
    if threads <= 1 or getattr(_LOCAL, "codec_threads", 0):  # one read, or from a pool thread
        return [fn(x) for x in items]
    if _POOL is None or _POOL[:2] != (os.getpid(), pool_size):  # a forked worker starts afresh
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), pool_size, ThreadPoolExecutor(pool_size, "vosgan-read"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // threads)

    def run(x: _T) -> _R:
        _LOCAL.codec_threads = share
        return fn(x)

    return list(_POOL[2].map(run, items))
