"""Frame-folder video: DAVIS layouts and generic folders of numbered images.

Layouts :func:`find_sequences` recognises under ``root`` (checked in this order):

1. DAVIS: ``root/JPEGImages/<res>/<seq>/*.jpg`` with masks in ``root/Annotations/<res>/<seq>/*.png``
   (``<res>`` is ``480p`` when present, else the only resolution folder);
2. simple: ``root/<seq>/frames/*.jpg`` with optional ``root/<seq>/masks/*.png`` (the layout of
   ``shared/data/davis2016``), or ``root/frames`` + ``root/masks`` for a single sequence;
3. generic: ``root/<seq>/*.{jpg,png,...}``, or images directly in ``root`` (one sequence, no masks).

Frames are ordered by a natural sort of their file stems (``2.jpg`` before ``10.jpg``). Masks are
paired with frames by stem; every frame of a sequence with a mask folder must have a mask.

Mask values (:func:`load_masks`): palette images (PIL mode ``P``, the DAVIS 2017 instance format)
are foreground where the palette index is non-zero (the union of all objects); any other mode is
converted to 8-bit grey and thresholded at ``> 127`` (DAVIS 2016 stores {0, 255}), except that a
sequence whose masks only hold values {0, 1} is read as a 0/1 label image. Grey masks holding other
values (soft or anti-aliased edges) are thresholded the same way, with one warning per sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vosgan.backend import warn_once

#: file suffixes read as frames or masks (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True, repr=False)
class Sequence:
    """One frame-folder video: ``frames[i]`` pairs with ``masks[i]`` (same stem) when present."""

    name: str
    frames: list[Path]
    masks: list[Path] | None

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        masks = "none" if self.masks is None else len(self.masks)
        folder = self.frames[0].parent if self.frames else "?"
        return f"Sequence({self.name!r}, {len(self.frames)} frames in {folder}, masks: {masks})"


def _natural_key(path: Path) -> list[int | str]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.stem)]


def _images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, naturally sorted."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def _pair(name: str, frame_dir: Path, mask_dir: Path | None) -> Sequence:
    """A sequence from a frame folder and an optional mask folder, checking the pairing."""
    frames = _images(frame_dir)
    if not frames:
        raise ValueError(f"sequence {name!r}: no image files in {frame_dir}")
    if mask_dir is None or not mask_dir.is_dir():
        return Sequence(name, frames, None)
    by_stem = {p.stem: p for p in _images(mask_dir)}
    missing = [f.name for f in frames if f.stem not in by_stem]
    if missing:
        raise ValueError(
            f"sequence {name!r}: {len(frames)} frames in {frame_dir} but {len(by_stem)} masks in "
            f"{mask_dir}; no mask for {len(missing)} frame(s), first {missing[0]!r} "
            "(every frame needs a mask with the same stem, or remove the mask folder)"
        )
    return Sequence(name, frames, [by_stem[f.stem] for f in frames])


def _davis_resolution(root: Path) -> Path | None:
    images = root / "JPEGImages"
    if not images.is_dir():
        return None
    if (images / "480p").is_dir():
        return images / "480p"
    subdirs = sorted(p for p in images.iterdir() if p.is_dir())
    if len(subdirs) == 1 and any(p.is_dir() for p in subdirs[0].iterdir()):
        return subdirs[0]
    if subdirs and all(_images(p) for p in subdirs):  # JPEGImages/<seq>/ (no resolution level)
        return images
    raise ValueError(
        f"{images}: expected a 480p folder or exactly one resolution folder, found "
        f"{[p.name for p in subdirs]}"
    )


def find_sequences(root: str | Path) -> list[Sequence]:
    """Every frame-folder sequence under ``root`` (layouts in the module docstring), by name.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no recognisable sequence, or a sequence's frames and masks
            do not pair up (the message names the folder).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"frame folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (expected a folder of frame sequences)")
    res = _davis_resolution(root)
    if res is not None:
        annotations = root / "Annotations" / res.relative_to(root / "JPEGImages")
        seqs = [_pair(d.name, d, annotations / d.name) for d in sorted(res.iterdir()) if d.is_dir()]
    elif (root / "frames").is_dir():
        seqs = [_pair(root.name, root / "frames", root / "masks")]
    else:
        seqs = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            if (d / "frames").is_dir():
                seqs.append(_pair(d.name, d / "frames", d / "masks"))
            elif _images(d):
                seqs.append(Sequence(d.name, _images(d), None))
        if not seqs and _images(root):
            seqs = [Sequence(root.name, _images(root), None)]
    if not seqs:
        raise ValueError(
            f"no frame sequences found in {root}: expected JPEGImages/480p/<seq>/*.jpg (DAVIS), "
            "<seq>/frames/*.jpg (+ <seq>/masks/*.png), or <seq>/*.jpg"
        )
    return sorted(seqs, key=lambda s: s.name)


