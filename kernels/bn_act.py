"""Triton kernels for BatchNorm (training/eval) + affine + (Leaky)ReLU (+ residual), fwd and bwd.

Every kernel sees the conv output ``y`` as a strided ``(B', C, S')`` view:

- NCDHW (contiguous): ``B' = B``, ``S' = T*H*W``, strides ``(C*S', S', 1)``  -> ``CL=False``;
- NDHWC (``channels_last_3d``): ``B' = 1``, ``S' = B*T*H*W``, strides ``(0, 1, C)`` -> ``CL=True``.

``CL`` makes the unit stride a compile-time constant, so tiles ``[BLOCK_C, BLOCK_S]`` are loaded
with 128-bit accesses along whichever axis is contiguous. A *unit* is one ``(b', s-block)`` pair.

Passes (each reads the tensors once):

- forward, training: ``_bn_stats_partial_kernel`` (Welford/Chan per tile, one partial per program)
  + ``_bn_stats_finalize_kernel`` (Chan merge of the partials, ``C`` values) and
  ``_bn_act_fwd_kernel`` (normalise, affine, residual add, activation): 2 passes over ``y``;
- forward, eval: ``_bn_act_fwd_kernel`` only, with the running statistics;
- backward: ``_bn_act_bwd_reduce_kernel`` (per-channel ``sum g`` and ``sum g*xhat``) and
  ``_bn_act_bwd_kernel`` (``dy``, and ``d residual = g``): 2 passes over ``grad_out`` and ``y``.

Here ``z = xhat * w + b (+ r)``, ``xhat = (y - mean) * rsqrt(var + eps)``, ``out = act(z)`` and
``g = grad_out * act'(z)``; the activation mask is recomputed from ``y``, so nothing but ``y`` is
saved. All statistics and reductions are fp32; ``y``/``out`` may be fp32, fp16 or bf16.
No autograd here: :mod:`vosgan.ops.conv3d_block` wraps these launchers.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from vosgan.kernels._host import cdiv, next_power_of_2

_TILE = 4096  # elements per [BLOCK_C, BLOCK_S] tile: 16 fp32 per thread at 8 warps


@triton.jit
def _tile_offsets(
    u,
    n_sblocks,
    C,
    S,
    stride_b,
    stride_c,
    stride_s,
    pid_c,
    CL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # unit u -> (b', s-block); the unit stride is a literal 1 so loads vectorise
    b = u // n_sblocks
    s_block = u % n_sblocks
    if CL:  # S = B * T * H * W can pass 2**31: widen before the multiply, not after
        s_block = s_block.to(tl.int64)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CL:
        offs = b.to(tl.int64) * stride_b + c[:, None] + s[None, :].to(tl.int64) * stride_s
    else:
        offs = b.to(tl.int64) * stride_b + c[:, None].to(tl.int64) * stride_c + s[None, :]
    return offs, c, s, c < C, s < S


@triton.jit
def _pivot(y_ptr, pid_c, C, stride_c, CL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each channel's first value, fp32. The statistics are gathered on ``y - pivot`` (shifted
    data): a mean large against the spread then costs no precision in the tile means and the
    merges, and the pivot is added back to the mean at the end."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CL:
        off = c.to(tl.int64)  # (b, s) = (0, 0): channels have unit stride
    else:
        off = c.to(tl.int64) * stride_c
    return tl.load(y_ptr + off, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def _bn_stats_partial_kernel(
    y_ptr,
    part_ptr,
    C,
    S,
    n_units,
    units_per_prog,
    n_sblocks,
    stride_b,
    stride_c,
    stride_s,
    CL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """part[0|1|2, pid, c] = (count, mean, M2) of channel ``c`` over this program's units, the
    mean of ``y - pivot`` (:func:`_pivot`)."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_prog = tl.num_programs(0)
    pivot = _pivot(y_ptr, pid_c, C, stride_c, CL, BLOCK_C)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, units_per_prog):
        u = pid * units_per_prog + i
        offs, c, s, cm, sm = _tile_offsets(
            u, n_sblocks, C, S, stride_b, stride_c, stride_s, pid_c, CL, BLOCK_C, BLOCK_S
        )
        sm = s < tl.where(u < n_units, S, 0)  # a unit past the end masks everything
        mask = cm[:, None] & sm[None, :]
        x = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot[:, None], 0.0)
        # exact two-pass statistics of the tile (it sits in registers) ...
        n_t = tl.sum(sm.to(tl.float32), axis=0)
        mean_t = tl.sum(x, axis=1) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        m2_t = tl.sum(d * d, axis=1)
        # ... merged into the running ones (Chan et al.): no catastrophic cancellation
        n_new = cnt + n_t
        frac = n_t / tl.maximum(n_new, 1.0)
        delta = mean_t - mean
        mean += delta * frac
        m2 += m2_t + delta * delta * cnt * frac
        cnt = n_new
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    base = part_ptr + pid * C + c
    stride_part = n_prog * C
    tl.store(base, cnt, mask=cm)
    tl.store(base + stride_part, mean, mask=cm)
    tl.store(base + 2 * stride_part, m2, mask=cm)


