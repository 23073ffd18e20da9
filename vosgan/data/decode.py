"""Video decoding: PyAV, DALI on CPU (VP9/VP8/MJPEG), DALI on GPU (NVDEC), and ``auto``.

Every backend has the same clip contract: :meth:`Decoder.read` ``(path, indices)`` returns the
frames with those 0-based indices (decode order = presentation order for the files we read) as
uint8 ``(len(indices), H, W, 3)`` RGB at the stored resolution (or, when the caller passes the
``size`` it will resize to, at any resolution covering it: see :class:`Decoder`), upright: a
frame whose display matrix rotates it (a phone video) is turned as ``ffmpeg`` turns it. The
backends differ only in YUV->RGB conversion details (chroma upsampling, rounding): a few levels
per channel on average, tested in ``tests/test_video_data.py``.

- ``pyav`` (:mod:`vosgan.data.pyav`, its names re-exported here): FFmpeg through PyAV with
  frame/slice threads, each clip decoded from the keyframe before it. Every codec FFmpeg knows.
  PyAV is imported on first use, so training on synthetic data, frame folders or the clip cache
  works without it.
- ``dali-cpu`` (:mod:`vosgan.data.dali`): ``fn.decoders.video(device="cpu")`` in a CPU-only
  pipeline (``device_id=None``). The CPU variant only decodes VP9, VP8 and MJPEG (DALI 2.4:
  "Codec 27 (h264) is not supported").
- ``dali-gpu`` (:mod:`vosgan.data.dali`): ``fn.decoders.video(device="mixed")``: NVDEC on the
  current CUDA device, every codec NVDEC has (H.264, HEVC, VP8, VP9, AV1, MPEG-4, MJPEG). Frames
  are copied to the host so every backend returns the same numpy clip. Not runnable on the
  CPU-only development machine.
- ``auto`` (:class:`AutoDecoder`): per codec and per process, DALI GPU when CUDA and DALI are
  there and NVDEC has the codec, else DALI CPU for VP9/VP8/MJPEG when DALI is installed, else
  PyAV. A forked DataLoader worker chooses again: it cannot use CUDA, so there the files the
  parent would give NVDEC go to DALI CPU or PyAV (and it says so). Reading batches of
  eight 16-frame clips of a 320x240 VP9 video, DALI CPU gave 43 clips/s against PyAV's 29 at
  load ~1 and 14 against 8-11 at load ~3.5 (medians of 8 interleaved rounds, 2-core dev box);
  with the cores oversubscribed (load ~8, not interleaved) it was 2x slower, so
  ``VOSGAN_DALI_CPU=0`` keeps VP9 on PyAV.
  ``data.decoder=dali`` always uses DALI (GPU, else CPU for those codecs, else a ConfigError).
  ``auto`` prints once per (codec, backend) pair and process what it picked and why.

Unreadable, empty, corrupt and truncated files raise :class:`VideoError` (a ``ValueError``) naming
the file; a file that decodes fewer frames than asked raises :class:`ShortVideoError` with the
number it could decode. A missing file raises ``FileNotFoundError`` (the datasets, which read
files probed earlier, skip it like a corrupt one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from vosgan.config import ConfigError

if TYPE_CHECKING:
    import av

#: codecs DALI's CPU decoder handles (FFmpeg codec names).
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
#: codecs DALI's GPU (NVDEC) decoder handles.
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
BACKENDS = ("pyav", "dali-cpu", "dali-gpu")


class VideoError(ValueError):
    """A video file that cannot be opened or decoded; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot decode video {path}: {reason}")
        self.path = Path(path)


class ShortVideoError(VideoError):
    """The file decodes only ``available`` frames, fewer than an asked index needs."""

    def __init__(self, path: str | Path, available: int, wanted: int) -> None:
        super().__init__(path, f"only {available} frames decode, frame {wanted} was asked for")
        self.available = available


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata. ``frames`` comes from the header, else from counting packets.
    ``width`` x ``height`` is the upright size, the decoders' frames' (the stored frames turned by
    ``rotation``, counter-clockwise degrees, 0, 90, 180 or 270)."""

    frames: int
    fps: float
    width: int
    height: int
    codec: str
    rotation: int = 0

    @property
    def duration(self) -> float:
        """Seconds (``frames / fps``)."""
        return self.frames / self.fps if self.fps > 0 else 0.0

    @property
    def stored_size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames as stored, before they are turned upright."""
        return (self.width, self.height) if self.rotation % 180 else (self.height, self.width)


