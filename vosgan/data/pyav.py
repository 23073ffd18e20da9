"""The PyAV backend: FFmpeg through PyAV, decoded from the keyframe before each clip.

Frame ``i`` is the ``i``-th frame in presentation order. A clip is decoded from the last keyframe
at or before its first frame (:func:`frame_index`: the file's frame timestamps, read once per file
from its packets, name each decoded frame's index exactly); in H.264 files the frames before the
clip that no other frame references (non-reference B-frames) are not decoded at all. AVI files
and files with untimed or repeated timestamps are decoded from the first frame. Frames not wanted
are never converted to RGB; with ``size`` the conversion scales them too (the clip cache's
conversion, so a clip read on the fly equals the same clip read from a cache prepared at the
model's size). Frames come out upright: each is turned by its display matrix (a phone video's
rotation), as ``ffmpeg`` does by default. Every codec FFmpeg knows.

The clip contract, the error types and the backend choice are in :mod:`vosgan.data.decode`, which
re-exports this module's public names.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vosgan.data.decode import (
    Decoder,
    ShortVideoError,
    VideoError,
    _check_indices,
    _open,
    _pyav,
    _say_once,
    frame_rotation,
    upright,
)
from vosgan.data.threads import codec_threads, thread_map

if TYPE_CHECKING:
    import av

#: codecs whose frames before a clip PyAV skips when no other frame references them (FFmpeg's
#: ``skip_frame="NONREF"``). H.264 marks them per picture (``nal_ref_idc`` 0) and never predicts
#: from them. Not HEVC, whose sub-layer non-reference pictures may be referenced from higher
#: temporal layers, nor VP9, where the skip's exactness is untested: those decode every frame.
SKIP_NONREF_CODECS = frozenset({"h264"})


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
    swscale's area filter); none for ``size=None``. The stored frame is scaled: turning it upright
    afterwards (:func:`_rgb`) keeps its short side."""
    if size is None:
        return {}
    w, h = ctx.width, ctx.height
    if w <= h:
        return {"width": size, "height": max(1, round(h * size / w)), "interpolation": "AREA"}
    return {"width": max(1, round(w * size / h)), "height": size, "interpolation": "AREA"}


def _rgb(frame: av.VideoFrame, kw: dict[str, Any]) -> np.ndarray:
    """``frame`` as uint8 ``(H, W, 3)`` RGB (converted as :func:`_rgb_size`'s ``kw`` say), turned
    upright by its display matrix."""
    return upright(frame.to_ndarray(format="rgb24", **kw), frame_rotation(frame))


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
                        got[n] = _rgb(frame, rgb)
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
                    got[n] = _rgb(frame, kw)
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
