"""Single-launch BatchNorm + activation for small tensors: one program owns a channel block.

For the deep, small blocks of G and D (``(B, 512, 2, 4, 4)``: 0.5-4 M elements) the split kernels
of :mod:`vosgan.kernels.bn_act` (statistics, merge, apply; reduce, apply) are bound by launch
overhead, not bandwidth. Here one program per channel block loops over every row twice:

- forward (training): Chan-merged statistics, then normalise + affine (+ residual) + activation;
- backward: ``sum g`` and ``sum g * xhat``, then ``dy`` (and ``d residual``).

Programs never share a channel, so the two passes need no grid-wide synchronisation. Same
strided ``(B', C, S')`` view, tiles and maths as :mod:`vosgan.kernels.bn_act`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vosgan.kernels.bn_act import (
    RunningUpdate,
    _channel_affine,
    _grad_pre_act,
    _pivot,
    _running_args,
    _strided_like,
    _tile_offsets,
    _update_running,
    view_of,
)

#: the single-launch path runs up to this many elements (see benchmarks/RESULTS.md)
SMALL_NUMEL = 1 << 21
_MIN_PROGRAMS = 64


@triton.jit
def _bn_act_fwd_small_kernel(
    y_ptr,
    r_ptr,
    out_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    rm_ptr,
    rv_ptr,
    C,
    S,
    n_units,
    n_sblocks,
    stride_b,
    stride_c,
    stride_s,
    eps,
    slope,
    momentum,
    unbias,
    CL: tl.constexpr,
    HAS_RES: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Batch statistics of this channel block (and, ``UPDATE``, the running ones), then
    ``out = act(xhat * w + b [+ r])``."""
    pid_c = tl.program_id(0)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    pivot = _pivot(y_ptr, pid_c, C, stride_c, CL, BLOCK_C)  # statistics of y - pivot
    for u in range(0, n_units):  # pass 1: exact tile statistics, Chan-merged
        offs, c, s, cm, sm = _tile_offsets(
            u, n_sblocks, C, S, stride_b, stride_c, stride_s, pid_c, CL, BLOCK_C, BLOCK_S
        )
        mask = cm[:, None] & sm[None, :]
        x = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot[:, None], 0.0)
        n_t = tl.sum(sm.to(tl.float32), axis=0)
        mean_t = tl.sum(x, axis=1) / n_t
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        n_new = cnt + n_t
        delta = mean_t - mean
        mean += delta * (n_t / n_new)
        m2 += tl.sum(d * d, axis=1) + delta * delta * cnt * (n_t / n_new)
        cnt = n_new
    var = m2 / cnt
    mean += pivot
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    tl.store(mean_ptr + c, mean, mask=cm)
    tl.store(var_ptr + c, var, mask=cm)
    if UPDATE:
        _update_running(rm_ptr, rv_ptr, c, cm, mean, var, momentum, unbias)
    scale = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32) / tl.sqrt(var + eps)
    shift = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32) - mean * scale
    for u in range(0, n_units):  # pass 2: normalise, affine, residual, activation
        offs, c, s, cm, sm = _tile_offsets(
            u, n_sblocks, C, S, stride_b, stride_c, stride_s, pid_c, CL, BLOCK_C, BLOCK_S
        )
        mask = cm[:, None] & sm[None, :]
        z = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = z * scale[:, None] + shift[:, None]
        if HAS_RES:
            z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + offs, tl.where(z > 0, z, z * slope).to(out_ptr.dtype.element_ty), mask=mask
        )


