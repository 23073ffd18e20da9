"""Frame-folder video: DAVIS layouts and generic folders of numbered images.

Layouts :func:`find_sequences` recognises under ``root`` (checked in this order):

1. DAVIS: ``root/JPEGImages/<res>/<seq>/*.jpg`` with masks in ``root/Annotations/<res>/<seq>/*.png``
   (``<res>`` is ``480p`` when present, else the only resolution folder);
2. simple: ``root/<seq>/frames/*.jpg`` with optional ``root/<seq>/masks/*.png`` (the layout of
   ``shared/data/davis2016``), or ``root/frames`` + ``root/masks`` for a single sequence;
3. generic: ``root/<seq>/*.{jpg,png,...}``, or images directly in ``root`` (one sequence, no masks).

Frames are ordered by a natural sort of their file stems (``2.jpg`` before ``10.jpg``). Masks are
paired with frames by stem. A sequence whose mask folder lacks a mask for some frame (DAVIS 2017
test-dev gives the first frame's only) is an error where masks are needed (evaluation); the
datasets and ``prepare`` use it without masks, with one warning naming it.

Mask values (:func:`load_masks`), one value per pixel first: the palette index of palette images
(PIL mode ``P``, the DAVIS 2017 instance format), the largest colour channel of RGB(A) images (or
the alpha channel where the colour is the same everywhere), the grey level of the others (1, 8, 16
or 32 bits). Foreground is a value ``> 0`` (the union of all objects; DAVIS 2016 stores {0, 255}),
except in a grey or colour mask file holding more than :data:`SOFT_LEVELS` distinct non-zero
values, as anti-aliased edges and JPEG-compressed masks do: such a soft mask is thresholded at half
its largest value. Values other than 0 and the largest are said once per sequence, with how they
were read (further objects, or soft). A mask that makes every pixel foreground although its
values differ (a non-zero background?) is warned about once per sequence.
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
#: most distinct non-zero values of a label mask (object ids); more make a soft mask
SOFT_LEVELS = 16


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


def _pair(name: str, frame_dir: Path, mask_dir: Path | None, incomplete: str) -> Sequence:
    """A sequence from a frame folder and an optional mask folder, checking the pairing (a
    frame without a mask: an error, or with ``incomplete="warn"`` a sequence without masks)."""
    frames = _images(frame_dir)
    if not frames:
        raise ValueError(f"sequence {name!r}: no image files in {frame_dir}")
    if mask_dir is None or not mask_dir.is_dir():
        return Sequence(name, frames, None)
    by_stem = {p.stem: p for p in _images(mask_dir)}
    missing = [f.name for f in frames if f.stem not in by_stem]
    if missing:
        what = (
            f"sequence {name!r}: {len(frames)} frames in {frame_dir} but {len(by_stem)} masks in "
            f"{mask_dir}; no mask for {len(missing)} frame(s), first {missing[0]!r}"
        )
        if incomplete == "error":
            raise ValueError(
                f"{what} (every frame needs a mask with the same stem, or remove the mask folder)"
            )
        warn_once(f"incomplete-masks:{mask_dir}", f"{what}: the sequence is used without masks")
        return Sequence(name, frames, None)
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


def find_sequences(root: str | Path, incomplete_masks: str = "error") -> list[Sequence]:
    """Every frame-folder sequence under ``root`` (layouts in the module docstring), by name.

    Args:
        incomplete_masks: a sequence whose mask folder lacks a mask for some frame: ``"error"``
            (evaluation, which needs every mask), or ``"warn"``: one warning naming it, and the
            sequence without masks (the datasets and ``prepare``, which train on frames).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no recognisable sequence, or (``incomplete_masks="error"``) a
            sequence's frames and masks do not pair up (the message names the folder).
    """
    if incomplete_masks not in ("error", "warn"):
        raise ValueError(f"incomplete_masks must be 'error' or 'warn', got {incomplete_masks!r}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"frame folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (expected a folder of frame sequences)")
    res = _davis_resolution(root)
    if res is not None:
        annotations = root / "Annotations" / res.relative_to(root / "JPEGImages")
        seqs = [
            _pair(d.name, d, annotations / d.name, incomplete_masks)
            for d in sorted(res.iterdir())
            if d.is_dir()
        ]
    elif (root / "frames").is_dir():
        seqs = [_pair(root.name, root / "frames", root / "masks", incomplete_masks)]
    else:
        seqs = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            if (d / "frames").is_dir():
                seqs.append(_pair(d.name, d / "frames", d / "masks", incomplete_masks))
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


def _mask_values(path: Path) -> tuple[np.ndarray, bool]:
    """One value per pixel of mask ``path`` (2-D integers; rules in the module docstring), and
    whether they may be soft (not palette indices or 1-bit)."""
    img = _open(path)
    if img.mode in ("P", "1"):
        return np.asarray(img.convert("L") if img.mode == "1" else img), False
    if img.mode in ("L", "I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img)
        return (values.astype(np.int64) if img.mode in ("I", "F") else values), True
    colour = np.asarray(img.convert("RGBA" if "A" in img.getbands() else "RGB"))
    values = colour[..., :3].max(axis=2)
    if colour.shape[2] == 4 and values.min() == values.max():  # one colour: the alpha draws
        values = colour[..., 3]
    return values, True


def _foreground(values: np.ndarray, may_be_soft: bool) -> tuple[np.ndarray, str]:
    """Bool foreground of one mask's values (module docstring), and what is to be said of values
    other than 0 and the largest (how they were read), if any."""
    if not may_be_soft:
        return values > 0, ""
    if values.dtype == np.uint8:  # a 480p DAVIS mask: bincount 0.47 ms, np.unique 1.0 ms
        counts = np.bincount(values.ravel(), minlength=256)
        levels = np.flatnonzero(counts)
        peak = int(levels[-1])
        between = int(counts.sum() - counts[0] - (counts[peak] if peak else 0))
    else:
        levels, counts = np.unique(values, return_counts=True)
        peak = int(levels[-1])
        between = int(counts[(levels != 0) & (levels != peak)].sum())
    if not between:  # 0 and one other value: the usual label mask
        return values > 0, ""
    what = f"{between} pixels are neither 0 nor {peak}"
    if np.count_nonzero(levels) <= SOFT_LEVELS:
        return values > 0, f"{what}: read as more objects (foreground > 0)" if between else ""
    return values > peak // 2, (
        f"{what}, in more than {SOFT_LEVELS} values (soft edges or JPEG noise?): "
        f"thresholded at > {peak // 2}"
    )


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
    fg = np.empty((len(idx), frame_size[1], frame_size[0]), bool)
    for k, i in enumerate(idx):
        values, may_be_soft = _mask_values(seq.masks[i])
        if (values.shape[1], values.shape[0]) != frame_size:
            raise ValueError(
                f"sequence {seq.name!r}: mask {seq.masks[i]} is {values.shape[1]}x"
                f"{values.shape[0]} but frame {seq.frames[i].name} is "
                f"{frame_size[0]}x{frame_size[1]}"
            )
        fg[k], note = _foreground(values, may_be_soft)
        if note:
            warn_once(
                f"mask-values:{seq.name}", f"sequence {seq.name!r}: in mask {seq.masks[i]}, {note}"
            )
        if fg[k].all() and values.min() != values.max():
            warn_once(
                f"full-mask:{seq.name}",
                f"sequence {seq.name!r}: mask {seq.masks[i].name} makes every pixel foreground "
                f"though its values differ ({int(values.min())} to {int(values.max())}); "
                "background must be 0",
            )
    if size is None:
        return fg
    target = _target_size(*frame_size, size)
    out = np.empty((len(idx), target[1], target[0]), bool)
    for k, m in enumerate(fg):
        out[k] = np.asarray(Image.fromarray(m).resize(target, Image.NEAREST))
    return out
