"""Frame-folder sequences: layouts, pairing, mask rules, resizing, errors (vosgan.data.frames)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image
from video_fixtures import pattern, write_sequence

from vosgan.data.frames import Sequence, find_sequences, load_frames, load_masks

DAVIS = Path(SHARED_DATA) / "davis2016"
needs_davis = pytest.mark.skipif(not DAVIS.is_dir(), reason=f"shared DAVIS data absent ({DAVIS})")


@needs_davis
def test_shared_davis_sequences() -> None:
    seqs = find_sequences(DAVIS)
    names = [s.name for s in seqs]
    assert names == sorted(names) and len(names) == 11 and "car-shadow" in names
    assert all(s.masks is not None and len(s.masks) == len(s.frames) for s in seqs)
    seq = next(s for s in seqs if s.name == "car-shadow")
    assert len(seq) == 40
    idx = [0, 17, 39]
    full = load_frames(seq, indices=idx)
    assert full.shape == (3, 480, 854, 3) and full.dtype == np.uint8
    small = load_frames(seq, 32, indices=idx)
    assert small.shape == (3, 32, 57, 3)
    ref = np.stack([np.asarray(Image.fromarray(f).resize((57, 32), Image.BILINEAR)) for f in full])
    # DCT-domain draft decode + resize vs full decode + resize: same picture, small differences
    assert np.abs(small.astype(int) - ref).mean() < 4
    m = load_masks(seq, indices=idx)
    assert m.shape == (3, 480, 854) and m.dtype == bool
    assert 0.01 < m.mean() < 0.6  # one car, DAVIS 2016 binary masks
    raw = np.asarray(Image.open(seq.masks[17])) > 127
    np.testing.assert_array_equal(m[1], raw)
    small_m = load_masks(seq, 32, idx)
    assert small_m.shape == (3, 32, 57)
    # the resized mask of frame 17 is that frame's mask: an independent nearest resize of the PNG
    ref_m = np.asarray(Image.fromarray(raw).resize((57, 32), Image.NEAREST))
    np.testing.assert_array_equal(small_m[1], ref_m)
    assert not np.array_equal(small_m[0], small_m[1])  # the car moves between frames 0 and 17


@needs_davis
def test_shared_single_sequence_folder() -> None:
    (seq,) = find_sequences(DAVIS / "dog")
    assert seq.name == "dog" and len(seq) == 60 and seq.masks is not None


def test_davis_layout_with_palette_masks(tmp_path: Path) -> None:
    for name in ("b-seq", "a-seq"):
        write_sequence(
            tmp_path,
            4,
            frame_dir=f"JPEGImages/480p/{name}",
            mask_dir=f"Annotations/480p/{name}",
            mode="P",
        )
    seqs = find_sequences(tmp_path)
    assert [s.name for s in seqs] == ["a-seq", "b-seq"]
    m = load_masks(seqs[0])
    # palette index = object id: objects 1 and 2 are both foreground
    assert m.shape == (4, 30, 40) and m[0, 5:15, 2:12].all() and m[0, 20:25, 20:30].all()
    assert m[0].sum() == 10 * 10 + 5 * 10


def test_simple_generic_and_natural_order(tmp_path: Path) -> None:
    write_sequence(tmp_path / "simple" / "s1", 3)
    write_sequence(tmp_path / "simple" / "s2", 3, masks=False)
    seqs = find_sequences(tmp_path / "simple")
    assert [s.masks is None for s in seqs] == [False, True]
    gen = tmp_path / "generic" / "clip"
    gen.mkdir(parents=True)
    for i in (10, 2, 1):
        Image.fromarray(pattern(i, 16, 12)).save(gen / f"{i}.png")
    (seq,) = find_sequences(tmp_path / "generic")
    assert [p.name for p in seq.frames] == ["1.png", "2.png", "10.png"] and seq.masks is None
    np.testing.assert_array_equal(load_frames(seq)[2], pattern(10, 16, 12))  # PNG: lossless
    (flat,) = find_sequences(gen)  # images directly in the folder: one sequence
    assert flat.name == "clip" and len(flat) == 3


def test_label_and_soft_masks(tmp_path: Path) -> None:
    write_sequence(tmp_path / "labels", 3, mode="01")
    m = load_masks(find_sequences(tmp_path / "labels")[0])
    assert m[0, 5:15, 2:12].all() and m.sum() == 3 * 100  # {0, 1}: a label image
    seq = write_sequence(tmp_path / "soft", 2)
    soft = np.zeros((30, 40), np.uint8)
    soft[0, :4] = (100, 128, 200, 255)
    Image.fromarray(soft).save(seq / "masks" / "00001.png")
    with pytest.warns(UserWarning, match="neither 0 nor 255"):
        m = load_masks(find_sequences(seq)[0])
    assert m[1, 0, :4].tolist() == [False, True, True, True]


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        find_sequences(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame sequences found in .*empty"):
        find_sequences(tmp_path / "empty")
    seq = write_sequence(tmp_path / "count", 4)
    os.remove(seq / "masks" / "00002.png")
    with pytest.raises(ValueError, match=r"4 frames .* 3 masks .*00002\.jpg"):
        find_sequences(seq)
    seq = write_sequence(tmp_path / "msize", 2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(seq / "masks" / "00001.png")
    with pytest.raises(ValueError, match=r"mask .*00001\.png is 10x10 but frame .* 40x30"):
        load_masks(find_sequences(seq)[0])
    seq = write_sequence(tmp_path / "fsize", 2, masks=False)
    Image.fromarray(pattern(1, 20, 20)).save(seq / "frames" / "00001.jpg")
    with pytest.raises(ValueError, match=r"00001\.jpg is 20x20"):
        load_frames(find_sequences(seq)[0])
    seq = write_sequence(tmp_path / "gone", 2, masks=False)
    (s,) = find_sequences(seq)
    os.remove(s.frames[1])
    with pytest.raises(FileNotFoundError, match=r"00001\.jpg is missing"):
        load_frames(s)
    (s.frames[1]).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*00001\.jpg"):
        load_frames(s)
    with pytest.raises(ValueError, match="has no masks"):
        load_masks(s)
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_frames(s, size=0)
    with pytest.raises(IndexError, match="frame index 5 out of range"):
        load_frames(s, indices=[5])
    shutil.rmtree(seq / "frames")
    with pytest.raises(ValueError, match="no frame sequences"):
        find_sequences(seq)


def test_sequence_repr_is_short(tmp_path: Path) -> None:
    (s,) = find_sequences(write_sequence(tmp_path / "r", 3))
    assert isinstance(s, Sequence) and repr(s).startswith("Sequence('r', 3 frames")
