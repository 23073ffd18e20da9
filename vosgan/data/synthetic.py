"""Procedural video with exact ground truth: the built-in (embedded default) dataset.

Each clip is a static-camera scene: a textured background (multi-octave smooth noise in a random
palette, a brightness gradient, a few soft shapes, a mild vignette) and 1-3 textured sprites
(ellipses, rounded rectangles, blobs with shading) that translate along smooth sub-pixel paths
(constant speed with gentle curvature and a sinusoidal wobble, bouncing off a border band so
they can leave the frame partly), z-ordered with occlusion. Every frame gets a small global
illumination flicker and uniform sensor noise, then is quantised to uint8 like real footage.

Ground truth comes from the renderer itself, so it is exact:

- ``mask`` is the set of pixels where some sprite is visible (the shape is point-sampled at pixel
  centres, so a pixel is either sprite or background: no partial coverage);
- ``flow`` (forward, pixels, channel 0 = x, 1 = y): at a pixel whose visible (topmost) sprite is
  ``k`` in frame ``t``, ``pos_k(t + 1) - pos_k(t)``; 0 on background. Sprites only translate and
  their texture is sampled at sprite-local coordinates, so pixel ``(i, j)`` of frame ``t`` shows
  the same texture point as ``(i + flow_y, j + flow_x)`` of frame ``t + 1`` (the convention of
  :mod:`vosgan.ops.flow_warp`), up to bilinear texture sampling, noise and occlusion.

Clip ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: its generator is seeded with
``SeedSequence([seed, SPLITS[s], i])``, so splits never share a clip and a clip does not depend on
the dataset length, the access order, caching or the number of loader workers.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

#: split name -> the id mixed into each clip's seed.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


class Clip(NamedTuple):
    """One rendered clip (numpy, compact and exact).

    video: uint8 ``(T, H, W, 3)``; ids: uint8 ``(T, H, W)`` index of the visible sprite (0 =
    background, sprites 1..K bottom to top); velocity: float32 ``(K_max + 1, T - 1, 2)`` per-sprite
    displacement ``(dx, dy)`` from frame t to t+1 (row 0, the background, is 0); background:
    float32 ``(H, W, 3)`` in [0, 1], the noiseless static scene behind the sprites.
    """

    video: np.ndarray
    ids: np.ndarray
    velocity: np.ndarray
    background: np.ndarray


@lru_cache(maxsize=64)
def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` smooth (cubic Hermite) interpolation of ``n_in`` lattice values."""
    x = np.linspace(0.0, n_in - 1, n_out)
    i0 = np.minimum(np.floor(x).astype(np.int64), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    f = x - i0
    f = f * f * (3.0 - 2.0 * f)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1.0 - f
    if n_in > 1:
        m[np.arange(n_out), i0 + 1] += f
    return m


def _fractal_noise(
    rng: np.random.Generator,
    h: int,
    w: int,
    lattices: Sequence[int],
    channels: int = 1,
    persistence: float = 0.55,
) -> np.ndarray:
    """Sum of value-noise octaves, ``(channels, h, w)`` float32 rescaled to [0, 1] per channel."""
    out = np.zeros((channels, h, w), np.float32)
    amp = 1.0
    for g in lattices:
        lattice = rng.random((channels, g, g), dtype=np.float32)
        out += amp * (_upsample_matrix(h, g) @ lattice @ _upsample_matrix(w, g).T)
        amp *= persistence
    lo = out.min(axis=(1, 2), keepdims=True)
    hi = out.max(axis=(1, 2), keepdims=True)
    return (out - lo) / np.maximum(hi - lo, 1e-6)


def _colour(
    rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]
) -> np.ndarray:
    """A random RGB colour in [0, 1] from hue/saturation/value ranges."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.asarray(rgb, np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Static scene ``(H, W, 3)`` float32 in [0, 1]."""
    c0, c1 = _colour(rng, (0.05, 0.6), (0.2, 0.9)), _colour(rng, (0.05, 0.6), (0.2, 0.9))
    n = _fractal_noise(rng, size, size, (3, 5, 9))[0]
    img = c0 + (c1 - c0) * n[..., None]
    detail = _fractal_noise(rng, size, size, (max(size // 4, 5), max(size // 2, 9)), channels=3)
    img = img + rng.uniform(0.03, 0.12) * (detail.transpose(1, 2, 0) - 0.5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    img = img * (1.0 + rng.uniform(0.0, 0.4) * (np.cos(ang) * xx + np.sin(ang) * yy))[..., None]
    for _ in range(rng.integers(1, 5)):  # soft shapes: smooth-edged ellipses of another colour
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        ry, rx = rng.uniform(0.1, 0.45, 2)
        d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        alpha = rng.uniform(0.2, 0.7) / (1.0 + np.exp((d - 1.0) * rng.uniform(4, 20)))
        img = img + alpha[..., None] * (_colour(rng, (0.05, 0.6), (0.15, 0.95)) - img)
    img = img * (1.0 - rng.uniform(0.0, 0.3) * (xx * xx + yy * yy))[..., None]  # vignette
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _trajectory(
    rng: np.random.Generator,
    frames: int,
    size: int,
    radius: float,
    min_speed: float,
    max_speed: float,
) -> np.ndarray:
    """Sub-pixel centre positions ``(T, 2)`` as (y, x): smooth path, reflected in a border band."""
    speed = rng.uniform(min_speed, max_speed)
    t = np.arange(max(frames - 1, 0), dtype=np.float64)
    wobble = np.sin(2 * np.pi * t / rng.uniform(8, 32) + rng.uniform(0, 2 * np.pi))
    theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.12, 0.12) * t + rng.uniform(0, 0.5) * wobble
    s = speed * (1.0 + 0.2 * np.sin(2 * np.pi * t / rng.uniform(10, 40) + rng.uniform(0, 6.3)))
    steps = np.stack((s * np.sin(theta), s * np.cos(theta)), axis=1)
    lo, hi = -0.4 * radius, size - 1 + 0.4 * radius
    pos = rng.uniform(lo, hi, 2) + np.concatenate((np.zeros((1, 2)), np.cumsum(steps, 0)), 0)
    span = hi - lo  # bounce: fold the unbounded path into [lo, hi]
    y = np.mod(pos - lo, 2 * span)
    return np.where(y > span, 2 * span - y, y) + lo


def _sprite(
    rng: np.random.Generator, pos: np.ndarray, radius_a: float, radius_b: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render one sprite (semi-axes ``radius_a``, ``radius_b``) at sub-pixel positions ``pos``.

    Args:
        pos: centres ``(T, 2)`` as (y, x) in pixels.

    Returns the patch colours ``(T, P, P, 3)``, its coverage ``(T, P, P)`` bool and the frame
    row/column of each patch row/column, ``(T, P)`` each.
    """
    kind = rng.integers(3)  # 0 ellipse, 1 rounded rectangle (superellipse), 2 blob
    harmonics = rng.uniform(0.0, 0.12, 3) if kind == 2 else np.zeros(3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    # farthest shape point from the centre: superellipse corners at 2**0.25, blob lobes at 1+sum h
    reach = max(radius_a, radius_b) * (2**0.25 if kind == 1 else 1.0 + harmonics.sum())
    c = int(np.ceil(reach)) + 1
    p = 2 * c + 1
    rot = rng.uniform(0, np.pi)
    cr, sr = np.float32(np.cos(rot)), np.float32(np.sin(rot))
    # texture on the local lattice (P+1)^2: tex[a, b] is local (y, x) = (a - c - 1, b - c - 1)
    ly, lx = np.mgrid[-c - 1 : c + 1, -c - 1 : c + 1].astype(np.float32)
    u, v = (cr * lx + sr * ly) / radius_a, (-sr * lx + cr * ly) / radius_b
    c0, c1 = _colour(rng, (0.2, 0.9), (0.25, 1.0)), _colour(rng, (0.1, 0.9), (0.1, 0.9))
    n = _fractal_noise(rng, p + 1, p + 1, (3, 5, max(p // 3, 7)))[0]
    tex = c0 + (c1 - c0) * n[..., None]
    if rng.random() < 0.4:  # stripes or a checker-like pattern in a third colour
        f = rng.uniform(1.5, 4.0)
        pattern = np.sin(f * np.pi * u) * (np.sin(f * np.pi * v) if rng.random() < 0.5 else 1.0)
        tex = tex + (0.5 + 0.5 * pattern[..., None]) * rng.uniform(0.3, 0.8) * (
            _colour(rng, (0.0, 0.9), (0.1, 1.0)) - tex
        )
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.25 * (np.cos(light) * u + np.sin(light) * v) - 0.2 * (u * u + v * v)
    tex = np.clip(tex * shade[..., None], 0.0, 1.0).astype(np.float32)

    # per-frame sub-pixel shift: frame pixel (iy + a - c) has local y = a - c - fy, fy in [0, 1)
    ipos = np.floor(pos).astype(np.int64)
    frac = (pos - ipos).astype(np.float32)
    fy, fx = frac[:, 0, None, None, None], frac[:, 1, None, None, None]
    rows = fy * tex[None, :-1] + (1.0 - fy) * tex[None, 1:]  # (T, P, P+1, 3)
    patch = fx * rows[:, :, :-1] + (1.0 - fx) * rows[:, :, 1:]  # (T, P, P, 3)
    grid = np.arange(p, dtype=np.float32) - c
    ly = grid[None, :, None] - frac[:, 0, None, None]
    lx = grid[None, None, :] - frac[:, 1, None, None]
    u, v = (cr * lx + sr * ly) / radius_a, (-sr * lx + cr * ly) / radius_b
    if kind == 0:
        inside = u * u + v * v <= 1.0
    elif kind == 1:
        inside = u**4 + v**4 <= 1.0
    else:
        # r(angle) = 1 + sum_k h_k cos(k * angle + phase_k), k = 2..4, via powers of e^(i angle)
        rho2 = u * u + v * v
        e = (u + 1j * v) / np.sqrt(np.maximum(rho2, 1e-12))
        ek, r = e * e, np.ones_like(u)
        for k, h in enumerate(harmonics):
            r += h * (ek * np.exp(1j * phases[k])).real
            ek = ek * e
        inside = rho2 <= r * r
    offsets = np.arange(p) - c
    return patch, inside, ipos[:, 0, None] + offsets, ipos[:, 1, None] + offsets


def render_clip(
    rng: np.random.Generator,
    frames: int,
    size: int,
    num_sprites: int,
    min_speed: float,
    max_speed: float,
    max_sprites: int,
    noise_std: float = 0.01,
    flicker: float = 0.01,
) -> Clip:
    """Render one clip with ``num_sprites`` sprites (see the module docstring)."""
    bg = _background(rng, size)
    canvas = np.broadcast_to(bg, (frames, size, size, 3)).copy()
    ids = np.zeros((frames, size, size), np.uint8)
    velocity = np.zeros((max_sprites + 1, frames - 1, 2), np.float32)
    t_index = np.arange(frames)[:, None, None]
    for k in range(1, num_sprites + 1):  # bottom to top: later sprites occlude earlier ones
        radius_a, radius_b = rng.uniform(0.09, 0.2, 2) * size
        pos = _trajectory(rng, frames, size, max(radius_a, radius_b), min_speed, max_speed)
        patch, inside, rows, cols = _sprite(rng, pos, radius_a, radius_b)
        r, c = rows[:, :, None], cols[:, None, :]
        keep = inside & (r >= 0) & (r < size) & (c >= 0) & (c < size)
        flat = ((t_index * size + r) * size + c)[keep]  # scatter only the covered pixels
        canvas.reshape(-1, 3)[flat] = patch[keep]
        ids.reshape(-1)[flat] = k
        velocity[k] = np.diff(pos, axis=0)[:, ::-1]  # (dy, dx) -> (dx, dy)
    gain = (1.0 + flicker * rng.standard_normal(frames)).astype(np.float32) * np.float32(255.0)
    canvas *= gain[:, None, None, None]
    if noise_std > 0:  # uniform sensor noise from random bytes, standard deviation noise_std
        scale = np.float32(noise_std * 255.0 * 12**0.5 / 256)
        canvas += np.frombuffer(rng.bytes(canvas.size), np.uint8).reshape(canvas.shape) * scale
        canvas -= np.float32(127.5) * scale
    # Round to uint8 with the 2**23 trick (float32 x + 2**23 holds round(x) in its low mantissa
    # bits): 0.2 ms for a 32x64x64 clip against 2.1 ms for numpy's float -> uint8 cast (2-core
    # CPU dev box). Pure numpy: torch's threaded kernels stalled under a busy CPU.
    np.clip(canvas, 0.0, 255.0, out=canvas)
    canvas += np.float32(2**23)
    video = canvas.view(np.uint32).astype(np.uint8)
    return Clip(video, ids, velocity, bg)


def clips_to_tensors(
    video: np.ndarray, ids: np.ndarray, velocity: np.ndarray
) -> dict[str, torch.Tensor]:
    """Stacked numpy clips -> the dataset's tensors.

    Args:
        video: uint8 ``(B, T, H, W, 3)``; ids: uint8 ``(B, T, H, W)``;
        velocity: float32 ``(B, K + 1, T - 1, 2)``.

    Returns:
        ``video`` float32 ``(B, 3, T, H, W)`` in [-1, 1], ``mask`` float32 ``(B, 1, T, H, W)``
        in {0, 1}, ``flow`` float32 ``(B, 2, T - 1, H, W)`` in pixels.
    """
    # numpy, not torch: on the busy 2-core dev box torch's 2-thread kernels stalled (16 cpu-small
    # clips: 127 ms min / 148 ms median; numpy, one thread: 10 / 24 ms).
    b, t, h, w, _ = video.shape
    out = video.transpose(0, 4, 1, 2, 3).astype(np.float32, order="C")
    out *= np.float32(1 / 127.5)
    out -= np.float32(1.0)
    mask = (ids > 0).astype(np.float32)[:, None]
    k = velocity.shape[1]
    # flow[b, c, t, i, j] = velocity[b, ids[b, t, i, j], t, c]: one flat lookup per channel
    rows = (np.arange(b)[:, None] * (t - 1) + np.arange(t - 1)[None]) * k  # (B, T-1)
    index = ids[:, :-1].astype(np.intp) + rows[:, :, None, None]
    table = velocity.transpose(3, 0, 2, 1).reshape(2, -1)  # (2, B * (T-1) * K)
    flow = np.stack((table[0][index], table[1][index]), axis=1)
    return {
        "video": torch.from_numpy(out),
        "mask": torch.from_numpy(mask),
        "flow": torch.from_numpy(flow),
    }


class SyntheticVideos(Dataset):
    """Procedural clips with exact masks and flow; clip ``i`` is a pure function of the seed.

    Args:
        num_clips: dataset length.
        frames: T (>= 2); size: frame height = width (>= 8).
        seed: dataset seed; split: ``"train"``, ``"val"`` or ``"test"`` (disjoint clips).
        min_sprites, max_sprites: sprites per clip, uniform in ``[min_sprites, max_sprites]``.
        max_speed: fastest sprite speed in pixels per frame at this resolution; default
            ``2 * size / 32`` (0.3-2 px/frame at 32x32). Speeds are uniform in
            ``[0.15 * max_speed, max_speed]``, modulated by +-20% along the path.
        cache: keep every clip in memory once it has been rendered (uint8 video, uint8 sprite
            ids, float32 per-sprite velocities: the flow is exact, not quantised), so later
            epochs read instead of render. Memory grows to about ``num_clips * T * H * W * 4``
            bytes once every clip has been used.
        noise_std: sensor noise standard deviation (fraction of the [0, 1] range).
        flicker: standard deviation of the per-frame global gain.

    Items (``__getitem__``): ``video`` float32 ``(3, T, H, W)`` in [-1, 1]; ``mask`` float32
    ``(1, T, H, W)`` in {0, 1}; ``flow`` float32 ``(2, T-1, H, W)`` forward flow in pixels
    (channel 0 = x, 1 = y; 0 on background). :meth:`batch` returns the same with a batch dim.
    """

    def __init__(
        self,
        num_clips: int,
        frames: int,
        size: int,
        seed: int = 0,
        split: str = "train",
        min_sprites: int = 1,
        max_sprites: int = 3,
        max_speed: float | None = None,
        cache: bool = False,
        noise_std: float = 0.01,
        flicker: float = 0.01,
    ) -> None:
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        if frames < 2:
            raise ValueError(f"frames must be >= 2 (flow needs two frames), got {frames}")
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 0 <= min_sprites <= max_sprites or max_sprites > 254:
            raise ValueError(
                f"need 0 <= min_sprites <= max_sprites <= 254, got "
                f"min_sprites={min_sprites}, max_sprites={max_sprites}"
            )
        if max_speed is not None and max_speed < 0:
            raise ValueError(f"max_speed must be >= 0 pixels/frame, got {max_speed}")
        if noise_std < 0 or flicker < 0:
            raise ValueError(f"noise_std and flicker must be >= 0, got {noise_std}, {flicker}")
        self.num_clips, self.frames, self.size, self.seed, self.split = (
            num_clips,
            frames,
            size,
            seed,
            split,
        )
        self.min_sprites, self.max_sprites = min_sprites, max_sprites
        self.max_speed = 2.0 * size / 32 if max_speed is None else float(max_speed)
        self.noise_std, self.flicker = noise_std, flicker
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if cache:  # untouched pages of np.empty cost no memory until a clip lands there
            n, t = num_clips, frames
            self._cache = (
                np.empty((n, t, size, size, 3), np.uint8),
                np.empty((n, t, size, size), np.uint8),
                np.empty((n, max_sprites + 1, t - 1, 2), np.float32),
            )
            self._cached = np.zeros(n, bool)

    def __len__(self) -> int:
        return self.num_clips

    def clip(self, i: int) -> Clip:
        """Render clip ``i`` (numpy; never cached)."""
        if not 0 <= i < self.num_clips:
            raise IndexError(f"clip index {i} out of range for {self.num_clips} clips")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], i]))
        k = int(rng.integers(self.min_sprites, self.max_sprites + 1))
        return render_clip(
            rng,
            self.frames,
            self.size,
            k,
            0.15 * self.max_speed,
            self.max_speed,
            self.max_sprites,
            self.noise_std,
            self.flicker,
        )

    def _arrays(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("indices must not be empty")
        for i in idx:
            if not 0 <= i < self.num_clips:
                raise IndexError(f"clip index {i} out of range for {self.num_clips} clips")
        if self._cache is not None:
            video, ids, vel = self._cache
            for i in idx:
                if not self._cached[i]:
                    clip = self.clip(i)
                    video[i], ids[i], vel[i] = clip.video, clip.ids, clip.velocity
                    self._cached[i] = True
            return video[idx], ids[idx], vel[idx]
        clips = [self.clip(i) for i in idx]
        return (
            np.stack([c.video for c in clips]),
            np.stack([c.ids for c in clips]),
            np.stack([c.velocity for c in clips]),
        )

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in clips_to_tensors(*self._arrays([i])).items()}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Clips ``indices`` stacked: ``video (B, 3, T, H, W)``, ``mask``, ``flow`` as above."""
        return clips_to_tensors(*self._arrays(indices))
