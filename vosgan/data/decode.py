"""Video decoding: PyAV, DALI on CPU (VP9/VP8/MJPEG), DALI on GPU (NVDEC), and ``auto``.

Every backend has the same clip contract: :meth:`Decoder.read` ``(path, indices)`` returns the
frames with those 0-based indices (decode order = presentation order for the files we read) as
uint8 ``(len(indices), H, W, 3)`` RGB at the stored resolution (or, when the caller passes the
``size`` it will resize to, at any resolution covering it: see :class:`Decoder`). The backends
differ only in YUV->RGB conversion details (chroma upsampling, rounding): a few levels per channel
on average, tested in ``tests/test_video_data.py``.

- ``pyav``: FFmpeg through PyAV with frame/slice threads (``thread_type="AUTO"``). Frame ``i`` is
  the ``i``-th frame in presentation order. A clip is decoded from the last keyframe at or before
  its first frame (:func:`frame_index`: the file's frame timestamps, read once per file from its
  packets, name each decoded frame's index exactly); in H.264 files the frames before the clip
  that no other frame references (non-reference B-frames) are not decoded at all. AVI files
  and files with untimed or repeated timestamps are decoded from the first frame. Frames not
  wanted are never converted to RGB; with ``size`` the conversion scales them too (the clip cache's
  conversion, so a clip read on the fly equals the same clip read from a cache prepared at the
  model's size). Every codec FFmpeg knows. PyAV is imported on first use, so training on
  synthetic data, frame folders or the clip cache works without it.
- ``dali-cpu`` (:mod:`vosgan.data.dali`): ``fn.decoders.video(device="cpu")`` in a CPU-only
  pipeline (``device_id=None``). The CPU variant only decodes VP9, VP8 and MJPEG (DALI 2.4:
  "Codec 27 (h264) is not supported").
- ``dali-gpu`` (:mod:`vosgan.data.dali`): ``fn.decoders.video(device="mixed")``: NVDEC on the
  current CUDA device, every codec NVDEC has (H.264, HEVC, VP8, VP9, AV1, MPEG-4, MJPEG). Frames
  are copied to the host so every backend returns the same numpy clip. Not runnable on the
  CPU-only development machine.
- ``auto`` (:class:`AutoDecoder`): per file, DALI GPU when CUDA and DALI are there and NVDEC has the
  codec, else DALI CPU for VP9/VP8/MJPEG when DALI is installed, else PyAV. Reading batches of
  eight 16-frame clips of a 320x240 VP9 video, DALI CPU gave 43 clips/s against PyAV's 29 at
  load ~1 and 14 against 8-11 at load ~3.5 (medians of 8 interleaved rounds, 2-core dev box);
  with the cores oversubscribed (load ~8, not interleaved) it was 2x slower, so
  ``VOSGAN_DALI_CPU=0`` keeps VP9 on PyAV.
  ``data.decoder=dali`` always uses DALI (GPU, else CPU for those codecs, else a ConfigError).
  ``auto`` prints once per (codec, backend) pair what it picked and why.

Unreadable, empty, corrupt and truncated files raise :class:`VideoError` (a ``ValueError``) naming
the file; a file that decodes fewer frames than asked raises :class:`ShortVideoError` with the
number it could decode.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import sys
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vosgan.config import ConfigError
from vosgan.data.threads import codec_threads, thread_map

if TYPE_CHECKING:
    import av

#: codecs whose frames before a clip PyAV skips when no other frame references them (FFmpeg's
#: ``skip_frame="NONREF"``). H.264 marks them per picture (``nal_ref_idc`` 0) and never predicts
#: from them. Not HEVC, whose sub-layer non-reference pictures may be referenced from higher
#: temporal layers, nor VP9, where the skip's exactness is untested: those decode every frame.
SKIP_NONREF_CODECS = frozenset({"h264"})

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
    """Container metadata. ``frames`` comes from the header, else from counting packets."""

    frames: int
    fps: float
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        """Seconds (``frames / fps``)."""
        return self.frames / self.fps if self.fps > 0 else 0.0


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
    """Frame count, fps, size and codec of ``path`` without decoding (packets are demuxed to
    count frames only when the header has no count, as in WebM/MKV).

    Raises:
        FileNotFoundError: no such file; VideoError: unreadable, empty, or no video stream.
    """
    with _open(path) as c:
        s = c.streams.video[0]
        cc = s.codec_context
        fps = float(s.average_rate or s.guessed_rate or 0)
        frames = int(s.frames or 0)
        if frames <= 0:
            try:
                frames = sum(1 for pkt in c.demux(s) if pkt.size > 0)
            except _pyav().error.FFmpegError as exc:
                raise VideoError(path, f"demuxing failed ({exc})") from None
        if cc.width <= 0 or cc.height <= 0:
            raise VideoError(path, f"invalid frame size {cc.width}x{cc.height}")
        if frames <= 0:
            raise VideoError(path, "no video frames")
        return VideoInfo(frames, fps, cc.width, cc.height, cc.name)


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


class FrameIndex(NamedTuple):
    """A video stream's frame timestamps: ``pts[i]`` is frame ``i``'s (presentation order),
    ``keyframes`` the keyframes' (ascending); 64-bit integer arrays."""

    pts: array
    keyframes: array


