"""The shared numba launcher: small work on one thread, the caller's thread count restored,
concurrent launches from Python threads serialised and correct."""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

from vosgan.ops._numba.launch import GRAIN, launch
from vosgan.ops.flow_warp import flow_warp_loss, flow_warp_loss_reference


@numba.njit
def _threads(a: np.ndarray) -> int:
    return numba.get_num_threads() + 0 * a.size


def test_small_work_runs_on_one_thread_and_restores_the_count() -> None:
    before = numba.get_num_threads()
    assert launch(_threads, np.zeros(8, np.float32)) == 1
    assert launch(_threads, np.zeros(GRAIN, np.float32)) == before
    assert numba.get_num_threads() == before


def test_concurrent_flow_warp_launches_agree_with_the_reference() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 9, 11)
    flows = [torch.randn(2, 2, 3, 9, 11) * 2 for _ in range(4)]
    want = [flow_warp_loss_reference(x, f) for f in flows]
    got: list[torch.Tensor | None] = [None] * 4

    def work(i: int) -> None:
        got[i] = flow_warp_loss(x, flows[i], impl="numba")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
