"""``make_dataset(cfg, split, num_clips)``: the dataset ``data.source`` names, chosen by layout.

``data.source`` is ``"synthetic"`` (the built-in procedural video) or a path:

- a prepared clip cache (a folder with ``index.json`` from ``python -m vosgan.data.prepare``);
- a video file, or a folder of videos (``.mp4 .avi .webm .mkv .mov .m4v``, searched recursively),
  optionally one subfolder per class (UCF-101); every split labels a class the same way
  (:func:`class_index`): by ``classInd.txt`` when present (``1 ApplyEyeMakeup`` per line,
  1-based), else by the train list's ``<Class>/<file> <id>`` lines, else by the sorted names of
  the class folders that hold videos; ``trainlistNN.txt`` / ``testlistNN.txt`` (in the folder or
  its ``ucfTrainTestlist/``) select the videos of the ``train`` and ``val``/``test`` splits
  (``data.split_list``), and a list id that contradicts that labelling is an error;
- frame folders: DAVIS (``JPEGImages/480p/<seq>``) or ``<seq>/frames`` (+ ``masks``), see
  :mod:`vosgan.data.frames`.

A folder holding both videos and images (other than the DAVIS layouts) is read as videos, with a
warning naming the images it ignores.

Without split lists every split draws from all videos, with different clip seeds per split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vosgan.backend import warn_once
from vosgan.config import Config, ConfigError
from vosgan.data.decode import make_decoder
from vosgan.data.frames import IMAGE_SUFFIXES
from vosgan.data.synthetic import SyntheticVideos
from vosgan.data.video import ClipDataset, FrameFolderSource, Source, VideoFileSource

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
LIST_DIRS = ("", "ucfTrainTestlist")


def find_videos(root: str | Path) -> list[Path]:
    """Video files under ``root`` (recursive, sorted by relative path), or ``[root]`` for a file."""
    root = Path(root)
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found += [
            Path(dirpath, f) for f in sorted(filenames) if Path(f).suffix.lower() in VIDEO_SUFFIXES
        ]
    return found


def find_list_file(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/ucfTrainTestlist/name``, whichever exists first, else None."""
    for d in LIST_DIRS:
        if (root / d / name).is_file():
            return root / d / name
    return None


def parse_class_index(path: str | Path) -> dict[str, int]:
    """``classInd.txt`` (``<1-based id> <ClassName>`` per line) -> {lower-case name: 0-based id}."""
    out: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) < 1:
            raise ValueError(f"{path}:{n}: expected '<id> <ClassName>' with id >= 1, got {line!r}")
        out[parts[1].lower()] = int(parts[0]) - 1
    if not out:
        raise ValueError(f"{path}: no classes")
    return out


def parse_split_list(path: str | Path) -> dict[str, int]:
    """A UCF-101 split list -> {lower-case relative path: 0-based label, or -1 if not given}.

    Lines are ``Class/v_Class_g08_c01.avi 1`` (train lists) or ``Class/v_Class_g01_c01.avi``
    (test lists). Names compare case-insensitively: the official lists spell one class
    ``HandStandPushups`` while its folder is ``HandstandPushups``.
    """
    return {r: label for r, (label, _) in split_list_lines(path).items()}


def split_list_lines(path: str | Path) -> dict[str, tuple[int, int]]:
    """:func:`parse_split_list` with line numbers: {relative path: (label or -1, 1-based line)}."""
    out: dict[str, tuple[int, int]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and (not parts[1].isdigit() or int(parts[1]) < 1)):
            raise ValueError(f"{path}:{n}: expected '<relative path> [<label >= 1>]', got {line!r}")
        label = int(parts[1]) - 1 if len(parts) == 2 else -1
        out[parts[0].replace("\\", "/").lower()] = (label, n)
    if not out:
        raise ValueError(f"{path}: empty split list")
    return out


def _list_number(split_list: str) -> str | None:
    """``"01"``..``"03"`` for ``data.split_list`` (``"auto"``: 01), None for ``"none"``."""
    if split_list == "none":
        return None
    return "01" if split_list == "auto" else f"{int(split_list):02d}"