@triton.jit
def _bn_stats_finalize_kernel(
    part_ptr,
    y_ptr,
    mean_ptr,
    var_ptr,
    rm_ptr,
    rv_ptr,
    C,
    n_part,
    stride_c,
    momentum,
    unbias,
    CL: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge ``n_part`` partials per channel: ``mean[c]`` (the pivot added back) and biased
    ``var[c]``.

    Two passes over [BLOCK_P, BLOCK_C] tiles of partials (parallel, not a serial chain of
    dependent loads): ``mean = sum n_p mean_p / n``, ``M2 = sum M2_p + n_p (mean_p - mean)^2``,
    the pairwise-exact form of Chan's merge. ``UPDATE``: also the running statistics.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    stride_part = n_part * C
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < n_part)[:, None] & cm[None, :]
        base = part_ptr + p[:, None] * C + c[None, :]
        n_p = tl.load(base, mask=m, other=0.0)
        cnt += tl.sum(n_p, axis=0)
        acc += tl.sum(n_p * tl.load(base + stride_part, mask=m, other=0.0), axis=0)
    mean = acc / tl.maximum(cnt, 1.0)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < n_part)[:, None] & cm[None, :]
        base = part_ptr + p[:, None] * C + c[None, :]
        n_p = tl.load(base, mask=m, other=0.0)
        d = tl.load(base + stride_part, mask=m, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(base + 2 * stride_part, mask=m, other=0.0) + n_p * d * d, axis=0)
    var = m2 / tl.maximum(cnt, 1.0)
    mean += _pivot(y_ptr, tl.program_id(0), C, stride_c, CL, BLOCK_C)
    tl.store(mean_ptr + c, mean, mask=cm)
    tl.store(var_ptr + c, var, mask=cm)
    if UPDATE:
        _update_running(rm_ptr, rv_ptr, c, cm, mean, var, momentum, unbias)


@triton.jit
def _update_running(rm_ptr, rv_ptr, c, cm, mean, var, momentum, unbias):
    # nn.BatchNorm3d: running = (1 - momentum) * running + momentum * batch (unbiased variance)
    rm = tl.load(rm_ptr + c, mask=cm, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(
        rm_ptr + c, (rm * (1 - momentum) + mean * momentum).to(rm_ptr.dtype.element_ty), mask=cm
    )
    tl.store(
        rv_ptr + c,
        (rv * (1 - momentum) + var * unbias * momentum).to(rv_ptr.dtype.element_ty),
        mask=cm,
    )


@triton.jit
def _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c, cm, eps):
    # per-channel scale = w * rsqrt(var + eps), shift = b - mean * scale (fp32)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cm, other=1.0) + eps)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    scale = w * invstd
    return mean, invstd, scale, b - mean * scale


