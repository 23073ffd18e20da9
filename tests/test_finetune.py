"""Action recognition head on D's encoder: a tiny generated UCF-101-layout dataset, end to end."""

import contextlib
import csv
import json
import re
import shutil

import av
import numpy as np
import pytest
import torch

from vosgan import checkpoint, evaluate, finetune

CPU = torch.device("cpu")
#: class -> (square colour, horizontal speed in pixels/frame): colour and motion both differ.
CLASSES = {
    "RedRight": ((220, 40, 40), 1),
    "GreenLeft": ((40, 200, 40), -1),
    "BlueStill": ((40, 40, 220), 0),
}
TRAIN_GROUPS, TEST_GROUPS, UNLISTED_GROUP = (1, 2, 3, 4), (5, 6), 7


def write_clip(path, colour, speed, rng, frames=20, size=32):
    """A textured grey background with a coloured square crossing it (MPEG-4 in AVI, 25 fps)."""
    bg = rng.integers(70, 140, (size, size, 3)).astype(np.uint8)
    y, x0 = rng.integers(4, size - 12), rng.integers(10, size - 18)
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for t in range(frames):
        frame = bg.copy()
        x = int(np.clip(x0 + speed * t, 0, size - 8))
        frame[y : y + 8, x : x + 8] = colour
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def name(cls, group):
    return f"{cls}/v_{cls}_g{group:02d}_c01.avi"


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """UCF-101 layout: ``<Class>/v_<Class>_gNN_c01.avi`` and ``ucfTrainTestlist/`` lists; group
    7 of every class is in neither list (it must never be trained or tested on)."""
    root = tmp_path_factory.mktemp("ucf")
    rng = np.random.default_rng(0)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    train_lines, test_lines = [], []
    for k, (cls, (colour, speed)) in enumerate(CLASSES.items(), start=1):
        (root / cls).mkdir()
        for g in (*TRAIN_GROUPS, *TEST_GROUPS, UNLISTED_GROUP):
            write_clip(root / name(cls, g), colour, speed, rng)
        train_lines += [f"{name(cls, g)} {k}" for g in TRAIN_GROUPS]
        test_lines += [name(cls, g) for g in TEST_GROUPS]
    (lists / "classInd.txt").write_text(
        "".join(f"{k} {c}\n" for k, c in enumerate(CLASSES, start=1))
    )
    (lists / "trainlist01.txt").write_text("\n".join(train_lines) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test_lines) + "\n")
    return root


@pytest.fixture(scope="module")
def ucf_noind(ucf, tmp_path_factory):
    """``ucf`` without ``classInd.txt``: its train list's ids (1 RedRight, 2 GreenLeft,
    3 BlueStill) are not the sorted folder order, and ``ucfTrainTestlist`` is no class."""
    root = tmp_path_factory.mktemp("noind") / "ucf"
    shutil.copytree(ucf, root)
    (root / "ucfTrainTestlist" / "classInd.txt").unlink()
    return root


def d_state(path):
    """D's weights as the tools load them: the moving average (D_ema) where the run kept one."""
    ckpt = checkpoint.load_checkpoint(path)
    return {k: v.clone() for k, v in ckpt[evaluate.d_weights(ckpt)].items()}


def finetune_run(tmp_path, ucf, ckpt, *extra):
    args = finetune.parse_args(
        [
            "--checkpoint",
            str(ckpt),
            "--data",
            str(ucf),
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "4",
            *extra,
        ]
    )
    return finetune.run(args)


def check_class_accuracy(result, predictions):
    """per_class = each true class's share of correct rows in ``predictions``; mean_class_accuracy
    their unweighted mean."""
    with open(predictions) as fh:
        rows = list(csv.DictReader(fh))
    want = {
        c: np.mean([int(r["correct"]) for r in rows if r["label"] == c])
        for c in sorted({r["label"] for r in rows})
    }
    assert result["per_class"] == pytest.approx(want)
    assert result["mean_class_accuracy"] == pytest.approx(np.mean(list(want.values())))


