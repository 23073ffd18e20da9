"""vosgan.ceiling: D's segmentation trained on ground-truth masks (a diagnostic, not the method)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import usage_error

from vosgan import ceiling
from vosgan import config as config_mod
from vosgan.ceiling import main, train_ceiling

TINY = {
    "model.size": "16",
    "model.d_channels": "4",
    "data.batch_size": "4",
    "data.train_clips": "32",
    "data.val_clips": "4",
    "train.eval_clips": "4",
}


def test_train_ceiling_learns_and_reports_each_evaluation() -> None:
    # 400 steps on 1024 clips (about 13 s): enough for the held-out IoU to climb well above what a
    # D that learned only the foreground prior scores (0: it predicts background everywhere).
    more = {"data.batch_size": "8", "data.train_clips": "1024", "data.val_clips": "8"}
    cfg = config_mod.load("cpu-small", {**TINY, **more, "train.eval_clips": "8"})
    results = train_ceiling(
        cfg, steps=400, lr=3e-3, lr_encoder=3e-3, eval_every=200, progress=False
    )
    assert [r["step"] for r in results] == [200, 400]
    for r in results:
        assert 0.0 <= r["iou"] <= 1.0 and 0.0 <= r["baseline_iou"] <= 1.0
        assert r["num_clips"] == 8
    # BCE starts near log 2 (and at the foreground fraction's entropy at best without learning).
    assert math.isfinite(results[-1]["loss"]) and results[-1]["loss"] < 0.45
    assert results[-1]["iou"] > max(0.15, results[0]["iou"])  # measured: 0.123, then 0.254


def test_cli_writes_json_and_rejects_bad_arguments(tmp_path, capsys) -> None:
    out = tmp_path / "ceiling.json"
    argv = ["--steps", "2", "--eval-every", "1", "--json", str(out)]
    argv += [f"--{k}={v}" for k, v in TINY.items()]
    assert main(argv) == 0
    assert [r["step"] for r in json.loads(out.read_text())] == [1, 2]
    assert "supervised ceiling" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--eval-every", "0"], "argument --eval-every: must be >= 1, got 0"),
        (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
        (["--lr-encoder", "inf"], "argument --lr-encoder: must be a finite number, got 'inf'"),
        (["--json", "/proc/x/y.json"], "argument --json: /proc/x/y.json: cannot create"),
        (["--json", "{tmp}"], "argument --json: must end in .json"),
    ],
)
def test_cli_bad_arguments_name_the_flag(tmp_path, capsys, args, message) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    assert message.format(tmp=tmp_path) in usage_error(main, ["--steps", "2", *args], capsys)


def test_cli_stops_on_a_non_finite_loss_and_creates_the_json_folder(
    tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "new" / "ceiling.json"
    argv = ["--steps", "1", "--json", str(out), *(f"--{k}={v}" for k, v in TINY.items())]
    assert main(argv) == 0 and out.exists()  # the missing folder is created
    capsys.readouterr()
    calls, bce = [], ceiling.segmentation_loss

    def nan_on_step_2(logit, mask):
        calls.append(1)
        loss = bce(logit, mask)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(ceiling, "segmentation_loss", nan_on_step_2)
    out.unlink()
    assert main(["--steps", "3", "--json", str(out), *argv[4:]]) == 2
    assert "BCE is nan at step 2" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_refuses_cuda_without_a_gpu(capsys) -> None:
    argv = ["--steps", "1", "--train.device=cuda", *(f"--{k}={v}" for k, v in TINY.items())]
    assert main(argv) == 2
    assert "error: train.device: 'cuda': this machine has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.source=/some/videos", "does not use data.source='/some/videos'; it trains on"),
        ("loss.r1=1", "does not use loss.r1=1.0: drop this override"),
        ("train.compile=true", "does not use train.compile=True"),
        ("optim.lr_dense=0.5", "does not use optim.lr_dense=0.5"),
        ("model.g_channels=32", "does not use model.g_channels=32"),
    ],
)
def test_cli_refuses_overrides_it_would_ignore(override, message, capsys) -> None:
    argv = ["--steps", "1", f"--{override}", *(f"--{k}={v}" for k, v in TINY.items())]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_device_amp_and_unused_defaults(monkeypatch) -> None:
    # data.source=synthetic and train.device=cpu change nothing: accepted; train.amp=bf16
    # autocasts D's training forward (the logits reach the loss in bfloat16), not evaluation
    seen = []

    def spy(logit, mask):
        seen.append((logit.dtype, logit.device.type))
        return ceiling_loss(logit, mask)

    ceiling_loss = ceiling.segmentation_loss
    monkeypatch.setattr(ceiling, "segmentation_loss", spy)
    over = {**TINY, "data.source": "synthetic", "train.device": "cpu", "train.amp": "bf16"}
    results = train_ceiling(
        config_mod.load("cpu-small", over), 2, 1e-3, 1e-3, eval_every=2, progress=False
    )
    assert seen == [(torch.bfloat16, "cpu")] * 2 and math.isfinite(results[-1]["iou"])
    seen.clear()
    train_ceiling(config_mod.load("cpu-small", TINY), 1, 1e-3, 1e-3, 1, progress=False)
    assert seen == [(torch.float32, "cpu")]  # train.amp=auto: off on the CPU
    with pytest.raises(config_mod.ConfigError, match="train.amp=fp16 needs a CUDA device"):
        over = {**TINY, "train.device": "cpu", "train.amp": "fp16"}
        train_ceiling(config_mod.load("cpu-small", over), 1, 1e-3, 1e-3, 1, progress=False)