def _target_size(w: int, h: int, size: int) -> tuple[int, int]:
    """``(W, H)`` with the short side resized to ``size``, aspect ratio kept (rounded)."""
    if w <= h:
        return size, max(1, round(h * size / w))
    return max(1, round(w * size / h)), size


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int (short side, pixels) or None, got {size!r}")


def _indices(seq: Sequence, indices: list[int] | None) -> list[int]:
    idx = list(range(len(seq.frames))) if indices is None else [int(i) for i in indices]
    for i in idx:
        if not 0 <= i < len(seq.frames):
            raise IndexError(f"frame index {i} out of range for {seq.name!r} ({len(seq)} frames)")
    return idx


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        if img.format != "JPEG":  # JPEGs are decoded later, after draft() picks a DCT scale
            img.load()
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"frame file {path} is missing") from None
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def load_frames(
    seq: Sequence, size: int | None = None, indices: list[int] | None = None
) -> np.ndarray:
    """Frames of ``seq`` as uint8 ``(N, H, W, 3)`` RGB.

    Args:
        seq: from :func:`find_sequences`.
        size: resize so the short side is ``size`` pixels (aspect kept; bilinear with antialias);
            ``None`` keeps the stored size. JPEGs are decoded at a reduced DCT scale first when
            that is still >= the target (PIL ``draft``): 854x480 -> 64 short side decodes ~4x
            faster.
        indices: frame numbers to load (default: all), in the order given.

    Raises:
        FileNotFoundError: a frame file is missing; ValueError: unreadable file or frames of
        different sizes (the message names the file).
    """
    _check_size(size)
    out: np.ndarray | None = None
    first: tuple[int, int] | None = None
    idx = _indices(seq, indices)
    for k, i in enumerate(idx):
        path = seq.frames[i]
        img = _open(path)
        if first is None:
            first = img.size
        elif img.size != first:
            raise ValueError(
                f"sequence {seq.name!r}: frame {path} is {img.size[0]}x{img.size[1]} but "
                f"{seq.frames[idx[0]].name} is {first[0]}x{first[1]}"
            )
        target = first if size is None else _target_size(*first, size)
        if img.format == "JPEG" and size is not None:
            img.draft("RGB", target)  # DCT-domain downscale to >= target (no-op if not smaller)
        img = img.convert("RGB")
        if img.size != target:
            img = img.resize(target, Image.BILINEAR, reducing_gap=None)
        if out is None:
            out = np.empty((len(idx), target[1], target[0], 3), np.uint8)
        out[k] = np.asarray(img)
    assert out is not None
    return out


def _mask_array(path: Path) -> np.ndarray:
    img = _open(path)
    if img.mode == "P":
        return (np.asarray(img) != 0).astype(np.uint8) * 255  # palette index = object id
    if img.mode not in ("L", "1"):
        img = img.convert("L")  # RGB(A) and 16-bit masks: luminance
    return np.asarray(img.convert("L"))


def load_masks(
    seq: Sequence, size: int | None = None, indices: list[int] | None = None
) -> np.ndarray:
    """Foreground masks of ``seq`` as bool ``(N, H, W)`` (value rules in the module docstring).

    Args:
        size: short side in pixels (nearest-neighbour resize, the same ``(W, H)`` as
            :func:`load_frames`); ``None`` keeps the stored size.
        indices: frame numbers to load (default: all).

    Raises:
        ValueError: ``seq`` has no masks, or a mask's size differs from its frame's.
    """
    _check_size(size)
    if seq.masks is None:
        raise ValueError(f"sequence {seq.name!r} has no masks")
    idx = _indices(seq, indices)
    with Image.open(seq.frames[idx[0]]) as f0:
        frame_size = f0.size
    raw = []
    for i in idx:
        m = _mask_array(seq.masks[i])
        if (m.shape[1], m.shape[0]) != frame_size:
            raise ValueError(
                f"sequence {seq.name!r}: mask {seq.masks[i]} is {m.shape[1]}x{m.shape[0]} but "
                f"frame {seq.frames[i].name} is {frame_size[0]}x{frame_size[1]}"
            )
        raw.append(m)
    stack = np.stack(raw)
    peak = int(stack.max())
    if peak <= 1:
        fg = stack > 0  # a 0/1 label image
    else:
        soft = np.count_nonzero((stack != 0) & (stack != peak))
        if soft:
            warn_once(
                f"soft-mask:{seq.name}",
                f"sequence {seq.name!r}: {soft} mask pixels are neither 0 nor {peak}; "
                "thresholded at > 127",
            )
        fg = stack > 127
    if size is None:
        return fg
    target = _target_size(*frame_size, size)
    out = np.empty((len(idx), target[1], target[0]), bool)
    for k, m in enumerate(fg):
        out[k] = np.asarray(Image.fromarray(m).resize(target, Image.NEAREST))
    return out
