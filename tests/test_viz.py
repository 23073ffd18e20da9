"""Flow colour coding, sample grids and the MP4/GIF writer."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch

from vosgan.viz import GRID_COLUMNS, flow_to_rgb, sample_grid, write_video


def _rgb(u: float, v: float, max_magnitude: float | None = None) -> tuple[float, ...]:
    flow = torch.tensor([u, v], dtype=torch.float32).view(2, 1, 1)
    return tuple(flow_to_rgb(flow, max_magnitude).view(3).tolist())


def test_flow_colours() -> None:
    assert _rgb(0.0, 0.0) == (1.0, 1.0, 1.0)  # no motion: white
    assert _rgb(2.0, 0.0) == pytest.approx((1.0, 0.0, 0.0))  # +x at full speed: red
    # half the maximum speed: half saturated, same hue
    assert _rgb(1.0, 0.0, max_magnitude=2.0) == pytest.approx((1.0, 0.5, 0.5))
    # beyond the maximum: darkened to 0.75 (Middlebury convention)
    assert _rgb(4.0, 0.0, max_magnitude=2.0) == pytest.approx((0.75, 0.0, 0.0))
    hues = {}
    for name, (u, v) in {"left": (-1, 0), "down": (0, 1), "up": (0, -1)}.items():
        hues[name] = colorsys.rgb_to_hsv(*_rgb(u, v))[0] * 360
    assert 190 < hues["left"] < 205  # cyan-blue
    assert 45 < hues["down"] < 60  # orange-yellow
    assert 260 < hues["up"] < 270  # violet
    # magnitude scale is shared over the whole input
    flow = torch.tensor([[[1.0]], [[0.0]]]).expand(2, 2, 2).clone()
    flow[0, 1, 1] = 2.0
    rgb = flow_to_rgb(flow)
    assert float(rgb[1, 0, 0]) == pytest.approx(0.5) and float(rgb[1, 1, 1]) == pytest.approx(0.0)


def test_flow_to_rgb_batch_dims_and_validation() -> None:
    flow = torch.randn(2, 5, 2, 3, 4, dtype=torch.float64)
    rgb = flow_to_rgb(flow, max_magnitude=1.0)
    assert rgb.shape == (2, 5, 3, 3, 4) and rgb.dtype == torch.float32
    assert 0.0 <= float(rgb.min()) and float(rgb.max()) <= 1.0
    torch.testing.assert_close(rgb[1, 2], flow_to_rgb(flow[1, 2], max_magnitude=1.0))
    with pytest.raises(ValueError, match="flow must be"):
        flow_to_rgb(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="max_magnitude"):
        flow_to_rgb(torch.zeros(2, 4, 4), max_magnitude=0.0)


def _inputs(b: int = 3, t: int = 4, h: int = 8, w: int = 6) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1
    fg = torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1
    mask = (torch.rand(b, 1, t, h, w, generator=gen) > 0.5).float()
    bg = torch.rand(b, 3, h, w, generator=gen) * 2 - 1
    seg = torch.rand(b, 1, t, h, w, generator=gen)
    flow = torch.randn(b, 2, t - 1, h, w, generator=gen)
    return video, fg, mask, bg, seg, flow


def test_sample_grid_layout() -> None:
    video, fg, mask, bg, seg, flow = _inputs()
    grid = sample_grid(video, fg, mask, bg, seg, flow, max_rows=2, scale=2, pad=1, header=False)
    t, h, w, pad, s = 4, 8, 6, 1, 2
    assert grid.dtype == np.uint8
    assert grid.shape == (t, 2 * (s * h + pad) + pad, 6 * (s * w + pad) + pad, 3)

    def tile(row: int, col: int) -> np.ndarray:
        y, x = pad + row * (s * h + pad), pad + col * (s * w + pad)
        return grid[:, y : y + s * h, x : x + s * w]

    def u8(x: torch.Tensor) -> np.ndarray:  # [0, 1] (C, T, H, W) -> uint8 (T, H, W, C)
        return (x * 255 + 0.5).to(torch.uint8).permute(1, 2, 3, 0).numpy()

    expect = u8((video[1] + 1) / 2)
    np.testing.assert_array_equal(tile(1, 0)[:, ::2, ::2], expect)  # nearest 2x upscaling
    np.testing.assert_array_equal(tile(1, 0)[:, 1::2, 1::2], expect)
    np.testing.assert_array_equal(tile(0, 2)[..., 0][:, ::2, ::2], mask[0, 0].numpy() * 255)
    bg_tile = tile(0, 3)
    assert all(np.array_equal(bg_tile[0], bg_tile[i]) for i in range(t))  # static background
    for row in (0, 1):  # each column shows its own input of its own sample, every frame
        np.testing.assert_array_equal(tile(row, 1)[:, 1::2, ::2], u8((fg[row] + 1) / 2))
        bg_t = ((bg[row] + 1) / 2)[:, None].expand(3, t, h, w)
        np.testing.assert_array_equal(tile(row, 3)[:, ::2, 1::2], u8(bg_t))
        np.testing.assert_array_equal(
            tile(row, 4)[:, 1::2, 1::2], u8(seg[row].expand(3, -1, -1, -1))
        )
    flow_tile = tile(1, 5)
    np.testing.assert_array_equal(flow_tile[-1], flow_tile[-2])  # last flow frame repeated
    assert not np.array_equal(flow_tile[0], flow_tile[1])
    assert grid[:, 0].max() == grid[:, 0].min() == 32  # separator


def test_sample_grid_header_and_default_scale() -> None:
    video, fg, mask, bg, seg, flow = _inputs(b=2, t=3, h=16, w=16)
    plain = sample_grid(video, fg, mask, bg, seg, flow, header=False)
    titled = sample_grid(video, fg, mask, bg, seg, flow)
    assert plain.shape == (3, 2 * (64 + 2) + 2, 6 * (64 + 2) + 2, 3)  # 16 px -> 4x
    extra = titled.shape[1] - plain.shape[1]
    assert extra > 0 and titled.shape[2] == plain.shape[2]
    np.testing.assert_array_equal(titled[:, extra:], plain)
    assert titled[:, :extra].max() > 200  # white title text is drawn
    assert len(GRID_COLUMNS) == 6


def test_sample_grid_validation() -> None:
    video, fg, mask, bg, seg, flow = _inputs()
    with pytest.raises(ValueError, match="flow must have shape"):
        sample_grid(video, fg, mask, bg, seg, flow[:, :, :-1])
    with pytest.raises(ValueError, match="bg must have shape"):
        sample_grid(video, fg, mask, bg[:, :1], seg, flow)


def _frames(t: int = 5, h: int = 21, w: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):  # smooth gradients that change per frame: codec-friendly
        frames[i, ..., 0] = (x * 255 // (w - 1) + 40 * i) % 256
        frames[i, ..., 1] = y * 255 // (h - 1)
        frames[i, ..., 2] = 60 + 30 * i
    return frames


def test_write_mp4_round_trip(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    frames = _frames()
    path = tmp_path / "grid.mp4"
    write_video(path, frames, fps=6)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name in ("h264", "mpeg4")
    assert len(decoded) == len(frames)
    assert decoded[0].shape == (22, 30, 3)  # padded to even size
    err = np.abs(np.stack(decoded)[:, :21].astype(int) - frames.astype(int)).mean()
    assert err < 8, err
    assert [p.name for p in tmp_path.iterdir()] == ["grid.mp4"]  # no temporary file left


def test_write_gif_round_trip(tmp_path: Path) -> None:
    from PIL import Image

    frames = _frames(t=4)
    path = tmp_path / "sub" / "grid.gif"  # parent folders are created
    write_video(path, frames, fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 4 and im.size == (30, 21)
        assert im.info.get("loop") == 0 and im.info.get("duration") == 100
        im.seek(2)
        err = np.abs(np.asarray(im.convert("RGB")).astype(int) - frames[2].astype(int)).mean()
    assert err < 8, err


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vosgan import viz

    def broken(tmp: str, frames: np.ndarray, fps: int) -> None:
        Path(tmp).write_bytes(b"GIF89a")  # part of the file is written, then the writer fails
        raise OSError("disk full")

    monkeypatch.setattr(viz, "_write_gif", broken)
    (tmp_path / "old.gif").write_bytes(b"kept")
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "old.gif", _frames(t=2), fps=4)
    # no temporary file left, and the previous file is untouched (the rename never happened)
    assert [p.name for p in tmp_path.iterdir()] == ["old.gif"]
    assert (tmp_path / "old.gif").read_bytes() == b"kept"


def test_write_video_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'.avi'"):
        write_video(tmp_path / "x.avi", _frames())
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.gif", _frames().astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "x.mp4", _frames()[..., :2])
    assert list(tmp_path.iterdir()) == []