def _ids_by_train_list(path: Path) -> dict[str, int] | None:
    """{class folder: label} from the ``<Class>/<file> <id>`` lines of train list ``path``, or
    None when they are not one id per class and one class per id (or give no ids)."""
    ids: dict[str, int] = {}
    for r, (label, _) in split_list_lines(path).items():
        if label < 0 or "/" not in r:
            continue
        if ids.setdefault(r.split("/")[0], label) != label:
            return None
    return ids if ids and len(set(ids.values())) == len(ids) else None


def class_index(
    root: str | Path, split_list: str = "auto", files: list[Path] | None = None
) -> dict[str, int]:
    """The labels of a class-folder root, the same for every split: {lower-case class: 0-based id}.

    ``classInd.txt`` when present (every class folder must have an id); else the
    ``<Class>/<file> <id>`` lines of the train list ``data.split_list`` names (``"auto"``: 01)
    when they give one id per class and one class per id, class folders the list leaves out
    numbered on after its largest id in sorted order; else the sorted class folders. Class
    folders are the first path component of the videos found (``files``: :func:`find_videos`,
    searched when None); an empty dict when some video sits outside one.
    """
    root = Path(root)
    files = find_videos(root) if files is None else files
    rel = [f.relative_to(root).as_posix() for f in files] if root.is_dir() else []
    if not rel or not all("/" in r for r in rel):
        return {}
    classes = sorted({r.split("/")[0].lower() for r in rel})
    ind = find_list_file(root, "classInd.txt")
    if ind is not None:
        labels = parse_class_index(ind)
        unknown = [c for c in classes if c not in labels]
        if unknown:
            raise ValueError(f"{ind}: no id for class folder(s) {unknown[:5]}")
        return labels
    number = _list_number(split_list)
    train = find_list_file(root, f"trainlist{number}.txt") if number else None
    labels = (_ids_by_train_list(train) if train else None) or {}
    rest = [c for c in classes if c not in labels]
    start = max(labels.values(), default=-1) + 1
    return labels | {c: start + k for k, c in enumerate(rest)}


def labelled_videos(
    root: str | Path, split: str, split_list: str = "auto"
) -> list[tuple[Path, int]]:
    """The ``(path, label)`` videos of ``split`` under ``root`` (label -1 when unlabeled).

    Labels are :func:`class_index`'s, whatever the split; a list line whose id contradicts them
    is a ``ValueError`` naming the list file and line (without class folders, list ids are used).

    Args:
        split: ``"train"`` uses ``trainlistNN.txt``; ``"val"``/``"test"`` use ``testlistNN.txt``;
            ``"all"`` selects every video.
        split_list: ``"auto"`` (list 01 when present), ``"none"``, or ``"1"``..``"3"``.
    """
    root = Path(root)
    files = find_videos(root)
    if not files:
        raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    if root.is_file():
        return [(root, -1)]
    rel = {f: f.relative_to(root).as_posix() for f in files}
    labels = class_index(root, split_list, files)
    chosen, path = None, None
    number = _list_number(split_list)
    if number is not None and split != "all":
        name = f"{'train' if split == 'train' else 'test'}list{number}.txt"
        path = find_list_file(root, name)
        if path is None and split_list != "auto":
            raise FileNotFoundError(
                f"data.split_list={split_list}: no {name} in {root} or {root / 'ucfTrainTestlist'}"
            )
        chosen = split_list_lines(path) if path else None
    out, conflicts = [], []
    for f in files:
        r = rel[f].lower()
        if chosen is not None and r not in chosen:
            continue
        label = labels.get(r.split("/")[0], -1)
        if chosen is not None and chosen[r][0] >= 0:
            given, line = chosen[r]
            if labels and given != label:
                conflicts.append((line, rel[f], given, label))
            label = given
        out.append((f, label))
    if conflicts:
        line, name, given, label = min(conflicts)
        raise ValueError(
            f"{path}:{line}: {name} has id {given + 1}, but its class is id {label + 1} in "
            f"every split ({_label_rule(root, split_list)}); {len(conflicts)} line(s) disagree: "
            "fix the list or add a classInd.txt"
        )
    if not out:
        raise ValueError(
            f"{root}: the {split} split list selects none of the {len(files)} "
            "videos found (names are compared as <class>/<file>)"
        )
    return out


