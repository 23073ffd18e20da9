"""Sliding-window segmentation, the segment CLI, and DAVIS J&F evaluation (--davis) end to end."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, usage_error
from PIL import Image
from torch import nn

from vosgan import checkpoint, config, davis_eval, evaluate, segment
from vosgan import davis_metrics as dm
from vosgan.data.decode import read_video
from vosgan.data.frames import find_sequences, load_frames
from vosgan.metrics import frame_difference_saliency
from vosgan.models import Discriminator, Generator
from vosgan.models.discriminator import DiscOutput
from vosgan.refine import refine_segmentation
from vosgan.viz import write_video

DAVIS = Path(SHARED_DATA) / "davis2016"


class WindowStub(nn.Module):
    """A stand-in D: logit = (position in the window) / 4 + 4 * red channel; records its inputs,
    its mode and whether the flow was asked for at each call."""

    def __init__(self, size: int, frames: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(size=size, frames=frames, seg_refine=0.0)  # unrefined
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []
        self.modes: list[bool] = []
        self.flows: list[bool] = []

    def forward(self, x: torch.Tensor, flow: bool = True) -> DiscOutput:
        self.seen.append(x.clone())
        self.modes.append(self.training)
        self.flows.append(flow)
        b, _, t, h, w = x.shape
        pos = torch.arange(t, dtype=x.dtype).view(1, 1, t, 1, 1) / 4
        logit = self.scale * (pos + 4 * (x[:, :1] + 1))
        return DiscOutput(x.new_zeros(b), logit, x.new_zeros(b, 2, t - 1, h, w) if flow else None)


def test_window_starts_and_working_size() -> None:
    assert segment.window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert segment.window_starts(21, 8, 4) == [0, 4, 8, 12, 13]  # last window flush with the end
    assert segment.window_starts(5, 8, 4) == [0]
    assert segment.working_size(480, 854, 32) == (32, 57)
    assert segment.working_size(854, 480, 32) == (57, 32)
    assert segment.working_size(480, 854, 32, "squash") == (32, 32)
    with pytest.raises(ValueError, match="fit"):
        segment.working_size(4, 4, 4, "crop")


@pytest.mark.parametrize("n", [20, 5])
def test_segment_frames_averages_overlapping_windows(n: int) -> None:
    t, size = 8, 16
    frames = np.zeros((n, 24, 40, 3), np.uint8)  # black: the red term is 4 * 0
    stub = WindowStub(size, t).train()
    prob = segment.segment_frames(stub, frames, t, size, batch_size=3)
    assert prob.shape == (n, 24, 40) and prob.dtype == np.float32 and stub.training
    assert stub.modes and not any(stub.modes)  # D ran in eval mode; its mode is restored after
    assert not any(stub.flows)  # and skipped its flow branch, which segmentation does not read
    starts = segment.window_starts(n, t, t // 2)
    for i in range(n):
        expect = np.mean(
            [torch.sigmoid(torch.tensor((i - s) / 4)).item() for s in starts if s <= i < s + t]
        )
        np.testing.assert_allclose(prob[i], expect, rtol=1e-5)
    tiles = len(segment.window_starts(27, size, size // 2))  # 40x24 -> 27x16 working size
    assert sum(x.shape[0] for x in stub.seen) == len(starts) * tiles
    if n < t:  # padded by repeating the last frame
        clip = stub.seen[0][0]
        assert torch.equal(clip[:, n:], clip[:, n - 1 : n].expand(-1, t - n, -1, -1))


def test_segment_frames_tiles_keep_the_layout() -> None:
    frames = np.zeros((4, 30, 90, 3), np.uint8)
    frames[:, :, :30, 0] = 255  # a red left third
    prob = segment.segment_frames(WindowStub(16, 4), frames, 4, 16)
    assert prob[:, :, :20].min() > 0.99 and prob[:, :, 45:].max() < 0.9
    with pytest.raises(ValueError, match="built for 4 frames of 16x16"):
        segment.segment_frames(WindowStub(16, 4), frames, 8, 16)
    with pytest.raises(ValueError, match="uint8"):
        segment.segment_frames(WindowStub(16, 4), frames.astype(np.float32), 4, 16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cpu-small checkpoint (32x32, T=16) with untrained weights."""
    cfg = config.load("cpu-small")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    checkpoint.save_atomic(
        {
            "format": checkpoint.FORMAT,
            "config": cfg.to_dict(),
            "step": 2,
            "G": Generator(cfg.model).state_dict(),
            "D": Discriminator(cfg.model).state_dict(),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real DAVIS sequences, 20 frames each, downscaled 4x (213x120), DAVIS-2016 layout."""
    if not DAVIS.is_dir():
        pytest.skip(f"shared DAVIS data not found at {DAVIS}")
    root = tmp_path_factory.mktemp("davis")
    for name in ("car-shadow", "libby"):
        for sub, suffix, resample in (
            ("frames", "jpg", Image.BILINEAR),
            ("masks", "png", Image.NEAREST),
        ):
            (root / name / sub).mkdir(parents=True)
            for i in range(20):
                img = Image.open(DAVIS / name / sub / f"{i:05d}.{suffix}")
                img.resize((213, 120), resample).save(root / name / sub / f"{i:05d}.{suffix}")
    return root


def test_segment_cli_on_video_and_davis_root(tmp_path: Path, ckpt: Path, davis_root: Path) -> None:
    rng = np.random.default_rng(0)
    video = np.full((20, 48, 64, 3), 90, np.uint8) + rng.integers(
        0, 20, (20, 48, 64, 3), dtype=np.uint8
    )
    for i in range(20):
        video[i, 10:26, 2 + 2 * i : 18 + 2 * i] = (230, 40, 40)  # a moving square
    write_video(tmp_path / "clip.mp4", video, fps=10)
    out = tmp_path / "seg"
    assert (
        segment.main(
            [
                "--checkpoint",
                str(ckpt),
                "--input",
                str(tmp_path / "clip.mp4"),
                "--out",
                str(out),
                "--threshold",
                "0.3",
            ]
        )
        == 0
    )
    pngs = sorted((out / "clip" / "masks").glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:05d}" for i in range(20)]
    mask = np.asarray(Image.open(pngs[0]))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    # the masks are this checkpoint's probabilities > 0.3 (where 0.3 and 0.5 disagree too)
    _, _, D, _ = evaluate.load_models(ckpt, torch.device("cpu"))
    prob = segment.segment_frames(D, read_video(tmp_path / "clip.mp4"), 16, 32)
    written = np.stack([np.asarray(Image.open(p)) for p in pngs])
    np.testing.assert_array_equal(written, (prob > 0.3) * 255)
    assert ((prob > 0.3) != (prob > 0.5)).any()
    for name in ("overlay.mp4", "overlay.gif"):
        assert (out / "clip" / name).stat().st_size > 0

    # batch mode over a DAVIS root: one folder per sequence, masks named like the frames
    assert (
        segment.main(
            ["--checkpoint", str(ckpt), "--input", str(davis_root), "--out", str(out), "--no-video"]
        )
        == 0
    )
    for name in ("car-shadow", "libby"):
        masks = sorted((out / name / "masks").glob("*.png"))
        assert len(masks) == 20 and np.asarray(Image.open(masks[3])).shape == (120, 213)
        assert not (out / name / "overlay.mp4").exists()


def test_davis_evaluation_cli(
    tmp_path: Path, ckpt: Path, davis_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert (
        evaluate.main(["--davis", str(davis_root), "--checkpoint", str(ckpt), "--out", str(out)])
        == 0
    )
    screen = capsys.readouterr().out
    assert "first and last frame excluded" in screen and "centre-prior" in screen
    rows = list(csv.DictReader(open(out / "davis_jf.csv")))
    methods = ["model", "frame-difference", "all-foreground", "centre-prior"]
    assert [r["method"] for r in rows] == [m for m in methods for _ in range(3)]
    assert [r["sequence"] for r in rows[:3]] == ["car-shadow", "libby", "MEAN"]
    assert all(r["frames"] == "18" for r in rows if r["sequence"] != "MEAN")  # 20 minus 2
    assert all(r["convention"] == "davis2016" for r in rows)
    res = json.loads((out / "davis_jf.json").read_text())
    card = res["protocol"]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() in card["checkpoint"]
    assert "T=16 frames, stride 8" in card["window"] and "short side 32" in card["resolution"]
    assert "(213x120: 2)" in card["measures"]  # ceil(0.008 * 244.5) px at the test size
    assert "model.seg_refine=0.1, radius 6 px" in card["refinement"]
    assert (out / "davis_protocol.md").read_text().startswith("# DAVIS J&F")
    allfg = res["methods"]["all-foreground"]
    assert allfg["mean"]["F_mean"] == 0.0  # a full mask has no boundary
    # the model's J comes from the very masks `segment` writes for the same checkpoint
    seg_out = tmp_path / "seg"
    assert (
        segment.main(
            [
                "--checkpoint",
                str(ckpt),
                "--input",
                str(davis_root),
                "--out",
                str(seg_out),
                "--no-video",
            ]
        )
        == 0
    )
    for name in ("car-shadow", "libby"):
        pred = np.stack(
            [
                np.asarray(Image.open(seg_out / name / "masks" / f"{i:05d}.png"))
                for i in range(1, 19)
            ]
        )
        gt = np.stack(
            [
                np.asarray(Image.open(davis_root / name / "masks" / f"{i:05d}.png"))
                for i in range(1, 19)
            ]
        )
        np.testing.assert_allclose(
            dm.jaccard(pred, gt), res["methods"]["model"]["per_frame"][name]["J"]
        )
        # the baselines' J: their probability maps (tested below) > 0.5 on the scored frames,
        # the frame difference refined as the checkpoint's D segmentation is (model.seg_refine)
        (seq,) = find_sequences(davis_root / name)
        frames = load_frames(seq)
        model_cfg = config.load("cpu-small").model
        for method in ("frame-difference", "centre-prior"):
            prob = davis_eval.baseline_probabilities(method, frames, 32, refine=model_cfg)[1:19]
            np.testing.assert_allclose(
                dm.jaccard(prob > 0.5, gt), res["methods"][method]["per_frame"][name]["J"]
            )
    # baselines only, the DAVIS 2017 unsupervised convention (all frames)
    assert (
        evaluate.main(
            [
                "--davis",
                str(davis_root),
                "--out",
                str(out),
                "--sequences",
                "libby",
                "--frames",
                "davis2017-unsupervised",
                "--size",
                "32",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(out / "davis_jf.csv")))
    assert {r["method"] for r in rows} == set(methods[1:]) and rows[0]["frames"] == "20"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (["--out", "{tmp}/afile"], "argument --out: .*afile is a file, expected a folder"),
        (["--out", "/proc/vosgan-segment"], "argument --out: .*cannot create files under /proc"),
        (["--stride", "0"], "argument --stride: must be >= 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--fps", "0"], "argument --fps: must be >= 1, got 0"),
        (["--fps", "-3"], "argument --fps: must be >= 1, got -3"),
    ],
)
def test_segment_bad_arguments_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """Rejected by argparse before the checkpoint (which does not exist here) is read, so no
    mask is ever written."""
    (tmp_path / "afile").write_text("")
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--input", str(tmp_path)]
    args += ["--out", str(tmp_path / "o"), *(a.format(tmp=tmp_path) for a in extra)]
    assert re.search(message, usage_error(segment.main, args, capsys))
    assert not (tmp_path / "o").exists()


def test_baselines_follow_their_definitions() -> None:
    # centre prior: > 0.5 exactly inside the ellipse of semi-axes W/4, H/4 (pixel centres),
    # pi/16 = 19.6% of the frame
    h, w = 120, 213
    y, x = np.mgrid[0:h, 0:w] + 0.5
    ellipse = ((x - w / 2) / (w / 4)) ** 2 + ((y - h / 2) / (h / 4)) ** 2 < 1
    prior = davis_eval.baseline_probabilities("centre-prior", np.zeros((2, h, w, 3), np.uint8), 32)
    assert prior.shape == (2, h, w)
    np.testing.assert_array_equal(prior[1] > 0.5, ellipse)
    assert abs(ellipse.mean() - np.pi / 16) < 0.003
    # frame difference on a clean moving square (no noise: any change counts): frame t is
    # foreground where the square enters or leaves between t-1, t and t+1
    n = 6
    square = np.zeros((n, 32, 48), bool)
    for t in range(n):
        square[t, 12:20, 4 + 5 * t : 12 + 5 * t] = True
    frames = np.where(square[..., None], 220, 100).astype(np.uint8).repeat(3, axis=-1)
    d = square[1:] ^ square[:-1]  # changes between t and t+1
    expect = np.concatenate((d[:1], d)) | np.concatenate((d, d[-1:]))
    prob = davis_eval.baseline_probabilities("frame-difference", frames, 32)  # working size 32x48
    np.testing.assert_array_equal(prob > 0.5, expect)
    # refined as a model's segmentation (model.seg_refine), at the working size
    cfg = config.ModelConfig(seg_refine=0.2, seg_refine_radius=2)
    refined = davis_eval.baseline_probabilities("frame-difference", frames, 32, refine=cfg)
    video = segment.resize_frames(frames, (32, 48))[None]
    saliency = frame_difference_saliency(video)
    np.testing.assert_allclose(
        refined, refine_segmentation(saliency, video, cfg)[0, 0].numpy(), atol=1e-6
    )
    assert not np.allclose(refined, prob)


def _copy_seq(src: Path, dst: Path, n: int = 6) -> None:
    for sub in ("frames", "masks"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:n]:
            (dst / sub / f.name).write_bytes(f.read_bytes())


def test_bad_input(
    tmp_path: Path, ckpt: Path, davis_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_eval(root: Path, *extra: str) -> str:
        assert evaluate.main(["--davis", str(root), "--out", str(tmp_path / "o"), *extra]) == 2
        return capsys.readouterr().err

    size = tmp_path / "size"
    _copy_seq(davis_root / "libby", size / "s")
    Image.new("L", (100, 50)).save(size / "s" / "masks" / "00002.png")
    assert "is 100x50 but frame 00002.jpg is 213x120" in run_eval(size)

    gap = tmp_path / "gap"
    _copy_seq(davis_root / "libby", gap / "s")
    (gap / "s" / "frames" / "00003.jpg").unlink()
    assert "frame 3 is missing (frame 2 is followed by 4)" in run_eval(gap)
    (gap / "s" / "frames" / "00005.jpg").unlink()
    (gap / "s" / "frames" / "00004.jpg").unlink()
    assert "masks ['00003', '00004', '00005'] have no frame" in run_eval(gap)

    nomask = tmp_path / "nomask"
    _copy_seq(davis_root / "libby", nomask / "s")
    (nomask / "s" / "masks" / "00004.png").unlink()
    assert "no mask for 1 frame(s), first '00004.jpg'" in run_eval(nomask)

    soft = tmp_path / "soft"  # non-binary masks: thresholded at > 127, with a warning
    _copy_seq(davis_root / "libby", soft / "s")
    m = np.asarray(Image.open(soft / "s" / "masks" / "00001.png")).copy()
    m[:5, :5] = 128
    Image.fromarray(m).save(soft / "s" / "masks" / "00001.png")
    with pytest.warns(UserWarning, match="neither 0 nor 255"):
        assert evaluate.main(["--davis", str(soft), "--out", str(tmp_path / "o")]) == 0
    with pytest.raises(ValueError, match="not a binary mask"):
        dm.jaccard(m / 255.0, m > 127)

    assert "differs from the checkpoint's resolution (model.size=32)" in run_eval(
        size, "--checkpoint", str(ckpt), "--size", "64"
    )
    assert (
        segment.main(
            [
                "--checkpoint",
                str(ckpt),
                "--input",
                str(size),
                "--out",
                str(tmp_path / "o"),
                "--size",
                "64",
            ]
        )
        == 2
    )
    assert "omit --size" in capsys.readouterr().err
    assert (
        segment.main(
            [
                "--checkpoint",
                str(ckpt),
                "--input",
                str(tmp_path / "none.mp4"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_segment_refuses_an_earlier_runs_masks_unless_overwrite(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shorter second run into the same --out would leave the first run's extra masks beside
    its own: refused before any work; --overwrite deletes that run's outputs first."""
    rng = np.random.default_rng(3)
    video = rng.integers(0, 255, (20, 32, 40, 3), dtype=np.uint8)
    write_video(tmp_path / "long" / "clip.mp4", video, fps=10)
    write_video(tmp_path / "short" / "clip.mp4", video[:17], fps=10)
    out = tmp_path / "seg"
    base = ["--checkpoint", str(ckpt), "--out", str(out)]
    assert segment.main([*base, "--input", str(tmp_path / "long" / "clip.mp4")]) == 0
    masks = out / "clip" / "masks"
    first = {p.name: p.stat().st_mtime_ns for p in masks.iterdir()}
    assert len(first) == 20  # each written atomically: no temporary file left
    capsys.readouterr()

    argv = [*base, "--input", str(tmp_path / "short" / "clip.mp4"), "--no-video"]
    assert segment.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out: {masks} already holds masks of an earlier run" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in masks.iterdir()} == first  # untouched
    assert (out / "clip" / "overlay.mp4").exists()

    assert segment.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in masks.iterdir()) == [f"{i:05d}.png" for i in range(17)]
    # the first run's overlays (of 20 frames) went with its masks; nothing else is touched
    assert sorted(p.name for p in (out / "clip").iterdir()) == ["masks"]
    (masks / "notes.txt").write_text("mine")
    assert segment.main([*argv, "--overwrite"]) == 0
    assert (masks / "notes.txt").read_text() == "mine" and len(list(masks.glob("*.png"))) == 17
    with pytest.raises(FileExistsError, match="already holds masks of an earlier run"):
        segment.write_outputs(out / "clip", video[:1], np.zeros((1, 32, 40), bool), ["a"])