def frame_rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise degrees (0, 90, 180 or 270) that turn ``frame`` upright: its display
    matrix's rotation rounded to a quarter turn, FFmpeg's convention (``ffmpeg`` turns a matrix
    of 90 degrees with ``transpose=cclock``). Mirroring in the matrix is ignored."""
    degrees = frame.rotation  # PyAV: counter-clockwise, in [-180, 180]; 0 without a matrix
    return round(degrees / 90) % 4 * 90 if degrees else 0


def upright(video: np.ndarray, rotation: int) -> np.ndarray:
    """Frames ``(..., H, W, C)`` turned ``rotation`` degrees counter-clockwise (contiguous)."""
    k = rotation // 90 % 4
    return np.ascontiguousarray(np.rot90(video, k, axes=(-3, -2))) if k else video


def _pyav() -> ModuleType:
    """PyAV, imported on first use: synthetic data, frame folders and the clip cache train
    without it (the GPU machines of this project's leases had none)."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"decoding video files needs PyAV: pip install av ({exc})") from None
    return av


def _open(path: str | Path) -> av.container.InputContainer:
    av = _pyav()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video file {p} does not exist")
    if p.stat().st_size == 0:
        raise VideoError(p, "the file is empty (0 bytes)")
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoError(p, f"not a readable container ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(p, "no video stream")
    return container


def probe(path: str | Path) -> VideoInfo:
    """Frame count, fps, upright size, codec and rotation of ``path`` (:class:`VideoInfo`).

    Packets are demuxed to count frames only when the header has no count, as in WebM/MKV. The
    rotation is the first frame's (:func:`frame_rotation`): PyAV exposes the display matrix on
    decoded frames only, so one frame is decoded, on one thread. The shared mp4 clips probe in
    2.0-3.1 ms, against 0.7-1.2 ms for opening them and reading the header alone and 3.2-4.4 ms
    with FFmpeg's default threads; the AVI in 0.4 ms (means of 20, 2-core dev box).

    Raises:
        FileNotFoundError: no such file; VideoError: unreadable, empty, or no video stream.
    """
    ffmpeg_error = _pyav().error.FFmpegError
    with _open(path) as c:
        s = c.streams.video[0]
        cc = s.codec_context
        if cc.width <= 0 or cc.height <= 0:
            raise VideoError(path, f"invalid frame size {cc.width}x{cc.height}")
        fps = float(s.average_rate or s.guessed_rate or 0)
        frames = int(s.frames or 0)
        counted, rotation = 0, None
        s.thread_type, s.thread_count = "NONE", 1  # one frame: starting threads costs more
        try:
            for packet in c.demux(s):
                counted += packet.size > 0
                if rotation is None:
                    try:
                        rotation = next((frame_rotation(f) for f in s.decode(packet)), None)
                    except ffmpeg_error:  # a corrupt first frame: reads will report it
                        rotation = 0
                if rotation is not None and frames > 0:
                    break
        except ffmpeg_error as exc:
            if frames <= 0:
                raise VideoError(path, f"demuxing failed ({exc})") from None
        frames = frames or counted
        if frames <= 0:
            raise VideoError(path, "no video frames")
        rotation = rotation or 0
        w, h = (cc.height, cc.width) if rotation % 180 else (cc.width, cc.height)
        return VideoInfo(frames, fps, w, h, cc.name, rotation)


def frame_indices(start: int, count: int, stride: int) -> list[int]:
    """``[start, start + stride, ..., start + (count - 1) * stride]`` after checking the args."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return list(range(start, start + count * stride, stride))


def _check_indices(indices: Sequence[int]) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices must not be empty")
    if min(idx) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(idx)}")
    return idx


class Decoder:
    """A decoding backend: ``read(path, indices) -> uint8 (N, H, W, 3)``.

    ``size`` (optional, every read) says the caller will resize the frames so that their short
    side is ``size``: a backend may then return them at any resolution whose short side is at
    least ``min(size, stored short side)``. PyAV converts them at short side ``size`` inside
    its YUV->RGB conversion; the DALI backends return the stored resolution.
    """

    name = "base"

    def read(self, path: str | Path, indices: Sequence[int], size: int | None = None) -> np.ndarray:
        """Frames ``indices`` (any order, repeats allowed) of ``path`` as uint8 ``(N, H, W, 3)``."""
        return self.read_many([(path, indices)], size)[0]

    def read_many(
        self, requests: Sequence[tuple[str | Path, Sequence[int]]], size: int | None = None
    ) -> list[np.ndarray]:
        """:meth:`read` for several ``(path, indices)`` at once (DALI batches them)."""
        return [self.read(p, i, size) for p, i in requests]


def dali_status(device: str) -> tuple[bool, str]:
    """Whether DALI can decode on ``device`` (``"cpu"`` or ``"gpu"``) here, and why (not)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return False, f"DALI is not installed ({exc}; pip install nvidia-dali-cuda120)"
    if device == "gpu":
        import multiprocessing

        import torch

        if (
            torch.utils.data.get_worker_info() is not None
            and multiprocessing.get_start_method() == "fork"
        ):
            return False, (
                "inside a forked DataLoader worker, where CUDA cannot be used "
                "(data.num_workers=0 lets DALI decode on the GPU)"
            )
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"DALI on CUDA device {torch.cuda.current_device()} (NVDEC)"
    return True, "DALI CPU pipeline"


def _say_once(key: str, message: str, _seen: set[str] = set()) -> None:  # noqa: B006
    if key not in _seen:
        _seen.add(key)
        print(f"vosgan.data: {message}", file=sys.stderr)


def pick_backend(codec: str, requested: str = "auto") -> tuple[str, str]:
    """The backend for a file of ``codec`` under ``data.decoder=requested``, and why."""
    if requested == "pyav":
        return "pyav", "data.decoder=pyav"
    if requested not in ("auto", "dali"):
        raise ValueError(f"decoder must be 'auto', 'dali' or 'pyav', got {requested!r}")
    gpu_ok, gpu_why = dali_status("gpu")
    if gpu_ok and codec in DALI_GPU_CODECS:
        return "dali-gpu", f"{codec} on NVDEC ({gpu_why})"
    cpu_ok, cpu_why = dali_status("cpu")
    if cpu_ok and codec in DALI_CPU_CODECS:
        if requested == "dali" or os.environ.get("VOSGAN_DALI_CPU", "1") != "0":
            return "dali-cpu", f"{codec} on DALI's CPU decoder ({gpu_why} for NVDEC)"
        return "pyav", f"{codec} on PyAV (VOSGAN_DALI_CPU=0; {gpu_why} for NVDEC)"
    if requested == "dali":
        reason = cpu_why if not cpu_ok else f"{gpu_why}, and DALI's CPU decoder lacks {codec}"
        raise ConfigError(f"data.decoder=dali cannot decode {codec}: {reason}")
    why = cpu_why if not cpu_ok else f"{gpu_why}; DALI's CPU decoder has no {codec}"
    return "pyav", f"{codec} on PyAV ({why})"


class AutoDecoder(Decoder):
    """Picks a backend per codec (:func:`pick_backend`) and process, and says so once per pair.

    The choice is remade in each process: a DataLoader worker forked from a parent that chose
    DALI on the GPU cannot use CUDA, and chooses DALI CPU or PyAV instead (saying why). A file's
    codec is probed once, in any process.

    Args:
        requested: ``"auto"`` (fall back to PyAV), ``"dali"`` (DALI or an error) or ``"pyav"``.
        max_batch: DALI files per pipeline run.
    """

    name = "auto"

    def __init__(self, requested: str = "auto", max_batch: int = 8) -> None:
        if requested not in ("auto", "dali", "pyav"):
            raise ValueError(f"decoder must be 'auto', 'dali' or 'pyav', got {requested!r}")
        if requested == "dali" and not dali_status("cpu")[0]:
            raise ConfigError(f"data.decoder=dali: {dali_status('cpu')[1]}")
        self.requested, self.max_batch = requested, max_batch
        self._decoders: dict[str, Decoder] = {}
        self._codec: dict[str, str] = {}  # file -> codec
        self._picked: dict[str, str] = {}  # codec -> backend, chosen in process self._pid
        self._pid = os.getpid()

    def backend_for(self, path: str | Path, codec: str | None = None) -> str:
        """The backend name ``path`` is decoded with in this process (probed once per file
        unless ``codec`` is given). Raises ConfigError when ``data.decoder=dali`` cannot decode
        it."""
        if self._pid != os.getpid():  # a DataLoader worker: what the parent chose may not work
            self._pid, self._picked = os.getpid(), {}
        key = str(path)
        if key not in self._codec:
            self._codec[key] = codec or probe(path).codec
        codec = self._codec[key]
        if codec not in self._picked:
            name, why = pick_backend(codec, self.requested)
            _say_once(f"{codec}->{name}", f"decoder {name} for {codec} files: {why}")
            self._picked[codec] = name
        return self._picked[codec]

    def _decoder(self, name: str) -> Decoder:
        if name not in self._decoders:
            self._decoders[name] = (
                PyAVDecoder() if name == "pyav" else _dali(name[5:], self.max_batch)
            )
        return self._decoders[name]

    def read_many(
        self, requests: Sequence[tuple[str | Path, Sequence[int]]], size: int | None = None
    ) -> list[np.ndarray]:
        groups: dict[str, list[int]] = {}
        for k, (path, _) in enumerate(requests):
            groups.setdefault(self.backend_for(path), []).append(k)
        out: list[np.ndarray | None] = [None] * len(requests)
        for name, ks in groups.items():
            clips = self._decoder(name).read_many([requests[k] for k in ks], size)
            for k, clip in zip(ks, clips, strict=True):
                out[k] = clip
        return out  # type: ignore[return-value]


def _dali(device: str, max_batch: int) -> Decoder:
    from vosgan.data.dali import DaliDecoder  # DALI backends live apart (they import DALI)

    return DaliDecoder(device, max_batch)


def make_decoder(name: str, max_batch: int = 8) -> Decoder:
    """``"auto"``, ``"dali"``, ``"pyav"``, ``"dali-cpu"`` or ``"dali-gpu"`` -> a decoder."""
    if name == "pyav":
        return PyAVDecoder()
    if name in ("dali-cpu", "dali-gpu"):
        return _dali(name[5:], max_batch)
    if name in ("auto", "dali"):
        return AutoDecoder(name, max_batch)
    raise ValueError(f"decoder must be one of auto, dali, pyav, dali-cpu, dali-gpu; got {name!r}")


def read_video(
    path: str | Path, start: int = 0, count: int | None = None, stride: int = 1
) -> np.ndarray:
    """Frames ``start, start + stride, ...`` of ``path`` with PyAV: uint8 ``(N, H, W, 3)`` RGB.

    ``count=None`` reads to the last frame that decodes. Fewer frames than ``count`` (or none at
    or after ``start``) raise :class:`ShortVideoError`.
    """
    if count is not None:
        return PyAVDecoder().read(path, frame_indices(start, count, stride))
    frame_indices(start, 1, stride)  # validates start and stride
    got, n = PyAVDecoder.decode(path, lambda i: i >= start and (i - start) % stride == 0)
    if not got:
        raise ShortVideoError(path, n, start)
    return np.stack([got[i] for i in sorted(got)])


# The PyAV backend imports this module's basics; its names stay importable from here. (The package
# imports this module first, so vosgan.data.pyav always finds the names above defined.)
from vosgan.data.pyav import (  # noqa: E402
    SKIP_NONREF_CODECS,
    FrameIndex,
    PyAVDecoder,
    frame_index,
)

__all__ = [
    "BACKENDS",
    "DALI_CPU_CODECS",
    "DALI_GPU_CODECS",
    "SKIP_NONREF_CODECS",
    "AutoDecoder",
    "Decoder",
    "FrameIndex",
    "PyAVDecoder",
    "ShortVideoError",
    "VideoError",
    "VideoInfo",
    "dali_status",
    "frame_index",
    "frame_indices",
    "frame_rotation",
    "make_decoder",
    "pick_backend",
    "probe",
    "read_video",
    "upright",
]