def _label_rule(root: Path, split_list: str) -> str:
    """Which rule of :func:`class_index` labelled ``root`` (for error messages)."""
    ind = find_list_file(root, "classInd.txt")
    if ind is not None:
        return f"from {ind}"
    number = _list_number(split_list)
    train = find_list_file(root, f"trainlist{number}.txt") if number else None
    if train is not None and _ids_by_train_list(train) is not None:
        return f"from the ids of {train}"
    why = f"{train}'s ids are not one per class" if train else "no classInd.txt"
    return f"sorted class folders: {why}"


def layout(root: str | Path, what: str = "data.source") -> str:
    """``"cache"``, ``"videos"`` or ``"frames"``: the layout of ``root`` (errors name ``what``)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} {root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() in VIDEO_SUFFIXES:
            return "videos"
        raise ValueError(f"{what} {root} is a file but not a video ({', '.join(VIDEO_SUFFIXES)})")
    if (root / "index.json").is_file() or (root / "progress.jsonl").is_file():
        return "cache"
    if (root / "JPEGImages").is_dir() or (root / "frames").is_dir():
        return "frames"
    videos = images = 0
    first_image = ""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            suffix = Path(f).suffix.lower()
            videos += suffix in VIDEO_SUFFIXES
            if suffix in IMAGE_SUFFIXES:
                images += 1
                first_image = first_image or Path(dirpath, f).relative_to(root).as_posix()
    if videos and images:  # a thumbnail beside UCF-101's videos must not make it a frame folder
        warn_once(
            f"mixed-layout:{root}",
            f"{what} {root} holds {videos} video(s) and {images} image file(s) (first: "
            f"{first_image}); reading the videos, ignoring the images (for frame folders, move "
            "the videos out)",
        )
    if videos or images:
        return "videos" if videos else "frames"
    raise ValueError(f"{what} {root}: no videos, frame folders or prepared cache found")


def make_source(cfg: Config, split: str) -> Source:
    """The :class:`Source` for ``cfg.data.source`` (a path) and ``split``."""
    d = cfg.data
    kind = layout(d.source)
    if d.decoder == "cache" and kind != "cache":
        raise ConfigError(
            f"data.decoder=cache but data.source={d.source!r} is not a prepared "
            "cache; run python -m vosgan.data.prepare SRC --out CACHE first"
        )
    if kind == "cache":
        from vosgan.data.cache import CacheSource

        return CacheSource(d.source, split=split, split_list=d.split_list)
    if kind == "frames":
        return FrameFolderSource(d.source)
    files = labelled_videos(d.source, split, d.split_list)
    return VideoFileSource(files, make_decoder(d.decoder, max_batch=d.batch_size), d.source)


def make_dataset(cfg: Config, split: str, num_clips: int, masks: bool = True) -> Any:
    """The dataset ``cfg.data.source`` names, with ``num_clips`` clips of ``split``.

    Returns :class:`SyntheticVideos` or :class:`ClipDataset`: both have ``len``, ``[i]`` and
    ``batch(indices)`` -> ``video`` float32 ``(B, 3, T, H, W)`` in [-1, 1], plus ``mask``
    ``(B, 1, T, H, W)`` when the data has masks (and ``masks``: ``False`` never reads them)
    and ``label`` int64 ``(B,)`` for class folders.
    """
    d, m = cfg.data, cfg.model
    if d.source == "synthetic":
        return SyntheticVideos(num_clips, m.frames, m.size, seed=d.seed, split=split, cache=d.cache)
    return ClipDataset(
        make_source(cfg, split),
        num_clips,
        m.frames,
        m.size,
        seed=d.seed,
        split=split,
        stride=d.stride,
        fps=d.fps,
        short=d.short,
        crop=d.crop,
        flip=d.flip,
        sampling=d.sampling,
        masks=masks,
    )
