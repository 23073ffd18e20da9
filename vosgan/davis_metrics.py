"""DAVIS video object segmentation measures: region similarity J and boundary accuracy F.

Definitions follow the public DAVIS evaluation code (fperazzi/davis for DAVIS 2016, BSD;
davisvideochallenge/davis2017-evaluation ``davis2017/metrics.py``); this is our own code:

- **J** (Jaccard): ``|P & G| / |P | G|`` per frame; a frame where both masks are empty scores 1.
- **F** (boundary F-measure): boundaries by ``seg2bmap`` (a pixel is a boundary pixel when it
  differs from its right, bottom or bottom-right neighbour; in the last row only the right
  neighbour counts, in the last column only the bottom one; the bottom-right corner pixel never
  is); a boundary pixel of one mask matches when a boundary pixel of the other lies inside the
  disk ``dy^2 + dx^2 <= r^2`` around it, ``r = ceil(bound_th * sqrt(H^2 + W^2))``
  (``bound_th = 0.008``: r = 8 at 854x480), ``r = bound_th`` when ``bound_th >= 1`` (an integer).
  Precision = matched prediction boundary / prediction boundary, recall = matched ground-truth
  boundary / ground-truth boundary; empty boundaries: none in the prediction only -> P = 1, R = 0;
  none in the ground truth only -> P = 0, R = 1; none in either -> P = R = 1. F = 2PR / (P + R)
  (0 when P + R = 0). A full mask has no boundary pixel, so an all-foreground prediction of a
  frame with a bounded object has F = 0.
- Per sequence: **mean**, **recall** (fraction of frames scoring > 0.5) and **decay** (the frame
  values are split into 4 overlapping bins with edges ``round(linspace(1, n, 5)) - 1``, bin ``i``
  = values ``[e_i, e_{i+1}]`` inclusive; decay = mean of the first bin - mean of the last).

Frame conventions (:data:`CONVENTIONS`; every result states the one used):

- ``davis2016`` (default): the first and the last frame are excluded (fperazzi/davis,
  ``DAVISAnnotationLoader._eval`` strips ``[1:-1]``: the DAVIS 2016 benchmark, including its
  unsupervised methods); decay bin edges rounded half-to-even (``np.round`` in that code).
- ``davis2017-unsupervised``: all frames (davis2017-evaluation ``evaluation.py`` strips ``[1:-1]``
  for the semi-supervised task only); bin edges rounded half-up (its ``+ 1e-10``). DAVIS 2017's
  multi-object matching is moot here: DAVIS 2016 annotates one object.
Our bin edges are int64 (the 2017 code casts them to uint8, which wraps beyond 256 frames).

Boundary matching backends (``backend=``): ``"numba"`` (CPU, per-row distance to the nearest
boundary pixel, frames in parallel), ``"scipy"`` (``scipy.ndimage.binary_dilation`` with the
disk, literally as the DAVIS code does with OpenCV/scikit-image), ``"cupy"`` (the same with
``cupyx.scipy.ndimage`` on a CUDA device), ``"auto"`` (cupy when CUDA is present, else numba,
else scipy; a fallback warns once with its reason). All give identical integer counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import numpy as np

from vosgan import backend

try:
    import numba
except ImportError as _exc:  # reported by resolve_backend(), never swallowed
    numba, _NUMBA_ERROR = None, str(_exc)
else:
    _NUMBA_ERROR = ""

BACKENDS = ("auto", "numba", "scipy", "cupy")
BOUND_TH = 0.008


@dataclass(frozen=True)
class FrameConvention:
    """Which frames of a sequence are scored, and how decay's bin edges round."""

    name: str
    skip_first_last: bool
    half_even: bool  # decay bin edges: np.round (half-to-even) or round half up
    source: str

    def describe(self) -> str:
        frames = "first and last frame excluded" if self.skip_first_last else "all frames"
        return f"{self.name}: {frames} ({self.source})"


