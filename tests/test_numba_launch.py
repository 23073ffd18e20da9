"""The shared numba launcher: small work on one thread, the caller's thread count restored,
concurrent launches from Python threads serialised and correct."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
import torch
from conftest import watch_launches

from vosgan.ops._numba import flow_warp as nb_flow_warp
from vosgan.ops._numba.launch import GRAIN, launch
from vosgan.ops.flow_warp import flow_warp_loss, flow_warp_loss_reference


@numba.njit
def _threads(a: np.ndarray) -> int:
    return numba.get_num_threads() + 0 * a.size


@pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2,
    reason="NUMBA_NUM_THREADS=1: one-thread and parallel launches cannot be told apart",
)
def test_small_work_runs_on_one_thread_and_restores_the_count() -> None:
    before = numba.get_num_threads()
    numba.set_num_threads(2)  # whatever an earlier test left: a count the small path must lower
    try:
        assert launch(_threads, np.zeros(8, np.float32)) == 1
        assert launch(_threads, np.zeros(GRAIN, np.float32)) == 2
        assert numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(before)


def test_concurrent_flow_warp_launches_agree_with_the_reference(monkeypatch) -> None:
    """Two threads launch parallel kernels (x of GRAIN elements), two the one-thread path; every
    launch runs with the launch lock held by its own thread."""
    seen = watch_launches(monkeypatch, nb_flow_warp, "fwd")
    torch.manual_seed(0)
    shapes = [((1, 2, 4, 64, 64), (1, 2, 3, 64, 64)), ((2, 3, 4, 9, 11), (2, 2, 3, 9, 11))] * 2
    cases = [(torch.rand(xs), torch.randn(fs) * 2) for xs, fs in shapes]
    assert cases[0][0].numel() == GRAIN > cases[1][0].numel() == 2376
    want = [flow_warp_loss_reference(x, f) for x, f in cases]
    got: list[torch.Tensor | None] = [None] * 4
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        barrier.wait()
        got[i] = flow_warp_loss(*cases[i], impl="numba")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert sorted(n for n, _ in seen) == [2376, 2376, 32768, 32768]
    assert all(held for _, held in seen)
