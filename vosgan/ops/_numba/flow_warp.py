"""numba CPU kernels of the flow-warping loss (fp32 in, fp32/fp64 accumulation).

Same arithmetic as the Triton kernels (:mod:`vosgan.kernels.flow_warp`): sample positions are
rounded exactly as ``flow_to_grid`` + ``grid_sample(align_corners=True)`` round them in fp32, so
the bilinear cell, and the one-sided derivative at integer positions, is the reference's.

Parallelism is over frame pairs ``(b, t)``. The backward is race-free without atomics or
buffers: pair ``t`` writes ``dflow[b, :, t]``, ``dx[b, :, t]`` (its direct term) and scatters into
``dx[b, :, t + 1]``, so even pairs run in parallel, then odd pairs; the result is deterministic.
All arrays are C-contiguous float32; ``weight`` and ``grad`` are dummies when unused.
:func:`launch_fwd` and :func:`launch_bwd` run them on torch tensors (fp16/bf16 upcast to fp32).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

_F1 = np.float32(1.0)
_F2 = np.float32(2.0)


@njit(cache=True, inline="always")
def _coords(i, j, ux, uy, h, w, border):
    """Corner (x0, y0), weights (ax, bx, ay, by) and clip gradients (cgx, cgy) of pixel (i, j)."""
    wm1 = np.float32(max(w - 1, 1))
    hm1 = np.float32(max(h - 1, 1))
    half_wm1 = np.float32((w - 1) * 0.5)
    half_hm1 = np.float32((h - 1) * 0.5)
    gx = (_F2 * (np.float32(j) + ux)) / wm1 - _F1
    gy = (_F2 * (np.float32(i) + uy)) / hm1 - _F1
    ix = (gx + _F1) * half_wm1
    iy = (gy + _F1) * half_hm1
    cgx = _F1
    cgy = _F1
    if border:
        # Borders count as out of bounds for the gradient, as in grid_sample.
        if not (ix > 0 and ix < 2 * half_wm1):
            cgx = np.float32(0.0)
        if not (iy > 0 and iy < 2 * half_hm1):
            cgy = np.float32(0.0)
        ix = min(max(ix, np.float32(0.0)), np.float32(w - 1))
        iy = min(max(iy, np.float32(0.0)), np.float32(h - 1))
    else:
        # Far outside every corner is out of bounds already: clamping keeps the ints small.
        ix = min(max(ix, np.float32(-2.0)), np.float32(w + 1))
        iy = min(max(iy, np.float32(-2.0)), np.float32(h + 1))
    x0f = np.floor(ix)
    y0f = np.floor(iy)
    ax = (x0f + _F1) - ix
    bx = ix - x0f
    ay = (y0f + _F1) - iy
    by = iy - y0f
    if w == 1:
        cgx = np.float32(0.0)
    if h == 1:
        cgy = np.float32(0.0)
    return int(x0f), int(y0f), ax, bx, ay, by, cgx, cgy


@njit(cache=True, inline="always")
def _corners(x, b, c, t, x0, y0, h, w, inside):
    """The four corner values of ``x[b, c, t]`` around ``(y0, x0)`` (zero outside the frame)."""
    if inside:  # the common case: no bounds checks
        return x[b, c, t, y0, x0], x[b, c, t, y0, x0 + 1], x[b, c, t, y0 + 1, x0], x[
            b, c, t, y0 + 1, x0 + 1]
    z = np.float32(0.0)
    in_x0 = 0 <= x0 < w
    in_x1 = 0 <= x0 + 1 < w
    in_y0 = 0 <= y0 < h
    in_y1 = 0 <= y0 + 1 < h
    v_nw = x[b, c, t, y0, x0] if in_y0 and in_x0 else z
    v_ne = x[b, c, t, y0, x0 + 1] if in_y0 and in_x1 else z
    v_sw = x[b, c, t, y0 + 1, x0] if in_y1 and in_x0 else z
    v_se = x[b, c, t, y0 + 1, x0 + 1] if in_y1 and in_x1 else z
    return v_nw, v_ne, v_sw, v_se


@njit(parallel=True, cache=True)
def fwd(x, flow, weight, has_w, eps, border, out_map, write_map):
    """Per-pair sums of ``w * rho`` (float64, shape ``(B * (T-1),)``); fills ``out_map``
    ``(B, C, T-1, H, W)`` too when ``write_map``."""
    b_, c_, t_, h, w = x.shape
    eps2 = np.float32(eps) * np.float32(eps)
    sums = np.zeros(b_ * (t_ - 1), np.float64)
    for n in prange(b_ * (t_ - 1)):
        b = n // (t_ - 1)
        t = n % (t_ - 1)
        acc = 0.0
        for i in range(h):
            for j in range(w):
                x0, y0, ax, bx, ay, by, _, _ = _coords(i, j, flow[b, 0, t, i, j],
                                                       flow[b, 1, t, i, j], h, w, border)
                inside = 0 <= x0 and x0 + 1 < w and 0 <= y0 and y0 + 1 < h
                wt = weight[b, 0, t, i, j] if has_w else _F1
                for c in range(c_):
                    v_nw, v_ne, v_sw, v_se = _corners(x, b, c, t + 1, x0, y0, h, w, inside)
                    warped = v_nw * (ax * ay) + v_ne * (bx * ay) + v_sw * (ax * by) + v_se * (
                        bx * by)
                    d = x[b, c, t, i, j] - warped
                    r = np.sqrt(d * d + eps2) * wt
                    acc += r
                    if write_map:
                        out_map[b, c, t, i, j] = r
        sums[n] = acc
    return sums


@njit(parallel=True, cache=True)
def bwd(x, flow, weight, has_w, grad, g_scalar, eps, border, grad_x, dflow, dx):
    """Fill ``dflow (B, 2, T-1, H, W)`` and, when ``grad_x``, ``dx (B, C, T, H, W)`` (zeroed by
    the caller).

    ``grad`` is ``d loss / d (w * rho)``: shape ``(1, 1, 1, 1, 1)`` when ``g_scalar``, else the
    full map. Returns the per-pair sums of ``w * rho`` like :func:`fwd` (they come for free, so a
    mean loss and its gradient need one pass). Pair ``t`` writes frames ``t`` and ``t + 1`` of
    ``dx``, so pairs ``t`` and ``t + 2`` never collide: even pairs run in parallel, then odd ones.
    """
    b_, _, t_, _, _ = x.shape
    eps2 = np.float32(eps) * np.float32(eps)
    sums = np.zeros(b_ * (t_ - 1), np.float64)
    for phase in range(2):
        m = (t_ - phase) // 2  # pairs t in [0, T-2] with t % 2 == phase
        for n in prange(b_ * m):
            b = n // m
            t = 2 * (n % m) + phase
            sums[b * (t_ - 1) + t] = _pair_bwd(x, flow, weight, has_w, grad, g_scalar, eps2,
                                               border, grad_x, dflow, dx, b, t)
    return sums


@njit(cache=True, inline="always")
def _pair_bwd(x, flow, weight, has_w, grad, g_scalar, eps2, border, grad_x, dflow, dx, b, t):
    """Gradients of frame pair ``(b, t)``; returns its sum of ``w * rho``."""
    _, c_, _, h, w = x.shape
    acc = 0.0
    for i in range(h):
        for j in range(w):
            x0, y0, ax, bx, ay, by, cgx, cgy = _coords(i, j, flow[b, 0, t, i, j],
                                                       flow[b, 1, t, i, j], h, w, border)
            inside = 0 <= x0 and x0 + 1 < w and 0 <= y0 and y0 + 1 < h
            wt = weight[b, 0, t, i, j] if has_w else _F1
            gix = np.float32(0.0)
            giy = np.float32(0.0)
            for c in range(c_):
                v_nw, v_ne, v_sw, v_se = _corners(x, b, c, t + 1, x0, y0, h, w, inside)
                warped = v_nw * (ax * ay) + v_ne * (bx * ay) + v_sw * (ax * by) + v_se * (
                    bx * by)
                d = x[b, c, t, i, j] - warped
                rho = np.sqrt(d * d + eps2)
                acc += rho * wt
                go = grad[0, 0, 0, 0, 0] if g_scalar else grad[b, c, t, i, j]
                g = go * d / rho * wt
                gix -= g * ((v_ne - v_nw) * ay + (v_se - v_sw) * by)
                giy -= g * ((v_sw - v_nw) * ax + (v_se - v_ne) * bx)
                if grad_x:
                    dx[b, c, t, i, j] += g
                    if inside:
                        dx[b, c, t + 1, y0, x0] -= g * (ax * ay)
                        dx[b, c, t + 1, y0, x0 + 1] -= g * (bx * ay)
                        dx[b, c, t + 1, y0 + 1, x0] -= g * (ax * by)
                        dx[b, c, t + 1, y0 + 1, x0 + 1] -= g * (bx * by)
                    else:
                        _scatter_edge(dx, b, c, t + 1, x0, y0, h, w, g, ax, bx, ay, by)
            dflow[b, 0, t, i, j] = gix * cgx
            dflow[b, 1, t, i, j] = giy * cgy
    return acc


@njit(cache=True, inline="always")
def _scatter_edge(out, b, c, t, x0, y0, h, w, g, ax, bx, ay, by):
    """The bilinear scatter of ``-g`` into ``out[b, c, t]`` with per-corner bounds checks."""
    if 0 <= y0 < h:
        if 0 <= x0 < w:
            out[b, c, t, y0, x0] -= g * (ax * ay)
        if 0 <= x0 + 1 < w:
            out[b, c, t, y0, x0 + 1] -= g * (bx * ay)
    if 0 <= y0 + 1 < h:
        if 0 <= x0 < w:
            out[b, c, t, y0 + 1, x0] -= g * (ax * by)
        if 0 <= x0 + 1 < w:
            out[b, c, t, y0 + 1, x0 + 1] -= g * (bx * by)


def _f32(t: Tensor):  # noqa: ANN202 - numpy array
    """C-contiguous fp32 numpy view (a copy only when needed)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def launch_fwd(x: Tensor, flow: Tensor, weight: Tensor | None, eps: float, border: bool,
               mean: bool) -> Tensor:
    """Host launcher of :func:`fwd` on torch tensors: the mean (0-dim) or the map, in
    ``x.dtype``."""
    b, c, t, h, w = x.shape
    out = np.empty((b, c, t - 1, h, w) if not mean else (1, 1, 1, 1, 1), np.float32)
    wa = _f32(weight) if weight is not None else out
    sums = fwd(_f32(x), _f32(flow), wa, weight is not None, eps, border, out, not mean)
    if mean:
        return torch.tensor(sums.sum() / (b * c * (t - 1) * h * w), dtype=x.dtype)
    return torch.from_numpy(out).to(x.dtype)


def launch_bwd(grad: Tensor, x: Tensor, flow: Tensor, weight: Tensor | None, eps: float,
               border: bool, grad_x: bool) -> tuple[Tensor, Tensor | None, float]:
    """Host launcher of :func:`bwd` on torch tensors: fp32 ``(dflow, dx or None, sum of
    w * rho)``."""
    b, c, t, h, w = x.shape
    dummy = np.zeros((1, 1, 1, 1, 1), np.float32)
    g_scalar = grad.numel() == 1
    ga = _f32(grad.reshape(1, 1, 1, 1, 1) if g_scalar else grad)
    dflow = np.empty((b, 2, t - 1, h, w), np.float32)
    dx = np.zeros((b, c, t, h, w), np.float32) if grad_x else dummy
    wa = _f32(weight) if weight is not None else dummy
    sums = bwd(_f32(x), _f32(flow), wa, weight is not None, ga, g_scalar, eps, border, grad_x,
               dflow, dx)
    return torch.from_numpy(dflow), torch.from_numpy(dx) if grad_x else None, float(sums.sum())