CONVENTIONS: dict[str, FrameConvention] = {
    "davis2016": FrameConvention(
        "davis2016",
        True,
        True,
        "DAVIS 2016 benchmark code fperazzi/davis: per-frame scores on frames [1:-1]",
    ),
    "davis2017-unsupervised": FrameConvention(
        "davis2017-unsupervised",
        False,
        False,
        "davisvideochallenge/davis2017-evaluation: [1:-1] only for the semi-supervised task",
    ),
}


def convention(name: str | FrameConvention) -> FrameConvention:
    """Look up a frame convention by name (a :class:`FrameConvention` passes through)."""
    if isinstance(name, FrameConvention):
        return name
    if name not in CONVENTIONS:
        raise ValueError(f"unknown frame convention {name!r}; choose from {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]


def as_binary(name: str, mask: Any) -> np.ndarray:
    """A binary mask stack ``(N, H, W)`` (or one ``(H, W)`` mask) as bool ``(N, H, W)``.

    Accepts bool, or numbers taking only the values {0, 1} or {0, 255}; anything else (e.g.
    probabilities, or palette PNGs with object ids) is rejected with a message naming ``name``.
    """
    arr = np.asarray(mask)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"{name} must be (N, H, W) or (H, W) and non-empty, got {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or numeric, got {arr.dtype}")
    top = arr.max()
    if top not in (0, 1, 255) or not np.all((arr == 0) | (arr == top)):
        found = np.unique(arr[arr != 0])[:6]
        raise ValueError(
            f"{name} is not a binary mask: values must be {{0, 1}} or {{0, 255}}, "
            f"found e.g. {found.tolist()}; threshold probabilities first"
        )
    return arr > 0


def _check_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = as_binary("pred", pred), as_binary("gt", gt)
    if p.shape != g.shape:
        raise ValueError(
            f"pred {p.shape} and gt {g.shape} differ in shape: masks must have "
            "the size of their frames (upsample predictions first)"
        )
    return p, g


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """The disk radius in pixels: ``ceil(bound_th * hypot(H, W))``, or ``bound_th`` if >= 1."""
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(
                f"bound_th >= 1 is a radius in pixels and must be whole, got {bound_th}"
            )
        return int(bound_th)
    if not bound_th > 0:
        raise ValueError(f"bound_th must be > 0, got {bound_th}")
    return int(math.ceil(bound_th * math.hypot(height, width)))


def disk_half_widths(radius: int) -> np.ndarray:
    """Row half-widths of the disk ``dy^2 + dx^2 <= r^2``: ``(2r + 1,)`` int64 (exact isqrt)."""
    return np.array(
        [math.isqrt(radius * radius - dy * dy) for dy in range(-radius, radius + 1)], np.int64
    )


def disk(radius: int) -> np.ndarray:
    """The structuring element ``(2r + 1, 2r + 1)`` bool: ``dy^2 + dx^2 <= r^2``."""
    d = np.arange(-radius, radius + 1)
    return d[:, None] ** 2 + d[None, :] ** 2 <= radius * radius


def seg2bmap(mask: Any, xp: Any = np) -> Any:
    """Boundary map of a mask stack ``(N, H, W)`` bool (``xp``: numpy or cupy), same shape."""
    s = mask
    e, so, se = xp.zeros_like(s), xp.zeros_like(s), xp.zeros_like(s)
    e[:, :, :-1] = s[:, :, 1:]
    so[:, :-1, :] = s[:, 1:, :]
    se[:, :-1, :-1] = s[:, 1:, 1:]
    b = (s ^ e) | (s ^ so) | (s ^ se)
    b[:, -1, :] = s[:, -1, :] ^ e[:, -1, :]
    b[:, :, -1] = s[:, :, -1] ^ so[:, :, -1]
    b[:, -1, -1] = False
    return b


