"""numba CPU kernels of the flow-warping loss (fp32 in, fp32/fp64 accumulation).

Same arithmetic as the Triton kernels (:mod:`vosgan.kernels.flow_warp`): sample positions are
rounded exactly as ``flow_to_grid`` + ``grid_sample(align_corners=True)`` round them in fp32, so
the bilinear cell, and the one-sided derivative at integer positions, is the reference's.

Parallelism is over frame pairs ``(b, t)``; each pair is walked in chunks of ``_CHUNK`` pixels,
each chunk in short loops that LLVM vectorises over pixels (AVX2: 8 lanes): sample positions
(:func:`_coords`), Charbonnier and its gradient (:func:`_rho_fwd`, :func:`_rho_bwd`), with the
corner loads (:func:`_gather`) and the bilinear scatter into ``dx`` (:func:`_dx_chunk`) in scalar
loops of their own. Frame ``t + 1`` is sampled from zero-bordered copies (:func:`_pad`), so no
loop tests bounds. (One fused per-pixel loop ran scalar, about 30 ns per pixel: the gathers, the
scatter and the float64 sum keep LLVM from vectorising it.)

The backward is race-free without atomics or buffers shared between threads: pair ``t`` writes
``dflow[b, :, t]``, ``dx[b, :, t]`` (its direct term) and adds its scatter, summed in a
per-pair padded accumulator, into ``dx[b, :, t + 1]``; even pairs run in parallel, then odd
pairs, so the result is deterministic and independent of the thread count.
All arrays are C-contiguous float32; ``weight`` and ``grad`` are dummies when unused.
:func:`launch_fwd` and :func:`launch_bwd` run them on torch tensors (fp16/bf16 upcast to fp32).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from vosgan.ops._numba.launch import launch

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)

#: Pixels per chunk of a frame pair: the per-chunk scratch rows (about 20 of them) stay in L2,
#: and the vector loops run long enough for LLVM's vectorised body (it needs 48+ iterations).
_CHUNK = 512

#: Zero border of the padded planes: the zeros-mode clamp keeps corners within 2 pixels of the
#: frame (and one more column/row for the far corner).
_PAD = 2

#: Largest ``H * W`` whose pixel rows and columns :func:`_coords` derives exactly in float32.
MAX_PIXELS = 1 << 22

#: Every kernel uses numpy's error model: with Python's, each float division carries a zero test
#: that raises, and LLVM does not vectorise a loop holding it. No division here can be by zero
#: (``rho >= eps > 0``; ``w - 1`` and ``h - 1`` are clamped to 1).
_JIT = {"cache": True, "error_model": "numpy"}


@njit(**_JIT)
def _coords(fx, fy, lo, n, h, w, border, oi, wf):
    """Sample positions of pixels ``lo .. lo + n`` of a plane (vectorised over pixels).

    ``fx, fy``: the chunk's flow, ``(n,)`` slices (an index ``lo + k`` would carry numba's
    negative-index test, which stops LLVM from vectorising). A pixel's row and column come from
    its flat index in float32, exact while ``H * W <= MAX_PIXELS`` (reading them from arrays
    would add runtime alias checks, past whose limit LLVM does not vectorise). Fills
    ``oi (CHUNK,)`` uint32 with the offset of the nw corner in the padded plane (:func:`_pad`)
    and ``wf (10, CHUNK)`` float32 with ``ax, bx, ay, by``, the clip gradients ``cgx, cgy`` and
    the corner weights ``ax * ay, bx * ay, ax * by, bx * by``. The arithmetic is
    ``flow_to_grid`` + ``grid_sample(align_corners=True)``'s, in the same fp32 order.
    """
    wm1 = np.float32(max(w - 1, 1))
    hm1 = np.float32(max(h - 1, 1))
    half_wm1 = np.float32((w - 1) * 0.5)
    half_hm1 = np.float32((h - 1) * 0.5)
    wmax = np.float32(2 * half_wm1)
    hmax = np.float32(2 * half_hm1)
    # zeros padding: far outside, every corner is off the frame already; the clamp keeps all
    # four corners inside the padded plane
    lo_c = _F0 if border else -np.float32(_PAD)
    hix = np.float32(w - 1) if border else np.float32(w - 1 + _PAD)
    hiy = np.float32(h - 1) if border else np.float32(h - 1 + _PAD)
    one_x = _F1 if w > 1 else _F0
    one_y = _F1 if h > 1 else _F0
    wf_ = np.float32(w)
    wp = np.float32(w + 2 * _PAD + 1)
    pad = np.float32(_PAD)
    nan = np.float32(np.nan)
    base = np.float32(lo)
    for k in range(n):
        pf = base + np.float32(np.int32(k))  # int64 -> float32 has no AVX2 instruction
        row = np.floor((pf + np.float32(0.5)) / wf_)  # the fraction is >= 0.5 / w off an int
        col = pf - row * wf_
        gx = (_F2 * (col + fx[k])) / wm1 - _F1
        gy = (_F2 * (row + fy[k])) / hm1 - _F1
        ix = (gx + _F1) * half_wm1
        iy = (gy + _F1) * half_hm1
        cgx = one_x
        cgy = one_y
        if border:  # borders count as out of bounds for the gradient, as in grid_sample
            cgx = one_x if (ix > 0 and ix < wmax) else _F0
            cgy = one_y if (iy > 0 and iy < hmax) else _F0
        # A non-finite position (nan; or +-inf with zeros padding, which grid_sample turns into
        # nan, while border padding clamps it) gives nan weights, hence a nan loss and gradient
        # as in the reference, sampled at (-PAD, -PAD): corners in the zero border, whose
        # scatter is dropped.
        if border:
            ok = (ix == ix) & (iy == iy)
        else:
            ok = (ix - ix == _F0) & (iy - iy == _F0)
        ix = min(max(ix, lo_c), hix) if ok else -pad
        iy = min(max(iy, lo_c), hiy) if ok else -pad
        poison = _F0 if ok else nan
        x0f = np.floor(ix)
        y0f = np.floor(iy)
        ax = (x0f + _F1) - ix + poison
        bx = ix - x0f + poison
        ay = (y0f + _F1) - iy + poison
        by = iy - y0f + poison
        wf[0, k] = ax
        wf[1, k] = bx
        wf[2, k] = ay
        wf[3, k] = by
        wf[4, k] = cgx
        wf[5, k] = cgy
        wf[6, k] = ax * ay
        wf[7, k] = bx * ay
        wf[8, k] = ax * by
        wf[9, k] = bx * by
        # in float32 (exact below 2^24): numba widens int32 arithmetic to int64, which AVX2
        # lacks (no 64-bit min/max/multiply), and that dominated this loop
        oi[k] = np.int32((y0f + pad) * wp + (x0f + pad))


@njit(**_JIT)
def _pad(src, h, w, dst):
    """Copy the ``(H * W,)`` plane ``src`` into the interior of ``dst``, a zero-bordered
    ``(H + 2 * _PAD + 1) x (W + 2 * _PAD + 1)`` plane: every bilinear corner :func:`_coords`
    can produce lands in it, and the ones off the frame read the border's zeros, so the loops
    below need no bounds tests (and give the reference's zeros, even next to inf or nan)."""
    wp = w + 2 * _PAD + 1
    for i in range(h):
        dst[(i + _PAD) * wp + _PAD : (i + _PAD) * wp + _PAD + w] = src[i * w : (i + 1) * w]


@njit(**_JIT)
def _unpad_add(src, h, w, dst):
    """``dst (H * W,) += `` the interior of the padded plane ``src`` (the inverse of
    :func:`_pad`; the border, the scatter's off-frame corners, is dropped)."""
    wp = w + 2 * _PAD + 1
    for i in range(h):
        d = dst[i * w : (i + 1) * w]
        s = src[(i + _PAD) * wp + _PAD : (i + _PAD) * wp + _PAD + w]
        for j in range(w):
            d[j] += s[j]


@njit(**_JIT)
def _gather(xp, oi, wp, v, n):
    """``v[q, k]``: the four corners ``q`` of pixel ``k`` from the padded plane ``xp`` (scalar
    loads: LLVM does not use AVX2 gathers on Zen, so they get a loop of their own and the
    arithmetic stays vectorised). Unsigned offsets skip numba's negative-index fix-up."""
    one = np.uint32(1)
    for k in range(n):
        o = oi[k]
        v[0, k] = xp[o]
        v[1, k] = xp[o + one]
        v[2, k] = xp[o + wp]
        v[3, k] = xp[o + wp + one]


@njit(**_JIT)
def _rho_fwd(xs, v, wt, wf, eps2, r, accv, n):
    """``r[k] = w * rho`` of one channel of the chunk; ``accv[k] += r[k]`` (float64)."""
    for k in range(n):
        warped = v[0, k] * wf[6, k] + v[1, k] * wf[7, k] + v[2, k] * wf[8, k] + v[3, k] * wf[9, k]
        d = xs[k] - warped
        r[k] = np.sqrt(d * d + eps2) * wt[k]
    for k in range(n):  # a loop of its own: the float64 update keeps LLVM off the one above
        accv[k] += r[k]


@njit(**_JIT)
def _rho_bwd(xs, v, wt, go, wf, eps2, r, accv, gix, giy, gb, n):
    """One channel of the chunk: ``r = w * rho`` (added to ``accv``), the per-pixel gradient
    ``gb = go * d / rho * w`` and its flow terms subtracted from ``gix, giy``."""
    for k in range(n):
        v_nw = v[0, k]
        v_ne = v[1, k]
        v_sw = v[2, k]
        v_se = v[3, k]
        warped = v_nw * wf[6, k] + v_ne * wf[7, k] + v_sw * wf[8, k] + v_se * wf[9, k]
        d = xs[k] - warped
        rho = np.sqrt(d * d + eps2)
        wk = wt[k]
        r[k] = rho * wk
        g = go[k] * d / rho * wk
        gix[k] -= g * ((v_ne - v_nw) * wf[2, k] + (v_se - v_sw) * wf[3, k])
        giy[k] -= g * ((v_sw - v_nw) * wf[0, k] + (v_se - v_ne) * wf[1, k])
        gb[k] = g
    for k in range(n):
        accv[k] += r[k]


@njit(**_JIT)
def _dx_chunk(gb, wf, oi, wp, dxs, dp, n):
    """``dx`` of one channel: ``+g`` into frame ``t`` (``dxs``), the bilinear scatter of ``-g``
    into the padded accumulator ``dp`` of frame ``t + 1`` (in pixel order, then nw, ne, sw, se)."""
    for k in range(n):
        dxs[k] += gb[k]
    one = np.uint32(1)
    for k in range(n):
        g = gb[k]
        o = oi[k]
        dp[o] -= g * wf[6, k]
        dp[o + one] -= g * wf[7, k]
        dp[o + wp] -= g * wf[8, k]
        dp[o + wp + one] -= g * wf[9, k]


@njit(**_JIT)
def _dflow_chunk(gix, giy, wf, dfx, dfy, n):
    """``dflow`` of the chunk: the summed flow terms times the clip gradients."""
    for k in range(n):
        dfx[k] = gix[k] * wf[4, k]
    for k in range(n):
        dfy[k] = giy[k] * wf[5, k]


@njit(parallel=True, **_JIT)
def fwd(x, flow, weight, has_w, eps, border, out_map, write_map):
    """Per-pair sums of ``w * rho`` (float64, shape ``(B * (T-1),)``); fills ``out_map``
    ``(B, C, T-1, H, W)`` too when ``write_map``."""
    b_, c_, t_, h, w = x.shape
    hw = h * w
    eps2 = np.float32(eps) * np.float32(eps)
    ch = min(hw, _CHUNK)
    wp = np.uint32(w + 2 * _PAD + 1)
    npad = (h + 2 * _PAD + 1) * (w + 2 * _PAD + 1)
    sums = np.zeros(b_ * (t_ - 1), np.float64)
    for pair in prange(b_ * (t_ - 1)):
        b = pair // (t_ - 1)
        t = pair % (t_ - 1)
        oi = np.empty(ch, np.uint32)
        wf = np.empty((10, ch), np.float32)
        v = np.empty((4, ch), np.float32)
        r = np.empty(ch, np.float32)
        accv = np.zeros(ch, np.float64)
        xp = np.zeros((c_, npad), np.float32)
        for c in range(c_):
            _pad(x[b, c, t + 1].ravel(), h, w, xp[c])
        wt = weight[b, 0, t].ravel() if has_w else np.ones(hw, np.float32)
        for lo in range(0, hw, ch):
            hi = min(lo + ch, hw)
            n = hi - lo
            _coords(
                flow[b, 0, t].ravel()[lo:hi],
                flow[b, 1, t].ravel()[lo:hi],
                lo,
                n,
                h,
                w,
                border,
                oi,
                wf,
            )
            for c in range(c_):
                _gather(xp[c], oi, wp, v, n)
                _rho_fwd(x[b, c, t].ravel()[lo:hi], v, wt[lo:hi], wf, eps2, r, accv, n)
                if write_map:
                    out_map[b, c, t].ravel()[lo:hi] = r[:n]
        sums[pair] = accv.sum()
    return sums


@njit(parallel=True, **_JIT)
def bwd(x, flow, weight, has_w, grad, g_scalar, eps, border, grad_x, dflow, dx):
    """Fill ``dflow (B, 2, T-1, H, W)`` and, when ``grad_x``, ``dx (B, C, T, H, W)`` (zeroed by
    the caller).

    ``grad`` is ``d loss / d (w * rho)``: shape ``(1, 1, 1, 1, 1)`` when ``g_scalar``, else the
    full map. Returns the per-pair sums of ``w * rho`` like :func:`fwd` (they come for free, so a
    mean loss and its gradient need one pass). Pair ``t`` writes frames ``t`` and ``t + 1`` of
    ``dx``, so pairs ``t`` and ``t + 2`` never collide: even pairs run in parallel, then odd ones.
    """
    b_, _, t_, h, w = x.shape
    eps2 = np.float32(eps) * np.float32(eps)
    sums = np.zeros(b_ * (t_ - 1), np.float64)
    for phase in range(2):
        m = (t_ - phase) // 2  # pairs t in [0, T-2] with t % 2 == phase
        for job in prange(b_ * m):
            b = job // m
            t = 2 * (job % m) + phase
            sums[b * (t_ - 1) + t] = _pair_bwd(
                x, flow, weight, has_w, grad, g_scalar, eps2, border, grad_x, dflow, dx, b, t
            )
    return sums


@njit(**_JIT)
def _pair_bwd(x, flow, weight, has_w, grad, g_scalar, eps2, border, grad_x, dflow, dx, b, t):
    """Gradients of frame pair ``(b, t)``, chunk by chunk; returns its sum of ``w * rho``."""
    _, c_, _, h, w = x.shape
    hw = h * w
    ch = min(hw, _CHUNK)
    wp = np.uint32(w + 2 * _PAD + 1)
    npad = (h + 2 * _PAD + 1) * (w + 2 * _PAD + 1)
    oi = np.empty(ch, np.uint32)
    wf = np.empty((10, ch), np.float32)
    v = np.empty((4, ch), np.float32)
    r = np.empty(ch, np.float32)
    gix = np.empty(ch, np.float32)
    giy = np.empty(ch, np.float32)
    gb = np.empty(ch, np.float32)
    accv = np.zeros(ch, np.float64)
    xp = np.zeros((c_, npad), np.float32)
    for c in range(c_):
        _pad(x[b, c, t + 1].ravel(), h, w, xp[c])
    dp = np.zeros((c_, npad) if grad_x else (1, 1), np.float32)
    wt = weight[b, 0, t].ravel() if has_w else np.ones(hw, np.float32)
    gconst = np.full(hw, grad[0, 0, 0, 0, 0]) if g_scalar else gb
    for lo in range(0, hw, ch):
        hi = min(lo + ch, hw)
        n = hi - lo
        _coords(
            flow[b, 0, t].ravel()[lo:hi], flow[b, 1, t].ravel()[lo:hi], lo, n, h, w, border, oi, wf
        )
        gix[:] = 0.0
        giy[:] = 0.0
        for c in range(c_):
            go = gconst[lo:hi] if g_scalar else grad[b, c, t].ravel()[lo:hi]
            _gather(xp[c], oi, wp, v, n)
            _rho_bwd(
                x[b, c, t].ravel()[lo:hi], v, wt[lo:hi], go, wf, eps2, r, accv, gix, giy, gb, n
            )
            if grad_x:
                _dx_chunk(gb, wf, oi, wp, dx[b, c, t].ravel()[lo:hi], dp[c], n)
        _dflow_chunk(gix, giy, wf, dflow[b, 0, t].ravel()[lo:hi], dflow[b, 1, t].ravel()[lo:hi], n)
    if grad_x:
        for c in range(c_):
            _unpad_add(dp[c], h, w, dx[b, c, t + 1].ravel())
    return accv.sum()


def _f32(t: Tensor):  # noqa: ANN202 - numpy array
    """C-contiguous fp32 numpy view (a copy only when needed)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def _check_plane(h: int, w: int) -> None:
    if h * w > MAX_PIXELS:
        raise ValueError(
            f"flow_warp_loss (numba): x frames of {h}x{w} exceed {MAX_PIXELS} "
            "pixels; use impl='reference'"
        )


def launch_fwd(
    x: Tensor, flow: Tensor, weight: Tensor | None, eps: float, border: bool, mean: bool
) -> Tensor:
    """Host launcher of :func:`fwd` on torch tensors: the mean (0-dim) or the map, in
    ``x.dtype``."""
    b, c, t, h, w = x.shape
    _check_plane(h, w)
    out = np.empty((b, c, t - 1, h, w) if not mean else (1, 1, 1, 1, 1), np.float32)
    wa = _f32(weight) if weight is not None else out
    sums = launch(fwd, _f32(x), _f32(flow), wa, weight is not None, eps, border, out, not mean)
    if mean:
        return torch.tensor(sums.sum() / (b * c * (t - 1) * h * w), dtype=x.dtype)
    return torch.from_numpy(out).to(x.dtype)


def launch_bwd(
    grad: Tensor,
    x: Tensor,
    flow: Tensor,
    weight: Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
) -> tuple[Tensor, Tensor | None, float]:
    """Host launcher of :func:`bwd` on torch tensors: fp32 ``(dflow, dx or None, sum of
    w * rho)``."""
    b, c, t, h, w = x.shape
    _check_plane(h, w)
    dummy = np.zeros((1, 1, 1, 1, 1), np.float32)
    g_scalar = grad.numel() == 1
    ga = _f32(grad.reshape(1, 1, 1, 1, 1) if g_scalar else grad)
    dflow = np.empty((b, 2, t - 1, h, w), np.float32)
    dx = np.zeros((b, c, t, h, w), np.float32) if grad_x else dummy
    wa = _f32(weight) if weight is not None else dummy
    sums = launch(
        bwd,
        _f32(x),
        _f32(flow),
        wa,
        weight is not None,
        ga,
        g_scalar,
        eps,
        border,
        grad_x,
        dflow,
        dx,
    )
    return torch.from_numpy(dflow), torch.from_numpy(dx) if grad_x else None, float(sums.sum())
