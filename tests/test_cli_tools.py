"""Command-line errors of vosgan.evaluate and vosgan.generate: each names the flag or file, exits
with status 2 before any work, and writes nothing; outputs go exactly where they are asked;
generate runs in batches and shows every video it is asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import usage_error

from vosgan import evaluate, generate
from vosgan.models import Generator


@pytest.mark.parametrize(
    "tool, args, message",
    [
        (evaluate, ["--clips", "0"], "argument --clips: must be >= 1, got 0"),
        (evaluate, ["--clips", "-1"], "argument --clips: must be >= 1, got -1"),
        (evaluate, ["--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (evaluate, ["--json", "/proc/x/y.json"], "argument --json: /proc/x/y.json: cannot create"),
        (evaluate, ["--json", "{tmp}"], "argument --json: must end in .json"),
        (evaluate, ["--json", "{tmp}/file.txt/e.json"], "argument --json: "),
        (generate, ["--num", "0"], "argument --num: must be >= 1, got 0"),
        (generate, ["--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (generate, ["--out", "x.avi"], "argument --out: must end in .mp4, .gif, .pt"),
        (generate, ["--out", "/proc/x.mp4"], "argument --out: /proc/x.mp4: cannot create"),
        (generate, ["--out", "/proc/x.pt"], "argument --out: /proc/x.pt: cannot create"),
        (generate, ["--out", "{tmp}/dir.mp4"], "argument --out: {tmp}/dir.mp4 is a folder"),
    ],
)
def test_bad_arguments_name_the_flag(tool, args, message, tmp_path, ckpt, capsys) -> None:
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "dir.mp4").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["--checkpoint", str(ckpt)] + (["--out", "x.mp4"] if tool is generate else [])
    err = usage_error(tool.main, [*base, *args], capsys)
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mp4", "file.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("tool", [evaluate, generate])
def test_cuda_without_a_gpu_is_refused_up_front(tool, ckpt, capsys) -> None:
    argv = ["--checkpoint", str(ckpt), "--device", "cuda", "--out", "x.mp4"]
    err = usage_error(tool.main, argv if tool is generate else argv[:-2], capsys)
    assert "argument --device: 'cuda': this machine has no CUDA device" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "0"], "argument --size: must be >= 8, got 0"),
        (["--size", "7"], "argument --size: must be >= 8, got 7"),
        (["--stride", "0"], "argument --stride: must be >= 1, got 0"),
        (["--max-frames", "0"], "argument --max-frames: must be >= 1, got 0"),
        (["--out", "{tmp}/file.txt"], "argument --out: {tmp}/file.txt is a file"),
        (["--device", "bogus"], "argument --device: 'bogus' is not a device"),
    ],
)
def test_davis_bad_arguments_name_the_flag(args, message, tmp_path, capsys) -> None:
    (tmp_path / "file.txt").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ["--davis", str(tmp_path), "--out", str(tmp_path / "o"), *args]
    assert message.format(tmp=tmp_path) in usage_error(evaluate.main, argv, capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--davis", "{tmp}", "--clips", "3"], "--clips and --json are for --checkpoint alone"),
        (["--davis", "{tmp}", "--json", "{tmp}/r.json"], "--clips and --json are for"),
        (["--checkpoint", "c.pt", "--size", "32"], "--size applies only with --davis"),
        (["--checkpoint", "c.pt", "--out", "o", "--fit", "squash"], "--out, --fit apply only"),
    ],
)
def test_flags_of_the_other_mode_are_refused(argv, message, tmp_path, capsys) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert message in usage_error(evaluate.main, argv, capsys)


@pytest.mark.parametrize("name", ["r.sh.mp4", "r.v1.gif", "sub/r.v1.pt"])
def test_generate_writes_exactly_the_out_path(name, tmp_path, ckpt, capsys) -> None:
    out = tmp_path / name
    argv = ["--checkpoint", str(ckpt), "--num", "1", "--out", str(out), "--device", "cpu"]
    assert generate.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    assert out.stat().st_size > 0
    if out.suffix == ".pt":
        assert torch.load(out)["video"].shape[0] == 1


def test_evaluate_creates_the_json_folder(tmp_path, ckpt, capsys) -> None:
    out = tmp_path / "new" / "e.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--clips", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_clips"] == 1
    assert result["baseline_iou"] != result["baseline_iou_head"]  # refined by default
    argv = ["--checkpoint", str(ckpt), "--clips", "1", "--unrefined", "--json", str(out)]
    assert evaluate.main(argv) == 0
    plain = json.loads(out.read_text())
    assert plain["iou"] == plain["iou_head"] == result["iou_head"]
    assert plain["baseline_iou"] == plain["baseline_iou_head"] == result["baseline_iou_head"]


@pytest.mark.parametrize("key", ["config", "G", "D"])
def test_checkpoint_without_an_entry_is_named(key, tmp_path, ckpt, capsys) -> None:
    state = torch.load(ckpt, weights_only=False)
    del state[key]
    bad = tmp_path / f"no{key}.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=f"checkpoint {bad} has no '{key}' entry"):
        evaluate.load_models(bad, torch.device("cpu"))
    assert evaluate.main(["--checkpoint", str(bad)]) == 2
    assert f"has no '{key}' entry" in capsys.readouterr().err


def test_checkpoint_with_mismatched_weights_is_named(tmp_path, ckpt) -> None:
    state = torch.load(ckpt, weights_only=False)
    state["G"] = {k: v for k, v in list(state["G"].items())[1:]}
    bad = tmp_path / "short.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="weights do not fit its config"):
        evaluate.load_models(Path(bad), torch.device("cpu"))


def test_generate_runs_in_batches_with_the_same_videos(tmp_path, ckpt, capsys, monkeypatch) -> None:
    sizes = []
    forward = Generator.forward

    def spy(self, z_c, anchors):
        sizes.append(z_c.shape[0])
        return forward(self, z_c, anchors)

    monkeypatch.setattr(Generator, "forward", spy)
    base = ["--checkpoint", str(ckpt), "--num", "11", "--device", "cpu"]
    assert generate.main([*base, "--batch-size", "4", "--out", str(tmp_path / "a.pt")]) == 0
    assert sizes == [4, 4, 3]
    sizes.clear()
    assert generate.main([*base, "--out", str(tmp_path / "b.pt")]) == 0
    assert sizes == [11]  # the default batch (16) holds them all
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() == {"video", "fg", "mask", "bg"}
    for k in a:  # the latents are drawn at once: the batch size changes nothing
        assert a[k].shape[0] == 11 and a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_generate_grid_has_a_row_per_video(tmp_path, ckpt, capsys, monkeypatch) -> None:
    grids = []
    monkeypatch.setattr(evaluate, "write_video", lambda path, frames: grids.append(frames))
    for num in (1, 12):
        argv = ["--checkpoint", str(ckpt), "--num", str(num), "--batch-size", "5"]
        assert generate.main([*argv, "--out", str(tmp_path / "g.gif"), "--device", "cpu"]) == 0
    # 32x32 clips shown at 2x with 2-pixel separators: 66 pixels per row
    assert grids[1].shape[1] - grids[0].shape[1] == 11 * 66
    argv = ["--checkpoint", str(ckpt), "--num", "33", "--out", str(tmp_path / "g.mp4")]
    err = usage_error(generate.main, argv, capsys)
    assert "argument --num: a .mp4 grid shows one video per row, at most 32, got 33" in err
    assert "write a .pt file for more" in err
    assert "--batch-size: must be >= 1, got 0" in usage_error(
        generate.main, [*argv[:-4], "--batch-size", "0", "--out", "x.pt"], capsys
    )
