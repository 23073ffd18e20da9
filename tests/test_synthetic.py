"""The procedural dataset: determinism, splits, shapes, and exactness of the masks and flow."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vosgan.data import SyntheticVideos
from vosgan.ops.flow_warp import warp_reference


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shapes_dtypes_ranges() -> None:
    ds = SyntheticVideos(6, frames=9, size=24, seed=3)
    item = ds[2]
    assert item["video"].shape == (3, 9, 24, 24) and item["video"].dtype == torch.float32
    assert item["mask"].shape == (1, 9, 24, 24) and item["mask"].dtype == torch.float32
    assert item["flow"].shape == (2, 8, 24, 24) and item["flow"].dtype == torch.float32
    b = ds.batch([0, 5, 2])
    assert b["video"].shape == (3, 3, 9, 24, 24) and b["flow"].shape == (3, 2, 8, 24, 24)
    assert b["video"].is_contiguous() and b["flow"].is_contiguous()
    assert -1.0 <= float(b["video"].min()) and float(b["video"].max()) <= 1.0
    assert set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    # flow is exactly zero on the background and bounded by the speed limit (+20% modulation)
    bgnd = b["mask"][:, :, :-1].expand_as(b["flow"]) == 0
    assert torch.all(b["flow"][bgnd] == 0)
    speed = torch.linalg.vector_norm(b["flow"], dim=1)
    assert float(speed.max()) <= 1.2 * ds.max_speed + 1e-5
    assert float(speed.max()) > 0  # something moves
    assert _same(ds[5], {k: v[1] for k, v in b.items()})


def test_deterministic_and_order_independent() -> None:
    a = SyntheticVideos(8, 6, 16, seed=11).batch(range(8))
    ds = SyntheticVideos(100, 6, 16, seed=11)  # length does not change clip i
    assert _same(a, ds.batch(range(8)))
    assert _same({k: v[3] for k, v in a.items()}, ds[3])
    reversed_ = ds.batch(range(7, -1, -1))
    assert _same(a, {k: v.flip(0) for k, v in reversed_.items()})
    other_seed = SyntheticVideos(8, 6, 16, seed=12).batch(range(8))
    assert not torch.equal(a["video"], other_seed["video"])


def test_splits_are_disjoint() -> None:
    def digests(split: str) -> set[str]:
        ds = SyntheticVideos(48, 4, 16, seed=0, split=split)
        return {hashlib.sha1(ds.clip(i).video.tobytes()).hexdigest() for i in range(48)}

    train, val, test = digests("train"), digests("val"), digests("test")
    assert len(train) == len(val) == len(test) == 48
    assert not (train & val) and not (train & test) and not (val & test)


def test_cache_matches_on_the_fly() -> None:
    live = SyntheticVideos(5, 7, 20, seed=4, split="val")
    cached = SyntheticVideos(5, 7, 20, seed=4, split="val", cache=True)
    assert _same(live[3], cached[3])  # renders clip 3 into the cache
    assert _same(live.batch([4, 3, 0]), cached.batch([4, 3, 0]))  # 3 read, 4 and 0 rendered
    assert _same(live.batch(range(5)), cached.batch(range(5)))
    assert _same(live[4], cached[4])


def test_dataloader_collates_items() -> None:
    ds = SyntheticVideos(6, 5, 16, seed=2)
    first = next(iter(DataLoader(ds, batch_size=3, shuffle=False)))
    assert _same(first, ds.batch([0, 1, 2]))


def test_background_is_static_and_mask_is_where_sprites_are() -> None:
    """Without noise and flicker, every unmasked pixel shows the static background exactly."""
    ds = SyntheticVideos(6, 8, 32, seed=5, noise_std=0.0, flicker=0.0)
    differs = covered = 0
    for i in range(len(ds)):
        clip = ds.clip(i)
        bg_u8 = np.rint(clip.background * np.float32(255.0)).astype(np.uint8)
        mask = ds[i]["mask"][0].numpy() > 0
        assert np.array_equal(mask, clip.ids > 0)
        assert np.array_equal(clip.video[~mask], np.broadcast_to(bg_u8, clip.video.shape)[~mask])
        diff = np.abs(clip.video.astype(int) - bg_u8.astype(int)).max(axis=-1)
        differs += int((diff[mask] > 2).sum())
        covered += int(mask.sum())
        assert not np.array_equal(mask[0], mask[-1]), "sprites should move"
    assert covered > 0 and differs / covered > 0.8  # sprites are drawn where the mask says


def test_sprite_count_and_empty_scenes() -> None:
    ds = SyntheticVideos(6, 4, 16, min_sprites=2, max_sprites=2)
    for i in range(6):  # both sprites are drawn (somewhere in the clip), and nothing else
        assert set(np.unique(ds.clip(i).ids)) == {0, 1, 2}
    empty = SyntheticVideos(3, 4, 16, min_sprites=0, max_sprites=0).batch(range(3))
    assert float(empty["mask"].sum()) == 0 and float(empty["flow"].abs().sum()) == 0


def _warp_errors(noise: float, size: int) -> tuple[float, float, float, float]:
    """Mean |frame_t - warp(frame_t+1, flow)| on sprite pixels that stay visible, for the GT
    flow, zero flow, negated flow and x/y-swapped flow (video units: [-1, 1])."""
    ds = SyntheticVideos(6, 6, size, seed=9, split="test", noise_std=noise, flicker=noise)
    sums = torch.zeros(4)
    count = 0
    for i in range(len(ds)):
        item, ids = ds[i], torch.from_numpy(ds.clip(i).ids).long()
        v, flow = item["video"].transpose(0, 1), item["flow"].transpose(0, 1)  # (T, C, H, W)
        valid = torch.zeros_like(ids[:-1], dtype=torch.bool)
        for k in range(1, int(ids.max()) + 1):  # all bilinear taps land on the same sprite
            lands = warp_reference((ids[1:] == k).float().unsqueeze(1), flow)[:, 0]
            valid |= (ids[:-1] == k) & (lands > 1 - 1e-5)
        for j, f in enumerate((flow, torch.zeros_like(flow), -flow, flow.flip(1))):
            err = (v[:-1] - warp_reference(v[1:], f)).abs().mean(dim=1)
            sums[j] += err[valid].sum()
        count += int(valid.sum())
    assert count > 500
    return tuple((sums / count).tolist())


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_flow_matches_rendering(size: int) -> None:
    gt, zero, neg, swap = _warp_errors(noise=0.0, size=size)
    # only bilinear resampling error of the sprite texture and uint8 rounding are left
    assert gt < 0.015, gt
    assert gt < zero / 5 and gt < neg / 5 and gt < swap / 3, (gt, zero, neg, swap)


def test_ground_truth_flow_with_sensor_noise() -> None:
    gt, zero, _, _ = _warp_errors(noise=0.01, size=32)
    assert gt < 0.035 and gt < zero / 2.5, (gt, zero)


def test_default_speeds_scale_with_size() -> None:
    for size in (32, 64):
        ds = SyntheticVideos(16, 8, size, seed=1)
        b = ds.batch(range(16))
        speed = torch.linalg.vector_norm(b["flow"], dim=1)[b["mask"][:, 0, :-1] > 0]
        assert ds.max_speed == pytest.approx(2.0 * size / 32)
        # uniform speeds in [0.15, 1] * max_speed (bounces only shorten a step)
        assert 0.2 * ds.max_speed < float(speed.median()) < 0.9 * ds.max_speed


def test_render_speed_sanity() -> None:
    """~1.5 ms per 16x32x32 clip on the 2-core dev box; the bound leaves room for a busy CI."""
    ds = SyntheticVideos(40, 16, 32, seed=0)
    ds.clip(0)
    times = []
    for i in range(1, 40):
        t0 = time.perf_counter()
        ds.clip(i)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "validation"}, "split"),
        ({"frames": 1}, "frames"),
        ({"size": 4}, "size"),
        ({"num_clips": 0}, "num_clips"),
        ({"min_sprites": 3, "max_sprites": 2}, "min_sprites"),
        ({"max_speed": -1.0}, "max_speed"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"num_clips": 4, "frames": 4, "size": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        SyntheticVideos(**args)


def test_index_out_of_range() -> None:
    ds = SyntheticVideos(3, 4, 16)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    with pytest.raises(IndexError, match="out of range"):
        ds.batch([0, -1])
