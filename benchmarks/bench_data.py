"""Real-video loading: clips/s per decoder backend, the uint8 cache, and the loader against the
training step.

- ``decode``: one 16-frame clip (seeded random start) per video, read with each backend: the
  shared real clips (H.264 / MPEG-4, so DALI CPU does not apply) and generated 320x240 H.264 and
  VP9 videos (64 frames). ``dali-gpu`` rows need CUDA and are skipped here.
- ``loader``: ``ClipDataset.batch`` at the cpu-small shape (batch 8, T=16, 32x32) from the real
  clips decoded on the fly, from DAVIS frame folders, and from prepared caches (stored short side
  64 and 32); the paper shape (batch 32, T=32, 64x64) from the cache and from the real clips on
  the fly. Frames only, as training reads them (``masks=False``: DAVIS masks are not decoded).
  Reads run on ``torch.get_num_threads()`` threads (``vosgan.data.threads``).
- ``train_step``: one cpu-small training step (D + G update, batch 8) on CPU as ``python -m
  vosgan.train --fused`` runs it: the consumer the loader must feed (the ``fused`` row, the
  faster step, so the loader's target is the harder one); the reference path's step beside it.

Each row records clips/s in ``extra_info``; compare loader clips/s with the fused step's (the
target: at least 2x).
Run: ``pytest benchmarks/bench_data.py --benchmark-only`` (about 1-2 min on 2 CPU cores).
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from vosgan import config
from vosgan.data.build import make_dataset
from vosgan.data.decode import PyAVDecoder, dali_status, make_decoder, probe
from vosgan.data.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("VOSGAN_SHARED_DATA") or ROOT.parent / "shared" / "data")
CLIPS, DAVIS = DATA / "clips", DATA / "davis2016"
sys.path.insert(0, str(ROOT / "tests"))
from video_fixtures import write_video  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _info(**kw: object) -> dict:
    import av

    dev = (
        torch.cuda.get_device_name() if HAS_CUDA else f"CPU {platform.machine()} x{os.cpu_count()}"
    )
    cpu = f"{platform.machine()} x{os.cpu_count()}"  # the loaders run here, GPU or not
    return {"device": dev, "cpu": cpu, "torch": torch.__version__, "pyav": av.__version__, **kw}


def _backend_ok(backend: str) -> tuple[bool, str]:
    if backend == "pyav":
        return True, ""
    return dali_status(backend[5:])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench_videos")
    return {c: write_video(d / f"g_{c}", c, 64, w=320, h=240) for c in ("h264", "vp9")}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not CLIPS.is_dir():
        pytest.skip(f"shared clips absent ({CLIPS})")
    d = tmp_path_factory.mktemp("bench_cache")
    out = {}
    for size in (32, 64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare(CLIPS, d / f"c{size}", size=size, progress=False)
        out[str(size)] = d / f"c{size}"
    return out


def _decode_round(backend: str, paths: list[Path], frames: int = 16) -> Callable[[], None]:
    dec = make_decoder(backend)
    lengths = [probe(p).frames for p in paths]
    rng = np.random.default_rng(0)

    def run() -> None:
        dec.read_many(
            [
                (p, list(range(s, s + frames)))
                for p, n in zip(paths, lengths, strict=True)
                for s in [int(rng.integers(0, n - frames + 1))]
            ]
        )

    return run


@pytest.mark.parametrize("backend", ["pyav", "dali-cpu", "dali-gpu"])
@pytest.mark.parametrize("videos", ["real", "h264-320x240", "vp9-320x240"])
def test_decode(benchmark, generated: dict[str, Path], videos: str, backend: str) -> None:
    ok, why = _backend_ok(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")
    if videos == "real":
        if not CLIPS.is_dir():
            pytest.skip(f"shared clips absent ({CLIPS})")
        paths = sorted(CLIPS.iterdir())
    else:
        paths = [generated[videos.split("-")[0]]]
    codecs = sorted({probe(p).codec for p in paths})
    if backend == "dali-cpu" and not set(codecs) <= {"vp8", "vp9", "mjpeg"}:
        pytest.skip(f"DALI's CPU decoder has no {codecs}")
    run = _decode_round(backend, paths)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran as a plain test
        return
    benchmark.extra_info.update(
        _info(
            videos=videos,
            codecs=codecs,
            clip="16 frames at native size",
            clips_per_round=len(paths),
            clips_per_s=len(paths) / benchmark.stats.stats.median,
        )
    )


LOADERS = {  # name: (source, preset, overrides)
    "cpu-small/videos-pyav": ("clips", "cpu-small", {"data.decoder": "pyav"}),
    "cpu-small/davis-frames": ("davis", "cpu-small", {}),
    "cpu-small/cache-64": ("c64", "cpu-small", {}),
    "cpu-small/cache-32": ("c32", "cpu-small", {}),
    "paper/cache-64": ("c64", "paper", {}),
    "paper/videos-pyav": ("clips", "paper", {"data.decoder": "pyav"}),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_loader(benchmark, caches: dict[str, Path], name: str) -> None:
    source, preset, over = LOADERS[name]
    path = {"clips": CLIPS, "davis": DAVIS, "c64": caches["64"], "c32": caches["32"]}[source]
    if not path.exists():
        pytest.skip(f"{path} absent")
    cfg = config.load(preset, {"data.source": str(path), "data.crop": "random", **over})
    ds = make_dataset(cfg, "train", 4096, masks=False)  # what training reads: no masks
    bsz = cfg.data.batch_size
    starts = iter(range(0, 4096, bsz))  # a new batch of clips on every call

    def load() -> None:
        start = next(starts)
        ds.batch(range(start, start + bsz))

    benchmark.pedantic(load, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran as a plain test
        return
    m = cfg.model
    decoder = getattr(ds.source, "decoder", None)
    if isinstance(decoder, PyAVDecoder):  # frames out of the codec per clip: the read's cost
        clips = bsz * (1 + len(benchmark.stats.stats.data))  # the warm-up round too
        benchmark.extra_info["frames_decoded_per_clip"] = decoder.decoded / clips
    benchmark.extra_info.update(
        _info(
            source=str(path.name),
            preset=preset,
            batch=bsz,
            shape=f"T={m.frames}, {m.size}x{m.size}",
            clips_per_s=bsz / benchmark.stats.stats.median,
            loader="main process, 1 batch per call",
            read_threads=torch.get_num_threads(),  # thread_map's threads for the reads
        )
    )


@pytest.mark.parametrize("provider", ["fused", "reference"])
def test_train_step(benchmark, provider: str) -> None:
    from vosgan import train

    cfg = config.load("cpu-small")
    device = torch.device("cpu")
    train.configure_backends(device)  # as vosgan.train sets up its step
    run = train.build_run(cfg, device, fused=provider == "fused")
    train.wrap_models(run)
    step = train.make_step(run, train.autocast_for(run))
    m = cfg.model
    real = torch.rand(cfg.data.batch_size, 3, m.frames, m.size, m.size) * 2 - 1
    step(real)  # numba compile / cache load, oneDNN primitives
    benchmark.pedantic(lambda: step(real), rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran as a plain test
        return
    benchmark.extra_info.update(
        _info(
            provider=provider,
            step="python -m vosgan.train" + (" --fused" if provider == "fused" else ""),
            preset="cpu-small",
            batch=cfg.data.batch_size,
            shape=f"T={m.frames}, {m.size}x{m.size}",
            clips_per_s=cfg.data.batch_size / benchmark.stats.stats.median,
        )
    )
