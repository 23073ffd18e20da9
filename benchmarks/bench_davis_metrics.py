"""DAVIS J&F throughput (frames/s) at 480x854: numba vs scipy (and cupy on a GPU).

Cases: ``near`` = real DAVIS masks (dog) against the same masks shifted by (6, -9) pixels (a
near miss: the boundary tolerance is 8 px), ``speckle`` = the ground truth against a speckled
prediction (10% of pixels flipped: many boundary pixels, the worst case for the numba path's
per-boundary-pixel scan; frame-difference masks look like this). Each call scores J and F of
every frame of the stack (``jaccard`` + ``f_measure``). scipy dilates with the 17x17 disk like
the DAVIS code (OpenCV there), so it is slow: it runs on fewer frames.

Without the shared DAVIS masks the cases score a synthetic moving ellipse instead; each row's
``extra_info["masks"]`` says which.

Run: ``pytest benchmarks/bench_davis_metrics.py --benchmark-only``. The numba functions are
compiled (or loaded from the cache) before timing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from vosgan import davis_metrics as dm

ROOT = Path(__file__).resolve().parents[1]
DOG = (
    Path(os.environ.get("VOSGAN_SHARED_DATA") or ROOT.parent / "shared" / "data")
    / "davis2016"
    / "dog"
    / "masks"
)
FRAMES = {"numba": 16, "scipy": 2, "cupy": 64}


def _cupy_ok() -> bool:
    return torch.cuda.is_available() and dm._available("cupy")[0]


def masks_source() -> str:
    """Which masks the cases score: the DAVIS dog masks, or the stand-in when they are absent."""
    return "davis2016/dog" if DOG.is_dir() else "synthetic ellipse (DAVIS dog masks absent)"


def _masks(case: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    if DOG.is_dir():
        files = sorted(DOG.glob("*.png"))
        gt = np.stack([np.asarray(Image.open(files[i % len(files)])) > 127 for i in range(n)])
    else:  # no shared data: an ellipse moving right
        yy, xx = np.mgrid[:480, :854]
        gt = np.stack(
            [((yy - 240) / 120) ** 2 + ((xx - 200 - 10 * i) / 180) ** 2 <= 1 for i in range(n)]
        )
    if case == "near":
        return np.roll(gt, (6, -9), axis=(1, 2)), gt
    rng = np.random.default_rng(0)
    return gt ^ (rng.random(gt.shape) < 0.1), gt


@pytest.mark.parametrize("case", ["near", "speckle"])
@pytest.mark.parametrize("provider", ["numba", "scipy", "cupy"])
def test_davis_jf(benchmark, provider: str, case: str) -> None:
    if provider == "cupy" and not _cupy_ok():
        pytest.skip("cupy boundary matching needs a CUDA device and cupy")
    n = FRAMES[provider]
    pred, gt = _masks(case, n)
    dm.f_measure(pred[:1], gt[:1], backend=provider)  # compile / load numba, warm cupy

    def run() -> None:
        dm.jaccard(pred, gt)
        dm.f_measure(pred, gt, backend=provider)

    benchmark.pedantic(run, rounds=3 if provider == "scipy" else 5, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran as a plain test
        return
    median = benchmark.stats.stats.median
    dev = (
        torch.cuda.get_device_name()
        if provider == "cupy"
        else f"CPU {platform.machine()} x{os.cpu_count()}"
    )
    benchmark.extra_info.update(
        device=dev,
        torch=torch.__version__,
        shape=[n, 480, 854],
        case=case,
        masks=masks_source(),
        provider=provider,
        radius=8,
        frames_per_s=round(n / median, 2),
        numba_threads=int(os.environ.get("NUMBA_NUM_THREADS", 0)) or os.cpu_count(),
    )
