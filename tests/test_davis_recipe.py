"""The README's DAVIS recipe at tiny scale: train on the unlabeled frames, then score J&F.

prepare a clip cache from DAVIS-style folders -> train -> ``evaluate --davis`` with the checkpoint.
Training must never read the masks: the same run without the mask folders gives the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from vosgan import checkpoint, evaluate, train
from vosgan.data import prepare

DAVIS = Path(SHARED_DATA) / "davis2016"
TINY = [
    "--model.size=16",
    "--model.frames=16",
    "--model.g_channels=16",
    "--model.d_channels=4",
    "--model.gru_hidden=16",
    "--data.batch_size=2",
    "--data.train_clips=4",
    "--data.val_clips=2",
    "--train.eval_clips=2",
    "--train.steps=2",
    "--data.crop=random",
    # the second step trains on the motion pseudo-labels, camera-compensated on real video
    "--loss.motion_seg_start=1",
]


@pytest.fixture
def davis_root(tmp_path: Path) -> Path:
    """Two real DAVIS sequences cut to 18 frames (frames + masks), copied into tmp_path."""
    if not DAVIS.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    root = tmp_path / "davis"
    for name in ("car-shadow", "libby"):
        for sub in ("frames", "masks"):
            (root / name / sub).mkdir(parents=True)
            for f in sorted((DAVIS / name / sub).iterdir())[:18]:
                shutil.copyfile(f, root / name / sub / f.name)
    return root


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.load_checkpoint(run)
    return {f"{net}.{k}": v for net in ("G", "D") for k, v in ckpt[net].items()}


def test_train_on_unlabeled_davis_frames_then_score_jf(tmp_path: Path, davis_root: Path) -> None:
    cache = tmp_path / "cache"
    assert prepare.main([str(davis_root), "--out", str(cache), "--size", "16"]) == 0
    run = tmp_path / "run"
    assert train.main([*TINY, "--data", str(cache), "--out", str(run)]) == 0

    # The masks never reach the training losses: frames with and without them train alike.
    no_masks = tmp_path / "no_masks"
    shutil.copytree(davis_root, no_masks, ignore=shutil.ignore_patterns("masks"))
    runs = {}
    for name, root in (("masks", davis_root), ("no_masks", no_masks)):
        runs[name] = tmp_path / f"run_{name}"
        assert train.main([*TINY, "--data", str(root), "--out", str(runs[name])]) == 0
    with_masks, without = _weights(runs["masks"]), _weights(runs["no_masks"])
    assert with_masks.keys() == without.keys()
    for key, value in with_masks.items():
        torch.testing.assert_close(value, without[key], rtol=0, atol=0, msg=key)

    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--davis",
                str(davis_root),
                "--checkpoint",
                str(run / "checkpoints" / "last.pt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "davis_jf.json").read_text())
    assert set(res["methods"]) == {"model", "frame-difference", "all-foreground", "centre-prior"}
    for scores in res["methods"].values():
        for key in ("J_mean", "F_mean"):
            assert 0.0 <= scores["mean"][key] <= 1.0
    assert "davis2016" in json.dumps(res["protocol"])