@triton.jit
def _bn_act_fwd_kernel(
    y_ptr,
    r_ptr,
    out_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    C,
    S,
    n_sblocks,
    stride_b,
    stride_c,
    stride_s,
    eps,
    slope,
    CL: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out = act(y * scale + shift [+ r]) for one tile (one unit x one channel block)."""
    offs, c, s, cm, sm = _tile_offsets(
        tl.program_id(0),
        n_sblocks,
        C,
        S,
        stride_b,
        stride_c,
        stride_s,
        tl.program_id(1),
        CL,
        BLOCK_C,
        BLOCK_S,
    )
    mask = cm[:, None] & sm[None, :]
    _, _, scale, shift = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c, cm, eps)
    z = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[:, None] + shift[:, None]
    if HAS_RES:
        z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.where(z > 0, z, z * slope)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre_act(
    go_ptr, y_ptr, r_ptr, offs, mask, mean, invstd, scale, shift, slope, HAS_RES: tl.constexpr
):
    # g = grad_out * act'(z), with z recomputed from y (and r); xhat = (y - mean) * invstd
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = y * scale[:, None] + shift[:, None]
    if HAS_RES:
        z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(z > 0, go, go * slope)
    xhat = (y - mean[:, None]) * invstd[:, None]
    return g, xhat


@triton.jit
def _bn_act_bwd_reduce_kernel(
    go_ptr,
    y_ptr,
    r_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    C,
    S,
    n_units,
    units_per_prog,
    n_sblocks,
    stride_b,
    stride_c,
    stride_s,
    eps,
    slope,
    CL: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """part[0|1, pid, c] = (sum g, sum g * xhat) of channel ``c`` over this program's units."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_prog = tl.num_programs(0)
    c0 = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mean, invstd, scale, shift = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, c0 < C, eps)
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for i in range(0, units_per_prog):
        u = pid * units_per_prog + i
        offs, c, s, cm, sm = _tile_offsets(
            u, n_sblocks, C, S, stride_b, stride_c, stride_s, pid_c, CL, BLOCK_C, BLOCK_S
        )
        mask = cm[:, None] & (s < tl.where(u < n_units, S, 0))[None, :]
        g, xhat = _grad_pre_act(
            go_ptr, y_ptr, r_ptr, offs, mask, mean, invstd, scale, shift, slope, HAS_RES
        )
        acc_g += g  # masked lanes load 0 -> g = 0
        acc_gx += g * xhat
    cm0 = c0 < C
    base = part_ptr + pid * C + c0
    tl.store(base, tl.sum(acc_g, axis=1), mask=cm0)
    tl.store(base + n_prog * C, tl.sum(acc_gx, axis=1), mask=cm0)


@triton.jit
def _bn_act_bwd_kernel(
    go_ptr,
    y_ptr,
    r_ptr,
    dy_ptr,
    dr_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    sum_g_ptr,
    sum_gx_ptr,
    C,
    S,
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
    """dy = scale * (g - mean(g) - xhat * mean(g * xhat)) (training) or scale * g (eval)."""
    offs, c, s, cm, sm = _tile_offsets(
        tl.program_id(0),
        n_sblocks,
        C,
        S,
        stride_b,
        stride_c,
        stride_s,
        tl.program_id(1),
        CL,
        BLOCK_C,
        BLOCK_S,
    )
    mask = cm[:, None] & sm[None, :]
    mean, invstd, scale, shift = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c, cm, eps)
    g, xhat = _grad_pre_act(
        go_ptr, y_ptr, r_ptr, offs, mask, mean, invstd, scale, shift, slope, HAS_RES
    )
    if TRAINING:
        mg = tl.load(sum_g_ptr + c, mask=cm, other=0.0) * inv_n
        mgx = tl.load(sum_gx_ptr + c, mask=cm, other=0.0) * inv_n
        dy = scale[:, None] * (g - mg[:, None] - xhat * mgx[:, None])
    else:
        dy = scale[:, None] * g
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


