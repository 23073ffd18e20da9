"""Flow-warping loss kernels: ``mean(w * sqrt((x_t - warp(x_{t+1}, u_t))^2 + eps^2))``.

Layout: one program handles ``BLOCK`` pixels of one frame pair ``(b, t)`` and loops over the
channels, so the flow, the weight and the bilinear corner indices are loaded and computed once per
pixel. Every ``(H, W)`` plane must be contiguous (row stride ``W``, column stride 1); the batch,
channel and time strides are passed explicitly. Sampling replicates ``grid_sample``'s
``align_corners=True`` arithmetic in fp32 (``flow_to_grid``'s normalisation, done as torch does
it on the device: IEEE division on CPU, multiplication by the fp32 reciprocal without FMA on
CUDA, then ``grid_sample``'s unnormalisation), so the cell chosen at integer positions, and hence
the one-sided gradient there, is the reference's (checked on CPU and on an H100).

- ``_fwd_kernel``: the per-pixel Charbonnier map or one fp32 partial sum per program.
- ``_bwd_kernel``: ``d loss / d flow`` (a gather: no atomics) and, optionally, ``d loss / d x``
  (a bilinear scatter into frame ``t + 1``: fp32 atomics, or int64 fixed-point atomics that make it
  bitwise reproducible) and the loss partial sums (``WITH_LOSS``: a mean and its gradient in one
  pass). How the scatter is laid out on a GPU is :data:`DX_MODE`'s choice.

No autograd here: :mod:`vosgan.ops.flow_warp` wraps these launchers into a PyTorch op.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl
from vosgan.kernels._host import MAX_GRID_YZ, cdiv, next_power_of_2

#: How the backward scatters ``d loss / d x`` on a GPU (``VOSGAN_FLOW_WARP_DX`` sets it for a
#: process):
#: - ``"loop"``: the kernel loops over channels with one scalar fp32 atomic per corner, 512 pixels
#:   per 4-warp program (4 per thread). Compiled for sm_90, the atomics' layouts differ from the
#:   loads' and Triton moves values between them through shared memory: 25 shared stores and 19
#:   barriers in the PTX (26 and 20 with Triton 3.6). The measured default.
#: - ``"loop-1px"``: the same code, 256 pixels per 8-warp program (one per thread): no shared
#:   memory but the loss reduction's.
#: - ``"rgb-vec"``: for C == 3 (fp32 atomics), one 4-wide atomic per corner and pixel (the three
#:   channels and a zero; ``red.global.add.v4.f32`` on sm_90) into a channels-last
#:   ``(B, T, H*W, 4)`` buffer, then one strided copy back to ``(B, C, T, H, W)``; one pixel per
#:   thread as ``"loop-1px"``. Other C, the deterministic mode and GPUs before sm_90 run
#:   ``"loop-1px"``.
#: The last two are not timed on a GPU yet: ``bench_flow_warp.py`` times them as the
#: ``fused-dx-1px`` and ``fused-dx-rgbvec`` providers.
DX_MODES = ("loop", "loop-1px", "rgb-vec")
DX_MODE = os.environ.get("VOSGAN_FLOW_WARP_DX", "loop")
if DX_MODE not in DX_MODES:
    raise ValueError(f"VOSGAN_FLOW_WARP_DX must be one of {DX_MODES}, got {DX_MODE!r}")


@triton.jit
def _coords(
    p, ux, uy, W, H, half_wm1, half_hm1, wm1, hm1, BORDER: tl.constexpr, RECIP: tl.constexpr
):
    """Pixel coordinates sampled by pixel ``p``, corners, bilinear weights and clip gradients."""
    i = p // W
    j = p - i * W
    # grid_sample(align_corners=True) on flow_to_grid's grid, as the reference rounds it: torch
    # divides by a Python scalar with an IEEE division on CPU and multiplies by its fp32
    # reciprocal on CUDA (RECIP: wm1/hm1 then hold the reciprocals; launched without FMA fusion).
    if RECIP:
        gx = (2.0 * (j.to(tl.float32) + ux)) * wm1 - 1.0
        gy = (2.0 * (i.to(tl.float32) + uy)) * hm1 - 1.0
    else:
        gx = tl.math.div_rn(2.0 * (j.to(tl.float32) + ux), wm1) - 1.0
        gy = tl.math.div_rn(2.0 * (i.to(tl.float32) + uy), hm1) - 1.0
    ix = (gx + 1.0) * half_wm1
    iy = (gy + 1.0) * half_hm1
    # A non-finite position (nan; or +-inf with zeros padding, which grid_sample turns into nan,
    # while border padding clamps it) gives nan weights, hence a nan loss and gradient as in the
    # reference, sampled at (-2, -2): every corner off the frame, so nothing is loaded or
    # scattered there.
    if BORDER:
        ok = (ix == ix) & (iy == iy)
    else:
        ok = (ix - ix == 0.0) & (iy - iy == 0.0)
    if BORDER:
        # Borders count as out of bounds for the gradient, as in grid_sample.
        cgx = tl.where((ix > 0.0) & (ix < 2.0 * half_wm1), 1.0, 0.0)
        cgy = tl.where((iy > 0.0) & (iy < 2.0 * half_hm1), 1.0, 0.0)
        ix = tl.minimum(tl.maximum(ix, 0.0), 2.0 * half_wm1)
        iy = tl.minimum(tl.maximum(iy, 0.0), 2.0 * half_hm1)
    else:
        # Clamping far outside changes nothing (every corner stays outside) but keeps ints small.
        cgx = tl.full(ix.shape, 1.0, tl.float32)
        cgy = tl.full(iy.shape, 1.0, tl.float32)
        ix = tl.minimum(tl.maximum(ix, -2.0), W + 1.0)
        iy = tl.minimum(tl.maximum(iy, -2.0), H + 1.0)
    ix = tl.where(ok, ix, -2.0)
    iy = tl.where(ok, iy, -2.0)
    poison = tl.where(ok, 0.0, float("nan"))
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    ax = (x0f + 1.0) - ix + poison
    bx = ix - x0f + poison
    ay = (y0f + 1.0) - iy + poison
    by = iy - y0f + poison
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    return x0, y0, ax, bx, ay, by, cgx, cgy


@triton.jit
def _corners(x0, y0, W, H, pm):
    """Flat in-plane offsets and in-bounds masks of the four corners (zero padding)."""
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x0 >= -1) & (x0 < W - 1)
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y0 >= -1) & (y0 < H - 1)
    o_nw = y0 * W + x0
    return o_nw, pm & vy0 & vx0, pm & vy0 & vx1, pm & vy1 & vx0, pm & vy1 & vx1


@triton.jit
def _load_channel(xt_base, c, x_sc, x_st, p, pm, o_nw, m_nw, m_ne, m_sw, m_se, W):
    """Channel ``c``, in fp32: ``x_t`` at the pixels and ``x_{t+1}`` at their four bilinear
    corners (0 where a corner is off the frame)."""
    ch = tl.cast(c, tl.int64) * x_sc  # 64-bit: a channel-major view's c * stride > 2**31
    xt = tl.load(xt_base + ch + p, mask=pm, other=0.0).to(tl.float32)
    n_base = xt_base + x_st + ch + o_nw
    v_nw = tl.load(n_base, mask=m_nw, other=0.0).to(tl.float32)
    v_ne = tl.load(n_base + 1, mask=m_ne, other=0.0).to(tl.float32)
    v_sw = tl.load(n_base + W, mask=m_sw, other=0.0).to(tl.float32)
    v_se = tl.load(n_base + W + 1, mask=m_se, other=0.0).to(tl.float32)
    return xt, v_nw, v_ne, v_sw, v_se


@triton.jit
def _fwd_kernel(
    x_ptr,
    flow_ptr,
    w_ptr,
    out_ptr,
    C,
    Tm1,
    H,
    W,
    HW,
    x_sb,
    x_sc,
    x_st,
    f_sb,
    f_sc,
    f_st,
    w_sb,
    w_st,
    o_sb,
    o_sc,
    o_st,
    half_wm1,
    half_hm1,
    wm1,
    hm1,
    eps2,
    HAS_W: tl.constexpr,
    BORDER: tl.constexpr,
    REDUCE: tl.constexpr,
    RECIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bt = tl.program_id(1)
    b = (pid_bt // Tm1).to(tl.int64)
    t = (pid_bt % Tm1).to(tl.int64)
    p = pid_p * BLOCK + tl.arange(0, BLOCK)
    pm = p < HW
    # Per-pixel work shared by all channels: flow, weight, corners.
    f_base = flow_ptr + b * f_sb + t * f_st
    ux = tl.load(f_base + p, mask=pm, other=0.0).to(tl.float32)
    uy = tl.load(f_base + f_sc + p, mask=pm, other=0.0).to(tl.float32)
    x0, y0, ax, bx, ay, by, _cgx, _cgy = _coords(
        p, ux, uy, W, H, half_wm1, half_hm1, wm1, hm1, BORDER, RECIP
    )
    o_nw, m_nw, m_ne, m_sw, m_se = _corners(x0, y0, W, H, pm)
    if HAS_W:
        wt = tl.load(w_ptr + b * w_sb + t * w_st + p, mask=pm, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    xt_base = x_ptr + b * x_sb + t * x_st
    for c in range(C):
        # Charbonnier of x_t minus the bilinear sample of x_{t+1}, in fp32.
        xt, v_nw, v_ne, v_sw, v_se = _load_channel(
            xt_base, c, x_sc, x_st, p, pm, o_nw, m_nw, m_ne, m_sw, m_se, W
        )
        warped = v_nw * (ax * ay) + v_ne * (bx * ay) + v_sw * (ax * by) + v_se * (bx * by)
        d = xt - warped
        r = tl.sqrt_rn(d * d + eps2)
        if HAS_W:
            r = r * wt
        if REDUCE:
            acc += tl.where(pm, r, 0.0)
        else:
            o = out_ptr + b * o_sb + tl.cast(c, tl.int64) * o_sc + t * o_st + p
            tl.store(o, r.to(out_ptr.dtype.element_ty), mask=pm)
    if REDUCE:
        tl.store(out_ptr + pid_bt * tl.num_programs(0) + pid_p, tl.sum(acc, axis=0))


@triton.jit
def _bwd_channel(
    c,
    xt_base,
    x_sc,
    x_st,
    p,
    pm,
    o_nw,
    m_nw,
    m_ne,
    m_sw,
    m_se,
    W,
    ax,
    bx,
    ay,
    by,
    wt,
    g_ptr,
    g_s,
    g_off,
    g_sc,
    eps2,
    HAS_W: tl.constexpr,
    G_SCALAR: tl.constexpr,
):
    """Channel ``c`` of ``BLOCK`` pixels: ``(g, d/dix, d/diy, w * rho)`` with ``g = dL/d(x_t -
    warped)`` (0 off the plane), the sample-position derivatives not yet summed over channels."""
    xt, v_nw, v_ne, v_sw, v_se = _load_channel(
        xt_base, c, x_sc, x_st, p, pm, o_nw, m_nw, m_ne, m_sw, m_se, W
    )
    warped = v_nw * (ax * ay) + v_ne * (bx * ay) + v_sw * (ax * by) + v_se * (bx * by)
    d = xt - warped
    # g = dL/dd = grad * w * rho'(d); dL/dwarped = -g.
    if G_SCALAR:
        go = g_s
    else:
        g_c = g_ptr + g_off + tl.cast(c, tl.int64) * g_sc
        go = tl.load(g_c + p, mask=pm, other=0.0).to(tl.float32)
    rho = tl.sqrt_rn(d * d + eps2)
    g = go * d / rho
    if HAS_W:
        g = g * wt
        rho = rho * wt
    g = tl.where(pm, g, 0.0)
    # Bilinear derivative w.r.t. the sample position (grid_sample's one-sided convention).
    dix = g * ((v_ne - v_nw) * ay + (v_se - v_sw) * by)
    diy = g * ((v_sw - v_nw) * ax + (v_se - v_ne) * bx)
    return g, dix, diy, tl.where(pm, rho, 0.0)


@triton.jit
def _bwd_kernel(
    x_ptr,
    flow_ptr,
    w_ptr,
    g_ptr,
    dflow_ptr,
    dx_ptr,
    qscale_ptr,
    loss_ptr,
    C,
    Tm1,
    H,
    W,
    HW,
    x_sb,
    x_sc,
    x_st,
    f_sb,
    f_sc,
    f_st,
    w_sb,
    w_st,
    g_sb,
    g_sc,
    g_st,
    df_sb,
    df_sc,
    df_st,
    dx_sb,
    dx_sc,
    dx_st,
    half_wm1,
    half_hm1,
    wm1,
    hm1,
    eps2,
    gx_scale,
    gy_scale,
    HAS_W: tl.constexpr,
    BORDER: tl.constexpr,
    G_SCALAR: tl.constexpr,
    GRAD_X: tl.constexpr,
    FIXED_POINT: tl.constexpr,
    WITH_LOSS: tl.constexpr,
    RECIP: tl.constexpr,
    RGB_VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``RGB_VEC`` (C == 3, fp32 atomics): ``dx_ptr`` is a channels-last ``(B, T, H*W, 4)`` fp32
    buffer (``dx_sc`` unused) and each corner of a pixel takes one 4-wide atomic for its three
    channels and a zero (``red.global.add.v4.f32`` on sm_90) instead of three."""
    pid_p = tl.program_id(0)
    pid_bt = tl.program_id(1)
    b = (pid_bt // Tm1).to(tl.int64)
    t = (pid_bt % Tm1).to(tl.int64)
    p = pid_p * BLOCK + tl.arange(0, BLOCK)
    pm = p < HW
    f_base = flow_ptr + b * f_sb + t * f_st
    ux = tl.load(f_base + p, mask=pm, other=0.0).to(tl.float32)
    uy = tl.load(f_base + f_sc + p, mask=pm, other=0.0).to(tl.float32)
    x0, y0, ax, bx, ay, by, cgx, cgy = _coords(
        p, ux, uy, W, H, half_wm1, half_hm1, wm1, hm1, BORDER, RECIP
    )
    o_nw, m_nw, m_ne, m_sw, m_se = _corners(x0, y0, W, H, pm)
    wt = 1.0
    if HAS_W:
        wt = tl.load(w_ptr + b * w_sb + t * w_st + p, mask=pm, other=0.0).to(tl.float32)
    g_s = 0.0
    if G_SCALAR:
        g_s = tl.load(g_ptr).to(tl.float32)
    xt_base = x_ptr + b * x_sb + t * x_st
    g_off = b * g_sb + t * g_st
    dx_base = dx_ptr + b * dx_sb + t * dx_st
    corner = (xt_base, x_sc, x_st, p, pm, o_nw, m_nw, m_ne, m_sw, m_se, W, ax, bx, ay, by, wt)
    if RGB_VEC:
        g0, ix0, iy0, r0 = _bwd_channel(0, *corner, g_ptr, g_s, g_off, g_sc, eps2, HAS_W, G_SCALAR)
        g1, ix1, iy1, r1 = _bwd_channel(1, *corner, g_ptr, g_s, g_off, g_sc, eps2, HAS_W, G_SCALAR)
        g2, ix2, iy2, r2 = _bwd_channel(2, *corner, g_ptr, g_s, g_off, g_sc, eps2, HAS_W, G_SCALAR)
        gix = -(ix0 + ix1 + ix2)
        giy = -(iy0 + iy1 + iy2)
        acc = r0 + r1 + r2
        if GRAD_X:
            # (BLOCK, 4): channels 0, 1, 2 and a zero, all in the thread that owns the pixel
            # (join adds a dimension inside each thread), so the scatter needs no shuffle.
            # join(a, b) stacks on a new last axis: the (BLOCK, 2, 2) tile holds g0, g1 in its
            # first row and g2, 0 in its second, which the reshape reads in that order.
            g4 = tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, tl.zeros_like(g1))), (BLOCK, 4))
            c4 = tl.arange(0, 4)[None, :]
            d_cur = dx_base + p[:, None] * 4 + c4
            d_nw = dx_base + dx_st + o_nw[:, None] * 4 + c4
            tl.atomic_add(d_cur, g4, mask=pm[:, None], sem="relaxed")
            tl.atomic_add(d_nw, -g4 * (ax * ay)[:, None], mask=m_nw[:, None], sem="relaxed")
            tl.atomic_add(d_nw + 4, -g4 * (bx * ay)[:, None], mask=m_ne[:, None], sem="relaxed")
            tl.atomic_add(d_nw + W * 4, -g4 * (ax * by)[:, None], mask=m_sw[:, None], sem="relaxed")
            tl.atomic_add(
                d_nw + (W + 1) * 4, -g4 * (bx * by)[:, None], mask=m_se[:, None], sem="relaxed"
            )
    else:
        if FIXED_POINT:
            qscale = tl.load(qscale_ptr)
        gix = tl.zeros((BLOCK,), tl.float32)
        giy = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK,), tl.float32)
        for c in range(C):
            g, dix, diy, rho = _bwd_channel(
                c, *corner, g_ptr, g_s, g_off, g_sc, eps2, HAS_W, G_SCALAR
            )
            gix -= dix
            giy -= diy
            acc += rho
            if GRAD_X:
                # x_t gets g; x_{t+1} gets -g spread over the four corners.
                ch = tl.cast(c, tl.int64) * dx_sc
                d_cur = dx_base + ch + p
                d_nw = dx_base + dx_st + ch + o_nw
                if FIXED_POINT:
                    tl.atomic_add(d_cur, (g * qscale).to(tl.int64), mask=pm, sem="relaxed")
                    tl.atomic_add(
                        d_nw, (-g * (ax * ay) * qscale).to(tl.int64), mask=m_nw, sem="relaxed"
                    )
                    tl.atomic_add(
                        d_nw + 1, (-g * (bx * ay) * qscale).to(tl.int64), mask=m_ne, sem="relaxed"
                    )
                    tl.atomic_add(
                        d_nw + W, (-g * (ax * by) * qscale).to(tl.int64), mask=m_sw, sem="relaxed"
                    )
                    tl.atomic_add(
                        d_nw + W + 1,
                        (-g * (bx * by) * qscale).to(tl.int64),
                        mask=m_se,
                        sem="relaxed",
                    )
                else:
                    tl.atomic_add(d_cur, g, mask=pm, sem="relaxed")
                    tl.atomic_add(d_nw, -g * (ax * ay), mask=m_nw, sem="relaxed")
                    tl.atomic_add(d_nw + 1, -g * (bx * ay), mask=m_ne, sem="relaxed")
                    tl.atomic_add(d_nw + W, -g * (ax * by), mask=m_sw, sem="relaxed")
                    tl.atomic_add(d_nw + W + 1, -g * (bx * by), mask=m_se, sem="relaxed")
    # Chain rule through flow_to_grid and the clip (1 inside, 0 at/outside a border).
    df = dflow_ptr + b * df_sb + t * df_st + p
    tl.store(df, (gix * cgx * gx_scale).to(dflow_ptr.dtype.element_ty), mask=pm)
    tl.store(df + df_sc, (giy * cgy * gy_scale).to(dflow_ptr.dtype.element_ty), mask=pm)
    if WITH_LOSS:  # the loss itself is free here: one pass for a mean and its gradient
        tl.store(loss_ptr + pid_bt * tl.num_programs(0) + pid_p, tl.sum(acc, axis=0))


