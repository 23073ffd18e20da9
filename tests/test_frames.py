"""Frame-folder sequences: layouts, pairing, mask rules, resizing, errors (vosgan.data.frames)."""

from __future__ import annotations

import os
import re
import shutil
import warnings
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
    soft[5:15, 5:25] = 255
    soft[4, 5:25] = np.linspace(10, 250, 20)  # an anti-aliased edge: 20 grey levels
    Image.fromarray(soft).save(seq / "masks" / "00001.png")
    with pytest.warns(UserWarning, match=r"00001.png, 20 pixels are neither 0 nor 255, .* > 127"):
        m = load_masks(find_sequences(seq)[0])
    np.testing.assert_array_equal(m[1], soft > 127)
    assert m[0].sum() == 100  # the sequence's other (0/255) mask: a label image


def _box_masks(tmp_path: Path, name: str, mask: np.ndarray | Image.Image) -> np.ndarray:
    """``load_masks`` of a 2-frame sequence whose masks are both ``mask``."""
    seq = write_sequence(tmp_path / name, 2)
    for i in range(2):
        img = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
        img.save(seq / "masks" / f"{i:05d}.png")
    return load_masks(find_sequences(seq)[0])


def test_every_mask_format_keeps_its_foreground(tmp_path: Path) -> None:
    """Colour, alpha, grey ids of any value, 16-bit and 1-bit masks: foreground is what is not 0
    (before, colour masks and grey values <= 127 came out empty)."""
    box = np.zeros((30, 40), bool)
    box[5:15, 5:20] = True
    ones = box.astype(np.uint8)
    black = np.zeros((30, 40, 3), np.uint8)
    ids = ones * 38  # two objects, a DAVIS 2017 palette converted to grey: 38 and 75
    ids[5:15, 12:20] = 75
    variants = {
        "grey_id_100": ones * 100,
        "grey_ids_38_75": ids,
        "davis17_red_rgb": np.dstack([ones * 128, ones * 0, ones * 0]),
        "green_rgba": np.dstack([ones * 0, ones * 128, ones * 0, np.full((30, 40), 255, np.uint8)]),
        "alpha_only_rgba": np.dstack([black, ones * 255]),
        "white_alpha_rgba": np.dstack([black + 255, ones * 200]),
        "grey_alpha_la": Image.fromarray(np.dstack([ones * 90, ones * 0 + 255]), "LA"),
        "uint16_65535": box.astype(np.uint16) * 65535,
        "uint16_300": box.astype(np.uint16) * 300,
        "one_bit": Image.fromarray(box).convert("1"),
    }
    for name, mask in variants.items():
        if name == "grey_ids_38_75":
            with pytest.warns(UserWarning, match="70 pixels are neither 0 nor 75: read as more"):
                m = _box_masks(tmp_path, name, mask)
        else:
            m = _box_masks(tmp_path, name, mask)
        assert m.shape == (2, 30, 40), name
        np.testing.assert_array_equal(m[0], box, err_msg=name)


def test_a_mask_without_background_warns(tmp_path: Path) -> None:
    grey = np.full((30, 40), 30, np.uint8)  # background 30, not 0: everything is foreground
    grey[5:15, 5:20] = 255
    with pytest.warns(UserWarning) as rec:
        assert _box_masks(tmp_path, "bg30", grey).all()
    assert any(
        re.search(r"every pixel foreground .* \(30 to 255\); background", str(w.message))
        for w in rec
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one value everywhere: a full mask, said by no warning
        assert _box_masks(tmp_path, "full", np.full((30, 40), 255, np.uint8)).all()


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        find_sequences(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame sequences found in .*empty"):
        find_sequences(tmp_path / "empty")
    seq = write_sequence(tmp_path / "count", 4)
    os.remove(seq / "masks" / "00002.png")
    with pytest.raises(ValueError, match=r"4 frames .* 3 masks .*00002\.jpg"):
        find_sequences(seq)  # evaluation: every frame needs its mask
    with pytest.warns(UserWarning, match=r"00002\.jpg': the sequence is used without masks"):
        (counted,) = find_sequences(seq, incomplete_masks="warn")  # datasets, prepare
    assert counted.masks is None and len(counted) == 4
    with pytest.raises(ValueError, match="incomplete_masks must be 'error' or 'warn'"):
        find_sequences(seq, incomplete_masks="skip")
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
