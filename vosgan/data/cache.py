"""Pre-decoded uint8 clip cache: memory-mapped shards + a JSON index; no decoding when training.

Folder layout (written by :class:`CacheWriter`, i.e. ``python -m vosgan.data.prepare``)::

    index.json           {"format", "version", "size", "source", "source_checksum", "has_masks",
                          "videos": [{name, label, fps, length, height, width, shard, offset,
                                      mask_offset}], "skipped": [[name, reason]]}
    shard_00000.bin      frames, uint8 (length, height, width, 3) per video, back to back
    mask_00000.bin       masks, uint8 0/1 (length, height, width) per video (frame folders only)
    progress.jsonl       while preparing: a header line, then one line per finished video
    trainlist01.txt ...  split lists and classInd.txt copied from the source on every run, if any

Videos are stored whole with the short side resized to ``size`` (aspect kept), so clip sampling
(start, stride, fps), cropping and flipping stay training-time choices. A shard grows until it
passes ``shard_bytes``. Resume: each video's bytes are flushed and fsync'ed before its line is
appended to ``progress.jsonl``; a restart truncates the shards to the last recorded end and goes
on with the next video. ``index.json`` is written last (atomically): its presence marks a complete
cache. With ``force``, a cache or progress that cannot be kept or resumed (another checksum, an
unreadable index, damaged shards) is discarded and the run starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vosgan.data.video import Frames, Item, Source

FORMAT, VERSION = "vosgan-clip-cache", 1
INDEX, PROGRESS = "index.json", "progress.jsonl"


def source_checksum(names: Iterable[tuple[Any, ...]], settings: dict[str, Any]) -> str:
    """sha256 of the source list, ``(relative name, byte size, label)`` per video, and the
    prepare settings (which name the split lists' contents)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for entry in names:
        h.update(("\t".join(map(str, entry)) + "\n").encode())
    return h.hexdigest()


def _shard(root: Path, kind: str, k: int) -> Path:
    return root / f"{kind}_{k:05d}.bin"


class CacheWriter:
    """Appends whole videos to the shards of ``root``; resumes a previous, unfinished run.

    Args:
        root: cache folder (created). header: ``{"size", "source", "source_checksum", ...}``;
            a resumed run must have the same ``source_checksum``.
        shard_bytes: start a new shard once the current one holds this many bytes.
        force: discard an existing cache or progress with another checksum, an unreadable index
            or damaged shards (a complete cache's or an interrupted run's) instead of failing.
    """

    def __init__(
        self,
        root: str | Path,
        header: dict[str, Any],
        shard_bytes: int = 1 << 30,
        force: bool = False,
    ) -> None:
        self.root, self.header, self.shard_bytes = Path(root), dict(header), shard_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []
        self.complete = False
        old = self._previous()
        problem = None if old is None else self._problem(old)
        if problem and not force:
            raise ValueError(f"{problem}; pass --force to overwrite it or choose another --out")
        if old is None or problem:
            self._start()
        elif (self.root / INDEX).is_file():
            self.entries = old["videos"]
            self.complete = True
        else:
            for line in (self.root / PROGRESS).read_text().splitlines()[1:]:
                try:
                    self.entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by the interruption: that video is redone
            problem = shard_problem(self.root, [e for e in self.entries if "shard" in e])
            if problem and not force:
                raise ValueError(f"{problem}; pass --force to start over")
            if problem:
                self.entries = []
                self._start()
            else:
                self._truncate()

    def _start(self) -> None:
        """Delete the shards and index in ``root``; begin a progress file with the header."""
        for p in [*self.root.glob("shard_*.bin"), *self.root.glob("mask_*.bin"), self.root / INDEX]:
            p.unlink(missing_ok=True)
        (self.root / PROGRESS).write_text(json.dumps(self.header) + "\n")

    def _problem(self, old: dict[str, Any]) -> str | None:
        """Why the cache or progress already in ``root`` cannot be kept or resumed, if it can't."""
        index = self.root / INDEX
        if not old:
            name = index if index.is_file() else self.root / PROGRESS
            return f"{name} is unreadable (damaged, or not written by vosgan.data.prepare)"
        if old.get("source_checksum") != self.header["source_checksum"]:
            return (
                f"{self.root} holds a cache of another source list or settings (labels and split "
                f"lists count; checksum {str(old.get('source_checksum'))[:12]} != "
                f"{self.header['source_checksum'][:12]})"
            )
        return shard_problem(self.root, old["videos"]) if index.is_file() else None

    def _previous(self) -> dict[str, Any] | None:
        """The index, else the progress header; ``{}`` when unreadable, None when neither."""
        for name in (INDEX, PROGRESS):
            p = self.root / name
            if p.is_file():
                try:
                    value = json.loads(p.read_text().splitlines()[0])
                except (json.JSONDecodeError, IndexError, UnicodeDecodeError):
                    return {}
                ok = isinstance(value, dict) and (name != INDEX or _is_index(value))
                return value if ok else {}
        return None

    def _truncate(self) -> None:
        """Cut every shard to the end of its last recorded video; rewrite the progress file."""
        ends: dict[tuple[str, int], int] = {}
        for e in self.entries:
            if "shard" in e:
                n = e["length"] * e["height"] * e["width"]
                ends[("shard", e["shard"])] = e["offset"] + 3 * n
                if e.get("mask_offset") is not None:
                    ends[("mask", e["shard"])] = e["mask_offset"] + n
        for p in [*self.root.glob("shard_*.bin"), *self.root.glob("mask_*.bin")]:
            kind, k = p.stem.split("_")
            end = ends.get((kind, int(k)), 0)
            if end == 0:
                p.unlink()
            elif p.stat().st_size > end:
                os.truncate(p, end)
        lines = [json.dumps(self.header)] + [json.dumps(e) for e in self.entries]
        (self.root / PROGRESS).write_text("\n".join(lines) + "\n")

    @property
    def done(self) -> int:
        """Number of source videos already handled (written or skipped)."""
        return len(self.entries)

    def _record(self, entry: dict[str, Any]) -> None:
        with open(self.root / PROGRESS, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def skip(self, name: str, reason: str) -> None:
        """Record an unusable source video."""
        self._record({"name": name, "skipped": reason})

    def add(
        self, name: str, video: np.ndarray, masks: np.ndarray | None, fps: float, label: int
    ) -> None:
        """Append one video: uint8 ``(N, H, W, 3)`` frames, optional bool ``(N, H, W)`` masks."""
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(
                f"{name}: video must be uint8 (N, H, W, 3), got {video.dtype} {video.shape}"
            )
        written = [e for e in self.entries if "shard" in e]
        shard = written[-1]["shard"] if written else 0
        path = _shard(self.root, "shard", shard)
        if path.exists() and path.stat().st_size >= self.shard_bytes:
            shard += 1
            path = _shard(self.root, "shard", shard)
        entry: dict[str, Any] = {
            "name": name,
            "label": label,
            "fps": fps,
            "length": video.shape[0],
            "height": video.shape[1],
            "width": video.shape[2],
            "shard": shard,
            "mask_offset": None,
        }
        for kind, data in (("shard", video), ("mask", masks)):
            if data is None:
                continue
            p = _shard(self.root, kind, shard)
            with open(p, "ab") as f:
                offset = f.tell()
                f.write(np.ascontiguousarray(data, np.uint8).tobytes())
                f.flush()
                os.fsync(f.fileno())
            entry["offset" if kind == "shard" else "mask_offset"] = offset
        self._record(entry)

    def finish(self) -> dict[str, Any]:
        """Write ``index.json`` (atomically) and drop the progress file; returns the index."""
        videos = [e for e in self.entries if "shard" in e]
        index = {
            **self.header,
            "format": FORMAT,
            "version": VERSION,
            "has_masks": bool(videos) and all(e["mask_offset"] is not None for e in videos),
            "videos": videos,
            "skipped": [[e["name"], e["skipped"]] for e in self.entries if "skipped" in e],
        }
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.root / INDEX)
        (self.root / PROGRESS).unlink(missing_ok=True)
        self.complete = True
        return index


def read_index(root: str | Path) -> dict[str, Any]:
    """The index of a complete cache (clear errors for unfinished or foreign folders)."""
    root = Path(root)
    if not (root / INDEX).is_file():
        if (root / PROGRESS).is_file():
            raise ValueError(
                f"{root}: the cache is incomplete (interrupted prepare); run "
                "python -m vosgan.data.prepare again with the same SRC to resume"
            )
        raise FileNotFoundError(f"{root / INDEX} does not exist (not a prepared cache)")
    try:
        index = json.loads((root / INDEX).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{root / INDEX} is unreadable ({exc}); rebuild the cache with "
            f"python -m vosgan.data.prepare SRC --out {root} --force"
        ) from None
    fmt = (index.get("format"), index.get("version")) if isinstance(index, dict) else None
    if fmt != (FORMAT, VERSION):
        raise ValueError(f"{root / INDEX}: not a {FORMAT} v{VERSION} index")
    if not _is_index(index):
        raise ValueError(f"{root / INDEX}: damaged index (missing or malformed video entries)")
    if not index["videos"]:
        raise ValueError(f"{root}: the cache holds no usable video")
    problem = shard_problem(root, index["videos"])
    if problem:
        raise ValueError(
            f"{problem}; rebuild the cache with python -m vosgan.data.prepare SRC --out {root} "
            "--force"
        )
    return index


_ENTRY_KEYS = ("name", "length", "height", "width", "shard", "offset", "mask_offset")


def _is_index(index: dict[str, Any]) -> bool:
    """Whether ``index`` has ``size``, ``has_masks`` and a ``videos`` list of complete entries."""
    videos = index.get("videos")
    return (
        {"size", "has_masks"} <= index.keys()
        and isinstance(videos, list)
        and all(isinstance(v, dict) and all(k in v for k in _ENTRY_KEYS) for v in videos)
    )


def shard_problem(root: str | Path, videos: Sequence[dict[str, Any]]) -> str | None:
    """What is wrong with the shards of ``root`` (naming the file), if one is missing or shorter
    than the ``videos`` stored in it need; None when all are whole."""
    ends: dict[Path, int] = {}
    for v in videos:
        n = v["length"] * v["height"] * v["width"]
        for kind, offset, nbytes in (("shard", v["offset"], 3 * n), ("mask", v["mask_offset"], n)):
            if offset is not None:
                path = _shard(Path(root), kind, v["shard"])
                ends[path] = max(ends.get(path, 0), offset + nbytes)
    for path, end in sorted(ends.items()):
        if not path.is_file():
            return f"{path} is missing (its videos need {end} bytes)"
        if path.stat().st_size < end:
            return (
                f"{path} holds {path.stat().st_size} bytes, fewer than the {end} its videos "
                "need (a truncated or damaged shard)"
            )
    return None


class CacheSource(Source):
    """A prepared cache as a :class:`Source`: frames are sliced from memory-mapped shards.

    Args:
        root: the cache folder. split, split_list: as in :func:`vosgan.data.build.labelled_videos`,
            applied to the stored relative names with the split lists copied into the cache.
    """

    def __init__(self, root: str | Path, split: str = "all", split_list: str = "auto") -> None:
        from vosgan.data.build import find_list_file, parse_split_list

        self.root = str(root)
        index = read_index(root)
        self.size, self.has_masks = index["size"], index["has_masks"]
        videos = index["videos"]
        if split_list != "none" and split != "all":
            number = "01" if split_list == "auto" else f"{int(split_list):02d}"
            name = f"{'train' if split == 'train' else 'test'}list{number}.txt"
            path = find_list_file(Path(root), name)
            if path is None and split_list != "auto":
                raise FileNotFoundError(f"data.split_list={split_list}: no {name} in {root}")
            if path is not None:
                chosen = parse_split_list(path)
                videos = [
                    dict(
                        v,
                        label=chosen[v["name"].lower()]
                        if chosen[v["name"].lower()] >= 0
                        else v["label"],
                    )
                    for v in videos
                    if v["name"].lower() in chosen
                ]
                if not videos:
                    raise ValueError(f"{path} selects none of the videos in {root}")
        self.videos = videos
        self.items = [Item(v["name"], v["length"], v["fps"], v["label"]) for v in videos]
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # a pickled memmap would copy its data: each process maps its own
        return state

    def _map(self, kind: str, shard: int) -> np.memmap:
        key = (kind, shard)
        if key not in self._maps:  # opened lazily: each loader worker maps its own
            self._maps[key] = np.memmap(_shard(Path(self.root), kind, shard), np.uint8, "r")
        return self._maps[key]

    def read(
        self, requests: Sequence[tuple[int, list[int]]], size: int, masks: bool = True
    ) -> list[Frames]:
        out: list[Frames] = []
        for k, idx in requests:
            v = self.videos[k]
            n, h, w = v["length"], v["height"], v["width"]
            frames = self._map("shard", v["shard"])[v["offset"] : v["offset"] + n * h * w * 3]
            video = frames.reshape(n, h, w, 3)[idx]  # fancy indexing: copies only these frames
            m = None
            if masks and self.has_masks:
                m = self._map("mask", v["shard"])[v["mask_offset"] : v["mask_offset"] + n * h * w]
                m = m.reshape(n, h, w)[idx].astype(bool)
            out.append((video, m))
        return out
