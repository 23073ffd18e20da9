"""Visualisation: optical-flow colour coding, sample grids, MP4/GIF writing.

Sample grids tile, per sample row, ``video | foreground | mask | background | D segmentation |
D flow`` over time; :func:`write_video` saves them as H.264 MP4 (PyAV) or animated GIF (Pillow).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vosgan import backend

#: column titles of :func:`sample_grid`, left to right.
GRID_COLUMNS = ("video", "foreground", "mask", "background", "D seg", "D flow")


def _colour_wheel() -> Tensor:
    """The Middlebury colour wheel (Baker et al., 2011): 55 RGB colours in [0, 1], ``(55, 3)``."""
    ramps = []
    # (length, ramp channel, rising?, channel held at 255): RY, YG, GC, CB, BM, MR
    for n, channel, rising, full in (
        (15, 1, True, 0),
        (6, 0, False, 1),
        (4, 2, True, 1),
        (11, 1, False, 2),
        (13, 0, True, 2),
        (6, 2, False, 0),
    ):
        seg = torch.zeros(n, 3, dtype=torch.float64)
        ramp = torch.floor(255.0 * torch.arange(n, dtype=torch.float64) / n)
        seg[:, channel] = ramp if rising else 255.0 - ramp
        seg[:, full] = 255.0
        ramps.append(seg)
    return torch.cat(ramps) / 255.0


_WHEEL = _colour_wheel()


def flow_to_rgb(flow: Tensor, max_magnitude: float | None = None) -> Tensor:
    """Colour-code optical flow with the Middlebury wheel (hue = direction, saturation = speed).

    Zero flow is white; +x (rightwards) is red, +y (downwards) orange-yellow, -x cyan-blue,
    -y purple. Flow with magnitude above ``max_magnitude`` is darkened (x0.75), as in the
    Middlebury code.

    Args:
        flow: ``(..., 2, H, W)`` in pixels, channel 0 = x, 1 = y.
        max_magnitude: the magnitude shown fully saturated; ``None`` uses the largest magnitude in
            ``flow`` (all of it: frames stay comparable).

    Returns:
        RGB ``(..., 3, H, W)`` float32 in [0, 1], on ``flow``'s device.
    """
    if flow.dim() < 3 or flow.shape[-3] != 2:
        raise ValueError(f"flow must be (..., 2, H, W), got shape {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise ValueError(f"flow must be a floating tensor, got {flow.dtype}")
    if max_magnitude is not None and not max_magnitude > 0:
        raise ValueError(f"max_magnitude must be > 0, got {max_magnitude}")
    u, v = flow.detach().float().unbind(-3)
    mag = torch.sqrt(u * u + v * v)
    top = float(mag.max()) if max_magnitude is None and mag.numel() else (max_magnitude or 0.0)
    rad = mag / max(top, 1e-6)
    wheel = _WHEEL.to(device=flow.device, dtype=torch.float32)
    n = wheel.shape[0]
    fk = (torch.atan2(-v, -u) / torch.pi + 1.0) / 2.0 * (n - 1)
    k0 = fk.floor().long().clamp_(0, n - 1)
    f = (fk - k0).unsqueeze(-1)
    col = (1.0 - f) * wheel[k0] + f * wheel[(k0 + 1) % n]
    r = rad.unsqueeze(-1)
    col = torch.where(r <= 1.0, 1.0 - r * (1.0 - col), 0.75 * col)
    return col.movedim(-1, -3).contiguous()


def _check(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def _label_row(width: int, height: int, col_width: int, pad: int) -> np.ndarray:
    """Column titles ``(height, width, 3)`` uint8, white text on the separator colour."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for c, title in enumerate(GRID_COLUMNS):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = pad + c * (col_width + pad) + (col_width - (right - left)) // 2 - left
        draw.text((x, (height - (bottom - top)) // 2 - top), title, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def sample_grid(
    video: Tensor,
    fg: Tensor,
    mask: Tensor,
    bg: Tensor,
    seg: Tensor,
    flow: Tensor,
    max_rows: int = 8,
    scale: int | None = None,
    pad: int = 2,
    header: bool = True,
) -> np.ndarray:
    """Tile samples as ``video | foreground | mask | background | D seg | D flow`` per row.

    Args:
        video, fg: ``(B, 3, T, H, W)`` in [-1, 1].
        mask, seg: ``(B, 1, T, H, W)`` in [0, 1].
        bg: ``(B, 3, H, W)`` in [-1, 1] (static; repeated over time).
        flow: ``(B, 2, T-1, H, W)`` pixels, coloured by :func:`flow_to_rgb` with each sample's
            own maximum magnitude; its last frame is repeated to get T frames.
        max_rows: at most this many samples (rows), the first ones.
        scale: integer nearest-neighbour upscaling; ``None`` picks ``max(1, 64 // max(H, W))``
            (2x for 32x32 clips, 1x from 64x64).
        pad: separator width in pixels (dark grey).
        header: add a title row (Pillow's default font) above the tiles.

    Returns:
        uint8 ``(T, top + R * (s*H + pad) + pad, 6 * (s*W + pad) + pad, 3)`` with
        ``R = min(B, max_rows)``, ``s = scale`` and ``top`` the title row's height (0 without).
    """
    if video.dim() != 5:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
    b, _, t, h, w = video.shape
    _check("video", video, (b, 3, t, h, w))
    _check("fg", fg, (b, 3, t, h, w))
    _check("mask", mask, (b, 1, t, h, w))
    _check("bg", bg, (b, 3, h, w))
    _check("seg", seg, (b, 1, t, h, w))
    _check("flow", flow, (b, 2, max(t - 1, 0), h, w))
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    scale = max(1, 64 // max(h, w)) if scale is None else scale
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    r = min(b, max_rows)
    with torch.no_grad():
        flows = [flow_to_rgb(flow[i].detach().cpu().float().transpose(0, 1)) for i in range(r)]
        flow_rgb = torch.stack(flows).transpose(1, 2)  # (R, 3, T-1, H, W)
        if t > 1:
            flow_rgb = torch.cat((flow_rgb, flow_rgb[:, :, -1:]), dim=2)
        else:
            flow_rgb = torch.ones(r, 3, t, h, w)
        cols = [
            (video[:r].detach().cpu().float() + 1) / 2,
            (fg[:r].detach().cpu().float() + 1) / 2,
            mask[:r].detach().cpu().float().expand(r, 3, t, h, w),
            ((bg[:r].detach().cpu().float() + 1) / 2).unsqueeze(2).expand(r, 3, t, h, w),
            seg[:r].detach().cpu().float().expand(r, 3, t, h, w),
            flow_rgb,
        ]
        tiles = torch.stack(cols, dim=1).clamp(0, 1)  # (R, 6, 3, T, H, W)
        tiles = (tiles * 255 + 0.5).to(torch.uint8).permute(3, 0, 4, 1, 5, 2)  # T,R,H,6,W,3
        if scale > 1:
            tiles = tiles.repeat_interleave(scale, 2).repeat_interleave(scale, 4)
    sh, sw = h * scale, w * scale
    grid = torch.full((t, r, sh + pad, 6, sw + pad, 3), 32, dtype=torch.uint8)
    grid[:, :, pad:, :, pad:] = tiles
    grid = grid.reshape(t, r * (sh + pad), 6 * (sw + pad), 3).numpy()
    width = grid.shape[2] + pad
    body = np.full((t, grid.shape[1] + pad, width, 3), 32, np.uint8)
    body[:, : grid.shape[1], : grid.shape[2]] = grid
    if not header:
        return body
    title = _label_row(width, 14, sw, pad)
    return np.concatenate((np.broadcast_to(title, (t, *title.shape)), body), axis=1)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """Write ``frames`` as ``.mp4`` (H.264 via PyAV, else MPEG-4) or ``.gif`` (Pillow, loops).

    The file appears atomically: written to a temporary file in the same folder, then renamed.
    MP4 frames are padded to even height and width (edge pixels repeated) for yuv420p.

    Args:
        path: output file; its suffix picks the format.
        frames: uint8 ``(T, H, W, 3)`` RGB.
        fps: frames per second (> 0).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(
            f"write_video: unsupported suffix {path.suffix!r} of {str(path)!r}; "
            "use '.mp4' or '.gif'"
        )
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        (_write_mp4 if suffix == ".mp4" else _write_gif)(tmp, frames, fps)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _h264_codec() -> str:
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception as exc:  # PyAV built without libx264
        backend.warn_once("viz-mpeg4", f"write_video: libx264 unavailable ({exc}); using mpeg4")
        return "mpeg4"


def _write_mp4(tmp: str, frames: np.ndarray, fps: int) -> None:
    import av

    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = _h264_codec()
    with av.open(tmp, mode="w", format="mp4") as container:
        options = {"crf": "18", "preset": "medium"} if codec == "libx264" else {"qscale": "2"}
        stream = container.add_stream(codec, rate=int(fps), options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _write_gif(tmp: str, frames: np.ndarray, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(20, round(1000 / fps)),
        loop=0,
        optimize=False,
    )
