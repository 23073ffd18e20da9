"""Triton kernels for mask compositing ``v = m * f + (1 - m) * b`` and its backward.

Layout: every tensor is addressed as ``(batch, channel, time, plane)`` where ``plane`` is the
flattened ``H * W`` image, which must be dense (unit stride, ``stride(H) == W``: the launchers
copy a tensor whose planes are not); the batch, channel and time strides are passed explicitly,
so channel slices of one conv output (``f = y[:, :3]``, ``m = y[:, 3:]``) need no copy. Outputs
are allocated contiguous here.

- forward: one program per ``(plane block, t, batch)``; ``m`` is loaded once for all channels and
  ``b`` (re-read for every ``t``) is kept in L2 with ``evict_last``.
- backward: one program per ``(plane block, batch)`` walks all ``T`` frames with a
  ``(C_PAD, BLOCK)`` tile: ``df = g * m`` and ``dm = sum_c g * (f - b)`` are written per frame,
  ``db = sum_t g * (1 - m)`` is accumulated in fp32 registers and written once at the end. One
  pass over ``g, f, m``, no atomics, no workspace. Optionally (:data:`T_SPLIT`) each program
  walks a chunk of the frames instead and writes its part of ``db`` to an fp32 workspace that
  one reduction sums: more programs for small batches, still no atomics.

Arithmetic is fp32 whatever the storage dtypes (fp16/bf16/fp32, mixed allowed; fp64 when any
tensor is fp64); results are rounded once, to the output pointer's dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from vosgan.kernels._host import cdiv, next_power_of_2


@triton.jit
def _up(x, FP64: tl.constexpr):
    """Upcast a loaded tile to the arithmetic dtype: fp64 for fp64 outputs, else fp32."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def composite_fwd_kernel(
    f_ptr,
    m_ptr,
    b_ptr,
    v_ptr,
    N,
    T,
    sf_b,
    sf_c,
    sf_t,
    sm_b,
    sm_t,
    sb_b,
    sb_c,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    # 64-bit frame, channel and batch offsets: in a time- or channel-major view, or an item of
    # 2**31 elements, t or c times its stride passes 2**31
    t = tl.program_id(1).to(tl.int64)
    bi = tl.program_id(2).to(tl.int64)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # Stage 1: the mask, once for every channel.
    m = _up(tl.load(m_ptr + bi * sm_b + t * sm_t + offs, mask=mask), FP64)
    v_base = v_ptr + bi * C * T * N + t * N
    # Stage 2: per channel, read f (streamed) and b (reused over T: keep in L2), write v.
    for c_ in tl.static_range(C):
        c = tl.cast(c_, tl.int64)
        f = _up(
            tl.load(
                f_ptr + bi * sf_b + c * sf_c + t * sf_t + offs,
                mask=mask,
                eviction_policy="evict_first",
            ),
            FP64,
        )
        b = _up(
            tl.load(b_ptr + bi * sb_b + c * sb_c + offs, mask=mask, eviction_policy="evict_last"),
            FP64,
        )
        v = m * f + (1.0 - m) * b
        tl.store(v_base + c * T * N + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def composite_bwd_kernel(
    g_ptr,
    f_ptr,
    m_ptr,
    b_ptr,
    df_ptr,
    dm_ptr,
    db_ptr,
    N,
    T,
    T_CHUNK,
    sg_b,
    sg_c,
    sg_t,
    sf_b,
    sf_c,
    sf_t,
    sm_b,
    sm_t,
    sb_b,
    sb_c,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)  # frames [chunk * T_CHUNK, ...); one chunk unless split
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    cs = tl.arange(0, C_PAD).to(tl.int64)  # 64-bit offsets, as in the forward
    mask_n = offs < N
    mask = (cs[:, None] < C) & mask_n[None, :]
    # Stage 1: the background tile, read once, and the fp32 accumulator of db.
    b = _up(
        tl.load(b_ptr + bi * sb_b + cs[:, None] * sb_c + offs[None, :], mask=mask, other=0.0), FP64
    )
    db = _up(tl.zeros([C_PAD, BLOCK], dtype=tl.float32), FP64)
    g_base = g_ptr + bi * sg_b + cs[:, None] * sg_c + offs[None, :]
    f_base = f_ptr + bi * sf_b + cs[:, None] * sf_c + offs[None, :]
    df_base = df_ptr + bi * C * T * N + cs[:, None] * T * N + offs[None, :]
    # Stage 2: walk the frames; padded channels load 0 and so add nothing to dm or db.
    t0 = chunk * T_CHUNK
    for t_ in range(t0, tl.minimum(t0 + T_CHUNK, T)):
        t = tl.cast(t_, tl.int64)
        m = _up(tl.load(m_ptr + bi * sm_b + t * sm_t + offs, mask=mask_n), FP64)
        g = _up(
            tl.load(g_base + t * sg_t, mask=mask, other=0.0, eviction_policy="evict_first"), FP64
        )
        f = _up(
            tl.load(f_base + t * sf_t, mask=mask, other=0.0, eviction_policy="evict_first"), FP64
        )
        tl.store(df_base + t * N, (g * m[None, :]).to(df_ptr.dtype.element_ty), mask=mask)
        dm = tl.sum(g * (f - b), axis=0)
        tl.store(dm_ptr + (bi * T + t) * N + offs, dm.to(dm_ptr.dtype.element_ty), mask=mask_n)
        db += g * (1.0 - m[None, :])
    # Stage 3: db, once: this chunk's sum over its frames (the whole of db unless T is split).
    tl.store(
        db_ptr + (bi * tl.num_programs(2) + chunk) * C * N + cs[:, None] * N + offs[None, :],
        db.to(db_ptr.dtype.element_ty),
        mask=mask,
    )


def _plane_dense(x: Tensor) -> bool:
    """Whether the last two dims of ``x`` form one dense ``H * W`` run."""
    h, w = x.shape[-2], x.shape[-1]
    return (x.stride(-1) == 1 or w == 1) and (x.stride(-2) == w or h == 1)


def _dense_plane(x: Tensor) -> Tensor:
    return x if _plane_dense(x) else x.contiguous()


def fwd_block(n: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the forward kernel for a plane of ``n`` pixels."""
    block = min(1024, max(128, next_power_of_2(n)))
    return block, max(1, min(4, block // 256))


def bwd_block(itemsize: int, c_pad: int = 4) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the backward kernel for tiles of ``itemsize``-byte elements.

    One warp whose 32 lanes each load one 16-byte vector per channel row: the whole
    ``(C_PAD, BLOCK)`` tile then lies along the plane, every lane holds all channels of its
    pixels and ``sum_c`` stays in registers. With 4 warps Triton spread the channels over warps
    and reduced through shared memory with 2 barriers per frame: the bf16 backward kernel ran at
    564 GB/s, one warp 2736 GB/s (fp32: 2194 -> 2804 GB/s; H100, B=64, T=32, 64x64, CUDA graphs).
    Wide channel counts shrink the block to keep at most 32 elements per lane per tile.
    """
    block = 32 * max(1, 16 // itemsize)
    while block > 32 and c_pad * block > 32 * 32:
        block //= 2
    return block, 1


def composite_fwd(f: Tensor, m: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Launch the forward kernel.

    Args:
        f: ``(B, C, T, H, W)``; m: ``(B, 1, T, H, W)``; b: ``(B, C, H, W)``; any float dtypes,
            same device. Planes that are not dense are copied.
        out_dtype: dtype of ``v``.

    Returns:
        ``v (B, C, T, H, W)``, contiguous, ``out_dtype``.
    """
    f, m, b = _dense_plane(f), _dense_plane(m), _dense_plane(b)
    bsz, c, t, h, w = f.shape
    n = h * w
    v = torch.empty((bsz, c, t, h, w), device=f.device, dtype=out_dtype)
    if v.numel() == 0:
        return v
    block, warps = fwd_block(n)
    grid = (cdiv(n, block), t, bsz)
    composite_fwd_kernel[grid](
        f,
        m,
        b,
        v,
        n,
        t,
        f.stride(0),
        f.stride(1),
        f.stride(2),
        m.stride(0),
        m.stride(2),
        b.stride(0),
        b.stride(1),
        C=c,
        BLOCK=block,
        FP64=out_dtype == torch.float64,
        num_warps=warps,
    )
    return v


#: How the backward kernel covers T. ``"off"``: one program per (plane block, batch item) walks
#: every frame (the measured default). ``"auto"``: T is split into chunks until there are about
#: 4 programs per SM, for small batches: at B=8, T=16, 64x64 the unsplit kernel has 128 one-warp
#: programs for an H100's 132 SMs, and ran at 0.61-0.77x ``torch.compile`` (benchmarks/RESULTS.md).
#: Each chunk then writes its part of ``db`` to an fp32 workspace, summed by one torch reduction.
#: On an H200 at B=8 that made the backward 1.18-1.25x faster; ``auto`` also splits at B=16 and 32,
#: not timed yet, so it is not the default. A number: that many chunks.
#: ``VOSGAN_COMPOSITE_T_SPLIT`` sets it for a process.
T_SPLIT = os.environ.get("VOSGAN_COMPOSITE_T_SPLIT", "off")
if T_SPLIT not in ("off", "auto") and not (T_SPLIT.isdigit() and int(T_SPLIT) > 0):
    raise ValueError(
        f"VOSGAN_COMPOSITE_T_SPLIT must be off, auto or a positive number, got {T_SPLIT!r}"
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_t_chunk(t: int, programs: int, policy: str | int, sms: int | None) -> int:
    """Frames per backward program for ``t`` frames, ``programs`` (plane block, batch item)
    pairs, a :data:`T_SPLIT` policy (or a number of chunks) and ``sms`` SMs (None: unknown)."""
    if policy == "off" or t <= 1:
        return max(t, 1)
    if policy == "auto":
        want = cdiv(4 * sms, programs) if sms else 1
    else:
        want = int(policy)
    return cdiv(t, max(1, min(t, want)))


def composite_bwd(
    g: Tensor, f: Tensor, m: Tensor, b: Tensor, t_split: str | int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel.

    Args:
        g: ``dL/dv (B, C, T, H, W)``; f, m, b as in :func:`composite_fwd`.
        t_split: how programs cover T (:data:`T_SPLIT`, its default): ``"off"``, ``"auto"`` or
            a number of chunks.

    Returns:
        ``(df (B, C, T, H, W), dm (B, 1, T, H, W), db (B, C, H, W))``, contiguous, in the dtypes
        of ``f``, ``m`` and ``b``.
    """
    g, f, m, b = _dense_plane(g), _dense_plane(f), _dense_plane(m), _dense_plane(b)
    bsz, c, t, h, w = f.shape
    n = h * w
    df = torch.empty((bsz, c, t, h, w), device=f.device, dtype=f.dtype)
    dm = torch.empty((bsz, 1, t, h, w), device=f.device, dtype=m.dtype)
    if df.numel() == 0:
        # empty sums: over T for db, over C for dm (C = 0)
        return df, dm.zero_(), torch.zeros((bsz, c, h, w), device=f.device, dtype=b.dtype)
    c_pad = next_power_of_2(c)
    block, warps = bwd_block(min(g.element_size(), f.element_size()), c_pad)
    fp64 = torch.float64 in (g.dtype, f.dtype, m.dtype, b.dtype)
    sms = _sm_count(f.device.index) if f.is_cuda else None
    t_chunk = bwd_t_chunk(t, cdiv(n, block) * bsz, T_SPLIT if t_split is None else t_split, sms)
    chunks = cdiv(t, t_chunk)
    if chunks == 1:
        db = torch.empty((bsz, c, h, w), device=f.device, dtype=b.dtype)
    else:  # per-chunk partial sums, reduced below
        db = torch.empty(
            (bsz, chunks, c, h, w), device=f.device, dtype=torch.float64 if fp64 else torch.float32
        )
    grid = (cdiv(n, block), bsz, chunks)
    composite_bwd_kernel[grid](
        g,
        f,
        m,
        b,
        df,
        dm,
        db,
        n,
        t,
        t_chunk,
        g.stride(0),
        g.stride(1),
        g.stride(2),
        f.stride(0),
        f.stride(1),
        f.stride(2),
        m.stride(0),
        m.stride(2),
        b.stride(0),
        b.stride(1),
        C=c,
        C_PAD=c_pad,
        BLOCK=block,
        FP64=fp64,
        num_warps=warps,
    )
    if chunks > 1:
        db = db.sum(1).to(b.dtype)
    return df, dm, db
