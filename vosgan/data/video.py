"""Real-video datasets: clip sampling, short-video policy, crop/flip, bad-file handling.

:class:`ClipDataset` turns a *source* (a list of videos it can read frames from) into fixed-size
clips. Sources: :class:`VideoFileSource` (video files through a :mod:`.decode` backend),
:class:`FrameFolderSource` (DAVIS / frame folders, with masks) and
:class:`vosgan.data.cache.CacheSource` (a prepared uint8 cache, no decoding).

Clip ``i`` (``0 <= i < num_clips``) comes from video ``order[i % num_videos]``, ``order`` a
permutation of the videos seeded by ``(seed, split)`` (:meth:`ClipDataset.video_of`): every
video serves equally often, and fewer clips than videos (a small validation set of UCF-101)
still span all classes. With ``sampling="seeded"`` its start frame, crop offset and flip are
drawn from ``SeedSequence([seed, split_id, i])``, so a batch is a pure function of its indices
(exact resume, any number of loader workers); ``"random"`` draws them afresh on every read.

Frames of a clip: ``start + round(k * step)`` for ``k < T``, with ``step = stride``, or
``native_fps / fps`` when a target ``fps`` is set and the video's rate is known. A video shorter
than that span follows ``short``: ``"loop"`` wraps around to frame 0, ``"pad"`` repeats the last
frame, ``"skip"`` leaves the video out. Each frame is cropped to the centred (or, with
``crop="random"``, a seeded random) square of side ``min(H, W)`` and resized to ``size`` (bilinear;
masks nearest), optionally flipped horizontally. Sources may deliver frames already scaled to
short side ``size`` (PyAV does, with swscale's area filter, as the clip cache stores them; JPEG
frame folders decode at a reduced DCT scale); the crop is then a slice.

Bad files never stop an epoch: a file that cannot be probed is left out when the dataset is built
(one warning each, then a count); one that fails later (truncated or corrupt mid-file, deleted or
unreadable since) is warned about once and its clips come from the next usable video. A file that
decodes fewer frames than its header says is shortened to those instead. Either way a clip is
planned again by the same seeded rule, so a clip index gives the same frames before and after.
No usable video left: ``ValueError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vosgan.backend import warn_once
from vosgan.data import frames as fr
from vosgan.data.decode import Decoder, ShortVideoError, VideoError, probe
from vosgan.data.synthetic import SPLITS
from vosgan.data.threads import thread_map

SHORT_POLICIES = ("loop", "pad", "skip")


@dataclass(frozen=True)
class Item:
    """One video of a source: ``length`` frames at ``fps`` (0 = unknown), class ``label`` (-1)."""

    name: str
    length: int
    fps: float = 0.0
    label: int = -1


#: frames uint8 ``(n, H, W, 3)`` and masks bool ``(n, H, W)`` or None, for one read request.
Frames = tuple[np.ndarray, "np.ndarray | None"]


class Plan(NamedTuple):
    """How clip ``clip`` is read: ``frames`` of item ``video``, crop fraction ``crop``, ``flip``."""

    clip: int
    video: int
    frames: list[int]
    crop: float
    flip: bool


class Source:
    """Videos a :class:`ClipDataset` reads from. ``read`` may raise :class:`VideoError`."""

    items: list[Item]
    has_masks: bool = False
    root: str = ""
    #: short side of every stored frame (a prepared cache); 0 when it varies
    size: int = 0

    def read(
        self, requests: Sequence[tuple[int, list[int]]], size: int, masks: bool = True
    ) -> list[Frames]:
        """Frames (and, with ``masks`` and :attr:`has_masks`, masks) ``indices`` of item ``k``
        for each ``(k, indices)``, at any resolution: ``size`` is a hint for cheap decoding (at
        short side ``size`` the crop is a slice)."""
        raise NotImplementedError


def skip_bad(root: str, bad: list[tuple[str, str]], total: int) -> None:
    """Warn once per unusable file, then the count; raise when nothing is left."""
    for name, why in bad:
        warn_once(f"bad-video:{name}", f"skipping {name}: {why}")
    if bad:
        warnings.warn(
            f"{root}: skipped {len(bad)} of {total} videos (unreadable, empty or "
            "corrupt; see the warnings above)",
            UserWarning,
            stacklevel=3,
        )
    if len(bad) == total:
        raise ValueError(
            f"{root}: none of the {total} videos is usable"
            + (f" (first: {bad[0][0]}: {bad[0][1]})" if bad else "")
        )


class VideoFileSource(Source):
    """Video files decoded by ``decoder``; each file is probed (header only) once, in threads.

    Args:
        files: ``(path, label)`` pairs (label -1 when unlabeled); decoder: a :mod:`.decode` backend.
    """

    def __init__(self, files: Sequence[tuple[Path, int]], decoder: Decoder, root: str = "") -> None:
        self.decoder, self.root = decoder, root or "videos"
        if not files:
            raise ValueError(f"{self.root}: no video files")

        def info(entry: tuple[Path, int]) -> tuple[Path, int, object]:
            try:
                return entry[0], entry[1], probe(entry[0])
            except (VideoError, OSError) as exc:
                return entry[0], entry[1], exc

        probed = thread_map(info, files)  # the read threads (PyAV opens files without the GIL)
        bad = [(str(p), str(i)) for p, _, i in probed if isinstance(i, Exception)]
        good = [(p, label, i) for p, label, i in probed if not isinstance(i, Exception)]
        skip_bad(self.root, bad, len(files))
        self.paths = [p for p, _, _ in good]
        if hasattr(decoder, "backend_for"):  # choose (and report) backends now, not mid-epoch
            for p, _, i in good:
                decoder.backend_for(p, i.codec)  # type: ignore[attr-defined]
        self.items = [Item(str(p), i.frames, i.fps, label) for p, label, i in good]  # type: ignore

    def read(
        self, requests: Sequence[tuple[int, list[int]]], size: int, masks: bool = True
    ) -> list[Frames]:
        try:
            clips = self.decoder.read_many([(self.paths[k], idx) for k, idx in requests], size)
        except (FileNotFoundError, PermissionError) as exc:  # gone or unreadable since probed
            paths = {str(self.paths[k]) for k, _ in requests}
            raise VideoError(paths.pop() if len(paths) == 1 else self.root, str(exc)) from None
        return [(c, None) for c in clips]


class FrameFolderSource(Source):
    """Frame-folder sequences (:func:`vosgan.data.frames.find_sequences`), masks when all have
    them. JPEG frames are decoded at a reduced DCT scale when that still covers ``size``."""

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self.seqs = fr.find_sequences(root, incomplete_masks="warn")
        self.items = [Item(s.name, len(s)) for s in self.seqs]
        lacking = [s.name for s in self.seqs if s.masks is None]
        self.has_masks = not lacking
        if len(lacking) < len(self.seqs) and lacking:
            warn_once(
                f"partial-masks:{root}",
                f"{root}: only {len(self.seqs) - len(lacking)} of {len(self.seqs)} sequences have "
                f"masks (none for {', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}); "
                "masks are not returned",
            )

    def read(
        self, requests: Sequence[tuple[int, list[int]]], size: int, masks: bool = True
    ) -> list[Frames]:
        """The clips on :func:`~vosgan.data.threads.thread_map`'s threads (PIL decodes without
        the GIL)."""

        def read_clip(request: tuple[int, list[int]]) -> Frames:
            seq = self.seqs[request[0]]
            try:
                video = fr.load_frames(seq, size, request[1])
                m = fr.load_masks(seq, size, request[1]) if masks and self.has_masks else None
            except (ValueError, OSError) as exc:
                raise VideoError(seq.frames[0].parent, str(exc)) from None
            return video, m

        return thread_map(read_clip, requests)


def clip_indices(length: int, frames: int, step: float, start: int, short: str) -> list[int]:
    """Frame numbers of a clip of ``frames`` frames from ``start`` every ``step`` frames.

    Past the end of a video of ``length`` frames: ``"loop"`` wraps to frame 0, ``"pad"`` repeats
    the last frame (``"skip"`` videos never get here: :meth:`ClipDataset.span` excludes them).
    """
    idx = [start + int(np.floor(k * step + 0.5)) for k in range(frames)]
    if short == "loop":
        return [i % length for i in idx]
    return [min(i, length - 1) for i in idx]


def _square(
    video: np.ndarray, masks: np.ndarray | None, size: int, u: float, flip: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop the square of side ``min(H, W)`` at fraction ``u`` of the free range, resize to
    ``size`` (bilinear frames, nearest masks), flip when asked: ``(n, size, size, 3)`` uint8."""
    n, h, w, _ = video.shape
    side = min(h, w)
    y0, x0 = round(u * (h - side)), round(u * (w - side))
    if side == size:  # a prepared cache at the model size: slicing only
        v = video[:, y0 : y0 + side, x0 : x0 + side]
        m = None if masks is None else masks[:, y0 : y0 + side, x0 : x0 + side]
    else:
        box = (x0, y0, x0 + side, y0 + side)
        v = np.stack(
            [
                np.asarray(
                    Image.fromarray(f).resize((size, size), Image.BILINEAR, box, reducing_gap=3.0)
                )
                for f in video
            ]
        )
        m = (
            None
            if masks is None
            else np.stack(
                [
                    np.asarray(Image.fromarray(f).resize((size, size), Image.NEAREST, box))
                    for f in masks
                ]
            )
        )
    if flip:
        v = v[:, :, ::-1]
        m = None if m is None else m[:, :, ::-1]
    return v, m


