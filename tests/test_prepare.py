"""Clip cache: prepare -> read round trip, resume after an interruption, checksum, CLI errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from video_fixtures import frame_ids, write_sequence, write_video

from vosgan import config
from vosgan.data import prepare as prep
from vosgan.data.build import make_dataset
from vosgan.data.cache import CacheSource, CacheWriter, read_index
from vosgan.data.decode import PyAVDecoder

DAVIS = Path(SHARED_DATA) / "davis2016"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("src")
    for cls, codec, n in (("Walk", "h264", 14), ("Walk", "vp9", 12), ("Run", "h264", 10)):
        (d / cls).mkdir(exist_ok=True)
        write_video(d / cls / f"v_{cls}_{codec}", codec, n, w=48, h=32)
    (d / "Run" / "v_Run_broken.mp4").write_bytes(b"\x00" * 512)
    (d / "classInd.txt").write_text("1 Run\n2 Walk\n")
    (d / "trainlist01.txt").write_text("Walk/v_Walk_h264.mp4 2\nRun/v_Run_h264.mp4 1\n")
    (d / "testlist01.txt").write_text("Walk/v_Walk_vp9.webm\n")
    return d


def _cfg(source: Path, size: int = 16, **data: object) -> config.Config:
    over = {"data.source": str(source), "model.size": size, "model.frames": 16}
    return config.load("cpu-small", {**over, **{f"data.{k}": v for k, v in data.items()}})


def test_round_trip_equals_decode(src: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="skipping Run/v_Run_broken.mp4"):
        index = prep.prepare(src, tmp_path / "c", size=16, progress=False)
    assert [v["name"] for v in index["videos"]] == [
        "Run/v_Run_h264.mp4",
        "Walk/v_Walk_h264.mp4",
        "Walk/v_Walk_vp9.webm",
    ]
    assert [v["label"] for v in index["videos"]] == [0, 1, 1]
    assert index["skipped"][0][0] == "Run/v_Run_broken.mp4" and not index["has_masks"]
    cache = CacheSource(tmp_path / "c")
    for k, v in enumerate(index["videos"]):
        assert (v["length"], v["height"], v["width"]) == (
            {"Run": 10}.get(v["name"][:3], 14 if "h264" in v["name"] else 12),
            16,
            24,
        )
        got, _ = PyAVDecoder.decode(src / v["name"], lambda i: True, size=16)
        ref = np.stack([got[i] for i in sorted(got)])
        ((frames, masks),) = cache.read([(k, [3, 0, 3])], 16)
        np.testing.assert_array_equal(frames, ref[[3, 0, 3]])  # bytes in == bytes out
        assert masks is None
    # training from the cache needs no decoder; the same clips as from the videos
    cached = make_dataset(_cfg(tmp_path / "c", decoder="cache"), "train", 6)
    direct = make_dataset(_cfg(src, decoder="pyav"), "train", 6)
    a, b = cached.batch(range(6)), direct.batch(range(6))
    assert torch.equal(a["label"], b["label"]) and a["label"].tolist() == [0, 1] * 3
    assert torch.equal(a["video"], b["video"])  # PyAV converts at the cache's size, as prepare
    ids = [frame_ids(v) for v in cached.arrays(range(6))["video"]]
    assert ids == [frame_ids(v) for v in direct.arrays(range(6))["video"]]
    val = make_dataset(_cfg(tmp_path / "c"), "val", 2)  # testlist01.txt copied into the cache
    assert [it.name for it in val.items] == ["Walk/v_Walk_vp9.webm"]


def test_frame_folders_with_masks(tmp_path: Path) -> None:
    write_sequence(tmp_path / "seqs" / "a", 5, w=40, h=30)
    write_sequence(tmp_path / "seqs" / "b", 4, w=30, h=40)
    index = prep.prepare(tmp_path / "seqs", tmp_path / "c", size=16, progress=False)
    assert index["has_masks"] and [v["length"] for v in index["videos"]] == [5, 4]
    ds = make_dataset(_cfg(tmp_path / "c"), "train", 4)
    ref = make_dataset(_cfg(tmp_path / "seqs"), "train", 4)
    a, b = ds.batch(range(4)), ref.batch(range(4))
    assert a["mask"].shape == (4, 1, 16, 16, 16)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["video"], b["video"])


@pytest.mark.skipif(not DAVIS.is_dir(), reason=f"shared DAVIS data absent ({DAVIS})")
def test_shared_davis_sequence_cache(tmp_path: Path) -> None:
    shutil.copytree(DAVIS / "car-shadow", tmp_path / "src" / "car-shadow")
    prep.prepare(tmp_path / "src", tmp_path / "c", size=32, progress=False)
    b = make_dataset(_cfg(tmp_path / "c", size=32), "train", 2).batch([0, 1])
    assert b["video"].shape == (2, 3, 16, 32, 32) and 0.02 < b["mask"].mean() < 0.6
    # the cached mask of frame 17 against an independent nearest resize of its PNG (854x480)
    ((_, masks),) = CacheSource(tmp_path / "c").read([(0, [0, 17])], 32)
    raw = np.asarray(Image.open(DAVIS / "car-shadow" / "masks" / "00017.png")) > 127
    ref = np.asarray(Image.fromarray(raw).resize((57, 32), Image.NEAREST))
    np.testing.assert_array_equal(masks[1], ref)
    assert not np.array_equal(masks[0], masks[1])  # the car moves between frames 0 and 17


def _interrupted(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A prepare of ``src`` into ``out`` interrupted at its third decode; the decodes begun."""
    calls = {"n": 0}
    real = prep.decode_source

    def flaky(entry: dict, size: int) -> tuple:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(entry, size)

    with monkeypatch.context() as m:
        m.setattr(prep, "decode_source", flaky)
        with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
            prep.prepare(src, out, size=16, progress=False)
    return calls["n"]