@functools.cache
def _num_sms(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _View:
    """The strided ``(B', C, S')`` view of a 5-D tensor, its tiling and its work split."""

    def __init__(self, y: torch.Tensor, min_programs: int = 0) -> None:
        """``min_programs > 0``: the one-program-per-channel-block tiling of
        :mod:`vosgan.kernels.bn_act_small`, narrow enough for ``min_programs`` channel blocks."""
        bsz, ch = y.shape[:2]
        spatial = y.shape[2] * y.shape[3] * y.shape[4]
        self.cl = (
            y.is_contiguous(memory_format=torch.channels_last_3d)
            and ch > 1
            and not (y.is_contiguous())
        )
        if self.cl:
            self.shape = (1, ch, bsz * spatial)
            self.strides = (0, 1, ch)
            block_c = min(next_power_of_2(ch), 256)
            block_s = min(max(_TILE // block_c, 1), next_power_of_2(bsz * spatial))
        else:
            if not y.is_contiguous():
                raise ValueError("y must be contiguous or channels_last_3d (make it so first)")
            self.shape = (bsz, ch, spatial)
            self.strides = (ch * spatial, spatial, 1)
            block_s = min(next_power_of_2(spatial), 1024)
            block_c = min(next_power_of_2(ch), max(_TILE // block_s, 1))
        if min_programs:
            block_c = max(1, min(block_c, next_power_of_2(ch // min_programs + 1) // 2))
            if self.cl:  # 16-byte row segments at least
                block_c = min(next_power_of_2(ch), max(block_c, 16 // y.element_size()))
            block_s = min(max(_TILE // block_c, 1), next_power_of_2(self.shape[2]))
        self.block_c, self.block_s = block_c, block_s
        self.n_sblocks = cdiv(self.shape[2], block_s)
        self.n_units = self.shape[0] * self.n_sblocks
        self.n_cblocks = cdiv(ch, block_c)
        self.count = bsz * spatial
        self.num_warps = max(1, min(8, block_c * block_s // 256))

    def split(self, device: torch.device) -> tuple[int, int]:
        """(programs along the units axis, units per program) for the reduction kernels."""
        if device.type == "cuda":
            target = max(1, (4 * _num_sms(device.index)) // self.n_cblocks)
        else:  # the interpreter costs ~0.4 ms per program: few programs, several units each
            target = 2
        per_prog = cdiv(self.n_units, min(target, self.n_units))
        return cdiv(self.n_units, per_prog), per_prog

    def args(self) -> tuple[int, ...]:
        return (self.shape[1], self.shape[2])


_VIEWS: dict[tuple, _View] = {}


def view_of(y: torch.Tensor, min_programs: int = 0) -> _View:
    """``_View(y, min_programs)``, cached by shape, strides and element size: a training step
    asks for the same few views every step, and building one costs more host time (about 20 us
    on the 2-core dev box) than looking it up."""
    key = (y.shape, y.stride(), y.element_size(), min_programs)
    view = _VIEWS.get(key)
    if view is None:
        if len(_VIEWS) >= 1024:  # many shapes (a sweep): start over rather than grow
            _VIEWS.clear()
        view = _VIEWS[key] = _View(y, min_programs)
    return view


def _strided_like(t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """``t`` with exactly ``y``'s strides (a copy only when they differ)."""
    if t is None or t.stride() == y.stride():
        return t
    return torch.empty_like(y, dtype=t.dtype).copy_(t)


#: ``(running_mean, running_var, momentum)``: updated in place by the statistics kernels
RunningUpdate = tuple[torch.Tensor, torch.Tensor, float]


def _running_args(update: RunningUpdate | None, count: int, like: torch.Tensor) -> tuple:
    if update is None:
        return like, like, 0.0, 1.0
    rm, rv, momentum = update
    return rm, rv, momentum, count / max(count - 1, 1)


def bn_stats(
    y: torch.Tensor,
    update: RunningUpdate | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of ``y (B, C, T, H, W)``, both fp32 ``(C,)``.

    ``update``: also update these running statistics in place, as ``nn.BatchNorm3d`` does.
    """
    v = view_of(y)
    n_prog, per_prog = v.split(y.device)
    part = torch.empty((3, n_prog, v.shape[1]), device=y.device, dtype=torch.float32)
    _bn_stats_partial_kernel[(n_prog, v.n_cblocks)](
        y,
        part,
        *v.args(),
        v.n_units,
        per_prog,
        v.n_sblocks,
        *v.strides,
        CL=v.cl,
        BLOCK_C=v.block_c,
        BLOCK_S=v.block_s,
        num_warps=v.num_warps,
    )
    mean = torch.empty(v.shape[1], device=y.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    rm, rv, momentum, unbias = _running_args(update, v.count, mean)
    _bn_stats_finalize_kernel[(cdiv(v.shape[1], 32),)](
        part,
        y,
        mean,
        var,
        rm,
        rv,
        v.shape[1],
        n_prog,
        v.strides[1],
        momentum,
        unbias,
        CL=v.cl,
        UPDATE=update is not None,
        BLOCK_P=64,
        BLOCK_C=32,
    )
    return mean, var


def bn_act_forward(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    slope: float,
) -> torch.Tensor:
    """``act(xhat * weight + bias [+ residual])``, same shape, dtype and memory format as ``y``."""
    v = view_of(y)
    residual = _strided_like(residual, y)
    out = torch.empty_like(y)
    _bn_act_fwd_kernel[(v.n_units, v.n_cblocks)](
        y,
        residual if residual is not None else y,
        out,
        mean,
        var,
        weight,
        bias,
        *v.args(),
        v.n_sblocks,
        *v.strides,
        eps,
        slope,
        CL=v.cl,
        HAS_RES=residual is not None,
        BLOCK_C=v.block_c,
        BLOCK_S=v.block_s,
        num_warps=v.num_warps,
    )
    return out


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
    """Gradients ``(dy, dweight, dbias, dresidual)``, ``dy``/``dresidual`` in ``y``'s layout.

    ``dweight``/``dbias`` are fp32 ``(C,)``; ``dresidual`` is ``None`` without a residual.
    """
    v = view_of(y)
    grad_out, residual = _strided_like(grad_out, y), _strided_like(residual, y)
    res = residual if residual is not None else y
    n_prog, per_prog = v.split(y.device)
    part = torch.empty((2, n_prog, v.shape[1]), device=y.device, dtype=torch.float32)
    _bn_act_bwd_reduce_kernel[(n_prog, v.n_cblocks)](
        grad_out,
        y,
        res,
        mean,
        var,
        weight,
        bias,
        part,
        *v.args(),
        v.n_units,
        per_prog,
        v.n_sblocks,
        *v.strides,
        eps,
        slope,
        CL=v.cl,
        HAS_RES=residual is not None,
        BLOCK_C=v.block_c,
        BLOCK_S=v.block_s,
        num_warps=v.num_warps,
    )
    sum_g, sum_gx = part.sum(dim=1).unbind(0)  # (C,) each: views of one (2, C) tensor
    dy = torch.empty_like(y)
    dres = torch.empty_like(y) if residual is not None else None
    _bn_act_bwd_kernel[(v.n_units, v.n_cblocks)](
        grad_out,
        y,
        res,
        dy,
        dres if dres is not None else dy,
        mean,
        var,
        weight,
        bias,
        sum_g,
        sum_gx,
        *v.args(),
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
    return dy, sum_gx, sum_g, dres
