import math

import pytest
import torch
import torch.nn.functional as F

from vosgan import losses as L
from vosgan.config import LossConfig, ModelConfig
from vosgan.models import DiscOutput, Discriminator, GenOutput


def test_adversarial_known_values():
    zero = torch.zeros(4)
    assert math.isclose(L.d_adversarial(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(L.g_adversarial(zero).item(), math.log(2), rel_tol=1e-6)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - [2, 0]) = [0, 1] -> 0.5; relu(1 + [-2, .5]) = [0, 1.5] -> 0.75
    assert math.isclose(L.d_adversarial(real, fake, "hinge").item(), 1.25, rel_tol=1e-6)
    assert math.isclose(L.g_adversarial(fake, "hinge").item(), 0.75, rel_tol=1e-6)


def test_flow_validity_marks_flows_leaving_the_frame():
    flow = torch.zeros(1, 2, 1, 3, 4)
    flow[0, 0, 0, 0, 3] = 0.5  # right edge, moves out
    flow[0, 1, 0, 2, 0] = -3.0  # moves above the top
    valid = L.flow_validity(flow)
    assert valid.shape == (1, 1, 1, 3, 4)
    assert valid.sum() == 10 and valid[0, 0, 0, 0, 3] == 0 and valid[0, 0, 0, 2, 0] == 0


def test_smoothness_zero_for_constant_flow_and_edge_aware():
    video = torch.zeros(1, 3, 3, 4, 4)
    const = torch.ones(1, 2, 2, 4, 4)
    assert L.flow_smoothness(const, video).item() == 0
    step = torch.zeros(1, 2, 2, 4, 4)
    step[..., 2:] = 1.0  # a flow edge between columns 1 and 2
    flat = L.flow_smoothness(step, video).item()
    video_edge = video.clone()
    video_edge[..., 2:] = 1.0  # an image edge at the same place damps the penalty
    assert L.flow_smoothness(step, video_edge, edge=10.0).item() < flat * 1e-3
    # |du/dx| = 1 on 1 of 3 column pairs for both channels -> 1/3
    assert math.isclose(flat, 1 / 3, rel_tol=1e-6)


def test_segmentation_loss_detaches_the_mask():
    logit = torch.zeros(1, 1, 2, 2, 2, requires_grad=True)
    mask = torch.ones(1, 1, 2, 2, 2, requires_grad=True)
    loss = L.segmentation_loss(logit, mask)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    loss.backward()
    assert mask.grad is None and logit.grad is not None


def test_balanced_segmentation_loss_weights_the_foreground_by_its_rarity():
    logit = torch.zeros(1, 1, 1, 2, 4)
    mask = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0]).view(1, 1, 1, 2, 4)  # mu = 0.25: weight 3
    plain, balanced = L.segmentation_loss(logit, mask), L.segmentation_loss(logit, mask, True)
    assert math.isclose(plain.item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(balanced.item(), (2 * 3 + 6) / 8 * math.log(2), rel_tol=1e-6)
    tiny = torch.zeros_like(mask)
    tiny[..., 0, 0] = 0.08  # mu = 0.01, clamped to 0.02: weight 49
    expect = (0.08 * 49 * math.log(2) + 0.92 * math.log(2) + 7 * math.log(2)) / 8
    assert math.isclose(L.segmentation_loss(logit, tiny, True).item(), expect, rel_tol=1e-6)


def test_r1_penalty_matches_closed_form():
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5)
    logit = x @ w  # d logit_b / d x_b = w
    torch.testing.assert_close(L.r1_penalty(logit, x), w.pow(2).sum())


def test_motion_loss_zero_when_flow_explains_the_motion():
    torch.manual_seed(0)
    frame = torch.rand(1, 3, 1, 6, 7)
    video = torch.cat([frame, frame], dim=2)  # static: zero flow is exact
    loss = L.VosGanLoss(LossConfig(charbonnier_eps=1e-6))
    warp, smooth = loss.motion(video, torch.zeros(1, 2, 1, 6, 7))
    assert warp.item() < 1e-5 and smooth.item() == 0


def test_binomial_blur_known_values_and_constant_preserving():
    video = torch.zeros(1, 1, 1, 3, 3)
    video[..., 1, 1] = 16.0  # an impulse -> the 3x3 binomial kernel [1 2 1]^T [1 2 1]
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    torch.testing.assert_close(L.binomial_blur(video)[0, 0, 0], expected)
    const = torch.full((2, 3, 4, 5, 6), 0.7)  # replicate padding keeps constants exact at borders
    torch.testing.assert_close(L.binomial_blur(const), const)