def test_resume_after_interruption(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.warns(UserWarning):
        prep.prepare(src, tmp_path / "fresh", size=16, progress=False)
    out = tmp_path / "c"
    decodes = _interrupted(src, out, monkeypatch)
    with pytest.raises(ValueError, match="incomplete .* to resume"):
        read_index(out)
    with open(out / "shard_00000.bin", "ab") as f:  # half-written bytes of the next video
        f.write(b"\xff" * 1000)
    with open(out / "progress.jsonl", "a") as f:  # and a line cut mid-way
        f.write('{"name": "Walk/v_Wa')
    index = prep.prepare(src, out, size=16, progress=False)
    # the third decode raised; the videos decoded beside it (one per thread) were not written
    assert 3 <= decodes <= 2 + torch.get_num_threads()
    assert len(index["videos"]) == 3 and not (out / "progress.jsonl").exists()
    assert (out / "shard_00000.bin").read_bytes() == (
        tmp_path / "fresh" / "shard_00000.bin"
    ).read_bytes()
    fresh = json.loads((tmp_path / "fresh" / "index.json").read_text())
    assert index["videos"] == fresh["videos"] and index["skipped"] == fresh["skipped"]


def test_checksum_guards_and_cli(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    with pytest.warns(UserWarning):
        assert prep.main([str(src), "--out", str(out), "--size", "16", "--shard-mb", "1"]) == 0
    assert prep.main([str(src), "--out", str(out), "--size", "16"]) == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(ValueError, match="another source list or settings .* --force"):
        prep.prepare(src, out, size=24, progress=False)
    with pytest.warns(UserWarning):
        assert prep.prepare(src, out, size=24, force=True, progress=False)["size"] == 24
    assert prep.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err
    assert prep.main([str(out), "--out", str(tmp_path / "y")]) == 2
    assert "already a prepared cache" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--size must be >= 8"):
        prep.prepare(src, tmp_path / "z", size=4)


def test_shards_roll_over_and_read_back(tmp_path: Path) -> None:
    # a new shard starts once the current one holds >= shard_bytes: 720-byte videos, 1000-byte
    # shards -> two videos per shard; every video reads back byte for byte from its own shard
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (3, 8, 10, 3), np.uint8) for _ in range(5)]
    masks = [rng.random((3, 8, 10)) > 0.5 for _ in range(5)]
    header = {"size": 8, "source": "test", "source_checksum": "x"}
    writer = CacheWriter(tmp_path / "c", header, shard_bytes=1000)
    for k, (v, m) in enumerate(zip(videos, masks, strict=True)):
        writer.add(f"v{k}", v, m, 0.0, k % 2)
    index = writer.finish()
    assert [v["shard"] for v in index["videos"]] == [0, 0, 1, 1, 2]
    assert sorted(p.name for p in (tmp_path / "c").glob("*.bin")) == [
        f"{kind}_{k:05d}.bin" for kind in ("mask", "shard") for k in range(3)
    ]
    cache = CacheSource(tmp_path / "c")
    got = cache.read([(k, [2, 0, 1]) for k in (4, 1, 2, 0, 3)], 8)
    for k, (frames, m) in zip((4, 1, 2, 0, 3), got, strict=True):
        np.testing.assert_array_equal(frames, videos[k][[2, 0, 1]])
        np.testing.assert_array_equal(m, masks[k][[2, 0, 1]])
    assert [it.label for it in cache.items] == [0, 1, 0, 1, 0]