#: files whose decoded frames strayed from their index (intra refresh, say): decoded from the first
#: frame from then on, keyed like :func:`frame_index`'s cache (path, size, modification time)
_NO_SEEK: set[tuple[str, int, int]] = set()


def _file_key(path: str | Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(path), st.st_size, st.st_mtime_ns


def frame_index(path: str | Path) -> FrameIndex | None:
    """The :class:`FrameIndex` of ``path``'s first video stream, read from its packets (no
    decoding; about 1 ms for a 300-frame clip), cached per file, size and modification time.
    ``None`` where timestamps cannot name frames: an AVI file (its timestamps are the decode
    order's), a packet without one, two frames with the same one, a demuxing error, or a file
    that cannot be read (the decode from the first frame then says why)."""
    try:
        return _frame_index(*_file_key(path))
    except (OSError, VideoError):
        return None


@functools.lru_cache(maxsize=16384)  # 8 bytes a frame: about 40 MB for 16k 300-frame files
def _frame_index(path: str, size: int, mtime_ns: int) -> FrameIndex | None:
    pts: list[int] = []
    keys: list[int] = []
    with _open(path) as c:
        if "avi" in c.format.name.split(","):
            return None
        try:
            for packet in c.demux(c.streams.video[0]):
                if packet.size == 0:  # the demuxer's end-of-stream packet
                    continue
                if packet.pts is None or (not pts and not packet.is_keyframe):
                    return None  # untimed; or frames before the first keyframe, never output
                if packet.is_discard:  # cut by an edit list: decoded, never output
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        except _pyav().error.FFmpegError:
            return None
    pts.sort()
    if len(set(pts)) != len(pts):
        return None
    return FrameIndex(array("q", pts), array("q", sorted(keys)))


def _seek_failed(path: str | Path) -> bool:
    try:
        return _file_key(path) in _NO_SEEK
    except OSError:
        return False


def _rgb_size(ctx: Any, size: int | None) -> dict[str, Any]:
    """``VideoFrame.to_ndarray`` arguments converting at short side ``size`` (aspect kept,
    swscale's area filter); none for ``size=None``."""
    if size is None:
        return {}
    w, h = ctx.width, ctx.height
    if w <= h:
        return {"width": size, "height": max(1, round(h * size / w)), "interpolation": "AREA"}
    return {"width": max(1, round(w * size / h)), "height": size, "interpolation": "AREA"}


class PyAVDecoder(Decoder):
    """FFmpeg via PyAV, frame and slice threads on (``thread_type="AUTO"``); the files of a
    :meth:`read_many` are decoded on :func:`thread_map`'s threads.

    ``decoded`` counts the frames the decoder has output over this object's reads: against the
    frames asked for, the cost of a read. It leaves out the frames skipped and the frames that
    frame threads decoded ahead of the last one needed and never output.

    Each decode runs :func:`codec_threads` FFmpeg threads: torch's thread count on the calling
    thread (one in a DataLoader worker), the cores' share on :func:`thread_map`'s threads."""

    name = "pyav"

    def __init__(self) -> None:
        self.decoded = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started by spawn/forkserver
        return {"decoded": self.decoded}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.decoded = state["decoded"]

    def _count(self, frames: int) -> None:
        with self._lock:
            self.decoded += frames

    def read(self, path: str | Path, indices: Sequence[int], size: int | None = None) -> np.ndarray:
        idx = _check_indices(indices)
        got = self.read_from_keyframe(path, idx, size)
        if got is None:
            got, n = self.decode(path, set(idx).__contains__, max(idx), size)
            self._count(n)
            if n <= max(idx):
                raise ShortVideoError(path, n, max(idx))
        return np.stack([got[i] for i in idx])

    def read_from_keyframe(
        self, path: str | Path, indices: Sequence[int], size: int | None = None
    ) -> dict[int, np.ndarray] | None:
        """The frames ``indices`` by index (RGB at short side ``size``, or stored), decoded from
        the last keyframe at or before the first of them. In :data:`SKIP_NONREF_CODECS`, frames
        before the first that no other frame references are skipped (FFmpeg's
        ``skip_frame="NONREF"``, set per packet by its timestamp; a skipped frame changes no
        other, so the frames asked for are bit-exact).

        ``None`` where that is not possible (no :func:`frame_index`, or an index past the last
        frame), on a decoding error, and where the decoded frames do not follow the index (said
        once per file, which is then always decoded from its first frame). The caller then
        decodes from the first frame, which also reports short and corrupt files."""
        index = frame_index(path)
        if index is None or max(indices) >= len(index.pts) or (_NO_SEEK and _seek_failed(path)):
            return None
        k = bisect.bisect_right(index.keyframes, index.pts[min(indices)]) - 1
        if k < 0:
            return None
        with _open(path) as c:
            got, decoded = self._decode_window(c, path, index, index.keyframes[k], indices, size)
        self._count(decoded)
        return got

    @staticmethod
    def _decode_window(
        c: av.container.InputContainer,
        path: str | Path,
        index: FrameIndex,
        key: int,
        indices: Sequence[int],
        size: int | None,
    ) -> tuple[dict[int, np.ndarray] | None, int]:
        """:meth:`read_from_keyframe`'s decode from the keyframe at timestamp ``key``: the
        frames (or ``None``) and the number of frames the decoder output."""
        pts, first, last = index.pts, min(indices), max(indices)
        start = bisect.bisect_left(pts, key)
        wanted = set(indices)
        got: dict[int, np.ndarray] = {}
        prev, decoded = start - 1, 0  # the last frame output, by index; frames output
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "AUTO", codec_threads()
        ctx = s.codec_context
        rgb = _rgb_size(ctx, size)
        skip_lead, skipping = ctx.name in SKIP_NONREF_CODECS, False
        try:
            if start > 0:
                c.seek(key, stream=s, backward=True, any_frame=False)
            for packet in c.demux(s):
                lead = skip_lead and packet.pts is not None and packet.pts < pts[first]
                if lead != skipping:
                    ctx.skip_frame = "NONREF" if lead else "DEFAULT"
                    skipping = lead
                for frame in s.decode(packet):
                    decoded += 1
                    n = bisect.bisect_left(pts, frame.pts) if frame.pts is not None else -1
                    if 0 <= n < start:  # a leading frame of an open GOP: before the keyframe
                        continue
                    if not (
                        0 <= n < len(pts)
                        and pts[n] == frame.pts
                        and (prev < n < first or n == max(prev + 1, first))
                    ):
                        _say_once(
                            f"seek:{path}",
                            f"{path}: frames decoded from the keyframe at frame {start} did "
                            f"not follow its timestamps (frame {max(prev + 1, first)} "
                            "expected); decoding this file from its first frame from now on",
                        )
                        with contextlib.suppress(OSError):
                            _NO_SEEK.add(_file_key(path))
                        return None, decoded
                    prev = n
                    if n in wanted:
                        got[n] = frame.to_ndarray(format="rgb24", **rgb)
                    if n == last:
                        return got, decoded
        except _pyav().error.FFmpegError:
            pass  # a corrupt or truncated file: the decode from the first frame reports it
        return None, decoded

    def read_many(
        self, requests: Sequence[tuple[str | Path, Sequence[int]]], size: int | None = None
    ) -> list[np.ndarray]:
        """Clips of the same file share one decode pass (up to the last frame any of them needs);
        files are decoded in parallel (:func:`thread_map`). A cpu-small batch (8 clips) from the
        6 shared clips: 0.52 s vs 0.59 s one pass per clip (medians of 5 interleaved rounds,
        2-core dev box)."""
        by_path: dict[str, list[int]] = {}
        for k, (path, _) in enumerate(requests):
            by_path.setdefault(str(path), []).append(k)

        def read_file(ks: list[int]) -> list[np.ndarray]:
            path, lists = requests[ks[0]][0], [_check_indices(requests[k][1]) for k in ks]
            if len(ks) == 1:
                return [self.read(path, lists[0], size)]
            union = sorted({i for idx in lists for i in idx})
            frames = self.read(path, union, size)
            return [frames[np.searchsorted(union, idx)] for idx in lists]

        groups = list(by_path.values())
        out: list[np.ndarray | None] = [None] * len(requests)
        for ks, clips in zip(groups, thread_map(read_file, groups), strict=True):
            for k, clip in zip(ks, clips, strict=True):
                out[k] = clip
        return out  # type: ignore[return-value]

    @staticmethod
    def decode(
        path: str | Path,
        keep: Callable[[int], bool],
        last: int | None = None,
        size: int | None = None,
        threads: bool = True,
    ) -> tuple[dict[int, np.ndarray], int]:
        """Decode frames ``0..last`` (or to the end), converting those where ``keep(i)``.

        ``size`` resizes the short side (aspect kept) inside the YUV->RGB conversion (swscale,
        area filter), cheaper than converting at full size and resizing after.
        Returns the kept frames by index and the number of frames decoded. A packet that fails
        to demux or decode ends the decode (the file is truncated or corrupt there), keeping the
        frames the decoder still holds; with no frame at all it is retried once without frame
        threads, which can report an error before the good frames ahead of it.
        """
        got: dict[int, np.ndarray] = {}
        n = 0
        error: Exception | None = None
        with _open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO" if threads else "NONE"
            s.thread_count = codec_threads() if threads else 1
            kw = _rgb_size(s.codec_context, size)

            ffmpeg_error = _pyav().error.FFmpegError

            def frames() -> Iterator[av.VideoFrame]:
                nonlocal error
                try:
                    for packet in c.demux(s):
                        yield from s.decode(packet)
                    return
                except ffmpeg_error as exc:
                    error = exc
                with contextlib.suppress(ffmpeg_error):
                    yield from s.decode(None)  # flush: frames decoded before the bad packet

            for frame in frames():
                if keep(n):
                    got[n] = frame.to_ndarray(format="rgb24", **kw)
                n += 1
                if last is not None and n > last:
                    break
        if n == 0 and error is not None:
            if threads:
                return PyAVDecoder.decode(path, keep, last, size, threads=False)
            raise VideoError(path, f"decoding failed at the first frame ({error})")
        if n == 0:
            raise VideoError(path, "no frame decodes")
        return got, n


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
    """Picks a backend per file by its codec (:func:`pick_backend`) and says so once per pair.

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
        self._backend: dict[str, str] = {}

    def backend_for(self, path: str | Path, codec: str | None = None) -> str:
        """The backend name ``path`` is decoded with (probed once per file unless ``codec`` is
        given). Raises ConfigError when ``data.decoder=dali`` cannot decode it."""
        key = str(path)
        if key not in self._backend:
            codec = codec or probe(path).codec
            name, why = pick_backend(codec, self.requested)
            _say_once(f"{codec}->{name}", f"decoder {name} for {codec} files: {why}")
            self._backend[key] = name
        return self._backend[key]

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
