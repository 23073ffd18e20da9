"""vosgan.ceiling: D's segmentation trained on ground-truth masks (a diagnostic, not the method)."""

from __future__ import annotations

import json
import math

import pytest

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
    assert main(["--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
