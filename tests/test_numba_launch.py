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


_FORK_CHILD = """
import multiprocessing as mp, warnings, torch
from vosgan.ops._numba import launch
from vosgan.ops.composite import composite, composite_reference
f, m, b = torch.rand(2, 3, 4, 64, 64), torch.rand(2, 1, 4, 64, 64), torch.rand(2, 3, 64, 64)
composite(f, m, b, impl="numba")  # the parent starts numba's pool
def child(q):
    torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP regions hang after a fork
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.allclose(composite(f, m, b), composite_reference(f, m, b))
    try:
        composite(f, m, b, impl="numba")
        explicit = "ran"
    except RuntimeError as exc:
        explicit = str(exc)
    q.put((ok, [str(w.message) for w in caught], explicit))
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
p.join(60)
assert p.exitcode == 0, p.exitcode
ok, warned, explicit = q.get()
assert ok
if launch._layer == "omp":  # numba would terminate the child at its first parallel launch
    assert any("forked after its parent ran numba" in w for w in warned), warned
    assert explicit.startswith("numba kernels unavailable: this process was forked"), explicit
else:  # workqueue, tbb: fork-safe, the kernels run
    assert explicit == "ran", explicit
print("ok", launch._layer)
"""


def test_a_forked_child_runs_the_reference_instead_of_being_terminated(tmp_path) -> None:
    """numba's OpenMP layer is not fork-safe: a child forked after the parent ran the kernels
    would be terminated by numba at its first launch. It runs the reference instead (auto,
    warned once with the reason) and an explicit impl="numba" raises, naming it."""
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]


def test_a_fork_gives_the_child_a_free_launch_lock(monkeypatch) -> None:
    """A launch lock held by another thread at the fork would stay held in the child."""
    from vosgan.ops._numba import launch as launch_mod

    monkeypatch.setattr(launch_mod, "_layer", "workqueue")
    held = launch_mod.LAUNCH_LOCK
    monkeypatch.setattr(launch_mod, "LAUNCH_LOCK", threading.Lock())
    launch_mod.LAUNCH_LOCK.acquire()
    launch_mod._after_fork_in_child()  # what os.register_at_fork runs in the child
    assert not launch_mod.LAUNCH_LOCK.locked() and launch_mod.fork_blocker() is None
    monkeypatch.setattr(launch_mod, "LAUNCH_LOCK", held)