@functools.cache
def _f32_vector_atomics(device: torch.device) -> bool:
    """Whether ``device`` has 4-wide fp32 atomics (sm_90 and later; the interpreter: yes). On
    sm_80 Triton splits the ``rgb-vec`` scatter into scalar atomics in another layout than the
    loads', which costs shared-memory round trips, so ``"loop-1px"`` runs there instead."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _launch(hw: int, device: torch.device) -> dict:
    """BLOCK, num_warps and the FMA policy: 512 pixels per program on a GPU; one program per
    frame pair in the interpreter (about 0.4 ms per program there, whatever its size)."""
    if device.type == "cuda":
        return {"BLOCK": 512, "num_warps": 4, "RECIP": True, "enable_fp_fusion": False}
    return {"BLOCK": min(next_power_of_2(hw), 4096), "num_warps": 4, "RECIP": False}


def _geometry(h: int, w: int, eps: float, recip: bool) -> dict[str, float]:
    wm1, hm1 = np.float32(max(w - 1, 1)), np.float32(max(h - 1, 1))
    if recip:  # torch's CUDA division by a scalar: a * (1 / b), the reciprocal rounded to fp32
        wm1, hm1 = np.float32(1) / wm1, np.float32(1) / hm1
    return {
        "half_wm1": (w - 1) * 0.5,
        "half_hm1": (h - 1) * 0.5,
        "wm1": float(wm1),
        "hm1": float(hm1),
        "eps2": float(eps) ** 2,
    }


def check_frame_pairs(b: int, t: int) -> None:
    """Refuse more frame pairs (B * (T-1), the grid's y axis) than one launch holds."""
    if b * (t - 1) > MAX_GRID_YZ:
        raise ValueError(
            f"flow_warp_loss: B * (T-1) = {b} * {t - 1} frame pairs exceed the {MAX_GRID_YZ} "
            "a CUDA grid's y axis holds; split the batch or use impl='reference'"
        )


def _plane_contiguous(t: torch.Tensor, name: str) -> None:
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError(f"{name}: each (H, W) plane must be contiguous, got strides {t.stride()}")


def flow_warp_loss_fwd(
    x: torch.Tensor,
    flow: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    border: bool,
    reduce: bool,
) -> torch.Tensor:
    """Forward launcher.

    Args: ``x (B, C, T, H, W)``, ``flow (B, 2, T-1, H, W)``, ``weight (B, 1, T-1, H, W)`` or None.

    Returns:
        ``reduce=True``: fp32 partial sums of ``w * rho``, one per program (sum them for the total);
        ``reduce=False``: the map ``w * rho`` ``(B, C, T-1, H, W)`` in ``x.dtype``.
    """
    b, c, t, h, w = x.shape
    for name, ten in (("x", x), ("flow", flow), ("weight", weight)):
        if ten is not None:
            _plane_contiguous(ten, name)
    hw = h * w
    cfg = _launch(hw, x.device)
    check_frame_pairs(b, t)
    grid = (cdiv(hw, cfg["BLOCK"]), b * (t - 1))
    if reduce:
        out = torch.empty(grid[0] * grid[1], device=x.device, dtype=torch.float32)
        o_strides = (0, 0, 0)
    else:
        out = torch.empty((b, c, t - 1, h, w), device=x.device, dtype=x.dtype)
        o_strides = (out.stride(0), out.stride(1), out.stride(2))
    wt = weight if weight is not None else flow
    _fwd_kernel[grid](
        x,
        flow,
        wt,
        out,
        c,
        t - 1,
        h,
        w,
        hw,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        flow.stride(0),
        flow.stride(1),
        flow.stride(2),
        wt.stride(0),
        wt.stride(2),
        *o_strides,
        **_geometry(h, w, eps, cfg["RECIP"]),
        HAS_W=weight is not None,
        BORDER=border,
        REDUCE=reduce,
        **cfg,
    )
    return out


def flow_warp_loss_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    flow: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    border: bool,
    grad_x: bool,
    deterministic: bool = False,
    with_loss: bool = False,
    fp32_grads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher.

    Args:
        grad: ``d loss / d (w * rho)`` per element: a one-element tensor (the mean's incoming
            gradient divided by the element count) or a map ``(B, C, T-1, H, W)``.
        grad_x: also compute ``d loss / d x``.
        deterministic: accumulate ``d loss / d x`` in int64 fixed point (integer atomics are
            associative, so the result is bitwise reproducible); else fp32 atomics.
        with_loss: also return the fp32 partial sums of ``w * rho`` (as the forward launcher).
        fp32_grads: return both gradients in fp32 instead of the input dtypes.

    Returns:
        ``(dflow (B, 2, T-1, H, W) in flow.dtype, dx (B, C, T, H, W) in x.dtype or None,
        partial sums or None)``.
    """
    b, c, t, h, w = x.shape
    for name, ten in (("x", x), ("flow", flow), ("weight", weight), ("grad", grad)):
        if ten is not None and ten.dim() == 5:
            _plane_contiguous(ten, name)
    hw = h * w
    cfg = _launch(hw, x.device)
    rgb_vec = grad_x and c == 3 and not deterministic and DX_MODE == "rgb-vec"
    rgb_vec = rgb_vec and _f32_vector_atomics(x.device)
    if grad_x and x.device.type == "cuda" and DX_MODE != "loop":  # one pixel per thread
        cfg.update(BLOCK=256, num_warps=8)
    check_frame_pairs(b, t)
    grid = (cdiv(hw, cfg["BLOCK"]), b * (t - 1))
    g_scalar = grad.numel() == 1
    g_strides = (0, 0, 0) if g_scalar else (grad.stride(0), grad.stride(1), grad.stride(2))
    dflow = torch.empty(
        flow.shape, device=x.device, dtype=torch.float32 if fp32_grads else flow.dtype
    )
    partial = (
        torch.empty(grid[0] * grid[1], device=x.device, dtype=torch.float32) if with_loss else None
    )
    qscale = None
    if not grad_x:
        dx_acc = flow  # never written (GRAD_X=False)
    elif rgb_vec:  # channels last, padded to 4: (B, T, H*W, 4)
        dx_acc = torch.zeros((b, t, hw, 4), device=x.device, dtype=torch.float32)
    elif deterministic:
        # Fixed-point scale: a power of two leaving room for HW + 1 contributions of max |g|
        # (|rho'| <= 1) in int64, i.e. about 2^-50 of max |g| per unit at 64x64.
        gmax = grad.detach().abs().amax().float()
        if weight is not None:
            gmax = gmax * weight.detach().abs().amax().float()
        room = 2.0**62 / (hw + 1)  # a Python scalar: no host-to-GPU copy (CUDA graphs)
        qscale = torch.exp2(torch.floor(torch.log2(room / gmax.clamp_min(1e-30)))).clamp(max=2**62)
        dx_acc = torch.zeros(x.shape, device=x.device, dtype=torch.int64)
    else:
        dx_acc = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    # (batch, channel, frame) element strides; the RGB_VEC buffer's channel stride is 1 (unused)
    st = dx_acc.stride()
    dx_strides = (st[0], 0, st[1]) if rgb_vec else st[:3]
    wt = weight if weight is not None else flow
    gx_scale = 1.0 if w > 1 else 0.0  # W == 1: grid_sample samples column 0 whatever the flow
    gy_scale = 1.0 if h > 1 else 0.0
    _bwd_kernel[grid](
        x,
        flow,
        wt,
        grad,
        dflow,
        dx_acc,
        qscale if qscale is not None else grad,
        partial if partial is not None else grad,
        c,
        t - 1,
        h,
        w,
        hw,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        flow.stride(0),
        flow.stride(1),
        flow.stride(2),
        wt.stride(0),
        wt.stride(2),
        *g_strides,
        dflow.stride(0),
        dflow.stride(1),
        dflow.stride(2),
        *dx_strides,
        **_geometry(h, w, eps, cfg["RECIP"]),
        gx_scale=gx_scale,
        gy_scale=gy_scale,
        HAS_W=weight is not None,
        BORDER=border,
        G_SCALAR=g_scalar,
        GRAD_X=grad_x,
        FIXED_POINT=grad_x and deterministic,
        WITH_LOSS=with_loss,
        RGB_VEC=rgb_vec,
        **cfg,
    )
    dx_dtype = torch.float32 if fp32_grads else x.dtype
    if not grad_x:
        dx = None
    elif rgb_vec:  # back to (B, C, T, H, W) in one strided copy
        dx = torch.empty(x.shape, device=x.device, dtype=dx_dtype)
        dx.copy_(dx_acc.view(b, t, h, w, 4)[..., :3].permute(0, 4, 1, 2, 3))
    elif deterministic:
        dx = (dx_acc.double() / qscale.double()).to(dx_dtype)
    else:
        dx = dx_acc if dx_dtype == torch.float32 else dx_acc.to(dx_dtype)
    return dflow, dx, partial
