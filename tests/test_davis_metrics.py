"""DAVIS J and F: hand-computed cases, the DAVIS code's edge conventions, backends agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from vosgan import davis_metrics as dm

SQUARE = np.zeros((4, 5), bool)
SQUARE[1:3, 1:3] = True  # a 2x2 object
# seg2bmap by hand: a pixel differing from its right, bottom or bottom-right neighbour; last row:
# right only; last column: bottom only; the corner never.
SQUARE_BOUNDARY = np.array(
    [[1, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool
)
CPU_BACKENDS = ("numba", "scipy")


def test_seg2bmap_hand_computed() -> None:
    np.testing.assert_array_equal(dm.seg2bmap(SQUARE[None])[0], SQUARE_BOUNDARY)
    one = np.zeros((1, 6, 6), bool)
    one[0, 3, 3] = True  # a one-pixel object: itself and its left, upper, upper-left neighbours
    assert set(zip(*np.nonzero(dm.seg2bmap(one)[0]), strict=True)) == {
        (2, 2),
        (2, 3),
        (3, 2),
        (3, 3),
    }
    # image edges: an object touching the last row / column / corner
    edge = np.zeros((1, 3, 3), bool)
    edge[0, 2, 2] = True
    np.testing.assert_array_equal(dm.seg2bmap(edge)[0], [[0, 0, 0], [0, 1, 1], [0, 1, 0]])
    assert not dm.seg2bmap(np.ones((1, 4, 5), bool)).any()  # a full mask has no boundary


def test_radius_and_disk() -> None:
    assert dm.boundary_radius(480, 854) == 8  # ceil(0.008 * 979.6)
    assert dm.boundary_radius(100, 100) == 2  # ceil(1.13)
    assert dm.boundary_radius(10, 10) == 1
    assert dm.boundary_radius(480, 854, bound_th=3) == 3
    with pytest.raises(ValueError, match="whole"):
        dm.boundary_radius(10, 10, bound_th=2.5)
    d = dm.disk(2)
    assert d.sum() == 13 and d[0, 2] and not d[0, 1]  # dy^2 + dx^2 <= 4
    for r in range(12):
        hw = dm.disk_half_widths(r)
        np.testing.assert_array_equal(hw, dm.disk(r).sum(1) // 2)


def test_jaccard_hand_computed() -> None:
    p = np.zeros((4, 4, 4), bool)
    g = np.zeros((4, 4, 4), bool)
    p[0, 0, :2] = True
    g[0, 0, 1:4] = True  # overlap 1 of union 4
    g[2, 1, 1] = True  # prediction empty -> 0
    p[3], g[3] = True, True  # full vs full -> 1; frame 1: both empty -> 1
    np.testing.assert_allclose(dm.jaccard(p, g), [0.25, 1.0, 0.0, 1.0])
    assert dm.jaccard(np.ones((3, 3), bool), SQUARE[:3, :3])[0] == pytest.approx(4 / 9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_f_hand_computed(backend: str) -> None:
    gt = np.zeros((4, 7), bool)
    gt[1:3, 1:3] = True
    shift1, shift2 = np.roll(gt, 1, axis=1), np.roll(gt, 2, axis=1)
    # radius 1 (bound_th=1): a 1-pixel shift matches every boundary pixel
    assert dm.f_measure(shift1, gt, bound_th=1, backend=backend)[0] == pytest.approx(1.0)
    # a 2-pixel shift: 5 of 8 boundary pixels match on each side -> P = R = F = 5/8
    np.testing.assert_array_equal(dm.boundary_counts(shift2, gt, 1, backend), [[8, 8, 5, 5]])
    assert dm.f_measure(shift2, gt, bound_th=1, backend=backend)[0] == pytest.approx(5 / 8)
    # radius 2 reaches everything
    assert dm.f_measure(shift2, gt, bound_th=2, backend=backend)[0] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_full_and_one_pixel(backend: str) -> None:
    h, w = 12, 12
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    obj = np.zeros((h, w), bool)
    obj[5, 5] = True
    other = np.zeros((h, w), bool)
    other[5, 7] = True

    def jf(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
        return float(dm.jaccard(p, g)[0]), float(dm.f_measure(p, g, 1, backend)[0])

    assert jf(empty, empty) == (1.0, 1.0)  # both empty
    assert jf(empty, obj) == (0.0, 0.0)  # P = 1, R = 0
    assert jf(obj, empty) == (0.0, 0.0)  # P = 0, R = 1
    assert jf(full, full) == (1.0, 1.0)  # no boundary in either
    assert jf(full, obj) == (pytest.approx(1 / 144), 0.0)  # a full mask has no boundary
    assert jf(full, empty) == (0.0, 1.0)  # the DAVIS code's convention: no boundaries -> F = 1
    assert jf(obj, obj) == (1.0, 1.0)  # one-pixel object found exactly
    # two pixels apart, radius 1: 2 of the 4 boundary pixels match on each side
    assert jf(other, obj) == (0.0, pytest.approx(0.5))
    # default tolerance at 12x12: ceil(0.008 * 17) = 1 pixel
    assert float(dm.f_measure(other, obj, backend=backend)[0]) == pytest.approx(0.5)


def _blobs(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Random smooth-ish binary masks: thresholded upsampled noise, plus speckle."""
    coarse = rng.random((n, h // 4 + 2, w // 4 + 2))
    smooth = coarse.repeat(4, 1).repeat(4, 2)[:, :h, :w]
    return (smooth > 0.6) ^ (rng.random((n, h, w)) > 0.97)


@pytest.mark.parametrize(
    "shape,bound_th", [((5, 37, 53), 0.008), ((3, 61, 29), 4), ((4, 1, 17), 2), ((4, 23, 1), 1)]
)
def test_numba_matches_scipy(shape: tuple[int, int, int], bound_th: float) -> None:
    rng = np.random.default_rng(sum(shape))
    p, g = _blobs(rng, *shape), _blobs(rng, *shape)
    p[0], g[-1] = False, True  # empty and full frames on the way
    a = dm.boundary_counts(p, g, bound_th, "numba")
    b = dm.boundary_counts(p, g, bound_th, "scipy")
    np.testing.assert_array_equal(a, b)
    assert (a[1:-1, 2] > 0).any()  # not a vacuous comparison


def test_numba_matches_scipy_on_davis_masks() -> None:
    from PIL import Image

    seq = Path(SHARED_DATA) / "davis2016" / "dog" / "masks"
    if not seq.is_dir():
        pytest.skip(f"shared DAVIS data not found at {seq}")
    gt = np.stack([np.asarray(Image.open(seq / f"{i:05d}.png")) > 127 for i in (0, 30)])
    pred = np.roll(gt, (6, -9), axis=(1, 2))  # near-miss: many boundary pixels at 8-11 px
    a = dm.boundary_counts(pred, gt, backend="numba")
    np.testing.assert_array_equal(a, dm.boundary_counts(pred, gt, backend="scipy"))
    f = dm.f_from_counts(a)
    assert np.all((f > 0.05) & (f < 0.95)), f


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cupy boundary matching needs CUDA")
def test_cupy_matches_numba() -> None:
    rng = np.random.default_rng(1)
    p, g = _blobs(rng, 4, 120, 213), _blobs(rng, 4, 120, 213)
    np.testing.assert_array_equal(
        dm.boundary_counts(p, g, backend="cupy"), dm.boundary_counts(p, g, backend="numba")
    )
    assert dm.resolve_backend("auto") == "cupy"


def test_statistics_known_sequences() -> None:
    st = dm.statistics([1, 1, 1, 1, 0, 0, 0, 0])  # bins [0..2] and [5..7]
    assert (st.mean, st.recall, st.decay) == (0.5, 0.5, 1.0)
    v = [1, 1, 0.5, 0, 0, 0, 0]  # n = 7: linspace(1, 7, 5) = 1, 2.5, 4, 5.5, 7
    up, even = dm.statistics(v), dm.statistics(v, half_even=True)
    assert up.decay == pytest.approx(2.5 / 3)  # first bin [0..2] (2.5 rounds up to 3)
    assert even.decay == pytest.approx(1.0)  # first bin [0..1] (2.5 rounds to even: 2)
    assert up.recall == pytest.approx(2 / 7)  # recall counts > 0.5 only
    assert dm.statistics([0.7]).decay == 0.0 and dm.statistics([0.7]).recall == 1.0
    with pytest.raises(ValueError, match="finite"):
        dm.statistics([0.5, float("nan")])


@pytest.mark.parametrize("half_even", [False, True])
def test_decay_bins_match_davis_code(half_even: bool) -> None:
    rng = np.random.default_rng(3)
    for n in range(1, 260):
        v = rng.random(n)
        grid = np.linspace(1, n, 5) + (0 if half_even else 1e-10)  # the DAVIS 2016 / 2017 code
        ids = (np.round(grid) - 1).astype(np.int64)
        bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
        assert dm.statistics(v, half_even).decay == pytest.approx(bins[0].mean() - bins[3].mean())


def test_evaluate_sequence_conventions() -> None:
    gt = np.zeros((6, 10, 10), bool)
    gt[:, 2:6, 2:6] = True
    pred = gt.copy()
    pred[0] = False  # first frame wrong
    pred[3, :, :] = False  # an interior frame wrong
    s16 = dm.evaluate_sequence(pred, gt, "s", "davis2016")
    assert s16.frames == [1, 2, 3, 4] and s16.convention == "davis2016"
    assert s16.j == [1.0, 1.0, 0.0, 1.0] and s16.j_stats.mean == 0.75
    s17 = dm.evaluate_sequence(pred, gt, "s", "davis2017-unsupervised")
    assert s17.frames == list(range(6)) and s17.j_stats.mean == pytest.approx(4 / 6)
    row = s16.as_row()
    assert row["JF_mean"] == pytest.approx((row["J_mean"] + row["F_mean"]) / 2)
    means = dm.summarize([s16, s17])
    assert means["J_mean"] == pytest.approx((0.75 + 4 / 6) / 2)
    # 7 scored frames: linspace(1, 7, 5) = [1, 2.5, 4, 5.5, 7]; the first bin ends at 2.5 ->
    # frame 2 (half-to-even, davis2016) or 3 (half up, davis2017); the last bin is frames 6-7
    # for both. J = [1, 1, 0, 1, 1, 0, 0]: decay 1 - 0 (2016) vs 2/3 - 0 (2017)
    gt9 = np.zeros((9, 10, 10), bool)
    gt9[:, 2:6, 2:6] = True
    pred9 = gt9.copy()
    pred9[[3, 6, 7]] = False  # scored frames 1..7 of 9 -> J [1, 1, 0, 1, 1, 0, 0]
    d16 = dm.evaluate_sequence(pred9, gt9, "s", "davis2016")
    d17 = dm.evaluate_sequence(pred9[1:8], gt9[1:8], "s", "davis2017-unsupervised")
    assert d16.j == d17.j == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert d16.j_stats.decay == pytest.approx(1.0)
    assert d17.j_stats.decay == pytest.approx(2 / 3)
    assert d16.f_stats.decay == pytest.approx(1.0) and d17.f_stats.decay == pytest.approx(2 / 3)


def test_validation() -> None:
    m = np.zeros((3, 8, 8), bool)
    with pytest.raises(ValueError, match="differ in shape"):
        dm.jaccard(m, np.zeros((3, 8, 9), bool))
    with pytest.raises(ValueError, match="pred is not a binary mask"):
        dm.f_measure(np.full((3, 8, 8), 0.7), m)
    with pytest.raises(ValueError, match="gt is not a binary mask"):
        dm.jaccard(m, np.arange(3 * 64).reshape(3, 8, 8) % 3)
    np.testing.assert_array_equal(dm.as_binary("x", m.astype(np.uint8) * 255), m)  # 0/255 PNGs
    with pytest.raises(ValueError, match=">= 3 frames"):
        dm.evaluate_sequence(m[:2], m[:2], "short")
    with pytest.raises(ValueError, match="unknown frame convention"):
        dm.evaluate_sequence(m, m, conv="davis2019")
    with pytest.raises(ValueError, match="backend must be"):
        dm.f_measure(m, m, backend="opencv")
    with pytest.raises(ValueError, match="N, H, W"):
        dm.jaccard(np.zeros(5, bool), np.zeros(5, bool))


def test_backend_choice_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        assert dm.resolve_backend("auto") == "numba"
        with pytest.raises(RuntimeError, match="'cupy' requested but"):
            dm.f_measure(SQUARE, SQUARE, backend="cupy")
    monkeypatch.setattr(dm, "_available", lambda name: (name == "scipy", f"{name} is out"))
    monkeypatch.setattr(dm.backend, "_warned", set())
    with pytest.warns(UserWarning, match="runs on scipy: cupy is out; numba is out"):
        assert dm.resolve_backend("auto") == "scipy"
    assert dm.f_measure(SQUARE, SQUARE)[0] == 1.0