@triton.jit
def _bn_act_bwd_small_kernel(
    go_ptr,
    y_ptr,
    r_ptr,
    dy_ptr,
    dr_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    dw_ptr,
    db_ptr,
    C,
    S,
    n_units,
    n_sblocks,
    stride_b,
    stride_c,
    stride_s,
    inv_n,
    eps,
    slope,
    CL: tl.constexpr,
    HAS_RES: tl.constexpr,
    TRAINING: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``dbias = sum g``, ``dweight = sum g * xhat`` of this channel block, then ``dy``."""
    pid_c = tl.program_id(0)
    c0 = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm0 = c0 < C
    mean, invstd, scale, shift = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, cm0, eps)
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for u in range(0, n_units):  # pass 1: the two per-channel sums
        offs, c, s, cm, sm = _tile_offsets(
            u, n_sblocks, C, S, stride_b, stride_c, stride_s, pid_c, CL, BLOCK_C, BLOCK_S
        )
        g, xhat = _grad_pre_act(
            go_ptr,
            y_ptr,
            r_ptr,
            offs,
            cm[:, None] & sm[None, :],
            mean,
            invstd,
            scale,
            shift,
            slope,
            HAS_RES,
        )
        acc_g += g
        acc_gx += g * xhat
    sum_g = tl.sum(acc_g, axis=1)
    sum_gx = tl.sum(acc_gx, axis=1)
    tl.store(db_ptr + c0, sum_g, mask=cm0)
    tl.store(dw_ptr + c0, sum_gx, mask=cm0)
    for u in range(0, n_units):  # pass 2: input (and residual) gradients
        offs, c, s, cm, sm = _tile_offsets(
            u, n_sblocks, C, S, stride_b, stride_c, stride_s, pid_c, CL, BLOCK_C, BLOCK_S
        )
        mask = cm[:, None] & sm[None, :]
        g, xhat = _grad_pre_act(
            go_ptr, y_ptr, r_ptr, offs, mask, mean, invstd, scale, shift, slope, HAS_RES
        )
        if TRAINING:
            dy = scale[:, None] * (g - (sum_g * inv_n)[:, None] - xhat * (sum_gx * inv_n)[:, None])
        else:
            dy = scale[:, None] * g
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        if HAS_RES:
            tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)


def bn_act_train_forward(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    slope: float,
    update: RunningUpdate | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward in one launch: ``(out like y, mean (C,) fp32, biased var (C,) fp32)``.

    ``update``: ``(running_mean, running_var, momentum)`` updated in place in the same launch.
    """
    v = view_of(y, min_programs=_MIN_PROGRAMS if y.is_cuda else 1)
    residual = _strided_like(residual, y)
    out = torch.empty_like(y)
    mean = torch.empty(v.shape[1], device=y.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    rm, rv, momentum, unbias = _running_args(update, v.count, mean)
    _bn_act_fwd_small_kernel[(v.n_cblocks,)](
        y,
        residual if residual is not None else y,
        out,
        mean,
        var,
        weight,
        bias,
        rm,
        rv,
        *v.args(),
        v.n_units,
        v.n_sblocks,
        *v.strides,
        eps,
        slope,
        momentum,
        unbias,
        CL=v.cl,
        HAS_RES=residual is not None,
        UPDATE=update is not None,
        BLOCK_C=v.block_c,
        BLOCK_S=v.block_s,
        num_warps=v.num_warps,
    )
    return out, mean, var


def bn_act_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    slope: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward in one launch; same contract as :func:`vosgan.kernels.bn_act.bn_act_backward`."""
    v = view_of(y, min_programs=_MIN_PROGRAMS if y.is_cuda else 1)
    grad_out, residual = _strided_like(grad_out, y), _strided_like(residual, y)
    dy = torch.empty_like(y)
    dres = torch.empty_like(y) if residual is not None else None
    sums = torch.empty((2, v.shape[1]), device=y.device, dtype=torch.float32)
    _bn_act_bwd_small_kernel[(v.n_cblocks,)](
        grad_out,
        y,
        residual if residual is not None else y,
        dy,
        dres if dres is not None else dy,
        mean,
        var,
        weight,
        bias,
        sums[0],
        sums[1],
        *v.args(),
        v.n_units,
        v.n_sblocks,
        *v.strides,
        1.0 / v.count,
        eps,
        slope,
        CL=v.cl,
        HAS_RES=residual is not None,
        TRAINING=training,
        BLOCK_C=v.block_c,
        BLOCK_S=v.block_s,
        num_warps=v.num_warps,
    )
    return dy, sums[0], sums[1], dres
