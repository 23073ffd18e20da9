"""Small generated videos and frame folders for the data tests (written with PyAV / PIL).

Frame ``i`` of a generated video is identifiable after lossy coding, resizing and cropping: its
blue channel is the constant ``level(i)`` (steps of 12 levels), red and green are gradients.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm"), "mpeg4": ("mpeg4", ".avi")}


def level(i: int) -> int:
    """Blue value of frame ``i``."""
    return 16 + (12 * i) % 224


def pattern(i: int, w: int, h: int) -> np.ndarray:
    """Frame ``i`` as uint8 ``(h, w, 3)``."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (np.arange(w)[None] * 200 // max(w - 1, 1) + 3 * i) % 256
    img[..., 1] = np.arange(h)[:, None] * 200 // max(h - 1, 1)
    img[..., 2] = level(i)
    return img


def write_video(
    path: Path,
    codec: str = "h264",
    frames: int = 16,
    w: int = 64,
    h: int = 48,
    fps: int = 24,
    faststart: bool = False,
    rotation: int = 0,
) -> Path:
    """Encode ``frames`` pattern frames to ``path`` (the codec's suffix added if it has none);
    ``rotation``: a display matrix turning them that many degrees counter-clockwise (a phone
    video's), as PyAV's ``VideoFrame.rotation`` reads it back."""
    name, suffix = CODECS[codec]
    if path.suffix == "":
        path = path.with_suffix(suffix)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(name, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        if codec == "h264":
            s.options = {"crf": "12", "g": "8"}
        else:
            s.bit_rate = 4_000_000
        for i in range(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(pattern(i, w, h), format="rgb24")))
        c.mux(s.encode())
    return path


def frame_ids(video: np.ndarray) -> list[int]:
    """Frame numbers of uint8 ``(N, H, W, 3)`` frames, by their blue level (frames < 19)."""
    levels = {level(i): i for i in range(19)}
    out = []
    for f in video:
        b = float(f[..., 2].mean())
        best = min(levels, key=lambda v: abs(v - b))
        assert abs(best - b) < 5, f"blue level {b:.1f} matches no frame"
        out.append(levels[best])
    return out


def write_sequence(
    root: Path,
    frames: int = 6,
    w: int = 40,
    h: int = 30,
    masks: bool = True,
    frame_dir: str = "frames",
    mask_dir: str = "masks",
    mode: str = "L",
) -> Path:
    """A ``root/frames/*.jpg`` (+ ``root/masks/*.png``) sequence; mask: a moving box."""
    (root / frame_dir).mkdir(parents=True, exist_ok=True)
    if masks:
        (root / mask_dir).mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        Image.fromarray(pattern(i, w, h)).save(root / frame_dir / f"{i:05d}.jpg", quality=95)
        if masks:
            m = np.zeros((h, w), np.uint8)
            m[5:15, 2 + i : 12 + i] = 255 if mode == "L" else 1
            img = Image.fromarray(m)
            if mode == "P":
                m[20:25, 20:30] = 2  # a second object id
                img = Image.frombytes("P", (w, h), m.tobytes())
                img.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * 759)
            img.save(root / mask_dir / f"{i:05d}.png")
    return root
