"""Pre-decode videos into a uint8 clip cache: ``python -m vosgan.data.prepare SRC --out CACHE``.

``SRC`` is anything ``data.source`` accepts except a cache (a video folder, UCF-101 class folders,
DAVIS or frame folders). Each video is decoded once (PyAV; frame folders with PIL), its short side
resized to ``--size`` (default 64, the paper's resolution: clips then need only a crop when
training at ``model.size=64``), and appended to memory-mapped shards (layout:
:mod:`vosgan.data.cache`). Videos are decoded on ``torch.get_num_threads()`` threads and written
in order. Interrupted? Run the same command again: it resumes after the last finished video. A
different source list (names, sizes, labels, the split lists ``classInd.txt``, ``trainlistNN.txt``
and ``testlistNN.txt``) or ``--size`` under the same ``--out`` is refused (checksum) unless
``--force``, which starts afresh. The split lists are copied into the cache on every run. Train
with ``--data CACHE`` (``data.decoder=cache`` optional).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vosgan import cli
from vosgan.data import frames as fr
from vosgan.data.build import LIST_DIRS, labelled_videos, layout
from vosgan.data.cache import INDEX, VERSION, CacheWriter, source_checksum
from vosgan.data.decode import PyAVDecoder, VideoError
from vosgan.data.threads import thread_map


def _sources(src: Path) -> tuple[str, list[dict[str, Any]]]:
    """The layout of ``src`` and its videos: ``{"name", "bytes", "path"|"seq", "label"}``."""
    kind = layout(src, "SRC")
    if kind == "cache":
        raise ValueError(f"SRC {src} is already a prepared cache")
    if kind == "frames":
        out = []
        for s in fr.find_sequences(src, incomplete_masks="warn"):
            files = s.frames + (s.masks or [])
            out.append(
                {
                    "name": s.name,
                    "seq": s,
                    "label": -1,
                    "bytes": sum(p.stat().st_size for p in files),
                }
            )
        return kind, out
    base = src if src.is_dir() else src.parent
    return kind, [
        {
            "name": p.relative_to(base).as_posix(),
            "path": p,
            "label": label,
            "bytes": p.stat().st_size,
        }
        for p, label in labelled_videos(src, "all")
    ]


def _is_list(name: str) -> bool:
    return name == "classInd.txt" or name.startswith(("trainlist", "testlist"))


def list_files(src: Path) -> dict[str, Path]:
    """The split lists of ``src`` by name, the first of each name in ``LIST_DIRS`` order (the one
    :func:`vosgan.data.build.find_list_file` reads)."""
    found: dict[str, Path] = {}
    for d in LIST_DIRS if src.is_dir() else ():
        for p in sorted((src / d).glob("*.txt")) if (src / d).is_dir() else []:
            if _is_list(p.name) and p.is_file():
                found.setdefault(p.name, p)
    return found


def _copy_lists(lists: dict[str, Path], out: Path) -> None:
    """Make the cache's split lists the source's: copy them, delete those the source lost."""
    for p in out.glob("*.txt"):
        if _is_list(p.name) and p.name not in lists:
            p.unlink()
    for name, p in lists.items():
        shutil.copyfile(p, out / name)


def decode_source(entry: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Frames uint8 ``(N, H, W, 3)`` (short side ``size``), masks bool or None, and fps."""
    if "seq" in entry:
        seq = entry["seq"]
        masks = fr.load_masks(seq, size) if seq.masks is not None else None
        return fr.load_frames(seq, size), masks, 0.0
    from vosgan.data.decode import probe

    info = probe(entry["path"])
    got, _ = PyAVDecoder.decode(entry["path"], lambda i: True, size=size)
    return np.stack([got[i] for i in sorted(got)]), None, info.fps


def prepare(
    src: str | Path,
    out: str | Path,
    size: int = 64,
    shard_mb: int = 1024,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or resume) the cache of ``src`` in ``out``; returns the index (see module doc)."""
    src, out = Path(src), Path(out)
    if size < 8:
        raise ValueError(f"--size must be >= 8 pixels, got {size}")
    if shard_mb < 1:
        raise ValueError(f"--shard-mb must be >= 1, got {shard_mb}")
    kind, entries = _sources(src)
    lists = list_files(src)
    settings = {
        "size": size,
        "kind": kind,
        "version": VERSION,
        "lists": {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in lists.items()},
    }
    checksum = source_checksum([(e["name"], e["bytes"], e["label"]) for e in entries], settings)
    header = {
        "size": size,
        "kind": kind,
        "source": str(src.resolve()),
        "source_checksum": checksum,
        "num_sources": len(entries),
    }
    created = not out.exists()
    writer = CacheWriter(out, header, shard_bytes=shard_mb << 20, force=force)
    _copy_lists(lists, out)
    if writer.complete:
        print(f"{out}: already complete for this source list ({len(entries)} videos)")
        from vosgan.data.cache import read_index

        return read_index(out)
    if writer.done:
        print(f"resuming: {writer.done} of {len(entries)} videos already done")
    bar = tqdm(
        entries,
        initial=writer.done,
        total=len(entries),
        desc="prepare",
        unit="video",
        disable=not progress,
        dynamic_ncols=True,
    )

    def decode(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, float] | Exception:
        try:
            return decode_source(entry, size)
        except (VideoError, ValueError, OSError) as exc:
            return exc

    # Videos are decoded a few at a time on thread_map's threads and written in order, so an
    # interruption loses at most the decoded videos not yet written (resumed by the next run).
    todo, chunk = entries[writer.done :], max(1, torch.get_num_threads())
    for k in range(0, len(todo), chunk):
        batch = todo[k : k + chunk]
        for entry, got in zip(batch, thread_map(decode, batch), strict=True):
            if isinstance(got, Exception):
                warnings.warn(f"skipping {entry['name']}: {got}", UserWarning, stacklevel=2)
                writer.skip(entry["name"], str(got))
            else:
                writer.add(entry["name"], *got, entry["label"])
            bar.update(1)
    bar.close()
    index = writer.finish()
    n = len(index["videos"])
    if n == 0:  # nothing usable: leave no cache that looks complete
        if created:
            shutil.rmtree(out)
        else:
            (out / INDEX).unlink()
        raise ValueError(f"{src}: no usable video (all {len(entries)} skipped); no cache written")
    frames = sum(v["length"] for v in index["videos"])
    nbytes = sum(p.stat().st_size for p in out.glob("*.bin"))
    print(
        f"{out}: {n} videos, {frames} frames, {nbytes / 2**20:.1f} MiB"
        + (f"; skipped {len(index['skipped'])} unusable file(s)" if index["skipped"] else "")
    )
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vosgan.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="video folder, UCF-101 folder, DAVIS or frame folders")
    p.add_argument(
        "--out",
        required=True,
        type=cli.out_dir,
        help="cache folder (created; resumed if unfinished)",
    )
    p.add_argument("--size", type=int, default=64, help="stored short side in pixels (64)")
    p.add_argument("--shard-mb", type=int, default=1024, help="shard size in MiB (1024)")
    p.add_argument(
        "--force", action="store_true", help="overwrite a cache of another source, or a damaged one"
    )
    args = p.parse_args(argv)
    try:
        prepare(args.src, args.out, args.size, args.shard_mb, args.force)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; run the same command again to resume into {args.out}", file=sys.stderr
        )
        return 130
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
