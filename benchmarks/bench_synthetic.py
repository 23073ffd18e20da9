"""Synthetic data throughput: clips/s delivered by :class:`vosgan.data.SyntheticVideos`.

Providers: ``render`` (one clip rendered from its seed, numpy), ``batch`` (16 clips rendered
and converted to the training tensors: ``SyntheticVideos.batch``, the on-the-fly loader path),
``cached`` (16 clips gathered from the uint8 in-memory cache and converted). Shapes: the
``cpu-small`` preset (T=16, 32x32) and the ``paper`` preset (T=32, 64x64).

``pytest benchmarks/bench_synthetic.py --benchmark-only`` (about 30 s) or
``python benchmarks/bench_synthetic.py`` for the markdown rows of ``benchmarks/RESULTS.md``
(perf_counter medians and minima: the minimum shows the cost on an idle CPU).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from vosgan.data import SyntheticVideos

SHAPES = {"cpu-small": (16, 32), "paper": (32, 64)}  # (frames, size)
PROVIDERS = ("render", "batch", "cached")
BATCH = 16


def make_step(provider: str, frames: int, size: int) -> tuple[Callable[[], object], int]:
    """A callable producing clips with ``provider``, and how many clips one call delivers."""
    cached = provider == "cached"
    ds = SyntheticVideos(4 * BATCH, frames, size, seed=0, cache=cached)
    state = {"i": 0}

    def step() -> object:  # new indices each call, as a shuffled loader would ask
        i = state["i"] = (state["i"] + 1) % 4
        if provider == "render":
            return ds.clip(i * BATCH)
        return ds.batch(range(i * BATCH, (i + 1) * BATCH))

    return step, 1 if provider == "render" else BATCH


def _info(shape: str, provider: str) -> dict[str, object]:
    frames, size = SHAPES[shape]
    return {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "shape": f"T={frames}, {size}x{size}",
        "preset": shape,
        "provider": provider,
        "batch": 1 if provider == "render" else BATCH,
    }


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_synthetic_throughput(benchmark, shape: str, provider: str) -> None:
    step, clips = make_step(provider, *SHAPES[shape])
    step()  # warm-up (matrix caches, allocator)
    benchmark.extra_info.update(_info(shape, provider))
    benchmark.pedantic(
        step, rounds=20 if provider == "render" else 8, iterations=1, warmup_rounds=1
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["clips_per_s"] = clips / median
        benchmark.extra_info["ms_per_clip"] = 1e3 * median / clips


def main() -> None:
    print(
        f"device: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, {torch.get_num_threads()} threads"
    )
    print("| preset | shape | provider | median ms / call | min ms / call | ms / clip | clips/s |")
    print("|---|---|---|---|---|---|---|")
    for shape, (frames, size) in SHAPES.items():
        for provider in PROVIDERS:
            step, clips = make_step(provider, frames, size)
            step()
            times = []
            for _ in range(40 if provider == "render" else 10):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(
                f"| {shape} | T={frames}, {size}x{size} | {provider} | {1e3 * med:.2f} | "
                f"{1e3 * min(times):.2f} | {1e3 * med / clips:.2f} | {clips / med:.0f} |"
            )


if __name__ == "__main__":
    main()