def test_blurred_photometric_loss_prefers_the_true_flow_to_a_shifted_one():
    # Unblurred, bilinear warping by a sub-pixel offset averages sensor noise, and the true flow
    # plus a uniform 0.25 px shift scores better than the true flow (measured on these clips:
    # 0.0315 vs 0.0328); with the blur the true flow wins (0.0192 vs 0.0208).
    from vosgan.data import SyntheticVideos

    batch = SyntheticVideos(8, 16, 32, split="val").batch(range(8))
    video, true = batch["video"], batch["flow"]
    for blur, shift_wins in ((False, True), (True, False)):
        loss = L.VosGanLoss(LossConfig(photometric_blur=blur))
        gap = loss.motion(video, true + 0.25)[0].item() - loss.motion(video, true)[0].item()
        assert (gap < 0) == shift_wins, (blur, gap)


def test_total_losses_weight_their_parts_as_configured():
    # Each weight a distinct value, so a dropped or swapped weight changes the total.
    cfg = LossConfig(
        adversarial="hinge",
        segmentation=0.7,
        flow=3.0,
        flow_fake=0.25,
        flow_smoothness=0.4,
        mask_sparsity=0.3,
        consistency=0.6,
        r1=2.0,
        r1_every=4,
        motion_seg=1.3,
        motion_span=1,
        motion_guide=0.3,
        motion_guide_radius=2,
    )
    loss = L.VosGanLoss(cfg)
    g = torch.Generator().manual_seed(0)
    real, fake_video = (torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    mask = torch.rand(2, 1, 4, 8, 8, generator=g)
    fake = GenOutput(fake_video, fake_video, mask, fake_video[:, :, 0])
    d_real, d_fake = (
        DiscOutput(
            torch.randn(2, generator=g),
            torch.randn(2, 1, 4, 8, 8, generator=g),
            torch.randn(2, 2, 3, 8, 8, generator=g),
        )
        for _ in range(2)
    )
    total, parts = loss.discriminator(real, d_real, fake, d_fake)
    warp_r, smooth_r = loss.motion(real, d_real.flow)
    warp_f, smooth_f = loss.motion(fake_video, d_fake.flow)
    torch.testing.assert_close(parts["d_adv"], L.d_adversarial(d_real.logit, d_fake.logit, "hinge"))
    torch.testing.assert_close(parts["d_seg"], L.segmentation_loss(d_fake.seg_logit, mask))
    torch.testing.assert_close(parts["d_flow"], warp_r + 0.25 * warp_f)
    torch.testing.assert_close(parts["d_smooth"], smooth_r + 0.25 * smooth_f)
    expect = parts["d_adv"] + 0.7 * parts["d_seg"] + 3.0 * parts["d_flow"]
    torch.testing.assert_close(total, expect + 0.4 * parts["d_smooth"])
    assert "d_motion_seg" not in parts  # only on the steps train_step says (motion_seg_due)
    total_m, parts_m = loss.discriminator(real, d_real, fake, d_fake, motion_seg=True)
    moving = L.motion_mask(d_real.flow, span=1, guide=real, radius=2, sigma=0.3)
    assert not torch.equal(moving, L.motion_mask(d_real.flow, 0, real, 2, 0.3))  # span passed on
    assert not torch.equal(moving, L.motion_mask(d_real.flow, span=1))  # and the guide
    torch.testing.assert_close(
        parts_m["d_motion_seg"], L.segmentation_loss(d_real.seg_logit, moving)
    )
    torch.testing.assert_close(total_m, total + 1.3 * parts_m["d_motion_seg"])

    total, parts = loss.generator(fake, d_fake)
    consistency = F.binary_cross_entropy(mask, torch.sigmoid(d_fake.seg_logit))
    torch.testing.assert_close(parts["g_adv"], L.g_adversarial(d_fake.logit, "hinge"))
    torch.testing.assert_close(parts["g_mask"], mask.mean())
    torch.testing.assert_close(parts["g_consistency"], consistency)
    torch.testing.assert_close(total, parts["g_adv"] + 0.3 * mask.mean() + 0.6 * consistency)

    D = Discriminator(ModelConfig(size=16, frames=16, d_channels=4))
    x = torch.rand(2, 3, 16, 16, 16, generator=g)
    penalty = L.r1_penalty(D(x.requires_grad_(True), dense=False).logit, x)
    torch.testing.assert_close(loss.r1(D, x), 0.5 * 2.0 * 4 * penalty)  # lazy: times r1_every


def test_otsu_threshold_splits_two_populations():
    g = torch.Generator().manual_seed(0)
    slow = torch.rand(3, 900, generator=g) * 0.2  # 0-0.2 px: the static background's noise
    fast = 1.0 + torch.rand(3, 100, generator=g)  # 1-2 px: the moving tenth
    th = L.otsu_threshold(torch.cat([slow, fast], 1)[:, torch.randperm(1000, generator=g)])
    assert th.shape == (3,) and ((th > 0.2) & (th <= 1.0)).all(), th
    assert (L.otsu_threshold(torch.zeros(2, 50)) == 0).all()  # no motion: nothing above it
    # bf16 flow: counted in float32 (bf16 counts stop at 256), so the same split as in float32
    bf16 = torch.cat([slow, fast], 1).repeat(1, 4).bfloat16()
    torch.testing.assert_close(L.otsu_threshold(bf16), L.otsu_threshold(bf16.float()))
    with pytest.raises(ValueError, match="must be"):
        L.otsu_threshold(torch.zeros(2, 3, 4))


def test_motion_mask_marks_where_the_flow_leaves_each_frame():
    """A 3x2 patch moving right by 1.5 px per frame on a still background (plus noise): the
    mask is the patch where each frame's flow starts, and the last frame takes the flow into it."""
    b, t, h, w = 2, 4, 8, 10
    flow = 0.05 * torch.randn(b, 2, t - 1, h, w, generator=torch.Generator().manual_seed(1))
    expect = torch.zeros(b, 1, t, h, w)
    for i in range(t - 1):
        flow[0, 0, i, 2:5, 1 + i : 3 + i] = 1.5
        expect[0, 0, i, 2:5, 1 + i : 3 + i] = 1
    expect[0, 0, t - 1] = expect[0, 0, t - 2]
    flow[1] = 0.0  # clip 1 is still: empty mask, not the noise's upper half
    mask = L.motion_mask(flow)
    assert mask.shape == (b, 1, t, h, w) and mask.dtype == flow.dtype
    torch.testing.assert_close(mask, expect)


def test_motion_mask_span_keeps_only_motion_that_persists():
    """``span=1``: frame t reads the smaller of the speeds into and out of it. A patch moving
    right whose flow bleeds one column ahead of it: the bleed (present only in the frame pair
    before a pixel is covered) is dropped, the patch's core (moving in both pairs) kept."""
    b, t, h, w = 1, 5, 6, 12
    flow = torch.zeros(b, 2, t - 1, h, w)
    for i in range(t - 1):
        flow[0, 0, i, 1:4, 2 + i : 5 + i] = 1.0  # the patch, 3 columns, moving 1 px per frame
        flow[0, 0, i, 1:4, 5 + i] = 1.0  # the bleed ahead of it
    expect = torch.zeros(b, 1, t, h, w)
    for i in range(t):  # pairs i-1 and i (clamped to the clip): the columns both mark
        expect[0, 0, i, 1:4, 2 + min(i, t - 2) : 6 + max(i - 1, 0)] = 1
    assert expect[0, 0, 2, 2].tolist() == [0] * 4 + [1] * 3 + [0] * 5  # frame 2: the patch alone
    span1 = L.motion_mask(flow, span=1)
    torch.testing.assert_close(span1, expect)
    assert L.motion_mask(flow).sum() > span1.sum()  # span 0 keeps the bleed
    with pytest.raises(ValueError, match="span"):
        L.motion_mask(flow, span=-1)


def test_motion_mask_guide_drops_bleed_beside_a_moving_patch():
    """A patch moving right whose flow also bleeds into the rows above and below it, in every
    frame pair: the span's minimum keeps that bleed (it persists), the colour guide (the patch
    one colour, the background another) hands it the background's speed."""
    b, t, h, w = 1, 5, 12, 16
    g = torch.Generator().manual_seed(2)
    flow = 0.05 * torch.rand(b, 2, t - 1, h, w, generator=g)  # the background: slow noise
    video = -torch.ones(b, 3, t, h, w)
    truth = torch.zeros(b, 1, t, h, w, dtype=torch.bool)
    for i in range(t):
        video[0, :, i, 4:8, 2 + i : 7 + i] = 0.8
        truth[0, 0, i, 4:8, 2 + i : 7 + i] = True
    for i in range(t - 1):
        flow[0, 0, i, 3:9, 2 + i : 7 + i] = 1.0  # the patch and one row of bleed above and below
    plain = L.motion_mask(flow, span=1).bool()
    guided = L.motion_mask(flow, span=1, guide=video, radius=4, sigma=0.1).bool()
    assert plain[0, 0, 2, 3].any() and plain[0, 0, 2, 8].any()  # the bleed rows
    assert not guided[0, 0, :, 3].any() and not guided[0, 0, :, 8].any()
    assert (guided & ~truth).sum() == 0 and (guided & truth).sum() >= (plain & truth).sum()


def _affine_field(h: int, w: int, a: tuple[float, ...]) -> torch.Tensor:
    """``(2, h, w)``: ``u = a0 + a1 x + a2 y``, ``v = a3 + a4 x + a5 y`` on [-1, 1] coordinates."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([a[0] + a[1] * xs + a[2] * ys, a[3] + a[4] * xs + a[5] * ys])


def test_camera_motion_recovers_an_affine_field_around_a_moving_object():
    """Pan, zoom and shear in every frame pair (a different one per clip and pair) plus an
    object covering a fifth of the frame moving its own way: the fit is the camera's field, the
    object's pixels excluded; a still camera fits to zero."""
    b, p, h, w = 2, 3, 12, 15
    g = torch.Generator().manual_seed(3)
    flow = torch.empty(b, 2, p, h, w)
    camera = torch.empty_like(flow)
    for i in range(b):
        for j in range(p):
            camera[i, :, j] = _affine_field(h, w, (4 * torch.rand(6, generator=g) - 2).tolist())
    flow.copy_(camera)
    flow[:, :, :, 3:8, 4:11] += torch.tensor([2.5, -3.0]).view(1, 2, 1, 1, 1)  # 35 of 180 px
    torch.testing.assert_close(L.camera_motion(flow), camera, atol=1e-4, rtol=0)
    assert L.camera_motion(torch.zeros(1, 2, 2, 6, 7)).abs().max() == 0
    with pytest.raises(ValueError, match="keep"):
        L.camera_motion(flow, keep=0.0)


def test_motion_mask_camera_finds_the_object_a_panning_camera_follows():
    """A tracking shot: the camera pans with the object, so the background sweeps past at 3 px
    per frame and the object stands still in the frame. Speed alone marks the background;
    minus the camera's motion, the object."""
    b, t, h, w = 1, 4, 16, 16
    noise = 0.05 * torch.randn(b, 2, t - 1, h, w, generator=torch.Generator().manual_seed(4))
    flow = torch.zeros(b, 2, t - 1, h, w)
    flow[:, 0] = -3.0  # the background moves left as the camera pans right
    obj = torch.zeros(b, 1, t, h, w, dtype=torch.bool)
    obj[..., 5:11, 6:10] = True
    flow[:, 0][obj[:, 0, 1:]] = 0.0
    flow = flow + noise
    plain = L.motion_mask(flow, span=1).bool()
    compensated = L.motion_mask(flow, span=1, camera=True).bool()
    assert torch.equal(plain, ~obj)
    assert torch.equal(compensated, obj)


@pytest.mark.parametrize(
    ("setting", "real_video", "on"),
    [("auto", True, True), ("auto", False, False), ("affine", False, True), ("none", True, False)],
)
def test_camera_compensation_follows_the_config_and_the_data(setting, real_video, on):
    """``loss.motion_camera=auto`` compensates on real video only (the synthetic camera never
    moves), and the pseudo-labels the D loss trains on are the compensated ones."""
    cfg = LossConfig(
        segmentation=0, flow=0, flow_smoothness=0, motion_seg=1.0, motion_camera=setting
    )
    loss = L.VosGanLoss(cfg, real_video=real_video)
    assert loss.camera is on
    b, t, s = 2, 4, 16
    flow = torch.zeros(b, 2, t - 1, s, s)
    flow[:, 0] = -3.0
    flow[:, 0, :, 5:11, 6:10] = 0.0  # the tracked object stands still
    logit = torch.full((b, 1, t, s, s), -8.0)
    logit[..., 5:11, 6:10] = 8.0  # D segments the object
    d_real = DiscOutput(logit=torch.zeros(b), seg_logit=logit, flow=flow)
    d_fake = DiscOutput(logit=torch.zeros(b), seg_logit=logit, flow=None)
    zeros = torch.zeros(b, 3, t, s, s)
    fake = GenOutput(video=zeros, fg=zeros, mask=zeros[:, :1], bg=zeros[:, :, 0])
    _, parts = loss.discriminator(zeros, d_real, fake, d_fake, motion_seg=True)
    # D's segmentation of the object agrees with the compensated pseudo-labels only
    assert (parts["d_motion_seg"].item() < 0.01) is on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_consistency_under_cuda_autocast():
    """F.binary_cross_entropy refuses to run under CUDA autocast: the consistency term opts out."""
    loss = L.VosGanLoss(LossConfig(consistency=0.5))
    g = torch.Generator(device="cuda").manual_seed(0)
    mask = torch.rand(2, 1, 4, 8, 8, device="cuda", generator=g)
    video = mask.expand(2, 3, 4, 8, 8) * 2 - 1
    fake = GenOutput(video=video, fg=video, mask=mask, bg=video[:, :, 0])
    logit = torch.randn(2, device="cuda")
    d_fake = DiscOutput(logit=logit, seg_logit=torch.randn_like(mask), flow=None)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, parts = loss.generator(fake, d_fake)
    want = F.binary_cross_entropy(mask, torch.sigmoid(d_fake.seg_logit))
    torch.testing.assert_close(parts["g_consistency"], want)