def test_cache_in_loader_workers_matches_main_process(src: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        prep.prepare(src, tmp_path / "c", size=16, progress=False)
    ds = make_dataset(_cfg(tmp_path / "c", crop="random", flip=True), "train", 12)

    class Steps(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, step: int) -> dict:
            return ds.batch(range(4 * step, 4 * step + 4))

    loader = torch.utils.data.DataLoader(Steps(), batch_size=None, num_workers=2)
    for step, got in enumerate(loader):  # seeded clips: workers and main process agree
        want = ds.batch(range(4 * step, 4 * step + 4))
        assert torch.equal(got["video"], want["video"]) and torch.equal(got["label"], want["label"])


def test_damaged_cache_errors_name_the_file(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt index.json or a truncated shard: prepare and the readers (train --data CACHE)
    name the file and what is wrong; prepare --force rebuilds."""
    out = tmp_path / "c"
    with pytest.warns(UserWarning):
        prep.prepare(src, out, size=16, progress=False)
    good = (out / "index.json").read_text()
    shard = out / "shard_00000.bin"
    whole = shard.read_bytes()

    def cli_error() -> str:
        assert prep.main([str(src), "--out", str(out), "--size", "16"]) == 2
        return capsys.readouterr().err

    (out / "index.json").write_text("{bad json")
    for read in (read_index, CacheSource, lambda root: make_dataset(_cfg(root), "train", 4)):
        with pytest.raises(ValueError, match=r"c/index.json is unreadable \(Expecting property"):
            read(out)
    assert re.search(r"c/index.json is unreadable .*; pass --force", cli_error())

    (out / "index.json").write_text(good)
    shard.write_bytes(whole[:1000])
    message = rf"c/shard_00000.bin holds 1000 bytes, fewer than the {len(whole)} its videos need"
    for read in (read_index, CacheSource, lambda root: make_dataset(_cfg(root), "train", 4)):
        with pytest.raises(ValueError, match=message):
            read(out)
    assert re.search(message, cli_error())  # not "already complete"
    shard.unlink()
    assert re.search(r"c/shard_00000.bin is missing", cli_error())

    with pytest.warns(UserWarning):
        assert prep.main([str(src), "--out", str(out), "--size", "16", "--force"]) == 0
    assert shard.read_bytes() == whole and len(read_index(out)["videos"]) == 3


def test_cli_leaves_no_output_on_bad_out_or_no_usable_video(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 512)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        prep.main([str(garbage), "--out", str(tmp_path / "afile")])
    assert exc.value.code == 2
    assert "argument --out: " in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipping garbage.mp4"):
        assert prep.main([str(garbage), "--out", str(tmp_path / "new" / "c")]) == 2
    assert "no usable video (all 1 skipped); no cache written" in capsys.readouterr().err
    assert not (tmp_path / "new" / "c").exists()  # created by this run: removed
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="skipping garbage.mp4"):
        assert prep.main([str(garbage), "--out", str(tmp_path / "empty")]) == 2
    assert list((tmp_path / "empty").iterdir()) == []  # there before: kept, but left empty


def test_threads_write_the_same_cache(src: Path, tmp_path: Path) -> None:
    """Videos decoded on two threads are written in source order: the same bytes and index."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with pytest.warns(UserWarning, match="skipping Run/v_Run_broken.mp4"):
                prep.prepare(src, tmp_path / str(threads), size=16, progress=False)
    finally:
        torch.set_num_threads(before)
    one, two = (json.loads((tmp_path / t / "index.json").read_text()) for t in ("1", "2"))
    assert one["videos"] == two["videos"] and one["skipped"] == two["skipped"]
    for shard in sorted((tmp_path / "1").glob("*.bin")):
        assert shard.read_bytes() == (tmp_path / "2" / shard.name).read_bytes()


def test_force_starts_over_an_interrupted_cache_with_a_damaged_shard(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The resume refuses a shard shorter than its recorded videos and says --force; --force
    then discards it and starts afresh (before, it failed the same way)."""
    with pytest.warns(UserWarning):
        fresh = prep.prepare(src, tmp_path / "fresh", size=16, progress=False)
    out = tmp_path / "c"
    _interrupted(src, out, monkeypatch)
    with open(out / "shard_00000.bin", "r+b") as f:
        f.truncate(10)
    args = [str(src), "--out", str(out), "--size", "16"]
    assert prep.main(args) == 2
    assert "shard_00000.bin holds 10 bytes" in capsys.readouterr().err
    with pytest.warns(UserWarning):
        assert prep.main([*args, "--force"]) == 0
    assert read_index(out)["videos"] == fresh["videos"]
    assert (out / "shard_00000.bin").read_bytes() == (
        tmp_path / "fresh" / "shard_00000.bin"
    ).read_bytes()


def test_labels_and_split_lists_are_part_of_the_cache(src: Path, tmp_path: Path) -> None:
    """The checksum covers labels and the split lists: a cache of other labels is refused until
    --force rebuilds it; the lists are copied on every run, and a list the source lost goes."""
    root = tmp_path / "src"
    shutil.copytree(src, root)
    out = tmp_path / "c"
    with pytest.warns(UserWarning):
        prep.prepare(root, out, size=16, progress=False)
    (out / "trainlist01.txt").unlink()
    prep.prepare(root, out, size=16, progress=False)  # complete: the lists are copied again
    assert (out / "trainlist01.txt").read_text() == (root / "trainlist01.txt").read_text()
    (root / "classInd.txt").write_text("1 Walk\n2 Run\n")  # the labels change
    with pytest.raises(ValueError, match="another source list or settings .* --force"):
        prep.prepare(root, out, size=16, progress=False)
    (root / "testlist01.txt").unlink()
    with pytest.warns(UserWarning):
        index = prep.prepare(root, out, size=16, force=True, progress=False)
    assert {v["name"][:4]: v["label"] for v in index["videos"]} == {"Run/": 1, "Walk": 0}
    assert (out / "classInd.txt").read_text() == "1 Walk\n2 Run\n"
    assert not (out / "testlist01.txt").exists()
    (root / "trainlist01.txt").write_text("Walk/v_Walk_h264.mp4 1\n")  # a split list changes
    with pytest.raises(ValueError, match="another source list or settings"):
        prep.prepare(root, out, size=16, progress=False)


def test_a_cache_smaller_than_the_model_warns(src: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        prep.prepare(src, tmp_path / "c", size=16, progress=False)
    with pytest.warns(UserWarning, match="short side 16, smaller than the clips' size 32"):
        ds = make_dataset(_cfg(tmp_path / "c", size=32), "train", 2)
    assert ds.batch([0])["video"].shape == (1, 3, 16, 32, 32)