def jaccard(pred: Any, gt: Any) -> np.ndarray:
    """Region similarity per frame: ``(N,)`` float64 (both empty -> 1).

    Args:
        pred, gt: binary masks ``(N, H, W)`` (or ``(H, W)``), see :func:`as_binary`.
    """
    p, g = _check_pair(pred, gt)
    inter = np.count_nonzero(p & g, axis=(1, 2))
    union = np.count_nonzero(p | g, axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def f_from_counts(counts: np.ndarray) -> np.ndarray:
    """F per frame from ``(N, 4)`` counts ``[n_pred, n_gt, pred_matched, gt_matched]``.

    P = pred_matched / n_pred (1 if n_pred = 0), R = gt_matched / n_gt (1 if n_gt = 0). With one
    boundary empty nothing matches in the other, so this gives the DAVIS cases: (P, R) = (1, 0)
    for an empty prediction boundary, (0, 1) for an empty ground truth one, (1, 1) for both.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 4)
    n_p, n_g, m_p, m_g = c.T
    precision = np.where(n_p > 0, m_p / np.maximum(n_p, 1), 1.0)
    recall = np.where(n_g > 0, m_g / np.maximum(n_g, 1), 1.0)
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def _counts_ndimage(p: Any, g: Any, radius: int, xp: Any, ndi: Any) -> np.ndarray:
    """Boundary counts by binary dilation with the disk (numpy+scipy or cupy+cupyx)."""
    bp, bg = seg2bmap(p, xp), seg2bmap(g, xp)
    struct = xp.asarray(disk(radius))[None]  # (1, k, k): frames dilate independently
    dil_p = ndi.binary_dilation(bp, structure=struct)
    dil_g = ndi.binary_dilation(bg, structure=struct)
    out = xp.stack(
        [
            bp.sum(axis=(1, 2)),
            bg.sum(axis=(1, 2)),
            (bp & dil_g).sum(axis=(1, 2)),
            (bg & dil_p).sum(axis=(1, 2)),
        ],
        axis=1,
    )
    return np.asarray(out.get() if hasattr(out, "get") else out, dtype=np.int64)


def _counts_scipy(p: np.ndarray, g: np.ndarray, radius: int) -> np.ndarray:
    import scipy.ndimage

    return _counts_ndimage(p, g, radius, np, scipy.ndimage)


def _counts_cupy(p: np.ndarray, g: np.ndarray, radius: int) -> np.ndarray:
    import cupy
    import cupyx.scipy.ndimage

    return _counts_ndimage(cupy.asarray(p), cupy.asarray(g), radius, cupy, cupyx.scipy.ndimage)


def _counts_numba(p: np.ndarray, g: np.ndarray, radius: int) -> np.ndarray:
    if numba is None:
        raise RuntimeError(f"numba unavailable ({_NUMBA_ERROR})")
    return _numba_counts(np.ascontiguousarray(p), np.ascontiguousarray(g), disk_half_widths(radius))


if numba is not None:

    @numba.njit(cache=True)
    def _bmap(s: np.ndarray) -> np.ndarray:  # seg2bmap of one (H, W) bool mask, as uint8
        h, w = s.shape
        b = np.zeros((h, w), np.uint8)
        for y in range(h):
            for x in range(w):
                v = s[y, x]
                if y < h - 1 and x < w - 1:
                    b[y, x] = (v != s[y, x + 1]) or (v != s[y + 1, x]) or (v != s[y + 1, x + 1])
                elif y == h - 1 and x < w - 1:
                    b[y, x] = v != s[y, x + 1]
                elif x == w - 1 and y < h - 1:
                    b[y, x] = v != s[y + 1, x]
        return b

    @numba.njit(cache=True)
    def _row_distance(b: np.ndarray, cap: int) -> np.ndarray:
        # horizontal distance to the nearest boundary pixel of the same row, capped at ``cap``
        h, w = b.shape
        d = np.empty((h, w), np.int32)
        for y in range(h):
            last = -cap - 1
            for x in range(w):
                if b[y, x]:
                    last = x
                d[y, x] = min(x - last, cap)
            nxt = w + cap + 1
            for x in range(w - 1, -1, -1):
                if b[y, x]:
                    nxt = x
                d[y, x] = min(d[y, x], nxt - x)
        return d

    @numba.njit(cache=True)
    def _matched(b: np.ndarray, other: np.ndarray, hw: np.ndarray) -> int:
        # boundary pixels of ``b`` with a boundary pixel of the other mask inside the disk:
        # some row y + dy holds one within the disk's half-width at that dy
        h, w = b.shape
        r = (hw.shape[0] - 1) // 2
        count = 0
        for y in range(h):
            for x in range(w):
                if b[y, x]:
                    for k in range(max(0, r - y), min(2 * r + 1, h - y + r)):
                        if other[y + k - r, x] <= hw[k]:
                            count += 1
                            break
        return count

    @numba.njit(parallel=True, cache=True)
    def _numba_counts(p: np.ndarray, g: np.ndarray, hw: np.ndarray) -> np.ndarray:
        n = p.shape[0]
        cap = hw.shape[0]  # any distance above the radius r = (len - 1) / 2 is "too far"
        out = np.zeros((n, 4), np.int64)
        for i in numba.prange(n):
            bp, bg = _bmap(p[i]), _bmap(g[i])
            out[i, 0] = bp.sum()
            out[i, 1] = bg.sum()
            out[i, 2] = _matched(bp, _row_distance(bg, cap), hw)
            out[i, 3] = _matched(bg, _row_distance(bp, cap), hw)
        return out


@cache
def _available(name: str) -> tuple[bool, str]:
    try:
        if name == "cupy":
            import cupy

            if not cupy.cuda.is_available():
                return False, "cupy is installed but no CUDA device is available"
            import cupyx.scipy.ndimage  # noqa: F401
        elif name == "numba":
            if numba is None:
                raise ImportError(_NUMBA_ERROR)
        else:
            import scipy.ndimage  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the reason is reported, never swallowed
        return False, f"{name} unavailable ({type(exc).__name__}: {exc})"
    return True, f"{name} available"


def resolve_backend(name: str = "auto") -> str:
    """The boundary-matching backend ``name`` runs: auto = cupy (CUDA) > numba > scipy."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        ok, reason = _available(name)
        if not ok:
            raise RuntimeError(f"boundary backend {name!r} requested but {reason}")
        return name
    import torch

    reasons: list[str] = []
    for cand in ("cupy", "numba", "scipy"):
        ok, reason = _available(cand)
        if ok:
            # numba is the CPU path: falling to it warns only where a GPU went unused
            if cand == "scipy" or (cand == "numba" and torch.cuda.is_available()):
                backend.warn_once(
                    f"davis-f-{cand}",
                    f"davis_metrics: F boundary matching runs on {cand}: {'; '.join(reasons)}",
                )
            return cand
        reasons.append(reason)
    raise RuntimeError(f"no boundary backend available: {'; '.join(reasons)}")


_COUNTS = {"numba": _counts_numba, "scipy": _counts_scipy, "cupy": _counts_cupy}


def boundary_counts(
    pred: Any, gt: Any, bound_th: float = BOUND_TH, backend: str = "auto"
) -> np.ndarray:
    """Per frame ``[n_pred, n_gt, pred_matched, gt_matched]`` boundary pixel counts, ``(N, 4)``."""
    p, g = _check_pair(pred, gt)
    radius = boundary_radius(p.shape[1], p.shape[2], bound_th)
    return _COUNTS[resolve_backend(backend)](p, g, radius)


def f_measure(pred: Any, gt: Any, bound_th: float = BOUND_TH, backend: str = "auto") -> np.ndarray:
    """Boundary F-measure per frame, ``(N,)`` float64 (see the module docstring).

    Args:
        pred, gt: binary masks ``(N, H, W)`` (or ``(H, W)``) of the same size.
        bound_th: boundary tolerance as a fraction of the image diagonal (or pixels if >= 1).
        backend: ``"auto" | "numba" | "scipy" | "cupy"``.
    """
    return f_from_counts(boundary_counts(pred, gt, bound_th, backend))


@dataclass(frozen=True)
class Statistics:
    """Mean, recall (fraction > 0.5) and decay of one measure over one sequence's frames."""

    mean: float
    recall: float
    decay: float


def statistics(values: Any, half_even: bool = False) -> Statistics:
    """Mean, recall and decay of per-frame values ``(n,)`` (n >= 1, already convention-cut).

    ``half_even`` rounds the decay bin edges half-to-even (DAVIS 2016 code) instead of half up
    (DAVIS 2017 code); they differ only where ``linspace(1, n, 5)`` hits an exact .5.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"statistics needs >= 1 finite value, got {v.size} values")
    grid = np.linspace(1, v.size, 5)
    edges = (np.round(grid) if half_even else np.floor(grid + 0.5)).astype(np.int64) - 1
    first, last = v[edges[0] : edges[1] + 1], v[edges[3] : edges[4] + 1]
    return Statistics(float(v.mean()), float(np.mean(v > 0.5)), float(first.mean() - last.mean()))


@dataclass(frozen=True)
class SequenceScore:
    """J and F of one sequence under one frame convention."""

    name: str
    frames: list[int]  # indices of the scored frames
    j: list[float]
    f: list[float]
    j_stats: Statistics
    f_stats: Statistics
    convention: str

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"sequence": self.name, "frames": len(self.frames)}
        for key, st in (("J", self.j_stats), ("F", self.f_stats)):
            row.update(
                {f"{key}_mean": st.mean, f"{key}_recall": st.recall, f"{key}_decay": st.decay}
            )
        row["JF_mean"] = (self.j_stats.mean + self.f_stats.mean) / 2
        return row

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_sequence(
    pred: Any,
    gt: Any,
    name: str = "",
    conv: str | FrameConvention = "davis2016",
    bound_th: float = BOUND_TH,
    backend: str = "auto",
) -> SequenceScore:
    """Score one sequence: per-frame J and F on the frames ``conv`` keeps, and their statistics.

    Args:
        pred, gt: binary masks ``(N, H, W)`` at the frames' size, frame ``i`` of both at index i.
    """
    c = convention(conv)
    p, g = _check_pair(pred, gt)
    keep = np.arange(p.shape[0])
    if c.skip_first_last:
        if p.shape[0] < 3:
            raise ValueError(
                f"sequence {name!r}: the {c.name} convention excludes the first and "
                f"last frame and needs >= 3 frames, got {p.shape[0]}"
            )
        keep = keep[1:-1]
    p, g = p[keep[0] : keep[-1] + 1], g[keep[0] : keep[-1] + 1]
    j, f = jaccard(p, g), f_measure(p, g, bound_th, backend)
    return SequenceScore(
        name,
        keep.tolist(),
        j.tolist(),
        f.tolist(),
        statistics(j, c.half_even),
        statistics(f, c.half_even),
        c.name,
    )


def summarize(scores: list[SequenceScore]) -> dict[str, float]:
    """Dataset means over sequences (each sequence weighs the same, as in the DAVIS code)."""
    if not scores:
        raise ValueError("summarize: no sequences")
    rows = [s.as_row() for s in scores]
    keys = [k for k in rows[0] if k not in ("sequence", "frames")]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


__all__ = [
    "BACKENDS",
    "BOUND_TH",
    "CONVENTIONS",
    "FrameConvention",
    "SequenceScore",
    "Statistics",
    "as_binary",
    "boundary_counts",
    "boundary_radius",
    "convention",
    "disk",
    "evaluate_sequence",
    "f_from_counts",
    "f_measure",
    "jaccard",
    "resolve_backend",
    "seg2bmap",
    "statistics",
    "summarize",
]