class ClipDataset(torch.utils.data.Dataset):
    """Fixed-size clips from a :class:`Source` (sampling rules in the module docstring).

    Args:
        source: the videos; num_clips: dataset length.
        frames: T; size: output height = width.
        seed, split: seeding (``split`` in ``vosgan.data.synthetic.SPLITS``).
        stride, fps, short, crop, flip, sampling: as ``DataConfig`` (vosgan.config).
        uint8: return ``video`` as uint8 ``(B, 3, T, H, W)`` instead of float32 in [-1, 1].
        masks: return the source's masks when it has them; ``False`` never reads them (training
            uses none: on DAVIS, decoding the PNG masks took two thirds of the loader's time).

    Items: ``video`` float32 ``(3, T, H, W)`` in [-1, 1]; ``mask`` float32 ``(1, T, H, W)`` in
    {0, 1} when the source has masks; ``label`` int64 scalar when it has class labels.
    """

    def __init__(
        self,
        source: Source,
        num_clips: int,
        frames: int,
        size: int,
        seed: int = 0,
        split: str = "train",
        stride: int = 1,
        fps: float = 0.0,
        short: str = "loop",
        crop: str = "center",
        flip: bool = False,
        sampling: str = "seeded",
        uint8: bool = False,
        masks: bool = True,
    ) -> None:
        for name, value, ok in (
            ("num_clips", num_clips, num_clips >= 1),
            ("frames", frames, frames >= 1),
            ("size", size, size >= 1),
            ("stride", stride, stride >= 1),
            ("fps", fps, fps >= 0),
            ("short", short, short in SHORT_POLICIES),
            ("crop", crop, crop in ("center", "random")),
            ("sampling", sampling, sampling in ("seeded", "random")),
            ("split", split, split in SPLITS),
        ):
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid for {type(self).__name__}")
        self.source, self.num_clips, self.frames, self.size = source, num_clips, frames, size
        self.seed, self.split, self.stride, self.fps = seed, split, stride, fps
        self.short, self.crop, self.flip, self.sampling, self.uint8 = (
            short,
            crop,
            flip,
            sampling,
            uint8,
        )
        if 0 < source.size < size:
            warn_once(
                f"upscaled:{source.root}:{size}",
                f"{source.root}: frames are stored at short side {source.size}, smaller than the "
                f"clips' size {size} (model.size): every clip is upscaled; prepare the cache "
                f"again with --size {size}",
            )
        if fps > 0 and any(it.fps <= 0 for it in source.items):
            warn_once(
                f"no-fps:{source.root}",
                f"{source.root}: some videos have no frame rate "
                f"(frame folders); data.fps={fps} is ignored for them, data.stride is used",
            )
        self.items = list(source.items)
        self.usable = [k for k, it in enumerate(self.items) if self._usable(it)]
        if len(self.usable) < len(self.items):
            n = len(self.items) - len(self.usable)
            warnings.warn(
                f"{source.root}: short=skip leaves out {n} of {len(self.items)} videos "
                f"shorter than a {frames}-frame clip",
                UserWarning,
                stacklevel=2,
            )
        if not self.usable:
            raise ValueError(
                f"{source.root}: no video is long enough for a {frames}-frame clip "
                "with short=skip; use data.short=loop or pad"
            )
        order = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split]]))
        self._base = [self.usable[j] for j in order.permutation(len(self.usable))]
        self.has_labels = all(it.label >= 0 for it in self.items)
        self.has_masks = masks and source.has_masks

    def __len__(self) -> int:
        return self.num_clips

    def video_of(self, i: int) -> int:
        """Index into ``items`` of the video clip ``i`` is assigned to (``order[i % V]``, fixed
        when the dataset is built; a video dropped since lends its clips to a stand-in)."""
        if not 0 <= i < self.num_clips:
            raise IndexError(f"clip index {i} out of range for {self.num_clips} clips")
        return self._base[i % len(self._base)]

    def step(self, item: Item) -> float:
        """Frame step of clips from ``item`` (stride, or native / target fps)."""
        return item.fps / self.fps if self.fps > 0 and item.fps > 0 else float(self.stride)

    def span(self, item: Item) -> int:
        """Frames a clip from ``item`` covers."""
        return int(np.floor((self.frames - 1) * self.step(item) + 0.5)) + 1

    def _usable(self, item: Item) -> bool:
        return item.length >= 1 and (self.short != "skip" or item.length >= self.span(item))

    def _plan(self, i: int) -> Plan:
        """Video, frame numbers, crop fraction and flip of clip ``i``, by the videos as known now
        (a dropped video's stand-in, a shortened video's decodable length)."""
        k = self.video_of(i)  # fixed when built: a dropped file moves no clip
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, SPLITS[self.split], i])
            if self.sampling == "seeded"
            else None
        )
        if k not in self.usable:
            k = self._next_usable(k)
        item = self.items[k]
        start = int(rng.integers(0, max(item.length - self.span(item), 0) + 1))
        u = float(rng.random()) if self.crop == "random" else 0.5
        flip = bool(rng.random() < 0.5) if self.flip else False
        idx = clip_indices(item.length, self.frames, self.step(item), start, self.short)
        return Plan(i, k, idx, u, flip)

    def _next_usable(self, k: int) -> int:
        """The usable video after ``k`` (cyclically): the stand-in for a dropped video."""
        return min(self.usable, key=lambda j: (j - k) % len(self.items))

    def _drop(self, k: int, exc: VideoError) -> None:
        """Forget (or shorten) item ``k`` after a read failure; warn once."""
        item = self.items[k]
        if isinstance(exc, ShortVideoError) and 0 < exc.available < item.length:
            warn_once(
                f"short:{item.name}",
                f"{item.name}: header says {item.length} frames but "
                f"only {exc.available} decode (truncated?); using {exc.available}",
            )
            self.items[k] = replace(item, length=exc.available)
            if self._usable(self.items[k]):
                return
        else:
            warn_once(f"bad-video:{item.name}", f"skipping {item.name} from now on: {exc}")
        self.usable.remove(k)
        if not self.usable:
            raise ValueError(f"{self.source.root}: no usable video left (last failure: {exc})")

    def _read(self, plans: list[Plan]) -> list[tuple[Plan, Frames]]:
        """Read every plan -> (plan read, frames); a failing video is shortened or dropped and
        its clips planned again (:meth:`_read_one`)."""
        try:
            frames = self.source.read(
                [(p.video, p.frames) for p in plans], self.size, self.has_masks
            )
            return list(zip(plans, frames, strict=True))
        except VideoError:
            return [self._read_one(p.clip) for p in plans]  # isolate the bad file(s)

    def _read_one(self, clip: int) -> tuple[Plan, Frames]:
        """Clip ``clip`` read alone, planned by the videos as known now: a failure shortens or
        drops a video (each try strictly), then the same seeded rule plans the clip again."""
        while True:
            plan = self._plan(clip)
            try:
                return plan, self.source.read(
                    [(plan.video, plan.frames)], self.size, self.has_masks
                )[0]
            except VideoError as exc:
                self._drop(plan.video, exc)

    def arrays(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """uint8 ``video (B, T, size, size, 3)``, bool ``mask (B, T, size, size)``, ``label``."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("indices must not be empty")
        read = self._read([self._plan(i) for i in idx])
        video, masks = [], []
        for plan, (v, m) in read:
            v, m = _square(v, m, self.size, plan.crop, plan.flip)
            video.append(v)
            masks.append(m)
        out = {"video": np.stack(video)}
        if self.has_masks:
            out["mask"] = np.stack(masks)
        if self.has_labels:  # of the video actually read (a stand-in's for a dropped file)
            out["label"] = np.asarray([self.items[p.video].label for p, _ in read], np.int64)
        return out

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Clips ``indices``: ``video`` float32 ``(B, 3, T, H, W)`` in [-1, 1] (uint8 with
        ``uint8=True``), ``mask`` float32 ``(B, 1, T, H, W)``, ``label`` int64 ``(B,)``."""
        a = self.arrays(indices)
        v = a["video"].transpose(0, 4, 1, 2, 3)
        if self.uint8:
            out = {"video": torch.from_numpy(np.ascontiguousarray(v))}
        else:  # numpy in one thread: torch's threaded kernels stall on a busy 2-core box
            f = v.astype(np.float32, order="C")
            f *= np.float32(1 / 127.5)
            f -= np.float32(1.0)
            out = {"video": torch.from_numpy(f)}
        if "mask" in a:
            out["mask"] = torch.from_numpy(a["mask"][:, None].astype(np.float32))
        if "label" in a:
            out["label"] = torch.from_numpy(a["label"])
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}
