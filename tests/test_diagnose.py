"""vosgan.diagnose and vosgan.metrics.ranking_auc: exact values on small inputs, and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import usage_error

from vosgan import diagnose, train
from vosgan.metrics import ranking_auc


def brute_force_auc(score, positive):
    pos = [float(s) for s, p in zip(score.flatten(), positive.flatten(), strict=True) if p]
    neg = [float(s) for s, p in zip(score.flatten(), positive.flatten(), strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_ranking_auc_extremes_and_ties():
    score = torch.tensor([0.1, 0.2, 0.8, 0.9])
    assert ranking_auc(score, torch.tensor([False, False, True, True])) == 1.0
    assert ranking_auc(score, torch.tensor([True, True, False, False])) == 0.0
    assert ranking_auc(torch.full((6,), 0.3), torch.tensor([1, 0, 1, 0, 0, 1]).bool()) == 0.5
    # one positive tied with one of two negatives, above the other: (0.5 + 1) / 2
    assert ranking_auc(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([True, False, False])) == 0.75


@pytest.mark.parametrize("seed", range(5))
def test_ranking_auc_matches_pairwise_counting(seed):
    gen = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 6, (2, 1, 3, 4, 5), generator=gen).float() / 5  # many ties
    positive = torch.rand(score.shape, generator=gen) < 0.3
    expected = brute_force_auc(score, positive)
    assert ranking_auc(score, positive) == pytest.approx(expected, abs=1e-12)


def test_ranking_auc_bad_input():
    assert math.isnan(ranking_auc(torch.rand(5), torch.zeros(5, dtype=torch.bool)))
    assert math.isnan(ranking_auc(torch.rand(5), torch.ones(5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="positive shape"):
        ranking_auc(torch.rand(5), torch.ones(4, dtype=torch.bool))


def test_segmentation_report_on_a_known_map():
    target = torch.zeros(1, 1, 1, 2, 2)
    target[..., 0, 0] = 1
    prob = torch.tensor([0.6, 0.4, 0.2, 0.0]).view(1, 1, 1, 2, 2)
    r = diagnose.segmentation_report(prob, target)
    assert r["fg_fraction"] == 0.25 and r["auc"] == 1.0
    assert r["mean_prob_fg"] == pytest.approx(0.6) and r["mean_prob_bg"] == pytest.approx(0.2)
    assert r["iou_at"]["0.5"] == 1.0  # only the foreground pixel is above 0.5
    assert r["iou_at"]["0.3"] == 0.5  # 0.6 and 0.4 predicted, one of them right
    assert r["iou_at"]["0.9"] == 0.0


def test_temporal_change_inside_and_outside():
    video = torch.zeros(1, 3, 3, 4, 4)
    video[:, :, 1:, :2] = 1.0  # the top half changes between frames 0 and 1, nothing else
    region = torch.zeros(1, 1, 3, 4, 4, dtype=torch.bool)
    region[:, :, :, :2] = True
    change = diagnose.temporal_change(video, region)
    assert change == {"inside": 0.5, "outside": 0.0}  # 1 of the 2 frame pairs changes inside


def test_freeze_repeats_the_middle_frame():
    x = torch.arange(2 * 1 * 5 * 2 * 3, dtype=torch.float32).view(2, 1, 5, 2, 3)
    frozen = diagnose.freeze(x)
    assert frozen.shape == x.shape and frozen.is_contiguous()
    for t in range(5):
        torch.testing.assert_close(frozen[:, :, t], x[:, :, 2])


def test_cli_reports_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train.main(
            [
                "--train.steps=1",
                "--data.batch_size=2",
                "--data.train_clips=4",
                "--data.val_clips=4",
                "--train.eval_clips=2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    path = tmp_path / "d.json"
    assert (
        diagnose.main(
            ["--checkpoint", str(out), "--clips", "3", "--fakes", "3", "--json", str(path)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "D on 3 held-out real clips: AUC" in printed and "G's masks: mean" in printed
    report = json.loads(path.read_text())
    assert report["num_clips"] == 3 and report["num_fakes"] == 3
    assert "D on the real clips frozen in time: AUC" in printed
    for side in ("d_on_real", "d_on_fakes", "d_on_real_frozen", "d_on_fakes_frozen"):
        auc = report[side]["auc"]
        assert auc is None or 0.0 <= auc <= 1.0  # null: undefined (one class absent)
        assert set(report[side]["iou_at"]) == {str(t) for t in diagnose.THRESHOLDS}
    assert 0.0 <= report["g_masks"]["softness"] <= 0.5
    assert diagnose.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fakes", "0"], "argument --fakes: must be >= 1, got 0"),
        (["--clips", "0"], "argument --clips: must be >= 1, got 0"),
        (["--clips", "-1"], "argument --clips: must be >= 1, got -1"),
        (["--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (["--json", "/proc/x/y.json"], "argument --json: /proc/x/y.json: cannot create"),
        (["--json", "{tmp}"], "argument --json: must end in .json"),
    ],
)
def test_cli_bad_arguments_name_the_flag(tmp_path, ckpt, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    err = usage_error(diagnose.main, ["--checkpoint", str(ckpt), *args], capsys)
    assert message.format(tmp=tmp_path) in err


def test_cli_creates_the_json_folder(tmp_path, ckpt, capsys):
    path = tmp_path / "new" / "d.json"
    argv = ["--checkpoint", str(ckpt), "--clips", "1", "--fakes", "1", "--json", str(path)]
    assert diagnose.main(argv) == 0
    assert json.loads(path.read_text())["num_clips"] == 1


def test_cli_json_writes_null_for_an_undefined_auc(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.setattr(diagnose, "ranking_auc", lambda score, positive: float("nan"))
    path = tmp_path / "d.json"
    argv = ["--checkpoint", str(ckpt), "--clips", "1", "--fakes", "1", "--json", str(path)]
    assert diagnose.main(argv) == 0
    assert "AUC nan" in capsys.readouterr().out

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    report = json.loads(path.read_text(), parse_constant=refuse)
    assert report["d_on_real"]["auc"] is None