class _ClipLogits(torch.nn.Module):
    """Stub classifier: every pixel of clip ``i`` holds ``i``; its logits are ``[i, 10 - i, 0]``."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Linear(1, 3))

    def forward(self, x):
        i = x[:, 0, 0, 0, 0]
        return torch.stack((i, 10 - i, torch.zeros_like(i)), 1)


class _Clips:
    """``n`` clips of items with class ``labels[k]``, by ClipDataset's rule: clip ``i`` is of item
    ``order[i % len(order)]`` (``order`` a permutation, not the identity)."""

    def __init__(self, n, labels, order):
        self.n, self.labels, self.order = n, labels, order

    def __len__(self):
        return self.n

    def video_of(self, i):
        return self.order[i % len(self.order)]

    def batch(self, idx):
        video = torch.tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 3, 2, 2, 2)
        return {"video": video, "label": torch.tensor([self.labels[self.video_of(i)] for i in idx])}


def test_predict_videos_averages_each_videos_clips():
    # 3 items x 2 clips, order [2, 0, 1]: item 2 has clips (0, 3), item 0 (1, 4), item 1 (2, 5);
    # batches of 4 split them; row j is item j: its logits are the mean of its clips' logits
    clips = {0: (1, 4), 1: (2, 5), 2: (0, 3)}
    logits, labels = finetune.predict_videos(
        _ClipLogits(), _Clips(6, [2, 0, 1], [2, 0, 1]), [0, 1, 2], CPU, 4, contextlib.nullcontext()
    )
    want = [[sum(clips[k]) / 2, 10 - sum(clips[k]) / 2, 0] for k in range(3)]
    torch.testing.assert_close(logits, torch.tensor(want))
    assert labels.tolist() == [2, 0, 1]  # each row's own item's class
    with pytest.raises(ValueError, match=r"clip 0 is of item 2, which is not in videos"):
        finetune.predict_videos(
            _ClipLogits(), _Clips(6, [2, 0, 1], [2, 0, 1]), [0, 1], CPU, 4, contextlib.nullcontext()
        )


@pytest.mark.parametrize("data", ["ucf", "ucf_noind"])
def test_frozen_head_learns_and_tests_on_the_test_list_only(tmp_path, data, ckpt, request):
    """With or without classInd.txt, train and test label a class alike, and every row of
    predictions.csv is one video with its own class folder's label."""
    ucf = request.getfixturevalue(data)
    before = d_state(ckpt)
    result, model = finetune_run(
        tmp_path, ucf, ckpt, "--mode", "frozen", "--epochs", "60", "--lr", "0.01"
    )
    p = result["protocol"]
    assert (p["train_videos"], p["test_videos"], p["classes"], p["split"]) == (12, 6, 3, 1)
    assert p["frames"] == 16 and p["resolution"] == [32, 32] and p["feature_dim"] == 128
    assert p["d_weights"] == "D_ema"  # the moving average of D's weights, as evaluated
    with open(tmp_path / "out" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    tested = sorted(r["video"] for r in rows)  # paths relative to --data
    assert tested == sorted(name(c, g) for c in CLASSES for g in TEST_GROUPS)
    assert [r["label"] for r in rows] == [r["video"].split("/")[0].lower() for r in rows]
    assert result["top1"] == pytest.approx(np.mean([int(r["correct"]) for r in rows]))
    check_class_accuracy(result, tmp_path / "out" / "predictions.csv")
    # colour and direction differ clearly: a linear probe on D's features separates them
    assert result["top1"] >= 5 / 6, result
    assert result["train_loss"][-1] < result["train_loss"][0]
    after = model.D.state_dict()  # frozen: weights and BatchNorm statistics untouched
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
    saved = torch.load(tmp_path / "out" / "head.pt", weights_only=False)
    assert "encoder" not in saved and saved["classes"] == [c.lower() for c in CLASSES]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["top1"] == result["top1"]


def test_finetune_mode_updates_the_encoder(tmp_path, ucf, ckpt, capsys, monkeypatch):
    before = d_state(ckpt)
    real_predict = finetune.predict_videos

    def fixed_predict(*args):
        # the real prediction runs; the scores then use known, unbalanced labels and predictions:
        # correct [1, 1, 0, 0, 1, 1] -> per class 1/2, 1, 1; top-1 4/6 != class mean 5/6
        logits, labels = real_predict(*args)
        assert logits.shape == (6, 3) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
        return torch.eye(3)[[0, 0, 1, 1, 1, 2]], torch.tensor([0, 0, 0, 0, 1, 2])

    monkeypatch.setattr(finetune, "predict_videos", fixed_predict)
    assert (
        finetune.main(
            [
                "--checkpoint",
                str(ckpt),
                "--data",
                str(ucf),
                "--out",
                str(tmp_path / "ft"),
                "--mode",
                "finetune",
                "--epochs",
                "2",
                "--batch-size",
                "6",
                "--test-clips",
                "2",
                "--features",
                "all",
                "--data.flip=true",
            ]
        )
        == 0
    )
    assert "top-1 accuracy" in capsys.readouterr().out
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    p = result["protocol"]
    assert p["test_videos"] == 6 and p["feature_dim"] == 240
    assert p["data_overrides"] == {"data.flip": "true"} and len(result["train_loss"]) == 2
    assert p["train_steps"] == 2 * 12 // 6 and result["top5"] is None  # 2 epochs, 3 classes
    check_class_accuracy(result, tmp_path / "ft" / "predictions.csv")
    assert result["per_class"] == {"redright": 0.5, "greenleft": 1.0, "bluestill": 1.0}
    assert result["top1"] == pytest.approx(4 / 6)
    assert result["mean_class_accuracy"] == pytest.approx(5 / 6)
    saved = torch.load(tmp_path / "ft" / "head.pt", weights_only=False)
    enc = saved["encoder"]
    changed = [k for k in enc if not torch.equal(enc[k], before[f"encoder.{k}"])]
    assert any(k.endswith("weight") for k in changed)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--split", "2"], "no trainlist02.txt"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--model.size=64"], "only --data.\\* overrides"),
        (["--data.bogus=1"], "unknown config key 'data.bogus'"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
    ],
)
def test_bad_arguments(tmp_path, ucf, ckpt, capsys, extra, message):
    args = ["--checkpoint", str(ckpt), "--data", str(ucf), "--out", str(tmp_path / "o"), *extra]
    assert finetune.main(args) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (["--out", "{tmp}/afile"], "argument --out: .*afile is a file, expected a folder"),
        (["--out", "/proc/vosgan-finetune"], "argument --out: .*cannot create files under /proc"),
        (["--weight-decay", "-1"], "argument --weight-decay: must be >= 0, got -1"),
        pytest.param(
            ["--device", "cuda"],
            "argument --device: 'cuda': this machine has no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present"),
        ),
        pytest.param(
            ["--amp", "fp16"],
            "--amp fp16 needs a CUDA device, got --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present"),
        ),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, extra, message):
    """Checked before the checkpoint is read (it does not exist here)."""
    (tmp_path / "afile").write_text("")
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)]
    args += ["--out", str(tmp_path / "o"), *(a.format(tmp=tmp_path) for a in extra)]
    try:
        code = finetune.main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_data(tmp_path, ckpt, capsys):
    def err(data):
        assert (
            finetune.main(
                [
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / "o"),
                    "--epochs",
                    "1",
                ]
            )
            == 2
        )
        return capsys.readouterr().err

    assert "no such folder" in err(tmp_path / "missing")
    flat = tmp_path / "flat"  # videos but no class folders: nothing to learn
    flat.mkdir()
    write_clip(flat / "a.avi", (200, 0, 0), 1, np.random.default_rng(1))
    write_clip(flat / "b.avi", (0, 200, 0), 1, np.random.default_rng(2))
    (flat / "trainlist01.txt").write_text("a.avi\n")
    (flat / "testlist01.txt").write_text("b.avi\n")
    assert "have no class labels" in err(flat)
    assert (
        finetune.main(
            [
                "--checkpoint",
                str(tmp_path / "none.pt"),
                "--data",
                str(flat),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_class_names(tmp_path, ucf, ucf_noind):
    assert finetune.class_names(str(ucf), 3) == [c.lower() for c in CLASSES]
    assert finetune.class_names(str(ucf_noind), 3) == [c.lower() for c in CLASSES]  # train ids
    for cls in ("Walk", "apply", "Run"):  # no lists: the sorted class folders, as build does
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "v.avi").write_bytes(b"")
    (tmp_path / "Empty").mkdir()  # holds no video: no class
    (tmp_path / "ucfTrainTestlist").mkdir()
    assert finetune.class_names(str(tmp_path), 4) == ["apply", "run", "walk", "3"]


def test_one_class_is_refused_before_any_video_is_read(tmp_path, ckpt, capsys):
    root = tmp_path / "one"
    (root / "Walk").mkdir(parents=True)
    for g in (1, 2):  # not videos at all: probing them would fail with another message
        (root / "Walk" / f"v_Walk_g0{g}_c01.avi").write_bytes(b"not a video")
    (root / "trainlist01.txt").write_text("Walk/v_Walk_g01_c01.avi 1\n")
    (root / "testlist01.txt").write_text("Walk/v_Walk_g02_c01.avi\n")
    args = ["--checkpoint", str(ckpt), "--data", str(root), "--out", str(tmp_path / "o")]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert f"--data {root}: the train videos of split 1 are all of class ['walk']" in err
    assert "at least 2 classes" in err
